//! Privileged test suites (run as root by `cargo xtask test`).

mod faults_lab;
mod flowlog_lab;
mod flowlog_packets;
mod geo;
mod geo_lab;
mod identity_lab;
mod nat_lab;
mod nat_packets;
mod observe_lab;
mod packet;
mod packet_fuzz;
mod prog_test_run;
mod reload_lab;
mod restart_lab;
mod security_lab;
mod soak_lab;
mod steer_e2e;
mod uplinks_lab;
mod uplinks_packets;
