//! Glance's v2 API: `GET /v2/images/{id}` for status, size and checksums, then
//! `GET /v2/images/{id}/file` for the bytes, authenticated with `X-Auth-Token`.
//!
//! The bytes are asked for with `Range: bytes=0-`: Glance's cache middleware tees every
//! un-ranged download into its cache directory (ours, when glance-api shares it: its
//! `incomplete/<id>` then makes our O_EXCL writer fail at every retry) and serves
//! ranged requests neither from nor into its cache. A prefetch must never fill, or be
//! served by, the cache of the node it asks.

use std::path::PathBuf;
use std::time::Duration;

use super::endpoints::{self, Endpoints};
use super::keystone::Keystone;
use super::{
    ImageMeta, ImageStream, UpstreamError, hex_digest, http_error, read_json_capped, request_text,
    status_error,
};
use crate::config::GlanceAuth;
use crate::digest::HashAlgo;
use crate::image_id::ImageId;

enum Auth {
    None,
    TokenFile(PathBuf),
    Keystone(Keystone),
}

pub struct GlanceUpstream {
    client: reqwest::Client,
    /// For forwarded requests: follows no redirect (the client gets the upstream's
    /// answer as it was sent).
    forward_client: reqwest::Client,
    /// `upstream.url`: every request goes to one that is up (`endpoints`).
    endpoints: Endpoints,
    auth: Auth,
}

impl GlanceUpstream {
    pub fn new(
        client: reqwest::Client,
        forward_client: reqwest::Client,
        urls: &[String],
        down_for: Duration,
        auth: &GlanceAuth,
    ) -> GlanceUpstream {
        let auth = match auth {
            GlanceAuth::None => Auth::None,
            GlanceAuth::TokenFile(p) => Auth::TokenFile(p.clone()),
            GlanceAuth::Keystone { auth_url, method } => {
                Auth::Keystone(Keystone::new(client.clone(), auth_url, method))
            }
        };
        GlanceUpstream {
            client,
            forward_client,
            endpoints: Endpoints::new(urls, down_for),
            auth,
        }
    }

    /// Validates a client's Keystone token with our own; `None` without Keystone.
    pub(crate) async fn validate_token(
        &self,
        subject: &str,
    ) -> Option<Result<super::keystone::Validation, UpstreamError>> {
        match &self.auth {
            Auth::Keystone(k) => Some(k.validate(subject).await),
            Auth::None | Auth::TokenFile(_) => None,
        }
    }

    /// The endpoint set and its health (shared by every request of this upstream).
    pub(crate) fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The client for forwarded requests (no redirect followed).
    pub(crate) fn forward_client(&self) -> &reqwest::Client {
        &self.forward_client
    }

    async fn token(&self) -> Result<Option<String>, UpstreamError> {
        match &self.auth {
            Auth::None => Ok(None),
            // Re-read each time so a rotated token is picked up without a restart.
            Auth::TokenFile(p) => super::read_token_file(p).map(Some),
            Auth::Keystone(k) => k.token().await.map(Some),
        }
    }

