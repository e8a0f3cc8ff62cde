//! Packet fuzzing through the real programs with BPF_PROG_TEST_RUN:
//! generated and mutated frames (truncated headers, bad IHL and options,
//! IPv6 extension-header chains, fragments, zero and maximum lengths, ICMP
//! errors quoting live tuples and garbage, tuples colliding with live
//! mappings) into the egress and the ingress program, with live flows in
//! the tables. Every frame must come out untouched, dropped with exactly one
//! drop reason counted, or as a consistent translation (see `verify`);
//! egress must never let a client's address out untranslated.
//!
//! `EGRESS_PACKET_FUZZ_COUNT` sets the packets per program (default
//! [`DEFAULT_COUNT`]), `EGRESS_PACKET_FUZZ_SEED` the seed (decimal or 0x
//! hex). Run with `--nocapture` to see the table of outcomes: per program
//! and generator class, frames left untouched, translated (of those,
//! "past-len": a changed field lies past the end the IP length field
//! gives, in padding the receiving stack trims), redirected, dropped (by
//! counted reason), and refused by BPF_PROG_TEST_RUN itself (outside its
//! size limits; the programs never see those). A failure prints the seed,
//! the packet's index, class, reason and both frames in hex. The frames
//! are the same for a seed, except where a generator aims at a translation
//! the kernel chose at random (a port searched after a collision).

mod pktgen;
mod verify;

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    net::IpAddr,
    time::Instant,
};

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData},
    programs::{TestRun as _, TestRunOptions},
};
use egress_agent::{loader::LoadOptions, tables};
use egress_common::{
    conntrack::{CtEntry4, CtEntry6, RevEntry4, RevEntry6},
    flow::{Tuple4, Tuple6},
    maps,
    stats::Counter,
};
use ipnet::IpNet;
use pktgen::{Class, Gen, Limits, Rng, World};
use verify::{Dir, icmp_is_error, outer_view};

use super::{
    packet,
    prog_test_run::{Dp, TC_ACT_OK, TC_ACT_SHOT, require_root},
};
use crate::{
    lab::{GW_UPLINK, GW_UPLINK6, UPLINK2},
    netns::{NetNs, unique_name},
};

/// Packets per program when `EGRESS_PACKET_FUZZ_COUNT` is not set.
const DEFAULT_COUNT: u64 = 1_000_000;
const DEFAULT_SEED: u64 = 0x00e9_7e55_f022;
/// Packets per program between two emptyings of the connection tables
/// (then the epoch's flows are set up again): fewer new flows than the
/// tables hold, so that every drop is about the packet, not a full table.
const EPOCH: u64 = 8192;
const MAX_FLOWS: u32 = 32768;
/// Failures printed in full, at most, and per kind of failure.
const SHOW_FAILURES: usize = 40;
const SHOW_PER_KIND: usize = 3;

/// The verdict of a redirect to another uplink (bpf_redirect_neigh).
const TC_ACT_REDIRECT: i32 = 7;

/// Pools of both families, one naming an uplink (its flows are
/// redirected: test runs happen on loopback), one without IPv6, a marked
/// one, a bypass, a default; a narrow port range so that colliding tuples
/// search it (and sometimes exhaust it).
fn policies() -> String {
    format!(
        r#"{{
  "egress_pools": {{
    "p": {{ "ipv4": ["203.0.113.10", "203.0.113.11"], "ipv6": "2001:db8:e0::/64" }},
    "q": {{ "ipv4": ["203.0.113.12"], "ipv6": "2001:db8:e2::/64" }},
    "far": {{ "ipv4": ["198.51.100.201"], "ipv6": "2001:db8:e1::/64", "interface": "{UPLINK2}" }},
    "v4only": {{ "ipv4": ["203.0.113.13"] }}
  }},
  "default_egress": {{ "ipv4": "{GW_UPLINK}", "ipv6": "{GW_UPLINK6}" }},
  "nat": {{ "port_range": "61000-61031" }},
  "policies": [
    {{ "name": "internal", "selector": {{ "dst": ["10.99.0.0/16", "2001:db8:3::/48"] }},
      "action": {{ "egress": "bypass" }} }},
    {{ "name": "partner", "selector": {{ "dst": ["192.0.2.0/25", "2001:db8:2::/48"] }},
      "action": {{ "egress": "p" }} }},
    {{ "name": "far", "selector": {{ "dst": ["192.0.2.128/25", "2001:db8:5::/48"] }},
      "action": {{ "egress": "far" }} }},
    {{ "name": "marked", "selector": {{ "dst": ["198.51.100.64/26", "2001:db8:4::/48"] }},
      "action": {{ "egress": "q", "mark": 7 }} }},
    {{ "name": "v4 only", "selector": {{ "dst": ["198.51.100.128/26", "2001:db8:6::/48"] }},
      "action": {{ "egress": "v4only" }} }},
    {{ "name": "rest", "selector": {{}}, "action": {{ "egress": "default" }} }}
  ]
}}"#
    )
}

