//! Finding policies that can never match: those whose condition is never
//! true, and those every flow of which an earlier policy already takes.
//!
//! Both are decided exactly on the compiler's element universes (prefix
//! classes, port intervals, countries), so a warning is never a guess. The
//! identity dimension is decided over every combination of the users, groups
//! and posture tags the policies mention, when there are few enough.

use std::collections::BTreeSet;

use fixedbitset::FixedBitSet;
use ipnet::{Ipv4Net, Ipv6Net};

use super::{
    compile::{
        Accepts, Rule, country_accepts, identity_accepts, l4_accepts, prefix_accepts, rules,
    },
    model::{Atom, Dimension, Identity, PolicySet},
};

/// Most synthetic identities to enumerate for the analysis.
const MAX_SYNTHETIC_IDENTITIES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The policy's condition is never true.
    Unreachable { policy: usize, reason: &'static str },
    /// Every flow the policy matches is taken by these earlier policies.
    Shadowed { policy: usize, by: Vec<usize> },
}

/// Accept sets of every sub-dimension, per rule, and whether the identity
/// one could be computed.
struct Universe {
    src4: Accepts,
    src6: Accepts,
    dst4: Accepts,
    dst6: Accepts,
    l4: Accepts,
    identity: Option<Accepts>,
    /// Per rule: no identity condition at all (used when `identity` is None).
    identity_free: Vec<bool>,
    country: Accepts,
}

fn nonempty(accept: &Option<FixedBitSet>) -> bool {
    accept.as_ref().is_none_or(|s| !s.is_clear())
}

/// `a ⊆ b`, where `None` is the whole universe.
fn subset(a: &Option<FixedBitSet>, b: &Option<FixedBitSet>) -> bool {
    match (a, b) {
        (_, None) => true,
        (None, Some(b)) => b.is_full(),
        (Some(a), Some(b)) => a.is_subset(b),
    }
}

fn names(set: &PolicySet) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let mut out: (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) = Default::default();
    for atom in set.policies.iter().flat_map(|p| p.matcher.atoms()) {
        match atom {
            Atom::User(v) => out.0.extend(v.iter().cloned()),
            Atom::Group(v) => out.1.extend(v.iter().cloned()),
            Atom::Posture(v) => out.2.extend(v.iter().cloned()),
            _ => {}
        }
    }
    out
}

/// Every combination of a mentioned user (or someone else), a subset of
/// the mentioned groups and a subset of the mentioned posture tags.
fn synthetic_identities(set: &PolicySet) -> Option<Vec<Identity>> {
    let (users, groups, posture) = names(set);
    let (g, p) = (groups.len() as u32, posture.len() as u32);
    let total = (users.len() + 1).checked_mul(1usize.checked_shl(g + p)?)?;
    if total > MAX_SYNTHETIC_IDENTITIES {
        return None;
    }
    let groups: Vec<String> = groups.into_iter().collect();
    let posture: Vec<String> = posture.into_iter().collect();
    let mut out = Vec::with_capacity(total);
    for user in users.iter().cloned().chain(["someone else".to_owned()]) {
        for mask in 0u64..(1 << (g + p)) {
            out.push(Identity {
                user: user.clone(),
                groups: (0..g)
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| groups[i as usize].clone())
                    .collect(),
                posture: (0..p)
                    .filter(|i| mask & (1 << (g + i)) != 0)
                    .map(|i| posture[i as usize].clone())
                    .collect(),
            });
        }
    }
    Some(out)
}

