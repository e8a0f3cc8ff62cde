//! The running agent's side of the flow log and of the dataplane's
//! switches: flow events (from the ring buffer) and the ends the table walks
//! decide (expiry, flushes) reach the main task as [`Note`]s, are named
//! there with the agent's policies and sessions, and written as JSON lines;
//! port use is counted from the sweeper's walk; kernel log records are
//! switched on and off.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context as _;
use aya::{Ebpf, maps::RingBuf};
use egress_common::{
    conntrack::{CT_F_LOCAL, CT_F_PASS},
    events::closed,
    maps,
};
use log::{info, warn};
use tokio::{sync::mpsc, task::JoinHandle};

use super::Agent;
use crate::{
    conntrack::{self, Conntrack, Flow, Observer, Walk},
    control::{ControlError, LogView},
    flowlog::{
        FlowRecord, Reason, ring,
        sink::{Destination, Sink},
        wall_time,
    },
    policy::model::PortRange,
    ports::{PortCounts, PortTracker, PortUsage},
    switches::Switches,
    tables::ActivePolicy,
};

/// Notes queued for the main task at most: about 8 MB. A flush that ends
/// more flows at once loses the excess lines (counted, and logged).
const QUEUE: usize = 65_536;
/// Notes handled in one go before the lines are flushed and the main task
/// attends to its other work.
const BATCH: usize = 1024;

/// What reaches the main task.
pub(super) enum Note {
    Flow(FlowRecord),
    /// Translated ports in use, from one sweep.
    Ports(PortCounts),
}

impl From<FlowRecord> for Note {
    fn from(record: FlowRecord) -> Self {
        Self::Flow(record)
    }
}

fn pack(range: PortRange) -> u32 {
    u32::from(range.first) << 16 | u32::from(range.last)
}

fn unpack(packed: u32) -> PortRange {
    PortRange {
        first: (packed >> 16) as u16,
        last: packed as u16,
    }
}

/// The connection tables' observer. It runs wherever the walks run (the
/// sweeper's blocking thread, the main task) with the tables locked, so it
/// never waits: a full queue costs the note.
struct TableWatch {
    tx: mpsc::Sender<Note>,
    /// Whether ends are written anywhere.
    log_ends: bool,
    /// The running policies' port range (set by the main task).
    range: Arc<AtomicU32>,
    counts: PortCounts,
    lost: Arc<AtomicU64>,
}

impl TableWatch {
    fn fresh_counts(&self) -> PortCounts {
        PortCounts::new(unpack(self.range.load(Ordering::Relaxed)))
    }
}

impl Observer for TableWatch {
    fn seen(&mut self, walk: Walk, flow: &Flow, removed: bool) {
        if !removed {
            if walk == Walk::Sweep {
                self.counts.add(flow);
            }
            return;
        }
        // Bypassed and the gateway's own flows are no translations; a TCP
        // flow that saw a FIN or RST had its end reported by the dataplane.
        if !self.log_ends || flow.flags & (CT_F_PASS | CT_F_LOCAL) != 0 || closed(flow.flags) {
            return;
        }
        let reason = match walk {
            Walk::Sweep => Reason::Expired,
            Walk::Flush => Reason::Flushed,
        };
        let note = Note::Flow(FlowRecord::ended(flow, reason, conntrack::now_ns()));
        if self.tx.try_send(note).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn done(&mut self, walk: Walk) {
        if walk == Walk::Sweep {
            let fresh = self.fresh_counts();
            let counts = std::mem::replace(&mut self.counts, fresh);
            // A lost figure is replaced by the next sweep's.
            let _ = self.tx.try_send(Note::Ports(counts));
        }
    }
}

/// The flow log (when `--flow-log` is given), the port-use figures and the
/// dataplane's switches.
pub(super) struct FlowLog {
    rx: mpsc::Receiver<Note>,
    sink: Option<Sink>,
    reader: Option<JoinHandle<()>>,
    switches: Switches,
    ports: PortTracker,
    range: Arc<AtomicU32>,
    /// Lines lost before reaching the main task (a full queue).
    queue_lost: Arc<AtomicU64>,
    queue_lost_seen: u64,
    /// Policy names by counter slot, kept across reloads: a slot is not
    /// reused while flows counted in it may still end.
    names: HashMap<u32, String>,
    /// The policy list `names` was last filled from (address and length:
    /// a reload replaces the list).
    names_from: (usize, usize),
}

impl FlowLog {
    /// Set up the switches and the table observer, and with `flow_log`
    /// (`-`: standard output) start reading the dataplane's flow events.
    pub(super) fn open(
        ebpf: &mut Ebpf,
        flow_log: Option<&Path>,
        conntrack: &mut Conntrack,
        range: PortRange,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let switches =
            Switches::new(ebpf, flow_log.is_some()).context("setting the dataplane's switches")?;
        let (sink, reader) = match flow_log {
            Some(path) => {
                let name = maps::EVENTS;
                let map = ebpf
                    .take_map(name)
                    .with_context(|| format!("map {name} is missing from the eBPF object"))?;
                let events = RingBuf::try_from(map).with_context(|| format!("map {name}"))?;
                let events_tx = tx.clone();
                let reader =
                    ring::spawn(events, events_tx).context("polling the flow-event ring buffer")?;
                let sink = Sink::new(Destination::parse(path));
                info!("flow log: writing to {}", sink.destination());
                (Some(sink), Some(reader))
            }
            None => (None, None),
        };
        let range = Arc::new(AtomicU32::new(pack(range)));
        let queue_lost = Arc::new(AtomicU64::new(0));
        let watch = TableWatch {
            tx,
            log_ends: sink.is_some(),
            range: Arc::clone(&range),
            counts: PortCounts::new(unpack(range.load(Ordering::Relaxed))),
            lost: Arc::clone(&queue_lost),
        };
        conntrack.observe(Box::new(watch));
        Ok(Self {
            rx,
            sink,
            reader,
            switches,
            ports: PortTracker::default(),
            range,
            queue_lost,
            queue_lost_seen: 0,
            names: HashMap::new(),
            names_from: (0, 0),
        })
    }

