//! A client of the control API over its Unix socket: one HTTP/1.1
//! request per connection, JSON in and out, for the CLI and the tests.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, body::Bytes, header};
use hyper_util::rt::TokioIo;
use log::debug;
use tokio::net::UnixStream;

/// How long a request may take; a reload with a full country database
/// takes seconds, so this is generous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request did not get a successful answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent at {path} ({hint})")]
    Connect {
        path: PathBuf,
        hint: &'static str,
        source: io::Error,
    },
    #[error("invalid request {method} {uri}")]
    Request {
        method: Method,
        uri: String,
        source: hyper::http::Error,
    },
    #[error("{method} {uri} to the agent at {path}")]
    Exchange {
        path: PathBuf,
        method: Method,
        uri: String,
        source: hyper::Error,
    },
    #[error("the agent at {path} did not answer {method} {uri} within {after:?}")]
    Timeout {
        path: PathBuf,
        method: Method,
        uri: String,
        after: Duration,
    },
    #[error(
        "the agent at {path} answered {method} {uri} (HTTP {status}) with a body that is not JSON"
    )]
    Reply {
        path: PathBuf,
        method: Method,
        uri: String,
        status: u16,
        source: serde_json::Error,
    },
    /// The agent refused the request: its message and the field at fault.
    #[error("{}", rejected(.field, .message))]
    Rejected {
        status: u16,
        field: Option<String>,
        message: String,
    },
}

fn rejected(field: &Option<String>, message: &str) -> String {
    match field {
        Some(field) => format!("{field}: {message}"),
        None => message.to_owned(),
    }
}

/// A client of the agent listening at one socket path.
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Give up on a request after `timeout` instead of [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Send `method uri` with an optional JSON body; answers the HTTP
    /// status and the JSON body (`null` when empty), whatever the status.
    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let body = body.map(|value| {
            Bytes::from(serde_json::to_vec(&value).expect("a JSON value always serialises"))
        });
        self.request_raw(method, uri, body).await
    }

    /// Like [`Client::request`], with the body's bytes sent as they are
    /// (labelled JSON): a file forwarded unchanged, or a malformed one.
    pub async fn request_raw(
        &self,
        method: Method,
        uri: &str,
        body: Option<Bytes>,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let exchange = self.exchange(method.clone(), uri, body);
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                path: self.path.clone(),
                method: method.clone(),
                uri: uri.to_owned(),
                after: self.timeout,
            })??;
        if bytes.is_empty() {
            return Ok((status, serde_json::Value::Null));
        }
        let value = serde_json::from_slice(&bytes).map_err(|source| ClientError::Reply {
            path: self.path.clone(),
            method,
            uri: uri.to_owned(),
            status,
            source,
        })?;
        Ok((status, value))
    }

    /// Like [`Client::request`], but a status other than 2xx is an error
    /// carrying the agent's message and field.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let (status, value) = self.request(method, uri, body).await?;
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let field = value
            .get("field")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        let message = match value.get("error").and_then(serde_json::Value::as_str) {
            Some(message) => message.to_owned(),
            None => format!("HTTP {status}: {value}"),
        };
        Err(ClientError::Rejected {
            status,
            field,
            message,
        })
    }

    /// One request on a fresh connection: the status and the raw body.
    async fn exchange(
        &self,
        method: Method,
        uri: &str,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes), ClientError> {
        let exchange_error = |source| ClientError::Exchange {
            path: self.path.clone(),
            method: method.clone(),
            uri: uri.to_owned(),
            source,
        };
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.path.clone(),
                    hint: match source.kind() {
                        io::ErrorKind::PermissionDenied => {
                            "the control API is root-only: run this as root"
                        }
                        _ => "is `egress-agent run` running?",
                    },
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(exchange_error)?;
        // The connection task ends when `sender` is dropped below.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!("control API connection: {e}");
            }
        });
        let mut request = Request::builder()
            .method(method.clone())
            .uri(uri)
            // HTTP/1.1 requires a Host; the socket is the real address.
            .header(header::HOST, "localhost");
        let payload = match body {
            Some(bytes) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                bytes
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|source| ClientError::Request {
                method: method.clone(),
                uri: uri.to_owned(),
                source,
            })?;
        let response = sender.send_request(request).await.map_err(exchange_error)?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(exchange_error)?
            .to_bytes();
        Ok((status, bytes))
    }
}