const PORT_RANGE: std::ops::RangeInclusive<u16> = 61000..=61031;

fn addrs(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn world() -> World {
    World {
        clients: addrs(&[
            "10.10.0.2",
            "10.10.0.3",
            "10.10.0.4",
            "fd00:10::2",
            "fd00:10::3",
            "fd00:10::4",
        ]),
        locals: vec![GW_UPLINK.into(), GW_UPLINK6.into()],
        servers: addrs(&[
            "192.0.2.10",
            "192.0.2.200",
            "198.51.100.10",
            "198.51.100.70",
            "198.51.100.130",
            "10.99.0.10",
            "224.0.0.251",
            "2001:db8:2::10",
            "2001:db8:5::10",
            "2001:db8:9::1",
            "2001:db8:4::10",
            "2001:db8:6::10",
            "2001:db8:3::10",
            "ff02::fb",
        ]),
        routers: addrs(&["203.0.113.254", "2001:db8:ff::fe"]),
        egress: addrs(&[
            "203.0.113.1",
            "203.0.113.10",
            "203.0.113.11",
            "203.0.113.12",
            "198.51.100.201",
            "2001:db8:ff::1",
            "2001:db8:e0::1234",
            "2001:db8:e2::5",
        ]),
        client_ports: vec![40000, 40001, 40002, 5353, 61000, 61001, 61031],
        server_ports: vec![53, 80, 443, 8080, 1],
        echo_ids: vec![1, 2, 0x1234, 61005],
    }
}

/// Which addresses are which, for the checks.
struct Roles {
    clients: Vec<IpNet>,
    bypassed: Vec<IpNet>,
    egress: Vec<IpNet>,
    locals: Vec<IpAddr>,
    /// Sources of every frame run through the egress program: the only
    /// addresses a reply may be translated back to.
    senders: HashSet<IpAddr>,
}

impl Roles {
    fn new() -> Self {
        Self {
            clients: nets(&["10.10.0.0/24", "fd00:10::/64"]),
            bypassed: nets(&["10.99.0.0/16", "2001:db8:3::/48"]),
            egress: nets(&[
                "203.0.113.1/32",
                "203.0.113.10/32",
                "203.0.113.11/32",
                "203.0.113.12/32",
                "203.0.113.13/32",
                "198.51.100.201/32",
                "2001:db8:ff::1/128",
                "2001:db8:e0::/64",
                "2001:db8:e1::/64",
                "2001:db8:e2::/64",
            ]),
            locals: vec![GW_UPLINK.into(), GW_UPLINK6.into()],
            senders: HashSet::new(),
        }
    }

    fn is_client(&self, a: IpAddr) -> bool {
        self.clients.iter().any(|n| n.contains(&a))
    }

    /// Destinations a client's packets may reach with its own address:
    /// bypassed ones, and link-scoped ones (multicast, broadcast).
    fn untranslated_ok(&self, dst: IpAddr) -> bool {
        let scoped = match dst {
            IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
            IpAddr::V6(a) => a.is_multicast(),
        };
        scoped || self.bypassed.iter().any(|n| n.contains(&dst))
    }
}

const DROPS: [Counter; 8] = [
    Counter::DropPortExhausted,
    Counter::DropTableFull,
    Counter::DropMalformed,
    Counter::DropFragment,
    Counter::DropUnsupported,
    Counter::DropNoEgress,
    Counter::DropRewrite,
    Counter::DropNoTables,
];
const TRANSLATIONS: [Counter; 4] = [
    Counter::EgressTranslated,
    Counter::IngressTranslated,
    Counter::FragmentsTranslated,
    Counter::IcmpErrorsTranslated,
];
const WATCHED: usize = DROPS.len() + TRANSLATIONS.len();

fn counter_name(c: Counter) -> &'static str {
    Counter::ALL
        .iter()
        .find(|(k, _)| *k == c)
        .map_or("?", |(_, n)| n)
}

/// The global per-CPU counters, all slots read in one
/// BPF_MAP_LOOKUP_BATCH call: after every packet, one lookup per slot
/// would cost more than the test run itself. (aya 0.14 has no batch API.)
struct Counters {
    map: MapData,
    cpus: usize,
    keys: Vec<u32>,
    values: Vec<u64>,
}

/// `union bpf_attr` as BPF_MAP_*_BATCH commands use it.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

