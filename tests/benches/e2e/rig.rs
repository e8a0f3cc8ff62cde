//! A lab tuned for measuring the gateway's CPU alone: every veth receives
//! through threaded NAPI, so all the work the gateway namespace does for a
//! packet (receive, forwarding, netfilter or TC, transmit to the next veth)
//! runs in the kernel threads of its own two interfaces, whose run time the
//! scheduler counts to the nanosecond. The client's and the server's stacks
//! run in their own threads and processes, and other load on the machine is
//! not counted.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use egress_tests::{
    agent::{self, Agent},
    lab::{LAN, Lab, UPLINK},
    netns::NetNs,
};

/// `--max-classes` for the agent under test.
const MAX_CLASSES: &str = "65536";

/// Every kernel thread whose name starts with `napi/`, by thread id.
fn napi_threads() -> BTreeSet<(u32, String)> {
    let mut out = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            && comm.starts_with("napi/")
        {
            out.insert((pid, comm.trim().to_owned()));
        }
    }
    out
}

/// Nanoseconds a thread has run (first field of schedstat).
fn runtime_ns(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Nanoseconds all threads of process `pid` have run.
fn process_runtime_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.flatten()
                .map(|t| runtime_ns(&format!("{}/schedstat", t.path().display())))
                .sum()
        })
        .unwrap_or(0)
}

/// The process whose command line names `needle` (a unique file path).
pub fn find_process(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        // The agent itself, not the `ip netns exec` that may still wrap it.
        (args.contains(&needle.as_bytes()) && !args.first().is_some_and(|a| a.ends_with(b"ip")))
            .then_some(pid)
    })
}

/// Counters of one moment.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    at: Instant,
    /// Gateway CPU: its interfaces' NAPI threads plus the agent process.
    cpu_ns: u64,
    /// Packets the gateway received on lan0 and up0 (before GRO).
    packets: u64,
    /// Bytes the gateway sent towards the server.
    up_bytes: u64,
    /// TCP connections the server accepted.
    accepted: u64,
}

/// What happened between two snapshots.
#[derive(Clone, Copy, Debug)]
pub struct Delta {
    pub seconds: f64,
    pub cpu_ns: f64,
    pub packets: f64,
    pub up_bytes: f64,
    pub accepted: f64,
}

impl Snapshot {
    pub fn since(&self, earlier: &Self) -> Delta {
        Delta {
            seconds: self.at.duration_since(earlier.at).as_secs_f64(),
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns) as f64,
            packets: self.packets.saturating_sub(earlier.packets) as f64,
            up_bytes: self.up_bytes.saturating_sub(earlier.up_bytes) as f64,
            accepted: self.accepted.saturating_sub(earlier.accepted) as f64,
        }
    }
}

/// `(rx packets, tx bytes)` per interface from the namespace's /proc/net/dev.
fn dev_counters(ns: &NetNs) -> anyhow::Result<Vec<(String, u64, u64)>> {
    ns.run(|| {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev")
            .context("reading /proc/thread-self/net/dev")?;
        Ok(text
            .lines()
            .skip(2)
            .filter_map(|l| {
                let (name, rest) = l.split_once(':')?;
                let f: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect();
                Some((name.trim().to_owned(), *f.get(1)?, *f.get(8)?))
            })
            .collect())
    })
}

/// TCP PassiveOpens of the namespace (connections its servers accepted).
fn passive_opens(ns: &NetNs) -> anyhow::Result<u64> {
    ns.run(|| {
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp")
            .context("reading /proc/thread-self/net/snmp")?;
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next(), tcp.next());
        let (Some(names), Some(values)) = (names, values) else {
            bail!("no Tcp lines in /proc/net/snmp");
        };
        let at = names
            .split_whitespace()
            .position(|n| n == "PassiveOpens")
            .context("no PassiveOpens in /proc/net/snmp")?;
        values
            .split_whitespace()
            .nth(at)
            .and_then(|v| v.parse().ok())
            .context("unreadable PassiveOpens")
    })
}

pub struct Rig {
    pub lab: Lab,
    /// Thread ids of the gateway's lan0 and up0 NAPI threads.
    napi: Vec<u32>,
    /// The agent's process id, when it runs.
    agent_pid: Option<u32>,
}

