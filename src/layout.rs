//! Which outbox consumers the server drains, and with what: the default consumer (the flat
//! `centrifugo.*` settings) and the `postgresql` entries of `centrifugo.consumers`, their
//! partitions and the worker slot of each, fixed at server start; the settings of each as a
//! reload leaves them; and which consumers a row written to a table concerns (for its trigger).

use std::collections::HashMap;
use std::time::Duration;

use outbox_core::consumers::{ConsumerEntry, OutboxConsumer};
use outbox_core::partition::MAX_PARTITIONS;
use outbox_core::settings::table_name_parts;

use crate::gucs;

/// An outbox consumer: the default one, defined by the flat `centrifugo.*` settings (reloadable),
/// or a `postgresql` entry of `centrifugo.consumers` (fixed at server start).
#[derive(Debug, Clone)]
pub struct OutboxSpec {
    /// None for the default consumer, whose settings are read live.
    entry: Option<OutboxConsumer>,
}

/// The `postgresql` entries of `centrifugo.consumers` as the settings say now (a reload may
/// change an entry's table, limit, poll interval and channel, or break it), parsed once per
/// value in each process: the outbox trigger asks for every row.
struct LiveEntries {
    json: String,
    /// Err: the text is not a JSON array, and every entry keeps the settings it started with.
    entries: Result<HashMap<String, Result<OutboxConsumer, String>>, String>,
}

fn live_entries<R>(read: impl FnOnce(&LiveEntries) -> R) -> R {
    thread_local! {
        static LIVE: std::cell::RefCell<Option<LiveEntries>> = const { std::cell::RefCell::new(None) };
    }
    let json = gucs::kafka::consumers();
    LIVE.with(|cell| {
        let mut live = cell.borrow_mut();
        if live.as_ref().is_none_or(|l| l.json != json) {
            let entries = outbox_core::consumers::parse_consumers_each(&json).map(|list| {
                // The first entry of a name is the one that counts (a second is refused alone).
                let mut map = HashMap::new();
                for e in list {
                    let entry = match e.entry {
                        Ok(ConsumerEntry::Postgresql(c)) => Ok(c),
                        Ok(ConsumerEntry::Kafka(_)) => continue,
                        Err(why) => Err(why),
                    };
                    map.entry(e.name).or_insert(entry);
                }
                map
            });
            *live = Some(LiveEntries { json, entries });
        }
        read(live.as_ref().expect("set above"))
    })
}

impl OutboxSpec {
    /// This consumer's settings now: None for the default consumer (read from the flat
    /// settings); an entry as the settings say now, its name, database and partition count as
    /// at start (they shape the workers); Err when a reload broke or removed the entry.
    pub fn current(&self) -> Result<Option<OutboxConsumer>, String> {
        let Some(start) = &self.entry else { return Ok(None) };
        live_entries(|live| {
            match &live.entries {
            Err(_) => Ok(Some(start.clone())),
            Ok(map) => match map.get(&start.name) {
                Some(Ok(now)) => Ok(Some(OutboxConsumer {
                    name: start.name.clone(),
                    database: start.database.clone(),
                    num_partitions: start.num_partitions,
                    ..now.clone()
                })),
                Some(Err(why)) => Err(why.clone()),
                None => Err(format!(
                    "centrifugo.consumers no longer has an enabled entry \"{}\": not draining (its workers go at the next restart)",
                    start.name
                )),
            },
        }
        })
    }

    /// The entry's settings now, or as at start when a reload broke it (for what is not delivery).
    pub fn settings(&self) -> Option<OutboxConsumer> {
        self.current().unwrap_or_else(|_| self.entry.clone())
    }

    /// The default consumer (the flat settings), not an entry of `centrifugo.consumers`.
    pub fn is_default(&self) -> bool {
        self.entry.is_none()
    }

