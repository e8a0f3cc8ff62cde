//! Compiling a policy set into the dataplane's bit-vector tables.
//!
//! Each dimension (source prefix, destination prefix, protocol+port) is
//! reduced to *classes*: ranges of field values that every policy treats
//! alike. A class row holds the policies that accept the class, wildcards
//! included, so the dataplane needs one lookup per dimension and an AND.
//! Classes are interned across dimensions: identical rows are stored once.
//!
//! The result is generation-independent; `tables.rs` places it in a
//! generation of the maps.

use std::{collections::HashMap, net::Ipv4Addr};

use egress_common::classify::{
    ACTION_BYPASS, ACTION_TRANSLATE, ClassRow, POOL_MAX_V4, PORT_SLOT_ICMP, PORT_SLOT_ICMPV6,
    PORT_SLOT_OTHER, PORT_SLOT_TCP, PORT_SLOT_UDP, PORT_SLOTS_PER_GEN, Pool, Settings, first_match,
};
use ipnet::{IpNet, Ipv4Net};

use super::{
    eval::Flow,
    model::{Egress, PolicySet, Protocol, Selector},
};

/// What the dataplane does with a policy's flows, before counter slots are assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActionSpec {
    /// `ACTION_TRANSLATE` or `ACTION_BYPASS`.
    pub kind: u32,
    /// Index into [`Compiled::pools`] (0 = default egress).
    pub pool: u32,
    pub mark: Option<u32>,
}

/// A policy set in dataplane form.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// IPv4 source classes: every prefix any policy names, plus 0.0.0.0/0.
    pub src4: Vec<(Ipv4Net, u32)>,
    /// IPv4 destination classes, likewise.
    pub dst4: Vec<(Ipv4Net, u32)>,
    /// Class per port-table slot (`PORT_SLOTS_PER_GEN` entries).
    pub ports: Vec<u32>,
    /// Interned class rows; the values above index into this.
    pub classes: Vec<ClassRow>,
    /// One action per policy, in list order.
    pub actions: Vec<ActionSpec>,
    /// The action when no policy matches: the default egress.
    pub default_action: ActionSpec,
    /// Egress pools; index 0 is the default egress.
    pub pools: Vec<Pool>,
    pub settings: Settings,
}

#[derive(Default)]
struct Interner {
    rows: Vec<ClassRow>,
    index: HashMap<ClassRow, u32>,
}

impl Interner {
    fn intern(&mut self, row: ClassRow) -> u32 {
        *self.index.entry(row).or_insert_with(|| {
            self.rows.push(row);
            (self.rows.len() - 1) as u32
        })
    }
}

pub fn compile(set: &PolicySet) -> Compiled {
    let mut interner = Interner::default();
    let src4 = prefix_dimension(set, |s| &s.src, &mut interner);
    let dst4 = prefix_dimension(set, |s| &s.dst, &mut interner);
    let ports = port_dimension(set, &mut interner);

    let actions = set
        .policies
        .iter()
        .map(|p| match p.action.egress {
            Egress::Bypass => ActionSpec {
                kind: ACTION_BYPASS,
                pool: 0,
                mark: p.action.mark,
            },
            Egress::Default => ActionSpec {
                kind: ACTION_TRANSLATE,
                pool: 0,
                mark: p.action.mark,
            },
            Egress::Pool(i) => ActionSpec {
                kind: ACTION_TRANSLATE,
                pool: i as u32 + 1,
                mark: p.action.mark,
            },
        })
        .collect();

    let mut pools = vec![pool_v4(&[set.default_egress.ipv4])];
    pools.extend(set.pools.iter().map(|p| pool_v4(&p.ipv4)));

    Compiled {
        src4,
        dst4,
        ports,
        classes: interner.rows,
        actions,
        default_action: ActionSpec {
            kind: ACTION_TRANSLATE,
            pool: 0,
            mark: None,
        },
        pools,
        settings: Settings {
            port_min: set.nat.port_range.first,
            port_max: set.nat.port_range.last,
            _reserved: 0,
        },
    }
}

fn pool_v4(addrs: &[Ipv4Addr]) -> Pool {
    let mut pool = Pool::default();
    for (slot, addr) in pool.v4_be.iter_mut().zip(addrs) {
        *slot = u32::from(*addr).to_be();
    }
    pool.v4_count = addrs.len().min(POOL_MAX_V4) as u8;
    // Every address starts usable; health checks clear bits.
    pool.v4_up = (1u32 << pool.v4_count) - 1;
    pool
}

/// Policies that can match at all (disabled ones never get a bit).
fn enabled(set: &PolicySet) -> impl Iterator<Item = (u32, &Selector)> {
    set.policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.enabled)
        .map(|(i, p)| (i as u32, &p.selector))
}

fn v4_nets(nets: &[IpNet]) -> impl Iterator<Item = Ipv4Net> + '_ {
    nets.iter().filter_map(|n| match n {
        IpNet::V4(n) => Some(*n),
        IpNet::V6(_) => None,
    })
}

