//! Forwarding (`http.forward`): a request no route of ours answers goes to the Glance
//! upstream with its method, path, query, end-to-end headers (`X-Auth-Token` included)
//! and body, and the upstream's status, headers and body come back. Bodies are streamed
//! both ways, chunk by chunk: an image upload or download is never held in memory. The
//! one body read whole is a version document (`/`, `/versions`, a 300), capped at
//! `MAX_METADATA_BYTES`, when its links are rewritten to `http.public_url`.
//!
//! As a proxy must (RFC 9110 §7.6.1): `Connection` and the headers it names,
//! `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade` and `Proxy-*` are
//! dropped both ways; `X-Forwarded-For` gets the peer's address appended,
//! `X-Forwarded-Proto` and `X-Forwarded-Host` say how the client reached us, and `Host`
//! is the upstream's. `Expect` is answered by our own server (hyper sends the 100 when
//! the body is first read) and not forwarded.
//!
//! Endpoints: a request without a body is tried on the next endpoint when one cannot be
//! reached, and an idempotent one (GET, HEAD, OPTIONS, DELETE) also when one answers
//! 5xx; a request with a body goes to the first endpoint in health order only (its body
//! cannot be sent twice).
//!
//! Timeouts: the request body has `http.idle_timeout` between chunks (408 when it
//! stalls; forwarded bodies are not bounded by `http.max_request_body`); the upstream's
//! answer has `upstream.read_timeout` from the end of the request body and between
//! chunks of its body (504, or a cut connection once the body has begun).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST, HeaderName, HeaderValue, LOCATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::sync::oneshot;
use tokio::time::Sleep;
use tracing::{debug, error, warn};

use super::Shared;
use super::routes::{Reply, ReplyBody, text, whole};
use crate::image_id::ImageId;
use crate::metrics::EvictReason;
use crate::upstream::MAX_METADATA_BYTES;

/// How the client reached us (a request extension the server sets per connection).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientSide {
    /// `None` on a unix socket.
    pub(crate) ip: Option<IpAddr>,
    pub(crate) tls: bool,
}

/// Whether requests no route of ours answers are forwarded: `http.forward` and a
/// Glance upstream (the configuration refuses the one without the other).
pub(crate) fn enabled(state: &Shared) -> bool {
    state.ctx.config().http.forward
        && state
            .upstream
            .as_deref()
            .is_some_and(|u| u.glance().is_some())
}

/// Hop-by-hop headers a proxy drops (with `Proxy-*` and those `Connection` names).
const HOP_BY_HOP: [HeaderName; 6] = [CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE, EXPECT];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// The request's headers as the upstream gets them.
fn forwarded_headers(mut headers: HeaderMap, peer: Option<ClientSide>) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    let host = headers.remove(HOST);
    let mut chain: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    headers.remove("x-forwarded-for");
    if let Some(ip) = peer.and_then(|p| p.ip) {
        chain.push(ip.to_string());
    }
    if let Ok(value) = HeaderValue::from_str(&chain.join(", "))
        && !chain.is_empty()
    {
        headers.insert("x-forwarded-for", value);
    }
    let proto = if peer.is_some_and(|p| p.tls) {
        "https"
    } else {
        "http"
    };
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host);
    }
    headers
}

