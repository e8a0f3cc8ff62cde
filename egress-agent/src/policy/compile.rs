//! Compiling a policy set into the dataplane's bit-vector tables.
//!
//! Every policy becomes one classifier rule per alternative of its
//! condition (see `dnf.rs`). Each dimension has a finite universe of
//! *elements* the dataplane can look up: the prefixes any rule names (a
//! trie's longest match picks one), intervals of destination ports per
//! protocol, known identities, known countries. A rule's predicate on a
//! dimension, however it combines `and`, `or` and `not`, is evaluated once
//! as a bit set over that universe; transposed, these give each element a
//! row of the rules that accept it. Identical rows are stored once.
//!
//! The result is generation-independent; `tables.rs` places it in a
//! generation of the maps.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egress_common::classify::{
    ACTION_BYPASS, ACTION_TRANSLATE, COUNTRY_SLOTS, ClassRow, DEFAULT_IDENTITY_SLOTS, NO_MATCH,
    POOL_DOWN_DEFAULT, POOL_DOWN_DROP, POOL_MAX_V4, POOL_MODE_FAILOVER, POOL_MODE_SPREAD,
    PORT_SLOT_ICMP, PORT_SLOT_ICMPV6, PORT_SLOT_OTHER, PORT_SLOT_TCP, PORT_SLOT_UDP,
    PORT_SLOTS_PER_GEN, Pool, Settings, first_match,
};
use fixedbitset::FixedBitSet;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{
    dnf::Conjunction,
    eval::Flow,
    geo,
    model::{Atom, Dimension, Egress, Expr, Identity, PolicySet, PoolMode, Protocol, WhenDown},
};

/// What the dataplane does with a rule's flows, before counter slots are assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActionSpec {
    /// `ACTION_TRANSLATE` or `ACTION_BYPASS`.
    pub kind: u32,
    /// Index into [`Compiled::pools`] (0 = default egress).
    pub pool: u32,
    pub mark: Option<u32>,
}

/// One classifier rule: an alternative of a policy's condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// Index of the policy in the set.
    pub policy: u32,
    pub action: ActionSpec,
}

/// A policy set in dataplane form.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// Source classes: every prefix a rule names, plus the /0.
    pub src4: Vec<(Ipv4Net, u32)>,
    pub src6: Vec<(Ipv6Net, u32)>,
    /// Destination classes, likewise.
    pub dst4: Vec<(Ipv4Net, u32)>,
    pub dst6: Vec<(Ipv6Net, u32)>,
    /// Class per port-table slot (`PORT_SLOTS_PER_GEN` entries).
    pub ports: Vec<u32>,
    /// Class per identity id; id 0 is "no identity".
    pub identities: Vec<u32>,
    /// Class per country id (`COUNTRY_SLOTS` entries); id 0 is "unknown".
    pub countries: Vec<u32>,
    /// Interned class rows; the values above index into this.
    pub classes: Vec<ClassRow>,
    /// Rules in priority order (bit `i` of a row is `rules[i]`).
    pub rules: Vec<RuleSpec>,
    /// The action when no rule matches: the default egress.
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

/// A classifier rule: one alternative of an enabled policy's condition.
pub(super) struct Rule<'a> {
    /// Index of the policy in the set.
    pub policy: usize,
    pub conj: &'a Conjunction,
    pub requires_identity: bool,
}

/// The rules of `set`, in priority order.
pub(super) fn rules(set: &PolicySet) -> Vec<Rule<'_>> {
    set.policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.enabled)
        .flat_map(|(policy, p)| {
            p.rules.iter().map(move |conj| Rule {
                policy,
                conj,
                requires_identity: p.requires_identity(),
            })
        })
        .collect()
}

