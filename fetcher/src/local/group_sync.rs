//! Group commit for syncs of one file: many threads that each need "my
//! write is durable" share one fdatasync instead of queueing one each.
//!
//! A caller that finished its write needs a sync that *started* after that
//! write. If none is running, it runs one itself; if one is running (it may
//! have started before the write), it waits for the next, which the first
//! waiter to see the running one end starts on behalf of everyone waiting.
//! With N fetches completing together this costs about two syncs instead
//! of N (on this project's disks an fdatasync of the cache image takes
//! milliseconds, which capped a fast link's hoard at the disk's sync rate).

use std::sync::{Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    /// Syncs started so far (the number of the latest).
    started: u64,
    /// The latest sync that ended, and whether it succeeded.
    finished: u64,
    ok: bool,
    running: bool,
}

/// Shares syncs between the threads that need one.
#[derive(Debug, Default)]
pub(crate) struct GroupSync {
    state: Mutex<State>,
    ended: Condvar,
}

impl GroupSync {
    /// Returns once a sync that started after this call began has ended;
    /// `sync` runs it (on this thread, or on another caller's). The result is
    /// that sync's: a failure is reported to every caller it covered.
    pub(crate) fn sync<E>(
        &self,
        sync: impl FnOnce() -> Result<(), E>,
        failed: impl FnOnce() -> E,
    ) -> Result<(), E> {
        let mut st = self.state.lock().expect("group sync lock");
        // A sync running now may have begun before our write: we need the
        // one after it.
        let need = st.started + 1;
        loop {
            if st.finished >= need {
                return if st.ok { Ok(()) } else { Err(failed()) };
            }
            if !st.running {
                st.running = true;
                st.started += 1;
                let mine = st.started;
                drop(st);
                let result = sync();
                let mut st = self.state.lock().expect("group sync lock");
                st.running = false;
                st.finished = mine;
                st.ok = result.is_ok();
                self.ended.notify_all();
                return result;
            }
            st = self.ended.wait(st).expect("group sync lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// Many threads, each "writing" (bumping a counter) and then asking
    /// for a sync: every one returns only after a sync that saw its write,
    /// and far fewer syncs run than callers.
    #[test]
    fn every_caller_is_covered_by_a_sync_begun_after_its_write() {
        let g = Arc::new(GroupSync::default());
        let written = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        let syncs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (g, written, durable, syncs) =
                    (g.clone(), written.clone(), durable.clone(), syncs.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                        g.sync(
                            || {
                                // What the sync makes durable: every write so far.
                                let seen = written.load(Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(1));
                                durable.fetch_max(seen, Ordering::SeqCst);
                                syncs.fetch_add(1, Ordering::SeqCst);
                                Ok::<(), ()>(())
                            },
                            || (),
                        )
                        .unwrap();
                        assert!(durable.load(Ordering::SeqCst) >= mine);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = syncs.load(Ordering::SeqCst);
        assert!(n < 800, "{n} syncs for 800 callers: none were shared");
    }

    #[test]
    fn a_failed_sync_fails_every_caller_it_covered() {
        let g = GroupSync::default();
        assert_eq!(g.sync(|| Err("eio"), || "eio (shared)"), Err("eio"));
        // The next caller needs a new sync; it succeeds.
        assert_eq!(g.sync(|| Ok(()), || "unused"), Ok(()));
    }
}