impl Counters {
    fn new(dp: &mut Dp) -> Self {
        let Some(Map::PerCpuArray(map)) = dp.dataplane_mut().ebpf_mut().take_map(maps::STATS)
        else {
            panic!("map {} must be a per-CPU array in the object", maps::STATS);
        };
        let cpus = aya::util::nr_cpus().unwrap_or_else(|(what, e)| panic!("{what}: {e}"));
        let n = Counter::COUNT as usize;
        Self {
            map,
            cpus,
            keys: vec![0; n],
            values: vec![0; n * cpus],
        }
    }

    /// The counters from `FIRST` on (the slots the checks watch), summed
    /// over CPUs, indexed by slot.
    fn read(&mut self) -> [u64; COUNTER_SLOTS] {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let n = (Counter::COUNT - FIRST) as usize;
        // The batch starts after this key.
        let mut in_batch = FIRST - 1;
        let mut out_batch = 0u32;
        let mut attr = BatchAttr {
            in_batch: std::ptr::from_mut(&mut in_batch) as u64,
            out_batch: std::ptr::from_mut(&mut out_batch) as u64,
            keys: self.keys.as_mut_ptr() as u64,
            values: self.values.as_mut_ptr() as u64,
            count: n as u32,
            map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the attribute points at buffers that outlive the call:
        // one 4-byte key each for the batch cursors, `n` keys, and `n`
        // values of 8 bytes for each possible CPU (a per-CPU map's layout).
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                size_of::<BatchAttr>(),
            )
        };
        let err = std::io::Error::last_os_error();
        // ENOENT: the batch reached the end of the map, which is fine.
        assert!(
            ret == 0 || err.raw_os_error() == Some(libc::ENOENT),
            "BPF_MAP_LOOKUP_BATCH on {}: {err}",
            maps::STATS
        );
        assert_eq!(
            attr.count as usize,
            n,
            "one batch must read every slot of {} from {FIRST} on",
            maps::STATS
        );
        let mut sums = [0u64; COUNTER_SLOTS];
        for (i, key) in self.keys[..n].iter().enumerate() {
            sums[*key as usize] = self.values[i * self.cpus..(i + 1) * self.cpus].iter().sum();
        }
        sums
    }
}

/// The first counter slot the checks watch, and the slots there are.
const FIRST: u32 = Counter::EgressTranslated as u32;
const COUNTER_SLOTS: usize = Counter::COUNT as usize;
// Every watched counter is in the batch.
const _: () = {
    let mut i = 0;
    while i < DROPS.len() {
        assert!(DROPS[i] as u32 >= FIRST);
        i += 1;
    }
    let mut i = 0;
    while i < TRANSLATIONS.len() {
        assert!(TRANSLATIONS[i] as u32 >= FIRST);
        i += 1;
    }
};

/// The loaded programs with the maps the fuzz loop reads and empties.
struct Rig {
    dp: Dp,
    stats: Counters,
    ct4: BpfHashMap<MapData, Tuple4, CtEntry4>,
    nat4: BpfHashMap<MapData, Tuple4, RevEntry4>,
    ct6: BpfHashMap<MapData, Tuple6, CtEntry6>,
    nat6: BpfHashMap<MapData, Tuple6, RevEntry6>,
    out: Vec<u8>,
    out_len: usize,
    /// The watched counters after the last run.
    last: [u64; WATCHED],
}

fn take<T: TryFrom<Map>>(dp: &mut Dp, name: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    let map = dp
        .dataplane_mut()
        .ebpf_mut()
        .take_map(name)
        .unwrap_or_else(|| panic!("map {name} must be in the object"));
    T::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e:?}"))
}

/// What became of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Passed,
    Translated { past_length: bool },
    Redirected,
    Dropped(Counter),
    Refused,
}

impl Rig {
    fn new() -> Self {
        let mut dp = Dp::with_options(
            &policies(),
            &LoadOptions {
                max_flows: MAX_FLOWS,
                ..LoadOptions::default()
            },
        );
        tables::set_local_addrs(
            dp.dataplane_mut().ebpf_mut(),
            &[GW_UPLINK.into(), GW_UPLINK6.into()],
        )
        .unwrap();
        let stats = Counters::new(&mut dp);
        let ct4 = take(&mut dp, maps::CT4);
        let nat4 = take(&mut dp, maps::NAT4);
        let ct6 = take(&mut dp, maps::CT6);
        let nat6 = take(&mut dp, maps::NAT6);
        let mut rig = Self {
            dp,
            stats,
            ct4,
            nat4,
            ct6,
            nat6,
            out: vec![0; 1 << 17],
            out_len: 0,
            last: [0; WATCHED],
        };
        rig.last = rig.watched();
        rig
    }

    fn watched(&mut self) -> [u64; WATCHED] {
        let all = self.stats.read();
        let mut out = [0; WATCHED];
        for (slot, c) in out.iter_mut().zip(DROPS.iter().chain(&TRANSLATIONS)) {
            *slot = all[*c as usize];
        }
        out
    }

