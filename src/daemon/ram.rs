//! The guest's RAM as a second device of the daemon (`isr resume
//! --ram-mib`): its engine, and the device that serves it.

use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use fetcher::{Engine, EngineOptions};

/// Opens the engine of the guest's RAM (`options.ram`); `zero`: a cold
/// boot, the RAM starts as zeros.
pub(super) fn open_ram(
    parcel: fetcher::Parcel,
    options: EngineOptions,
    zero: bool,
) -> Result<Engine, fetcher::Error> {
    let size = options.ram.unwrap_or(0);
    let ram = Engine::open(parcel, options)?;
    if zero {
        // Whole chunks become zero holes, dirty: nothing is fetched, and a
        // suspend sends what the VM wrote.
        ram.discard(0, size)?;
    }
    Ok(ram)
}

/// Serves the RAM's device on a thread of its own; returns once it is up
/// (its info in `up`), or with the error that kept it down.
pub(super) fn serve_ram(
    ram: Arc<Engine>,
    recover: Option<u32>,
    up: &Arc<OnceLock<ublk_target::DeviceInfo>>,
) -> anyhow::Result<std::thread::JoinHandle<Result<(), ublk_target::Error>>> {
    let (tx, rx) = mpsc::channel();
    let options = ublk_target::DeviceOptions {
        recover,
        ..Default::default()
    };
    let (up2, tx2) = (up.clone(), tx.clone());
    let served = std::thread::spawn(move || {
        let r = ublk_target::serve(ram, &options, move |info| {
            no_readahead(&info.path);
            let _ = up2.set(info);
            let _ = tx2.send(());
        });
        let _ = tx.send(());
        r
    });
    let _ = rx.recv();
    if up.get().is_none() {
        let e = match served.join() {
            Ok(Err(e)) => anyhow::Error::from(e),
            _ => anyhow::anyhow!("the RAM device stopped before it was up"),
        };
        return Err(e.context("cannot serve the guest's RAM as a device"));
    }
    Ok(served)
}

/// Sets the kernel's readahead of block device `dev` to nothing. For the
/// RAM device: a guest page fault then reads its page alone from the
/// device, and isr fetches the chunk that holds it (whose other pages are
/// local from then on); readahead around each fault would pull chunks the
/// guest may never touch (on a loop device, 100 scattered page reads
/// pulled 15.6 MiB at the default readahead, 400 KiB without).
fn no_readahead(dev: &str) {
    let name = dev.trim_start_matches("/dev/");
    let knob = format!("/sys/block/{name}/queue/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, "0") {
        eprintln!(
            "isr: cannot turn off the readahead of {dev} ({knob}: {e}); each RAM fault may fetch more than it needs"
        );
    }
}
