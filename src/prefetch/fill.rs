//! Read-through fills: a download of an image that is not cached fetches it from the
//! upstream once per node, however many clients ask. A request joins the download of
//! the image this process is running (a queue prefetch or another request's fill, both
//! registered in the driver's fills), or starts one: the image is queued and claimed
//! through the queue's claim, the one the prefetch engine takes, so neither this
//! daemon's prefetcher nor another process of the node (a `prefetch` command) fetches
//! it beside the fill; a claim another process holds means that process is fetching
//! it, and the request is streamed through without caching instead. The fill runs as a
//! task of its own, through `fetch_registered` (the prefetch's writer, verification and
//! publish), so a client that goes away does not stop it; a shutdown does.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info};

use super::fetch::fetch_registered;
use super::{DownloadBudget, FetchLimits, PrefetchOutcome, record_outcome};
use crate::cache::{CacheDriver, CacheError, FillState, Filling, QueuedImage};
use crate::clock;
use crate::config::Config;
use crate::image_id::ImageId;
use crate::upstream::Upstream;

/// How long a request waits for a download this process has claimed to register, per
/// round: the engine registers right after its claim, so a round is short.
const OWN_CLAIM_WAIT: Duration = Duration::from_millis(100);

/// Rounds before a request whose image this process has claimed but never registers
/// (a claim left by an outcome that could not be recorded) is streamed through.
const OWN_CLAIM_ROUNDS: usize = 50;

/// What a request for an image that was not cached gets.
#[derive(Debug)]
pub(crate) enum Miss {
    /// Cached meanwhile: serve it from the cache.
    Cached,
    /// A download of this process: follow it.
    Fill(watch::Receiver<FillState>),
    /// Not filled here (`http.fill_on_miss = false`, or another process downloads it):
    /// stream it through from the upstream without caching.
    StreamThrough,
}

/// The read-through side of a daemon: its fills and what they need.
pub(crate) struct ReadThrough {
    driver: CacheDriver,
    upstream: Option<Arc<Upstream>>,
    /// The name this daemon's queue claims are held under (its prefetcher's too).
    holder: String,
    cancel: CancellationToken,
    budget: Arc<DownloadBudget>,
    fills: TaskTracker,
}

impl ReadThrough {
    pub(crate) fn new(
        driver: CacheDriver,
        upstream: Option<Arc<Upstream>>,
        holder: String,
        cancel: CancellationToken,
    ) -> Self {
        ReadThrough {
            driver,
            upstream,
            holder,
            cancel,
            budget: Arc::default(),
            fills: TaskTracker::new(),
        }
    }

    pub(crate) fn upstream(&self) -> Option<&Arc<Upstream>> {
        self.upstream.as_ref()
    }

    /// Joins the download of `id` in progress here, or starts a fill of it, or says
    /// to stream it through.
    pub(crate) async fn miss(
        &self,
        id: &ImageId,
        config: &Arc<Config>,
    ) -> Result<Miss, CacheError> {
        let Some(upstream) = &self.upstream else {
            return Ok(Miss::StreamThrough);
        };
        // Queue markers adopted once already: a second miss of the row streams.
        let mut adopted = false;
        for _ in 0..OWN_CLAIM_ROUNDS {
            if let Some(following) = self.driver.fills().join(id) {
                return Ok(Miss::Fill(following));
            }
            if self.driver.cached(id).await {
                return Ok(Miss::Cached);
            }
            if !config.http.fill_on_miss || self.cancel.is_cancelled() {
                return Ok(Miss::StreamThrough);
            }
            // The claim lives on the queue row: queued first (nothing when it is queued
            // already; refused when a writer's file is in incomplete/, whose claim
            // then decides).
            self.driver.queue_claimable(id).await?;
            let ttl = config.prefetcher.claim_ttl;
            match self
                .driver
                .claim_image(id, &self.holder, clock::now(), ttl)
                .await?
            {
                Ok(image) => match self.driver.fills().register(id) {
                    Ok(filling) => {
                        let following = filling.subscribe();
                        self.spawn(upstream.clone(), image, filling, config.clone());
                        return Ok(Miss::Fill(following));
                    }
                    // Registered between our look and our claim: follow it (its claim
                    // is ours too, the same holder).
                    Err(following) => return Ok(Miss::Fill(following)),
                },
                // This process holds the claim: its prefetcher (or another request)
                // claimed the image and is about to register its download.
                Err(Some(holder)) if holder == self.holder => {
                    self.driver.fills().changed_within(OWN_CLAIM_WAIT).await;
                }
                Err(Some(holder)) => {
                    debug!(image_id = %id, %holder, "another process is fetching the image; streaming it through");
                    return Ok(Miss::StreamThrough);
                }
                // No queued row: published meanwhile (cached); or a writer outside the
                // queue (glance-api's own cache) has its file in incomplete/; or the
                // image's queue marker is there without its row yet (another request
                // between the two steps of its `queue_claimable`, whose marker made ours
                // add nothing, or a marker of Glance's not adopted yet). That last is
                // no reason to fetch the image a second time beside the fill about to
                // start: the marker is adopted here (its row added, as the queue loop
                // would), and the next round claims or joins.
                Err(None) => {
                    if self.driver.cached(id).await {
                        return Ok(Miss::Cached);
                    }
                    if self.driver.is_being_cached(id) || adopted {
                        // Our own fill's file, just made, is seen by the next join.
                        if self.driver.fills().join(id).is_none() {
                            return Ok(Miss::StreamThrough);
                        }
                        continue;
                    }
                    self.driver.adopt_queue_markers().await?;
                    adopted = true;
                }
            }
        }
        Ok(Miss::StreamThrough)
    }

