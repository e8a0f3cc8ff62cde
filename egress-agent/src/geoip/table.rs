//! Converting merged ranges into the dataplane's flat country tables (one
//! generation's worth, laid out as `egress_common::geo` describes), and
//! looking addresses up in them with the code the kernel runs.

use std::{net::IpAddr, time::Instant};

use egress_common::geo::{
    self, BLOCK_WORDS_PER_GEN, BLOCKS_PER_WORD, Bucket6, GEO6_MAX_STEPS, Range6, SPLIT, SplitBlock,
    V6_BUCKETS,
};

use super::{
    error::GeoError,
    merge::{Merged, prefix_count},
    source::Span,
};

/// What a database became, for the load report.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TableStats {
    /// Merged ranges with a known country.
    pub v4_ranges: usize,
    pub v6_ranges: usize,
    /// CIDR prefixes those ranges make (what LPM tries would hold).
    pub v4_prefixes: u64,
    pub v6_prefixes: u64,
    /// /24 blocks holding several countries.
    pub split_blocks: usize,
    /// Entries of the IPv6 range table (ranges, gaps, bucket starts).
    pub v6_table_ranges: usize,
    /// Bytes of one generation of the tables.
    pub bytes: usize,
    /// Reading the files (set by `geoip::load`).
    pub parse_ms: f64,
    /// Merging and building the tables.
    pub build_ms: f64,
}

/// One generation of the country tables, ready to be written.
#[derive(Clone, Debug, PartialEq)]
pub struct GeoTables {
    /// One byte per /24 block, eight to an element (`BLOCK_WORDS_PER_GEN`).
    pub blocks: Vec<u64>,
    /// Blocks holding `SPLIT`, by block number (address >> 8), ascending.
    pub splits: Vec<(u32, SplitBlock)>,
    /// `V6_BUCKETS` buckets; `first` indexes `ranges6` (the writer adds the
    /// generation's base).
    pub buckets: Vec<Bucket6>,
    pub ranges6: Vec<Range6>,
    pub stats: TableStats,
}

/// The ranges of an IPv6 bucket must fit the kernel's bounded search.
const MAX_BUCKET_RANGES: usize = 1 << GEO6_MAX_STEPS;
/// Addresses per IPv6 bucket: bucket `b` is `b::/16`.
const BUCKET_SHIFT: u32 = 112;

impl GeoTables {
    /// Every address unknown.
    pub fn empty() -> Self {
        Self::build(&Merged::default()).expect("an empty table fits")
    }

    pub fn build(merged: &Merged) -> Result<Self, GeoError> {
        let start = Instant::now();
        let (blocks, splits) = build_v4(&merged.v4);
        let (buckets, ranges6) = build_v6(&merged.v6)?;
        let known4 = merged.v4.iter().filter(|s| s.country != 0);
        let known6 = merged.v6.iter().filter(|s| s.country != 0);
        let stats = TableStats {
            v4_ranges: known4.clone().count(),
            v6_ranges: known6.clone().count(),
            v4_prefixes: known4.map(prefix_count).sum(),
            v6_prefixes: known6.map(prefix_count).sum(),
            split_blocks: splits.len(),
            v6_table_ranges: ranges6.len(),
            bytes: blocks.len() * size_of::<u64>()
                + splits.len() * size_of::<SplitBlock>()
                + buckets.len() * size_of::<Bucket6>()
                + ranges6.len() * size_of::<Range6>(),
            parse_ms: 0.0,
            build_ms: start.elapsed().as_secs_f64() * 1e3,
        };
        Ok(Self {
            blocks,
            splits,
            buckets,
            ranges6,
            stats,
        })
    }

    /// The country id of `addr` as the dataplane finds it: the shared
    /// `country4`/`country6` over these tables as generation 0.
    pub fn lookup(&self, addr: IpAddr) -> u8 {
        let country = match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                geo::country4(
                    0,
                    a,
                    |i| self.blocks.get(i as usize).copied(),
                    |key| {
                        self.splits
                            .binary_search_by_key(&key, |(block, _)| *block)
                            .ok()
                            .map(|i| self.splits[i].1.country(a))
                    },
                )
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                let (hi, lo) = ((a >> 64) as u64, a as u64);
                let Some(&bucket) = self.buckets.get(geo::bucket6_index(0, hi) as usize) else {
                    return 0;
                };
                geo::country6(bucket, hi, lo, |i| self.ranges6.get(i as usize).copied())
            }
        };
        country as u8
    }
}

