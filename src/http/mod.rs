//! The optional HTTP listener (`[http]`): health for monitoring and Glance's own cache
//! API for `glance cache-*`. One file per concern: `server` (sockets, connection
//! limits and timeouts, graceful drain), `routes` (paths and methods, as Glance's
//! router has them), `health`, `cache_api`, `auth`, `proxy` (every other request forwarded
//! to the Glance upstream, `http.forward`), `tls` (optional TLS on the TCP listeners, the
//! pair re-read on SIGHUP), `serve` (image downloads), `sendfile` (their bodies on plain
//! TCP) and `serve_auth` (who may download).
//! HTTP/1.1.

mod auth;
mod cache_api;
mod health;
mod proxy;
mod routes;
mod sendfile;
mod serve;
mod serve_auth;
mod serve_miss;
mod server;
mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::daemon::Context;

pub(crate) use serve_auth::{AuthCache, Network};
pub(crate) use server::{bind, serve};
pub(crate) use tls::{TlsError, load as load_tls_pair};

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("cannot remove the stale unix socket {path:?}: {source}")]
    StaleSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path:?} exists and is not a unix socket: refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("systemd socket activation: {0}")]
    SocketActivation(String),
    #[error("http TLS: {0}")]
    Tls(#[from] TlsError),
}

/// What the handlers reach: the loops' shared context, the shutdown token (readiness
/// ends with it) and the longest step the watchdog allows (the health judgement).
pub(crate) struct HttpState {
    pub(crate) ctx: Context,
    pub(crate) shutdown: CancellationToken,
    pub(crate) max_step: Duration,
    /// The configured upstream, asked whether an image exists and is active (Glance's
    /// checks on `PUT /v2/cache/{id}`); `None` without one.
    pub(crate) upstream: Option<Arc<crate::upstream::Upstream>>,
    /// Glance's remembered permissions to download (see `serve_auth`).
    pub(crate) auth_cache: AuthCache,
    /// The last read of `http.serve_token_file` (see `serve_auth::StaticToken`).
    pub(crate) static_token: serve_auth::StaticToken,
    /// Validated Keystone tokens and the refusal log's pace.
    pub(crate) auth: auth::AuthState,
    /// Downloads of images not cached (see `serve_miss`).
    pub(crate) read_through: crate::prefetch::ReadThrough,
}

pub(crate) type Shared = Arc<HttpState>;
