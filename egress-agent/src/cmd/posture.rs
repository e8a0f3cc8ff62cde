//! `egress-agent posture set`: replace a running session's posture tags.

use hyper::Method;
use serde_json::json;

use super::session::session_uri;
use crate::{
    cli::{PostureArgs, PostureCommand, PostureSetArgs},
    client::Client,
};

pub async fn posture(args: PostureArgs) -> anyhow::Result<()> {
    let PostureArgs { api, command } = args;
    let client = Client::new(api.api);
    match command {
        PostureCommand::Set(args) => set(&client, args).await,
    }
}

async fn set(client: &Client, args: PostureSetArgs) -> anyhow::Result<()> {
    let PostureSetArgs { id, tags } = args;
    let uri = format!("{}/posture", session_uri(&id)?);
    client
        .call(Method::PUT, &uri, Some(json!({ "posture": tags })))
        .await?;
    if tags.is_empty() {
        println!("session {id}: posture cleared");
    } else {
        println!("session {id}: posture {}", tags.join(","));
    }
    Ok(())
}
