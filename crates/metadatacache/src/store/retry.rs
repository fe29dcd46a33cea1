//! How `update` waits between conflicting attempts.

use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// Backoff between attempts of a compare-and-swap loop.
///
/// The delay before retry `n` (1-based) is drawn uniformly from
/// `[d/2, d]` where `d = min(max_delay, initial_delay × multiplier^(n-1))`:
/// exponential, capped and jittered, so that replicas that collided once do
/// not collide again in lock step. A [`TooEarly`](ErrorKind::TooEarly)
/// answer waits at least [`too_early_delay`](RetryPolicy::too_early_delay).
/// With a [`deadline`](RetryPolicy::deadline) the loop gives up once the next
/// wait would end past it.
///
/// ```
/// use std::time::Duration;
/// use metadatacache::RetryPolicy;
/// let policy = RetryPolicy::default()
///     .initial_delay(Duration::from_millis(1))
///     .max_delay(Duration::from_millis(50))
///     .deadline(Some(Duration::from_secs(5)));
/// assert!(policy.delay(3, None) <= Duration::from_millis(4));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    initial_delay: Duration,
    max_delay: Duration,
    multiplier: f64,
    too_early_delay: Duration,
    deadline: Option<Duration>,
    read_attempts: u32,
}

impl Default for RetryPolicy {
    /// 1 ms doubling up to 100 ms, `TooEarly` waits ≥ 50 ms, no deadline,
    /// reads tried up to 3 times.
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(100),
            multiplier: 2.0,
            too_early_delay: Duration::from_millis(50),
            deadline: None,
            read_attempts: 3,
        }
    }
}

impl RetryPolicy {
    /// Retries at once, without waiting (for tests and single-process use).
    pub fn immediate() -> Self {
        RetryPolicy {
            initial_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            multiplier: 1.0,
            too_early_delay: Duration::ZERO,
            deadline: None,
            read_attempts: 3,
        }
    }

    /// The first delay (before jitter).
    #[must_use]
    pub fn initial_delay(mut self, d: Duration) -> Self {
        self.initial_delay = d;
        self
    }

    /// The cap on any delay.
    #[must_use]
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// Growth factor per attempt (values below 1 are taken as 1).
    #[must_use]
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = if m.is_finite() { m.max(1.0) } else { 1.0 };
        self
    }

    /// The least wait after a [`TooEarly`](ErrorKind::TooEarly) answer.
    #[must_use]
    pub fn too_early_delay(mut self, d: Duration) -> Self {
        self.too_early_delay = d;
        self
    }

    /// Total time an operation may spend retrying, counted from its call.
    #[must_use]
    pub fn deadline(mut self, d: Option<Duration>) -> Self {
        self.deadline = d;
        self
    }

    /// How often a read (a revalidation, or the read before an update's
    /// `f`) is tried when the storage answers `Unavailable` or `TooEarly`,
    /// with this policy's backoff and within its deadline (default 3; at
    /// least 1). Reads change nothing, so trying again is always safe;
    /// writes are never retried this way (a write whose reply was lost is
    /// settled or answered `Unavailable`).
    #[must_use]
    pub fn read_attempts(mut self, n: u32) -> Self {
        self.read_attempts = n.max(1);
        self
    }

    /// The most tries of one read (see
    /// [`read_attempts`](Self::read_attempts)).
    pub fn max_read_attempts(&self) -> u32 {
        self.read_attempts
    }

    /// The configured deadline.
    pub fn total_deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The wait before retry `retry` (1-based) after a conflict of kind `kind`.
    ///
    /// Never panics and never exceeds `max_delay` (nor, for `TooEarly`,
    /// `max(max_delay, too_early_delay)`), whatever the configured values.
    pub fn delay(&self, retry: u32, kind: Option<ErrorKind>) -> Duration {
        let jittered = if self.initial_delay.is_zero() || self.max_delay.is_zero() {
            Duration::ZERO
        } else {
            let exp = self
                .multiplier
                .powi(i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX));
            let base = self.initial_delay.as_secs_f64() * exp;
            let cap = self.max_delay.as_secs_f64();
            let d = if base.is_finite() { base.min(cap) } else { cap };
            let secs = d / 2.0 + fastrand::f64() * d / 2.0;
            // Rounding may carry `secs` just past the cap (or past what a
            // Duration holds): the cap is the answer then.
            Duration::try_from_secs_f64(secs)
                .unwrap_or(self.max_delay)
                .min(self.max_delay)
        };
        if kind == Some(ErrorKind::TooEarly) {
            jittered.max(self.too_early_delay)
        } else {
            jittered
        }
    }

    /// The wait after `err`, or `None` when the deadline leaves no room for it.
    pub(super) fn next_delay(
        &self,
        retry: u32,
        err: &Error,
        elapsed: Duration,
    ) -> Option<Duration> {
        let d = self.delay(retry, Some(err.kind()));
        match self.deadline {
            Some(deadline) if elapsed.checked_add(d).is_none_or(|end| end > deadline) => None,
            _ => Some(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let p = RetryPolicy::default();
        for _ in 0..100 {
            let d1 = p.delay(1, None);
            assert!(d1 >= Duration::from_micros(500) && d1 <= Duration::from_millis(1));
            let d5 = p.delay(5, None);
            assert!(d5 >= Duration::from_millis(8) && d5 <= Duration::from_millis(16));
            assert!(p.delay(60, None) <= Duration::from_millis(100));
            assert!(p.delay(1, Some(ErrorKind::TooEarly)) >= Duration::from_millis(50));
        }
        assert_eq!(RetryPolicy::immediate().delay(9, None), Duration::ZERO);
    }

    #[test]
    fn deadline_stops_retries() {
        let p = RetryPolicy::default().deadline(Some(Duration::from_millis(10)));
        let e = Error::new(ErrorKind::PreconditionFailed, "x");
        assert!(p.next_delay(1, &e, Duration::ZERO).is_some());
        assert!(p.next_delay(1, &e, Duration::from_millis(10)).is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any configuration and any retry number: no panic, no overflow,
        /// and the delay stays within its cap.
        #[test]
        fn never_panics_and_stays_capped(
            initial in duration(),
            max in duration(),
            too_early in duration(),
            multiplier in proptest::num::f64::ANY,
            deadline in proptest::option::of(duration()),
            elapsed in duration(),
            retry in proptest::prelude::any::<u32>(),
        ) {
            let p = RetryPolicy::default()
                .initial_delay(initial)
                .max_delay(max)
                .too_early_delay(too_early)
                .multiplier(multiplier)
                .deadline(deadline);
            let d = p.delay(retry, None);
            proptest::prop_assert!(d <= max);
            let early = p.delay(retry, Some(ErrorKind::TooEarly));
            proptest::prop_assert!(early <= max.max(too_early));
            for kind in [ErrorKind::PreconditionFailed, ErrorKind::TooEarly] {
                let err = Error::new(kind, "x");
                if let (Some(d), Some(deadline)) = (p.next_delay(retry, &err, elapsed), deadline) {
                    let end = elapsed.checked_add(d);
                    proptest::prop_assert!(end.is_some_and(|end| end <= deadline));
                }
            }
        }
    }

    /// Durations from zero to `Duration::MAX`, the edges included.
    fn duration() -> impl proptest::strategy::Strategy<Value = Duration> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::MAX),
            (0u64..10_000).prop_map(Duration::from_millis),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        ]
    }
}