    /// Sends the request `build` makes for an endpoint's base URL to the endpoints in
    /// health order (`Endpoints::order`) until one answers below 500; an endpoint that
    /// cannot be reached or answers 5xx is marked down and the next one tried. The last
    /// endpoint's answer (or error) is what the caller gets when none does better.
    /// Generic in the request, so every lookup of this upstream fails over the same way.
    pub(crate) async fn send(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let order = self.endpoints.order();
        let mut last = None;
        for (n, i) in order.iter().copied().enumerate() {
            let Some(endpoint) = self.endpoints.get(i) else {
                continue;
            };
            let more = n + 1 < order.len();
            match build(endpoint.base()).send().await {
                Ok(response) if response.status().is_server_error() => {
                    self.endpoints.record(i, false);
                    if !more {
                        return Ok(response);
                    }
                }
                Ok(response) => {
                    self.endpoints.record(i, true);
                    return Ok(response);
                }
                Err(e) => {
                    self.endpoints.record(i, !endpoints::unreachable(&e));
                    if !more || !endpoints::unreachable(&e) {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        match last {
            Some(e) => Err(e),
            // No endpoint (the config requires one): what a request to none would say.
            None => self.client.get("http://").send().await,
        }
    }

    /// GET `path` (from the endpoint's base) with the token (and `range`, if given);
    /// on 401 a Keystone token is renewed and the request retried once.
    async fn get(
        &self,
        path: &str,
        range: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        for attempt in 0..2 {
            let token = self.token().await?;
            let response = self
                .send(|base| {
                    let mut request = self.client.get(format!("{base}{path}"));
                    if let Some(range) = range {
                        request = request.header(reqwest::header::RANGE, range);
                    }
                    if let Some(token) = &token {
                        request = request.header("X-Auth-Token", token);
                    }
                    request
                })
                .await
                .map_err(http_error)?;
            let url = response.url().to_string();
            if response.status() == reqwest::StatusCode::UNAUTHORIZED
                && attempt == 0
                && let Auth::Keystone(k) = &self.auth
            {
                k.invalidate().await;
                continue;
            }
            if !response.status().is_success() {
                return Err(status_error(response.status(), &request_text("GET", &url)));
            }
            return Ok(response);
        }
        // The second attempt always returns above; a 401 is what it would have said.
        Err(status_error(
            reqwest::StatusCode::UNAUTHORIZED,
            &request_text("GET", path),
        ))
    }

    /// The image's status as Glance has it (`active`, `queued`, ...); `None` when
    /// Glance does not know it (404).
    pub(crate) async fn image_status(&self, id: &ImageId) -> Result<Option<String>, UpstreamError> {
        let path = format!("/v2/images/{id}");
        let response = match self.get(&path, None).await {
            Ok(response) => response,
            Err(UpstreamError::Status { status, .. })
                if status == reqwest::StatusCode::NOT_FOUND =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let url = response.url().to_string();
        let image = read_json_capped(response, &request_text("GET", &url)).await?;
        Ok(Some(
            image["status"].as_str().unwrap_or("unknown").to_owned(),
        ))
    }

    /// Whether Glance lets the holder of `token` download `id`, asked as a download of
    /// its first byte (`Range: bytes=0-0`: a ranged request is neither served from nor
    /// written to glance-api's cache), so every rule of Glance's own download applies
    /// (policy, status, visibility, membership). The upstream's status, as it answered;
    /// not retried (the client's token is the client's to renew).
    pub(crate) async fn download_status(
        &self,
        id: &ImageId,
        token: &str,
    ) -> Result<reqwest::StatusCode, UpstreamError> {
        let path = format!("/v2/images/{id}/file");
        let mut response = self
            .send(|base| {
                self.client
                    .get(format!("{base}{path}"))
                    .header(reqwest::header::RANGE, "bytes=0-0")
                    .header("X-Auth-Token", token)
            })
            .await
            .map_err(http_error)?;
        let status = response.status();
        // A short body is read so the connection goes back to the pool; a long one (an
        // upstream that ignored the range) is dropped with its connection, unread.
        if response
            .content_length()
            .is_some_and(|n| n <= MAX_PROBE_BODY_BYTES)
        {
            while let Ok(Some(_)) = response.chunk().await {}
        }
        Ok(status)
    }

    /// The bytes `range` (a client's `Range` header) of `id`, as the upstream answers
    /// them (206 with its `Content-Range`, or 200 when it ignores the range): a ranged
    /// request on a miss is streamed through, never cached from.
    pub(crate) async fn fetch_range(
        &self,
        id: &ImageId,
        range: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.get(&format!("/v2/images/{id}/file"), Some(range))
            .await
    }

    pub async fn fetch(&self, id: &ImageId) -> Result<(ImageMeta, ImageStream), UpstreamError> {
        let path = format!("/v2/images/{id}");
        let response = self.get(&path, None).await?;
        let url = response.url().to_string();
        let image = read_json_capped(response, &request_text("GET", &url)).await?;
        let status = image["status"].as_str().unwrap_or("unknown");
        if status != "active" {
            return Err(UpstreamError::NotActive {
                id: id.clone(),
                status: status.to_owned(),
            });
        }
        let os_hash = match (
            image["os_hash_algo"].as_str(),
            image["os_hash_value"].as_str(),
        ) {
            (Some(algo), Some(value)) => match HashAlgo::parse(algo) {
                Some(a) => Some((a, hex_digest("os_hash_value", value, a.hex_len())?)),
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
        // A range starting at 0 is not satisfiable on an empty image (416): there are
        // no bytes to ask for.
        if meta.size == Some(0) {
            return Ok((meta, ImageStream::Empty));
        }
        let response = self.get(&format!("{path}/file"), Some(WHOLE_IMAGE)).await?;
        let file_url = response.url().to_string();
        whole_body(&response, meta.size, &file_url)?;
        Ok((meta, ImageStream::Http(response)))
    }
}

/// The longest answer to a download probe read to its end (Glance's error pages are a
/// few hundred bytes; the byte asked for is one).
const MAX_PROBE_BODY_BYTES: u64 = 16 * 1024;

/// The range that is the whole image: ranged, so no cache middleware tees or serves it.
const WHOLE_IMAGE: &str = "bytes=0-";

/// Checks that a successful answer to [`WHOLE_IMAGE`] carries the whole image: `200`, or
/// `206` whose `Content-Range` runs from 0 to the last byte (of `size`, when the image
/// record gave one). Anything else would be cached as a truncated image and is refused.
fn whole_body(
    response: &reqwest::Response,
    size: Option<u64>,
    url: &str,
) -> Result<(), UpstreamError> {
    match response.status() {
        reqwest::StatusCode::OK => Ok(()),
        reqwest::StatusCode::PARTIAL_CONTENT => {
            let header = response
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok());
            match header.and_then(parse_content_range) {
                Some((0, last, total)) if last + 1 == total && size.is_none_or(|s| s == total) => {
                    Ok(())
                }
                _ => Err(UpstreamError::PartialImage {
                    url: url.to_owned(),
                    content_range: header.map(str::to_owned),
                    size,
                }),
            }
        }
        status => Err(UpstreamError::NotWholeImage {
            url: url.to_owned(),
            status,
        }),
    }
}

/// `bytes FIRST-LAST/TOTAL` as numbers; `None` for anything else (`*` totals included).
fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let first = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    let total = total.trim().parse().ok()?;
    (first <= last).then_some((first, last, total))
}

#[cfg(test)]
mod tests {
    use super::parse_content_range;

    #[test]
    fn content_ranges_are_parsed_strictly() {
        assert_eq!(parse_content_range("bytes 0-99/100"), Some((0, 99, 100)));
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, 9, 10)));
        assert_eq!(parse_content_range("bytes 0-99/*"), None);
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-9/10"), None);
        assert_eq!(parse_content_range("bytes 0-x/10"), None);
        assert_eq!(parse_content_range(""), None);
    }
}
