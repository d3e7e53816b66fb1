//! Who may use the cache API: a request whose `X-Auth-Token` is the static admin token
//! in `http.admin_token_file` (read at each request with the same checks as the
//! upstream's token file, so a rotated token applies at once). The comparison is of
//! SHA-256 digests in constant time, so neither the token's bytes nor its length show
//! in the timing. A missing or wrong token is 401, as Glance's auth middleware answers
//! for a token it cannot validate (Glance's 403 is for a valid token without the
//! role, which a single admin token cannot be). Keystone tokens are not supported yet.

use hyper::HeaderMap;
use hyper::StatusCode;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{error, warn};

use super::Shared;
use super::routes::{Reply, text};

const HEADER: &str = "x-auth-token";

fn unauthorized() -> Reply {
    let mut reply = text(
        StatusCode::UNAUTHORIZED,
        "This server could not verify that you are authorized to access the document you requested.",
    );
    reply.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("X-Auth-Token"),
    );
    reply
}

/// `None` when the request carries the admin token, else the reply refusing it.
pub(crate) async fn refusal(state: &Shared, headers: &HeaderMap) -> Option<Reply> {
    let Some(given) = headers.get(HEADER) else {
        return Some(unauthorized());
    };
    let Some(path) = state.ctx.config().http.admin_token_file.clone() else {
        warn!("http: cache API request refused: http.admin_token_file is not set");
        return Some(unauthorized());
    };
    let token = crate::blocking(move || crate::upstream::read_token_file(&path)).await;
    let token = match token {
        Ok(token) => token,
        Err(e) => {
            error!(error = %e, "http: cannot read http.admin_token_file");
            return Some(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server cannot check tokens now.",
            ));
        }
    };
    let expected = Sha256::digest(token.as_bytes());
    let offered = Sha256::digest(given.as_bytes());
    if bool::from(expected.ct_eq(&offered)) {
        None
    } else {
        warn!("http: cache API request with a wrong token refused");
        Some(unauthorized())
    }
}
