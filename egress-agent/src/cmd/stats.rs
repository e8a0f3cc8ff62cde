//! `egress-agent stats [geo]`: the running agent's counters and country
//! databases, as indented `key: value` lines or JSON.

use std::fmt::Write as _;

use hyper::Method;
use serde_json::Value;

use crate::{
    cli::{StatsArgs, StatsCommand},
    client::Client,
};

pub async fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let StatsArgs { api, json, command } = args;
    let uri = match command {
        None => "/v1/stats",
        Some(StatsCommand::Geo) => "/v1/stats/geo",
    };
    let reply = Client::new(api.api).call(Method::GET, uri, None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        let mut out = String::new();
        plain(&reply, 0, &mut out);
        print!("{out}");
    }
    Ok(())
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
