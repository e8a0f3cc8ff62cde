//! Locates the eBPF object built by `cargo xtask build-ebpf` and hands its
//! path to `include_bytes_aligned!`. The object is built by xtask, not here:
//! the aya-build route needs `-Z build-std`, which this toolchain lacks.

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=EGRESS_EBPF_OBJ");
    let object = match std::env::var_os("EGRESS_EBPF_OBJ") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join("..").join("target"));
            target
                .join("ebpf")
                .join("bpfel-unknown-none")
                .join("release")
                .join("egress-ebpf")
        }
    };
    if !object.is_file() {
        panic!(
            "the eBPF object {} does not exist: build it first with `cargo xtask build-ebpf` \
             (or build everything with `cargo xtask build`)",
            object.display()
        );
    }
    println!("cargo::rerun-if-changed={}", object.display());
    println!("cargo::rustc-env=EGRESS_EBPF_OBJ={}", object.display());
}
