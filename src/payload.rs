//! An outbox row's payload as the worker reads it: the value itself (for jsonb a toast pointer or
//! a few compressed bytes), made text only when a batch takes the row. A `::text` in the query
//! would make every fetched row text at once (a fetch of many large rows after small ones), and
//! a jsonb whose text PostgreSQL cannot make (over 1 GB: numbers of 131,072 digits, escapes)
//! would fail the query, and with it every round of the partition, forever. So the worker writes
//! a jsonb's text itself, exactly as `jsonb_out` does, and stops as soon as it is too long for
//! `max_command_size`: no payload, however its text would grow, costs more than the limit.

use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::PgMemoryContexts;

use outbox_core::settings::json_string_literal_len;

use crate::xact::DbError;

/// The longest text PostgreSQL can make (MaxAllocSize, less the terminating zero): a jsonb whose
/// text would be longer is not sent (Centrifugo would refuse far less anyway).
const MAX_TEXT: usize = 0x3fff_fffe;

/// Memory for making one payload text at a time, emptied after each.
pub struct Scratch(PgMemoryContexts);

impl Scratch {
    pub fn new() -> Self {
        Scratch(PgMemoryContexts::new("centrifugo_outbox payload text"))
    }

    fn run<R>(&mut self, body: impl FnOnce() -> R) -> R {
        // SAFETY: the context lives as long as `self`; what `body` returns is Rust-owned.
        let result = unsafe { self.0.switch_to(|_| body()) };
        self.reset();
        result
    }

    /// Also after an ERROR inside `run` (a 1 GB buffer PostgreSQL gave up on).
    fn reset(&mut self) {
        // SAFETY: nothing allocated in it is used any more.
        unsafe { pg_sys::MemoryContextReset(self.0.value()) };
    }
}

/// The payload column's value as fetched, valid while the fetch that returned it is.
pub struct PayloadDatum {
    datum: pg_sys::Datum,
    type_oid: pg_sys::Oid,
}

impl FromDatum for PayloadDatum {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, type_oid: pg_sys::Oid) -> Option<Self> {
        (!is_null).then_some(PayloadDatum { datum, type_oid })
    }
}

impl IntoDatum for PayloadDatum {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.datum)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }

    /// The query gives jsonb, or text for any other column type; [`PayloadDatum::text`] checks
    /// which (a domain is binary coercible too).
    fn is_compatible_with(other: pg_sys::Oid) -> bool {
        other == pg_sys::JSONBOID || other == pg_sys::TEXTOID
    }
}

/// What making a payload text gave.
pub enum PayloadText {
    Text(String),
    /// Not made text: why (the dead letter's reason), and the jsonb value copied into the
    /// transaction's memory (valid until the round's transaction ends), for the dead letter.
    DeadLetter {
        why: String,
        jsonb: pg_sys::Datum,
    },
}

impl PayloadDatum {
    /// The bytes the value takes once detoasted: what the batch budget counts before making text.
    pub fn raw_size(&self) -> usize {
        // SAFETY: text and jsonb are varlena; the datum is valid while its fetch is.
        unsafe { pg_sys::toast_raw_datum_size(self.datum) }
    }

    /// The payload's text. A jsonb whose compact text passes `max_command_size` (0: no limit)
    /// or whose text would pass 1 GB is a dead letter, its text written no further than that.
    pub fn text(&self, scratch: &mut Scratch, max_command_size: usize) -> Result<PayloadText, DbError> {
        let (datum, type_oid) = (self.datum, self.type_oid);
        if type_oid == pg_sys::TEXTOID {
            // SAFETY: a text datum (any column type but jsonb is read as text), valid while its fetch is.
            let text = scratch.run(|| unsafe { String::from_polymorphic_datum(datum, false, type_oid) });
            return Ok(PayloadText::Text(text.unwrap_or_default()));
        }
        if type_oid != pg_sys::JSONBOID {
            // The column's type changed under the prepared statement: the next round prepares it again.
            return Err(DbError::new(format!("the outbox's payload column changed type (to oid {type_oid})")));
        }
        let max_compact = if max_command_size > 0 { max_command_size } else { usize::MAX };
        // SAFETY: a jsonb datum, valid while its fetch is; detoasted into the scratch memory.
        let written = scratch.run(|| unsafe { write_jsonb_text(datum, max_compact) })?;
        Ok(match written {
            Written::Text(bytes) => match String::from_utf8(bytes) {
                Ok(text) => PayloadText::Text(text),
                Err(_) => self.dead_letter("payload cannot be made text: it is not UTF-8".to_owned()),
            },
            Written::OverLimit => self.dead_letter(format!(
                "payload of over {max_command_size} bytes exceeds centrifugo.max_command_size ({max_command_size} bytes)"
            )),
            Written::OverMaxText => self.dead_letter(
                "payload cannot be made text: its text would pass 1 GB, more than PostgreSQL can make".to_owned(),
            ),
        })
    }