    pub fn name(&self) -> String {
        match &self.entry {
            Some(e) => e.name.clone(),
            // Reloadable, but never to the name of another consumer (their locks would collide).
            None => {
                let live = gucs::consumer_name();
                if layout().entries.iter().any(|e| e.name == live) {
                    layout().default_name.clone()
                } else {
                    live
                }
            }
        }
    }
    pub fn database(&self) -> String {
        self.entry.as_ref().and_then(|e| e.database.clone()).unwrap_or_else(gucs::database)
    }
    pub fn table_setting(&self) -> String {
        self.settings().map_or_else(gucs::outbox_table_name, |e| e.table)
    }
    /// The outbox table as a schema-qualified quoted SQL name; unqualified means the extension's
    /// schema (ERROR when the extension is missing). For SQL run in a backend.
    pub fn qualified_table(&self) -> String {
        crate::session::qualified_outbox(&self.table_setting())
    }
    /// The outbox table as (schema, table), the schema None when the setting has none.
    pub fn table_parts(&self) -> (Option<String>, String) {
        match table_name_parts(&self.table_setting()).unwrap_or_default().as_slice() {
            [schema, table] => (Some(schema.clone()), table.clone()),
            [table] => (None, table.clone()),
            _ => (None, "centrifugo_outbox".to_owned()),
        }
    }
    pub fn num_partitions(&self) -> i32 {
        self.entry.as_ref().map_or_else(gucs::num_partitions, |e| e.num_partitions)
    }
    pub fn select_limit(&self) -> i32 {
        self.settings().map_or_else(gucs::partition_select_limit, |e| e.select_limit)
    }
    /// The NOTIFY channel the outbox trigger notifies for this consumer; None: none.
    /// The table setting and NOTIFY channel of `settings` (this consumer's, as [`Self::settings`]
    /// gives them: read once by the trigger, which runs for every row).
    fn table_and_channel(settings: Option<OutboxConsumer>) -> (String, Option<std::ffi::CString>) {
        match settings {
            None => (gucs::outbox_table_name(), gucs::partition_notification_channel_c()),
            Some(e) => (e.table, std::ffi::CString::new(e.notification_channel).ok().filter(|c| !c.is_empty())),
        }
    }
    /// Whether the table setting `setting` names the table `schema.table`.
    fn names_table(setting: &str, schema: &str, table: &str) -> bool {
        match table_name_parts(setting) {
            Ok(parts) if parts.len() == 2 => parts[0] == schema && parts[1] == table,
            // Unqualified means the table in the extension's schema.
            Ok(parts) => {
                parts.len() == 1 && parts[0] == table && crate::session::extension_schema().as_deref() == Some(schema)
            }
            Err(_) => false,
        }
    }
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(
            self.settings().map_or_else(|| gucs::partition_poll_interval_ms() as u64, |e| e.poll_interval_ms),
        )
    }
}

/// The outbox consumers as the server started them: fixed in the postmaster (workers and
/// sessions inherit it), so a reload can never change which slot drains what.
struct Layout {
    /// The `postgresql` entries of `centrifugo.consumers` that run.
    entries: Vec<OutboxConsumer>,
    /// The default consumer's name at start.
    default_name: String,
}

