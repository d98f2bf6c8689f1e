//! The VM itself: QEMU started on the parcel's device (restoring the
//! version's memory image when it has one) for `isr run`, saved through QMP
//! for `isr suspend` before the disk is published, and its record in the
//! run directory.
//!
//! ```text
//! isr run ── resume (daemon, /dev/ublkbN) ── fetch memory image ── QEMU -incoming defer
//!                                                                   │ QMP: migrate-incoming,
//!                                                                   │      wait, cont
//! <run>/NAME.vm.json: QEMU's pid, QMP socket, console, settings ◄───┘
//! isr suspend ── QMP: stop, migrate to <run>/NAME.save, wait, quit ── daemon publishes
//!                disk delta + memory image + settings as one version
//! ```
//!
//! Only the VM's virtual hardware is recorded in a version (memory, CPUs,
//! QEMU's further arguments, the machine type resolved to its versioned
//! name); host-specific arguments (the device, sockets, accelerator,
//! display, console file) are added on each host.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fetcher::Image;
use fetcher::Parcel;
use fetcher::ops::{ExportOptions, export_image};
use format::{Manifest, SaveFormat, VmSettings};
use serde_json::{Value, json};

use crate::args::{ParcelArgs, explain, open_parcel};
use crate::output::{self, mib};
use crate::run_dir::{in_own_session, pid_alive, run_dir};

mod qmp;
mod settings;

use qmp::Qmp;
pub use settings::{Wanted, choose_settings, saved_from_json};
use settings::{has_option, settings_from_json, settings_to_json};

/// How long QEMU may take to open its QMP socket.
const QMP_START: Duration = Duration::from_secs(30);
/// Longest a save or a restore of the memory image may take.
const MIGRATION_LIMIT: Duration = Duration::from_secs(3600);
/// How long QEMU may take to exit after `quit`.
const QUIT_WAIT: Duration = Duration::from_secs(30);

fn record_path(parcel: &str) -> PathBuf {
    run_dir().join(format!("{parcel}.vm.json"))
}

