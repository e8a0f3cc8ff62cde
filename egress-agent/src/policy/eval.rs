//! The reference evaluator: a plain first-match walk over the policy list.
//! It defines what the compiled tables must compute, and explains decisions.

use std::net::IpAddr;

use super::model::{Policy, PolicySet, Protocol, Selector};

/// The fields of a flow's first packet that policies select on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
}

/// Why a selector rejected a flow: the first field that did not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    Disabled,
    Src,
    Dst,
    Protocol,
    DstPort,
}

impl Mismatch {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Disabled => "policy is disabled",
            Self::Src => "source address not in src",
            Self::Dst => "destination address not in dst",
            Self::Protocol => "protocol not in protocols",
            Self::DstPort => "destination port not in dst_ports",
        }
    }
}

impl Selector {
    /// `Ok(())` when the flow matches, otherwise the first field that does not.
    pub fn check(&self, flow: &Flow) -> Result<(), Mismatch> {
        if !self.src.is_empty() && !self.src.iter().any(|n| n.contains(&flow.src)) {
            return Err(Mismatch::Src);
        }
        if !self.dst.is_empty() && !self.dst.iter().any(|n| n.contains(&flow.dst)) {
            return Err(Mismatch::Dst);
        }
        let proto = Protocol::from_number(flow.proto);
        if !self.protocols.is_empty() && !proto.is_some_and(|p| self.protocols.contains(&p)) {
            return Err(Mismatch::Protocol);
        }
        if !self.dst_ports.is_empty() {
            let has_ports = proto.is_some_and(Protocol::has_ports);
            if !has_ports || !self.dst_ports.iter().any(|r| r.contains(flow.dst_port)) {
                return Err(Mismatch::DstPort);
            }
        }
        Ok(())
    }
}

impl Policy {
    pub fn check(&self, flow: &Flow) -> Result<(), Mismatch> {
        if !self.enabled {
            return Err(Mismatch::Disabled);
        }
        self.selector.check(flow)
    }
}

impl PolicySet {
    /// Index of the first policy that matches, or `None` (default egress).
    pub fn first_match(&self, flow: &Flow) -> Option<usize> {
        self.policies.iter().position(|p| p.check(flow).is_ok())
    }
}
