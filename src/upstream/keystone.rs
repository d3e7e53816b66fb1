//! Keystone v3 tokens for the Glance upstream: `POST /v3/auth/tokens` with a password or
//! an application credential, the token from `X-Subject-Token`, cached and renewed once
//! half its lifetime has passed (or at once after Glance rejects it).
//!
//! The same token validates the tokens of the HTTP listener's clients, as
//! keystonemiddleware does for Glance (`GET /v3/auth/tokens` with the service token in
//! `X-Auth-Token` and the client's in `X-Subject-Token`): the call lives here, beside the
//! token it needs, so the listener reuses the upstream's client (its CA file and
//! timeouts) and its cached service token rather than logging in a second time.

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::Mutex;

use super::{UpstreamError, http_error, read_json_capped, status_error};
use crate::clock;
use crate::config::KeystoneMethod;

/// What Keystone says of a client's token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Validation {
    /// Valid: the roles it carries (names) and when it expires (`None`: not said).
    Valid {
        roles: Vec<String>,
        expires: Option<DateTime<Utc>>,
    },
    /// Not a token Keystone accepts (unknown, expired, revoked, malformed).
    Invalid,
}

struct CachedToken {
    token: String,
    issued: DateTime<Utc>,
    expires: Option<DateTime<Utc>>,
}

pub(super) struct Keystone {
    client: reqwest::Client,
    tokens_url: String,
    body: serde_json::Value,
    cached: Mutex<Option<CachedToken>>,
}

impl Keystone {
    pub(super) fn new(
        client: reqwest::Client,
        auth_url: &str,
        method: &KeystoneMethod,
    ) -> Keystone {
        let base = auth_url.trim_end_matches('/');
        let base = base.strip_suffix("/v3").unwrap_or(base);
        let identity = match method {
            KeystoneMethod::Password {
                username,
                password,
                user_domain_name,
                ..
            } => json!({
                "methods": ["password"],
                "password": {"user": {"name": username, "domain": {"name": user_domain_name}, "password": password}}
            }),
            KeystoneMethod::ApplicationCredential { id, secret } => json!({
                "methods": ["application_credential"],
                "application_credential": {"id": id, "secret": secret}
            }),
        };
        let mut auth = json!({ "identity": identity });
        if let KeystoneMethod::Password {
            project_name,
            project_domain_name,
            ..
        } = method
        {
            auth["scope"] =
                json!({"project": {"name": project_name, "domain": {"name": project_domain_name}}});
        }
        Keystone {
            client,
            tokens_url: format!("{base}/v3/auth/tokens"),
            body: json!({ "auth": auth }),
            cached: Mutex::new(None),
        }
    }

    /// A valid token, from the cache or freshly issued.
    pub(super) async fn token(&self) -> Result<String, UpstreamError> {
        let mut cached = self.cached.lock().await;
        let now = clock::now();
        if let Some(c) = cached.as_ref() {
            let fresh = match c.expires {
                None => true,
                Some(expires) => now < c.issued + (expires - c.issued) / 2,
            };
            if fresh {
                return Ok(c.token.clone());
            }
        }
        let issued = self.issue().await?;
        let token = issued.token.clone();
        *cached = Some(issued);
        Ok(token)
    }

    /// Asks Keystone about a client's `subject` token with our own. 404 is Keystone's
    /// answer for a subject token it does not accept; 401 is for our token, which is
    /// then renewed once (a second 401 with a fresh one says the subject is the
    /// problem). Anything else, or no answer, is an error: the caller cannot tell.
    pub(super) async fn validate(&self, subject: &str) -> Result<Validation, UpstreamError> {
        const WHAT: &str = "Keystone token validation";
        for attempt in 0..2 {
            let service = self.token().await?;
            let response = self
                .client
                .get(&self.tokens_url)
                .header("X-Auth-Token", service)
                .header("X-Subject-Token", subject)
                .send()
                .await
                .map_err(http_error)?;
            match response.status() {
                reqwest::StatusCode::OK => {
                    let body = read_json_capped(response, WHAT).await?;
                    return Ok(valid(&body["token"]));
                }
                reqwest::StatusCode::NOT_FOUND => return Ok(Validation::Invalid),
                reqwest::StatusCode::UNAUTHORIZED if attempt == 0 => self.invalidate().await,
                reqwest::StatusCode::UNAUTHORIZED => return Ok(Validation::Invalid),
                status => return Err(status_error(status, WHAT)),
            }
        }
        Ok(Validation::Invalid)
    }

    /// Forgets the cached token (Glance answered 401).
    pub(super) async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    async fn issue(&self) -> Result<CachedToken, UpstreamError> {
        let response = self
            .client
            .post(&self.tokens_url)
            .json(&self.body)
            .send()
            .await
            .map_err(http_error)?;
        if !response.status().is_success() {
            return Err(status_error(response.status(), "Keystone authentication"));
        }
        let token = response
            .headers()
            .get("X-Subject-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(UpstreamError::NoSubjectToken)?;
        let body = read_json_capped(response, "Keystone authentication").await?;
        let expires = expires_at(&body["token"]);
        Ok(CachedToken {
            token,
            issued: clock::now(),
            expires,
        })
    }
}

/// The roles and expiry of a validated token's `token` object.
fn valid(token: &serde_json::Value) -> Validation {
    let roles = token["roles"]
        .as_array()
        .map(|roles| {
            roles
                .iter()
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Validation::Valid {
        roles,
        expires: expires_at(token),
    }
}

fn expires_at(token: &serde_json::Value) -> Option<DateTime<Utc>> {
    token["expires_at"]
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}