    /// Run `program` on `input`: its verdict and output length, or the
    /// kernel's refusal.
    fn run(&mut self, program: &'static str, input: &[u8]) -> Result<(i32, usize), String> {
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut self.out),
            ..TestRunOptions::default()
        };
        let result = self
            .dp
            .dataplane_mut()
            .program(program)
            .unwrap()
            .test_run(opts)
            .map_err(|e| format!("{e}"))?;
        Ok((result.return_value as i32, result.data_size_out as usize))
    }

    /// The frames BPF_PROG_TEST_RUN takes (the longest depends on the page
    /// size and the kernel's skb layout; recent kernels refuse IP frames
    /// shorter than an IP header).
    fn limits(&mut self) -> Limits {
        let frame = |ethertype: u16, n: usize| {
            let mut f = vec![0u8; n];
            f[12..14].copy_from_slice(&ethertype.to_be_bytes());
            f
        };
        let (mut ok, mut refused) = (verify::ETH_LEN, 1 << 16);
        assert!(
            self.run(maps::PROG_EGRESS, &frame(0x88b5, ok)).is_ok(),
            "a test run must take an Ethernet header alone"
        );
        while refused - ok > 1 {
            let mid = (ok + refused) / 2;
            if self.run(maps::PROG_EGRESS, &frame(0x88b5, mid)).is_ok() {
                ok = mid;
            } else {
                refused = mid;
            }
        }
        let mut min = |ethertype: u16| {
            (0..=64)
                .find(|n| {
                    self.run(maps::PROG_EGRESS, &frame(ethertype, verify::ETH_LEN + n))
                        .is_ok()
                })
                .unwrap_or_else(|| panic!("no IP frame up to 64 bytes taken ({ethertype:#06x})"))
        };
        let limits = Limits {
            max_len: ok,
            min_ipv4: min(verify::ETH_IPV4),
            min_ipv6: min(verify::ETH_IPV6),
        };
        self.last = self.watched();
        limits
    }

    /// Empty the connection tables (the fragment tables are LRU maps).
    fn flush(&mut self) {
        fn clear<K: aya::Pod, V: aya::Pod>(map: &mut BpfHashMap<MapData, K, V>) {
            let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
            for k in keys {
                let _ = map.remove(&k);
            }
        }
        clear(&mut self.ct4);
        clear(&mut self.nat4);
        clear(&mut self.ct6);
        clear(&mut self.nat6);
    }

    /// Run one frame and judge what came out (then in
    /// `self.out[..self.out_len]`).
    fn check(
        &mut self,
        dir: Dir,
        input: &[u8],
        roles: &mut Roles,
        limits: &Limits,
    ) -> Result<Outcome, String> {
        self.out_len = 0;
        let program = match dir {
            Dir::Egress => maps::PROG_EGRESS,
            Dir::Ingress => maps::PROG_INGRESS,
        };
        let (verdict, len) = match self.run(program, input) {
            Ok(r) => r,
            Err(_) if !limits.takes(input) => return Ok(Outcome::Refused),
            Err(e) => return Err(format!("BPF_PROG_TEST_RUN failed: {e}")),
        };
        if !limits.takes(input) {
            return Err(format!(
                "BPF_PROG_TEST_RUN took a {}-byte frame outside its limits {limits:?}",
                input.len()
            ));
        }
        self.out_len = len;
        let now = self.watched();
        let delta: Vec<u64> = now.iter().zip(&self.last).map(|(a, b)| a - b).collect();
        self.last = now;
        let (drops, translations) = delta.split_at(DROPS.len());
        let dropped: Vec<(Counter, u64)> = DROPS
            .iter()
            .zip(drops)
            .filter(|(_, d)| **d != 0)
            .map(|(c, d)| (*c, *d))
            .collect();
        if dir == Dir::Egress
            && let Some(ip) = outer_view(input)
            && let Some(src) = ip.addr(input, ip.src)
        {
            roles.senders.insert(src);
        }
        let out = &self.out[..len];
        match verdict {
            TC_ACT_SHOT => match dropped.as_slice() {
                [(reason, 1)] => Ok(Outcome::Dropped(*reason)),
                [] => Err("dropped without a drop reason counted".to_owned()),
                more => Err(format!("one drop counted as {more:?}")),
            },
            TC_ACT_OK | TC_ACT_REDIRECT => {
                if !dropped.is_empty() {
                    return Err(format!(
                        "verdict {verdict} (not a drop), yet drop reasons counted: {dropped:?}"
                    ));
                }
                if out == input {
                    if verdict == TC_ACT_REDIRECT {
                        return Err("redirected without being translated".to_owned());
                    }
                    if dir == Dir::Egress {
                        leak_check(input, roles)?;
                    }
                    return Ok(Outcome::Passed);
                }
                let t = verify::translation(input, out, dir)?;
                if translations.iter().all(|d| *d == 0) {
                    return Err("translated, but no translation counted".to_owned());
                }
                let view = outer_view(out).ok_or("the translated frame no longer parses")?;
                match dir {
                    Dir::Egress => {
                        let src = view.addr(out, view.src).expect("parsed");
                        if !roles.egress.iter().any(|n| n.contains(&src)) {
                            return Err(format!(
                                "translated on egress, but the source {src} is no egress address"
                            ));
                        }
                        if let Some(port) = t.port
                            && !PORT_RANGE.contains(&port)
                        {
                            return Err(format!(
                                "the source port was replaced by {port}, outside the range {PORT_RANGE:?}"
                            ));
                        }
                    }
                    Dir::Ingress => {
                        let dst = view.addr(out, view.dst).expect("parsed");
                        if !roles.senders.contains(&dst) && !roles.locals.contains(&dst) {
                            return Err(format!(
                                "translated on ingress to {dst}, which no packet leaving through the gateway came from"
                            ));
                        }
                    }
                }
                Ok(if verdict == TC_ACT_REDIRECT {
                    Outcome::Redirected
                } else {
                    Outcome::Translated {
                        past_length: t.past_length,
                    }
                })
            }
            other => Err(format!("unexpected verdict {other}")),
        }
    }
}

