//! Zero-copy image bodies on plain TCP: the file's bytes go from the page cache to the
//! socket with `sendfile(2)`, while hyper stays in charge of the connection (heads,
//! keep-alive, lengths, errors).
//!
//! A connection's IO (`server::Tracked`) holds a `SendfileLane`, and hyper finds it in
//! each request's extensions. A body with the lane (`serve::FileBody`) queues
//! `(file, offset, len)` for each chunk and hands hyper a placeholder of `len` bytes:
//! a slice of `ZEROS`, a static region that nothing else points into, so its address
//! says what it stands for (no allocation, no read). When hyper writes the placeholder,
//! `Tracked::poll_write_vectored` sends the queued file range instead.
//!
//! Why the placeholder reaches the IO as the same memory (read in `proto/h1/io.rs`,
//! `encode.rs` and `conn.rs` of hyper 1.12.0, the version in Cargo.lock; recheck them
//! when it moves): with an IO whose `is_write_vectored` is true, or
//! `http1::Builder::writev(true)`, which `server` sets for the connections with a lane,
//! hyper's `WriteBuf` uses its `Queue` strategy. A body chunk is pushed onto a
//! `BufList` as the `Bytes` it is, wrapped by the encoder (`Exact`; `Limited` when it
//! holds more than the `Content-Length` owes; a `Chain` of size line, chunk and CRLF for
//! chunked bodies), and flushed with `poll_write_vectored` of `chunks_vectored`, which
//! yields the `Bytes`' own slice; hyper advances it by the count the IO returns, so a
//! partly sent placeholder comes back as its rest. Chunks are written in the order the
//! body yields them, one response at a time, so the lane's order is the write order.
//! Only the `Flatten` strategy copies chunks (into hyper's head buffer), and it writes
//! with `poll_write`: `Tracked` fails a `poll_write` on a connection with a lane, and
//! any `poll_write` of a placeholder, so a flattening hyper cuts the connection instead
//! of sending zeros.
//!
//! Whatever does not add up fails the write, and hyper then drops the connection (a
//! client never takes a short or wrong body for a whole one): a placeholder with no
//! queued range, or one whose place in `ZEROS` or length is not what is left of the
//! first queued range (hyper wrote part of a chunk some other way, or a range was left
//! behind), or a file that ends before its range does (`sendfile` returns 0: truncated
//! under us).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, ready};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Whether the first and the last byte of `len` bytes of `file` from `offset` are in
/// the page cache: a read that may not wait for the disk (`RWF_NOWAIT`) gets them.
/// `serve` asks it of a body's first chunk before it hands that chunk's
/// `POSIX_FADV_WILLNEED` to the blocking pool: for a body of one chunk (a 1 MiB range)
/// of a cached image that trip was the one trip to the pool of the whole response. A
/// file system without `RWF_NOWAIT`, or a file shorter than the range, answers `false`,
/// so the advice is given as before.
pub(crate) fn in_page_cache(file: &File, offset: u64, len: u64) -> bool {
    let Some(last) = len.checked_sub(1).and_then(|l| offset.checked_add(l)) else {
        return false;
    };
    let mut byte = [0u8; 1];
    [offset, last].into_iter().all(|at| {
        let mut bufs = [io::IoSliceMut::new(&mut byte)];
        matches!(
            rustix::io::preadv2(file, &mut bufs, at, rustix::io::ReadWriteFlags::NOWAIT),
            Ok(1)
        )
    })
}

/// The largest placeholder, so the largest chunk a body may queue (`serve`'s chunk):
/// nginx's `sendfile_max_chunk` (2m by default since 1.21.4), so that one call moves
/// as much as nginx's and one huge image still yields to other connections between
/// chunks. 1 MiB cost twice the `sendfile` calls and hyper round trips (BENCHMARKS.md).
pub(crate) const MAX_CHUNK_BYTES: usize = 2 << 20;

/// Successive placeholders of a lane start `SLOT_STRIDE` bytes apart, over `SLOTS`
/// places, so a placeholder names its queued range by where it points: one left
/// behind by some path not foreseen here would not match the range after it.
const SLOTS: usize = 4096;
const SLOT_STRIDE: usize = 16;

