//! The SQL boundary for errors: typed errors of the pure logic become PostgreSQL errors with a
//! SQLSTATE, message and hint. Messages never carry settings values, so no secret can leak.

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgLogLevel;

use outbox_core::{CommandError, ErrorClass};

fn sqlstate(class: ErrorClass) -> PgSqlErrorCode {
    match class {
        ErrorClass::InvalidParameter => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        ErrorClass::NullValue => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        ErrorClass::OutOfRange => PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
        ErrorClass::TooLarge => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        ErrorClass::NotSupported => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        ErrorClass::InvalidJson => PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
    }
}

/// Raises `err` as an ERROR in the calling transaction (never returns).
pub fn raise(err: CommandError) -> ! {
    let mut report = ErrorReport::new(sqlstate(err.class), format!("centrifugo: {}", err.message), "");
    if let Some(hint) = err.hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_maps_to_its_documented_sqlstate() {
        for class in [
            ErrorClass::InvalidParameter,
            ErrorClass::NullValue,
            ErrorClass::OutOfRange,
            ErrorClass::TooLarge,
            ErrorClass::NotSupported,
            ErrorClass::InvalidJson,
        ] {
            let code = sqlstate(class) as i32;
            // PostgreSQL packs a SQLSTATE as 6 bits per character (MAKE_SQLSTATE).
            let text: String = (0..5).map(|i| (((code >> (6 * i)) & 0x3f) as u8 + b'0') as char).collect();
            assert_eq!(text, class.sqlstate());
        }
    }
}
