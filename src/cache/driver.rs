//! `CacheDriver`: the method-by-method API of Glance's `centralized_db` driver, with the
//! differences the specification decides (validated ids, queue table, O_EXCL writers,
//! verified publishes, ordered listings, no infinite prune).

use std::fs::File;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::{debug, info, warn};

use super::CacheError;
use super::layout::{Area, CacheLayout, Listing};
use super::writer::{Expectations, ImageWriter, Published};
use crate::clock;
use crate::db::{Db, DbTime, NodeDb, QueueState};
use crate::image_id::ImageId;

/// One cached image of this node, as listed by `get_cached_images`.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedImage {
    pub image_id: ImageId,
    pub size: u64,
    pub hits: u64,
    pub last_accessed: DateTime<Utc>,
    pub last_modified: DateTime<Utc>,
    pub checksum: Option<String>,
}

/// One queued image of this node, as listed by `get_queued_images`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedImage {
    pub image_id: ImageId,
    pub queued_at: DateTime<Utc>,
    pub attempts: u64,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// `Failed`: dropped, with `last_error` as the reason.
    pub state: QueueState,
    /// The process downloading it now (a daemon or a `prefetch` command, as "host pid
    /// N"), while its claim lasts.
    pub downloading_by: Option<String>,
}

/// A queue row as a `QueuedImage`, as of `now` (a claim that ran out is no download).
pub(crate) fn queued_image(r: crate::db::QueueRow, now: DateTime<Utc>) -> QueuedImage {
    QueuedImage {
        image_id: r.image_id,
        queued_at: r.queued_at.to_utc(),
        attempts: r.attempts.max(0) as u64,
        next_attempt_at: r.next_attempt_at.to_utc(),
        last_error: r.last_error,
        state: r.state,
        downloading_by: r
            .claimed_by
            .filter(|_| r.claimed_until.is_some_and(|t| t.to_utc() > now)),
    }
}

/// The cache of one node: its directory, its database and its node row. Cheap to clone.
#[derive(Clone)]
pub struct CacheDriver {
    inner: Arc<Inner>,
}

struct Inner {
    layout: CacheLayout,
    db: NodeDb,
    /// Held by the one prune pass of this process (see `PrunePass`).
    prune_turn: Arc<tokio::sync::Mutex<()>>,
    /// Hits counted in memory until a flush writes them (`hits`).
    hits: super::hits::HitBook,
    /// The images open for reading, and those evicted while read (`readers`).
    readers: Arc<super::readers::Readers>,
    /// The writes into the cache in progress in this process (`filling`).
    fills: Arc<super::filling::Fills>,
    /// The rows of files opened for serving, by the file's identity (`served`).
    rows: super::served::RememberedRows,
}

impl CacheDriver {
    /// Glance's `configure` on an opened layout (`CacheLayout::open` made and holds the
    /// directories): migrates the schema and registers this node.
    pub async fn configure(
        layout: CacheLayout,
        db: Db,
        node_url: &str,
    ) -> Result<Self, CacheError> {
        let db = NodeDb::configure(db, node_url).await?;
        Ok(Self::new(layout, db))
    }

    /// The driver of the node `db` is bound to, on an opened layout.
    pub fn new(layout: CacheLayout, db: NodeDb) -> Self {
        CacheDriver {
            inner: Arc::new(Inner {
                layout,
                db,
                prune_turn: Arc::default(),
                hits: Default::default(),
                readers: Arc::default(),
                fills: Arc::default(),
                rows: Default::default(),
            }),
        }
    }

    /// The writes into the cache in progress in this process: every download registers
    /// there while it runs, and readers of an image not yet cached follow it.
    pub(crate) fn fills(&self) -> &Arc<super::filling::Fills> {
        &self.inner.fills
    }

    /// The held directories, for the cache's own submodules: whoever else needs them
    /// keeps the `CacheLayout` it opened.
    pub(super) fn layout(&self) -> &CacheLayout {
        &self.inner.layout
    }