/// An egress frame that left untouched must not be a client's packet to
/// a translated destination (the dataplane fails closed). A client's ICMP
/// error about a bypassed flow is the one exception the check cannot tell
/// apart, so errors are left out.
fn leak_check(input: &[u8], roles: &Roles) -> Result<(), String> {
    let Some(ip) = outer_view(input) else {
        return Ok(());
    };
    let (Some(src), Some(dst)) = (ip.addr(input, ip.src), ip.addr(input, ip.dst)) else {
        return Ok(());
    };
    let error = ip
        .l4
        .and_then(|l4| input.get(l4))
        .is_some_and(|&kind| icmp_is_error(ip.proto, kind));
    if roles.is_client(src) && !roles.untranslated_ok(dst) && !error {
        return Err(format!(
            "left untouched with the client's own address {src} towards {dst}"
        ));
    }
    Ok(())
}

#[derive(Default, Clone)]
struct Tally {
    packets: u64,
    passed: u64,
    translated: u64,
    past_length: u64,
    redirected: u64,
    dropped: BTreeMap<&'static str, u64>,
    refused: u64,
    failed: u64,
}

impl Tally {
    fn add(&mut self, outcome: Option<Outcome>) {
        self.packets += 1;
        match outcome {
            None => self.failed += 1,
            Some(Outcome::Passed) => self.passed += 1,
            Some(Outcome::Translated { past_length }) => {
                self.translated += 1;
                self.past_length += u64::from(past_length);
            }
            Some(Outcome::Redirected) => self.redirected += 1,
            Some(Outcome::Dropped(c)) => *self.dropped.entry(counter_name(c)).or_default() += 1,
            Some(Outcome::Refused) => self.refused += 1,
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.packets += other.packets;
        self.passed += other.passed;
        self.translated += other.translated;
        self.past_length += other.past_length;
        self.redirected += other.redirected;
        for (k, v) in &other.dropped {
            *self.dropped.entry(k).or_default() += v;
        }
        self.refused += other.refused;
        self.failed += other.failed;
    }

    fn drops(&self) -> u64 {
        self.dropped.values().sum()
    }
}

struct Failure {
    dir: Dir,
    class: Class,
    index: u64,
    reason: String,
    input: Vec<u8>,
    output: Vec<u8>,
}

#[derive(Default)]
struct Report {
    rows: BTreeMap<(u8, Class), Tally>,
    failures: Vec<Failure>,
    kinds: BTreeMap<String, usize>,
    failed: u64,
    seconds: f64,
    /// CPU time of the fuzzing thread (user and system): the machine's
    /// other load does not count in it, unlike the wall time.
    cpu_seconds: f64,
    limits: Option<Limits>,
}

fn thread_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid pointer to a rusage.
    let ret = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    assert_eq!(ret, 0, "getrusage: {}", std::io::Error::last_os_error());
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(2 * b.len()), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

impl Report {
    fn record(
        &mut self,
        dir: Dir,
        class: Class,
        index: u64,
        input: &[u8],
        result: Result<Outcome, String>,
        output: &[u8],
    ) {
        let row = self.rows.entry((dir as u8, class)).or_default();
        match result {
            Ok(outcome) => row.add(Some(outcome)),
            Err(reason) => {
                row.add(None);
                self.failed += 1;
                // The reason up to its first number: one kind of failure.
                let kind = format!(
                    "{} {}: {}",
                    dir.name(),
                    class.name(),
                    reason
                        .split(|c: char| c.is_ascii_digit())
                        .next()
                        .unwrap_or("")
                );
                let seen = self.kinds.entry(kind).or_default();
                *seen += 1;
                if *seen <= SHOW_PER_KIND && self.failures.len() < SHOW_FAILURES {
                    self.failures.push(Failure {
                        dir,
                        class,
                        index,
                        reason,
                        input: input.to_vec(),
                        output: output.to_vec(),
                    });
                }
            }
        }
    }

