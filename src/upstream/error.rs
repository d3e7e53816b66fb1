//! What can go wrong asking an upstream, each failure with its cause, and how each is
//! classified ([`UpstreamError::class`]): worth trying again, never going to work, or a
//! promise that cannot be checked. The texts name what failed; the causes stay
//! reachable as `source()`.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;

use crate::image_id::ImageId;

/// What becomes of an image whose download failed this way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth trying again later: network, timeouts, 5xx, 429, authentication that may
    /// be fixed, a disk or database that may recover.
    Retry,
    /// Will not get better: drop the image from the queue.
    Permanent,
    /// The bytes, or the upstream's promise of them, cannot be verified: retried a few
    /// times, then dropped; never taken as "unverified".
    Verify,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting, TLS, a timeout, a body cut short, a redirect refused. The text is
    /// reqwest's with its causes, its URL's secrets masked.
    #[error("{}", error_chain(source))]
    Transport { source: reqwest::Error },
    /// An answer other than success.
    #[error("{request}: HTTP {status}")]
    Status { request: String, status: StatusCode },
    /// A successful answer to the request for the whole image that is not all of it.
    #[error("GET {url}: HTTP 206 with Content-Range {content_range:?}, not the whole image{}", of_bytes(*size))]
    PartialImage {
        url: String,
        content_range: Option<String>,
        size: Option<u64>,
    },
    /// A success other than 200 or 206 to the request for the whole image.
    #[error("GET {url}: HTTP {status} to a request for the whole image")]
    NotWholeImage { url: String, status: StatusCode },
    #[error("image {id} is {status}, not active")]
    NotActive { id: ImageId, status: String },
    /// A metadata body (Glance's image, Keystone's token) over `MAX_METADATA_BYTES`.
    #[error("{what}: the response is larger than {max} bytes")]
    ResponseTooLarge { what: String, max: usize },
    #[error("{what}: the response is not JSON: {source}")]
    NotJson {
        what: String,
        source: serde_json::Error,
    },
    #[error("Keystone answered without X-Subject-Token")]
    NoSubjectToken,
    #[error("token file {}: {problem}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        problem: TokenFileProblem,
    },
    #[error("cannot read upstream.ca_file {}: {source}", path.display())]
    ReadCaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upstream.ca_file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("cannot build the HTTP client: {source}")]
    Client { source: reqwest::Error },
    /// The directory upstream has no such image.
    #[error("{} does not exist", path.display())]
    NoSuchFile { path: PathBuf },
    #[error("{} is not a regular file", path.display())]
    NotRegularFile { path: PathBuf },
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot stat {}: {source}", path.display())]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the source file: {source}")]
    ReadFile { source: std::io::Error },
    /// The upstream's transfer floor (`TransferFloor`) was not met.
    #[error(
        "upstream too slow: {bytes} bytes in {waited:.0?} of waiting (minimum {min_bytes_per_second} bytes per second, prefetcher.min_bytes_per_second)"
    )]
    TooSlow {
        bytes: u64,
        waited: Duration,
        min_bytes_per_second: u64,
    },
    /// A checksum that is not `len` hex digits (`shown` is at most twice that long).
    #[error("{what} {shown:?} is not {len} hex digits")]
    MalformedDigest {
        what: String,
        shown: String,
        len: usize,
    },
    /// A configured checksum header missing from the answer.
    #[error("{request}: the response has no {header} header")]
    MissingDigestHeader { request: String, header: String },
    #[error("{request}: header {header} is not text")]
    DigestHeaderNotText { request: String, header: String },
}

/// Why a token file is refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileProblem {
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error("cannot stat it: {0}")]
    Stat(#[source] std::io::Error),
    #[error("not a regular file")]
    NotRegular,
    #[error("world-readable: chmod o-r it (a token is a credential)")]
    WorldReadable,
    #[error("writable by its group or others: chmod go-w it")]
    Writable,
    #[error("larger than {0} bytes")]
    TooLarge(u64),
    #[error("empty")]
    Empty,
}