    fn dead_letter(&self, why: String) -> PayloadText {
        // SAFETY: copies the varlena as it is (a toast pointer stays one) into memory that lives
        // as long as the transaction; the row it refers to stays readable by this transaction.
        let jsonb = unsafe {
            let value = self.datum.cast_mut_ptr::<pg_sys::varlena>();
            let size = pgrx::varlena::varsize_any(value);
            let copy = pg_sys::MemoryContextAlloc(pg_sys::TopTransactionContext, size);
            std::ptr::copy_nonoverlapping(value.cast::<u8>(), copy.cast::<u8>(), size);
            pg_sys::Datum::from(copy)
        };
        PayloadText::DeadLetter { why, jsonb }
    }
}

/// What writing a jsonb's text gave.
enum Written {
    Text(Vec<u8>),
    /// Its compact text (no spaces between tokens) passed the limit.
    OverLimit,
    /// Its text passed [`MAX_TEXT`].
    OverMaxText,
}

/// The jsonb's text as `jsonb_out` writes it (", " and ": " between tokens), written only while
/// its compact length (what `compact_json_len` measures) stays within `max_compact` and the text
/// within [`MAX_TEXT`].
///
/// # Safety
/// `datum` must be a valid jsonb value.
unsafe fn write_jsonb_text(datum: pg_sys::Datum, max_compact: usize) -> Result<Written, DbError> {
    use pg_sys::JsonbIteratorToken::*;
    let jsonb = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::Jsonb>();
    let mut iterator = pg_sys::JsonbIteratorInit(&mut (*jsonb).root);
    let mut value: pg_sys::JsonbValue = std::mem::zeroed();
    let mut out = Text { bytes: Vec::new(), spaces: 0, max_compact, over: None, numeric_out: None };
    // As jsonb_out: `first` is whether the next entry opens its container (no comma before it).
    let (mut first, mut raw_scalar) = (true, false);
    let mut token = pg_sys::JsonbIteratorNext(&mut iterator, &mut value, false);
    while token != WJB_DONE {
        pgrx::check_for_interrupts!();
        match token {
            WJB_BEGIN_ARRAY => {
                if !first {
                    out.separator(b',')?;
                }
                if value.val.array.rawScalar {
                    raw_scalar = true;
                } else {
                    out.push(b"[")?;
                }
                first = true;
            }
            WJB_BEGIN_OBJECT => {
                if !first {
                    out.separator(b',')?;
                }
                out.push(b"{")?;
                first = true;
            }
            WJB_KEY => {
                if !first {
                    out.separator(b',')?;
                }
                first = true;
                out.scalar(&value)?;
                out.separator(b':')?;
                // A nested container right after its key is written by the next turn, comma-less.
                token = pg_sys::JsonbIteratorNext(&mut iterator, &mut value, false);
                if token == WJB_VALUE {
                    first = false;
                    out.scalar(&value)?;
                } else {
                    continue;
                }
            }
            WJB_ELEM => {
                if !first {
                    out.separator(b',')?;
                }
                first = false;
                out.scalar(&value)?;
            }
            WJB_END_ARRAY => {
                if !raw_scalar {
                    out.push(b"]")?;
                }
                first = false;
            }
            WJB_END_OBJECT => {
                out.push(b"}")?;
                first = false;
            }
            _ => {}
        }
        if out.over.is_some() {
            break;
        }
        token = pg_sys::JsonbIteratorNext(&mut iterator, &mut value, false);
    }
    Ok(out.finish())
}

