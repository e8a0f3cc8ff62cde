//! The live sessions, the identity ids the dataplane knows them by, and
//! which session owns each source address.
//!
//! Sessions that share a user, groups and posture share one identity id, so
//! the identity class table grows with distinct identities, not devices.
//! Every change is checked whole first ([`Registry::prepare`]) and then
//! committed ([`Registry::commit`]), which yields the exact map writes it
//! needs: a rejected change leaves nothing half-applied.

use std::collections::{BTreeMap, HashMap, HashSet};

use egress_common::classify::IdentityRef;
use ipnet::IpNet;

use super::model::{Origin, SessionSpec, SessionView, SpecError, validate_id};
use crate::{control::ControlError, policy::model::Identity};

/// The per-user key that keeps a user on one IPv6 egress address across
/// sessions, reloads and restarts: FNV-1a of the lower-case user name.
pub fn identity_key(user: &str) -> u32 {
    user.to_lowercase().bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[derive(Clone, Debug)]
struct Session {
    spec: SessionSpec,
    origin: Origin,
    /// Identity id, and the identity it stands for.
    identity: u32,
    who: Identity,
}

/// Capacities the registry enforces (the dataplane's map sizes).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_sessions: usize,
    /// Identity ids available (id 0, "none", excluded).
    pub max_identities: u32,
    /// Prefixes each identity trie (IPv4, IPv6) holds.
    pub max_prefixes: usize,
}

/// A checked change, not yet applied.
#[derive(Debug, Default)]
pub struct Pending {
    upserts: Vec<(String, SessionSpec, Origin)>,
    /// The identity of each upsert, computed once.
    identities: Vec<Identity>,
    removals: Vec<String>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

/// The map writes a committed change needs, in the order they must happen:
/// class rows for new identity ids first (so no address ever points at an
/// id without a class), then address entries, then removals.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub new_identities: Vec<(u32, Identity)>,
    pub insert: Vec<(IpNet, IdentityRef)>,
    pub remove: Vec<IpNet>,
    pub added: usize,
    pub replaced: usize,
    pub removed: usize,
}

/// Who owns which addresses: disjoint intervals per family.
#[derive(Default)]
struct Claims {
    v4: BTreeMap<u128, (u128, String)>,
    v6: BTreeMap<u128, (u128, String)>,
}

fn bounds(net: &IpNet) -> (bool, u128, u128) {
    match net {
        IpNet::V4(n) => (
            false,
            u32::from(n.network()).into(),
            u32::from(n.broadcast()).into(),
        ),
        IpNet::V6(n) => (true, n.network().into(), n.broadcast().into()),
    }
}

impl Claims {
    fn side(&self, v6: bool) -> &BTreeMap<u128, (u128, String)> {
        if v6 { &self.v6 } else { &self.v4 }
    }

    /// A session other than the ones `skip` accepts that claims part of `net`.
    fn owner_overlapping(&self, net: &IpNet, skip: impl Fn(&str) -> bool) -> Option<&str> {
        let (v6, start, end) = bounds(net);
        // Intervals are disjoint, so sorted by start they are sorted by end
        // too: walking back from `end`, the first one ending before `start`
        // ends the search.
        self.side(v6)
            .range(..=end)
            .rev()
            .take_while(|(_, (e, _))| *e >= start)
            .map(|(_, (_, owner))| owner.as_str())
            .find(|owner| !skip(owner))
    }

    fn insert(&mut self, net: &IpNet, owner: &str) {
        let (v6, start, end) = bounds(net);
        let side = if v6 { &mut self.v6 } else { &mut self.v4 };
        side.insert(start, (end, owner.to_string()));
    }

    fn remove(&mut self, net: &IpNet) {
        let (v6, start, _) = bounds(net);
        let side = if v6 { &mut self.v6 } else { &mut self.v4 };
        side.remove(&start);
    }
}

/// Sessions and identity ids.
pub struct Registry {
    limits: Limits,
    sessions: HashMap<String, Session>,
    claims: Claims,
    /// Identity -> (id, sessions using it).
    ids: HashMap<Identity, (u32, usize)>,
    /// Identity of each id (index `id - 1`); `None` when free.
    slots: Vec<Option<Identity>>,
    free: Vec<u32>,
    /// Ids freed by the last commit: reusable only from the next one, after
    /// the addresses that pointed at them have been rewritten.
    cooling: Vec<u32>,
}

