//! Privileged test suites (run as root by `cargo xtask test`).

mod geo;
mod geo_lab;
mod identity_lab;
mod nat_lab;
mod nat_packets;
mod packet;
mod prog_test_run;
mod steer_e2e;
