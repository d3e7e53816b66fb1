//! The key table: every configuration key once, with its kind (how its text is read),
//! its default, whether a reload applies it or it needs a restart, and a one-line doc.
//! The validator, `Config::to_toml`, the restart diff and the reload's keeping of
//! restart-only keys all walk this table; the example config is checked against it.

use std::path::PathBuf;
use std::time::Duration;

use super::validate::Validator;
use super::{Config, DEFAULT_CACHE_DIR, GlanceAuth, KeystoneMethod, LogFormat, UpstreamConfig};
use super::{UpstreamKind, format_duration, format_size, upstream, validate};
use crate::digest::VerifyPolicy;
use crate::redact::mask_url;

/// A key's value, parsed: what the validator stores, `to_toml` prints and the restart
/// diff compares.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Path(PathBuf),
    Size(u64),
    Duration(Duration),
    Integer(i128),
    Bool(bool),
    Text(String),
    List(Vec<String>),
}

/// How a key's text is read and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Absolute, or relative to the config file's directory (from the environment, to the
    /// working directory).
    Path,
    /// Bytes or a number with a unit ("10GiB").
    Size,
    /// Seconds or a number with units ("1h30m"), at most 100 years.
    Duration,
    /// A `Duration` greater than zero (an interval or a timeout).
    PositiveDuration,
    Integer {
        min: i128,
        max: i128,
    },
    Bool,
    Text,
    /// Text shown with its password masked.
    Url,
    /// Text never shown.
    Secret,
    /// One of `words`; `what` names it in the error ("unknown format ...").
    Choice {
        what: &'static str,
        words: &'static [&'static str],
    },
    /// A list of strings (from the environment: comma-separated).
    List,
    /// One URL or a list of them (from the environment: comma-separated), shown with
    /// their passwords masked.
    UrlList,
}

/// A key's value when neither the file nor the environment sets it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum DefaultValue {
    /// No value: the feature is off or the key not needed.
    Unset,
    /// Follows from other keys, as the key's doc says (filled by its `Fill::Derive`).
    Derived,
    Size(u64),
    Duration(Duration),
    Integer(i128),
    Bool(bool),
    /// Text, a path or a choice.
    Text(&'static str),
    List(&'static [&'static str]),
}

impl DefaultValue {
    /// The default as a value of `kind`; `None` when unset or derived.
    pub(crate) fn value(self, kind: Kind) -> Option<Value> {
        Some(match self {
            DefaultValue::Unset | DefaultValue::Derived => return None,
            DefaultValue::Size(b) => Value::Size(b),
            DefaultValue::Duration(d) => Value::Duration(d),
            DefaultValue::Integer(n) => Value::Integer(n),
            DefaultValue::Bool(b) => Value::Bool(b),
            DefaultValue::Text(s) if kind == Kind::Path => Value::Path(PathBuf::from(s)),
            DefaultValue::Text(s) => Value::Text(s.to_owned()),
            DefaultValue::List(items) => {
                Value::List(items.iter().map(|s| (*s).to_owned()).collect())
            }
        })
    }
}

/// Whether a running daemon applies a changed key on SIGHUP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reload {
    /// Applied by the reload.
    Yes,
    /// Logged as ignored; the running value stays until the next start.
    Restart,
}

/// How the validator fills a key's place in `Config`.
#[derive(Clone, Copy)]
pub(super) enum Fill {
    /// Read by the key's kind (its default when unset or invalid), checked, stored.
    Set(fn(&mut Config, Option<Value>)),
    /// Computed by code from this key and those before it (a derived default, a
    /// tagged section).
    Derive(fn(&mut Validator<'_>, &mut Config)),
    /// Filled with its section by an earlier key's `Derive` (`upstream.kind`).
    WithSection,
}

/// A rule a key's value must follow beyond its kind: the problem's message, or `Ok`.
pub(super) type Check = fn(&Value, &Config) -> Result<(), String>;

/// One configuration key.
pub(crate) struct Key {
    /// `section.key`, as the file nests it and the environment spells it
    /// (`GLANCE_CACHED_SECTION__KEY`).
    pub name: &'static str,
    pub kind: Kind,
    pub default: DefaultValue,
    pub reload: Reload,
    /// One line for the reader of this table (the operators' text is the example
    /// config's); only its unit test reads it.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "documentation, checked by a unit test")
    )]
    pub doc: &'static str,
    pub(super) fill: Fill,
    /// A rule beyond the kind, given the keys filled before this one; runs on the value
    /// in effect (the default too).
    pub(super) check: Option<Check>,
    /// The value in effect; `None` when unset (or, in `[upstream]`, not of this kind).
    pub(super) get: fn(&Config) -> Option<Value>,
    /// Puts the running value back into a reloaded config (for `Reload::Restart` keys).
    pub(super) keep: fn(&mut Config, &Config),
}

