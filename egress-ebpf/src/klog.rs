// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Kernel log records (aya-log, forwarded into the agent's log) for rare
//! events: outgoing packets dropped because they cannot be handled (kinds
//! the dataplane cannot translate, missing fragments, no port, no address,
//! full tables). Only while the agent has them switched on
//! (`egress-agent log kernel on`): each drop is also counted, always.

use aya_ebpf::programs::TcContext;
use aya_log_ebpf::warn;

use crate::{error::Error, events::klog_on};

/// The egress verdict for `err`, after a log record naming the drop when
/// the agent asked for them.
///
/// Its own BPF function, so the log record's scratch never sits in the
/// frames of the paths that fail; `err` and the verdict are one register
/// each.
#[inline(never)]
pub fn egress_drop(ctx: &TcContext, err: Error) -> i32 {
    if klog_on() {
        match err {
            Error::Malformed => warn!(
                ctx,
                "egress: dropped a packet with truncated or inconsistent headers"
            ),
            Error::Fragment => warn!(
                ctx,
                "egress: dropped a later fragment whose first fragment was not seen"
            ),
            Error::Unsupported => warn!(
                ctx,
                "egress: dropped a new flow of a protocol that cannot be translated (its policy requires translation)"
            ),
            Error::NoEgress => warn!(
                ctx,
                "egress: dropped a new flow: its pool has no usable address of its family"
            ),
            Error::PortExhausted => warn!(
                ctx,
                "egress: dropped a new flow: no free port on its egress address towards its destination"
            ),
            Error::TableFull => warn!(
                ctx,
                "egress: dropped a new flow: the connection table is full"
            ),
            Error::NoTables => warn!(
                ctx,
                "egress: dropped a packet: the active policy tables are missing"
            ),
            // Logged where the helper failed (`nat::failed`).
            Error::Rewrite => {}
        }
    }
    err.egress_action()
}
