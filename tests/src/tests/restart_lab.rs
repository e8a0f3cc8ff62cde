//! Lab tests of restarting the agent on its pins: a long TCP connection and
//! a UDP flow keep flowing, intact and under one translated tuple, while the
//! agent is killed (or stopped with --keep-dataplane) and started again; a
//! second agent on the same pin path is refused; `down` and a plain stop
//! leave nothing behind; policy tables taken over are written correctly.

use std::{
    collections::BTreeSet,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{LpmTrie, Map, MapData};
use egress_agent::{
    loader::{Dataplane, LoadOptions},
    pin::PinDir,
    policy::{self, PolicySet},
    tables::Tables,
};
use egress_common::{
    classify::{GEN_PREFIX_BITS, GenPrefix4},
    maps,
};
use nix::sys::signal::Signal;
use socket2::{Domain, Protocol, Socket, Type};

use super::{nat_lab::policy_set, prog_test_run::require_root, steer_e2e::tcx_programs};
use crate::{
    agent::{self, Agent},
    lab::{DEDICATED_PRIMARY, Lab, SERVER_PUBLIC, UPLINK, servers},
    netns::NetNs,
    pins::PinPath,
    probe::{self, Servers, sa},
    tempdir::TempDir,
    traffic::Stream,
};

/// Flows to the public server leave from the pool's dedicated address.
fn policies() -> String {
    policy_set(
        r#""pool": { "ipv4": ["203.0.113.10"] }"#,
        &[
            r#"{ "name": "public via pool", "selector": { "dst": ["198.51.100.0/24"] }, "action": { "egress": "pool" } }"#,
        ],
        "",
    )
}

/// (protocol, source) of a packet to `to` in an IPv4 packet's bytes.
fn source_of(packet: &[u8], to: SocketAddr) -> Option<(u8, SocketAddr)> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    if packet.first()? >> 4 != 4 || packet.len() < ihl + 4 {
        return None;
    }
    let proto = packet[9];
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let sport = u16::from_be_bytes([packet[ihl], packet[ihl + 1]]);
    let dport = u16::from_be_bytes([packet[ihl + 2], packet[ihl + 3]]);
    (matches!(proto, 6 | 17) && sa(dst, dport) == to).then(|| (proto, sa(src, sport)))
}

