//! Who may download a cached image (`GET /v2/images/{id}/file`), decided before any
//! byte of it goes out. With a Glance upstream, Glance decides: the client's token is
//! tried on a one-byte download of the image there, and the upstream's 401, 403 or 404
//! is the answer here too; its yes is remembered per (SHA-256 of the token, image) for
//! `http.auth_cache_ttl`. Otherwise `http.serve_auth` decides: `none` (the client
//! networks of `http.serve_allow`) or `token` (`http.serve_token_file`, read again at
//! most once per `TOKEN_FILE_REREAD`). Anything else refuses: no upstream and no
//! `serve_auth` is 403 (fail closed).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::Shared;
use super::routes::{Reply, text};
use crate::image_id::ImageId;

const HEADER: &str = "x-auth-token";

/// Where a connection comes from, as the listener accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    Tcp(SocketAddr),
    /// A client of a unix socket: local, allowed by `serve_allow` only through its
    /// `"unix"` entry (the socket file's permissions are the operator's first guard).
    Unix,
}

/// An IP network of `http.serve_allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    /// `10.0.0.0/8`, `::1/128`, or an address alone (one host).
    pub(crate) fn parse(text: &str) -> Option<Network> {
        let (address, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(Network { address, prefix })
    }

    pub(crate) fn contains(&self, address: IpAddr) -> bool {
        // A v4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
        match (self.address, address.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The most (token, image) permissions remembered: past it, the expired ones go, and
/// if none has, all (a flood of distinct tokens costs upstream requests, not memory).
const MAX_REMEMBERED: usize = 10_000;

/// Glance's remembered yeses: when each was given. The TTL is read at each lookup, so a
/// reload that shortens it applies to what is remembered already.
#[derive(Default)]
pub(crate) struct AuthCache {
    granted: Mutex<HashMap<([u8; 32], ImageId), Instant>>,
}

impl AuthCache {
    fn key(token: &[u8], id: &ImageId) -> ([u8; 32], ImageId) {
        (Sha256::digest(token).into(), id.clone())
    }

    fn granted(&self, token: &[u8], id: &ImageId, ttl: std::time::Duration) -> bool {
        let key = Self::key(token, id);
        let mut granted = match self.granted.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match granted.get(&key) {
            Some(at) if at.elapsed() < ttl => true,
            Some(_) => {
                granted.remove(&key);
                false
            }
            None => false,
        }
    }

    fn grant(&self, token: &[u8], id: &ImageId, ttl: std::time::Duration) {
        if ttl.is_zero() {
            return;
        }
        let mut granted = match self.granted.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if granted.len() >= MAX_REMEMBERED {
            granted.retain(|_, at| at.elapsed() < ttl);
            if granted.len() >= MAX_REMEMBERED {
                granted.clear();
            }
        }
        granted.insert(Self::key(token, id), Instant::now());
    }
}

/// How long a read of `http.serve_token_file` stands before the file is read again. A
/// rotated token (the file rewritten, no reload) is taken within this, and the old one
/// refused from then on; meanwhile a busy server reads the file once per this rather
/// than once per download (a trip to a blocking thread each: about a third of a small
/// image's serving cost, BENCHMARKS.md).
pub(crate) const TOKEN_FILE_REREAD: Duration = Duration::from_secs(1);

/// The last good read of `http.serve_token_file`: which file, the SHA-256 of its token
/// (what requests are compared with; the token itself is not kept), and when the read
/// began (so a change made after that is seen within `TOKEN_FILE_REREAD` of it). A
/// failed read is not remembered: the next request reads again (and is refused 500 as
/// long as the file cannot be read).
#[derive(Default)]
pub(crate) struct StaticToken {
    read: Mutex<Option<TokenRead>>,
}

struct TokenRead {
    path: PathBuf,
    digest: [u8; 32],
    began: Instant,
}

impl StaticToken {
    /// The remembered digest of `path`'s token, while it stands.
    fn remembered(&self, path: &Path) -> Option<[u8; 32]> {
        let read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        read.as_ref()
            .filter(|r| r.path == path && r.began.elapsed() < TOKEN_FILE_REREAD)
            .map(|r| r.digest)
    }

    fn remember(&self, path: PathBuf, digest: [u8; 32], began: Instant) {
        let mut read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        // Of reads racing each other, the one begun last stands.
        if read
            .as_ref()
            .is_none_or(|r| r.path != path || r.began <= began)
        {
            *read = Some(TokenRead {
                path,
                digest,
                began,
            });
        }
    }

    /// The digest of the token in `path`: remembered, or read on the blocking pool.
    async fn digest(&self, path: PathBuf) -> Result<[u8; 32], crate::upstream::UpstreamError> {
        if let Some(digest) = self.remembered(&path) {
            return Ok(digest);
        }
        let began = Instant::now();
        let read = path.clone();
        let token = crate::blocking(move || crate::upstream::read_token_file(&read)).await?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.remember(path, digest, began);
        Ok(digest)
    }
}

pub(crate) fn unauthorized() -> Reply {
    let mut reply = text(
        StatusCode::UNAUTHORIZED,
        "This server could not verify that you are authorized to access the document you requested.",
    );
    reply.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("X-Auth-Token"),
    );
    reply
}

fn forbidden() -> Reply {
    text(
        StatusCode::FORBIDDEN,
        "You are not authorized to download this image.",
    )
}

/// `None` when the client may download `id`, else the reply refusing it.
pub(crate) async fn refusal(
    state: &Shared,
    headers: &HeaderMap,
    peer: Option<Peer>,
    id: &ImageId,
) -> Option<Reply> {
    let token = headers.get(HEADER);
    if let Some(upstream) = &state.upstream
        && upstream.is_glance()
    {
        // Without a token, Glance's auth middleware answers 401 before anything else.
        let Some(token) = token else {
            return Some(unauthorized());
        };
        return glance_says(state, upstream, token.as_bytes(), id).await;
    }
    let config = state.ctx.config();
    match config.http.serve_auth.as_deref() {
        Some("none") => {
            let allowed = match peer {
                Some(Peer::Unix) => config.http.serve_allow.iter().any(|e| e == "unix"),
                Some(Peer::Tcp(address)) => config
                    .http
                    .serve_allow
                    .iter()
                    .filter_map(|e| Network::parse(e))
                    .any(|n| n.contains(address.ip())),
                None => false,
            };
            if allowed {
                None
            } else {
                debug!(
                    ?peer,
                    "http: image download refused: client not in http.serve_allow"
                );
                Some(forbidden())
            }
        }
        Some("token") => {
            let Some(given) = token else {
                return Some(unauthorized());
            };
            static_token_refusal(
                &state.static_token,
                config.http.serve_token_file.clone(),
                given.as_bytes(),
            )
            .await
        }
        _ => {
            warn!(
                "http: image download refused: no Glance upstream and no http.serve_auth configured"
            );
            Some(forbidden())
        }
    }
}

/// Asks (or remembers) Glance's answer for `token` on `id`.
async fn glance_says(
    state: &Shared,
    upstream: &crate::upstream::Upstream,
    token: &[u8],
    id: &ImageId,
) -> Option<Reply> {
    let ttl = state.ctx.config().http.auth_cache_ttl;
    if state.auth_cache.granted(token, id, ttl) {
        return None;
    }
    // A token that is not text cannot be sent on: Glance would refuse it.
    let Ok(text_token) = std::str::from_utf8(token) else {
        return Some(unauthorized());
    };
    match upstream.download_status(id, text_token).await {
        Some(Ok(status)) if status == reqwest::StatusCode::PARTIAL_CONTENT || status == 200 => {
            state.auth_cache.grant(token, id, ttl);
            None
        }
        Some(Ok(status)) if matches!(status.as_u16(), 401 | 403 | 404) => {
            debug!(image_id = %id, status = status.as_u16(), "http: image download refused by the upstream");
            let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::FORBIDDEN);
            Some(match status {
                StatusCode::UNAUTHORIZED => unauthorized(),
                StatusCode::NOT_FOUND => text(StatusCode::NOT_FOUND, "Image not found."),
                _ => forbidden(),
            })
        }
        Some(Ok(status)) => {
            warn!(image_id = %id, status = status.as_u16(), "http: the upstream answered the download check unexpectedly; refusing");
            Some(unavailable())
        }
        Some(Err(e)) => {
            warn!(image_id = %id, error = %e, "http: cannot ask the upstream whether the download is allowed; refusing");
            Some(unavailable())
        }
        None => Some(forbidden()),
    }
}

fn unavailable() -> Reply {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "The image service cannot check this request now.",
    )
}

