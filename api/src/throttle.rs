//! Per-client rate limits on one node, with `governor`'s keyed GCRA limiters: each principal
//! (once authenticated) and each client address (for requests without valid credentials and
//! the public probes, so that guessing keys or flooding with garbage costs the guesser, not the
//! cluster: an unknown key costs a read barrier). Past its rate a client gets 429 with
//! `Retry-After`; other clients are not slowed.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::problem::Problem;

/// Requests per second a client may make to one node, with bursts of one second's worth;
/// `0` turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub per_principal: u32,
    pub per_address: u32,
}

impl Default for RateLimitConfig {
    fn default() -> RateLimitConfig {
        RateLimitConfig { per_principal: 1_000, per_address: 100 }
    }
}

/// The limiters of one node.
pub struct RateLimits {
    principals: Option<DefaultKeyedRateLimiter<String>>,
    addresses: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Checks so far: every [`FORGET_EVERY`] of them, idle clients are forgotten.
    checks: AtomicU64,
}

/// See [`RateLimits::forget_idle`].
const FORGET_EVERY: u64 = 10_000;

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("principals", &self.principals.is_some())
            .field("addresses", &self.addresses.is_some())
            .finish()
    }
}

impl RateLimits {
    pub fn new(config: RateLimitConfig) -> RateLimits {
        let quota = |per_second: u32| NonZeroU32::new(per_second).map(Quota::per_second);
        RateLimits {
            principals: quota(config.per_principal).map(RateLimiter::keyed),
            addresses: quota(config.per_address).map(RateLimiter::keyed),
            checks: AtomicU64::new(0),
        }
    }

    fn counted(&self) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
            self.forget_idle();
        }
    }

    /// One request of the principal acting as `actor` (`human:olga`).
    pub fn principal(&self, actor: impl FnOnce() -> String) -> Result<(), Problem> {
        let Some(limiter) = &self.principals else { return Ok(()) };
        self.counted();
        limiter
            .check_key(&actor())
            .map_err(|not_until| too_many(not_until.wait_time_from(DefaultClock::default().now()), "this principal"))
    }

    /// One request from `address` that no valid credentials vouch for.
    pub fn address(&self, address: IpAddr) -> Result<(), Problem> {
        let Some(limiter) = &self.addresses else { return Ok(()) };
        self.counted();
        limiter
            .check_key(&address)
            .map_err(|not_until| too_many(not_until.wait_time_from(DefaultClock::default().now()), "this address"))
    }

    /// Forgets clients that have not been limited lately (their state would allow a full burst
    /// anyway), so that many addresses seen once do not grow the limiters for ever.
    fn forget_idle(&self) {
        if let Some(limiter) = &self.principals {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &self.addresses {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

fn too_many(wait: Duration, who: &str) -> Problem {
    let mut problem = Problem::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        format!("{who} is over its request rate on this node; retry after {} ms", wait.as_millis()),
    );
    problem.retry_after_secs = Some(wait.as_secs().clamp(1, u32::MAX as u64) as u32);
    problem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_past_its_rate_is_refused_with_retry_after_and_others_are_not() {
        let limits = RateLimits::new(RateLimitConfig { per_principal: 5, per_address: 3 });
        for _ in 0..5 {
            assert!(limits.principal(|| "human:greedy".into()).is_ok(), "a burst of one second's worth");
        }
        let refused = limits.principal(|| "human:greedy".into()).unwrap_err();
        assert_eq!((refused.status, refused.retry_after_secs), (429, Some(1)));
        assert!(limits.principal(|| "human:patient".into()).is_ok(), "another principal is not slowed");
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(limits.address(a).is_ok());
        }
        assert!(limits.address(a).is_err());
        assert!(limits.address(b).is_ok());
        let off = RateLimits::new(RateLimitConfig { per_principal: 0, per_address: 0 });
        assert!((0..10_000).all(|_| off.principal(|| "x".into()).is_ok() && off.address(a).is_ok()), "0 turns it off");
    }
}
