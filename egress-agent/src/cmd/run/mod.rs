//! `egress-agent run`: load the dataplane, apply the policy file, attach to
//! the uplink, and keep it right: reload on SIGHUP, expire idle flows, fail
//! dedicated addresses over, and detach cleanly on SIGINT/SIGTERM.

mod control;
mod flowlog;
mod metrics;
mod watch;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
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

use self::watch::{FileWatch, Fingerprint};
use crate::{
    api::{self, ApiLimits},
    cli::RunArgs,
    conntrack::Conntrack,
    control::{Command, ControlError, ReloadView},
    counters,
    geoip::{self, GeoReport, GeoTables, GeoWriter, LoadStats},
    health::Monitor,
    identity::{
        self, Origin,
        dataplane::IdentityTries,
        registry::{Limits, Pending, Registry},
    },
    loader::{Dataplane, LoadOptions},
    local,
    pin::PinDir,
    policy::{
        self, Compiled, PolicySet,
        compile::Lookup,
        eval::Flow as EvalFlow,
        model::{Egress, Timeouts, WhenDown},
    },
    tables::{self, Tables},
    trust, uplinks,
};

/// The running agent's state, owned by the main task.
struct Agent {
    config: PathBuf,
    set: PolicySet,
    compiled: Compiled,
    dataplane: Dataplane,
    tables: Tables,
    conntrack: Arc<Mutex<Conntrack>>,
    /// The flow log, port use and the dataplane's switches.
    flow_log: flowlog::FlowLog,
    timeouts: Arc<Mutex<Timeouts>>,
    monitor: Monitor,
    /// Health changes not yet acted on (the tables write failed).
    health_changes: Vec<(Ipv4Addr, bool)>,
    local: Vec<IpAddr>,
    reclassify_on_reload: bool,
    /// Live sessions and their identity ids.
    registry: Registry,
    tries: IdentityTries,
    identities: Option<PathBuf>,
    /// Country databases (`--geoip`), reloaded with the policies.
    geoip: Vec<PathBuf>,
    geo_writer: GeoWriter,
    geo: Option<Geo>,
    /// Files whose change on disk triggers a reload (`None`: --no-watch).
    watch: Option<FileWatch>,
    /// Where API sessions are saved, and whether they changed since.
    state_dir: PathBuf,
    sessions_dirty: bool,
    /// Reloads applied and rejected, and when the last one was applied.
    reloads_ok: u64,
    reloads_failed: u64,
    last_reload: Option<std::time::SystemTime>,
    /// `--uplink`s: the interfaces a pool may name.
    uplinks: Vec<String>,
    /// The versions of the identities file and the country databases in
    /// force: a reload reads again only what changed (re-reading 100 000
    /// unchanged sessions took seconds).
    identities_applied: Option<Fingerprint>,
    geo_applied: Fingerprint,
    /// `--allow-insecure-config`: skip the check that only root can change
    /// the files the agent steers by.
    allow_insecure_config: bool,
}

/// The loaded country databases: the tables (for re-classifying flows on
/// reload) and what loading them measured.
struct Geo {
    tables: GeoTables,
    stats: LoadStats,
    report: GeoReport,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // First of all: a signal that arrives while starting up must stop the
    // agent through its clean path, not kill it with maps attached.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // Validate before touching the kernel: a bad file attaches nothing.
    let config = args.config.clone();
    let uplinks = args.uplink.clone();
    uplinks::distinct(&uplinks)?;
    if !args.allow_insecure_config {
        trust::check_config(&config, args.identities.as_deref(), &args.geoip)?;
    }
    let set = policy::load(&config).with_context(|| config.display().to_string())?;
    uplinks::check(&set, &uplinks).with_context(|| config.display().to_string())?;
    let now = jiff::Timestamp::now();
    // Taken before reading: a file changed while it is read is read again.
    let identities_applied = args
        .identities
        .as_ref()
        .map(|p| watch::fingerprint(std::slice::from_ref(p)));
    let geo_applied = watch::fingerprint(&args.geoip);
    let file_sessions = match &args.identities {
        Some(path) => Some(identity::file::load(
            path,
            now,
            identity::file::FILE_ID_PREFIX,
        )?),
        None => None,
    };

    let geo_tables = if args.geoip.is_empty() {
        None
    } else {
        let (tables, stats) = geoip::load(&args.geoip).context("loading the country databases")?;
        Some((tables, stats))
    };

