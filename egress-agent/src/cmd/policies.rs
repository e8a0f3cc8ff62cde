//! `egress-agent policies`: the running policies with their counters.

use hyper::Method;
use serde_json::Value;

use super::table;
use crate::{cli::PoliciesArgs, client::Client};

pub async fn policies(args: PoliciesArgs) -> anyhow::Result<()> {
    let PoliciesArgs { api, json } = args;
    let reply = Client::new(api.api)
        .call(Method::GET, "/v1/policies", None)
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    print!("{}", render(&reply));
    Ok(())
}

/// One row per policy; fields the agent does not send show as `-`.
fn render(reply: &Value) -> String {
    let columns = [
        "index", "name", "enabled", "egress", "flows", "packets", "bytes",
    ];
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
        let out = render(&reply);
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
