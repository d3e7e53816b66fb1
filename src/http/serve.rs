//! `GET` and `HEAD /v2/images/{image_id}/file` for cached images, with glance-api's
//! headers (`Content-Type`, `Content-Length`, `Content-MD5` as hex), plus what glance-api
//! lacks: an `ETag`, one `Range` (206, or 416), `If-None-Match` and `If-Range`. Several
//! ranges are answered with the whole image, as nginx does. Who may download is
//! `serve_auth`'s decision, made before the file is opened. The body streams the file
//! in bounded chunks: on plain TCP sent by `sendfile` from the page cache (see
//! `super::sendfile`), else read on the blocking pool (see `FileBody`); an image of at
//! most `IN_MEMORY_BYTES` is read whole with its open (from the kernel's caches on the
//! runtime thread, else in the open's one trip to the blocking pool) and sent from
//! memory with the headers (see `MemoryBody`). The path comes only from the
//! `ImageId`, through the cache's directory handles.

use std::fs::File;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{
    ACCEPT_RANGES, ALLOW, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, HeaderValue,
    IF_NONE_MATCH, IF_RANGE, RANGE,
};
use hyper::{HeaderMap, Method, Response, StatusCode};
use tokio::task::JoinHandle;
use tracing::{debug, error};

use super::Shared;
use super::routes::{Reply, ReplyBody, text, whole};
use super::sendfile::{self, SendfileLane};
use super::serve_auth::{self, Peer};
use crate::cache::{CacheError, ReaderGuard};
use crate::image_id::ImageId;

/// Bytes per chunk of an image body read into memory (TLS, unix sockets). Large enough
/// that a read and a socket write per chunk cost little next to copying it (1 GiB is
/// 1024 of them), small enough that one connection holds at most two (the one being
/// written, the next being read) and that a huge image yields the runtime to other
/// connections between chunks: hyper polls the body once per chunk written.
const CHUNK_BYTES: u64 = 1 << 20;
/// Bytes per chunk of an image body sent with `sendfile` (one placeholder): larger, as
/// nginx's `sendfile_max_chunk`, since it holds no memory (see `sendfile`); a
/// `sendfile` sends at most what the socket takes, returning `WouldBlock` after.
const LANE_CHUNK_BYTES: u64 = sendfile::MAX_CHUNK_BYTES as u64;

/// The largest image a `GET` reads whole when it opens it (the open, the `fstat` and the
/// bytes from the kernel's caches, or in one trip to the blocking pool: see
/// `cache::served`) and sends from memory, headers and body in one write. Past it, the body streams from the file (`FileBody`): a chunk's advice or
/// read is another trip, which only costs little next to sending that many bytes.
const IN_MEMORY_BYTES: u64 = 64 << 10;

/// The image id of Glance's download path, `/v2/images/{image_id}/file`, as written
/// (not yet validated).
pub(crate) fn file_route(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/v2/images/")?.strip_suffix("/file")?;
    (!id.contains('/')).then_some(id)
}

/// A cached image opened for serving: the file, and what its row says.
pub(crate) struct Opened {
    pub(crate) file: File,
    /// The size of the open file (what is served).
    pub(crate) size: u64,
    /// The row's MD5, when the row has one and its size is the file's (else it is not
    /// the checksum of these bytes).
    pub(crate) checksum: Option<String>,
    /// See `etag`.
    pub(crate) etag: String,
    /// The whole file, read with the open (images up to `IN_MEMORY_BYTES`, `GET` only).
    pub(crate) contents: Option<Bytes>,
    /// This response's registration as a reader of the image, held by the body until
    /// its last byte is sent or the client is gone.
    pub(crate) reader: ReaderGuard,
}

/// Why an image could not be opened (other than not being cached).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Opens `id` from the cache (the one place that does, for this route): through the
/// driver's `open_to_serve`, which opens by the layout's handles, refuses what is not a
/// regular file, registers a reader (so an eviction meanwhile unlinks and lets the
/// body finish) and counts the hit in memory (the hit flusher writes it); for a `GET`
/// of a small image it reads the bytes too (`IN_MEMORY_BYTES`). `None` when it is not
/// cached.
pub(crate) async fn open_cached(
    state: &Shared,
    method: &Method,
    id: &ImageId,
) -> Result<Option<Opened>, ServeError> {
    let read_up_to = if method == Method::GET {
        IN_MEMORY_BYTES
    } else {
        0
    };
    let driver = &state.ctx.driver;
    let Some(mut served) = driver.open_to_serve_reading(id, read_up_to).await? else {
        return Ok(None);
    };
    let etag = etag(served.inode, served.modified, served.size);
    let (size, checksum, contents) = (served.size, served.checksum.take(), served.contents.take());
    let (file, reader) = served.into_parts();
    Ok(Some(Opened {
        file,
        size,
        checksum,
        etag,
        contents,
        reader,
    }))
}

