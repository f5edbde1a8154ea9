//! CouchDB over its HTTP API (CouchDB 3.x documentation), tested against pouchdb-server.
//!
//! Differences from CouchDB that kura handles (pouchdb-server 4.x):
//! - no `_dbs_info`: database facts come from `GET /{db}` one database at a time;
//! - `_bulk_get` without a `rev` returns only the winning revision, so every leaf revision
//!   (conflicts, deleted leaves) is asked for by rev, as listed by `_changes?style=all_docs`;
//! - sequences are integers where CouchDB's are opaque strings: `since` is passed back exactly
//!   as the server sent it (any JSON value);
//! - `_session` exists but may be disabled in front of a proxy: kura then falls back to basic
//!   authentication on every request.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE, COOKIE, RETRY_AFTER, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use url::Url;

use crate::config::{Secret, SourceUrl};
use crate::error::{Error, ErrorKind, Result};
use crate::retry::RetryPolicy;
use crate::tls::{self, TlsFiles};

pub mod backup;
mod engine;
pub mod restore;

pub use engine::{describe_part, CouchEngine};

/// Part object kind in the manifest.
pub const DATABASE_KIND: &str = "couchdb.database";
/// Format of the raw bytes: one JSON object per line (header, then document revisions).
pub const FORMAT: &str = "kura-couchdb-ndjson-v2";
/// The format before attachments were streamed: their bytes inline, base64, in the document.
pub const FORMAT_V1: &str = "kura-couchdb-ndjson-v1";

const TLS_FIXES: tls::Fixes<'static> = tls::Fixes {
    unknown_ca:
        "give the CA certificate that signed it with --couchdb-ca-file FILE (KURA_COUCHDB_CA_FILE)",
    name_mismatch: "use a host name the certificate lists in the CouchDB URL",
};

/// CouchDB's default session timeout is 10 minutes; renew well before.
const SESSION_RENEWAL: Duration = Duration::from_secs(240);

/// Why a login did not produce a session.
enum Login {
    Rejected,
    Transport(reqwest::Error),
    Unavailable(StatusCode),
}

