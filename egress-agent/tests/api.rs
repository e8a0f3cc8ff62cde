//! The control API on the host: `api::serve` on a socket in a temp dir, a
//! fake agent answering its commands from a map, and the client and the
//! CLI talking to it.

use std::{
    collections::BTreeMap,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use egress_agent::{
    api::{self, ApiError, ApiLimits},
    client::{Client, ClientError},
    control::{BatchReport, Command, ControlError, LogView, PolicyView, ReloadView},
    identity::{Origin, SessionView},
};
use hyper::{Method, body::Bytes};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

mod common;

use common::{TempDir, agent};

/// Names of the commands the fake agent received, in order.
type Seen = Arc<Mutex<Vec<&'static str>>>;

/// The fake agent: sessions in a map, fixed policies and counters. It
/// checks what only the agent can (addresses claimed by another session,
/// unknown ids) so the status mapping is exercised end to end.
fn answer(sessions: &mut BTreeMap<String, SessionView>, seen: &Seen, command: Command) {
    let name = match &command {
        Command::PutSession { .. } => "PutSession",
        Command::PutSessions { .. } => "PutSessions",
        Command::DeleteSession { .. } => "DeleteSession",
        Command::GetSession { .. } => "GetSession",
        Command::ListSessions { .. } => "ListSessions",
        Command::SetPosture { .. } => "SetPosture",
        Command::Policies { .. } => "Policies",
        Command::Reload { .. } => "Reload",
        Command::Stats { .. } => "Stats",
        Command::GeoStats { .. } => "GeoStats",
        Command::KernelLog { .. } => "KernelLog",
        Command::Metrics { .. } => "Metrics",
    };
    seen.lock().unwrap().push(name);
    let unknown = |id: &str| ControlError::not_found(format!("no session {id:?}"));
    match command {
        Command::PutSession { id, spec, reply } => {
            let clash = sessions.values().filter(|s| s.id != id).find_map(|other| {
                spec.addresses.iter().enumerate().find_map(|(i, a)| {
                    other
                        .spec
                        .addresses
                        .iter()
                        .any(|b| a.0.contains(&b.0) || b.0.contains(&a.0))
                        .then(|| (i, other.id.clone()))
                })
            });
            let _ = reply.send(match clash {
                Some((i, other)) => Err(ControlError::conflict(
                    Some(format!("addresses[{i}]")),
                    format!("claimed by session {other:?}"),
                )),
                None => {
                    let view = SessionView {
                        id: id.clone(),
                        spec,
                        origin: Origin::Api,
                    };
                    sessions.insert(id, view.clone());
                    Ok(view)
                }
            });
        }
        Command::PutSessions {
            sessions: batch,
            reply,
        } => {
            let mut report = BatchReport::default();
            for entry in batch {
                let view = SessionView {
                    id: entry.id.clone(),
                    spec: entry.spec,
                    origin: Origin::Api,
                };
                match sessions.insert(entry.id, view) {
                    Some(_) => report.replaced += 1,
                    None => report.added += 1,
                }
            }
            let _ = reply.send(Ok(report));
        }
        Command::DeleteSession { id, reply } => {
            let _ = reply.send(sessions.remove(&id).map(|_| ()).ok_or_else(|| unknown(&id)));
        }
        Command::GetSession { id, reply } => {
            let _ = reply.send(sessions.get(&id).cloned().ok_or_else(|| unknown(&id)));
        }
        Command::ListSessions { reply } => {
            let _ = reply.send(Ok(sessions.values().cloned().collect()));
        }
        Command::SetPosture { id, posture, reply } => {
            let _ = reply.send(match sessions.get_mut(&id) {
                Some(view) => {
                    view.spec.posture = posture;
                    Ok(view.clone())
                }
                None => Err(unknown(&id)),
            });
        }
        Command::Policies { reply } => {
            let _ = reply.send(Ok(vec![PolicyView {
                index: 0,
                name: "catch-all".into(),
                enabled: true,
                egress: "default".into(),
                flows: 7,
                packets: 70,
                bytes: 7000,
            }]));
        }
        Command::Reload { reply } => {
            let _ = reply.send(Ok(ReloadView {
                policies: 1,
                generation: 2,
                writes: 3,
                deletes: 0,
            }));
        }
        Command::Stats { reply } => {
            let _ = reply.send(Ok(json!({"flows": 3, "sessions": sessions.len()})));
        }
        Command::GeoStats { reply } => {
            let _ = reply.send(Ok(json!({"files": ["lab.csv"], "prefixes": {"ipv4": 12}})));
        }
        Command::KernelLog { enabled, reply } => {
            let _ = reply.send(Ok(LogView { kernel: enabled }));
        }
        Command::Metrics { reply } => {
            let _ = reply.send(Ok(format!("egress_sessions {}\n", sessions.len())));
        }
    }
}

/// How the fake agent behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Answers,
    /// Drops its command receiver at once, as an agent shutting down.
    Gone,
}

