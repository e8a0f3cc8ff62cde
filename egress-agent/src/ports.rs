//! Translated ports in use, counted from the sweeper's walk of the
//! connection tables: per port space (what a new flow's port must be unique
//! in) against the configured port range, with a warning when one passes
//! 80 %, and per egress address the figures metrics export.
//!
//! A port space is an egress address, a destination address and port, and
//! a protocol: the reverse-NAT key holds all of them, so flows towards two
//! ports of one server never compete for a port, and a space is exhausted
//! when the range holds no free port for it (new flows there are dropped).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use egress_common::conntrack::CT_F_PASS;
use log::{info, warn};
use serde::Serialize;

use crate::{
    conntrack::Flow,
    policy::model::{PortRange, Protocol},
};

/// A space passing this share of the range is warned about...
pub const WARN_AT: f64 = 0.80;
/// ... and warned about again only after falling below this one first.
pub const CLEAR_AT: f64 = 0.70;
/// Warnings one update logs at most (the rest are summed up in one line).
const MAX_WARNINGS: usize = 10;

/// Flows translated from `egress` towards `dst`:`dport` over `protocol`
/// share the ports of one range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortSpace {
    pub egress: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    pub protocol: u8,
}

impl std::fmt::Display for PortSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = Protocol::from_number(self.protocol)
            .map_or_else(|| self.protocol.to_string(), |p| p.name().to_owned());
        let dst = std::net::SocketAddr::new(self.dst, self.dport);
        write!(f, "{} -> {dst} ({protocol})", self.egress)
    }
}

/// Ports of the range in use per space, from one walk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortCounts {
    range: Option<PortRange>,
    counts: HashMap<PortSpace, u32>,
}

impl PortCounts {
    /// Counting ports of `range` (the running policies' `nat.port_range`).
    pub fn new(range: PortRange) -> Self {
        Self {
            range: Some(range),
            counts: HashMap::new(),
        }
    }

    /// Count a flow still in the tables. Bypassed flows hold no translated
    /// port; flows that kept a port outside the range take none of it.
    pub fn add(&mut self, flow: &Flow) {
        let Some(range) = self.range else {
            return;
        };
        if flow.flags & CT_F_PASS != 0 || !range.contains(flow.nat_port) {
            return;
        }
        let space = PortSpace {
            egress: flow.nat_addr,
            dst: flow.dst,
            dport: flow.dport,
            protocol: flow.protocol,
        };
        *self.counts.entry(space).or_default() += 1;
    }

    pub fn range(&self) -> Option<PortRange> {
        self.range
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// One egress address's port use: its busiest space. What metrics export
/// (one series per egress address, not one per destination).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PortUsage {
    pub egress: IpAddr,
    /// The destination whose space is fullest.
    pub busiest: PortSpace,
    /// Range ports in use in that space.
    pub in_use: u32,
    /// Ports in the configured range.
    pub range: u32,
    /// `in_use / range`.
    pub ratio: f64,
    /// Spaces of this address above the warning threshold.
    pub spaces_over: usize,
}

/// Port use from the latest walk, and which spaces are over the threshold
/// (so that each crossing is warned about once).
#[derive(Debug, Default)]
pub struct PortTracker {
    over: HashSet<PortSpace>,
    usage: Vec<PortUsage>,
}

fn size(range: PortRange) -> u32 {
    u32::from(range.last.saturating_sub(range.first)) + 1
}

impl PortTracker {
    /// Take in a walk's counts: warn about spaces that passed [`WARN_AT`],
    /// note those back under [`CLEAR_AT`], and keep each address's figures.
    pub fn update(&mut self, counts: &PortCounts) {
        let Some(range) = counts.range else {
            return;
        };
        let size = size(range);
        let ratio = |n: u32| f64::from(n) / f64::from(size);
        let mut crossed: Vec<(&PortSpace, u32)> = counts
            .counts
            .iter()
            .filter(|(space, n)| ratio(**n) >= WARN_AT && !self.over.contains(*space))
            .map(|(space, n)| (space, *n))
            .collect();
        crossed.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (space, n) in crossed.iter().take(MAX_WARNINGS) {
            warn!(
                "translated ports {space}: {n} of the {size} in range {}-{} in use ({:.0} %); new flows there are dropped once none is free",
                range.first,
                range.last,
                ratio(*n) * 100.0
            );
        }
        if crossed.len() > MAX_WARNINGS {
            warn!(
                "translated ports: {} more destinations passed {:.0} % of the port range",
                crossed.len() - MAX_WARNINGS,
                WARN_AT * 100.0
            );
        }
        let before = self.over.len();
        self.over.retain(|space| {
            counts
                .counts
                .get(space)
                .is_some_and(|n| ratio(*n) >= CLEAR_AT)
        });
        if self.over.len() < before {
            info!(
                "translated ports: {} destinations back under {:.0} % of the port range",
                before - self.over.len(),
                CLEAR_AT * 100.0
            );
        }
        self.over
            .extend(crossed.into_iter().map(|(space, _)| *space));

        let mut by_egress: BTreeMap<IpAddr, PortUsage> = BTreeMap::new();
        for (space, n) in &counts.counts {
            let over = usize::from(self.over.contains(space));
            let usage = by_egress.entry(space.egress).or_insert(PortUsage {
                egress: space.egress,
                busiest: *space,
                in_use: 0,
                range: size,
                ratio: 0.0,
                spaces_over: 0,
            });
            usage.spaces_over += over;
            if (*n, std::cmp::Reverse(space)) > (usage.in_use, std::cmp::Reverse(&usage.busiest)) {
                usage.busiest = *space;
                usage.in_use = *n;
                usage.ratio = ratio(*n);
            }
        }
        self.usage = by_egress.into_values().collect();
    }

