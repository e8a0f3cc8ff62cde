//! The uplinks the agent attaches to (`--uplink`, repeatable), and the
//! check that every pool naming an `interface` names one of them: the
//! policy file alone cannot know the agent's uplinks, so `check` only
//! checks the name's syntax and the running agent checks this at start and
//! at every reload.

use crate::policy::model::PolicySet;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UplinkError {
    #[error(
        "egress_pools.{pool}.interface: {interface:?} is not one of the agent's uplinks ({list})",
        list = .uplinks.join(", ")
    )]
    NotAnUplink {
        pool: String,
        interface: String,
        uplinks: Vec<String>,
    },
    #[error("--uplink {iface} is given twice")]
    Duplicate { iface: String },
}

/// The uplinks as given, each once: attaching twice to one interface would
/// run the programs twice on each of its packets.
pub fn distinct(uplinks: &[String]) -> Result<(), UplinkError> {
    for (i, iface) in uplinks.iter().enumerate() {
        if uplinks[..i].contains(iface) {
            return Err(UplinkError::Duplicate {
                iface: iface.clone(),
            });
        }
    }
    Ok(())
}

/// Every pool's `interface` is one of `uplinks`: a redirect to any other
/// interface would leave from where no program restores the replies.
pub fn check(set: &PolicySet, uplinks: &[String]) -> Result<(), UplinkError> {
    for pool in &set.pools {
        if let Some(interface) = &pool.interface
            && !uplinks.contains(interface)
        {
            return Err(UplinkError::NotAnUplink {
                pool: pool.name.clone(),
                interface: interface.clone(),
                uplinks: uplinks.to_vec(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse::parse;

    fn set(interface: &str) -> PolicySet {
        parse(&format!(
            r#"{{
                "egress_pools": {{
                    "home": {{ "ipv4": ["203.0.113.10"] }},
                    "far": {{ "ipv4": ["198.51.100.201"], "interface": "{interface}" }}
                }},
                "default_egress": {{ "ipv4": "203.0.113.1" }},
                "policies": [
                    {{ "name": "far", "selector": {{ "dst": ["192.0.2.0/24"] }}, "action": {{ "egress": "far" }} }}
                ]
            }}"#
        ))
        .expect("the test policy parses")
    }

    fn uplinks(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn uplinks_pool_interface_among_uplinks_accepted() {
        assert_eq!(check(&set("up1"), &uplinks(&["up0", "up1"])), Ok(()));
    }

    #[test]
    fn uplinks_pool_interface_not_an_uplink_rejected_with_path() {
        let err = check(&set("eth7"), &uplinks(&["up0", "up1"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "egress_pools.far.interface: \"eth7\" is not one of the agent's uplinks (up0, up1)",
            "the error names the field and the uplinks there are"
        );
    }

    #[test]
    fn uplinks_given_twice_rejected() {
        assert_eq!(distinct(&uplinks(&["up0", "up1"])), Ok(()));
        assert_eq!(
            distinct(&uplinks(&["up0", "up1", "up0"])),
            Err(UplinkError::Duplicate {
                iface: "up0".into()
            })
        );
    }
}
