//! The validator: turns the merged dictionary into a `Config`, collecting every problem
//! (unknown key, wrong type, bad value, cross-field conflict) with where its value came
//! from.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::value::{Dict, Num, Value};
use figment::{Figment, Source};

use super::*;
use crate::db::{Dialect, mask_url};

/// The default transfer floor: 1 KiB/s over a minute of waiting fails only an upstream
/// that has all but stopped (a modem line moves more), not a slow one.
const DEFAULT_MIN_BYTES_PER_SECOND: u64 = 1024;
const DEFAULT_MIN_RATE_WINDOW: Duration = Duration::from_secs(60);

/// A whole number of any width and sign (figment parses "1000" as unsigned).
fn whole(n: Num) -> Option<i128> {
    n.to_i128()
        .or_else(|| n.to_u128().and_then(|u| i128::try_from(u).ok()))
}

/// Collects every problem while turning the merged dictionary into a `Config`.
pub(super) struct Validator<'a> {
    figment: &'a Figment,
    file: Option<&'a Path>,
    problems: Vec<ConfigProblem>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(figment: &'a Figment, file: Option<&'a Path>) -> Self {
        Validator {
            figment,
            file,
            problems: Vec::new(),
        }
    }

    pub(super) fn validate(mut self, dict: &Dict) -> Result<Config, ConfigError> {
        self.reject_unknown_keys(dict, "");
        let dir = self.path("cache.dir", DEFAULT_CACHE_DIR);
        let max_size = self.size("cache.max_size").unwrap_or(10 << 30);
        let stall_time = self
            .duration("cache.stall_time")
            .unwrap_or(Duration::from_secs(86_400));
        // Unset: SQLite in the cache directory, opened by path; the URL only shows it.
        let (url, sqlite_file) = match self.string("database.url") {
            Some(url) => (url, None),
            None => {
                let file = dir.join(DEFAULT_SQLITE_FILE);
                (format!("sqlite://{}", file.display()), Some(file))
            }
        };
        let dialect = Dialect::from_url(&url);
        if dialect.is_none() {
            self.problem(
                "database.url",
                format!(
                    "unsupported url {:?}: expected sqlite://, postgres:// or mysql://",
                    mask_url(&url)
                ),
            );
        }
        let max_connections = self
            .integer("database.max_connections", 1, 1_000)
            .unwrap_or(8) as u32;
        let connect_timeout = self
            .duration("database.connect_timeout")
            .unwrap_or(Duration::from_secs(5));
        let create_glance_tables = self
            .boolean("database.create_glance_tables")
            .unwrap_or(matches!(dialect, Some(Dialect::Sqlite)));
        let node_reference_url = match self.string("node.reference_url") {
            Some(u) if u.trim().is_empty() || u.len() > 255 => {
                self.problem("node.reference_url", "must be 1 to 255 characters".into());
                u
            }
            Some(u) => u,
            None if matches!(dialect, Some(Dialect::Postgres | Dialect::MySql)) => {
                self.problem(
                    "node.reference_url",
                    "is required with a shared PostgreSQL or MySQL database: set it to this node's Glance worker_self_reference_url".into(),
                );
                String::new()
            }
            None => DEFAULT_NODE_URL.to_owned(),
        };
        let level = self.string("log.level").unwrap_or_else(|| "info".into());
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
            self.problem("log.level", format!("invalid level {level:?}: {e}"));
        }
        let format = match self.string("log.format").as_deref() {
            None | Some("auto") => LogFormat::Auto,
            Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some("journald") => LogFormat::Journald,
            Some(other) => {
                self.problem(
                    "log.format",
                    format!("unknown format {other:?}: expected auto, text, json or journald"),
                );
                LogFormat::Auto
            }
        };
        let cleaner = CleanerConfig {
            interval: self
                .positive_duration("cleaner.interval")
                .unwrap_or(Duration::from_secs(600)),
            invalid_grace: self
                .duration("cleaner.invalid_grace")
                .unwrap_or(Duration::ZERO),
        };
        let pruner = PrunerConfig {
            interval: self
                .positive_duration("pruner.interval")
                .unwrap_or(Duration::from_secs(600)),
            low_watermark: self.size("pruner.low_watermark"),
            min_free_disk: self.size("pruner.min_free_disk"),
        };
        if let Some(low) = pruner.low_watermark
            && low > max_size
        {
            self.problem(
                "pruner.low_watermark",
                format!(
                    "{} is larger than cache.max_size ({})",
                    format_size(low),
                    format_size(max_size)
                ),
            );
        }
        let lease_ttl = self
            .positive_duration("daemon.lease_ttl")
            .unwrap_or(Duration::from_secs(60));
        if lease_ttl < Duration::from_secs(3) {
            self.problem("daemon.lease_ttl", "must be at least 3s".into());
        }
        let daemon = DaemonConfig {
            lease_ttl,
            shutdown_timeout: self
                .positive_duration("daemon.shutdown_timeout")
                .unwrap_or(Duration::from_secs(30)),
        };
        let prefetcher = self.prefetcher();
        let upstream = self.upstream();
        if !self.problems.is_empty() {
            return Err(ConfigError::Invalid(self.problems));
        }
        Ok(Config {
            file: self.file.map(Path::to_path_buf),
            cache: CacheConfig {
                dir,
                max_size,
                stall_time,
            },
            database: DatabaseConfig {
                url,
                max_connections,
                connect_timeout,
                create_glance_tables,
                sqlite_file,
            },
            node_reference_url,
            log: LogConfig { level, format },
            cleaner,
            pruner,
            daemon,
            prefetcher,
            upstream,
        })
    }

    fn reject_unknown_keys(&mut self, dict: &Dict, prefix: &str) {
        for (name, value) in dict {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let is_section = all_keys().any(|k| k.starts_with(&format!("{key}.")));
            match value {
                Value::Dict(_, inner) if is_section => self.reject_unknown_keys(inner, &key),
                _ if all_keys().any(|k| k == key) => {}
                _ if is_section => self.problem(&key, "must be a table of keys".into()),
                _ => self.problem(&key, "unknown key".into()),
            }
        }
    }

    pub(super) fn problem(&mut self, key: &str, message: String) {
        let origin = self.origin(key);
        self.problems.push(ConfigProblem {
            key: key.to_owned(),
            origin,
            message,
        });
    }

    /// The file or environment variable that supplied `key`.
    fn origin(&self, key: &str) -> Option<String> {
        let value = self.figment.find_value(key).ok()?;
        let meta = self.figment.get_metadata(value.tag())?;
        match &meta.source {
            Some(Source::File(path)) => Some(path.display().to_string()),
            _ => Some(format!(
                "{ENV_PREFIX}{}",
                key.to_ascii_uppercase().replace('.', "__")
            )),
        }
    }

    /// Whether the value with `tag` came from a configuration file.
    fn came_from_file(&self, tag: figment::value::Tag) -> bool {
        self.figment
            .get_metadata(tag)
            .is_some_and(|m| matches!(m.source, Some(Source::File(_))))
    }

    fn value(&self, key: &str) -> Option<Value> {
        self.figment.find_value(key).ok()
    }

    pub(super) fn string(&mut self, key: &str) -> Option<String> {
        match self.value(key)? {
            Value::String(_, s) => Some(s),
            // The environment has no types: figment reads `GLANCE_CACHED_..=1234` as a
            // number, which may well be a password. A number in a file is a mistake.
            Value::Num(tag, n) if !self.came_from_file(tag) => whole(n).map(|n| n.to_string()),
            _ => {
                self.problem(key, "must be a string".into());
                None
            }
        }
    }

    pub(super) fn boolean(&mut self, key: &str) -> Option<bool> {
        match self.value(key)? {
            Value::Bool(_, b) => Some(b),
            // The environment has no types; figment passes some spellings through as text.
            Value::String(tag, s) if !self.came_from_file(tag) => {
                match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "yes" | "1" => Some(true),
                    "false" | "no" | "0" => Some(false),
                    _ => {
                        self.problem(key, format!("invalid value {s:?}: must be true or false"));
                        None
                    }
                }
            }
            _ => {
                self.problem(key, "must be true or false".into());
                None
            }
        }
    }

    pub(super) fn integer(&mut self, key: &str, min: i128, max: i128) -> Option<i128> {
        let v = self.value(key)?;
        let n = match &v {
            Value::Num(_, n) => whole(*n),
            Value::String(_, s) => s.trim().parse().ok(),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.problem(key, format!("must be a whole number from {min} to {max}"));
                None
            }
        }
    }

    pub(super) fn size(&mut self, key: &str) -> Option<u64> {
        let parsed = match self.value(key)? {
            Value::Num(_, n) => match whole(n) {
                Some(n) if n >= 0 => u64::try_from(n).map_err(|_| "too large".to_string()),
                Some(n) => Err(format!("invalid size {n}: must not be negative")),
                None => Err("must be a whole number of bytes or a string like \"10GiB\"".into()),
            },
            Value::String(_, s) => parse_size(&s),
            _ => Err("must be a number of bytes or a string like \"10GiB\"".into()),
        };
        parsed.map_err(|m| self.problem(key, m)).ok()
    }

    pub(super) fn duration(&mut self, key: &str) -> Option<Duration> {
        let parsed = match self.value(key)? {
            Value::Num(_, n) => match whole(n) {
                Some(n) if n >= 0 => u64::try_from(n)
                    .map(Duration::from_secs)
                    .map_err(|_| "too large".to_string()),
                Some(n) => Err(format!("invalid duration {n}: must not be negative")),
                None => Err("must be whole seconds or a string like \"10m\"".into()),
            },
            Value::String(_, s) => parse_duration(&s),
            _ => Err("must be seconds or a string like \"10m\"".into()),
        };
        // Anything past a century is a typo, and would overflow time arithmetic.
        const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);
        match parsed {
            Ok(d) if d > MAX_DURATION => {
                self.problem(key, "must be at most 100 years".into());
                None
            }
            other => other.map_err(|m| self.problem(key, m)).ok(),
        }
    }

    pub(super) fn positive_duration(&mut self, key: &str) -> Option<Duration> {
        let d = self.duration(key)?;
        if d.is_zero() {
            self.problem(key, "must be greater than zero".into());
            return None;
        }
        Some(d)
    }

    /// An absolute path; a relative one in a file is taken relative to that file's
    /// directory, from the environment relative to the working directory.
    pub(super) fn path(&mut self, key: &str, default: &str) -> PathBuf {
        self.optional_path(key)
            .unwrap_or_else(|| PathBuf::from(default))
    }

    /// `path` for a key without a default: `None` when unset (or empty, a problem).
    pub(super) fn optional_path(&mut self, key: &str) -> Option<PathBuf> {
        let raw = self.string(key)?;
        if raw.is_empty() {
            self.problem(key, "must not be empty".into());
            return None;
        }
        let p = PathBuf::from(&raw);
        if p.is_absolute() {
            return Some(p);
        }
        let from_file = self
            .figment
            .find_value(key)
            .ok()
            .and_then(|v| self.figment.get_metadata(v.tag()).cloned())
            .and_then(|m| match m.source {
                Some(Source::File(f)) => f.parent().map(Path::to_path_buf),
                _ => None,
            });
        let base = from_file.or_else(|| std::env::current_dir().ok());
        match base {
            Some(b) => Some(b.join(p)),
            None => {
                self.problem(
                    key,
                    "is relative and the working directory is unknown".into(),
                );
                Some(p)
            }
        }
    }
}

