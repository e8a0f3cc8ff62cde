//! The two nftables baselines, generated from the same policy file the agent
//! runs: (b1) one NAT rule per policy in order, as most gateways are
//! configured; (b2) nftables at its best, a decision tree of interval maps
//! that needs two lookups whatever the number of policies, plus a flowtable
//! fast path for established flows where the kernel has one.
//!
//! Only IPv4 and what nftables can match are translated: source and
//! destination prefixes, protocols, destination ports. A policy on
//! identities, countries, marks or spread pools is refused with its name.
//! First-match order is kept exactly: (b1) by rule order, (b2) by resolving
//! overlaps while building the tree, so every map element is disjoint.
//! [`Plan::lookup`] evaluates the tree as the kernel will, for the bench's
//! self-check against the agent's reference evaluator.

use egress_tests::rng::Rng;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
};

use egress_agent::policy::{
    PolicySet,
    model::{Atom, Egress, Expr, PoolMode},
};

/// The name of both tables (one at a time is loaded).
pub const TABLE: &str = "egress_bench";
const TCP: u32 = 6;
const UDP: u32 = 17;

/// What happens to a flow's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Snat(Ipv4Addr),
    /// Leave the packet untouched.
    Bypass,
}

/// Sorted, disjoint, non-adjacent inclusive intervals.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Ranges(Vec<(u32, u32)>);

impl Ranges {
    fn full(max: u32) -> Self {
        Self(vec![(0, max)])
    }

