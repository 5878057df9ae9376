//! Every `centrifugo.*` setting: one static each, a doc line saying why it exists, one `init()`
//! that registers them all, and typed accessors. Contexts are deliberate:
//! - `Postmaster`: shapes shared memory or worker registration, or the Kafka bridge's connection;
//! - `Sighup`: tunables the workers pick up on `pg_reload_conf()`;
//! - `Suset`: per-session limits an administrator may raise.
//!
//! Secrets, and the userinfo of `api_url`, are kept by this process and shown to PostgreSQL
//! masked (see `Hidden`), so they can be reloadable: nothing of them is ever logged or shown.

use std::ffi::{CStr, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;

use outbox_core::settings;

/// Base URL of Centrifugo's HTTP server API (`<api_url>/batch` is posted to), or a cluster's nodes' URLs, comma-separated, in order of preference.
static API_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"http://127.0.0.1:8000/api"));
/// Centrifugo's `http_api.key`, sent as `X-API-Key`. A secret: superuser-only, never shown or logged.
static API_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The database whose outbox the workers drain (fixed at start, like pg_cron's `cron.database_name`).
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// The role the workers connect as (empty: the bootstrap superuser), like pg_net's `pg_net.username`.
static WORKER_ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// One command per request and partition, so a failed command holds back every later one (Centrifugo's consumer order).
static STRICT_ORDER: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Table the SQL API writes to and the workers drain (`table` or `schema.table`); Centrifugo's `outbox_table_name`.
static OUTBOX_TABLE_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"centrifugo_outbox"));
/// Consumer name in logs and in the partition lock key, as Centrifugo's consumer `name`: give a Centrifugo consumer the same name and the two never drain a partition at once.
static CONSUMER_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"centrifugo_outbox"));
/// Number of outbox partitions, one ordered worker each; Centrifugo's `num_partitions`.
static NUM_PARTITIONS: GucSetting<i32> = GucSetting::<i32>::new(1);
/// Most rows a worker claims from a partition per round (one batch request); Centrifugo's `partition_select_limit`.
static PARTITION_SELECT_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(100);
/// Safety-net poll interval; workers are normally woken at commit; Centrifugo's `partition_poll_interval`.
static PARTITION_POLL_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(300);
/// LISTEN/NOTIFY channel the outbox trigger notifies with the partition number (empty: none); Centrifugo's `partition_notification_channel`.
static PARTITION_NOTIFICATION_CHANNEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Most payload bytes one batch request holds (the batch read ahead meanwhile included); a larger single command still goes alone.
static BATCH_MAX_BYTES: GucSetting<i32> = GucSetting::<i32>::new(4 * 1024 * 1024);
/// Largest serialized command payload the SQL API accepts and the workers send (0: no limit).
static MAX_COMMAND_SIZE: GucSetting<i32> = GucSetting::<i32>::new(settings::DEFAULT_MAX_COMMAND_SIZE);
/// TCP/TLS connect timeout towards Centrifugo.
static HTTP_CONNECT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Whole-request timeout towards Centrifugo; a timed-out batch is retried (idempotency keys prevent doubles).
static HTTP_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// PEM file of the CA that signs Centrifugo's certificate (empty: the system roots).
static HTTP_TLS_ROOT_CA: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// PEM client certificate for mutual TLS with Centrifugo.
static HTTP_TLS_CERT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// PEM private key of the client certificate.
static HTTP_TLS_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Skip verification of Centrifugo's certificate (testing only; verification is on by default).
static HTTP_TLS_INSECURE_SKIP_VERIFY: GucSetting<bool> = GucSetting::<bool>::new(false);
/// First retry delay after a temporary failure; doubles per attempt, with jitter.
static RETRY_BACKOFF_BASE: GucSetting<i32> = GucSetting::<i32>::new(10);
/// Cap of the retry delay.
static RETRY_BACKOFF_MAX: GucSetting<i32> = GucSetting::<i32>::new(5000);