/// The file's identity as an entity tag: inode, modification time (ns) and size of the
/// descriptor being served. A cached file is never rewritten in place: a new copy is
/// written aside and renamed over it (a new inode), and a write in place would move the
/// mtime; so other bytes always mean another tag. It describes the bytes actually sent,
/// which the row's checksum may not (the row is written after the file).
fn etag(inode: u64, modified: SystemTime, size: u64) -> String {
    let mtime_ns = match modified.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).unwrap_or(i128::MAX),
        Err(before) => -i128::try_from(before.duration().as_nanos()).unwrap_or(i128::MAX),
    };
    format!("\"{inode:x}-{mtime_ns:x}-{size:x}\"")
}

/// The route: authorization first (before the cache is even looked at, as Glance's
/// middleware runs before its router), then the file, then the headers.
pub(crate) async fn handle(
    state: &Shared,
    method: &Method,
    headers: &HeaderMap,
    peer: Option<Peer>,
    lane: Option<&SendfileLane>,
    raw_id: &str,
) -> Reply {
    if method != Method::GET && method != Method::HEAD {
        let mut reply = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "The method specified is not allowed for this resource.",
        );
        reply
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return reply;
    }
    let Ok(id) = ImageId::parse(raw_id) else {
        // Glance's auth comes before its lookup: a client without a token learns
        // nothing, not even that the id is malformed.
        if headers.get("x-auth-token").is_none()
            && state.upstream.as_ref().is_some_and(|u| u.is_glance())
        {
            return serve_auth::unauthorized();
        }
        return text(StatusCode::NOT_FOUND, "Image not found.");
    };
    if let Some(refused) = serve_auth::refusal(state, headers, peer, &id).await {
        return refused;
    }
    let opened = match open_cached(state, method, &id).await {
        Ok(Some(opened)) => opened,
        Ok(None) => {
            return super::serve_miss::answer(state, method, headers, lane, &id).await;
        }
        Err(e) => {
            error!(image_id = %id, error = %e, "http: cannot open a cached image");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "The cached image cannot be read now.",
            );
        }
    };
    debug!(image_id = %id, bytes = opened.size, "http: serving a cached image");
    answer(method, headers, opened, lane)
}

/// What a `Range` header asks of an image of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    Whole,
    /// Bytes `first..=last`.
    Part {
        first: u64,
        last: u64,
    },
    Unsatisfiable,
}

/// One range (`bytes=a-b`, `a-`, `-n`); several, or anything unparsable, is the whole
/// image (a server may ignore a `Range` it does not take, RFC 9110 14.2).
fn wanted(range: Option<&str>, size: u64) -> Wanted {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return Wanted::Whole;
    };
    if spec.contains(',') {
        return Wanted::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Wanted::Whole;
    };
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), number(first), number(last)) {
        // -n: the last n bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                Wanted::Unsatisfiable
            } else {
                Wanted::Part {
                    first: size.saturating_sub(n),
                    last: size - 1,
                }
            }
        }
        (false, Some(first), None) if last.trim().is_empty() => {
            if first >= size {
                Wanted::Unsatisfiable
            } else {
                Wanted::Part {
                    first,
                    last: size - 1,
                }
            }
        }
        (false, Some(first), Some(last)) if first <= last => {
            if first >= size {
                Wanted::Unsatisfiable
            } else {
                Wanted::Part {
                    first,
                    last: last.min(size - 1),
                }
            }
        }
        _ => Wanted::Whole,
    }
}

/// Whether an `If-None-Match` list names `etag` (weak comparison, RFC 9110 13.1.2).
fn none_match(header: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    header.trim() == "*" || header.split(',').any(|t| bare(t) == bare(etag))
}