/// Every (protocol, source) of the packets reaching a server, recorded in
/// its namespace: a packet that left the gateway untranslated, or
/// translated differently, shows up here.
struct Sources {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeSet<(u8, SocketAddr)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sources {
    fn record(ns: &NetNs, to: SocketAddr) -> Self {
        let socket = ns
            .run(|| {
                let ip = i32::from((libc::ETH_P_IP as u16).to_be());
                let s = Socket::new(Domain::PACKET, Type::DGRAM, Some(Protocol::from(ip)))?;
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(s)
            })
            .unwrap_or_else(|e| panic!("packet socket in {}: {e:#}", ns.name()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let thread = {
            let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = (&socket).read(&mut buf)
                        && let Some(source) = source_of(&buf[..n], to)
                    {
                        seen.lock().unwrap().insert(source);
                    }
                }
            })
        };
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> BTreeSet<(u8, SocketAddr)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Sources {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Filters (netlink mode) on the uplink's egress hook.
fn egress_filters(lab: &Lab) -> String {
    lab.gw
        .exec("tc", &["filter", "show", "dev", UPLINK, "egress"])
        .unwrap_or_default()
}

/// `egress-agent down --pin-path <pins>` on the gateway: its output, or
/// its error output when it fails.
fn down(lab: &Lab, pins: &PinPath) -> Result<String, String> {
    let out = lab
        .gw
        .command(agent::binary().to_str().unwrap())
        .args(["down", "--pin-path", pins.arg()])
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

/// How the first agent goes away.
#[derive(Clone, Copy, Debug)]
enum Exit {
    Kill,
    KeepOnTerm,
}

/// The agent goes away (`exit`) and a new one starts on the same pins while
/// a TCP connection and a UDP flow run through the gateway: both carry on,
/// intact, every packet reaching the server under the one translated tuple
/// it started with; the programs keep working while no agent runs.
fn restart_under_traffic(exit: Exit, extra: &[&str]) {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("restart");
    let config = dir.write("policies.json", &policies());
    let pins = PinPath::new().unwrap();
    let to = sa(SERVER_PUBLIC, 443);
    let mut args = vec!["--pin-path", pins.arg()];
    args.extend_from_slice(extra);
    let mut first_args = args.clone();
    if matches!(exit, Exit::KeepOnTerm) {
        first_args.push("--keep-dataplane");
    }
    let netlink = extra.contains(&"netlink");
    let attached = |lab: &Lab| {
        if netlink {
            usize::from(egress_filters(lab).contains("egress_steer"))
        } else {
            tcx_programs(&lab.gw, UPLINK)
        }
    };

    let mut first = Agent::steering(&lab, &config, &first_args).unwrap();
    let sources = Sources::record(&lab.inet, to);
    let stream = Stream::start(&lab.client, to, to).unwrap();
    stream.advance(64, Duration::from_secs(10)).unwrap();

    match exit {
        Exit::Kill => {
            first.signal(Signal::SIGKILL).unwrap();
            let status = first.stop().unwrap();
            assert!(!status.success(), "the agent was killed: {status}");
        }
        Exit::KeepOnTerm => {
            let status = first.stop().unwrap();
            assert!(
                status.success(),
                "SIGTERM stops the agent cleanly: {status}"
            );
            let log = first.lines().join("\n");
            assert!(
                log.contains("kept the dataplane pinned at"),
                "--keep-dataplane says what it kept:\n{log}"
            );
        }
    }
    let expected = if netlink { 1 } else { 2 };
    assert_eq!(
        attached(&lab),
        expected,
        "the programs stay attached while no agent runs ({exit:?})"
    );
    stream
        .advance(32, Duration::from_secs(10))
        .expect("traffic flows while no agent runs");

    let mut second = Agent::steering(&lab, &config, &args).unwrap();
    let log = second.lines().join("\n");
    assert!(
        log.contains("took over") && log.contains("by an earlier agent"),
        "the new agent takes the pinned maps over:\n{log}"
    );
    assert!(
        log.contains("egress_steer took over") && log.contains("ingress_restore took over"),
        "and both attachments, in place:\n{log}"
    );
    assert_eq!(
        attached(&lab),
        expected,
        "the new programs replaced the old ones, none were added"
    );
    stream.advance(64, Duration::from_secs(10)).unwrap();
    let (tcp, udp) = stream.finish().unwrap();
    let seen = sources.finish();

    assert_eq!(
        tcp.seen.ip(),
        IpAddr::from(DEDICATED_PRIMARY),
        "the TCP connection left from the pool"
    );
    assert!(
        tcp.bytes >= 2 << 20,
        "the TCP connection carried a few MB, echoed intact: {} bytes",
        tcp.bytes
    );
    assert_eq!(
        udp.answered, udp.sent,
        "every UDP datagram was answered intact ({} of {})",
        udp.answered, udp.sent
    );
    assert_eq!(
        udp.seen.len(),
        1,
        "the UDP flow kept one translated tuple: {:?}",
        udp.seen
    );
    let udp_seen = *udp.seen.first().unwrap();
    let wanted: BTreeSet<(u8, SocketAddr)> = [(6, tcp.seen), (17, udp_seen)].into();
    assert_eq!(
        seen, wanted,
        "every packet reached the server under the flow's first translated tuple (none untranslated, none re-translated)"
    );
    eprintln!(
        "restart ({exit:?}{}): {} TCP bytes intact, {} UDP datagrams all answered, tuples {} and {udp_seen}",
        if netlink { ", netlink" } else { "" },
        tcp.bytes,
        udp.sent,
        tcp.seen
    );

    assert!(second.stop().unwrap().success());
    assert!(
        !pins.path().exists(),
        "a plain stop removes the pins it took over"
    );
    assert_eq!(attached(&lab), 0, "and detaches the programs");
}

#[test]
fn restart_after_sigkill_flows_continue_intact_same_tuple() {
    restart_under_traffic(Exit::Kill, &[]);
}

#[test]
fn restart_after_sigterm_keep_dataplane_flows_continue_intact_same_tuple() {
    restart_under_traffic(Exit::KeepOnTerm, &[]);
}

#[test]
fn restart_netlink_keep_dataplane_flows_continue_intact_same_tuple() {
    restart_under_traffic(Exit::KeepOnTerm, &["--attach", "netlink"]);
}

#[test]
fn restart_second_agent_same_pin_path_refused_first_undisturbed() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let _servers = Servers::start(&lab.inet, &servers(), &[443]).unwrap();
    let dir = TempDir::new("restart-twice");
    let config = dir.write("policies.json", &policies());
    let pins = PinPath::new().unwrap();
    let first = Agent::steering(&lab, &config, &["--pin-path", pins.arg()]).unwrap();

    let mut second =
        Agent::start_gateway(&agent::binary(), &lab, &config, &["--pin-path", pins.arg()]).unwrap();
    let err = second
        .wait_for("another egress-agent", Duration::from_secs(10))
        .unwrap();
    assert!(
        err.contains(&format!("is running with pin path {}", pins.arg())) && err.contains("(pid "),
        "the error names the pin path and the running agent's pid: {err}"
    );
    assert!(!second.stop().unwrap().success(), "the second agent fails");

    assert_eq!(
        tcx_programs(&lab.gw, UPLINK),
        2,
        "the first agent's programs are untouched"
    );
    let seen = probe::tcp(
        &lab.client,
        None,
        sa(SERVER_PUBLIC, 443),
        probe::token("after"),
    )
    .unwrap();
    assert!(seen.intact);
    assert_eq!(seen.src.ip(), IpAddr::from(DEDICATED_PRIMARY));
    drop(first);
}

#[test]
fn restart_changed_max_flows_refused_naming_map_sizes_and_fix() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let dir = TempDir::new("restart-resized");
    let config = dir.write("policies.json", &policies());
    let pins = PinPath::new().unwrap();
    let mut first = Agent::steering(
        &lab,
        &config,
        &[
            "--pin-path",
            pins.arg(),
            "--max-flows",
            "8192",
            "--keep-dataplane",
        ],
    )
    .unwrap();
    assert!(first.stop().unwrap().success());

    let mut second = Agent::start_gateway(
        &agent::binary(),
        &lab,
        &config,
        &["--pin-path", pins.arg(), "--max-flows", "4096"],
    )
    .unwrap();
    let err = second
        .wait_for("pinned map", Duration::from_secs(10))
        .unwrap();
    for part in [
        "EG_CT4",
        "max_entries 8192",
        "asks for 4096",
        "--max-flows",
        &format!("egress-agent down --pin-path {}", pins.arg()),
    ] {
        assert!(err.contains(part), "the error says {part:?}: {err}");
    }
    assert!(!second.stop().unwrap().success());
    assert_eq!(
        tcx_programs(&lab.gw, UPLINK),
        2,
        "the kept dataplane is left as it was"
    );
    assert!(down(&lab, &pins).is_ok());
}

#[test]
fn restart_down_removes_kept_dataplane_refuses_while_running_idempotent() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let dir = TempDir::new("restart-down");
    let config = dir.write("policies.json", &policies());
    let pins = PinPath::new().unwrap();
    let mut agent = Agent::steering(
        &lab,
        &config,
        &["--pin-path", pins.arg(), "--keep-dataplane"],
    )
    .unwrap();