fn read_record(parcel: &str) -> Option<Value> {
    let text = std::fs::read_to_string(record_path(parcel)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_record(parcel: &str, record: &Value) -> anyhow::Result<()> {
    let path = record_path(parcel);
    fetcher::local::private::write(&path, record.to_string())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Forgets the VM of `parcel` after a successful suspend (its record and
/// saved state file).
pub fn forget(parcel: &str) {
    if let Some(r) = read_record(parcel)
        && let Some(saved) = r["saved"].as_str()
    {
        let _ = std::fs::remove_file(saved);
    }
    let _ = std::fs::remove_file(record_path(parcel));
}

/// `isr status`'s view of the VM: none, running or paused (with pid, QMP
/// socket, console), or exited.
pub fn describe(parcel: &str) -> Value {
    let Some(r) = read_record(parcel) else {
        return Value::Null;
    };
    let pid = r["pid"].as_i64().unwrap_or(0);
    let mut v = json!({
        "pid": pid,
        "qmp": r["qmp"],
        "console": r["console"],
        "log": r["log"],
        "restored_from": r["restored_from"],
    });
    v["state"] = if !pid_alive(pid) {
        json!(if r["saved"].is_string() {
            "saved"
        } else {
            "exited"
        })
    } else {
        let socket = PathBuf::from(r["qmp"].as_str().unwrap_or_default());
        let state =
            Qmp::connect(&socket, "QEMU", Duration::from_secs(2), || true).and_then(|mut q| {
                q.set_timeout(Duration::from_secs(2))?;
                q.execute("query-status", None)
            });
        match state {
            Ok(s) => s["status"].clone(),
            Err(_) => json!("unknown (QMP busy)"),
        }
    };
    v
}

pub fn describe_text(v: &Value) -> String {
    if v.is_null() {
        return "none started by isr".into();
    }
    match v["state"].as_str() {
        Some("exited") => format!(
            "QEMU pid {} exited (its memory is lost; suspend publishes the disk alone); log {}",
            v["pid"],
            v["log"].as_str().unwrap_or("?")
        ),
        Some("saved") => "saved, waiting for the suspend to publish it".into(),
        Some(state) => format!(
            "{state}, QEMU pid {}, QMP {}, console {}",
            v["pid"],
            v["qmp"].as_str().unwrap_or("?"),
            v["console"].as_str().unwrap_or("?")
        ),
        None => "unknown".into(),
    }
}

/// Fetches version `version`'s memory image of parcel `p` into `out`
/// (verified, in parallel, with a progress bar); `null` when the version
/// has none.
pub fn fetch_memory(p: &ParcelArgs, version: u64, out: &Path, json: bool) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let parcel = open_parcel(p)?;
    rt.block_on(async {
        let manifest = parcel.manifest(version).await?;
        fetch_memory_of(&parcel, version, &manifest, out, json).await
    })
    .map_err(|e| explain(e, p))
}

/// [`fetch_memory`] of `manifest`, the manifest of version `version`.
pub async fn fetch_memory_of(
    parcel: &Parcel,
    version: u64,
    manifest: &Manifest,
    out: &Path,
    json: bool,
) -> Result<Value, fetcher::Error> {
    if manifest.memory_size == 0 {
        return Ok(Value::Null);
    }
    let (bar, progress) = output::progress::bytes_bar(manifest.memory_size, "memory", json);
    let s = export_image(
        parcel,
        version,
        manifest,
        Image::Memory,
        out,
        &ExportOptions { force: true },
        progress,
    )
    .await?;
    bar.finish_and_clear();
    Ok(json!({
        "file": out,
        "size": manifest.memory_size,
        "fetched_chunks": s.fetched_chunks,
        "fetched_bytes": s.bytes_fetched,
        "seconds": s.seconds,
    }))
}

pub fn memory_text(m: &Value, version: u64) -> String {
    if m.is_null() {
        return format!("version {version} has no memory image (a cold boot)");
    }
    format!(
        "memory image of version {version}: {:.1} MiB in {} ({:.1} s)",
        mib(m["size"].as_u64().unwrap_or(0)),
        m["file"].as_str().unwrap_or("?"),
        m["seconds"].as_f64().unwrap_or(0.0)
    )
}

/// Finds the QEMU binary (a name on PATH, or a path).
pub fn find_qemu(qemu: &Path) -> anyhow::Result<PathBuf> {
    let found = if qemu.components().count() > 1 {
        qemu.is_file().then(|| qemu.to_owned())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(qemu))
                .find(|p| p.is_file())
        })
    };
    found.with_context(|| {
        format!(
            "QEMU ({}) is not installed on this host: install it (Debian: apt-get install qemu-system-x86) or pass --qemu PATH; the device itself works without it (isr resume)",
            qemu.display()
        )
    })
}

/// The last lines of QEMU's log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return format!("(nothing in {})", log.display());
    }
    format!(
        "QEMU said: {} (log {})",
        lines.into_iter().rev().collect::<Vec<_>>().join(" | "),
        log.display()
    )
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// Refuses to start a second VM for `parcel`: one runs already, or a
/// suspend saved one and did not finish publishing it.
pub fn check_none_running(parcel: &str) -> anyhow::Result<()> {
    if let Some(r) = read_record(parcel)
        && pid_alive(r["pid"].as_i64().unwrap_or(0))
    {
        bail!(
            "the VM of parcel {parcel} is running already (QEMU pid {}, QMP {})",
            r["pid"],
            r["qmp"].as_str().unwrap_or("?")
        );
    }
    if read_record(parcel).is_some_and(|r| r["saved"].is_string()) {
        bail!(
            "the VM of parcel {parcel} was saved by a suspend that did not finish; run `isr suspend {parcel}` again to publish it"
        );
    }
    Ok(())
}

/// Where `isr run` fetches the memory image it restores from.
pub fn memory_file(parcel: &str) -> PathBuf {
    run_dir().join(format!("{parcel}.memory"))
}

/// What to boot: the VM of `parcel` on `device` (and its RAM on
/// `ram_device`), with `settings`.
pub struct Boot<'a> {
    pub parcel: &'a str,
    pub qemu: &'a Path,
    pub device: &'a str,
    pub ram_device: Option<&'a str>,
    pub settings: &'a VmSettings,
    /// The version whose memory image, fetched to [`memory_file`], is
    /// restored; `None`: a cold boot.
    pub restore: Option<u64>,
}

