//! The Prometheus endpoint (`run --metrics ADDR`): `GET /metrics` over
//! HTTP on a TCP listener. Like a control API request, each scrape is a
//! [`Command`] answered by the agent's main task, which owns the maps.

use std::{io, net::SocketAddr, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{
    control::{Command, ControlError},
    server_task::ServerTask,
};

/// How long `shutdown` lets scrapes in flight finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the metrics endpoint to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("reading the address the metrics endpoint {addr} was bound to")]
    LocalAddr {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The running endpoint. [`MetricsServer::shutdown`] stops it; dropping it
/// stops it without waiting for scrapes in flight.
pub struct MetricsServer {
    addr: SocketAddr,
    server: ServerTask,
}

impl MetricsServer {
    /// The address it listens on (the actual port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and let scrapes in flight finish (briefly).
    pub async fn shutdown(mut self) {
        self.server.shutdown(SHUTDOWN_GRACE, "scrapes").await;
    }
}

/// Listen on `addr` and answer `GET /metrics` on the current tokio runtime,
/// asking the agent's main task through `tx`.
pub async fn serve(
    addr: SocketAddr,
    tx: mpsc::Sender<Command>,
) -> Result<MetricsServer, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::LocalAddr { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .with_state(tx);
    let server = ServerTask::spawn(format!("metrics endpoint {bound}"), |stopped| {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .into_future()
    });
    Ok(MetricsServer {
        addr: bound,
        server,
    })
}

async fn metrics(State(tx): State<mpsc::Sender<Command>>) -> Response {
    let (reply, answer) = oneshot::channel();
    let text = match tx.send(Command::Metrics { reply }).await {
        Ok(()) => answer.await.unwrap_or_else(|_| Err(gone())),
        Err(_) => Err(gone()),
    };
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, format!("{}\n", e.message)).into_response()
        }
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

async fn no_route() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "metrics are at /metrics\n")
}
