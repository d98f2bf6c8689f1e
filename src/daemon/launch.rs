//! Starting the daemon: `isr resume` (and `isr run`) spawn `isr resume
//! --foreground --daemon` in its own session and read its one line.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use anyhow::{Context, bail};
use serde_json::Value;

use super::client::ask;
use crate::args::{DeviceArgs, ParcelArgs};
use crate::run_dir::{in_own_session, run_dir};

/// What a daemon serves and how: built by `isr resume`, `isr run` and
/// `isr recover` (and, in the daemon, from its own command line).
#[derive(Debug, Clone)]
pub struct Options {
    pub parcel: ParcelArgs,
    pub device: DeviceArgs,
    /// The guest's RAM as a second device, of this many MiB.
    pub ram_mib: Option<u32>,
    /// The RAM device starts as zeros (a cold boot).
    pub ram_zero: bool,
    /// Report readiness (or the error) as one JSON line on stdout, for the
    /// process that launched the daemon.
    pub report_ready: bool,
}

/// Starts the daemon that serves `a`'s parcel; its reply (the device, or an
/// error in an `error` field).
pub fn start(a: &Options) -> anyhow::Result<Value> {
    ublk_target::check_ublk()?;
    if let Ok(reply) = ask(&a.parcel.parcel, "status") {
        bail!(
            "parcel {} is already resumed on this host as {}",
            a.parcel.parcel,
            reply["device"].as_str().unwrap_or("?")
        );
    }
    fetcher::local::private::create_dir_all(&run_dir())
        .with_context(|| format!("cannot create {}", run_dir().display()))?;
    let log_path = run_dir().join(format!("{}.log", a.parcel.parcel));
    let log = fetcher::local::private::append(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(daemon_args(a))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    in_own_session(&mut cmd);
    let mut child = cmd.spawn().context("cannot start the isr daemon")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .context("reading the daemon's answer")?;
    let Ok(reply) = serde_json::from_str::<Value>(&line) else {
        let status = child.wait()?;
        bail!(
            "the isr daemon exited ({status}) before the device was up; see {}",
            log_path.display()
        );
    };
    Ok(reply)
}

/// The command line of the daemon that serves `a`.
fn daemon_args(a: &Options) -> Vec<std::ffi::OsString> {
    let p = &a.parcel;
    let mut args: Vec<std::ffi::OsString> = vec![
        "resume".into(),
        "--store".into(),
        p.store.clone().into(),
        "--parcel".into(),
        p.parcel.clone().into(),
        "--key-file".into(),
        p.key_file.clone().into(),
        "--retry-timeout".into(),
        p.retry_timeout.to_string().into(),
        "--miss-timeout".into(),
        a.device.miss_timeout.to_string().into(),
        "--foreground".into(),
        "--daemon".into(),
    ];
    if let Some(e) = &p.endpoint {
        args.extend(["--endpoint".into(), e.into()]);
    }
    if let Some(d) = &a.device.cache_dir {
        args.extend(["--cache-dir".into(), d.clone().into()]);
    }
    if a.device.steal {
        args.push("--steal".into());
    }
    if a.device.no_prefetch {
        args.push("--no-prefetch".into());
    }
    if a.device.offline {
        args.push("--offline".into());
    }
    if let Some(t) = a.device.trickle {
        args.extend(["--trickle".into(), t.to_string().into()]);
    }
    if let Some(r) = a.device.bwlimit {
        args.extend(["--bwlimit".into(), r.to_string().into()]);
    }
    if let Some(m) = a.device.cache_io {
        args.extend(["--cache-io".into(), m.name().into()]);
    }
    if let Some(m) = a.ram_mib {
        args.extend(["--ram-mib".into(), m.to_string().into()]);
    }
    if a.ram_zero {
        args.push("--ram-zero".into());
    }
    args
}
