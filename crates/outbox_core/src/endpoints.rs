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

/// The first probe of a failed node comes this long after its failure; each probe it fails
/// doubles the wait, up to [`PROBE_MAX`].
pub const PROBE_FIRST: Duration = Duration::from_millis(500);
pub const PROBE_MAX: Duration = Duration::from_secs(5);

/// The endpoints of `centrifugo.api_url`: one URL, or several separated by commas (spaces
/// around them are ignored). Each is an http(s) base URL with a host; none may repeat.
pub fn parse_api_urls(setting: &str) -> Result<Vec<String>, String> {
    let mut urls: Vec<String> = Vec::new();
    for entry in setting.split(',') {
        let url = entry.trim();
        if url.is_empty() {
            return Err(if setting.trim().is_empty() {
                "centrifugo.api_url is empty".to_owned()
            } else {
                format!("centrifugo.api_url \"{setting}\" has an empty entry in its comma-separated list")
            });
        }
        crate::settings::validate_api_url(url)?;
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

fn same_endpoint(a: &str, b: &str) -> bool {
    a.trim_end_matches('/').eq_ignore_ascii_case(b.trim_end_matches('/'))
}

/// `url` as logs and status views show it: without any `user:password@`.
pub fn display_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// True when `response` says the node itself is unwell (no HTTP answer, or a 5xx), so another
/// node may take the request. A stopping worker's abandoned wait is not the node's fault.
pub fn is_node_failure(response: &Response) -> bool {
    match response {
        Response::Transport(message) => message != crate::client::STOPPING,
        Response::Http { status, .. } => *status >= 500,
    }
}

#[derive(Debug, Clone, Default)]
struct Health {
    /// Requests that failed at this endpoint (probes not counted).
    failures: u64,
    /// Set while the endpoint is believed down: when to probe it next, and the probes it failed.
    down: Option<(Instant, u32)>,
}

/// Which endpoint a worker uses, and what it knows of the others.
#[derive(Debug, Clone)]
pub struct Failover {
    health: Vec<Health>,
    current: usize,
}

impl Failover {
    pub fn new(endpoints: usize) -> Self {
        Failover { health: vec![Health::default(); endpoints.max(1)], current: 0 }
    }

    /// The endpoint requests go to now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Failed requests per endpoint, in list order.
    pub fn failures(&self) -> Vec<u64> {
        self.health.iter().map(|h| h.failures).collect()
    }

    /// A request to `endpoint` failed as a node failure: counts it, marks the node down and
    /// returns the endpoint to use from now on: the next one in the list believed up, else
    /// simply the next one (when all are down, each is tried in turn).
    pub fn failed(&mut self, endpoint: usize, now: Instant) -> usize {
        let n = self.health.len();
        let health = &mut self.health[endpoint];
        health.failures += 1;
        if health.down.is_none() {
            health.down = Some((now + PROBE_FIRST, 0));
        }
        if endpoint == self.current && n > 1 {
            let next = (1..n).map(|k| (endpoint + k) % n);
            self.current = next.clone().find(|&i| self.health[i].down.is_none()).unwrap_or((endpoint + 1) % n);
        }
        self.current
    }

    /// `endpoint` answered a request (whatever the answer): it is up.
    pub fn answered(&mut self, endpoint: usize) {
        self.health[endpoint].down = None;
    }

    /// A node earlier in the list than the one in use, due for a probe now.
    pub fn probe_due(&self, now: Instant) -> Option<usize> {
        (0..self.current).find(|&i| self.health[i].down.is_some_and(|(at, _)| at <= now))
    }

    /// The probe of `endpoint` came back: a healthy node earlier in the list is used again
    /// (returns true when that switched the endpoint in use); an unhealthy one is probed later.
    pub fn probed(&mut self, endpoint: usize, healthy: bool, now: Instant) -> bool {
        let health = &mut self.health[endpoint];
        if healthy {
            health.down = None;
            if endpoint < self.current {
                self.current = endpoint;
                return true;
            }
        } else {
            let probes = health.down.map_or(0, |(_, p)| p) + 1;
            let wait = PROBE_FIRST.saturating_mul(1 << probes.min(16)).min(PROBE_MAX);
            health.down = Some((now + wait, probes));
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_or_several_endpoints_are_read_from_the_setting() {
        assert_eq!(parse_api_urls("http://a:8000/api").unwrap(), vec!["http://a:8000/api"]);
        assert_eq!(
            parse_api_urls(" http://a:8000/api ,https://b/api").unwrap(),
            vec!["http://a:8000/api", "https://b/api"]
        );
        for (bad, why) in [
            ("", "is empty"),
            ("http://a/api,", "empty entry"),
            ("http://a/api,,http://b/api", "empty entry"),
            ("http://a/api, ftp://b", "must start with http"),
            ("http://a/api, http://A/api/", "twice"),
        ] {
            assert!(parse_api_urls(bad).unwrap_err().contains(why), "{bad:?}");
        }
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
        assert!(is_node_failure(&Response::Transport("connect failed".into())));
        assert!(!is_node_failure(&Response::Transport(crate::client::STOPPING.into())));
        for status in [500, 502, 503, 504] {
            assert!(is_node_failure(&http(status)), "{status}");
        }
        // A node that answers but refuses is misconfigured: another node would hide that.
        for status in [200, 400, 401, 403, 404, 413] {
            assert!(!is_node_failure(&http(status)), "{status}");
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
        f.answered(1);
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

    #[test]
    fn a_single_endpoint_counts_failures_and_stays() {
        let mut f = Failover::new(1);
        assert_eq!(f.failed(0, Instant::now()), 0);
        assert_eq!(f.failures(), vec![1]);
        assert_eq!(f.probe_due(Instant::now() + PROBE_MAX), None);
    }
}