/// A served socket and the fake agent behind it, on a thread (and
/// runtime) of their own so that tests may block, e.g. running the CLI.
struct Fixture {
    dir: TempDir,
    socket: PathBuf,
    seen: Seen,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fixture {
    fn start(test: &str) -> Self {
        Self::start_with(test, ApiLimits::default(), Backend::Answers)
    }

    fn start_with(test: &str, limits: ApiLimits, backend: Backend) -> Self {
        let dir = TempDir::new(test);
        // A directory serve must create (mode 0700).
        let socket = dir.join("run/api.sock");
        Self::start_at(dir, socket, limits, backend)
    }

    fn start_at(dir: TempDir, socket: PathBuf, limits: ApiLimits, backend: Backend) -> Self {
        let seen = Seen::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = {
            let socket = socket.clone();
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                runtime().block_on(async move {
                    let (tx, mut rx) = mpsc::channel(16);
                    let server = match api::serve(&socket, tx, limits).await {
                        Ok(server) => server,
                        Err(e) => {
                            ready_tx.send(Err(e.to_string())).unwrap();
                            return;
                        }
                    };
                    if backend == Backend::Gone {
                        rx.close();
                    }
                    ready_tx.send(Ok(())).unwrap();
                    let mut sessions = BTreeMap::new();
                    let mut stopped = stopped;
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            Some(command) = rx.recv() => answer(&mut sessions, &seen, command),
                        }
                    }
                    server.shutdown().await;
                });
            })
        };
        ready_rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("serving {}: {e}", socket.display()));
        Self {
            dir,
            socket,
            seen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn request(&self, method: Method, uri: &str, body: Option<Value>) -> (u16, Value) {
        runtime()
            .block_on(Client::new(&self.socket).request(method.clone(), uri, body))
            .unwrap_or_else(|e| panic!("{method} {uri}: {e}"))
    }

    fn request_raw(&self, method: Method, uri: &str, body: &[u8]) -> (u16, Value) {
        let body = Some(Bytes::copy_from_slice(body));
        runtime()
            .block_on(Client::new(&self.socket).request_raw(method.clone(), uri, body))
            .unwrap_or_else(|e| panic!("{method} {uri}: {e}"))
    }

    fn seen(&self) -> Vec<&'static str> {
        self.seen.lock().unwrap().clone()
    }

    /// Stop the server and the fake agent, and wait for them.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ana() -> Value {
    json!({
        "user": "ana@example.com",
        "groups": ["finance"],
        "addresses": ["10.10.0.2", "2001:db8:10::2"],
    })
}

