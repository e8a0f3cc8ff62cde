// SPDX-License-Identifier: MIT OR Apache-2.0
//! What the fuzz targets check beyond "no panic": every rejection renders
//! as a message, and what a parser accepts holds the invariants the agent
//! relies on next (compiled tables agree with the reference evaluator,
//! country tables agree with the merged ranges, printed forms parse back).

use std::{
    collections::BTreeSet,
    fmt::Display,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egress_agent::{
    geoip::{GeoError, GeoTables, Merged, SourceFile, Span},
    policy::{
        PolicySet, analyze, compile,
        compile::Lookup,
        eval::{Context, Flow},
        geo,
        model::{Atom, CountryCode, Identity, PortRange},
    },
};
use ipnet::IpNet;

/// The clock the targets parse with: fixed, so that a crash reproduces
/// whatever day it is replayed (expiry checks compare against it).
pub fn now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_780_000_000).expect("a timestamp in range")
}

/// The input as text, the way the agent reads its files
/// (`read_to_string`: anything else is a read error before parsing).
pub fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// A rejection, rendered as the agent shows it; it must say something.
pub fn rendered(err: &dyn Display, what: &str) -> String {
    let message = err.to_string();
    assert!(!message.trim().is_empty(), "{what}: an empty error message");
    message
}

// ---------------------------------------------------------------------------
// Policies

/// Flows per policy set compared between the compiled tables and the
/// reference evaluator.
const PROBES: usize = 64;
/// Addresses of one family, ports and countries probed per set.
const MAX_POINTS: usize = 24;

/// Everything the agent does with an accepted policy file that could fail:
/// `check`'s analysis and compiling it, plus the compiled tables picking
/// the reference evaluator's policy for flows at the edges of every prefix
/// and port range the set names.
pub fn check_policy_set(set: &PolicySet) {
    let _ = analyze::analyze(set);
    let identities = identities(set);
    let compiled = compile(set, &identities);

    let mut v4 = vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(0, 0, 0, 0)];
    let mut v6 = vec![Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)];
    let mut ports = vec![0u16, 443, 65535];
    let mut countries: Vec<Option<CountryCode>> = vec![None];
    for atom in set.policies.iter().flat_map(|p| p.matcher.atoms()) {
        match atom {
            Atom::SrcIp(nets) | Atom::DstIp(nets) => {
                for net in nets {
                    edges(net, &mut v4, &mut v6);
                }
            }
            Atom::DstPort(ranges) => {
                for &PortRange { first, last } in ranges {
                    ports.extend([first, last]);
                    ports.extend(first.checked_sub(1));
                    ports.extend(last.checked_add(1));
                }
            }
            Atom::Country(codes) => countries.extend(codes.iter().copied().map(Some)),
            Atom::Continent(continents) => {
                for continent in continents {
                    countries.extend(
                        geo::COUNTRIES
                            .iter()
                            .find(|(_, _, c)| c == continent)
                            .and_then(|(code, _, _)| geo::lookup(code))
                            .map(|(code, _, _)| Some(code)),
                    );
                }
            }
            _ => {}
        }
    }
    v4.sort_unstable();
    v4.dedup();
    v6.sort_unstable();
    v6.dedup();
    ports.sort_unstable();
    ports.dedup();
    countries.dedup();
    v4.truncate(MAX_POINTS);
    v6.truncate(MAX_POINTS);
    ports.truncate(MAX_POINTS);
    countries.truncate(MAX_POINTS);

    const PROTOCOLS: [u8; 5] = [6, 17, 1, 58, 47];
    for i in 0..PROBES {
        let (src, dst) = if i % 2 == 0 {
            (
                IpAddr::V4(v4[i % v4.len()]),
                IpAddr::V4(v4[(i * 7 + 3) % v4.len()]),
            )
        } else {
            (
                IpAddr::V6(v6[i % v6.len()]),
                IpAddr::V6(v6[(i * 7 + 3) % v6.len()]),
            )
        };
        let proto = PROTOCOLS[i % PROTOCOLS.len()];
        let flow = Flow {
            src,
            dst,
            proto,
            dst_port: if proto == 6 || proto == 17 {
                ports[(i * 3) % ports.len()]
            } else {
                0
            },
        };
        let identity = i % (identities.len() + 1);
        let country = countries[(i * 5) % countries.len()];
        let expected = set.first_match(&Context {
            flow,
            identity: identity.checked_sub(1).map(|i| &identities[i]),
            country,
        });
        let got = compiled.classify(&Lookup {
            flow,
            identity: identity as u32,
            country: country.and_then(geo::country_id).unwrap_or(0),
        });
        assert_eq!(
            got, expected,
            "the compiled tables must pick the reference evaluator's policy for {flow:?}, identity {identity}, country {country:?}"
        );
    }
}

