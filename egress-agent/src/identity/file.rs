//! The identities file (`--identities FILE`): sessions known ahead of time,
//! e.g. exported from a VPN concentrator's address assignments.
//!
//! ```json
//! {"sessions": [{"id": "ana-laptop", "user": "ana@example.com",
//!   "groups": ["finance"], "posture": ["compliant"],
//!   "addresses": ["10.10.0.2", "2001:db8:10::2"],
//!   "expires_at": "2026-12-01T18:00:00Z"}]}
//! ```
//! A bare list of entries is accepted too. `id` is optional (default
//! `file:<index>`; `session load` uses `load:<index>`). Entries already expired are skipped, not rejected: a
//! static file ages.

use std::path::{Path, PathBuf};

use super::model::SessionSpec;

#[derive(Debug, thiserror::Error)]
pub enum IdentitiesError {
    #[error("reading identities file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identities file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The sessions of an identities file.
#[derive(Debug, Default)]
pub struct IdentitiesFile {
    /// `(id, spec)` in file order.
    pub sessions: Vec<(String, SessionSpec)>,
    /// Entries skipped because their `expires_at` has passed.
    pub expired: usize,
}

/// Id prefix of identities-file entries without an `id` (reserved: API
/// sessions may not use it).
pub const FILE_ID_PREFIX: &str = "file:";
/// Id prefix of `session load` entries without an `id`.
pub const LOAD_ID_PREFIX: &str = "load:";

/// Parse an identities document; `path` only names it in errors. Entries
/// without an `id` get `<id_prefix><index>`.
pub fn parse(
    path: &Path,
    text: &str,
    now: jiff::Timestamp,
    id_prefix: &str,
) -> Result<IdentitiesFile, IdentitiesError> {
    let invalid = |field: String, message: String| IdentitiesError::Invalid {
        path: path.to_path_buf(),
        field,
        message,
    };
    // Untagged enums lose serde's error paths: decide the shape first, then
    // decode with the path tracked.
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid("(document)".into(), e.to_string()))?;
    let (prefix, list) = match value {
        serde_json::Value::Object(mut o) if o.contains_key("sessions") => {
            if let Some(key) = o.keys().find(|k| *k != "sessions") {
                return Err(invalid(
                    key.clone(),
                    "unknown field; the document holds only \"sessions\"".into(),
                ));
            }
            ("sessions", o.remove("sessions").unwrap_or_default())
        }
        v @ serde_json::Value::Array(_) => ("", v),
        _ => {
            return Err(invalid(
                "(document)".into(),
                "expected {\"sessions\": [...]} or a list of sessions".into(),
            ));
        }
    };
    let serde_json::Value::Array(entries) = list else {
        return Err(invalid(prefix.into(), "expected a list of sessions".into()));
    };
    let mut out = IdentitiesFile::default();
    for (i, mut entry) in entries.into_iter().enumerate() {
        let at = |field: &str| format!("{prefix}[{i}].{field}");
        // `id` is this file's addition to the API's session body; taken out
        // first so the body decodes with exact field paths.
        let id = match entry.as_object_mut().and_then(|o| o.remove("id")) {
            None => format!("{id_prefix}{i}"),
            Some(serde_json::Value::String(id)) => id,
            Some(other) => {
                return Err(invalid(
                    at("id"),
                    format!("expected a string, found {other}"),
                ));
            }
        };
        let spec: SessionSpec = serde_path_to_error::deserialize(entry).map_err(|e| {
            let inner = e.path().to_string();
            let field = if inner == "." { String::new() } else { inner };
            invalid(
                at(&field).trim_end_matches('.').to_string(),
                e.into_inner().to_string(),
            )
        })?;
        if spec.expires_at.is_some_and(|t| t <= now) {
            out.expired += 1;
            continue;
        }
        super::model::validate_id(&id).map_err(|e| invalid(at(&e.field), e.message))?;
        spec.validate(now)
            .map_err(|e| invalid(at(&e.field), e.message))?;
        out.sessions.push((id, spec));
    }
    Ok(out)
}

/// Read and parse an identities file (see [`parse`]).
pub fn load(
    path: &Path,
    now: jiff::Timestamp,
    id_prefix: &str,
) -> Result<IdentitiesFile, IdentitiesError> {
    let text = std::fs::read_to_string(path).map_err(|source| IdentitiesError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, now, id_prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<IdentitiesFile, IdentitiesError> {
        parse(
            Path::new("ids.json"),
            text,
            jiff::Timestamp::now(),
            FILE_ID_PREFIX,
        )
    }

    #[test]
    fn identities_file_wrapped_and_bare_list_parse_default_ids() {
        let f = p(
            r#"{"sessions":[{"user":"ana@x","groups":["finance"],"addresses":["10.0.0.2"]},
                     {"id":"bo","user":"bo@x","addresses":["2001:db8::/64"]}]}"#,
        )
        .unwrap();
        assert_eq!(f.sessions[0].0, "file:0");
        assert_eq!(f.sessions[1].0, "bo");
        let f = p(r#"[{"user":"ana@x","addresses":["10.0.0.2"]}]"#).unwrap();
        assert_eq!(f.sessions.len(), 1);
    }

    #[test]
    fn identities_file_bad_entry_names_path_and_field() {
        let err = p(r#"{"sessions":[{"user":"a","addresses":["10.0.0.2"]},{"user":"b","addresses":["10.0.0.300"]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ids.json")
                && err.contains("sessions[1].addresses[0]")
                && err.contains("10.0.0.300"),
            "{err}"
        );
        let err = p(r#"{"sessions":[{"user":"a","addresses":[]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sessions[0].addresses"), "{err}");
        let err = p(r#"{"session":[]}"#).unwrap_err().to_string();
        assert!(err.contains("expected"), "{err}");
    }

    #[test]
    fn identities_file_expired_entries_skipped_and_counted() {
        let f = p(r#"[{"user":"a","addresses":["10.0.0.2"],"expires_at":"2001-01-01T00:00:00Z"},
                     {"user":"b","addresses":["10.0.0.3"],"expires_at":"2999-01-01T00:00:00+02:00"}]"#)
        .unwrap();
        assert_eq!(f.expired, 1);
        assert_eq!(f.sessions.len(), 1);
        assert_eq!(f.sessions[0].0, "file:1", "ids follow file positions");
    }
}
