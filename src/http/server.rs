//! The sockets and connections: TCP and unix listeners (or the ones systemd passes),
//! at most `http.max_connections` served at once (the rest wait in the backlog), a
//! header read timeout (slowloris), an idle timeout, and a graceful drain at shutdown:
//! no new connection is accepted, requests in progress finish, idle connections close.
//!
//! With `http.metrics_listen`, its sockets serve `/metrics` and health only, and the
//! main ones answer `/metrics` with 404 (a public API port shows no metrics). They are
//! served the same way (TLS, timeouts, drain), with `max_connections` of their own, so
//! a flood on the API port does not starve the scrapes.

use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use hyper::StatusCode;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::sendfile::{self, SendfileLane};
use super::serve_auth::Peer;
use super::tls::Tls;
use super::{HttpError, Shared, routes};
use crate::config::HttpConfig;

/// The bound sockets.
pub(crate) struct Listeners {
    sockets: Vec<(Listener, Face)>,
    /// TLS for the TCP sockets, when configured.
    tls: Option<Arc<Tls>>,
}

/// What a socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Face {
    /// Everything (`http.listen`), but `/metrics` when `metrics_listen` has it.
    Api { metrics: bool },
    /// `/metrics`, `/healthz` and `/readyz` (`http.metrics_listen`).
    Metrics,
}

