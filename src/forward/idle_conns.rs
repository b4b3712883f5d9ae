//! One provider's idle connections ([`IdleConns`]): a list per thread that opened them, each in the order its
//! connections went idle, so that a checkout costs the same with one idle connection or hundreds.

use std::collections::VecDeque;
use std::thread::ThreadId;
use std::time::Duration;

use tokio::time::Instant;

/// Idle connections of one provider, kept per home thread (the thread that opened them, whose runtime's reactor
/// watches their sockets), each list oldest first.
///
/// A checkout takes the newest connection of its own thread's list, the one most likely still open and warm in the
/// caches, while the oldest ones are left to expire; another thread's newest only when the caller says so (when no
/// new connection may be opened: a connection's socket stays with the reactor of the thread that opened it, so
/// driving it from another thread costs a cross-thread wake-up per event). Since each list is in the order its
/// connections went idle, the expired ones are at its front: a checkout drops them from there and never looks at
/// the rest. (Scanning one list whole per checkout cost 1.1% of ssp's CPU at 256 connections, about 1.5 µs per
/// request, `benches/RESULTS.md`.) Lists are made once per thread and kept while empty, so that a
/// connection going idle and being taken again allocates nothing; [`IdleConns::retain`] removes the empty ones.
#[derive(Debug)]
pub(super) struct IdleConns<C> {
    /// Per home thread: each connection with when it went idle, oldest first.
    homes: Vec<(ThreadId, VecDeque<(Instant, C)>)>,
    /// Connections in all the lists.
    len: usize,
}

impl<C> Default for IdleConns<C> {
    fn default() -> Self {
        Self {
            homes: Vec::new(),
            len: 0,
        }
    }
}

impl<C> IdleConns<C> {
    /// Idle connections in all.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether [`IdleConns::take`] with the same `me` and `foreign` would find a connection, expired or not.
    pub(super) fn has(&self, me: ThreadId, foreign: bool) -> bool {
        self.homes
            .iter()
            .any(|(home, list)| !list.is_empty() && (foreign || *home == me))
    }

    /// Adds `conn`, opened on `home`, which went idle `now` (no earlier than the connections already held).
    pub(super) fn push(&mut self, home: ThreadId, conn: C, now: Instant) {
        let at = match self.homes.iter().position(|(h, _)| *h == home) {
            Some(at) => at,
            None => {
                self.homes.push((home, VecDeque::new()));
                self.homes.len() - 1
            }
        };
        self.homes[at].1.push_back((now, conn));
        self.len += 1;
    }

    /// The newest connection idle for less than `timeout` at `now` from `me`'s list, else, when `foreign`, from
    /// another thread's. Expired connections at the front of the lists it looks at are dropped.
    pub(super) fn take(
        &mut self,
        me: ThreadId,
        now: Instant,
        timeout: Duration,
        foreign: bool,
    ) -> Option<C> {
        let mine = self.homes.iter().position(|(h, _)| *h == me);
        let others = (0..self.homes.len()).filter(|at| foreign && Some(*at) != mine);
        let order = mine.into_iter().chain(others);
        for at in order {
            let list = &mut self.homes[at].1;
            let before = list.len();
            while list
                .front()
                .is_some_and(|(since, _)| now.saturating_duration_since(*since) >= timeout)
            {
                list.pop_front();
            }
            let taken = list.pop_back();
            self.len -= before - list.len();
            if let Some((_, conn)) = taken {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps the connections for which `keep(since, conn)` says so, and drops the lists left empty.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(Instant, &mut C) -> bool) {
        for (_, list) in &mut self.homes {
            list.retain_mut(|(since, conn)| keep(*since, conn));
        }
        self.homes.retain(|(_, list)| !list.is_empty());
        self.len = self.homes.iter().map(|(_, list)| list.len()).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two distinct thread ids: this thread's and a finished helper's.
    fn threads() -> (ThreadId, ThreadId) {
        let other = std::thread::spawn(|| std::thread::current().id())
            .join()
            .unwrap();
        (std::thread::current().id(), other)
    }

    const TIMEOUT: Duration = Duration::from_secs(90);

    #[test]
    fn a_checkout_takes_the_newest_of_its_own_threads_connections_first() {
        let (me, other) = threads();
        let t0 = Instant::now();
        let mut idle = IdleConns::default();
        idle.push(me, "mine, old", t0);
        idle.push(other, "other's, newest", t0 + Duration::from_secs(2));
        idle.push(me, "mine, new", t0 + Duration::from_secs(1));
        assert_eq!(idle.len(), 3);
        let now = t0 + Duration::from_secs(3);
        assert_eq!(idle.take(me, now, TIMEOUT, true), Some("mine, new"));
        assert_eq!(idle.take(me, now, TIMEOUT, true), Some("mine, old"));
        // Its own list empty, it takes another thread's only when allowed.
        assert!(!idle.has(me, false) && idle.has(me, true));
        assert_eq!(idle.take(me, now, TIMEOUT, false), None);
        assert_eq!(idle.take(me, now, TIMEOUT, true), Some("other's, newest"));
        assert_eq!(idle.take(me, now, TIMEOUT, true), None);
        assert_eq!(idle.len(), 0);
    }

    #[test]
    fn expired_connections_are_dropped_and_never_taken() {
        let (me, other) = threads();
        let t0 = Instant::now();
        let mut idle = IdleConns::default();
        for s in 0..5 {
            idle.push(me, s, t0 + Duration::from_secs(s));
        }
        idle.push(other, 100, t0);
        idle.push(other, 101, t0 + Duration::from_secs(60));
        // At 93 s, the connections idle since 0, 1, 2 and 3 s have reached the 90 s timeout.
        let now = t0 + Duration::from_secs(93);
        assert_eq!(idle.take(me, now, TIMEOUT, true), Some(4));
        assert_eq!(idle.len(), 2, "the expired ones were dropped on the way");
        assert_eq!(idle.take(me, now, TIMEOUT, true), Some(101));
        assert_eq!(idle.len(), 0, "the other thread's expired one too");
        assert_eq!(idle.take(me, now, TIMEOUT, true), None);
    }

    #[test]
    fn retain_keeps_the_count_and_drops_empty_lists() {
        let (me, other) = threads();
        let t0 = Instant::now();
        let mut idle = IdleConns::default();
        for n in 0..4 {
            idle.push(me, n, t0);
        }
        idle.push(other, 10, t0);
        idle.retain(|_, n| *n % 2 == 0 && *n != 10);
        assert_eq!(idle.len(), 2);
        assert_eq!(
            idle.homes.len(),
            1,
            "the other thread's emptied list is gone"
        );
        assert_eq!(idle.take(other, t0, TIMEOUT, true), Some(2));
        assert_eq!(idle.take(other, t0, TIMEOUT, true), Some(0));
        assert_eq!(idle.take(other, t0, TIMEOUT, true), None);
    }
}