    /// Runs the fill of the claimed `image` as a task of its own, renewing its claim
    /// while it runs and recording its outcome in the queue as a prefetch's is.
    fn spawn(
        &self,
        upstream: Arc<Upstream>,
        image: QueuedImage,
        filling: Filling,
        config: Arc<Config>,
    ) {
        let (driver, cancel, budget, holder) = (
            self.driver.clone(),
            self.cancel.clone(),
            self.budget.clone(),
            self.holder.clone(),
        );
        self.fills.spawn(async move {
            let started = Instant::now();
            let id = image.image_id.clone();
            info!(image_id = %id, "read-through: filling the cache from the upstream");
            let limits = FetchLimits::from(&*config);
            let fetch = fetch_registered(&driver, &upstream, &id, limits, &cancel, &budget, filling);
            tokio::pin!(fetch);
            let every = config.prefetcher.claim_renew_every().max(Duration::from_secs(1));
            let fetched = loop {
                tokio::select! {
                    fetched = &mut fetch => break fetched,
                    () = tokio::time::sleep(every) => {
                        let ttl = config.prefetcher.claim_ttl;
                        if let Err(e) = driver.renew_claims(&holder, clock::now(), ttl).await {
                            error!(image_id = %id, error = %e, "read-through: cannot renew the fill's claim");
                        }
                    }
                }
            };
            let (outcome, recorded) = record_outcome(&driver, &image, &config, fetched, started).await;
            if let Err(e) = recorded {
                error!(image_id = %id, error = %e, "read-through: cannot record the fill's outcome; releasing its claim");
                let _ = driver.release_claim(&id).await;
            }
            if let PrefetchOutcome::Dropped { error } | PrefetchOutcome::Retrying { error, .. } =
                &outcome
            {
                info!(image_id = %id, %error, "read-through: the fill failed; nothing was cached");
            }
        });
    }

    /// At shutdown (the cancel token cancelled): waits for the fills, which stop at
    /// their next chunk and release their claims.
    pub(crate) async fn drain(&self) {
        self.fills.close();
        self.fills.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Area, FillOutcome};

    /// The window of issue 17, held open: the image's queue marker is there without its
    /// queue row (the state between the two steps of another request's `queue_image`,
    /// or a marker Glance's `PUT /v2/cache/{id}` wrote that the queue loop has not
    /// adopted; no queue loop runs here, so nothing closes it). A miss then must fill
    /// the cache, the one download of the image, and not stream the image through from
    /// the upstream beside it; a second miss follows that fill (or finds it published).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_miss_that_finds_the_queue_marker_without_its_row_fills_instead_of_streaming() {
        let dir = tempfile::tempdir().unwrap();
        let image: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (config, driver, upstream) = crate::prefetch::test_support::directory_cache(
            dir.path(),
            &[("racing", &image)],
            "[http]\nfill_on_miss = true\n",
        )
        .await;
        let id = ImageId::parse("racing").unwrap();

        std::fs::write(driver.get_image_filepath(&id, Area::Queue), b"").unwrap();
        // The window as a request meets it: queueing adds nothing (the marker says
        // queued), and there is no row to claim.
        assert!(!driver.queue_image(&id).await.unwrap());
        let ttl = config.prefetcher.claim_ttl;
        assert_eq!(
            driver
                .claim_image(&id, "someone else", clock::now(), ttl)
                .await
                .unwrap()
                .map(|_| ()),
            Err(None),
            "the marker has no queue row"
        );

        let read_through = ReadThrough::new(
            driver.clone(),
            Some(Arc::new(upstream)),
            "node-a pid 1".into(),
            CancellationToken::new(),
        );
        let miss = read_through.miss(&id, &config).await.unwrap();
        let Miss::Fill(mut following) = miss else {
            panic!("a marker without its row streamed the image through beside the fill: {miss:?}");
        };
        let second = read_through.miss(&id, &config).await.unwrap();
        assert!(
            matches!(second, Miss::Fill(_) | Miss::Cached),
            "a second miss during the fill: {second:?}"
        );
        let outcome = following
            .wait_for(|s| s.outcome.is_some())
            .await
            .unwrap()
            .outcome
            .clone();
        assert_eq!(
            outcome,
            Some(FillOutcome::Published {
                size: image.len() as u64
            })
        );
        read_through.drain().await;
        assert!(driver.cached(&id).await);
        assert_eq!(
            std::fs::read(driver.get_image_filepath(&id, Area::Cached)).unwrap(),
            image
        );
        // The fill settled the adopted row as a prefetch does: off the queue, marker
        // and all.
        assert_eq!(driver.get_queued_images().await.unwrap(), Vec::new());
        assert!(!driver.get_image_filepath(&id, Area::Queue).exists());
    }
}
