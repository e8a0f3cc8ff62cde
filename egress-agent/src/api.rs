//! The local control API: HTTP/JSON on a root-only Unix socket, each
//! request turned into a [`Command`] for the agent's main task and its
//! reply (or [`ControlError`]) into the response.

pub mod body;
mod socket;

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, Path as UrlPath, State,
        rejection::{BytesRejection, PathRejection},
    },
    http::{Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use log::debug;
use tokio::sync::{mpsc, oneshot};

use crate::{
    control::{BatchReport, Command, ControlError, LogView, PolicyView, ReloadView, Reply},
    identity::{SessionSpec, SessionView, model::validate_id},
    server_task::ServerTask,
};

/// Where `egress-agent run` listens and the CLI connects by default.
pub const DEFAULT_SOCKET: &str = "/run/egress-agent/api.sock";
/// Default request body limit: a batch of 100 000 sessions is about 15 MB.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024 * 1024;
/// How long `shutdown` lets requests in flight finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What one request may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiLimits {
    /// Largest request body, in bytes; larger ones get a 413.
    pub max_body: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("creating the control socket directory {dir} (mode 0700)")]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error(
        "an agent is already listening on {path}: stop it first, or give this one another --api path"
    )]
    InUse { path: PathBuf },
    #[error(
        "{path} exists and is not a socket; refusing to replace it (remove it or choose another --api path)"
    )]
    NotASocket { path: PathBuf },
    #[error("checking the existing control socket {path}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("removing the stale control socket {path}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("binding the control socket {path}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("setting mode 0600 on the control socket {path}")]
    SetMode { path: PathBuf, source: io::Error },
}

/// The running server. [`ApiServer::shutdown`] stops it and removes the
/// socket file; dropping it does the same without waiting for requests in
/// flight.
pub struct ApiServer {
    path: PathBuf,
    file: socket::FileId,
    server: ServerTask,
}

impl ApiServer {
    /// The socket the server listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting, let requests in flight finish (for a few seconds at
    /// most), and remove the socket file.
    pub async fn shutdown(mut self) {
        self.server.shutdown(SHUTDOWN_GRACE, "requests").await;
        socket::remove_if_ours(&self.path, self.file);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // After `shutdown` the task is gone and the socket already removed.
        if self.server.abort() {
            socket::remove_if_ours(&self.path, self.file);
        }
    }
}

/// Bind the control socket at `path` and serve it on the current tokio
/// runtime, sending each request to the agent's main task through `tx`.
///
/// The directory is created (0700) if missing; a socket file left by a
/// dead agent is replaced, a live agent's is not (`ApiError::InUse`).
pub async fn serve(
    path: &Path,
    tx: mpsc::Sender<Command>,
    limits: ApiLimits,
) -> Result<ApiServer, ApiError> {
    let (listener, file) = socket::bind(path).await?;
    let listener = socket::RootOnly::new(listener, path);
    let app = router(Shared {
        tx,
        max_body: limits.max_body,
    });
    let server = ServerTask::spawn(format!("control API {}", path.display()), |stopped| {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .into_future()
    });
    debug!("control API listening on {}", path.display());
    Ok(ApiServer {
        path: path.to_owned(),
        file,
        server,
    })
}

/// What every handler shares.
#[derive(Clone)]
struct Shared {
    tx: mpsc::Sender<Command>,
    max_body: usize,
}

impl Shared {
    /// Send a command to the agent and wait for its answer.
    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(command(reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// The body's bytes, or the refusal: 413 beyond the limit.
    fn bytes(&self, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ControlError> {
        body.map_err(|rejection| match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ControlError {
                status: StatusCode::PAYLOAD_TOO_LARGE.as_u16(),
                field: None,
                message: format!(
                    "the request body is larger than {} bytes, the agent's --api-max-body",
                    self.max_body
                ),
            },
            status => ControlError {
                status: status.as_u16(),
                field: None,
                message: rejection.body_text(),
            },
        })
    }
}

/// The agent's main task has stopped listening: it is shutting down.
fn gone() -> ControlError {
    ControlError {
        status: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
        field: None,
        message: "the agent is shutting down".to_owned(),
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self)).into_response()
    }
}

