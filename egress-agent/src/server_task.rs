//! A spawned HTTP server that stops gracefully: what the control API and
//! the metrics endpoint share.

use std::{future::Future, time::Duration};

use log::{error, warn};
use tokio::{sync::oneshot, task::JoinHandle};

/// The task serving one listener. Dropping it aborts the task at once.
pub struct ServerTask {
    /// Names the server in log lines (`control API /run/egress-agent.sock`).
    label: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ServerTask {
    /// Spawn `serve` on the current runtime. It is handed the receiver
    /// that fires on [`ServerTask::shutdown`] and must stop accepting then.
    pub fn spawn<Fut>(label: String, serve: impl FnOnce(oneshot::Receiver<()>) -> Fut) -> Self
    where
        Fut: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        let served = serve(stopped);
        let shown = label.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = served.await {
                error!("{shown}: {e}");
            }
        });
        Self {
            label,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stop accepting and let `in_flight` (what the server handles, for
    /// the log line) finish for at most `grace`, then close them.
    pub async fn shutdown(&mut self, grace: Duration, in_flight: &str) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(grace, &mut task).await.is_err()
        {
            warn!(
                "{}: {in_flight} still running after {grace:?}; closing them",
                self.label
            );
            task.abort();
        }
    }

    /// Abort the task at once; whether it was still running.
    pub fn abort(&mut self) -> bool {
        self.task.take().map(|task| task.abort()).is_some()
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.abort();
    }
}