/// A jsonb's text being written, with its limits.
struct Text {
    bytes: Vec<u8>,
    /// The spaces after separators: the compact length is the rest.
    spaces: usize,
    max_compact: usize,
    /// Set once something did not fit: nothing more is written.
    over: Option<Over>,
    numeric_out: Option<pg_sys::FmgrInfo>,
}

#[derive(Clone, Copy)]
enum Over {
    Limit,
    MaxText,
}

impl Text {
    /// Whether `more` bytes, `spaces` of them spaces after separators, fit within both limits
    /// (memory for them reserved); if not, says which limit they pass and writes nothing more.
    fn fits(&mut self, more: usize, spaces: usize) -> Result<bool, DbError> {
        if self.over.is_some() {
            return Ok(false);
        }
        let len = self.bytes.len().saturating_add(more);
        if len - (self.spaces + spaces) > self.max_compact {
            self.over = Some(Over::Limit);
        } else if len > MAX_TEXT {
            self.over = Some(Over::MaxText);
        } else {
            // Not enough memory is the machine's state, not the row's: the round is retried.
            self.bytes.try_reserve(more).map_err(|_| DbError {
                sqlstate: "53200".into(),
                message: format!("out of memory writing a payload's text of {len} bytes"),
            })?;
            self.spaces += spaces;
        }
        Ok(self.over.is_none())
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), DbError> {
        if self.fits(bytes.len(), 0)? {
            self.bytes.extend_from_slice(bytes);
        }
        Ok(())
    }

    fn separator(&mut self, which: u8) -> Result<(), DbError> {
        if self.fits(2, 1)? {
            self.bytes.extend_from_slice(&[which, b' ']);
        }
        Ok(())
    }

    fn finish(self) -> Written {
        match self.over {
            None => Written::Text(self.bytes),
            Some(Over::Limit) => Written::OverLimit,
            Some(Over::MaxText) => Written::OverMaxText,
        }
    }

    /// A jsonb scalar as jsonb_out writes it.
    ///
    /// # Safety
    /// `value` must be a scalar the jsonb iterator returned.
    unsafe fn scalar(&mut self, value: &pg_sys::JsonbValue) -> Result<(), DbError> {
        match value.type_ {
            pg_sys::jbvType::jbvNull => self.push(b"null"),
            pg_sys::jbvType::jbvBool if value.val.boolean => self.push(b"true"),
            pg_sys::jbvType::jbvBool => self.push(b"false"),
            pg_sys::jbvType::jbvString => {
                let string = value.val.string;
                let bytes = std::slice::from_raw_parts(string.val.cast::<u8>(), string.len.max(0) as usize);
                self.string(bytes)
            }
            pg_sys::jbvType::jbvNumeric => {
                let numeric_out = self.numeric_out.get_or_insert_with(|| {
                    let mut info = pg_sys::FmgrInfo::default();
                    pg_sys::fmgr_info(pg_sys::Oid::from(pg_sys::F_NUMERIC_OUT), &mut info);
                    info
                });
                let text = pg_sys::OutputFunctionCall(numeric_out, pg_sys::Datum::from(value.val.numeric));
                let result = self.push(CStr::from_ptr(text).to_bytes());
                // Freed at once: there may be many long ones.
                pg_sys::pfree(text.cast());
                result
            }
            other => Err(DbError::new(format!("a jsonb scalar of unknown type {other}"))),
        }
    }

    /// A JSON string literal as PostgreSQL's escape_json writes it.
    fn string(&mut self, bytes: &[u8]) -> Result<(), DbError> {
        if !self.fits(json_string_literal_len(bytes), 0)? {
            return Ok(());
        }
        self.bytes.push(b'"');
        for &b in bytes {
            match b {
                b'"' => self.bytes.extend_from_slice(b"\\\""),
                b'\\' => self.bytes.extend_from_slice(b"\\\\"),
                0x08 => self.bytes.extend_from_slice(b"\\b"),
                0x0c => self.bytes.extend_from_slice(b"\\f"),
                b'\n' => self.bytes.extend_from_slice(b"\\n"),
                b'\r' => self.bytes.extend_from_slice(b"\\r"),
                b'\t' => self.bytes.extend_from_slice(b"\\t"),
                0..=0x1f => self.bytes.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
                _ => self.bytes.push(b),
            }
        }
        self.bytes.push(b'"');
        Ok(())
    }
}
