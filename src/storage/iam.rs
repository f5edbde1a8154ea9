//! IBM Cloud IAM API keys for ICOS, the way IBM's own SDKs take them.
//!
//! An API key is exchanged at the IAM token endpoint for a bearer token that lives about an
//! hour; every S3 request then carries `Authorization: Bearer …` instead of a SigV4
//! signature. Here that is an auth scheme of the AWS SDK (identity resolver + signer), so
//! retries, timeouts and the wire settings ICOS needs stay the SDK's.
//!
//! The token is refreshed when 80 % of its lifetime has passed (IBM's SDKs do the same), under
//! one lock, so concurrent uploads share one refresh; a 401/403 answer marks it stale and the
//! request is retried once with a new one, for a token revoked or expired early.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::auth::{
    AuthScheme, AuthSchemeEndpointConfig, AuthSchemeId, AuthSchemeOption, AuthSchemeOptionsFuture,
    Sign,
};
use aws_smithy_runtime_api::client::identity::http::Token;
use aws_smithy_runtime_api::client::identity::{
    Identity, IdentityCacheLocation, IdentityFuture, ResolveIdentity, SharedIdentityResolver,
};
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeDeserializationInterceptorContextMut, BeforeTransmitInterceptorContextMut,
    BeforeTransmitInterceptorContextRef, InterceptorContext,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, Metadata};
use aws_smithy_runtime_api::client::retries::classifiers::{
    ClassifyRetry, RetryAction, RetryClassifierPriority,
};
use aws_smithy_runtime_api::client::runtime_components::{GetIdentityResolver, RuntimeComponents};
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};
use aws_smithy_types::retry::ErrorKind as RetryKind;
use serde::Deserialize;

use crate::config::Secret;
use crate::error::{Error, ErrorKind, Result};
use crate::retry::RetryPolicy;

/// IBM's public token endpoint; clusters without public egress use
/// `https://private.iam.cloud.ibm.com/identity/token`.
pub const DEFAULT_AUTH_ENDPOINT: &str = "https://iam.cloud.ibm.com/identity/token";

const SCHEME: AuthSchemeId = AuthSchemeId::new("ibm-iam-bearer");