    fn table(&self, seed: u64, count: u64) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "packet fuzz: seed {seed:#x}, {count} packets per program: {:.1} s wall, {:.1} s CPU; test-run limits {:?}",
            self.seconds, self.cpu_seconds, self.limits
        );
        for (d, dir) in [
            (Dir::Egress as u8, Dir::Egress),
            (Dir::Ingress as u8, Dir::Ingress),
        ] {
            let _ = writeln!(
                s,
                "\n{:<24} {:>9} {:>9} {:>10} {:>8} {:>9} {:>9} {:>8} {:>6}",
                format!("{} program", dir.name()),
                "packets",
                "untouched",
                "translated",
                "past-len",
                "redirect",
                "dropped",
                "refused",
                "FAILED"
            );
            let mut total = Tally::default();
            for ((_, class), t) in self.rows.range((d, Class::Seed)..=(d, Class::Refused)) {
                total.merge(t);
                let _ = writeln!(
                    s,
                    "{:<24} {:>9} {:>9} {:>10} {:>8} {:>9} {:>9} {:>8} {:>6}",
                    class.name(),
                    t.packets,
                    t.passed,
                    t.translated,
                    t.past_length,
                    t.redirected,
                    t.drops(),
                    t.refused,
                    t.failed
                );
            }
            let _ = writeln!(
                s,
                "{:<24} {:>9} {:>9} {:>10} {:>8} {:>9} {:>9} {:>8} {:>6}",
                "total",
                total.packets,
                total.passed,
                total.translated,
                total.past_length,
                total.redirected,
                total.drops(),
                total.refused,
                total.failed
            );
            let reasons: Vec<String> = total
                .dropped
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "drop reasons: {}", reasons.join(", "));
        }
        s
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => {
            let v = v.trim().replace('_', "");
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}"))
        }
    }
}

/// Whether packets of `class` are well-formed flows whose translation the
/// generator may remember as live.
fn learnable(class: Class) -> bool {
    matches!(class, Class::Seed | Class::Flow4 | Class::Flow6)
}

/// The run: the rig, the generator and what was seen so far.
struct Fuzz {
    rig: Rig,
    generator: Gen,
    roles: Roles,
    limits: Limits,
    report: Report,
}

impl Fuzz {
    /// Run one frame, judge it, count it, and remember what a well-formed
    /// flow left as.
    fn one(&mut self, rng: &mut Rng, dir: Dir, class: Class, index: u64, frame: &[u8]) {
        let result = self.rig.check(dir, frame, &mut self.roles, &self.limits);
        let out = &self.rig.out[..self.rig.out_len];
        if let Ok(Outcome::Passed | Outcome::Translated { .. } | Outcome::Redirected) = result
            && dir == Dir::Egress
            && learnable(class)
        {
            self.generator.learn(rng, frame, out);
        }
        self.report.record(dir, class, index, frame, result, out);
    }
}

fn fuzz(seed: u64, count: u64) -> Report {
    let started = Instant::now();
    let mut rig = Rig::new();
    let limits = rig.limits();
    let mut fuzz = Fuzz {
        rig,
        generator: Gen::new(world(), limits),
        roles: Roles::new(),
        limits,
        report: Report {
            limits: Some(limits),
            ..Report::default()
        },
    };
    let mut done = [0u64; 2];
    let mut epoch = 0u64;
    while done.iter().any(|d| *d < count) {
        fuzz.rig.flush();
        fuzz.generator.forget();
        let mut rng = Rng::for_item(seed, 2, epoch);
        for frame in fuzz.generator.seeds(&mut rng) {
            if done[0] >= count {
                break;
            }
            fuzz.one(&mut rng, Dir::Egress, Class::Seed, done[0], &frame);
            done[0] += 1;
        }
        for _ in 0..EPOCH {
            for dir in [Dir::Egress, Dir::Ingress] {
                let index = done[dir as usize];
                if index >= count {
                    continue;
                }
                let mut rng = Rng::for_item(seed, dir as u64, index);
                let class = Class::choose(&mut rng);
                let frame = fuzz.generator.generate(&mut rng, class, dir);
                fuzz.one(&mut rng, dir, class, index, &frame);
                done[dir as usize] += 1;
            }
        }
        epoch += 1;
    }
    let mut report = fuzz.report;
    report.seconds = started.elapsed().as_secs_f64();
    report.cpu_seconds = thread_cpu_seconds();
    report
}

