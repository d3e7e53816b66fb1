//! `ImageId`: the only way to name an image inside glance-cached.
//!
//! Every id that comes from outside (CLI arguments, queue rows, marker files, watcher
//! events, Glance's rows) is validated here before it can become a path or a query
//! parameter: 1 to 36 characters from `[A-Za-z0-9_-]`, as Glance's ids are UUIDs and the
//! database column is VARCHAR(36).

use std::fmt;
use std::str::FromStr;

/// Longest accepted id: Glance's `cached_images.image_id` is VARCHAR(36).
pub const MAX_IMAGE_ID_LEN: usize = 36;

/// Lock files that Glance keeps in the cache root through oslo.concurrency: its cache
/// driver sets oslo's `lock_path` to the cache directory (`lockutils.set_defaults`), so
/// every external lock of that process lands there. Glance 33 takes `glance-cache`
/// (prefetcher), `glance-cache-clean` and `glance-cache-prune` (cache API),
/// `sqlite_centralized_migrate` (the SQLite migration), `image_cache_db_init` (the
/// sqlite driver) and `tasks` (the import cancellation tracker). Their names fit the id
/// syntax, but Glance's ids are UUIDs: they are refused as ids, so they are never
/// adopted, listed, counted, pruned or deleted.
pub const GLANCE_LOCK_NAMES: [&str; 6] = [
    "glance-cache",
    "glance-cache-clean",
    "glance-cache-prune",
    "sqlite_centralized_migrate",
    "image_cache_db_init",
    "tasks",
];

/// A validated image id. It can never contain a path separator, `.` or `..`, so joining it
/// to a directory never escapes that directory.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageId(String);

/// Why a string is not an image id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidImageId {
    #[error("invalid image id: empty")]
    Empty,
    #[error("invalid image id {shown}: longer than {MAX_IMAGE_ID_LEN} characters")]
    TooLong { shown: String },
    #[error(
        "invalid image id {shown}: only letters, digits, '-' and '_' are allowed (character {position})"
    )]
    BadCharacter { shown: String, position: usize },
    #[error(
        "invalid image id {shown}: the name of a lock file Glance keeps in the cache directory"
    )]
    GlanceLock { shown: String },
}

impl ImageId {
    /// Validates `raw` as an image id.
    pub fn parse(raw: &str) -> Result<Self, InvalidImageId> {
        if raw.is_empty() {
            return Err(InvalidImageId::Empty);
        }
        if let Some(position) = raw
            .chars()
            .position(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(InvalidImageId::BadCharacter {
                shown: shown(raw),
                position: position + 1,
            });
        }
        if raw.len() > MAX_IMAGE_ID_LEN {
            return Err(InvalidImageId::TooLong { shown: shown(raw) });
        }
        if GLANCE_LOCK_NAMES.contains(&raw) {
            return Err(InvalidImageId::GlanceLock { shown: shown(raw) });
        }
        Ok(ImageId(raw.to_owned()))
    }