    let identity_slots = args.max_sessions.saturating_add(1).max(2);
    let pins = PinDir::lock(&args.pin_path)?;
    let mut dataplane = Dataplane::load_pinned(
        &LoadOptions {
            max_flows: args.max_flows.unwrap_or(set.nat.max_flows),
            classes_per_gen: args.max_classes,
            max_prefixes: args.max_prefixes,
            identity_slots,
            identity_prefixes: (args.max_sessions.saturating_mul(2)).max(1024),
            geo: geo_tables.is_some(),
            geo_split_blocks: args.geo_split_blocks,
            geo_v6_ranges: args.geo_v6_ranges,
            ..LoadOptions::default()
        },
        pins,
    )
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
    // Before the policy tables: the country writer opens its own handle on
    // the generation map that `Tables` takes.
    let mut geo_writer =
        GeoWriter::new(dataplane.ebpf_mut()).context("opening the country maps")?;
    let geo = match geo_tables {
        Some((tables, stats)) => {
            let report = geo_writer
                .apply(&tables)
                .context("writing the country tables")?;
            info!("country databases: {report}");
            Some(Geo {
                tables,
                stats,
                report,
            })
        }
        None => None,
    };
    let tables = Tables::new(dataplane.ebpf_mut()).context("opening the policy maps")?;
    let tries = IdentityTries::new(dataplane.ebpf_mut()).context("opening the identity maps")?;
    let mut conntrack =
        Conntrack::new(dataplane.ebpf_mut()).context("opening the connection tables")?;
    let flow_log = flowlog::FlowLog::open(
        dataplane.ebpf_mut(),
        args.flow_log.as_deref(),
        &mut conntrack,
        set.nat.port_range,
    )?;
    let registry = Registry::new(Limits {
        max_sessions: args.max_sessions as usize,
        max_identities: identity_slots - 1,
        max_prefixes: (args.max_sessions.saturating_mul(2)).max(1024) as usize,
    });

    let timeouts = Arc::new(Mutex::new(set.timeouts));
    let conntrack = Arc::new(Mutex::new(conntrack));
    let mut agent = Agent {
        config,
        compiled: policy::compile(&set, &[]),
        set,
        dataplane,
        tables,
        conntrack: Arc::clone(&conntrack),
        flow_log,
        timeouts: Arc::clone(&timeouts),
        monitor: Monitor::default(),
        health_changes: Vec::new(),
        local,
        reclassify_on_reload: args.reclassify_on_reload,
        registry,
        tries,
        identities: args.identities.clone(),
        geoip: args.geoip.clone(),
        geo_writer,
        geo,
        watch: None,
        state_dir: args.state_dir.clone(),
        sessions_dirty: false,
        reloads_ok: 0,
        reloads_failed: 0,
        last_reload: None,
        uplinks: uplinks.clone(),
        identities_applied,
        geo_applied,
        allow_insecure_config: args.allow_insecure_config,
    };
    let report = agent
        .tables
        .apply(&agent.set, &agent.compiled)
        .context("writing the policy tables")?;
    if let Some(file) = file_sessions {
        let started = std::time::Instant::now();
        let upserts = file
            .sessions
            .into_iter()
            .map(|(id, spec)| (id, spec, Origin::File))
            .collect();
        let path = args
            .identities
            .as_deref()
            .unwrap_or(Path::new(""))
            .display();
        let change = agent
            .change_sessions(upserts, vec![], true)
            .map_err(|e| anyhow::anyhow!("identities file {path}: {}", field_message(&e)))?;
        info!(
            "identities file {path}: {} sessions, {} distinct identities, loaded in {:.0?} ({} expired entries skipped)",
            change.added,
            agent.registry.identity_count(),
            started.elapsed(),
            file.expired
        );
    }
    agent.restore_saved_sessions(now);
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel::<Command>(64);
    let api = api::serve(
        &args.api,
        control_tx.clone(),
        ApiLimits {
            max_body: args.api_max_body,
        },
    )
    .await
    .with_context(|| format!("starting the control API on {}", args.api.display()))?;
    info!("control API listening on {}", args.api.display());
    let metrics_server = metrics::start(args.metrics, control_tx).await?;
    for uplink in &uplinks {
        agent
            .dataplane
            .attach(uplink, args.attach)
            .with_context(|| format!("attaching to uplink {uplink}"))?;
    }
    let uplink = uplinks.join(", ");
    if let Err(err) = agent.dataplane.drop_stale_links() {
        warn!("removing the previous agent's attachments: {err}");
    }
    info!(
        "steering on {uplink}: {} policies ({} rules, {} classes), generation {} ({} map writes)",
        agent.set.policies.len(),
        report.rules,
        report.classes,
        report.generation,
        report.writes
    );

