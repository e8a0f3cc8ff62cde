//! The reference evaluator: a plain first-match walk over the policy list,
//! evaluating each policy's condition as written. It defines what the
//! compiled tables must compute, and explains decisions.

use std::net::IpAddr;

use super::{
    dnf::Conjunction,
    geo,
    model::{Atom, CountryCode, Dimension, Expr, Identity, Policy, PolicySet, Protocol},
};

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

impl Flow {
    /// Traffic the dataplane passes untouched and untracked before any
    /// policy is consulted: from the unspecified address (DHCP, duplicate
    /// address detection) or a link-local one, or to multicast or the
    /// limited broadcast. It never leaves the local link, so it has no
    /// egress to steer.
    pub fn is_link_scoped(&self) -> bool {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                src.is_unspecified()
                    || src.is_link_local()
                    || dst.is_multicast()
                    || dst.is_broadcast()
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                src.is_unspecified() || src.is_unicast_link_local() || dst.is_multicast()
            }
            _ => false,
        }
    }
}

/// A flow with what the gateway knows about its ends.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    pub flow: Flow,
    /// The identity behind the source address, if any.
    pub identity: Option<&'a Identity>,
    /// The destination's country, if the country database knows it.
    pub country: Option<CountryCode>,
}

impl<'a> Context<'a> {
    pub fn new(flow: Flow) -> Self {
        Self {
            flow,
            identity: None,
            country: None,
        }
    }
}

impl Atom {
    pub fn eval(&self, ctx: &Context<'_>) -> bool {
        let flow = &ctx.flow;
        let proto = Protocol::from_number(flow.proto);
        match self {
            Self::SrcIp(nets) => nets.iter().any(|n| n.contains(&flow.src)),
            Self::DstIp(nets) => nets.iter().any(|n| n.contains(&flow.dst)),
            Self::Protocol(ps) => proto.is_some_and(|p| ps.contains(&p)),
            Self::DstPort(ranges) => {
                proto.is_some_and(Protocol::has_ports)
                    && ranges.iter().any(|r| r.contains(flow.dst_port))
            }
            Self::User(users) => ctx
                .identity
                .is_some_and(|id| users.iter().any(|u| u.eq_ignore_ascii_case(&id.user))),
            Self::Group(groups) => ctx
                .identity
                .is_some_and(|id| groups.iter().any(|g| id.groups.contains(g))),
            Self::Posture(tags) => ctx
                .identity
                .is_some_and(|id| tags.iter().any(|t| id.posture.contains(t))),
            Self::Country(codes) => ctx.country.is_some_and(|c| codes.contains(&c)),
            Self::Continent(continents) => ctx
                .country
                .and_then(|c| geo::lookup(&c.to_string()))
                .is_some_and(|(_, _, continent)| continents.contains(&continent)),
        }
    }
}

impl Expr {
    pub fn eval(&self, ctx: &Context<'_>) -> bool {
        match self {
            Self::True => true,
            Self::Atom(a) => a.eval(ctx),
            Self::Not(e) => !e.eval(ctx),
            Self::And(es) => es.iter().all(|e| e.eval(ctx)),
            Self::Or(es) => es.iter().any(|e| e.eval(ctx)),
        }
    }
}

/// Why a policy did not match a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    Disabled,
    /// The policy is about identities and the source has none.
    NoIdentity,
    /// Per alternative of the condition: the first predicate that failed.
    Failed(Vec<(Dimension, Expr)>),
}

impl Policy {
    /// Whether the policy applies to the flow: enabled, identity present if
    /// the condition mentions one, and the condition true.
    pub fn matches(&self, ctx: &Context<'_>) -> bool {
        self.enabled
            && !(self.requires_identity() && ctx.identity.is_none())
            && self.matcher.eval(ctx)
    }

    /// `Ok` when the policy matches, otherwise why not.
    pub fn check(&self, ctx: &Context<'_>) -> Result<(), Mismatch> {
        if !self.enabled {
            return Err(Mismatch::Disabled);
        }
        if self.requires_identity() && ctx.identity.is_none() {
            return Err(Mismatch::NoIdentity);
        }
        if self.matcher.eval(ctx) {
            return Ok(());
        }
        Err(Mismatch::Failed(
            self.rules
                .iter()
                .filter_map(|c: &Conjunction| {
                    c.preds
                        .iter()
                        .find(|(_, pred)| !pred.eval(ctx))
                        .map(|(d, p)| (*d, first_false(p, ctx).clone()))
                })
                .collect(),
        ))
    }
}

/// The smallest part of a false predicate that makes it false: inside an
/// `and`, its first false member (recursively); otherwise the predicate.
fn first_false<'e>(pred: &'e Expr, ctx: &Context<'_>) -> &'e Expr {
    match pred {
        Expr::And(parts) => parts
            .iter()
            .find(|p| !p.eval(ctx))
            .map_or(pred, |p| first_false(p, ctx)),
        _ => pred,
    }
}

impl PolicySet {
    /// Index of the first policy that matches, or `None` (default egress).
    pub fn first_match(&self, ctx: &Context<'_>) -> Option<usize> {
        self.policies.iter().position(|p| p.matches(ctx))
    }
}