/// Kafka bootstrap brokers, comma-separated (empty: no Kafka bridge); Centrifugo's `brokers`.
static KAFKA_BROKERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Topics to consume, comma-separated; Centrifugo's `topics`.
static KAFKA_TOPICS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Consumer group; Centrifugo's `consumer_group`.
static KAFKA_CONSUMER_GROUP: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"centrifugo"));
/// Most records per poll; Centrifugo's `max_poll_records`.
static KAFKA_MAX_POLL_RECORDS: GucSetting<i32> = GucSetting::<i32>::new(100);
/// Most bytes per fetch response (0: the client's default); Centrifugo's `fetch_max_bytes`.
static KAFKA_FETCH_MAX_BYTES: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Longest a fetch waits for data (0: the client's default); Centrifugo's `fetch_max_wait`.
static KAFKA_FETCH_MAX_WAIT: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Also read records of uncommitted Kafka transactions; Centrifugo's `fetch_read_uncommitted`.
static KAFKA_FETCH_READ_UNCOMMITTED: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Records buffered per Kafka partition before fetching pauses; Centrifugo's `partition_queue_max_size`.
static KAFKA_PARTITION_QUEUE_MAX_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Broker connect timeout (0: the client's default); Centrifugo's `dial_timeout`.
static KAFKA_DIAL_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(0);
/// How long the Kafka group waits for a silent bridge before giving its partitions away (0: 6 s, the bridge's default); librdkafka's `session.timeout.ms`.
static KAFKA_SESSION_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Longest the bridge may go between polls before the group drops it (0: librdkafka's 5 min); librdkafka's `max.poll.interval.ms`.
static KAFKA_MAX_POLL_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Static group membership id (empty: dynamic membership); Centrifugo's `instance_id`.
static KAFKA_INSTANCE_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// SASL mechanism: plain, scram-sha-256 or scram-sha-512 (empty: none); Centrifugo's `sasl_mechanism`.
static KAFKA_SASL_MECHANISM: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// SASL user; Centrifugo's `sasl_user`.
static KAFKA_SASL_USER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// SASL password; Centrifugo's `sasl_password`. A secret: superuser-only, never shown or logged.
static KAFKA_SASL_PASSWORD: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Connect to the brokers over TLS; Centrifugo's `tls`.
static KAFKA_TLS: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Path of the client certificate; Centrifugo's `tls_cert`.
static KAFKA_TLS_CERT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Path of the client key; Centrifugo's `tls_key`.
static KAFKA_TLS_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Client certificate as PEM text; Centrifugo's `tls_cert_pem`.
static KAFKA_TLS_CERT_PEM: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Client key as PEM text; Centrifugo's `tls_key_pem`. A secret: superuser-only, never shown or logged.
static KAFKA_TLS_KEY_PEM: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Path of the CA that verifies the brokers; Centrifugo's `tls_root_ca`.
static KAFKA_TLS_ROOT_CA: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The brokers' CA as PEM text; Centrifugo's `tls_root_ca_pem`.
static KAFKA_TLS_ROOT_CA_PEM: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Path of a client CA; Centrifugo's `tls_client_ca` (a server-side option, accepted for config compatibility).
static KAFKA_TLS_CLIENT_CA: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// A client CA as PEM text; Centrifugo's `tls_client_ca_pem` (accepted for config compatibility).
static KAFKA_TLS_CLIENT_CA_PEM: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Skip verification of the brokers' certificates; Centrifugo's `tls_insecure_skip_verify`.
static KAFKA_TLS_INSECURE_SKIP_VERIFY: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Name expected in the brokers' certificates (and sent as SNI); Centrifugo's `server_name`.
static KAFKA_TLS_SERVER_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Header naming the method when the value is a bare payload; Centrifugo's `method_header`.
static KAFKA_METHOD_HEADER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The value is publication data and headers carry the channels; Centrifugo's `publication_data_mode`.
static KAFKA_PUBLICATION_DATA_MODE: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Centrifugo's `consumers` JSON array, pasted verbatim (kafka and postgresql entries).
static CONSUMERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

const MS: GucFlags = GucFlags::UNIT_MS;
const SECRET: GucFlags = GucFlags::SUPERUSER_ONLY;

/// Registers every setting. Called once from `_PG_init` while preloading.
pub fn init() {
    use GucContext::{Postmaster, Sighup, Suset};
    let none = GucFlags::default();

    // Centrifugo and the outbox.
    // SAFETY: the hooks are pg_guard'ed; they keep the real value (see `Hidden`).
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"centrifugo.api_url",
            c"Base URL of Centrifugo's HTTP server API, or several (a cluster's nodes) separated by commas.",
            c"Shown with the userinfo of each URL masked.",
            &API_URL,
            Sighup,
            none,
            Some(check_api_url),
            Some(assign_api_url),
            None,
        )
    };
    secret(
        c"centrifugo.api_key",
        c"Centrifugo HTTP API key (superuser-only, never shown).",
        &API_KEY,
        Sighup,
        assign_api_key,
    );
    string(c"centrifugo.database", c"Database whose outbox the workers drain.", &DATABASE, Postmaster, none);
    string(
        c"centrifugo.worker_role",
        c"Role the workers connect as (empty: the bootstrap superuser).",
        &WORKER_ROLE,
        Postmaster,
        none,
    );
    boolean(
        c"centrifugo.strict_order",
        c"Send one command per request and partition: a failed command holds back every later one.",
        &STRICT_ORDER,
        Sighup,
    );
    string_checked(
        c"centrifugo.outbox_table_name",
        c"Outbox table (table or schema.table).",
        &OUTBOX_TABLE_NAME,
        Sighup,
        check_table_name,
    );
    string(
        c"centrifugo.consumer_name",
        c"Consumer name for logs and the partition lock key (as Centrifugo's consumer name).",
        &CONSUMER_NAME,
        Sighup,
        none,
    );
    int(
        c"centrifugo.num_partitions",
        c"Number of outbox partitions, one ordered worker each.",
        &NUM_PARTITIONS,
        1,
        outbox_core::partition::MAX_PARTITIONS,
        Postmaster,
        none,
    );
    int(
        c"centrifugo.partition_select_limit",
        c"Most rows sent per partition round (one batch request).",
        &PARTITION_SELECT_LIMIT,
        1,
        10_000,
        Sighup,
        none,
    );
    int(
        c"centrifugo.partition_poll_interval",
        c"Safety-net poll interval of each partition worker.",
        &PARTITION_POLL_INTERVAL,
        1,
        3_600_000,
        Sighup,
        MS,
    );
    string_checked(
        c"centrifugo.partition_notification_channel",
        c"NOTIFY channel the outbox trigger notifies (empty: none).",
        &PARTITION_NOTIFICATION_CHANNEL,
        Sighup,
        check_notification_channel,
    );
    int(
        c"centrifugo.max_command_size",
        c"Largest command payload the SQL API accepts and the workers send (0: no limit).",
        &MAX_COMMAND_SIZE,
        0,
        i32::MAX,
        Suset,
        GucFlags::UNIT_BYTE,
    );
    int(
        c"centrifugo.batch_max_bytes",
        c"Most payload bytes in one batch request, the batch read ahead included.",
        &BATCH_MAX_BYTES,
        1024,
        i32::MAX,
        Sighup,
        GucFlags::UNIT_BYTE,
    );
    int(
        c"centrifugo.http_connect_timeout",
        c"Connect timeout towards Centrifugo.",
        &HTTP_CONNECT_TIMEOUT,
        1,
        600_000,
        Sighup,
        MS,
    );
    int(c"centrifugo.http_timeout", c"Request timeout towards Centrifugo.", &HTTP_TIMEOUT, 1, 3_600_000, Sighup, MS);
    string(
        c"centrifugo.http_tls_root_ca",
        c"PEM file of the CA of Centrifugo's certificate (empty: system roots).",
        &HTTP_TLS_ROOT_CA,
        Sighup,
        none,
    );
    string(c"centrifugo.http_tls_cert", c"PEM client certificate file for mutual TLS.", &HTTP_TLS_CERT, Sighup, none);
    string(c"centrifugo.http_tls_key", c"PEM client key file for mutual TLS.", &HTTP_TLS_KEY, Sighup, SECRET);
    boolean(
        c"centrifugo.http_tls_insecure_skip_verify",
        c"Skip verifying Centrifugo's certificate (testing only).",
        &HTTP_TLS_INSECURE_SKIP_VERIFY,
        Sighup,
    );
    int(
        c"centrifugo.retry_backoff_base",
        c"First delay after a temporary failure (doubles, with jitter).",
        &RETRY_BACKOFF_BASE,
        1,
        3_600_000,
        Sighup,
        MS,
    );
    int(
        c"centrifugo.retry_backoff_max",
        c"Largest delay between retries.",
        &RETRY_BACKOFF_MAX,
        1,
        3_600_000,
        Sighup,
        MS,
    );

    // The Kafka bridge: connection settings are read when the bridge starts.
    string(
        c"centrifugo.kafka_brokers",
        c"Kafka brokers, comma-separated (empty: no bridge).",
        &KAFKA_BROKERS,
        Postmaster,
        none,
    );
    string(c"centrifugo.kafka_topics", c"Kafka topics to consume, comma-separated.", &KAFKA_TOPICS, Postmaster, none);
    string(c"centrifugo.kafka_consumer_group", c"Kafka consumer group.", &KAFKA_CONSUMER_GROUP, Postmaster, none);
    int(
        c"centrifugo.kafka_max_poll_records",
        c"Most Kafka records per poll.",
        &KAFKA_MAX_POLL_RECORDS,
        1,
        1_000_000,
        Postmaster,
        none,
    );
    int(
        c"centrifugo.kafka_fetch_max_bytes",
        c"Most bytes per Kafka fetch (0: client default).",
        &KAFKA_FETCH_MAX_BYTES,
        0,
        i32::MAX,
        Postmaster,
        GucFlags::UNIT_BYTE,
    );
    int(
        c"centrifugo.kafka_fetch_max_wait",
        c"Longest wait of a Kafka fetch (0: client default).",
        &KAFKA_FETCH_MAX_WAIT,
        0,
        3_600_000,
        Postmaster,
        MS,
    );
    boolean(
        c"centrifugo.kafka_fetch_read_uncommitted",
        c"Read records of uncommitted Kafka transactions.",
        &KAFKA_FETCH_READ_UNCOMMITTED,
        Postmaster,
    );
    int(
        c"centrifugo.kafka_partition_queue_max_size",
        c"Records buffered per Kafka partition before fetching pauses.",
        &KAFKA_PARTITION_QUEUE_MAX_SIZE,
        1,
        1_000_000,
        Postmaster,
        none,
    );
    int(
        c"centrifugo.kafka_dial_timeout",
        c"Kafka connect timeout (0: client default).",
        &KAFKA_DIAL_TIMEOUT,
        0,
        3_600_000,
        Postmaster,
        MS,
    );
    int(
        c"centrifugo.kafka_session_timeout",
        c"Kafka group session timeout, session.timeout.ms (0: client default).",
        &KAFKA_SESSION_TIMEOUT,
        0,
        3_600_000,
        Postmaster,
        MS,
    );
    int(
        c"centrifugo.kafka_max_poll_interval",
        c"Longest time between Kafka polls, max.poll.interval.ms (0: client default).",
        &KAFKA_MAX_POLL_INTERVAL,
        0,
        86_400_000,
        Postmaster,
        MS,
    );
    string(c"centrifugo.kafka_instance_id", c"Kafka static group membership id.", &KAFKA_INSTANCE_ID, Postmaster, none);
    string(
        c"centrifugo.kafka_sasl_mechanism",
        c"Kafka SASL mechanism: plain, scram-sha-256, scram-sha-512.",
        &KAFKA_SASL_MECHANISM,
        Postmaster,
        none,
    );
    string(c"centrifugo.kafka_sasl_user", c"Kafka SASL user.", &KAFKA_SASL_USER, Postmaster, none);
    secret(
        c"centrifugo.kafka_sasl_password",
        c"Kafka SASL password (superuser-only, never shown).",
        &KAFKA_SASL_PASSWORD,
        Sighup,
        assign_kafka_sasl_password,
    );
    boolean(c"centrifugo.kafka_tls", c"Connect to Kafka over TLS.", &KAFKA_TLS, Postmaster);
    string(c"centrifugo.kafka_tls_cert", c"Kafka client certificate file.", &KAFKA_TLS_CERT, Postmaster, none);
    string(c"centrifugo.kafka_tls_key", c"Kafka client key file.", &KAFKA_TLS_KEY, Postmaster, SECRET);
    string(
        c"centrifugo.kafka_tls_cert_pem",
        c"Kafka client certificate, PEM text.",
        &KAFKA_TLS_CERT_PEM,
        Postmaster,
        none,
    );
    secret(
        c"centrifugo.kafka_tls_key_pem",
        c"Kafka client key, PEM text (superuser-only, never shown).",
        &KAFKA_TLS_KEY_PEM,
        Postmaster,
        assign_kafka_tls_key_pem,
    );
    string(
        c"centrifugo.kafka_tls_root_ca",
        c"CA file that verifies the Kafka brokers.",
        &KAFKA_TLS_ROOT_CA,
        Postmaster,
        none,
    );
    string(
        c"centrifugo.kafka_tls_root_ca_pem",
        c"CA that verifies the Kafka brokers, PEM text.",
        &KAFKA_TLS_ROOT_CA_PEM,
        Postmaster,
        none,
    );
    string(
        c"centrifugo.kafka_tls_client_ca",
        c"Client CA file (accepted for Centrifugo config compatibility).",
        &KAFKA_TLS_CLIENT_CA,
        Postmaster,
        none,
    );
    string(
        c"centrifugo.kafka_tls_client_ca_pem",
        c"Client CA, PEM text (accepted for Centrifugo config compatibility).",
        &KAFKA_TLS_CLIENT_CA_PEM,
        Postmaster,
        none,
    );
    boolean(
        c"centrifugo.kafka_tls_insecure_skip_verify",
        c"Skip verifying the Kafka brokers' certificates.",
        &KAFKA_TLS_INSECURE_SKIP_VERIFY,
        Postmaster,
    );
    string(
        c"centrifugo.kafka_tls_server_name",
        c"Name expected in the Kafka brokers' certificates (SNI).",
        &KAFKA_TLS_SERVER_NAME,
        Postmaster,
        none,
    );
    string(
        c"centrifugo.kafka_method_header",
        c"Kafka header naming the method of a bare-payload record.",
        &KAFKA_METHOD_HEADER,
        Postmaster,
        none,
    );
    boolean(
        c"centrifugo.kafka_publication_data_mode",
        c"Kafka record value is publication data; headers carry channels.",
        &KAFKA_PUBLICATION_DATA_MODE,
        Postmaster,
    );
    secret(
        c"centrifugo.consumers",
        c"Centrifugo's consumers JSON array, verbatim (may hold passwords: superuser-only, never shown).",
        &CONSUMERS,
        Sighup,
        assign_consumers,
    );

    // SAFETY: called from _PG_init in the postmaster, as PostgreSQL requires.
    #[cfg(not(feature = "pg14"))]
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"centrifugo".as_ptr())
    };
    // PostgreSQL 14 has no reserved prefixes: it only warns about unknown centrifugo.* settings.
    // SAFETY: as above.
    #[cfg(feature = "pg14")]
    unsafe {
        pg_sys::EmitWarningsOnPlaceholders(c"centrifugo".as_ptr())
    };
}