/// Forwards `request` to the Glance upstream and streams its answer back.
pub(crate) async fn forward(state: &Shared, request: Request<Incoming>) -> Reply {
    let Some(glance) = state.upstream.as_deref().and_then(|u| u.glance()) else {
        return text(StatusCode::BAD_GATEWAY, "No Glance upstream is configured.");
    };
    let config = state.ctx.config();
    let (parts, body) = request.into_parts();
    let peer = parts.extensions.get::<ClientSide>().copied();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let method = parts.method.clone();
    let headers = forwarded_headers(parts.headers, peer);
    let has_body = !body.is_end_stream();
    let stalled = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = oneshot::channel();
    let mut body = has_body.then(|| {
        reqwest::Body::wrap(RequestBody {
            inner: Idle::new(body, config.http.idle_timeout),
            stalled: stalled.clone(),
            done: Some(done_tx),
        })
    });
    let retry_5xx = !has_body
        && matches!(
            method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
        );
    let endpoints = glance.endpoints();
    let order = endpoints.order();
    let read_timeout = config
        .upstream
        .as_ref()
        .map_or(Duration::from_secs(60), |u| u.read_timeout);
    // The answer is waited for `read_timeout` from the end of the request body (at
    // once without one): an upload takes as long as its bytes take.
    let answer_deadline = async move {
        let _ = done_rx.await;
        tokio::time::sleep(read_timeout).await;
    };
    tokio::pin!(answer_deadline);
    let mut outcome = None;
    for (n, i) in order.iter().copied().enumerate() {
        let Some(endpoint) = endpoints.get(i) else {
            continue;
        };
        let last = n + 1 == order.len() || has_body;
        let mut upstream = glance
            .forward_client()
            .request(method.clone(), format!("{}{target}", endpoint.base()))
            .headers(headers.clone());
        if let Some(body) = body.take() {
            upstream = upstream.body(body);
        }
        let sent = tokio::select! {
            sent = upstream.send() => sent,
            () = &mut answer_deadline => {
                endpoints.record(i, false);
                state.ctx.metrics.forwarded(None);
                return text(StatusCode::GATEWAY_TIMEOUT, "The Glance upstream did not answer in time.");
            }
        };
        match sent {
            Ok(response) if response.status().is_server_error() && retry_5xx && !last => {
                endpoints.record(i, false);
                debug!(endpoint = i, status = %response.status(), "http: forwarded request failed; trying the next endpoint");
            }
            Ok(response) => {
                endpoints.record(i, !response.status().is_server_error());
                outcome = Some(Ok((i, response)));
                break;
            }
            Err(e) if stalled.load(Ordering::SeqCst) => {
                debug!(error = %e, "http: a forwarded request body stalled");
                state.ctx.metrics.forwarded(None);
                return text(StatusCode::REQUEST_TIMEOUT, "The request body stalled.");
            }
            Err(e) => {
                let unreachable = e.is_connect() || e.is_timeout();
                endpoints.record(i, !unreachable);
                let retry = unreachable && !has_body && !last;
                warn!(endpoint = i, error = %crate::upstream::http_error(e), retry, "http: cannot forward a request to the Glance upstream");
                if !retry {
                    outcome = Some(Err(unreachable));
                    break;
                }
            }
        }
    }
    let (index, response) = match outcome {
        Some(Ok(answer)) => answer,
        Some(Err(_)) | None => {
            state.ctx.metrics.forwarded(None);
            return text(
                StatusCode::BAD_GATEWAY,
                "The Glance upstream could not be reached.",
            );
        }
    };
    let status = response.status();
    state.ctx.metrics.forwarded(Some(status.as_u16()));
    if method == Method::DELETE && status.is_success() {
        forget_deleted(state, parts.uri.path()).await;
    }
    let response: Response<reqwest::Body> = response.into();
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let base = endpoints.get(index).map(|e| e.base().to_owned());
    let public = config.http.public_url.as_deref();
    if let (Some(public), Some(base)) = (public, &base) {
        relocate(&mut head.headers, base, public);
    }
    let body = Idle::new(body, read_timeout);
    let is_json = head
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let versions =
        matches!(parts.uri.path(), "/" | "/versions") || status == StatusCode::MULTIPLE_CHOICES;
    if let (Some(public), Some(base), true, true) = (public, &base, versions, is_json) {
        let collected = Limited::new(body, MAX_METADATA_BYTES).collect().await;
        let Ok(collected) = collected else {
            return text(
                StatusCode::BAD_GATEWAY,
                "The Glance upstream's version document could not be read.",
            );
        };
        let bytes = rewrite_version_links(collected.to_bytes(), base, public);
        head.headers.remove(CONTENT_LENGTH);
        return Response::from_parts(head, whole(bytes));
    }
    let body: ReplyBody = body.boxed_unsync();
    Response::from_parts(head, body)
}

/// After Glance deleted an image (a 2xx to `DELETE /v2/images/{id}`), its copy here
/// and its queue entry go too, as Glance's cache middleware removes them.
async fn forget_deleted(state: &Shared, path: &str) {
    let Some(id) = path
        .strip_prefix("/v2/images/")
        .filter(|id| !id.contains('/'))
        .and_then(|id| ImageId::parse(id).ok())
    else {
        return;
    };
    let driver = &state.ctx.driver;
    let size = state.ctx.db.cached_size(id.as_str()).await.ok().flatten();
    match driver.delete_cached_image(&id).await {
        Ok(true) => {
            let bytes = size.map_or(0, |n| u64::try_from(n).unwrap_or(0));
            state.ctx.metrics.evicted(EvictReason::Manual, 1, bytes);
        }
        Ok(false) => {}
        Err(e) => {
            error!(error = %e, image_id = %id, "http: cannot remove the cached copy of an image deleted upstream");
        }
    }
    if let Err(e) = driver.delete_queued_image(&id).await {
        error!(error = %e, image_id = %id, "http: cannot dequeue an image deleted upstream");
    }
}

