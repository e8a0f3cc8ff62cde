//! egress-agent: compiles ordered egress policies into the dataplane's BPF
//! maps and runs the TC programs that steer each flow out of the right
//! egress address. The library is what the binary and the tests share.

pub mod api;
pub mod cli;
pub mod client;
pub mod cmd;
pub mod conntrack;
pub mod control;
pub mod counters;
pub mod flowlog;
pub mod geoip;
pub mod health;
pub mod identity;
pub mod inspect;
pub mod loader;
pub mod local;
pub mod mapwalk;
pub mod metrics;
pub mod pin;
pub mod policy;
pub mod ports;
pub mod server_task;
pub mod slot_names;
pub mod switches;
pub mod tables;
pub mod trust;
pub mod uplinks;
