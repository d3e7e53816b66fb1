//! The operator CLI: one binary, one subcommand per operation. Each command validates
//! its arguments before touching the cache, prints a result on stdout, and fails with
//! one `error: ...` line on stderr and exit code 1.

mod commands;
mod output;
mod owner;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::image_id::ImageId;

#[derive(Debug, Parser)]
#[command(
    name = "glance-cached",
    version,
    about = "Keeps an OpenStack Glance node-local image cache healthy",
    long_about = None
)]
pub struct Cli {
    /// Configuration file [default: $GLANCE_CACHED_CONFIG, else /etc/glance-cached/glance-cached.toml if present]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch the cache, clean, prune and serve the queue until SIGTERM
    Run {
        /// Start even if another daemon seems to serve this node (its lease is fresh)
        #[arg(long)]
        force: bool,
        /// Drop the rows of missing files at start even when more than half of this
        /// node's images have lost their files (otherwise refused: an unmounted cache
        /// filesystem looks the same)
        #[arg(long)]
        force_reconcile: bool,
    },
    /// Make disk and database agree: adopt files without rows, refresh rows whose file
    /// changed size, drop rows without files, clean leftovers
    Reconcile {
        /// Drop the rows of missing files even when more than half of this node's
        /// images have lost their files
        #[arg(long)]
        force: bool,
    },
    /// Validate the configuration and print the effective values (secrets masked)
    CheckConfig,
    /// List this node's cached images
    ListCached {
        #[arg(long)]
        json: bool,
    },
    /// List this node's queued images, in queue order
    ListQueued {
        #[arg(long)]
        json: bool,
    },
    /// Queue images for prefetching
    Queue {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<ImageId>,
    },
    /// Delete cached images (file and row)
    DeleteCached {
        #[arg(
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<ImageId>,
        /// Delete every cached image of this node
        #[arg(long)]
        all: bool,
    },
    /// Remove images from the queue (row and marker)
    DeleteQueued {
        #[arg(
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<ImageId>,
        /// Empty this node's queue
        #[arg(long)]
        all: bool,
    },
    /// Put a local file into the cache, verifying the given checksums
    Import {
        #[arg(value_name = "ID")]
        id: ImageId,
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Expected MD5 (Glance's `checksum`), hex
        #[arg(long, value_name = "HEX")]
        md5: Option<String>,
        /// Expected SHA-512 (Glance's `os_hash_value`), hex
        #[arg(long, value_name = "HEX")]
        sha512: Option<String>,
    },
    /// Write a cached image to stdout (counts a hit)
    Cat {
        #[arg(value_name = "ID")]
        id: ImageId,
    },
    /// Print an image's hit count
    Hits {
        #[arg(value_name = "ID")]
        id: ImageId,
    },
    /// Print the cache size and maximum
    Size {
        #[arg(long)]
        json: bool,
    },
    /// Remove invalid files and stalled incomplete files
    Clean {
        /// Remove incomplete files not written for this long [default: cache.stall_time]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
        stall_time: Option<std::time::Duration>,
    },
    /// Evict least recently accessed images until the cache fits cache.max_size
    Prune,
    /// Download every due queued image from the [upstream] now, then exit (what Glance's
    /// glance-cache-prefetcher does; the daemon does it continuously)
    Prefetch,
    /// Print the glance-cached TOML equivalent of Glance's cache options
    ImportGlanceConfig {
        /// Glance's API configuration, e.g. /etc/glance/glance-api.conf
        #[arg(value_name = "GLANCE_API_CONF")]
        api_conf: PathBuf,
        /// Glance's cache tools configuration, read after the API's
        #[arg(long, value_name = "PATH")]
        cache_conf: Option<PathBuf>,
    },
    /// Copy the rows of Glance's old per-node SQLite cache database into this node's
    /// database (idempotent; files are not touched)
    MigrateSqlite {
        /// Glance's cache.db [default: <cache.dir>/cache.db]
        #[arg(value_name = "PATH")]
        path: Option<PathBuf>,
    },
    /// Print the man page (roff)
    #[command(hide = true)]
    Man,
    /// Print shell completions
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(s)
}

/// Runs the parsed command line; the binary maps an error to `error: ...` and exit 1.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Run {
            force,
            force_reconcile,
        } => return commands::run_daemon(cli.config, *force, *force_reconcile),
        Command::Man => return commands::man_page(),
        Command::Completions { shell } => return commands::completions(*shell),
        Command::ImportGlanceConfig {
            api_conf,
            cache_conf,
        } => {
            return commands::import_glance_config(api_conf, cache_conf.as_deref());
        }
        _ => {}
    }
    crate::telemetry::init_cli();
    let path = crate::config::resolve_config_path(cli.config.as_deref());
    let config = crate::config::Config::load(path.as_deref())?;
    // Before the runtime starts any thread, and before anything is touched.
    owner::act_as_cache_owner(&config.cache.dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(commands::dispatch(cli, config))
}

impl Command {
    /// Commands that only look: they create no directory, database or row. (`list-queued`
    /// is not one: like Glance's, it first takes markers from `queue/` into the queue.)
    fn reads_only(&self) -> bool {
        matches!(
            self,
            Command::ListCached { .. }
                | Command::Hits { .. }
                | Command::Size { .. }
                | Command::CheckConfig
        )
    }
}
