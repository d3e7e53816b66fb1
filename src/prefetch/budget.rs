//! What every download of this process shares: the bandwidth cap and the cache space
//! promised to the downloads in progress, so that together they never push the cache
//! past `cache.max_size`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// What every download of this process shares.
#[derive(Debug, Default)]
pub struct DownloadBudget {
    pub bandwidth: RateLimiter,
    pub space: SpaceReservations,
}

/// A bandwidth cap shared by every download: each chunk reserves its share of time.
#[derive(Debug, Default)]
pub struct RateLimiter {
    next_free: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// Waits as long as `bytes` take at `per_second`.
    pub async fn pace(&self, bytes: usize, per_second: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / per_second as f64);
        let until = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let start = next.map_or(Instant::now(), |n| n.max(Instant::now()));
            let end = start + cost;
            *next = Some(end);
            end
        };
        tokio::time::sleep_until(until).await;
    }
}

/// Cache space promised to the downloads in progress. Each download reserves its size
/// before making room (one of unknown size reserves [`unknown_size_step`] at a time, as
/// its bytes arrive), and makes room for every reservation, not only its own: two downloads that each fit alone would otherwise together push the cache past
/// `max_size`. A download that does not fit beside the others waits for one to end, in
/// turn: while one waits, later downloads wait behind it even if they would fit, so a
/// large image is not passed over forever by a stream of small ones.
#[derive(Debug, Default)]
pub struct SpaceReservations {
    ledger: Mutex<Ledger>,
    pub(super) changed: Notify,
}

#[derive(Debug, Default)]
struct Ledger {
    reserved: u64,
    /// Tickets of the downloads waiting for room, oldest first.
    waiting: std::collections::VecDeque<u64>,
    next_ticket: u64,
}

impl Ledger {
    /// Everything reserved with `bytes` added, if that fits in `max_size` and it is the
    /// turn of `ticket` (a newcomer, `None`, has its turn only while nobody waits).
    fn grant(&self, bytes: u64, max_size: u64, ticket: Option<u64>) -> Option<u64> {
        let my_turn = self
            .waiting
            .front()
            .is_none_or(|first| Some(*first) == ticket);
        if !my_turn {
            return None;
        }
        self.reserved.checked_add(bytes).filter(|t| *t <= max_size)
    }
}

/// `bytes` of cache space held for one download until dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    space: &'a SpaceReservations,
    bytes: u64,
    /// Everything reserved when this reservation was granted, itself included.
    pub total: u64,
}

impl Reservation<'_> {
    /// Bytes this reservation holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Grows this reservation by `bytes` if everything reserved then still fits in
    /// `max_size` (a download in progress does not wait in line: it holds a
    /// connection). Returns everything reserved, itself included.
    pub fn grow(&mut self, bytes: u64, max_size: u64) -> Option<u64> {
        let mut ledger = self.space.lock();
        let total = ledger
            .reserved
            .checked_add(bytes)
            .filter(|t| *t <= max_size)?;
        ledger.reserved = total;
        self.bytes += bytes;
        self.total = total;
        Some(total)
    }
}

/// How much a download of unknown size (no `Content-Length`, Glance metadata without
/// `size`) reserves at a time: a 64th of the cache, at least 1 MiB, at most the cache.
/// Small enough not to evict much more than the image needs, large enough that a big
/// image makes room a few dozen times, not at every chunk.
pub(crate) fn unknown_size_step(max_size: u64) -> u64 {
    (max_size / 64).max(1 << 20).min(max_size)
}

/// A download's place in the line for room; leaves the line when dropped.
#[derive(Debug)]
pub struct WaitTicket<'a> {
    space: &'a SpaceReservations,
    number: u64,
}

impl SpaceReservations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `bytes` if everything reserved then still fits in `max_size` and no
    /// download waits ahead: none waits, or `ticket` is the first in line.
    pub fn try_reserve(
        &self,
        bytes: u64,
        max_size: u64,
        ticket: Option<&WaitTicket<'_>>,
    ) -> Option<Reservation<'_>> {
        let mut ledger = self.lock();
        let total = ledger.grant(bytes, max_size, ticket.map(|t| t.number))?;
        ledger.reserved = total;
        Some(Reservation {
            space: self,
            bytes,
            total,
        })
    }

    /// Whether `try_reserve(bytes, max_size, Some(ticket))` would succeed now.
    pub fn could_reserve(&self, bytes: u64, max_size: u64, ticket: &WaitTicket<'_>) -> bool {
        self.lock()
            .grant(bytes, max_size, Some(ticket.number))
            .is_some()
    }

    /// Joins the line of downloads waiting for room.
    pub fn wait_in_line(&self) -> WaitTicket<'_> {
        let mut ledger = self.lock();
        let number = ledger.next_ticket;
        ledger.next_ticket += 1;
        ledger.waiting.push_back(number);
        WaitTicket {
            space: self,
            number,
        }
    }

    /// Bytes reserved now.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.space.lock().reserved -= self.bytes;
        self.space.changed.notify_waiters();
    }
}