    /// Each egress address's busiest port space, by address.
    pub fn usage(&self) -> &[PortUsage] {
        &self.usage
    }
}

#[cfg(test)]
mod tests {
    use egress_common::flow::proto;
    use egress_common::stats::Traffic;

    use super::*;

    fn flow(egress: &str, dst: &str, dport: u16, nat_port: u16) -> Flow {
        Flow {
            protocol: proto::TCP,
            src: "10.10.0.2".parse().unwrap(),
            sport: nat_port,
            dst: dst.parse().unwrap(),
            dport,
            nat_addr: egress.parse().unwrap(),
            nat_port,
            flags: 0,
            policy: 0,
            stats_slot: 1,
            addr_slot: 1,
            identity: 0,
            created_ns: 0,
            last_seen_ns: 0,
            traffic: Traffic::default(),
        }
    }

    const RANGE: PortRange = PortRange {
        first: 40000,
        last: 40009,
    };

    fn counts(flows: &[Flow]) -> PortCounts {
        let mut c = PortCounts::new(RANGE);
        for f in flows {
            c.add(f);
        }
        c
    }

    /// `n` flows from 203.0.113.10 to `dst`:443 on range ports.
    fn filled(dst: &str, n: u16) -> Vec<Flow> {
        (0..n)
            .map(|i| flow("203.0.113.10", dst, 443, 40000 + i))
            .collect()
    }

    #[test]
    fn ports_spaces_split_by_destination_port_and_outside_range_ignored() {
        let mut flows = filled("198.51.100.10", 3);
        flows.push(flow("203.0.113.10", "198.51.100.10", 80, 40000));
        flows.push(flow("203.0.113.10", "198.51.100.10", 443, 5000));
        let mut pass = flow("10.10.0.2", "198.51.100.10", 443, 40005);
        pass.flags = CT_F_PASS;
        flows.push(pass);
        let mut tracker = PortTracker::default();
        tracker.update(&counts(&flows));
        let usage = tracker.usage();
        assert_eq!(usage.len(), 1, "one egress address: {usage:?}");
        assert_eq!(
            (usage[0].in_use, usage[0].range, usage[0].busiest.dport),
            (3, 10, 443),
            "port 80 is a space of its own, port 5000 is outside the range, bypassed flows hold none"
        );
    }

    #[test]
    fn ports_crossing_warned_once_with_hysteresis() {
        let mut tracker = PortTracker::default();
        tracker.update(&counts(&filled("198.51.100.10", 8)));
        assert_eq!(tracker.over.len(), 1, "80 % passed");
        assert_eq!(tracker.usage()[0].spaces_over, 1);
        tracker.update(&counts(&filled("198.51.100.10", 9)));
        assert_eq!(tracker.over.len(), 1, "still over: not a new crossing");
        tracker.update(&counts(&filled("198.51.100.10", 7)));
        assert_eq!(tracker.over.len(), 1, "70 % is not under the clearing mark");
        tracker.update(&counts(&filled("198.51.100.10", 6)));
        assert!(tracker.over.is_empty(), "under 70 %: cleared");
        assert_eq!(tracker.usage()[0].spaces_over, 0);
        assert!((tracker.usage()[0].ratio - 0.6).abs() < 1e-9);
    }

    #[test]
    fn ports_busiest_destination_per_egress_address() {
        let mut flows = filled("198.51.100.10", 2);
        flows.extend(filled("198.51.100.11", 5));
        flows.push(flow("203.0.113.11", "198.51.100.10", 443, 40001));
        let mut tracker = PortTracker::default();
        tracker.update(&counts(&flows));
        let usage = tracker.usage();
        assert_eq!(usage.len(), 2);
        assert_eq!(usage[0].egress, "203.0.113.10".parse::<IpAddr>().unwrap());
        assert_eq!(
            (usage[0].busiest.dst, usage[0].in_use),
            ("198.51.100.11".parse().unwrap(), 5)
        );
        assert_eq!(usage[1].in_use, 1);
    }
}
