//! Upstreams: where prefetched bytes come from. Glance's v2 API (with a static token or
//! Keystone), a plain HTTP URL template, or a directory (Glance's filesystem store).
//!
//! Every failure is a typed `UpstreamError` carrying its cause, classified where it is
//! raised (`UpstreamError::class`): retry (network, timeouts, 5xx, 429, authentication
//! that may be fixed), permanent (404, not active, redirect to another host, a file that
//! is not a regular file) or verify, so the prefetcher never has to guess.

mod directory;
mod endpoints;
mod error;
mod glance;
mod http;
mod keystone;

use std::time::Duration;

use bytes::Bytes;

use crate::config::{UpstreamConfig, UpstreamKind};
use crate::digest::HashAlgo;
use crate::image_id::ImageId;

/// What the upstream says the image must be.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageMeta {
    pub size: Option<u64>,
    /// Lower-case hex MD5 (Glance's `checksum`).
    pub md5: Option<String>,
    pub os_hash: Option<(HashAlgo, String)>,
}

pub(crate) use error::{ErrorClass, TokenFileProblem, UpstreamError};
pub(crate) use error::{http_error, status_error};
pub(crate) use keystone::Validation;

/// The bytes of one image, read chunk by chunk (memory stays flat).
pub enum ImageStream {
    Http(reqwest::Response),
    File(tokio::fs::File),
    /// An image of no bytes (nothing to ask an upstream for).
    Empty,
}

/// Bytes per read from a file upstream.
const FILE_CHUNK_BYTES: usize = 256 * 1024;

impl ImageStream {
    /// The next chunk, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        match self {
            ImageStream::Http(response) => response.chunk().await.map_err(http_error),
            ImageStream::Empty => Ok(None),
            ImageStream::File(file) => {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; FILE_CHUNK_BYTES];
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|source| UpstreamError::ReadFile { source })?;
                if n == 0 {
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(Bytes::from(buf)))
            }
        }
    }
}

/// A download's floor on the upstream's transfer rate. Only time spent waiting for the
/// upstream counts (not our own pacing or disk writes): every `window` of it must bring
/// `window * min_bytes_per_second` bytes, or the download fails as retryable. Per-read
/// timeouts alone let one byte a second hold a download slot forever.
#[derive(Debug)]
pub struct TransferFloor {
    min_bytes_per_second: u64,
    window: Duration,
    waited: Duration,
    bytes: u64,
}

impl TransferFloor {
    /// `None` when there is no floor.
    pub fn new(min_bytes_per_second: Option<u64>, window: Duration) -> Option<TransferFloor> {
        Some(TransferFloor {
            min_bytes_per_second: min_bytes_per_second.filter(|b| *b > 0)?,
            window: window.max(Duration::from_millis(1)),
            waited: Duration::ZERO,
            bytes: 0,
        })
    }

    /// The next chunk of `stream`, timing the wait.
    pub async fn next_chunk(
        &mut self,
        stream: &mut ImageStream,
    ) -> Result<Option<Bytes>, UpstreamError> {
        let started = tokio::time::Instant::now();
        let chunk = stream.next_chunk().await?;
        let len = chunk.as_ref().map_or(0, |c| c.len() as u64);
        self.observe(started.elapsed(), len)?;
        Ok(chunk)
    }

    /// Counts `bytes` that took `waited` to arrive; an error once a whole window brought
    /// too few.
    fn observe(&mut self, waited: Duration, bytes: u64) -> Result<(), UpstreamError> {
        self.waited = self.waited.saturating_add(waited);
        self.bytes = self.bytes.saturating_add(bytes);
        if self.waited < self.window {
            return Ok(());
        }
        let needed = (self.min_bytes_per_second as f64 * self.waited.as_secs_f64()) as u64;
        if self.bytes < needed {
            return Err(UpstreamError::TooSlow {
                bytes: self.bytes,
                waited: self.waited,
                min_bytes_per_second: self.min_bytes_per_second,
            });
        }
        self.waited = Duration::ZERO;
        self.bytes = 0;
        Ok(())
    }
}

/// The largest token file read: tokens are a few hundred bytes (Fernet) to a few KiB.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// Reads a token file as the configuration checks it, at every use (it may have been
/// rotated since): a regular file that others cannot read and only its owner can write,
/// at most `MAX_TOKEN_FILE_BYTES`, its text trimmed. The checks are on the file opened
/// (`fstat`), so a file swapped in between a check and the read is still checked.
pub(crate) fn read_token_file(path: &std::path::Path) -> Result<String, UpstreamError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let refuse = |problem| UpstreamError::TokenFile {
        path: path.to_path_buf(),
        problem,
    };
    let file = std::fs::File::open(path).map_err(|e| refuse(TokenFileProblem::Read(e)))?;
    let meta = file
        .metadata()
        .map_err(|e| refuse(TokenFileProblem::Stat(e)))?;
    let mode = meta.permissions().mode();
    if !meta.is_file() {
        return Err(refuse(TokenFileProblem::NotRegular));
    }
    if mode & 0o004 != 0 {
        return Err(refuse(TokenFileProblem::WorldReadable));
    }
    if mode & 0o022 != 0 {
        return Err(refuse(TokenFileProblem::Writable));
    }
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| refuse(TokenFileProblem::Read(e)))?;
    if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(refuse(TokenFileProblem::TooLarge(MAX_TOKEN_FILE_BYTES)));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(refuse(TokenFileProblem::Empty));
    }
    Ok(token.to_owned())
}

