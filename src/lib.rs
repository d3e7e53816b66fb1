//! glance-cached: a systemd-native daemon and CLI that keeps an OpenStack Glance
//! node-local image cache healthy, compatible with Glance's `centralized_db` driver.

pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod db;
pub mod download;
pub mod failpoint;
pub mod glance_config;
pub mod image_id;
pub mod process;
pub mod telemetry;
pub mod upstream;
