//! `egress-agent import gateway-rules`: turn exported zero-trust gateway
//! egress rules into this project's policy file.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    cli::ImportArgs,
    policy::{
        self,
        expr::{self, ExprKind},
        parse::Cidr,
    },
};

/// One exported rule; fields we do not need (ids, timestamps) are ignored.
#[derive(Deserialize)]
struct Rule {
    name: String,
    #[serde(default)]
    precedence: Option<i64>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    traffic: String,
    #[serde(default)]
    identity: String,
    #[serde(default)]
    device_posture: String,
    rule_settings: RuleSettings,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct RuleSettings {
    egress: EgressSettings,
}

#[derive(Deserialize)]
struct EgressSettings {
    #[serde(default)]
    ipv4: Option<String>,
    #[serde(default)]
    ipv4_fallback: Option<String>,
    #[serde(default)]
    ipv6: Option<String>,
}

/// The export: a list of rules, or an API response with a `result` list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Export {
    List(Vec<Value>),
    Response { result: Vec<Value> },
}

fn ipv4(path: &str, text: &Option<String>) -> anyhow::Result<Option<Ipv4Addr>> {
    match text.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) => t
            .parse::<Ipv4Addr>()
            .map(Some)
            .with_context(|| format!("{path}: {t:?} is not an IPv4 address")),
    }
}

pub fn gateway_rules(args: &ImportArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let policy_file = convert(&text, args.default_ipv4, args.default_ipv6)
        .with_context(|| args.file.display().to_string())?;
    match &args.output {
        Some(path) => std::fs::write(path, &policy_file)
            .with_context(|| format!("writing {}", path.display()))?,
        None => print!("{policy_file}"),
    }
    Ok(())
}

/// Convert an export to policy-file text, validated by the policy parser.
pub fn convert(
    text: &str,
    default_ipv4: Ipv4Addr,
    default_ipv6: Option<Ipv6Addr>,
) -> anyhow::Result<String> {
    let export: Export = serde_json::from_str(text)
        .context("expected a JSON list of gateway rules, or an object whose \"result\" is one")?;
    let (raw, prefix) = match export {
        Export::List(v) => (v, ""),
        Export::Response { result } => (result, "result"),
    };
    let mut rules = Vec::with_capacity(raw.len());
    for (i, value) in raw.into_iter().enumerate() {
        let path = format!("{prefix}[{i}]");
        let rule: Rule = serde_path_to_error::deserialize(value).map_err(|e| {
            let at = e.path().to_string();
            anyhow::anyhow!(
                "{path}{}{}: {}",
                if at == "." { "" } else { "." },
                if at == "." { "" } else { at.as_str() },
                e.into_inner()
            )
        })?;
        if let Some(action) = rule.action.as_deref()
            && action != "egress"
        {
            bail!("{path}.action: {action:?} is not an egress rule");
        }
        for (field, text, kind) in [
            ("traffic", &rule.traffic, ExprKind::Traffic),
            ("identity", &rule.identity, ExprKind::Identity),
            (
                "device_posture",
                &rule.device_posture,
                ExprKind::DevicePosture,
            ),
        ] {
            if !text.trim().is_empty() {
                expr::parse(text, kind).map_err(|e| anyhow::anyhow!("{path}.{field}: {e}"))?;
            }
        }
        rules.push((path, rule));
    }
    // Lower precedence first; rules without one keep their place after.
    rules.sort_by_key(|(_, r)| r.precedence.unwrap_or(i64::MAX));

    let mut pools = Map::new();
    // Pools are keyed by what the addresses mean, not how they are spelled.
    let mut pool_of: HashMap<(Ipv4Addr, Option<Ipv4Addr>, Option<String>), String> = HashMap::new();
    let mut used_names: HashSet<String> = HashSet::new();
    let mut policies = Vec::with_capacity(rules.len());
    for (path, rule) in &rules {
        let e = &rule.rule_settings.egress;
        let at = format!("{path}.rule_settings.egress");
        let primary = ipv4(&format!("{at}.ipv4"), &e.ipv4)?;
        let fallback = ipv4(&format!("{at}.ipv4_fallback"), &e.ipv4_fallback)?;
        let v6 = match e.ipv6.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) => {
                let net: Cidr = t
                    .parse()
                    .map_err(|err: String| anyhow::anyhow!("{at}.ipv6: {err}"))?;
                Some(net.0.to_string())
            }
        };
        let egress = match primary {
            None => bail!("{at}.ipv4: missing (use 0.0.0.0 for the shared default egress)"),
            Some(a) if a.is_unspecified() => "default".to_owned(),
            Some(a) => {
                // A fallback equal to the primary is no fallback.
                let fallback = fallback.filter(|f| !f.is_unspecified() && *f != a);
                let name = pool_of.entry((a, fallback, v6.clone())).or_insert_with(|| {
                    let base = format!("egress-{a}");
                    let mut name = base.clone();
                    let mut n = 2;
                    while pools.contains_key(&name) {
                        name = format!("{base}-{n}");
                        n += 1;
                    }
                    let mut pool = Map::new();
                    let v4: Vec<String> = [Some(a), fallback]
                        .into_iter()
                        .flatten()
                        .map(|x| x.to_string())
                        .collect();
                    pool.insert("ipv4".into(), json!(v4));
                    if let Some(v6) = &v6 {
                        pool.insert("ipv6".into(), json!(v6));
                    }
                    pools.insert(name.clone(), Value::Object(pool));
                    name
                });
                name.clone()
            }
        };
        // Policy names must be unique; later duplicates get a number, one
        // that no other rule already uses.
        let mut name = rule.name.clone();
        let mut n = 2;
        while used_names.contains(&name) {
            name = format!("{} ({n})", rule.name);
            n += 1;
        }
        used_names.insert(name.clone());
        let mut policy = Map::new();
        policy.insert("name".into(), json!(name));
        if let Some(p) = rule.precedence {
            policy.insert(
                "description".into(),
                json!(format!("imported gateway rule, precedence {p}")),
            );
        }
        if !rule.enabled {
            policy.insert("enabled".into(), json!(false));
        }
        let mut any_expr = false;
        for (field, text) in [
            ("traffic", &rule.traffic),
            ("identity", &rule.identity),
            ("device_posture", &rule.device_posture),
        ] {
            if !text.trim().is_empty() {
                policy.insert(field.into(), json!(text));
                any_expr = true;
            }
        }
        if !any_expr {
            policy.insert("selector".into(), json!({}));
        }
        policy.insert("action".into(), json!({ "egress": egress }));
        policies.push(Value::Object(policy));
    }

    let mut default = Map::new();
    default.insert("ipv4".into(), json!(default_ipv4.to_string()));
    if let Some(v6) = default_ipv6 {
        default.insert("ipv6".into(), json!(v6.to_string()));
    }
    let mut file = Map::new();
    file.insert("egress_pools".into(), Value::Object(pools));
    file.insert("default_egress".into(), Value::Object(default));
    file.insert("policies".into(), Value::Array(policies));
    let text = serde_json::to_string_pretty(&Value::Object(file))? + "\n";
    // The output must be a valid policy file; say so loudly if not.
    policy::parse(&text).context("the converted rules are not a valid policy file")?;
    Ok(text)
}
