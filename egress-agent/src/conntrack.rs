//! The connection tables from userspace: expiring idle flows (the sweeper),
//! flushing flows by egress address, listing and counting them.
//!
//! A translated flow has an entry in each direction's table; they are
//! removed together (outgoing first, so a new packet of the flow makes a
//! fresh translation instead of reusing a half-removed one). Reverse
//! entries left without their outgoing half are removed too.

use std::{hash::Hash, net::IpAddr, time::Duration};

use aya::{
    Ebpf, Pod,
    maps::{HashMap, IterableMap as _, MapData, MapError},
};
use egress_common::{
    conntrack::{
        CT_F_FIN, CT_F_LOCAL, CT_F_PASS, CT_F_RST, CtEntry, CtEntry4, CtEntry6, RevEntry,
        RevEntry4, RevEntry6,
    },
    flow::{Tuple, Tuple4, Tuple6, proto},
    maps,
    stats::{ADDR_STAT_SLOTS, POLICY_STAT_SLOTS, Traffic},
};

use crate::{
    mapwalk::{self, WalkError},
    policy::model::Timeouts,
};

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("map {name} is missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// The current `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) in nanoseconds.
pub fn now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// How often idle flows are looked for: a quarter of the shortest timeout,
/// between one and thirty seconds.
pub fn sweep_interval(t: &Timeouts) -> Duration {
    let shortest = t
        .tcp_established
        .min(t.tcp_transitory)
        .min(t.tcp_closed)
        .min(t.udp)
        .min(t.icmp);
    (shortest / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// How long a flow may stay idle, from its protocol and the TCP flags seen
/// in either direction.
pub fn timeout(timeouts: &Timeouts, protocol: u8, flags: u16, replied: bool) -> Duration {
    match protocol {
        proto::TCP if flags & CT_F_RST != 0 => timeouts.tcp_closed,
        proto::TCP if flags & CT_F_FIN != 0 || !replied => timeouts.tcp_transitory,
        proto::TCP => timeouts.tcp_established,
        proto::UDP => timeouts.udp,
        _ => timeouts.icmp,
    }
}

/// A flow as the tables hold it, both directions combined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub protocol: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub nat_addr: IpAddr,
    pub nat_port: u16,
    /// `CT_F_*` of both directions.
    pub flags: u16,
    pub policy: u16,
    /// Policy counter slot (`EG_POLICY_NAMES` names it).
    pub stats_slot: u32,
    /// Egress-address counter slot (`EG_ADDR_NAMES`; 0: untranslated).
    pub addr_slot: u16,
    pub identity: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Both directions' packets and bytes.
    pub traffic: Traffic,
}

/// Counts from one sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: usize,
    pub orphans: usize,
    pub active: usize,
}

/// One table's entries and capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableFill {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// What one read-only walk of the tables counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Census {
    /// EG_CT4, EG_NAT4, EG_CT6, EG_NAT6.
    pub tables: [TableFill; 4],
    /// Flows (outgoing entries) per family.
    pub flows4: usize,
    pub flows6: usize,
    /// Flows per egress-address counter slot (index; 0: untranslated).
    pub by_addr_slot: Vec<u64>,
    /// Flows per policy counter slot (index).
    pub by_policy_slot: Vec<u64>,
}

impl Default for Census {
    fn default() -> Self {
        Self {
            tables: Default::default(),
            flows4: 0,
            flows6: 0,
            // Indexed, not hashed: a million increments stay cheap.
            by_addr_slot: vec![0; ADDR_STAT_SLOTS as usize],
            by_policy_slot: vec![0; POLICY_STAT_SLOTS as usize],
        }
    }
}

/// Which walk of the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// The sweeper: removes flows idle past their timeout.
    Sweep,
    /// `flush` or `flush_flows`: removes flows on purpose.
    Flush,
}

/// Told about every flow a walk reads and whether it removed it: the flow
/// log writes the ends, and port use is counted from what a sweep keeps.
/// Called with the tables locked: it must be quick and never wait.
pub trait Observer: Send {
    fn seen(&mut self, walk: Walk, flow: &Flow, removed: bool);
    /// The walk has read every flow.
    fn done(&mut self, walk: Walk);
}

/// An address family's view for the generic table walks.
trait Addr: Pod + Copy + Eq + Hash {
    fn ip(self) -> IpAddr;
}

impl Addr for u32 {
    fn ip(self) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(self)))
    }
}

impl Addr for [u32; 4] {
    fn ip(self) -> IpAddr {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_mut(4).zip(self) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(std::net::Ipv6Addr::from(octets))
    }
}

