// SPDX-License-Identifier: MIT OR Apache-2.0
//! Country databases given as MaxMind DB (`--geoip db.mmdb`):
//! `geoip::source::parse` on any bytes under a `.mmdb` name. A rejection
//! names the file; accepted networks merge and build tables that answer
//! as the networks do.

#![no_main]

use std::path::Path;

use egress_agent::geoip::source;
use egress_fuzz::{check_country_file, rendered};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match source::parse(Path::new("countries.mmdb"), data.to_vec()) {
        Ok(file) => check_country_file(&file),
        Err(err) => {
            let message = rendered(&err, "MaxMind DB");
            assert!(
                message.contains("countries.mmdb"),
                "a rejection names the file: {message}"
            );
        }
    }
});