impl Drop for WaitTicket<'_> {
    fn drop(&mut self) {
        self.space.lock().waiting.retain(|n| *n != self.number);
        // The next in line may now go.
        self.space.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_grows_only_within_max_size() {
        let space = SpaceReservations::default();
        let mut growing = space.try_reserve(300, 1000, None).unwrap();
        let other = space.try_reserve(500, 1000, None).unwrap();
        assert_eq!(growing.grow(200, 1000), Some(1000));
        assert_eq!(growing.bytes(), 500);
        assert_eq!(growing.grow(1, 1000), None, "no room beside the other");
        assert_eq!(growing.bytes(), 500);
        drop(other);
        assert_eq!(growing.grow(1, 1000), Some(501));
        drop(growing);
        assert_eq!(space.reserved(), 0, "all of it is returned");
        assert_eq!(unknown_size_step(64 << 30), 1 << 30);
        assert_eq!(unknown_size_step(32 << 20), 1 << 20);
        assert_eq!(unknown_size_step(1000), 1000);
    }

    #[test]
    fn reservations_fit_together_and_are_returned_on_drop() {
        let space = SpaceReservations::default();
        let first = space.try_reserve(600, 1000, None).unwrap();
        assert_eq!(first.total, 600);
        assert!(
            space.try_reserve(600, 1000, None).is_none(),
            "600 + 600 > 1000"
        );
        let second = space.try_reserve(400, 1000, None).unwrap();
        assert_eq!(second.total, 1000);
        drop(first);
        assert_eq!(space.reserved(), 400);
        assert_eq!(space.try_reserve(600, 1000, None).unwrap().total, 1000);
        drop(second);
        assert_eq!(space.reserved(), 0);
        let everything = space.try_reserve(u64::MAX, u64::MAX, None).unwrap();
        assert!(
            space.try_reserve(1, u64::MAX, None).is_none(),
            "no overflow"
        );
        drop(everything);
        assert_eq!(space.reserved(), 0);
    }

    #[test]
    fn waiting_downloads_get_room_in_turn() {
        let space = SpaceReservations::default();
        let small = space.try_reserve(300, 1000, None).unwrap();
        // A large image does not fit beside it and joins the line.
        assert!(space.try_reserve(800, 1000, None).is_none());
        let large = space.wait_in_line();
        // A later small one would fit, but must not pass the large one.
        assert!(space.try_reserve(300, 1000, None).is_none());
        let later = space.wait_in_line();
        assert!(space.try_reserve(300, 1000, Some(&later)).is_none());
        // Room comes back: the first in line goes, then the next.
        drop(small);
        assert!(space.try_reserve(300, 1000, Some(&later)).is_none());
        let large_room = space.try_reserve(800, 1000, Some(&large)).unwrap();
        drop(large);
        assert!(
            space.try_reserve(300, 1000, Some(&later)).is_none(),
            "800 + 300 > 1000"
        );
        drop(large_room);
        assert!(space.try_reserve(300, 1000, Some(&later)).is_some());
        // A waiter that gives up (cancelled) leaves the line.
        let gone = space.wait_in_line();
        drop(gone);
        drop(later);
        assert!(space.try_reserve(300, 1000, None).is_some());
        // could_reserve answers what try_reserve would, without reserving.
        let next = space.wait_in_line();
        assert!(space.could_reserve(1000, 1000, &next));
        assert!(!space.could_reserve(1001, 1000, &next));
        let behind = space.wait_in_line();
        assert!(!space.could_reserve(1, 1000, &behind), "not first in line");
        drop(next);
        assert!(space.could_reserve(1, 1000, &behind));
        assert_eq!(space.reserved(), 0, "asking reserves nothing");
    }
}
