//! Check 11 of DESIGN.md 1.4: per-consumer request rate (a token bucket per sending ASID) and concurrency, and
//! per-provider concurrency (per receiving ASID, over all consumers). Nothing here knows HTTP: [`Limits::admit`]
//! answers with an [`Admission`], a guard held for as long as the exchange lasts, or a [`Throttle`] saying which
//! limit was hit and when to come back.
//!
//! Keys are ASIDs that passed checks 5 to 9, so the tables hold registered systems only and cannot be grown by
//! a consumer inventing identifiers. One short lock covers a decision: on two cores it costs less than a
//! sharded map would, and the three limits are taken or refused together.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::LimitsConfig;
use crate::ids::{Asid, IdMap};

/// The limits in force and what is in flight against them.
#[derive(Debug)]
pub(crate) struct Limits {
    cfg: LimitsConfig,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    consumers: IdMap<Asid, Consumer>,
    /// Open exchanges per provider ASID.
    providers: IdMap<Asid, u32>,
}

#[derive(Debug)]
struct Consumer {
    tokens: f64,
    refilled: Instant,
    in_flight: u32,
}

/// Which limit refused a request, with what the `X-Rate-Limit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// The consumer's request rate (429).
    ConsumerRate {
        /// Requests per second allowed.
        limit: u32,
        /// Whole seconds until a request will be admitted again (at least 1).
        reset_s: u64,
    },
    /// The consumer's open exchanges (429).
    ConsumerConcurrency { limit: u32 },
    /// The provider's open exchanges over all consumers (503).
    ProviderConcurrency { limit: u32 },
}

impl Throttle {
    /// A bounded label for logs and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Throttle::ConsumerRate { .. } => "consumer_rate_limit",
            Throttle::ConsumerConcurrency { .. } => "consumer_concurrency_limit",
            Throttle::ProviderConcurrency { .. } => "provider_concurrency_limit",
        }
    }

    /// `(limit, remaining, reset seconds)` for the `X-Rate-Limit-*` headers.
    pub fn headers(self) -> (u32, u32, u64) {
        match self {
            Throttle::ConsumerRate { limit, reset_s } => (limit, 0, reset_s),
            // An exchange may end at any moment: a client should back off briefly, not for long.
            Throttle::ConsumerConcurrency { limit } | Throttle::ProviderConcurrency { limit } => {
                (limit, 0, 1)
            }
        }
    }
}

/// Counts one admitted exchange against its consumer and provider until dropped.
#[derive(Debug)]
pub(crate) struct Admission {
    /// What to give back; `None` when no limit counts anything.
    held: Option<(Arc<Limits>, Asid, Asid)>,
}