/// Placeholders point into this and nothing else does. Never read: the bytes it stands
/// for are sent from the file. A `static` (unlike a `const`) has one address, and being
/// all zeros it takes no memory until touched (`.bss`).
static ZEROS: [u8; MAX_CHUNK_BYTES + SLOTS * SLOT_STRIDE] =
    [0; MAX_CHUNK_BYTES + SLOTS * SLOT_STRIDE];

/// Where `slice` starts in `ZEROS`, when it is (what is left of) a placeholder.
fn placeholder_at(slice: &[u8]) -> Option<usize> {
    let base = ZEROS.as_ptr() as usize;
    let at = (slice.as_ptr() as usize).checked_sub(base)?;
    (!slice.is_empty() && at < ZEROS.len()).then_some(at)
}

/// Whether `slice` is (what is left of) a placeholder.
pub(crate) fn is_placeholder(slice: &[u8]) -> bool {
    placeholder_at(slice).is_some()
}

/// What a range is sent from: an open file, shared with the body that queued it (which
/// may end before its last range is sent; whatever the file carries, such as the
/// response's reader registration, lives until the range is sent or dropped).
pub(crate) type SentFile = Arc<dyn AsFd + Send + Sync>;

/// A range of a file to send where its placeholder is written.
struct Queued {
    file: SentFile,
    offset: u64,
    /// Bytes not yet sent.
    len: usize,
    /// Where in `ZEROS` what is left of its placeholder starts.
    at: usize,
}

struct Queue {
    ranges: VecDeque<Queued>,
    /// The slot of the next placeholder.
    slot: usize,
}

/// One plain TCP connection's queue of file ranges, in the order hyper writes their
/// placeholders (a connection answers one request at a time, and a body's chunks are
/// written in the order it yields them).
#[derive(Clone)]
pub(crate) struct SendfileLane(Arc<Lane>);

struct Lane {
    queue: Mutex<Queue>,
    /// `glance_cached_http_sendfile_bytes_total`.
    sent: Counter,
}

impl SendfileLane {
    pub(crate) fn new(sent: Counter) -> SendfileLane {
        SendfileLane(Arc::new(Lane {
            queue: Mutex::new(Queue {
                ranges: VecDeque::new(),
                slot: 0,
            }),
            sent,
        }))
    }

    /// Queues `len` bytes of `file` from `offset` and returns the placeholder hyper is
    /// to write for them.
    pub(crate) fn chunk(&self, file: &SentFile, offset: u64, len: usize) -> io::Result<Bytes> {
        if len == 0 || len > MAX_CHUNK_BYTES {
            return Err(io::Error::other(format!(
                "a sendfile chunk of {len} bytes (1 to {MAX_CHUNK_BYTES})"
            )));
        }
        let mut queue = self.queue()?;
        let at = queue.slot * SLOT_STRIDE;
        queue.slot = (queue.slot + 1) % SLOTS;
        queue.ranges.push_back(Queued {
            file: file.clone(),
            offset,
            len,
            at,
        });
        Ok(Bytes::from_static(&ZEROS[at..at + len]))
    }

