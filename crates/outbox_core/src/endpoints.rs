//! The nodes of a Centrifugo cluster as a list of API endpoints, and which one a worker sends to.
//!
//! A worker uses one endpoint at a time, so the requests of a partition go out one after the
//! other on one connection and keep their order. A node that fails (no HTTP answer, or a 5xx) is
//! left for the next endpoint in the list; a node that answers but refuses (401, 404) is a
//! configuration error and is not left: failing over would hide it. Once a node earlier in the
//! list than the one in use answers a probe again, the worker goes back to it: the list's order
//! is the operator's preference.

use std::time::{Duration, Instant};

use crate::dispatch::Response;

/// At most this many endpoints in `centrifugo.api_url` (a cluster's nodes, not a fleet).
pub const MAX_ENDPOINTS: usize = 8;

/// The first probe of a failed node comes this long after its failure; each probe it fails, and
/// each failure soon after it was taken back, doubles the wait, up to [`PROBE_MAX`].
pub const PROBE_FIRST: Duration = Duration::from_millis(500);
pub const PROBE_MAX: Duration = Duration::from_secs(5);

/// The endpoints of `centrifugo.api_url`: one URL, or several separated by commas (spaces
/// around them are ignored). Each is an http(s) base URL with a host, all of one scheme (a
/// failover must not send the API key in clear text where TLS was meant); none may repeat. A
/// `user:password@` part is accepted, as by 0.3.0 (sent as HTTP basic auth, for a proxy in
/// front of Centrifugo), and never shown ([`display_url`]); errors never echo an entry.
pub fn parse_api_urls(setting: &str) -> Result<Vec<String>, String> {
    let mut urls: Vec<String> = Vec::new();
    for (i, entry) in setting.split(',').enumerate() {
        let url = entry.trim();
        if url.is_empty() {
            return Err(if setting.trim().is_empty() {
                "centrifugo.api_url is empty".to_owned()
            } else {
                format!("centrifugo.api_url has an empty entry (number {}) in its comma-separated list", i + 1)
            });
        }
        if url.contains('\\') {
            return Err(format!("centrifugo.api_url entry number {} contains a backslash", i + 1));
        }
        if let Some(problem) = crate::settings::api_url_problem(url) {
            return Err(format!("centrifugo.api_url entry number {} {problem}", i + 1));
        }
        if let Some(first) = urls.first() {
            if scheme(first) != scheme(url) {
                return Err(format!(
                    "centrifugo.api_url mixes {} and {} endpoints: use one scheme for every node",
                    scheme(first),
                    scheme(url)
                ));
            }
        }
        if urls.iter().any(|u| same_endpoint(u, url)) {
            return Err(format!("centrifugo.api_url lists {} twice", display_url(url)));
        }
        urls.push(url.to_owned());
    }
    if urls.len() > MAX_ENDPOINTS {
        return Err(format!("centrifugo.api_url lists {} endpoints; at most {MAX_ENDPOINTS} are allowed", urls.len()));
    }
    Ok(urls)
}

fn scheme(url: &str) -> String {
    url.split_once("://").map_or("", |(s, _)| s).to_ascii_lowercase()
}

/// The same node, as shown (credentials aside) and as posted to (a trailing slash aside).
fn same_endpoint(a: &str, b: &str) -> bool {
    display_url(a).trim_end_matches('/').eq_ignore_ascii_case(display_url(b).trim_end_matches('/'))
}

/// An identifier of the list `urls` (FNV-1a), stored with the counters in shared memory so a
/// status view reading the setting after a reload never puts one list's counters on another's
/// URLs.
pub fn list_id(urls: &[String]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in urls.iter().flat_map(|u| u.bytes().chain([0])) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash.max(1)
}

/// `url` as logs and status views show it: without any `user:password@` (refused in the
/// setting; this is a second line).
pub fn display_url(url: &str) -> String {
    match split_userinfo(url) {
        Some((scheme, _, host_on)) => format!("{scheme}://{host_on}"),
        None => url.to_owned(),
    }
}

