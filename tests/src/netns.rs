//! Network namespaces with RAII clean-up, and running code inside them.

use std::{
    fs::File,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

/// Prefix of every namespace a lab creates; `remove_stale` uses it to clean
/// up after a run that was killed before its guards could.
pub const PREFIX: &str = "egl";

/// A name unique per process and call: `egl-<pid>-<n>`. The creator's pid
/// lets [`remove_stale`] tell leftovers of dead runs from live labs.
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}-{}-{n}", std::process::id())
}

/// Run a command, failing with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted (with every interface in it) on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        sh("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Any command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Run `f` on a thread that has entered this namespace. Sockets created
    /// there stay in the namespace wherever they are used afterwards.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(err) = sh("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: removing namespace {}: {err}", self.name);
        }
    }
}

/// Delete lab namespaces left behind by a run that was killed before its
/// guards could run: those whose creating process no longer exists. Labs
/// of live processes (tests running beside `cargo xtask run`) are kept.
pub fn remove_stale() -> anyhow::Result<Vec<String>> {
    let list = sh("ip", &["netns", "list"])?;
    let mut removed = Vec::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let alive = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            sh("ip", &["netns", "del", name])?;
            removed.push(name.to_owned());
        }
    }
    Ok(removed)
}
