//! `egress-agent policies`: the running policies with their counters; the
//! named counter slots of the pinned maps when the agent is not answering.

use anyhow::Context as _;
use hyper::Method;
use serde_json::{Value, json};

use super::table;
use crate::{
    cli::PoliciesArgs,
    client::{Client, ClientError},
    inspect::{InspectError, Pinned},
};

/// Columns of the agent's answer.
const COLUMNS: &[&str] = &[
    "index", "name", "enabled", "egress", "flows", "packets", "bytes",
];
/// Columns of the pinned maps' answer: no order or settings, only slots.
const PINNED_COLUMNS: &[&str] = &["slot", "name", "flows", "packets", "bytes"];

pub async fn policies(args: PoliciesArgs) -> anyhow::Result<()> {
    let PoliciesArgs { api, pin, json } = args;
    let (reply, columns) = match Client::new(api.api)
        .call(Method::GET, "/v1/policies", None)
        .await
    {
        Ok(reply) => (reply, COLUMNS),
        // A stopped agent (--keep-dataplane) left its maps pinned.
        Err(err @ ClientError::Connect { .. }) => {
            let reply = pinned(&Pinned::new(&pin.pin_path))
                .with_context(|| format!("{err}, and the pinned maps cannot be read"))?;
            eprintln!(
                "egress-agent: {err}; showing the policy counters of the maps pinned under {} \
                 (the running set's policies and those its last reload removed)",
                pin.pin_path.display()
            );
            (reply, PINNED_COLUMNS)
        }
        Err(err) => return Err(err.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    print!("{}", render(&reply, columns));
    Ok(())
}

/// The named policy slots with their counters.
fn pinned(pinned: &Pinned) -> Result<Value, InspectError> {
    Ok(pinned
        .policies()?
        .into_iter()
        .map(|p| {
            let t = p.stats.traffic;
            json!({
                "slot": p.slot,
                "name": p.name,
                "flows": p.stats.flows,
                "packets": t.packets_out + t.packets_in,
                "bytes": t.bytes_out + t.bytes_in,
            })
        })
        .collect())
}

/// One row per policy; fields the answer lacks show as `-`.
fn render(reply: &Value, columns: &[&str]) -> String {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    let rows: Vec<Vec<String>> = reply
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|policy| columns.iter().map(|c| text(policy.get(c))).collect())
        .collect();
    let headers: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    table::render(&headers, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_table_lists_each_policy_in_order() {
        let reply = serde_json::json!([
            {"index": 0, "name": "pt", "enabled": true, "egress": "pt-montijo", "flows": 3, "packets": 10, "bytes": 900},
            {"index": 1, "name": "catch-all", "enabled": false, "egress": "default", "flows": 0, "packets": 0, "bytes": 0},
        ]);
        let out = render(&reply, COLUMNS);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "a header and two policies: {out}");
        assert!(lines[0].starts_with("INDEX  NAME"), "{out}");
        assert!(
            lines[1].contains("pt-montijo") && lines[1].ends_with("900"),
            "{out}"
        );
        assert!(
            lines[2].contains("catch-all") && lines[2].contains("false"),
            "{out}"
        );
    }
}
