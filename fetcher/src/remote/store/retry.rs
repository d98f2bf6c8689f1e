//! The one retry policy of every store operation.
//!
//! object_store's own retries are switched off (`max_retries: 0`), because
//! they give up after a count of attempts (ten refused connections take
//! 1.5 s), do not retry a connection reset during a PUT, and would multiply
//! with any loop around them. Instead every [`Store`](super::Store) method runs
//! its requests through [`Retry::run`]: a transient failure (connection
//! refused or reset, timeout, 5xx, 429) is retried with exponential backoff
//! and jitter until the store's retry timeout has passed since the first
//! failure; anything else (403, 404, 412, 501, a local I/O error) is
//! returned at once.
//!
//! Logging (`RUST_LOG=fetcher=debug`): every operation that completes, and
//! every retry with its attempt, delay and error, at debug; an operation
//! still failing after [`NOT_ANSWERING`] warns that the store is not
//! answering (at most once per [`WARN_EVERY`] in a process, however many
//! operations wait).

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use object_store::client::{HttpError, HttpErrorKind};

/// First wait after a transient failure.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// How long an operation retries before a warning says so.
const NOT_ANSWERING: Duration = Duration::from_secs(5);
/// Least time between two such warnings of one process.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// What an operation is, for the log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Op<'a> {
    pub op: &'static str,
    pub object: &'a str,
    pub store: &'a str,
}

/// Whether a "not answering" warning may be logged now (rate-limited per
/// process, so that a hundred prefetches waiting on one outage warn once).
fn may_warn() -> bool {
    use std::sync::Mutex;
    static LAST: Mutex<Option<std::time::Instant>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

/// How long transient failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retry {
    /// Retrying stops once this much time has passed since the first failure.
    pub timeout: Duration,
}

/// A failure after the retry policy gave up (or did not apply).
#[derive(Debug)]
pub(crate) struct Failed {
    pub error: object_store::Error,
    /// Requests made, the failing one included.
    pub attempts: u32,
    /// Time from the first attempt to giving up.
    pub elapsed: Duration,
}

