//! Which outbox partition a command goes to.
//!
//! Commands of one partition are delivered in order; different partitions are drained in
//! parallel. A `partition_key` (a chat id, a user id, ...) maps to a partition by a stable,
//! documented hash so that every producer, in any language, can compute the same partition:
//!
//! `partition = fnv1a_64(utf8(key)) mod num_partitions`
//!
//! FNV-1a 64-bit: offset basis 0xcbf29ce484222325, prime 0x100000001b3, over the key's UTF-8 bytes.

use crate::error::{CommandError, ErrorClass};

/// Upper bound of `centrifugo.num_partitions` (one background worker each).
pub const MAX_PARTITIONS: i32 = 128;

pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The partition of `key` among `num_partitions` (which must be at least 1).
pub fn partition_for_key(key: &str, num_partitions: i32) -> i32 {
    let n = num_partitions.max(1) as u64;
    (fnv1a_64(key.as_bytes()) % n) as i32
}

/// Picks the partition from an explicit number or a key (not both); default 0.
pub fn choose_partition(
    partition: Option<i32>,
    partition_key: Option<&str>,
    num_partitions: i32,
) -> Result<i32, CommandError> {
    match (partition, partition_key) {
        (Some(_), Some(_)) => Err(CommandError::invalid("give either partition or partition_key, not both")),
        (Some(p), None) => check_partition(p, num_partitions),
        (None, Some(key)) => Ok(partition_for_key(key, num_partitions)),
        (None, None) => Ok(0),
    }
}

pub fn check_partition(partition: i32, num_partitions: i32) -> Result<i32, CommandError> {
    if (0..num_partitions).contains(&partition) {
        Ok(partition)
    } else {
        Err(CommandError::new(
            ErrorClass::OutOfRange,
            format!(
                "partition {partition} is out of range: centrifugo.num_partitions is {num_partitions}, so partitions are 0..{}",
                num_partitions - 1
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_published_vectors() {
        // Test vectors from the FNV reference (draft-eastlake-fnv).
        assert_eq!(fnv1a_64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn keys_spread_and_stay_stable() {
        assert_eq!(partition_for_key("chat:42", 1), 0);
        let p = partition_for_key("chat:42", 8);
        assert_eq!(p, partition_for_key("chat:42", 8));
        let mut seen = [0u32; 4];
        for i in 0..4000 {
            seen[partition_for_key(&format!("user:{i}"), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }

    #[test]
    fn explicit_partition_is_range_checked() {
        assert_eq!(choose_partition(None, None, 4).unwrap(), 0);
        assert_eq!(choose_partition(Some(3), None, 4).unwrap(), 3);
        assert_eq!(choose_partition(Some(4), None, 4).unwrap_err().class, ErrorClass::OutOfRange);
        assert_eq!(choose_partition(Some(-1), None, 4).unwrap_err().class, ErrorClass::OutOfRange);
        assert_eq!(choose_partition(Some(1), Some("k"), 4).unwrap_err().class, ErrorClass::InvalidParameter);
    }
}
