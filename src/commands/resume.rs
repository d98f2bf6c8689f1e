//! `isr resume`: presents a parcel's disk as a block device
//! (`/dev/ublkbN`) on this host, served by a daemon it starts (or, with
//! `--foreground`, is).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use crate::args::{DeviceArgs, ParcelArgs};
use crate::daemon::{self, answer};
use crate::output;

#[derive(Debug, Args)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Stay attached (serve the device from this process) instead of
    /// returning once the device is up.
    #[arg(long)]
    pub foreground: bool,
    /// Also fetch the version's memory image (every chunk verified) into
    /// this file before returning, for a hypervisor to restore; a version
    /// without one is reported and no file is written.
    #[arg(long, value_name = "FILE")]
    pub memory_out: Option<PathBuf>,
    /// Also serve the guest's RAM, of this many MiB, as a second device:
    /// the version's RAM image, fetched as it is read (zeros where the
    /// version has none), for a hypervisor to map as the VM's memory; a
    /// suspend publishes what the VM changed in it (`isr run` does this).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..))]
    pub ram_mib: Option<u32>,
    /// (internal) the RAM device starts as zeros (a cold boot).
    #[arg(long, hide = true)]
    pub ram_zero: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// (internal) report readiness on stdout for the launching process.
    #[arg(long, hide = true)]
    pub daemon: bool,
}

impl ResumeArgs {
    /// What the daemon serves.
    fn options(&self) -> daemon::Options {
        daemon::Options {
            parcel: self.parcel.clone(),
            device: self.device.clone(),
            ram_mib: self.ram_mib,
            ram_zero: self.ram_zero,
            report_ready: self.daemon,
        }
    }
}

/// `isr resume`: starts the daemon and reports its device, or (with
/// `--foreground`) is the daemon.
pub fn resume(a: ResumeArgs) -> anyhow::Result<ExitCode> {
    if a.foreground {
        return daemon::serve(a.options());
    }
    let mut reply = daemon::start(&a.options())?;
    if let (Some(out), None) = (&a.memory_out, reply.get("error")) {
        let version = reply["base_version"].as_u64().unwrap_or(0);
        reply["memory"] = crate::vm::fetch_memory(&a.parcel, version, out, a.json)?;
    }
    if !a.json
        && let Some(why) = reply.get("offline").and_then(Value::as_str)
    {
        output::warn(format_args!(
            "parcel {} works offline: {why}; reads of chunks not cached wait for the store, and the daemon reconnects by itself",
            a.parcel.parcel
        ));
    }
    if !a.json
        && let Some(m) = reply.get("memory")
    {
        // stdout keeps only the device, for `dev=$(isr resume …)`.
        output::note(crate::vm::memory_text(
            m,
            reply["base_version"].as_u64().unwrap_or(0),
        ));
    }
    answer(reply, a.json, |r| {
        r["device"].as_str().unwrap_or("?").to_owned()
    })
}
