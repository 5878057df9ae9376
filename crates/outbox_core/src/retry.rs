//! Retry policy after a temporary failure: capped exponential backoff with jitter, forever (a
//! committed command is never given up on because Centrifugo is down).

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (1 = first retry): `base * 2^(attempt-1)` capped at
    /// `max`, then scaled into [50%, 100%] by `jitter` (a number in [0, 1)), so that partitions
    /// retrying together spread out.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let full = self.base.saturating_mul(1u32 << exp.min(31)).min(self.max);
        full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// A small, fast generator for jitter (not for anything secret).
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Jitter(seed | 1)
    }

    /// A number in [0, 1).
    pub fn next_fraction(&mut self) -> f64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_with_jitter_in_range() {
        let b = Backoff { base: Duration::from_millis(10), max: Duration::from_secs(5) };
        assert!(b.delay(1, 0.999) <= Duration::from_millis(10) && b.delay(1, 0.999) > Duration::from_millis(9));
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(5));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(20));
        assert_eq!(b.delay(40, 0.0), Duration::from_millis(2500));
        assert!(b.delay(1000, 0.999) <= Duration::from_secs(5));
        let mut j = Jitter::new(42);
        for _ in 0..1000 {
            let x = j.next_fraction();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