    /// Validates a file name found on disk; `None` for names that are not ids (lock
    /// files, `*.db`, non-UTF-8 names, strays).
    pub fn from_file_name(name: &std::ffi::OsStr) -> Option<Self> {
        name.to_str().and_then(|s| Self::parse(s).ok())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Quotes a rejected id for an error message, escaping control characters and cutting it
/// short so a hostile id cannot flood or forge log lines.
fn shown(raw: &str) -> String {
    const SHOWN_CHARS: usize = 64; // enough to recognise a mistyped UUID
    let mut out: String = raw.chars().take(SHOWN_CHARS).collect::<String>();
    if raw.chars().count() > SHOWN_CHARS {
        out.push('…');
    }
    format!("{out:?}")
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageId({})", self.0)
    }
}

impl FromStr for ImageId {
    type Err = InvalidImageId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for ImageId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for ImageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_short_ids() {
        for ok in [
            "6f0d7c5e-2d3a-4c1b-9a57-0c8f1f6e2b11",
            "a",
            "IMAGE_1",
            "x".repeat(36).as_str(),
        ] {
            assert_eq!(ImageId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_everything_that_could_become_a_path() {
        let long = "x".repeat(37);
        for bad in [
            "", ".", "..", "../etc", "a/b", "/abs", "a\0b", "é", "a b", "a.db", &long, "a\nb",
        ] {
            assert!(ImageId::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        assert_eq!(
            ImageId::parse("").unwrap_err().to_string(),
            "invalid image id: empty"
        );
        let e = ImageId::parse("../x").unwrap_err().to_string();
        assert!(e.contains("\"../x\"") && e.contains("character 1"), "{e}");
        let e = ImageId::parse(&"y".repeat(40)).unwrap_err().to_string();
        assert!(e.contains("longer than 36"), "{e}");
    }

    #[test]
    fn file_names_that_are_not_ids_are_skipped() {
        use std::ffi::OsStr;
        assert!(ImageId::from_file_name(OsStr::new("cache.db")).is_none());
        assert!(ImageId::from_file_name(OsStr::new(".lock")).is_none());
        assert!(ImageId::from_file_name(OsStr::new("abc")).is_some());
    }

    #[test]
    fn glance_lock_files_are_not_ids() {
        for name in GLANCE_LOCK_NAMES {
            let e = ImageId::parse(name).unwrap_err().to_string();
            assert!(e.contains("lock file"), "{e}");
        }
        assert!(ImageId::parse("glance-cache-2").is_ok());
    }
}

/// Property tests of id validation (moved from the integration tests' hostile-input
/// file): whatever the input, an accepted id is exactly the allowed syntax and one normal
/// path component under each of the cache's directories.
#[cfg(test)]
pub(crate) mod proptests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Component;

    use proptest::prelude::*;

    use super::*;
    use crate::cache::{Area, CacheLayout};

    fn is_valid_id(raw: &str) -> bool {
        !GLANCE_LOCK_NAMES.contains(&raw)
            && (1..=36).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    /// Whatever `raw` is: accepted exactly when it is 1..=36 of [A-Za-z0-9_-], an accepted id
    /// is one normal path component under every area's directory, and a refusal is one
    /// bounded line.
    fn check_id(raw: &str) -> Result<(), TestCaseError> {
        // One layout for every case (opening one creates its directories).
        static LAYOUT: std::sync::OnceLock<(tempfile::TempDir, CacheLayout)> =
            std::sync::OnceLock::new();
        let (_, layout) = LAYOUT.get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let layout = CacheLayout::open(tmp.path().join("image-cache")).unwrap();
            (tmp, layout)
        });
        match ImageId::parse(raw) {
            Ok(id) => {
                prop_assert!(is_valid_id(raw), "accepted {raw:?}");
                prop_assert_eq!(id.as_str(), raw);
                for area in [Area::Cached, Area::Incomplete, Area::Invalid, Area::Queue] {
                    let dir = layout.dir(area);
                    let path = layout.path(area, &id);
                    prop_assert_eq!(path.parent(), Some(dir.as_path()));
                    prop_assert!(path.starts_with(&dir));
                    prop_assert_eq!(
                        path.components().next_back(),
                        Some(Component::Normal(OsStr::new(raw)))
                    );
                    prop_assert_eq!(path.components().count(), dir.components().count() + 1);
                }
            }
            Err(e) => {
                prop_assert!(!is_valid_id(raw), "refused {raw:?}: {e}");
                let msg = e.to_string();
                prop_assert!(!msg.contains('\n') && !msg.contains('\0'), "{msg:?}");
                prop_assert!(msg.chars().count() < 64 * 10 + 120, "{}", msg.len());
            }
        }
        Ok(())
    }

    /// The settings of the property tests of untrusted input (ids here, config values in
    /// `config::values`): 2,000 cases each, and no regression files written beside the
    /// sources.
    pub(crate) fn proptest_config() -> ProptestConfig {
        ProptestConfig {
            cases: 2000,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_image_id_parse_on_any_string(raw in any::<String>()) {
            check_id(&raw)?;
        }

        #[test]
        fn prop_image_id_parse_on_path_like_strings(
            raw in r"(\.\.?/|/|[A-Za-z0-9_.\x00é -]){0,40}"
        ) {
            check_id(&raw)?;
        }

        #[test]
        fn prop_every_valid_id_is_accepted(raw in "[A-Za-z0-9_-]{1,36}") {
            let id = ImageId::parse(&raw);
            prop_assert!(id.is_ok(), "{raw:?}: {id:?}");
            let id = id.unwrap();
            prop_assert_eq!(id.as_str(), raw.as_str());
        }

        #[test]
        fn prop_file_names_from_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..48)) {
            let from_name = ImageId::from_file_name(OsStr::from_bytes(&bytes));
            let expected = std::str::from_utf8(&bytes).ok().filter(|s| is_valid_id(s));
            prop_assert_eq!(from_name.as_ref().map(ImageId::as_str), expected);
        }
    }
}
