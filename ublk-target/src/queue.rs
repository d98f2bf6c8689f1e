//! One hardware queue: a thread with its own io_uring, one async task per
//! tag on a smol executor, and one task that keeps a read of the queue's
//! eventfd in the ring so that a chunk fetched by the engine wakes the tags
//! waiting for it.

use std::cell::Cell;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use fetcher::{Engine, Notifier};
use io_uring::{opcode, squeue, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};

/// Wake-ups delivered through the queue's eventfd, counted.
#[derive(Default)]
struct Wakeups {
    generation: Cell<u64>,
    waiters: std::cell::RefCell<Vec<Waker>>,
}

impl Wakeups {
    fn bump(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves once a wake-up newer than `seen` arrived.
    fn after(&self, seen: u64) -> After<'_> {
        After { w: self, seen }
    }
}

struct After<'a> {
    w: &'a Wakeups,
    seen: u64,
}

impl Future for After<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.w.generation.get() != self.seen {
            Poll::Ready(())
        } else {
            self.w.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        }
    }
}

struct QueueCtx {
    engine: Arc<Engine>,
    notifier: Arc<Notifier>,
    wakeups: Wakeups,
}

pub(crate) fn run(qid: u16, dev: &UblkDev, engine: Arc<Engine>) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            eprintln!("isr: ublk queue {qid}: cannot start: {e}");
            return;
        }
    };
    let notifier = match Notifier::new() {
        Ok(n) => Arc::new(n),
        Err(e) => {
            eprintln!("isr: ublk queue {qid}: no eventfd: {e}");
            return;
        }
    };
    let ctx = Rc::new(QueueCtx {
        engine,
        notifier,
        wakeups: Wakeups::default(),
    });
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let (q, ctx) = (q.clone(), ctx.clone());
        tasks.push(exe.spawn(async move {
            match tag_task(&q, tag, &ctx).await {
                Err(UblkError::QueueIsDown) | Ok(()) => {}
                Err(e) => eprintln!("isr: ublk queue {qid} tag {tag}: {e}"),
            }
        }));
    }
    let wake_task = {
        let ctx = ctx.clone();
        exe.spawn(async move { eventfd_task(&ctx).await })
    };
    let exe2 = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while exe2.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        let r = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await;
        if let Err(e) = r
            && !matches!(e, UblkError::QueueIsDown)
        {
            eprintln!("isr: ublk queue {qid}: {e}");
        }
    }));
    drop(wake_task);
}

/// Keeps one read of the eventfd in the ring; each completion wakes the
/// tags that wait for fetches.
async fn eventfd_task(ctx: &QueueCtx) {
    let mut buf = Box::new([0u8; 8]);
    let fd = std::os::fd::AsFd::as_fd(ctx.notifier.as_ref()).as_raw_fd();
    loop {
        let sqe = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8).build();
        match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
            Ok(r) if r >= 0 || r == -libc::EAGAIN || r == -libc::EINTR => ctx.wakeups.bump(),
            _ => return,
        }
    }
}

async fn tag_task(q: &UblkQueue<'_>, tag: u16, ctx: &QueueCtx) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = handle(q, tag, ctx, buf.as_mut_slice()).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Serves one request; returns bytes done or a negative errno.
async fn handle(q: &UblkQueue<'_>, tag: u16, ctx: &QueueCtx, buf: &mut [u8]) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let engine = &ctx.engine;
    // FLUSH carries no range (its start sector is u64::MAX): handle it first.
    if op == libublk::sys::UBLK_IO_OP_FLUSH {
        return match engine.flush() {
            Ok(()) => 0,
            Err(e) => fail("flush", 0, 0, &e),
        };
    }
    let offset = iod.start_sector << 9;
    let len = (iod.nr_sectors << 9) as usize;
    match op {
        libublk::sys::UBLK_IO_OP_READ | libublk::sys::UBLK_IO_OP_WRITE => {
            let write = op == libublk::sys::UBLK_IO_OP_WRITE;
            if len > buf.len() {
                return -libc::EINVAL;
            }
            let need = match engine.prepare_io(offset, len, write) {
                Ok(n) => n,
                Err(e) => return fail("prepare", offset, len, &e),
            };
            for c in need {
                if let Err(res) = wait_cached(ctx, c).await {
                    return res;
                }
            }
            // A write is marked dirty before its data goes in (fencing off
            // a fetch that completes meanwhile) and after (so that a publish
            // that read the chunk in between keeps it dirty).
            if write && let Err(e) = engine.mark_dirty(offset, len) {
                return fail("write", offset, len, &e);
            }
            let res = image_io(write, offset, &mut buf[..len]).await;
            if write
                && res >= 0
                && let Err(e) = engine.mark_dirty(offset, len)
            {
                return fail("write", offset, len, &e);
            }
            res
        }
        libublk::sys::UBLK_IO_OP_DISCARD | libublk::sys::UBLK_IO_OP_WRITE_ZEROES => {
            match engine.discard(offset, len as u64) {
                Ok(()) => 0,
                Err(e) => fail("discard", offset, len, &e),
            }
        }
        _ => -libc::EINVAL,
    }
}

fn fail(op: &str, offset: u64, len: usize, e: &fetcher::Error) -> i32 {
    eprintln!("isr: ublk {op} of {len} bytes at offset {offset} failed: {e}");
    crate::errno(e)
}

/// Waits (asleep in the ring) until chunk `c` is cached.
async fn wait_cached(ctx: &QueueCtx, c: u64) -> Result<(), i32> {
    let started = Instant::now();
    loop {
        let seen = ctx.wakeups.generation.get();
        let Some(slot) = ctx.engine.request(c, Some(&ctx.notifier)) else {
            return Ok(());
        };
        match slot.result() {
            Some(Ok(())) => continue,
            Some(Err(e)) => {
                let offset = ctx.engine.geometry().chunk_offset(c);
                return Err(fail("fetch", offset, 0, &e));
            }
            None if started.elapsed() >= ctx.engine.miss_timeout() => {
                eprintln!(
                    "isr: ublk read of chunk {c} timed out after {} s waiting for the store",
                    ctx.engine.miss_timeout().as_secs()
                );
                return Err(-libc::EIO);
            }
            None => ctx.wakeups.after(seen).await,
        }
    }
}

/// Reads or writes the cache image through the queue's ring (fixed file 1;
/// the image holds disk byte x at offset x, so one request is one op).
async fn image_io(write: bool, offset: u64, buf: &mut [u8]) -> i32 {
    let mut done = 0usize;
    while done < buf.len() {
        let ptr = buf[done..].as_mut_ptr();
        let n = (buf.len() - done) as u32;
        let at = offset + done as u64;
        let sqe = if write {
            opcode::Write::new(types::Fixed(1), ptr, n)
                .offset(at)
                .build()
        } else {
            opcode::Read::new(types::Fixed(1), ptr, n)
                .offset(at)
                .build()
        };
        let r = ublk_submit_sqe_async(
            sqe.flags(squeue::Flags::FIXED_FILE),
            UblkUringData::Target as u64,
        )
        .await
        .unwrap_or(-libc::EIO);
        if r <= 0 {
            return if r == 0 { -libc::EIO } else { r };
        }
        done += r as usize;
    }
    done as i32
}