impl Limits {
    pub(crate) fn new(cfg: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            state: Mutex::default(),
        })
    }

    pub(crate) fn config(&self) -> &LimitsConfig {
        &self.cfg
    }

    fn counts_anything(&self) -> bool {
        self.cfg.per_consumer_rps > 0
            || self.cfg.per_consumer_concurrency > 0
            || self.cfg.per_provider_concurrency > 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is counters only; a panic elsewhere cannot leave them unusable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits one exchange from `from` to `to` at `now`, or says which limit it would break. Nothing is taken
    /// from any limit unless all of them admit it.
    pub(crate) fn admit(
        self: &Arc<Self>,
        from: &Asid,
        to: &Asid,
        now: Instant,
    ) -> Result<Admission, Throttle> {
        if !self.counts_anything() {
            return Ok(Admission { held: None });
        }
        let cfg = &self.cfg;
        let mut state = self.lock();
        let State {
            consumers,
            providers,
        } = &mut *state;
        let consumer = consumers.entry(from.clone()).or_insert_with(|| Consumer {
            tokens: f64::from(cfg.per_consumer_burst),
            refilled: now,
            in_flight: 0,
        });
        if cfg.per_consumer_rps > 0 {
            let rate = f64::from(cfg.per_consumer_rps);
            let elapsed = now
                .saturating_duration_since(consumer.refilled)
                .as_secs_f64();
            consumer.tokens =
                (consumer.tokens + elapsed * rate).min(f64::from(cfg.per_consumer_burst));
            consumer.refilled = now;
            if consumer.tokens < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - consumer.tokens) / rate);
                return Err(Throttle::ConsumerRate {
                    limit: cfg.per_consumer_rps,
                    reset_s: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        if cfg.per_consumer_concurrency > 0 && consumer.in_flight >= cfg.per_consumer_concurrency {
            return Err(Throttle::ConsumerConcurrency {
                limit: cfg.per_consumer_concurrency,
            });
        }
        let provider = providers.entry(to.clone()).or_insert(0);
        if cfg.per_provider_concurrency > 0 && *provider >= cfg.per_provider_concurrency {
            return Err(Throttle::ProviderConcurrency {
                limit: cfg.per_provider_concurrency,
            });
        }
        if cfg.per_consumer_rps > 0 {
            consumer.tokens -= 1.0;
        }
        consumer.in_flight += 1;
        *provider += 1;
        Ok(Admission {
            held: Some((Arc::clone(self), from.clone(), to.clone())),
        })
    }

    /// Open exchanges of a consumer and of a provider.
    #[cfg(test)]
    fn in_flight(&self, from: &Asid, to: &Asid) -> (u32, u32) {
        let state = self.lock();
        (
            state.consumers.get(from).map_or(0, |c| c.in_flight),
            state.providers.get(to).copied().unwrap_or(0),
        )
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let Some((limits, from, to)) = self.held.take() else {
            return;
        };
        let mut state = limits.lock();
        if let Some(c) = state.consumers.get_mut(&from) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        if let Some(p) = state.providers.get_mut(&to) {
            *p = p.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asid(s: &str) -> Asid {
        Asid::parse(s).unwrap()
    }

    fn limits(rps: u32, burst: u32, consumer: u32, provider: u32) -> Arc<Limits> {
        Limits::new(LimitsConfig {
            per_consumer_rps: rps,
            per_consumer_burst: burst,
            per_consumer_concurrency: consumer,
            per_provider_concurrency: provider,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let l = limits(2, 3, 0, 0);
        let (a, p) = (asid("200000000359"), asid("918999198993"));
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(l.admit(&a, &p, t0).unwrap());
        }
        assert_eq!(
            l.admit(&a, &p, t0).unwrap_err(),
            Throttle::ConsumerRate {
                limit: 2,
                reset_s: 1
            }
        );
        // Half a second at 2/s refills one token, and only one.
        let t1 = t0 + Duration::from_millis(500);
        drop(l.admit(&a, &p, t1).unwrap());
        assert!(l.admit(&a, &p, t1).is_err());
        // Another consumer has its own bucket.
        drop(l.admit(&asid("200000000360"), &p, t1).unwrap());
        // A long quiet spell refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            drop(l.admit(&a, &p, t2).unwrap());
        }
        assert!(l.admit(&a, &p, t2).is_err());
    }

    #[test]
    fn the_reset_is_the_wait_for_one_token() {
        let l = limits(1, 1, 0, 0);
        let (a, p) = (asid("1"), asid("2"));
        let t0 = Instant::now();
        drop(l.admit(&a, &p, t0).unwrap());
        let Err(Throttle::ConsumerRate { reset_s, .. }) =
            l.admit(&a, &p, t0 + Duration::from_millis(100))
        else {
            panic!("admitted")
        };
        assert_eq!(reset_s, 1);
        let slow = limits(1, 1, 0, 0);
        drop(slow.admit(&a, &p, t0).unwrap());
        assert!(slow.admit(&a, &p, t0 + Duration::from_millis(999)).is_err());
        assert!(slow.admit(&a, &p, t0 + Duration::from_millis(1000)).is_ok());
    }

    #[test]
    fn concurrency_is_held_until_the_admission_drops() {
        let l = limits(0, 0, 2, 3);
        let (a, b, p) = (asid("1"), asid("3"), asid("2"));
        let now = Instant::now();
        let first = l.admit(&a, &p, now).unwrap();
        let second = l.admit(&a, &p, now).unwrap();
        assert_eq!(
            l.admit(&a, &p, now).unwrap_err(),
            Throttle::ConsumerConcurrency { limit: 2 }
        );
        let third = l.admit(&b, &p, now).unwrap();
        assert_eq!(
            l.admit(&b, &p, now).unwrap_err(),
            Throttle::ProviderConcurrency { limit: 3 }
        );
        assert_eq!(l.in_flight(&a, &p), (2, 3));
        drop(first);
        assert_eq!(l.in_flight(&a, &p), (1, 2));
        // A refused request took nothing: b has one exchange open, not two.
        assert_eq!(l.in_flight(&b, &p), (1, 2));
        drop((second, third));
        assert_eq!(l.in_flight(&a, &p), (0, 0));
    }

    #[test]
    fn a_refusal_takes_no_token() {
        let l = limits(10, 1, 0, 1);
        let (a, b, p) = (asid("1"), asid("3"), asid("2"));
        let now = Instant::now();
        let held = l.admit(&b, &p, now).unwrap();
        // Refused by the provider limit: a's token is still there afterwards.
        assert!(matches!(
            l.admit(&a, &p, now),
            Err(Throttle::ProviderConcurrency { .. })
        ));
        drop(held);
        assert!(l.admit(&a, &p, now).is_ok());
    }

    #[test]
    fn unlimited_counts_nothing() {
        let l = Limits::new(LimitsConfig::default());
        let (a, p) = (asid("1"), asid("2"));
        let held: Vec<_> = (0..1000)
            .map(|_| l.admit(&a, &p, Instant::now()).unwrap())
            .collect();
        assert_eq!(l.in_flight(&a, &p), (0, 0));
        drop(held);
    }
}
