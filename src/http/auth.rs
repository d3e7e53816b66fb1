//! Who may use the cache API. A request's `X-Auth-Token` is admitted when it is either
//! - the static admin token in `http.admin_token_file` (read at each request with the
//!   same checks as the upstream's token file, so a rotated token applies at once;
//!   compared as SHA-256 digests in constant time, so neither the token's bytes nor its
//!   length show in the timing), or
//! - with `[upstream.keystone]` configured, a Keystone token that Keystone validates
//!   (asked as keystonemiddleware asks, with the daemon's own service token: see
//!   `upstream::keystone`) and that carries one of `http.admin_roles`, as Glance's
//!   default policy (`manage_image_cache: role:admin`) requires.
//!
//! No token, or one neither accepts, is 401, as Glance's auth middleware answers; a
//! valid Keystone token without the role is 403 with the text of Glance's refusal; a
//! Keystone that cannot be asked (unreachable, 5xx) is 503, and nothing is done.
//!
//! A valid Keystone token is remembered by its SHA-256 digest (never the token) for at
//! most `MAX_CACHE_TIME` (as keystonemiddleware's `token_cache_time`: a revoked token
//! is refused within that) and never past `EXPIRY_MARGIN` before it expires; refusals
//! are never remembered. While Keystone is down, remembered tokens keep working for
//! that long (keystonemiddleware's cache is consulted before Keystone too), others get
//! 503. The roles are checked at each request against the running `http.admin_roles`,
//! so a reload applies to remembered tokens at once.
//!
//! Refusals are logged without the token, and rate-limited (`RefusalLog`): a client
//! retrying a wrong token in a loop must not flood the journal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hyper::HeaderMap;
use hyper::StatusCode;
use hyper::header::HeaderValue;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tracing::{error, warn};

use super::Shared;
use super::routes::{Reply, text};
use crate::upstream::Validation;

const HEADER: &str = "x-auth-token";

/// The longest a validated Keystone token is remembered.
const MAX_CACHE_TIME: Duration = Duration::from_secs(300);

/// A token is forgotten this long before Keystone says it expires (clocks differ, and a
/// request admitted must not act with a token already expired).
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// The most tokens remembered (a few hundred bytes each): past it the expired go, then
/// the one that would expire first.
const MAX_CACHED_TOKENS: usize = 1024;

/// At most one refusal line per this long.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The listener's memory of tokens and refusals.
#[derive(Default)]
pub(crate) struct AuthState {
    tokens: Mutex<TokenCache>,
    refusals: Mutex<RefusalLog>,
}

/// Why a request was refused, as logged.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// The token is not the static one, and no Keystone is configured.
    WrongToken,
    /// Neither `http.admin_token_file` nor Keystone is configured.
    NothingConfigured,
    /// Keystone does not accept the token.
    InvalidToken,
    /// A valid Keystone token without any of `http.admin_roles`.
    NoAdminRole,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::WrongToken => "a wrong token",
            Refusal::NothingConfigured => {
                "neither http.admin_token_file nor [upstream.keystone] is configured"
            }
            Refusal::InvalidToken => "a token Keystone does not accept",
            Refusal::NoAdminRole => "a valid token without any of http.admin_roles",
        }
    }
}