    /// The node's database, for the cache's own submodules: whoever else needs it keeps
    /// the `NodeDb` it opened.
    pub(super) fn db(&self) -> &NodeDb {
        &self.inner.db
    }

    /// The hits not yet written, for the cache's own submodules.
    pub(super) fn hit_book(&self) -> &super::hits::HitBook {
        &self.inner.hits
    }

    /// The table of open images, for the cache's own submodules.
    pub(super) fn readers(&self) -> &Arc<super::readers::Readers> {
        &self.inner.readers
    }

    pub(super) fn remembered_rows(&self) -> &super::served::RememberedRows {
        &self.inner.rows
    }

    /// Open readers and open-but-evicted images and bytes, now.
    pub fn reader_stats(&self) -> super::readers::ReaderStats {
        self.inner.readers.stats()
    }

    /// Evicts `id`'s cached file on a blocking thread (`evict::evict_file`: never
    /// breaking a reader, paced for a large file); `None` when there was none.
    pub(super) async fn evict(
        &self,
        id: &ImageId,
    ) -> Result<Option<super::evict::Evicted>, CacheError> {
        let (layout, readers, file_id) =
            (self.layout().clone(), self.readers().clone(), id.clone());
        blocking(move || super::evict::evict_file(&layout, &readers, Area::Cached, &file_id))
            .await
            .map_err(CacheError::io(
                "delete cached image",
                self.layout().path(Area::Cached, id),
            ))
    }

    /// Glance's `get_image_filepath`: where `id`'s entry in `area` is, to be shown in
    /// messages (every file operation goes through the layout's handles).
    pub fn get_image_filepath(&self, id: &ImageId, area: Area) -> std::path::PathBuf {
        self.layout().path(area, id)
    }

    /// Waits until no other prune of this process runs, and holds the turn.
    pub(super) async fn prune_turn(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.inner.prune_turn.clone().lock_owned().await
    }

    /// Whether `id` is cached: from memory when the kernel can tell without waiting on
    /// the disk (`CacheLayout::try_cached_exists`), else asked from a blocking thread
    /// (see `blocking`). The trip to the pool was most of a `get_hit_count`.
    pub async fn cached(&self, id: &ImageId) -> bool {
        if let Some(cached) = self.layout().try_cached_exists(id) {
            return cached;
        }
        self.in_area(Area::Cached, id).await
    }

    /// Which of `ids` are cached, asked in one trip to a blocking thread (a stat each).
    async fn cached_among(&self, ids: Vec<ImageId>) -> std::collections::HashSet<ImageId> {
        if ids.is_empty() {
            return Default::default();
        }
        let layout = self.layout().clone();
        blocking(move || {
            ids.into_iter()
                .filter(|id| layout.exists(Area::Cached, id))
                .collect()
        })
        .await
    }

    /// Whether `area` has an entry for `id`, asked from a blocking thread.
    async fn in_area(&self, area: Area, id: &ImageId) -> bool {
        let (layout, id) = (self.layout().clone(), id.clone());
        blocking(move || layout.exists(area, &id)).await
    }

    /// Blocking: a stat. Async code asks `cached` instead.
    pub fn is_cached(&self, id: &ImageId) -> bool {
        self.layout().exists(Area::Cached, id)
    }

    pub fn is_being_cached(&self, id: &ImageId) -> bool {
        self.layout().exists(Area::Incomplete, id)
    }

    pub fn is_cacheable(&self, id: &ImageId) -> bool {
        !(self.is_cached(id) || self.is_being_cached(id))
    }

    /// Queued when this node has a queue row or a marker file for it.
    pub async fn is_queued(&self, id: &ImageId) -> Result<bool, CacheError> {
        Ok(self.in_area(Area::Queue, id).await || self.db().is_queued(id.as_str()).await?)
    }

