//! The answer to a download of an image that is not cached, once `serve_auth` said yes
//! (a miss is authorized exactly as a hit). `GET` follows the read-through fill of the
//! image (`prefetch::fill`: one download per image, joined by every request), reading
//! `incomplete/<id>` through the descriptor the writer opened, up to the bytes written
//! so far; a failed fill ends every body with an error (hyper then cuts the connection:
//! never a clean end). What is not filled here is streamed through from the upstream
//! without caching: `http.fill_on_miss = false`, an image too large for the cache or
//! fetched by another process, `HEAD`, and `Range` requests (passed on as a range; with
//! `http.fill_on_range` a fill starts beside them).

use std::fs::File;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderValue, RANGE};
use hyper::{HeaderMap, Method, Response, StatusCode};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error};

use super::Shared;
use super::routes::{Reply, ReplyBody, text, whole};
use super::sendfile::SendfileLane;
use crate::cache::{FillOutcome, FillState};
use crate::image_id::ImageId;
use crate::prefetch::Miss;
use crate::upstream::{ImageStream, Upstream, UpstreamError};

/// Bytes per read of a fill's file: as a cached file's (`serve`).
const CHUNK_BYTES: u64 = 1 << 20;

/// Chunks a body's producer runs ahead of its client (it waits beyond that, so a slow
/// client holds back its own reads only, never the fill).
const CHUNKS_AHEAD: usize = 2;

/// What a body's producer sends: a chunk, the clean end (`None`), or the error that
/// ends the body. A producer that goes without sending the end fails the body.
type Piece = std::io::Result<Option<Bytes>>;

/// The route's answer for `id`, not cached.
pub(crate) async fn answer(
    state: &Shared,
    method: &Method,
    headers: &HeaderMap,
    lane: Option<&SendfileLane>,
    id: &ImageId,
) -> Reply {
    let Some(upstream) = state.read_through.upstream().cloned() else {
        return text(StatusCode::NOT_FOUND, "Image not found.");
    };
    let config = state.ctx.config();
    if let Some(range) = headers.get(RANGE).and_then(|v| v.to_str().ok()) {
        if method == Method::GET && config.http.fill_on_range && config.http.fill_on_miss {
            let (state, id, config) = (state.clone(), id.clone(), config.clone());
            tokio::spawn(async move {
                if let Err(e) = state.read_through.miss(&id, &config).await {
                    error!(image_id = %id, error = %e, "read-through: cannot start a fill beside a range request");
                }
            });
        }
        if let Some(answered) = range_through(&upstream, method, id, range).await {
            return answered;
        }
    }
    if method == Method::HEAD {
        return stream_through(&upstream, method, id).await;
    }
    match state.read_through.miss(id, &config).await {
        Ok(Miss::Cached) => from_cache(state, method, headers, lane, id).await,
        Ok(Miss::Fill(following)) => match follow(following).await {
            Some(reply) => reply,
            // The fill ended before its file existed (too large for the cache, another
            // writer's file, cached meanwhile, an upstream error): served otherwise.
            None if state.ctx.driver.cached(id).await => {
                from_cache(state, method, headers, lane, id).await
            }
            None => stream_through(&upstream, method, id).await,
        },
        Ok(Miss::StreamThrough) => stream_through(&upstream, method, id).await,
        Err(e) => {
            error!(image_id = %id, error = %e, "read-through: cannot start a fill");
            stream_through(&upstream, method, id).await
        }
    }
}

/// Serves `id` from the cache, where it has just arrived.
async fn from_cache(
    state: &Shared,
    method: &Method,
    headers: &HeaderMap,
    lane: Option<&SendfileLane>,
    id: &ImageId,
) -> Reply {
    match super::serve::open_cached(state, method, id).await {
        Ok(Some(opened)) => super::serve::answer(method, headers, opened, lane),
        Ok(None) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "The image cannot be read now.",
        ),
        Err(e) => {
            error!(image_id = %id, error = %e, "http: cannot open a cached image");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "The cached image cannot be read now.",
            )
        }
    }
}

/// The reply that follows a fill from byte 0, once its file exists; `None` when the
/// fill ended without one.
async fn follow(mut following: watch::Receiver<FillState>) -> Option<Reply> {
    let ready = following
        .wait_for(|s| s.file.is_some() || s.outcome.is_some())
        .await
        .ok()?;
    let file = ready.file.clone()?;
    let (size, md5) = (ready.size, ready.md5.clone());
    drop(ready);
    let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
    tokio::spawn(read_fill(following, file, tx));
    Some(image_reply(StatusCode::OK, size, md5.as_deref(), None, rx))
}

/// Reads the fill's file as it grows, up to what was written, and ends as the fill
/// ends: the whole image once published, an error if it failed.
async fn read_fill(
    mut following: watch::Receiver<FillState>,
    file: Arc<File>,
    tx: mpsc::Sender<Piece>,
) {
    let mut offset = 0u64;
    loop {
        let (available, outcome) = {
            let s = following.borrow_and_update();
            match &s.outcome {
                Some(FillOutcome::Published { size }) => (*size, s.outcome.clone()),
                // The last byte waits for the verdict: hyper ends a body whose
                // Content-Length is sent, and a client that has every byte takes the
                // image for whole, verified or not.
                _ => match s.size {
                    Some(size) => (s.written.min(size.saturating_sub(1)), s.outcome.clone()),
                    None => (s.written, s.outcome.clone()),
                },
            }
        };
        if let Some(FillOutcome::Failed { reason }) = outcome {
            let _ = tx
                .send(Err(std::io::Error::other(format!(
                    "the download of the image failed: {reason}"
                ))))
                .await;
            return;
        }
        if offset < available {
            let len = (available - offset).min(CHUNK_BYTES);
            let piece = read_at(file.clone(), offset, len).await;
            let failed = piece.is_err();
            offset += len;
            if tx.send(piece.map(Some)).await.is_err() || failed {
                return;
            }
            continue;
        }
        if outcome.is_some() {
            let _ = tx.send(Ok(None)).await;
            return;
        }
        // Every sender gone: the fill has set its outcome before, seen next round.
        if following.changed().await.is_err() && following.borrow().outcome.is_none() {
            let _ = tx
                .send(Err(std::io::Error::other(
                    "the download of the image ended",
                )))
                .await;
            return;
        }
    }
}

