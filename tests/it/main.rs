//! One integration test binary (one link on 2 cores): the driver suite on three
//! backends, configuration, and the CLI through the built binary.

// Test and benchmark code: a panic here is a failed run, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A test or benchmark binary has no API: `pub` shares its kit between its files.
#![allow(unreachable_pub)]
// Measured and real times (timings, file ages, deadlines): the clock lint is for the
// daemon's code.
#![allow(clippy::disallowed_methods)]

mod cli;
mod daemon;
mod database_file;
mod driver;
mod faults_crash;
mod faults_disk;
mod faults_hostile;
mod faults_input;
mod faults_layout;
mod faults_reactor;
mod faults_scale;
mod fleet;
mod glance_interop;
mod glance_shared;
mod hits;
mod http;
mod http_fill;
mod http_keystone;
mod http_proxy;
mod http_readers;
mod http_serve;
mod kit;
mod prefetch;
mod reconcile;
mod tls;