    fn from_iter(items: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let mut v: Vec<(u32, u32)> = items.into_iter().collect();
        v.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            match out.last_mut() {
                Some(last) if u64::from(a) <= u64::from(last.1) + 1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Self(out)
    }

    fn intersect(&self, other: &Self) -> Self {
        let mut out = Vec::new();
        for &(a, b) in &self.0 {
            for &(c, d) in &other.0 {
                let (lo, hi) = (a.max(c), b.min(d));
                if lo <= hi {
                    out.push((lo, hi));
                }
            }
        }
        Self::from_iter(out)
    }

    fn contains(&self, x: u32) -> bool {
        self.0.iter().any(|&(a, b)| (a..=b).contains(&x))
    }

    fn is_full(&self, max: u32) -> bool {
        self.0 == [(0, max)]
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Src,
    Dst,
    Proto,
    Port,
}

const ADDR_MAX: u32 = u32::MAX;
const PROTO_MAX: u32 = 255;
const PORT_MAX: u32 = 65535;

/// One alternative of one policy, as sets of values per field.
#[derive(Clone, Debug)]
struct Rule {
    policy: String,
    src: Ranges,
    dst: Ranges,
    proto: Ranges,
    /// Full unless the policy names ports (then `proto` is within TCP/UDP).
    port: Ranges,
    outcome: Outcome,
}

impl Rule {
    fn matches(&self, src: u32, dst: u32, proto: u32, port: u32) -> bool {
        self.src.contains(src)
            && self.dst.contains(dst)
            && self.proto.contains(proto)
            && self.port.contains(port)
    }

    fn empty(&self) -> bool {
        [&self.src, &self.dst, &self.proto, &self.port]
            .iter()
            .any(|r| r.0.is_empty())
    }
}

/// The set of values one atom (or an `or` of atoms of one kind) allows.
fn atom_field(atom: &Atom, policy: &str) -> Result<(Field, Ranges), String> {
    let v4 = |nets: &[ipnet::IpNet]| {
        Ranges::from_iter(nets.iter().filter_map(|n| match n {
            ipnet::IpNet::V4(n) => Some((u32::from(n.network()), u32::from(n.broadcast()))),
            ipnet::IpNet::V6(_) => None,
        }))
    };
    Ok(match atom {
        Atom::SrcIp(nets) => (Field::Src, v4(nets)),
        Atom::DstIp(nets) => (Field::Dst, v4(nets)),
        Atom::Protocol(ps) => (
            Field::Proto,
            Ranges::from_iter(
                ps.iter()
                    .map(|p| (u32::from(p.number()), u32::from(p.number()))),
            ),
        ),
        Atom::DstPort(rs) => (
            Field::Port,
            Ranges::from_iter(rs.iter().map(|r| (u32::from(r.first), u32::from(r.last)))),
        ),
        other => {
            return Err(format!(
                "policy {policy:?} selects on {other:?}, which nftables cannot match"
            ));
        }
    })
}

fn field_of(expr: &Expr, policy: &str) -> Result<(Field, Ranges), String> {
    match expr {
        Expr::Atom(a) => atom_field(a, policy),
        Expr::Or(parts) => {
            let mut field = None;
            let mut all = Vec::new();
            for part in parts {
                let (f, r) = field_of(part, policy)?;
                if field.is_some_and(|g| g != f) {
                    return Err(format!(
                        "policy {policy:?}: an `or` across fields is not one nftables rule"
                    ));
                }
                field = Some(f);
                all.extend(r.0);
            }
            let field =
                field.ok_or_else(|| format!("policy {policy:?}: an empty `or` matches nothing"))?;
            Ok((field, Ranges::from_iter(all)))
        }
        _ => Err(format!(
            "policy {policy:?}: `not` and nested conditions are not translated to nftables"
        )),
    }
}

fn constrain(rule: &mut Rule, expr: &Expr) -> Result<(), String> {
    match expr {
        Expr::True => Ok(()),
        Expr::And(parts) => parts.iter().try_for_each(|p| constrain(rule, p)),
        _ => {
            let (field, ranges) = field_of(expr, &rule.policy)?;
            match field {
                Field::Src => rule.src = rule.src.intersect(&ranges),
                Field::Dst => rule.dst = rule.dst.intersect(&ranges),
                Field::Proto => rule.proto = rule.proto.intersect(&ranges),
                Field::Port => {
                    // Only TCP and UDP flows have ports.
                    rule.proto = rule
                        .proto
                        .intersect(&Ranges::from_iter([(TCP, TCP), (UDP, UDP)]));
                    rule.port = rule.port.intersect(&ranges);
                }
            }
            Ok(())
        }
    }
}

/// The policies as rules in evaluation order, and the default outcome.
struct Rules {
    rules: Vec<Rule>,
    default: Outcome,
}

fn rules(set: &PolicySet) -> Result<Rules, String> {
    let mut out = Vec::new();
    for policy in set.policies.iter().filter(|p| p.enabled) {
        let name = &policy.name;
        if policy.action.mark.is_some() {
            return Err(format!("policy {name:?} sets a mark; not translated"));
        }
        let outcome = match policy.action.egress {
            Egress::Default => Outcome::Snat(set.default_egress.ipv4),
            Egress::Bypass => Outcome::Bypass,
            Egress::Pool(i) => {
                let pool = &set.pools[i];
                if pool.mode == PoolMode::Spread && pool.ipv4.len() > 1 {
                    return Err(format!(
                        "policy {name:?}: pool {:?} spreads flows; not translated",
                        pool.name
                    ));
                }
                // Failover: the primary, as the agent picks while it is up.
                match pool.ipv4.first() {
                    Some(a) => Outcome::Snat(*a),
                    None => continue,
                }
            }
        };
        for conj in &policy.rules {
            let mut rule = Rule {
                policy: name.clone(),
                src: Ranges::full(ADDR_MAX),
                dst: Ranges::full(ADDR_MAX),
                proto: Ranges::full(PROTO_MAX),
                port: Ranges::full(PORT_MAX),
                outcome,
            };
            for pred in conj.preds.values() {
                constrain(&mut rule, pred)?;
            }
            if !rule.empty() {
                out.push(rule);
            }
        }
    }
    Ok(Rules {
        rules: out,
        default: Outcome::Snat(set.default_egress.ipv4),
    })
}

fn addr_range(a: u32, b: u32) -> String {
    let size = u64::from(b) - u64::from(a) + 1;
    if size.is_power_of_two() && u64::from(a) % size == 0 {
        let len = 32 - size.trailing_zeros();
        if len == 32 {
            return Ipv4Addr::from(a).to_string();
        }
        return format!("{}/{len}", Ipv4Addr::from(a));
    }
    format!("{}-{}", Ipv4Addr::from(a), Ipv4Addr::from(b))
}

fn num_range(a: u32, b: u32) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}-{b}")
    }
}