/// Set block `block`'s byte.
fn set_block(words: &mut [u64], block: u32, country: u8) {
    let (word, shift) = (
        (block / BLOCKS_PER_WORD) as usize,
        (block % BLOCKS_PER_WORD) * 8,
    );
    words[word] = (words[word] & !(0xff << shift)) | (u64::from(country) << shift);
}

/// Set blocks `from..=to`, whole elements at a time where possible.
fn fill_blocks(words: &mut [u64], from: u32, to: u32, country: u8) {
    let mut block = from;
    while block <= to && !block.is_multiple_of(BLOCKS_PER_WORD) {
        set_block(words, block, country);
        block += 1;
    }
    let whole = u64::from(country) * 0x0101_0101_0101_0101;
    while block + BLOCKS_PER_WORD - 1 <= to {
        words[(block / BLOCKS_PER_WORD) as usize] = whole;
        block += BLOCKS_PER_WORD;
    }
    while block <= to {
        set_block(words, block, country);
        block += 1;
    }
}

/// The split block `block`, added if it is not the last one yet (ranges
/// arrive in address order, so blocks do too).
fn split_of(splits: &mut Vec<(u32, SplitBlock)>, block: u32) -> &mut SplitBlock {
    if splits.last().is_none_or(|(b, _)| *b != block) {
        splits.push((block, SplitBlock::default()));
    }
    &mut splits.last_mut().expect("just pushed").1
}

fn set_hosts(split: &mut SplitBlock, from: u32, to: u32, country: u8) {
    for host in from..=to {
        split.set(host as u8, country);
    }
}

/// The /24 block table and the split blocks. A block partly covered is a
/// split block: merged neighbours differ in country (or one is a gap), so
/// it really holds several answers.
fn build_v4(spans: &[Span<u32>]) -> (Vec<u64>, Vec<(u32, SplitBlock)>) {
    let mut words = vec![0u64; BLOCK_WORDS_PER_GEN as usize];
    let mut splits: Vec<(u32, SplitBlock)> = Vec::new();
    for span in spans.iter().filter(|s| s.country != 0) {
        let (first_block, last_block) = (span.first >> 8, span.last >> 8);
        let (first_host, last_host) = (span.first & 0xff, span.last & 0xff);
        if first_block == last_block {
            if first_host == 0 && last_host == 0xff {
                set_block(&mut words, first_block, span.country);
            } else {
                set_hosts(
                    split_of(&mut splits, first_block),
                    first_host,
                    last_host,
                    span.country,
                );
            }
            continue;
        }
        let mut from = first_block;
        if first_host != 0 {
            set_hosts(
                split_of(&mut splits, first_block),
                first_host,
                0xff,
                span.country,
            );
            from += 1;
        }
        let mut to = last_block;
        if last_host != 0xff {
            to -= 1;
        }
        if from <= to {
            fill_blocks(&mut words, from, to, span.country);
        }
        if last_host != 0xff {
            set_hosts(
                split_of(&mut splits, last_block),
                0,
                last_host,
                span.country,
            );
        }
    }
    for (block, _) in &splits {
        set_block(&mut words, *block, SPLIT);
    }
    (words, splits)
}

fn range6(start: u128, country: u8) -> Range6 {
    Range6 {
        start_hi: (start >> 64) as u64,
        start_lo: start as u64,
        country: u32::from(country),
        _reserved: 0,
    }
}

