//! `isr run`: resumes a parcel and starts its VM in QEMU on the device,
//! restoring the version's memory image when it has one (else a cold boot).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use format::SaveFormat;
use serde_json::{Value, json};

use crate::args::{DeviceArgs, ParcelArgs, explain, open_parcel};
use crate::daemon::{self, ask};
use crate::output;
use crate::vm;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Boot afresh even if the version has a memory image.
    #[arg(long)]
    pub cold: bool,
    /// Guest RAM in MiB (default: the version's recorded setting, else 1024).
    #[arg(long)]
    pub memory_mib: Option<u32>,
    /// Virtual CPUs (default: the version's recorded setting, else 1).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// The QEMU binary.
    #[arg(long, env = "ISR_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Keep the VM's RAM in QEMU (anonymous memory), saved whole as a
    /// migration stream at suspend and loaded whole at the next run,
    /// instead of on a RAM device of the parcel (fetched as the VM touches
    /// it; a suspend sends what changed). Versions saved this way restore
    /// this way.
    #[arg(long)]
    pub stream_memory: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// QEMU's further arguments (the machine, devices; default: the
    /// version's recorded ones, else `-machine pc`); isr adds the disk,
    /// memory, CPUs, a QMP socket, and (unless given) the accelerator, no
    /// display and the serial console to a file.
    #[arg(last = true, value_name = "QEMU-ARGS")]
    pub qemu_args: Vec<String>,
}

impl RunArgs {
    /// The VM's settings this run asks for.
    fn wanted(&self) -> vm::Wanted {
        vm::Wanted {
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            qemu_args: self.qemu_args.clone(),
        }
    }
}