impl Face {
    /// Whether `path` is answered on this face; the others are 404.
    fn serves(self, path: &str) -> bool {
        match self {
            Face::Api { metrics } => metrics || path != "/metrics",
            Face::Metrics => matches!(path, "/metrics" | "/healthz" | "/readyz"),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    /// With the path we created (removed at exit), `None` when systemd made it.
    Unix(UnixListener, Option<PathBuf>),
}

/// How long a draining connection with no request in progress is still polled, for a
/// response being written.
const DRAIN_WRITE_GRACE: Duration = Duration::from_millis(200);

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Binds `config.listen`, or takes the sockets systemd passes (`LISTEN_FDS` for this
/// process's `LISTEN_PID`), which then replace `listen`; and binds
/// `config.metrics_listen` (systemd passes the API's sockets only).
pub(crate) fn bind(config: &HttpConfig) -> Result<Listeners, HttpError> {
    let tls = Tls::from_config(
        config.tls_cert_file.as_deref(),
        config.tls_key_file.as_deref(),
    )?
    .map(Arc::new);
    let api = Face::Api {
        metrics: config.metrics_listen.is_empty(),
    };
    let mut sockets = match systemd_sockets()? {
        Some(sockets) => {
            info!(
                sockets = sockets.len(),
                "http: using the sockets systemd passed"
            );
            sockets.into_iter().map(|s| (s, api)).collect()
        }
        None => bind_entries(&config.listen, api, tls.is_some())?,
    };
    sockets.extend(bind_entries(
        &config.metrics_listen,
        Face::Metrics,
        tls.is_some(),
    )?);
    Ok(Listeners { sockets, tls })
}

/// Binds `listen`-style entries (`address:port`, `unix:/path`) for `face`.
fn bind_entries(
    entries: &[String],
    face: Face,
    tls: bool,
) -> Result<Vec<(Listener, Face)>, HttpError> {
    let mut sockets = Vec::new();
    for entry in entries {
        let failed = |source| HttpError::Bind {
            address: entry.clone(),
            source,
        };
        match entry.strip_prefix("unix:") {
            Some(path) => {
                let path = PathBuf::from(path);
                remove_stale_socket(&path)?;
                let listener = UnixListener::bind(&path).map_err(failed)?;
                info!(path = ?path, ?face, "http: listening");
                sockets.push((Listener::Unix(listener, Some(path)), face));
            }
            None => {
                let listener = std::net::TcpListener::bind(entry.as_str()).map_err(failed)?;
                listener.set_nonblocking(true).map_err(failed)?;
                let listener = TcpListener::from_std(listener).map_err(failed)?;
                info!(address = %entry, tls, ?face, "http: listening");
                sockets.push((Listener::Tcp(listener), face));
            }
        }
    }
    Ok(sockets)
}

/// A socket file left by an earlier run is replaced; one a live process still listens
/// on, or anything else at the path, is not.
fn remove_stale_socket(path: &std::path::Path) -> Result<(), HttpError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(HttpError::Bind {
                    address: format!("unix:{}", path.display()),
                    source: std::io::ErrorKind::AddrInUse.into(),
                });
            }
            std::fs::remove_file(path).map_err(|source| HttpError::StaleSocket {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(HttpError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(_) => Ok(()),
    }
}

/// The sockets of systemd socket activation, when they are ours: `LISTEN_PID` names
/// this process (a child started by us must not take them) and `LISTEN_FDS` counts them
/// from descriptor 3. Each is a listening stream socket, TCP or unix.
fn systemd_sockets() -> Result<Option<Vec<Listener>>, HttpError> {
    let (Ok(pid), Ok(fds)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let count: RawFd = fds
        .trim()
        .parse()
        .map_err(|_| HttpError::SocketActivation(format!("LISTEN_FDS={fds:?}")))?;
    let mut sockets = Vec::new();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count) {
        sockets.push(adopt_fd(fd)?);
    }
    Ok(Some(sockets))
}

fn adopt_fd(fd: RawFd) -> Result<Listener, HttpError> {
    let failed = |what: &str, e: std::io::Error| {
        HttpError::SocketActivation(format!("descriptor {fd}: {what}: {e}"))
    };
    // SAFETY: an all-zero sockaddr_storage is valid; getsockname writes at most `len`.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes; a bad descriptor is an error.
    let rc =
        unsafe { libc::getsockname(fd, (&raw mut addr).cast::<libc::sockaddr>(), &raw mut len) };
    if rc != 0 {
        return Err(failed("not a socket", std::io::Error::last_os_error()));
    }
    // SAFETY: systemd passed this descriptor to us and nothing else in the process
    // owns it (LISTEN_PID named this process); it is a socket (getsockname above).
    match i32::from(addr.ss_family) {
        libc::AF_UNIX => {
            let std = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
            std.set_nonblocking(true)
                .map_err(|e| failed("nonblocking", e))?;
            let listener = UnixListener::from_std(std).map_err(|e| failed("register", e))?;
            Ok(Listener::Unix(listener, None))
        }
        libc::AF_INET | libc::AF_INET6 => {
            let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            std.set_nonblocking(true)
                .map_err(|e| failed("nonblocking", e))?;
            let listener = TcpListener::from_std(std).map_err(|e| failed("register", e))?;
            Ok(Listener::Tcp(listener))
        }
        family => Err(HttpError::SocketActivation(format!(
            "descriptor {fd}: address family {family} is neither unix nor IP"
        ))),
    }
}

/// Serves until the shutdown token, then drains: stops accepting, lets requests in
/// progress finish and closes idle connections; returns when every connection is done
/// (the supervisor's teardown bounds the wait with `daemon.shutdown_timeout`).
pub(crate) async fn serve(listeners: Listeners, state: Shared) {
    let max = state.ctx.config().http.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let metrics_permits = Arc::new(Semaphore::new(max));
    let connections = TaskTracker::new();
    let accepting = TaskTracker::new();
    let mut paths = Vec::new();
    if let Some(tls) = &listeners.tls {
        accepting.spawn(reread_on_reload(tls.clone(), state.clone()));
    }
    for (listener, face) in listeners.sockets {
        if let Listener::Unix(_, Some(path)) = &listener {
            paths.push(path.clone());
        }
        // Unix sockets stay plain: TLS is for the TCP ones.
        let tls = match &listener {
            Listener::Tcp(_) => listeners.tls.clone(),
            Listener::Unix(..) => None,
        };
        let permits = match face {
            Face::Api { .. } => permits.clone(),
            Face::Metrics => metrics_permits.clone(),
        };
        accepting.spawn(accept_loop(
            (listener, face),
            tls,
            state.clone(),
            permits,
            connections.clone(),
        ));
    }
    accepting.close();
    accepting.wait().await;
    for path in paths {
        let _ = std::fs::remove_file(&path);
    }
    connections.close();
    connections.wait().await;
    state.read_through.drain().await;
    debug!("http: drained");
}

/// Each accepted reload (a new config published to the loops) re-reads the TLS pair;
/// a pair that does not load leaves the running one in place and is reported like a
/// rejected reload (log and STATUS).
async fn reread_on_reload(tls: Arc<Tls>, state: Shared) {
    let mut config = state.ctx.config.clone();
    config.borrow_and_update();
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            changed = config.changed() => if changed.is_err() { return },
        }
        match tls.reread() {
            Ok(()) => info!("http: TLS certificate and key re-read"),
            Err(e) => {
                error!(error = %e, "http: cannot re-read the TLS certificate and key; still serving the previous ones");
                state.ctx.board.set_config_error(Some(format!(
                    "reload: {e}; serving the previous TLS certificate"
                )));
            }
        }
    }
}

async fn accept_loop(
    (listener, face): (Listener, Face),
    tls: Option<Arc<Tls>>,
    state: Shared,
    permits: Arc<Semaphore>,
    connections: TaskTracker,
) {
    let shutdown = state.shutdown.clone();
    loop {
        // A permit first: past max_connections, clients wait in the kernel's backlog.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let state = state.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    connection(stream, peer, tls, face, state).await;
                    drop(permit);
                });
            }
            Err(error) => {
                // Out of descriptors and the like: pause rather than spin.
                warn!(%error, "http: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

async fn accept(listener: &Listener) -> std::io::Result<(Stream, Peer)> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| {
            // Without TCP_NODELAY a small reply's last segment can wait for the client's
            // delayed ACK (Nagle) on keep-alive connections (BENCHMARKS.md, small
            // requests). Bodies go out in large writes or by sendfile, so nothing is
            // lost by sending at once.
            if let Err(error) = s.set_nodelay(true) {
                debug!(%error, "http: cannot set TCP_NODELAY");
            }
            (Stream::Tcp(s), Peer::Tcp(a))
        }),
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| (Stream::Unix(s), Peer::Unix)),
    }
}

