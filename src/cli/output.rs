//! How the CLI prints listings: aligned text tables for people, JSON for scripts.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::cache::{CachedImage, QueuedImage};
use crate::config::format_size;
use crate::config::values::human_bytes;

pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A size for people: exact bytes plus a rounded binary unit, e.g. "1536 (1.5 KiB)".
pub(super) fn human_size(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{bytes} ({})", human_bytes(bytes))
    }
}

/// One row of `list-cached --json`. The fields are in alphabetical order: the JSON's
/// keys were sorted when it was built as a map, and scripts may diff it.
#[derive(Serialize)]
struct CachedRow<'a> {
    checksum: Option<&'a str>,
    hits: u64,
    image_id: &'a str,
    last_accessed: String,
    last_modified: String,
    size: u64,
}

/// One row of `list-queued --json`; fields alphabetical, as `CachedRow`'s.
#[derive(Serialize)]
struct QueuedRow<'a> {
    attempts: u64,
    downloading_by: Option<&'a str>,
    image_id: &'a str,
    last_error: Option<&'a str>,
    next_attempt_at: String,
    queued_at: String,
    state: &'a str,
}

/// `size --json`; fields alphabetical, as `CachedRow`'s.
#[derive(Serialize)]
struct SizeReport {
    images: usize,
    max_size: u64,
    size: u64,
}

pub(super) fn cached_json(images: &[CachedImage]) -> serde_json::Result<String> {
    let rows: Vec<_> = images
        .iter()
        .map(|i| CachedRow {
            checksum: i.checksum.as_deref(),
            hits: i.hits,
            image_id: i.image_id.as_str(),
            last_accessed: rfc3339(i.last_accessed),
            last_modified: rfc3339(i.last_modified),
            size: i.size,
        })
        .collect();
    serde_json::to_string_pretty(&rows)
}

pub(super) fn queued_json(images: &[QueuedImage]) -> serde_json::Result<String> {
    let rows: Vec<_> = images
        .iter()
        .map(|i| QueuedRow {
            attempts: i.attempts,
            downloading_by: i.downloading_by.as_deref(),
            image_id: i.image_id.as_str(),
            last_error: i.last_error.as_deref(),
            next_attempt_at: rfc3339(i.next_attempt_at),
            queued_at: rfc3339(i.queued_at),
            state: i.state.as_str(),
        })
        .collect();
    serde_json::to_string_pretty(&rows)
}

/// `size --json`: one line.
pub(super) fn size_json(size: u64, max_size: u64, images: usize) -> serde_json::Result<String> {
    serde_json::to_string(&SizeReport {
        images,
        max_size,
        size,
    })
}

/// Left-aligned columns separated by two spaces.
pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    debug_assert!(
        rows.iter().all(|r| r.len() == header.len()),
        "every row has a cell per column"
    );
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
    out
}

pub(super) fn cached_table(images: &[CachedImage]) -> String {
    let time = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    table(
        &[
            "IMAGE ID",
            "SIZE",
            "HITS",
            "LAST ACCESSED",
            "LAST MODIFIED",
            "CHECKSUM",
        ],
        images
            .iter()
            .map(|i| {
                vec![
                    i.image_id.to_string(),
                    i.size.to_string(),
                    i.hits.to_string(),
                    time(i.last_accessed),
                    time(i.last_modified),
                    i.checksum.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    )
}

pub(super) fn queued_table(images: &[QueuedImage]) -> String {
    let time = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    table(
        &[
            "IMAGE ID",
            "STATE",
            "QUEUED AT",
            "ATTEMPTS",
            "NEXT ATTEMPT",
            "DOWNLOADING BY",
            "LAST ERROR",
        ],
        images
            .iter()
            .map(|i| {
                vec![
                    i.image_id.to_string(),
                    i.state.to_string(),
                    time(i.queued_at),
                    i.attempts.to_string(),
                    time(i.next_attempt_at),
                    i.downloading_by.clone().unwrap_or_else(|| "-".into()),
                    i.last_error.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    )
}

pub(super) fn size_line(size: u64, max: u64, images: usize) -> String {
    format!(
        "size {} of max {} ({}), {images} images",
        human_size(size),
        max,
        format_size(max)
    )
}
