// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Layout of the compiled policy set and the first-match logic over it.
//!
//! The ordered policy list is compiled into per-dimension tables (bit-vector
//! classification, as in the "Linear Bit Vector Search" of bpf-iptables):
//! each dimension maps a packet field to a *class row*, the bit vector of
//! policies that accept that value on that dimension (wildcards included).
//! The dataplane ANDs the rows and takes the lowest set bit, i.e. the first
//! matching policy in list order. The cost depends on the number of
//! dimensions, not on the number of policies.
//!
//! Every table exists twice, once per *generation*. The agent fills the
//! inactive generation and then flips [`crate::maps::GEN`] with one write, so
//! a packet sees either the whole old or the whole new policy set.

/// Upper bound on classifier rules in one policy set (bits in a class row).
/// A policy is one rule, or one per alternative when its condition has an
/// `or` across dimensions.
pub const MAX_POLICIES: u32 = 4096;
/// 64-bit words in a class row.
pub const BV_WORDS: usize = (MAX_POLICIES / 64) as usize;
/// Pseudo policy index meaning "no policy matched": its action slot holds the
/// default egress.
pub const NO_MATCH: u32 = MAX_POLICIES;
/// Number of policy sets held at once (active + being prepared).
pub const GENERATIONS: u32 = 2;
/// Action slots per generation: every policy plus [`NO_MATCH`].
pub const ACTIONS_PER_GEN: u32 = MAX_POLICIES + 1;
/// Egress pools per generation; pool 0 is the default egress.
pub const MAX_POOLS: u32 = 256;
/// Pool index of the shared default egress.
pub const DEFAULT_POOL: u32 = 0;
/// IPv4 addresses one pool can hold.
pub const POOL_MAX_V4: usize = 8;

/// One class: the set of policies that accept a packet field value.
///
/// `summary` bit `w` is set exactly when `words[w] != 0`, so the AND of the
/// summaries names the only words worth ANDing (an aggregated bit vector):
/// a lookup usually touches one word whatever the number of policies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClassRow {
    pub summary: u64,
    pub words: [u64; BV_WORDS],
}
const _: () = assert!(size_of::<ClassRow>() == 8 + 8 * BV_WORDS);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for ClassRow {}

impl Default for ClassRow {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl ClassRow {
    pub const EMPTY: Self = Self {
        summary: 0,
        words: [0; BV_WORDS],
    };

    /// Admit policy `index`. Panics (in userspace) past [`MAX_POLICIES`].
    pub fn insert(&mut self, index: u32) {
        let word = (index / 64) as usize;
        self.words[word] |= 1 << (index % 64);
        self.summary |= 1 << word;
    }

