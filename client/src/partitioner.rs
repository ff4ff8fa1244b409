//! Choosing a partition for a keyed record, exactly as Apache Kafka's default partitioner does:
//! `(murmur2(key) & 0x7fffffff) % partition_count`. Same key, same partition, always, and the
//! same partition a Kafka client would choose, so both kinds of producer can share a topic.

/// Kafka's 32-bit murmur2 hash (seed `0x9747b28c`), as `org.apache.kafka.common.utils.Utils`.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = 0x9747_b28c ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a record with this key in a topic of `partition_count` partitions.
///
/// # Panics
///
/// If `partition_count` is 0 (a topic always has at least one partition).
pub fn partition_for_key(key: &[u8], partition_count: u32) -> u32 {
    assert!(partition_count > 0);
    ((murmur2(key) & 0x7fff_ffff) as u32) % partition_count
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards compatibility with Kafka clients: the vectors of Kafka's own `UtilsTest`.
    #[test]
    fn murmur2_matches_kafka() {
        let check = |data: &[u8], want: i32| {
            assert_eq!(murmur2(data), want, "{:?}", String::from_utf8_lossy(data))
        };
        check(b"21", -973_932_308);
        check(b"foobar", -790_332_482);
        check(b"a-little-bit-long-string", -985_981_536);
        check(b"a-little-bit-longer-string", -1_486_304_829);
        check(
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        );
        check(b"abc", 479_470_107);
    }

    #[test]
    fn same_key_same_partition_and_spread() {
        let mut seen = [0u32; 8];
        for i in 0..1000 {
            let key = format!("job-{i}");
            let p = partition_for_key(key.as_bytes(), 8);
            assert_eq!(p, partition_for_key(key.as_bytes(), 8));
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