#[test]
fn api_session_put_get_list_delete_round_trip() {
    let fx = Fixture::start("round-trip");
    let (status, view) = fx.request(Method::PUT, "/v1/sessions/ana-laptop", Some(ana()));
    assert_eq!(status, 200, "a valid session is accepted: {view}");
    assert_eq!(view["id"], "ana-laptop");
    assert_eq!(view["origin"], "api");
    assert_eq!(view["addresses"], json!(["10.10.0.2", "2001:db8:10::2"]));

    let (status, got) = fx.request(Method::GET, "/v1/sessions/ana-laptop", None);
    assert_eq!((status, &got), (200, &view), "GET answers what PUT stored");
    let (status, list) = fx.request(Method::GET, "/v1/sessions", None);
    assert_eq!(
        (status, list),
        (200, json!([view])),
        "the list holds the one session"
    );

    let (status, body) = fx.request(Method::DELETE, "/v1/sessions/ana-laptop", None);
    assert_eq!(
        (status, body),
        (204, Value::Null),
        "DELETE answers 204 without a body"
    );
    let (status, body) = fx.request(Method::GET, "/v1/sessions/ana-laptop", None);
    assert_eq!(status, 404, "a removed session is unknown: {body}");
    assert_eq!(body["error"], "no session \"ana-laptop\"");
    let (status, _) = fx.request(Method::DELETE, "/v1/sessions/ana-laptop", None);
    assert_eq!(status, 404, "removing an unknown session is a 404");
}

#[test]
fn api_posture_set_replaces_and_clears_tags() {
    let fx = Fixture::start("posture");
    fx.request(Method::PUT, "/v1/sessions/ana-laptop", Some(ana()));
    let (status, view) = fx.request(
        Method::PUT,
        "/v1/sessions/ana-laptop/posture",
        Some(json!({"posture": ["disk-encrypted", "compliant"]})),
    );
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["posture"], json!(["compliant", "disk-encrypted"]));
    let (status, view) = fx.request(
        Method::PUT,
        "/v1/sessions/ana-laptop/posture",
        Some(json!({"posture": []})),
    );
    assert_eq!(
        (status, &view["posture"]),
        (200, &json!([])),
        "no tags clears"
    );
    let (status, body) = fx.request(
        Method::PUT,
        "/v1/sessions/bo-laptop/posture",
        Some(json!({"posture": []})),
    );
    assert_eq!(status, 404, "posture of an unknown session: {body}");
    let (status, body) = fx.request(
        Method::PUT,
        "/v1/sessions/ana-laptop/posture",
        Some(json!({"tags": []})),
    );
    assert_eq!((status, &body["field"]), (400, &json!("tags")), "{body}");
}

