//! Paths and methods. The cache API's are Glance 33's (`glance/api/v2/router.py`): a
//! known path with another method is 405 with `Allow`, as Glance's reject controller
//! answers; the cache API asks for its token before anything else, as Glance's auth
//! middleware runs before its router. Ids in paths become `ImageId`s or 404 (Glance
//! looks an unknown id up and does not find it).

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tracing::debug;

use super::{Shared, auth, cache_api, health, proxy, serve};
use crate::image_id::ImageId;

/// A response body: whole (`Full`, most replies) or streamed (an image file, a
/// forwarded upstream body), boxed so every route answers with one type. Its error is
/// I/O: a streamed body that fails midway aborts the connection, so the client never
/// takes a cut body for a whole one.
pub(crate) type ReplyBody = UnsyncBoxBody<Bytes, std::io::Error>;

pub(crate) type Reply = Response<ReplyBody>;

/// A whole body, boxed.
pub(crate) fn whole(bytes: impl Into<Bytes>) -> ReplyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A reply with a body of `content_type`.
pub(crate) fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(whole(body));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    reply(status, "application/json", value.to_string())
}

/// A status without a body (204, 202, Glance's 200 of clean).
pub(crate) fn empty(status: StatusCode) -> Reply {
    let mut response = Response::new(whole(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// An error as text, as Glance's webob errors read.
pub(crate) fn text(status: StatusCode, message: &str) -> Reply {
    reply(status, "text/plain; charset=UTF-8", format!("{message}\n"))
}

fn not_allowed(allow: &'static str) -> Reply {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "The method specified is not allowed for this resource.",
    );
    response
        .headers_mut()
        .insert(ALLOW, hyper::header::HeaderValue::from_static(allow));
    response
}

/// A route, once its path is known.
enum Route {
    /// Glance's version document (`/` answers it with 300, `/versions` with 200): the
    /// client asks it whether the cache API (v2.14, clean and prune from v2.18) is
    /// there.
    Versions {
        explicit: bool,
    },
    Healthz,
    Readyz,
    Metrics,
    Cache,
    CacheClean,
    CachePrune,
    CacheNodes(String),
    CacheEntry(String),
}

fn route(path: &str) -> Option<Route> {
    Some(match path {
        "/" => Route::Versions { explicit: false },
        "/versions" => Route::Versions { explicit: true },
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        "/metrics" => Route::Metrics,
        "/v2/cache" => Route::Cache,
        "/v2/cache/clean" => Route::CacheClean,
        "/v2/cache/prune" => Route::CachePrune,
        _ => {
            let rest = path.strip_prefix("/v2/cache/")?;
            match rest.strip_prefix("nodes/") {
                Some(id) if !id.contains('/') => Route::CacheNodes(id.to_owned()),
                Some(_) => return None,
                None if !rest.contains('/') => Route::CacheEntry(rest.to_owned()),
                None => return None,
            }
        }
    })
}

/// Glance's answer for an image it does not know (an id that is not one included).
fn not_found() -> Reply {
    text(StatusCode::NOT_FOUND, "Image not found.")
}

pub(crate) async fn handle(state: Shared, request: Request<Incoming>) -> Reply {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let method = parts.method.clone();
    debug!(%method, path = %path.escape_debug(), "http request");
    // Downloads are ours; an upload to the same path (`PUT .../file`) is Glance's, so
    // with forwarding on it goes there (without, `serve` answers it 405).
    if let Some(id) = serve::file_route(&path)
        && (method == Method::GET || method == Method::HEAD || !proxy::enabled(&state))
    {
        let peer = parts.extensions.get().copied();
        let lane = parts.extensions.get();
        return serve::handle(&state, &method, &parts.headers, peer, lane, id).await;
    }
    // Forwarding: what no route of ours answers, and the version document (the
    // upstream's is the one that lists its API), go to the upstream before any body is
    // read here (an upload is streamed through, never collected).
    let ours = route(&path).filter(|r| !matches!(r, Route::Versions { .. }));
    if ours.is_none() && proxy::enabled(&state) {
        return proxy::forward(&state, Request::from_parts(parts, body)).await;
    }
    let Some(route) = route(&path) else {
        // Anything under /v2 is behind Glance's auth middleware, known or not.
        if (path.starts_with("/v2/") || path == "/v2")
            && let Some(refused) = auth::refusal(&state, &parts.headers).await
        {
            return refused;
        }
        return text(StatusCode::NOT_FOUND, "The resource could not be found.");
    };
    let config = state.ctx.config();
    let limit = config.http.max_request_body;
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("The request body is larger than {limit} bytes."),
        )
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return too_large();
    }
    if !matches!(
        route,
        Route::Healthz | Route::Readyz | Route::Metrics | Route::Versions { .. }
    ) && let Some(refused) = auth::refusal(&state, &parts.headers).await
    {
        return refused;
    }
    // Read (and bound) the body before answering: the cache API takes none, but a
    // client's body must not be left unread nor be larger than allowed. A body that
    // stalls is cut by the idle timeout.
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let collect = tokio::time::timeout(config.http.idle_timeout, limited.collect());
    let body = match collect.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => return too_large(),
        Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "The request body stalled."),
    };
    let no_body = |reply: Reply| -> Reply {
        // Glance's `body_reject` routes (GETs) refuse a body.
        if body.is_empty() {
            reply
        } else {
            text(
                StatusCode::BAD_REQUEST,
                "This operation does not accept a request body.",
            )
        }
    };
    match (route, method) {
        (Route::Versions { explicit }, Method::GET) => versions(&parts.headers, explicit),
        (Route::Versions { .. }, _) => not_allowed("GET"),
        (Route::Healthz, Method::GET) => health::healthz(&state),
        (Route::Readyz, Method::GET) => health::readyz(&state),
        (Route::Metrics, Method::GET) => metrics(&state),
        (Route::Healthz | Route::Readyz | Route::Metrics, _) => not_allowed("GET"),
        (Route::Cache, Method::GET) if !body.is_empty() => no_body(empty(StatusCode::OK)),
        (Route::Cache, Method::GET) => cache_api::state(&state).await,
        (Route::Cache, Method::DELETE) => cache_api::clear(&state, &parts.headers).await,
        (Route::Cache, _) => not_allowed("GET, DELETE"),
        (Route::CacheClean, Method::POST) => cache_api::clean(&state).await,
        (Route::CacheClean, _) => not_allowed("POST"),
        (Route::CachePrune, Method::POST) => cache_api::prune(&state).await,
        (Route::CachePrune, _) => not_allowed("POST"),
        (Route::CacheNodes(_), Method::GET) if !body.is_empty() => no_body(empty(StatusCode::OK)),
        (Route::CacheNodes(id), Method::GET) => match ImageId::parse(&id) {
            Ok(id) => cache_api::nodes(&state, &id).await,
            Err(_) => not_found(),
        },
        (Route::CacheNodes(_), _) => not_allowed("GET"),
        (Route::CacheEntry(id), Method::PUT) => match ImageId::parse(&id) {
            Ok(id) => cache_api::queue(&state, &id).await,
            Err(_) => not_found(),
        },
        (Route::CacheEntry(id), Method::DELETE) => match ImageId::parse(&id) {
            Ok(id) => cache_api::delete(&state, &id).await,
            Err(_) => not_found(),
        },
        (Route::CacheEntry(_), _) => not_allowed("DELETE, PUT"),
    }
}