#[test]
fn fuzz_generated_and_mutated_frames_untouched_counted_drop_or_consistent_translation() {
    require_root();
    let count = env_u64("EGRESS_PACKET_FUZZ_COUNT", DEFAULT_COUNT);
    let seed = env_u64("EGRESS_PACKET_FUZZ_SEED", DEFAULT_SEED);
    // A namespace holding the uplink one pool names, so that its flows are
    // redirected (test runs happen on the namespace's loopback).
    let ns = NetNs::new(&format!("{}-fz", unique_name())).unwrap();
    ns.ip(&[
        "link", "add", UPLINK2, "type", "veth", "peer", "name", "up1-peer",
    ])
    .unwrap();
    let report = ns
        .run(move || Ok(fuzz(seed, count)))
        .unwrap_or_else(|e| panic!("fuzz run: {e:#}"));
    println!("{}", report.table(seed, count));
    for f in &report.failures {
        println!(
            "FAILED {} #{} ({}; seed {seed:#x}): {}\n  in:  {}\n  out: {}",
            f.dir.name(),
            f.index,
            f.class.name(),
            f.reason,
            hex(&f.input),
            hex(&f.output)
        );
    }
    for (kind, n) in &report.kinds {
        println!("failure kind ({n}x): {kind}");
    }
    assert_eq!(
        report.failed, 0,
        "every frame must come out untouched, dropped with one counted reason, or consistently translated (seed {seed:#x}; see the failures above)"
    );
}

// ---- regressions: frames the fuzzer found mishandled ----------------------

/// Translating policies for both families, nothing that needs a namespace.
const REGRESSION_POLICY: &str = r#"{
    "egress_pools": { "q": { "ipv4": ["203.0.113.12"], "ipv6": "2001:db8:e2::/64" } },
    "default_egress": { "ipv4": "203.0.113.1", "ipv6": "2001:db8:ff::1" },
    "policies": [
        { "name": "marked", "selector": { "dst": ["198.51.100.64/26", "2001:db8:4::/48"] },
          "action": { "egress": "q" } },
        { "name": "rest", "selector": {}, "action": { "egress": "default" } }
    ]
}"#;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Seed 0xe97e55f022, egress #1626: an ICMP (IPv4) echo request carried in
/// IPv6 (next header 1) was translated as ICMPv6, its checksum updated
/// with a pseudo-header ICMP does not have.
#[test]
fn fuzz_regression_icmp_echo_in_ipv6_dropped_unsupported_not_translated() {
    let mut dp = Dp::new(REGRESSION_POLICY);
    let frame = unhex(
        "02000000000102000000000286dd6000000000170140fd00001000000000000000000000000220010db8\
         0004000000000000000000100800e2f014e9c4bb0b4e5ad62cf8ef764496d66efad0a3",
    );
    let (verdict, _) = dp.egress(&frame);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "ICMP in IPv6 is no ICMPv6 message: a translating policy cannot translate it"
    );
    assert_eq!(
        dp.counter(Counter::DropUnsupported),
        1,
        "the drop must be counted as an untranslatable protocol"
    );
    assert_eq!(
        dp.counter(Counter::FlowsTranslated),
        0,
        "no flow translated"
    );
}

/// The same the other way round: ICMPv6 (58) in IPv4 is not ICMP.
#[test]
fn fuzz_regression_icmpv6_echo_in_ipv4_dropped_unsupported_not_translated() {
    let mut dp = Dp::new(REGRESSION_POLICY);
    let (src, dst): (IpAddr, IpAddr) = (
        "10.10.0.2".parse().unwrap(),
        "198.51.100.10".parse().unwrap(),
    );
    let mut seg = vec![128, 0, 0, 0, 0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g'];
    pktgen::l4_checksum(src, dst, verify::ICMPV6, &mut seg);
    let hdr = pktgen::V4Hdr {
        id: 7,
        frag: 0,
        ttl: 64,
        options: Vec::new(),
    };
    let frame = pktgen::frame(&pktgen::ip(src, dst, verify::ICMPV6, &hdr, &seg));
    let (verdict, _) = dp.egress(&frame);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "ICMPv6 in IPv4 is no ICMP message: a translating policy cannot translate it"
    );
    assert_eq!(dp.counter(Counter::DropUnsupported), 1);
}