#[test]
fn api_bad_bodies_400_name_the_field_and_never_reach_the_agent() {
    let fx = Fixture::start("bad-bodies");
    let cases: [(&[u8], Option<&str>); 5] = [
        (
            br#"{"user":"ana@example.com","addresses":["ten"]}"#,
            Some("addresses[0]"),
        ),
        (
            br#"{"user":"ana@example.com","addresses":["10.0.0.2"],"group":["x"]}"#,
            Some("group"),
        ),
        (
            br#"{"user":"ana@example.com","groups":"finance","addresses":[]}"#,
            Some("groups"),
        ),
        (br#"{"user":"ana@example.com"}"#, Some("addresses")),
        (br#"{"user": "ana@example.com", "#, None),
    ];
    for (body, field) in cases {
        let text = String::from_utf8_lossy(body);
        let (status, reply) = fx.request_raw(Method::PUT, "/v1/sessions/ana-laptop", body);
        assert_eq!(status, 400, "{text} is a bad request: {reply}");
        assert_eq!(
            reply["field"].as_str(),
            field,
            "field named for {text}: {reply}"
        );
        assert!(reply["error"].is_string(), "a message for {text}: {reply}");
    }
    assert!(
        fx.seen().is_empty(),
        "nothing reached the agent: {:?}",
        fx.seen()
    );
}

#[test]
fn api_invalid_sessions_422_name_the_field() {
    let fx = Fixture::start("invalid");
    let (status, reply) = fx.request(
        Method::PUT,
        "/v1/sessions/ana-laptop",
        Some(json!({"user": "ana@example.com", "addresses": ["10.0.0.0/24", "10.0.0.7"]})),
    );
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["field"], "addresses[1]", "{reply}");
    let (status, reply) = fx.request(Method::PUT, "/v1/sessions/ana!laptop", Some(ana()));
    assert_eq!((status, &reply["field"]), (422, &json!("id")), "{reply}");
    let (status, reply) = fx.request(Method::GET, "/v1/sessions/a%2Fb", None);
    assert_eq!((status, &reply["field"]), (422, &json!("id")), "{reply}");
    assert!(
        fx.seen().is_empty(),
        "nothing reached the agent: {:?}",
        fx.seen()
    );
}

#[test]
fn api_conflict_from_the_agent_maps_to_409() {
    let fx = Fixture::start("conflict");
    fx.request(Method::PUT, "/v1/sessions/ana-laptop", Some(ana()));
    let (status, reply) = fx.request(
        Method::PUT,
        "/v1/sessions/bo-laptop",
        Some(json!({"user": "bo@example.com", "addresses": ["10.10.0.0/24"]})),
    );
    assert_eq!(status, 409, "{reply}");
    assert_eq!(
        reply,
        json!({"error": "claimed by session \"ana-laptop\"", "field": "addresses[0]"})
    );
}

#[test]
fn api_oversize_body_413_json() {
    let fx = Fixture::start_with("oversize", ApiLimits { max_body: 1024 }, Backend::Answers);
    let big = json!({
        "user": "ana@example.com",
        "groups": (0..100).map(|i| format!("group-{i}")).collect::<Vec<_>>(),
        "addresses": ["10.0.0.2"],
    });
    let (status, reply) = fx.request(Method::PUT, "/v1/sessions/ana-laptop", Some(big));
    assert_eq!(status, 413, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("1024 bytes"),
        "the message names the limit: {reply}"
    );
    let (status, _) = fx.request(Method::PUT, "/v1/sessions/ana-laptop", Some(ana()));
    assert_eq!(status, 200, "a body under the limit passes");
}

#[test]
fn api_unknown_route_404_and_wrong_method_405_json() {
    let fx = Fixture::start("routes");
    let (status, reply) = fx.request(Method::GET, "/v1/nowhere", None);
    assert_eq!(status, 404, "{reply}");
    assert_eq!(reply["error"], "no route GET /v1/nowhere");
    let (status, reply) = fx.request(Method::DELETE, "/v1/policies", None);
    assert_eq!(status, 405, "{reply}");
    assert_eq!(reply["error"], "DELETE is not allowed on /v1/policies");
}

#[test]
fn api_batch_is_all_or_nothing() {
    let fx = Fixture::start("batch");
    let entry =
        |id: &str, addr: &str| json!({"id": id, "user": "u@example.com", "addresses": [addr]});
    let (status, report) = fx.request(
        Method::POST,
        "/v1/sessions",
        Some(json!([entry("a", "10.0.0.1"), entry("b", "10.0.0.2")])),
    );
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (report["added"].as_u64(), report["replaced"].as_u64()),
        (Some(2), Some(0))
    );

    let cases = [
        (
            json!([entry("c", "10.0.0.3"), entry("d", "ten")]),
            400,
            "[1].addresses[0]",
        ),
        (
            json!([entry("c", "10.0.0.3"), entry("c", "10.0.0.4")]),
            422,
            "[1].id",
        ),
        (
            json!([entry("c", "10.0.0.3"), {"user": "u", "addresses": []}]),
            400,
            "[1].id",
        ),
        (json!([entry("c d", "10.0.0.3")]), 422, "[0].id"),
        (
            json!([
                entry("c", "10.0.0.0/8"),
                json!({"id": "d", "user": " ", "addresses": ["10.0.0.4"]})
            ]),
            422,
            "[1].user",
        ),
        (json!({"id": "c"}), 400, ""),
    ];
    for (batch, want_status, want_field) in cases {
        let (status, reply) = fx.request(Method::POST, "/v1/sessions", Some(batch.clone()));
        assert_eq!(status, want_status, "{batch}: {reply}");
        assert_eq!(
            reply["field"].as_str().unwrap_or(""),
            want_field,
            "{batch}: {reply}"
        );
    }
    let (_, list) = fx.request(Method::GET, "/v1/sessions", None);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"], "refused batches changed nothing");
}