fn string(
    name: &'static CStr,
    desc: &'static CStr,
    s: &'static GucSetting<Option<CString>>,
    ctx: GucContext,
    flags: GucFlags,
) {
    GucRegistry::define_string_guc(name, desc, c"", s, ctx, flags);
}

fn int(
    name: &'static CStr,
    desc: &'static CStr,
    s: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    ctx: GucContext,
    flags: GucFlags,
) {
    GucRegistry::define_int_guc(name, desc, c"", s, min, max, ctx, flags);
}

fn boolean(name: &'static CStr, desc: &'static CStr, s: &'static GucSetting<bool>, ctx: GucContext) {
    GucRegistry::define_bool_guc(name, desc, c"", s, ctx, GucFlags::default());
}

/// A secret: readable only by superusers (and `pg_read_all_settings`), and even to them shown,
/// stored and compared by PostgreSQL only as `********` (see `Hidden`): a reload that changes it
/// logs nothing, since PostgreSQL logs a change only when the stored value differs.
fn secret(
    name: &'static CStr,
    desc: &'static CStr,
    s: &'static GucSetting<Option<CString>>,
    ctx: GucContext,
    assign: unsafe extern "C-unwind" fn(*const std::ffi::c_char, *mut std::ffi::c_void),
) {
    // SAFETY: the hooks are pg_guard'ed and only copy the proposed value.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            name,
            desc,
            c"",
            s,
            ctx,
            SECRET,
            Some(check_secret),
            Some(assign),
            None,
        )
    };
}