    /// Queues `id` unless it is cached, being cached or queued (checked in that order, as
    /// Glance does), as Glance does it: the marker file in `queue/`, no database write.
    /// The marker is the queue entry that lasts (Glance's API reads it, a crash cannot
    /// lose it); its row, which orders and claims it, is added by the next adoption of
    /// markers (`adopt_queue_markers`: the daemon's queue loop, woken by the marker's
    /// event, adopts a pass's new markers in one transaction; the queue's listing
    /// adopts first too). A commit per request was most of what queueing cost.
    pub async fn queue_image(&self, id: &ImageId) -> Result<bool, CacheError> {
        self.create_queue_marker(id).await
    }

    /// `queue_image` with the row added at once, so that the image can be claimed now
    /// (a read-through fill claims what it queued). A queued row always had its marker
    /// first, so one found without it was dequeued through Glance (see
    /// `adopt_queue_markers`).
    pub(crate) async fn queue_claimable(&self, id: &ImageId) -> Result<bool, CacheError> {
        // The request's time, taken before the marker exists: a daemon may adopt the
        // marker, try the image and give up on it before the insert below, which must
        // then not revive the failure (it is newer than the request).
        let requested = clock::system_now();
        if !self.create_queue_marker(id).await? {
            return Ok(false);
        }
        // The insert adds nothing when a row is queued already (the queue loop may have
        // adopted the marker just made): queued either way.
        let queued_at = DbTime::from_mtime(requested).unwrap_or_else(|clamped| clamped);
        self.db().enqueue(id.as_str(), queued_at).await?;
        // A prefetcher may have claimed, published and dequeued the image meanwhile:
        // then the marker is stale and goes. One stat on the held root handle, made here:
        // it reads no directory the marker's create did not just bring into memory.
        if self.is_cached(id) {
            self.dequeue_cached(id).await?;
        }
        Ok(true)
    }

    /// `queue_image`'s checks and marker, in one `blocking_here` call: the create writes
    /// a directory and can wait on the journal, so this worker's other tasks move to
    /// another thread first (ARCHITECTURE.md); the call itself makes no round trip to
    /// the blocking pool, which was most of its cost off the disk (some 14 of 24 us a
    /// call on a tmpfs). Returns whether the marker was made.
    async fn create_queue_marker(&self, id: &ImageId) -> Result<bool, CacheError> {
        let (layout, marker_id) = (self.layout().clone(), id.clone());
        let refused = crate::blocking_here(move || {
            if layout.exists(Area::Cached, &marker_id) {
                return Ok(Some("already cached"));
            }
            if layout.exists(Area::Incomplete, &marker_id) {
                return Ok(Some("being written to the cache"));
            }
            // A marker alone (Glance's PUT /v2/cache/{id}) means queued: the exclusive
            // create is that check and the marker at once.
            if !layout.create_marker(&marker_id)? {
                return Ok(Some("already queued"));
            }
            // Published between the first check and the create (a prefetcher's
            // download ending): the marker just made is stale, and it goes, as the
            // next adoption would take it. One stat in a directory already in memory.
            if layout.exists(Area::Cached, &marker_id) {
                layout.remove(Area::Queue, &marker_id)?;
                return Ok(Some("cached meanwhile"));
            }
            Ok(None)
        })
        .await
        .map_err(|e: std::io::Error| {
            CacheError::io("create queue marker", self.layout().path(Area::Queue, id))(e)
        })?;
        if let Some(reason) = refused {
            debug!(image_id = %id, "not queueing: {reason}");
            return Ok(false);
        }
        Ok(true)
    }

    /// The queue in order (queued time, then id). Marker files without a row, such as
    /// those Glance's `PUT /v2/cache/{id}` creates, are adopted first with their mtime as
    /// the queued time.
    pub async fn get_queued_images(&self) -> Result<Vec<QueuedImage>, CacheError> {
        self.adopt_queue_markers().await?;
        let rows = self.db().queued_images().await?;
        let now = clock::now();
        Ok(rows.into_iter().map(|r| queued_image(r, now)).collect())
    }

