//! The one place that knows how to build the eBPF object, plus the agent
//! build that embeds it.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::{
    setup::{self, BPF_RUSTC, Tools},
    util,
};

pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// Where the eBPF build puts its artifacts: apart from the host build, which
/// uses a different rustc and would otherwise thrash its fingerprints.
pub fn ebpf_target_dir() -> PathBuf {
    util::target_dir().join("ebpf")
}

pub fn ebpf_object() -> PathBuf {
    ebpf_target_dir()
        .join(BPF_TARGET)
        .join("release")
        .join("egress-ebpf")
}

/// Build the eBPF programs: Debian's rustc (prebuilt BPF `core`, so no
/// `-Z build-std`) with bpf-linker from `.tools` emitting BTF.
pub fn build_ebpf(tools: &Tools) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools.bin_dir.clone()];
    paths.extend(std::env::split_paths(&path));
    util::run(
        util::cargo()
            .args([
                "build",
                "--package",
                "egress-ebpf",
                "--release",
                "--target",
                BPF_TARGET,
            ])
            .arg("--target-dir")
            .arg(ebpf_target_dir())
            .env("RUSTC", BPF_RUSTC)
            // aya-ebpf enables asm_experimental_arch on the bpf target.
            .env("RUSTC_BOOTSTRAP", "1")
            // bpf-linker's default (--bpf-expand-memcpy-in-order) turns every
            // memset, even a 16-byte one, into a call to a byte-at-a-time
            // loop. Without it LLVM emits plain stores: an established
            // flow's packet went from 220 to 177 ns in `cargo xtask bench`.
            .env(
                "RUSTFLAGS",
                "-C debuginfo=2 -C link-arg=--btf -C link-arg=--disable-expand-memcpy-in-order -D warnings",
            )
            .env("PATH", std::env::join_paths(paths)?)
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
    )
    .context("building the eBPF object")?;
    Ok(ebpf_object())
}

#[derive(Args, Default)]
pub struct BuildArgs {
    /// Build the agent with the release profile.
    #[arg(long)]
    pub release: bool,
}

/// Build the eBPF object and the agent that embeds it; returns the agent binary.
pub fn build(args: &BuildArgs) -> anyhow::Result<PathBuf> {
    let tools = setup::setup()?;
    let object = build_ebpf(&tools)?;
    let mut cmd = util::cargo();
    cmd.args(["build", "--package", "egress-agent"])
        .env("EGRESS_EBPF_OBJ", &object);
    if args.release {
        cmd.arg("--release");
    }
    util::run(&mut cmd).context("building egress-agent")?;
    Ok(util::target_dir()
        .join(if args.release { "release" } else { "debug" })
        .join("egress-agent"))
}
