//! The metrics endpoint on the host: `metrics::serve` on a loopback port,
//! a fake agent answering scrapes, and plain HTTP/1.0 requests.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use egress_agent::{
    control::{Command, ControlError},
    metrics::{self, MetricsError},
};
use tokio::sync::mpsc;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `GET path` over HTTP/1.0: the response head (lower case) and body.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    (head.to_lowercase(), body.to_owned())
}

/// A fake agent: every scrape gets `answer`.
fn fake_agent(
    mut rx: mpsc::Receiver<Command>,
    answer: Result<String, ControlError>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(command) = rx.recv().await {
            if let Command::Metrics { reply } = command {
                let _ = reply.send(answer.clone());
            }
        }
    })
}

#[test]
fn metrics_endpoint_serves_agent_text_as_prometheus_text() {
    runtime().block_on(async {
        let (tx, rx) = mpsc::channel(4);
        let server = metrics::serve("127.0.0.1:0".parse().unwrap(), tx)
            .await
            .unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0, "port 0 asks for any free port");
        let agent = fake_agent(rx, Ok("egress_sessions 2\n".into()));

        let (head, body) = tokio::task::spawn_blocking(move || get(addr, "/metrics"))
            .await
            .unwrap();
        assert!(head.starts_with("http/1.0 200"), "{head}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "Prometheus must be told the text format: {head}"
        );
        assert_eq!(body, "egress_sessions 2\n", "the agent's text, unchanged");

        let (head, body) = tokio::task::spawn_blocking(move || get(addr, "/v1/stats"))
            .await
            .unwrap();
        assert!(head.starts_with("http/1.0 404"), "{head}");
        assert!(
            body.contains("/metrics"),
            "the 404 says where to look: {body}"
        );

        server.shutdown().await;
        agent.abort();
    });
}

#[test]
fn metrics_endpoint_agent_error_keeps_its_status() {
    runtime().block_on(async {
        let (tx, rx) = mpsc::channel(4);
        let server = metrics::serve("127.0.0.1:0".parse().unwrap(), tx)
            .await
            .unwrap();
        let addr = server.local_addr();
        let agent = fake_agent(
            rx,
            Err(ControlError::internal("counting map entries: boom")),
        );
        let (head, body) = tokio::task::spawn_blocking(move || get(addr, "/metrics"))
            .await
            .unwrap();
        assert!(head.starts_with("http/1.0 500"), "{head}");
        assert_eq!(body, "counting map entries: boom\n");
        server.shutdown().await;
        agent.abort();
    });
}

#[test]
fn metrics_endpoint_agent_gone_answers_503() {
    runtime().block_on(async {
        let (tx, rx) = mpsc::channel(4);
        drop(rx);
        let server = metrics::serve("127.0.0.1:0".parse().unwrap(), tx)
            .await
            .unwrap();
        let addr = server.local_addr();
        let (head, _) = tokio::task::spawn_blocking(move || get(addr, "/metrics"))
            .await
            .unwrap();
        assert!(
            head.starts_with("http/1.0 503"),
            "a stopping agent is unavailable, not broken: {head}"
        );
        server.shutdown().await;
    });
}

#[test]
fn metrics_endpoint_address_in_use_names_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = runtime()
        .block_on(metrics::serve(addr, mpsc::channel(1).0))
        .err()
        .expect("a port in use cannot be bound");
    assert!(
        matches!(err, MetricsError::Bind { addr: a, .. } if a == addr),
        "{err:?}"
    );
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
