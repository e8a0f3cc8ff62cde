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

use crate::netns::NetNs;

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
}

/// Log line the agent prints once it is attached and steering.
pub const READY: &str = "steering on ";

impl Agent {
    /// Start `egress-agent <args>` inside `ns`, echoing its log (prefixed
    /// with `label`) to stderr.
    pub fn start(ns: &NetNs, label: &str, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_binary(&binary(), ns, label, args)
    }

    /// [`Agent::start`] with an explicit binary.
    pub fn start_binary(
        bin: &Path,
        ns: &NetNs,
        label: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
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
        })
    }

    /// Wait until a log line contains `needle`; fails if the agent exits first.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            if let Some(line) = out.lines.iter().find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            if out.closed {
                bail!(
                    "egress-agent exited before logging {needle:?}; its output:\n{}",
                    out.lines.join("\n")
                );
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("egress-agent did not log {needle:?} within {timeout:?}");
            }
            out = cvar.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    pub fn wait_ready(&self) -> anyhow::Result<()> {
        self.wait_for(READY, Duration::from_secs(20)).map(|_| ())
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
