//! Proptest strategies for random policy sets (all selector kinds, `or`
//! and `not` across dimensions), identities, and flows aimed at them;
//! shared by the compiler's property test and the kernel packet tests.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::{collection::vec, prelude::*, sample::select};

use super::{
    dnf,
    eval::Flow,
    geo,
    model::{
        Action, Atom, Continent, DefaultEgress, Egress, Expr, Identity, Nat, Policy, PolicySet,
        Pool, PortRange, Protocol,
    },
};

const USERS: [&str; 4] = [
    "alice@example.com",
    "bob@example.com",
    "carol@example.com",
    "dave@example.com",
];
const GROUPS: [&str; 3] = ["finance", "marketing", "eng"];
const POSTURE: [&str; 3] = ["compliant", "disk-encrypted", "firewall"];
const COUNTRIES: [&str; 6] = ["PT", "IN", "US", "GB", "BR", "JP"];

/// IPv4 prefixes drawn from a small universe so that policies overlap,
/// nest and repeat, which is where classification goes wrong.
fn prefix4() -> impl Strategy<Value = Ipv4Net> {
    (
        select(vec![10u8, 192, 198, 203]),
        0u8..4,
        0u8..4,
        any::<u8>(),
        select(vec![0u8, 8, 12, 16, 20, 24, 26, 30, 32]),
    )
        .prop_map(|(a, b, c, d, len)| {
            Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len)
                .unwrap()
                .trunc()
        })
}

fn prefix6() -> impl Strategy<Value = Ipv6Net> {
    (
        0u16..4,
        0u16..3,
        any::<u16>(),
        select(vec![0u8, 32, 48, 64, 120, 128]),
    )
        .prop_map(|(x, y, z, len)| {
            Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, x, y, 0, 0, 0, z), len)
                .unwrap()
                .trunc()
        })
}

fn nets() -> impl Strategy<Value = Vec<IpNet>> {
    vec(
        prop_oneof![3 => prefix4().prop_map(IpNet::V4), 2 => prefix6().prop_map(IpNet::V6)],
        1..3,
    )
}

fn port_range() -> impl Strategy<Value = PortRange> {
    prop_oneof![
        select(vec![22u16, 53, 80, 443, 8080]).prop_map(|p| PortRange { first: p, last: p }),
        (0u16..2000, 0u16..3000).prop_map(|(a, len)| PortRange {
            first: a,
            last: a.saturating_add(len)
        }),
        Just(PortRange {
            first: 0,
            last: 65535
        }),
    ]
}

fn names(pool: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    proptest::sample::subsequence(pool.to_vec(), 1..=2)
        .prop_map(|v| v.into_iter().map(str::to_owned).collect())
}

fn atom() -> impl Strategy<Value = Atom> {
    prop_oneof![
        3 => nets().prop_map(Atom::SrcIp),
        3 => nets().prop_map(Atom::DstIp),
        2 => proptest::sample::subsequence(Protocol::ALL.to_vec(), 1..=2).prop_map(Atom::Protocol),
        2 => vec(port_range(), 1..3).prop_map(Atom::DstPort),
        1 => names(&USERS).prop_map(Atom::User),
        1 => names(&GROUPS).prop_map(Atom::Group),
        1 => names(&POSTURE).prop_map(Atom::Posture),
        1 => proptest::sample::subsequence(COUNTRIES.to_vec(), 1..=2)
            .prop_map(|cs| Atom::Country(cs.iter().map(|c| geo::lookup(c).unwrap().0).collect())),
        1 => proptest::sample::subsequence(Continent::ALL.to_vec(), 1..=2).prop_map(Atom::Continent),
    ]
}

/// Conditions of depth at most 3: mostly conjunctions of atoms (what a
/// selector object gives), with `or` and `not` anywhere.
fn expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        8 => atom().prop_map(Expr::Atom),
        1 => Just(Expr::True),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            4 => vec(inner.clone(), 2..4).prop_map(Expr::And),
            2 => vec(inner.clone(), 2..3).prop_map(Expr::Or),
            1 => inner.prop_map(|e| Expr::Not(Box::new(e))),
        ]
    })
}

fn identity() -> impl Strategy<Value = Identity> {
    (
        select(USERS.to_vec()),
        proptest::sample::subsequence(GROUPS.to_vec(), 0..=3),
        proptest::sample::subsequence(POSTURE.to_vec(), 0..=3),
    )
        .prop_map(|(user, groups, posture)| Identity {
            user: user.to_owned(),
            groups: groups
                .into_iter()
                .map(str::to_owned)
                .collect::<BTreeSet<_>>(),
            posture: posture.into_iter().map(str::to_owned).collect(),
        })
}