    fn queue(&self) -> io::Result<std::sync::MutexGuard<'_, Queue>> {
        self.0
            .queue
            .lock()
            .map_err(|_| io::Error::other("the sendfile queue is poisoned"))
    }

    /// Sends, for `placeholder` at the head of hyper's writes, at most its length of
    /// the first queued range to `tcp`; the count sent, which hyper then advances its
    /// chunk by.
    pub(crate) fn poll_send(
        &self,
        tcp: &TcpStream,
        cx: &mut TaskContext<'_>,
        placeholder: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(tcp.poll_write_ready(cx))?;
            // try_io clears the readiness on WouldBlock, so the next poll_write_ready
            // waits for the socket to drain rather than spin.
            match tcp.try_io(Interest::WRITABLE, || self.send(tcp, placeholder)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                sent => return Poll::Ready(sent),
            }
        }
    }

    fn send(&self, tcp: &TcpStream, placeholder: &[u8]) -> io::Result<usize> {
        let mut queue = self.queue()?;
        let Some(head) = queue.ranges.front_mut() else {
            return Err(io::Error::other(
                "a sendfile placeholder reached the socket with no file queued",
            ));
        };
        let len = placeholder.len();
        if placeholder_at(placeholder) != Some(head.at) || head.len != len {
            return Err(io::Error::other(format!(
                "a sendfile placeholder ({len} bytes at {:?}) that is not the queued range \
                 ({} bytes at {})",
                placeholder_at(placeholder),
                head.len,
                head.at
            )));
        }
        let mut offset = head.offset;
        let sent = rustix::fs::sendfile(tcp, &head.file, Some(&mut offset), len)?;
        if sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image file ended before its range (truncated while being served)",
            ));
        }
        head.offset += sent as u64;
        head.len -= sent;
        head.at += sent;
        if head.len == 0 {
            queue.ranges.pop_front();
        }
        self.0.sent.inc_by(sent as u64);
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_told_by_their_address() {
        let lane = SendfileLane::new(Counter::default());
        let file: SentFile = Arc::new(tempfile::tempfile().unwrap());
        let chunk = lane.chunk(&file, 0, 10).unwrap();
        assert!(is_placeholder(&chunk));
        assert!(is_placeholder(&chunk[3..]));
        assert!(!is_placeholder(&chunk[..0]));
        assert!(!is_placeholder(&[0u8; 10]), "zeros elsewhere are bytes");
        let heap: Vec<u8> = std::iter::repeat_n(0, 10).collect();
        assert!(!is_placeholder(&heap));
        let next = lane.chunk(&file, 0, MAX_CHUNK_BYTES).unwrap();
        assert!(is_placeholder(&next));
        assert_ne!(
            placeholder_at(&chunk),
            placeholder_at(&next),
            "one slot each"
        );
        assert!(lane.chunk(&file, 0, 0).is_err());
        assert!(lane.chunk(&file, 0, MAX_CHUNK_BYTES + 1).is_err());
    }

    #[tokio::test]
    async fn only_the_queued_range_is_sent_and_a_short_file_fails() {
        use std::io::Write;
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"0123456789").unwrap();
        let file: SentFile = Arc::new(file);
        let sent = Counter::default();
        let lane = SendfileLane::new(sent.clone());
        let send = |p: Bytes| {
            let lane = lane.clone();
            let tcp = &tcp;
            async move { std::future::poll_fn(|cx| lane.poll_send(tcp, cx, &p)).await }
        };
        let first = lane.chunk(&file, 2, 5).unwrap();
        let second = lane.chunk(&file, 0, 5).unwrap();
        assert!(send(second.clone()).await.is_err(), "not the first range");
        assert!(send(first.slice(1..)).await.is_err(), "not where it is");
        assert_eq!(send(first.clone()).await.unwrap(), 5);
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"23456");
        assert_eq!(sent.get(), 5);
        assert!(send(first).await.is_err(), "sent already");
        assert_eq!(send(second).await.unwrap(), 5);
        let beyond = lane.chunk(&file, 8, 5).unwrap();
        assert_eq!(send(beyond.clone()).await.unwrap(), 2, "what there is");
        let short = send(beyond.slice(2..)).await.unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof, "{short}");
    }

    #[test]
    fn what_the_page_cache_holds_is_told_without_a_read_from_disk() {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 8192]).unwrap();
        // Just written: its pages are in the page cache.
        assert!(in_page_cache(&file, 0, 8192));
        assert!(in_page_cache(&file, 4096, 1));
        assert!(!in_page_cache(&file, 0, 0), "an empty range");
        assert!(
            !in_page_cache(&file, 4096, 8192),
            "past the end of the file"
        );
        assert!(!in_page_cache(&file, u64::MAX, 2), "no such offset");
        // Bytes not in memory cannot be made on demand here: `POSIX_FADV_DONTNEED` leaves
        // pages another core still has queued for its LRU (it failed so in CI), and a hole
        // is filled with zeros by the very readahead the probe's read starts. Either
        // answer is safe for the caller: a miss costs one advice trip, a wrong hit leaves
        // the first chunk to `sendfile`, which read it on the runtime thread before too.
    }
}