impl Rig {
    pub fn new() -> anyhow::Result<Self> {
        let lab = Lab::new(0)?;
        let mut napi = Vec::new();
        for (ns, dev, gateway) in [
            (&lab.client, "eth0", false),
            (&lab.gw, LAN, true),
            (&lab.gw, UPLINK, true),
            (&lab.inet, "eth0", false),
        ] {
            // Wire-sized packets (no TSO/GSO from the senders), and NAPI on
            // receive, which a veth only has with GRO on.
            ns.exec(
                "ethtool",
                &["-K", dev, "tso", "off", "gso", "off", "gro", "on"],
            )
            .with_context(|| format!("ethtool on {} {dev}", ns.name()))?;
            let before = napi_threads();
            ns.exec(
                "sh",
                &["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")],
            )
            .with_context(|| format!("threaded NAPI on {} {dev}", ns.name()))?;
            let new: Vec<u32> = napi_threads()
                .difference(&before)
                .filter(|(_, comm)| comm.starts_with(&format!("napi/{dev}-")))
                .map(|(tid, _)| *tid)
                .collect();
            if new.is_empty() {
                bail!("no NAPI thread appeared for {} {dev}", ns.name());
            }
            if gateway {
                napi.extend(new);
            }
        }
        Ok(Self {
            lab,
            napi,
            agent_pid: None,
        })
    }

    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut cpu_ns: u64 = self
            .napi
            .iter()
            .map(|t| runtime_ns(&format!("/proc/{t}/schedstat")))
            .sum();
        if let Some(pid) = self.agent_pid {
            cpu_ns += process_runtime_ns(pid);
        }
        let dev = dev_counters(&self.lab.gw)?;
        let packets = dev
            .iter()
            .filter(|(n, ..)| n == LAN || n == UPLINK)
            .map(|(_, rx, _)| rx)
            .sum();
        let up_bytes = dev
            .iter()
            .find(|(n, ..)| n == UPLINK)
            .map_or(0, |(.., tx)| *tx);
        Ok(Snapshot {
            at: Instant::now(),
            cpu_ns,
            packets,
            up_bytes,
            accepted: passive_opens(&self.lab.inet)?,
        })
    }

    /// Start the agent on the gateway with `config` and count its CPU. The
    /// classifier is sized for the largest generated set (4096 overlapping
    /// decoys need a little over the default 16 384 classes), as an
    /// operator would size it.
    pub fn start_agent(&mut self, config: &Path) -> anyhow::Result<Agent> {
        let agent = Agent::start_gateway(
            &agent::binary(),
            &self.lab,
            config,
            &["--max-classes", MAX_CLASSES],
        )?;
        agent
            .wait_for(agent::READY, Duration::from_secs(120))
            .context("waiting for the agent to steer")?;
        let needle = config.to_str().context("policy path is not UTF-8")?;
        self.agent_pid =
            Some(find_process(needle).with_context(|| format!("no agent process runs {needle}"))?);
        Ok(agent)
    }
}

/// An nftables table in the gateway, deleted on drop.
pub struct NftTable<'a> {
    ns: &'a NetNs,
}

impl<'a> NftTable<'a> {
    pub fn load(ns: &'a NetNs, dir: &Path, name: &str, ruleset: &str) -> anyhow::Result<Self> {
        let path = dir.join(name);
        std::fs::write(&path, ruleset).with_context(|| format!("writing {}", path.display()))?;
        let path = path
            .to_str()
            .context("ruleset path is not UTF-8")?
            .to_owned();
        ns.exec("nft", &["-f", &path])
            .with_context(|| format!("loading {path} into {}", ns.name()))?;
        Ok(Self { ns })
    }
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        let _ = self
            .ns
            .exec("nft", &["delete", "table", "ip", super::nft::TABLE]);
    }
}

/// Whether this kernel has nftables flowtables (CONFIG_NF_FLOW_TABLE):
/// checked by loading one in a throw-away namespace.
pub fn flowtable_supported() -> bool {
    let Ok(ns) = NetNs::new(&format!("{}-ft", egress_tests::netns::unique_name())) else {
        return false;
    };
    if ns
        .ip(&[
            "link", "add", "ftprobe", "type", "veth", "peer", "name", "ftprobe1",
        ])
        .is_err()
    {
        return false;
    }
    let probe = "table ip ftprobe { flowtable ft { hook ingress priority filter; devices = { \"ftprobe\" }; } }";
    ns.exec("nft", &[probe]).is_ok()
}
