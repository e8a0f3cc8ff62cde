//! Answering the control API: session changes (checked whole, then written
//! to the identity maps), expiry, and the read-only views.

use std::collections::{BTreeSet, HashMap};

use egress_common::classify::ClassRow;

use egress_common::stats::Traffic;
use log::{info, warn};
use serde_json::json;

use super::Agent;
use crate::{
    control::{BatchReport, Command, ControlError, PolicyView, SessionEntry},
    counters,
    identity::{
        Origin, SessionSpec, file,
        registry::{Change, Pending},
        state,
    },
    policy::{
        compile::identity_rows,
        model::{Egress, Identity},
    },
};

fn traffic_json(t: &Traffic) -> serde_json::Value {
    json!({
        "packets_out": t.packets_out,
        "bytes_out": t.bytes_out,
        "packets_in": t.packets_in,
        "bytes_in": t.bytes_in,
    })
}

impl Agent {
    /// Answer one API request. Replies to a caller that went away are dropped.
    pub(super) fn handle(&mut self, command: Command) {
        match command {
            Command::PutSession { id, spec, reply } => {
                let result = self
                    .change_sessions(vec![(id.clone(), spec, Origin::Api)], vec![], false)
                    .and_then(|_| {
                        self.registry
                            .get(&id)
                            .ok_or_else(|| ControlError::internal("session vanished"))
                    });
                let _ = reply.send(result);
            }
            Command::PutSessions { sessions, reply } => {
                let started = std::time::Instant::now();
                let upserts = sessions
                    .into_iter()
                    .map(|SessionEntry { id, spec }| (id, spec, Origin::Api))
                    .collect();
                let result = self
                    .change_sessions(upserts, vec![], true)
                    .map(|c| BatchReport {
                        added: c.added,
                        replaced: c.replaced,
                        elapsed_ms: started.elapsed().as_millis() as u64,
                    });
                let _ = reply.send(result);
            }
            Command::DeleteSession { id, reply } => {
                let _ = reply.send(self.change_sessions(vec![], vec![id], false).map(|_| ()));
            }
            Command::GetSession { id, reply } => {
                let _ = reply.send(
                    self.registry
                        .get(&id)
                        .ok_or_else(|| ControlError::not_found(format!("no session {id:?}"))),
                );
            }
            Command::ListSessions { reply } => {
                let _ = reply.send(Ok(self.registry.list()));
            }
            Command::SetPosture { id, posture, reply } => {
                let _ = reply.send(self.set_posture(&id, posture));
            }
            Command::Policies { reply } => {
                let _ = reply.send(Ok(self.policies()));
            }
            Command::Reload { reply } => {
                let _ = reply.send(self.reload());
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Command::GeoStats { reply } => {
                let _ = reply.send(Ok(self.geo_stats()));
            }
            Command::KernelLog { enabled, reply } => {
                let _ = reply.send(self.set_kernel_log(enabled));
            }
            Command::Metrics { reply } => self.metrics(reply),
        }
    }

    /// Check a session change whole, then write it: nothing changes unless
    /// all of it fits.
    pub(super) fn change_sessions(
        &mut self,
        upserts: Vec<(String, SessionSpec, Origin)>,
        removals: Vec<String>,
        batch: bool,
    ) -> Result<Change, ControlError> {
        for (i, (id, _, origin)) in upserts.iter().enumerate() {
            if *origin == Origin::Api && id.starts_with(file::FILE_ID_PREFIX) {
                return Err(ControlError::unprocessable(
                    Some(if batch {
                        format!("[{i}].id")
                    } else {
                        "id".into()
                    }),
                    format!(
                        "{id:?}: ids starting with {:?} belong to the identities file",
                        file::FILE_ID_PREFIX
                    ),
                ));
            }
        }
        let pending = self
            .registry
            .prepare(upserts, removals, jiff::Timestamp::now(), batch)?;
        self.commit_sessions(pending)
    }

    /// Write a prepared change, after checking that the class rows of its
    /// new identities fit the running generation.
    pub(super) fn commit_sessions(&mut self, pending: Pending) -> Result<Change, ControlError> {
        let unknown = self.registry.unknown_identities(&pending);
        let rows = identity_rows(&self.set, &unknown);
        self.tables
            .check_identity_rows(&rows)
            .map_err(|e| ControlError::unprocessable(None, e.to_string()))?;
        let change = self.registry.commit(pending);
        let by_identity: HashMap<&Identity, &ClassRow> = unknown.iter().zip(&rows).collect();
        let classes: Vec<(u32, ClassRow)> = change
            .new_identities
            .iter()
            .map(|(id, identity)| match by_identity.get(identity) {
                Some(row) => (*id, **row),
                // Not foreseen by `unknown_identities`: computed now.
                None => (
                    *id,
                    identity_rows(&self.set, std::slice::from_ref(identity))[0],
                ),
            })
            .collect();
        self.sessions_dirty = true;
        self.tries
            .apply(&mut self.tables, &classes, &change)
            .map_err(|e| ControlError::internal(format!("writing the identity maps: {e}")))?;
        Ok(change)
    }

    fn set_posture(
        &mut self,
        id: &str,
        posture: BTreeSet<String>,
    ) -> Result<crate::identity::SessionView, ControlError> {
        let mut view = self
            .registry
            .get(id)
            .ok_or_else(|| ControlError::not_found(format!("no session {id:?}")))?;
        view.spec.posture = posture;
        // The session keeps where it came from.
        let pending = self.registry.prepare(
            vec![(id.to_string(), view.spec.clone(), view.origin)],
            vec![],
            jiff::Timestamp::now(),
            false,
        )?;
        self.commit_sessions(pending)?;
        info!(
            "session {id:?}: posture is now {:?}",
            view.spec.posture.iter().collect::<Vec<_>>()
        );
        Ok(view)
    }

    /// Write the API's sessions to the state directory if they changed.
    pub(super) fn save_sessions(&mut self) {
        if !self.sessions_dirty {
            return;
        }
        let api: Vec<_> = self
            .registry
            .list()
            .into_iter()
            .filter(|s| s.origin == Origin::Api)
            .collect();
        match state::save(&self.state_dir, &api) {
            Ok(()) => self.sessions_dirty = false,
            // Kept dirty: retried on the next tick.
            Err(e) => warn!("saving sessions: {e:#}"),
        }
    }

    /// Add the API sessions a previous run saved. Ones that no longer fit
    /// (an identities-file session now claims the address) are skipped
    /// with a warning; the agent starts either way.
    pub(super) fn restore_saved_sessions(&mut self, now: jiff::Timestamp) {
        let saved = match state::load(&self.state_dir, now) {
            Ok(Some(saved)) => saved,
            Ok(None) => return,
            Err(e) => {
                warn!("saved sessions not restored: {e:#}");
                return;
            }
        };
        let all: Vec<_> = saved
            .sessions
            .into_iter()
            .map(|(id, spec)| (id, spec, Origin::Api))
            .collect();
        let count = all.len();
        if self.change_sessions(all.clone(), vec![], true).is_err() {
            for (id, spec, origin) in all {
                if let Err(e) =
                    self.change_sessions(vec![(id.clone(), spec, origin)], vec![], false)
                {
                    warn!("saved session {id:?} not restored: {e}");
                }
            }
        }
        info!(
            "restored {} of {count} saved API sessions from {} ({} expired)",
            self.registry.ids_of(Origin::Api).len(),
            self.state_dir.display(),
            saved.expired
        );
    }

    /// Remove sessions whose time is up.
    pub(super) fn expire_sessions(&mut self) {
        let expired = self.registry.expired(jiff::Timestamp::now());
        if expired.is_empty() {
            return;
        }
        match self.change_sessions(vec![], expired.clone(), false) {
            Ok(c) => info!("{} sessions expired: {}", c.removed, expired.join(", ")),
            Err(e) => warn!("removing expired sessions {}: {e}", expired.join(", ")),
        }
    }

    fn policies(&self) -> Vec<PolicyView> {
        self.set
            .policies
            .iter()
            .zip(self.tables.active_policies())
            .enumerate()
            .map(|(index, (p, active))| {
                let stats = self
                    .tables
                    .policy_stats(active.stats_slot)
                    .unwrap_or_default();
                PolicyView {
                    index,
                    name: p.name.clone(),
                    enabled: p.enabled,
                    egress: match p.action.egress {
                        Egress::Default => "default".into(),
                        Egress::Bypass => "bypass".into(),
                        Egress::Pool(k) => self.set.pools[k].name.clone(),
                    },
                    flows: stats.flows,
                    packets: stats.traffic.packets_out + stats.traffic.packets_in,
                    bytes: stats.traffic.bytes_out + stats.traffic.bytes_in,
                }
            })
            .collect()
    }

    fn geo_stats(&self) -> serde_json::Value {
        match &self.geo {
            Some(geo) => json!({
                "loaded": true,
                "files": geo.stats.files,
                "unknown_codes": geo.stats.unknown_codes,
                "report": geo.report,
            }),
            None => json!({ "loaded": false }),
        }
    }

    fn stats(&mut self) -> Result<serde_json::Value, ControlError> {
        let counters = counters::read(self.dataplane.ebpf_mut())
            .map_err(|e| ControlError::internal(e.to_string()))?;
        let counters: serde_json::Map<String, serde_json::Value> = counters
            .into_iter()
            .map(|(_, name, v)| (name.to_string(), v.into()))
            .collect();
        let addresses: Vec<serde_json::Value> = self
            .tables
            .addr_stats()
            .map_err(|e| ControlError::internal(e.to_string()))?
            .into_iter()
            .map(|(addr, s)| {
                json!({
                    "address": addr,
                    "flows": s.flows,
                    "exhausted": s.exhausted,
                    "traffic": traffic_json(&s.traffic),
                })
            })
            .collect();
        let census = self
            .conntrack
            .lock()
            .expect("conntrack lock")
            .census()
            .map_err(|e| ControlError::internal(format!("counting active flows: {e}")))?;
        let active_flows = census.flows4 + census.flows6;
        Ok(json!({
            "counters": counters,
            "egress_addresses": addresses,
            "active_flows": active_flows,
            "sessions": self.registry.len(),
            "identities": self.registry.identity_count(),
            "policies": self.set.policies.len(),
            "flow_log": self.flow_log_view(),
        }))
    }
}
