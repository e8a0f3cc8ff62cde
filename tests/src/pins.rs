//! Pin directories for lab agents: one per agent (or per test that restarts
//! agents on the same pins), on a BPF filesystem the lab mounts, removed on
//! drop (also when the test panics).
//!
//! Lab agents run under `ip netns exec`, which mounts a fresh /sys and so
//! hides /sys/fs/bpf; a BPF filesystem mounted outside /sys is visible in
//! every namespace the lab makes, and is one instance for all of them.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context as _;

use crate::netns::sh;

/// Where the lab's BPF filesystem is mounted (host mount namespace).
pub const MOUNT: &str = "/run/egress-tests/bpf";
/// Prefix of every pin directory a test makes; the creator's pid follows,
/// so leftovers of dead runs can be told from live ones.
const PREFIX: &str = "egress-test";

/// Mount the lab's BPF filesystem unless it is mounted. Under a lock, so
/// that two test processes never stack two instances on the mount point
/// (pins made in the lower one would vanish from view).
pub fn mount() -> anyhow::Result<&'static Path> {
    std::fs::create_dir_all(MOUNT).with_context(|| format!("creating {MOUNT}"))?;
    let script = format!("grep -qs ' {MOUNT} bpf ' /proc/mounts || mount -t bpf bpf {MOUNT}");
    sh(
        "flock",
        &["/run/egress-tests/.mount.lock", "sh", "-c", &script],
    )
    .context("mounting the lab's BPF filesystem")?;
    Ok(Path::new(MOUNT))
}

/// A fresh pin path `MOUNT/egress-test-<pid>-<n>` (not created: the agent
/// creates it), removed with everything in it on drop. Removing a tcx
/// link's pin detaches its program, so nothing stays attached.
pub struct PinPath(PathBuf);

impl PinPath {
    pub fn new() -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = mount()?;
        remove_stale(root);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Ok(Self(
            root.join(format!("{PREFIX}-{}-{n}", std::process::id())),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as an argument.
    pub fn arg(&self) -> &str {
        self.0.to_str().expect("pin paths are ASCII")
    }
}

impl Drop for PinPath {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("warning: removing pins {}: {e}", self.0.display()),
        }
    }
}

/// Remove pin directories of test processes that are gone.
fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
