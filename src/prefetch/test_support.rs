//! What the prefetch tests share: a driver on SQLite in a tempdir with a `directory`
//! upstream holding the given images, as the daemon would build them from its config.

use std::sync::Arc;

use crate::cache::{CacheDriver, CacheLayout};
use crate::config::Config;
use crate::db::{Db, DbOptions};
use crate::upstream::Upstream;

/// The config (`extra` appended to its TOML), the driver and the upstream of a cache in
/// `dir`, its origin directory holding `images` (name, bytes).
pub(super) async fn directory_cache(
    dir: &std::path::Path,
    images: &[(&str, &[u8])],
    extra: &str,
) -> (Arc<Config>, CacheDriver, Upstream) {
    let origin = dir.join("origin");
    std::fs::create_dir(&origin).unwrap();
    for (name, bytes) in images {
        std::fs::write(origin.join(name), bytes).unwrap();
    }
    let file = dir.join("glance-cached.toml");
    std::fs::write(
        &file,
        format!(
            "[cache]\ndir = \"{}\"\n[database]\nurl = \"sqlite://{}\"\n{extra}[upstream]\nkind = \"directory\"\npath = \"{}\"\n",
            dir.join("cache").display(),
            dir.join("test.db").display(),
            origin.display()
        ),
    )
    .unwrap();
    let config = Arc::new(Config::load(Some(&file)).unwrap());
    let db = Db::connect(&config.database.url, &DbOptions::default())
        .await
        .unwrap();
    let layout = CacheLayout::open(&config.cache.dir).unwrap();
    let driver = CacheDriver::configure(layout, db, "http://node-a:9292")
        .await
        .unwrap();
    let upstream = Upstream::from_config(config.upstream.as_ref().unwrap()).unwrap();
    (config, driver, upstream)
}
