//! A wake-up that a thread outside tokio can wait on through a file
//! descriptor: an eventfd. ublk queue threads sleep in their own io_uring,
//! so they keep a read of this fd in their ring instead of a condvar.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// An eventfd: [`signal`](Notifier::signal) makes it readable, and a read
/// (or [`drain`](Notifier::drain)) resets it.
#[derive(Debug)]
pub struct Notifier {
    fd: OwnedFd,
}

impl Notifier {
    /// A new, unsignalled eventfd. It is blocking on purpose: io_uring
    /// completes a read of a non-blocking fd at once with EAGAIN (a waiter
    /// would spin), while a read of a blocking one waits in the ring.
    pub fn new() -> io::Result<Notifier> {
        // SAFETY: eventfd takes no pointers; a negative return is an error.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Notifier { fd })
    }

    /// Makes the fd readable (adds one to the counter).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an fd we own. A full
        // counter (EAGAIN) still leaves the fd readable, which is all we need.
        unsafe {
            libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// Resets the fd; returns how many signals arrived since the last drain.
    pub fn drain(&self) -> u64 {
        if !self.poll(0) {
            return 0;
        }
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; the fd is readable
        // (polled above), so the read does not block.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
        if n == 8 { count } else { 0 }
    }

    /// Waits up to `timeout_ms` (-1: forever) for a signal; true if one came.
    pub fn wait(&self, timeout_ms: i32) -> bool {
        self.poll(timeout_ms) && self.drain() > 0
    }

    /// Whether the fd becomes readable within `timeout_ms`.
    fn poll(&self, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        n > 0
    }
}

impl AsFd for Notifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_cross_threads_through_the_fd() {
        let n = std::sync::Arc::new(Notifier::new().unwrap());
        assert!(!n.wait(0));
        let m = n.clone();
        let t = std::thread::spawn(move || m.signal());
        assert!(n.wait(5_000));
        t.join().unwrap();
        assert_eq!(n.drain(), 0);
        n.signal();
        n.signal();
        assert_eq!(n.drain(), 2);
    }
}