pub struct Client {
    http: reqwest::Client,
    base: Url,
    shown: String,
    user: Option<String>,
    password: Option<Secret>,
    session: Mutex<Option<(String, Instant)>>,
    use_session: Mutex<bool>,
    /// For 429, 5xx, timeouts and connection errors; see [`Client::without_retries`].
    retry: RetryPolicy,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Client {
    /// `tls` applies to `https://` URLs, verified against the system's roots and its CA files.
    /// `read_timeout` bounds each wait for the next bytes of an answer (not the whole
    /// answer): a stalled `_changes` page is dropped after it and asked again.
    pub fn new(url: &SourceUrl, tls: &TlsFiles, read_timeout: Duration) -> Result<Self> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::usage(format!(
                "{} is not a CouchDB URL: expected http://user:password@host:5984",
                url.redacted()
            )));
        }
        // CouchDB 3 has no admin party: a user without a password is a missing Secret.
        if url.username().is_some() && url.password().is_none() {
            return Err(url.missing_password("CouchDB"));
        }
        let mut base = Url::parse(&url.redacted())
            .map_err(|e| Error::usage(format!("invalid CouchDB URL {}: {e}", url.redacted())))?;
        let _ = base.set_username("");
        let _ = base.set_password(None);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut http = reqwest::Client::builder();
        if base.scheme() == "https" {
            let trust = TlsFiles {
                system_roots: true,
                ..tls.clone()
            };
            let config = trust
                .client_config(tls::Verify::Full)
                .map_err(|e| e.context("CouchDB TLS settings"))?;
            http = http.use_preconfigured_tls(config);
        } else if !tls.ca_files.is_empty() || tls.client_cert.is_some() {
            tracing::warn!(url = %url.redacted(), "CouchDB TLS settings are ignored for an http:// URL");
        }
        let http = http
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(read_timeout)
            .pool_max_idle_per_host(16)
            // Servers close idle keep-alive connections (Node's default, pouchdb-server's,
            // is 5 s); reusing one at that moment fails the request before it is sent, and
            // a streamed attachment cannot be sent again.
            .pool_idle_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| Error::failed(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            shown: url.redacted(),
            base,
            user: url.username(),
            password: url.password().cloned(),
            session: Mutex::new(None),
            use_session: Mutex::new(true),
            retry: RetryPolicy::REQUESTS,
        })
    }

    /// One attempt per request: for callers with a retry loop of their own (`wait-for`),
    /// where hidden retries would only delay and blur each attempt's outcome.
    pub fn without_retries(mut self) -> Self {
        self.retry = self.retry.single_attempt();
        self
    }

    pub fn redacted(&self) -> &str {
        &self.shown
    }

    /// `/{db}/{rest}` with the database name percent-encoded (names may contain `/`).
    pub fn db_path(db: &str, rest: &str) -> String {
        let encoded = encode_segment(db);
        if rest.is_empty() {
            encoded
        } else {
            format!("{encoded}/{rest}")
        }
    }

    /// `/{db}/{doc}`, each percent-encoded, with the `_design/` of a design document kept
    /// literal (CouchDB routes `_design%2Fx` elsewhere).
    pub fn doc_path(db: &str, id: &str) -> String {
        match id.strip_prefix("_design/") {
            Some(rest) => Client::db_path(db, &format!("_design/{}", encode_segment(rest))),
            None => Client::db_path(db, &encode_segment(id)),
        }
    }

    /// Log in with a cookie session where the server offers one; basic auth otherwise.
    /// A transport failure is `Err(Login::Transport)`, which the caller retries.
    async fn session_cookie(&self, force_new: bool) -> std::result::Result<Option<String>, Login> {
        let (Some(user), Some(password)) = (&self.user, &self.password) else {
            return Ok(None);
        };
        if !*self.use_session.lock().expect("session flag lock") {
            return Ok(None);
        }
        if !force_new {
            if let Some((cookie, at)) = &*self.session.lock().expect("session lock") {
                if at.elapsed() < SESSION_RENEWAL {
                    return Ok(Some(cookie.clone()));
                }
            }
        }
        let url = self.base.join("_session").expect("valid path");
        let body = serde_json::json!({"name": user, "password": password.expose()});
        let response = self
            .http
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(Login::Transport)?;
        match response.status() {
            StatusCode::OK => {
                let cookie = response
                    .headers()
                    .get_all(SET_COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(|v| {
                        v.split(';')
                            .next()
                            .filter(|c| c.starts_with("AuthSession="))
                    })
                    .map(str::to_string);
                match cookie {
                    Some(cookie) => {
                        *self.session.lock().expect("session lock") =
                            Some((cookie.clone(), Instant::now()));
                        Ok(Some(cookie))
                    }
                    None => {
                        *self.use_session.lock().expect("session flag lock") = false;
                        Ok(None)
                    }
                }
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Login::Rejected),
            status if status.is_server_error() => Err(Login::Unavailable(status)),
            _ => {
                // No usable session endpoint (disabled, or a proxy in front): basic auth.
                *self.use_session.lock().expect("session flag lock") = false;
                Ok(None)
            }
        }
    }

    fn auth_error(&self) -> Error {
        Error::new(
            ErrorKind::Database,
            format!(
                "CouchDB at {} rejected the credentials: check the user and password in the URL or Secret",
                self.shown
            ),
        )
    }

    /// A handshake failure, explained; retrying cannot fix a certificate.
    fn tls_failure(&self, err: &reqwest::Error) -> Option<String> {
        let server = match (self.base.host_str(), self.base.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            _ => self.shown.clone(),
        };
        tls::explain_failure(err, &server, &TLS_FIXES)
    }

    fn transport_error(&self, what: &str, err: reqwest::Error) -> Error {
        if let Some(failure) = self.tls_failure(&err) {
            return Error::with_source(
                ErrorKind::Database,
                format!("{what} at CouchDB {}: {failure}", self.shown),
                err,
            );
        }
        // reqwest's messages include the URL, which carries no credentials here.
        Error::with_source(
            ErrorKind::Database,
            format!(
                "{what} at CouchDB {}: {}",
                self.shown,
                if err.is_timeout() {
                    "timed out"
                } else if err.is_connect() {
                    "cannot connect; is the server running and reachable?"
                } else {
                    "request failed"
                }
            ),
            err,
        )
    }

    /// Send a request with retries for 429, 5xx, timeouts and connection errors (honouring
    /// `Retry-After`), and re-login once on 401 with an expired session. Returns the response
    /// for any other status; callers decide what a 404 means.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<reqwest::Response> {
        let url = self
            .base
            .join(path)
            .map_err(|e| Error::failed(format!("bad CouchDB path {path:?}: {e}")))?;
        let mut attempt = 0;
        let mut relogged = false;
        loop {
            attempt += 1;
            let cookie = match self.session_cookie(false).await {
                Ok(cookie) => cookie,
                Err(Login::Rejected) => return Err(self.auth_error()),
                Err(Login::Transport(e)) if self.tls_failure(&e).is_some() => {
                    return Err(self.transport_error("logging in", e))
                }
                Err(failure) if self.retry.allows_another(attempt) => {
                    if let Login::Transport(e) = &failure {
                        tracing::debug!(error = %e, attempt, "logging in to CouchDB failed; retrying");
                    }
                    tokio::time::sleep(self.retry.delay(attempt)).await;
                    continue;
                }
                Err(Login::Transport(e)) => return Err(self.transport_error("logging in", e)),
                Err(Login::Unavailable(status)) => {
                    return Err(Error::new(
                        ErrorKind::Database,
                        format!(
                            "CouchDB {} answered HTTP {status} to the login, {} times",
                            self.shown, self.retry.max_attempts
                        ),
                    ))
                }
            };
            let mut request =
                self.authorize(self.http.request(method.clone(), url.clone()), &cookie)?;
            if let Some(body) = &body {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let outcome = request.send().await;
            let retry_after = match &outcome {
                Ok(response) => {
                    let status = response.status();
                    if status == StatusCode::UNAUTHORIZED && cookie.is_some() && !relogged {
                        // The session expired early (server restart): log in again, once.
                        relogged = true;
                        *self.session.lock().expect("session lock") = None;
                        continue;
                    }
                    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                        if status == StatusCode::UNAUTHORIZED {
                            return Err(self.auth_error());
                        }
                        return Ok(outcome.expect("checked Ok"));
                    }
                    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                        Some(
                            response
                                .headers()
                                .get(RETRY_AFTER)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.trim().parse::<u64>().ok())
                                .map(Duration::from_secs),
                        )
                    } else {
                        None
                    }
                }
                Err(e) if self.tls_failure(e).is_some() => None,
                Err(e) if e.is_timeout() || e.is_connect() || e.is_request() => Some(None),
                Err(_) => None,
            };
            match (retry_after, outcome) {
                (Some(wait), outcome) if self.retry.allows_another(attempt) => {
                    let backoff = wait.unwrap_or_else(|| self.retry.delay(attempt));
                    tracing::debug!(path, attempt, ?backoff, "retrying a CouchDB request");
                    drop(outcome);
                    tokio::time::sleep(backoff.min(Duration::from_secs(60))).await;
                }
                (_, Ok(response)) => return Ok(response),
                (_, Err(e)) => return Err(self.transport_error(&format!("{method} {path}"), e)),
            }
        }
    }

    /// The session cookie when there is one, else basic authentication.
    fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        cookie: &Option<String>,
    ) -> Result<reqwest::RequestBuilder> {
        Ok(match (cookie, &self.user, &self.password) {
            (Some(cookie), _, _) => {
                let mut value = HeaderValue::from_str(cookie)
                    .map_err(|_| Error::failed("the server sent an unusable cookie"))?;
                // Keeps it out of any debug output of the HTTP stack.
                value.set_sensitive(true);
                request.header(COOKIE, value)
            }
            (None, Some(user), password) => {
                request.basic_auth(user, password.as_ref().map(|p| p.expose()))
            }
            _ => request,
        })
    }

    /// One request whose body is streamed (an attachment, never held whole). A stream cannot
    /// be sent twice, so this is not retried: a failure fails the restore, which removes what
    /// it created, and a new run starts over.
    pub async fn request_streamed(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        length: u64,
        body: reqwest::Body,
    ) -> Result<reqwest::Response> {
        let url = self
            .base
            .join(path)
            .map_err(|e| Error::failed(format!("bad CouchDB path {path:?}: {e}")))?;
        let cookie = match self.session_cookie(false).await {
            Ok(cookie) => cookie,
            Err(Login::Rejected) => return Err(self.auth_error()),
            Err(Login::Transport(e)) => return Err(self.transport_error("logging in", e)),
            Err(Login::Unavailable(status)) => {
                return Err(Error::new(
                    ErrorKind::Database,
                    format!("CouchDB {} answered HTTP {status} to the login", self.shown),
                ))
            }
        };
        let response = self
            .authorize(self.http.request(method.clone(), url), &cookie)?
            .header(CONTENT_TYPE, content_type)
            .header(reqwest::header::CONTENT_LENGTH, length)
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(&format!("{method} {path}"), e))?;
        if response.status() == StatusCode::UNAUTHORIZED {
            return Err(self.auth_error());
        }
        Ok(response)
    }

    /// A JSON request that must succeed (2xx); other answers become errors naming `what`.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        what: &str,
    ) -> Result<Value> {
        let bytes = self.answer(method, path, body, what, None).await?;
        self.parse(&bytes.expect("no cap, never too large"), what)
    }

    /// `bytes` as JSON of type `T`; an error naming `what` if they are not.
    pub fn parse<'a, T: serde::Deserialize<'a>>(&self, bytes: &'a [u8], what: &str) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::failed(format!(
                "{what} at CouchDB {}: the answer is not JSON: {e}",
                self.shown
            ))
        })
    }

    /// The body of a successful (2xx) answer, unparsed, for a caller that parses it in place
    /// or sizes its next request by it. An answer longer than `cap` is not read further:
    /// `Ok(None)`, and the caller asks for less.
    pub async fn answer(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        what: &str,
        cap: Option<usize>,
    ) -> Result<Option<Bytes>> {
        let body = body.map(|b| Bytes::from(serde_json::to_vec(&b).expect("JSON serializes")));
        // A connection lost while the answer streams in is retried like one lost before it;
        // every endpoint kura calls this way is safe to repeat.
        let mut attempt = 0;
        let (status, bytes) = loop {
            attempt += 1;
            let response = self.request(method.clone(), path, body.clone()).await?;
            let status = response.status();
            match read_capped(response, cap).await {
                Ok(Some(bytes)) => break (status, bytes),
                Ok(None) => return Ok(None),
                Err(e) if self.retry.allows_another(attempt) => {
                    tracing::debug!(error = %e, attempt, "reading a CouchDB answer failed; retrying");
                    tokio::time::sleep(self.retry.delay(attempt)).await;
                }
                Err(e) => return Err(self.transport_error(what, e)),
            }
        };
        if !status.is_success() {
            let detail = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .map(|v| {
                    format!(
                        "{} {}",
                        v["error"].as_str().unwrap_or(""),
                        v["reason"].as_str().unwrap_or("")
                    )
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            let kind = if status == StatusCode::NOT_FOUND {
                ErrorKind::NotFound
            } else {
                ErrorKind::Failed
            };
            return Err(Error::new(
                kind,
                format!(
                    "{what} at CouchDB {}: HTTP {status}: {}",
                    self.shown,
                    detail.trim()
                ),
            ));
        }
        Ok(Some(bytes))
    }

    /// Every database name, paged through `_all_dbs`.
    pub async fn all_dbs(&self) -> Result<Vec<String>> {
        const PAGE: usize = 1000;
        let mut names = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let mut path = format!("_all_dbs?limit={PAGE}");
            if let Some(start) = &start {
                let key = serde_json::to_string(start).expect("string serializes");
                path.push_str("&skip=1&startkey=");
                path.push_str(&encode_segment(&key));
            }
            let page = self
                .json(Method::GET, &path, None, "listing databases")
                .await?;
            let page: Vec<String> = serde_json::from_value(page)
                .map_err(|e| Error::failed(format!("listing databases: unexpected answer: {e}")))?;
            let full_page = page.len() >= PAGE;
            // pouchdb-server ignores limit/startkey and answers the whole list every time:
            // keep only names past the last one seen, and stop when nothing is new.
            let fresh: Vec<String> = page
                .into_iter()
                .filter(|name| start.as_ref().is_none_or(|s| name > s))
                .collect();
            if fresh.is_empty() {
                break;
            }
            start = fresh.last().cloned();
            names.extend(fresh);
            if !full_page {
                break;
            }
        }
        Ok(names)
    }
}

/// One path segment (or query value), percent-encoded.
pub fn encode_segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The whole body, or `None` once it grows past `cap`.
async fn read_capped(
    mut response: reqwest::Response,
    cap: Option<usize>,
) -> reqwest::Result<Option<Bytes>> {
    let Some(cap) = cap else {
        return response.bytes().await.map(Some);
    };
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(Bytes::from(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_encoded() {
        assert_eq!(Client::db_path("a/b c", "_changes"), "a%2Fb%20c/_changes");
        assert_eq!(Client::db_path("plain", ""), "plain");
        assert_eq!(Client::doc_path("db", "a/b"), "db/a%2Fb");
        assert_eq!(Client::doc_path("db", "_design/x y"), "db/_design/x%20y");
    }
}