impl UpstreamError {
    /// Classified where it is raised, so the prefetcher never has to guess.
    pub fn class(&self) -> ErrorClass {
        use UpstreamError as E;
        match self {
            E::Transport { source } if source.is_redirect() => ErrorClass::Permanent,
            E::Status { status, .. } => status_class(*status),
            E::Transport { .. }
            | E::ResponseTooLarge { .. }
            | E::NotJson { .. }
            | E::NoSubjectToken
            | E::TokenFile { .. }
            | E::Open { .. }
            | E::Stat { .. }
            | E::ReadFile { .. }
            | E::TooSlow { .. } => ErrorClass::Retry,
            E::PartialImage { .. }
            | E::NotWholeImage { .. }
            | E::NotActive { .. }
            | E::ReadCaFile { .. }
            | E::CaFile { .. }
            | E::Client { .. }
            | E::NoSuchFile { .. }
            | E::NotRegularFile { .. } => ErrorClass::Permanent,
            E::MalformedDigest { .. }
            | E::MissingDigestHeader { .. }
            | E::DigestHeaderNotText { .. } => ErrorClass::Verify,
        }
    }
}

/// 404/410 and other client errors are permanent; 5xx, 408, 429 and authentication
/// failures (a token can be renewed, a password fixed) retry.
fn status_class(status: StatusCode) -> ErrorClass {
    match status.as_u16() {
        401 | 403 | 408 | 429 => ErrorClass::Retry,
        s if s >= 500 => ErrorClass::Retry,
        _ => ErrorClass::Permanent,
    }
}

/// A transport error, its URL's secrets masked.
pub(crate) fn http_error(e: reqwest::Error) -> UpstreamError {
    // reqwest's text names the URL, with any `user:password@` in it: mask it, since the
    // text ends up in logs and in the shared database's `last_error` (reqwest already
    // moves userinfo to an Authorization header; this keeps it so if that changes).
    let source = match e.url().map(crate::redact::mask_parsed_url) {
        Some(Some(masked)) => e.with_url(masked),
        Some(None) | None => e,
    };
    UpstreamError::Transport { source }
}

/// An unsuccessful answer to `request` (see `request_text`).
pub(crate) fn status_error(status: StatusCode, request: &str) -> UpstreamError {
    UpstreamError::Status {
        request: request.to_owned(),
        status,
    }
}

/// The error's text and its causes' that it does not quote already.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

fn of_bytes(size: Option<u64>) -> String {
    size.map(|s| format!(" of {s} bytes")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let class =
            |code: u16| status_error(StatusCode::from_u16(code).unwrap(), "GET http://x/").class();
        for code in [401, 403, 408, 429, 500, 503] {
            assert_eq!(class(code), ErrorClass::Retry, "{code}");
        }
        for code in [400, 404, 410] {
            assert_eq!(class(code), ErrorClass::Permanent, "{code}");
        }
        assert_eq!(
            status_error(StatusCode::NOT_FOUND, "GET http://x/").to_string(),
            "GET http://x/: HTTP 404 Not Found"
        );
    }

    #[test]
    fn texts_keep_their_causes() {
        let e = UpstreamError::TokenFile {
            path: "/etc/t".into(),
            problem: TokenFileProblem::Read(std::io::Error::other("denied")),
        };
        assert_eq!(e.to_string(), "token file /etc/t: cannot read it: denied");
        let problem = std::error::Error::source(&e).unwrap();
        assert!(std::error::Error::source(problem).is_some(), "the io error");
        let partial = UpstreamError::PartialImage {
            url: "http://x/file".into(),
            content_range: Some("bytes 0-9/20".into()),
            size: Some(20),
        };
        assert_eq!(
            partial.to_string(),
            "GET http://x/file: HTTP 206 with Content-Range Some(\"bytes 0-9/20\"), not the whole image of 20 bytes"
        );
    }
}
