// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Layout of the destination-country tables and the lookup over them.
//!
//! A country database has ~330 000 IPv4 and ~220 000 IPv6 ranges. An LPM
//! trie of that size costs around half a microsecond per lookup, on every
//! new flow, so the agent converts the ranges into flat tables instead:
//!
//! - IPv4, DIR-24-8 style: one byte per /24 block (2^24 bytes, packed eight
//!   to a `u64` array element) holds the block's country id. A block with
//!   several countries holds [`SPLIT`] instead, and a hash map keyed by the
//!   block gives one byte per address. Two array lookups, rarely a third.
//! - IPv6: the ranges (gaps filled with "unknown") sorted by start; a
//!   bucket per top 16 bits of the address narrows the binary search to the
//!   ranges starting in that /16, at most [`GEO6_MAX_STEPS`] probes.
//!
//! Every table exists once per generation, like the policy tables; the
//! agent fills the inactive one and flips [`GEN_SLOT_GEO`] of the
//! generation map, so a reload of the database is one atomic switch.
//! Country ids are those of the policy compiler: 0 is "unknown".

/// Slot of the generation map (`EG_GEN`) holding the active policy generation.
pub const GEN_SLOT_POLICY: u32 = 0;
/// Slot of the generation map holding the active country-table generation.
pub const GEN_SLOT_GEO: u32 = 1;
/// Entries of the generation map.
pub const GEN_SLOTS: u32 = 2;

/// Byte value of a /24 block holding several countries.
pub const SPLIT: u8 = 0xff;
/// /24 blocks packed in one array element of the IPv4 block table.
pub const BLOCKS_PER_WORD: u32 = 8;
/// Elements of the IPv4 block table per generation (2^24 blocks).
pub const BLOCK_WORDS_PER_GEN: u32 = (1 << 24) / BLOCKS_PER_WORD;
/// Default capacity of the split-block map per generation (a full public
/// database splits about 16 000 blocks).
pub const DEFAULT_SPLIT_BLOCKS: u32 = 32_768;
/// Buckets of the IPv6 bucket table per generation (one per top 16 bits).
pub const V6_BUCKETS: u32 = 1 << 16;
/// Default capacity of the IPv6 range table per generation.
pub const DEFAULT_V6_RANGES: u32 = 1 << 19;
/// Binary-search probes bound; a bucket holds at most `2^GEO6_MAX_STEPS`
/// ranges (the agent refuses larger ones).
pub const GEO6_MAX_STEPS: u32 = 20;

/// Index of the block-table element holding the block of `addr` (host order).
#[inline(always)]
pub const fn block_word(generation: u32, addr: u32) -> u32 {
    (generation & 1) * BLOCK_WORDS_PER_GEN + (addr >> 8) / BLOCKS_PER_WORD
}

/// Shift of the block's byte within its element.
#[inline(always)]
pub const fn block_shift(addr: u32) -> u32 {
    ((addr >> 8) % BLOCKS_PER_WORD) * 8
}

/// Key of the split-block map for the block of `addr` (host order).
#[inline(always)]
pub const fn split_key(generation: u32, addr: u32) -> u32 {
    (generation & 1) << 24 | addr >> 8
}

/// One byte per address of a /24 block that holds several countries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplitBlock {
    /// Country id of address `i` of the block in byte `i % 8` (from the
    /// least significant) of element `i / 8`.
    pub words: [u64; 32],
}
const _: () = assert!(size_of::<SplitBlock>() == 256);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for SplitBlock {}

impl SplitBlock {
    #[inline(always)]
    pub fn country(&self, addr: u32) -> u32 {
        let host = (addr & 0xff) as usize;
        ((self.words[(host / 8) & 31] >> ((host % 8) * 8)) & 0xff) as u32
    }

    pub fn set(&mut self, host: u8, country: u8) {
        let (word, shift) = (usize::from(host) / 8, (u32::from(host) % 8) * 8);
        self.words[word] = (self.words[word] & !(0xff << shift)) | (u64::from(country) << shift);
    }
}

