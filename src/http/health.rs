//! `/healthz`: 200 while every loop is healthy by the watchdog's judgement
//! (`StatusBoard::unhealthy`: none dead, none stuck in one step past the watchdog's
//! timeout), 503 otherwise, naming each loop's state. `/readyz`: 200 once READY was
//! sent and the database answered within the lease's TTL (the lease heartbeat's last
//! success), 503 before, when the database stopped answering, and during shutdown.

use hyper::StatusCode;
use serde_json::json;

use super::Shared;
use super::routes::{Reply, json};

pub(crate) fn healthz(state: &Shared) -> Reply {
    let board = &state.ctx.board;
    let unhealthy = board.unhealthy(state.max_step);
    let mut loops = serde_json::Map::new();
    for (task, t) in board.tasks() {
        let word = if unhealthy.contains(&task) {
            if t.alive { "stuck" } else { "dead" }
        } else if t.consecutive_failures > 0 {
            // Failing steps back off and retry: STATUS shows them, the watchdog does not
            // restart for them.
            "failing"
        } else if t.in_step_since.is_some() {
            "busy"
        } else {
            "idle"
        };
        loops.insert(task.to_string(), json!(word));
    }
    let healthy = unhealthy.is_empty();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "loops": loops,
    });
    json(status, &body)
}

pub(crate) fn readyz(state: &Shared) -> Reply {
    let board = &state.ctx.board;
    let ttl = state.ctx.config().daemon.lease_ttl;
    let lease_fresh = board
        .tasks()
        .into_iter()
        .find(|(task, _)| task.to_string() == "lease")
        .and_then(|(_, t)| t.last_success)
        .is_some_and(|at| at.elapsed() <= ttl);
    let reason = if state.shutdown.is_cancelled() {
        Some("shutting down")
    } else if !board.is_ready() {
        Some("starting")
    } else if !lease_fresh {
        Some("the database has not answered within the lease's TTL")
    } else {
        None
    };
    match reason {
        None => json(StatusCode::OK, &json!({"ready": true})),
        Some(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reason": reason}),
        ),
    }
}