impl Key {
    /// The table section, e.g. "upstream.keystone".
    pub(crate) fn section(&self) -> &'static str {
        self.name.rsplit_once('.').map_or("", |(s, _)| s)
    }

    /// The key within its section, e.g. "max_size".
    pub(crate) fn leaf(&self) -> &'static str {
        self.name.rsplit_once('.').map_or(self.name, |(_, k)| k)
    }

    /// `[upstream]` is one value, a union tagged by `upstream.kind`: its keys are
    /// compared, kept and reported as one ("upstream"), since the daemon builds its
    /// upstream once, and a key of another kind is absent rather than unset.
    pub(crate) fn in_upstream(&self) -> bool {
        self.name.starts_with("upstream.")
    }

    /// The name a restart diff reports a change of this key under.
    pub(crate) fn applied_as(&self) -> &'static str {
        if self.in_upstream() {
            "upstream"
        } else {
            self.name
        }
    }

    /// The key's line in `to_toml`, or `None` for an absent `[upstream]` key.
    pub(super) fn toml_line(&self, config: &Config) -> Option<String> {
        match (self.get)(config) {
            Some(value) => Some(format!("{} = {}", self.leaf(), self.kind.show(&value))),
            None if self.in_upstream() => None,
            None => Some(format!("# {} is unset", self.leaf())),
        }
    }
}

impl Kind {
    /// `value` as a TOML value, secrets masked.
    pub(crate) fn show(self, value: &Value) -> String {
        match (self, value) {
            (_, Value::Path(p)) => format!("{:?}", p.display().to_string()),
            (_, Value::Size(b)) => format!("{:?}", format_size(*b)),
            (_, Value::Duration(d)) => format!("{:?}", format_duration(*d)),
            (_, Value::Integer(n)) => n.to_string(),
            (_, Value::Bool(b)) => b.to_string(),
            (Kind::Url, Value::Text(s)) => format!("{:?}", mask_url(s)),
            (Kind::Secret, Value::Text(_)) => "\"***\"".into(),
            (Kind::UrlList, Value::List(items)) if items.len() == 1 => {
                format!("{:?}", mask_url(&items[0]))
            }
            (Kind::UrlList, Value::List(items)) => {
                let items: Vec<String> =
                    items.iter().map(|s| format!("{:?}", mask_url(s))).collect();
                format!("[{}]", items.join(", "))
            }
            (_, Value::Text(s)) => format!("{s:?}"),
            (_, Value::List(items)) => {
                let items: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
                format!("[{}]", items.join(", "))
            }
        }
    }
}

/// "unknown format "xml": expected auto, text, json or journald".
pub(super) fn unknown_choice(what: &str, word: &str, words: &[&str]) -> String {
    let expected = match words.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    format!("unknown {what} {word:?}: expected {expected}")
}

/// A field of `Config` as a `Value` and back.
pub(super) trait Field: Sized {
    fn to_value(&self) -> Option<Value>;
    /// `None`: `value` is not of this field's type (a table mistake the tests catch).
    fn from_value(value: Option<Value>) -> Option<Self>;
}