/// A URL with userinfo as (scheme, userinfo, what follows the `@`): the userinfo is everything
/// before the last `@` of the authority, which ends at the first `/`, `?` or `#` (the rule the
/// client reads it with). None without userinfo.
fn split_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some((scheme, &rest[..at], &rest[at + 1..]))
}

/// `text` with the userinfo of every URL in it (`scheme://user:password@host`) replaced by
/// `********`: what a setting of URLs shows, and what a log line about one says. Only an `@`
/// within the authority counts (before the next `/`, `?`, `#`, `,`, quote or white space).
pub fn mask_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let authority_end =
            after.find(|c: char| matches!(c, '/' | '?' | '#' | ',' | '"' | '\'' | '@') || c.is_whitespace());
        match authority_end {
            Some(i) if after[i..].starts_with('@') && i > 0 => {
                // The last `@` of the authority ends the userinfo (a password may hold one).
                let authority_len = after
                    .find(|c: char| matches!(c, '/' | '?' | '#' | ',' | '"' | '\'') || c.is_whitespace())
                    .unwrap_or(after.len());
                let userinfo_end = after[..authority_len].rfind('@').unwrap_or(i);
                out.push_str("********");
                rest = &after[userinfo_end..];
            }
            _ => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// A comma-separated list of URLs as a setting shows it: each URL's userinfo (everything
/// before the last `@` of its authority, the authority ending at the first `/`, `?` or `#`)
/// replaced by `********`, by the rule the client reads it with.
pub fn mask_url_list(urls: &str) -> String {
    urls.split(',')
        .map(|url| match split_userinfo(url) {
            Some((scheme, _, host_on)) => format!("{scheme}://********@{host_on}"),
            None => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The userinfo parts of the URLs in `urls` (`user:password`, and the password alone), for
/// scrubbing them from anything logged.
pub fn userinfo_secrets(urls: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    for url in urls.split(',') {
        if let Some((_, userinfo, _)) = split_userinfo(url.trim()) {
            secrets.push(userinfo.to_owned());
            if let Some((_, password)) = userinfo.split_once(':') {
                secrets.push(password.to_owned());
            }
        }
    }
    secrets
}

/// What a failed request says of its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeFailure {
    /// The request never reached the node (no connection could be made): another node may run
    /// it at once, whatever it holds.
    NotReached,
    /// The node may have run the request, or may still run it (a timeout, a connection lost
    /// after the request went out, a 5xx): at once on another node only if running it twice
    /// cannot harm (publications with idempotency keys).
    Unknown,
}

/// How `response` reflects on the node: `None` when the node answered for itself (a 2xx, or a
/// refusal such as 401/404, which is a configuration error another node would only hide) or
/// when nothing was learnt (a stopping worker's abandoned wait).
pub fn node_failure(response: &Response) -> Option<NodeFailure> {
    match response {
        Response::Transport(message) if message == crate::dispatch::STOPPING => None,
        Response::Transport(message) if message.starts_with(crate::dispatch::CONNECT_FAILED) => {
            Some(NodeFailure::NotReached)
        }
        Response::Transport(_) => Some(NodeFailure::Unknown),
        Response::Http { status, .. } if *status >= 500 => Some(NodeFailure::Unknown),
        Response::Http { .. } | Response::Replies(_) | Response::Unsendable(_) => None,
        // Refusals are the node's configuration (as 400, 401, 404 are) and exhaustion is
        // pushback (as 429 is); any other status is the node failing (internal, unknown, aborted).
        Response::Grpc { code, .. } => {
            use crate::dispatch::grpc_code::*;
            let refusal =
                [INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAUTHENTICATED];
            (!refusal.contains(code)).then_some(NodeFailure::Unknown)
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Health {
    /// Requests that failed at this endpoint (probes not counted).
    failures: u64,
    /// While the endpoint is believed down: when to probe it next.
    next_probe: Option<Instant>,
    /// Failed probes and failures soon after being taken back, in a row: the probe wait doubles
    /// with each, so a node that answers probes but fails real requests is not taken back twice
    /// a second. Forgotten once the node has served requests for [`PROBE_MAX`].
    strikes: u32,
    /// Since when it has answered real requests without failing.
    up_since: Option<Instant>,
}

impl Health {
    fn wait(&self) -> Duration {
        PROBE_FIRST.saturating_mul(1 << self.strikes.min(16)).min(PROBE_MAX)
    }
}

/// What the workers of one server know of one endpoint together (kept in shared memory), so a
/// node one of them found dead or frozen is skipped by all from their next request, instead of
/// each paying a refused connection or a whole timeout to learn it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedNode {
    /// Changes with every report: a worker takes over only what changed since it last looked.
    pub generation: u64,
    /// Unix microseconds until which the node is believed down (its next probe); 0: up.
    pub down_until: i64,
}

/// Where the workers of a server share what they know of the endpoints of list `list_id`
/// (see [`list_id`]). Reports about another list are never mixed with this one's.
pub trait NodeBoard {
    /// The endpoints' shared state, or None when the board is about another list (or empty).
    fn read(&self, list_id: u64) -> Option<[SharedNode; MAX_ENDPOINTS]>;
    /// Reports `endpoint` down until `down_until` (0: up); returns the report's generation.
    fn write(&self, list_id: u64, endpoint: usize, down_until: i64) -> u64;
}

/// Which endpoint a worker uses, and what it knows of the others.
#[derive(Debug, Clone)]
pub struct Failover {
    health: Vec<Health>,
    current: usize,
    /// Per endpoint: the generation of the shared report last taken over or made, and whether
    /// the board was last told (or told us) that it is down.
    seen: Vec<u64>,
    shared_down: Vec<bool>,
}

impl Failover {
    pub fn new(endpoints: usize) -> Self {
        let n = endpoints.max(1);
        Failover { health: vec![Health::default(); n], current: 0, seen: vec![0; n], shared_down: vec![false; n] }
    }

    /// Takes over what other workers reported since the last look (`now_unix`: the same moment
    /// as `now`, in Unix microseconds): a node reported down is left (without counting a failure
    /// of this worker's); a node reported up again is used again if the list prefers it.
    /// Returns whether the endpoint in use changed.
    pub fn take_shared(&mut self, shared: &[SharedNode], now: Instant, now_unix: i64) -> bool {
        let before = self.current;
        for (i, node) in shared.iter().enumerate().take(self.health.len()) {
            // Generation 0: the board was reset for another list, nothing said about this one.
            if node.generation == self.seen[i] || node.generation == 0 {
                continue;
            }
            self.seen[i] = node.generation;
            // Never longer than a probe wait: a wall clock stepped back must not park a node.
            let down_for = node.down_until.saturating_sub(now_unix).min(PROBE_MAX.as_micros() as i64);
            if node.down_until != 0 && down_for <= 0 {
                // A report of a probe already due: nothing to take over.
                continue;
            }
            if down_for > 0 {
                self.shared_down[i] = true;
                let health = &mut self.health[i];
                health.up_since = None;
                health.next_probe = Some(now + Duration::from_micros(down_for as u64));
                if i == self.current && self.health.len() > 1 {
                    let n = self.health.len();
                    let next = (1..n).map(|k| (i + k) % n);
                    self.current = next.clone().find(|&j| !self.is_down(j)).unwrap_or(self.current);
                }
            } else {
                self.shared_down[i] = false;
                if self.health[i].next_probe.take().is_some() && i < self.current {
                    self.current = i;
                }
            }
        }
        self.current != before
    }

    /// What the board should learn from this worker: the endpoints whose state it found
    /// different from what the board last said, as (endpoint, down until in Unix µs; 0: up).
    /// Call [`Self::reported`] with each write's generation.
    pub fn to_share(&mut self, now: Instant, now_unix: i64) -> Vec<(usize, i64)> {
        let mut out = Vec::new();
        for (i, health) in self.health.iter().enumerate() {
            let down = health.next_probe.is_some();
            if down != self.shared_down[i] {
                self.shared_down[i] = down;
                let until = health.next_probe.map_or(0, |at| {
                    now_unix.saturating_add(at.saturating_duration_since(now).as_micros() as i64).max(now_unix + 1)
                });
                out.push((i, until));
            }
        }
        out
    }

    /// The board took this worker's report about `endpoint` as `generation`: not taken over again.
    pub fn reported(&mut self, endpoint: usize, generation: u64) {
        if let Some(seen) = self.seen.get_mut(endpoint) {
            *seen = generation;
        }
    }

    /// The endpoint requests go to now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Failed requests per endpoint, in list order.
    pub fn failures(&self) -> Vec<u64> {
        self.health.iter().map(|h| h.failures).collect()
    }

    /// Whether `endpoint` is believed down.
    pub fn is_down(&self, endpoint: usize) -> bool {
        self.health[endpoint].next_probe.is_some()
    }

    /// Whether a request may go to `endpoint` now: it is believed up, or its probe is due.
    pub fn may_try(&self, endpoint: usize, now: Instant) -> bool {
        self.health[endpoint].next_probe.is_none_or(|at| at <= now)
    }

    /// A request to `endpoint` failed as a node failure: counts it, marks the node down and
    /// returns the endpoint to use from now on: the next one in the list believed up, else
    /// simply the next one (when all are down, each is tried in turn, a round each).
    pub fn failed(&mut self, endpoint: usize, now: Instant) -> usize {
        let n = self.health.len();
        let health = &mut self.health[endpoint];
        health.failures += 1;
        health.up_since = None;
        // A node already down that failed again once its wait was over (tried as a fallback)
        // waits again, longer: else every request would try it again, a full timeout each.
        if health.next_probe.is_none_or(|at| at <= now) {
            health.next_probe = Some(now + health.wait());
            health.strikes += 1;
        }
        if endpoint == self.current && n > 1 {
            let next = (1..n).map(|k| (endpoint + k) % n);
            self.current = next.clone().find(|&i| !self.is_down(i)).unwrap_or((endpoint + 1) % n);
        }
        self.current
    }

    /// `endpoint` answered a request (whatever the answer): it is up.
    pub fn answered(&mut self, endpoint: usize, now: Instant) {
        let health = &mut self.health[endpoint];
        health.next_probe = None;
        let since = *health.up_since.get_or_insert(now);
        if now.duration_since(since) >= PROBE_MAX {
            health.strikes = 0;
        }
    }

    /// A node earlier in the list than the one in use, due for a probe now.
    pub fn probe_due(&self, now: Instant) -> Option<usize> {
        (0..self.current).find(|&i| self.health[i].next_probe.is_some_and(|at| at <= now))
    }

    /// The probe of `endpoint` came back: a healthy node earlier in the list is used again
    /// (returns true when that switched the endpoint in use); an unhealthy one is probed later.
    pub fn probed(&mut self, endpoint: usize, healthy: bool, now: Instant) -> bool {
        let health = &mut self.health[endpoint];
        // A probe that came back after the node was used again (or is in use) says nothing new.
        if health.next_probe.is_none() || endpoint >= self.current {
            return false;
        }
        if healthy {
            health.next_probe = None;
            health.up_since = None;
            if endpoint < self.current {
                self.current = endpoint;
                return true;
            }
        } else {
            health.next_probe = Some(now + health.wait());
            health.strikes += 1;
        }
        false
    }

    /// Takes over what `other` knew, when it watched the same list (a client rebuilt because
    /// another setting changed must not go back to a node it knows is down).
    pub fn adopt(&mut self, other: &Failover) {
        if other.health.len() == self.health.len() {
            *self = other.clone();
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn userinfo_is_masked_wherever_a_url_stands() {
        assert_eq!(mask_userinfo("http://127.0.0.1:8000/api"), "http://127.0.0.1:8000/api");
        assert_eq!(
            mask_userinfo("https://u:p%40ss@a:8000/api,grpc://tok@b:10000"),
            "https://********@a:8000/api,grpc://********@b:10000"
        );
        assert_eq!(mask_userinfo("http://u:p@ss@a/api"), "http://********@a/api");
        assert_eq!(
            mask_userinfo(r#"parameter "centrifugo.api_url" changed to "http://u:secret@h/api""#),
            r#"parameter "centrifugo.api_url" changed to "http://********@h/api""#
        );
        // An @ after the authority is not userinfo.
        assert_eq!(mask_userinfo("http://h/a@b mailto://x"), "http://h/a@b mailto://x");
        assert_eq!(userinfo_secrets("http://u:secret@h/api, http://h2/api"), vec!["u:secret", "secret"]);
        // Found by review: quotes and commas are valid in userinfo; the setting masks by the URL's own rule.
        assert_eq!(mask_url_list("http://u:p'q\"@h/api,grpc://a@b"), "http://********@h/api,grpc://********@b");
        assert_eq!(mask_url_list(" http://h/api"), " http://h/api");
    }

    use super::*;

    #[test]
    fn shared_reports_are_taken_over_once_and_never_echoed_back() {
        let (now, unix) = (Instant::now(), 1_000_000_000);
        let mut a = Failover::new(3);
        let mut b = Failover::new(3);
        // A finds node 0 down and says so.
        assert_eq!(a.failed(0, now), 1);
        let reports = a.to_share(now, unix);
        assert!(matches!(reports[..], [(0, until)] if until > unix), "{reports:?}");
        a.reported(0, 1);
        assert!(a.to_share(now, unix).is_empty(), "said once");
        let mut board = [SharedNode::default(); MAX_ENDPOINTS];
        board[0] = SharedNode { generation: 1, down_until: reports[0].1 };
        // A does not take its own report over; B does, and leaves node 0 without a failure of its own.
        assert!(!a.take_shared(&board, now, unix));
        assert!(b.take_shared(&board, now, unix));
        assert_eq!((b.current(), b.failures()), (1, vec![0, 0, 0]));
        assert!(b.is_down(0) && !b.may_try(0, now));
        assert!(b.to_share(now, unix).is_empty(), "what B took over is not reported back");
        // Taken over once: B's own later view is not overridden by the same report.
        b.answered(1, now);
        assert!(!b.take_shared(&board, now, unix));
        // A report that node 0 answers again brings B back to it, the list's first.
        board[0] = SharedNode { generation: 2, down_until: 0 };
        assert!(b.take_shared(&board, now, unix));
        assert_eq!(b.current(), 0);
        assert!(!b.is_down(0));
        // A report whose probe time already passed says nothing new.
        let mut c = Failover::new(2);
        board[0] = SharedNode { generation: 3, down_until: unix - 1 };
        assert!(!c.take_shared(&board, now, unix));
        assert_eq!(c.current(), 0);
    }

    #[test]
    fn one_or_several_endpoints_are_read_from_the_setting() {
        assert_eq!(parse_api_urls("http://a:8000/api").unwrap(), vec!["http://a:8000/api"]);
        assert_eq!(
            parse_api_urls(" http://a:8000/api ,http://b/api").unwrap(),
            vec!["http://a:8000/api", "http://b/api"]
        );
        for (bad, why) in [
            ("", "is empty"),
            ("http://a/api,", "empty entry"),
            ("http://a/api,,http://b/api", "empty entry"),
            ("http://a/api, ftp://b", "must start with http"),
            ("http://a/api, http://A/api/", "twice"),
            ("https://a/api, http://b/api", "mixes https and http"),
            ("http://evil.example\\@good.example/api", "backslash"),
            ("http://evil.example\\x/api", "backslash"),
        ] {
            assert!(parse_api_urls(bad).unwrap_err().contains(why), "{bad:?}: {:?}", parse_api_urls(bad));
        }
        // A credential is refused without being repeated (the error goes to the server log).
        for setting in
            ["http://a/api, http://user:s3cret,pw@b/api", "http://user:s3cret", "http://a/api,http://user:s3cret@a/api"]
        {
            let error = parse_api_urls(setting).unwrap_err();
            assert!(error.starts_with("centrifugo.api_url") && !error.contains("s3cret"), "{error}");
        }
        // Accepted as 0.3.0 accepted it (basic auth for a proxy), never shown.
        assert_eq!(parse_api_urls("http://user:pw@b/api").unwrap(), vec!["http://user:pw@b/api"]);
        assert_ne!(list_id(&["http://a".into(), "http://b".into()]), list_id(&["http://b".into(), "http://a".into()]));
        let nine = (0..9).map(|i| format!("http://n{i}/api")).collect::<Vec<_>>().join(",");
        assert!(parse_api_urls(&nine).unwrap_err().contains("at most 8"));
    }

    #[test]
    fn shown_urls_have_no_credentials() {
        assert_eq!(display_url("http://user:pw@a:8000/api"), "http://a:8000/api");
        assert_eq!(display_url("https://a/api?x=@y"), "https://a/api?x=@y");
        assert_eq!(display_url("http://a/api"), "http://a/api");
    }

    #[test]
    fn node_failures_are_transport_errors_and_5xx_only() {
        let http = |status| Response::Http { status, body: vec![] };
        let transport = |m: &str| Response::Transport(m.into());
        assert_eq!(node_failure(&transport("connect failed: connection refused")), Some(NodeFailure::NotReached));
        assert_eq!(node_failure(&transport("timeout")), Some(NodeFailure::Unknown));
        assert_eq!(node_failure(&transport("request failed: connection reset")), Some(NodeFailure::Unknown));
        assert_eq!(node_failure(&transport(crate::dispatch::STOPPING)), None);
        for status in [500, 502, 503, 504] {
            assert_eq!(node_failure(&http(status)), Some(NodeFailure::Unknown), "{status}");
        }
        // A node that answers but refuses is misconfigured: another node would hide that.
        for status in [200, 400, 401, 403, 404, 413] {
            assert_eq!(node_failure(&http(status)), None, "{status}");
        }
    }

    #[test]
    fn a_failed_node_is_left_for_the_next_and_probed_before_going_back() {
        let t0 = Instant::now();
        let mut f = Failover::new(3);
        assert_eq!(f.failed(0, t0), 1);
        assert_eq!(f.probe_due(t0), None, "not before the first probe interval");
        assert_eq!(f.probe_due(t0 + PROBE_FIRST), Some(0));
        // Still down: the next probe waits twice as long.
        assert!(!f.probed(0, false, t0 + PROBE_FIRST));
        assert_eq!(f.current(), 1);
        assert_eq!(f.probe_due(t0 + PROBE_FIRST * 2), None);
        assert_eq!(f.probe_due(t0 + PROBE_FIRST * 3), Some(0));
        assert!(f.probed(0, true, t0 + PROBE_FIRST * 3));
        assert_eq!(f.current(), 0);
        assert_eq!(f.failures(), vec![1, 0, 0]);
    }

    #[test]
    fn with_every_node_down_each_is_tried_in_turn() {
        let t0 = Instant::now();
        let mut f = Failover::new(2);
        assert_eq!(f.failed(0, t0), 1);
        assert_eq!(f.failed(1, t0), 0);
        assert_eq!(f.failed(0, t0), 1);
        assert_eq!(f.failures(), vec![2, 1]);
        // Node 1 answers: it is up, and nothing earlier in the list is due yet.
        f.answered(1, t0);
        assert_eq!(f.current(), 1);
        assert_eq!(f.probe_due(t0 + PROBE_MAX), Some(0));
    }

    #[test]
    fn a_later_node_failing_skips_nodes_known_down() {
        let t0 = Instant::now();
        let mut f = Failover::new(3);
        assert_eq!(f.failed(0, t0), 1);
        assert_eq!(f.failed(1, t0), 2, "node 0 is down: skipped");
        // Only a node earlier than the one in use is probed; the nearest first.
        assert_eq!(f.probe_due(t0 + PROBE_FIRST), Some(0));
        assert!(f.probed(0, true, t0 + PROBE_FIRST));
        assert_eq!(f.current(), 0);
    }

    #[test]
    fn a_down_node_that_fails_again_as_a_fallback_waits_again() {
        let t0 = Instant::now();
        let mut f = Failover::new(2);
        f.failed(0, t0);
        f.failed(1, t0);
        // Node 1's wait is over: a request may go there as a fallback, and fails (it hangs).
        let later = t0 + PROBE_FIRST;
        assert!(f.may_try(1, later));
        f.failed(1, later);
        // Not again at once: the next fallback would wait a full timeout on it too.
        assert!(!f.may_try(1, later));
        assert!(f.may_try(1, later + PROBE_FIRST * 2));
    }

    #[test]
    fn probes_back_off_to_the_maximum() {
        let t0 = Instant::now();
        let mut f = Failover::new(2);
        f.failed(0, t0);
        let mut now = t0;
        for _ in 0..10 {
            now += PROBE_MAX;
            assert_eq!(f.probe_due(now), Some(0));
            f.probed(0, false, now);
        }
        assert_eq!(f.probe_due(now + PROBE_MAX - Duration::from_millis(1)), None);
        assert_eq!(f.probe_due(now + PROBE_MAX), Some(0));
    }

    /// Found by review: a node that answers the probe but fails real requests was taken back
    /// every 0.5 s; each failure soon after being taken back now doubles the wait.
    #[test]
    fn a_node_that_fails_again_soon_after_its_return_is_probed_less_and_less() {
        let mut now = Instant::now();
        let mut f = Failover::new(2);
        let mut waits = Vec::new();
        for _ in 0..6 {
            f.failed(0, now);
            let due = (1..=100).map(|k| now + PROBE_FIRST / 10 * k).find(|&t| f.probe_due(t).is_some()).unwrap();
            waits.push(due - now);
            now = due;
            assert!(f.probed(0, true, now));
            f.answered(0, now);
        }
        assert_eq!(waits, [PROBE_FIRST, PROBE_FIRST * 2, PROBE_FIRST * 4, PROBE_FIRST * 8, PROBE_MAX, PROBE_MAX]);
        // Serving requests for PROBE_MAX forgives it.
        f.answered(0, now + PROBE_MAX);
        f.failed(0, now + PROBE_MAX);
        assert_eq!(f.probe_due(now + PROBE_MAX + PROBE_FIRST), Some(0));
    }

    /// Found by review: a probe answered after the node was taken back by other means marked
    /// the node in use as down.
    #[test]
    fn a_stale_probe_changes_nothing() {
        let t0 = Instant::now();
        let mut f = Failover::new(2);
        f.failed(0, t0);
        f.failed(1, t0); // every node down: back to 0
        assert_eq!(f.current(), 0);
        f.answered(0, t0);
        assert!(!f.probed(0, false, t0 + PROBE_FIRST));
        assert!(!f.is_down(0));
    }

    #[test]
    fn a_single_endpoint_counts_failures_and_stays() {
        let mut f = Failover::new(1);
        assert_eq!(f.failed(0, Instant::now()), 0);
        assert_eq!(f.failures(), vec![1]);
        assert_eq!(f.probe_due(Instant::now() + PROBE_MAX), None);
    }
}
