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
    BeforeTransmitInterceptorContextMut, InterceptorContext,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, Metadata};
use aws_smithy_runtime_api::client::retries::classifiers::{
    ClassifyRetry, RetryAction, RetryClassifierPriority,
};
use aws_smithy_runtime_api::client::runtime_components::{GetIdentityResolver, RuntimeComponents};
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::retry::ErrorKind as RetryKind;
use serde::Deserialize;

use crate::config::Secret;
use crate::error::{Error, ErrorKind, Result};
use crate::retry::RetryPolicy;

/// IBM's public token endpoint; clusters without public egress use
/// `https://private.iam.cloud.ibm.com/identity/token`.
pub const DEFAULT_AUTH_ENDPOINT: &str = "https://iam.cloud.ibm.com/identity/token";

const SCHEME: AuthSchemeId = AuthSchemeId::new("ibm-iam-bearer");

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
        // serde_json's message names the position, never the content.
        let credential: ServiceCredential = serde_json::from_str(&text).map_err(|e| {
            Error::usage(format!(
                "the ICOS service credential {} is not the JSON the IBM Cloud console downloads: {e}",
                path.display()
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
    refresh_at: Instant,
    /// A 401/403 was answered to it: the next request fetches a new one.
    stale: bool,
    /// It was fetched because its predecessor was refused: a refusal of this one is real.
    after_refusal: bool,
}

/// The token cache, shared by every request of one store.
pub struct Tokens {
    http: reqwest::Client,
    settings: IamSettings,
    current: tokio::sync::Mutex<Option<Current>>,
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
            current: tokio::sync::Mutex::new(None),
            retry: RetryPolicy::REQUESTS,
        }))
    }

    /// A valid token, fetched when there is none, it is near its end, or it was refused.
    /// Callers that arrive during a fetch wait for it instead of fetching their own.
    pub async fn token(&self) -> Result<Secret> {
        let mut current = self.current.lock().await;
        if let Some(held) = &*current {
            if !held.stale && Instant::now() < held.refresh_at {
                return Ok(held.token.clone());
            }
        }
        let after_refusal = current.as_ref().is_some_and(|held| held.stale);
        let (token, lifetime) = self.fetch().await?;
        tracing::debug!(
            lifetime_seconds = lifetime.as_secs(),
            endpoint = %self.settings.auth_endpoint,
            "new IAM token"
        );
        *current = Some(Current {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime.mul_f64(0.8),
            stale: false,
            after_refusal,
        });
        Ok(token)
    }

    /// The store answered 401/403. Whether one retry with a new token may help: yes, unless
    /// the token in use was itself fetched after a refusal (then the refusal is real).
    fn refused(&self) -> bool {
        // A fetch under way means a new token is coming: retrying is worth it.
        let Ok(mut current) = self.current.try_lock() else {
            return true;
        };
        match &mut *current {
            None => false,
            Some(held) if held.stale => true,
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

/// Retries a 401/403 once with a fresh token.
#[derive(Debug)]
struct RefusedToken(Arc<Tokens>);

impl ClassifyRetry for RefusedToken {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        match ctx.response().map(|r| r.status().as_u16()) {
            Some(401 | 403) if self.0.refused() => {
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
