//! The real `egress-agent` binary running inside a lab namespace, stopped
//! (SIGTERM, then SIGKILL) on drop.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    lab::{Lab, UPLINK},
    netns::NetNs,
    pins::PinPath,
    tempdir::TempDir,
};

/// The agent binary: `$EGRESS_AGENT_BIN` (set by `cargo xtask`), else the
/// workspace's debug build.
pub fn binary() -> PathBuf {
    std::env::var_os("EGRESS_AGENT_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/egress-agent"),
        PathBuf::from,
    )
}

#[derive(Default)]
struct Output {
    lines: Vec<String>,
    closed: bool,
}

/// A running agent and everything it has logged so far.
pub struct Agent {
    child: Option<Child>,
    output: Arc<(Mutex<Output>, Condvar)>,
    /// The control API socket, in a directory of this agent's own (so
    /// agents of different tests never share one), unless the caller chose.
    api: PathBuf,
    _api_dir: Option<TempDir>,
    /// Its pin directory, unless the caller chose one: removed after the
    /// agent stops (so nothing it pinned stays attached).
    _pins: Option<PinPath>,
}

/// Log line the agent prints once it is attached and steering.
pub const READY: &str = "steering on ";
/// Log lines of an applied and of a rejected reload.
const RELOADED: &str = "reloaded ";
const RELOAD_REJECTED: &str = "reload rejected";

