//! `egress-agent run`: load the dataplane, apply the policy file, attach to
//! the uplink, reload on SIGHUP, and detach cleanly on SIGINT/SIGTERM.

use std::path::Path;

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::RunArgs,
    counters,
    loader::{Dataplane, LoadOptions},
    local,
    policy::{self, PolicySet},
    tables::{self, Tables},
};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let RunArgs {
        config,
        uplink,
        max_flows,
        max_classes,
        max_prefixes,
        attach,
    } = args;

    // Validate before touching the kernel: a bad file attaches nothing.
    let set = policy::load(&config).with_context(|| config.display().to_string())?;
    let compiled = policy::compile(&set, &[]);

    let mut dataplane = Dataplane::load(&LoadOptions {
        max_flows,
        classes_per_gen: max_classes,
        max_prefixes,
        ..LoadOptions::default()
    })
    .context("loading the dataplane")?;
    if let Some(logger) = dataplane.take_logger() {
        // SAFETY: the logger owns the ring buffer's fd and keeps it open,
        // unchanged, for as long as the AsyncFd that now owns the logger.
        let mut logger = unsafe { AsyncFd::register(logger) }
            .map_err(|e| anyhow::anyhow!("polling eBPF log records: {e}"))?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = logger.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }

    let local = local::ipv4_addrs().context("listing this host's addresses")?;
    warn_unassigned(&set, &local);
    tables::set_local_addrs(dataplane.ebpf_mut(), &local)
        .context("recording this host's addresses")?;
    let mut tables = Tables::new(dataplane.ebpf_mut()).context("opening the policy maps")?;
    let report = tables
        .apply(&set, &compiled)
        .context("writing the policy tables")?;
    dataplane
        .attach(&uplink, attach)
        .with_context(|| format!("attaching to uplink {uplink}"))?;
    info!(
        "steering on {uplink}: {} policies, {} classes, generation {} ({} map writes)",
        set.policies.len(),
        report.classes,
        report.generation,
        report.writes
    );

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => reload(&config, &mut tables),
        }
    }

    info!("stopping: detaching from {uplink}");
    log_counters(&mut dataplane, &tables);
    dataplane.detach();
    Ok(())
}

/// Replace the running policy set with the file's, or keep it when the file
/// is rejected.
fn reload(config: &Path, tables: &mut Tables) {
    let set = match policy::load(config) {
        Ok(set) => set,
        Err(err) => {
            error!(
                "reload rejected, previous policies stay in force: {}: {err}",
                config.display()
            );
            return;
        }
    };
    let compiled = policy::compile(&set, &[]);
    match tables.apply(&set, &compiled) {
        Ok(report) => info!(
            "reloaded {}: {} policies, generation {} ({} writes, {} deletes)",
            config.display(),
            set.policies.len(),
            report.generation,
            report.writes,
            report.deletes
        ),
        Err(err) => error!("reload rejected, previous policies stay in force: {err}"),
    }
}

fn warn_unassigned(set: &PolicySet, local: &[std::net::Ipv4Addr]) {
    let pools = set
        .pools
        .iter()
        .flat_map(|p| p.ipv4.iter().map(move |a| (p.name.as_str(), *a)));
    for (pool, addr) in std::iter::once(("default", set.default_egress.ipv4)).chain(pools) {
        if !local.contains(&addr) {
            warn!(
                "egress address {addr} (pool {pool}) is not assigned to this host: replies reach it only if the upstream routes it here"
            );
        }
    }
}

fn log_counters(dataplane: &mut Dataplane, tables: &Tables) {
    match counters::read(dataplane.ebpf_mut()) {
        Ok(values) => {
            let nonzero: Vec<String> = values
                .iter()
                .filter(|(_, _, v)| *v != 0)
                .map(|(_, name, v)| format!("{name}={v}"))
                .collect();
            info!("counters: {}", nonzero.join(" "));
        }
        Err(err) => warn!("reading counters: {err}"),
    }
    for p in tables.active_policies() {
        if let Ok(s) = tables.policy_stats(p.stats_slot) {
            info!(
                "policy {:?}: flows={} packets_out={} bytes_out={} packets_in={} bytes_in={}",
                p.name, s.flows, s.packets_out, s.bytes_out, s.packets_in, s.bytes_in
            );
        }
    }
}