    /// Gives every marker in `queue/` without a row a row, and takes off the queue the
    /// rows whose marker is gone (Glance's `DELETE /v2/cache/{id}` or clear-queue: the
    /// queue is shared both ways). Returns how many markers were adopted.
    ///
    /// A queued row always had its marker first (`queue_image`, adoption), so a row read
    /// before the markers are listed whose marker is missing was dequeued. Claimed rows
    /// are left to their download; rows of cached images to the prefetcher, which
    /// settles them (and gives a published file its row).
    pub async fn adopt_queue_markers(&self) -> Result<u64, CacheError> {
        // Rows first, then markers: a marker made for a row read here already exists.
        // Most markers are of images queued long ago (a marker stays until its image is
        // cached): one query tells which, instead of two statements per marker per pass.
        let queued = self.db().queued_ids().await?;
        let listing = self.list(Area::Queue).await?;
        self.layout().report_skipped(
            "skipping queue entries that are not regular files named by an image id",
            &listing.skipped,
        );
        // A marker for a cached image is stale (the image was published after the
        // listing, or Glance queued a cached image): never queue a cached image.
        let cached = self
            .cached_among(listing.files.iter().map(|m| m.image_id.clone()).collect())
            .await;
        let mut new = Vec::new();
        for marker in &listing.files {
            let id = &marker.image_id;
            if cached.contains(id) {
                self.dequeue_cached(id).await?;
                continue;
            }
            if queued.contains_key(id) {
                continue;
            }
            let queued_at = DbTime::from_mtime(marker.modified).unwrap_or_else(|clamped| {
                warn!(image_id = %id, "queue marker's mtime is out of range; queued at the nearest storable time");
                clamped
            });
            new.push((id, queued_at));
        }
        // The pass's new markers in one transaction, then one look for those published
        // (and dequeued) between the check and the insert, which are undone.
        let rows: Vec<(&str, DbTime)> = new.iter().map(|(id, at)| (id.as_str(), *at)).collect();
        let newly = self.db().enqueue_all(&rows).await?;
        let enqueued: Vec<ImageId> = new
            .iter()
            .zip(newly)
            .filter(|(_, newly)| *newly)
            .map(|((id, _), _)| (*id).clone())
            .collect();
        let published = self.cached_among(enqueued.clone()).await;
        let mut adopted = 0;
        for id in &enqueued {
            if published.contains(id) {
                self.dequeue_cached(id).await?;
                continue;
            }
            debug!(image_id = %id, "adopted queue marker");
            adopted += 1;
        }
        let marked: std::collections::HashSet<&ImageId> =
            listing.files.iter().map(|m| &m.image_id).collect();
        for (id, claimed) in &queued {
            if *claimed || marked.contains(id) {
                continue;
            }
            self.dequeue_unmarked(id, None).await?;
        }
        Ok(adopted)
    }

    /// Takes `id`, queued but without its marker, off the queue (unless it is cached:
    /// the prefetcher settles those), if it is still unclaimed or claimed by `holder`.
    /// Returns whether it went.
    pub(super) async fn dequeue_unmarked(
        &self,
        id: &ImageId,
        holder: Option<&str>,
    ) -> Result<bool, CacheError> {
        if self.is_cached(id) {
            return Ok(false);
        }
        let dequeued = self.db().dequeue_if_idle(id.as_str(), holder).await?;
        if dequeued {
            info!(image_id = %id, "dequeued: its queue marker was removed (through Glance's API)");
        }
        Ok(dequeued)
    }

    /// Takes `id`, found cached, off the queue. Its writer may have published the file
    /// and then lost the database before writing the row (an outage): the file gets its
    /// row first, so a queue entry never goes while its image lacks one. Every path that
    /// finds a queued image already cached comes through here.
    pub async fn dequeue_cached(&self, id: &ImageId) -> Result<(), CacheError> {
        self.adopt_cached_file(id).await?;
        self.delete_queued_image(id).await?;
        Ok(())
    }