/// The real values of the settings PostgreSQL keeps masked, in this process. A check hook hands
/// the value it was given to its assign hook as the setting's `extra` and gives PostgreSQL the
/// masked form instead; the assign hook keeps it here. So SHOW, `current_setting()`,
/// `pg_settings` (reset value included) and PostgreSQL's "parameter changed" log line only ever
/// see the masked form, for every role.
struct Hidden {
    api_url: String,
    api_key: String,
    kafka_sasl_password: String,
    kafka_tls_key_pem: String,
    consumers: String,
    /// Secrets this process held before (newest last, bounded): an error about a request made
    /// with a rotated key is scrubbed too.
    past: Vec<String>,
}

static HIDDEN: std::sync::RwLock<Hidden> = std::sync::RwLock::new(Hidden {
    api_url: String::new(),
    api_key: String::new(),
    kafka_sasl_password: String::new(),
    kafka_tls_key_pem: String::new(),
    consumers: String::new(),
    past: Vec::new(),
});

/// How many rotated-out secrets are still scrubbed.
const PAST_SECRETS: usize = 16;

impl Hidden {
    /// Every value that must never reach a log line or an error, current and past.
    fn secrets(&self) -> Vec<String> {
        let mut all = vec![self.api_key.clone(), self.kafka_sasl_password.clone(), self.kafka_tls_key_pem.clone()];
        all.extend(outbox_core::endpoints::userinfo_secrets(&self.api_url));
        all.extend(outbox_core::consumers::consumers_secrets(&self.consumers));
        all.extend(self.past.iter().cloned());
        all.retain(|s| !s.is_empty());
        all
    }

