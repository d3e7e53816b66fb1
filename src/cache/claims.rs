//! The prefetch queue as the prefetcher uses it: claims, retries with their next attempt
//! time, giving up (the row stays `failed` with its reason, the marker goes), and the
//! recovery of dead processes' claims at start.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::driver::{QueuedImage, queued_image};
use super::layout::Area;
use super::{CacheDriver, CacheError};
use crate::clock;
use crate::db::DbTime;
use crate::image_id::ImageId;

impl CacheDriver {
    /// Claims the next queued image due at `now` for `holder`, for at most `claim_for`.
    pub async fn claim_next(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        claim_for: Duration,
    ) -> Result<Option<QueuedImage>, CacheError> {
        let until = clock::after(now, claim_for);
        loop {
            let Some(row) = self
                .db()
                .claim_next(holder, DbTime::from_utc(now), DbTime::from_utc(until))
                .await?
            else {
                return Ok(None);
            };
            let image = queued_image(row, now);
            // Its marker went after the queue loop's last pass: dequeued through Glance,
            // not to be fetched.
            if !self.layout().exists(Area::Queue, &image.image_id)
                && self.dequeue_unmarked(&image.image_id, Some(holder)).await?
            {
                continue;
            }
            return Ok(Some(image));
        }
    }

    /// Claims the queued `id` for `holder` for at most `claim_for` from `now`, due or
    /// not (a read-through fill: a client asks for it now); `Err` names the holder of a
    /// live claim on it (`None`: it is not queued).
    pub async fn claim_image(
        &self,
        id: &ImageId,
        holder: &str,
        now: DateTime<Utc>,
        claim_for: Duration,
    ) -> Result<Result<QueuedImage, Option<String>>, CacheError> {
        let until = clock::after(now, claim_for);
        let claimed = self
            .db()
            .claim_image(
                id.as_str(),
                holder,
                DbTime::from_utc(now),
                DbTime::from_utc(until),
            )
            .await?;
        Ok(claimed.map(|row| queued_image(row, now)))
    }

    /// Records a failed attempt; the image stays queued until `next_attempt`.
    pub async fn retry_later(
        &self,
        id: &ImageId,
        attempts: u64,
        next_attempt: DateTime<Utc>,
        error: &str,
    ) -> Result<(), CacheError> {
        self.db()
            .record_retry(
                id.as_str(),
                attempts as i64,
                DbTime::from_utc(next_attempt),
                error,
            )
            .await?;
        Ok(())
    }

    /// Drops `id` from the queue for good, as failed at `now`: the row is kept as
    /// `failed` with `error` (shown by `list-queued`), and the marker is removed so
    /// Glance stops listing it.
    pub async fn give_up(
        &self,
        id: &ImageId,
        attempts: u64,
        now: DateTime<Utc>,
        error: &str,
    ) -> Result<(), CacheError> {
        self.db()
            .mark_failed(id.as_str(), attempts as i64, DbTime::from_utc(now), error)
            .await?;
        // A request after this one must revive the image: its marker, made once this
        // one is gone, must be newer than the failure. Markers are stamped from the
        // kernel's coarse clock, up to a tick behind `now`, so the marker goes only
        // once that clock has passed `now` (one tick at most; a `now` far ahead, as a
        // test may pass, is waited for no longer than a few ticks).
        wait_for_file_stamps_after(now.into()).await;
        // The outcome is recorded; a marker that cannot go (its directory replaced, say)
        // is no reason to treat it as lost. A failure newer than the marker keeps it
        // from reviving the image.
        if let Err(error) = self.remove_queue_marker(id).await {
            warn!(image_id = %id, %error, "dropped from the queue, but its marker could not be removed");
        }
        Ok(())
    }

    /// Extends every claim of `holder` to `claim_for` from `now`: a download that lasts
    /// longer than a claim must not see its image claimed again beside it.
    pub async fn renew_claims(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        claim_for: Duration,
    ) -> Result<u64, CacheError> {
        let until = clock::after(now, claim_for);
        Ok(self
            .db()
            .renew_claims(holder, DbTime::from_utc(until))
            .await?)
    }

    /// Releases the claim on `id` (an interrupted download): it stays queued.
    pub async fn release_claim(&self, id: &ImageId) -> Result<(), CacheError> {
        self.db().release_claim(id.as_str(), None).await?;
        Ok(())
    }

    /// Recovers the claims of dead processes (a crashed daemon or `prefetch` command):
    /// `holder_running` tells them from live ones by the claim's holder name. A dead
    /// holder's partial file in `incomplete/` goes to `invalid/` (so the image can be
    /// fetched again at once) and its claim is released; a running holder's download is
    /// left alone. Returns how many claims were recovered.
    pub async fn recover_claims(
        &self,
        holder_running: impl Fn(&str) -> bool,
    ) -> Result<u64, CacheError> {
        let mut recovered = 0;
        for (id, holder) in self.db().claims().await? {
            if holder_running(&holder) {
                continue;
            }
            self.move_partial_download_to_invalid(&id)?;
            if self.db().release_claim(id.as_str(), Some(&holder)).await? {
                recovered += 1;
            }
        }
        Ok(recovered)
    }

    fn move_partial_download_to_invalid(&self, id: &ImageId) -> Result<(), CacheError> {
        if self
            .layout()
            .regular_file(Area::Incomplete, id)
            .ok()
            .flatten()
            .is_none()
        {
            return Ok(());
        }
        match self.layout().rename(Area::Incomplete, Area::Invalid, id) {
            Ok(()) => {
                info!(image_id = %id, "moved an interrupted download to invalid/");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::io(
                "move to invalid/",
                self.layout().path(Area::Incomplete, id),
            )(e)),
        }
    }

    /// When the earliest waiting queued image becomes due.
    pub async fn next_queue_due(&self) -> Result<Option<DateTime<Utc>>, CacheError> {
        Ok(self.db().next_queue_due().await?.map(DbTime::to_utc))
    }
}

/// Waits until a file made now would be stamped after `t` (see `clock::file_stamp_now`),
/// for at most `STAMP_WAIT_STEPS` steps of a millisecond.
async fn wait_for_file_stamps_after(t: std::time::SystemTime) {
    const STAMP_WAIT_STEPS: u32 = 30;
    for _ in 0..STAMP_WAIT_STEPS {
        if clock::file_stamp_now() > t {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
