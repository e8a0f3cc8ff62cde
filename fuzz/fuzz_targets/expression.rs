// SPDX-License-Identifier: MIT OR Apache-2.0
//! The expression language (`traffic`, `identity`, `device_posture`, and
//! imported gateway rules): `expr::parse` on any text, for every kind.
//! A rejection points at a line and column inside the text; an accepted
//! expression prints as text that parses back to the same expression, and
//! normalises into classifier rules or is refused as too large.

#![no_main]

use egress_agent::policy::{
    dnf,
    expr::{self, ExprKind},
};
use egress_fuzz::{rendered, text};
use libfuzzer_sys::fuzz_target;

const KINDS: [ExprKind; 4] = [
    ExprKind::Traffic,
    ExprKind::Identity,
    ExprKind::DevicePosture,
    ExprKind::Any,
];

fuzz_target!(|data: &[u8]| {
    let Some(text) = text(data) else {
        return;
    };
    let any = expr::parse(text, ExprKind::Any);
    for kind in KINDS {
        let parsed = if kind == ExprKind::Any {
            any.clone()
        } else {
            expr::parse(text, kind)
        };
        match parsed {
            Ok(e) => {
                let printed = e.to_string();
                assert_eq!(
                    expr::parse(&printed, kind).as_ref(),
                    Ok(&e),
                    "{text:?} ({kind:?}) printed as {printed:?} must parse back to the same expression"
                );
                assert_eq!(
                    any.as_ref(),
                    Ok(&e),
                    "{text:?}: what {kind:?} accepts, Any accepts the same way"
                );
                if let Err(err) = dnf::normalize(&e) {
                    rendered(&err, "normalising an expression");
                }
            }
            Err(err) => {
                let message = rendered(&err, "expression");
                // Columns count characters; the end of the text is a place too.
                let lines: Vec<&str> = text.split('\n').collect();
                assert!(
                    err.line >= 1 && err.line <= lines.len(),
                    "{text:?}: error line {} is outside the text: {message}",
                    err.line
                );
                let width = lines[err.line - 1].chars().count();
                assert!(
                    err.column >= 1 && err.column <= width + 1,
                    "{text:?}: error column {} is outside line {} ({width} characters): {message}",
                    err.column,
                    err.line
                );
            }
        }
    }
});