/// `Field` for a type that is one `Value` variant.
macro_rules! field_as {
    ($($ty:ty => $variant:ident),+ $(,)?) => {$(
        impl Field for $ty {
            fn to_value(&self) -> Option<Value> {
                Some(Value::$variant(Clone::clone(self)))
            }
            fn from_value(value: Option<Value>) -> Option<Self> {
                match value? {
                    Value::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    )+};
}

field_as!(u64 => Size, Duration => Duration, PathBuf => Path, String => Text, bool => Bool,
    Vec<String> => List);

impl Field for Option<String> {
    fn to_value(&self) -> Option<Value> {
        self.clone().map(Value::Text)
    }
    fn from_value(value: Option<Value>) -> Option<Self> {
        match value {
            None => Some(None),
            Some(Value::Text(s)) => Some(Some(s)),
            Some(_) => None,
        }
    }
}

impl Field for Option<PathBuf> {
    fn to_value(&self) -> Option<Value> {
        self.clone().map(Value::Path)
    }
    fn from_value(value: Option<Value>) -> Option<Self> {
        match value {
            None => Some(None),
            Some(Value::Path(p)) => Some(Some(p)),
            Some(_) => None,
        }
    }
}

impl Field for Option<u64> {
    fn to_value(&self) -> Option<Value> {
        self.map(Value::Size)
    }
    fn from_value(value: Option<Value>) -> Option<Self> {
        match value {
            None => Some(None),
            Some(Value::Size(b)) => Some(Some(b)),
            Some(_) => None,
        }
    }
}

/// `Field` for a count stored from an `Integer` (its kind's range makes it fit).
macro_rules! field_count {
    ($($ty:ty),+) => {$(
        impl Field for $ty {
            fn to_value(&self) -> Option<Value> {
                i128::try_from(*self).ok().map(Value::Integer)
            }
            fn from_value(value: Option<Value>) -> Option<Self> {
                match value? {
                    Value::Integer(n) => <$ty>::try_from(n).ok(),
                    _ => None,
                }
            }
        }
    )+};
}

field_count!(u32, usize);

impl Field for VerifyPolicy {
    fn to_value(&self) -> Option<Value> {
        Some(Value::Text(self.as_str().to_owned()))
    }
    fn from_value(value: Option<Value>) -> Option<Self> {
        match value? {
            Value::Text(s) => VerifyPolicy::from_word(&s),
            _ => None,
        }
    }
}

impl Field for LogFormat {
    fn to_value(&self) -> Option<Value> {
        Some(Value::Text(self.as_str().to_owned()))
    }
    fn from_value(value: Option<Value>) -> Option<Self> {
        match value? {
            Value::Text(s) => LogFormat::from_word(&s),
            _ => None,
        }
    }
}

/// A key stored in one field of `Config`: its `get`, `Fill::Set` and `keep` from the
/// field's path, the rest as given.
macro_rules! key {
    ($name:literal, $kind:expr, $default:expr, $reload:ident, $doc:literal,
     $($field:ident).+ $(, check: $check:expr)?) => {
        Key {
            name: $name,
            kind: $kind,
            default: $default,
            reload: Reload::$reload,
            doc: $doc,
            fill: Fill::Set(|c, v| {
                if let Some(x) = Field::from_value(v) {
                    c.$($field).+ = x;
                }
            }),
            check: key!(@check $($check)?),
            get: |c| Field::to_value(&c.$($field).+),
            keep: |new, running| new.$($field).+ = running.$($field).+.clone(),
        }
    };
    (@check) => { None };
    (@check $check:expr) => { Some($check) };
}

/// A key of `[upstream]`: filled with the section by `upstream.kind`, kept with it.
macro_rules! upstream_key {
    ($name:literal, $kind:expr, $default:expr, $doc:literal, $get:expr) => {
        Key {
            name: $name,
            kind: $kind,
            default: $default,
            reload: Reload::Restart,
            doc: $doc,
            fill: Fill::WithSection,
            check: None,
            get: |c| c.upstream.as_ref().and_then($get),
            keep: keep_upstream,
        }
    };
}

use DefaultValue::{Derived, Unset};

/// The words of `log.format`, in `LogFormat`'s order.
pub(super) const LOG_FORMATS: &[&str] = &["auto", "text", "json", "journald"];
/// The words of `prefetcher.verify`, in `VerifyPolicy`'s order.
pub(super) const VERIFY_POLICIES: &[&str] = &["strongest", "all"];
/// The words of `upstream.kind`.
pub(super) const UPSTREAM_KINDS: &[&str] = &["glance", "http", "directory"];

/// `http.serve_auth`: who may download images from a cache whose upstream is not Glance.
pub(super) const SERVE_AUTHS: &[&str] = &["none", "token"];

/// Every key, section by section, in the order `check-config` prints them.
pub(crate) static KEYS: &[Key] = &[
    key!(
        "cache.dir",
        Kind::Path,
        DefaultValue::Text(DEFAULT_CACHE_DIR),
        Restart,
        "The cache directory, shared with Glance's API on this node (Glance: image_cache_dir)",
        cache.dir
    ),
    key!(
        "cache.max_size",
        Kind::Size,
        DefaultValue::Size(10 << 30),
        Yes,
        "Prune least recently used images once the cache is larger than this",
        cache.max_size
    ),
    key!(
        "cache.stall_time",
        Kind::Duration,
        DefaultValue::Duration(Duration::from_secs(86_400)),
        Yes,
        "An incomplete/ file not written for this long is removed",
        cache.stall_time
    ),
    Key {
        name: "database.url",
        kind: Kind::Url,
        default: Derived,
        reload: Reload::Restart,
        doc: "Where the cache metadata lives (a sqlx URL); unset: SQLite at <cache.dir>/.glance-cached/glance-cached.db",
        fill: Fill::Derive(validate::database_url),
        check: None,
        get: |c| Some(Value::Text(c.database.url.clone())),
        // The default SQLite file is the URL's: they change together.
        keep: |new, running| {
            new.database.url = running.database.url.clone();
            new.database.sqlite_file = running.database.sqlite_file.clone();
        },
    },
    key!(
        "database.max_connections",
        Kind::Integer { min: 1, max: 1_000 },
        DefaultValue::Integer(8),
        Restart,
        "Connections in the pool",
        database.max_connections
    ),
    key!(
        "database.connect_timeout",
        Kind::Duration,
        DefaultValue::Duration(Duration::from_secs(5)),
        Restart,
        "How long to wait for a connection before reporting the database unreachable",
        database.connect_timeout
    ),
    Key {
        name: "database.create_glance_tables",
        kind: Kind::Bool,
        default: Derived,
        reload: Reload::Restart,
        doc: "May Glance's cache tables be created when the database has none? Unset: only for SQLite",
        fill: Fill::Derive(validate::create_glance_tables),
        check: None,
        get: |c| Field::to_value(&c.database.create_glance_tables),
        keep: |new, running| {
            new.database.create_glance_tables = running.database.create_glance_tables;
        },
    },
    Key {
        name: "node.reference_url",
        kind: Kind::Text,
        default: Derived,
        reload: Reload::Restart,
        doc: "This node's key in the database (Glance: worker_self_reference_url); required with PostgreSQL or MySQL",
        fill: Fill::Derive(validate::node_reference_url),
        check: None,
        get: |c| Field::to_value(&c.node_reference_url),
        keep: |new, running| new.node_reference_url = running.node_reference_url.clone(),
    },
    key!("log.level", Kind::Text, DefaultValue::Text("info"), Yes,
        "Level or tracing filter, e.g. \"debug\" or \"glance_cached=debug,sqlx=warn\"",
        log.level, check: validate::log_filter),
    key!(
        "log.format",
        Kind::Choice {
            what: "format",
            words: LOG_FORMATS
        },
        DefaultValue::Text("auto"),
        Restart,
        "auto (journald under systemd, text on a terminal), text, json or journald",
        log.format
    ),
    key!(
        "cleaner.interval",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(600)),
        Yes,
        "How often the cleaner rescans invalid/ and incomplete/, and the queue loop queue/, as a safety net",
        cleaner.interval
    ),
    key!(
        "cleaner.invalid_grace",
        Kind::Duration,
        DefaultValue::Duration(Duration::ZERO),
        Yes,
        "How long a file in invalid/ is kept before removal",
        cleaner.invalid_grace
    ),
    key!(
        "pruner.interval",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(600)),
        Yes,
        "How often the pruner checks the cache size as a safety net",
        pruner.interval
    ),
    key!("pruner.low_watermark", Kind::Size, Unset, Yes,
        "Once pruning, evict down to this size instead of just under max_size",
        pruner.low_watermark, check: validate::not_above_max_size),
    key!(
        "pruner.min_free_disk",
        Kind::Size,
        Unset,
        Yes,
        "Also prune while the cache filesystem has less free space than this",
        pruner.min_free_disk
    ),
    key!(
        "daemon.shutdown_timeout",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(30)),
        Yes,
        "How long shutdown waits for the loops to finish their step before aborting them",
        daemon.shutdown_timeout
    ),
    key!("daemon.lease_ttl", Kind::PositiveDuration, DefaultValue::Duration(Duration::from_secs(60)), Yes,
        "The node's lease expires when not renewed for this long (renewed every third); at least 3s",
        daemon.lease_ttl, check: |v, _| validate::at_least(v, Duration::from_secs(3))),
    key!(
        "prefetcher.concurrency",
        Kind::Integer { min: 1, max: 64 },
        DefaultValue::Integer(2),
        Yes,
        "Downloads at once",
        prefetcher.concurrency
    ),
    key!(
        "prefetcher.interval",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(300)),
        Yes,
        "How often the queue is checked as a safety net",
        prefetcher.interval
    ),
    key!(
        "prefetcher.max_attempts",
        Kind::Integer { min: 1, max: 1000 },
        DefaultValue::Integer(5),
        Yes,
        "A download failing verification is retried until this many attempts, then dropped",
        prefetcher.max_attempts
    ),
    key!(
        "prefetcher.retry_delay",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(30)),
        Yes,
        "First delay before retrying a failed image; doubles per attempt up to max_retry_delay",
        prefetcher.retry_delay
    ),
    key!("prefetcher.max_retry_delay", Kind::PositiveDuration, DefaultValue::Duration(Duration::from_secs(3600)), Yes,
        "The longest delay between retries",
        prefetcher.max_retry_delay, check: validate::not_below_retry_delay),
    // Renewed every sixth of it: shorter than a second would spin on the database.
    key!("prefetcher.claim_ttl", Kind::Duration, DefaultValue::Duration(Duration::from_secs(6 * 3600)), Yes,
        "A download's claim on its queued image runs out unless renewed for this long; at least 1s",
        prefetcher.claim_ttl, check: |v, _| validate::at_least(v, Duration::from_secs(1))),
    key!("prefetcher.max_bytes_per_second", Kind::Size, Unset, Yes,
        "Cap on the total download bandwidth; unset: no cap",
        prefetcher.max_bytes_per_second, check: validate::not_zero),
    Key {
        name: "prefetcher.min_bytes_per_second",
        kind: Kind::Size,
        // 1 KiB/s over a minute of waiting fails only an upstream that has all but
        // stopped (a modem line moves more), not a slow one.
        default: DefaultValue::Size(1024),
        reload: Reload::Yes,
        doc: "A download fails when its upstream brings less than this over min_rate_window; 0: no floor",
        // "0" turns the floor off, and is how it is shown.
        fill: Fill::Set(|c, v| {
            c.prefetcher.min_bytes_per_second = match v {
                Some(Value::Size(b)) if b > 0 => Some(b),
                _ => None,
            };
        }),
        check: None,
        get: |c| match c.prefetcher.min_bytes_per_second {
            Some(b) => Some(Value::Size(b)),
            None => Some(Value::Integer(0)),
        },
        keep: |new, running| {
            new.prefetcher.min_bytes_per_second = running.prefetcher.min_bytes_per_second;
        },
    },
    key!(
        "prefetcher.min_rate_window",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(60)),
        Yes,
        "The window of waiting over which min_bytes_per_second is measured",
        prefetcher.min_rate_window
    ),
    // Read when each download starts (`FetchLimits`), so a reload applies it to the next.
    key!(
        "prefetcher.verify",
        Kind::Choice {
            what: "verification policy",
            words: VERIFY_POLICIES
        },
        DefaultValue::Text("strongest"),
        Yes,
        "strongest: check only the strongest digest the upstream publishes (its SHA-2, else its MD5) and the size; all: every published digest",
        prefetcher.verify
    ),
    key!(
        "http.enabled",
        Kind::Bool,
        DefaultValue::Bool(false),
        Restart,
        "Serve health and Glance's cache API over HTTP on http.listen",
        http.enabled
    ),
    key!("http.listen", Kind::List, DefaultValue::List(&["127.0.0.1:9393"]), Restart,
        "Where to listen: \"address:port\" and \"unix:/path\" entries (ignored under systemd socket activation)",
        http.listen, check: validate::listen_addresses),
    key!(
        "http.header_read_timeout",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(10)),
        Yes,
        "A connection that has not sent a whole request head this long after it became ready for one is closed",
        http.header_read_timeout
    ),
    key!(
        "http.idle_timeout",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(60)),
        Yes,
        "A connection on which no byte moves for this long is closed",
        http.idle_timeout
    ),
    key!(
        "http.max_connections",
        Kind::Integer {
            min: 1,
            max: 100_000
        },
        DefaultValue::Integer(256),
        Restart,
        "Connections served at once; further ones wait in the listen backlog",
        http.max_connections
    ),
    key!(
        "http.max_request_body",
        Kind::Size,
        DefaultValue::Size(64 << 10),
        Yes,
        "A request whose body is larger is refused with 413",
        http.max_request_body
    ),
    key!(
        "http.hit_flush_interval",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(1)),
        Yes,
        "Hits of served images are counted in memory and written to cached_images once per this interval (and at shutdown)",
        http.hit_flush_interval
    ),
    key!("http.admin_token_file", Kind::Path, Unset, Yes,
        "The file holding the token the cache API requires in X-Auth-Token; unset: the cache API answers 401",
        http.admin_token_file, check: validate::secret_file),
    key!(
        "http.tls_cert_file",
        Kind::Path,
        Unset,
        Restart,
        "PEM certificate chain for TLS on the TCP listeners, with tls_key_file; the files are re-read on SIGHUP, turning TLS on or off or moving them needs a restart",
        http.tls_cert_file
    ),
    Key {
        name: "http.tls_key_file",
        kind: Kind::Path,
        default: Unset,
        // Restart: turning TLS on or off or moving the files; the pair itself is
        // re-read by every reload.
        reload: Reload::Restart,
        doc: "PEM private key of tls_cert_file (not readable by others); re-read on SIGHUP",
        fill: Fill::Derive(validate::tls_key_file),
        check: None,
        get: |c| Field::to_value(&c.http.tls_key_file),
        keep: |new, running| new.http.tls_key_file = running.http.tls_key_file.clone(),
    },
    key!(
        "http.send_timeout",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(60)),
        Yes,
        "A connection whose response cannot be written for this long (its client reads nothing) is dropped",
        http.send_timeout
    ),
    key!(
        "http.auth_cache_ttl",
        Kind::Duration,
        DefaultValue::Duration(Duration::from_secs(60)),
        Yes,
        "How long the upstream Glance's permission for a token to download an image is remembered; 0: asked every time",
        http.auth_cache_ttl
    ),
    key!(
        "http.serve_auth",
        Kind::Choice {
            what: "serve_auth",
            words: SERVE_AUTHS
        },
        Unset,
        Yes,
        "Who may download images when the upstream is not Glance: none (the networks of serve_allow) or token (serve_token_file); unset: nobody",
        http.serve_auth
    ),
    key!("http.serve_allow", Kind::List, DefaultValue::List(&[]), Yes,
        "With serve_auth = \"none\": the client networks (CIDRs, \"unix\" for unix-socket clients) that may download images",
        http.serve_allow, check: validate::serve_networks),
    key!("http.serve_token_file", Kind::Path, Unset, Yes,
        "With serve_auth = \"token\": the file holding the token image downloads require in X-Auth-Token",
        http.serve_token_file, check: validate::secret_file),
    key!(
        "http.admin_roles",
        Kind::List,
        DefaultValue::List(&["admin"]),
        Yes,
        "With [upstream.keystone]: the Keystone roles of which a token needs one for the cache API (Glance's default policy: admin); without one it is 403",
        http.admin_roles
    ),
    key!("http.metrics_listen", Kind::List, DefaultValue::List(&[]), Restart,
        "Where to serve /metrics (and /healthz, /readyz) instead of on http.listen, which then answers /metrics with 404; empty: on http.listen",
        http.metrics_listen, check: validate::listen_addresses),
    key!(
        "http.forward",
        Kind::Bool,
        DefaultValue::Bool(false),
        Yes,
        "Forward every request no route of ours answers to the Glance upstream (upstream.kind = \"glance\" only)",
        http.forward
    ),
    key!("http.public_url", Kind::Url, Unset, Yes,
        "The URL clients reach this listener by: forwarded version documents link to it; unset: links pass as the upstream wrote them",
        http.public_url, check: validate::public_url),
    key!(
        "http.fill_on_miss",
        Kind::Bool,
        DefaultValue::Bool(true),
        Yes,
        "A download of an image not cached fills the cache from the upstream once, however many clients ask; false: streamed through without caching",
        http.fill_on_miss
    ),
    key!(
        "http.fill_on_range",
        Kind::Bool,
        DefaultValue::Bool(true),
        Yes,
        "A Range request for an image not cached (passed to the upstream as a range) also starts filling the cache in the background",
        http.fill_on_range
    ),
    Key {
        name: "upstream.kind",
        kind: Kind::Choice {
            what: "kind",
            words: UPSTREAM_KINDS,
        },
        default: Unset,
        reload: Reload::Restart,
        doc: "Where prefetched images come from: glance, http or directory; unset: queued images wait",
        fill: Fill::Derive(upstream::fill),
        check: None,
        get: |c| {
            let kind = match &c.upstream.as_ref()?.kind {
                UpstreamKind::Glance { .. } => "glance",
                UpstreamKind::Http { .. } => "http",
                UpstreamKind::Directory { .. } => "directory",
            };
            Some(Value::Text(kind.to_owned()))
        },
        keep: keep_upstream,
    },
    upstream_key!(
        "upstream.url",
        Kind::UrlList,
        Unset,
        "glance: the Glance API endpoint, e.g. https://glance.example.org:9292, or a list of them (failover)",
        |u| glance(u).map(|(urls, _)| Value::List(urls.clone()))
    ),
    upstream_key!(
        "upstream.token_file",
        Kind::Path,
        Unset,
        "glance: a file holding a token for X-Auth-Token, re-read for every request",
        |u| match glance(u)?.1 {
            GlanceAuth::TokenFile(p) => Some(Value::Path(p.clone())),
            _ => None,
        }
    ),
    upstream_key!(
        "upstream.url_template",
        Kind::Url,
        Unset,
        "http: a URL with {image_id}",
        |u| match &u.kind {
            UpstreamKind::Http { url_template, .. } => Some(Value::Text(url_template.clone())),
            _ => None,
        }
    ),
    upstream_key!(
        "upstream.md5_header",
        Kind::Text,
        Unset,
        "http: the response header carrying the expected MD5 (hex)",
        |u| match &u.kind {
            UpstreamKind::Http { md5_header, .. } => md5_header.clone().map(Value::Text),
            _ => None,
        }
    ),
    upstream_key!(
        "upstream.sha512_header",
        Kind::Text,
        Unset,
        "http: the response header carrying the expected SHA-512 (hex)",
        |u| match &u.kind {
            UpstreamKind::Http { sha512_header, .. } => sha512_header.clone().map(Value::Text),
            _ => None,
        }
    ),
    upstream_key!(
        "upstream.path",
        Kind::Path,
        Unset,
        "directory: the directory holding <image_id> files",
        |u| match &u.kind {
            UpstreamKind::Directory { path } => Some(Value::Path(path.clone())),
            _ => None,
        }
    ),
    upstream_key!(
        "upstream.ca_file",
        Kind::Path,
        Unset,
        "Extra CA certificates (PEM) trusted besides the system's",
        |u| u.ca_file.clone().map(Value::Path)
    ),
    upstream_key!(
        "upstream.connect_timeout",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(10)),
        "How long connecting to the upstream may take",
        |u| Some(Value::Duration(u.connect_timeout))
    ),
    upstream_key!(
        "upstream.read_timeout",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(60)),
        "A read that stalls this long fails the attempt (it is retried)",
        |u| Some(Value::Duration(u.read_timeout))
    ),
    upstream_key!(
        "upstream.down_for",
        Kind::PositiveDuration,
        DefaultValue::Duration(Duration::from_secs(30)),
        "glance: how long an endpoint that failed (no connection, a 5xx) is passed over",
        |u| Some(Value::Duration(u.down_for))
    ),
    upstream_key!(
        "upstream.keystone.auth_url",
        Kind::Url,
        Unset,
        "glance: Keystone v3 instead of token_file, e.g. https://keystone.example.org:5000/v3",
        |u| keystone(u).map(|(url, _)| Value::Text(url.clone()))
    ),
    upstream_key!(
        "upstream.keystone.username",
        Kind::Text,
        Unset,
        "Keystone password authentication: the user",
        |u| password(u, 0)
    ),
    upstream_key!(
        "upstream.keystone.password",
        Kind::Secret,
        Unset,
        "Keystone password authentication: the password",
        |u| password(u, 1)
    ),
    upstream_key!(
        "upstream.keystone.project_name",
        Kind::Text,
        Unset,
        "Keystone password authentication: the project",
        |u| password(u, 2)
    ),
    upstream_key!(
        "upstream.keystone.user_domain_name",
        Kind::Text,
        DefaultValue::Text("Default"),
        "Keystone password authentication: the user's domain",
        |u| password(u, 3)
    ),
    upstream_key!(
        "upstream.keystone.project_domain_name",
        Kind::Text,
        DefaultValue::Text("Default"),
        "Keystone password authentication: the project's domain",
        |u| password(u, 4)
    ),
    upstream_key!(
        "upstream.keystone.application_credential_id",
        Kind::Text,
        Unset,
        "Keystone application credential instead of a password: its id",
        |u| match keystone(u)?.1 {
            KeystoneMethod::ApplicationCredential { id, .. } => Some(Value::Text(id.clone())),
            _ => None,
        }
    ),
    upstream_key!(
        "upstream.keystone.application_credential_secret",
        Kind::Secret,
        Unset,
        "Keystone application credential: its secret",
        |u| match keystone(u)?.1 {
            KeystoneMethod::ApplicationCredential { secret, .. } =>
                Some(Value::Text(secret.clone())),
            _ => None,
        }
    ),
];

