// SPDX-License-Identifier: MIT OR Apache-2.0
//! `import gateway-rules`: `cmd::import::convert` on any text. A refusal
//! names what is wrong; what it writes is a policy file the agent accepts
//! and compiles.

#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use egress_agent::{cmd::import, policy};
use egress_fuzz::{check_policy_set, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(text) = text(data) else {
        return;
    };
    let default_v4 = Ipv4Addr::new(203, 0, 113, 1);
    let default_v6 = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
    match import::convert(text, default_v4, Some(default_v6)) {
        Ok(policy_file) => {
            let set = policy::parse(&policy_file)
                .unwrap_or_else(|e| panic!("the converted file must parse: {e}\n{policy_file}"));
            check_policy_set(&set);
        }
        Err(err) => {
            let message = format!("{err:#}");
            assert!(!message.trim().is_empty(), "an import error says something");
        }
    }
});