/// Compile `set` for the given identities (identity id `i + 1` is
/// `identities[i]`).
pub fn compile(set: &PolicySet, identities: &[Identity]) -> Compiled {
    let rules = rules(set);
    let specs = rules
        .iter()
        .map(|rule| {
            let action = &set.policies[rule.policy].action;
            RuleSpec {
                policy: rule.policy as u32,
                action: action_spec(action.egress, action.mark),
            }
        })
        .collect();

    let mut interner = Interner::default();
    let src4 = prefixes::<Ipv4Net>(&rules, Dimension::Src, &mut interner);
    let src6 = prefixes::<Ipv6Net>(&rules, Dimension::Src, &mut interner);
    let dst4 = prefixes::<Ipv4Net>(&rules, Dimension::Dst, &mut interner);
    let dst6 = prefixes::<Ipv6Net>(&rules, Dimension::Dst, &mut interner);
    let ports = l4(&rules, &mut interner);
    let identities = identity_classes(&rules, identities, &mut interner);
    let countries = country_classes(&rules, &mut interner);

    let default_v6 = set.default_egress.ipv6.map(Ipv6Net::from);
    let mut pools = vec![pool(
        &[set.default_egress.ipv4],
        default_v6,
        PoolMode::Failover,
        WhenDown::Drop,
    )];
    pools.extend(
        set.pools
            .iter()
            .map(|p| pool(&p.ipv4, p.ipv6, p.mode, p.when_down)),
    );

    Compiled {
        src4,
        src6,
        dst4,
        dst6,
        ports,
        identities,
        countries,
        classes: interner.rows,
        rules: specs,
        default_action: action_spec(Egress::Default, None),
        pools,
        settings: Settings {
            port_min: set.nat.port_range.first,
            port_max: set.nat.port_range.last,
            identity_slots: DEFAULT_IDENTITY_SLOTS,
        },
    }
}

fn action_spec(egress: Egress, mark: Option<u32>) -> ActionSpec {
    let (kind, pool) = match egress {
        Egress::Bypass => (ACTION_BYPASS, 0),
        Egress::Default => (ACTION_TRANSLATE, 0),
        Egress::Pool(i) => (ACTION_TRANSLATE, i as u32 + 1),
    };
    ActionSpec { kind, pool, mark }
}

/// A pool in dataplane form. Counter slots are left at 0 for `tables.rs`,
/// which keeps them stable per address across reloads.
fn pool(ipv4: &[Ipv4Addr], ipv6: Option<Ipv6Net>, mode: PoolMode, when_down: WhenDown) -> Pool {
    let mut pool = Pool::default();
    for (slot, addr) in pool.v4.iter_mut().zip(ipv4) {
        *slot = u32::from(*addr).to_be();
    }
    pool.v4_count = ipv4.len().min(POOL_MAX_V4) as u8;
    // Every address starts usable; health checks clear bits.
    pool.v4_up = (1u32 << pool.v4_count) - 1;
    if let Some(net) = ipv6 {
        let words = |a: u128| {
            [
                ((a >> 96) as u32).to_be(),
                ((a >> 64) as u32).to_be(),
                ((a >> 32) as u32).to_be(),
                (a as u32).to_be(),
            ]
        };
        pool.v6_net = words(u128::from(net.network()));
        pool.v6_host_mask = words(u128::from(net.hostmask()));
        pool.has_v6 = 1;
    }
    pool.mode = match mode {
        PoolMode::Failover => POOL_MODE_FAILOVER,
        PoolMode::Spread => POOL_MODE_SPREAD,
    };
    pool.when_down = match when_down {
        WhenDown::Drop => POOL_DOWN_DROP,
        WhenDown::Default => POOL_DOWN_DEFAULT,
    };
    pool
}

/// Every element of a universe of `n`.
fn full(n: usize) -> FixedBitSet {
    let mut all = FixedBitSet::with_capacity(n);
    all.insert_range(..);
    all
}

/// Evaluate a single-dimension predicate over a universe of `n` elements.
fn eval(pred: &Expr, n: usize, atom: &dyn Fn(&Atom) -> FixedBitSet) -> FixedBitSet {
    match pred {
        Expr::True => full(n),
        Expr::Atom(a) => atom(a),
        Expr::Not(e) => {
            let mut set = eval(e, n, atom);
            set.toggle_range(..);
            set
        }
        Expr::And(es) => {
            let mut acc = full(n);
            for e in es {
                acc.intersect_with(&eval(e, n, atom));
            }
            acc
        }
        Expr::Or(es) => {
            let mut acc = FixedBitSet::with_capacity(n);
            for e in es {
                acc.union_with(&eval(e, n, atom));
            }
            acc
        }
    }
}

/// Per rule, the elements of one dimension its predicate accepts; `None`
/// when the rule has no predicate there (it accepts every element).
pub(super) type Accepts = Vec<Option<FixedBitSet>>;