    /// Removes `id` from the queue: its row and its marker. Returns 1 if it was queued.
    pub async fn delete_queued_image(&self, id: &ImageId) -> Result<u64, CacheError> {
        let rows = self.db().dequeue(id.as_str()).await?;
        let files = self.remove_queue_marker(id).await?;
        Ok(u64::from(rows > 0 || files.is_some()))
    }

    /// Removes `id`'s marker from `queue/`, if there is one.
    pub(super) async fn remove_queue_marker(
        &self,
        id: &ImageId,
    ) -> Result<Option<u64>, CacheError> {
        self.remove_file(Area::Queue, id, "remove queue marker")
            .await
    }

    /// Removes `id`'s file from `area` on a blocking thread; `None` when there was none.
    async fn remove_file(
        &self,
        area: Area,
        id: &ImageId,
        action: &'static str,
    ) -> Result<Option<u64>, CacheError> {
        let (layout, file_id) = (self.layout().clone(), id.clone());
        blocking(move || layout.remove(area, &file_id))
            .await
            .map_err(CacheError::io(action, self.layout().path(area, id)))
    }

    /// Empties the queue: rows and markers. Returns how many images were queued.
    pub async fn delete_all_queued_images(&self) -> Result<u64, CacheError> {
        let listing = self.list(Area::Queue).await?;
        let rows = self.db().queued_images().await?;
        let mut ids: std::collections::BTreeSet<ImageId> =
            rows.into_iter().map(|r| r.image_id).collect();
        for marker in &listing.files {
            self.remove_queue_marker(&marker.image_id).await?;
            ids.insert(marker.image_id.clone());
        }
        self.db().dequeue_all().await?;
        Ok(ids.len() as u64)
    }

    /// This node's cached images, ordered by image id.
    pub async fn get_cached_images(&self) -> Result<Vec<CachedImage>, CacheError> {
        let rows = self.db().cached_images().await?;
        Ok(rows
            .into_iter()
            .map(|r| CachedImage {
                image_id: r.image_id,
                size: r.size.max(0) as u64,
                hits: r.hits.max(0) as u64,
                last_accessed: r.last_accessed.to_utc(),
                last_modified: r.last_modified.to_utc(),
                checksum: r.checksum,
            })
            .collect())
    }

    /// 0 when the image file is absent, else the row's hits (0 without a row).
    pub async fn get_hit_count(&self, id: &ImageId) -> Result<u64, CacheError> {
        if !self.cached(id).await {
            return Ok(0);
        }
        Ok(self.db().hit_count(id.as_str()).await?.max(0) as u64)
    }

    /// The least recently accessed image and its size on disk (0 when its file is
    /// missing); `None` when this node has no rows, so a prune can never spin on nothing.
    pub async fn get_least_recently_accessed(&self) -> Result<Option<(ImageId, u64)>, CacheError> {
        let mut cursor = None;
        loop {
            let batch = self.db().least_recently_accessed(cursor, 16).await?;
            let Some(next) = batch.next else {
                return Ok(None);
            };
            cursor = Some(next);
            if let Some(id) = batch.rows.into_iter().next().map(|r| r.image_id) {
                let (layout, file_id) = (self.layout().clone(), id.clone());
                let size = blocking(move || layout.regular_file(Area::Cached, &file_id))
                    .await
                    .ok()
                    .flatten()
                    .map_or(0, |m| m.size);
                return Ok(Some((id, size)));
            }
        }
    }

    /// Starts writing `id` into `incomplete/`. Fails cleanly when another writer has it.
    pub async fn open_for_write(
        &self,
        id: &ImageId,
        expectations: Expectations,
    ) -> Result<ImageWriter, CacheError> {
        ImageWriter::create(self.layout().clone(), id.clone(), expectations)
    }