/// Starts QEMU (detached) on the devices, restores the memory image or
/// records the machine type QEMU resolved, lets the VM run and writes its
/// record (what `isr status` and `isr suspend` find). The memory file is
/// removed either way; a QEMU that fails is killed, the device left
/// resumed.
pub fn boot(b: &Boot) -> anyhow::Result<Started> {
    let memory_file = memory_file(b.parcel);
    let vm = start_qemu(
        b.parcel,
        b.qemu,
        b.device,
        b.ram_device,
        b.settings,
        b.restore.is_some(),
    )?;
    let restored = (|| {
        let alive = || pid_alive(vm.pid);
        let mut qmp = Qmp::connect(&vm.qmp, &vm.who(), QMP_START, alive)?;
        let mut settings = b.settings.clone();
        match b.restore {
            Some(_) => restore_memory(&mut qmp, &settings, &memory_file, alive)?,
            None => {
                resolve_machine(&mut qmp, &mut settings)?;
                if b.ram_device.is_some() {
                    settings.save_format = SaveFormat::SharedRam;
                }
            }
        }
        Ok::<_, anyhow::Error>(settings)
    })();
    let _ = std::fs::remove_file(&memory_file);
    let settings = match restored {
        Ok(s) => s,
        Err(e) => {
            // SAFETY: kill sends a signal to the QEMU we started; no memory.
            unsafe { libc::kill(vm.pid as libc::pid_t, libc::SIGKILL) };
            let _ = std::fs::remove_file(record_path(b.parcel));
            return Err(e.context(format!(
                "{}; the device {} stays resumed (isr run again, or isr suspend {})",
                log_tail(&vm.log),
                b.device,
                b.parcel
            )));
        }
    };
    let record = json!({
        "pid": vm.pid,
        "qmp": vm.qmp,
        "console": vm.console,
        "log": vm.log,
        "settings": settings_to_json(&settings),
        "restored_from": b.restore,
        "ram_device": b.ram_device,
    });
    write_record(b.parcel, &record)?;
    Ok(vm)
}

/// A QEMU that `isr run` started.
pub struct Started {
    pub pid: i64,
    pub qmp: PathBuf,
    pub console: PathBuf,
    pub log: PathBuf,
}

impl Started {
    fn who(&self) -> String {
        format!("QEMU (pid {})", self.pid)
    }
}

