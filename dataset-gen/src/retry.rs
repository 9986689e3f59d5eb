//! Retries for the LLM endpoint: exponential backoff with full jitter on timeouts, connection
//! failures, `429` (honouring `Retry-After`) and `5xx`; anything else is returned at once.
//!
//! Installed into `async-openai` as its HTTP service, so every API call goes through it.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Serialize;

/// When and how long to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub max_retries: u32,
    /// The first backoff's upper bound; doubled per retry.
    pub base: Duration,
    /// The largest backoff.
    pub cap: Duration,
    /// One attempt's time limit.
    pub attempt_timeout: Duration,
    /// A `Retry-After` longer than this is clipped to it.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 6,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: uniform in `[0, min(cap, base · 2^retry)]`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.cap);
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        ceiling.mul_f64((r >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// Counts of retries by cause, for the run summary.
#[derive(Debug, Default)]
pub struct RetryStats {
    pub rate_limited: AtomicU64,
    pub server_error: AtomicU64,
    pub timeout: AtomicU64,
    pub connection: AtomicU64,
    /// Answers that were not the JSON asked for, asked again with a fresh sample.
    pub invalid_json: AtomicU64,
}

/// A plain copy of [`RetryStats`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct RetryCounts {
    pub rate_limited: u64,
    pub server_error: u64,
    pub timeout: u64,
    pub connection: u64,
    pub invalid_json: u64,
}

impl RetryStats {
    pub fn snapshot(&self) -> RetryCounts {
        RetryCounts {
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            server_error: self.server_error.load(Ordering::Relaxed),
            timeout: self.timeout.load(Ordering::Relaxed),
            connection: self.connection.load(Ordering::Relaxed),
            invalid_json: self.invalid_json.load(Ordering::Relaxed),
        }
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The tower service `async-openai` sends every request through.
#[derive(Debug, Clone)]
pub struct RetryService {
    client: reqwest::Client,
    policy: RetryPolicy,
    stats: Arc<RetryStats>,
}

impl RetryService {
    pub fn new(client: reqwest::Client, policy: RetryPolicy, stats: Arc<RetryStats>) -> Self {
        Self {
            client,
            policy,
            stats,
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

impl tower::Service<HttpRequestFactory> for RetryService {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let client = self.client.clone();
        let policy = self.policy.clone();
        let stats = self.stats.clone();
        Box::pin(async move {
            let mut retry = 0u32;
            loop {
                let request = factory.build().await?;
                let url = request.url().clone();
                let attempt =
                    tokio::time::timeout(policy.attempt_timeout, client.execute(request)).await;
                let last_try = retry >= policy.max_retries;
                let delay = match attempt {
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        let retryable = status.as_u16() == 429 || status.is_server_error();
                        if !retryable || last_try {
                            return Ok(resp);
                        }
                        let counter = if status.as_u16() == 429 {
                            &stats.rate_limited
                        } else {
                            &stats.server_error
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        let delay = match retry_after(resp.headers()) {
                            Some(d) => d.min(policy.max_retry_after),
                            None => policy.backoff(retry),
                        };
                        tracing::debug!(%url, %status, ?delay, retry, "retrying");
                        delay
                    }
                    Ok(Err(e)) => {
                        let transient = e.is_timeout() || e.is_connect() || e.is_request();
                        if !transient || last_try {
                            return Err(OpenAIError::Reqwest(e));
                        }
                        if e.is_timeout() {
                            &stats.timeout
                        } else {
                            &stats.connection
                        }
                        .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%url, error = %e, retry, "retrying");
                        policy.backoff(retry)
                    }
                    Err(_) => {
                        if last_try {
                            return Err(OpenAIError::Boxed(
                                format!("no answer from {url} within {:?}", policy.attempt_timeout)
                                    .into(),
                            ));
                        }
                        stats.timeout.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%url, retry, "attempt timed out; retrying");
                        policy.backoff(retry)
                    }
                };
                tokio::time::sleep(delay).await;
                retry += 1;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn backoff_is_jittered_below_the_doubling_ceiling() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            ..Default::default()
        };
        for retry in 0..8 {
            let ceiling = Duration::from_millis(100 * (1 << retry)).min(Duration::from_secs(1));
            let draws: Vec<Duration> = (0..50).map(|_| p.backoff(retry)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling));
            // Jitter: not all equal.
            assert!(draws.iter().any(|d| *d != draws[0]));
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("1.5"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).expect("header"));
        let d = retry_after(&h).expect("a date");
        assert!(
            d > Duration::from_secs(27) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