/// https, or plain http to this machine only (a test server): keys and tokens must not
/// cross a network unencrypted.
pub fn is_encrypted_or_local(url: &url::Url) -> bool {
    match (url.scheme(), url.host()) {
        ("https", _) => true,
        ("http", Some(url::Host::Domain(name))) => name == "localhost",
        ("http", Some(url::Host::Ipv4(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Ipv6(ip))) => ip.is_loopback(),
        _ => false,
    }
}

/// What a token request needs.
#[derive(Debug, Clone)]
pub struct IamSettings {
    pub api_key: Secret,
    /// `ibm-service-instance-id`, which ICOS wants on requests that are not about one bucket
    /// (listing and creating buckets).
    pub service_instance_id: Option<String>,
    pub auth_endpoint: String,
}

/// A service credential as the IBM Cloud console downloads it (only the fields kura reads).
#[derive(Debug, Deserialize)]
pub struct ServiceCredential {
    pub apikey: Option<Secret>,
    pub resource_instance_id: Option<String>,
    pub cos_hmac_keys: Option<HmacKeys>,
}

#[derive(Debug, Deserialize)]
pub struct HmacKeys {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

impl ServiceCredential {
    pub fn load(path: &Path) -> Result<ServiceCredential> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::with_source(
                ErrorKind::Usage,
                format!("cannot read the ICOS service credential {}", path.display()),
                e,
            )
        })?;
        // serde_json's messages may quote a value (a key of the wrong type): say where only.
        let credential: ServiceCredential = serde_json::from_str(&text).map_err(|e| {
            Error::usage(format!(
                "the ICOS service credential {} is not the JSON the IBM Cloud console downloads ({:?} error at line {}, column {})",
                path.display(),
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        if credential.apikey.is_none() && credential.cos_hmac_keys.is_none() {
            return Err(Error::usage(format!(
                "the ICOS service credential {} has neither \"apikey\" nor \"cos_hmac_keys\"",
                path.display()
            )));
        }
        Ok(credential)
    }
}

/// The current token and when to replace it.
struct Current {
    token: Secret,
    /// 80 % of the lifetime: fetch a new one from here on.
    refresh_at: Instant,
    /// The end of its lifetime: after a failed refresh it is used until here.
    expires_at: Instant,
    /// A 401/403 was answered to it: the next request fetches a new one.
    stale: bool,
    /// It was fetched because its predecessor was refused: a refusal of this one is real.
    after_refusal: bool,
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    /// A fetch that failed moments ago, shared with the requests that waited for it instead
    /// of being repeated by each of them.
    last_failure: Option<(Instant, Error)>,
}

/// How long a failed fetch is answered from memory.
const FAILURE_MEMORY: Duration = Duration::from_secs(5);

/// The token cache, shared by every request of one store. The state is behind a plain
/// mutex that is never held across an await, so the retry classifier (synchronous) can
/// always read it; fetches are serialised by a second, async lock.
pub struct Tokens {
    http: reqwest::Client,
    settings: IamSettings,
    state: std::sync::Mutex<State>,
    fetching: tokio::sync::Mutex<()>,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IAM tokens from {}", self.settings.auth_endpoint)
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

/// IAM's error body: `{"errorCode": "BXNIM0415E", "errorMessage": "Provided API key could not
/// be found.", …}`.
#[derive(Deserialize)]
struct IamRefusal {
    #[serde(rename = "errorCode")]
    code: Option<String>,
    #[serde(rename = "errorMessage")]
    message: Option<String>,
}

impl Tokens {
    pub fn new(settings: IamSettings, tls: &crate::tls::TlsFiles) -> Result<Arc<Tokens>> {
        let trust = crate::tls::TlsFiles {
            system_roots: true,
            ..tls.clone()
        };
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(trust.client_config(crate::tls::Verify::Full)?)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::failed(format!("cannot build the HTTP client: {e}")))?;
        Ok(Arc::new(Tokens {
            http,
            settings,
            state: std::sync::Mutex::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
            retry: RetryPolicy::REQUESTS,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("token state lock")
    }

    fn fresh(&self) -> Option<Secret> {
        let state = self.state();
        let held = state.current.as_ref()?;
        (!held.stale && Instant::now() < held.refresh_at).then(|| held.token.clone())
    }

    /// A valid token, fetched when there is none, it is near its end, or it was refused.
    /// Callers that arrive during a fetch wait for it instead of fetching their own. A
    /// refresh that fails while the old token still lives keeps using it (IAM down for a
    /// minute must not fail an hour-long backup).
    pub async fn token(&self) -> Result<Secret> {
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let _fetching = self.fetching.lock().await;
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let recent_failure = self
            .state()
            .last_failure
            .as_ref()
            .and_then(|(at, err)| (at.elapsed() < FAILURE_MEMORY).then(|| err.clone()));
        let fetched = match recent_failure {
            Some(err) => Err(err),
            None => self.fetch().await,
        };
        let mut state = self.state();
        match fetched {
            Ok((token, lifetime)) => {
                tracing::debug!(
                    lifetime_seconds = lifetime.as_secs(),
                    endpoint = %self.settings.auth_endpoint,
                    "new IAM token"
                );
                let after_refusal = state.current.as_ref().is_some_and(|held| held.stale);
                let now = Instant::now();
                state.current = Some(Current {
                    token: token.clone(),
                    refresh_at: now + lifetime.mul_f64(0.8),
                    expires_at: now + lifetime,
                    stale: false,
                    after_refusal,
                });
                state.last_failure = None;
                Ok(token)
            }
            Err(err) => {
                if state.last_failure.is_none() {
                    state.last_failure = Some((Instant::now(), err.clone()));
                }
                match &state.current {
                    Some(held) if !held.stale && Instant::now() < held.expires_at => {
                        tracing::warn!(
                            "cannot refresh the IAM token, using the current one while it lasts: {}",
                            err.chain()
                        );
                        Ok(held.token.clone())
                    }
                    _ => Err(err),
                }
            }
        }
    }

    /// The store answered 401/403 to a request sent with `sent`. Whether a retry with a new
    /// token may help: yes if a newer token exists already, or if `sent` is the current one
    /// and was not itself fetched after a refusal (then the refusal is real).
    fn refused(&self, sent: &str) -> bool {
        let mut state = self.state();
        match &mut state.current {
            None => false,
            Some(held) if held.token.expose() != sent => true,
            Some(held) if held.after_refusal => false,
            Some(held) => {
                held.stale = true;
                true
            }
        }
    }

    async fn fetch(&self) -> Result<(Secret, Duration)> {
        let endpoint = &self.settings.auth_endpoint;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = self
                .http
                .post(endpoint)
                .header(reqwest::header::ACCEPT, "application/json")
                .form(&[
                    ("grant_type", "urn:ibm:params:oauth:grant-type:apikey"),
                    ("apikey", self.settings.api_key.expose()),
                ])
                .send()
                .await;
            let retryable = match sent {
                Ok(response) if response.status().is_success() => {
                    let answer: TokenAnswer = response.json().await.map_err(|e| {
                        Error::with_source(
                            ErrorKind::Storage,
                            format!(
                                "IBM Cloud IAM at {endpoint} sent a token answer kura cannot read"
                            ),
                            e,
                        )
                    })?;
                    // Never trust a lifetime that would make every request fetch a token.
                    let lifetime = Duration::from_secs(answer.expires_in.max(1));
                    return Ok((Secret::new(answer.access_token), lifetime));
                }
                Ok(response) if response.status().is_server_error() || response.status() == 429 => {
                    format!("HTTP {}", response.status())
                }
                Ok(response) if matches!(response.status().as_u16(), 404 | 405) => {
                    return Err(Error::new(
                        ErrorKind::Storage,
                        format!(
                            "{endpoint} answered HTTP {} to the token request: it is not an IAM token endpoint; check IBM_AUTH_ENDPOINT (e.g. {DEFAULT_AUTH_ENDPOINT})",
                            response.status().as_u16()
                        ),
                    ));
                }
                Ok(response) => {
                    let status = response.status();
                    let refusal: Option<IamRefusal> = response.json().await.ok();
                    let (code, message) =
                        refusal.map(|r| (r.code, r.message)).unwrap_or((None, None));
                    return Err(Error::new(
                        ErrorKind::Storage,
                        format!(
                            "IBM Cloud IAM at {endpoint} refused the API key (HTTP {}): {}{}: check IBM_API_KEY_ID / --ibm-api-key or the service credential's \"apikey\"",
                            status.as_u16(),
                            message.unwrap_or_else(|| "no reason given".to_string()),
                            code.map(|c| format!(" ({c})")).unwrap_or_default(),
                        ),
                    ));
                }
                Err(e) => {
                    if let Some(failure) = crate::tls::explain_failure(&e, endpoint, &TLS_FIXES) {
                        return Err(Error::with_source(
                            ErrorKind::Storage,
                            format!("cannot get an IAM token: {failure}"),
                            e,
                        ));
                    }
                    if !self.retry.allows_another(attempt) {
                        return Err(Error::with_source(
                            ErrorKind::Storage,
                            format!(
                                "cannot reach IBM Cloud IAM at {endpoint} (IBM_AUTH_ENDPOINT): check the endpoint and the network policy's egress to it"
                            ),
                            e,
                        ));
                    }
                    e.to_string()
                }
            };
            if !self.retry.allows_another(attempt) {
                return Err(Error::new(
                    ErrorKind::Storage,
                    format!(
                        "IBM Cloud IAM at {endpoint} answered {retryable}, {attempt} times: try again later"
                    ),
                ));
            }
            tracing::debug!(attempt, reason = %retryable, "IAM token request failed; retrying");
            tokio::time::sleep(self.retry.delay(attempt)).await;
        }
    }
}

const TLS_FIXES: crate::tls::Fixes<'static> = crate::tls::Fixes {
    unknown_ca: "give the CA with --s3-ca-file FILE (KURA_S3_CA_FILE, AWS_CA_BUNDLE); it is trusted for IAM too",
    name_mismatch: "check IBM_AUTH_ENDPOINT",
};

/// Everything the S3 client needs to authenticate with IAM.
pub struct IamAuth {
    tokens: Arc<Tokens>,
}

impl IamAuth {
    pub fn new(tokens: Arc<Tokens>) -> Self {
        IamAuth { tokens }
    }

    /// Registers the bearer scheme (and only it), the refusal retry and the service
    /// instance header on an S3 config.
    pub fn install(
        &self,
        builder: aws_sdk_s3::config::Builder,
        service_instance_id: Option<String>,
    ) -> aws_sdk_s3::config::Builder {
        let builder = builder
            .endpoint_resolver(BearerEndpoints(
                aws_sdk_s3::config::endpoint::DefaultResolver::new(),
            ))
            .push_auth_scheme(BearerScheme {
                resolver: SharedIdentityResolver::new(TokenResolver(Arc::clone(&self.tokens))),
            })
            .auth_scheme_resolver(OnlyBearer)
            .interceptor(RememberToken)
            .retry_classifier(RefusedToken(Arc::clone(&self.tokens)));
        match service_instance_id {
            Some(id) => builder.interceptor(ServiceInstance(id)),
            None => builder,
        }
    }
}

#[derive(Debug)]
struct TokenResolver(Arc<Tokens>);

impl ResolveIdentity for TokenResolver {
    fn resolve_identity<'a>(
        &'a self,
        _runtime_components: &'a RuntimeComponents,
        _config_bag: &'a ConfigBag,
    ) -> IdentityFuture<'a> {
        IdentityFuture::new(async move {
            let token = self.0.token().await.map_err(BoxError::from)?;
            Ok(Identity::new(Token::new(token.expose(), None), None))
        })
    }

    // The token's lifetime is managed here (80 % rule, refusal), not by the SDK's cache.
    fn cache_location(&self) -> IdentityCacheLocation {
        IdentityCacheLocation::IdentityResolver
    }
}

#[derive(Debug)]
struct BearerScheme {
    resolver: SharedIdentityResolver,
}

impl AuthScheme for BearerScheme {
    fn scheme_id(&self) -> AuthSchemeId {
        SCHEME
    }

    fn identity_resolver(
        &self,
        _identity_resolvers: &dyn GetIdentityResolver,
    ) -> Option<SharedIdentityResolver> {
        Some(self.resolver.clone())
    }

    fn signer(&self) -> &dyn Sign {
        &BearerSigner
    }
}

#[derive(Debug)]
struct BearerSigner;

impl Sign for BearerSigner {
    fn sign_http_request(
        &self,
        request: &mut HttpRequest,
        identity: &Identity,
        _endpoint_config: AuthSchemeEndpointConfig<'_>,
        _runtime_components: &RuntimeComponents,
        _config_bag: &ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        let token = identity
            .data::<Token>()
            .ok_or("the IAM bearer scheme was handed another kind of identity")?;
        let mut value =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.token()))?;
        value.set_sensitive(true);
        request.headers_mut().insert("authorization", value);
        Ok(())
    }
}