    fn set(&mut self, field: fn(&mut Hidden) -> &mut String, value: String) {
        let before = self.secrets();
        *field(self) = value;
        let now = self.secrets();
        for old in before.into_iter().filter(|old| !now.contains(old)) {
            self.past.push(old);
        }
        let excess = self.past.len().saturating_sub(PAST_SECRETS);
        self.past.drain(..excess);
    }
}

fn hidden<R>(read: impl FnOnce(&Hidden) -> R) -> R {
    read(&HIDDEN.read().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// Every secret value this process knows (API key, SASL password, key PEM, the userinfo of
/// `api_url`, the passwords in `consumers`, and those rotated out since start).
pub fn secrets() -> Vec<String> {
    hidden(Hidden::secrets)
}

/// `text` without any secret this process knows.
pub fn scrub(text: &str) -> String {
    let secrets = secrets();
    outbox_core::dispatch::scrub(text, &secrets.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A copy of `bytes` with a NUL, allocated as PostgreSQL's GUC machinery frees it (malloc up to
/// 15, its GUC memory context from 16 on). Null when out of memory.
unsafe fn guc_copy(bytes: &[u8]) -> *mut std::ffi::c_char {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    // SAFETY: a plain allocation, checked for null below.
    let p = unsafe { libc::malloc(bytes.len() + 1) }.cast::<std::ffi::c_char>();
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    // SAFETY: guc_malloc at LOG returns null instead of raising when out of memory.
    let p = unsafe { pg_sys::guc_malloc(pg_sys::LOG as i32, bytes.len() + 1) }.cast::<std::ffi::c_char>();
    if !p.is_null() {
        // SAFETY: p has room for the bytes and the NUL.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr().cast(), p, bytes.len());
            *p.add(bytes.len()) = 0;
        }
    }
    p
}

/// Frees what PostgreSQL's GUC machinery allocated (the proposed value a check hook replaces).
unsafe fn guc_release(p: *mut std::ffi::c_char) {
    if p.is_null() {
        return;
    }
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    // SAFETY: up to 15, a proposed string value is malloc'd.
    unsafe {
        libc::free(p.cast())
    };
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    // SAFETY: from 16, it is guc_malloc'd.
    unsafe {
        pg_sys::guc_free(p.cast())
    };
}

/// Hands the proposed value to the assign hook as `extra` and puts `masked` in its place.
/// False when out of memory (PostgreSQL then refuses the value).
unsafe fn hide(newval: *mut *mut std::ffi::c_char, extra: *mut *mut std::ffi::c_void, masked: &str) -> bool {
    // SAFETY: PostgreSQL hands valid pointers; the value may be null (no boot value).
    let real = unsafe { (*newval).as_ref().map(|p| CStr::from_ptr(p).to_bytes().to_vec()) }.unwrap_or_default();
    // SAFETY: allocations as the GUC machinery frees them.
    let (kept, shown) = unsafe { (guc_copy(&real), guc_copy(masked.as_bytes())) };
    if kept.is_null() || shown.is_null() {
        // SAFETY: ours, not handed over.
        unsafe {
            guc_release(kept);
            guc_release(shown);
        }
        return false;
    }
    // SAFETY: the proposed value is the GUC machinery's to free, and we replace it.
    unsafe {
        guc_release(*newval);
        *newval = shown;
        *extra = kept.cast();
    }
    true
}

/// The real value an assign hook was handed (see `hide`).
unsafe fn hidden_value(extra: *mut std::ffi::c_void) -> String {
    // SAFETY: `extra` is null or the NUL-terminated copy `hide` made.
    unsafe { extra.cast::<std::ffi::c_char>().as_ref().map(|p| CStr::from_ptr(p).to_string_lossy().into_owned()) }
        .unwrap_or_default()
}

/// The mask of every secret, whatever its value (so no change of it is ever logged).
const MASK: &str = "********";

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_secret(
    newval: *mut *mut std::ffi::c_char,
    extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: as PostgreSQL calls a check hook.
    unsafe { hide(newval, extra, MASK) }
}

/// One assign hook per hidden setting: keeps the real value in `HIDDEN`.
macro_rules! assign_hidden {
    ($($hook:ident => $field:ident),* $(,)?) => {$(
        #[pgrx::pg_guard]
        unsafe extern "C-unwind" fn $hook(_newval: *const std::ffi::c_char, extra: *mut std::ffi::c_void) {
            // SAFETY: `extra` is what the check hook made.
            let value = unsafe { hidden_value(extra) };
            HIDDEN.write().unwrap_or_else(std::sync::PoisonError::into_inner).set(|h| &mut h.$field, value);
        }
    )*};
}
assign_hidden!(
    assign_api_url => api_url,
    assign_api_key => api_key,
    assign_kafka_sasl_password => kafka_sasl_password,
    assign_kafka_tls_key_pem => kafka_tls_key_pem,
    assign_consumers => consumers,
);

/// Installed from `_PG_init`: every log line and error of every process is scrubbed of the
/// secrets it knows, and a line about a `centrifugo.*` setting of the userinfo of any URL (a
/// reload logs a changed `api_url` as written in the file; a refused one is quoted).
pub fn install_log_scrubber() {
    // SAFETY: called once in the postmaster while preloading; the previous hook is chained.
    unsafe {
        PREVIOUS_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(scrub_log_line);
    }
}

static mut PREVIOUS_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn scrub_log_line(edata: *mut pg_sys::ErrorData) {
    // Only the postmaster's reports (a reloaded or refused setting) and background workers':
    // in a client backend the report goes to the client too, and scrubbing a text the client
    // wrote would tell it which of its guesses is a secret. (The workers scrub what they take
    // from outside themselves, and a superuser's own ALTER SYSTEM is a superuser's log.)
    // SAFETY: plain reads of process globals.
    let ours = unsafe { !pg_sys::IsUnderPostmaster || pg_sys::MyBackendType == pg_sys::BackendType::B_BG_WORKER };
    // Not while this process updates the secrets (an assign hook never logs; never wait here).
    if let Some(hidden) = HIDDEN.try_read().ok().filter(|_| ours) {
        let secrets = hidden.secrets();
        drop(hidden);
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        // SAFETY: PostgreSQL hands the report being emitted; its strings are NUL-terminated.
        let edata = unsafe { &mut *edata };
        for field in [&mut edata.message, &mut edata.detail, &mut edata.detail_log, &mut edata.hint, &mut edata.context]
        {
            // SAFETY: null or a NUL-terminated string of the report.
            let Some(text) = (unsafe { field.as_ref() }).map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy()) else {
                continue;
            };
            let mut clean = outbox_core::dispatch::scrub(&text, &secrets);
            if clean.contains("centrifugo") {
                clean = outbox_core::endpoints::mask_userinfo(&clean);
            }
            if clean != text {
                // The statement that led here may quote the same value.
                edata.hide_stmt = true;
                if let Ok(clean) = CString::new(clean) {
                    // SAFETY: copied into the current (error) memory context, where the report lives.
                    *field = unsafe { pg_sys::pstrdup(clean.as_ptr()) };
                }
            }
        }
    }
    // SAFETY: a hook installed before ours, called as PostgreSQL would.
    if let Some(previous) = unsafe { PREVIOUS_EMIT_LOG_HOOK } {
        unsafe { previous(edata) };
    }
}

type StringCheck = unsafe extern "C-unwind" fn(
    *mut *mut std::ffi::c_char,
    *mut *mut std::ffi::c_void,
    pg_sys::GucSource::Type,
) -> bool;

fn string_checked(
    name: &'static CStr,
    desc: &'static CStr,
    s: &'static GucSetting<Option<CString>>,
    ctx: GucContext,
    check: StringCheck,
) {
    // SAFETY: the check hooks are pg_guard'ed and only read the proposed value.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(name, desc, c"", s, ctx, GucFlags::default(), Some(check), None, None)
    };
}

/// Runs `validate` on a proposed string value; on failure PostgreSQL reports the detail at SET or reload.
unsafe fn check_string(newval: *mut *mut std::ffi::c_char, validate: fn(&str) -> Result<(), String>) -> bool {
    // SAFETY: PostgreSQL hands a valid pointer to a (possibly NULL) C string.
    let value = unsafe { (*newval).as_ref().map(|p| CStr::from_ptr(p).to_string_lossy().into_owned()) };
    match value.map(|v| validate(&v)).unwrap_or(Ok(())) {
        Ok(()) => true,
        Err(detail) => {
            let detail = CString::new(detail).unwrap_or_default();
            // SAFETY: GUC_check_errdetail_string must point to palloc'd memory.
            unsafe { pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr()) };
            false
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_api_url(
    newval: *mut *mut std::ffi::c_char,
    extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: as PostgreSQL calls a check hook.
    if !unsafe { check_string(newval, |v| outbox_core::endpoints::parse_api_urls(v).map(|_| ())) } {
        return false;
    }
    // SAFETY: as above; the value may be null.
    let real = unsafe { (*newval).as_ref().map(|p| CStr::from_ptr(p).to_string_lossy().into_owned()) };
    let masked = outbox_core::endpoints::mask_url_list(real.as_deref().unwrap_or(""));
    // SAFETY: as above.
    unsafe { hide(newval, extra, &masked) }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_table_name(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_string(newval, |v| settings::quoted_table_name(v).map(|_| ())) }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_notification_channel(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_string(newval, settings::notification_channel) }
}

fn text(s: &GucSetting<Option<CString>>) -> String {
    s.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn api_url() -> String {
    hidden(|h| h.api_url.clone())
}
pub fn api_key() -> String {
    hidden(|h| h.api_key.clone())
}
pub fn database() -> String {
    text(&DATABASE)
}
pub fn worker_role() -> String {
    text(&WORKER_ROLE)
}
pub fn strict_order() -> bool {
    STRICT_ORDER.get()
}
pub fn consumer_name() -> String {
    text(&CONSUMER_NAME)
}
pub fn num_partitions() -> i32 {
    NUM_PARTITIONS.get()
}
pub fn partition_select_limit() -> i32 {
    PARTITION_SELECT_LIMIT.get()
}
pub fn partition_poll_interval_ms() -> i32 {
    PARTITION_POLL_INTERVAL.get()
}
pub fn max_command_size() -> i32 {
    MAX_COMMAND_SIZE.get()
}
pub fn batch_max_bytes() -> i64 {
    i64::from(BATCH_MAX_BYTES.get())
}
pub fn http_connect_timeout_ms() -> i32 {
    HTTP_CONNECT_TIMEOUT.get()
}
pub fn http_timeout_ms() -> i32 {
    HTTP_TIMEOUT.get()
}
pub fn http_tls_root_ca() -> String {
    text(&HTTP_TLS_ROOT_CA)
}
pub fn http_tls_cert() -> String {
    text(&HTTP_TLS_CERT)
}
pub fn http_tls_key() -> String {
    text(&HTTP_TLS_KEY)
}
pub fn http_tls_insecure_skip_verify() -> bool {
    HTTP_TLS_INSECURE_SKIP_VERIFY.get()
}
pub fn retry_backoff_base_ms() -> i32 {
    RETRY_BACKOFF_BASE.get()
}
pub fn retry_backoff_max_ms() -> i32 {
    RETRY_BACKOFF_MAX.get()
}
pub fn partition_notification_channel() -> String {
    text(&PARTITION_NOTIFICATION_CHANNEL)
}
/// The NOTIFY channel as PostgreSQL takes it; None when empty (no NOTIFY).
pub fn partition_notification_channel_c() -> Option<CString> {
    PARTITION_NOTIFICATION_CHANNEL.get().filter(|c| !c.is_empty())
}

/// The outbox table setting as written (`table` or `schema.table`).
pub fn outbox_table_name() -> String {
    text(&OUTBOX_TABLE_NAME)
}

/// The outbox table as a quoted SQL name; the check hook guarantees it parses.
pub fn outbox_table() -> String {
    settings::quoted_table_name(&text(&OUTBOX_TABLE_NAME)).unwrap_or_else(|_| "\"centrifugo_outbox\"".into())
}

/// The settings of the HTTP client towards Centrifugo, as they are now.
pub fn client_config() -> outbox_core::transport::ClientConfig {
    use std::time::Duration;
    outbox_core::transport::ClientConfig {
        api_url: api_url(),
        api_key: api_key(),
        connect_timeout: Duration::from_millis(http_connect_timeout_ms() as u64),
        timeout: Duration::from_millis(http_timeout_ms() as u64),
        tls_root_ca: http_tls_root_ca(),
        tls_cert: http_tls_cert(),
        tls_key: http_tls_key(),
        tls_insecure_skip_verify: http_tls_insecure_skip_verify(),
    }
}

/// Kafka settings, read by the bridge when it starts.
pub mod kafka {
    use super::*;
    pub fn brokers() -> String {
        text(&KAFKA_BROKERS)
    }
    pub fn topics() -> String {
        text(&KAFKA_TOPICS)
    }
    pub fn consumer_group() -> String {
        text(&KAFKA_CONSUMER_GROUP)
    }
    pub fn max_poll_records() -> i32 {
        KAFKA_MAX_POLL_RECORDS.get()
    }
    pub fn fetch_max_bytes() -> i32 {
        KAFKA_FETCH_MAX_BYTES.get()
    }
    pub fn fetch_max_wait_ms() -> i32 {
        KAFKA_FETCH_MAX_WAIT.get()
    }
    pub fn fetch_read_uncommitted() -> bool {
        KAFKA_FETCH_READ_UNCOMMITTED.get()
    }
    pub fn partition_queue_max_size() -> i32 {
        KAFKA_PARTITION_QUEUE_MAX_SIZE.get()
    }
    pub fn dial_timeout_ms() -> i32 {
        KAFKA_DIAL_TIMEOUT.get()
    }
    pub fn session_timeout_ms() -> i32 {
        KAFKA_SESSION_TIMEOUT.get()
    }
    pub fn max_poll_interval_ms() -> i32 {
        KAFKA_MAX_POLL_INTERVAL.get()
    }
    pub fn instance_id() -> String {
        text(&KAFKA_INSTANCE_ID)
    }
    pub fn sasl_mechanism() -> String {
        text(&KAFKA_SASL_MECHANISM)
    }
    pub fn sasl_user() -> String {
        text(&KAFKA_SASL_USER)
    }
    pub fn sasl_password() -> String {
        hidden(|h| h.kafka_sasl_password.clone())
    }
    pub fn tls() -> bool {
        KAFKA_TLS.get()
    }
    pub fn tls_cert() -> String {
        text(&KAFKA_TLS_CERT)
    }
    pub fn tls_key() -> String {
        text(&KAFKA_TLS_KEY)
    }
    pub fn tls_cert_pem() -> String {
        text(&KAFKA_TLS_CERT_PEM)
    }
    pub fn tls_key_pem() -> String {
        hidden(|h| h.kafka_tls_key_pem.clone())
    }
    pub fn tls_root_ca() -> String {
        text(&KAFKA_TLS_ROOT_CA)
    }
    pub fn tls_root_ca_pem() -> String {
        text(&KAFKA_TLS_ROOT_CA_PEM)
    }
    pub fn tls_client_ca() -> String {
        text(&KAFKA_TLS_CLIENT_CA)
    }
    pub fn tls_client_ca_pem() -> String {
        text(&KAFKA_TLS_CLIENT_CA_PEM)
    }
    pub fn tls_insecure_skip_verify() -> bool {
        KAFKA_TLS_INSECURE_SKIP_VERIFY.get()
    }
    pub fn tls_server_name() -> String {
        text(&KAFKA_TLS_SERVER_NAME)
    }
    pub fn method_header() -> String {
        text(&KAFKA_METHOD_HEADER)
    }
    pub fn publication_data_mode() -> bool {
        KAFKA_PUBLICATION_DATA_MODE.get()
    }
    pub fn consumers() -> String {
        hidden(|h| h.consumers.clone())
    }
}
