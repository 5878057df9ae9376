//! Pure logic of centrifugo_outbox, free of PostgreSQL so that `cargo test -p outbox_core` covers
//! it without a server: the command model and its validation, partition hashing, settings, batch
//! dispatch and reply classification, the retry policy, and the HTTP and gRPC clients.

pub mod client;
pub mod command;
pub mod consumers;
pub mod dispatch;
pub mod endpoints;
pub mod engine;
pub mod error;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod histogram;
pub mod http;
pub mod kafka;
pub mod lane;
pub mod partition;
pub mod retry;
pub mod settings;
pub mod transport;

pub use command::{Command, Method, PayloadBuilder};
pub use error::{CommandError, ErrorClass};
