//! The delivery engine: one pipelined dispatcher for every source of commands (the outbox
//! partitions, the Kafka partitions, and whatever comes next).
//!
//! A source hands the engine *lanes*: streams of commands in the order they must run, each
//! command with a position (a row id, an offset). Per lane the engine keeps at most one batch
//! in flight; the source reads ahead (pushes more) while it waits. A batch is sized by the
//! lane's window (see [`crate::lane`]) and by what one request may carry, so a transport never
//! gets more than it takes. After a temporary failure the lane backs off; what Centrifugo ran
//! is settled whatever failed around it, and a settled command is never sent again: not after
//! a failure next to it, not after the source's transaction rolled back (the outcome is
//! remembered and applied to the same command when it is read again).
//!
//! While a lane's batch is in flight, [`Engine::prepare`] makes the lane's next batch (its
//! commands chosen, its request made) from what the source read ahead, so that once the answer
//! is in, the next request goes at once; a temporary failure in the batch before undoes it.
//!
//! The engine does no I/O of its own besides the client's requests. It says per lane what is
//! settled ([`Engine::unapplied`]); the source makes that durable (deletes rows, writes dead
//! letters, commits offsets) and says so ([`Engine::applied`]), and learns through which
//! position the lane is done, which is what it may commit or confirm.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::client::{Body, CentrifugoClient, InFlight};
use crate::dispatch::{Failure, Outcome, Prepared};
use crate::lane::BatchWindow;
use crate::retry::{Backoff, Jitter};

/// What a command is when the source hands it over.
pub enum Ready {
    /// To be sent.
    Send(Prepared),
    /// Its outcome is known without sending it (a malformed row is a dead letter already).
    Known(Outcome),
}

/// How batches are made and failures waited out; the sources read it from the settings, which
/// a reload may change.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The commands a batch carries when nothing failed.
    pub batch: usize,
    /// The most payload bytes one batch carries (the first command always goes).
    pub budget: i64,
    pub backoff: Backoff,
}

/// One command as the engine holds it.
struct Held<T> {
    position: i64,
    /// With the position, what tells a command read again from another one at the same
    /// position (an outbox row's created_at): a remembered outcome applies only to the same.
    identity: i64,
    /// None while the command is in flight.
    command: Option<Prepared>,
    /// Its size as the source measures what one batch may carry.
    size: i64,
    /// Delivered or dead letter; None while it is still to be sent (a temporary failure too).
    outcome: Option<Outcome>,
    /// Attempts made, for a dead letter's record.
    attempts: u32,
    /// The source made the outcome durable.
    applied: bool,
    item: T,
}

/// A lane's next batch: which held commands (absolute indexes, see `Lane::base`), taken out.
struct Chosen {
    sent: Vec<usize>,
    commands: Vec<Prepared>,
    bytes: i64,
    /// The request, when made ahead.
    body: Option<Body>,
}

struct Lane<T> {
    /// Changes whenever what is held is dropped: a batch of another generation is not this
    /// lane's any more (it was cleared, or removed and opened again, meanwhile).
    generation: u64,
    held: VecDeque<Held<T>>,
    /// How many commands were ever taken off the front of `held`: `held[i - base]` is command
    /// `i`, so a batch's indexes stay right while the lane's done prefix goes.
    base: usize,
    /// The next batch, made while the one before is in flight.
    next: Option<Chosen>,
    window: BatchWindow,
    /// Consecutive temporary failures, and the position they are about.
    attempts: u32,
    failing: Option<i64>,
    /// No batch before this (backing off).
    ready_at: Option<Instant>,
    in_flight: bool,
    /// Outcomes the source applied in its open transaction, until it commits (and whether
    /// Centrifugo ran the command: it was sent).
    pending: Vec<((i64, i64), Outcome, bool)>,
    /// Outcomes of commands Centrifugo ran whose application was rolled back: applied, without
    /// sending, when the same command is pushed again.
    remembered: HashMap<(i64, i64), Outcome>,
}

impl<T> Held<T> {
    /// Settled, and not yet made durable by the source.
    fn settled_unapplied(&self) -> bool {
        self.outcome.is_some() && !self.applied
    }
}

impl<T> Lane<T> {
    fn new(resend: Option<(i64, i64)>, generation: u64) -> Self {
        Lane {
            generation,
            held: VecDeque::new(),
            base: 0,
            next: None,
            window: BatchWindow::resuming(resend),
            attempts: 0,
            failing: None,
            ready_at: None,
            in_flight: false,
            pending: Vec::new(),
            remembered: HashMap::new(),
        }
    }

    fn wants_dispatch(&self, now: Instant) -> bool {
        !self.in_flight
            && self.ready_at.is_none_or(|t| t <= now)
            && (self.next.is_some() || self.held.iter().any(|h| h.outcome.is_none() || !h.applied))
    }

    fn held_mut(&mut self, index: usize) -> &mut Held<T> {
        &mut self.held[index - self.base]
    }

