//! Requests per minute per app (`patient_facing.requests_per_minute_per_app`): a token bucket per `client_id`
//! holding a minute's requests, refilled continuously. Keys are client ids from verified tokens; the table is
//! bounded all the same (an issuer could sign many), dropping full buckets first.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Most apps tracked.
const MAX_APPS: usize = 10_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// The per-app rate limit.
#[derive(Debug)]
pub(super) struct AppLimits {
    per_minute: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// An app over its rate: the `X-Rate-Limit-*` values (limit per minute, remaining 0, seconds until the next
/// request is admitted, at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppThrottled {
    pub limit: u32,
    pub reset_s: u64,
}

impl AppLimits {
    pub(super) fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::default(),
        }
    }

    /// Takes one request from `client_id`'s bucket at `now`.
    pub(super) fn admit(&self, client_id: &str, now: Instant) -> Result<(), AppThrottled> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let full = f64::from(self.per_minute);
        let per_second = full / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_APPS && !buckets.contains_key(client_id) {
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.refilled).as_secs_f64() * per_second < full
            });
            if buckets.len() >= MAX_APPS {
                buckets.clear();
            }
        }
        // Found without a copy of the id; one is made for a new app only.
        if !buckets.contains_key(client_id) {
            buckets.insert(
                client_id.to_owned(),
                Bucket {
                    tokens: full,
                    refilled: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(client_id) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(full);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / per_second;
            Err(AppThrottled {
                limit: self.per_minute,
                reset_s: (wait.ceil() as u64).max(1),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::AppLimits;

    #[test]
    fn a_minutes_requests_then_one_a_refill() {
        let limits = AppLimits::new(3);
        let t = Instant::now();
        for _ in 0..3 {
            assert!(limits.admit("app-a", t).is_ok());
        }
        let refused = limits.admit("app-a", t).unwrap_err();
        assert_eq!((refused.limit, refused.reset_s), (3, 20));
        // Another app has its own bucket.
        assert!(limits.admit("app-b", t).is_ok());
        // One request's worth comes back in 20 s.
        assert!(limits.admit("app-a", t + Duration::from_secs(19)).is_err());
        assert!(limits.admit("app-a", t + Duration::from_secs(21)).is_ok());
        assert!(AppLimits::new(0).admit("any", t).is_ok());
    }
}