/// `len` bytes of `file` at `offset`, read on the blocking pool into fresh (unzeroed)
/// memory: every follower of a fill reads every byte, so zeroing a buffer only to
/// overwrite it would be one more pass over each byte sent, per client.
async fn read_at(file: Arc<File>, offset: u64, len: u64) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            let n = rustix::io::pread(&*file, rustix::buffer::spare_capacity(&mut buf), at)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        // The spare capacity may have held more than asked for.
        buf.truncate(len);
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The whole image from the upstream, not cached (Glance's ranged request for all of
/// it, answered here as 200).
async fn stream_through(upstream: &Arc<Upstream>, method: &Method, id: &ImageId) -> Reply {
    let (meta, stream) = match upstream.fetch(id).await {
        Ok(fetched) => fetched,
        Err(e) => return upstream_failed(id, &e),
    };
    debug!(image_id = %id, "read-through: streaming through without caching");
    let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
    if method == Method::GET {
        tokio::spawn(pipe(stream, tx));
    }
    let mut reply = image_reply(StatusCode::OK, meta.size, meta.md5.as_deref(), None, rx);
    if method != Method::GET {
        *reply.body_mut() = whole(Bytes::new());
    }
    reply
}

/// A client's range passed to the upstream and its answer streamed back; `None` when
/// the upstream kind is not asked for ranges (the whole image is answered instead, as
/// a server may ignore a `Range`).
async fn range_through(
    upstream: &Arc<Upstream>,
    method: &Method,
    id: &ImageId,
    range: &str,
) -> Option<Reply> {
    let response = match upstream.fetch_range(id, range).await? {
        Ok(response) => response,
        Err(e) => return Some(upstream_failed(id, &e)),
    };
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::OK);
    let length = response.content_length();
    let content_range = response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let md5 = response
        .headers()
        .get("content-md5")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
    if method == Method::GET {
        tokio::spawn(pipe(ImageStream::Http(response), tx));
    }
    let mut reply = image_reply(status, length, md5.as_deref(), content_range.as_deref(), rx);
    if method != Method::GET {
        *reply.body_mut() = whole(Bytes::new());
    }
    Some(reply)
}

/// Copies an upstream stream into a body.
async fn pipe(mut stream: ImageStream, tx: mpsc::Sender<Piece>) {
    loop {
        let piece = match stream.next_chunk().await {
            Ok(Some(chunk)) => Ok(Some(chunk)),
            Ok(None) => {
                let _ = tx.send(Ok(None)).await;
                return;
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        let failed = piece.is_err();
        if tx.send(piece).await.is_err() || failed {
            return;
        }
    }
}

/// An upstream's refusal passed on (its 404, 416, ...); anything else is 502.
fn upstream_failed(id: &ImageId, e: &UpstreamError) -> Reply {
    if let UpstreamError::Status { status, .. } = e
        && status.is_client_error()
        && let Ok(status) = StatusCode::from_u16(status.as_u16())
    {
        return text(status, status.canonical_reason().unwrap_or("Refused"));
    }
    error!(image_id = %id, error = %e, "read-through: the upstream did not give the image");
    text(
        StatusCode::BAD_GATEWAY,
        "The image cannot be fetched from the upstream now.",
    )
}

/// An image reply with glance-api's headers, its body from `rx`.
fn image_reply(
    status: StatusCode,
    length: Option<u64>,
    md5: Option<&str>,
    content_range: Option<&str>,
    rx: mpsc::Receiver<Piece>,
) -> Reply {
    let mut response = Response::new(ChannelBody::reply_body(rx, length));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(length) = length {
        h.insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    if let Some(md5) = md5.and_then(|m| HeaderValue::from_str(m).ok()) {
        h.insert("content-md5", md5);
    }
    if let Some(range) = content_range.and_then(|r| HeaderValue::from_str(r).ok()) {
        h.insert(CONTENT_RANGE, range);
    }
    response
}

/// A body fed by a producer task: its chunks, then its end; the producer's error, or
/// its going away without an end, fails the body.
struct ChannelBody {
    rx: mpsc::Receiver<Piece>,
    /// Bytes still to come, when known.
    remaining: Option<u64>,
    done: bool,
}

impl ChannelBody {
    fn reply_body(rx: mpsc::Receiver<Piece>, length: Option<u64>) -> ReplyBody {
        ChannelBody {
            rx,
            remaining: length,
            done: false,
        }
        .boxed_unsync()
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let piece = match this.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(piece) => piece,
        };
        match piece {
            Some(Ok(Some(chunk))) => {
                if let Some(remaining) = &mut this.remaining {
                    *remaining = remaining.saturating_sub(chunk.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Some(Ok(None)) => {
                this.done = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.done = true;
                Poll::Ready(Some(Err(std::io::Error::other(
                    "the image's body ended unfinished",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
