//! The commit → acknowledgement latency histogram kept per worker in shared memory: fixed
//! buckets, cumulative counts, rendered as JSON for the status views.

/// Upper bounds of the buckets in milliseconds; one more bucket counts everything above.
pub const LATENCY_BOUNDS_MS: [u32; 11] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000];
pub const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// The bucket a latency falls in.
pub fn bucket(latency_ms: f64) -> usize {
    LATENCY_BOUNDS_MS.iter().position(|b| latency_ms <= f64::from(*b)).unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// `{"le_1ms": n, ..., "le_5000ms": n, "over_5000ms": n}`, counts per bucket (not cumulative).
pub fn to_json(counts: &[u64; BUCKETS]) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (i, bound) in LATENCY_BOUNDS_MS.iter().enumerate() {
        map.insert(format!("le_{bound}ms"), counts[i].into());
    }
    map.insert(format!("over_{}ms", LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1]), counts[BUCKETS - 1].into());
    serde_json::Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_json() {
        assert_eq!(bucket(0.2), 0);
        assert_eq!(bucket(1.0), 0);
        assert_eq!(bucket(1.5), 1);
        assert_eq!(bucket(5000.0), 10);
        assert_eq!(bucket(9999.0), 11);
        let mut counts = [0u64; BUCKETS];
        counts[bucket(3.0)] += 2;
        counts[bucket(60_000.0)] += 1;
        let j = to_json(&counts);
        assert_eq!(j["le_5ms"], 2);
        assert_eq!(j["over_5000ms"], 1);
        assert_eq!(j.as_object().unwrap().len(), BUCKETS);
    }
}
