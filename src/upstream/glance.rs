//! Glance's v2 API: `GET /v2/images/{id}` for status, size and checksums, then
//! `GET /v2/images/{id}/file` for the bytes, authenticated with `X-Auth-Token`.

use std::path::PathBuf;

use super::keystone::Keystone;
use super::{
    ImageMeta, ImageStream, UpstreamError, hex_digest, http_error, read_json_capped, request_text,
    status_error,
};
use crate::cache::HashAlgo;
use crate::config::GlanceAuth;
use crate::image_id::ImageId;

enum Auth {
    None,
    TokenFile(PathBuf),
    Keystone(Keystone),
}

pub struct GlanceUpstream {
    client: reqwest::Client,
    base: String,
    auth: Auth,
}

impl GlanceUpstream {
    pub fn new(client: reqwest::Client, url: &str, auth: &GlanceAuth) -> GlanceUpstream {
        let auth = match auth {
            GlanceAuth::None => Auth::None,
            GlanceAuth::TokenFile(p) => Auth::TokenFile(p.clone()),
            GlanceAuth::Keystone { auth_url, method } => {
                Auth::Keystone(Keystone::new(client.clone(), auth_url, method))
            }
        };
        GlanceUpstream {
            client,
            base: url.trim_end_matches('/').to_owned(),
            auth,
        }
    }

    async fn token(&self) -> Result<Option<String>, UpstreamError> {
        match &self.auth {
            Auth::None => Ok(None),
            // Re-read each time so a rotated token is picked up without a restart.
            Auth::TokenFile(p) => super::read_token_file(p).map(Some),
            Auth::Keystone(k) => k.token().await.map(Some),
        }
    }

    /// GET with the token; on 401 a Keystone token is renewed and the request retried once.
    async fn get(&self, url: &str) -> Result<reqwest::Response, UpstreamError> {
        for attempt in 0..2 {
            let mut request = self.client.get(url);
            if let Some(token) = self.token().await? {
                request = request.header("X-Auth-Token", token);
            }
            let response = request.send().await.map_err(http_error)?;
            if response.status() == reqwest::StatusCode::UNAUTHORIZED
                && attempt == 0
                && let Auth::Keystone(k) = &self.auth
            {
                k.invalidate().await;
                continue;
            }
            if !response.status().is_success() {
                return Err(status_error(response.status(), &request_text("GET", url)));
            }
            return Ok(response);
        }
        // The second attempt always returns above; a 401 is what it would have said.
        Err(status_error(
            reqwest::StatusCode::UNAUTHORIZED,
            &request_text("GET", url),
        ))
    }

    pub async fn fetch(&self, id: &ImageId) -> Result<(ImageMeta, ImageStream), UpstreamError> {
        let url = format!("{}/v2/images/{id}", self.base);
        let image = read_json_capped(self.get(&url).await?, &request_text("GET", &url)).await?;
        let status = image["status"].as_str().unwrap_or("unknown");
        if status != "active" {
            return Err(UpstreamError::Permanent(format!(
                "image {id} is {status}, not active"
            )));
        }
        let os_hash = match (
            image["os_hash_algo"].as_str(),
            image["os_hash_value"].as_str(),
        ) {
            (Some(algo), Some(value)) => match HashAlgo::parse(algo) {
                Some(a) => {
                    let len = match a {
                        HashAlgo::Sha256 => 64,
                        HashAlgo::Sha384 => 96,
                        HashAlgo::Sha512 => 128,
                    };
                    Some((a, hex_digest("os_hash_value", value, len)?))
                }
                None => {
                    tracing::warn!(image_id = %id, algo, "unsupported os_hash_algo; verifying size and MD5 only");
                    None
                }
            },
            _ => None,
        };
        let meta = ImageMeta {
            size: image["size"].as_u64(),
            md5: match &image["checksum"] {
                serde_json::Value::Null => None,
                serde_json::Value::String(c) => Some(hex_digest("checksum", c, 32)?),
                other => Some(hex_digest("checksum", &other.to_string(), 32)?),
            },
            os_hash,
        };
        let response = self.get(&format!("{url}/file")).await?;
        Ok((meta, ImageStream::Http(response)))
    }
}
