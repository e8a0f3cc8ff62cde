//! `egress-agent log kernel on|off`: switch the running agent's kernel log
//! records.

use hyper::Method;
use serde_json::{Value, json};

use crate::{
    cli::{LogArgs, LogCommand, OnOff},
    client::Client,
};

pub async fn log(args: LogArgs) -> anyhow::Result<()> {
    let LogArgs { api, command } = args;
    let LogCommand::Kernel { state } = command;
    let reply = Client::new(api.api)
        .call(
            Method::POST,
            "/v1/log",
            Some(json!({ "kernel": state == OnOff::On })),
        )
        .await?;
    let on = reply
        .get("kernel")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    println!("kernel log records: {}", if on { "on" } else { "off" });
    Ok(())
}