    /// Takes the next batch out of the commands not settled and not on their way: at most what
    /// the window allows, and what fits in `budget` (a budget of its own per size: the
    /// transport's cap may depend on how many commands go).
    /// `ahead`: the batch is made before the answer to the one in flight, which may still widen
    /// a resend, so the window is only looked at (sending ends a resend, see [`Engine::start`]).
    fn choose(&mut self, configured: usize, ahead: bool, budget: impl Fn(usize) -> i64) -> Chosen {
        let mut chosen = Chosen { sent: Vec::new(), commands: Vec::new(), bytes: 0, body: None };
        let waiting = |h: &Held<T>| h.outcome.is_none() && h.command.is_some();
        // A batch never reaches past a command settled before it was sent (a dead letter, an
        // outcome remembered) that the source has not applied: the source makes it durable (a
        // dead letter written, a row deleted) before anything after it is sent.
        let Some(first) = self.held.iter().take_while(|h| !h.settled_unapplied()).find(|h| waiting(h)) else {
            return chosen;
        };
        let first = first.position;
        let limit =
            if ahead { self.window.peek_limit(configured, first) } else { self.window.limit(configured, first) };
        let stop_before = self.window.stop_before(first);
        let budget = budget(limit);
        let base = self.base;
        for (i, held) in self
            .held
            .iter_mut()
            .take_while(|h| !h.settled_unapplied() && stop_before.is_none_or(|stop| h.position < stop))
            .enumerate()
            .filter(|(_, h)| waiting(h))
            .take(limit)
        {
            let size = held.size;
            // What does not fit goes in the next batch, with everything after it.
            if !chosen.commands.is_empty() && chosen.bytes + size > budget {
                break;
            }
            chosen.bytes += size;
            chosen.commands.push(held.command.take().expect("chosen: waiting"));
            chosen.sent.push(base + i);
        }
        chosen
    }

    /// Puts the commands of a batch made ahead back (the batch before it failed).
    fn give_back(&mut self, chosen: Chosen) {
        for (i, command) in chosen.sent.into_iter().zip(chosen.commands) {
            self.held_mut(i).command = Some(command);
        }
    }

    /// Forgets what is held (the source reads the lane again); a batch in flight is no longer
    /// this lane's.
    fn clear(&mut self, generation: u64) {
        self.generation = generation;
        self.base += self.held.len();
        self.held.clear();
        self.next = None;
        self.in_flight = false;
    }
}

/// A settled command the source has yet to make durable.
pub struct Settled<'a, T> {
    pub position: i64,
    pub identity: i64,
    pub outcome: &'a Outcome,
    /// The command as prepared (None when it was known bad before being prepared).
    pub command: Option<&'a Prepared>,
    /// Attempts made, counting the last one.
    pub attempts: u32,
    pub item: &'a T,
}

/// A temporary failure a batch ran into: the first command of the lane that must be sent again.
#[derive(Debug, Clone)]
pub struct Retry {
    pub position: i64,
    pub method: &'static str,
    pub failure: Failure,
    /// How long the lane waits (zero for commands a one-by-one resend had no time for).
    pub delay: Duration,
    pub attempt: u32,
}

/// What one batch of a lane came to.
#[derive(Debug)]
pub struct Report<K> {
    pub lane: K,
    /// Requests made (a resend one by one, a failover make several).
    pub requests: u64,
    pub retry: Option<Retry>,
    /// Consecutive failures this batch ended (it was answered after them).
    pub recovered_after: u32,
}

/// One lane's batch on its way.
struct LaneBatch<'c, K> {
    lane: K,
    generation: u64,
    /// Indexes into the lane's held commands of those sent, in order.
    sent: Vec<usize>,
    commands: Vec<Prepared>,
    bytes: i64,
    request: Option<InFlight<'c>>,
}

/// The batches of one dispatch round, at most one per lane.
pub struct Flight<'c, K> {
    batches: Vec<LaneBatch<'c, K>>,
}

impl<K: PartialEq> Flight<'_, K> {
    /// Payload bytes in flight for `lane`.
    pub fn bytes(&self, lane: &K) -> i64 {
        self.batches.iter().filter(|b| b.lane == *lane).map(|b| b.bytes).sum()
    }

    /// Whether anything was put on the wire.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

/// What one batch of `commands` commands may carry: the policy's budget, and the transport's cap.
fn budget(policy: &Policy, client: &CentrifugoClient, commands: usize) -> i64 {
    client.batch_bytes_cap(commands).map_or(policy.budget, |cap| cap.min(policy.budget))
}

pub struct Engine<K, T> {
    lanes: HashMap<K, Lane<T>>,
    policy: Policy,
    jitter: Jitter,
    /// The last lane generation given out.
    generations: u64,
}

impl<K: Hash + Eq + Clone, T> Engine<K, T> {
    pub fn new(policy: Policy, jitter_seed: u64) -> Self {
        Engine { lanes: HashMap::new(), policy, jitter: Jitter::new(jitter_seed), generations: 0 }
    }

    /// Takes the settings as they are now.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Opens `lane` unless it is open, resuming a one-by-one resend a restart interrupted.
    pub fn open(&mut self, lane: &K, resend: impl FnOnce() -> Option<(i64, i64)>) {
        if !self.lanes.contains_key(lane) {
            self.generations += 1;
            self.lanes.insert(lane.clone(), Lane::new(resend(), self.generations));
        }
    }

    /// A lane, and a new generation for it (see `Lane::clear`).
    fn lane_and_generation(&mut self, lane: &K) -> Option<(&mut Lane<T>, u64)> {
        self.generations += 1;
        let generation = self.generations;
        self.lanes.get_mut(lane).map(|l| (l, generation))
    }

    pub fn is_open(&self, lane: &K) -> bool {
        self.lanes.contains_key(lane)
    }

    /// Closes `lane` (a Kafka partition revoked): nothing of it is sent or reported any more,
    /// not even the answer of a batch in flight; its new owner sends what is not done again.
    pub fn remove(&mut self, lane: &K) {
        self.lanes.remove(lane);
    }