/// The bucket table and the range table. The space is first cut into
/// consecutive pieces (gaps are country 0), each given by its start; a
/// bucket whose /16 one piece covers holds that piece's country, any other
/// lists the pieces starting in it, led by one starting at the bucket's
/// first address.
fn build_v6(spans: &[Span<u128>]) -> Result<(Vec<Bucket6>, Vec<Range6>), GeoError> {
    let mut starts: Vec<(u128, u8)> = Vec::with_capacity(2 * spans.len() + 1);
    let mut push = |start: u128, country: u8| {
        if starts.last().is_none_or(|&(_, c)| c != country) {
            starts.push((start, country));
        }
    };
    let mut cursor = Some(0u128);
    for span in spans.iter().filter(|s| s.country != 0) {
        let Some(at) = cursor else { break };
        if span.first > at {
            push(at, 0);
        }
        push(span.first, span.country);
        cursor = span.last.checked_add(1);
    }
    if let Some(at) = cursor {
        push(at, 0);
    }

    let mut buckets = Vec::with_capacity(V6_BUCKETS as usize);
    let mut ranges = Vec::with_capacity(starts.len() + 1024);
    // `covering` is the piece holding the current bucket's first address.
    let mut covering = 0;
    for bucket in 0..V6_BUCKETS {
        let first_addr = u128::from(bucket) << BUCKET_SHIFT;
        while covering + 1 < starts.len() && starts[covering + 1].0 <= first_addr {
            covering += 1;
        }
        let mut end = covering + 1;
        while end < starts.len() && (starts[end].0 >> BUCKET_SHIFT) as u32 == bucket {
            end += 1;
        }
        let count = end - covering;
        if count == 1 {
            buckets.push(Bucket6 {
                first: u32::from(starts[covering].1),
                count: 0,
            });
            continue;
        }
        if count > MAX_BUCKET_RANGES {
            return Err(GeoError::BucketTooLarge {
                bucket,
                ranges: count,
                max: MAX_BUCKET_RANGES,
            });
        }
        buckets.push(Bucket6 {
            first: ranges.len() as u32,
            count: count as u32,
        });
        ranges.push(range6(first_addr, starts[covering].1));
        ranges.extend(starts[covering + 1..end].iter().map(|&(s, c)| range6(s, c)));
        covering = end - 1;
    }
    Ok((buckets, ranges))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::geoip::source::Ranges;

    fn v4(first: &str, last: &str, country: u8) -> Span<u32> {
        Span {
            first: first.parse::<std::net::Ipv4Addr>().unwrap().into(),
            last: last.parse::<std::net::Ipv4Addr>().unwrap().into(),
            country,
        }
    }

    fn v6(first: &str, last: &str, country: u8) -> Span<u128> {
        Span {
            first: first.parse::<std::net::Ipv6Addr>().unwrap().into(),
            last: last.parse::<std::net::Ipv6Addr>().unwrap().into(),
            country,
        }
    }

    fn tables(v4: Vec<Span<u32>>, v6: Vec<Span<u128>>) -> (Merged, GeoTables) {
        let merged = Merged::new([&Ranges { v4, v6 }]);
        let tables = GeoTables::build(&merged).unwrap();
        (merged, tables)
    }

    fn at(tables: &GeoTables, addr: &str) -> u8 {
        tables.lookup(addr.parse().unwrap())
    }

    #[test]
    fn geoip_table_empty_every_address_unknown() {
        let t = GeoTables::empty();
        for a in [
            "0.0.0.0",
            "8.8.8.8",
            "255.255.255.255",
            "::",
            "2001:db8::1",
            "ffff::1",
        ] {
            assert_eq!(at(&t, a), 0, "{a} is unknown in an empty table");
        }
        assert_eq!(t.buckets.len(), V6_BUCKETS as usize, "every bucket exists");
        assert!(t.ranges6.is_empty(), "no bucket needs a range");
    }

    #[test]
    fn geoip_table_whole_blocks_no_split() {
        let (_, t) = tables(vec![v4("10.0.0.0", "10.0.7.255", 5)], vec![]);
        assert!(t.splits.is_empty(), "aligned /24s need no split block");
        assert_eq!(at(&t, "10.0.0.0"), 5);
        assert_eq!(at(&t, "10.0.7.255"), 5);
        assert_eq!(at(&t, "10.0.8.0"), 0, "the gap after the range is unknown");
        assert_eq!(
            at(&t, "9.255.255.255"),
            0,
            "the gap before the range is unknown"
        );
    }

    #[test]
    fn geoip_table_partial_blocks_become_split_blocks() {
        let (_, t) = tables(
            vec![
                v4("10.0.0.128", "10.0.2.9", 1),
                v4("10.0.2.10", "10.0.2.10", 2),
                v4("10.0.2.200", "10.0.2.255", 3),
            ],
            vec![],
        );
        let blocks: Vec<u32> = t.splits.iter().map(|(b, _)| *b).collect();
        assert_eq!(
            blocks,
            vec![0x0a0000, 0x0a0002],
            "the head block and the shared tail block are split, the middle one is whole"
        );
        for (addr, want) in [
            ("10.0.0.127", 0),
            ("10.0.0.128", 1),
            ("10.0.1.77", 1),
            ("10.0.2.9", 1),
            ("10.0.2.10", 2),
            ("10.0.2.11", 0),
            ("10.0.2.199", 0),
            ("10.0.2.200", 3),
            ("10.0.2.255", 3),
        ] {
            assert_eq!(at(&t, addr), want, "{addr}");
        }
    }

    #[test]
    fn geoip_table_v6_bucket_boundaries_start_at_bucket_first_address() {
        let (_, t) = tables(
            vec![],
            vec![
                // Crosses from bucket 2001 into 2002 and covers 2003 whole.
                v6("2001:db8::", "2003:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 7),
                v6("2004::1", "2004::1", 8),
            ],
        );
        let b = |hi16: usize| t.buckets[hi16];
        assert_eq!(b(0x2001).count, 2, "a gap then the range");
        assert_eq!(
            b(0x2002),
            Bucket6 { first: 7, count: 0 },
            "a /16 one range covers is one country"
        );
        assert_eq!(b(0x2003), Bucket6 { first: 7, count: 0 });
        assert_eq!(b(0x2004).count, 3, "a gap, the address, a gap");
        for (i, bucket) in t.buckets.iter().enumerate().filter(|(_, b)| b.count > 0) {
            let first = t.ranges6[bucket.first as usize];
            assert_eq!(
                (u128::from(first.start_hi) << 64 | u128::from(first.start_lo)) >> 112,
                i as u128,
                "bucket {i:04x}'s first range starts at its first address"
            );
            assert_eq!(first.start_lo, 0);
            assert_eq!(first.start_hi & 0x0000_ffff_ffff_ffff, 0);
        }
        for (addr, want) in [
            ("2001:db7:ffff::", 0),
            ("2001:db8::", 7),
            ("2002:1234::", 7),
            ("2003:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 7),
            ("2004::", 0),
            ("2004::1", 8),
            ("2004::2", 0),
        ] {
            assert_eq!(at(&t, addr), want, "{addr}");
        }
    }

    #[test]
    fn geoip_table_v6_range_to_end_of_space() {
        let (_, t) = tables(
            vec![],
            vec![v6("ff00::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 9)],
        );
        assert_eq!(at(&t, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), 9);
        assert_eq!(at(&t, "feff::1"), 0);
    }

    #[test]
    fn geoip_table_stats_count_ranges_and_prefixes() {
        let (_, t) = tables(
            vec![v4("1.0.0.1", "1.0.0.6", 1), v4("2.0.0.0", "2.0.0.255", 0)],
            vec![v6("2001:db8::", "2001:db8::ffff", 2)],
        );
        assert_eq!(t.stats.v4_ranges, 1, "unknown-code ranges are not counted");
        assert_eq!(t.stats.v4_prefixes, 4, "/32 /31 /31 /32");
        assert_eq!(t.stats.v6_ranges, 1);
        assert_eq!(t.stats.v6_prefixes, 1);
        assert_eq!(t.stats.split_blocks, 1);
    }

    /// Ranges crowded into a few /24s and /16s, overlapping, so the table
    /// gets split blocks and multi-range buckets.
    fn crowded() -> impl Strategy<Value = (Vec<Span<u32>>, Vec<Span<u128>>)> {
        let v4 = prop::collection::vec((0u32..0x0800, 0u32..600, 0u8..6), 0..60).prop_map(|v| {
            v.into_iter()
                .map(|(start, len, country)| {
                    let first = 0x0a00_0000 + start;
                    Span {
                        first,
                        last: first + len,
                        country,
                    }
                })
                .collect()
        });
        let v6 = prop::collection::vec((0u128..0x30, 0u128..8, any::<u64>(), 0u8..6), 0..60)
            .prop_map(|v| {
                v.into_iter()
                    .map(|(bucket, len, low, country)| {
                        let first = (0x2000 + bucket) << 112 | u128::from(low) << 40;
                        Span {
                            first,
                            last: first.saturating_add(len << 100),
                            country,
                        }
                    })
                    .collect()
            });
        (v4, v6)
    }

    proptest! {
        #[test]
        fn geoip_table_lookup_equals_reference_lookup((v4, v6) in crowded(), probes in prop::collection::vec((0u32..0x0a00, any::<u64>(), 0u128..0x32), 200)) {
            let (merged, t) = tables(v4.clone(), v6.clone());
            let mut addrs: Vec<IpAddr> = Vec::new();
            // Every range edge and its neighbours, plus random addresses.
            for s in &v4 {
                for a in [s.first.wrapping_sub(1), s.first, s.last, s.last.wrapping_add(1)] {
                    addrs.push(IpAddr::from(std::net::Ipv4Addr::from(a)));
                }
            }
            for s in &v6 {
                for a in [s.first.wrapping_sub(1), s.first, s.last, s.last.wrapping_add(1)] {
                    addrs.push(IpAddr::from(std::net::Ipv6Addr::from(a)));
                }
            }
            for (a, low, bucket) in probes {
                addrs.push(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + a)));
                addrs.push(IpAddr::from(std::net::Ipv6Addr::from((0x2000 + bucket) << 112 | u128::from(low) << 40)));
            }
            for addr in addrs {
                prop_assert_eq!(t.lookup(addr), merged.country(addr), "the flat tables must answer as the merged ranges for {}", addr);
            }
        }
    }
}
