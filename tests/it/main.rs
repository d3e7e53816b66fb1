//! One integration test binary (one link on 2 cores): the driver suite on three
//! backends, configuration, and the CLI through the built binary.

mod cli;
mod common;
mod daemon;
mod daemon_kit;
mod database_file;
mod driver;
mod faults_crash;
mod faults_disk;
mod faults_hostile;
mod faults_scale;
mod glance_api;
mod glance_interop;
mod glance_shared;
mod origin;
mod prefetch;
mod reconcile;
mod tls;