    pub fn contains(&self, index: u32) -> bool {
        let word = (index / 64) as usize;
        word < BV_WORDS && self.words[word] & (1 << (index % 64)) != 0
    }
}

/// Index of the lowest set bit of a non-zero word.
///
/// Branch-free on purpose: a branchy binary search makes the verifier explore
/// every branch combination on every iteration of the loop in
/// [`first_match`]. This is a SWAR population count of the bits below the
/// lowest set one (LLVM may turn it into its own cttz lowering).
#[inline(always)]
pub const fn lowest_bit(x: u64) -> u32 {
    let below = (x & x.wrapping_neg()).wrapping_sub(1);
    let mut v = below - ((below >> 1) & 0x5555_5555_5555_5555);
    v = (v & 0x3333_3333_3333_3333) + ((v >> 2) & 0x3333_3333_3333_3333);
    v = (v + (v >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (v.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

/// The first policy (lowest index) admitted by every row, or [`NO_MATCH`].
///
/// Bounded by [`BV_WORDS`] iterations; each touches one word of each row.
#[inline(always)]
pub fn first_match<const N: usize>(rows: &[&ClassRow; N]) -> u32 {
    let mut candidates = u64::MAX;
    let mut d = 0;
    while d < N {
        candidates &= rows[d].summary;
        d += 1;
    }
    let mut round = 0;
    while candidates != 0 && round < BV_WORDS {
        // LLVM recognises lowest_bit() as cttz, which the BPF backend lowers
        // to a table lookup in .rodata: the verifier then only knows the
        // result is a byte. `& 63` restates the bound, and black_box stops
        // LLVM from deleting the mask it can prove redundant.
        let word = (core::hint::black_box(lowest_bit(candidates)) & 63) as usize;
        let mut acc = u64::MAX;
        let mut d = 0;
        while d < N {
            acc &= rows[d].words[word];
            d += 1;
        }
        if acc != 0 {
            return word as u32 * 64 + lowest_bit(acc);
        }
        candidates &= candidates - 1;
        round += 1;
    }
    NO_MATCH
}

/// Data part of an IPv4 classifier trie key: the generation byte, then the
/// address. The trie's prefix length is `8 + prefix length of the address`,
/// so both generations live in one trie without seeing each other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GenPrefix4 {
    pub generation: u8,
    /// Address bytes, network order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<GenPrefix4>() == 5);
#[cfg(feature = "user")]
// SAFETY: repr(C) of bytes only: no padding.
unsafe impl aya::Pod for GenPrefix4 {}

/// Data part of an IPv6 classifier trie key, as [`GenPrefix4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GenPrefix6 {
    pub generation: u8,
    /// Address bytes, network order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<GenPrefix6>() == 17);
#[cfg(feature = "user")]
// SAFETY: repr(C) of bytes only: no padding.
unsafe impl aya::Pod for GenPrefix6 {}

/// Identity ids per generation in the identity class table; id 0 means
/// "no identity behind this source".
pub const DEFAULT_IDENTITY_SLOTS: u32 = 131_072;
/// Country ids per generation in the country class table; id 0 means
/// "country unknown".
pub const COUNTRY_SLOTS: u32 = 256;

/// Index into the identity class table (`slots` = identity ids per generation).
#[inline(always)]
pub const fn identity_slot(generation: u32, slots: u32, identity: u32) -> u32 {
    (generation & 1) * slots + identity
}

/// Index into the country class table.
#[inline(always)]
pub const fn country_slot(generation: u32, country: u32) -> u32 {
    (generation & 1) * COUNTRY_SLOTS + (country & (COUNTRY_SLOTS - 1))
}

/// Bits the generation byte adds to a trie key's prefix length.
pub const GEN_PREFIX_BITS: u32 = 8;

/// Slots of the port table per generation: one per TCP port, one per UDP
/// port, then one each for ICMP, ICMPv6 and every other protocol.
pub const PORT_SLOTS_PER_GEN: u32 = 2 * 65536 + 4;
pub const PORT_SLOT_TCP: u32 = 0;
pub const PORT_SLOT_UDP: u32 = 65536;
pub const PORT_SLOT_ICMP: u32 = 2 * 65536;
pub const PORT_SLOT_ICMPV6: u32 = 2 * 65536 + 1;
pub const PORT_SLOT_OTHER: u32 = 2 * 65536 + 2;

/// Index into the port table for a protocol and destination port (host order).
#[inline(always)]
pub const fn port_slot(generation: u32, proto: u8, dport: u16) -> u32 {
    let within = match proto {
        crate::flow::proto::TCP => PORT_SLOT_TCP + dport as u32,
        crate::flow::proto::UDP => PORT_SLOT_UDP + dport as u32,
        crate::flow::proto::ICMP => PORT_SLOT_ICMP,
        crate::flow::proto::ICMPV6 => PORT_SLOT_ICMPV6,
        _ => PORT_SLOT_OTHER,
    };
    (generation & 1) * PORT_SLOTS_PER_GEN + within
}

/// Index into the action table.
#[inline(always)]
pub const fn action_slot(generation: u32, policy: u32) -> u32 {
    (generation & 1) * ACTIONS_PER_GEN + policy
}

/// Index into the pool table.
#[inline(always)]
pub const fn pool_slot(generation: u32, pool: u32) -> u32 {
    (generation & 1) * MAX_POOLS + pool
}

/// `Action::kind`: translate the source to an address of `Action::pool`.
pub const ACTION_TRANSLATE: u32 = 1;
/// `Action::kind`: leave the flow untouched.
pub const ACTION_BYPASS: u32 = 2;

/// `Action::flags`: set the packet mark to `Action::mark`.
pub const ACTION_F_MARK: u32 = 1 << 0;

/// What a policy does with the flows it matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Action {
    /// `ACTION_*`; 0 means the slot was never written.
    pub kind: u32,
    /// `ACTION_F_*`.
    pub flags: u32,
    pub mark: u32,
    /// Pool index (for `ACTION_TRANSLATE`).
    pub pool: u32,
    /// Per-policy counter slot.
    pub stats_slot: u32,
    /// Policy index in its generation ([`NO_MATCH`] for the implicit default).
    pub policy: u32,
}
const _: () = assert!(size_of::<Action>() == 24);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for Action {}

/// `Pool::mode`: the first usable address in list order takes new flows.
pub const POOL_MODE_FAILOVER: u8 = 0;
/// `Pool::mode`: new flows are hashed over all usable addresses.
pub const POOL_MODE_SPREAD: u8 = 1;
/// `Pool::when_down`: no usable address means new flows are dropped.
pub const POOL_DOWN_DROP: u8 = 0;
/// `Pool::when_down`: no usable address means the default egress is used.
pub const POOL_DOWN_DEFAULT: u8 = 1;

/// A set of egress addresses a policy can send flows out from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pool {
    /// IPv4 addresses in preference order, network byte order.
    pub v4: [u32; POOL_MAX_V4],
    /// Egress-address counter slot of each IPv4 address.
    pub v4_slot: [u16; POOL_MAX_V4],
    /// IPv6 range: network (network-order words) and the mask of its host
    /// bits; an address is `net | (hash & host_mask)`.
    pub v6_net: [u32; 4],
    pub v6_host_mask: [u32; 4],
    /// Egress-address counter slot of the IPv6 range.
    pub v6_slot: u16,
    /// Number of valid entries in `v4`.
    pub v4_count: u8,
    /// `POOL_MODE_*`.
    pub mode: u8,
    /// `POOL_DOWN_*`.
    pub when_down: u8,
    /// 1 when the pool has an IPv6 range.
    pub has_v6: u8,
    pub _reserved: [u8; 2],
    /// Bit `i` set: `v4[i]` is usable. Kept up to date by the agent.
    pub v4_up: u32,
    /// Interface index of the uplink the pool's flows must leave from (the
    /// packet is redirected there when routing chose another uplink); 0:
    /// whichever uplink routing chose.
    pub ifindex: u32,
}
const _: () = assert!(size_of::<Pool>() == 96);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for Pool {}

/// A well-mixed 64-bit hash step (splitmix64's finaliser).
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Pool {
    /// The IPv4 address new flows leave from and its counter slot, or `None`
    /// when no address is usable. `hash` spreads flows in spread mode.
    #[inline(always)]
    pub fn pick_v4(&self, hash: u64) -> Option<(u32, u16)> {
        let usable = self.v4_up & ((1u32 << (self.v4_count as u32 & 15)) - 1);
        if usable == 0 {
            return None;
        }
        // Spread mode: the n-th usable address, n = hash mod usable count.
        let mut skip = if self.mode == POOL_MODE_SPREAD {
            (hash % u64::from(usable.count_ones())) as u32
        } else {
            0
        };
        let mut i = 0;
        while i < POOL_MAX_V4 {
            if usable & (1 << i) != 0 {
                if skip == 0 {
                    return Some((self.v4[i], self.v4_slot[i]));
                }
                skip -= 1;
            }
            i += 1;
        }
        None
    }

    /// The IPv6 address for flows whose identity or source hashes to `key`,
    /// written to `out`: stable per key, inside the range, never the
    /// all-zero host (the subnet-router anycast address). Returns the
    /// range's counter slot, or `None` when the pool has no IPv6 range.
    ///
    /// Writes through `out` word by word, without temporary arrays: in the
    /// dataplane `out` is the new flow's entry, and BPF stack is scarce.
    #[inline(always)]
    pub fn pick_v6(&self, key: u64, out: &mut [u32; 4]) -> Option<u16> {
        if self.has_v6 == 0 {
            return None;
        }
        let low = mix64(key);
        let high = mix64(low ^ 0x9e37_79b9_7f4a_7c15);
        let mut host_bits = 0;
        let mut i = 0;
        while i < 4 {
            let word = match i {
                0 => (high >> 32) as u32,
                1 => high as u32,
                2 => (low >> 32) as u32,
                _ => low as u32,
            };
            let h = word.to_be() & self.v6_host_mask[i];
            host_bits |= h;
            out[i] = (self.v6_net[i] & !self.v6_host_mask[i]) | h;
            i += 1;
        }
        if host_bits == 0 {
            out[3] |= self.v6_host_mask[3] & 1u32.to_be();
        }
        Some(self.v6_slot)
    }
}

/// What the identity tries map a source prefix to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityRef {
    /// Identity id (index of the identity class table).
    pub id: u32,
    /// Stable per user (a hash of the user name), so the user keeps one
    /// IPv6 egress address across sessions, reloads and restarts.
    pub key: u32,
}
const _: () = assert!(size_of::<IdentityRef>() == 8);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for IdentityRef {}

/// Per-generation settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Translated ports are searched in `port_min..=port_max` (host order)
    /// when a flow's own source port is taken.
    pub port_min: u16,
    pub port_max: u16,
    /// Identity ids per generation in the identity class table (the table
    /// holds two generations), so the dataplane can index it.
    pub identity_slots: u32,
}
const _: () = assert!(size_of::<Settings>() == 8);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for Settings {}

impl Default for Settings {
    fn default() -> Self {
        Self {
            port_min: 1024,
            port_max: 65535,
            identity_slots: DEFAULT_IDENTITY_SLOTS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(bits: &[u32]) -> ClassRow {
        let mut r = ClassRow::EMPTY;
        for &b in bits {
            r.insert(b);
        }
        r
    }

    #[test]
    fn lowest_bit_every_position_matches_trailing_zeros() {
        for i in 0..64 {
            let x = 1u64 << i;
            assert_eq!(lowest_bit(x), i, "single bit {i}");
            assert_eq!(
                lowest_bit(x | (x << 1)),
                i,
                "bit {i} with a higher neighbour"
            );
            assert_eq!(lowest_bit(u64::MAX << i), i, "run from bit {i}");
        }
    }

    #[test]
    fn first_match_and_of_rows_lowest_common_policy() {
        let a = row(&[3, 70, 4000]);
        let b = row(&[70, 4000]);
        let c = row(&[1, 4000, 70]);
        assert_eq!(
            first_match(&[&a, &b, &c]),
            70,
            "70 is the first policy in all rows"
        );
    }

    #[test]
    fn first_match_summary_overlap_without_common_bit_keeps_searching() {
        // Word 0 is non-zero in both rows but shares no bit; word 2 does.
        let a = row(&[1, 130]);
        let b = row(&[2, 130]);
        assert_eq!(first_match(&[&a, &b]), 130, "must skip word 0 and find 130");
    }

    #[test]
    fn first_match_disjoint_rows_no_match() {
        let a = row(&[1, 4095]);
        let b = row(&[2, 4094]);
        assert_eq!(
            first_match(&[&a, &b]),
            NO_MATCH,
            "no policy is in both rows"
        );
    }

    #[test]
    fn port_slot_generations_do_not_overlap() {
        assert_eq!(port_slot(0, crate::flow::proto::TCP, 443), 443);
        assert_eq!(port_slot(0, crate::flow::proto::UDP, 53), 65536 + 53);
        assert_eq!(
            port_slot(1, crate::flow::proto::TCP, 0),
            PORT_SLOTS_PER_GEN,
            "generation 1 starts after generation 0"
        );
        assert!(port_slot(1, 47, 0) < 2 * PORT_SLOTS_PER_GEN);
    }

    #[test]
    fn pool_pick_v4_failover_skips_down_addresses() {
        let mut pool = Pool {
            v4: [10, 11, 0, 0, 0, 0, 0, 0],
            v4_slot: [1, 2, 0, 0, 0, 0, 0, 0],
            v4_count: 2,
            v4_up: 0b11,
            ..Pool::default()
        };
        assert_eq!(pool.pick_v4(7), Some((10, 1)), "primary while up");
        pool.v4_up = 0b10;
        assert_eq!(
            pool.pick_v4(7),
            Some((11, 2)),
            "secondary when primary is down"
        );
        pool.v4_up = 0;
        assert_eq!(pool.pick_v4(7), None, "nothing usable");
    }

    #[test]
    fn pool_pick_v4_spread_uses_every_usable_address() {
        let pool = Pool {
            v4: [10, 11, 12, 0, 0, 0, 0, 0],
            v4_count: 3,
            v4_up: 0b101,
            mode: POOL_MODE_SPREAD,
            ..Pool::default()
        };
        let picked: std::collections::BTreeSet<u32> = (0..64)
            .filter_map(|h| pool.pick_v4(mix64(h)))
            .map(|(a, _)| a)
            .collect();
        assert_eq!(
            picked,
            [10, 12].into(),
            "both usable addresses, never the down one"
        );
    }

    #[test]
    fn pool_pick_v6_stable_inside_range_nonzero_host() {
        // 2001:db8:e0::/64
        let pool = Pool {
            v6_net: [0x2001_0db8u32.to_be(), 0x00e0_0000u32.to_be(), 0, 0],
            v6_host_mask: [0, 0, u32::MAX, u32::MAX],
            has_v6: 1,
            v6_slot: 5,
            ..Pool::default()
        };
        let pick = |key| {
            let mut a = [0u32; 4];
            pool.pick_v6(key, &mut a).map(|slot| (a, slot))
        };
        let (a, slot) = pick(42).unwrap();
        assert_eq!(slot, 5);
        assert_eq!(pick(42).unwrap().0, a, "the same key gets the same address");
        assert_ne!(pick(43).unwrap().0, a, "another key gets another address");
        assert_eq!(&a[..2], &pool.v6_net[..2], "inside the /64");
        assert!(
            a[2] != 0 || a[3] != 0,
            "never the subnet-router anycast address"
        );
        // A /128 range always gives its one address.
        let single = Pool {
            v6_net: [1, 2, 3, 4],
            v6_host_mask: [0; 4],
            has_v6: 1,
            ..Pool::default()
        };
        let mut a = [0u32; 4];
        single.pick_v6(9, &mut a).unwrap();
        assert_eq!(a, [1, 2, 3, 4]);
    }
}
