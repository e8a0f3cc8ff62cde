//! `egress-agent session add|rm|ls|load`: the running agent's sessions,
//! through its control API.

use anyhow::Context as _;
use hyper::Method;
use serde_json::{Map, Value};

use super::table;
use crate::{
    cli::{
        SessionAddArgs, SessionArgs, SessionCommand, SessionLoadArgs, SessionLsArgs, SessionRmArgs,
    },
    client::Client,
    identity::{SessionSpec, SessionView, file, model::validate_id},
};

pub async fn session(args: SessionArgs) -> anyhow::Result<()> {
    let SessionArgs { api, command } = args;
    let client = Client::new(api.api);
    match command {
        SessionCommand::Add(args) => add(&client, args).await,
        SessionCommand::Rm(args) => rm(&client, args).await,
        SessionCommand::Ls(args) => ls(&client, args).await,
        SessionCommand::Load(args) => load(&client, args).await,
    }
}

/// The URL of a session; the id is checked first so that an id with a `/`
/// is refused by name rather than reaching another route.
pub(super) fn session_uri(id: &str) -> anyhow::Result<String> {
    validate_id(id)?;
    Ok(format!("/v1/sessions/{id}"))
}

async fn add(client: &Client, args: SessionAddArgs) -> anyhow::Result<()> {
    let SessionAddArgs {
        id,
        user,
        groups,
        posture,
        addresses,
        expires_at,
        ttl,
    } = args;
    let expires_at = match (expires_at, ttl) {
        (Some(at), _) => Some(at),
        (None, Some(ttl)) => Some(
            jiff::Timestamp::now()
                .checked_add(*ttl)
                .with_context(|| format!("--ttl {ttl} is too far in the future"))?,
        ),
        (None, None) => None,
    };
    let spec = SessionSpec {
        user,
        groups: groups.into_iter().collect(),
        posture: posture.into_iter().collect(),
        addresses,
        expires_at,
    };
    let uri = session_uri(&id)?;
    let reply = client
        .call(Method::PUT, &uri, Some(serde_json::to_value(&spec)?))
        .await?;
    let view: SessionView = serde_json::from_value(reply).context("reading the agent's answer")?;
    println!("session {} set", view.id);
    print!("{}", render(&[view]));
    Ok(())
}

async fn rm(client: &Client, args: SessionRmArgs) -> anyhow::Result<()> {
    let SessionRmArgs { id } = args;
    client
        .call(Method::DELETE, &session_uri(&id)?, None)
        .await?;
    println!("session {id} removed");
    Ok(())
}

async fn ls(client: &Client, args: SessionLsArgs) -> anyhow::Result<()> {
    let SessionLsArgs { json } = args;
    let reply = client.call(Method::GET, "/v1/sessions", None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let sessions: Vec<SessionView> =
        serde_json::from_value(reply).context("reading the agent's session list")?;
    print!("{}", render(&sessions));
    Ok(())
}

async fn load(client: &Client, args: SessionLoadArgs) -> anyhow::Result<()> {
    let SessionLoadArgs { file: path, json } = args;
    // The identities file's own parser: the same format, checked with the
    // same field paths before anything is sent.
    let parsed = file::load(&path, jiff::Timestamp::now(), file::LOAD_ID_PREFIX)?;
    let count = parsed.sessions.len();
    let entries = parsed
        .sessions
        .into_iter()
        .map(|(id, spec)| {
            let mut entry = Map::new();
            entry.insert("id".to_owned(), Value::String(id));
            let Value::Object(fields) = serde_json::to_value(&spec)? else {
                unreachable!("a session spec serialises as an object")
            };
            entry.extend(fields);
            Ok(Value::Object(entry))
        })
        .collect::<Result<Vec<_>, serde_json::Error>>()?;
    let report = client
        .call(Method::POST, "/v1/sessions", Some(Value::Array(entries)))
        .await?;
    if json {
        println!("{report}");
        return Ok(());
    }
    let number = |key: &str| report.get(key).and_then(Value::as_u64).unwrap_or(0);
    println!(
        "{}: {count} sessions loaded ({} added, {} replaced) in {} ms",
        path.display(),
        number("added"),
        number("replaced"),
        number("elapsed_ms"),
    );
    if parsed.expired > 0 {
        println!("{} expired entries skipped", parsed.expired);
    }
    Ok(())
}

/// The session table of `session ls`.
fn render(sessions: &[SessionView]) -> String {
    let join = |items: &mut dyn Iterator<Item = String>| items.collect::<Vec<_>>().join(",");
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.spec.user.clone(),
                join(&mut s.spec.groups.iter().cloned()),
                join(&mut s.spec.posture.iter().cloned()),
                join(&mut s.spec.addresses.iter().map(ToString::to_string)),
                s.spec
                    .expires_at
                    .map_or_else(|| "never".to_owned(), |t| t.to_string()),
                serde_json::to_value(s.origin)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table::render(
        &[
            "ID",
            "USER",
            "GROUPS",
            "POSTURE",
            "ADDRESSES",
            "EXPIRES",
            "ORIGIN",
        ],
        &rows,
    )
}