    let sweeper = tokio::spawn(sweep_forever(conntrack, timeouts));
    let mut health_every = tokio::time::interval(agent.set.health.interval);
    let mut expiry_every = tokio::time::interval(Duration::from_secs(1));
    // Files whose change on disk triggers a reload.
    agent.watch = (!args.no_watch).then(|| {
        let mut paths = vec![agent.config.clone()];
        paths.extend(agent.identities.clone());
        paths.extend(agent.geoip.iter().cloned());
        FileWatch::new(paths, Duration::from_millis(500))
    });
    let mut watch_every = tokio::time::interval(Duration::from_millis(500));
    loop {
        let interval = agent.set.health.interval;
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                let _ = agent.reload();
            }
            _ = watch_every.tick(), if agent.watch.is_some() => {
                if agent.watch.as_mut().is_some_and(|w| w.poll(std::time::Instant::now())) {
                    info!("a watched file changed on disk: reloading");
                    let _ = agent.reload();
                }
            }
            Some(command) = control_rx.recv() => agent.handle(command),
            Some(note) = agent.flow_log.next() => agent.flow_note(note),
            _ = health_every.tick() => agent.health_round().await,
            _ = expiry_every.tick() => {
                agent.expire_sessions();
                agent.save_sessions();
            }
        }
        if agent.set.health.interval != interval {
            health_every = tokio::time::interval(agent.set.health.interval);
        }
    }

    api.shutdown().await;
    if let Some(server) = metrics_server {
        server.shutdown().await;
    }
    agent.save_sessions();
    sweeper.abort();
    agent.flow_log_finish();
    agent.log_counters();
    if args.keep_dataplane {
        agent.dataplane.keep();
    } else {
        info!("stopping: detaching from {uplink}");
        agent.dataplane.detach();
    }
    Ok(())
}

/// An API error as one line: the field at fault, then why.
fn field_message(e: &ControlError) -> String {
    match &e.field {
        Some(field) => format!("{field}: {}", e.message),
        None => e.message.clone(),
    }
}