impl Agent {
    /// Start `bin <args>` (an agent binary) inside `ns`, echoing its log
    /// (prefixed with `label`) to stderr.
    pub fn start_binary(
        bin: &Path,
        ns: &NetNs,
        label: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args: Vec<&str> = args.to_vec();
        let (api, api_dir) = match args.iter().position(|a| *a == "--api") {
            Some(i) => (
                PathBuf::from(args.get(i + 1).copied().unwrap_or_default()),
                None,
            ),
            None if args.first() == Some(&"run") => {
                let dir = TempDir::new("api");
                (dir.path().join("api.sock"), Some(dir))
            }
            None => (PathBuf::new(), None),
        };
        let api_arg = api.to_str().context("API path is not UTF-8")?.to_owned();
        // The agent's state (sessions added through the API) beside it.
        let state_arg = api_dir
            .as_ref()
            .map(|d| d.path().join("state").to_string_lossy().into_owned());
        if api_dir.is_some() {
            args.extend(["--api", api_arg.as_str()]);
        }
        // A pin path of its own, on the lab's BPF filesystem (the default
        // /sys/fs/bpf is hidden by `ip netns exec`).
        let pins = match args.first() {
            Some(&"run") if !args.contains(&"--pin-path") => Some(PinPath::new()?),
            _ => None,
        };
        let pin_arg = pins.as_ref().map(|p| p.arg().to_owned());
        if let Some(pin) = &pin_arg {
            args.extend(["--pin-path", pin.as_str()]);
        }
        if let Some(state) = &state_arg
            && !args.contains(&"--state-dir")
        {
            args.extend(["--state-dir", state.as_str()]);
        }
        if !bin.is_file() {
            bail!(
                "agent binary {} not found: build it with `cargo xtask build`",
                bin.display()
            );
        }
        let mut child = ns
            .command(bin.to_str().context("agent path is not UTF-8")?)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting egress-agent")?;
        let output = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        for stream in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let output = Arc::clone(&output);
            let label = label.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[{label}] {line}");
                    let (lock, cvar) = &*output;
                    lock.lock().unwrap().lines.push(line);
                    cvar.notify_all();
                }
                let (lock, cvar) = &*output;
                lock.lock().unwrap().closed = true;
                cvar.notify_all();
            });
        }
        Ok(Self {
            child: Some(child),
            output,
            api,
            _api_dir: api_dir,
            _pins: pins,
        })
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Start `egress-agent run --config <config> --uplink up0 <extra>` (the
    /// binary `bin`) on the lab's gateway, without waiting for it to steer.
    pub fn start_gateway(
        bin: &Path,
        lab: &Lab,
        config: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let config = config.to_str().context("policy path is not UTF-8")?;
        let mut args = vec!["run", "--config", config, "--uplink", UPLINK];
        args.extend_from_slice(extra);
        Self::start_binary(bin, &lab.gw, "agent", &args)
    }

    /// The workspace's agent on the lab's gateway ([`Agent::start_gateway`]),
    /// once it is steering.
    pub fn steering(lab: &Lab, config: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let agent = Self::start_gateway(&binary(), lab, config, extra)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Wait until `decide` settles on the lines logged so far; fails if the
    /// agent exits first or `timeout` passes (`what` says what was awaited).
    fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut decide: impl FnMut(&[String]) -> Option<anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            if let Some(result) = decide(&out.lines) {
                return result;
            }
            if out.closed {
                bail!(
                    "egress-agent exited before logging {what}; its output:\n{}",
                    out.lines.join("\n")
                );
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("egress-agent did not log {what} within {timeout:?}");
            }
            out = cvar.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// Wait until a log line contains `needle`; fails if the agent exits first.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        self.wait_for_count(needle, 1, timeout)
    }

    /// Wait until `n` (at least 1) log lines contain `needle` and return the
    /// `n`th: unlike [`Agent::wait_for`], this waits for a line that repeats
    /// (a reload) to be logged once more.
    pub fn wait_for_count(
        &self,
        needle: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        assert!(n >= 1, "lines are counted from 1");
        let what = if n == 1 {
            format!("{needle:?}")
        } else {
            format!("{needle:?} {n} times")
        };
        self.wait_until(&what, timeout, |lines| {
            lines
                .iter()
                .filter(|l| l.contains(needle))
                .nth(n - 1)
                .map(|l| Ok(l.clone()))
        })
    }

    pub fn wait_ready(&self) -> anyhow::Result<()> {
        self.wait_for(READY, Duration::from_secs(20)).map(|_| ())
    }

    /// Send SIGHUP and wait (10 s at most) for the outcome of the `nth`
    /// reload since the start, accepted or rejected: its `reloaded` line, or
    /// an error when the agent rejected it.
    pub fn reload(&self, nth: usize) -> anyhow::Result<String> {
        assert!(nth >= 1, "reloads are counted from 1");
        self.signal(Signal::SIGHUP)?;
        self.wait_until(
            &format!("the outcome of reload {nth}"),
            Duration::from_secs(10),
            |lines| {
                let line = lines
                    .iter()
                    .filter(|l| l.contains(RELOADED) || l.contains(RELOAD_REJECTED))
                    .nth(nth - 1)?;
                Some(if line.contains(RELOADED) {
                    Ok(line.clone())
                } else {
                    Err(anyhow::anyhow!("reload {nth} was rejected: {line}"))
                })
            },
        )
    }

    /// The agent's control API socket.
    pub fn api(&self) -> &Path {
        &self.api
    }

    /// Run `egress-agent <args> --api <this agent's socket>` (the CLI
    /// talking to this agent) and return its standard output; fails with
    /// its standard error when it exits non-zero.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new(binary())
            .args(args)
            .arg("--api")
            .arg(&self.api)
            .output()
            .context("running the egress-agent CLI")?;
        if !out.status.success() {
            bail!(
                "egress-agent {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Everything logged so far.
    pub fn lines(&self) -> Vec<String> {
        self.output.0.lock().unwrap().lines.clone()
    }

    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("agent already stopped")?;
        kill(Pid::from_raw(child.id() as i32), signal).context("signalling egress-agent")
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after 10 s).
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped");
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                // Let the reader threads drain the last lines.
                let (lock, cvar) = &*self.output;
                let out = lock.lock().unwrap();
                let _ = cvar.wait_timeout_while(out, Duration::from_secs(2), |o| !o.closed);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("egress-agent ignored SIGTERM for 10 s and was killed ({status})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}
