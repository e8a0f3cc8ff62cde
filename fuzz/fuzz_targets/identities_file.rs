// SPDX-License-Identifier: MIT OR Apache-2.0
//! The identities file (`--identities`) and the saved API sessions in
//! `--state-dir` (the same format): `identity::file::parse` on any text.
//! A rejection names the file and the field; accepted sessions, written
//! back the way the state file stores them, read back unchanged.

#![no_main]

use std::path::Path;

use egress_agent::identity::file::{self, FILE_ID_PREFIX, LOAD_ID_PREFIX};
use egress_fuzz::{now, rendered, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(text) = text(data) else {
        return;
    };
    let path = Path::new("identities.json");
    for prefix in [FILE_ID_PREFIX, LOAD_ID_PREFIX] {
        let parsed = match file::parse(path, text, now(), prefix) {
            Ok(parsed) => parsed,
            Err(err) => {
                let message = rendered(&err, "identities file");
                assert!(
                    message.contains("identities.json"),
                    "a rejection names the file: {message}"
                );
                continue;
            }
        };
        for (id, spec) in &parsed.sessions {
            assert!(
                spec.validate(now()).is_ok(),
                "an accepted session {id:?} passes the session checks"
            );
            let _ = spec.identity();
        }
        // What identity::state::save writes: each spec with its id.
        let entries: Vec<serde_json::Value> = parsed
            .sessions
            .iter()
            .map(|(id, spec)| {
                let mut entry = serde_json::to_value(spec).expect("a session spec serialises");
                entry["id"] = id.clone().into();
                entry
            })
            .collect();
        let saved = serde_json::json!({ "sessions": entries }).to_string();
        let back = file::parse(path, &saved, now(), LOAD_ID_PREFIX)
            .unwrap_or_else(|err| panic!("saved sessions must read back: {err}\n{saved}"));
        assert_eq!(back.expired, 0, "no saved session has expired");
        assert_eq!(
            back.sessions, parsed.sessions,
            "saved sessions read back unchanged"
        );
    }
});