impl Registry {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            sessions: HashMap::new(),
            claims: Claims::default(),
            ids: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            cooling: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Distinct identities in use.
    pub fn identity_count(&self) -> usize {
        self.ids.len()
    }

    /// The user behind an identity id the dataplane recorded for a flow
    /// (`None` for 0, "no identity", and for ids no longer in use).
    pub fn user_of(&self, identity_id: u32) -> Option<&str> {
        let index = identity_id.checked_sub(1)? as usize;
        self.slots.get(index)?.as_ref().map(|i| i.user.as_str())
    }

    /// Identity of every id, index `id - 1` (a free id holds an identity
    /// that nothing points at), for compiling the identity class table.
    pub fn identities(&self) -> Vec<Identity> {
        self.slots
            .iter()
            .map(|s| s.clone().unwrap_or_default())
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<SessionView> {
        self.sessions.get(id).map(|s| SessionView {
            id: id.to_string(),
            spec: s.spec.clone(),
            origin: s.origin,
        })
    }

    /// Every session, sorted by id.
    pub fn list(&self) -> Vec<SessionView> {
        let mut ids: Vec<&String> = self.sessions.keys().collect();
        ids.sort();
        ids.into_iter().filter_map(|id| self.get(id)).collect()
    }

    /// Ids of sessions from `origin`.
    pub fn ids_of(&self, origin: Origin) -> Vec<String> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.origin == origin)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Sessions whose `expires_at` is at or before `now`.
    pub fn expired(&self, now: jiff::Timestamp) -> Vec<String> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.spec.expires_at.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Check adding or replacing `upserts` and removing `removals`, as one
    /// change. `field_prefix` names an upsert's position in error messages
    /// (`sessions[3].addresses[0]`); `None` for a single session.
    pub fn prepare(
        &self,
        upserts: Vec<(String, SessionSpec, Origin)>,
        removals: Vec<String>,
        now: jiff::Timestamp,
        batch: bool,
    ) -> Result<Pending, ControlError> {
        let field = |i: usize, f: &str| {
            if batch {
                format!("[{i}].{f}")
            } else {
                f.to_string()
            }
        };
        let removed: HashSet<&str> = removals.iter().map(String::as_str).collect();
        for id in &removals {
            if !self.sessions.contains_key(id) {
                return Err(ControlError::not_found(format!("no session {id:?}")));
            }
        }
        // Sessions the change replaces give up their addresses.
        let replaced: HashSet<&str> = upserts.iter().map(|(id, _, _)| id.as_str()).collect();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut batch_claims = Claims::default();
        for (i, (id, spec, _)) in upserts.iter().enumerate() {
            validate_id(id).map_err(|e| prefixed(e, &field(i, "")))?;
            if let Some(j) = seen.insert(id, i) {
                return Err(ControlError::bad_request(
                    Some(field(i, "id")),
                    format!("session {id:?} appears twice in the batch (also at [{j}])"),
                ));
            }
            spec.validate(now).map_err(|e| prefixed(e, &field(i, "")))?;
            for (k, claim) in spec.addresses.iter().enumerate() {
                let at = field(i, &format!("addresses[{k}]"));
                if let Some(owner) = self
                    .claims
                    .owner_overlapping(&claim.0, |o| removed.contains(o) || replaced.contains(o))
                {
                    return Err(ControlError::conflict(
                        Some(at),
                        format!("{claim} overlaps an address of live session {owner:?}"),
                    ));
                }
                if let Some(owner) = batch_claims.owner_overlapping(&claim.0, |_| false) {
                    return Err(ControlError::conflict(
                        Some(at),
                        format!(
                            "{claim} overlaps an address of session {owner:?} in the same batch"
                        ),
                    ));
                }
            }
            for claim in &spec.addresses {
                batch_claims.insert(&claim.0, id);
            }
        }

        // A session given again unchanged (a reloaded identities file
        // repeats every one) stays as it is: replacing it would rewrite its
        // addresses and identity for nothing.
        let upserts: Vec<(String, SessionSpec, Origin)> = upserts
            .into_iter()
            .filter(|(id, spec, origin)| {
                !self
                    .sessions
                    .get(id)
                    .is_some_and(|s| s.spec == *spec && s.origin == *origin)
            })
            .collect();

        // Capacities after the change.
        let gone: HashSet<&str> = removals
            .iter()
            .map(String::as_str)
            .chain(upserts.iter().map(|(id, _, _)| id.as_str()))
            .filter(|id| self.sessions.contains_key(*id))
            .collect();
        let sessions_after = self.sessions.len() - gone.len() + upserts.len();
        if sessions_after > self.limits.max_sessions {
            return Err(ControlError::unprocessable(
                None,
                format!(
                    "the change would leave {sessions_after} sessions; the agent holds at most {} (--max-sessions)",
                    self.limits.max_sessions
                ),
            ));
        }
        let identities: Vec<Identity> =
            upserts.iter().map(|(_, spec, _)| spec.identity()).collect();
        let mut refs: HashMap<&Identity, i64> = HashMap::new();
        let mut prefixes = [0i64; 2];
        for id in &gone {
            let s = &self.sessions[*id];
            *refs.entry(&s.who).or_default() -= 1;
            for c in &s.spec.addresses {
                prefixes[usize::from(bounds(&c.0).0)] -= 1;
            }
        }
        for ((_, spec, _), identity) in upserts.iter().zip(&identities) {
            *refs.entry(identity).or_default() += 1;
            for c in &spec.addresses {
                prefixes[usize::from(bounds(&c.0).0)] += 1;
            }
        }
        let mut distinct = self.ids.len() as i64;
        for (identity, delta) in &refs {
            let before = self.ids.get(*identity).map_or(0, |(_, n)| *n as i64);
            let after = before + delta;
            distinct += i64::from(after > 0) - i64::from(before > 0);
        }
        // Ids freed by this change are not reusable until the next one.
        let reusable = self.free.len() + self.cooling.len();
        let fresh_needed = (distinct - self.ids.len() as i64).max(0) as usize;
        let room = self.limits.max_identities as usize - self.slots.len() + reusable;
        if distinct > i64::from(self.limits.max_identities) || fresh_needed > room {
            return Err(ControlError::unprocessable(
                None,
                format!(
                    "the change would need {distinct} distinct identities (user, groups, posture); the dataplane holds {} (--max-sessions)",
                    self.limits.max_identities
                ),
            ));
        }
        let held = [self.claims.v4.len() as i64, self.claims.v6.len() as i64];
        for (family, name) in [(0, "IPv4"), (1, "IPv6")] {
            let after = held[family] + prefixes[family];
            if after > self.limits.max_prefixes as i64 {
                return Err(ControlError::unprocessable(
                    Some(field(0, "addresses")),
                    format!(
                        "the change would leave {after} {name} session addresses; the dataplane holds {}",
                        self.limits.max_prefixes
                    ),
                ));
            }
        }
        drop(refs);
        Ok(Pending {
            upserts,
            identities,
            removals,
        })
    }