#[test]
fn api_policies_reload_stats_pass_the_agent_answer_through() {
    let fx = Fixture::start("passthrough");
    let (status, policies) = fx.request(Method::GET, "/v1/policies", None);
    assert_eq!((status, &policies[0]["name"]), (200, &json!("catch-all")));
    let (status, reload) = fx.request(Method::POST, "/v1/reload", None);
    assert_eq!((status, &reload["generation"]), (200, &json!(2)));
    let (status, stats) = fx.request(Method::GET, "/v1/stats", None);
    assert_eq!((status, stats), (200, json!({"flows": 3, "sessions": 0})));
    let (status, geo) = fx.request(Method::GET, "/v1/stats/geo", None);
    assert_eq!((status, &geo["files"]), (200, &json!(["lab.csv"])));
    assert_eq!(fx.seen(), ["Policies", "Reload", "Stats", "GeoStats"]);
}

#[test]
fn api_log_kernel_switch_reaches_the_agent_bad_body_400() {
    let fx = Fixture::start("log");
    let (status, reply) = fx.request(Method::POST, "/v1/log", Some(json!({"kernel": true})));
    assert_eq!((status, reply), (200, json!({"kernel": true})));
    let (status, reply) = fx.request(Method::POST, "/v1/log", Some(json!({"kernel": "yes"})));
    assert_eq!(status, 400, "a non-boolean switch is refused: {reply}");
    assert_eq!(reply["field"], "kernel", "{reply}");
    let (status, reply) = fx.request(Method::POST, "/v1/log", Some(json!({"flows": true})));
    assert_eq!(status, 400, "an unknown switch is refused: {reply}");
    assert_eq!(
        fx.seen(),
        ["KernelLog"],
        "only the valid request reached the agent"
    );
    let (ok, stdout, stderr) = cli(&fx, &["log", "kernel", "off"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "kernel log records: off\n");
}

#[test]
fn api_agent_gone_503() {
    let fx = Fixture::start_with("gone", ApiLimits::default(), Backend::Gone);
    let (status, reply) = fx.request(Method::GET, "/v1/sessions", None);
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply["error"], "the agent is shutting down");
}

#[test]
fn api_socket_mode_0600_in_new_dir_0700_removed_on_shutdown() {
    let mut fx = Fixture::start("modes");
    let socket = std::fs::metadata(&fx.socket).unwrap();
    assert_eq!(socket.mode() & 0o777, 0o600, "the socket is owner-only");
    let dir = std::fs::metadata(fx.socket.parent().unwrap()).unwrap();
    assert_eq!(
        dir.mode() & 0o777,
        0o700,
        "a directory serve creates is owner-only"
    );
    fx.stop();
    assert!(!fx.socket.exists(), "shutdown removes the socket file");
}

fn serve_error(socket: &Path) -> ApiError {
    runtime().block_on(async {
        let (tx, _rx) = mpsc::channel(1);
        match api::serve(socket, tx, ApiLimits::default()).await {
            Ok(_) => panic!("serving {} must fail", socket.display()),
            Err(e) => e,
        }
    })
}

#[test]
fn api_live_socket_refused_stale_socket_replaced() {
    let fx = Fixture::start("in-use");
    let err = serve_error(&fx.socket);
    assert!(matches!(err, ApiError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("already listening"), "{err}");
    assert_eq!(
        fx.request(Method::GET, "/v1/sessions", None).0,
        200,
        "the first agent keeps serving"
    );

    let dir = TempDir::new("stale");
    let stale = dir.join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists(), "a dead listener leaves its socket file");
    let fx = Fixture::start_at(dir, stale, ApiLimits::default(), Backend::Answers);
    assert_eq!(
        fx.request(Method::GET, "/v1/sessions", None).0,
        200,
        "the stale file was replaced"
    );

    let not_socket = fx.dir.write("plain", "data");
    let err = serve_error(&not_socket);
    assert!(matches!(err, ApiError::NotASocket { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(&not_socket).unwrap(),
        "data",
        "a plain file is left alone"
    );
}

#[test]
fn api_client_names_the_socket_when_no_agent_listens() {
    let dir = TempDir::new("no-agent");
    let socket = dir.join("api.sock");
    let err = runtime()
        .block_on(Client::new(&socket).request(Method::GET, "/v1/sessions", None))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot connect to the agent at {} (is `egress-agent run` running?)",
            socket.display()
        )),
        "{text}"
    );
}