/// S3's endpoint rules attach SigV4 signing settings to every endpoint, and the SDK refuses
/// a scheme the endpoint does not list: the same endpoints, without those settings.
#[derive(Debug)]
struct BearerEndpoints(aws_sdk_s3::config::endpoint::DefaultResolver);

impl aws_sdk_s3::config::endpoint::ResolveEndpoint for BearerEndpoints {
    fn resolve_endpoint<'a>(
        &'a self,
        params: &'a aws_sdk_s3::config::endpoint::Params,
    ) -> aws_smithy_runtime_api::client::endpoint::EndpointFuture<'a> {
        aws_smithy_runtime_api::client::endpoint::EndpointFuture::new(async move {
            let signed = self.0.resolve_endpoint(params).await?;
            let mut endpoint =
                aws_smithy_types::endpoint::Endpoint::builder().url(signed.url().to_string());
            for (name, values) in signed.headers() {
                for value in values {
                    endpoint = endpoint.header(name.to_string(), value.to_string());
                }
            }
            for (key, value) in signed.properties() {
                if key != "authSchemes" {
                    endpoint = endpoint.property(key.clone(), value.clone());
                }
            }
            Ok(endpoint.build())
        })
    }
}

#[derive(Debug)]
struct OnlyBearer;

impl aws_sdk_s3::config::auth::ResolveAuthScheme for OnlyBearer {
    fn resolve_auth_scheme<'a>(
        &'a self,
        _params: &'a aws_sdk_s3::config::auth::Params,
        _cfg: &'a ConfigBag,
        _runtime_components: &'a RuntimeComponents,
    ) -> AuthSchemeOptionsFuture<'a> {
        AuthSchemeOptionsFuture::ready(Ok(vec![AuthSchemeOption::from(SCHEME)]))
    }
}

