//! Keystone v3 tokens for the Glance upstream: `POST /v3/auth/tokens` with a password or
//! an application credential, the token from `X-Subject-Token`, cached and renewed once
//! half its lifetime has passed (or at once after Glance rejects it).

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::Mutex;

use super::{UpstreamError, http_error, read_json_capped, status_error};
use crate::clock;
use crate::config::KeystoneMethod;

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
        let expires = body["token"]["expires_at"]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc));
        Ok(CachedToken {
            token,
            issued: clock::now(),
            expires,
        })
    }
}
