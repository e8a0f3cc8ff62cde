//! Merging ranges that may overlap into one sorted, disjoint list: where
//! ranges overlap, the one listed later wins (a later line of a file, a
//! later file of `--geoip`), so an override file given last corrects the
//! database before it. The merged list is also the reference lookup the
//! flat tables are tested against.

use std::{collections::BinaryHeap, net::IpAddr};

use super::source::{Ranges, Span};

/// Address types of the two families.
pub trait Addr: Copy + Ord + std::fmt::Debug {
    const MAX: Self;
    const BITS: u32;
    fn next(self) -> Self;
    fn prev(self) -> Self;
    fn to_u128(self) -> u128;
}

impl Addr for u32 {
    const MAX: Self = u32::MAX;
    const BITS: u32 = 32;
    fn next(self) -> Self {
        self + 1
    }
    fn prev(self) -> Self {
        self - 1
    }
    fn to_u128(self) -> u128 {
        u128::from(self)
    }
}

impl Addr for u128 {
    const MAX: Self = u128::MAX;
    const BITS: u32 = 128;
    fn next(self) -> Self {
        self + 1
    }
    fn prev(self) -> Self {
        self - 1
    }
    fn to_u128(self) -> u128 {
        self
    }
}

/// Sorted, disjoint ranges; neighbours that touch have different countries.
/// Ranges of country 0 (a code that is no known country) are kept: they
/// say that a source covered the addresses, without a country.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    pub v4: Vec<Span<u32>>,
    pub v6: Vec<Span<u128>>,
}

impl Merged {
    /// Merge `sources` in order: where ranges overlap, the later one wins.
    pub fn new<'a>(sources: impl IntoIterator<Item = &'a Ranges>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for ranges in sources {
            v4.extend_from_slice(&ranges.v4);
            v6.extend_from_slice(&ranges.v6);
        }
        Self {
            v4: merge(&v4),
            v6: merge(&v6),
        }
    }

    /// The country of `addr`: `None` where no range covers it, `Some(0)`
    /// where one does with a code that is no known country.
    pub fn lookup(&self, addr: IpAddr) -> Option<u8> {
        match addr {
            IpAddr::V4(a) => find(&self.v4, u32::from(a)),
            IpAddr::V6(a) => find(&self.v6, u128::from(a)),
        }
    }

    /// The country id of `addr`, 0 if unknown (what the dataplane answers).
    pub fn country(&self, addr: IpAddr) -> u8 {
        self.lookup(addr).unwrap_or(0)
    }
}

fn find<A: Addr>(spans: &[Span<A>], addr: A) -> Option<u8> {
    let i = spans.partition_point(|s| s.last < addr);
    spans.get(i).filter(|s| s.first <= addr).map(|s| s.country)
}

/// Append `first..=last` to a merged list, joining a touching neighbour of
/// the same country.
fn emit<A: Addr>(out: &mut Vec<Span<A>>, first: A, last: A, country: u8) {
    if let Some(prev) = out.last_mut()
        && prev.country == country
        && prev.last.next() == first
    {
        prev.last = last;
        return;
    }
    out.push(Span {
        first,
        last,
        country,
    });
}

/// Merge ranges listed in priority order (later wins) into a sorted,
/// disjoint list. A database is usually sorted and disjoint already: that
/// case is one pass. Otherwise a sweep over the starts keeps the ranges
/// covering the current address in a heap by priority.
pub fn merge<A: Addr>(spans: &[Span<A>]) -> Vec<Span<A>> {
    let mut out = Vec::with_capacity(spans.len());
    if spans.windows(2).all(|w| w[0].last < w[1].first) {
        for s in spans {
            emit(&mut out, s.first, s.last, s.country);
        }
        return out;
    }
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i].first);
    // Indices of the ranges that started at or before `pos`, highest
    // (latest listed) on top; ranges that ended are dropped when on top.
    let mut active: BinaryHeap<usize> = BinaryHeap::new();
    let mut next = 0;
    let mut pos = match order.first() {
        Some(&i) => spans[i].first,
        None => return out,
    };
    loop {
        while next < order.len() && spans[order[next]].first <= pos {
            active.push(order[next]);
            next += 1;
        }
        while active.peek().is_some_and(|&top| spans[top].last < pos) {
            active.pop();
        }
        let Some(&top) = active.peek() else {
            // A gap: continue at the next start.
            match order.get(next) {
                Some(&i) => {
                    pos = spans[i].first;
                    continue;
                }
                None => break,
            }
        };
        // The winner holds until it ends or a range that may outrank it starts.
        let mut end = spans[top].last;
        if let Some(&i) = order.get(next) {
            end = end.min(spans[i].first.prev());
        }
        emit(&mut out, pos, end, spans[top].country);
        if end == A::MAX {
            break;
        }
        pos = end.next();
    }
    out
}

