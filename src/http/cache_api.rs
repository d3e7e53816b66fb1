//! Glance 33's cache API (`glance/api/v2/cached_images.py`) over this node's cache:
//! the same statuses and JSON, acting through the daemon's driver and loops. Prune and
//! clean are passes of the pruner and cleaner loops, asked for and waited on
//! (`PassRequests`): a request never runs beside the loop's own pass.
//!
//! Without an upstream to ask, an image is queued as Glance's old API did (no check
//! that it exists or is active), and an id neither cached nor queued is unknown (404).

use std::time::Duration;

use hyper::{HeaderMap, StatusCode};
use serde_json::json;
use tracing::error;

use super::Shared;
use super::routes::{Reply, empty, json, text};
use crate::daemon::PassRequests;
use crate::db::QueueState;
use crate::image_id::ImageId;
use crate::metrics::EvictReason;

/// How long a prune or clean request waits for the loop's pass before giving up (the
/// pass goes on).
const PASS_WAIT: Duration = Duration::from_secs(600);

fn failed(what: &str, e: &dyn std::fmt::Display) -> Reply {
    error!(error = %e, "http: {what} failed");
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("{what} failed: {e}"),
    )
}

/// Glance's epoch-float times.
fn epoch(t: chrono::DateTime<chrono::Utc>) -> f64 {
    t.timestamp_micros() as f64 / 1e6
}

/// `GET /v2/cache`: `cached_images` as Glance's `_cached_image_format` gives them and
/// `queued_images` (ids) in queue order.
pub(crate) async fn state(state: &Shared) -> Reply {
    let rows = match state.ctx.db.cached_images().await {
        Ok(rows) => rows,
        Err(e) => return failed("listing the cache", &e),
    };
    let queued = match state.ctx.driver.get_queued_images().await {
        Ok(queued) => queued,
        Err(e) => return failed("listing the queue", &e),
    };
    let cached: Vec<_> = rows
        .into_iter()
        .map(|r| {
            json!({
                "id": r.id,
                "image_id": r.image_id,
                "last_accessed": epoch(r.last_accessed.to_utc()),
                "last_modified": epoch(r.last_modified.to_utc()),
                "size": r.size,
                "hits": r.hits,
                "checksum": r.checksum,
            })
        })
        .collect();
    // Glance lists the markers in queue/; a given-up image has none.
    let queued: Vec<_> = queued
        .into_iter()
        .filter(|q| q.state == QueueState::Queued)
        .map(|q| json!(q.image_id))
        .collect();
    json(
        StatusCode::OK,
        &json!({"cached_images": cached, "queued_images": queued}),
    )
}

/// What the upstream says of an image: `Ok(None)` when it cannot tell (no upstream,
/// or a kind without a catalogue), `Ok(Some(None))` when it does not know it.
async fn upstream_status(state: &Shared, id: &ImageId) -> Result<Option<Option<String>>, Reply> {
    let Some(upstream) = &state.upstream else {
        return Ok(None);
    };
    upstream.image_status(id).await.map_err(|e| {
        error!(error = %e, image_id = %id, "http: cannot ask the upstream about an image");
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("Cannot ask the upstream about image {id}: {e}"),
        )
    })
}

/// `PUT /v2/cache/{id}`: 202, queued for the prefetcher; with a Glance upstream, 404
/// for an image it does not know and 400 for one that is not active, as Glance does.
pub(crate) async fn queue(state: &Shared, id: &ImageId) -> Reply {
    match upstream_status(state, id).await {
        Err(refused) => return refused,
        Ok(Some(None)) => return text(StatusCode::NOT_FOUND, &format!("Image {id} not found.")),
        Ok(Some(Some(status))) if status != "active" => {
            return text(
                StatusCode::BAD_REQUEST,
                "Only images with status active can be targeted for queueing",
            );
        }
        Ok(_) => {}
    }
    match state.ctx.driver.queue_image(id).await {
        Ok(_) => {
            state.ctx.nudges.prefetcher.notify_one();
            state.ctx.nudges.queue.notify_one();
            empty(StatusCode::ACCEPTED)
        }
        Err(e) => failed("queueing the image", &e),
    }
}

