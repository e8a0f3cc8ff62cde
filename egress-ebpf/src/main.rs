// SPDX-License-Identifier: GPL-2.0 OR MIT
//! TC entry points on the uplink. Each is a thin wrapper: the work happens in
//! `nat`, and an error becomes a verdict in exactly one place (`error.rs`).
#![no_std]
#![no_main]

mod classify;
mod error;
mod events;
mod family;
mod frag;
mod icmp;
mod klog;
mod maps;
mod nat;
mod parse;
mod redirect;
mod stats;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// TC egress: classify the first packet of a flow, then translate its source.
#[classifier]
pub fn egress_steer(ctx: TcContext) -> i32 {
    match nat::egress(&ctx) {
        Ok(verdict) => verdict,
        Err(err) => err.egress_action(),
    }
}

/// TC ingress: translate replies to translated flows back to the client.
#[classifier]
pub fn ingress_restore(ctx: TcContext) -> i32 {
    match nat::ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(err) => err.ingress_action(),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that
    // could get here, because it does not terminate.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
