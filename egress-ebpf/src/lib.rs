// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Exists so `cargo check --workspace` has a library target; the programs
//! live in the `egress-ebpf` binary, built for bpfel-unknown-none by xtask.
#![no_std]