/// The Prometheus scrape: what the loops recorded, encoded, and the readers' and
/// pending hits' gauges read now; no query, no file.
fn metrics(state: &Shared) -> Reply {
    state.ctx.publish_reader_metrics();
    match state.ctx.metrics.encode() {
        Ok(text) => reply(StatusCode::OK, crate::metrics::CONTENT_TYPE, text),
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The metrics could not be encoded.",
        ),
    }
}

/// The versions of Glance's v2 API that the cache API of Glance 33 answers to, as its
/// `versions` controller lists them with a cache configured (the image API itself is
/// not served here).
const VERSIONS: &[(&str, &str)] = &[
    ("v2.18", "CURRENT"),
    ("v2.17", "SUPPORTED"),
    ("v2.16", "SUPPORTED"),
    ("v2.15", "SUPPORTED"),
    ("v2.14", "SUPPORTED"),
];

fn versions(headers: &hyper::HeaderMap, explicit: bool) -> Reply {
    // Glance links to its own application URL; the Host header is ours.
    let host = headers
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".:[]-_".contains(c))
        })
        .unwrap_or("localhost");
    let list: Vec<_> = VERSIONS
        .iter()
        .map(|(id, status)| {
            serde_json::json!({
                "id": id,
                "status": status,
                "links": [{"rel": "self", "href": format!("http://{host}/v2/")}],
            })
        })
        .collect();
    let status = if explicit {
        StatusCode::OK
    } else {
        StatusCode::MULTIPLE_CHOICES
    };
    json(status, &serde_json::json!({ "versions": list }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_as_glance_routes_them() {
        assert!(matches!(route("/v2/cache"), Some(Route::Cache)));
        assert!(matches!(route("/v2/cache/clean"), Some(Route::CacheClean)));
        assert!(matches!(route("/v2/cache/prune"), Some(Route::CachePrune)));
        assert!(matches!(route("/v2/cache/nodes/abc"), Some(Route::CacheNodes(id)) if id == "abc"));
        assert!(matches!(route("/v2/cache/abc"), Some(Route::CacheEntry(id)) if id == "abc"));
        assert!(route("/v2/cache/a/b").is_none());
        assert!(route("/v2/cache/nodes/a/b").is_none());
        assert!(matches!(route("/metrics"), Some(Route::Metrics)));
        assert!(route("/metrics/x").is_none());
    }
}
