//! `cargo xtask bench`: measure the dataplane and write docs/BENCHMARKS.md.
//! A benchmark, never a timed test: nothing here passes or fails on speed.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
};

use anyhow::Context as _;
use clap::Args;

use crate::{
    build::{self, BuildArgs},
    util::{self, cargo, workspace_root},
};

#[derive(Args)]
pub struct BenchArgs {
    /// BPF_PROG_TEST_RUN repetitions per run.
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Runs per measurement (the table shows the median and the spread).
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Print only; do not rewrite docs/BENCHMARKS.md.
    #[arg(long)]
    pub no_write: bool,
    /// End to end: measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    pub e2e_seconds: f64,
    /// End to end: runs per figure (the table shows the median and the spread).
    #[arg(long, default_value_t = 3)]
    pub e2e_runs: u32,
    /// End to end: policy counts, comma-separated.
    #[arg(long, default_value = "10,256,4096")]
    pub policies: String,
    /// End to end: UDP datagrams per second offered (0: as fast as iperf3 sends).
    #[arg(long, default_value_t = 50_000)]
    pub udp_pps: u64,
    /// Skip the end-to-end bench (keeps its section of docs/BENCHMARKS.md).
    #[arg(long, conflicts_with = "only_e2e")]
    pub skip_e2e: bool,
    /// Run only the end-to-end bench (keeps the per-packet and control-plane
    /// sections).
    #[arg(long)]
    pub only_e2e: bool,
}

const PER_PACKET: &str = "## Per-packet cost (BPF_PROG_TEST_RUN)";
const END_TO_END: &str = "## End to end through the lab gateway";
const CONTROL: &str = "## Control plane at scale";

/// The section of `doc` under `heading`, up to the next `## ` heading.
fn section(doc: &str, heading: &str) -> Option<String> {
    let start = doc.find(heading)?;
    let rest = &doc[start..];
    let end = rest[heading.len()..]
        .find("\n## ")
        .map_or(rest.len(), |i| i + heading.len() + 1);
    Some(rest[..end].trim_end().to_owned() + "\n")
}