    /// Adds a command at the end of `lane` (opened if need be), `size` being what it counts
    /// against a batch's budget as the source measures it (so that what the source read within
    /// the budget is one batch). A command whose outcome is remembered from a rolled-back
    /// application gets it without being sent. Returns how many commands the lane holds.
    pub fn push(&mut self, lane: &K, position: i64, identity: i64, ready: Ready, size: i64, item: T) -> usize {
        if !self.lanes.contains_key(lane) {
            self.open(lane, || None);
        }
        let lane = self.lanes.get_mut(lane).expect("opened above");
        let (command, outcome) = match ready {
            Ready::Send(command) => {
                let outcome = lane.remembered.get(&(position, identity)).cloned();
                (Some(command), outcome)
            }
            Ready::Known(outcome) => (None, Some(outcome)),
        };
        lane.held.push_back(Held { position, identity, command, size, outcome, attempts: 1, applied: false, item });
        lane.held.len()
    }

    /// Commands of `lane` held: not settled, or settled and not applied yet.
    pub fn len(&self, lane: &K) -> usize {
        self.lanes.get(lane).map_or(0, |l| l.held.len())
    }

    /// Commands of `lane` not done: still to be sent, or settled and not applied.
    pub fn undone(&self, lane: &K) -> usize {
        self.lanes.get(lane).map_or(0, |l| l.held.iter().filter(|h| !h.applied).count())
    }

    /// Commands of `lane` still to be sent.
    pub fn waiting(&self, lane: &K) -> usize {
        self.lanes.get(lane).map_or(0, |l| l.held.iter().filter(|h| h.outcome.is_none()).count())
    }

    /// Until when `lane` backs off, if it does.
    pub fn ready_at(&self, lane: &K) -> Option<Instant> {
        self.lanes.get(lane).and_then(|l| l.ready_at)
    }

    /// How many commands the next batch of `lane` may carry as things stand (what a source that
    /// reads one batch at a time reads).
    pub fn read_limit(&self, lane: &K) -> usize {
        let configured = self.policy.batch;
        self.lanes.get(lane).map_or(configured.max(1), |l| l.window.limit_now(configured))
    }

    /// The lane's one-by-one resend (from, through), and its batch size when reduced, for the
    /// status views and for a restarted worker.
    pub fn window(&self, lane: &K) -> (Option<(i64, i64)>, Option<usize>) {
        self.lanes.get(lane).map_or((None, None), |l| (l.window.resend(), l.window.reduced(self.policy.batch)))
    }

    /// Whether some lane would start a batch now.
    pub fn any_ready(&self, now: Instant) -> bool {
        self.lanes.values().any(|l| l.wants_dispatch(now))
    }

