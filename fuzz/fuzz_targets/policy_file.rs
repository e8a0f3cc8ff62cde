// SPDX-License-Identifier: MIT OR Apache-2.0
//! The policy file (`--config`, `check`, reload): `policy::parse` on any
//! text. A rejection names the place at fault; an accepted set analyses,
//! compiles, and its tables agree with the reference evaluator.

#![no_main]

use egress_agent::policy::{self, PolicyError};
use egress_fuzz::{check_policy_set, rendered, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(text) = text(data) else {
        return;
    };
    match policy::parse(text) {
        Ok(set) => check_policy_set(&set),
        Err(err) => {
            let message = rendered(&err, "policy file");
            if let PolicyError::Invalid { path, .. } = &err {
                assert!(
                    !path.is_empty(),
                    "a rejection names its JSON path: {message}"
                );
            }
        }
    }
});