    /// The next note (never `None`: the connection tables keep a sender).
    pub(super) async fn next(&mut self) -> Option<Note> {
        self.rx.recv().await
    }

    fn policy_name(&mut self, active: &[ActivePolicy], slot: u32) -> Option<&str> {
        if slot == egress_common::stats::DEFAULT_STATS_SLOT {
            return None;
        }
        // Refilled when the list changed (a reload replaces it) or lacks
        // the slot; the running names win over remembered ones.
        let from = (active.as_ptr() as usize, active.len());
        if from != self.names_from || !self.names.contains_key(&slot) {
            self.names
                .extend(active.iter().map(|p| (p.stats_slot, p.name.clone())));
            self.names_from = from;
        }
        self.names.get(&slot).map(String::as_str)
    }
}

impl Drop for FlowLog {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

impl Agent {
    /// Handle a note and whatever else is queued (up to a batch), then
    /// push the lines out.
    pub(super) fn flow_note(&mut self, first: Note) {
        let started = Instant::now();
        let (now_mono, now) = (conntrack::now_ns(), jiff::Timestamp::now());
        let mut note = Some(first);
        let mut handled = 0;
        while let Some(current) = note.take() {
            match current {
                Note::Flow(record) => self.write_flow(&record, now_mono, now, started),
                Note::Ports(counts) => self.port_counts(&counts),
            }
            handled += 1;
            if handled < BATCH {
                note = self.flow_log.rx.try_recv().ok();
            }
        }
        let log = &mut self.flow_log;
        if let Some(sink) = &mut log.sink {
            sink.flush(started);
        }
        let lost = log.queue_lost.load(Ordering::Relaxed);
        if lost > log.queue_lost_seen {
            warn!(
                "flow log: {} flow ends were not logged, the queue to the writer was full ({lost} in all)",
                lost - log.queue_lost_seen
            );
            log.queue_lost_seen = lost;
        }
    }

    /// Write what is still queued: the agent is stopping.
    pub(super) fn flow_log_finish(&mut self) {
        while let Ok(note) = self.flow_log.rx.try_recv() {
            self.flow_note(note);
        }
    }

    fn write_flow(
        &mut self,
        record: &FlowRecord,
        now_mono: u64,
        now: jiff::Timestamp,
        at: Instant,
    ) {
        let log = &mut self.flow_log;
        if log.sink.is_none() {
            return;
        }
        let user = self.registry.user_of(record.identity);
        let policy = log.policy_name(self.tables.active_policies(), record.stats_slot);
        let line = record.render(wall_time(record.time_ns, now_mono, now), policy, user);
        if let Some(sink) = &mut log.sink {
            sink.write(&line, at);
        }
    }

    fn port_counts(&mut self, counts: &PortCounts) {
        let log = &mut self.flow_log;
        log.ports.update(counts);
        // The next sweep counts against the range in force now.
        log.range
            .store(pack(self.set.nat.port_range), Ordering::Relaxed);
    }

    /// Each egress address's busiest port space (ports of the range in use
    /// towards one destination), from the latest sweep, by address.
    pub fn port_usage(&self) -> Vec<PortUsage> {
        self.flow_log.ports.usage().to_vec()
    }

    /// Switch the dataplane's kernel log records on or off.
    pub(super) fn set_kernel_log(&mut self, enabled: bool) -> Result<LogView, ControlError> {
        let switches = &mut self.flow_log.switches;
        switches
            .set_kernel_log(enabled)
            .map_err(|e| ControlError::internal(e.to_string()))?;
        info!("kernel log records {}", if enabled { "on" } else { "off" });
        Ok(LogView {
            kernel: switches.kernel_log(),
        })
    }

    /// Flow-log lines lost so far: not written (the destination failed) or
    /// not queued (the queue was full). The dataplane's own losses are the
    /// `flow_log_lost` counter.
    pub fn flow_log_lost(&self) -> u64 {
        let log = &self.flow_log;
        log.sink.as_ref().map_or(0, Sink::lost) + log.queue_lost.load(Ordering::Relaxed)
    }

    /// The flow log and port use as `GET /v1/stats` shows them.
    pub(super) fn flow_log_view(&self) -> serde_json::Value {
        let log = &self.flow_log;
        serde_json::json!({
            "destination": log.sink.as_ref().map(|s| s.destination().to_string()),
            "written": log.sink.as_ref().map_or(0, Sink::written),
            "lost": self.flow_log_lost(),
            "kernel_log": log.switches.kernel_log(),
            "port_usage": self.port_usage(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flowlog_port_range_packs_round_trip() {
        let range = PortRange {
            first: 1024,
            last: 65535,
        };
        assert_eq!(unpack(pack(range)), range);
    }
}