/// The largest metadata body read from an upstream (Glance's image JSON, Keystone's
/// token response): real ones are a few KiB, and a body is held whole in memory.
pub const MAX_METADATA_BYTES: usize = 1 << 20;

/// Reads a JSON body of at most `MAX_METADATA_BYTES`; a larger one is an error (retried:
/// a misbehaving proxy may recover) and is never read whole.
pub(crate) async fn read_json_capped(
    mut response: reqwest::Response,
    what: &str,
) -> Result<serde_json::Value, UpstreamError> {
    let too_large = || UpstreamError::ResponseTooLarge {
        what: what.to_owned(),
        max: MAX_METADATA_BYTES,
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_METADATA_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http_error)? {
        if body.len() + chunk.len() > MAX_METADATA_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|source| UpstreamError::NotJson {
        what: what.to_owned(),
        source,
    })
}

pub enum Upstream {
    Glance(glance::GlanceUpstream),
    Http(http::HttpUpstream),
    Directory(directory::DirectoryUpstream),
}

impl Upstream {
    pub fn from_config(config: &UpstreamConfig) -> Result<Upstream, UpstreamError> {
        Ok(match &config.kind {
            UpstreamKind::Glance { urls, auth } => Upstream::Glance(glance::GlanceUpstream::new(
                http_client(config, same_origin_redirects())?,
                // No read timeout of reqwest's, which runs from the request's start to
                // its answer's head and so would cut an upload longer than it:
                // `http::proxy` times the answer from the end of the request body.
                http_client_with(config, reqwest::redirect::Policy::none(), None)?,
                urls,
                config.down_for,
                auth,
            )),
            UpstreamKind::Http {
                url_template,
                md5_header,
                sha512_header,
            } => Upstream::Http(http::HttpUpstream {
                client: http_client(config, same_origin_redirects())?,
                url_template: url_template.clone(),
                md5_header: md5_header.clone(),
                sha512_header: sha512_header.clone(),
            }),
            UpstreamKind::Directory { path } => {
                Upstream::Directory(directory::DirectoryUpstream { path: path.clone() })
            }
        })
    }

    /// The Glance upstream, for what only Glance's API can answer (forwarding).
    pub(crate) fn glance(&self) -> Option<&glance::GlanceUpstream> {
        match self {
            Upstream::Glance(g) => Some(g),
            Upstream::Http(_) | Upstream::Directory(_) => None,
        }
    }

    /// Keeps `metrics` up to date with the health of each Glance endpoint.
    pub fn report_to(&self, metrics: &crate::metrics::Metrics) {
        if let Some(g) = self.glance() {
            g.endpoints().report_to(metrics);
        }
    }

    /// The image's status upstream, for the kinds that can tell (Glance): `Some(None)`
    /// when the upstream does not know the image, `None` for a kind that has no
    /// catalogue (an HTTP server, a directory).
    pub(crate) async fn image_status(
        &self,
        id: &ImageId,
    ) -> Result<Option<Option<String>>, UpstreamError> {
        match self {
            Upstream::Glance(g) => g.image_status(id).await.map(Some),
            Upstream::Http(_) | Upstream::Directory(_) => Ok(None),
        }
    }

    /// A client's `range` of `id` from the upstream (see `GlanceUpstream::fetch_range`);
    /// `None` for a kind that is not asked for ranges here.
    pub(crate) async fn fetch_range(
        &self,
        id: &ImageId,
        range: &str,
    ) -> Option<Result<reqwest::Response, UpstreamError>> {
        match self {
            Upstream::Glance(g) => Some(g.fetch_range(id, range).await),
            Upstream::Http(_) | Upstream::Directory(_) => None,
        }
    }

    /// Whether this is Glance, which decides who may download its images.
    pub(crate) fn is_glance(&self) -> bool {
        matches!(self, Upstream::Glance(_))
    }

    /// Glance's status to a download of `id`'s first byte with the client's `token`
    /// (see `GlanceUpstream::download_status`); `None` for a kind that has no say.
    pub(crate) async fn download_status(
        &self,
        id: &ImageId,
        token: &str,
    ) -> Option<Result<reqwest::StatusCode, UpstreamError>> {
        match self {
            Upstream::Glance(g) => Some(g.download_status(id, token).await),
            Upstream::Http(_) | Upstream::Directory(_) => None,
        }
    }

    /// Validates a client's Keystone token with the upstream's own service token:
    /// `None` when the upstream does not authenticate with Keystone.
    pub(crate) async fn validate_token(
        &self,
        subject: &str,
    ) -> Option<Result<Validation, UpstreamError>> {
        match self {
            Upstream::Glance(g) => g.validate_token(subject).await,
            Upstream::Http(_) | Upstream::Directory(_) => None,
        }
    }