/// Run one bench target of egress-tests as root; its standard output.
fn run_bench(name: &str, envs: &[(&str, String)]) -> anyhow::Result<String> {
    let mut cmd = cargo();
    cmd.args(["bench", "--package", "egress-tests", "--bench", name])
        .env("EGRESS_EBPF_OBJ", build::ebpf_object())
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        // Progress and errors show as they happen; the table is the output.
        .stderr(Stdio::inherit());
    if !util::is_root() {
        util::run_binaries_with_sudo(&mut cmd)?;
    }
    let output = cmd
        .output()
        .with_context(|| format!("running the {name} benchmark"))?;
    if !output.status.success() {
        anyhow::bail!(
            "the {name} benchmark failed ({}); its errors are above",
            output.status
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or_else(String::new, |kb| format!(", {} GiB RAM", kb / 1024 / 1024));
    format!(
        "{cpu}, {cpus} CPUs{mem}; kernel {}; {}",
        first_line("uname", &["-r"]),
        first_line("rustc", &["--version"])
    )
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    // The release agent: the end-to-end bench counts its CPU time too.
    let agent = build::build(&BuildArgs { release: true })?;
    let path = workspace_root().join("docs").join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();

    let per_packet = if args.only_e2e {
        section(&old, PER_PACKET)
    } else {
        let table = run_bench(
            "dataplane",
            &[
                ("EGRESS_BENCH_REPEAT", args.repeat.to_string()),
                ("EGRESS_BENCH_RUNS", args.runs.to_string()),
            ],
        )?;
        print!("{table}");
        let mut s = String::new();
        let _ = writeln!(s, "{PER_PACKET}\n");
        let _ = writeln!(
            s,
            "Command: `cargo xtask bench --repeat {} --runs {}`. Packets are realistic Ethernet/IPv4 and Ethernet/IPv6 TCP frames with a 64-byte payload. The policy sets are generated: each policy names 1-3 destination prefixes (a third also an IPv6 one), TCP/UDP, a port and a port range, a fifth of them a group, and the measured flow is taken by a rule at the end of the list. See `tests/benches/dataplane.rs` for how each repetition is kept on the same path.\n",
            args.repeat, args.runs
        );
        s.push_str(&table);
        Some(s)
    };

    let end_to_end = if args.skip_e2e {
        section(&old, END_TO_END)
    } else {
        let table = run_bench(
            "e2e",
            &[
                ("EGRESS_AGENT_BIN", agent.display().to_string()),
                ("EGRESS_E2E_SECONDS", args.e2e_seconds.to_string()),
                ("EGRESS_E2E_RUNS", args.e2e_runs.to_string()),
                ("EGRESS_E2E_POLICIES", args.policies.clone()),
                ("EGRESS_E2E_UDP_PPS", args.udp_pps.to_string()),
            ],
        )?;
        print!("{table}");
        let mut s = String::new();
        let _ = writeln!(s, "{END_TO_END}\n");
        let _ = writeln!(
            s,
            "Command: `cargo xtask bench --e2e-seconds {} --e2e-runs {} --policies {} --udp-pps {}` (`tests/benches/e2e.rs`).\n",
            args.e2e_seconds, args.e2e_runs, args.policies, args.udp_pps
        );
        s.push_str(E2E_METHOD);
        s.push('\n');
        s.push_str(&table);
        Some(s)
    };

    let control = if args.only_e2e {
        section(&old, CONTROL)
    } else {
        let table = run_bench(
            "control",
            &[("EGRESS_AGENT_BIN", agent.display().to_string())],
        )?;
        print!("{table}");
        Some(format!(
            "{CONTROL}\n\nCommand: `cargo xtask bench` (`tests/benches/control.rs`): the release agent on the lab gateway with 4096 generated policies (a fifth for groups, a seventh for countries), an identities file of 100 000 sessions and the full country database (`--geoip`, MMDB); the probed policy is the last before the catch-all.\n\n{table}"
        ))
    };

    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let mut doc = String::new();
    let _ = writeln!(doc, "# Benchmarks\n");
    let _ = writeln!(doc, "Written by `cargo xtask bench` on {date}.\n");
    let _ = writeln!(doc, "Machine: {}.\n", machine());
    for part in [per_packet, control, end_to_end].into_iter().flatten() {
        doc.push_str(&part);
        doc.push('\n');
    }
    if !args.no_write {
        std::fs::create_dir_all(path.parent().expect("docs/ has a parent"))?;
        std::fs::write(&path, doc.trim_end().to_owned() + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("xtask: wrote {}", path.display());
    }
    Ok(())
}

/// How the end-to-end figures are made, written above their tables.
const E2E_METHOD: &str = "\
The lab's three namespaces (client → gateway → internet), built afresh for every configuration and policy count. \
The policy file has N policies; only the last one selects the measured traffic (198.51.100.10, TCP/UDP ports 80, 5201 and 7777 → 203.0.113.10), \
the N − 1 before it name 1–3 prefixes (/18 to /28) inside 10.128.0.0/9, TCP/UDP, a port and a port range, a quarter of them leaving from the default egress (no identities or countries: nftables could not express them). \
The same file configures every row: \
(a) `egress-agent run --config FILE --uplink up0` (release build); \
(b1) one `snat ip to` rule per policy, in order, in the postrouting NAT chain: conntrack translates the rest of each flow; \
(b2) the same policies as a decision tree: a verdict map on the destination (interval set) jumps to a per-class chain holding one `snat ip to th dport map @…` \
(or a concatenated `ip saddr . meta l4proto . th dport` map where the class needs it), overlaps resolved in policy order when the rules are generated, \
so a new flow costs two map lookups whatever N, plus a flowtable (`flow add @ft`) for established flows where the kernel has `CONFIG_NF_FLOW_TABLE`; \
(c) no agent and no rules: plain forwarding, the internet side routing 10.10.0.0/24 back to the gateway. \
Both rulesets are generated by the bench from the policy file and checked against the agent's reference evaluator on 5 000 flows; \
before each configuration is measured, a TCP and a UDP probe check the server sees the expected source address. \
`EGRESS_E2E_RULESETS=policies.json cargo bench -p egress-tests --bench e2e` prints both rulesets for a file.

Load: iperf3 UDP with 64-byte payloads at a fixed offered rate (so every configuration handles the same packets and none is saturated), \
iperf3 TCP bulk (one stream), and wrk (`-t1 -c32`, `Connection: close`) against nginx (`keepalive_timeout 0`): one TCP connection per request. \
TSO and GSO are off on the lab links, so packets are wire-sized; GRO is on (a veth only has NAPI with it).

Gateway CPU: every veth receives through threaded NAPI (`/sys/class/net/DEV/threaded`), so all the gateway's packet work \
(receive, GRO, routing, TC or netfilter, transmit onto the next veth) runs in the kernel threads of its lan0 and up0. \
CPU time = the run time the scheduler counted for those two threads (`/proc/TID/schedstat`, ns) plus, for (a), every thread of the agent process, \
between two readings taken after 1 s of warm-up. Per packet: divided by the packets the gateway received on lan0 and up0 in both directions \
(`/proc/net/dev` of its namespace; counted before GRO, so wire packets). Per connection: divided by the connections the server accepted \
(`PassiveOpens`). The client's and the server's stacks run in their own NAPI threads and processes and are not counted, nor is any other \
load on the machine, so no idle baseline is subtracted. The raw rates below are bounded by the load generators, which share the machine's CPUs with the gateway.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_keeps_one_part_of_the_doc_up_to_the_next_heading() {
        let doc = format!(
            "# Benchmarks\n\nMachine: x.\n\n{PER_PACKET}\n\n| a |\n\n{END_TO_END}\n\nmethod\n\n#### table\n\n| b |\n"
        );
        assert_eq!(
            section(&doc, PER_PACKET).as_deref(),
            Some(format!("{PER_PACKET}\n\n| a |\n").as_str()),
            "the per-packet section must stop before the end-to-end heading"
        );
        assert_eq!(
            section(&doc, END_TO_END).as_deref(),
            Some(format!("{END_TO_END}\n\nmethod\n\n#### table\n\n| b |\n").as_str()),
            "the end-to-end section must keep its #### tables and run to the end"
        );
        assert_eq!(section("# Benchmarks\n", END_TO_END), None);
    }
}