impl Universe {
    fn build(set: &PolicySet, rules: &[Rule<'_>]) -> Self {
        Self {
            src4: prefix_accepts::<Ipv4Net>(rules, Dimension::Src).1,
            src6: prefix_accepts::<Ipv6Net>(rules, Dimension::Src).1,
            dst4: prefix_accepts::<Ipv4Net>(rules, Dimension::Dst).1,
            dst6: prefix_accepts::<Ipv6Net>(rules, Dimension::Dst).1,
            l4: l4_accepts(rules).1,
            identity: synthetic_identities(set).map(|ids| identity_accepts(rules, &ids)),
            identity_free: rules
                .iter()
                .map(|r| r.conj.pred(Dimension::Identity).is_none() && !r.requires_identity)
                .collect(),
            country: country_accepts(rules),
        }
    }

    /// Why rule `r` never matches, if it never does.
    fn empty(&self, r: usize) -> Option<&'static str> {
        let v4 = nonempty(&self.src4[r]) && nonempty(&self.dst4[r]);
        let v6 = nonempty(&self.src6[r]) && nonempty(&self.dst6[r]);
        if !nonempty(&self.src4[r]) && !nonempty(&self.src6[r]) {
            return Some("no source address satisfies it");
        }
        if !nonempty(&self.dst4[r]) && !nonempty(&self.dst6[r]) {
            return Some("no destination address satisfies it");
        }
        if !v4 && !v6 {
            return Some(
                "its source and destination conditions are for different address families",
            );
        }
        if !nonempty(&self.l4[r]) {
            return Some("no protocol and port satisfies it");
        }
        if self.identity.as_ref().is_some_and(|id| !nonempty(&id[r])) {
            return Some("no identity satisfies it");
        }
        if !nonempty(&self.country[r]) {
            return Some("no destination country satisfies it");
        }
        None
    }

    /// Whether every flow rule `a` matches is matched by rule `b`.
    fn covered(&self, a: usize, b: usize) -> bool {
        let identity = match &self.identity {
            Some(id) => subset(&id[a], &id[b]),
            // Too many names to enumerate: only rules that ignore identities
            // can be compared.
            None => self.identity_free[a] && self.identity_free[b],
        };
        identity
            && subset(&self.l4[a], &self.l4[b])
            && subset(&self.country[a], &self.country[b])
            // Per family: what `a` accepts of IPv4 flows, `b` must too.
            && (!(nonempty(&self.src4[a]) && nonempty(&self.dst4[a]))
                || (subset(&self.src4[a], &self.src4[b]) && subset(&self.dst4[a], &self.dst4[b])))
            && (!(nonempty(&self.src6[a]) && nonempty(&self.dst6[a]))
                || (subset(&self.src6[a], &self.src6[b]) && subset(&self.dst6[a], &self.dst6[b])))
    }
}

pub fn analyze(set: &PolicySet) -> Vec<Finding> {
    let rules = rules(set);
    let universe = Universe::build(set, &rules);
    let empty: Vec<Option<&'static str>> = (0..rules.len()).map(|r| universe.empty(r)).collect();
    let mut findings = Vec::new();
    // Rules come in policy order: a policy's rules are the run after the
    // previous enabled policy's, and `earlier` holds the live rules of the
    // policies before it, in order.
    let mut start = 0;
    let mut earlier: Vec<usize> = Vec::new();
    for (index, _) in set.policies.iter().enumerate().filter(|(_, p)| p.enabled) {
        let end = start
            + rules[start..]
                .iter()
                .take_while(|r| r.policy == index)
                .count();
        let mine = start..end;
        start = end;
        let live: Vec<usize> = mine.clone().filter(|&r| empty[r].is_none()).collect();
        if live.is_empty() {
            findings.push(Finding::Unreachable {
                policy: index,
                reason: empty[mine]
                    .first()
                    .copied()
                    .flatten()
                    .unwrap_or("its condition is never true"),
            });
            continue;
        }
        let mut by = BTreeSet::new();
        let all_covered = live.iter().all(|&r| {
            earlier
                .iter()
                .find(|&&e| universe.covered(r, e))
                .map(|&e| by.insert(rules[e].policy))
                .is_some()
        });
        if all_covered {
            findings.push(Finding::Shadowed {
                policy: index,
                by: by.into_iter().collect(),
            });
        }
        earlier.extend(live);
    }
    findings
}
