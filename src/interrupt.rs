//! A command interrupted by SIGINT or SIGTERM: the operation it was running
//! dropped (its work cancelled), so that it lets go of what it holds (the
//! lease) and ends with [`crate::output::Interrupted`].

use std::future::Future;

/// Runs `op` to its end unless SIGINT or SIGTERM comes first: then `op` is
/// dropped (its work cancelled) and the signal returned, for the caller to
/// let go of what it holds and end with [`crate::output::Interrupted`].
pub async fn until_signal<T>(op: impl Future<Output = T>) -> Result<T, i32> {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return Ok(op.await);
    };
    tokio::select! {
        r = op => Ok(r),
        _ = int.recv() => Err(libc::SIGINT),
        _ = term.recv() => Err(libc::SIGTERM),
    }
}

/// What an interrupted command that published nothing left: the lease on
/// `parcel` released (`released` is how its release went).
pub fn released_or_not(parcel: &str, released: &Result<(), fetcher::Error>) -> String {
    match released {
        Ok(()) => format!("nothing was published; the lease on parcel {parcel} is released"),
        Err(e) => format!(
            "nothing was published; the lease on parcel {parcel} could not be released ({e}): the next import or rollback on this host takes it over"
        ),
    }
}
