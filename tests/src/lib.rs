//! Lab fixtures shared by the privileged tests and `cargo xtask run`:
//! network namespaces joined by veth pairs (never touching the host's own
//! interfaces), echo servers that report the source address they saw, and
//! probes that drive TCP, UDP and ICMP flows through the gateway.

pub mod agent;
pub mod geodb;
pub mod lab;
pub mod netns;
pub mod pins;
pub mod probe;
pub mod rng;
pub mod soak;
pub mod tempdir;
pub mod traffic;

#[cfg(test)]
mod tests;