fn unauthorized() -> Reply {
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

/// Glance's answer when its policy refuses (`webob.exc.HTTPForbidden()`).
fn forbidden() -> Reply {
    text(StatusCode::FORBIDDEN, "Access was denied to this resource.")
}

fn cannot_check(status: StatusCode) -> Reply {
    text(status, "The server cannot check tokens now.")
}

/// `None` when the request may use the cache API, else the reply refusing it.
pub(crate) async fn refusal(state: &Shared, headers: &HeaderMap) -> Option<Reply> {
    let Some(given) = headers.get(HEADER) else {
        return Some(unauthorized());
    };
    let config = state.ctx.config();
    let mut unreadable = false;
    if let Some(path) = config.http.admin_token_file.clone() {
        match crate::blocking(move || crate::upstream::read_token_file(&path)).await {
            Ok(token) => {
                let expected = Sha256::digest(token.as_bytes());
                let offered = Sha256::digest(given.as_bytes());
                if bool::from(expected.ct_eq(&offered)) {
                    return None;
                }
            }
            Err(e) => {
                error!(error = %e, "http: cannot read http.admin_token_file");
                unreadable = true;
            }
        }
    }
    if let Some(verdict) = keystone(state, given, &config.http.admin_roles).await {
        return verdict;
    }
    if unreadable {
        return Some(cannot_check(StatusCode::INTERNAL_SERVER_ERROR));
    }
    let why = if config.http.admin_token_file.is_some() {
        Refusal::WrongToken
    } else {
        Refusal::NothingConfigured
    };
    state.auth.refused(why);
    Some(unauthorized())
}

/// Keystone's verdict on the token (`Some(None)`: admitted), or `None` when no Keystone
/// is configured.
async fn keystone(
    state: &Shared,
    given: &HeaderValue,
    admin_roles: &[String],
) -> Option<Option<Reply>> {
    let upstream = state.upstream.as_ref()?;
    let key: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    let remembered = state.auth.remembered(&key);
    let roles = match remembered {
        Some(roles) => roles,
        None => {
            // A token is printable ASCII; anything else is no token Keystone issued.
            let validation = match given.to_str() {
                Ok(token) => upstream.validate_token(token).await?,
                Err(_) => Ok(Validation::Invalid),
            };
            match validation {
                Ok(Validation::Valid { roles, expires }) => {
                    let lifetime = cache_lifetime(expires, crate::clock::now());
                    state.auth.remember(key, roles.clone(), lifetime);
                    roles
                }
                Ok(Validation::Invalid) => {
                    state.auth.refused(Refusal::InvalidToken);
                    return Some(Some(unauthorized()));
                }
                Err(e) => {
                    error!(error = %e, "http: cannot validate a token with Keystone: request refused with 503");
                    return Some(Some(cannot_check(StatusCode::SERVICE_UNAVAILABLE)));
                }
            }
        }
    };
    if has_admin_role(&roles, admin_roles) {
        Some(None)
    } else {
        state.auth.refused(Refusal::NoAdminRole);
        Some(Some(forbidden()))
    }
}

/// oslo.policy's `role:` check: any role named, ignoring case.
fn has_admin_role(roles: &[String], admin_roles: &[String]) -> bool {
    roles
        .iter()
        .any(|r| admin_roles.iter().any(|a| a.eq_ignore_ascii_case(r)))
}

/// How long a token validated at `now` that expires at `expires` is remembered.
fn cache_lifetime(
    expires: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
) -> Duration {
    let Some(expires) = expires else {
        return MAX_CACHE_TIME;
    };
    (expires - now)
        .to_std()
        .unwrap_or(Duration::ZERO)
        .saturating_sub(EXPIRY_MARGIN)
        .min(MAX_CACHE_TIME)
}

impl AuthState {
    fn remembered(&self, key: &[u8; 32]) -> Option<Vec<String>> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.get(key, Instant::now())
    }

    fn remember(&self, key: [u8; 32], roles: Vec<String>, lifetime: Duration) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.insert(key, roles, lifetime, Instant::now());
    }

    fn refused(&self, why: Refusal) {
        let mut log = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(unlogged) = log.note(Instant::now()) {
            warn!(
                reason = why.as_str(),
                refused_since_last_line = unlogged,
                "http: cache API request refused (at most one such line a minute)"
            );
        }
    }
}

struct Remembered {
    roles: Vec<String>,
    until: Instant,
}

/// Validated tokens by the SHA-256 digest of the token, bounded.
#[derive(Default)]
struct TokenCache {
    entries: HashMap<[u8; 32], Remembered>,
}

impl TokenCache {
    fn get(&mut self, key: &[u8; 32], now: Instant) -> Option<Vec<String>> {
        match self.entries.get(key) {
            Some(r) if now < r.until => Some(r.roles.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: [u8; 32], roles: Vec<String>, lifetime: Duration, now: Instant) {
        if lifetime.is_zero() {
            return;
        }
        if self.entries.len() >= MAX_CACHED_TOKENS && !self.entries.contains_key(&key) {
            self.entries.retain(|_, r| now < r.until);
            if self.entries.len() >= MAX_CACHED_TOKENS
                && let Some(first) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, r)| r.until)
                    .map(|(k, _)| *k)
            {
                self.entries.remove(&first);
            }
        }
        self.entries.insert(
            key,
            Remembered {
                roles,
                until: now + lifetime,
            },
        );
    }
}