/// When a byte last moved on a connection, and whether a request is being answered
/// (a prune that takes a while is not idleness).
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no request is being answered (polled: only while draining).
    async fn no_request(&self) {
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resolves once nothing moved for `idle` with no request in progress.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline && self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            let wake = if Instant::now() >= deadline {
                Instant::now() + idle
            } else {
                deadline
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// Counts a request in progress for as long as it lives.
pub(crate) struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

async fn connection(stream: Stream, peer: Peer, tls: Option<Arc<Tls>>, face: Face, state: Shared) {
    let config = state.ctx.config();
    let stream = match (stream, tls) {
        (Stream::Tcp(tcp), Some(tls)) => {
            // The handshake is bounded like a request head (a slow one holds a permit).
            let handshake =
                tokio::time::timeout(config.http.header_read_timeout, tls.acceptor().accept(tcp));
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                done = handshake => match done {
                    Ok(Ok(stream)) => Stream::Tls(Box::new(stream)),
                    Ok(Err(error)) => {
                        debug!(%error, "http: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!("http: TLS handshake timed out");
                        return;
                    }
                },
            }
        }
        (stream, _) => stream,
    };
    // Who is asking, for the X-Forwarded-* headers of forwarded requests.
    let client_side = super::proxy::ClientSide {
        ip: match &stream {
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
            Stream::Tls(s) => s.get_ref().0.peer_addr().ok().map(|a| a.ip()),
            Stream::Unix(_) => None,
        },
        tls: matches!(stream, Stream::Tls(_)),
    };
    // Plain TCP sends image bodies with sendfile; TLS (rustls encrypts from a buffer)
    // and unix sockets keep the buffered path.
    let lane = match &stream {
        Stream::Tcp(_) => Some(SendfileLane::new(state.ctx.metrics.sendfile_bytes())),
        Stream::Unix(_) | Stream::Tls(_) => None,
    };
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        inner: stream,
        lane: lane.clone(),
        activity: activity.clone(),
        send_timeout: config.http.send_timeout,
        stalled: None,
    };
    let io_has_lane = io.lane.is_some();
    let service_state = state.clone();
    let service_activity = activity.clone();
    let service = service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        // Who asks, for the routes that decide by it (image downloads) and for the
        // X-Forwarded-* headers of forwarded requests.
        request.extensions_mut().insert(peer);
        request.extensions_mut().insert(client_side);
        if let Some(lane) = &lane {
            request.extensions_mut().insert(lane.clone());
        }
        let state = service_state.clone();
        let in_flight = InFlight::new(&service_activity);
        async move {
            let response = if face.serves(request.uri().path()) {
                routes::handle(state, request).await
            } else {
                routes::text(StatusCode::NOT_FOUND, "The resource could not be found.")
            };
            drop(in_flight);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.http.header_read_timeout)
        .keep_alive(true);
    if io_has_lane {
        // Body chunks reach `Tracked` as the memory they are (see `sendfile`): pinned
        // here, not left to hyper's guess from `is_write_vectored`.
        builder.writev(true);
    }
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(error) = done {
                    debug!(%error, "http: connection ended");
                }
                return;
            }
            _ = state.shutdown.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            // Draining, hyper waits for a request head that may never come (a client
            // halfway through one): only a request being answered is waited for.
            _ = activity.no_request(), if draining => {
                // A response just made may still be being written: hyper ends the
                // connection once it is (graceful shutdown), a moment is enough.
                let _ = tokio::time::timeout(DRAIN_WRITE_GRACE, conn.as_mut()).await;
                debug!("http: closing a connection at shutdown");
                return;
            }
            _ = activity.idle_for(config.http.idle_timeout) => {
                debug!("http: closing an idle connection");
                return;
            }
        }
    }
}