    let err = down(&lab, &pins).expect_err("down is refused while an agent runs");
    assert!(
        err.contains("another egress-agent") && err.contains(pins.arg()),
        "the refusal names the running agent's pin path: {err}"
    );
    assert!(agent.stop().unwrap().success());
    assert_eq!(tcx_programs(&lab.gw, UPLINK), 2, "kept attached");

    let out = down(&lab, &pins).unwrap();
    for part in [
        format!("removed the pins at {}", pins.arg()),
        "EG_CT4".to_owned(),
        "2 attachments (up0 (tc egress), up0 (tc ingress))".to_owned(),
    ] {
        assert!(
            out.contains(&part),
            "down says what it removed ({part:?}): {out}"
        );
    }
    assert!(!pins.path().exists(), "every pin and directory is gone");
    assert_eq!(
        tcx_programs(&lab.gw, UPLINK),
        0,
        "no program stays attached"
    );

    let again = down(&lab, &pins).unwrap();
    assert!(
        again.contains("nothing is pinned"),
        "a second down has nothing to do and says so: {again}"
    );
}

#[test]
fn restart_plain_stop_leaves_nothing_behind() {
    require_root();
    let lab = Lab::new(0).unwrap();
    let dir = TempDir::new("restart-plain");
    let config = dir.write("policies.json", &policies());
    let pins = PinPath::new().unwrap();
    let mut agent = Agent::steering(&lab, &config, &["--pin-path", pins.arg()]).unwrap();
    assert!(
        pins.path().join("maps").join("EG_CT4").exists(),
        "maps are pinned"
    );
    assert!(
        pins.path().join("links").join("up0-egress").exists(),
        "links are pinned"
    );
    for dir in ["", "maps", "links"] {
        let mode = std::fs::metadata(pins.path().join(dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "pin directory {dir:?} is root-only");
    }
    assert!(agent.stop().unwrap().success());
    assert!(!pins.path().exists(), "no pin or directory is left");
    assert_eq!(
        tcx_programs(&lab.gw, UPLINK),
        0,
        "no program is left attached"
    );
    assert!(
        agent.lines().join("\n").contains("removed the pins at"),
        "the stop says what it removed"
    );
}

/// The (generation, destination prefix) entries of the pinned `EG_DST4`.
fn pinned_dst4(pins: &PinPath) -> BTreeSet<(u8, String)> {
    let map = MapData::from_pin(pins.path().join("maps").join(maps::DST4)).unwrap();
    let trie: LpmTrie<MapData, GenPrefix4, u32> = LpmTrie::try_from(Map::LpmTrie(map)).unwrap();
    trie.keys()
        .map(|key| {
            let key = key.unwrap();
            let len = key.prefix_len() - GEN_PREFIX_BITS;
            let data = key.data();
            (
                data.generation,
                format!("{}/{len}", Ipv4Addr::from(data.addr)),
            )
        })
        .collect()
}

fn dst_policies(names: &[(&str, &str)]) -> PolicySet {
    let policies: Vec<String> = names
        .iter()
        .map(|(name, dst)| {
            format!(
                r#"{{ "name": "{name}", "selector": {{ "dst": ["{dst}"] }}, "action": {{ "egress": "pool" }} }}"#
            )
        })
        .collect();
    let policies: Vec<&str> = policies.iter().map(String::as_str).collect();
    let text = policy_set(r#""pool": { "ipv4": ["203.0.113.10"] }"#, &policies, "");
    policy::parse(&text).unwrap_or_else(|e| panic!("test policy: {e}"))
}

fn gen_entries(held: &BTreeSet<(u8, String)>, generation: u8) -> BTreeSet<&str> {
    held.iter()
        .filter(|(g, _)| *g == generation)
        .map(|(_, net)| net.as_str())
        .collect()
}

#[test]
fn restart_tables_taken_over_spare_live_generation_replace_stale_keep_slots() {
    require_root();
    let pins = PinPath::new().unwrap();
    let opts = LoadOptions {
        max_flows: 1024,
        identity_slots: 64,
        ..LoadOptions::default()
    };
    let a = dst_policies(&[("a1", "198.18.1.0/24"), ("a2", "198.18.2.0/24")]);
    let b = dst_policies(&[("b", "198.18.3.0/24")]);
    let c = dst_policies(&[("b", "198.18.3.0/24"), ("c", "198.18.4.0/24")]);

    // The first agent leaves set A in generation 1 and B (live) in 0.
    let mut first = Dataplane::load_pinned(&opts, PinDir::lock(pins.path()).unwrap()).unwrap();
    let mut tables = Tables::new(first.ebpf_mut()).unwrap();
    assert_eq!(
        tables
            .apply(&a, &policy::compile(&a, &[]))
            .unwrap()
            .generation,
        1
    );
    assert_eq!(
        tables
            .apply(&b, &policy::compile(&b, &[]))
            .unwrap()
            .generation,
        0
    );
    let slot_of = |t: &Tables, name: &str| {
        t.active_policies()
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.stats_slot)
            .unwrap()
    };
    let b_slot = slot_of(&tables, "b");
    let old_slots: BTreeSet<u32> = tables
        .active_policies()
        .iter()
        .map(|p| p.stats_slot)
        .collect();
    let addr_slot = tables.addr_slot_of("203.0.113.10").unwrap();
    drop(tables);
    first.keep();
    drop(first);
    let before = pinned_dst4(&pins);
    assert!(gen_entries(&before, 1).contains("198.18.1.0/24"));

    // The second takes over: its first write goes to generation 1 only.
    let mut second = Dataplane::load_pinned(&opts, PinDir::lock(pins.path()).unwrap()).unwrap();
    assert!(second.adopted(), "the pinned maps are taken over");
    let mut tables = Tables::new(second.ebpf_mut()).unwrap();
    let report = tables.apply(&c, &policy::compile(&c, &[])).unwrap();
    assert_eq!(
        report.generation, 1,
        "the first write goes to the generation the programs do not read"
    );
    let after = pinned_dst4(&pins);
    assert_eq!(
        gen_entries(&after, 0),
        gen_entries(&before, 0),
        "the live generation is not touched before the flip"
    );
    assert_eq!(
        gen_entries(&after, 1),
        ["0.0.0.0/0", "198.18.3.0/24", "198.18.4.0/24"].into(),
        "generation 1 holds exactly set C: A's prefixes left by the first agent are gone"
    );
    assert_eq!(
        slot_of(&tables, "b"),
        b_slot,
        "a policy keeps its counter slot across agents"
    );
    assert!(
        !old_slots.contains(&slot_of(&tables, "c")),
        "a new policy does not take a slot the earlier agent's flows count into"
    );
    assert_eq!(
        tables.addr_slot_of("203.0.113.10"),
        Some(addr_slot),
        "an egress address keeps its counter slot"
    );

    drop(tables);
    second.detach();
    assert!(!pins.path().exists());
}
