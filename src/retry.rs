//! Whether and when to try again, decided in one place from the error.

use std::future::Future;
use std::time::Duration;

use crate::error::{Error, Result};

/// How often and how patiently transient failures are retried.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    /// Attempts after the first.
    pub retries: u32,
    /// First back-off; doubles each time (capped at 10 s); a longer `Retry-After` wins.
    pub base_delay: Duration,
}

impl RetryPolicy {
    /// How long to wait before attempt `attempt` (1-based) after `err`: the back-off, or
    /// the server's `Retry-After` (at most 60 s) when that is longer. A `Retry-After` of 0,
    /// or a date already past, is no reason to ask again at once.
    pub(crate) fn delay(&self, attempt: u32, err: &Error) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(10);
        let backoff = (self.base_delay * factor).min(Duration::from_secs(10));
        if let Error::Registry {
            retry_after: Some(secs),
            ..
        } = err
        {
            return Duration::from_secs((*secs).min(60)).max(backoff);
        }
        backoff
    }

    /// Runs `op` until it succeeds, fails for good, or the retries are spent.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < self.retries => {
                    attempt += 1;
                    let wait = self.delay(attempt, &e);
                    tracing::warn!(%what, attempt, error = %e, "retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e.with_retries(attempt)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> Error {
        Error::network("GET", "http://h/", std::io::Error::other("reset"))
    }

    #[tokio::test]
    async fn retries_transient_then_reports_count() {
        let p = RetryPolicy {
            retries: 2,
            base_delay: Duration::from_millis(1),
        };
        let calls = AtomicU32::new(0);
        let r: Result<()> = p
            .run("x", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(transient())
            })
            .await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(r.unwrap_err().to_string().contains("after 2 retries"));

        let calls = AtomicU32::new(0);
        let r: Result<()> = p
            .run("x", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Error::InvalidOption("no".into()))
            })
            .await;
        assert!(r.is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "permanent errors are not retried"
        );
    }

    #[test]
    fn honours_retry_after_and_caps_backoff() {
        let p = RetryPolicy {
            retries: 5,
            base_delay: Duration::from_millis(100),
        };
        let e = Error::Registry {
            url: "u".into(),
            status: 429,
            code: None,
            message: String::new(),
            retry_after: Some(3),
            retries: 0,
        };
        assert_eq!(p.delay(1, &e), Duration::from_secs(3));
        // Never sooner than the back-off: a past date (0) waits like any retry.
        let now = Error::Registry {
            url: "u".into(),
            status: 503,
            code: None,
            message: String::new(),
            retry_after: Some(0),
            retries: 0,
        };
        assert_eq!(p.delay(1, &now), Duration::from_millis(100));
        assert_eq!(p.delay(7, &e), Duration::from_millis(6400));
        assert_eq!(p.delay(1, &transient()), Duration::from_millis(100));
        assert_eq!(p.delay(3, &transient()), Duration::from_millis(400));
        assert_eq!(p.delay(30, &transient()), Duration::from_secs(10));
    }
}
