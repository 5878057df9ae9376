//! centrifugo_outbox: a PostgreSQL extension that delivers Centrifugo server API commands
//! reliably. Applications enqueue commands inside their own transactions (SQL API or plain
//! INSERT into the Centrifugo-compatible outbox table); background workers deliver them.
//!
//! This crate is the thin pgrx shell: settings (`gucs`), the SQL API (`api`, `dead_letters`),
//! the error boundary (`errors`), shared memory and wake-at-commit (`shmem`), the partition
//! workers (`worker`) and, with the `kafka` feature, the Kafka bridge (`kafka_worker`). The logic lives in the `outbox_core` crate, testable without PostgreSQL.

use pgrx::prelude::*;

mod api;
mod dead_letters;
mod errors;
pub mod gucs;
#[cfg(feature = "kafka")]
mod kafka_worker;
mod layout;
mod outbox_source;
mod payload;
mod pinned;
mod session;
mod shmem;
mod status;
mod wake;
mod worker;
mod xact;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a postmaster global during library load.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if !preloading {
        error!(
            "centrifugo_outbox must be loaded at server start: add it to shared_preload_libraries in postgresql.conf and restart PostgreSQL"
        );
    }
    // First: registering the settings may already log a refused value read from the file.
    gucs::install_log_scrubber();
    gucs::init();
    shmem::init();
    pinned::init();
    worker::register();
    #[cfg(feature = "kafka")]
    kafka_worker::register();
}

// The in-database tests live in pgrx-tests/ (see CONTRIBUTING, "Test layers").
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("../pgrx-tests/sql_api.rs");
}

/// Required by `cargo pgrx test`: the test cluster preloads the library like a real one.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'centrifugo_outbox'", "centrifugo.num_partitions = 4"]
    }
}