/// `isr run`.
pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let name = a.parcel.parcel.clone();
    let qemu = vm::find_qemu(&a.qemu)?;
    vm::check_none_running(&name)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let parcel = open_parcel(&a.parcel)?;
    // The version to run: the device's, if resumed already, else HEAD
    // (which the daemon about to start resumes).
    let running = ask(&name, "status")
        .ok()
        .filter(|s| s.get("error").is_none());
    let wanted = match &running {
        Some(s) => s["base_version"].as_u64().unwrap_or(0),
        None => rt
            .block_on(parcel.require_head())
            .map_err(|e| explain(e, &a.parcel))?,
    };
    let manifest = rt
        .block_on(parcel.manifest(wanted))
        .map_err(|e| explain(e, &a.parcel))?;
    let restore = (manifest.memory_size > 0 && !a.cold).then_some(wanted);
    let settings = vm::choose_settings(&a.wanted(), manifest.vm.as_ref(), restore)?;
    // The RAM on a device of the parcel: for a version saved so, and for a
    // cold boot unless the stream path is asked for. A version saved as a
    // stream restores as one.
    let lazy = match restore {
        Some(_) => settings.save_format == SaveFormat::SharedRam,
        None => !a.stream_memory,
    };

    // The device (and the RAM's): resumed now, or already.
    let status = match running {
        Some(s) => s,
        None => {
            let reply = daemon::start(&daemon::Options {
                parcel: a.parcel.clone(),
                device: a.device.clone(),
                ram_mib: lazy.then_some(settings.memory_mib),
                ram_zero: lazy && restore.is_none(),
                report_ready: false,
            })?;
            if reply.get("error").is_some() {
                return Err(output::ReplyError::of(&reply, false).into());
            }
            ask(&name, "status")?
        }
    };
    let device = status["device"]
        .as_str()
        .context("the daemon reports no device")?
        .to_owned();
    let version = status["base_version"].as_u64().unwrap_or(0);
    if version != wanted {
        bail!(
            "parcel {name} moved on to version {version} while its device came up (version {wanted} was read); run again"
        );
    }
    let ram_device = match (lazy, status["ram"]["device"].as_str()) {
        (false, _) => None,
        (true, Some(dev))
            if status["ram"]["size"].as_u64() == Some(u64::from(settings.memory_mib) << 20) =>
        {
            Some(dev.to_owned())
        }
        (true, _) if restore.is_some() => bail!(
            "version {version} of parcel {name} keeps the VM's RAM on a RAM device of {} MiB, but parcel {name} was resumed without one ({}): suspend it and run again",
            settings.memory_mib,
            if status["ram"].is_null() {
                "isr resume without --ram-mib".to_owned()
            } else {
                format!("its RAM device has {} bytes", status["ram"]["size"])
            }
        ),
        (true, _) => {
            output::note(format_args!(
                "isr: parcel {name} was resumed without a RAM device of {} MiB: the VM's RAM stays in QEMU and is saved whole at suspend",
                settings.memory_mib
            ));
            None
        }
    };
    let device_secs = started.elapsed().as_secs_f64();

    let dirty = status["dirty_chunks"].as_u64().unwrap_or(0);
    let ram_dirty = status["ram"]["dirty_chunks"].as_u64().unwrap_or(0);
    if restore.is_some() && (dirty > 0 || (ram_device.is_some() && ram_dirty > 0)) {
        bail!(
            "the {} of parcel {name} changed since version {version} was resumed ({} chunks written on {}); restoring that version's memory image over it would corrupt the guest: pass --cold to boot afresh, or suspend and resume first",
            if dirty > 0 { "disk" } else { "RAM" },
            if dirty > 0 { dirty } else { ram_dirty },
            if dirty > 0 {
                device.as_str()
            } else {
                ram_device.as_deref().unwrap_or("?")
            }
        );
    }
    let memory = match restore {
        Some(v) => rt
            .block_on(vm::fetch_memory_of(
                &parcel,
                v,
                &manifest,
                &vm::memory_file(&name),
                a.json,
            ))
            .map_err(|e| explain(e, &a.parcel))?,
        None => Value::Null,
    };
    drop(rt);
    let memory_secs = started.elapsed().as_secs_f64() - device_secs;

    let vm = vm::boot(&vm::Boot {
        parcel: &name,
        qemu: &qemu,
        device: &device,
        ram_device: ram_device.as_deref(),
        settings: &settings,
        restore,
    })?;
    let total_secs = started.elapsed().as_secs_f64();
    let after = ask(&name, "status").unwrap_or_default();
    let reply = json!({
        "parcel": name,
        "device": device,
        "version": version,
        "vm_pid": vm.pid,
        "qmp": vm.qmp,
        "console": vm.console,
        "restored": restore.is_some(),
        "memory": memory,
        "ram_device": ram_device,
        "ram_fetched_bytes": after["ram"]["fetched_bytes"],
        "disk_fetched_bytes": after["fetched_bytes"],
        "seconds_device": device_secs,
        "seconds_memory": memory_secs,
        "seconds_total": total_secs,
    });
    if a.json {
        output::line(&reply)?;
    } else {
        output::line(format_args!(
            "parcel {name} version {version} running on {device}: QEMU pid {}, QMP {}, console {}\n{} in {total_secs:.1} s (device {device_secs:.1} s, memory image {memory_secs:.1} s); {} bytes of disk fetched so far",
            vm.pid,
            vm.qmp.display(),
            vm.console.display(),
            if restore.is_some() {
                format!("restored from version {version}'s memory image")
            } else if manifest.memory_size > 0 {
                "booted afresh (--cold)".into()
            } else {
                format!("version {version} has no memory image: booted afresh")
            },
            after["fetched_bytes"],
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn wanted(argv: &[&str]) -> crate::vm::Wanted {
        let mut all = vec!["isr", "run", "--store", "file:///s", "--parcel", "p"];
        all.extend(["--key-file", "k"]);
        all.extend(argv);
        match Cli::parse_from(all).command {
            Command::Run(a) => a.wanted(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_flags_and_qemu_arguments_are_what_the_run_asks_for() {
        let w = wanted(&["--cpus", "2", "--memory-mib", "128", "--", "-M", "q35"]);
        assert_eq!((w.cpus, w.memory_mib), (Some(2), Some(128)));
        assert_eq!(w.qemu_args, ["-M", "q35"]);
        let w = wanted(&[]);
        assert_eq!((w.cpus, w.memory_mib), (None, None));
        assert!(w.qemu_args.is_empty());
    }
}