    /// Puts the next batch of every lane that is ready on the wire (a lane with only settled
    /// commands to apply joins without a request), and returns at once.
    pub fn start<'c>(&mut self, client: &'c CentrifugoClient, now: Instant) -> Flight<'c, K> {
        let policy = self.policy;
        let mut batches = Vec::new();
        for (key, lane) in &mut self.lanes {
            if !lane.wants_dispatch(now) {
                continue;
            }
            let mut chosen = match lane.next.take() {
                Some(chosen) => {
                    // Made ahead with the window only looked at: sending it ends a resend it is past.
                    if let Some(&first) = chosen.sent.first() {
                        let first = lane.held_mut(first).position;
                        lane.window.limit(policy.batch, first);
                    }
                    chosen
                }
                None => lane.choose(policy.batch, false, |limit| budget(&policy, client, limit)),
            };
            lane.in_flight = true;
            let request = (!chosen.commands.is_empty()).then(|| {
                let body = chosen.body.take().unwrap_or_else(|| client.body(&chosen.commands));
                client.start_body(body)
            });
            let Chosen { sent, commands, bytes, .. } = chosen;
            batches.push(LaneBatch { lane: key.clone(), generation: lane.generation, sent, commands, bytes, request });
        }
        Flight { batches }
    }

    /// Makes the next batch of every lane in flight from what the source pushed meanwhile, its
    /// request included, so it goes on the wire as soon as the answer before it is in.
    pub fn prepare(&mut self, client: &CentrifugoClient) {
        let policy = self.policy;
        for lane in self.lanes.values_mut().filter(|l| l.in_flight && l.next.is_none()) {
            let mut chosen = lane.choose(policy.batch, true, |limit| budget(&policy, client, limit));
            if !chosen.commands.is_empty() {
                chosen.body = Some(client.body(&chosen.commands));
                lane.next = Some(chosen);
            }
        }
    }

    /// Waits for every batch of `flight` (all answers are read before any is handled, so none
    /// waits unread and times out while another one is), takes what each command came to, and
    /// backs off the lanes that ran into a temporary failure. A lane removed meanwhile gets
    /// nothing.
    pub fn finish(&mut self, client: &CentrifugoClient, mut flight: Flight<'_, K>, now: Instant) -> Vec<Report<K>> {
        for request in flight.batches.iter_mut().filter_map(|b| b.request.as_mut()) {
            request.settle();
        }
        let mut reports = Vec::with_capacity(flight.batches.len());
        for batch in flight.batches {
            let mut requests = 0;
            let outcomes = match batch.request {
                Some(request) => client.finish(request, &batch.commands, &mut requests),
                None => Vec::new(),
            };
            // Removed, or cleared, meanwhile: what it held is gone, and so is this batch's part.
            let Some(lane) = self.lanes.get_mut(&batch.lane).filter(|l| l.generation == batch.generation) else {
                continue;
            };
            lane.in_flight = false;
            // Nothing was sent (only settled commands to apply): nothing about failures is learnt.
            if batch.sent.is_empty() {
                reports.push(Report { lane: batch.lane, requests, retry: None, recovered_after: 0 });
                continue;
            }
            if let (Some(&first), Some(&last)) = (batch.sent.first(), batch.sent.last()) {
                let (first, last) = (lane.held_mut(first).position, lane.held_mut(last).position);
                lane.window.record(outcomes.iter().map(Some), first, last);
            }
            let mut retry: Option<(i64, &'static str, Failure)> = None;
            let (failing, attempts) = (lane.failing, lane.attempts);
            for ((&i, command), outcome) in batch.sent.iter().zip(batch.commands).zip(outcomes) {
                let held = lane.held_mut(i);
                match outcome {
                    Outcome::Retry(failure) => {
                        retry.get_or_insert((held.position, command.method.as_str(), failure));
                    }
                    settled => {
                        held.attempts = if failing == Some(held.position) { attempts + 1 } else { 1 };
                        held.outcome = Some(settled);
                    }
                }
                held.command = Some(command);
            }
            if retry.is_some() {
                // The batch made ahead assumed this one would go through.
                if let Some(next) = lane.next.take() {
                    lane.give_back(next);
                }
            }
            let recovered_after = if retry.is_none() { std::mem::take(&mut lane.attempts) } else { 0 };
            let retry = match retry {
                None => {
                    lane.failing = None;
                    lane.ready_at = None;
                    None
                }
                Some((position, method, failure)) if failure.is_deferred() => {
                    lane.ready_at = None;
                    Some(Retry { position, method, failure, delay: Duration::ZERO, attempt: lane.attempts })
                }
                Some((position, method, failure)) => {
                    lane.attempts += 1;
                    lane.failing = Some(position);
                    let delay = self.policy.backoff.delay(lane.attempts, self.jitter.next_fraction());
                    lane.ready_at = Some(now + delay);
                    Some(Retry { position, method, failure, delay, attempt: lane.attempts })
                }
            };
            reports.push(Report { lane: batch.lane, requests, retry, recovered_after });
        }
        reports
    }

    /// The settled commands of `lane` the source has not made durable yet, in order.
    pub fn unapplied(&self, lane: &K) -> impl Iterator<Item = Settled<'_, T>> {
        self.lanes.get(lane).into_iter().flat_map(|l| l.held.iter()).filter(|h| !h.applied).filter_map(|h| {
            Some(Settled {
                position: h.position,
                identity: h.identity,
                outcome: h.outcome.as_ref()?,
                command: h.command.as_ref(),
                attempts: h.attempts,
                item: &h.item,
            })
        })
    }

    /// The source made every settled command of `lane` durable in its open transaction (see
    /// [`Self::committed`], [`Self::rolled_back`]). Returns the position through which the lane
    /// is done: every command up to it is settled and applied.
    pub fn applied(&mut self, lane: &K) -> Option<i64> {
        self.apply(lane, true)
    }

    /// The source made every settled command of `lane` durable for good (a Kafka consumer's dead
    /// letters are committed at once): nothing is kept for a rollback. Returns the position
    /// through which the lane is done (what it commits).
    pub fn applied_durably(&mut self, lane: &K) -> Option<i64> {
        self.apply(lane, false)
    }

    fn apply(&mut self, lane: &K, transactional: bool) -> Option<i64> {
        let lane = self.lanes.get_mut(lane)?;
        for held in lane.held.iter_mut().filter(|h| !h.applied) {
            if let Some(outcome) = &held.outcome {
                held.applied = true;
                if transactional {
                    lane.pending.push(((held.position, held.identity), outcome.clone(), held.command.is_some()));
                }
            }
        }
        let mut done = None;
        while lane.held.front().is_some_and(|h| h.applied) {
            done = lane.held.pop_front().map(|h| h.position);
            lane.base += 1;
        }
        done
    }

    /// The source's transaction committed what it applied: nothing of it is remembered.
    pub fn committed(&mut self, lane: &K) {
        if let Some(lane) = self.lanes.get_mut(lane) {
            for (key, _, _) in lane.pending.drain(..) {
                lane.remembered.remove(&key);
            }
        }
    }

    /// The source's transaction rolled back: every outcome known is remembered for when the
    /// source reads the commands again, and what is held is dropped (see [`Self::restart`]); the
    /// lane's back-off is the source's to wait out now. Returns how many of those commands
    /// Centrifugo ran (were sent).
    pub fn rolled_back(&mut self, lane: &K) -> usize {
        let Some((lane, generation)) = self.lane_and_generation(lane) else { return 0 };
        let unapplied = lane.held.iter().filter(|h| !h.applied);
        let settled =
            unapplied.filter_map(|h| Some(((h.position, h.identity), h.outcome.clone()?, h.command.is_some())));
        let known: Vec<_> = lane.pending.drain(..).chain(settled).collect();
        let ran = known.iter().filter(|(_, _, sent)| *sent).count();
        lane.remembered.extend(known.into_iter().map(|(key, outcome, _)| (key, outcome)));
        lane.clear(generation);
        lane.ready_at = None;
        ran
    }

    /// The source reads `lane` again from its start: what is held is dropped (outcomes
    /// remembered stay).
    pub fn restart(&mut self, lane: &K) {
        if let Some((lane, generation)) = self.lane_and_generation(lane) {
            lane.clear(generation);
        }
    }

    /// Everything remembered of `lane` is moot (it was drained: nothing is left that an earlier
    /// failed transaction could have sent), and so is a resend under way.
    pub fn drained(&mut self, lane: &K) {
        if let Some(lane) = self.lanes.get_mut(lane) {
            lane.remembered.clear();
            lane.window.drained();
        }
    }

    /// `lane` is about something else now (another table under the name): nothing of before
    /// applies, its window included.
    pub fn reset(&mut self, lane: &K) {
        if let Some((lane, generation)) = self.lane_and_generation(lane) {
            lane.remembered.clear();
            lane.pending.clear();
            lane.clear(generation);
            lane.window.reset();
        }
    }

    /// Holds `lane` back until `until` (its source could not apply what is settled).
    pub fn hold(&mut self, lane: &K, until: Instant) {
        if let Some(lane) = self.lanes.get_mut(lane) {
            lane.ready_at = Some(until);
        }
    }

    /// Consecutive temporary failures of `lane`.
    pub fn attempts(&self, lane: &K) -> u32 {
        self.lanes.get(lane).map_or(0, |l| l.attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{prepare, ErrorBody, Reply, Response};
    use crate::transport::{Body, Call, ClientConfig, Transport};
    use std::sync::{Arc, Mutex};

    /// What the scripted transport does with its next request (then: answer everything).
    #[derive(Clone)]
    enum Act {
        /// Centrifugo answers each command; those at these indexes fail with this code.
        Fail(Vec<usize>, u32),
        /// No answer comes: the request times out.
        Hang,
        /// The request is refused as a whole with this HTTP status (nothing ran).
        Refuse(u16),
    }

    #[derive(Default)]
    struct Script {
        acts: VecDeque<Act>,
        /// The data of each command sent, per request, in order.
        sent: Vec<Vec<i64>>,
    }

    #[derive(Clone, Default)]
    struct Scripted(Arc<Mutex<Script>>);

    impl Scripted {
        fn then(&self, act: Act) -> &Self {
            self.0.lock().unwrap().acts.push_back(act);
            self
        }
        fn sent(&self) -> Vec<Vec<i64>> {
            self.0.lock().unwrap().sent.clone()
        }
    }

    impl Transport for Scripted {
        fn body(&self, commands: &[Prepared]) -> Body {
            let data = commands
                .iter()
                .map(|c| serde_json::from_str::<serde_json::Value>(&c.payload).unwrap()["data"].as_i64().unwrap())
                .collect::<Vec<i64>>();
            Body::new(data)
        }

        fn call(&self, _endpoint: usize, body: Body, timeout: Duration) -> Call {
            let data: Vec<i64> = body.take().unwrap();
            let mut script = self.0.lock().unwrap();
            let count = data.len();
            script.sent.push(data);
            match script.acts.pop_front() {
                None => Box::pin(async move { replies(count, &[], 0) }),
                Some(Act::Fail(at, code)) => Box::pin(async move { replies(count, &at, code) }),
                Some(Act::Refuse(status)) => Box::pin(async move { Response::Http { status, body: Vec::new() } }),
                Some(Act::Hang) => Box::pin(async move {
                    tokio::time::sleep(timeout).await;
                    Response::Transport("timeout".into())
                }),
            }
        }

        fn probe(&self, _endpoint: usize, _timeout: Duration) -> Call {
            Box::pin(async { Response::Replies(Vec::new()) })
        }
    }

    fn replies(count: usize, failing: &[usize], code: u32) -> Response {
        Response::Replies(
            (0..count)
                .map(|i| Reply {
                    error: failing.contains(&i).then(|| ErrorBody { code, message: "scripted".into() }),
                    broadcast: None,
                })
                .collect(),
        )
    }

    fn client(script: &Scripted) -> CentrifugoClient {
        let config = ClientConfig {
            api_url: "http://scripted:8000/api".into(),
            timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_millis(100),
            ..Default::default()
        };
        CentrifugoClient::over(config, Box::new(script.clone())).unwrap()
    }

    fn engine(batch: usize) -> Engine<&'static str, ()> {
        let backoff = Backoff { base: Duration::from_millis(50), max: Duration::from_millis(50) };
        Engine::new(Policy { batch, budget: i64::MAX, backoff }, 7)
    }

    fn push(engine: &mut Engine<&'static str, ()>, lane: &'static str, positions: std::ops::Range<i64>) {
        for p in positions {
            let command = prepare("publish", &format!(r#"{{"channel":"c","data":{p}}}"#), || format!("k{p}")).unwrap();
            let size = command.payload.len() as i64;
            engine.push(&lane, p, 0, Ready::Send(command), size, ());
        }
    }

    /// What is settled in `lane`, as (position, delivered).
    fn settled(engine: &Engine<&'static str, ()>, lane: &'static str) -> Vec<(i64, bool)> {
        engine.unapplied(&lane).map(|s| (s.position, matches!(s.outcome, Outcome::Delivered))).collect()
    }

    #[test]
    fn a_lane_has_one_batch_in_flight_while_the_source_reads_ahead_and_is_done_in_order() {
        let script = Scripted::default();
        let client = client(&script);
        let mut engine = engine(3);
        push(&mut engine, "a", 0..4);
        let now = Instant::now();
        let flight = engine.start(&client, now);
        // Read ahead while the batch is in flight: no second batch of the lane goes meanwhile.
        push(&mut engine, "a", 4..7);
        assert!(engine.start(&client, now).is_empty());
        let reports = engine.finish(&client, flight, now);
        assert!(reports.len() == 1 && reports[0].retry.is_none(), "{reports:?}");
        assert_eq!(settled(&engine, "a"), vec![(0, true), (1, true), (2, true)]);
        assert_eq!(engine.applied(&"a"), Some(2));
        while engine.any_ready(now) {
            let flight = engine.start(&client, now);
            engine.finish(&client, flight, now);
            engine.applied(&"a");
        }
        assert_eq!(script.sent(), vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(engine.len(&"a"), 0);
    }

    #[test]
    fn a_partial_failure_settles_what_ran_and_resends_the_failed_command_alone_after_a_back_off() {
        let script = Scripted::default();
        script.then(Act::Fail(vec![1], 100));
        let client = client(&script);
        let mut engine = engine(4);
        push(&mut engine, "a", 0..8);
        let now = Instant::now();
        let flight = engine.start(&client, now);
        let reports = engine.finish(&client, flight, now);
        let retry = reports[0].retry.clone().expect("a temporary failure");
        assert_eq!((retry.position, retry.attempt), (1, 1));
        assert!(retry.delay > Duration::ZERO && !retry.failure.is_deferred());
        // What ran after the failed command is settled: never sent again.
        assert_eq!(settled(&engine, "a"), vec![(0, true), (2, true), (3, true)]);
        // Only the prefix is done: position 1 holds back what a Kafka consumer may commit.
        assert_eq!(engine.applied(&"a"), Some(0));
        assert!(engine.start(&client, now).is_empty(), "backing off");
        let later = now + retry.delay;
        // Through the failed batch, one command per request; then full batches again.
        let mut reports = Vec::new();
        while engine.any_ready(later) {
            let flight = engine.start(&client, later);
            reports.extend(engine.finish(&client, flight, later));
            engine.applied(&"a");
        }
        assert_eq!(script.sent(), vec![vec![0, 1, 2, 3], vec![1], vec![4, 5, 6, 7]]);
        assert_eq!(reports[0].recovered_after, 1);
        assert_eq!(engine.window(&"a"), (None, None));
    }

    #[test]
    fn a_batch_that_gets_no_reply_is_retried_halved_and_nothing_of_it_is_lost() {
        let script = Scripted::default();
        script.then(Act::Hang).then(Act::Hang);
        let client = client(&script);
        let mut engine = engine(4);
        push(&mut engine, "a", 0..6);
        let mut now = Instant::now();
        for expected_limit in [Some(2), Some(1)] {
            let flight = engine.start(&client, now);
            let reports = engine.finish(&client, flight, now);
            let retry = reports[0].retry.clone().expect("timed out");
            assert!(retry.failure.is_timeout(), "{:?}", retry.failure);
            assert_eq!(engine.window(&"a").1, expected_limit);
            assert!(settled(&engine, "a").is_empty());
            now += retry.delay;
        }
        while engine.any_ready(now) {
            let flight = engine.start(&client, now);
            engine.finish(&client, flight, now);
            engine.applied(&"a");
        }
        // Answered batches double the size back: 1, 2, then the rest.
        assert_eq!(script.sent(), vec![vec![0, 1, 2, 3], vec![0, 1], vec![0], vec![1, 2], vec![3, 4, 5]]);
        assert_eq!(engine.len(&"a"), 0);
    }

    #[test]
    fn a_lane_revoked_mid_flight_gets_nothing_and_the_other_lanes_go_on() {
        let script = Scripted::default();
        let client = client(&script);
        let mut engine = engine(10);
        push(&mut engine, "a", 0..2);
        push(&mut engine, "b", 10..12);
        let now = Instant::now();
        let flight = engine.start(&client, now);
        engine.remove(&"a");
        let reports = engine.finish(&client, flight, now);
        assert_eq!(reports.iter().map(|r| r.lane).collect::<Vec<_>>(), vec!["b"]);
        assert!(!engine.is_open(&"a") && settled(&engine, "a").is_empty());
        assert_eq!(engine.applied(&"b"), Some(11));
        // Assigned again: its commands are read again and sent again (their keys absorb it).
        push(&mut engine, "a", 0..2);
        let flight = engine.start(&client, now);
        engine.finish(&client, flight, now);
        assert_eq!(settled(&engine, "a"), vec![(0, true), (1, true)]);
        let mut sent = script.sent();
        sent.sort();
        assert_eq!(sent, vec![vec![0, 1], vec![0, 1], vec![10, 11]]);
    }

    #[test]
    fn what_ran_is_remembered_across_a_rollback_and_applied_without_sending_it_again() {
        let script = Scripted::default();
        script.then(Act::Fail(vec![2], 107));
        let client = client(&script);
        let mut engine = engine(10);
        push(&mut engine, "a", 0..3);
        let now = Instant::now();
        let flight = engine.start(&client, now);
        engine.finish(&client, flight, now);
        engine.applied(&"a");
        // The source's transaction (deletes, dead letters) rolled back: it reads the rows again.
        assert_eq!(engine.rolled_back(&"a"), 3);
        push(&mut engine, "a", 0..3);
        // Another command at a position (a row id used again) is not the one remembered.
        let other = prepare("publish", r#"{"channel":"c","data":3}"#, || "k".into()).unwrap();
        engine.push(&"a", 3, 1, Ready::Send(other), 1, ());
        let flight = engine.start(&client, now);
        engine.finish(&client, flight, now);
        // What is remembered is applied before anything after it is sent.
        assert_eq!(settled(&engine, "a"), vec![(0, true), (1, true), (2, false)]);
        assert_eq!(script.sent(), vec![vec![0, 1, 2]]);
        engine.applied(&"a");
        let flight = engine.start(&client, now);
        engine.finish(&client, flight, now);
        assert_eq!(settled(&engine, "a"), vec![(3, true)]);
        assert_eq!(script.sent(), vec![vec![0, 1, 2], vec![3]]);
        engine.applied(&"a");
        engine.committed(&"a");
        // Committed: nothing is remembered, the same rows would be sent (they are gone).
        engine.restart(&"a");
        push(&mut engine, "a", 0..1);
        let flight = engine.start(&client, now);
        engine.finish(&client, flight, now);
        assert_eq!(script.sent().len(), 3);
    }

    #[test]
    fn a_batch_over_what_one_request_may_carry_goes_in_parts_in_order() {
        let script = Scripted::default();
        let client = client(&script);
        let mut engine = engine(10);
        let mut policy = engine.policy();
        let one = prepare("publish", r#"{"channel":"c","data":0}"#, || "k0".into()).unwrap();
        policy.budget = 2 * one.payload.len() as i64;
        engine.set_policy(policy);
        push(&mut engine, "a", 0..5);
        let now = Instant::now();
        while engine.any_ready(now) {
            let flight = engine.start(&client, now);
            engine.finish(&client, flight, now);
            engine.applied(&"a");
        }
        assert_eq!(script.sent(), vec![vec![0, 1], vec![2, 3], vec![4]]);
    }

    #[test]
    fn settled_commands_the_source_could_not_apply_are_offered_again_and_never_sent_again() {
        let script = Scripted::default();
        script.then(Act::Fail(vec![0], 107));
        let client = client(&script);
        let mut engine = engine(10);
        push(&mut engine, "a", 0..2);
        engine.push(
            &"a",
            2,
            0,
            Ready::Known(Outcome::DeadLetter { failure: Failure::malformed("bad"), payload: None }),
            0,
            (),
        );
        let now = Instant::now();
        let flight = engine.start(&client, now);
        engine.finish(&client, flight, now);
        assert_eq!(settled(&engine, "a"), vec![(0, false), (1, true), (2, false)]);
        // The dead letters could not be written: the lane waits, then offers them again.
        let until = now + Duration::from_millis(30);
        engine.hold(&"a", until);
        assert!(engine.start(&client, now).is_empty());
        let flight = engine.start(&client, until);
        assert!(!flight.is_empty());
        engine.finish(&client, flight, until);
        assert_eq!(settled(&engine, "a"), vec![(0, false), (1, true), (2, false)]);
        assert_eq!(engine.applied(&"a"), Some(2));
        assert_eq!(script.sent(), vec![vec![0, 1]]);
        assert!(!engine.any_ready(until));
    }

    #[test]
    fn a_command_settled_before_sending_is_applied_before_anything_after_it_is_sent() {
        let script = Scripted::default();
        let client = client(&script);
        let mut engine = engine(10);
        let dead = || Ready::Known(Outcome::DeadLetter { failure: Failure::malformed("bad"), payload: None });
        push(&mut engine, "a", 0..2);
        engine.push(&"a", 2, 0, dead(), 0, ());
        push(&mut engine, "a", 3..5);
        let now = Instant::now();
        let flight = engine.start(&client, now);
        // Made ahead while 0 and 1 are on their way: nothing past the dead letter.
        engine.prepare(&client);
        engine.finish(&client, flight, now);
        assert_eq!(script.sent(), vec![vec![0, 1]]);
        assert_eq!(settled(&engine, "a"), vec![(0, true), (1, true), (2, false)]);
        // Its dead letter written (applied), the commands after it go.
        assert_eq!(engine.applied(&"a"), Some(2));
        let flight = engine.start(&client, now);
        engine.finish(&client, flight, now);
        assert_eq!(script.sent(), vec![vec![0, 1], vec![3, 4]]);
        // A lane that begins with one joins a dispatch without a request first.
        engine.applied(&"a");
        engine.push(&"a", 5, 0, dead(), 0, ());
        push(&mut engine, "a", 6..7);
        let flight = engine.start(&client, now);
        assert_eq!(engine.finish(&client, flight, now)[0].requests, 0);
        assert_eq!(engine.applied(&"a"), Some(5));
        let flight = engine.start(&client, now);
        engine.finish(&client, flight, now);
        assert_eq!(script.sent(), vec![vec![0, 1], vec![3, 4], vec![6]]);
    }

    #[test]
    fn the_next_batch_made_while_one_is_in_flight_goes_next_or_is_undone_when_that_one_fails() {
        for failing in [false, true] {
            let script = Scripted::default();
            if failing {
                script.then(Act::Fail(vec![0], 100));
            }
            let client = client(&script);
            let mut engine = engine(2);
            push(&mut engine, "a", 0..2);
            let mut now = Instant::now();
            let flight = engine.start(&client, now);
            push(&mut engine, "a", 2..4);
            engine.prepare(&client);
            let reports = engine.finish(&client, flight, now);
            engine.applied(&"a");
            if let Some(retry) = &reports[0].retry {
                now += retry.delay;
            }
            while engine.any_ready(now) {
                let flight = engine.start(&client, now);
                engine.finish(&client, flight, now);
                engine.applied(&"a");
            }
            let expected = if failing { vec![vec![0, 1], vec![0], vec![2, 3]] } else { vec![vec![0, 1], vec![2, 3]] };
            assert_eq!(script.sent(), expected, "failing: {failing}");
            assert_eq!(engine.len(&"a"), 0);
        }
    }

    /// Found by the e2e test (a worker terminated mid-resend): the restarted worker re-read the
    /// rows its rolled-back round had sent before the resend, and a batch starting below the
    /// resend ended it, so the failed command went out again at the head of a full batch.
    #[test]
    fn a_resumed_resend_holds_when_rows_before_it_come_again() {
        let script = Scripted::default();
        // Position 5 (resent alone before the restart) fails once more.
        script.then(Act::Fail(vec![], 0)).then(Act::Fail(vec![0], 100));
        let client = client(&script);
        let mut engine = engine(4);
        engine.open(&"a", || Some((5, 8)));
        // 3 and 4 ran in full batches before the resend; the rolled-back round left them.
        push(&mut engine, "a", 3..11);
        let mut now = Instant::now();
        while engine.any_ready(now) {
            let flight = engine.start(&client, now);
            if let Some(retry) = engine.finish(&client, flight, now).pop().and_then(|r| r.retry) {
                now += retry.delay;
            }
            engine.applied(&"a");
        }
        assert_eq!(
            script.sent(),
            vec![vec![3, 4], vec![5], vec![5], vec![6], vec![7], vec![8], vec![9, 10]],
            "nothing after the resend's first position joins it before the resend is through"
        );
    }

    #[test]
    fn a_batch_made_ahead_never_ends_a_resend_before_the_answer_before_it_is_in() {
        let script = Scripted::default();
        // Position 2 fails while 3 and 4 run: 2 is resent alone; that resend is refused as a
        // whole (503) while the next rows were read ahead.
        script.then(Act::Fail(vec![1], 100)).then(Act::Refuse(503));
        let client = client(&script);
        let mut engine = engine(4);
        push(&mut engine, "a", 1..5);
        let mut now = Instant::now();
        let flight = engine.start(&client, now);
        now += engine.finish(&client, flight, now)[0].retry.clone().unwrap().delay;
        engine.applied(&"a");
        let flight = engine.start(&client, now);
        push(&mut engine, "a", 5..8);
        engine.prepare(&client);
        let reports = engine.finish(&client, flight, now);
        now += reports[0].retry.clone().expect("refused").delay;
        assert_eq!(engine.window(&"a").0, Some((1, 4)), "the resend is still under way");
        while engine.any_ready(now) {
            let flight = engine.start(&client, now);
            engine.finish(&client, flight, now);
            engine.applied(&"a");
        }
        assert_eq!(script.sent(), vec![vec![1, 2, 3, 4], vec![2], vec![2], vec![5, 6, 7]]);
    }

    #[test]
    fn a_lane_cleared_or_opened_again_mid_flight_takes_nothing_of_the_batch_before() {
        let script = Scripted::default();
        script.then(Act::Fail(vec![0, 1], 100)).then(Act::Fail(vec![0, 1], 100));
        let client = client(&script);
        let mut engine = engine(4);
        let now = Instant::now();
        // Cleared (the source reads the lane again) while its batch is in flight.
        push(&mut engine, "a", 0..2);
        let flight = engine.start(&client, now);
        engine.restart(&"a");
        assert!(engine.finish(&client, flight, now).is_empty());
        // Removed and opened again (revoked, assigned again) while its batch is in flight.
        push(&mut engine, "b", 10..12);
        let flight = engine.start(&client, now);
        engine.remove(&"b");
        push(&mut engine, "b", 10..12);
        assert!(engine.finish(&client, flight, now).is_empty());
        // Neither batch's failures reached the lanes as they are now.
        assert_eq!(engine.window(&"b"), (None, None));
        assert_eq!((engine.attempts(&"a"), engine.attempts(&"b")), (0, 0));
        assert_eq!(engine.waiting(&"b"), 2);
    }

    #[test]
    fn after_a_rollback_the_lane_does_not_back_off_a_second_time() {
        let script = Scripted::default();
        script.then(Act::Refuse(503));
        let client = client(&script);
        let mut engine = engine(4);
        push(&mut engine, "a", 0..2);
        let now = Instant::now();
        let flight = engine.start(&client, now);
        assert!(engine.finish(&client, flight, now)[0].retry.is_some());
        assert!(engine.ready_at(&"a").is_some_and(|t| t > now));
        // The source's transaction failed afterwards: it waits out its own back-off.
        engine.rolled_back(&"a");
        push(&mut engine, "a", 0..2);
        assert!(engine.any_ready(now));
    }

    #[test]
    fn a_lane_with_only_settled_commands_to_apply_keeps_its_failure_count() {
        let script = Scripted::default();
        script.then(Act::Refuse(503));
        let client = client(&script);
        let mut engine = engine(4);
        push(&mut engine, "a", 0..1);
        let now = Instant::now();
        let flight = engine.start(&client, now);
        let later = now + engine.finish(&client, flight, now)[0].retry.clone().unwrap().delay;
        // A dead letter known before sending joins a dispatch without a request.
        let bad = Outcome::DeadLetter { failure: Failure::malformed("bad"), payload: None };
        engine.restart(&"a");
        engine.push(&"a", 0, 0, Ready::Known(bad), 0, ());
        let flight = engine.start(&client, later);
        let reports = engine.finish(&client, flight, later);
        assert_eq!((reports[0].requests, reports[0].recovered_after), (0, 0));
        assert_eq!(engine.attempts(&"a"), 1, "not a recovery: nothing was sent");
    }
}
