//! Request bodies: JSON decoded from the raw bytes so that a refusal names
//! the field path (`addresses[0]`, `[3].user`), which axum's `Json`
//! extractor does not, and checked as far as a body can be alone. Pure
//! functions of the bytes, so the handlers and the fuzz targets share them.

use std::collections::{BTreeSet, HashSet};

use serde::Deserialize;
use serde_json::{Value, value::RawValue};
use serde_path_to_error::{Path as FieldPath, Segment};

use crate::{
    control::{ControlError, SessionEntry},
    identity::{SessionSpec, model::validate_id},
};

/// Body of `PUT /v1/sessions/{id}`: one session, checked as far as it can
/// be alone (the agent checks what needs the others: overlaps, capacity).
pub fn session(bytes: &[u8], now: jiff::Timestamp) -> Result<SessionSpec, ControlError> {
    let spec: SessionSpec = parse(bytes)?;
    spec.validate(now)?;
    Ok(spec)
}

/// Body of `POST /v1/sessions`: a batch with distinct, valid ids, every
/// session checked as [`session`] checks one.
pub fn sessions(bytes: &[u8], now: jiff::Timestamp) -> Result<Vec<SessionEntry>, ControlError> {
    let sessions = parse_batch(bytes)?;
    let mut seen = HashSet::with_capacity(sessions.len());
    for (i, entry) in sessions.iter().enumerate() {
        validate_id(&entry.id)
            .map_err(|e| ControlError::unprocessable(Some(format!("[{i}].id")), e.message))?;
        if !seen.insert(entry.id.as_str()) {
            return Err(ControlError::unprocessable(
                Some(format!("[{i}].id")),
                format!("{:?} appears earlier in the batch", entry.id),
            ));
        }
        entry.spec.validate(now).map_err(|e| {
            ControlError::unprocessable(Some(format!("[{i}].{}", e.field)), e.message)
        })?;
    }
    Ok(sessions)
}

/// Body of `PUT /v1/sessions/{id}/posture`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostureBody {
    posture: BTreeSet<String>,
}

/// Body of `PUT /v1/sessions/{id}/posture`: the new posture tags.
pub fn posture(bytes: &[u8]) -> Result<BTreeSet<String>, ControlError> {
    let PostureBody { posture } = parse(bytes)?;
    Ok(posture)
}

/// Body of `POST /v1/log`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogBody {
    kernel: bool,
}

/// Body of `POST /v1/log`: whether the kernel log is to be on.
pub fn log(bytes: &[u8]) -> Result<bool, ControlError> {
    let LogBody { kernel } = parse(bytes)?;
    Ok(kernel)
}

/// Decode a whole body as `T`.
fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ControlError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| refusal("", e.path(), &e.inner().to_string()))?;
    // Trailing bytes after the value are an error too, as in `from_slice`.
    de.end()
        .map_err(|e| ControlError::bad_request(None, e.to_string()))?;
    Ok(value)
}

/// Decode a batch: a list of session specs, each with an `id`.
///
/// `SessionEntry` flattens the spec, and serde neither keeps the field path
/// nor honours `deny_unknown_fields` through `flatten`; so each entry is
/// split here, one at a time (the list itself stays raw text, which keeps a
/// 100 000-entry batch from being held twice as a `Value` tree).
fn parse_batch(bytes: &[u8]) -> Result<Vec<SessionEntry>, ControlError> {
    let raw: Vec<&RawValue> = parse(bytes)?;
    raw.iter()
        .enumerate()
        .map(|(i, entry)| {
            let at = format!("[{i}]");
            let mut fields: serde_json::Map<String, Value> = parse(entry.get().as_bytes())
                .map_err(|e| ControlError {
                    field: Some(e.field.map_or_else(|| at.clone(), |f| format!("{at}.{f}"))),
                    ..e
                })?;
            let id = match fields.remove("id") {
                Some(Value::String(id)) => id,
                Some(other) => {
                    return Err(ControlError::bad_request(
                        Some(format!("{at}.id")),
                        format!("must be a string, not {other}"),
                    ));
                }
                None => {
                    return Err(ControlError::bad_request(
                        Some(format!("{at}.id")),
                        "missing field `id`",
                    ));
                }
            };
            let spec: SessionSpec = serde_path_to_error::deserialize(Value::Object(fields))
                .map_err(|e| refusal(&at, e.path(), &e.inner().to_string()))?;
            Ok(SessionEntry { id, spec })
        })
        .collect()
}

/// A 400 naming the field at `prefix` + `path`; a missing field is named
/// itself rather than its parent.
fn refusal(prefix: &str, path: &FieldPath, message: &str) -> ControlError {
    let mut field = prefix.to_owned();
    for segment in path {
        match segment {
            Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(key);
            }
            // Syntax errors have no position in the value tree.
            Segment::Unknown => {}
        }
    }
    if let Some(name) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(name);
    }
    ControlError::bad_request((!field.is_empty()).then_some(field), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of<T: for<'a> Deserialize<'a> + std::fmt::Debug>(json: &str) -> Option<String> {
        parse::<T>(json.as_bytes()).unwrap_err().field
    }

    #[test]
    fn api_body_bad_json_names_field_path() {
        let cases = [
            (r#"{"user":"a","addresses":["ten"]}"#, Some("addresses[0]")),
            (r#"{"user":"a","addresses":[],"group":[]}"#, Some("group")),
            (r#"{"user":"a"}"#, Some("addresses")),
            (r#"{"user":"a","#, None),
            (r#"{"user":"a","addresses":[]} x"#, None),
        ];
        for (json, field) in cases {
            assert_eq!(
                field_of::<SessionSpec>(json).as_deref(),
                field,
                "field named for {json}"
            );
        }
    }

    #[test]
    fn api_batch_bad_entry_names_index_and_field() {
        let ok = r#"{"id":"a","user":"u","addresses":["10.0.0.1"]}"#;
        let cases = [
            (
                r#"{"id":"b","user":"u","addresses":["ten"]}"#,
                "[1].addresses[0]",
            ),
            (r#"{"id":"b","user":"u","addresses":[],"x":1}"#, "[1].x"),
            (r#"{"user":"u","addresses":[]}"#, "[1].id"),
            (r#"{"id":2,"user":"u","addresses":[]}"#, "[1].id"),
            (r#"{"id":"b","addresses":[]}"#, "[1].user"),
            (r#"[]"#, "[1]"),
        ];
        for (bad, field) in cases {
            let json = format!("[{ok},{bad}]");
            let err = parse_batch(json.as_bytes()).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{json}: {err}");
            assert_eq!(err.status, 400);
        }
        let good = parse_batch(format!("[{ok}]").as_bytes()).unwrap();
        assert_eq!(good[0].id, "a");
        assert_eq!(good[0].spec.user, "u");
    }
}
