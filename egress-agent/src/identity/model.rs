//! Sessions: who is behind which source addresses, as the identities file
//! and the control API state it, and the checks every session passes
//! before it reaches the dataplane.

use std::{collections::BTreeSet, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::policy::model::Identity;

/// Addresses one session may claim.
pub const MAX_SESSION_ADDRESSES: usize = 256;
/// Longest session id, user name, group or posture tag.
pub const MAX_NAME_LEN: usize = 256;

/// A source address or prefix a session claims. Written as an address
/// (`10.0.0.2`, `2001:db8::2`) or a prefix (`10.8.0.0/24`); a prefix must
/// not have host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim(pub IpNet);

impl FromStr for Claim {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<IpAddr>() {
            return Ok(Self(IpNet::from(addr)));
        }
        let net: IpNet = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or prefix"))?;
        if net.trunc() != net {
            return Err(format!(
                "{s:?} has host bits set (the prefix is {})",
                net.trunc()
            ));
        }
        Ok(Self(net))
    }
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpNet::V4(n) if n.prefix_len() == 32 => write!(f, "{}", n.addr()),
            IpNet::V6(n) if n.prefix_len() == 128 => write!(f, "{}", n.addr()),
            net => write!(f, "{net}"),
        }
    }
}

impl Serialize for Claim {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Claim {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a session says: the body of `PUT /v1/sessions/{id}` and one entry
/// of the identities file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    /// User name, normally an e-mail address (compared in lower case).
    pub user: String,
    #[serde(default)]
    pub groups: BTreeSet<String>,
    /// Posture checks the device currently passes.
    #[serde(default)]
    pub posture: BTreeSet<String>,
    /// Source addresses or prefixes of the user's devices.
    pub addresses: Vec<Claim>,
    /// When the agent removes the session (RFC 3339); never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<jiff::Timestamp>,
}

/// Where a session came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The identities file (replaced as a whole when the file is reloaded).
    File,
    /// The control API.
    Api,
}

/// A rejected session: the field at fault and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Path of the field (`addresses[2]`, `expires_at`, `id`).
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Check a session id: 1 to 256 characters of letters, digits and `._:@-`.
pub fn validate_id(id: &str) -> Result<(), SpecError> {
    if id.is_empty() || id.len() > MAX_NAME_LEN {
        return Err(SpecError::new(
            "id",
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._:@-".contains(*c)))
    {
        return Err(SpecError::new(
            "id",
            format!("{id:?} contains {c:?}; use letters, digits and . _ : @ -"),
        ));
    }
    Ok(())
}

fn check_name(field: &str, value: &str) -> Result<(), SpecError> {
    if value.trim().is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(SpecError::new(
            field,
            format!("is {} bytes long; the limit is {MAX_NAME_LEN}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(SpecError::new(
            field,
            format!("{value:?} contains a control character"),
        ));
    }
    Ok(())
}

impl SessionSpec {
    /// Check every field; `now` decides whether `expires_at` is past.
    pub fn validate(&self, now: jiff::Timestamp) -> Result<(), SpecError> {
        check_name("user", &self.user)?;
        for (i, g) in self.groups.iter().enumerate() {
            check_name(&format!("groups[{i}]"), g)?;
        }
        for (i, p) in self.posture.iter().enumerate() {
            check_name(&format!("posture[{i}]"), p)?;
        }
        if self.addresses.is_empty() {
            return Err(SpecError::new(
                "addresses",
                "a session needs at least one address",
            ));
        }
        if self.addresses.len() > MAX_SESSION_ADDRESSES {
            return Err(SpecError::new(
                "addresses",
                format!(
                    "{} addresses; a session may claim at most {MAX_SESSION_ADDRESSES}",
                    self.addresses.len()
                ),
            ));
        }
        for (i, a) in self.addresses.iter().enumerate() {
            if let Some((j, b)) = self.addresses[..i]
                .iter()
                .enumerate()
                .find(|(_, b)| b.0.contains(&a.0) || a.0.contains(&b.0))
            {
                return Err(SpecError::new(
                    format!("addresses[{i}]"),
                    format!("{a} overlaps addresses[{j}] ({b})"),
                ));
            }
        }
        if let Some(t) = self.expires_at
            && t <= now
        {
            return Err(SpecError::new(
                "expires_at",
                format!("{t} is not in the future"),
            ));
        }
        Ok(())
    }

    /// The identity policies see (user compared in lower case).
    pub fn identity(&self) -> Identity {
        Identity {
            user: self.user.to_lowercase(),
            groups: self.groups.clone(),
            posture: self.posture.clone(),
        }
    }
}

/// A live session, as the API lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub id: String,
    #[serde(flatten)]
    pub spec: SessionSpec,
    pub origin: Origin,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(addrs: &[&str]) -> SessionSpec {
        SessionSpec {
            user: "ana@example.com".into(),
            groups: ["finance".to_string()].into(),
            posture: BTreeSet::new(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            expires_at: None,
        }
    }

    #[test]
    fn session_claim_address_or_prefix_parses_host_bits_rejected() {
        assert_eq!(
            "10.0.0.2".parse::<Claim>().unwrap().0,
            "10.0.0.2/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            "2001:db8::/64".parse::<Claim>().unwrap().to_string(),
            "2001:db8::/64"
        );
        let err = "10.0.0.1/24".parse::<Claim>().unwrap_err();
        assert!(err.contains("host bits"), "{err}");
        assert!("ten".parse::<Claim>().is_err());
    }

    #[test]
    fn session_validate_overlap_and_past_expiry_name_the_field() {
        let now = jiff::Timestamp::now();
        assert_eq!(spec(&["10.0.0.2", "2001:db8::2"]).validate(now), Ok(()));
        let err = spec(&["10.0.0.0/24", "10.0.0.7"])
            .validate(now)
            .unwrap_err();
        assert_eq!(err.field, "addresses[1]", "{err}");
        let mut s = spec(&["10.0.0.2"]);
        s.expires_at = Some(now - jiff::SignedDuration::from_secs(1));
        assert_eq!(s.validate(now).unwrap_err().field, "expires_at");
        let mut s = spec(&["10.0.0.2"]);
        s.user = " ".into();
        assert_eq!(s.validate(now).unwrap_err().field, "user");
        assert!(validate_id("laptop-1@vpn").is_ok());
        assert_eq!(validate_id("a/b").unwrap_err().field, "id");
    }

    #[test]
    fn session_spec_json_unknown_field_rejected() {
        let err = serde_json::from_str::<SessionSpec>(
            r#"{"user":"a","addresses":["10.0.0.2"],"group":["x"]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("group"), "{err}");
    }
}
