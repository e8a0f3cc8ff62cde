// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Why a packet could not be handled, and the one place that turns that into
//! a verdict.
//!
//! Egress fails closed: a packet that needed translation and did not get it
//! must never leave with the client's own address. Ingress fails open for
//! packets it cannot parse (they are not replies to anything this program
//! translated; the stack validates them itself) and closed for rewrite
//! failures of translated flows (a half-rewritten packet is never forwarded).

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use egress_common::stats::Counter;

use crate::stats::count;

#[derive(Clone, Copy)]
pub enum Error {
    /// Truncated or inconsistent IP/L4 header.
    Malformed,
    /// A later fragment whose first fragment was not seen.
    Fragment,
    /// The protocol cannot be translated, and the policy requires it.
    Unsupported,
    /// The policy's pool has no usable address.
    NoEgress,
    /// No free translated port within the bounded search.
    PortExhausted,
    /// A connection table is full.
    TableFull,
    /// A packet helper failed half-way through a rewrite.
    Rewrite,
    /// The active generation's classifier tables are incomplete.
    NoTables,
}

impl Error {
    const fn counter(self) -> Counter {
        match self {
            Self::Malformed => Counter::DropMalformed,
            Self::Fragment => Counter::DropFragment,
            Self::Unsupported => Counter::DropUnsupported,
            Self::NoEgress => Counter::DropNoEgress,
            Self::PortExhausted => Counter::DropPortExhausted,
            Self::TableFull => Counter::DropTableFull,
            Self::Rewrite => Counter::DropRewrite,
            Self::NoTables => Counter::DropNoTables,
        }
    }

    /// Verdict on the egress path: always drop, and count why.
    pub fn egress_action(self) -> i32 {
        count(self.counter());
        TC_ACT_SHOT as i32
    }

    /// Verdict on the ingress path.
    pub fn ingress_action(self) -> i32 {
        match self {
            Self::Malformed | Self::Fragment => {
                count(Counter::IngressNotOurs);
                TC_ACT_OK as i32
            }
            _ => {
                count(self.counter());
                TC_ACT_SHOT as i32
            }
        }
    }
}