/// The reply for an opened image; its body is sent by `lane` when there is one.
pub(crate) fn answer(
    method: &Method,
    headers: &HeaderMap,
    opened: Opened,
    lane: Option<&SendfileLane>,
) -> Reply {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let etag = opened.etag.clone();
    let mut response = Response::new(whole(Bytes::new()));
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    if header(IF_NONE_MATCH).is_some_and(|inm| none_match(inm, &etag)) {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return response;
    }
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(md5) = opened
        .checksum
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        h.insert("content-md5", md5);
    }
    // If-Range: the range holds only for this very file (a strong match of its tag; a
    // date cannot be matched, as no Last-Modified is sent), else the whole image.
    let range = match header(IF_RANGE) {
        Some(tag) if tag.trim() != etag => None,
        _ => header(RANGE),
    };
    let size = opened.size;
    let (first, len) = match wanted(range, size) {
        Wanted::Whole => {
            *response.status_mut() = StatusCode::OK;
            (0, size)
        }
        Wanted::Part { first, last } => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{last}/{size}")) {
                response.headers_mut().insert(CONTENT_RANGE, v);
            }
            (first, last - first + 1)
        }
        Wanted::Unsatisfiable => {
            let mut refused = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "Requested range not satisfiable",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                refused.headers_mut().insert(CONTENT_RANGE, v);
            }
            if let Ok(v) = HeaderValue::from_str(&etag) {
                refused.headers_mut().insert(ETAG, v);
            }
            return refused;
        }
    };
    response
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    if method == Method::GET && len > 0 {
        *response.body_mut() = match opened.contents {
            // `first + len` is at most `size`, the contents' length.
            Some(contents) => MemoryBody::reply_body(
                contents.slice(first as usize..(first + len) as usize),
                opened.file,
                opened.reader,
            ),
            None => FileBody::reply_body(opened.file, opened.reader, first, len, lane.cloned()),
        };
    }
    response
}

/// The body of a small image read whole at its open (`IN_MEMORY_BYTES`): one frame,
/// which hyper writes with the headers. It keeps the file and the reader's
/// registration until it ends (sent, or the client gone), as `FileBody` does: an
/// image evicted meanwhile counts as open-but-evicted while a response holds it.
struct MemoryBody {
    data: Option<Bytes>,
    /// The bytes' length, for the size hint once they are handed over.
    len: u64,
    _file: File,
    _reader: ReaderGuard,
}

impl MemoryBody {
    fn reply_body(data: Bytes, file: File, reader: ReaderGuard) -> ReplyBody {
        MemoryBody {
            len: data.len() as u64,
            data: Some(data),
            _file: file,
            _reader: reader,
        }
        .boxed_unsync()
    }
}

impl Body for MemoryBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.get_mut().data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(if self.data.is_some() { self.len } else { 0 })
    }
}

/// A body of `remaining` bytes of `file` from `offset`, `LANE_CHUNK_BYTES` at a time
/// with a lane, `CHUNK_BYTES` without.
///
/// With a `SendfileLane` (plain TCP), each chunk is queued on the lane and yielded as
/// its placeholder: the connection's IO sends it from the page cache with `sendfile`,
/// on the runtime thread. So that a cold file's reads are not waited for there, each
/// chunk's pages are asked for (`POSIX_FADV_WILLNEED`, on the blocking pool: it
/// submits the reads, which may wait on the disk's queue) one chunk ahead of its send;
/// a page still not read when its chunk is sent is waited for on the runtime thread,
/// for the rest of a read already under way.
///
/// Without (TLS, unix sockets), each chunk is read with `pread` on the blocking pool (a
/// slow disk never holds a runtime thread), the next while the last is written.
///
/// Either way, a file that ends early (truncated under us) fails the write or the
/// body, so hyper cuts the connection rather than send a short image.
struct FileBody {
    file: Arc<ServedFile>,
    offset: u64,
    /// Bytes not yet asked for.
    remaining: u64,
    /// Bytes not yet handed to hyper (the chunk being read included).
    unsent: u64,
    reading: Option<JoinHandle<std::io::Result<Bytes>>>,
    /// Where the chunks are queued for sendfile, when they are.
    lane: Option<SendfileLane>,
}

/// The served file with the response's reader registration, shared by the body, its
/// reads and the lane's queued ranges: the registration ends when the last of them lets
/// go, after the descriptor closes (fields drop in order). So an evicted image counts
/// as open exactly while a descriptor of it is: the body ends when its last chunk is
/// queued, and that chunk can still be on its way to a slow client.
struct ServedFile {
    file: File,
    _reader: ReaderGuard,
}

impl std::os::fd::AsFd for ServedFile {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl FileBody {
    fn reply_body(
        file: File,
        reader: ReaderGuard,
        offset: u64,
        len: u64,
        lane: Option<SendfileLane>,
    ) -> ReplyBody {
        let mut body = FileBody {
            file: Arc::new(ServedFile {
                file,
                _reader: reader,
            }),
            offset,
            remaining: len,
            unsent: len,
            reading: None,
            lane,
        };
        body.read_next();
        // The first chunk's advice cannot run ahead of its send (hyper writes it right
        // after the head), so it is given only when that chunk is not in memory: a body
        // of one chunk of a cached image (a 1 MiB range) then makes no trip to the
        // blocking pool. The later chunks' advice is given one chunk ahead, always (an
        // advice only where a probe found no page cost the 16-client throughput,
        // BENCHMARKS.md).
        let first = body.remaining.min(LANE_CHUNK_BYTES);
        if body.lane.is_some() && !sendfile::in_page_cache(&body.file.file, body.offset, first) {
            body.advise(body.offset);
        }
        body.boxed_unsync()
    }

