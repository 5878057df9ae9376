//! Pure logic of centrifugo_outbox, free of PostgreSQL so that `cargo test -p outbox_core` covers
//! it without a server: the command model and its validation, partition hashing, and settings.

pub mod command;
pub mod error;
pub mod partition;
pub mod settings;

pub use command::{Command, Method, PayloadBuilder};
pub use error::{CommandError, ErrorClass};