fn set_of(items: Vec<String>) -> String {
    if items.len() == 1 {
        items.into_iter().next().expect("one item")
    } else {
        format!("{{ {} }}", items.join(", "))
    }
}

fn statement(outcome: Outcome) -> String {
    match outcome {
        Outcome::Snat(a) => format!("snat ip to {a}"),
        Outcome::Bypass => "accept".into(),
    }
}

/// (b1): one rule per policy (per alternative of its condition), in order,
/// in the NAT chain; conntrack applies the translation to the rest of the
/// flow.
pub fn linear(set: &PolicySet, uplink: &str) -> Result<String, String> {
    let Rules { rules, default } = rules(set)?;
    let mut out = format!(
        "table ip {TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname != \"{uplink}\" accept\n"
    );
    for rule in &rules {
        let mut m = Vec::new();
        if !rule.src.is_full(ADDR_MAX) {
            m.push(format!(
                "ip saddr {}",
                set_of(rule.src.0.iter().map(|&(a, b)| addr_range(a, b)).collect())
            ));
        }
        if !rule.dst.is_full(ADDR_MAX) {
            m.push(format!(
                "ip daddr {}",
                set_of(rule.dst.0.iter().map(|&(a, b)| addr_range(a, b)).collect())
            ));
        }
        let protos = set_of(
            rule.proto
                .0
                .iter()
                .map(|&(a, b)| proto_range(a, b))
                .collect(),
        );
        if !rule.port.is_full(PORT_MAX) {
            let ports = set_of(rule.port.0.iter().map(|&(a, b)| num_range(a, b)).collect());
            match protos.as_str() {
                "tcp" | "udp" => m.push(format!("{protos} dport {ports}")),
                _ => m.push(format!("meta l4proto {protos} th dport {ports}")),
            }
        } else if !rule.proto.is_full(PROTO_MAX) {
            m.push(format!("meta l4proto {protos}"));
        }
        let _ = writeln!(out, "    # {}", rule.policy.replace('\n', " "));
        m.push(statement(rule.outcome));
        let _ = writeln!(out, "    {}", m.join(" "));
    }
    let _ = writeln!(out, "    # no policy matched: the default egress");
    let _ = writeln!(out, "    {}\n  }}\n}}", statement(default));
    Ok(out)
}

fn proto_range(a: u32, b: u32) -> String {
    match (a, b) {
        (TCP, TCP) => "tcp".into(),
        (UDP, UDP) => "udp".into(),
        (1, 1) => "icmp".into(),
        _ => num_range(a, b),
    }
}

/// Elementary intervals of `0..=max` cut at every start and end of `sets`.
fn cells<'a>(sets: impl Iterator<Item = &'a Ranges>, max: u32, extra: &[u32]) -> Vec<(u32, u32)> {
    let mut cuts: BTreeSet<u64> = BTreeSet::from([0, u64::from(max) + 1]);
    for r in sets {
        for &(a, b) in &r.0 {
            cuts.insert(u64::from(a));
            cuts.insert(u64::from(b) + 1);
        }
    }
    cuts.extend(extra.iter().map(|&x| u64::from(x)));
    let cuts: Vec<u64> = cuts.into_iter().collect();
    cuts.windows(2)
        .map(|w| (w[0] as u32, (w[1] - 1) as u32))
        .collect()
}

/// Adjacent entries with the same value merged.
fn merge<T: PartialEq + Clone>(items: Vec<((u32, u32), T)>) -> Vec<((u32, u32), T)> {
    let mut out: Vec<((u32, u32), T)> = Vec::new();
    for (r, v) in items {
        match out.last_mut() {
            Some((last, lv)) if *lv == v => last.1 = r.1,
            _ => out.push((r, v)),
        }
    }
    out
}