struct Tables<A: Addr, PC, PR> {
    ct: HashMap<MapData, Tuple<A>, CtEntry<A, PC>>,
    nat: HashMap<MapData, Tuple<A>, RevEntry<A, PR>>,
}

impl<A: Addr, PC, PR> Tables<A, PC, PR>
where
    Tuple<A>: Pod,
    CtEntry<A, PC>: Pod,
    RevEntry<A, PR>: Pod,
{
    fn rev_key(key: &Tuple<A>, ct: &CtEntry<A, PC>) -> Tuple<A> {
        Tuple::new(
            ct.nat_addr,
            key.dst,
            ct.nat_port_be,
            key.dport_be,
            key.proto,
        )
    }

    /// The outgoing table's keys, taken up front so the walks may remove.
    fn keys(&self) -> Vec<Tuple<A>> {
        self.ct.keys().filter_map(Result::ok).collect()
    }

    /// A flow's outgoing entry, and the flow with its reverse half combined
    /// in; `None` if it is gone.
    fn read(&self, key: &Tuple<A>) -> Option<(CtEntry<A, PC>, Flow)> {
        let ct = self.ct.get(key, 0).ok()?;
        let rev = (ct.flags & CT_F_PASS == 0)
            .then(|| self.nat.get(&Self::rev_key(key, &ct), 0).ok())
            .flatten();
        Some((ct, Self::combine(key, &ct, rev)))
    }

    /// A flow from its outgoing entry and its reverse one (if any).
    fn combine(key: &Tuple<A>, ct: &CtEntry<A, PC>, rev: Option<RevEntry<A, PR>>) -> Flow {
        Flow {
            protocol: key.proto,
            src: key.src.ip(),
            sport: u16::from_be(key.sport_be),
            dst: key.dst.ip(),
            dport: u16::from_be(key.dport_be),
            nat_addr: ct.nat_addr.ip(),
            nat_port: u16::from_be(ct.nat_port_be),
            flags: ct.flags | rev.map_or(0, |r| r.flags),
            policy: ct.policy,
            stats_slot: ct.stats_slot,
            addr_slot: ct.addr_slot,
            identity: ct.identity,
            created_ns: ct.created_ns,
            last_seen_ns: ct.last_seen_ns.max(rev.map_or(0, |r| r.last_seen_ns)),
            traffic: Traffic {
                packets_out: ct.packets,
                bytes_out: ct.bytes,
                packets_in: rev.map_or(0, |r| r.packets),
                bytes_in: rev.map_or(0, |r| r.bytes),
            },
        }
    }

    /// Every flow: both tables read in batches (a million flows in about a
    /// second, where a lookup per entry takes several), or entry by entry
    /// where the kernel has no batch lookups (before 5.6).
    fn flows(&self, names: (&'static str, &'static str)) -> Vec<Flow> {
        let mut reverse = std::collections::HashMap::new();
        let mut out = Vec::new();
        let batched = mapwalk::for_each(
            self.nat.map(),
            names.1,
            |key: &Tuple<A>, rev: &RevEntry<A, PR>| {
                reverse.insert(*key, *rev);
            },
        )
        .and_then(|_| {
            mapwalk::for_each(self.ct.map(), names.0, |key, ct: &CtEntry<A, PC>| {
                let rev = (ct.flags & CT_F_PASS == 0)
                    .then(|| reverse.get(&Self::rev_key(key, ct)).copied())
                    .flatten();
                out.push(Self::combine(key, ct, rev));
            })
        });
        match batched {
            Ok(_) => out,
            Err(_) => self
                .keys()
                .iter()
                .filter_map(|key| self.read(key))
                .map(|(_, flow)| flow)
                .collect(),
        }
    }

    /// Count both tables and the flows by slot, reading entries in batches
    /// (no per-flow syscalls, no list of flows).
    fn census(
        &self,
        names: (&'static str, &'static str),
        out: &mut Census,
    ) -> Result<[TableFill; 2], WalkError> {
        let flows = mapwalk::for_each(
            self.ct.map(),
            names.0,
            |_: &Tuple<A>, ct: &CtEntry<A, PC>| {
                // Slots come from the dataplane; one out of range is skipped.
                if let Some(n) = out.by_addr_slot.get_mut(usize::from(ct.addr_slot)) {
                    *n += 1;
                }
                if let Some(n) = out.by_policy_slot.get_mut(ct.stats_slot as usize) {
                    *n += 1;
                }
            },
        )?;
        let reverse = mapwalk::fill(self.nat.map(), names.1)?;
        let capacity = |map: &MapData, name| {
            map.info()
                .map(|i| i.max_entries())
                .map_err(|source| WalkError::Info { name, source })
        };
        Ok([
            TableFill {
                name: names.0,
                entries: flows,
                capacity: capacity(self.ct.map(), names.0)?,
            },
            TableFill {
                name: names.1,
                entries: reverse.entries.unwrap_or_default(),
                capacity: reverse.capacity,
            },
        ])
    }

    /// Remove a flow's entries (outgoing first). Returns whether it existed.
    fn remove(&mut self, key: &Tuple<A>, ct: &CtEntry<A, PC>) -> bool {
        let existed = self.ct.remove(key).is_ok();
        if ct.flags & CT_F_PASS == 0 {
            let _ = self.nat.remove(&Self::rev_key(key, ct));
        }
        existed
    }

    /// Visit every flow, removing each one `doomed` selects as soon as it
    /// has been seen; returns how many of those still existed.
    fn walk(
        &mut self,
        mut observer: Option<&mut (dyn Observer + 'static)>,
        walk: Walk,
        mut doomed: impl FnMut(&CtEntry<A, PC>, &Flow) -> bool,
    ) -> usize {
        let mut removed = 0;
        for key in self.keys() {
            let Some((ct, flow)) = self.read(&key) else {
                continue;
            };
            let gone = doomed(&ct, &flow) && self.remove(&key, &ct);
            removed += usize::from(gone);
            if let Some(observer) = observer.as_mut() {
                observer.seen(walk, &flow, gone);
            }
        }
        removed
    }

    fn sweep(
        &mut self,
        timeouts: &Timeouts,
        now: u64,
        observer: Option<&mut (dyn Observer + 'static)>,
    ) -> SweepReport {
        let mut active = 0;
        let expired = self.walk(observer, Walk::Sweep, |_, flow| {
            let replied = flow.traffic.packets_in > 0;
            let limit = timeout(timeouts, flow.protocol, flow.flags, replied);
            let idle = now.saturating_sub(flow.last_seen_ns) > limit.as_nanos() as u64;
            if !idle {
                active += 1;
            }
            idle
        });
        // Reverse entries whose outgoing half is gone (a crash between the
        // two removals, a lost race): remove them once they are idle too.
        let mut orphans = 0;
        let keys: Vec<Tuple<A>> = self.nat.keys().filter_map(Result::ok).collect();
        for key in keys {
            let Ok(rev) = self.nat.get(&key, 0) else {
                continue;
            };
            let orig = Tuple::new(
                rev.orig_addr,
                key.dst,
                rev.orig_port_be,
                key.dport_be,
                key.proto,
            );
            if self.ct.get(&orig, 0).is_ok() {
                continue;
            }
            let limit = timeout(timeouts, key.proto, rev.flags, true);
            if now.saturating_sub(rev.last_seen_ns) > limit.as_nanos() as u64
                && self.nat.remove(&key).is_ok()
            {
                orphans += 1;
            }
        }
        SweepReport {
            expired,
            orphans,
            active,
        }
    }

    /// Remove every flow translated to an address `doomed` selects.
    fn flush(
        &mut self,
        doomed: &dyn Fn(IpAddr) -> bool,
        observer: Option<&mut (dyn Observer + 'static)>,
    ) -> usize {
        // The gateway's own flows keep their (own) addresses.
        self.walk(observer, Walk::Flush, |ct, flow| {
            ct.flags & (CT_F_PASS | CT_F_LOCAL) == 0 && doomed(flow.nat_addr)
        })
    }
}

/// Both families' connection tables.
pub struct Conntrack {
    v4: Tables<u32, [u8; 0], [u8; 2]>,
    v6: Tables<[u32; 4], [u8; 4], [u8; 6]>,
    observer: Option<Box<dyn Observer>>,
}

fn take<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, ConntrackError> {
    let map = ebpf
        .take_map(name)
        .ok_or(ConntrackError::Missing { name })?;
    HashMap::try_from(map).map_err(|source| ConntrackError::Map { name, source })
}

impl Conntrack {
    /// The tables from handles opened elsewhere (the pinned maps, for
    /// inspecting them from another process), in the order EG_CT4, EG_NAT4,
    /// EG_CT6, EG_NAT6.
    pub fn from_maps(handles: [MapData; 4]) -> Result<Self, ConntrackError> {
        fn hash<K: Pod, V: Pod>(
            name: &'static str,
            data: MapData,
        ) -> Result<HashMap<MapData, K, V>, ConntrackError> {
            HashMap::try_from(aya::maps::Map::HashMap(data))
                .map_err(|source| ConntrackError::Map { name, source })
        }
        let [ct4, nat4, ct6, nat6] = handles;
        Ok(Self {
            v4: Tables {
                ct: hash(maps::CT4, ct4)?,
                nat: hash(maps::NAT4, nat4)?,
            },
            v6: Tables {
                ct: hash(maps::CT6, ct6)?,
                nat: hash(maps::NAT6, nat6)?,
            },
            observer: None,
        })
    }

    pub fn new(ebpf: &mut Ebpf) -> Result<Self, ConntrackError> {
        Ok(Self {
            v4: Tables {
                ct: take::<Tuple4, CtEntry4>(ebpf, maps::CT4)?,
                nat: take::<Tuple4, RevEntry4>(ebpf, maps::NAT4)?,
            },
            v6: Tables {
                ct: take::<Tuple6, CtEntry6>(ebpf, maps::CT6)?,
                nat: take::<Tuple6, RevEntry6>(ebpf, maps::NAT6)?,
            },
            observer: None,
        })
    }

    /// Tell `observer` about every flow the walks read from now on.
    pub fn observe(&mut self, observer: Box<dyn Observer>) {
        self.observer = Some(observer);
    }

    fn walked(&mut self, walk: Walk) {
        if let Some(observer) = &mut self.observer {
            observer.done(walk);
        }
    }

    /// Remove flows idle for longer than their timeout.
    pub fn sweep(&mut self, timeouts: &Timeouts) -> SweepReport {
        let now = now_ns();
        let a = self.v4.sweep(timeouts, now, self.observer.as_deref_mut());
        let b = self.v6.sweep(timeouts, now, self.observer.as_deref_mut());
        self.walked(Walk::Sweep);
        SweepReport {
            expired: a.expired + b.expired,
            orphans: a.orphans + b.orphans,
            active: a.active + b.active,
        }
    }

    /// Remove every translated flow whose egress address `doomed` selects;
    /// returns how many.
    pub fn flush(&mut self, doomed: &dyn Fn(IpAddr) -> bool) -> usize {
        let removed = self.v4.flush(doomed, self.observer.as_deref_mut())
            + self.v6.flush(doomed, self.observer.as_deref_mut());
        self.walked(Walk::Flush);
        removed
    }

    /// Remove the flows `doomed` selects (whole flows, not by address).
    pub fn flush_flows(&mut self, doomed: &dyn Fn(&Flow) -> bool) -> usize {
        let removed = self
            .v4
            .walk(self.observer.as_deref_mut(), Walk::Flush, |_, flow| {
                doomed(flow)
            })
            + self
                .v6
                .walk(self.observer.as_deref_mut(), Walk::Flush, |_, flow| {
                    doomed(flow)
                });
        self.walked(Walk::Flush);
        removed
    }

    /// Entries of each table, and flows per family, per egress-address
    /// slot and per policy slot: for metrics, without listing the flows.
    pub fn census(&self) -> Result<Census, WalkError> {
        let mut out = Census::default();
        let [ct4, nat4] = self.v4.census((maps::CT4, maps::NAT4), &mut out)?;
        let [ct6, nat6] = self.v6.census((maps::CT6, maps::NAT6), &mut out)?;
        out.flows4 = ct4.entries;
        out.flows6 = ct6.entries;
        out.tables = [ct4, nat4, ct6, nat6];
        Ok(out)
    }

    /// Every tracked flow.
    pub fn flows(&self) -> Vec<Flow> {
        let mut out = self.v4.flows((maps::CT4, maps::NAT4));
        out.extend(self.v6.flows((maps::CT6, maps::NAT6)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egress_common::conntrack::CT_F_SYN;

    #[test]
    fn timeout_tcp_states_pick_their_timeout() {
        let t = Timeouts::default();
        assert_eq!(
            timeout(&t, proto::TCP, CT_F_SYN, false),
            t.tcp_transitory,
            "opening"
        );
        assert_eq!(
            timeout(&t, proto::TCP, CT_F_SYN, true),
            t.tcp_established,
            "replied"
        );
        assert_eq!(
            timeout(&t, proto::TCP, CT_F_FIN, true),
            t.tcp_transitory,
            "closing"
        );
        assert_eq!(
            timeout(&t, proto::TCP, CT_F_RST | CT_F_FIN, true),
            t.tcp_closed,
            "reset"
        );
        assert_eq!(timeout(&t, proto::UDP, 0, false), t.udp);
        assert_eq!(timeout(&t, proto::ICMP, 0, true), t.icmp);
        assert_eq!(timeout(&t, proto::ICMPV6, 0, true), t.icmp);
    }

    #[test]
    fn addr_words_round_trip_to_ip() {
        assert_eq!(
            u32::from(std::net::Ipv4Addr::new(203, 0, 113, 10))
                .to_be()
                .ip()
                .to_string(),
            "203.0.113.10"
        );
        let v6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(crate::tables::addr6_words(&v6).ip(), IpAddr::V6(v6));
    }
}