fn layout() -> &'static Layout {
    static LAYOUT: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();
    LAYOUT.get_or_init(|| {
        let default_name = gucs::consumer_name();
        let entries = match outbox_core::consumers::parse_consumers_each(&gucs::kafka::consumers()) {
            Ok(list) => list
                .into_iter()
                .filter_map(|e| match e.entry {
                    Ok(ConsumerEntry::Postgresql(c)) if c.name != default_name => Some(c),
                    _ => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        Layout { entries, default_name }
    })
}

/// What the server could not start from the settings, for the log at start and the status view.
pub fn layout_problems() -> Vec<String> {
    let mut problems = Vec::new();
    let started = |name: &str| layout().entries.iter().any(|e| e.name == name);
    match outbox_core::consumers::parse_consumers_each(&gucs::kafka::consumers()) {
        Err(e) if layout().entries.is_empty() => {
            problems.push(format!("centrifugo.consumers is invalid, none of its consumers runs: {e}"))
        }
        Err(e) => problems
            .push(format!("centrifugo.consumers is invalid, its consumers keep the settings they started with: {e}")),
        Ok(list) => {
            for e in list {
                match e.entry {
                    Err(why) if started(&e.name) => problems.push(format!(
                        "centrifugo.consumers entry \"{}\" is refused and does not drain: {why}",
                        e.name
                    )),
                    Err(why) => problems.push(format!("centrifugo.consumers entry \"{}\" does not run: {why}", e.name)),
                    Ok(ConsumerEntry::Postgresql(c)) if c.name == layout().default_name => problems.push(format!(
                        "centrifugo.consumers entry \"{}\" has the name of the default consumer (centrifugo.consumer_name) and does not run",
                        c.name
                    )),
                    Ok(ConsumerEntry::Postgresql(c)) if !started(&c.name) => problems.push(format!(
                        "centrifugo.consumers entry \"{}\" was added or mended after the server started: its workers start at the next restart",
                        c.name
                    )),
                    Ok(_) => {}
                }
            }
        }
    }
    let configured = configured_partitions().len();
    if configured > MAX_PARTITIONS as usize {
        problems.push(format!(
            "{configured} outbox partitions are configured in total, and at most {MAX_PARTITIONS} have a worker: partitions beyond that are not drained"
        ));
    }
    problems
}

/// The default consumer first, then the `postgresql` entries of `centrifugo.consumers`.
pub fn outbox_specs() -> Vec<OutboxSpec> {
    std::iter::once(OutboxSpec { entry: None })
        .chain(layout().entries.iter().map(|e| OutboxSpec { entry: Some(e.clone()) }))
        .collect()
}

/// Every configured partition as (index into `outbox_specs()`, partition), workers or not.
pub fn configured_partitions() -> Vec<(usize, i32)> {
    outbox_specs().iter().enumerate().flat_map(|(i, spec)| (0..spec.num_partitions()).map(move |p| (i, p))).collect()
}

/// Every partition worker as (index into `outbox_specs()`, partition), at most one per
/// shared-memory slot. A worker's position in this list is its slot.
pub fn worker_slots() -> Vec<(usize, i32)> {
    configured_partitions().into_iter().take(MAX_PARTITIONS as usize).collect()
}

/// What the outbox trigger needs to know of the table a row went into.
pub struct TableRouting {
    /// The most partitions any consumer drains from it.
    pub num_partitions: i32,
    /// The NOTIFY channels of the consumers that drain it (Centrifugo's
    /// `partition_notification_channel`, per consumer), each once.
    pub channels: Vec<std::ffi::CString>,
}

/// The routing of the table `table()` names, as (schema, name). With only the default consumer
/// (the usual case) the answer is its settings whatever the table, so the name is not looked up:
/// this runs for every row. A table no consumer names gets the default consumer's settings.
pub fn routing_of_table<E>(table: impl FnOnce() -> Result<(String, String), E>) -> Result<TableRouting, E> {
    let default_routing = || TableRouting {
        num_partitions: gucs::num_partitions(),
        channels: gucs::partition_notification_channel_c().into_iter().collect(),
    };
    if layout().entries.is_empty() {
        return Ok(default_routing());
    }
    let (schema, table) = table()?;
    let mut routing = TableRouting { num_partitions: 0, channels: Vec::new() };
    for spec in outbox_specs() {
        let (table_setting, channel) = OutboxSpec::table_and_channel(spec.settings());
        if !OutboxSpec::names_table(&table_setting, &schema, &table) {
            continue;
        }
        routing.num_partitions = routing.num_partitions.max(spec.num_partitions());
        if let Some(channel) = channel.filter(|c| !routing.channels.contains(c)) {
            routing.channels.push(channel);
        }
    }
    Ok(if routing.num_partitions == 0 { default_routing() } else { routing })
}

/// How many Kafka bridge workers the settings ask for (for the worker budget check).
pub fn kafka_workers_needed() -> usize {
    #[cfg(feature = "kafka")]
    return crate::kafka_worker::consumers().map_or(1, |c| c.len());
    #[cfg(not(feature = "kafka"))]
    0
}
