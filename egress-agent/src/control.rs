//! Requests the control API hands to the running agent, and their replies.
//!
//! The agent's state (maps, policies, sessions) is owned by its main task;
//! the API server sends it a [`Command`] and awaits the reply, so every
//! change is applied in one place, in order, whole or not at all.

use std::collections::BTreeSet;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::identity::{SessionSpec, SessionView, SpecError};

/// A failed request: an HTTP status, the field at fault (when one is),
/// and a message naming the value and why it was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    #[serde(skip)]
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(rename = "error")]
    pub message: String,
}

impl ControlError {
    pub fn bad_request(field: Option<String>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            field,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            field: None,
            message: message.into(),
        }
    }
    pub fn conflict(field: Option<String>, message: impl Into<String>) -> Self {
        Self {
            status: 409,
            field,
            message: message.into(),
        }
    }
    pub fn unprocessable(field: Option<String>, message: impl Into<String>) -> Self {
        Self {
            status: 422,
            field,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            field: None,
            message: message.into(),
        }
    }
}

impl From<SpecError> for ControlError {
    fn from(e: SpecError) -> Self {
        Self::unprocessable(Some(e.field), e.message)
    }
}

pub type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// One session of a batch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct SessionEntry {
    pub id: String,
    #[serde(flatten)]
    pub spec: SessionSpec,
}

/// What a batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BatchReport {
    pub added: usize,
    pub replaced: usize,
    /// Milliseconds from receiving the batch to the dataplane holding it.
    pub elapsed_ms: u64,
}

/// A policy of the running set, with its counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyView {
    pub index: usize,
    pub name: String,
    pub enabled: bool,
    /// `default`, `bypass`, or the pool's name.
    pub egress: String,
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// The dataplane's log switches (`POST /v1/log`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LogView {
    /// Kernel log records of rare events (drops of new flows, rewrite
    /// failures) are on.
    pub kernel: bool,
}

/// The result of a reload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReloadView {
    pub policies: usize,
    pub generation: u32,
    pub writes: usize,
    pub deletes: usize,
}

pub enum Command {
    /// Add or replace one session.
    PutSession {
        id: String,
        spec: SessionSpec,
        reply: Reply<SessionView>,
    },
    /// Add or replace many sessions, all or none.
    PutSessions {
        sessions: Vec<SessionEntry>,
        reply: Reply<BatchReport>,
    },
    DeleteSession {
        id: String,
        reply: Reply<()>,
    },
    GetSession {
        id: String,
        reply: Reply<SessionView>,
    },
    ListSessions {
        reply: Reply<Vec<SessionView>>,
    },
    /// Replace the posture tags of a session.
    SetPosture {
        id: String,
        posture: BTreeSet<String>,
        reply: Reply<SessionView>,
    },
    Policies {
        reply: Reply<Vec<PolicyView>>,
    },
    /// Reload the policy file (and the identities file and country
    /// databases), as SIGHUP does.
    Reload {
        reply: Reply<ReloadView>,
    },
    /// Global counters, per-address counters, sessions and table fill.
    Stats {
        reply: Reply<serde_json::Value>,
    },
    /// The loaded country databases: files, load time, ranges, memory.
    GeoStats {
        reply: Reply<serde_json::Value>,
    },
    /// The metrics in the Prometheus text format (`run --metrics`).
    Metrics {
        reply: Reply<String>,
    },
    /// Switch the dataplane's kernel log records on or off.
    KernelLog {
        enabled: bool,
        reply: Reply<LogView>,
    },
}
