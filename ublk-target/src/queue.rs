//! One hardware queue: a thread with its own io_uring, one async task per
//! tag on a smol executor, and one task that keeps a read of the queue's
//! eventfd in the ring so that a chunk fetched by the engine wakes the tags
//! waiting for it.

use std::cell::{Cell, UnsafeCell};
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

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

/// A timerfd in the queue's ring, armed at the earliest deadline of the
/// requests waiting for chunks: each waiting request has its own miss
/// deadline, and the queue wakes at it without polling.
struct Timer {
    fd: OwnedFd,
    armed: Cell<Option<Instant>>,
}

impl Timer {
    fn new() -> std::io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; a negative return is an
        // error. The fd is blocking, so a read of it in the ring waits.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by timerfd_create and is owned by
        // no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer {
            fd,
            armed: Cell::new(None),
        })
    }

    /// Makes sure the timer fires no later than `deadline`.
    fn arm_by(&self, deadline: Instant) {
        if self.armed.get().is_some_and(|a| a <= deadline) {
            return;
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` lives across the call; the old value is not asked for.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r == 0 {
            self.armed.set(Some(deadline));
        }
    }
}

/// Merges concurrent FLUSH requests of a queue: a flush waits for a sync
/// that started after it arrived; every flush arriving while one sync runs
/// shares the next.
#[derive(Default)]
struct Flusher {
    running: Cell<bool>,
    started: Cell<u64>,
    done: Cell<u64>,
    finished: Wakeups,
}

/// The ring's fixed files: the cache image through the page cache, and
/// (when the cache works direct) the image opened with `O_DIRECT`.
pub(crate) const BUFFERED_FILE: u32 = 1;
pub(crate) const DIRECT_FILE: u32 = 2;

struct QueueCtx {
    engine: Arc<Engine>,
    /// The alignment of direct I/O on the image, when the cache works direct.
    direct: Option<usize>,
    notifier: Arc<Notifier>,
    wakeups: Wakeups,
    timer: Timer,
    flusher: Flusher,
}

pub(crate) fn run(qid: u16, dev: &UblkDev, engine: Arc<Engine>) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            eprintln!("isr: ublk queue {qid}: cannot start: {e}");
            return;
        }
    };
    let (notifier, timer) = match (Notifier::new(), Timer::new()) {
        (Ok(n), Ok(t)) => (Arc::new(n), t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("isr: ublk queue {qid}: no eventfd or timerfd: {e}");
            return;
        }
    };
    let ctx = Rc::new(QueueCtx {
        direct: engine.image_direct().map(|(_, align)| align),
        engine,
        notifier,
        wakeups: Wakeups::default(),
        timer,
        flusher: Flusher::default(),
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
    let timer_task = {
        let ctx = ctx.clone();
        exe.spawn(async move { timer_task(&ctx).await })
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
    drop(timer_task);
}

/// Keeps one read of the eventfd in the ring; each completion wakes the
/// tags that wait for fetches.
async fn eventfd_task(ctx: &QueueCtx) {
    let fd = std::os::fd::AsFd::as_fd(ctx.notifier.as_ref()).as_raw_fd();
    read_loop(fd, || ctx.wakeups.bump()).await
}

/// Keeps one read of the timerfd in the ring; each expiry wakes the
/// waiting tags, which fail the requests whose deadline passed and re-arm
/// the timer for the others.
async fn timer_task(ctx: &QueueCtx) {
    read_loop(ctx.timer.fd.as_raw_fd(), || {
        ctx.timer.armed.set(None);
        ctx.wakeups.bump();
    })
    .await
}

async fn read_loop(fd: i32, mut on_read: impl FnMut()) {
    let buf = RingBuf::new();
    loop {
        match buf.read(fd).await {
            Ok(r) if r >= 0 || r == -libc::EAGAIN || r == -libc::EINTR => on_read(),
            _ => return,
        }
    }
}

/// The 8 bytes a read of an eventfd or timerfd in the queue's ring lands
/// in. The kernel writes there whenever the read completes, which may be
/// after the future that queued it was dropped (the queue drops its
/// eventfd and timer tasks at shutdown with their reads still in the
/// ring): while a read that targets the buffer may be in the ring, the
/// buffer must outlive it, so a guard dropped then leaks it instead of
/// freeing it (8 bytes per task per device lifetime).
struct RingBuf {
    mem: Rc<UnsafeCell<[u8; 8]>>,
    /// Set while an SQE that targets `mem` may be in the ring.
    pending: Cell<bool>,
}

impl RingBuf {
    fn new() -> RingBuf {
        RingBuf {
            mem: Rc::new(UnsafeCell::new([0; 8])),
            pending: Cell::new(false),
        }
    }

    /// Reads up to 8 bytes of `fd` into the buffer through the queue's
    /// ring; the buffer counts as pending from before the SQE is queued
    /// until its completion was reaped, and stays pending for good if the
    /// future is dropped before that.
    async fn read(&self, fd: i32) -> Result<i32, UblkError> {
        let sqe = opcode::Read::new(types::Fd(fd), self.mem.get().cast::<u8>(), 8).build();
        self.pending.set(true);
        let r = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await;
        self.pending.set(false);
        r
    }
}

impl Drop for RingBuf {
    fn drop(&mut self) {
        if self.pending.get() {
            // The ring may still write into the buffer: keep it allocated
            // for the rest of the process.
            std::mem::forget(self.mem.clone());
        }
    }
}

/// Where a request's data is.
enum Data<'a> {
    /// The tag's own buffer, which the driver copies to or from the
    /// request's pages.
    Buf(&'a mut [u8]),
    /// Zero copy: the request's pages, which the driver registered in the
    /// queue's ring at this buffer index when it handed the request over
    /// (`UBLK_F_AUTO_BUF_REG`) and unregisters when it is committed.
    Fixed(u16),
}

async fn tag_task(q: &UblkQueue<'_>, tag: u16, ctx: &QueueCtx) -> Result<(), UblkError> {
    let max = q.dev.dev_info.max_io_buf_bytes as usize;
    if q.support_auto_buf_zc() {
        // Index `tag` of the ring's buffer table (libublk made it sparse,
        // one entry per tag); no fallback flag: a failed registration
        // fails the request rather than handing it over unregistered.
        let reg = libublk::sys::ublk_auto_buf_reg {
            index: tag,
            ..Default::default()
        };
        q.submit_io_prep_cmd(tag, BufDesc::AutoReg(reg), 0, None)
            .await?;
        loop {
            let res = handle(q, tag, ctx, Data::Fixed(tag), max).await;
            q.submit_io_commit_cmd(tag, BufDesc::AutoReg(reg), res)
                .await?;
        }
    }
    let mut buf = IoBuf::<u8>::new(max);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = handle(q, tag, ctx, Data::Buf(buf.as_mut_slice()), max).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Serves one request of at most `max` bytes; returns bytes done or a
/// negative errno. Nothing here blocks the queue thread: misses and syncs
/// are waited for in the ring.
async fn handle(q: &UblkQueue<'_>, tag: u16, ctx: &QueueCtx, data: Data<'_>, max: usize) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let engine = &ctx.engine;
    // FLUSH carries no range (its start sector is u64::MAX): handle it first.
    if op == libublk::sys::UBLK_IO_OP_FLUSH {
        return flush(ctx).await;
    }
    let offset = iod.start_sector << 9;
    let len = (iod.nr_sectors << 9) as usize;
    match op {
        libublk::sys::UBLK_IO_OP_READ | libublk::sys::UBLK_IO_OP_WRITE => {
            let write = op == libublk::sys::UBLK_IO_OP_WRITE;
            if len > max {
                return -libc::EINVAL;
            }
            if let Err(res) = wait_needed(ctx, offset, len, write).await {
                return res;
            }
            // A write is marked before its data goes in (a new generation,
            // fencing off a fetch that completes meanwhile) and ended
            // after, failed or not (until then no sync or publish vouches
            // for the chunk's content, and the readers of a chunk written
            // whole wait).
            if write && let Err(e) = engine.begin_write(offset, len) {
                return fail("write", offset, len, &e);
            }
            let res = image_io(write, offset, len, data, ctx.direct).await;
            if write && let Err(e) = engine.end_write(offset, len) {
                return fail("write", offset, len, &e);
            }
            res
        }
        libublk::sys::UBLK_IO_OP_DISCARD | libublk::sys::UBLK_IO_OP_WRITE_ZEROES => {
            // Chunks covered in part keep the rest of their data: they are
            // fetched first, waiting in the ring like a write's.
            if let Err(res) = wait_needed(ctx, offset, len, true).await {
                return res;
            }
            match engine.discard(offset, len as u64) {
                Ok(()) => 0,
                Err(e) => fail("discard", offset, len, &e),
            }
        }
        _ => -libc::EINVAL,
    }
}

/// Waits (in the ring) for every chunk an I/O needs cached first.
async fn wait_needed(ctx: &QueueCtx, offset: u64, len: usize, write: bool) -> Result<(), i32> {
    let need = match ctx.engine.prepare_io(offset, len, write) {
        Ok(n) => n,
        Err(e) => return Err(fail("prepare", offset, len, &e)),
    };
    if need.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + ctx.engine.miss_timeout();
    for c in need {
        wait_cached(ctx, c, deadline).await?;
    }
    Ok(())
}

/// FLUSH: syncs the image, then the map and the trace, through the ring,
/// merged with the other flushes of this queue. A failed sync fails this
/// and every later flush of the session.
async fn flush(ctx: &QueueCtx) -> i32 {
    let f = &ctx.flusher;
    let need = f.started.get() + 1;
    while f.done.get() < need {
        if f.running.get() {
            let seen = f.finished.generation.get();
            f.finished.after(seen).await;
            continue;
        }
        f.running.set(true);
        f.started.set(f.started.get() + 1);
        let n = f.started.get();
        sync_files(ctx).await;
        f.running.set(false);
        f.done.set(n);
        f.finished.bump();
    }
    match ctx.engine.check_synced() {
        Ok(()) => 0,
        Err(e) => fail("flush", 0, 0, &e),
    }
}

async fn sync_files(ctx: &QueueCtx) {
    if ctx.engine.check_synced().is_err() {
        return;
    }
    let [_, state, trace] = ctx.engine.sync_files();
    // Dirty entries that must not reach the map before their data is
    // durable: taken now, written once the image's sync has ended.
    let settling = ctx.engine.settling();
    let image_sqe = opcode::Fsync::new(types::Fixed(BUFFERED_FILE))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .flags(squeue::Flags::FIXED_FILE);
    let r = submit(image_sqe).await;
    // A failure is remembered by the engine: this and every later flush fail.
    if ctx.engine.note_sync_result(r).is_err() {
        return;
    }
    if let Err(e) = ctx.engine.settle(&settling) {
        eprintln!("isr: writing the cache map failed: {e}");
        let _ = ctx.engine.note_sync_result(-libc::EIO);
        return;
    }
    for f in [state, trace] {
        let sqe = opcode::Fsync::new(types::Fd(f.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        let r = submit(sqe).await;
        if r < 0 {
            let e = std::io::Error::from_raw_os_error(-r);
            eprintln!("isr: syncing the cache map or trace failed: {e}");
            let _ = ctx.engine.note_sync_result(r);
            return;
        }
    }
}

async fn submit(sqe: squeue::Entry) -> i32 {
    ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
        .await
        .unwrap_or(-libc::EIO)
}

fn fail(op: &str, offset: u64, len: usize, e: &fetcher::Error) -> i32 {
    eprintln!("isr: ublk {op} of {len} bytes at offset {offset} failed: {e}");
    crate::errno(e)
}

/// Waits (asleep in the ring) until chunk `c` is cached, or fails the
/// request at its own `deadline`.
async fn wait_cached(ctx: &QueueCtx, c: u64, deadline: Instant) -> Result<(), i32> {
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
            None if Instant::now() >= deadline => {
                eprintln!(
                    "isr: ublk request waiting for chunk {c} timed out after {} s waiting for the store",
                    ctx.engine.miss_timeout().as_secs()
                );
                return Err(-libc::EIO);
            }
            None => {
                ctx.timer.arm_by(deadline);
                ctx.wakeups.after(seen).await
            }
        }
    }
}

/// Reads or writes `len` bytes of the cache image at `offset` through the
/// queue's ring (the image holds disk byte x at offset x, so one request is
/// one op, or more after a short transfer). When the cache works direct
/// (`direct`: the alignment its I/O needs), what is aligned goes through
/// the `O_DIRECT` descriptor (fixed file 2), the rest (a disk's last
/// partial block, or pages the file system refuses: EINVAL) through the
/// page cache (fixed file 1).
async fn image_io(
    write: bool,
    offset: u64,
    len: usize,
    mut data: Data<'_>,
    mut direct: Option<usize>,
) -> i32 {
    let mut done = 0usize;
    while done < len {
        let at = offset + done as u64;
        let mut n = len - done;
        let mem_aligned = |a: usize| match &data {
            Data::Buf(buf) => (buf[done..].as_ptr() as usize).is_multiple_of(a),
            // The request's own pages: the kernel checks them (EINVAL).
            Data::Fixed(_) => true,
        };
        let fixed = match direct {
            Some(a) if at.is_multiple_of(a as u64) && n >= a && mem_aligned(a) => {
                n &= !(a - 1);
                DIRECT_FILE
            }
            _ => BUFFERED_FILE,
        };
        let file = types::Fixed(fixed);
        let n32 = n as u32;
        let sqe = match &mut data {
            Data::Buf(buf) => {
                let ptr = buf[done..done + n].as_mut_ptr();
                if write {
                    opcode::Write::new(file, ptr, n32).offset(at).build()
                } else {
                    opcode::Read::new(file, ptr, n32).offset(at).build()
                }
            }
            // A buffer the kernel registered is addressed from 0: the
            // address is the offset into the request's data.
            Data::Fixed(index) => {
                let ptr = std::ptr::without_provenance_mut(done);
                if write {
                    opcode::WriteFixed::new(file, ptr, n32, *index)
                        .offset(at)
                        .build()
                } else {
                    opcode::ReadFixed::new(file, ptr, n32, *index)
                        .offset(at)
                        .build()
                }
            }
        };
        let r = ublk_submit_sqe_async(
            sqe.flags(squeue::Flags::FIXED_FILE),
            UblkUringData::Target as u64,
        )
        .await
        .unwrap_or(-libc::EIO);
        if r == -libc::EINVAL && fixed == DIRECT_FILE {
            // Memory the file system will not take directly: the rest of
            // this request goes through the page cache.
            direct = None;
            continue;
        }
        if r <= 0 {
            return if r == 0 { -libc::EIO } else { r };
        }
        done += r as usize;
    }
    done as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buf_dropped_while_pending_stays_alive() {
        let buf = RingBuf::new();
        let weak = Rc::downgrade(&buf.mem);
        buf.pending.set(true);
        drop(buf);
        let mem = weak
            .upgrade()
            .expect("a buffer the ring may still write into was freed");
        // SAFETY: `mem` is alive (just upgraded) and nothing else reads or
        // writes it; this stands for the kernel completing the read late.
        unsafe { *mem.get() = [1; 8] };
    }

    #[test]
    fn ring_buf_not_pending_is_freed() {
        let buf = RingBuf::new();
        let weak = Rc::downgrade(&buf.mem);
        buf.pending.set(true);
        buf.pending.set(false);
        drop(buf);
        assert!(weak.upgrade().is_none(), "an idle buffer was leaked");
    }

    /// The shutdown case in a real ring: the read future is dropped with
    /// its SQE in the ring, then the eventfd is written and the kernel
    /// completes the read into the buffer, which must still be allocated.
    #[test]
    fn ring_read_completing_after_its_future_was_dropped_lands_in_live_memory() {
        libublk::io::ublk_init_task_ring(|cell| {
            if cell.get().is_none() {
                let ring = io_uring::IoUring::new(8)?;
                let _ = cell.set(std::cell::RefCell::new(ring));
            }
            Ok(())
        })
        .expect("io_uring");
        // SAFETY: eventfd takes no pointers; a negative return is an error.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just returned by eventfd and is owned by no one
        // else.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };

        let buf = RingBuf::new();
        let weak = Rc::downgrade(&buf.mem);
        let mut read = Box::pin(async move { buf.read(fd).await });
        let mut cx = Context::from_waker(Waker::noop());
        assert!(read.as_mut().poll(&mut cx).is_pending());
        drop(read);
        libublk::io::with_task_io_ring_mut(|r| r.submit()).expect("submit");
        let mem = weak
            .upgrade()
            .expect("the buffer of a read still in the ring was freed");

        let value = 0x0102_0304_0506_0708u64;
        // SAFETY: `value` lives across the call, which reads 8 bytes of it.
        let n = unsafe { libc::write(efd.as_raw_fd(), (&raw const value).cast(), 8) };
        assert_eq!(n, 8);
        let res = libublk::io::with_task_io_ring_mut(|r| {
            r.submit_and_wait(1).expect("wait");
            r.completion().next().map(|cqe| cqe.result())
        });
        assert_eq!(res, Some(8));
        // SAFETY: `mem` is alive and the read that wrote it completed.
        assert_eq!(unsafe { *mem.get() }, value.to_ne_bytes());
    }
}
