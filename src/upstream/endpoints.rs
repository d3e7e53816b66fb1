//! A Glance upstream's endpoints (`upstream.url`, one or several) and their passive
//! health: a connect failure, a timeout or a 5xx marks an endpoint down for
//! `upstream.down_for`, an answer below 500 marks it up again. Requests try the
//! endpoints that are up first, in the configured order, then the ones that are down
//! (so with all of them down, every one is still tried, in order): an HA control plane
//! behind several addresses stays reachable through any one of them. A set of one
//! behaves as a single URL always did.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::metrics::Metrics;

pub(crate) struct Endpoint {
    /// The base URL, without a trailing `/`.
    base: String,
    /// Down until then; `None` while up.
    down_until: Mutex<Option<Instant>>,
    /// `glance_cached_upstream_endpoint_up{endpoint="<index>"}`, once reported.
    gauge: OnceLock<Gauge>,
}

impl Endpoint {
    pub(crate) fn base(&self) -> &str {
        &self.base
    }
}

pub(crate) struct Endpoints {
    list: Vec<Endpoint>,
    down_for: Duration,
}

impl Endpoints {
    pub(crate) fn new(urls: &[String], down_for: Duration) -> Endpoints {
        Endpoints {
            list: urls
                .iter()
                .map(|u| Endpoint {
                    base: u.trim_end_matches('/').to_owned(),
                    down_until: Mutex::new(None),
                    gauge: OnceLock::new(),
                })
                .collect(),
            down_for,
        }
    }

    /// Each endpoint's up/down state as a gauge labelled by its index in `upstream.url`
    /// (a URL may carry a secret, and an index keeps the series fixed).
    pub(crate) fn report_to(&self, metrics: &Metrics) {
        for (i, e) in self.list.iter().enumerate() {
            let gauge = e.gauge.get_or_init(|| metrics.upstream_endpoint(i));
            gauge.set(i64::from(!self.is_down(i)));
        }
    }

    pub(crate) fn get(&self, i: usize) -> Option<&Endpoint> {
        self.list.get(i)
    }

    fn is_down(&self, i: usize) -> bool {
        let Some(e) = self.list.get(i) else {
            return false;
        };
        let mut down = e.down_until.lock().unwrap_or_else(|p| p.into_inner());
        match *down {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                // The time is over: tried again as if up (a success confirms it).
                *down = None;
                false
            }
            None => false,
        }
    }

    /// The order to try the endpoints in: those up, then those down, each in the
    /// configured order.
    pub(crate) fn order(&self) -> Vec<usize> {
        let (up, down): (Vec<usize>, Vec<usize>) =
            (0..self.list.len()).partition(|&i| !self.is_down(i));
        up.into_iter().chain(down).collect()
    }

    /// Records an answer (or its absence) from endpoint `i`.
    pub(crate) fn record(&self, i: usize, healthy: bool) {
        let Some(e) = self.list.get(i) else {
            return;
        };
        let mut down = e.down_until.lock().unwrap_or_else(|p| p.into_inner());
        let was_down = down.is_some();
        if healthy {
            *down = None;
            if was_down {
                info!(endpoint = i, "upstream endpoint answers again: up");
            }
        } else {
            *down = Some(Instant::now() + self.down_for);
            if !was_down {
                warn!(
                    endpoint = i,
                    down_for_s = self.down_for.as_secs_f64(),
                    "upstream endpoint failed: down"
                );
            }
        }
        if let Some(gauge) = e.gauge.get() {
            gauge.set(i64::from(healthy));
        }
    }
}

/// Whether a failed request says the endpoint itself is unwell (no connection, no
/// answer in time), rather than something about the request.
pub(crate) fn unreachable(error: &reqwest::Error) -> bool {
    error.is_connect() || error.is_timeout()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> Endpoints {
        let urls: Vec<String> = (0..n).map(|i| format!("http://e{i}/")).collect();
        Endpoints::new(&urls, Duration::from_secs(30))
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_endpoint_goes_last_for_a_while_then_is_tried_again() {
        let e = set(3);
        assert_eq!(e.order(), [0, 1, 2]);
        assert_eq!(e.get(0).unwrap().base(), "http://e0");
        e.record(0, false);
        assert_eq!(e.order(), [1, 2, 0]);
        e.record(1, false);
        assert_eq!(e.order(), [2, 0, 1]);
        // All down: every one is still tried, in order.
        e.record(2, false);
        assert_eq!(e.order(), [0, 1, 2]);
        e.record(1, true);
        assert_eq!(e.order(), [1, 0, 2]);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(e.order(), [0, 1, 2]);
    }

    #[test]
    fn the_gauge_follows_the_state_by_index() {
        let metrics = Metrics::new();
        let e = set(2);
        e.report_to(&metrics);
        e.record(1, false);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("glance_cached_upstream_endpoint_up{endpoint=\"0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("glance_cached_upstream_endpoint_up{endpoint=\"1\"} 0"),
            "{text}"
        );
    }
}