/// The key named `name`.
pub(crate) fn find(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

fn keep_upstream(new: &mut Config, running: &Config) {
    new.upstream = running.upstream.clone();
}

fn glance(u: &UpstreamConfig) -> Option<(&Vec<String>, &GlanceAuth)> {
    match &u.kind {
        UpstreamKind::Glance { urls, auth } => Some((urls, auth)),
        _ => None,
    }
}

fn keystone(u: &UpstreamConfig) -> Option<(&String, &KeystoneMethod)> {
    match glance(u)?.1 {
        GlanceAuth::Keystone { auth_url, method } => Some((auth_url, method)),
        _ => None,
    }
}

/// Field `n` of Keystone password authentication: username, password, project name,
/// user domain, project domain.
fn password(u: &UpstreamConfig, n: usize) -> Option<Value> {
    match keystone(u)?.1 {
        KeystoneMethod::Password {
            username,
            password,
            project_name,
            user_domain_name,
            project_domain_name,
        } => [
            username,
            password,
            project_name,
            user_domain_name,
            project_domain_name,
        ]
        .get(n)
        .map(|s| Value::Text((*s).clone())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::validate::blank;

    /// As the example config says it ("Reload: yes", "Reload: restart").
    fn reload_word(reload: Reload) -> &'static str {
        match reload {
            Reload::Yes => "yes",
            Reload::Restart => "restart",
        }
    }

    #[test]
    fn names_are_unique_and_sections_contiguous() {
        let names: BTreeSet<_> = KEYS.iter().map(|k| k.name).collect();
        assert_eq!(names.len(), KEYS.len());
        // `to_toml` prints a section per run of keys: each section must be one run.
        let mut closed = BTreeSet::new();
        for pair in KEYS.windows(2) {
            if pair[0].section() != pair[1].section() {
                assert!(
                    closed.insert(pair[0].section()),
                    "{} split",
                    pair[0].section()
                );
                assert!(
                    !closed.contains(pair[1].section()),
                    "{} split",
                    pair[1].section()
                );
            }
        }
        for key in KEYS {
            assert!(
                !key.doc.is_empty() && !key.doc.contains('\n'),
                "{}",
                key.name
            );
            assert_eq!(key.in_upstream(), key.section().starts_with("upstream"));
            if key.in_upstream() {
                assert_eq!(
                    key.reload,
                    Reload::Restart,
                    "{}: [upstream] is one value",
                    key.name
                );
            }
        }
    }

    #[test]
    fn every_default_is_a_value_of_its_kind() {
        for key in KEYS {
            let Some(value) = key.default.value(key.kind) else {
                continue;
            };
            let fits = match (key.kind, &value) {
                (Kind::Path, Value::Path(p)) => p.is_absolute(),
                (Kind::Size, Value::Size(_)) => true,
                (Kind::Duration, Value::Duration(_)) => true,
                (Kind::PositiveDuration, Value::Duration(d)) => !d.is_zero(),
                (Kind::Integer { min, max }, Value::Integer(n)) => (min..=max).contains(n),
                (Kind::Bool, Value::Bool(_)) => true,
                (Kind::Text | Kind::Url | Kind::Secret, Value::Text(_)) => true,
                (Kind::Choice { words, .. }, Value::Text(w)) => words.contains(&w.as_str()),
                (Kind::List | Kind::UrlList, Value::List(_)) => true,
                _ => false,
            };
            assert!(
                fits,
                "{}: default {value:?} is not a {:?}",
                key.name, key.kind
            );
            if let Some(check) = key.check {
                assert_eq!(check(&value, &blank(None)), Ok(()), "{}", key.name);
            }
        }
    }

    /// A field the macro stores a value in must give it back: a `Field` of another type
    /// would drop it silently.
    #[test]
    fn every_set_key_stores_its_default_in_its_field() {
        for key in KEYS {
            let (Fill::Set(set), Some(default)) = (key.fill, key.default.value(key.kind)) else {
                continue;
            };
            let mut config = blank(None);
            set(&mut config, Some(default.clone()));
            assert_eq!((key.get)(&config), Some(default), "{}", key.name);
            let mut other = blank(None);
            (key.keep)(&mut other, &config);
            assert_eq!((key.get)(&other), (key.get)(&config), "{}", key.name);
        }
    }

    #[test]
    fn verify_policies_are_the_words_of_prefetcher_verify() {
        for word in VERIFY_POLICIES {
            let policy = VerifyPolicy::from_word(word).expect(word);
            assert_eq!(policy.as_str(), *word);
        }
        assert_eq!(VerifyPolicy::from_word("md5"), None);
    }

    #[test]
    fn log_formats_are_the_words_of_log_format() {
        for word in LOG_FORMATS {
            let format = LogFormat::from_word(word).expect(word);
            assert_eq!(format.as_str(), *word);
        }
        assert_eq!(LogFormat::from_word("xml"), None);
    }

    /// The example config is operator documentation, written by hand: every key of the
    /// table appears in it (set or as a `# key = ...` sample) under its section, none
    /// that is not a key, each with the table's default where it has one, and under
    /// the table's "Reload: yes" or "Reload: restart" (the last one said above it;
    /// indented samples in a comment are prose).
    #[test]
    fn example_config_documents_every_key_with_its_default_and_reload() {
        let text = include_str!("../../config/glance-cached.toml");
        let mut section = "";
        let mut reload = None;
        let mut seen = BTreeSet::new();
        let mut problems = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            if let Some(said) = line.split("Reload: ").nth(1) {
                reload = said.split(|c: char| !c.is_ascii_alphabetic()).next();
            }
            let bare = line.trim_start_matches('#').trim();
            if let Some(header) = bare.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                section = header;
                continue;
            }
            let Some((leaf, literal)) = bare.split_once(" = ") else {
                continue;
            };
            if !leaf
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                continue;
            }
            let name = format!("{section}.{leaf}");
            let Some(key) = find(&name) else {
                problems.push(format!("line {n}: {name} is not a key"));
                continue;
            };
            seen.insert(key.name);
            // An indented sample inside a key's comment ("#   url = ...") is prose.
            if line.starts_with("#  ") {
                continue;
            }
            if reload != Some(reload_word(key.reload)) {
                problems.push(format!(
                    "line {n}: {name} is under \"Reload: {}\", the table says {}",
                    reload.unwrap_or("(nothing)"),
                    reload_word(key.reload)
                ));
            }
            if let Some(default) = key.default.value(key.kind) {
                let parse = |literal: &str| {
                    toml::from_str::<toml::Table>(&format!("v = {literal}"))
                        .map(|t| t["v"].clone())
                        .map_err(|e| e.to_string())
                };
                let shown = key.kind.show(&default);
                if parse(literal) != parse(&shown) {
                    problems.push(format!(
                        "line {n}: {name} = {literal}, but its default is {shown}"
                    ));
                }
            }
        }
        for key in KEYS.iter().filter(|k| !seen.contains(k.name)) {
            problems.push(format!("{} is not in the example config", key.name));
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
