//! The ublk block device that serves isr's chunk engine to the kernel.
//!
//! ```text
//!  kernel ──/dev/ublkbN──► ublk_drv ──uring_cmd──► queue thread (one per hw queue)
//!                                                   │ smol LocalExecutor, one task per tag
//!            cached chunk: io_uring read/write on the cache image (fixed file 1)
//!            missing chunk: engine.request(c, notifier) … the queue's eventfd,
//!                 read by a task inside the same ring, wakes the waiting tags
//!            flush: engine.flush()   discard / write-zeroes: engine.discard()
//! ```
//!
//! The device talks to no store: everything beyond the cache image goes
//! through [`fetcher::Engine`].

mod queue;

use std::sync::Arc;

use fetcher::Engine;
use libublk::UblkFlags;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;

/// Errors of the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no ublk driver.
    #[error(
        "this kernel has no ublk driver (/dev/ublk-control is missing): run `modprobe ublk_drv` (Linux 6.0 or newer, CONFIG_BLK_DEV_UBLK)"
    )]
    NoUblk,
    /// libublk failed.
    #[error("ublk {op}: {detail}")]
    Ublk { op: &'static str, detail: String },
}

fn ublk(op: &'static str) -> impl FnOnce(libublk::UblkError) -> Error {
    move |e| Error::Ublk {
        op,
        detail: e.to_string(),
    }
}

/// Fails with [`Error::NoUblk`] unless the ublk driver is loaded: its
/// control device exists (`/dev/ublk-control`, or `$ISR_UBLK_CONTROL`, which
/// lets a test check the message on any host).
pub fn check_ublk() -> Result<(), Error> {
    let control = std::env::var_os("ISR_UBLK_CONTROL")
        .map_or_else(|| "/dev/ublk-control".into(), std::path::PathBuf::from);
    if control.exists() {
        Ok(())
    } else {
        Err(Error::NoUblk)
    }
}

/// How the device is set up.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Hardware queues (default: min(cores, 4)).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest request, bytes.
    pub max_io_bytes: u32,
    /// Reattach to this existing device (after its daemon died) instead of
    /// adding a new one.
    pub recover: Option<u32>,
    /// Zero copy where the driver offers it (`UBLK_F_AUTO_BUF_REG`, Linux
    /// 6.16+): the cache image is read into, and written from, the
    /// request's own pages, registered in the queue's ring, instead of
    /// through a buffer of the daemon's that the driver copies.
    pub zero_copy: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        DeviceOptions {
            queues: cores.clamp(1, 4) as u16,
            depth: 128,
            max_io_bytes: 512 << 10,
            recover: None,
            zero_copy: true,
        }
    }
}

/// What a started device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// ublk device id (N of /dev/ublkbN).
    pub id: u32,
    /// The block device path.
    pub path: String,
    /// Features the kernel's driver reported.
    pub features: u64,
    /// Whether the device serves its data with zero copy.
    pub zero_copy: bool,
}

/// Stops device `id` from any thread (its queues drain and `serve` returns).
pub fn stop(id: u32) -> Result<(), Error> {
    UblkCtrl::new_simple(id as i32)
        .and_then(|c| c.kill_dev())
        .map(|_| ())
        .map_err(ublk("stop device"))
}

