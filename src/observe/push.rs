//! Pushing a run's metrics to a Prometheus Pushgateway.
//!
//! The grouping key is job, tenant, source *and operation*: a group is replaced as a whole by
//! PUT, so with one group per source a prune would erase the backup's series. A success PUTs
//! (the group is exactly this run); a failure POSTs, which replaces only the families it
//! sends, so the last success's time and sizes stay visible beside the failed run.

use std::time::Duration;

use base64::Engine;
use reqwest::Method;
use url::Url;

use super::exposition::Exposition;
use super::Operation;
use crate::error::{Error, Result};

/// The whole of one push, retry included: a push must not hold a backup Job for long.
const DEADLINE: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Pushgateway {
    base: Url,
    http: reqwest::Client,
}

// The URL may hold credentials (user:password@): show scheme, host and port only.
impl std::fmt::Debug for Pushgateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&shown(&self.base))
    }
}

impl Pushgateway {
    pub fn new(raw: &str) -> Result<Pushgateway> {
        let base = Url::parse(raw)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                Error::usage(format!(
                    "--pushgateway {:?} is not an http(s) URL, e.g. http://pushgateway.monitoring:9091",
                    crate::config::redact_unparsed_url(raw)
                ))
            })?;
        Ok(Pushgateway {
            base,
            http: super::notify::http_client()?,
        })
    }

    /// `…/metrics/job/kura/tenant/<t>/source/<s>/operation/<o>`, each value escaped as the
    /// Pushgateway API requires.
    pub fn group_url(&self, tenant: &str, source: &str, operation: Operation) -> Url {
        let mut url = self.base.clone();
        {
            let mut segments = url
                .path_segments_mut()
                .expect("http URLs have path segments");
            segments.pop_if_empty().extend(["metrics", "job", "kura"]);
            for (name, value) in [
                ("tenant", tenant),
                ("source", source),
                ("operation", operation.as_str()),
            ] {
                // A value with a slash (or an empty one) goes base64url-encoded, marked by
                // `@base64` on the label name; any other is percent-encoded by the URL.
                if value.is_empty() || value.contains('/') {
                    let encoded = base64::engine::general_purpose::URL_SAFE.encode(value);
                    segments.push(&format!("{name}@base64"));
                    segments.push(if encoded.is_empty() { "=" } else { &encoded });
                } else {
                    segments.push(name);
                    segments.push(value);
                }
            }
        }
        url
    }

    /// Push one source's series; a failure is logged as a warning and otherwise ignored.
    pub async fn push(
        &self,
        tenant: &str,
        source: &str,
        operation: Operation,
        metrics: &Exposition,
        replace_group: bool,
    ) {
        let url = self.group_url(tenant, source, operation);
        let method = match replace_group {
            true => Method::PUT,
            false => Method::POST,
        };
        let body = metrics.render();
        let attempt = || async {
            self.http
                .request(method.clone(), url.clone())
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .body(body.clone())
                .send()
                .await
                .and_then(|r| r.error_for_status())
        };
        let pushed = tokio::time::timeout(DEADLINE, async {
            match attempt().await {
                // One more try for a connection that failed before an answer.
                Err(e) if e.is_connect() || e.is_timeout() => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    attempt().await
                }
                other => other,
            }
        })
        .await;
        let shown = shown(&self.base);
        match pushed {
            Ok(Ok(_)) => tracing::debug!(pushgateway = %shown, source, "metrics pushed"),
            Ok(Err(e)) => tracing::warn!(
                pushgateway = %shown,
                source,
                "cannot push metrics: {}",
                e.without_url()
            ),
            Err(_) => tracing::warn!(
                pushgateway = %shown,
                source,
                "cannot push metrics: no answer within {}s",
                DEADLINE.as_secs()
            ),
        }
    }
}

/// The gateway without credentials or path, for logs.
fn shown(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}", url.scheme()),
        (Some(host), None) => format!("{}://{host}", url.scheme()),
        _ => url.scheme().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_keys_are_escaped_as_the_api_requires() {
        let gateway = Pushgateway::new("http://gw:9091/").unwrap();
        assert_eq!(
            gateway
                .group_url("acme", "postgres", Operation::Backup)
                .as_str(),
            "http://gw:9091/metrics/job/kura/tenant/acme/source/postgres/operation/backup"
        );
        let odd = gateway.group_url("a/b", "", Operation::Prune);
        assert_eq!(
            odd.path(),
            "/metrics/job/kura/tenant@base64/YS9i/source@base64/=/operation/prune"
        );
        let prefixed = Pushgateway::new("https://gw.example/push").unwrap();
        assert!(prefixed
            .group_url("t", "s", Operation::Verify)
            .as_str()
            .starts_with("https://gw.example/push/metrics/job/kura/"));
        assert!(Pushgateway::new("gw:9091").is_err());
    }
}
