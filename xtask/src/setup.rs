//! `cargo xtask setup`: everything the build needs beyond rustup's stable
//! toolchain, installed idempotently. Every other command runs it first.
//!
//! Why not the usual aya recipe: `-Z build-std` needs rustup's `rust-src`,
//! which this machine kind cannot download. Debian's `rustc-web` ships a
//! prebuilt `core` for bpfel-unknown-none instead, and bpf-linker is built
//! against Debian's LLVM 22 to match it.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{self, workspace_root};

/// Debian packages and why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "rustc 1.96 whose LLVM matches bpf-linker's"),
    (
        "libstd-rust-web-dev-bpf",
        "prebuilt core/alloc for bpfel-unknown-none",
    ),
    ("llvm-22-dev", "LLVM 22 that bpf-linker links against"),
    ("iproute2", "ip and tc for the lab namespaces"),
    (
        "npm",
        "`npm pack` fetches the real country database for the geo tests",
    ),
    ("nftables", "the nftables baselines of `cargo xtask bench`"),
    ("iperf3", "UDP and TCP load in `cargo xtask bench`"),
    ("nginx", "the HTTP server of the new-connection bench"),
    ("wrk", "short HTTP connections in `cargo xtask bench`"),
    (
        "ethtool",
        "offloads and NAPI of the lab links in `cargo xtask bench`",
    ),
];

pub const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The rustc that can build for the BPF target (from `rustc-web`).
pub const BPF_RUSTC: &str = "/usr/bin/rustc";
const BPF_SYSROOT_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";

/// Locations of the installed tools.
pub struct Tools {
    /// Directory holding `bpf-linker`; goes first on PATH for the eBPF build.
    pub bin_dir: PathBuf,
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|out| out.status.success() && out.stdout.ends_with(b"install ok installed"))
        .unwrap_or(false)
        || provided_by_command(package)
}

/// Some packages' commands come from elsewhere: NodeSource's `nodejs`
/// ships npm and conflicts with Debian's `npm`, which must then not be
/// installed over it.
fn provided_by_command(package: &str) -> bool {
    package == "npm"
        && Command::new("npm")
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
}

pub fn setup() -> anyhow::Result<Tools> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !installed(name))
        .collect();
    if !missing.is_empty() {
        let list = missing.join(" ");
        if !util::is_root() {
            bail!(
                "missing Debian packages: {list}\n  install them with: sudo apt-get update && sudo apt-get install -y {list}"
            );
        }
        eprintln!("setup: installing Debian packages: {list}");
        for (name, why) in PACKAGES.iter().filter(|(n, _)| missing.contains(n)) {
            eprintln!("setup:   {name}: {why}");
        }
        util::run(
            Command::new("apt-get")
                .args(["update", "-qq"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        util::run(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| format!("installing {list}"))?;
    }
    for path in [BPF_RUSTC, BPF_SYSROOT_CORE, LLVM_PREFIX] {
        if !std::path::Path::new(path).exists() {
            bail!(
                "{path} is missing although its Debian package is installed; reinstall with: apt-get install --reinstall rustc-web libstd-rust-web-dev-bpf llvm-22-dev"
            );
        }
    }

    let tools_root = workspace_root().join(".tools");
    let bin_dir = tools_root.join("bin");
    let linker = bin_dir.join("bpf-linker");
    let present = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !present {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 into {} (about a minute)",
            tools_root.display()
        );
        util::run(
            util::cargo()
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                    "--root",
                ])
                .arg(&tools_root)
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env_remove("RUSTC")
                .env_remove("RUSTFLAGS"),
        )
        .context("installing bpf-linker (needs llvm-22-dev; retry with `cargo xtask setup`)")?;
    }
    // `cargo xtask fuzz` and the fuzz smoke of `cargo xtask test`.
    crate::fuzz::install_cargo_fuzz(&tools_root)?;
    eprintln!(
        "setup: toolchain ready ({} from Debian; bpf-linker {BPF_LINKER_VERSION} and cargo-fuzz {} in {})",
        PACKAGES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
        crate::fuzz::CARGO_FUZZ_VERSION,
        bin_dir.display()
    );
    Ok(Tools { bin_dir })
}