/// Set by `api_peer_cred_other_uid_gets_no_reply` for the child it runs.
const CHILD_SOCKET: &str = "EGRESS_API_TEST_CHILD_SOCKET";

/// Not a test of its own: the body of the child process of
/// `api_peer_cred_other_uid_gets_no_reply` (same binary, another uid).
#[test]
fn api_peer_cred_child_requests_when_asked() {
    let Some(socket) = std::env::var_os(CHILD_SOCKET) else {
        return;
    };
    let outcome =
        runtime().block_on(Client::new(socket).request(Method::GET, "/v1/sessions", None));
    match outcome {
        Ok((status, _)) => println!("PEER-CHILD: reply {status}"),
        Err(e @ ClientError::Connect { .. }) => println!("PEER-CHILD: cannot connect ({e})"),
        Err(e) => println!("PEER-CHILD: no reply ({:#})", anyhow::Error::from(e)),
    }
}

#[test]
fn api_peer_cred_other_uid_gets_no_reply() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "skipping api_peer_cred_other_uid_gets_no_reply: connecting as another uid needs root"
        );
        return;
    }
    // The socket sits in an existing world-traversable directory and is
    // opened to all, so only the peer-credential check stands in the way.
    let dir = TempDir::new("peer-cred");
    std::fs::set_permissions(dir.join(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("api.sock");
    let fx = Fixture::start_at(dir, socket.clone(), ApiLimits::default(), Backend::Answers);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "api_peer_cred_child_requests_when_asked",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_SOCKET, &socket)
        .uid(65534)
        .gid(65534)
        .output();
    let out = match child {
        Ok(out) => out,
        Err(e) => {
            eprintln!(
                "skipping api_peer_cred_other_uid_gets_no_reply: cannot run the test binary as uid 65534: {e}"
            );
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The harness prints the test's name on the same line.
    let Some(line) = stdout
        .lines()
        .find_map(|l| l.find("PEER-CHILD: ").map(|at| &l[at..]))
    else {
        eprintln!(
            "skipping api_peer_cred_other_uid_gets_no_reply: the child did not run ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    };
    assert!(
        line.starts_with("PEER-CHILD: no reply"),
        "uid 65534 must get no HTTP reply: {line}"
    );
    assert!(
        fx.seen().is_empty(),
        "nothing reached the agent: {:?}",
        fx.seen()
    );
    assert_eq!(
        fx.request(Method::GET, "/v1/sessions", None).0,
        200,
        "root is still served"
    );
}

/// Run the CLI against `fx`; answers (success, stdout, stderr).
fn cli(fx: &Fixture, args: &[&str]) -> (bool, String, String) {
    let out = agent()
        .args(args)
        .arg("--api")
        .arg(&fx.socket)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_session_add_ls_rm_round_trip() {
    let fx = Fixture::start("cli-session");
    let (ok, out, err) = cli(
        &fx,
        &[
            "session",
            "add",
            "ana-laptop",
            "--user",
            "ana@example.com",
            "--group",
            "finance",
            "--posture",
            "compliant",
            "--address",
            "10.10.0.2,2001:db8:10::2",
            "--ttl",
            "8h",
        ],
    );
    assert!(ok, "session add succeeds: {err}");
    assert!(out.starts_with("session ana-laptop set\n"), "{out}");

    let (ok, out, err) = cli(&fx, &["session", "ls"]);
    assert!(ok, "session ls succeeds: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one session: {out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID",
            "USER",
            "GROUPS",
            "POSTURE",
            "ADDRESSES",
            "EXPIRES",
            "ORIGIN"
        ]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row[..5],
        [
            "ana-laptop",
            "ana@example.com",
            "finance",
            "compliant",
            "10.10.0.2,2001:db8:10::2"
        ]
    );
    assert_eq!(row[6], "api");
    let expires: jiff::Timestamp = row[5].parse().unwrap();
    let in_8h = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(8);
    assert!(
        (in_8h - expires).abs() < jiff::SignedDuration::from_mins(1),
        "--ttl 8h expires in 8 hours: {expires}"
    );

    let (ok, out, _) = cli(&fx, &["session", "ls", "--json"]);
    assert!(ok);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json[0]["posture"], json!(["compliant"]));

    let (ok, out, err) = cli(&fx, &["posture", "set", "ana-laptop"]);
    assert!(ok, "posture set succeeds: {err}");
    assert_eq!(out, "session ana-laptop: posture cleared\n");

    let (ok, out, err) = cli(&fx, &["session", "rm", "ana-laptop"]);
    assert!(ok, "session rm succeeds: {err}");
    assert_eq!(out, "session ana-laptop removed\n");
    let (ok, out, _) = cli(&fx, &["session", "ls"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "only the header is left: {out}");
}

#[test]
fn cli_session_errors_print_field_and_fail() {
    let fx = Fixture::start("cli-errors");
    let (ok, _, err) = cli(
        &fx,
        &[
            "session",
            "add",
            "ana-laptop",
            "--user",
            "ana@example.com",
            "--address",
            "10.0.0.0/24",
            "--address",
            "10.0.0.7",
        ],
    );
    assert!(!ok, "overlapping addresses are refused");
    assert!(
        err.starts_with("error: addresses[1]: 10.0.0.7 overlaps addresses[0]"),
        "{err}"
    );

    let (ok, _, err) = cli(&fx, &["session", "rm", "nobody"]);
    assert!(!ok, "removing an unknown session fails");
    assert_eq!(err, "error: no session \"nobody\"\n");

    let (ok, _, err) = cli(&fx, &["session", "rm", "a/b"]);
    assert!(!ok, "an id with a slash is refused before sending");
    assert!(err.starts_with("error: id: "), "{err}");

    let out = agent()
        .args(["session", "ls", "--api"])
        .arg(fx.dir.join("nothing.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is `egress-agent run` running?"), "{err}");
}

#[test]
fn cli_session_load_policies_reload_stats() {
    let fx = Fixture::start("cli-load");
    let file = fx.dir.write(
        "sessions.json",
        r#"{"sessions": [
            {"id": "a", "user": "a@example.com", "addresses": ["10.0.0.1"]},
            {"id": "b", "user": "b@example.com", "addresses": ["10.0.0.2"], "posture": ["compliant"]},
            {"id": "old", "user": "c@example.com", "addresses": ["10.0.0.3"], "expires_at": "2001-01-01T00:00:00Z"}
        ]}"#,
    );
    let (ok, out, err) = cli(&fx, &["session", "load", file.to_str().unwrap()]);
    assert!(ok, "session load succeeds: {err}");
    assert!(
        out.contains("2 sessions loaded (2 added, 0 replaced)"),
        "{out}"
    );
    assert!(out.contains("1 expired entries skipped"), "{out}");

    let (ok, out, err) = cli(&fx, &["policies"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .starts_with("0      catch-all  true"),
        "{out}"
    );
    let (ok, out, err) = cli(&fx, &["reload"]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "reloaded: 1 policies, generation 2 (3 map writes, 0 deletes)\n"
    );
    let (ok, out, err) = cli(&fx, &["stats"]);
    assert!(ok, "{err}");
    assert_eq!(out, "flows: 3\nsessions: 2\n");
    let (ok, out, err) = cli(&fx, &["stats", "geo", "--json"]);
    assert!(ok, "{err}");
    let geo: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(geo["prefixes"]["ipv4"], 12);
}
