// SPDX-License-Identifier: MIT OR Apache-2.0
//! Control API request bodies (`PUT /v1/sessions/{id}`, `POST
//! /v1/sessions`, `PUT .../posture`, `POST /v1/log`) and the `{id}` of
//! the URL: the handlers' own decoders on any bytes. A refusal is a 400
//! or 422 with a message; what is accepted passes the session checks and
//! survives the JSON round trip a client makes.

#![no_main]

use std::collections::HashSet;

use egress_agent::{
    api::body,
    control::ControlError,
    identity::{SessionSpec, model::validate_id},
};
use egress_fuzz::{now, rendered};
use libfuzzer_sys::fuzz_target;

fn refused(err: &ControlError, what: &str) {
    rendered(err, what);
    assert!(
        err.status == 400 || err.status == 422,
        "{what}: a refused body is a 400 or a 422, not {}: {err}",
        err.status
    );
    if let Some(field) = &err.field {
        assert!(!field.is_empty(), "{what}: a named field is not empty");
    }
}

fuzz_target!(|data: &[u8]| {
    match body::session(data, now()) {
        Ok(spec) => {
            assert!(spec.validate(now()).is_ok(), "an accepted session is valid");
            let json = serde_json::to_vec(&spec).expect("a session spec serialises");
            let back: SessionSpec = body::session(&json, now())
                .unwrap_or_else(|e| panic!("an accepted session re-sent is accepted: {e}"));
            assert_eq!(back, spec, "a session survives the JSON round trip");
        }
        Err(err) => refused(&err, "PUT /v1/sessions/{id}"),
    }
    match body::sessions(data, now()) {
        Ok(batch) => {
            let mut ids = HashSet::new();
            for entry in &batch {
                assert!(validate_id(&entry.id).is_ok(), "batch ids are valid");
                assert!(ids.insert(&entry.id), "batch ids are distinct");
                assert!(
                    entry.spec.validate(now()).is_ok(),
                    "batch sessions are valid"
                );
            }
        }
        Err(err) => refused(&err, "POST /v1/sessions"),
    }
    if let Err(err) = body::posture(data) {
        refused(&err, "PUT /v1/sessions/{id}/posture");
    }
    if let Err(err) = body::log(data) {
        refused(&err, "POST /v1/log");
    }
    if let Ok(id) = std::str::from_utf8(data)
        && let Err(err) = validate_id(id)
    {
        rendered(&err, "session id");
    }
});
