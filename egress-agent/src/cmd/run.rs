//! `egress-agent run`: load the dataplane, apply the policy file, attach to
//! the uplink, and keep it right: reload on SIGHUP, expire idle flows, fail
//! dedicated addresses over, and detach cleanly on SIGINT/SIGTERM.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use egress_common::stats::Traffic;
use log::{debug, error, info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::RunArgs,
    conntrack::Conntrack,
    counters,
    health::Monitor,
    loader::{Dataplane, LoadOptions},
    local,
    policy::{
        self, Compiled, PolicySet,
        compile::Lookup,
        eval::Flow as EvalFlow,
        model::{Egress, Timeouts, WhenDown},
    },
    tables::{self, Tables},
};

/// How often idle flows are looked for: a quarter of the shortest timeout,
/// between one and thirty seconds.
fn sweep_every(t: &Timeouts) -> Duration {
    let shortest = t
        .tcp_established
        .min(t.tcp_transitory)
        .min(t.tcp_closed)
        .min(t.udp)
        .min(t.icmp);
    (shortest / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// The running agent's state, owned by the main task.
struct Agent {
    config: PathBuf,
    set: PolicySet,
    compiled: Compiled,
    dataplane: Dataplane,
    tables: Tables,
    conntrack: Arc<Mutex<Conntrack>>,
    timeouts: Arc<Mutex<Timeouts>>,
    monitor: Monitor,
    /// Health changes not yet acted on (the tables write failed).
    health_changes: Vec<(Ipv4Addr, bool)>,
    local: Vec<IpAddr>,
    reclassify_on_reload: bool,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let RunArgs {
        config,
        uplink,
        max_flows,
        max_classes,
        max_prefixes,
        attach,
        reclassify_on_reload,
    } = args;

    // Validate before touching the kernel: a bad file attaches nothing.
    let set = policy::load(&config).with_context(|| config.display().to_string())?;
    let compiled = policy::compile(&set, &[]);

    let mut dataplane = Dataplane::load(&LoadOptions {
        max_flows: max_flows.unwrap_or(set.nat.max_flows),
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

    let local = local::addrs().context("listing this host's addresses")?;
    warn_unassigned(&set, &local);
    tables::set_local_addrs(dataplane.ebpf_mut(), &local)
        .context("recording this host's addresses")?;
    let mut tables = Tables::new(dataplane.ebpf_mut()).context("opening the policy maps")?;
    let conntrack =
        Conntrack::new(dataplane.ebpf_mut()).context("opening the connection tables")?;
    let report = tables
        .apply(&set, &compiled)
        .context("writing the policy tables")?;
    dataplane
        .attach(&uplink, attach)
        .with_context(|| format!("attaching to uplink {uplink}"))?;
    info!(
        "steering on {uplink}: {} policies ({} rules, {} classes), generation {} ({} map writes)",
        set.policies.len(),
        report.rules,
        report.classes,
        report.generation,
        report.writes
    );

    let timeouts = Arc::new(Mutex::new(set.timeouts));
    let conntrack = Arc::new(Mutex::new(conntrack));
    let sweeper = tokio::spawn(sweep_forever(Arc::clone(&conntrack), Arc::clone(&timeouts)));
    let mut health_every = tokio::time::interval(set.health.interval);
    let mut agent = Agent {
        config,
        set,
        compiled,
        dataplane,
        tables,
        conntrack,
        timeouts,
        monitor: Monitor::default(),
        health_changes: Vec::new(),
        local,
        reclassify_on_reload,
    };

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                let interval = agent.set.health.interval;
                agent.reload();
                if agent.set.health.interval != interval {
                    health_every = tokio::time::interval(agent.set.health.interval);
                }
            }
            _ = health_every.tick() => agent.health_round().await,
        }
    }

    sweeper.abort();
    info!("stopping: detaching from {uplink}");
    agent.log_counters();
    agent.dataplane.detach();
    Ok(())
}

/// Expire idle flows, forever (a blocking walk of the tables, off the main task).
async fn sweep_forever(conntrack: Arc<Mutex<Conntrack>>, timeouts: Arc<Mutex<Timeouts>>) {
    loop {
        let every = sweep_every(&timeouts.lock().expect("timeouts lock"));
        tokio::time::sleep(every).await;
        // Read again after the sleep: a reload in between applies at once.
        let t = *timeouts.lock().expect("timeouts lock");
        let conntrack = Arc::clone(&conntrack);
        let report = tokio::task::spawn_blocking(move || {
            conntrack.lock().expect("conntrack lock").sweep(&t)
        })
        .await;
        match report {
            Ok(r) if r.expired + r.orphans > 0 => {
                debug!(
                    "expired {} idle flows ({} stray reverse entries); {} active",
                    r.expired, r.orphans, r.active
                )
            }
            Ok(_) => {}
            Err(e) => error!("flow sweeper failed: {e}"),
        }
    }
}

/// Whether `addr` is an address of `egress` (or inside its IPv6 range).
fn egress_has(set: &PolicySet, egress: Egress, addr: IpAddr) -> bool {
    match (egress, addr) {
        (Egress::Bypass, _) => false,
        (Egress::Default, IpAddr::V4(a)) => a == set.default_egress.ipv4,
        (Egress::Default, IpAddr::V6(a)) => set.default_egress.ipv6 == Some(a),
        (Egress::Pool(k), IpAddr::V4(a)) => set.pools[k].ipv4.contains(&a),
        (Egress::Pool(k), IpAddr::V6(a)) => set.pools[k].ipv6.is_some_and(|n| n.contains(&a)),
    }
}

/// Whether `addr` is one of the set's egress addresses (or in an IPv6 range).
fn is_egress(set: &PolicySet, addr: IpAddr) -> bool {
    egress_has(set, Egress::Default, addr)
        || (0..set.pools.len()).any(|k| egress_has(set, Egress::Pool(k), addr))
}

impl Agent {
    /// Replace the running policy set with the file's, or keep it when the
    /// file is rejected.
    fn reload(&mut self) {
        let config = self.config.display();
        let set = match policy::load(&self.config) {
            Ok(set) => set,
            Err(err) => {
                error!("reload rejected, previous policies stay in force: {config}: {err}");
                return;
            }
        };
        let compiled = policy::compile(&set, &[]);
        let report = match self.tables.apply(&set, &compiled) {
            Ok(report) => report,
            Err(err) => {
                error!("reload rejected, previous policies stay in force: {err}");
                return;
            }
        };
        // Established flows keep their translation, unless their egress
        // address is gone (or the operator asked for re-evaluation).
        let mut conntrack = self.conntrack.lock().expect("conntrack lock");
        let removed = conntrack.flush(&|addr| !is_egress(&set, addr));
        let reclassified = if self.reclassify_on_reload {
            conntrack.flush_flows(&|flow| {
                let lookup = Lookup {
                    flow: EvalFlow {
                        src: flow.src,
                        dst: flow.dst,
                        proto: flow.protocol,
                        dst_port: flow.dport,
                    },
                    identity: flow.identity,
                    country: 0,
                };
                let egress = compiled
                    .classify(&lookup)
                    .map_or(Egress::Default, |i| set.policies[i].action.egress);
                !leaves_as(&set, egress, flow.nat_addr, flow.flags)
            })
        } else {
            0
        };
        drop(conntrack);
        *self.timeouts.lock().expect("timeouts lock") = set.timeouts;
        info!(
            "reloaded {config}: {} policies, generation {} ({} writes, {} deletes); ended {} flows whose egress address was removed{}",
            set.policies.len(),
            report.generation,
            report.writes,
            report.deletes,
            removed,
            if self.reclassify_on_reload {
                format!(", {reclassified} re-classified elsewhere")
            } else {
                String::new()
            }
        );
        self.set = set;
        self.compiled = compiled;
    }

    /// One health round: fail pools over from addresses that went down (and
    /// end the flows on them, so clients reconnect), back when they recover.
    async fn health_round(&mut self) {
        let local = match local::addrs() {
            Ok(local) => local,
            Err(err) => {
                warn!("listing this host's addresses: {err}");
                return;
            }
        };
        if local != self.local {
            if let Err(err) = tables::set_local_addrs(self.dataplane.ebpf_mut(), &local) {
                warn!("recording this host's addresses: {err}");
            }
            self.local = local.clone();
        }
        let mut dedicated: Vec<Ipv4Addr> = self
            .set
            .pools
            .iter()
            .flat_map(|p| p.ipv4.iter().copied())
            .collect();
        dedicated.sort();
        dedicated.dedup();
        let changes = self
            .monitor
            .round(&self.set.health, &dedicated, &local)
            .await;
        self.health_changes.extend(changes);
        // Every round, not only on a change: the write is skipped where the
        // tables already agree, and this both retries a failed write and
        // clears addresses that a reload removed while they were down.
        if let Err(err) = self.tables.set_down(&self.monitor.down()) {
            error!("updating pool health: {err}");
            return;
        }
        for (addr, up) in std::mem::take(&mut self.health_changes) {
            if up {
                info!("egress address {addr} is up again: its pools use it for new flows");
            } else {
                let ended = self
                    .conntrack
                    .lock()
                    .expect("conntrack lock")
                    .flush(&|a| a == IpAddr::V4(addr));
                warn!(
                    "egress address {addr} is down: new flows move to the next usable address; {ended} flows on it ended"
                );
            }
        }
    }

    fn log_counters(&mut self) {
        match counters::read(self.dataplane.ebpf_mut()) {
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
        for p in self.tables.active_policies() {
            if let Ok(s) = self.tables.policy_stats(p.stats_slot) {
                info!(
                    "policy {:?}: flows={} {}",
                    p.name,
                    s.flows,
                    traffic(&s.traffic)
                );
            }
        }
        let flows = self.conntrack.lock().expect("conntrack lock").flows();
        if let Ok(addrs) = self.tables.addr_stats() {
            for (addr, s) in addrs {
                // Active flows of an address, or of an IPv6 range.
                let active = match addr.parse::<ipnet::IpNet>() {
                    Ok(range) => flows.iter().filter(|f| range.contains(&f.nat_addr)).count(),
                    Err(_) => flows
                        .iter()
                        .filter(|f| f.nat_addr.to_string() == addr)
                        .count(),
                };
                info!(
                    "egress {addr}: flows={} active={active} exhausted={} {}",
                    s.flows,
                    s.exhausted,
                    traffic(&s.traffic)
                );
            }
        }
    }
}

/// Packet and byte counts each way, as the stop log prints them.
fn traffic(t: &Traffic) -> String {
    format!(
        "packets_out={} bytes_out={} packets_in={} bytes_in={}",
        t.packets_out, t.bytes_out, t.packets_in, t.bytes_in
    )
}

/// Whether a flow translated to `nat_addr` (with `flags`) leaves the way
/// `egress` says. A pool that falls back to the default egress when all its
/// addresses are down may also have sent it from there.
fn leaves_as(set: &PolicySet, egress: Egress, nat_addr: IpAddr, flags: u16) -> bool {
    use egress_common::conntrack::{CT_F_LOCAL, CT_F_PASS};
    if flags & CT_F_LOCAL != 0 {
        return true;
    }
    match egress {
        Egress::Bypass => flags & CT_F_PASS != 0,
        _ if flags & CT_F_PASS != 0 => false,
        Egress::Pool(k) if set.pools[k].when_down == WhenDown::Default => {
            egress_has(set, egress, nat_addr) || egress_has(set, Egress::Default, nat_addr)
        }
        _ => egress_has(set, egress, nat_addr),
    }
}

fn warn_unassigned(set: &PolicySet, local: &[IpAddr]) {
    let pools = set
        .pools
        .iter()
        .flat_map(|p| p.ipv4.iter().map(move |a| (p.name.as_str(), *a)));
    for (pool, addr) in std::iter::once(("default", set.default_egress.ipv4)).chain(pools) {
        if !local.contains(&IpAddr::V4(addr)) {
            warn!(
                "egress address {addr} (pool {pool}) is not assigned to this host: replies reach it only if the upstream routes it here (use \"health\": {{\"check\": \"none\"}} for routed addresses)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use egress_common::conntrack::{CT_F_LOCAL, CT_F_PASS};

    use super::*;

    fn set(when_down: &str) -> PolicySet {
        policy::parse::parse(&format!(
            r#"{{
                "egress_pools": {{
                    "p": {{ "ipv4": ["203.0.113.10"], "ipv6": "2001:db8:e0::/64", "when_down": "{when_down}" }}
                }},
                "default_egress": {{ "ipv4": "203.0.113.1", "ipv6": "2001:db8:ff::1" }},
                "policies": [
                    {{ "name": "to p", "selector": {{ "dst": ["192.0.2.0/24"] }}, "action": {{ "egress": "p" }} }}
                ]
            }}"#
        ))
        .expect("the test policy parses")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn reclassify_pool_falling_back_to_default_keeps_flows_on_default_address() {
        let fallback = set("default");
        let strict = set("drop");
        let pool = Egress::Pool(0);
        assert!(
            leaves_as(&fallback, pool, ip("203.0.113.1"), 0),
            "a pool that falls back to the default egress may have sent the flow from it"
        );
        assert!(
            leaves_as(&fallback, pool, ip("2001:db8:ff::1"), 0),
            "the same for the default IPv6 address"
        );
        assert!(
            !leaves_as(&strict, pool, ip("203.0.113.1"), 0),
            "a fail-closed pool never uses the default egress: such a flow moved"
        );
        assert!(leaves_as(&strict, pool, ip("203.0.113.10"), 0));
        assert!(leaves_as(&strict, pool, ip("2001:db8:e0::7"), 0));
        assert!(
            !leaves_as(&fallback, pool, ip("198.51.100.1"), 0),
            "an address of neither the pool nor the default egress is elsewhere"
        );
    }

    #[test]
    fn reclassify_bypass_and_local_flows_judged_by_flags() {
        let set = set("drop");
        assert!(leaves_as(&set, Egress::Bypass, ip("10.0.0.2"), CT_F_PASS));
        assert!(
            !leaves_as(&set, Egress::Bypass, ip("203.0.113.1"), 0),
            "a translated flow does not leave the way a bypass policy says"
        );
        assert!(
            !leaves_as(&set, Egress::Default, ip("10.0.0.2"), CT_F_PASS),
            "a bypassed flow does not leave from the default egress"
        );
        assert!(
            leaves_as(&set, Egress::Pool(0), ip("203.0.113.1"), CT_F_LOCAL),
            "the gateway's own flows are never moved"
        );
    }

    #[test]
    fn is_egress_pool_range_and_default_addresses_only() {
        let set = set("drop");
        for addr in [
            "203.0.113.1",
            "203.0.113.10",
            "2001:db8:ff::1",
            "2001:db8:e0::1",
        ] {
            assert!(is_egress(&set, ip(addr)), "{addr} is an egress address");
        }
        for addr in ["203.0.113.11", "2001:db8:ff::2", "10.0.0.1"] {
            assert!(
                !is_egress(&set, ip(addr)),
                "{addr} is not an egress address"
            );
        }
    }
}