/// Serves `engine` as a ublk block device until the device is stopped;
/// `started` is called once it is live. Blocks the calling thread.
pub fn serve(
    engine: Arc<Engine>,
    options: &DeviceOptions,
    started: impl FnOnce(DeviceInfo) + Send + Sync + 'static,
) -> Result<(), Error> {
    check_ublk()?;
    let features = UblkCtrl::get_features().unwrap_or(0);
    // Reattach after a crash; reissue what was in flight rather than fail it.
    let mut ctrl_flags = libublk::sys::UBLK_F_USER_RECOVERY as u64;
    if features & libublk::sys::UBLK_F_USER_RECOVERY_REISSUE as u64 != 0 {
        ctrl_flags |= libublk::sys::UBLK_F_USER_RECOVERY_REISSUE as u64;
    }
    // Zero copy where the driver has it; a queue sees from the device's
    // flags which way it serves (so does a daemon that recovers it).
    let zc = (libublk::sys::UBLK_F_SUPPORT_ZERO_COPY | libublk::sys::UBLK_F_AUTO_BUF_REG) as u64;
    if options.zero_copy && features & zc == zc {
        ctrl_flags |= zc;
    }
    let (id, dev_flags) = match options.recover {
        Some(id) => {
            UblkCtrl::new_simple(id as i32)
                .and_then(|c| c.start_user_recover())
                .map_err(ublk("start recovery"))?;
            (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        }
        None => (-1, UblkFlags::UBLK_DEV_F_ADD_DEV),
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("isr")
        .id(id)
        .nr_queues(options.queues)
        .depth(options.depth)
        .io_buf_bytes(options.max_io_bytes)
        .ctrl_flags(ctrl_flags)
        .dev_flags(dev_flags)
        .build()
        .map_err(ublk("create device"))?;
    let size = engine.geometry().disk_size();
    let image_fd = std::os::fd::AsRawFd::as_raw_fd(engine.image_file());
    let direct_fd = engine
        .image_direct()
        .map(|(f, _)| std::os::fd::AsRawFd::as_raw_fd(f));
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        let p = &mut dev.tgt.params;
        p.basic.io_min_shift = 9;
        p.types |= libublk::sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = libublk::sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: u32::MAX >> 9,
            max_write_zeroes_sectors: u32::MAX >> 9,
            max_discard_segments: 1,
            ..Default::default()
        };
        // Fixed files 1 and 2 (0 is the ublk char device): the image
        // through the page cache, and opened with O_DIRECT (the buffered
        // one again when the cache works buffered).
        let tgt = &mut dev.tgt;
        debug_assert_eq!(tgt.nr_fds as u32, queue::BUFFERED_FILE);
        tgt.fds[tgt.nr_fds as usize] = image_fd;
        tgt.fds[tgt.nr_fds as usize + 1] = direct_fd.unwrap_or(image_fd);
        tgt.nr_fds += 2;
        Ok(())
    };
    let q_engine = engine.clone();
    let threads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let q_threads = threads.clone();
    let queue_fn = move |qid: u16, dev: &UblkDev| {
        // SAFETY: gettid takes no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        q_threads.lock().expect("queue thread list").push(tid);
        queue::run(qid, dev, q_engine.clone())
    };
    ctrl.run_target(tgt_init, queue_fn, move |c: &UblkCtrl| {
        // libublk pinned each queue thread to its queue's CPUs before the
        // device started; free them now.
        widen_affinity(&threads.lock().expect("queue thread list"));
        let info = c.dev_info();
        started(DeviceInfo {
            id: info.dev_id,
            path: c.get_bdev_path(),
            features,
            zero_copy: info.flags & libublk::sys::UBLK_F_AUTO_BUF_REG as u64 != 0,
        })
    })
    .map_err(ublk("run device"))?;
    Ok(())
}

/// Lets the queue threads run on every CPU this process may use.
///
/// libublk binds a queue's thread to the CPUs blk-mq maps to that queue,
/// which are those of the threads submitting to it: with one queue per CPU
/// (a guest or host with up to 4 CPUs, as isr has min(cores, 4) queues)
/// the submitter and the thread serving it then take turns on one CPU
/// while another idles. Free, the scheduler runs them side by side; in a
/// 2-vCPU guest that took fio's 4 KiB random reads at qd 32 from 14.7k
/// to 19.6k–22.5k IOPS. A failure leaves the binding as it was.
fn widen_affinity(threads: &[libc::pid_t]) {
    // SAFETY: cpu_set_t is plain data that may be zeroed; each call gets a
    // pointer to it and its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut set) != 0 {
            return;
        }
        for &tid in threads {
            libc::sched_setaffinity(tid, size, &set);
        }
    }
}

/// The negative errno that completes a block request failed by `e`.
pub fn errno(e: &fetcher::Error) -> i32 {
    use fetcher::Error as E;
    match e {
        E::Io { source, .. } => -source.raw_os_error().unwrap_or(libc::EIO),
        E::Invalid(_) => -libc::EINVAL,
        E::Shared(inner) => errno(inner),
        _ => -libc::EIO,
    }
}