/// The IPv6 ranges starting in one /16.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket6 {
    /// Index in the range table (generation base included) of the bucket's
    /// first range, which starts at the bucket's first address; or, when
    /// `count` is 0, the country id of the whole /16.
    pub first: u32,
    pub count: u32,
}
const _: () = assert!(size_of::<Bucket6>() == 8);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for Bucket6 {}

/// An IPv6 range: it runs from its start to the next range's start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range6 {
    /// First address, as two host-order halves.
    pub start_hi: u64,
    pub start_lo: u64,
    pub country: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<Range6>() == 24);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for Range6 {}

/// Index of the bucket table for an address whose upper half is `hi`.
#[inline(always)]
pub const fn bucket6_index(generation: u32, hi: u64) -> u32 {
    (generation & 1) * V6_BUCKETS + (hi >> 48) as u32
}

/// The IPv4 country id of `addr` (host order), given the block table
/// element and a split-block lookup. Shared by the dataplane and the
/// agent's tests so both run exactly this logic.
#[inline(always)]
pub fn country4(
    generation: u32,
    addr: u32,
    block: impl Fn(u32) -> Option<u64>,
    split: impl Fn(u32) -> Option<u32>,
) -> u32 {
    let Some(word) = block(block_word(generation, addr)) else {
        return 0;
    };
    let country = ((word >> block_shift(addr)) & 0xff) as u32;
    if country != u32::from(SPLIT) {
        return country;
    }
    split(split_key(generation, addr)).unwrap_or(0)
}

/// The IPv6 country id of the address `hi:lo`: the country of the last
/// range of its bucket that starts at or before it.
#[inline(always)]
pub fn country6(bucket: Bucket6, hi: u64, lo: u64, range: impl Fn(u32) -> Option<Range6>) -> u32 {
    if bucket.count == 0 {
        return bucket.first;
    }
    // Invariant: the answer is in [base, base + n).
    let mut base = bucket.first;
    let mut n = bucket.count;
    let mut step = 0;
    while n > 1 && step < GEO6_MAX_STEPS {
        let half = n / 2;
        let Some(r) = range(base + half) else {
            return 0;
        };
        if r.start_hi < hi || (r.start_hi == hi && r.start_lo <= lo) {
            base += half;
            n -= half;
        } else {
            n = half;
        }
        step += 1;
    }
    range(base).map_or(0, |r| r.country)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geo_split_block_set_then_read_each_address() {
        let mut b = SplitBlock::default();
        for h in 0..=255u8 {
            b.set(h, h / 2);
        }
        for h in 0..=255u32 {
            assert_eq!(b.country(0x0a00_0000 | h), h / 2, "host {h}");
        }
    }

    #[test]
    fn geo_country6_binary_search_finds_covering_range() {
        let ranges: Vec<Range6> = [(0u64, 0u64, 1u32), (0, 100, 2), (5, 0, 3), (9, 7, 4)]
            .iter()
            .map(|&(h, l, c)| Range6 {
                start_hi: h,
                start_lo: l,
                country: c,
                _reserved: 0,
            })
            .collect();
        let bucket = Bucket6 { first: 0, count: 4 };
        let get = |i: u32| ranges.get(i as usize).copied();
        for (hi, lo, want) in [
            (0, 0, 1),
            (0, 99, 1),
            (0, 100, 2),
            (4, u64::MAX, 2),
            (5, 0, 3),
            (9, 6, 3),
            (9, 7, 4),
            (u64::MAX >> 16, 0, 4),
        ] {
            assert_eq!(country6(bucket, hi, lo, get), want, "{hi}:{lo}");
        }
        assert_eq!(
            country6(Bucket6 { first: 7, count: 0 }, 1, 1, get),
            7,
            "a bucket without ranges is one country"
        );
    }
}
