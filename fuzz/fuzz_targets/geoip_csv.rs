// SPDX-License-Identifier: MIT OR Apache-2.0
//! Country databases given as CSV (`--geoip ranges.csv`):
//! `geoip::source::parse` on any bytes (a file that carries the MaxMind DB
//! marker is read as one, as the agent does). A rejection names the file
//! and line; accepted ranges merge and build tables that answer as the
//! ranges do.

#![no_main]

use std::path::Path;

use egress_agent::geoip::source;
use egress_fuzz::{check_country_file, rendered};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match source::parse(Path::new("countries.csv"), data.to_vec()) {
        Ok(file) => check_country_file(&file),
        Err(err) => {
            let message = rendered(&err, "country CSV");
            assert!(
                message.contains("countries.csv"),
                "a rejection names the file: {message}"
            );
        }
    }
});