fn accepts(
    rules: &[Rule<'_>],
    dim: Dimension,
    n: usize,
    atom: &dyn Fn(&Atom) -> FixedBitSet,
) -> Accepts {
    rules
        .iter()
        .map(|rule| rule.conj.pred(dim).map(|pred| eval(pred, n, atom)))
        .collect()
}

/// Transpose accept sets into one row per element.
fn rows(accepts: &Accepts, n: usize) -> Vec<ClassRow> {
    let mut any = ClassRow::EMPTY;
    let mut rows = vec![ClassRow::EMPTY; n];
    for (r, accept) in accepts.iter().enumerate() {
        match accept {
            None => any.insert(r as u32),
            Some(set) => {
                for e in set.ones() {
                    rows[e].insert(r as u32);
                }
            }
        }
    }
    for row in &mut rows {
        row.summary |= any.summary;
        for (w, a) in row.words.iter_mut().zip(any.words) {
            *w |= a;
        }
    }
    rows
}

/// The class of each element: its row, interned.
fn classes(accepts: &Accepts, n: usize, interner: &mut Interner) -> Vec<u32> {
    rows(accepts, n)
        .into_iter()
        .map(|r| interner.intern(r))
        .collect()
}

fn dimension_atoms<'a>(rules: &[Rule<'a>], dim: Dimension) -> Vec<&'a Atom> {
    rules
        .iter()
        .filter_map(|rule| rule.conj.pred(dim))
        .flat_map(Expr::atoms)
        .collect()
}

/// An address family's prefixes, for the generic prefix dimension.
pub(super) trait Prefix: Copy + Ord + Default + std::fmt::Debug {
    fn of(net: &IpNet) -> Option<Self>;
    /// First and last address as integers.
    fn bounds(&self) -> (u128, u128);
}

impl Prefix for Ipv4Net {
    fn of(net: &IpNet) -> Option<Self> {
        match net {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        }
    }
    fn bounds(&self) -> (u128, u128) {
        (
            u32::from(self.network()).into(),
            u32::from(self.broadcast()).into(),
        )
    }
}

impl Prefix for Ipv6Net {
    fn of(net: &IpNet) -> Option<Self> {
        match net {
            IpNet::V6(n) => Some(*n),
            IpNet::V4(_) => None,
        }
    }
    fn bounds(&self) -> (u128, u128) {
        (self.network().into(), self.broadcast().into())
    }
}