/// Seed 0xe97e55f022, egress #1476: a UDP header cut after 5 bytes (its
/// checksum missing) set up a flow, was rewritten half-way and then
/// dropped as a failed rewrite. It is malformed, and no flow is recorded.
#[test]
fn fuzz_regression_udp_header_cut_before_checksum_dropped_malformed_no_flow() {
    let mut dp = Dp::new(REGRESSION_POLICY);
    let frame =
        unhex("02000000000102000000000208004500012a307740004011d4c40a0a0004c63364469c4001bb01");
    let (verdict, _) = dp.egress(&frame);
    assert_eq!(verdict, TC_ACT_SHOT, "a cut UDP header must not leave");
    assert_eq!(
        dp.counter(Counter::DropMalformed),
        1,
        "the drop must be counted as a malformed header"
    );
    assert_eq!(dp.counter(Counter::DropRewrite), 0, "no rewrite may start");
    let tuple = Tuple4::new(
        u32::from(std::net::Ipv4Addr::new(10, 10, 0, 4)).to_be(),
        u32::from(std::net::Ipv4Addr::new(198, 51, 100, 70)).to_be(),
        40000u16.to_be(),
        443u16.to_be(),
        verify::UDP,
    );
    assert!(
        dp.ct(&tuple).is_none(),
        "a dropped malformed packet must not leave a flow behind"
    );
}

/// A reply to a live UDP translation whose header is cut before its
/// checksum is not one the dataplane can translate: it arrives untouched
/// (the stack drops it), rather than half-rewritten and dropped here.
#[test]
fn fuzz_regression_udp_reply_cut_before_checksum_passed_untouched() {
    let mut dp = Dp::new(REGRESSION_POLICY);
    let (client, server) = (
        packet::sa("10.10.0.2".parse().unwrap(), 5000),
        packet::sa("198.51.100.10".parse().unwrap(), 53),
    );
    let (verdict, out) = dp.egress(&packet::udp(client, server, b"query"));
    assert_eq!(verdict, TC_ACT_OK, "the query must leave");
    let nat = packet::checked(&out).src;
    let mut reply = packet::udp(server, nat, b"answer");
    reply.truncate(verify::ETH_LEN + 20 + 6);
    let (verdict, back) = dp.ingress(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(back, reply, "a cut reply must arrive untouched");
    assert_eq!(dp.counter(Counter::DropRewrite), 0);
    assert_eq!(dp.counter(Counter::IngressNotOurs), 1);
}

/// Seed 0xe97e55f022, egress #210807: an IPv6 UDP datagram whose checksum
/// folded to 0x0000 once its source was translated, and left so; IPv6
/// receivers drop a zero UDP checksum (RFC 8200). Built here so that the
/// translated sum is exactly zero for whatever address the flow leaves with.
#[test]
fn fuzz_regression_udp6_checksum_folding_to_zero_written_as_all_ones() {
    use std::net::Ipv6Addr;
    let mut dp = Dp::new(REGRESSION_POLICY);
    let client: Ipv6Addr = "fd00:10::4".parse().unwrap();
    let server: Ipv6Addr = "2001:db8:5::10".parse().unwrap();
    // The default egress of REGRESSION_POLICY; the fresh port is kept.
    let nat: Ipv6Addr = "2001:db8:ff::1".parse().unwrap();
    let mut payload = b"checksum folds to zero".to_vec();
    payload.extend_from_slice(&[0, 0]);
    let translated_sum = |payload: &[u8]| {
        let mut seg = Vec::new();
        seg.extend_from_slice(&5000u16.to_be_bytes());
        seg.extend_from_slice(&53u16.to_be_bytes());
        seg.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        seg.extend_from_slice(&[0, 0]);
        seg.extend_from_slice(payload);
        verify::fold(
            verify::sum16(&seg)
                + verify::pseudo_sum(&nat.octets(), &server.octets(), verify::UDP, seg.len()),
        )
    };
    // The last payload word tops the translated sum up to 0xffff, so that
    // its checksum (the complement) is zero.
    let fill = 0xffff - translated_sum(&payload);
    let n = payload.len();
    payload[n - 2..].copy_from_slice(&fill.to_be_bytes());
    assert_eq!(
        translated_sum(&payload),
        0xffff,
        "the test datagram is built right"
    );

    let input = packet::udp6(packet::sa6(client, 5000), packet::sa6(server, 53), &payload);
    let (verdict, out) = dp.egress(&input);
    assert_eq!(verdict, TC_ACT_OK, "the datagram must leave");
    let l4 = verify::ETH_LEN + 40;
    assert_eq!(
        &out[verify::ETH_LEN + 8..verify::ETH_LEN + 24],
        &nat.octets(),
        "the datagram leaves from the default egress"
    );
    assert_eq!(
        out[l4 + 6..l4 + 8],
        [0xff, 0xff],
        "a translated IPv6 UDP checksum of zero must be written as 0xffff"
    );
    packet::checked6(&out);
}