impl Validator<'_> {
    pub(super) fn prefetcher(&mut self) -> PrefetcherConfig {
        let retry_delay = self
            .positive_duration("prefetcher.retry_delay")
            .unwrap_or(Duration::from_secs(30));
        let max_retry_delay = self
            .positive_duration("prefetcher.max_retry_delay")
            .unwrap_or(Duration::from_secs(3600));
        if max_retry_delay < retry_delay {
            self.problem(
                "prefetcher.max_retry_delay",
                "must not be shorter than prefetcher.retry_delay".into(),
            );
        }
        let max_bytes_per_second = self.size("prefetcher.max_bytes_per_second");
        if max_bytes_per_second == Some(0) {
            self.problem(
                "prefetcher.max_bytes_per_second",
                "must be greater than zero (leave it unset for no limit)".into(),
            );
        }
        // "0" turns the floor off (a default on a config file's word).
        let min_bytes_per_second = match self.size("prefetcher.min_bytes_per_second") {
            None => Some(DEFAULT_MIN_BYTES_PER_SECOND),
            Some(0) => None,
            some => some,
        };
        let min_rate_window = self
            .positive_duration("prefetcher.min_rate_window")
            .unwrap_or(DEFAULT_MIN_RATE_WINDOW);
        PrefetcherConfig {
            min_bytes_per_second,
            min_rate_window,
            concurrency: self.integer("prefetcher.concurrency", 1, 64).unwrap_or(2) as usize,
            interval: self
                .positive_duration("prefetcher.interval")
                .unwrap_or(Duration::from_secs(300)),
            max_attempts: self
                .integer("prefetcher.max_attempts", 1, 1000)
                .unwrap_or(5) as u32,
            retry_delay,
            max_retry_delay,
            max_bytes_per_second,
            claim_ttl: self.claim_ttl(),
        }
    }

    fn claim_ttl(&mut self) -> Duration {
        const DEFAULT: Duration = Duration::from_secs(6 * 3600);
        match self.duration("prefetcher.claim_ttl") {
            // Renewed every sixth of it: shorter would spin on the database.
            Some(d) if d < Duration::from_secs(1) => {
                self.problem("prefetcher.claim_ttl", "must be at least 1s".into());
                DEFAULT
            }
            Some(d) => d,
            None => DEFAULT,
        }
    }
}