/// Expire idle flows, forever (a blocking walk of the tables, off the main task).
async fn sweep_forever(conntrack: Arc<Mutex<Conntrack>>, timeouts: Arc<Mutex<Timeouts>>) {
    loop {
        let every = crate::conntrack::sweep_interval(&timeouts.lock().expect("timeouts lock"));
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
    /// Reload the policy file and the identities file: both are read and
    /// checked before anything changes; a rejected reload keeps everything
    /// that is running.
    fn reload(&mut self) -> Result<ReloadView, ControlError> {
        // Whatever the outcome, the files as they are now have been seen.
        if let Some(w) = &mut self.watch {
            w.mark_applied();
        }
        let result = self.try_reload();
        match &result {
            Ok(_) => {
                self.reloads_ok += 1;
                self.last_reload = Some(std::time::SystemTime::now());
            }
            Err(err) => {
                self.reloads_failed += 1;
                error!("reload rejected, previous policies stay in force: {err}");
            }
        }
        result
    }

    fn try_reload(&mut self) -> Result<ReloadView, ControlError> {
        let config = self.config.display().to_string();
        if !self.allow_insecure_config {
            trust::check_config(&self.config, self.identities.as_deref(), &self.geoip)
                .map_err(|err| ControlError::unprocessable(None, err.to_string()))?;
        }
        let set = policy::load(&self.config)
            .map_err(|err| ControlError::unprocessable(None, format!("{config}: {err}")))?;
        uplinks::check(&set, &self.uplinks)
            .map_err(|err| ControlError::unprocessable(None, format!("{config}: {err}")))?;
        let file_sessions = self.prepare_identities_file()?;
        let geo_now = watch::fingerprint(&self.geoip);
        let geo = if self.geoip.is_empty() || geo_now == self.geo_applied {
            None
        } else {
            let (tables, stats) = geoip::load(&self.geoip).map_err(|err| {
                ControlError::unprocessable(Some("geoip".into()), err.to_string())
            })?;
            self.geo_writer.check(&tables).map_err(|err| {
                ControlError::unprocessable(Some("geoip".into()), err.to_string())
            })?;
            Some((tables, stats))
        };
        let compiled = policy::compile(&set, &self.registry.identities());
        let report = self
            .tables
            .apply(&set, &compiled)
            .map_err(|err| ControlError::unprocessable(None, err.to_string()))?;
        let previous = std::mem::replace(&mut self.set, set);
        if let Some((tables, stats)) = geo {
            match self.geo_writer.apply(&tables) {
                Ok(report) => {
                    info!("country databases reloaded: {report}");
                    self.geo_applied = geo_now;
                    self.geo = Some(Geo {
                        tables,
                        stats,
                        report,
                    });
                }
                // Checked to fit above: a failure here is the kernel's.
                Err(err) => error!("country databases not reloaded, the previous stay: {err}"),
            }
        }
        let geo = self.geo.as_ref().map(|g| &g.tables);
        let set = &self.set;
        // Established flows keep their translation, unless their egress
        // address is gone (or the operator asked for re-evaluation).
        let mut conntrack = self.conntrack.lock().expect("conntrack lock");
        let removed = conntrack.flush(&|addr| !is_egress(set, addr));
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
                    country: geo.map_or(0, |g| u16::from(g.lookup(flow.dst))),
                };
                let egress = compiled
                    .classify(&lookup)
                    .map_or(Egress::Default, |i| set.policies[i].action.egress);
                !leaves_as(set, egress, flow.nat_addr, flow.flags)
            })
        } else {
            0
        };
        drop(conntrack);
        *self.timeouts.lock().expect("timeouts lock") = set.timeouts;
        info!(
            "reloaded {config}: {} policies (was {}), generation {} ({} writes, {} deletes); ended {} flows whose egress address was removed{}",
            set.policies.len(),
            previous.policies.len(),
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
        let view = ReloadView {
            policies: set.policies.len(),
            generation: report.generation,
            writes: report.writes,
            deletes: report.deletes,
        };
        self.compiled = compiled;
        if let Some((pending, version)) = file_sessions {
            // Rows of new identities are computed under the new policies.
            let change = self.commit_sessions(pending).map_err(|err| {
                ControlError::unprocessable(
                    Some("identities".into()),
                    format!("policies reloaded, but the identities file was not applied: {err}"),
                )
            })?;
            self.identities_applied = Some(version);
            info!(
                "identities file: {} sessions added, {} replaced, {} removed",
                change.added, change.replaced, change.removed
            );
        }
        Ok(view)
    }

    /// Read the identities file (if any) and check it as one change that
    /// replaces every session the file gave before.
    /// `None` when there is none, or it is the version already in force.
    fn prepare_identities_file(&self) -> Result<Option<(Pending, Fingerprint)>, ControlError> {
        let Some(path) = &self.identities else {
            return Ok(None);
        };
        let version = watch::fingerprint(std::slice::from_ref(path));
        if self.identities_applied.as_ref() == Some(&version) {
            debug!("identities file {} unchanged", path.display());
            return Ok(None);
        }
        let now = jiff::Timestamp::now();
        let file =
            identity::file::load(path, now, identity::file::FILE_ID_PREFIX).map_err(|err| {
                ControlError::unprocessable(Some("identities".into()), err.to_string())
            })?;
        if file.expired > 0 {
            info!(
                "identities file {}: {} entries already expired, skipped",
                path.display(),
                file.expired
            );
        }
        let keep: std::collections::HashSet<&str> =
            file.sessions.iter().map(|(id, _)| id.as_str()).collect();
        let removals = self
            .registry
            .ids_of(Origin::File)
            .into_iter()
            .filter(|id| !keep.contains(id.as_str()))
            .collect();
        let upserts = file
            .sessions
            .into_iter()
            .map(|(id, spec)| (id, spec, Origin::File))
            .collect();
        self.registry
            .prepare(upserts, removals, now, true)
            .map(|pending| Some((pending, version)))
            .map_err(|err| {
                ControlError::unprocessable(
                    Some(format!(
                        "identities{}",
                        err.field.map(|f| format!(" {f}")).unwrap_or_default()
                    )),
                    format!("identities file {}: {}", path.display(), err.message),
                )
            })
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
        // Active flows per egress address (or IPv6 range): counted by the
        // counter slot each flow records, in one batched walk.
        let census = self.conntrack.lock().expect("conntrack lock").census();
        if let Err(err) = &census {
            warn!("counting active flows: {err}");
        }
        if let Ok(addrs) = self.tables.addr_stats() {
            for (addr, s) in addrs {
                let active = match (&census, self.tables.addr_slot_of(&addr)) {
                    (Ok(c), Some(slot)) => {
                        c.by_addr_slot.get(usize::from(slot)).copied().unwrap_or(0)
                    }
                    _ => 0,
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
