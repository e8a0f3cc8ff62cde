//! `egress-agent stats [geo]`: the running agent's counters and country
//! databases, as indented `key: value` lines or JSON; the counters of the
//! pinned maps when the agent is not answering.

use std::fmt::Write as _;

use anyhow::Context as _;
use hyper::Method;
use serde_json::{Value, json};

use crate::{
    cli::{StatsArgs, StatsCommand},
    client::{Client, ClientError},
    inspect::{InspectError, Pinned},
};

pub async fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let StatsArgs {
        api,
        pin,
        json,
        command,
    } = args;
    let uri = match command {
        None => "/v1/stats",
        Some(StatsCommand::Geo) => "/v1/stats/geo",
    };
    let reply = match Client::new(api.api).call(Method::GET, uri, None).await {
        Ok(reply) => reply,
        // A stopped agent (--keep-dataplane) left its maps pinned.
        Err(err @ ClientError::Connect { .. }) if command.is_none() => {
            let reply = pinned(&Pinned::new(&pin.pin_path))
                .with_context(|| format!("{err}, and the pinned maps cannot be read"))?;
            eprintln!(
                "egress-agent: {err}; showing the counters of the maps pinned under {}",
                pin.pin_path.display()
            );
            reply
        }
        Err(err) => return Err(err.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        let mut out = String::new();
        plain(&reply, 0, &mut out);
        print!("{out}");
    }
    Ok(())
}

/// The counters of the pinned maps, shaped as the agent's `/v1/stats`
/// (without what only the agent knows: sessions, identities, policies).
fn pinned(pinned: &Pinned) -> Result<Value, InspectError> {
    let counters: serde_json::Map<String, Value> = pinned
        .counters()?
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.into()))
        .collect();
    let addresses: Vec<Value> = pinned
        .addresses()?
        .into_iter()
        .map(|a| {
            let t = a.stats.traffic;
            json!({
                "address": a.name,
                "flows": a.stats.flows,
                "exhausted": a.stats.exhausted,
                "traffic": {
                    "packets_out": t.packets_out,
                    "bytes_out": t.bytes_out,
                    "packets_in": t.packets_in,
                    "bytes_in": t.bytes_in,
                },
            })
        })
        .collect();
    let census = pinned.census()?;
    Ok(json!({
        "counters": counters,
        "egress_addresses": addresses,
        "active_flows": census.flows4 + census.flows6,
        "pin_path": pinned.root(),
    }))
}

/// Objects and lists as indented `key: value` lines (list items keyed by
/// `[index]`), strings unquoted.
fn plain(value: &Value, depth: usize, out: &mut String) {
    let entries: Vec<(String, &Value)> = match value {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("[{i}]"), v))
            .collect(),
        scalar => {
            let _ = writeln!(
                out,
                "{:indent$}{}",
                "",
                scalar_text(scalar),
                indent = depth * 2
            );
            return;
        }
    };
    for (key, v) in entries {
        let pad = depth * 2;
        match v {
            Value::Object(m) if !m.is_empty() => {
                let _ = writeln!(out, "{:pad$}{key}:", "");
                plain(v, depth + 1, out);
            }
            Value::Array(a) if !a.is_empty() => {
                let _ = writeln!(out, "{:pad$}{key}:", "");
                plain(v, depth + 1, out);
            }
            _ => {
                let _ = writeln!(out, "{:pad$}{key}: {}", "", scalar_text(v));
            }
        }
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Object(_) => "{}".to_owned(),
        Value::Array(_) => "[]".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_plain_nests_objects_and_lists() {
        let value = serde_json::json!({
            "flows": 3,
            "geo": {"files": ["a.mmdb"], "loaded": true, "empty": {}},
            "name": "x"
        });
        let mut out = String::new();
        plain(&value, 0, &mut out);
        assert_eq!(
            out,
            "flows: 3\ngeo:\n  files:\n    [0]: a.mmdb\n  loaded: true\n  empty: {}\nname: x\n"
        );
    }
}
