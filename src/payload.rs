//! An outbox row's payload as the worker reads it: the value itself (for jsonb a toast pointer or
//! a few compressed bytes), made text only when a batch takes the row. A `::text` in the query
//! would make every fetched row text at once (a fetch of many large rows after small ones), and
//! a jsonb whose text PostgreSQL cannot make (over 1 GB: numbers of 131,072 digits, escapes)
//! would fail the query, and with it every round of the partition, forever.

use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::PgMemoryContexts;

use outbox_core::settings::json_string_literal_len;

use crate::xact::{self, DbError};

/// A jsonb value stored in fewer bytes has a text under 1 GB and within any sensible
/// `max_command_size` check: the most a byte of jsonb grows to is a number's digits (a 16-byte
/// number prints at most 147,457 of them), so 32 KiB print under 300 MB. A larger value is
/// measured first, without making its text.
const JSONB_TEXT_SURELY_FITS: usize = 32 * 1024;

/// The longest text PostgreSQL can make (MaxAllocSize, less the terminating zero).
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

    /// The payload's text. A large jsonb is measured first: over `max_command_size` (0: no
    /// limit) or over what PostgreSQL can make, it is a dead letter without its text ever made.
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
        let measured = if self.raw_size() < JSONB_TEXT_SURELY_FITS {
            None
        } else {
            // Detoasted into the scratch memory.
            Some(scratch.run(|| self.compact_len()))
        };
        match measured {
            Some(len) if len > MAX_TEXT => {
                return Ok(self.dead_letter(format!(
                    "payload cannot be made text: its text would pass 1 GB, more than PostgreSQL can make ({len} bytes without spaces)"
                )))
            }
            Some(len) if max_command_size > 0 && len > max_command_size => {
                return Ok(self.dead_letter(format!(
                    "payload of {len} bytes exceeds centrifugo.max_command_size ({max_command_size} bytes)"
                )))
            }
            _ => {}
        }
        // jsonb's text has a space after each ',' and ':', so under twice the compact length:
        // only past half of the limit can it still be refused (54000), then caught, not repeated.
        let made = if measured.is_some_and(|len| len >= MAX_TEXT / 2) {
            // SAFETY: as above.
            let made = xact::subtransaction(|| scratch.run(|| unsafe { output_text(datum, type_oid) }));
            scratch.reset();
            match made {
                Ok(text) => text,
                Err(e) if e.sqlstate == "54000" => {
                    return Ok(self.dead_letter(format!("payload cannot be made text: {e}")));
                }
                Err(e) => return Err(e),
            }
        } else {
            // SAFETY: as above.
            scratch.run(|| unsafe { output_text(datum, type_oid) })
        };
        Ok(match made {
            Some(text) => PayloadText::Text(text),
            None => self.dead_letter("payload cannot be made text: it is not UTF-8".to_owned()),
        })
    }

    /// The length of a jsonb's text without spaces between tokens (what `compact_json_len`
    /// measures of its text), counted without making it; counting stops past 1 GB.
    pub fn compact_len(&self) -> usize {
        assert_eq!(self.type_oid, pg_sys::JSONBOID, "only a jsonb is measured");
        // SAFETY: a jsonb datum, valid while its fetch is.
        unsafe { compact_text_len(self.datum) }
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

/// The value's text by its type's output function; None if it is not UTF-8.
///
/// # Safety
/// `datum` must be a valid value of `type_oid`.
unsafe fn output_text(datum: pg_sys::Datum, type_oid: pg_sys::Oid) -> Option<String> {
    let (mut function, mut is_varlena) = (pg_sys::InvalidOid, false);
    pg_sys::getTypeOutputInfo(type_oid, &mut function, &mut is_varlena);
    let text = pg_sys::OidOutputFunctionCall(function, datum);
    let owned = CStr::from_ptr(text).to_str().map(str::to_owned).ok();
    pg_sys::pfree(text.cast());
    owned
}

/// See [`PayloadDatum::compact_len`].
///
/// # Safety
/// `datum` must be a valid jsonb value.
unsafe fn compact_text_len(datum: pg_sys::Datum) -> usize {
    use pg_sys::JsonbIteratorToken::*;
    let jsonb = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::Jsonb>();
    let mut iterator = pg_sys::JsonbIteratorInit(&mut (*jsonb).root);
    let mut value: pg_sys::JsonbValue = std::mem::zeroed();
    // Per open container: whether it is a scalar's wrapper (no brackets), and whether it has an
    // entry yet (the next one is preceded by a comma).
    let mut open: Vec<(bool, bool)> = Vec::new();
    let mut after_key = false;
    let (mut numeric_out, mut is_varlena) = (pg_sys::InvalidOid, false);
    pg_sys::getTypeOutputInfo(pg_sys::NUMERICOID, &mut numeric_out, &mut is_varlena);
    let mut len = 0usize;
    // A comma before every entry of a container but its first; none between a key and its value.
    fn separate(open: &mut [(bool, bool)], after_key: &mut bool) -> usize {
        if std::mem::take(after_key) {
            return 0;
        }
        open.last_mut().map_or(0, |(_, seen)| usize::from(std::mem::replace(seen, true)))
    }
    while len <= MAX_TEXT {
        match pg_sys::JsonbIteratorNext(&mut iterator, &mut value, false) {
            WJB_DONE => break,
            WJB_BEGIN_ARRAY => {
                len += separate(&mut open, &mut after_key);
                let raw_scalar = value.val.array.rawScalar;
                len += usize::from(!raw_scalar);
                open.push((raw_scalar, false));
            }
            WJB_BEGIN_OBJECT => {
                len += separate(&mut open, &mut after_key) + 1;
                open.push((false, false));
            }
            WJB_END_ARRAY | WJB_END_OBJECT => {
                let (raw_scalar, _) = open.pop().unwrap_or_default();
                len += usize::from(!raw_scalar);
            }
            WJB_KEY => {
                len += separate(&mut open, &mut after_key) + scalar_len(&value, numeric_out) + 1;
                after_key = true;
            }
            _ => len += separate(&mut open, &mut after_key) + scalar_len(&value, numeric_out),
        }
    }
    len
}

/// The text length of a jsonb scalar.
///
/// # Safety
/// `value` must be a scalar the jsonb iterator returned, `numeric_out` numeric's output function.
unsafe fn scalar_len(value: &pg_sys::JsonbValue, numeric_out: pg_sys::Oid) -> usize {
    match value.type_ {
        pg_sys::jbvType::jbvNull => 4,
        pg_sys::jbvType::jbvBool if value.val.boolean => 4,
        pg_sys::jbvType::jbvBool => 5,
        pg_sys::jbvType::jbvString => {
            let string = value.val.string;
            let bytes = std::slice::from_raw_parts(string.val.cast::<u8>(), string.len.max(0) as usize);
            json_string_literal_len(bytes)
        }
        pg_sys::jbvType::jbvNumeric => {
            // As jsonb's text prints it; freed at once (there may be many long ones).
            let text = pg_sys::OidOutputFunctionCall(numeric_out, pg_sys::Datum::from(value.val.numeric));
            let len = CStr::from_ptr(text).to_bytes().len();
            pg_sys::pfree(text.cast());
            len
        }
        // Stored jsonb holds no other scalar; counted generously.
        _ => 64,
    }
}