impl Retry {
    /// Runs `attempt` until it succeeds, fails permanently, or fails
    /// transiently after the retry timeout.
    #[cfg(test)]
    pub async fn run<T, F, Fut>(&self, attempt: F) -> Result<T, Failed>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        let op = Op {
            op: "test",
            object: "",
            store: "",
        };
        self.run_as(op, attempt).await
    }

    /// [`run`](Self::run) for operation `what` (named in the log).
    pub async fn run_as<T, F, Fut>(&self, what: Op<'_>, mut attempt: F) -> Result<T, Failed>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        let started = Instant::now();
        let mut backoff = INITIAL_BACKOFF;
        let mut attempts = 0u32;
        let mut warned = false;
        loop {
            attempts += 1;
            let error = match attempt().await {
                Ok(v) => {
                    tracing::debug!(
                        op = what.op,
                        object = what.object,
                        attempts,
                        ms = started.elapsed().as_millis() as u64,
                        "store operation done"
                    );
                    return Ok(v);
                }
                Err(e) => e,
            };
            let elapsed = started.elapsed();
            if !is_transient(&error) || elapsed >= self.timeout {
                log_end(what, attempts, elapsed, &error);
                return Err(Failed {
                    error,
                    attempts,
                    elapsed,
                });
            }
            // Equal jitter: half the backoff, plus up to half at random, so
            // that many clients failing together do not return together.
            let wait = backoff / 2 + backoff.mul_f64(random_fraction() / 2.0);
            let wait = wait.min(self.timeout - elapsed);
            tracing::debug!(
                op = what.op,
                object = what.object,
                attempt = attempts,
                delay_ms = wait.as_millis() as u64,
                %error,
                "transient store failure; retrying"
            );
            if !warned && elapsed >= NOT_ANSWERING && may_warn() {
                warned = true;
                tracing::warn!(
                    "store {} is not answering ({} {}: {error}); retrying for up to {} s",
                    what.store,
                    what.op,
                    what.object,
                    self.timeout.as_secs()
                );
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Logs an operation that ended in `error`: an answer that callers expect
/// (absent, present already) is no failure.
fn log_end(what: Op<'_>, attempts: u32, elapsed: Duration, error: &object_store::Error) {
    use object_store::Error as E;
    let ms = elapsed.as_millis() as u64;
    let answer = match error {
        E::NotFound { .. } => Some("not found"),
        E::AlreadyExists { .. } | E::Precondition { .. } => Some("exists already"),
        _ => None,
    };
    match answer {
        Some(answer) => tracing::debug!(
            op = what.op,
            object = what.object,
            attempts,
            ms,
            answer,
            "store operation done"
        ),
        None if is_transient(error) => tracing::debug!(
            op = what.op,
            object = what.object,
            attempts,
            ms,
            %error,
            "store operation failed: giving up after the retry timeout"
        ),
        None => tracing::debug!(
            op = what.op,
            object = what.object,
            attempts,
            ms,
            %error,
            "store operation failed (not retried)"
        ),
    }
}

/// Whether `e` is worth retrying: the request may succeed if repeated.
pub(crate) fn is_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        E::NotFound { .. }
        | E::AlreadyExists { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::NotImplemented { .. }
        | E::NotSupported { .. }
        | E::InvalidPath { .. }
        | E::UnknownConfigurationKey { .. } => false,
        other => {
            let mut cause: Option<&(dyn StdError + 'static)> = Some(other);
            while let Some(c) = cause {
                if let Some(status) = http_status(&c.to_string()) {
                    // 501 and 505: the server cannot do this at all.
                    return (status >= 500 && status != 501 && status != 505)
                        || status == 429
                        || status == 408;
                }
                if let Some(h) = c.downcast_ref::<HttpError>() {
                    // A body cut off by a reset shows as a decode error.
                    return matches!(
                        h.kind(),
                        HttpErrorKind::Connect
                            | HttpErrorKind::Request
                            | HttpErrorKind::Timeout
                            | HttpErrorKind::Interrupted
                            | HttpErrorKind::Decode
                    );
                }
                cause = c.source();
            }
            false
        }
    }
}

/// Whether `e` says the store could not be reached at all: the connection
/// was refused, reset or cut off, or timed out (as opposed to a store that
/// answered with an error).
pub(crate) fn is_unreachable(e: &object_store::Error) -> bool {
    use std::io::ErrorKind as K;
    let mut cause: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(c) = cause {
        if http_status(&c.to_string()).is_some() {
            return false;
        }
        if let Some(h) = c.downcast_ref::<HttpError>() {
            return matches!(
                h.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            );
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::NotConnected
                    | K::TimedOut
                    | K::HostUnreachable
                    | K::NetworkUnreachable
            )
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The HTTP status of a failed response, from the text of object_store's
/// request error (its type, which has a `status()`, is private in 0.14).
/// The 503 test of the CLI (`transient_s3_errors_are_retried`) fails if
/// this stops matching.
fn http_status(text: &str) -> Option<u16> {
    let (_, rest) = text.split_once("Server returned non-2xx status code: ")?;
    rest.get(..3)?.parse().ok()
}

/// A number in [0, 1) for jitter (not for anything secret).
fn random_fraction() -> f64 {
    let mut b = [0u8; 4];
    match getrandom::fill(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: Box::new(HttpError::new(
                HttpErrorKind::Connect,
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            )),
        }
    }

    #[test]
    fn refused_connections_are_unreachable_and_answers_are_not() {
        assert!(is_unreachable(&transient()));
        let answered = object_store::Error::Generic {
            store: "test",
            source: "Error performing GET http://x/y in 1ms - Server returned non-2xx status code: 503 Service Unavailable: ".into(),
        };
        assert!(!is_unreachable(&answered));
        let missing = object_store::Error::NotFound {
            path: "x".into(),
            source: "gone".into(),
        };
        assert!(!is_unreachable(&missing));
    }

    #[test]
    fn statuses_are_read_from_request_errors() {
        let t = "Error performing PUT http://x/y in 1ms - Server returned non-2xx status code: \
                 503 Service Unavailable: ";
        assert_eq!(http_status(t), Some(503));
        assert_eq!(
            http_status("Server returned error response: <Error/>"),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_for_the_whole_timeout() {
        let retry = Retry {
            timeout: Duration::from_secs(30),
        };
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let failed = retry
            .run(|| async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err::<(), _>(transient())
            })
            .await
            .unwrap_err();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(30), "{waited:?}");
        assert!(waited < Duration::from_secs(31), "{waited:?}");
        assert_eq!(failed.attempts, calls.load(Ordering::Relaxed));
        assert!(failed.attempts > 5, "{}", failed.attempts);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_then_success_succeeds() {
        let retry = Retry {
            timeout: Duration::from_secs(30),
        };
        let calls = AtomicU32::new(0);
        let v = retry
            .run(|| async {
                match calls.fetch_add(1, Ordering::Relaxed) {
                    0..3 => Err(transient()),
                    _ => Ok(7),
                }
            })
            .await
            .unwrap();
        assert_eq!((v, calls.load(Ordering::Relaxed)), (7, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried() {
        let retry = Retry {
            timeout: Duration::from_secs(30),
        };
        for make in [
            || object_store::Error::NotFound {
                path: "x".into(),
                source: "gone".into(),
            },
            || object_store::Error::PermissionDenied {
                path: "x".into(),
                source: "403".into(),
            },
            || object_store::Error::Precondition {
                path: "x".into(),
                source: "412".into(),
            },
        ] {
            let failed = retry.run(|| async { Err::<(), _>(make()) }).await;
            assert_eq!(failed.unwrap_err().attempts, 1);
        }
    }
}