/// Compares `given` with the token in `path` as the cache API's token is compared
/// (SHA-256 digests in constant time), the file read again at most once per
/// `TOKEN_FILE_REREAD` (see `StaticToken`).
async fn static_token_refusal(
    known: &StaticToken,
    path: Option<PathBuf>,
    given: &[u8],
) -> Option<Reply> {
    let Some(path) = path else {
        warn!("http: image download refused: http.serve_token_file is not set");
        return Some(unauthorized());
    };
    let expected = match known.digest(path).await {
        Ok(digest) => digest,
        Err(e) => {
            error!(error = %e, "http: cannot read http.serve_token_file");
            return Some(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server cannot check tokens now.",
            ));
        }
    };
    let offered = Sha256::digest(given);
    if bool::from(expected.as_slice().ct_eq(offered.as_slice())) {
        None
    } else {
        warn!("http: image download with a wrong token refused");
        Some(unauthorized())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn networks_contain_their_addresses_only() {
        let net = Network::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let host = Network::parse("127.0.0.1").unwrap();
        assert!(host.contains("127.0.0.1".parse().unwrap()));
        assert!(!host.contains("127.0.0.2".parse().unwrap()));
        let all = Network::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let v6 = Network::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/x",
            "unix",
            "host.example",
        ] {
            assert!(Network::parse(bad).is_none(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn permissions_are_remembered_for_the_ttl_only() {
        let cache = AuthCache::default();
        let id = ImageId::parse("a").unwrap();
        let ttl = Duration::from_secs(60);
        assert!(!cache.granted(b"t", &id, ttl));
        cache.grant(b"t", &id, ttl);
        assert!(cache.granted(b"t", &id, ttl));
        assert!(!cache.granted(b"other", &id, ttl));
        assert!(!cache.granted(b"t", &ImageId::parse("b").unwrap(), ttl));
        // A shorter TTL (a reload) applies to what is remembered.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!cache.granted(b"t", &id, Duration::from_secs(1)));
        cache.grant(b"t", &id, ttl);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!cache.granted(b"t", &id, ttl));
        cache.grant(b"t", &id, Duration::ZERO);
        assert!(!cache.granted(b"t", &id, ttl));
    }

    fn write_token(path: &Path, token: &str) {
        std::fs::write(path, format!("{token}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    async fn allowed(known: &StaticToken, path: &Path, token: &str) -> bool {
        static_token_refusal(known, Some(path.to_path_buf()), token.as_bytes())
            .await
            .is_none()
    }

    /// A rotated token file applies without a reload once the last read is
    /// `TOKEN_FILE_REREAD` old, and the old token is refused from then on; until then
    /// the file is not read again.
    #[tokio::test(start_paused = true)]
    async fn a_rotated_token_file_applies_within_the_reread_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve-token");
        write_token(&path, "first");
        let known = StaticToken::default();
        assert!(allowed(&known, &path, "first").await);
        assert!(!allowed(&known, &path, "second").await);
        write_token(&path, "second");
        // Within the interval the read stands: the file is not read per request.
        assert!(allowed(&known, &path, "first").await);
        tokio::time::advance(TOKEN_FILE_REREAD).await;
        assert!(allowed(&known, &path, "second").await);
        assert!(!allowed(&known, &path, "first").await);
        // Another file (a reload) is read at once.
        let other = dir.path().join("other-token");
        write_token(&other, "third");
        assert!(allowed(&known, &other, "third").await);
        assert!(!allowed(&known, &other, "second").await);
        // A file that cannot be read is refused at once, not served from memory.
        std::fs::remove_file(&other).unwrap();
        tokio::time::advance(TOKEN_FILE_REREAD).await;
        assert!(!allowed(&known, &other, "third").await);
    }
}