/// The number of CIDR prefixes that cover exactly `first..=last`: what an
/// LPM trie of the same data would hold.
pub fn prefix_count<A: Addr>(span: &Span<A>) -> u64 {
    let (mut first, last) = (span.first.to_u128(), span.last.to_u128());
    let mut count = 0;
    loop {
        count += 1;
        let rest = last - first;
        // The largest aligned block at `first` that ends by `last`.
        let fits = if rest == u128::MAX {
            128
        } else {
            127 - (rest + 1).leading_zeros()
        };
        let bits = fits.min(first.trailing_zeros().min(A::BITS));
        let size_less_one = u128::MAX.checked_shr(128 - bits).unwrap_or(0);
        if size_less_one == rest {
            return count;
        }
        first += size_less_one + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(first: u32, last: u32, country: u8) -> Span<u32> {
        Span {
            first,
            last,
            country,
        }
    }

    #[test]
    fn geoip_merge_overlap_later_range_wins() {
        let merged = merge(&[span(0, 99, 1), span(10, 19, 2), span(15, 200, 3)]);
        assert_eq!(
            merged,
            vec![span(0, 9, 1), span(10, 14, 2), span(15, 200, 3)],
            "each address takes the country of the last range listing it"
        );
    }

    #[test]
    fn geoip_merge_earlier_range_resumes_after_later_one_ends() {
        let merged = merge(&[span(0, 99, 1), span(10, 19, 2)]);
        assert_eq!(
            merged,
            vec![span(0, 9, 1), span(10, 19, 2), span(20, 99, 1)],
            "the wide range covers what the narrow later one does not"
        );
    }

    #[test]
    fn geoip_merge_earlier_range_inside_later_one_is_hidden() {
        let merged = merge(&[span(10, 19, 2), span(0, 99, 1)]);
        assert_eq!(
            merged,
            vec![span(0, 99, 1)],
            "the later range covers it all"
        );
    }

    #[test]
    fn geoip_merge_touching_same_country_joined_gaps_kept() {
        let merged = merge(&[span(0, 9, 1), span(10, 19, 1), span(30, 39, 1)]);
        assert_eq!(
            merged,
            vec![span(0, 19, 1), span(30, 39, 1)],
            "touching ranges of one country join; a gap separates"
        );
    }

    #[test]
    fn geoip_merge_unknown_code_overrides_known_country() {
        let merged = merge(&[span(0, 99, 1), span(50, 59, 0)]);
        assert_eq!(
            Merged {
                v4: merged,
                v6: Vec::new()
            }
            .lookup("0.0.0.55".parse().unwrap()),
            Some(0),
            "a later range with an unknown code makes its addresses unknown"
        );
    }

    #[test]
    fn geoip_merge_full_space_ends_without_overflow() {
        let merged = merge(&[span(0, u32::MAX, 1), span(u32::MAX, u32::MAX, 2)]);
        assert_eq!(
            merged,
            vec![span(0, u32::MAX - 1, 1), span(u32::MAX, u32::MAX, 2)]
        );
        let all6 = Span {
            first: 0u128,
            last: u128::MAX,
            country: 3,
        };
        assert_eq!(merge(&[all6, all6]), vec![all6], "IPv6 too");
    }

    #[test]
    fn geoip_merge_files_later_file_wins() {
        let base = Ranges {
            v4: vec![span(0, 255, 1)],
            v6: Vec::new(),
        };
        let fix = Ranges {
            v4: vec![span(128, 255, 2)],
            v6: Vec::new(),
        };
        let merged = Merged::new([&base, &fix]);
        assert_eq!(merged.v4, vec![span(0, 127, 1), span(128, 255, 2)]);
        assert_eq!(
            merged.lookup("0.0.1.0".parse().unwrap()),
            None,
            "an address no range covers has no answer"
        );
    }

    #[test]
    fn geoip_prefix_count_matches_cidr_decomposition() {
        assert_eq!(prefix_count(&span(0, u32::MAX, 1)), 1, "0.0.0.0/0");
        assert_eq!(prefix_count(&span(256, 511, 1)), 1, "one /24");
        // 1.0.0.1-1.0.0.6: /32 /31 /31 /32.
        assert_eq!(prefix_count(&span(0x0100_0001, 0x0100_0006, 1)), 4);
        // 0.0.0.1 - 255.255.255.254: 31 prefixes on each side.
        assert_eq!(prefix_count(&span(1, u32::MAX - 1, 1)), 62);
        let all6 = Span {
            first: 0u128,
            last: u128::MAX,
            country: 1,
        };
        assert_eq!(prefix_count(&all6), 1, "::/0");
    }
}