/// A policy set of up to `max_policies` policies over three pools, whose
/// rules stay within the classifier's capacity.
pub fn policy_set(max_policies: usize) -> impl Strategy<Value = PolicySet> {
    vec(
        (
            expr(),
            any::<bool>(),
            0u8..10,
            proptest::option::of(any::<u32>()),
        ),
        0..=max_policies,
    )
    .prop_map(|raw| {
        let mut policies = Vec::new();
        let mut rules_total = 0;
        for (i, (matcher, coin, egress, mark)) in raw.into_iter().enumerate() {
            let Ok(rules) = dnf::normalize(&matcher) else {
                continue;
            };
            // Mostly enabled; a disabled policy must never match.
            let enabled = !(coin && egress == 0);
            if enabled {
                if rules_total + rules.len() > egress_common::classify::MAX_POLICIES as usize {
                    break;
                }
                rules_total += rules.len();
            }
            policies.push(Policy {
                name: format!("p{i}"),
                description: None,
                enabled,
                matcher,
                rules,
                action: Action {
                    egress: match egress {
                        0..=2 => Egress::Pool(egress as usize),
                        3 => Egress::Bypass,
                        _ => Egress::Default,
                    },
                    mark,
                },
            });
        }
        PolicySet {
            pools: (0..3)
                .map(|i| Pool {
                    name: format!("pool{i}"),
                    ipv4: vec![Ipv4Addr::new(203, 0, 113, 10 + i)],
                    ipv6: Some(
                        Ipv6Net::new(
                            Ipv6Addr::new(0x2001, 0xdb8, 0xe0, u16::from(i), 0, 0, 0, 0),
                            64,
                        )
                        .unwrap(),
                    ),
                    mode: Default::default(),
                    when_down: Default::default(),
                    interface: None,
                })
                .collect(),
            default_egress: DefaultEgress {
                ipv4: Ipv4Addr::new(203, 0, 113, 1),
                ipv6: Some(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1)),
            },
            policies,
            nat: Nat::default(),
            timeouts: Default::default(),
            health: Default::default(),
        }
    })
}

/// One classification input: a flow and what the gateway knows about it.
#[derive(Clone, Debug)]
pub struct Probe {
    pub flow: Flow,
    /// Identity id of the source (index into the case's identities + 1).
    pub identity: Option<u32>,
    /// Country id of the destination.
    pub country: Option<u16>,
}

/// A policy set, the identities known to the gateway, and probes.
#[derive(Clone, Debug)]
pub struct Case {
    pub set: PolicySet,
    pub identities: Vec<Identity>,
    pub probes: Vec<Probe>,
}

fn addr_in(net: Option<&IpNet>, seed: u128, v6: bool) -> IpAddr {
    match (net, v6) {
        (Some(IpNet::V4(n)), false) => IpAddr::V4(Ipv4Addr::from(
            u32::from(n.network()) | (seed as u32 & u32::from(n.hostmask())),
        )),
        (Some(IpNet::V6(n)), true) => IpAddr::V6(Ipv6Addr::from(
            u128::from(n.network()) | (seed & u128::from(n.hostmask())),
        )),
        (_, false) => IpAddr::V4(Ipv4Addr::from(seed as u32)),
        (_, true) => IpAddr::V6(Ipv6Addr::from(
            0x2001_0db8u128 << 96 | (seed & 0xffff_ffff_ffff),
        )),
    }
}

/// Flows aimed at the prefixes and ports of `set` (and some anywhere), IPv4
/// and IPv6, with and without identity and country.
pub fn probes(
    set: &PolicySet,
    identities: usize,
    count: usize,
) -> impl Strategy<Value = Vec<Probe>> + use<> {
    let mut nets: Vec<IpNet> = Vec::new();
    for atom in set.policies.iter().flat_map(|p| p.matcher.atoms()) {
        if let Atom::SrcIp(n) | Atom::DstIp(n) = atom {
            nets.extend(n);
        }
    }
    let ports: Vec<u16> = [0, 22, 53, 80, 443, 1999, 2000, 3000, 8080, 65535].to_vec();
    let countries: Vec<u16> = COUNTRIES
        .iter()
        .map(|c| geo::country_id(geo::lookup(c).unwrap().0).unwrap())
        .chain([0, 1, 200])
        .collect();
    vec(
        (
            any::<(u128, u128, u32, u32, bool)>(),
            select(vec![6u8, 17, 1, 58, 47]),
            select(ports),
            proptest::option::weighted(0.7, 1..=identities.max(1) as u32),
            select(countries),
        ),
        1..=count,
    )
    .prop_map(move |raw| {
        raw.into_iter()
            .map(
                |((a, b, pick_src, pick_dst, v6), proto, dst_port, identity, country)| {
                    let pick = |p: u32| {
                        let family: Vec<&IpNet> = nets
                            .iter()
                            .filter(|n| matches!(n, IpNet::V6(_)) == v6)
                            .collect();
                        (!family.is_empty() && !p.is_multiple_of(4))
                            .then(|| family[p as usize % family.len()])
                    };
                    Probe {
                        flow: Flow {
                            src: addr_in(pick(pick_src), a, v6),
                            dst: addr_in(pick(pick_dst), b, v6),
                            proto,
                            dst_port: if proto == 6 || proto == 17 {
                                dst_port
                            } else {
                                0
                            },
                        },
                        identity: identity.filter(|_| identities > 0),
                        country: (country != 0).then_some(country),
                    }
                },
            )
            .collect()
    })
}

/// A whole property-test case.
pub fn case(max_policies: usize, max_probes: usize) -> impl Strategy<Value = Case> {
    (policy_set(max_policies), vec(identity(), 0..6)).prop_flat_map(move |(set, identities)| {
        let probes = probes(&set, identities.len(), max_probes);
        (Just(set), Just(identities), probes).prop_map(|(set, identities, probes)| Case {
            set,
            identities,
            probes,
        })
    })
}
