//! One retry policy for every remote call kura makes: S3 requests (handed to the AWS SDK's
//! standard retry mode), CouchDB requests, and `wait-for`'s probe loop.
//!
//! What is retried is decided where the failure is understood (the SDK's standard mode and
//! `couchdb::Client::request` both retry only 429, 5xx, timeouts and connection errors; a
//! 4xx such as a rejected password fails at once). How often and how long to wait is decided
//! here, once: exponential backoff with jitter (object_store `client/backoff.rs`), so a
//! hundred tenants' Jobs that lost the same server do not come back in lockstep.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 1 means no retry.
    pub max_attempts: u32,
    /// The ceiling of the first wait; each further wait's ceiling doubles.
    pub initial: Duration,
    /// No single wait is longer than this.
    pub max: Duration,
}

impl RetryPolicy {
    /// Requests to the object store and to CouchDB: 6 attempts, waits of 0.5 s doubling (at
    /// most 20 s), so 8 to 15.5 s of waiting in all: enough to ride out a server or pod
    /// restart or a throttling burst.
    pub const REQUESTS: RetryPolicy = RetryPolicy {
        max_attempts: 6,
        initial: Duration::from_millis(500),
        max: Duration::from_secs(20),
    };

    /// Requests with finished work riding on them, once the SDK's own [`Self::REQUESTS`]
    /// attempts are spent: a part of a dump that cannot be read again, the completion of an
    /// upload, the manifest that commits a backup, a read that broke off mid-object. 8 rounds,
    /// waits of 1 s doubling (at most 20 s), so 35.5 to 71 s of waiting besides the SDK's:
    /// more than the 30 s a store or the network to it is commonly gone during a failover.
    /// A store already unreachable when a run starts fails within `REQUESTS` instead.
    pub const IN_FLIGHT: RetryPolicy = RetryPolicy {
        max_attempts: 8,
        initial: Duration::from_secs(1),
        max: Duration::from_secs(20),
    };

    /// `wait-for`: attempts until its `--timeout`; waits stay short so a pod starts soon
    /// after its database does.
    pub const PROBE: RetryPolicy = RetryPolicy {
        max_attempts: u32::MAX,
        initial: Duration::from_millis(250),
        max: Duration::from_secs(5),
    };

    /// The same policy without retries, for a caller that retries (and logs) on its own.
    pub fn single_attempt(self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            ..self
        }
    }

    /// Whether another attempt may follow attempt number `attempt` (1-based).
    pub fn allows_another(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The wait after failed attempt number `attempt` (1-based): a random point between half
    /// and all of `initial × 2^(attempt-1)`, at most `max`. Half is kept so waits still grow:
    /// the shortest wait after attempt n+1 is the longest after attempt n.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        let floor = ceiling / 2;
        Duration::from_millis(floor + rand::random::<u64>() % (ceiling - floor + 1))
    }

    fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The AWS SDK's standard retry mode with this policy's numbers. The SDK chooses what
    /// is transient (5xx, throttling, timeouts, connection errors) and uses full jitter.
    pub fn for_aws_sdk(&self) -> aws_sdk_s3::config::retry::RetryConfig {
        aws_sdk_s3::config::retry::RetryConfig::standard()
            .with_max_attempts(self.max_attempts)
            .with_initial_backoff(self.initial)
            .with_max_backoff(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_until_the_cap_and_never_pass_it() {
        let policy = RetryPolicy::REQUESTS;
        let samples =
            |attempt| -> Vec<Duration> { (0..200).map(|_| policy.delay(attempt)).collect() };
        let mut longest_before = Duration::ZERO;
        for attempt in 1..=12 {
            let waits = samples(attempt);
            let shortest = *waits.iter().min().unwrap();
            let longest = *waits.iter().max().unwrap();
            assert!(longest <= policy.max, "attempt {attempt}: {longest:?}");
            if policy.ceiling(attempt) < policy.max {
                // Below the cap, every wait is at least as long as any wait before it.
                assert!(
                    shortest >= longest_before,
                    "attempt {attempt}: {shortest:?} after {longest_before:?}"
                );
            }
            longest_before = longest;
        }
        assert_eq!(policy.ceiling(1), Duration::from_millis(500));
        assert_eq!(policy.ceiling(4), Duration::from_millis(4000));
        // What a request rides out before it fails: waits after attempts 1 to 5.
        let total: Duration = (1..policy.max_attempts).map(|a| policy.ceiling(a)).sum();
        assert_eq!(total, Duration::from_millis(15_500));
        assert_eq!(policy.ceiling(12), policy.max);
        let mean = |attempt| samples(attempt).iter().sum::<Duration>() / 200;
        assert!(mean(5) > mean(3) * 3, "{:?} vs {:?}", mean(5), mean(3));
    }

    #[test]
    fn work_in_flight_rides_out_a_30_second_outage() {
        let policy = RetryPolicy::IN_FLIGHT;
        let ceilings: Duration = (1..policy.max_attempts).map(|a| policy.ceiling(a)).sum();
        // Half of each ceiling is the shortest wait: the least that is ridden out.
        assert_eq!(ceilings, Duration::from_secs(71));
        assert!(ceilings / 2 > Duration::from_secs(35));
    }

    #[test]
    fn attempts_are_counted_with_the_first() {
        let policy = RetryPolicy::REQUESTS;
        assert!(policy.allows_another(5));
        assert!(!policy.allows_another(6));
        assert!(!policy.single_attempt().allows_another(1));
        assert!(RetryPolicy::PROBE.allows_another(1_000_000));
        assert!(RetryPolicy::PROBE.delay(40) <= Duration::from_secs(5));
    }
}