/// Classes of one address dimension. For the longest listed prefix `p`
/// containing an address, a policy accepts the address exactly when its
/// field is empty or lists a prefix containing `p`.
fn prefix_dimension(
    set: &PolicySet,
    field: impl Fn(&Selector) -> &Vec<IpNet>,
    interner: &mut Interner,
) -> Vec<(Ipv4Net, u32)> {
    let mut wildcard = ClassRow::EMPTY;
    let mut prefixes: Vec<Ipv4Net> = vec![Ipv4Net::default()];
    for (i, sel) in enabled(set) {
        let nets = field(sel);
        if nets.is_empty() {
            wildcard.insert(i);
        } else {
            prefixes.extend(v4_nets(nets));
        }
    }
    // Sorted by (network, length): the prefixes inside q are the contiguous
    // run starting at q itself.
    prefixes.sort_unstable();
    prefixes.dedup();
    let mut rows = vec![wildcard; prefixes.len()];
    for (i, sel) in enabled(set) {
        for q in v4_nets(field(sel)) {
            let start = prefixes
                .binary_search(&q)
                .expect("every listed prefix was collected");
            for (p, row) in prefixes[start..].iter().zip(&mut rows[start..]) {
                if p.network() > q.broadcast() {
                    break;
                }
                row.insert(i);
            }
        }
    }
    prefixes
        .into_iter()
        .zip(rows)
        .map(|(p, row)| (p, interner.intern(row)))
        .collect()
}

fn accepts_protocol(sel: &Selector, proto: Protocol) -> bool {
    sel.protocols.is_empty() || sel.protocols.contains(&proto)
}

/// Classes of the protocol + destination port dimension.
fn port_dimension(set: &PolicySet, interner: &mut Interner) -> Vec<u32> {
    let mut slots = vec![0u32; PORT_SLOTS_PER_GEN as usize];

    for (proto, base) in [
        (Protocol::Tcp, PORT_SLOT_TCP),
        (Protocol::Udp, PORT_SLOT_UDP),
    ] {
        let mut any_port = ClassRow::EMPTY;
        let mut ranged = Vec::new();
        for (i, sel) in enabled(set) {
            if !accepts_protocol(sel, proto) {
                continue;
            }
            if sel.dst_ports.is_empty() {
                any_port.insert(i);
            } else {
                ranged.extend(sel.dst_ports.iter().map(|r| (i, *r)));
            }
        }
        // Elementary intervals: every range starts and ends on a boundary.
        let mut starts: Vec<u32> = vec![0];
        for (_, r) in &ranged {
            starts.push(u32::from(r.first));
            starts.push(u32::from(r.last) + 1);
        }
        starts.retain(|&s| s <= 65535);
        starts.sort_unstable();
        starts.dedup();
        let mut rows = vec![any_port; starts.len()];
        for (i, r) in &ranged {
            let first = starts
                .binary_search(&u32::from(r.first))
                .expect("range starts are boundaries");
            for (start, row) in starts[first..].iter().zip(&mut rows[first..]) {
                if *start > u32::from(r.last) {
                    break;
                }
                row.insert(*i);
            }
        }
        for (k, row) in rows.into_iter().enumerate() {
            let class = interner.intern(row);
            let end = starts.get(k + 1).copied().unwrap_or(65536);
            for port in starts[k]..end {
                slots[(base + port) as usize] = class;
            }
        }
    }

    let portless = |proto: Option<Protocol>| {
        let mut row = ClassRow::EMPTY;
        for (i, sel) in enabled(set) {
            let proto_ok = match proto {
                Some(p) => accepts_protocol(sel, p),
                None => sel.protocols.is_empty(),
            };
            if proto_ok && sel.dst_ports.is_empty() {
                row.insert(i);
            }
        }
        row
    };
    slots[PORT_SLOT_ICMP as usize] = interner.intern(portless(Some(Protocol::Icmp)));
    slots[PORT_SLOT_ICMPV6 as usize] = interner.intern(portless(Some(Protocol::Icmpv6)));
    slots[PORT_SLOT_OTHER as usize] = interner.intern(portless(None));
    slots
}

impl Compiled {
    fn lpm(table: &[(Ipv4Net, u32)], addr: Ipv4Addr) -> u32 {
        table
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, class)| *class)
            .expect("0.0.0.0/0 is always present")
    }

    /// Classify an IPv4 flow with the compiled tables, the way the dataplane
    /// does: the first policy index, or [`NO_MATCH`].
    pub fn classify_v4(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, dst_port: u16) -> u32 {
        let slot = egress_common::classify::port_slot(0, proto, dst_port);
        let rows = [
            &self.classes[Self::lpm(&self.src4, src) as usize],
            &self.classes[Self::lpm(&self.dst4, dst) as usize],
            &self.classes[self.ports[slot as usize] as usize],
        ];
        first_match(&rows)
    }

    /// [`Self::classify_v4`] for a [`Flow`]; `None` for IPv6 flows, which
    /// the tables do not cover yet.
    pub fn classify(&self, flow: &Flow) -> Option<u32> {
        match (flow.src, flow.dst) {
            (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                Some(self.classify_v4(s, d, flow.proto, flow.dst_port))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::policy::testing;
    use egress_common::classify::NO_MATCH;

    fn check_against_reference(set: &PolicySet, flows: &[Flow]) -> Result<(), TestCaseError> {
        let compiled = compile(set);
        for flow in flows {
            let expected = set.first_match(flow).map_or(NO_MATCH, |i| i as u32);
            let got = compiled.classify(flow).expect("IPv4 flow");
            prop_assert_eq!(
                got,
                expected,
                "compiled tables must pick the reference's policy for {:?}",
                flow
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]
        #[test]
        fn compile_small_sets_match_reference(
            (set, flows) in testing::policy_set(24)
                .prop_flat_map(|set| { let f = testing::flows(&set, 24); (Just(set), f) })
        ) {
            check_against_reference(&set, &flows)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn compile_large_sets_match_reference(
            (set, flows) in testing::policy_set(4096)
                .prop_flat_map(|set| { let f = testing::flows(&set, 200); (Just(set), f) })
        ) {
            check_against_reference(&set, &flows)?;
        }
    }
}
