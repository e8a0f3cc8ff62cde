//! Proptest strategies for random policy sets and flows that exercise them,
//! shared by the compiler's property test and the kernel packet tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::{collection::vec, prelude::*, sample::select};

use super::{
    eval::Flow,
    model::{
        Action, DefaultEgress, Egress, Nat, Policy, PolicySet, Pool, PortRange, Protocol, Selector,
    },
};

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
    (0u16..4, select(vec![0u8, 32, 48, 64, 128])).prop_map(|(x, len)| {
        Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, x, 0, 0, 0, 0, 1), len)
            .unwrap()
            .trunc()
    })
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        6 => prefix4().prop_map(IpNet::V4),
        1 => prefix6().prop_map(IpNet::V6),
    ]
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

fn selector() -> impl Strategy<Value = Selector> {
    (
        vec(net(), 0..3),
        vec(net(), 0..3),
        proptest::sample::subsequence(Protocol::ALL.to_vec(), 0..=2),
        vec(port_range(), 0..3),
    )
        .prop_map(|(src, dst, protocols, dst_ports)| Selector {
            src,
            dst,
            protocols,
            dst_ports,
        })
}

/// A policy set of up to `max_policies` policies over three pools.
pub fn policy_set(max_policies: usize) -> impl Strategy<Value = PolicySet> {
    vec(
        (
            selector(),
            any::<bool>(),
            0u8..10,
            proptest::option::of(any::<u32>()),
        ),
        0..=max_policies,
    )
    .prop_map(|policies| PolicySet {
        pools: (0..3)
            .map(|i| Pool {
                name: format!("pool{i}"),
                ipv4: vec![Ipv4Addr::new(203, 0, 113, 10 + i)],
                ipv6: None,
            })
            .collect(),
        default_egress: DefaultEgress {
            ipv4: Ipv4Addr::new(203, 0, 113, 1),
            ipv6: None,
        },
        policies: policies
            .into_iter()
            .enumerate()
            .map(|(i, (selector, disabled_coin, egress, mark))| Policy {
                name: format!("p{i}"),
                description: None,
                // Mostly enabled; a disabled policy must never match.
                enabled: !(disabled_coin && egress == 0),
                selector,
                action: Action {
                    egress: match egress {
                        0..=2 => Egress::Pool(egress as usize),
                        3 => Egress::Bypass,
                        _ => Egress::Default,
                    },
                    mark,
                },
            })
            .collect(),
        nat: Nat::default(),
    })
}

/// An address inside `net` chosen by `seed` (or anywhere when it is IPv6).
fn addr_in(net: Option<&IpNet>, seed: u32) -> Ipv4Addr {
    match net {
        Some(IpNet::V4(n)) => {
            let host_bits = 32 - u32::from(n.prefix_len());
            let mask = if host_bits == 32 {
                u32::MAX
            } else {
                (1u32 << host_bits) - 1
            };
            Ipv4Addr::from(u32::from(n.network()) | (seed & mask))
        }
        _ => Ipv4Addr::from(seed),
    }
}

/// IPv4 flows aimed at the prefixes and ports of `set` (and some anywhere).
pub fn flows(set: &PolicySet, count: usize) -> impl Strategy<Value = Vec<Flow>> + use<> {
    let nets: Vec<IpNet> = set
        .policies
        .iter()
        .flat_map(|p| p.selector.src.iter().chain(&p.selector.dst).copied())
        .collect();
    let ports: Vec<u16> = set
        .policies
        .iter()
        .flat_map(|p| {
            p.selector
                .dst_ports
                .iter()
                .flat_map(|r| [r.first, r.last, r.last.wrapping_add(1)])
        })
        .chain([0, 443, 65535])
        .collect();
    let nets_len = nets.len();
    vec(
        (
            any::<(u32, u32, u32, u32)>(),
            select(vec![6u8, 17, 1, 58, 47]),
            select(ports),
        ),
        1..=count,
    )
    .prop_map(move |raw| {
        raw.into_iter()
            .map(|((a, b, pick_src, pick_dst), proto, dst_port)| {
                let pick = |p: u32| {
                    (nets_len > 0 && !p.is_multiple_of(4)).then(|| &nets[p as usize % nets_len])
                };
                Flow {
                    src: IpAddr::V4(addr_in(pick(pick_src), a)),
                    dst: IpAddr::V4(addr_in(pick(pick_dst), b)),
                    proto,
                    dst_port: if proto == 6 || proto == 17 {
                        dst_port
                    } else {
                        0
                    },
                }
            })
            .collect()
    })
}
