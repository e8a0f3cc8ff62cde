//! `egress-agent reload`: make the running agent re-read its files.

use hyper::Method;
use serde_json::Value;

use crate::{cli::ReloadArgs, client::Client};

pub async fn reload(args: ReloadArgs) -> anyhow::Result<()> {
    let ReloadArgs { api } = args;
    let reply = Client::new(api.api)
        .call(Method::POST, "/v1/reload", None)
        .await?;
    let number = |key: &str| reply.get(key).and_then(Value::as_u64).unwrap_or(0);
    println!(
        "reloaded: {} policies, generation {} ({} map writes, {} deletes)",
        number("policies"),
        number("generation"),
        number("writes"),
        number("deletes"),
    );
    Ok(())
}
