//! Errors of the pure logic. Each carries a class that the SQL boundary turns into a SQLSTATE,
//! so callers of the SQL API get a stable code and the pure code stays free of PostgreSQL.

use std::fmt;

/// What kind of mistake the caller made; mapped 1:1 to a SQLSTATE at the SQL boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 22023 invalid_parameter_value
    InvalidParameter,
    /// 22004 null_value_not_allowed
    NullValue,
    /// 22003 numeric_value_out_of_range
    OutOfRange,
    /// 54000 program_limit_exceeded
    TooLarge,
    /// 0A000 feature_not_supported
    NotSupported,
    /// 22P02 invalid_text_representation
    InvalidJson,
}

impl ErrorClass {
    /// The SQLSTATE documented for this class (README, "Errors").
    pub fn sqlstate(self) -> &'static str {
        match self {
            ErrorClass::InvalidParameter => "22023",
            ErrorClass::NullValue => "22004",
            ErrorClass::OutOfRange => "22003",
            ErrorClass::TooLarge => "54000",
            ErrorClass::NotSupported => "0A000",
            ErrorClass::InvalidJson => "22P02",
        }
    }
}

/// A command that cannot be enqueued, with a message meant for the person who wrote the SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub class: ErrorClass,
    pub message: String,
    pub hint: Option<String>,
}

impl CommandError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        CommandError { class, message: message.into(), hint: None }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::InvalidParameter, message)
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CommandError {}