    /// Identities a prepared change brings in that have no id yet.
    pub fn unknown_identities(&self, pending: &Pending) -> Vec<Identity> {
        let mut seen = HashSet::new();
        pending
            .identities
            .iter()
            .filter(|i| !self.ids.contains_key(*i) && seen.insert(*i))
            .cloned()
            .collect()
    }

    fn acquire(&mut self, identity: &Identity, change: &mut Change) -> u32 {
        if let Some((id, refs)) = self.ids.get_mut(identity) {
            *refs += 1;
            return *id;
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                self.slots.len() as u32
            }
        };
        self.slots[id as usize - 1] = Some(identity.clone());
        self.ids.insert(identity.clone(), (id, 1));
        change.new_identities.push((id, identity.clone()));
        id
    }

    fn release(&mut self, identity: &Identity) {
        if let Some((id, refs)) = self.ids.get_mut(identity) {
            *refs -= 1;
            if *refs == 0 {
                let id = *id;
                self.ids.remove(identity);
                self.slots[id as usize - 1] = None;
                self.cooling.push(id);
            }
        }
    }

    /// Apply a prepared change and return the map writes it needs.
    pub fn commit(&mut self, pending: Pending) -> Change {
        // Ids freed by the previous commit have had their addresses rewritten.
        self.free.append(&mut self.cooling);
        let mut change = Change::default();
        let mut before: HashSet<IpNet> = HashSet::new();
        let mut released = Vec::new();
        for id in &pending.removals {
            if let Some(s) = self.sessions.remove(id) {
                for c in &s.spec.addresses {
                    self.claims.remove(&c.0);
                    before.insert(c.0);
                }
                released.push(s.who);
                change.removed += 1;
            }
        }
        for ((id, spec, origin), identity) in pending.upserts.into_iter().zip(pending.identities) {
            if let Some(old) = self.sessions.remove(&id) {
                for c in &old.spec.addresses {
                    self.claims.remove(&c.0);
                    before.insert(c.0);
                }
                released.push(old.who);
                change.replaced += 1;
            } else {
                change.added += 1;
            }
            let number = self.acquire(&identity, &mut change);
            let value = IdentityRef {
                id: number,
                key: identity_key(&spec.user),
            };
            for c in &spec.addresses {
                self.claims.insert(&c.0, &id);
                change.insert.push((c.0, value));
            }
            self.sessions.insert(
                id,
                Session {
                    spec,
                    origin,
                    identity: number,
                    who: identity,
                },
            );
        }
        // Released last: a session replaced by one of the same identity keeps its id.
        for identity in &released {
            self.release(identity);
        }
        let now_claimed: HashSet<IpNet> = change.insert.iter().map(|(n, _)| *n).collect();
        change.remove = before
            .into_iter()
            .filter(|n| !now_claimed.contains(n))
            .collect();
        change
    }

    /// The identity id of a session (for tests and `session ls`).
    pub fn identity_id(&self, id: &str) -> Option<u32> {
        self.sessions.get(id).map(|s| s.identity)
    }
}