    /// With a lane: asks the kernel to read the chunk at `offset` into the page cache
    /// (fire and forget: advice that fails only costs the wait it would have saved).
    fn advise(&self, offset: u64) {
        let end = self.offset.saturating_add(self.remaining);
        let Some(len) = std::num::NonZeroU64::new(end.saturating_sub(offset).min(LANE_CHUNK_BYTES))
        else {
            return;
        };
        if self.lane.is_none() {
            return;
        }
        let file = self.file.clone();
        drop(tokio::task::spawn_blocking(move || {
            let _ =
                rustix::fs::fadvise(&file.file, offset, Some(len), rustix::fs::Advice::WillNeed);
        }));
    }

    /// Starts reading the next chunk, if any is left and none is being read (never
    /// with a lane: sendfile reads).
    fn read_next(&mut self) {
        if self.reading.is_some() || self.remaining == 0 || self.lane.is_some() {
            return;
        }
        let len = self.remaining.min(CHUNK_BYTES);
        let (file, offset) = (self.file.clone(), self.offset);
        self.offset += len;
        self.remaining -= len;
        self.reading = Some(tokio::task::spawn_blocking(move || {
            let len = usize::try_from(len).map_err(std::io::Error::other)?;
            crate::cache::read_exact_at(&file.file, Vec::new(), offset, len)
        }));
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if let Some(lane) = &this.lane {
            if this.remaining == 0 {
                return Poll::Ready(None);
            }
            let len = this.remaining.min(LANE_CHUNK_BYTES);
            // LANE_CHUNK_BYTES fits in a usize.
            let file: sendfile::SentFile = this.file.clone();
            let placeholder = match lane.chunk(&file, this.offset, len as usize) {
                Ok(placeholder) => placeholder,
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            this.offset += len;
            this.remaining -= len;
            this.unsent -= len;
            // The chunk after the one hyper sends next.
            this.advise(this.offset);
            return Poll::Ready(Some(Ok(Frame::data(placeholder))));
        }
        let Some(reading) = this.reading.as_mut() else {
            return Poll::Ready(None);
        };
        let read = match Pin::new(reading).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(read) => read,
        };
        this.reading = None;
        match read {
            Ok(Ok(chunk)) => {
                this.unsent -= chunk.len() as u64;
                this.read_next();
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Ok(Err(e)) => Poll::Ready(Some(Err(e))),
            Err(joined) => Poll::Ready(Some(Err(std::io::Error::other(joined)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading.is_none() && self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.unsent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_download_path_is_glances() {
        assert_eq!(file_route("/v2/images/abc/file"), Some("abc"));
        assert_eq!(file_route("/v2/images/a/b/file"), None);
        assert_eq!(file_route("/v2/images/abc"), None);
        assert_eq!(file_route("/v2/images/abc/file/x"), None);
    }

    #[test]
    fn ranges_are_read_as_rfc_9110_has_them() {
        use Wanted::*;
        let part = |first, last| Part { first, last };
        assert_eq!(wanted(None, 10), Whole);
        assert_eq!(wanted(Some("bytes=0-0"), 10), part(0, 0));
        assert_eq!(wanted(Some("bytes=2-5"), 10), part(2, 5));
        assert_eq!(wanted(Some("bytes=2-50"), 10), part(2, 9));
        assert_eq!(wanted(Some("bytes=7-"), 10), part(7, 9));
        assert_eq!(wanted(Some("bytes=-3"), 10), part(7, 9));
        assert_eq!(wanted(Some("bytes=-30"), 10), part(0, 9));
        assert_eq!(wanted(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(wanted(Some("bytes=10-20"), 10), Unsatisfiable);
        assert_eq!(wanted(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(wanted(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(wanted(Some("bytes=0-1,3-4"), 10), Whole);
        assert_eq!(wanted(Some("bytes=5-2"), 10), Whole);
        assert_eq!(wanted(Some("bytes=x-2"), 10), Whole);
        assert_eq!(wanted(Some("bytes=+1-2"), 10), Whole);
        assert_eq!(wanted(Some("items=0-1"), 10), Whole);
        assert_eq!(wanted(Some("bytes=-"), 10), Whole);
    }

    #[test]
    fn if_none_match_compares_weakly() {
        assert!(none_match("\"a\"", "\"a\""));
        assert!(none_match("W/\"a\"", "\"a\""));
        assert!(none_match("\"b\", \"a\"", "\"a\""));
        assert!(none_match("*", "\"a\""));
        assert!(!none_match("\"b\"", "\"a\""));
    }
}