    /// Asks for the image: its expected size and checksums, and a stream of its bytes.
    pub async fn fetch(&self, id: &ImageId) -> Result<(ImageMeta, ImageStream), UpstreamError> {
        match self {
            Upstream::Glance(g) => g.fetch(id).await,
            Upstream::Http(h) => h.fetch(id).await,
            Upstream::Directory(d) => d.fetch(id).await,
        }
    }
}

/// Redirects are followed only within the same scheme, host and port: an upstream must
/// not send our credentials, or us, somewhere else.
const MAX_REDIRECTS: usize = 5;

/// Redirects within the same scheme, host and port, at most `MAX_REDIRECTS`.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let origin = attempt.previous().first().map(|u| {
            (
                u.scheme().to_owned(),
                u.host_str().map(str::to_owned),
                u.port_or_known_default(),
            )
        });
        let target = (
            attempt.url().scheme().to_owned(),
            attempt.url().host_str().map(str::to_owned),
            attempt.url().port_or_known_default(),
        );
        if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else if origin.as_ref() != Some(&target) {
            let target = crate::redact::mask_url(attempt.url().as_str());
            let refused = format!("redirect to another host ({target}) refused");
            attempt.error(refused)
        } else {
            attempt.follow()
        }
    })
}

fn http_client(
    config: &UpstreamConfig,
    redirect: reqwest::redirect::Policy,
) -> Result<reqwest::Client, UpstreamError> {
    http_client_with(config, redirect, Some(config.read_timeout))
}

fn http_client_with(
    config: &UpstreamConfig,
    redirect: reqwest::redirect::Policy,
    read_timeout: Option<Duration>,
) -> Result<reqwest::Client, UpstreamError> {
    // reqwest is built without a default crypto provider (ring is far cheaper to build
    // than aws-lc); install ring once for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder().connect_timeout(config.connect_timeout);
    if let Some(read_timeout) = read_timeout {
        builder = builder.read_timeout(read_timeout);
    }
    builder = builder
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("glance-cached/", env!("CARGO_PKG_VERSION")))
        .redirect(redirect);
    if let Some(ca) = &config.ca_file {
        let pem = std::fs::read(ca).map_err(|source| UpstreamError::ReadCaFile {
            path: ca.clone(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
            UpstreamError::CaFile {
                path: ca.clone(),
                source,
            }
        })?;
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|source| UpstreamError::Client { source })
}

/// The text for a request to `url` in errors and logs, its secrets masked.
pub(crate) fn request_text(method: &str, url: &str) -> String {
    format!("{method} {}", crate::redact::mask_url(url))
}

/// A hex digest from an upstream, lower-cased. Anything but `len` hex digits is a
/// verification failure naming `what`: a checksum that cannot be checked must not turn
/// verification off.
pub(crate) fn hex_digest(what: &str, value: &str, len: usize) -> Result<String, UpstreamError> {
    let v = value.trim().to_ascii_lowercase();
    if v.len() == len && v.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(v)
    } else {
        let shown: String = value.chars().take(2 * len).collect();
        Err(UpstreamError::MalformedDigest {
            what: what.to_owned(),
            shown,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_floor_fails_only_a_window_below_the_rate(
            rate in 1u64..1_000_000,
            window_ms in 1u64..600_000,
            waits in proptest::collection::vec((0u64..100_000, 0u64..10_000_000), 1..50),
        ) {
            let window = Duration::from_millis(window_ms);
            let mut floor = TransferFloor::new(Some(rate), window).unwrap();
            let (mut waited, mut bytes) = (Duration::ZERO, 0u64);
            for (ms, n) in waits {
                let w = Duration::from_millis(ms);
                waited += w;
                bytes += n;
                let verdict = floor.observe(w, n);
                if waited < window {
                    prop_assert!(verdict.is_ok());
                } else {
                    let needed = (rate as f64 * waited.as_secs_f64()) as u64;
                    prop_assert_eq!(verdict.is_err(), bytes < needed);
                    if verdict.is_err() {
                        break;
                    }
                    waited = Duration::ZERO;
                    bytes = 0;
                }
            }
        }
    }

    #[test]
    fn no_floor_when_unset_or_zero() {
        assert!(TransferFloor::new(None, Duration::from_secs(1)).is_none());
        assert!(TransferFloor::new(Some(0), Duration::from_secs(1)).is_none());
    }

    #[test]
    fn hex_digests_must_be_whole() {
        let md5 = "0123456789ABCDEF0123456789abcdef";
        assert_eq!(
            hex_digest("checksum", md5, 32).unwrap(),
            md5.to_ascii_lowercase()
        );
        for bad in [
            "",
            "0123",
            &md5[..31],
            &format!("{md5}0"),
            "g123456789abcdef0123456789abcdef",
        ] {
            let e = hex_digest("checksum", bad, 32).unwrap_err();
            assert_eq!(e.class(), ErrorClass::Verify, "{bad}: {e:?}");
        }
    }
}
