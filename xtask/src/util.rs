//! Small process helpers shared by the xtask commands.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory for the host build.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `cargo` as invoked for this xtask (rustup's), never Debian's.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Run a command to completion; fail with the command line if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Make `cmd` (a cargo that runs test or bench binaries it built as the
/// invoking user) run those binaries through `sudo -E`: cargo's runner
/// variable for the host target, whose name comes from `rustc -vV`.
pub fn run_binaries_with_sudo(cmd: &mut Command) -> anyhow::Result<()> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    if !out.status.success() {
        bail!("rustc -vV failed ({})", out.status);
    }
    let info = String::from_utf8_lossy(&out.stdout);
    let host = info
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("rustc -vV names no host triple")?;
    let var = format!(
        "CARGO_TARGET_{}_RUNNER",
        host.trim().to_uppercase().replace(['-', '.'], "_")
    );
    cmd.env(var, "sudo -E");
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
