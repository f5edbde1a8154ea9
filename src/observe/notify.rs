//! healthchecks.io-style pings: `URL/start` when a run begins, `URL` when it succeeds,
//! `URL/fail` when it fails, each a POST with a short plain-text summary. The URL authorises
//! pings, so it is a secret: logs show its scheme and host only.

use std::time::Duration;

use url::Url;

use crate::config::Secret;
use crate::error::{Error, Result};

/// The whole of one ping, retries included: a ping server that is down must not hold up a
/// backup for more than a few seconds.
pub const DEADLINE: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Start,
    Success,
    Fail,
}

#[derive(Clone)]
pub struct Notify {
    url: Secret,
    shown: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Notify {
    pub fn new(raw: &str) -> Result<Notify> {
        let parsed = Url::parse(raw)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| {
                Error::usage(
                    "--notify / KURA_NOTIFY_URL is not an http(s) URL, e.g. https://hc-ping.com/<uuid>",
                )
            })?;
        let shown = format!(
            "{}://{}/…",
            parsed.scheme(),
            parsed.host_str().unwrap_or_default()
        );
        Ok(Notify {
            url: Secret::new(raw),
            shown,
            http: http_client()?,
        })
    }

    fn url_for(&self, event: Event) -> Url {
        let mut url = Url::parse(self.url.expose()).expect("checked in new");
        let suffix = match event {
            Event::Start => Some("start"),
            Event::Success => None,
            Event::Fail => Some("fail"),
        };
        if let Some(suffix) = suffix {
            url.path_segments_mut()
                .expect("http URLs have path segments")
                .pop_if_empty()
                .push(suffix);
        }
        url
    }

    /// Send one ping; never fails the run.
    pub async fn ping(&self, event: Event, body: String) {
        let url = self.url_for(event);
        let sent = tokio::time::timeout(DEADLINE, async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let outcome = self
                    .http
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .body(body.clone())
                    .send()
                    .await
                    .and_then(|r| r.error_for_status());
                match outcome {
                    Ok(_) => return Ok(()),
                    Err(e)
                        if attempt < 3
                            && (e.is_connect()
                                || e.is_timeout()
                                || e.status().is_some_and(|s| s.is_server_error())) =>
                    {
                        tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
                    }
                    // reqwest names the URL in its errors: never show it.
                    Err(e) => return Err(e.without_url()),
                }
            }
        })
        .await;
        match sent {
            Ok(Ok(())) => tracing::debug!(notify = %self.shown, ?event, "ping sent"),
            Ok(Err(e)) => tracing::warn!(notify = %self.shown, ?event, "ping failed: {e}"),
            Err(_) => tracing::warn!(
                notify = %self.shown,
                ?event,
                "ping failed: no answer within {}s",
                DEADLINE.as_secs()
            ),
        }
    }
}

/// For pings and pushes: the system's roots, short timeouts.
pub(super) fn http_client() -> Result<reqwest::Client> {
    let tls = crate::tls::TlsFiles {
        system_roots: true,
        ..Default::default()
    }
    .client_config(crate::tls::Verify::Full)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| Error::failed(format!("cannot build the HTTP client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_their_paths_and_the_url_is_never_shown() {
        let notify = Notify::new("https://hc-ping.com/0f1e2d3c-uuid").unwrap();
        assert_eq!(
            notify.url_for(Event::Start).as_str(),
            "https://hc-ping.com/0f1e2d3c-uuid/start"
        );
        assert_eq!(
            notify.url_for(Event::Success).as_str(),
            "https://hc-ping.com/0f1e2d3c-uuid"
        );
        assert_eq!(
            notify.url_for(Event::Fail).as_str(),
            "https://hc-ping.com/0f1e2d3c-uuid/fail"
        );
        assert!(!format!("{notify:?}").contains("uuid"));
        let err = Notify::new("hc-ping.com/secret-uuid").unwrap_err();
        assert!(!err.to_string().contains("secret-uuid"));
    }
}