/// An inclusive interval of a field's values.
type Span = (u32, u32);
/// A TCP/UDP element: source, protocol (`None`: both alike), port, outcome.
type PortedElement = (Span, Option<u32>, Span, Outcome);
/// An element for other protocols: source, protocol range, outcome.
type OtherElement = (Span, Span, Outcome);

/// What one class (a set of destinations the same policies cover) does,
/// resolved to disjoint elements.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Class {
    /// Every flow: one outcome.
    Uniform(Outcome),
    Split {
        /// TCP/UDP: per source cell, per protocol (`None`: both alike),
        /// per port range.
        ported: Vec<PortedElement>,
        /// Other protocols: per source cell, per protocol range (TCP and
        /// UDP never reach this lookup, so ranges may span them).
        other: Vec<OtherElement>,
        with_src: bool,
        with_proto: bool,
    },
}

fn first_match(rules: &[&Rule], default: Outcome, src: u32, proto: u32, port: u32) -> Outcome {
    rules
        .iter()
        .find(|r| r.src.contains(src) && r.proto.contains(proto) && r.port.contains(port))
        .map_or(default, |r| r.outcome)
}

fn resolve(rules: &[&Rule], default: Outcome) -> Class {
    let srcs = cells(rules.iter().map(|r| &r.src), ADDR_MAX, &[]);
    let protos = cells(
        rules.iter().map(|r| &r.proto),
        PROTO_MAX,
        &[TCP, TCP + 1, UDP, UDP + 1],
    );
    let ports = cells(rules.iter().map(|r| &r.port), PORT_MAX, &[]);
    let with_src = srcs.len() > 1;
    let mut per_src = Vec::new();
    for &(s, _) in &srcs {
        let lists: Vec<Vec<((u32, u32), Outcome)>> = [TCP, UDP]
            .iter()
            .map(|&p| {
                merge(
                    ports
                        .iter()
                        .map(|&(a, b)| ((a, b), first_match(rules, default, s, p, a)))
                        .collect(),
                )
            })
            .collect();
        let other = merge(
            protos
                .iter()
                .filter(|&&(a, _)| a != TCP && a != UDP)
                .map(|&(a, b)| ((a, b), first_match(rules, default, s, a, 0)))
                .collect(),
        );
        per_src.push((lists, other));
    }
    let with_proto = per_src.iter().any(|(l, _)| l[0] != l[1]);
    let mut ported = Vec::new();
    let mut other = Vec::new();
    // Neighbouring source cells that behave alike become one element.
    let mut i = 0;
    while i < srcs.len() {
        let mut j = i;
        while j + 1 < srcs.len() && per_src[j + 1] == per_src[i] {
            j += 1;
        }
        let range = (srcs[i].0, srcs[j].1);
        let (lists, others) = &per_src[i];
        if with_proto {
            for (k, p) in [TCP, UDP].into_iter().enumerate() {
                for &(pr, o) in &lists[k] {
                    ported.push((range, Some(p), pr, o));
                }
            }
        } else {
            for &(pr, o) in &lists[0] {
                ported.push((range, None, pr, o));
            }
        }
        // Stretch the other-protocol ranges over the TCP/UDP gaps.
        let mut stretched: Vec<((u32, u32), Outcome)> = Vec::new();
        for &(r, o) in others {
            match stretched.last_mut() {
                Some((last, lo)) if *lo == o => last.1 = r.1,
                _ => stretched.push((r, o)),
            }
        }
        for (r, o) in stretched {
            other.push((range, r, o));
        }
        i = j + 1;
    }
    let all: BTreeSet<Outcome> = ported
        .iter()
        .map(|e| e.3)
        .chain(other.iter().map(|e| e.2))
        .collect();
    if all.len() == 1 {
        return Class::Uniform(*all.iter().next().expect("one outcome"));
    }
    Class::Split {
        ported,
        other,
        with_src,
        with_proto,
    }
}

/// (b2) before rendering: destination intervals, each pointing at a class.
pub struct Plan {
    dst: Vec<((u32, u32), usize)>,
    classes: Vec<Class>,
}