/// Starts QEMU on `device`, detached (its own session; output to a log),
/// paused for an incoming migration when `incoming`.
fn start_qemu(
    name: &str,
    qemu: &Path,
    device: &str,
    ram_device: Option<&str>,
    s: &VmSettings,
    incoming: bool,
) -> anyhow::Result<Started> {
    let dir = run_dir();
    let (qmp, console, log) = (
        dir.join(format!("{name}.qmp")),
        dir.join(format!("{name}.console")),
        dir.join(format!("{name}.qemu.log")),
    );
    let _ = std::fs::remove_file(&qmp);
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("isr-{name}"),
        "-m".into(),
        s.memory_mib.to_string(),
        "-smp".into(),
        s.cpus.to_string(),
    ];
    args.extend(s.args.iter().cloned());
    if let Some(ram) = ram_device {
        // The RAM is the parcel's RAM device, mapped shared: the guest's
        // page faults read it (through isr), its writes go back to it.
        args.extend([
            "-object".into(),
            format!(
                "memory-backend-file,id=isr-ram,size={}M,mem-path={ram},share=on",
                s.memory_mib
            ),
            "-machine".into(),
            "memory-backend=isr-ram".into(),
        ]);
    }
    args.extend([
        "-drive".into(),
        format!("file={device},format=raw,if=virtio,cache=none,aio=io_uring"),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    // The accelerator is the host's business, not the VM's: KVM when this
    // host offers it (QEMU falls back to the next -accel), else TCG.
    if !has_option(&s.args, &["-accel", "-enable-kvm"])
        && !s.args.iter().any(|a| a.contains("accel="))
    {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if kvm {
            args.extend(["-accel".into(), "kvm".into()]);
        }
        args.extend(["-accel".into(), "tcg".into()]);
    }
    if !has_option(&s.args, &["-display", "-nographic", "-vnc", "-spice"]) {
        args.extend(["-display".into(), "none".into()]);
    }
    if !has_option(&s.args, &["-serial", "-nographic", "-chardev"]) {
        args.extend(["-serial".into(), format!("file:{}", console.display())]);
    }
    if incoming {
        args.extend(["-incoming".into(), "defer".into()]);
    }
    let log_file = fetcher::local::private::append(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut cmd = std::process::Command::new(qemu);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    in_own_session(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", qemu.display()))?;
    Ok(Started {
        pid: child.id() as i64,
        qmp,
        console,
        log,
    })
}

/// Loads the memory image into a QEMU started with `-incoming defer`, then
/// lets the VM run.
fn restore_memory(
    qmp: &mut Qmp,
    s: &VmSettings,
    file: &Path,
    alive: impl Fn() -> bool + Copy,
) -> anyhow::Result<()> {
    let uri = match s.save_format {
        SaveFormat::Stream => format!("exec:cat {}", shell_quote(file)),
        SaveFormat::SharedRam => {
            set_ignore_shared(qmp)?;
            format!("exec:cat {}", shell_quote(file))
        }
        SaveFormat::MappedRam => {
            set_mapped_ram(qmp)?;
            format!("file:{}", file.display())
        }
    };
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    qmp.wait_for_migration(MIGRATION_LIMIT, alive)?;
    // `cont` during "inmigrate" would be ignored: wait until the load has
    // ended (paused, as the VM was when saved).
    let state = qmp.wait_for_state("loaded", Duration::from_secs(60), |s| {
        !matches!(s, "inmigrate" | "prelaunch" | "restore-vm")
    })?;
    if state != "running" {
        qmp.execute("cont", None)?;
    }
    qmp.wait_for_state("running", Duration::from_secs(30), |s| s == "running")
        .map(drop)
}

fn set_mapped_ram(qmp: &mut Qmp) -> anyhow::Result<()> {
    set_capability(
        qmp,
        "mapped-ram",
        "the memory image uses QEMU's mapped-ram layout, which this QEMU lacks",
    )
}

/// The RAM is a shared mapping of the parcel's RAM device: the migration
/// stream carries the device state only (set on both sides).
fn set_ignore_shared(qmp: &mut Qmp) -> anyhow::Result<()> {
    set_capability(
        qmp,
        "x-ignore-shared",
        "the VM's RAM is served from a device, which needs QEMU's x-ignore-shared (QEMU 4.0 or later)",
    )
}

/// Turns on migration capability `name`; `lacking` says what its absence
/// means.
fn set_capability(qmp: &mut Qmp, name: &str, lacking: &'static str) -> anyhow::Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": name, "state": true}]})),
    )
    .context(lacking)?;
    Ok(())
}

/// Records the machine type by its versioned name (`pc` →
/// `pc-i440fx-7.2`), so the next host builds the same hardware, and the
/// save format this QEMU offers (mapped-ram from QEMU 9 on).
fn resolve_machine(qmp: &mut Qmp, s: &mut VmSettings) -> anyhow::Result<()> {
    let machines = qmp.execute("query-machines", None)?;
    if let Some(i) = s.args.iter().position(|a| a == "-machine" || a == "-M")
        && let Some(spec) = s.args.get(i + 1).cloned()
    {
        let (ty, rest) = spec.split_once(',').unwrap_or((&spec, ""));
        let ty = ty.strip_prefix("type=").unwrap_or(ty);
        if let Some(m) = machines
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["alias"].as_str() == Some(ty))
            && let Some(full) = m["name"].as_str()
        {
            s.args[i + 1] = if rest.is_empty() {
                full.to_owned()
            } else {
                format!("{full},{rest}")
            };
        }
    }
    let caps = qmp.execute("query-migrate-capabilities", None)?;
    let mapped = caps
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["capability"] == "mapped-ram");
    s.save_format = if mapped {
        SaveFormat::MappedRam
    } else {
        SaveFormat::Stream
    };
    Ok(())
}