/// A stream that records each byte moved in its `Activity`, and fails a write (or
/// flush) that has not gone through for `send_timeout`: a client that reads nothing is
/// dropped, whatever is being sent to it. On plain TCP it sends the file ranges of its
/// `SendfileLane` where hyper writes their placeholders (see `sendfile`), counted and
/// bounded like any other write.
struct Tracked {
    inner: Stream,
    /// Plain TCP only.
    lane: Option<SendfileLane>,
    activity: Arc<Activity>,
    send_timeout: Duration,
    /// Since when a write has been waiting for the client, as the deadline's timer.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Tracked {
    /// Passes `polled` on, unless the write has been pending for `send_timeout`.
    fn bounded<T>(
        &mut self,
        cx: &mut TaskContext<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.send_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing for http.send_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.inner {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl Tracked {
    /// One vectored write: the slices up to the first placeholder, or, when a
    /// placeholder comes first, its file range by sendfile.
    fn write_vectored(
        &mut self,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let start = bufs
            .iter()
            .position(|b| !b.is_empty())
            .unwrap_or(bufs.len());
        let bufs = &bufs[start..];
        let end = bufs
            .iter()
            .position(|b| sendfile::is_placeholder(b))
            .unwrap_or(bufs.len());
        if end == 0
            && let Some(first) = bufs.first()
        {
            return match (&self.inner, &self.lane) {
                (Stream::Tcp(tcp), Some(lane)) => lane.poll_send(tcp, cx, first),
                _ => Poll::Ready(Err(placeholder_without_lane())),
            };
        }
        let bufs = &bufs[..end];
        match &mut self.inner {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

/// A placeholder where no file range can be sent for it: its zeros are never sent.
fn placeholder_without_lane() -> std::io::Error {
    std::io::Error::other("a sendfile placeholder was to be written without sendfile")
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        // hyper writes with poll_write only when it flattens body chunks into its own
        // buffer, where a placeholder can no longer be told from image bytes: with a
        // lane that must not happen (`writev(true)`), and it fails rather than send
        // zeros.
        if this.lane.is_some() {
            return Poll::Ready(Err(std::io::Error::other(
                "hyper copied body chunks on a connection that sends files with sendfile",
            )));
        }
        if sendfile::is_placeholder(buf) {
            return Poll::Ready(Err(placeholder_without_lane()));
        }
        let polled = match &mut this.inner {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        this.bounded(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = this.write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        this.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        };
        this.bounded(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().inner {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_separate_metrics_listener_takes_metrics_off_the_api() {
        let shared = Face::Api { metrics: true };
        let api = Face::Api { metrics: false };
        for path in ["/metrics", "/healthz", "/readyz", "/v2/cache"] {
            assert!(shared.serves(path), "{path}");
        }
        assert!(!api.serves("/metrics"));
        for path in ["/healthz", "/readyz", "/v2/cache", "/"] {
            assert!(api.serves(path), "{path}");
        }
        for path in ["/metrics", "/healthz", "/readyz"] {
            assert!(Face::Metrics.serves(path), "{path}");
        }
        for path in ["/v2/cache", "/", "/versions", "/metrics/"] {
            assert!(!Face::Metrics.serves(path), "{path}");
        }
    }
}
