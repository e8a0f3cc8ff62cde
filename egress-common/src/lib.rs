// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The single source of truth for everything the eBPF programs and the agent
//! both touch: map names, key/value layouts, limits and the pure logic both
//! sides run (bit-vector first match, table indexing).
//!
//! Every map type is `#[repr(C)]`, made of fixed-width fields with explicit
//! `_reserved` padding, and carries a size assertion, so the kernel and
//! userspace views cannot drift apart.
#![cfg_attr(target_arch = "bpf", no_std)]

pub mod classify;
pub mod conntrack;
pub mod csum;
pub mod events;
pub mod flow;
pub mod geo;
pub mod maps;
pub mod stats;