fn router(shared: Shared) -> Router {
    let max_body = shared.max_body;
    Router::new()
        .route("/v1/sessions", get(list_sessions).post(put_sessions))
        .route(
            "/v1/sessions/{id}",
            get(get_session).put(put_session).delete(delete_session),
        )
        .route("/v1/sessions/{id}/posture", put(set_posture))
        .route("/v1/policies", get(policies))
        .route("/v1/reload", post(reload))
        .route("/v1/log", post(set_log))
        .route("/v1/stats", get(stats))
        .route("/v1/stats/geo", get(geo_stats))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

/// The `{id}` of the URL, checked like any session id.
fn session_id(id: Result<UrlPath<String>, PathRejection>) -> Result<String, ControlError> {
    let UrlPath(id) =
        id.map_err(|e| ControlError::bad_request(Some("id".to_owned()), e.body_text()))?;
    validate_id(&id)?;
    Ok(id)
}

async fn list_sessions(State(s): State<Shared>) -> Result<Json<Vec<SessionView>>, ControlError> {
    s.ask(|reply| Command::ListSessions { reply })
        .await
        .map(Json)
}

async fn get_session(
    State(s): State<Shared>,
    id: Result<UrlPath<String>, PathRejection>,
) -> Result<Json<SessionView>, ControlError> {
    let id = session_id(id)?;
    s.ask(|reply| Command::GetSession { id, reply })
        .await
        .map(Json)
}

async fn put_session(
    State(s): State<Shared>,
    id: Result<UrlPath<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SessionView>, ControlError> {
    let id = session_id(id)?;
    let spec: SessionSpec = body::session(&s.bytes(body)?, jiff::Timestamp::now())?;
    s.ask(|reply| Command::PutSession { id, spec, reply })
        .await
        .map(Json)
}

async fn put_sessions(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BatchReport>, ControlError> {
    let sessions = body::sessions(&s.bytes(body)?, jiff::Timestamp::now())?;
    s.ask(|reply| Command::PutSessions { sessions, reply })
        .await
        .map(Json)
}

async fn delete_session(
    State(s): State<Shared>,
    id: Result<UrlPath<String>, PathRejection>,
) -> Result<StatusCode, ControlError> {
    let id = session_id(id)?;
    s.ask(|reply| Command::DeleteSession { id, reply }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_posture(
    State(s): State<Shared>,
    id: Result<UrlPath<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SessionView>, ControlError> {
    let id = session_id(id)?;
    let posture = body::posture(&s.bytes(body)?)?;
    s.ask(|reply| Command::SetPosture { id, posture, reply })
        .await
        .map(Json)
}

async fn policies(State(s): State<Shared>) -> Result<Json<Vec<PolicyView>>, ControlError> {
    s.ask(|reply| Command::Policies { reply }).await.map(Json)
}

async fn reload(State(s): State<Shared>) -> Result<Json<ReloadView>, ControlError> {
    s.ask(|reply| Command::Reload { reply }).await.map(Json)
}

async fn set_log(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LogView>, ControlError> {
    let kernel = body::log(&s.bytes(body)?)?;
    s.ask(|reply| Command::KernelLog {
        enabled: kernel,
        reply,
    })
    .await
    .map(Json)
}

async fn stats(State(s): State<Shared>) -> Result<Json<serde_json::Value>, ControlError> {
    s.ask(|reply| Command::Stats { reply }).await.map(Json)
}

async fn geo_stats(State(s): State<Shared>) -> Result<Json<serde_json::Value>, ControlError> {
    s.ask(|reply| Command::GeoStats { reply }).await.map(Json)
}

async fn no_route(method: Method, uri: Uri) -> ControlError {
    ControlError::not_found(format!("no route {method} {}", uri.path()))
}

async fn wrong_method(method: Method, uri: Uri) -> ControlError {
    ControlError {
        status: StatusCode::METHOD_NOT_ALLOWED.as_u16(),
        field: None,
        message: format!("{method} is not allowed on {}", uri.path()),
    }
}