impl Plan {
    pub fn build(set: &PolicySet) -> Result<Self, String> {
        let Rules { rules, default } = rules(set)?;
        // Sweep the destination space: at every cell, the rules whose
        // destinations cover it, in policy order.
        let mut starts: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        let mut ends: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, r) in rules.iter().enumerate() {
            for &(a, b) in &r.dst.0 {
                starts.entry(u64::from(a)).or_default().push(i);
                ends.entry(u64::from(b) + 1).or_default().push(i);
            }
        }
        let dst_cells = cells(rules.iter().map(|r| &r.dst), ADDR_MAX, &[]);
        let mut active: BTreeMap<usize, usize> = BTreeMap::new();
        let mut ids: HashMap<Class, usize> = HashMap::new();
        let mut classes = Vec::new();
        let mut dst = Vec::new();
        for (a, b) in dst_cells {
            for i in ends.get(&u64::from(a)).into_iter().flatten() {
                let n = active.get_mut(i).expect("ended rule was active");
                *n -= 1;
                if *n == 0 {
                    active.remove(i);
                }
            }
            for &i in starts.get(&u64::from(a)).into_iter().flatten() {
                *active.entry(i).or_default() += 1;
            }
            let here: Vec<&Rule> = active.keys().map(|&i| &rules[i]).collect();
            let class = resolve(&here, default);
            let id = *ids.entry(class.clone()).or_insert_with(|| {
                classes.push(class);
                classes.len() - 1
            });
            dst.push(((a, b), id));
        }
        Ok(Self {
            dst: merge(dst),
            classes,
        })
    }

    /// What the ruleset decides for a flow's first packet (ports are
    /// ignored for protocols without them).
    pub fn lookup(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, port: u16) -> Outcome {
        let (s, d, p) = (u32::from(src), u32::from(dst), u32::from(proto));
        let port = u32::from(port);
        let at = self.dst.partition_point(|((_, b), _)| *b < d);
        let id = self.dst[at].1;
        match &self.classes[id] {
            Class::Uniform(o) => *o,
            Class::Split { ported, other, .. } => {
                if p == TCP || p == UDP {
                    ported
                        .iter()
                        .find(|(sr, pp, pr, _)| {
                            (sr.0..=sr.1).contains(&s)
                                && pp.is_none_or(|x| x == p)
                                && (pr.0..=pr.1).contains(&port)
                        })
                        .expect("the port map covers every TCP/UDP flow")
                        .3
                } else {
                    other
                        .iter()
                        .find(|(sr, pr, _)| {
                            (sr.0..=sr.1).contains(&s) && (pr.0..=pr.1).contains(&p)
                        })
                        .expect("the protocol map covers every other flow")
                        .2
                }
            }
        }
    }

    /// Elements in the destination map and distinct classes.
    pub fn size(&self) -> (usize, usize) {
        (self.dst.len(), self.classes.len())
    }

    /// The ruleset: a flowtable for established TCP/UDP flows (when
    /// `flowtable` is set; the kernel may lack it), the destination
    /// verdict map, and per class an interval map from (source,)
    /// (protocol,) port to the translated address (`snat ... map`) or to a
    /// verdict where the class also bypasses.
    pub fn render(&self, uplink: &str, lan: &str, flowtable: bool) -> String {
        let mut out = format!("table ip {TABLE} {{\n");
        if flowtable {
            let _ = writeln!(
                out,
                "  flowtable ft {{\n    hook ingress priority filter; devices = {{ \"{lan}\", \"{uplink}\" }};\n  }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    meta l4proto {{ tcp, udp }} flow add @ft\n  }}"
            );
        }
        // Every address a verdict map may jump to gets a one-rule chain.
        let mut targets: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let mut chains = String::new();
        let verdict = |o: Outcome, targets: &mut BTreeSet<Ipv4Addr>| match o {
            Outcome::Snat(a) => {
                targets.insert(a);
                format!("goto to_{}", a.to_string().replace('.', "_"))
            }
            Outcome::Bypass => "accept".into(),
        };
        let mut class_verdicts = Vec::with_capacity(self.classes.len());
        for (id, class) in self.classes.iter().enumerate() {
            match class {
                Class::Uniform(o) => class_verdicts.push(verdict(*o, &mut targets)),
                Class::Split {
                    ported,
                    other,
                    with_src,
                    with_proto,
                } => {
                    class_verdicts.push(format!("goto cls{id}"));
                    let mut body = String::new();
                    // TCP and UDP: one lookup keyed on what this class needs.
                    let mut key_type = Vec::new();
                    let mut key = Vec::new();
                    if *with_src {
                        key_type.push("ipv4_addr");
                        key.push("ip saddr");
                    }
                    if *with_proto {
                        key_type.push("inet_proto");
                        key.push("meta l4proto");
                    }
                    key_type.push("inet_service");
                    key.push("th dport");
                    let elements: Vec<(String, Outcome)> = ported
                        .iter()
                        .map(|(s, p, port, o)| {
                            let mut k = Vec::new();
                            if *with_src {
                                k.push(addr_range(s.0, s.1));
                            }
                            if let Some(p) = p {
                                k.push(proto_range(*p, *p));
                            }
                            k.push(num_range(port.0, port.1));
                            (k.join(" . "), *o)
                        })
                        .collect();
                    map_rule(
                        &mut chains,
                        &mut body,
                        &format!("cls{id}_ports"),
                        "meta l4proto { tcp, udp }",
                        &key_type,
                        &key,
                        &elements,
                        &mut targets,
                    );
                    let mut key_type = Vec::new();
                    let mut key = Vec::new();
                    if *with_src {
                        key_type.push("ipv4_addr");
                        key.push("ip saddr");
                    }
                    key_type.push("inet_proto");
                    key.push("meta l4proto");
                    let elements: Vec<(String, Outcome)> = other
                        .iter()
                        .map(|(s, p, o)| {
                            let mut k = Vec::new();
                            if *with_src {
                                k.push(addr_range(s.0, s.1));
                            }
                            k.push(num_range(p.0, p.1));
                            (k.join(" . "), *o)
                        })
                        .collect();
                    map_rule(
                        &mut chains,
                        &mut body,
                        &format!("cls{id}_other"),
                        "",
                        &key_type,
                        &key,
                        &elements,
                        &mut targets,
                    );
                    let _ = writeln!(chains, "  chain cls{id} {{\n{body}  }}");
                }
            }
        }
        for a in &targets {
            let _ = writeln!(
                out,
                "  chain to_{} {{\n    snat ip to {a}\n  }}",
                a.to_string().replace('.', "_")
            );
        }
        out.push_str(&chains);
        let elements: Vec<String> = self
            .dst
            .iter()
            .map(|((a, b), id)| format!("{} : {}", addr_range(*a, *b), class_verdicts[*id]))
            .collect();
        let _ = writeln!(
            out,
            "  map by_dst {{\n    type ipv4_addr : verdict; flags interval;\n    elements = {{ {} }}\n  }}",
            elements.join(",\n      ")
        );
        let _ = writeln!(
            out,
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"{uplink}\" ip daddr vmap @by_dst\n  }}\n}}"
        );
        out
    }
}