/// `DELETE /v2/cache/{id}`: 204 once neither cached nor queued; 404 when it was neither.
pub(crate) async fn delete(state: &Shared, id: &ImageId) -> Reply {
    let driver = &state.ctx.driver;
    let cached = driver.cached(id).await;
    // The row's size is what the eviction counts (the file may be gone already).
    let row_size = match state.ctx.db.cached_size(id.as_str()).await {
        Ok(size) => size.map(|n| u64::try_from(n).unwrap_or(0)),
        Err(e) => return failed("looking the image up", &e),
    };
    let row = row_size.is_some();
    let queued = match driver.is_queued(id).await {
        Ok(q) => q,
        Err(e) => return failed("looking the image up", &e),
    };
    if !(cached || row || queued) {
        // Glance answers 204 for an image it knows, cached or not.
        match upstream_status(state, id).await {
            Err(refused) => return refused,
            Ok(Some(Some(_))) => return empty(StatusCode::NO_CONTENT),
            Ok(_) => return text(StatusCode::NOT_FOUND, &format!("Image {id} not found.")),
        }
    }
    match driver.delete_cached_image(id).await {
        Ok(true) => state
            .ctx
            .metrics
            .evicted(EvictReason::Manual, 1, row_size.unwrap_or(0)),
        Ok(false) => {}
        Err(e) => return failed("deleting the cached image", &e),
    }
    if let Err(e) = driver.delete_queued_image(id).await {
        return failed("dequeueing the image", &e);
    }
    empty(StatusCode::NO_CONTENT)
}

/// `DELETE /v2/cache` with `x-image-cache-clear-target` empty (both), `cache` or
/// `queue`: 204; anything else 400.
pub(crate) async fn clear(state: &Shared, headers: &HeaderMap) -> Reply {
    let target = headers
        .get("x-image-cache-clear-target")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_lowercase())
        .unwrap_or_default();
    let (cache, queue) = match target.as_str() {
        "" => (true, true),
        "cache" => (true, false),
        "queue" => (false, true),
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "If provided 'x-image-cache-clear-target' must be 'cache', 'queue' or empty string.",
            );
        }
    };
    let driver = &state.ctx.driver;
    if cache {
        // Counted by the rows' sizes, read just before: the listing the driver removes
        // by is the directory's.
        let bytes = match state.ctx.db.cached_images().await {
            Ok(rows) => {
                crate::cache::total_bytes(rows.iter().map(|r| u64::try_from(r.size).unwrap_or(0)))
            }
            Err(e) => return failed("clearing the cache", &e),
        };
        match driver.delete_all_cached_images().await {
            Ok(images) => state
                .ctx
                .metrics
                .evicted(EvictReason::Manual, images, bytes),
            Err(e) => return failed("clearing the cache", &e),
        }
    }
    if queue && let Err(e) = driver.delete_all_queued_images().await {
        return failed("clearing the queue", &e);
    }
    empty(StatusCode::NO_CONTENT)
}

/// `GET /v2/cache/nodes/{id}`: the reference URLs of the nodes whose `cached_images`
/// hold the image, in the shared database.
pub(crate) async fn nodes(state: &Shared, id: &ImageId) -> Reply {
    // Glance looks the image up first: 404 for one it does not know, cached or not.
    match upstream_status(state, id).await {
        Err(refused) => return refused,
        Ok(Some(None)) => return text(StatusCode::NOT_FOUND, &format!("Image {id} not found.")),
        Ok(_) => {}
    }
    match state.ctx.db.db().cached_nodes(id.as_str()).await {
        Ok(urls) => json(StatusCode::OK, &json!(urls)),
        Err(e) => failed("listing the nodes", &e),
    }
}

/// Asks `requests`' loop for a pass and waits for it (or shutdown); answers with
/// `done` of the files and bytes the pass removed.
async fn pass(
    state: &Shared,
    requests: &PassRequests,
    nudge: &tokio::sync::Notify,
    done: impl FnOnce(usize, u64) -> Reply,
) -> Reply {
    let unavailable = |why: &str| text(StatusCode::SERVICE_UNAVAILABLE, why);
    let finished = tokio::select! {
        finished = tokio::time::timeout(PASS_WAIT, requests.request(nudge)) => finished,
        _ = state.shutdown.cancelled() => return unavailable("The daemon is shutting down."),
    };
    match finished {
        Ok(Some(finished)) => match finished.outcome {
            Ok((files, bytes)) => done(files, bytes),
            Err(e) => failed("the pass", &e),
        },
        Ok(None) => unavailable("The loop has stopped."),
        Err(_) => unavailable("The pass did not finish in time; it goes on."),
    }
}

/// `POST /v2/cache/clean`: 200, no body, after a pass of the cleaner.
pub(crate) async fn clean(state: &Shared) -> Reply {
    let (requests, nudge) = (&state.ctx.passes.clean, &state.ctx.nudges.cleaner);
    pass(state, requests, nudge, |_, _| empty(StatusCode::OK)).await
}

/// `POST /v2/cache/prune`: 200 with the pruner's pass's `total_files_pruned` and
/// `total_bytes_pruned`.
pub(crate) async fn prune(state: &Shared) -> Reply {
    let (requests, nudge) = (&state.ctx.passes.prune, &state.ctx.nudges.pruner);
    pass(state, requests, nudge, |files, bytes| {
        json(
            StatusCode::OK,
            &json!({"total_files_pruned": files, "total_bytes_pruned": bytes}),
        )
    })
    .await
}