/// The first refusal is logged, then at most one line per `REFUSAL_LOG_INTERVAL`,
/// carrying the count of refusals not logged since the line before.
#[derive(Default)]
struct RefusalLog {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// Counts a refusal at `now`: `Some(n)` when a line is to be written now, `n` the
    /// refusals left unlogged since the previous line.
    fn note(&mut self, now: Instant) -> Option<u64> {
        match self.last_line {
            Some(last) if now.duration_since(last) < REFUSAL_LOG_INTERVAL => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last_line = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100,000 refusals, one every 3 ms (5 minutes), make one line per minute or so,
    /// and the lines account for every refusal.
    #[test]
    fn refusals_are_logged_once_a_minute_with_their_count() {
        let mut log = RefusalLog::default();
        let start = Instant::now();
        let mut lines = 0u64;
        let mut counted = 0u64;
        let n = 100_000u64;
        for i in 0..n {
            if let Some(unlogged) = log.note(start + Duration::from_millis(3 * i)) {
                lines += 1;
                counted += unlogged + 1;
            }
        }
        counted += log.unlogged;
        assert!(lines <= 6, "{lines} lines");
        assert!(lines >= 5, "{lines} lines");
        assert_eq!(counted, n);
    }

    #[test]
    fn the_first_refusal_is_logged_at_once() {
        let mut log = RefusalLog::default();
        let now = Instant::now();
        assert_eq!(log.note(now), Some(0));
        assert_eq!(log.note(now), None);
        assert_eq!(log.note(now + REFUSAL_LOG_INTERVAL), Some(1));
    }

    #[test]
    fn tokens_are_remembered_until_shortly_before_they_expire_and_at_most_five_minutes() {
        let now = crate::clock::now();
        let lifetime = |secs| cache_lifetime(Some(now + chrono::Duration::seconds(secs)), now);
        assert_eq!(lifetime(3600), MAX_CACHE_TIME);
        assert_eq!(lifetime(90), Duration::from_secs(60));
        assert_eq!(lifetime(20), Duration::ZERO);
        assert_eq!(lifetime(-5), Duration::ZERO);
        assert_eq!(cache_lifetime(None, now), MAX_CACHE_TIME);
    }

    #[test]
    fn the_token_cache_forgets_expired_tokens_and_stays_bounded() {
        let mut cache = TokenCache::default();
        let now = Instant::now();
        let roles = vec!["admin".to_owned()];
        cache.insert([1; 32], roles.clone(), Duration::from_secs(10), now);
        assert_eq!(
            cache.get(&[1; 32], now + Duration::from_secs(9)),
            Some(roles.clone())
        );
        assert_eq!(cache.get(&[1; 32], now + Duration::from_secs(10)), None);
        cache.insert([2; 32], roles.clone(), Duration::ZERO, now);
        assert!(cache.entries.is_empty(), "an expiring token is not kept");
        for i in 0..(MAX_CACHED_TOKENS as u32 + 100) {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            cache.insert(
                key,
                roles.clone(),
                Duration::from_secs(60 + u64::from(i)),
                now,
            );
        }
        assert_eq!(cache.entries.len(), MAX_CACHED_TOKENS);
        let newest = (MAX_CACHED_TOKENS as u32 + 99).to_be_bytes();
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&newest);
        assert!(cache.get(&key, now).is_some(), "the soonest to expire went");
    }

    #[test]
    fn roles_compare_as_oslo_policy_compares_them() {
        let roles = |r: &[&str]| r.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(has_admin_role(
            &roles(&["reader", "Admin"]),
            &roles(&["admin"])
        ));
        assert!(!has_admin_role(
            &roles(&["member", "reader"]),
            &roles(&["admin"])
        ));
        assert!(has_admin_role(
            &roles(&["member"]),
            &roles(&["admin", "member"])
        ));
        assert!(!has_admin_role(&roles(&["admin"]), &[]));
    }
}