/// One lookup of a class: a direct statement when every element agrees,
/// `snat ip to <key> map @m` when all elements translate, else a verdict map.
#[expect(
    clippy::too_many_arguments,
    reason = "one rendering step with its context"
)]
fn map_rule(
    maps: &mut String,
    body: &mut String,
    name: &str,
    guard: &str,
    key_type: &[&str],
    key: &[&str],
    elements: &[(String, Outcome)],
    targets: &mut BTreeSet<Ipv4Addr>,
) {
    let guard = if guard.is_empty() {
        String::new()
    } else {
        format!("{guard} ")
    };
    let distinct: BTreeSet<Outcome> = elements.iter().map(|e| e.1).collect();
    // The elements cover the whole key space, so one outcome needs no lookup.
    if distinct.len() == 1 {
        let _ = writeln!(
            body,
            "    {guard}{}",
            statement(*distinct.iter().next().expect("one"))
        );
        return;
    }
    let all_snat = distinct.iter().all(|o| matches!(o, Outcome::Snat(_)));
    let value_type = if all_snat { "ipv4_addr" } else { "verdict" };
    let values: Vec<String> = elements
        .iter()
        .map(|(k, o)| {
            let v = match o {
                Outcome::Snat(a) if all_snat => a.to_string(),
                Outcome::Snat(a) => {
                    targets.insert(*a);
                    format!("goto to_{}", a.to_string().replace('.', "_"))
                }
                Outcome::Bypass => "accept".into(),
            };
            format!("{k} : {v}")
        })
        .collect();
    let _ = writeln!(
        maps,
        "  map {name} {{\n    type {} : {value_type}; flags interval;\n    elements = {{ {} }}\n  }}",
        key_type.join(" . "),
        values.join(",\n      ")
    );
    if all_snat {
        let _ = writeln!(
            body,
            "    {guard}snat ip to {} map @{name}",
            key.join(" . ")
        );
    } else {
        let _ = writeln!(body, "    {guard}{} vmap @{name}", key.join(" . "));
    }
}