/// An address dimension for one family. The universe is every prefix the
/// rules name plus the /0; for an address, the trie returns the longest of
/// them containing it, and an address is in a listed prefix `q` exactly when
/// that longest match `p` is inside `q`.
pub(super) fn prefix_accepts<P: Prefix>(rules: &[Rule<'_>], dim: Dimension) -> (Vec<P>, Accepts) {
    let nets_of = |a: &Atom| -> Vec<P> {
        match a {
            Atom::SrcIp(nets) | Atom::DstIp(nets) => nets.iter().filter_map(P::of).collect(),
            _ => Vec::new(),
        }
    };
    let mut universe: Vec<P> = vec![P::default()];
    for a in dimension_atoms(rules, dim) {
        universe.extend(nets_of(a));
    }
    // Sorted by (network, length): the prefixes inside q are the contiguous
    // run starting at q itself.
    universe.sort_unstable();
    universe.dedup();
    let n = universe.len();
    let atom = |a: &Atom| {
        let mut set = FixedBitSet::with_capacity(n);
        for q in nets_of(a) {
            let start = universe
                .binary_search(&q)
                .expect("every named prefix is in the universe");
            let last = q.bounds().1;
            for (k, p) in universe.iter().enumerate().skip(start) {
                if p.bounds().0 > last {
                    break;
                }
                set.insert(k);
            }
        }
        set
    };
    let accepts = accepts(rules, dim, n, &atom);
    (universe, accepts)
}

fn prefixes<P: Prefix>(
    rules: &[Rule<'_>],
    dim: Dimension,
    interner: &mut Interner,
) -> Vec<(P, u32)> {
    let (universe, accepts) = prefix_accepts::<P>(rules, dim);
    let classes = classes(&accepts, universe.len(), interner);
    universe.into_iter().zip(classes).collect()
}

/// Where each part of the L4 universe starts, for `k` port intervals: the
/// TCP intervals, the UDP intervals, ICMP, ICMPv6, every other protocol;
/// `n` elements in all.
struct L4Layout {
    tcp: usize,
    udp: usize,
    icmp: usize,
    icmpv6: usize,
    other: usize,
    n: usize,
}

impl L4Layout {
    fn new(k: usize) -> Self {
        Self {
            tcp: 0,
            udp: k,
            icmp: 2 * k,
            icmpv6: 2 * k + 1,
            other: 2 * k + 2,
            n: 2 * k + 3,
        }
    }
}

/// The protocol + destination port dimension. Elements: the elementary port
/// intervals for TCP (their starts are returned), the same for UDP, then
/// ICMP, ICMPv6 and every other protocol.
pub(super) fn l4_accepts(rules: &[Rule<'_>]) -> (Vec<u32>, Accepts) {
    let mut starts: Vec<u32> = vec![0];
    for a in dimension_atoms(rules, Dimension::L4) {
        if let Atom::DstPort(ranges) = a {
            for r in ranges {
                starts.push(u32::from(r.first));
                starts.push(u32::from(r.last) + 1);
            }
        }
    }
    starts.retain(|&s| s <= 65535);
    starts.sort_unstable();
    starts.dedup();
    let k = starts.len();
    let L4Layout {
        tcp,
        udp,
        icmp,
        icmpv6,
        n,
        ..
    } = L4Layout::new(k);
    let interval = |port: u32| starts.partition_point(|&s| s <= port) - 1;
    let atom = |a: &Atom| {
        let mut set = FixedBitSet::with_capacity(n);
        match a {
            Atom::Protocol(ps) => {
                for p in ps {
                    match p {
                        Protocol::Tcp => set.insert_range(tcp..tcp + k),
                        Protocol::Udp => set.insert_range(udp..udp + k),
                        Protocol::Icmp => set.insert(icmp),
                        Protocol::Icmpv6 => set.insert(icmpv6),
                    }
                }
            }
            Atom::DstPort(ranges) => {
                for r in ranges {
                    let (first, last) = (interval(r.first.into()), interval(r.last.into()));
                    set.insert_range(tcp + first..tcp + last + 1);
                    set.insert_range(udp + first..udp + last + 1);
                }
            }
            _ => {}
        }
        set
    };
    let accepts = accepts(rules, Dimension::L4, n, &atom);
    (starts, accepts)
}

fn l4(rules: &[Rule<'_>], interner: &mut Interner) -> Vec<u32> {
    let (starts, accepts) = l4_accepts(rules);
    let L4Layout {
        tcp,
        udp,
        icmp,
        icmpv6,
        other,
        n,
    } = L4Layout::new(starts.len());
    let classes = classes(&accepts, n, interner);
    let mut slots = vec![0u32; PORT_SLOTS_PER_GEN as usize];
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(65536);
        for port in start..end {
            slots[(PORT_SLOT_TCP + port) as usize] = classes[tcp + i];
            slots[(PORT_SLOT_UDP + port) as usize] = classes[udp + i];
        }
    }
    slots[PORT_SLOT_ICMP as usize] = classes[icmp];
    slots[PORT_SLOT_ICMPV6 as usize] = classes[icmpv6];
    slots[PORT_SLOT_OTHER as usize] = classes[other];
    slots
}

/// The identity dimension: element 0 is "no identity", element `i + 1` is
/// `identities[i]`. Element 0 never satisfies a rule of a policy that
/// mentions identities, even through `not`.
pub(super) fn identity_accepts(rules: &[Rule<'_>], identities: &[Identity]) -> Accepts {
    let n = identities.len() + 1;
    // Rules share atoms (the same group in many policies): each distinct
    // one is evaluated over the identities once.
    let memo: std::cell::RefCell<HashMap<Atom, FixedBitSet>> = Default::default();
    let atom = |a: &Atom| {
        if let Some(set) = memo.borrow().get(a) {
            return set.clone();
        }
        let mut set = FixedBitSet::with_capacity(n);
        for (i, id) in identities.iter().enumerate() {
            let hit = match a {
                Atom::User(users) => users.iter().any(|u| u.eq_ignore_ascii_case(&id.user)),
                Atom::Group(groups) => groups.iter().any(|g| id.groups.contains(g)),
                Atom::Posture(tags) => tags.iter().any(|t| id.posture.contains(t)),
                _ => false,
            };
            set.set(i + 1, hit);
        }
        memo.borrow_mut().insert(a.clone(), set.clone());
        set
    };
    let mut accepts = accepts(rules, Dimension::Identity, n, &atom);
    for (accept, rule) in accepts.iter_mut().zip(rules) {
        if rule.requires_identity {
            accept.get_or_insert_with(|| full(n)).set(0, false);
        }
    }
    accepts
}

/// The identity class rows of `identities` under `set`, without compiling
/// the rest: what a session change needs for identities new to the
/// dataplane. Equal to the rows [`compile`] gives the same identities.
pub fn identity_rows(set: &PolicySet, identities: &[Identity]) -> Vec<ClassRow> {
    let rules = rules(set);
    let n = identities.len() + 1;
    let mut rows = rows(&identity_accepts(&rules, identities), n);
    rows.remove(0);
    rows
}

fn identity_classes(
    rules: &[Rule<'_>],
    identities: &[Identity],
    interner: &mut Interner,
) -> Vec<u32> {
    classes(
        &identity_accepts(rules, identities),
        identities.len() + 1,
        interner,
    )
}

/// The country dimension: element = country id, 0 (unknown) matches no
/// country condition.
pub(super) fn country_accepts(rules: &[Rule<'_>]) -> Accepts {
    let n = COUNTRY_SLOTS as usize;
    let atom = |a: &Atom| {
        let mut set = FixedBitSet::with_capacity(n);
        for id in 1..=geo::MAX_COUNTRY_ID {
            let (code, continent) = geo::by_id(id).expect("ids up to MAX_COUNTRY_ID exist");
            let hit = match a {
                Atom::Country(codes) => codes.contains(&code),
                Atom::Continent(cs) => cs.contains(&continent),
                _ => false,
            };
            set.set(usize::from(id), hit);
        }
        set
    };
    accepts(rules, Dimension::Country, n, &atom)
}

fn country_classes(rules: &[Rule<'_>], interner: &mut Interner) -> Vec<u32> {
    classes(&country_accepts(rules), COUNTRY_SLOTS as usize, interner)
}

fn lpm<P: Prefix>(table: &[(P, u32)], addr: u128) -> u32 {
    table
        .iter()
        .filter(|(net, _)| {
            let (first, last) = net.bounds();
            (first..=last).contains(&addr)
        })
        .min_by_key(|(net, _)| net.bounds().1 - net.bounds().0)
        .map(|(_, class)| *class)
        .expect("the /0 is always present")
}

/// The inputs of one classification, as the dataplane sees them.
#[derive(Clone, Copy, Debug)]
pub struct Lookup {
    pub flow: Flow,
    /// Identity id of the source (0 = none).
    pub identity: u32,
    /// Country id of the destination (0 = unknown).
    pub country: u16,
}

impl Compiled {
    /// Classify with the compiled tables, the way the dataplane does: the
    /// first matching rule, or [`NO_MATCH`].
    pub fn classify_rule(&self, lookup: &Lookup) -> u32 {
        let flow = &lookup.flow;
        let (src, dst) = match (flow.src, flow.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (
                lpm(&self.src4, u32::from(s).into()),
                lpm(&self.dst4, u32::from(d).into()),
            ),
            (s, d) => (
                lpm(&self.src6, u128::from(v6(s))),
                lpm(&self.dst6, u128::from(v6(d))),
            ),
        };
        let slot = egress_common::classify::port_slot(0, flow.proto, flow.dst_port);
        let rows = [
            &self.classes[src as usize],
            &self.classes[dst as usize],
            &self.classes[self.ports[slot as usize] as usize],
            &self.classes[self
                .identities
                .get(lookup.identity as usize)
                .copied()
                .unwrap_or(self.identities[0]) as usize],
            &self.classes[self.countries[usize::from(lookup.country)] as usize],
        ];
        first_match(&rows)
    }

    /// The policy index [`Self::classify_rule`] leads to, or `None` (default egress).
    pub fn classify(&self, lookup: &Lookup) -> Option<usize> {
        let rule = self.classify_rule(lookup);
        (rule != NO_MATCH).then(|| self.rules[rule as usize].policy as usize)
    }
}

fn v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::policy::{eval::Context, testing};

    fn check_against_reference(case: &testing::Case) -> Result<(), TestCaseError> {
        let compiled = compile(&case.set, &case.identities);
        let incremental = identity_rows(&case.set, &case.identities);
        for (i, row) in incremental.iter().enumerate() {
            prop_assert_eq!(
                row,
                &compiled.classes[compiled.identities[i + 1] as usize],
                "identity_rows must equal the compiled row of identity {}",
                i + 1
            );
        }
        for probe in &case.probes {
            let ctx = Context {
                flow: probe.flow,
                identity: probe.identity.map(|i| &case.identities[i as usize - 1]),
                country: probe.country.and_then(geo::by_id).map(|(c, _)| c),
            };
            let expected = case.set.first_match(&ctx);
            let got = compiled.classify(&Lookup {
                flow: probe.flow,
                identity: probe.identity.unwrap_or(0),
                country: probe.country.unwrap_or(0),
            });
            prop_assert_eq!(
                got,
                expected,
                "compiled tables must pick the reference's policy for {:?}",
                probe
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]
        #[test]
        fn compile_small_sets_match_reference(case in testing::case(24, 24)) {
            check_against_reference(&case)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn compile_large_sets_match_reference(case in testing::case(4096, 200)) {
            check_against_reference(&case)?;
        }
    }
}