/// The token a request was sent with, carried from the request to its response, where the
/// retry classifier reads it.
#[derive(Clone)]
struct SentWith(Secret);

impl std::fmt::Debug for SentWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SentWith(***)")
    }
}

impl Storable for SentWith {
    type Storer = StoreReplace<Self>;
}

#[derive(Debug)]
struct RememberToken;

impl Intercept for RememberToken {
    fn name(&self) -> &'static str {
        "remember the IAM token"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        if let Some(token) = context
            .request()
            .headers()
            .get("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            cfg.interceptor_state()
                .store_put(SentWith(Secret::new(token)));
        }
        Ok(())
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        if let Some(sent) = cfg.load::<SentWith>().cloned() {
            context.response_mut().add_extension(sent);
        }
        Ok(())
    }
}

/// Retries a 401/403 once with a fresh token.
#[derive(Debug)]
struct RefusedToken(Arc<Tokens>);

impl ClassifyRetry for RefusedToken {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let Some(response) = ctx.response() else {
            return RetryAction::NoActionIndicated;
        };
        let sent = response.extension::<SentWith>();
        match response.status().as_u16() {
            401 | 403 if sent.is_some_and(|sent| self.0.refused(sent.0.expose())) => {
                tracing::debug!("the object store refused the IAM token; retrying with a new one");
                RetryAction::retryable_error(RetryKind::TransientError)
            }
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "refused IAM token"
    }

    fn priority(&self) -> RetryClassifierPriority {
        RetryClassifierPriority::run_after(RetryClassifierPriority::transient_error_classifier())
    }
}

/// `ibm-service-instance-id` on the requests that are about the account, not one bucket.
#[derive(Debug)]
struct ServiceInstance(String);

impl Intercept for ServiceInstance {
    fn name(&self) -> &'static str {
        "ibm-service-instance-id"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        let account_wide = cfg
            .load::<Metadata>()
            .is_some_and(|m| matches!(m.name(), "ListBuckets" | "CreateBucket"));
        if account_wide {
            context
                .request_mut()
                .headers_mut()
                .insert("ibm-service-instance-id", self.0.clone());
        }
        Ok(())
    }
}