/// Compare the tree with the agent's reference evaluator (first match over
/// the policy list) on `n` flows: the measured one, flows to every decoy
/// prefix's edges, and random ones. Returns the first disagreement.
pub fn self_check(set: &PolicySet, plan: &Plan, n: usize) -> Result<(), String> {
    use egress_agent::policy::eval::{Context, Flow};
    let Rules { rules, .. } = rules(set)?;
    let mut rng = Rng::new(0x1234_5678_9abc_def1);
    let edges: Vec<u32> = rules
        .iter()
        .flat_map(|r| {
            r.dst
                .0
                .iter()
                .flat_map(|&(a, b)| [a, b, a.wrapping_sub(1), b.wrapping_add(1)])
        })
        .collect();
    let port_edges: Vec<u32> = rules
        .iter()
        .flat_map(|r| {
            r.port
                .0
                .iter()
                .flat_map(|&(a, b)| [a, b, a.wrapping_sub(1), b + 1])
        })
        .filter(|&p| p <= PORT_MAX)
        .collect();
    for k in 0..n {
        let r = rng.u64();
        let dst = if !edges.is_empty() && k % 2 == 0 {
            edges[(r % edges.len() as u64) as usize]
        } else {
            (r >> 16) as u32
        };
        let proto = [TCP, UDP, TCP, UDP, 1, 47][((r >> 8) % 6) as usize];
        let port = if !port_edges.is_empty() && k % 3 != 0 {
            port_edges[((r >> 24) % port_edges.len() as u64) as usize]
        } else {
            ((r >> 40) & 0xffff) as u32
        };
        let port = if proto == TCP || proto == UDP {
            port
        } else {
            0
        };
        let src = Ipv4Addr::from(0x0a0a_0002 + ((r >> 48) as u32 & 0xff));
        let dst = Ipv4Addr::from(dst);
        let flow = Flow {
            src: IpAddr::V4(src),
            dst: IpAddr::V4(dst),
            proto: proto as u8,
            dst_port: port as u16,
        };
        let expected = match set.first_match(&Context::new(flow)) {
            None => Outcome::Snat(set.default_egress.ipv4),
            Some(i) => {
                let linear = rules
                    .iter()
                    .find(|r| r.matches(u32::from(src), u32::from(dst), proto, port))
                    .map_or(Outcome::Snat(set.default_egress.ipv4), |r| r.outcome);
                let want = match set.policies[i].action.egress {
                    Egress::Default => Outcome::Snat(set.default_egress.ipv4),
                    Egress::Bypass => Outcome::Bypass,
                    Egress::Pool(p) => Outcome::Snat(set.pools[p].ipv4[0]),
                };
                if linear != want {
                    return Err(format!(
                        "the linear rules give {linear:?} for {flow:?}, the agent's evaluator {want:?}"
                    ));
                }
                want
            }
        };
        let got = plan.lookup(src, dst, proto as u8, port as u16);
        if got != expected {
            return Err(format!(
                "the map tree gives {got:?} for {flow:?}, the agent's evaluator {expected:?}"
            ));
        }
    }
    Ok(())
}