    /// Commits what `writer` wrote: verified, made durable and moved into place by the
    /// writer, then recorded in this node's row and taken off the queue. On a failed
    /// verification the bytes go to `invalid/` and nothing is published.
    pub async fn publish(&self, writer: ImageWriter) -> Result<Published, CacheError> {
        let published = writer.finish().await?;
        // Glance's order: file first, then the row; a crash in between leaves a file
        // without a row, which reconcile adopts.
        crate::failpoint::hit("writer:before-row");
        self.db()
            .upsert_cached_image(
                published.image_id.as_str(),
                published.size as i64,
                Some(&published.md5),
                DbTime::from_utc(clock::now()),
            )
            .await?;
        self.delete_queued_image(&published.image_id).await?;
        debug!(image_id = %published.image_id, bytes = published.size, "image published");
        Ok(published)
    }

    /// Opens a cached image for reading and, as Glance does, counts a hit and sets
    /// `last_accessed` whether or not the open succeeds. Symlinks and non-regular files
    /// are refused.
    pub async fn open_for_read(&self, id: &ImageId) -> Result<File, CacheError> {
        let path = self.layout().path(Area::Cached, id);
        let (layout, read_id) = (self.layout().clone(), id.clone());
        let opened = blocking(move || {
            // O_NONBLOCK (in `open_read`) so a planted FIFO cannot hang us.
            let file = layout.open_read(Area::Cached, &read_id)?;
            let meta = file.metadata();
            Ok::<_, std::io::Error>((file, meta))
        })
        .await;
        let hit = self
            .db()
            .record_hit(id.as_str(), DbTime::from_utc(clock::now()))
            .await;
        let (file, meta) = match opened {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CacheError::NotCached(id.clone()));
            }
            Err(e) => return Err(CacheError::io("open cached image", path)(e)),
        };
        let meta = meta.map_err(CacheError::io("stat cached image", &path))?;
        if !meta.file_type().is_file() {
            warn!(path = ?path, "refusing to read a cache entry that is not a regular file");
            return Err(CacheError::NotCached(id.clone()));
        }
        hit?;
        Ok(file)
    }

    /// Deletes the file (if present) and this node's row. Returns whether a file was
    /// removed. Readers of ours keep reading a file deleted under them (`evict`).
    pub async fn delete_cached_image(&self, id: &ImageId) -> Result<bool, CacheError> {
        let removed = self.evict(id).await?;
        self.db().delete_cached_image(id.as_str()).await?;
        Ok(removed.is_some())
    }

    /// Deletes every image file (valid ids only: lock files, the SQLite database and
    /// strays stay) and this node's rows. Returns the number of files deleted.
    pub async fn delete_all_cached_images(&self) -> Result<u64, CacheError> {
        let listing = self.list(Area::Cached).await?;
        let mut deleted = 0;
        for file in &listing.files {
            if self.evict(&file.image_id).await?.is_some() {
                deleted += 1;
            }
        }
        self.db().delete_all_cached_images().await?;
        Ok(deleted)
    }

    /// Regular files with valid-id names in `area` (Glance's `get_cache_files`), listed
    /// on a blocking thread.
    pub async fn list(&self, area: Area) -> Result<Listing, CacheError> {
        let layout = self.layout().clone();
        let dir = layout.dir(area);
        crate::blocking(move || layout.list(area))
            .await
            .map_err(CacheError::io("list", dir))
    }

    /// The sum of the sizes of the cached image files.
    pub async fn get_cache_size(&self) -> Result<u64, CacheError> {
        let listing = self.list(Area::Cached).await?;
        Ok(super::total_bytes(listing.files.iter().map(|f| f.size)))
    }
}

/// Filesystem work runs on tokio's blocking pool: a slow or stuck disk must never hold
/// one of the runtime's few worker threads (see ARCHITECTURE.md's invariants).
pub(crate) use crate::blocking;
