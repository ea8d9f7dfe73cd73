//! Shard routing: which table shard holds a user's orders.
//!
//! Invariants:
//! - The *gene* of a user is the low [`GENE_BITS`] bits of a strong 64-bit mix of the user id,
//!   never `user_id mod N`: sequential or snowflake-like user ids would otherwise pile onto a
//!   few shards.
//! - An order id carries its user's gene, so the shard of an order is a function of the id
//!   alone, and all of one user's orders sit in one shard.
//! - With `N` shards (a power of two, at most 1024) the shard is `gene & (N - 1)`. Moving from
//!   `N` to `2N` shards splits shard `s` into `s` and `s + N`; no id changes.

use std::fmt;

use super::ids::UserId;

/// Bits of a user's hash that every order id carries. 2^10 = 1024 is the most shards we
/// can ever split into without new ids.
pub const GENE_BITS: u32 = 10;
pub const MAX_SHARDS: u32 = 1 << GENE_BITS;

/// The 10 shard bits of a user (0..1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gene(u16);

impl Gene {
    pub fn of_user(user: UserId) -> Self {
        Gene((mix64(user.get() as u64) & u64::from(MAX_SHARDS - 1)) as u16)
    }

    /// A gene from its 10 bits, `None` if out of range.
    pub fn new(bits: u16) -> Option<Self> {
        (u32::from(bits) < MAX_SHARDS).then_some(Gene(bits))
    }

    /// Keeps the low 10 bits (ids decode genes with this).
    pub(crate) fn from_bits(bits: u64) -> Self {
        Gene((bits & u64::from(MAX_SHARDS - 1)) as u16)
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

/// The SplitMix64 / MurmurHash3 finalizer: a bijective mix whose every output bit depends on
/// every input bit, so the low bits are uniform even for sequential inputs.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The number of table shards: a power of two from 1 to 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardCount(u32);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("shard count must be a power of two between 1 and {MAX_SHARDS}, got {0}")]
pub struct InvalidShardCount(pub u32);

impl ShardCount {
    pub fn new(n: u32) -> Result<Self, InvalidShardCount> {
        if n == 0 || n > MAX_SHARDS || !n.is_power_of_two() {
            return Err(InvalidShardCount(n));
        }
        Ok(ShardCount(n))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    pub fn shard_of_gene(self, gene: Gene) -> ShardIndex {
        ShardIndex((u32::from(gene.get()) & (self.0 - 1)) as u16)
    }

    pub fn shard_of_user(self, user: UserId) -> ShardIndex {
        self.shard_of_gene(Gene::of_user(user))
    }

    pub fn all(self) -> impl Iterator<Item = ShardIndex> {
        (0..self.0).map(|i| ShardIndex(i as u16))
    }
}

/// One table shard (`orders_NN` …). Only [`ShardCount`] builds these, so an index is always
/// in range for the configured count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardIndex(u16);

impl ShardIndex {
    pub fn get(self) -> u16 {
        self.0
    }

    /// Table-name suffix: at least two digits (`orders_07`), four for more than 100 shards.
    pub fn suffix(self) -> String {
        format!("{:02}", self.0)
    }
}

impl fmt::Display for ShardIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_count_accepts_only_powers_of_two_up_to_1024() {
        for n in [1, 2, 32, 1024] {
            assert!(ShardCount::new(n).is_ok(), "{n}");
        }
        for n in [0, 3, 48, 2048] {
            assert_eq!(ShardCount::new(n), Err(InvalidShardCount(n)));
        }
    }

    #[test]
    fn doubling_shards_splits_each_shard_in_two() {
        let n = ShardCount::new(32).unwrap();
        let n2 = ShardCount::new(64).unwrap();
        for u in 1..5000 {
            let user = UserId::new(u).unwrap();
            let a = n.shard_of_user(user).get();
            let b = n2.shard_of_user(user).get();
            assert!(b == a || b == a + 32, "user {u}: {a} -> {b}");
        }
    }

    fn assert_uniform(users: impl Iterator<Item = i64>, count: usize) {
        let shards = ShardCount::new(32).unwrap();
        let mut hist = [0usize; 32];
        for u in users {
            hist[shards.shard_of_user(UserId::new(u).unwrap()).get() as usize] += 1;
        }
        let expected = count as f64 / 32.0;
        for (i, &h) in hist.iter().enumerate() {
            let dev = (h as f64 - expected).abs() / expected;
            assert!(dev <= 0.10, "shard {i} has {h} users, expected ~{expected}");
        }
    }

    #[test]
    fn shards_are_uniform_over_sequential_user_ids() {
        assert_uniform(1..=1_000_000, 1_000_000);
    }

    #[test]
    fn shards_are_uniform_over_snowflake_like_user_ids() {
        // Snowflake-style ids: ms timestamp << 22 | worker << 12 | sequence. Low bits are
        // mostly zero, which is exactly what breaks `user_id mod N`.
        let ids = (0..1_000_000i64).map(|i| {
            let ms = 1_700_000_000_000i64 + i / 4;
            let worker = (i % 4) * 7;
            (ms << 22) | (worker << 12)
        });
        assert_uniform(ids, 1_000_000);
    }

    #[test]
    fn mod_n_would_not_be_uniform_over_snowflake_ids() {
        // Guard that the previous test is a real test: the naive routing fails it.
        let ids: Vec<i64> = (0..10_000i64).map(|i| (1_700_000_000_000i64 + i) << 22).collect();
        let distinct: std::collections::HashSet<i64> = ids.iter().map(|u| u % 32).collect();
        assert_eq!(distinct.len(), 1);
    }
}
