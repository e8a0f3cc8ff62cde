//! `cargo xtask run`: the main job on a throw-away lab. Builds everything,
//! creates client/gateway/internet namespaces, starts the agent on the
//! gateway, sends sample TCP/UDP/ICMP flows and shows which egress address
//! each one left from, then waits for Ctrl-C and tears the lab down.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::mpsc,
};

use anyhow::{Context as _, bail};
use clap::Args;
use egress_tests::{
    agent::Agent,
    lab::{
        CLIENT, DEDICATED_PRIMARY, DEDICATED_SECONDARY, GW_UPLINK, Lab, SERVER_INTERNAL,
        SERVER_PARTNER, SERVER_PUBLIC, UPLINK, servers,
    },
    netns,
    probe::{self, Seen, Servers},
};

use crate::{
    build::{self, BuildArgs},
    util::{self, workspace_root},
};

#[derive(Args)]
pub struct RunArgs {
    /// Policy file for the gateway's agent.
    #[arg(long, default_value = "examples/policies.json")]
    pub config: PathBuf,
    /// Tear down right after the sample flows instead of waiting for Ctrl-C.
    #[arg(long)]
    pub no_wait: bool,
    /// Use this agent binary instead of building one (used when re-running under sudo).
    #[arg(long, hide = true)]
    pub agent_bin: Option<PathBuf>,
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let agent_bin = match &args.agent_bin {
        Some(bin) => bin.clone(),
        None => build::build(&BuildArgs::default())?,
    };
    let config = workspace_root().join(&args.config);
    let config = config
        .canonicalize()
        .with_context(|| format!("policy file {}", config.display()))?;

    if !util::is_root() {
        // The lab needs root; everything was built as the invoking user.
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new("sudo");
        cmd.arg("-E")
            .arg(exe)
            .arg("run")
            .arg("--config")
            .arg(&config);
        cmd.arg("--agent-bin").arg(&agent_bin);
        if args.no_wait {
            cmd.arg("--no-wait");
        }
        return util::run(&mut cmd);
    }

    let (tx, stop) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the Ctrl-C handler")?;

    netns::remove_stale()?;
    let lab = Lab::new(0).context("creating the lab namespaces")?;
    let servers = Servers::start(&lab.inet, &servers(), &[443, 8080, 9000])?;
    println!(
        "lab: client {} ({}), gateway {} (uplink {UPLINK}: {GW_UPLINK}, {DEDICATED_PRIMARY}, {DEDICATED_SECONDARY}), internet {} (servers {SERVER_PARTNER}, {SERVER_PUBLIC}, {SERVER_INTERNAL})",
        lab.client.name(),
        CLIENT,
        lab.gw.name(),
        lab.inet.name()
    );
    // The example lives in the developer's checkout, which is theirs rather
    // than root's: a deployed agent refuses such a file, the demo allows it.
    let mut agent = Agent::start_gateway(&agent_bin, &lab, &config, &["--allow-insecure-config"])?;
    agent.wait_ready()?;

    println!();
    println!("{:<5} {:<20} {:<22} egress", "flow", "to", "server saw");
    let mut failures = 0;
    let samples: [(&str, Ipv4Addr, u16); 9] = [
        ("tcp", SERVER_PARTNER, 443),
        ("udp", SERVER_PARTNER, 8080),
        ("tcp", SERVER_PARTNER, 9000),
        ("tcp", SERVER_PUBLIC, 443),
        ("udp", SERVER_PUBLIC, 443),
        ("tcp", SERVER_INTERNAL, 443),
        ("udp", SERVER_INTERNAL, 443),
        ("icmp", SERVER_PARTNER, 0),
        ("icmp", SERVER_INTERNAL, 0),
    ];
    for (kind, server, port) in samples {
        let to = SocketAddr::new(server.into(), port);
        let result = match kind {
            "tcp" => probe::tcp(&lab.client, None, to, probe::token("tcp")),
            "udp" => probe::udp(&lab.client, None, to, probe::token("udp")),
            _ => probe::ping(&lab.client, &servers, server.into(), 0x0e9e),
        };
        let shown_to = if kind == "icmp" {
            server.to_string()
        } else {
            to.to_string()
        };
        match result {
            Ok(Seen { src, intact }) => {
                let what = describe(src.ip());
                let integrity = if intact { "" } else { "  (DATA CORRUPTED)" };
                if !intact {
                    failures += 1;
                }
                println!("{kind:<5} {shown_to:<20} {src:<22} {what}{integrity}");
            }
            Err(err) => {
                failures += 1;
                println!("{kind:<5} {shown_to:<20} {:<22} FAILED: {err:#}", "-");
            }
        }
    }
    println!();

    if !args.no_wait {
        println!("The lab is up. Try it yourself, e.g.:");
        println!(
            "  ip netns exec {} curl -s telnet://{SERVER_PARTNER}:443",
            lab.client.name()
        );
        println!(
            "  ip netns exec {} ping -c1 {SERVER_PUBLIC}",
            lab.client.name()
        );
        println!("Press Ctrl-C to stop the agent and remove the lab.");
        let _ = stop.recv();
    }
    let status = agent.stop()?;
    drop(servers);
    drop(lab);
    println!("lab removed");
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    if failures > 0 {
        bail!("{failures} sample flow(s) failed");
    }
    Ok(())
}

fn describe(src: IpAddr) -> &'static str {
    match src {
        a if a == IpAddr::V4(GW_UPLINK) => "default egress",
        a if a == IpAddr::V4(DEDICATED_PRIMARY) => "dedicated address (pool primary)",
        a if a == IpAddr::V4(DEDICATED_SECONDARY) => "dedicated address (pool secondary)",
        a if a == IpAddr::V4(CLIENT) => "client's own address (bypass)",
        _ => "unexpected address",
    }
}