/// `isr suspend`'s first half for a VM that `isr run` started: stops it,
/// saves its memory and devices to a file under the run directory, and
/// quits QEMU. Returns what the daemon publishes with the disk
/// (`{"memory": FILE, "vm": SETTINGS}`; `{}` with no VM). A QEMU that
/// exited is reported and its disk published alone; a save that fails lets
/// the VM run on and fails the suspend (nothing is lost).
pub fn save(parcel: &str) -> anyhow::Result<Value> {
    let Some(mut r) = read_record(parcel) else {
        return Ok(json!({}));
    };
    let settings = settings_from_json(&r["settings"])?;
    if let Some(saved) = r["saved"].as_str()
        && Path::new(saved).is_file()
    {
        // A suspend that saved the VM and then failed: publish that state.
        write_back_ram(&r)?;
        return Ok(json!({ "memory": saved, "vm": settings_to_json(&settings) }));
    }
    let pid = r["pid"].as_i64().unwrap_or(0);
    let who = format!("QEMU (pid {pid}) of parcel {parcel}");
    if !pid_alive(pid) {
        output::warn(format_args!(
            "{who} is not running (it exited or crashed): its memory is lost; publishing the disk alone, and the next run boots afresh. {}",
            log_tail(Path::new(r["log"].as_str().unwrap_or_default()))
        ));
        return Ok(json!({ "vm": settings_to_json(&settings) }));
    }
    let alive = || pid_alive(pid);
    let socket = PathBuf::from(r["qmp"].as_str().unwrap_or_default());
    let mut qmp = Qmp::connect(&socket, &who, Duration::from_secs(10), alive)?;
    let file = run_dir().join(format!("{parcel}.save"));
    let _ = std::fs::remove_file(&file);
    let started = Instant::now();
    let status = qmp.execute("query-status", None)?;
    let was_running = status["status"] == "running";
    qmp.execute("stop", None)?;
    let saving = (|| {
        let uri = match settings.save_format {
            SaveFormat::Stream => format!("exec:cat > {}", shell_quote(&file)),
            SaveFormat::SharedRam => {
                set_ignore_shared(&mut qmp)?;
                format!("exec:cat > {}", shell_quote(&file))
            }
            SaveFormat::MappedRam => {
                set_mapped_ram(&mut qmp)?;
                format!("file:{}", file.display())
            }
        };
        qmp.execute("migrate", Some(json!({ "uri": uri })))?;
        qmp.wait_for_migration(MIGRATION_LIMIT, alive)
    })();
    if let Err(e) = saving {
        if alive() && was_running {
            let _ = qmp.execute("cont", None);
        }
        let _ = std::fs::remove_file(&file);
        return Err(e.context(format!(
            "saving the VM of parcel {parcel} failed; nothing was published{}",
            if alive() { " and the VM runs on" } else { "" }
        )));
    }
    let saved_secs = started.elapsed().as_secs_f64();
    // The state is on disk: from here on a failed suspend publishes it.
    r["saved"] = json!(file);
    write_record(parcel, &r)?;
    let _ = qmp.execute("quit", None);
    let deadline = Instant::now() + QUIT_WAIT;
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive() {
        output::warn(format_args!(
            "{who} did not exit within {} s of quit; killing it (its state is saved)",
            QUIT_WAIT.as_secs()
        ));
        // SAFETY: kill sends a signal to the QEMU we started; no memory.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        while alive() && started.elapsed() < QUIT_WAIT * 2 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    write_back_ram(&r)?;
    output::note(format_args!(
        "isr: saved the VM of parcel {parcel} ({:.1} MiB) in {saved_secs:.1} s",
        mib(std::fs::metadata(&file).map_or(0, |m| m.len()))
    ));
    Ok(json!({ "memory": file, "vm": settings_to_json(&settings) }))
}

/// After QEMU has exited: the guest's RAM pages it left in the page cache
/// of the RAM device (the record's `ram_device`) go to the device, whose
/// daemon then marks them dirty, before the suspend publishes.
fn write_back_ram(record: &Value) -> anyhow::Result<()> {
    let Some(dev) = record["ram_device"].as_str() else {
        return Ok(());
    };
    std::fs::File::open(dev)
        .and_then(|f| f.sync_all())
        .with_context(|| {
            format!("cannot write the VM's RAM back to its device {dev}; the VM's state is saved: run the suspend again")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_qemu_is_named() {
        let err = find_qemu(Path::new("no-such-qemu-here"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-qemu-here") && err.contains("not installed"),
            "{err}"
        );
        assert!(find_qemu(Path::new("/bin/sh")).is_ok());
    }
}