/// The first and last address of `net` and the neighbours just outside it.
fn edges(net: &IpNet, v4: &mut Vec<Ipv4Addr>, v6: &mut Vec<Ipv6Addr>) {
    match net {
        IpNet::V4(n) => {
            let (first, last) = (u32::from(n.network()), u32::from(n.broadcast()));
            let points = [
                Some(first),
                Some(last),
                first.checked_sub(1),
                last.checked_add(1),
            ];
            v4.extend(points.into_iter().flatten().map(Ipv4Addr::from));
        }
        IpNet::V6(n) => {
            let (first, last) = (u128::from(n.network()), u128::from(n.broadcast()));
            let points = [
                Some(first),
                Some(last),
                first.checked_sub(1),
                last.checked_add(1),
            ];
            v6.extend(points.into_iter().flatten().map(Ipv6Addr::from));
        }
    }
}

/// Identities built from the names the set mentions (users in lower case,
/// as sessions deliver them), so identity conditions are exercised both ways.
fn identities(set: &PolicySet) -> Vec<Identity> {
    let (mut users, mut groups, mut posture) = (Vec::new(), BTreeSet::new(), BTreeSet::new());
    for atom in set.policies.iter().flat_map(|p| p.matcher.atoms()) {
        match atom {
            Atom::User(u) => users.extend(u.iter().map(|u| u.to_lowercase())),
            Atom::Group(g) => groups.extend(g.iter().cloned()),
            Atom::Posture(p) => posture.extend(p.iter().cloned()),
            _ => {}
        }
    }
    users.push("nobody@example.com".to_owned());
    let half = |s: &BTreeSet<String>| s.iter().step_by(2).cloned().collect::<BTreeSet<_>>();
    vec![
        Identity {
            user: users[0].clone(),
            groups: groups.clone(),
            posture: posture.clone(),
        },
        Identity {
            user: users[users.len() / 2].clone(),
            groups: half(&groups),
            posture: BTreeSet::new(),
        },
        Identity {
            user: users[users.len() - 1].clone(),
            groups: BTreeSet::new(),
            posture: half(&posture),
        },
    ]
}

// ---------------------------------------------------------------------------
// Country databases

/// What the agent does with a database it read: merge the ranges and build
/// the dataplane's tables. The merged list must be sorted and disjoint and
/// answer as the last range listed over an address; the tables must answer
/// as the merged list does (or be refused with a clean error).
pub fn check_country_file(file: &SourceFile) {
    let merged = Merged::new([&file.ranges]);
    sorted_disjoint(&merged.v4);
    sorted_disjoint(&merged.v6);

    let mut probes: Vec<IpAddr> = Vec::new();
    for s in file.ranges.v4.iter().rev().take(MAX_POINTS) {
        let points = [
            Some(s.first),
            Some(s.last),
            s.first.checked_sub(1),
            s.last.checked_add(1),
        ];
        probes.extend(points.into_iter().flatten().map(|a| IpAddr::V4(a.into())));
    }
    for s in file.ranges.v6.iter().rev().take(MAX_POINTS) {
        let points = [
            Some(s.first),
            Some(s.last),
            s.first.checked_sub(1),
            s.last.checked_add(1),
        ];
        probes.extend(points.into_iter().flatten().map(|a| IpAddr::V6(a.into())));
    }
    for &addr in &probes {
        let expected = match addr {
            IpAddr::V4(a) => last_covering(&file.ranges.v4, u32::from(a)),
            IpAddr::V6(a) => last_covering(&file.ranges.v6, u128::from(a)),
        };
        assert_eq!(
            merged.lookup(addr),
            expected,
            "the merged ranges must give {addr} the country of the last range listed over it"
        );
    }

    match GeoTables::build(&merged) {
        Ok(tables) => {
            for &addr in &probes {
                assert_eq!(
                    tables.lookup(addr),
                    merged.country(addr),
                    "the dataplane tables must give {addr} the merged ranges' country"
                );
            }
        }
        Err(err @ GeoError::BucketTooLarge { .. }) => {
            rendered(&err, "building country tables");
        }
        Err(err) => panic!("building the tables can only fail for a crowded IPv6 /16: {err}"),
    }
}

fn sorted_disjoint<A: Ord + Copy + std::fmt::Debug>(spans: &[Span<A>]) {
    for s in spans {
        assert!(s.first <= s.last, "a merged range runs forwards: {s:?}");
    }
    for w in spans.windows(2) {
        assert!(
            w[0].last < w[1].first,
            "merged ranges are sorted and disjoint: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
}

fn last_covering<A: Ord + Copy>(spans: &[Span<A>], addr: A) -> Option<u8> {
    spans
        .iter()
        .rev()
        .find(|s| s.first <= addr && addr <= s.last)
        .map(|s| s.country)
}