/// `e` with its field placed under `prefix` (`[3].` in a batch).
fn prefixed(e: SpecError, prefix: &str) -> ControlError {
    ControlError::unprocessable(Some(format!("{prefix}{}", e.field)), e.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_sessions: 10,
            max_identities: 4,
            max_prefixes: 8,
        }
    }

    fn spec(user: &str, posture: &[&str], addrs: &[&str]) -> SessionSpec {
        SessionSpec {
            user: user.into(),
            groups: ["eng".to_string()].into(),
            posture: posture.iter().map(|s| s.to_string()).collect(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            expires_at: None,
        }
    }

    fn put(r: &mut Registry, id: &str, s: SessionSpec) -> Result<Change, ControlError> {
        let now = jiff::Timestamp::now();
        let p = r.prepare(vec![(id.into(), s, Origin::Api)], vec![], now, false)?;
        Ok(r.commit(p))
    }

    fn remove(r: &mut Registry, id: &str) -> Result<Change, ControlError> {
        let p = r.prepare(vec![], vec![id.into()], jiff::Timestamp::now(), false)?;
        Ok(r.commit(p))
    }

    #[test]
    fn registry_same_identity_shares_id_distinct_gets_new() {
        let mut r = Registry::new(limits());
        let a = put(&mut r, "a", spec("ana@x", &["ok"], &["10.0.0.2"])).unwrap();
        assert_eq!(a.new_identities.len(), 1, "first identity gets an id");
        let b = put(&mut r, "b", spec("ANA@x", &["ok"], &["10.0.0.3"])).unwrap();
        assert!(
            b.new_identities.is_empty(),
            "same user (any case) shares it"
        );
        assert_eq!(r.identity_id("a"), r.identity_id("b"));
        let c = put(&mut r, "c", spec("ana@x", &[], &["10.0.0.4"])).unwrap();
        assert_eq!(c.new_identities.len(), 1, "another posture is another id");
        assert_eq!(
            a.insert[0].1.key, c.insert[0].1.key,
            "the IPv6 key follows the user, not the posture"
        );
    }

    #[test]
    fn registry_overlap_with_live_session_conflict_nothing_changes() {
        let mut r = Registry::new(limits());
        put(&mut r, "a", spec("ana@x", &[], &["10.0.0.0/24"])).unwrap();
        let err = put(&mut r, "b", spec("bo@x", &[], &["10.0.0.7"])).unwrap_err();
        assert_eq!(err.status, 409);
        assert_eq!(err.field.as_deref(), Some("addresses[0]"));
        assert!(err.message.contains("\"a\""), "{err:?}");
        assert_eq!(r.len(), 1, "the rejected session was not added");
        // Replacing the owner itself may reuse or shrink its addresses.
        let c = put(&mut r, "a", spec("ana@x", &[], &["10.0.0.7"])).unwrap();
        assert_eq!(c.replaced, 1);
        assert_eq!(c.remove, vec!["10.0.0.0/24".parse::<IpNet>().unwrap()]);
        put(&mut r, "b", spec("bo@x", &[], &["10.0.0.8"])).unwrap();
    }

    #[test]
    fn registry_remove_frees_addresses_and_id_reused_only_later() {
        let mut r = Registry::new(limits());
        put(
            &mut r,
            "a",
            spec("ana@x", &[], &["10.0.0.2", "2001:db8::2"]),
        )
        .unwrap();
        let first = r.identity_id("a").unwrap();
        let gone = remove(&mut r, "a").unwrap();
        assert_eq!(gone.remove.len(), 2, "both addresses leave the maps");
        assert!(gone.insert.is_empty());
        let b = put(&mut r, "b", spec("bo@x", &[], &["10.0.0.2"])).unwrap();
        assert_eq!(
            b.new_identities[0].0, first,
            "the freed id is reused by the next change"
        );
        assert_eq!(remove(&mut r, "zz").unwrap_err().status, 404);
    }

    #[test]
    fn registry_posture_change_moves_addresses_then_frees_old_id() {
        let mut r = Registry::new(limits());
        put(&mut r, "a", spec("ana@x", &["ok"], &["10.0.0.2"])).unwrap();
        let old = r.identity_id("a").unwrap();
        let c = put(&mut r, "a", spec("ana@x", &[], &["10.0.0.2"])).unwrap();
        let new = r.identity_id("a").unwrap();
        assert_ne!(old, new, "a freed id is not reused in the same change");
        assert_eq!(c.insert[0].1.id, new, "the address points at the new id");
        assert!(c.remove.is_empty(), "the address stays claimed");
        assert_eq!(r.identity_count(), 1);
    }

    #[test]
    fn registry_unchanged_session_given_again_is_kept_not_replaced() {
        let mut r = Registry::new(limits());
        put(&mut r, "a", spec("ana@x", &["ok"], &["10.0.0.2"])).unwrap();
        let id = r.identity_id("a").unwrap();
        let c = put(&mut r, "a", spec("ana@x", &["ok"], &["10.0.0.2"])).unwrap();
        assert_eq!(
            (c.added, c.replaced, c.insert.len(), c.remove.len()),
            (0, 0, 0, 0),
            "the same session again changes nothing and writes nothing"
        );
        assert_eq!(r.identity_id("a"), Some(id), "it keeps its identity id");
        let c = put(&mut r, "a", spec("ana@x", &[], &["10.0.0.2"])).unwrap();
        assert_eq!(c.replaced, 1, "a changed posture still replaces it");
    }

    #[test]
    fn registry_batch_all_or_nothing_and_limits() {
        let r = Registry::new(limits());
        let now = jiff::Timestamp::now();
        let batch = vec![
            ("a".into(), spec("a@x", &[], &["10.0.0.2"]), Origin::Api),
            ("b".into(), spec("b@x", &[], &["10.0.0.2"]), Origin::Api),
        ];
        let err = r.prepare(batch, vec![], now, true).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("[1].addresses[0]"), "{err:?}");
        assert!(r.is_empty());
        let many: Vec<_> = (0..5)
            .map(|i| {
                (
                    format!("s{i}"),
                    spec(&format!("u{i}@x"), &[], &[&format!("10.0.1.{i}")]),
                    Origin::Api,
                )
            })
            .collect();
        let err = r.prepare(many, vec![], now, true).unwrap_err();
        assert!(
            err.message.contains("distinct identities"),
            "5 users > 4 ids: {err:?}"
        );
        let dup = vec![
            ("a".into(), spec("a@x", &[], &["10.0.0.2"]), Origin::Api),
            ("a".into(), spec("a@x", &[], &["10.0.0.3"]), Origin::Api),
        ];
        assert_eq!(
            r.prepare(dup, vec![], now, true)
                .unwrap_err()
                .field
                .as_deref(),
            Some("[1].id")
        );
    }

    #[test]
    fn registry_expired_lists_sessions_past_their_time() {
        let mut r = Registry::new(limits());
        let mut s = spec("a@x", &[], &["10.0.0.2"]);
        let now = jiff::Timestamp::now();
        s.expires_at = Some(now + jiff::SignedDuration::from_secs(60));
        put(&mut r, "a", s).unwrap();
        put(&mut r, "b", spec("b@x", &[], &["10.0.0.3"])).unwrap();
        assert!(r.expired(now).is_empty());
        assert_eq!(
            r.expired(now + jiff::SignedDuration::from_secs(61)),
            vec!["a".to_string()]
        );
    }
}