/// `href` rewritten from the upstream endpoint `base` to `public`: the path below the
/// endpoint's own path is kept.
fn relink(href: &str, base: &str, public: &str) -> Option<String> {
    let public = public.trim_end_matches('/');
    if let Some(rest) = href.strip_prefix(base) {
        return Some(format!("{public}{rest}"));
    }
    // Glance links to its own idea of its URL (its Host, `public_endpoint`): keep the
    // path below the endpoint's path.
    let url = url::Url::parse(href).ok()?;
    let base_path = url::Url::parse(base)
        .ok()
        .map(|b| b.path().trim_end_matches('/').to_owned())
        .unwrap_or_default();
    let path = url.path();
    let path = path.strip_prefix(base_path.as_str()).unwrap_or(path);
    let query = url.query().map(|q| format!("?{q}")).unwrap_or_default();
    Some(format!("{public}{path}{query}"))
}

/// A `Location` into the upstream points at us instead.
fn relocate(headers: &mut HeaderMap, base: &str, public: &str) {
    let Some(location) = headers.get(LOCATION).and_then(|v| v.to_str().ok()) else {
        return;
    };
    if let Some(value) = location
        .strip_prefix(base)
        .map(|rest| format!("{}{rest}", public.trim_end_matches('/')))
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        headers.insert(LOCATION, value);
    }
}

/// Every `links[].href` of a version document (`versions[]`, `version`, at any depth)
/// relinked to `public`; a body that is not JSON passes as it came.
fn rewrite_version_links(body: Bytes, base: &str, public: &str) -> Bytes {
    fn walk(value: &mut serde_json::Value, base: &str, public: &str) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    if key == "href"
                        && let Some(new) = v.as_str().and_then(|h| relink(h, base, public))
                    {
                        *v = serde_json::Value::String(new);
                    } else {
                        walk(v, base, public);
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for v in items {
                    walk(v, base, public);
                }
            }
            _ => {}
        }
    }
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return body;
    };
    walk(&mut doc, base, public);
    Bytes::from(doc.to_string())
}

/// A body that fails with `TimedOut` when no frame comes for `idle`.
struct Idle<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<B> Idle<B> {
    fn new(inner: B, idle: Duration) -> Idle<B> {
        Idle {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<B> Body for Idle<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(|e| std::io::Error::other(e.to_string()))))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the body stalled",
                )))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's body on its way upstream: says when it stalled, and when it ended (the
/// wait for the upstream's answer starts then).
struct RequestBody {
    inner: Idle<Incoming>,
    stalled: Arc<AtomicBool>,
    done: Option<oneshot::Sender<()>>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(e))) => {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    this.stalled.store(true, Ordering::SeqCst);
                }
                this.done.take();
            }
            Poll::Ready(None) => {
                this.done.take();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, X-Foo"),
            ("x-foo", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "secret"),
            ("proxy-connection", "keep-alive"),
            ("x-auth-token", "t"),
            ("host", "edge:9393"),
            ("x-forwarded-for", "10.0.0.1"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let peer = ClientSide {
            ip: Some("127.0.0.2".parse().unwrap()),
            tls: false,
        };
        let out = forwarded_headers(h, Some(peer));
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "x-auth-token",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host"
            ]
        );
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(out["x-forwarded-host"], "edge:9393");
    }

    #[test]
    fn version_links_point_at_the_public_url() {
        let doc = br#"{"versions":[{"id":"v2.17","links":[{"rel":"self","href":"http://10.0.0.5:9292/v2/"}]}]}"#;
        let out = rewrite_version_links(
            Bytes::from_static(doc),
            "http://10.0.0.5:9292",
            "https://edge.example.org/",
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["versions"][0]["links"][0]["href"],
            "https://edge.example.org/v2/"
        );
        // Glance's own idea of its host, under the endpoint's path.
        assert_eq!(
            relink(
                "http://glance.internal/image/v2/",
                "https://central/image",
                "https://edge"
            )
            .unwrap(),
            "https://edge/v2/"
        );
    }
}
