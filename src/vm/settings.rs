//! The VM's settings: how they are chosen for a run, and their JSON form
//! (in the VM record and in the suspend request to the daemon).

use std::path::PathBuf;

use anyhow::{Context, bail};
use fetcher::SavedVm;
use format::{SaveFormat, VmSettings};
use serde_json::{Value, json};

/// Guest RAM of a VM with no recorded settings, in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 1024;

pub fn settings_to_json(s: &VmSettings) -> Value {
    json!({
        "memory_mib": s.memory_mib,
        "cpus": s.cpus,
        "save_format": match s.save_format {
            SaveFormat::Stream => "stream",
            SaveFormat::MappedRam => "mapped-ram",
            SaveFormat::SharedRam => "shared-ram",
        },
        "args": s.args,
    })
}

pub fn settings_from_json(v: &Value) -> anyhow::Result<VmSettings> {
    let num = |k: &str| {
        v[k].as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("VM settings lack {k}"))
    };
    Ok(VmSettings {
        memory_mib: num("memory_mib")?,
        cpus: num("cpus")?,
        save_format: match v["save_format"].as_str() {
            Some("mapped-ram") => SaveFormat::MappedRam,
            Some("shared-ram") => SaveFormat::SharedRam,
            _ => SaveFormat::Stream,
        },
        args: v["args"]
            .as_array()
            .context("VM settings lack args")?
            .iter()
            .map(|a| {
                a.as_str()
                    .map(str::to_owned)
                    .context("a VM argument is not text")
            })
            .collect::<anyhow::Result<_>>()?,
    })
}

/// The daemon's side of `suspend JSON`: what to publish with the disk.
pub fn saved_from_json(text: &str) -> anyhow::Result<SavedVm> {
    if text.trim().is_empty() {
        return Ok(SavedVm::default());
    }
    let v: Value = serde_json::from_str(text).context("a malformed suspend request")?;
    Ok(SavedVm {
        memory: v["memory"].as_str().map(PathBuf::from),
        vm: match v.get("vm").filter(|s| !s.is_null()) {
            Some(s) => Some(settings_from_json(s)?),
            None => None,
        },
        ram: None,
    })
}

/// Whether `args` set option `names` (`-name` or `-name=…`).
pub fn has_option(args: &[String], names: &[&str]) -> bool {
    args.iter().any(|a| {
        let key = a.split('=').next().unwrap_or(a);
        let key = key
            .strip_prefix("--")
            .map_or(key.to_owned(), |k| format!("-{k}"));
        names.contains(&key.as_str())
    })
}

/// What a run asks for (`isr run`'s flags and QEMU arguments); `None`
/// and no arguments: the version's recorded settings.
#[derive(Debug, Default)]
pub struct Wanted {
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
    pub qemu_args: Vec<String>,
}

/// The settings a run uses: flags, else the version's recorded ones, else
/// defaults. Restoring a memory image needs the hardware it was saved on.
pub fn choose_settings(
    a: &Wanted,
    recorded: Option<&VmSettings>,
    restore: Option<u64>,
) -> anyhow::Result<VmSettings> {
    let base = recorded.cloned().unwrap_or(VmSettings {
        memory_mib: DEFAULT_MEMORY_MIB,
        cpus: 1,
        save_format: SaveFormat::Stream,
        args: Vec::new(),
    });
    let mut s = VmSettings {
        memory_mib: a.memory_mib.unwrap_or(base.memory_mib),
        cpus: a.cpus.unwrap_or(base.cpus),
        save_format: base.save_format,
        args: if a.qemu_args.is_empty() {
            base.args
        } else {
            a.qemu_args.clone()
        },
    };
    if !has_option(&s.args, &["-machine", "-M"]) {
        s.args
            .splice(0..0, ["-machine".to_owned(), "pc".to_owned()]);
    }
    if let Some(version) = restore
        && let Some(rec) = recorded
    {
        // The same command on every host: what isr resolved itself (the
        // machine type's versioned name) is no difference.
        let differs = if s.memory_mib != rec.memory_mib {
            Some(format!(
                "{} MiB of memory here, {} MiB there",
                s.memory_mib, rec.memory_mib
            ))
        } else if s.cpus != rec.cpus {
            Some(format!("{} CPUs here, {} there", s.cpus, rec.cpus))
        } else {
            args_difference(&s.args, &rec.args)
        };
        if let Some(what) = differs {
            bail!(
                "version {version}'s memory image was saved from a VM with {} MiB, {} CPUs and QEMU arguments {:?}, which this run's settings do not match ({what}): QEMU cannot restore it on other hardware (leave the difference out, or pass --cold to boot afresh)",
                rec.memory_mib,
                rec.cpus,
                rec.args,
            );
        }
        s.args = rec.args.clone();
    }
    if s.memory_mib == 0 || s.cpus == 0 {
        bail!("a VM needs at least 1 MiB of memory and 1 CPU");
    }
    Ok(s)
}

/// The first argument in which `here` (this run's QEMU arguments) differs
/// from `saved` (a saved VM's), said for the user; a machine type given
/// by its alias (`pc`, `q35`, `virt`) matches the versioned name QEMU
/// resolved it to on the saving host (`pc-i440fx-7.2`, `pc-q35-8.2`,
/// `virt-9.0`).
fn args_difference(here: &[String], saved: &[String]) -> Option<String> {
    let machine_at = |args: &[String], i: usize| {
        i > 0 && matches!(args[i - 1].as_str(), "-machine" | "-M" | "--machine")
    };
    for i in 0..here.len().max(saved.len()) {
        let (h, s) = (here.get(i), saved.get(i));
        let same = match (h, s) {
            (Some(h), Some(s)) if machine_at(here, i) && machine_at(saved, i) => same_machine(h, s),
            (Some(h), Some(s)) => spelled(h) == spelled(s),
            _ => false,
        };
        if !same {
            let show = |a: Option<&String>| a.map_or("nothing".to_owned(), |a| format!("`{a}`"));
            return Some(format!(
                "argument {}: {} here, {} there",
                i + 1,
                show(h),
                show(s)
            ));
        }
    }
    None
}

/// An option as QEMU reads it: `--opt` is `-opt`, `-M` is `-machine`.
fn spelled(arg: &str) -> &str {
    match arg.strip_prefix('-').filter(|a| a.starts_with('-')) {
        _ if arg == "-M" => "-machine",
        Some(single) => single,
        None => arg,
    }
}

/// Whether machine spec `here` (`TYPE[,props]`) names the machine `saved`
/// was resolved to.
fn same_machine(here: &str, saved: &str) -> bool {
    let split = |m: &str| -> (String, String) {
        let (ty, rest) = m.split_once(',').unwrap_or((m, ""));
        (ty.trim_start_matches("type=").to_owned(), rest.to_owned())
    };
    let ((h, hrest), (s, srest)) = (split(here), split(saved));
    let versioned = match h.as_str() {
        "pc" => s.starts_with("pc-i440fx-"),
        "q35" => s.starts_with("pc-q35-"),
        alias => s.starts_with(&format!("{alias}-")),
    };
    hrest == srest && (h == s || versioned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// What `isr run` asks for with flags `extra` (`--cpus N`,
    /// `--memory-mib N`, then `--` and QEMU's arguments).
    fn run_args(extra: &[&str]) -> Wanted {
        let mut w = Wanted::default();
        let mut it = extra.iter();
        while let Some(&flag) = it.next() {
            let mut n = || it.next().and_then(|v| v.parse().ok());
            match flag {
                "--cpus" => w.cpus = n(),
                "--memory-mib" => w.memory_mib = n(),
                "--" => w.qemu_args = it.by_ref().map(|s| s.to_string()).collect(),
                _ => panic!("unknown flag {flag}"),
            }
        }
        w
    }

    #[test]
    fn options_are_found_in_either_spelling() {
        let args: Vec<String> = ["-M", "q35", "--display=none", "-serial", "stdio"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(has_option(&args, &["-machine", "-M"]));
        assert!(has_option(&args, &["-display"]));
        assert!(has_option(&args, &["-serial"]));
        assert!(!has_option(&args, &["-accel"]));
        assert!(!has_option(&args, &["-m"]), "values are not options");
    }

    #[test]
    fn settings_come_from_flags_then_the_version_then_defaults() {
        let s = choose_settings(&run_args(&[]), None, None).unwrap();
        assert_eq!((s.memory_mib, s.cpus), (DEFAULT_MEMORY_MIB, 1));
        assert_eq!(s.args, ["-machine", "pc"]);

        let recorded = VmSettings {
            memory_mib: 128,
            cpus: 2,
            save_format: SaveFormat::Stream,
            args: vec!["-machine".into(), "pc-i440fx-7.2".into()],
        };
        let s = choose_settings(&run_args(&[]), Some(&recorded), Some(3)).unwrap();
        assert_eq!(s, recorded, "a restore rebuilds the recorded hardware");
        let s = choose_settings(
            &run_args(&["--cpus", "4", "--", "-M", "q35"]),
            Some(&recorded),
            None,
        )
        .unwrap();
        assert_eq!((s.memory_mib, s.cpus), (128, 4));
        assert_eq!(s.args, ["-M", "q35"]);

        let err = choose_settings(
            &run_args(&["--memory-mib", "256"]),
            Some(&recorded),
            Some(3),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("version 3's memory image") && err.contains("--cold"),
            "{err}"
        );
        assert!(
            err.contains("256 MiB of memory here, 128 MiB there"),
            "{err}"
        );
    }

    #[test]
    fn the_command_that_saved_a_vm_restores_it_on_another_host() {
        // Saved by `isr run -- -nographic -device virtio-rng-pci`: isr put
        // `-machine pc` first, and QEMU resolved it.
        let recorded = VmSettings {
            memory_mib: 128,
            cpus: 1,
            save_format: SaveFormat::Stream,
            args: [
                "-machine",
                "pc-i440fx-7.2",
                "-nographic",
                "-device",
                "virtio-rng-pci",
            ]
            .map(String::from)
            .to_vec(),
        };
        let same = ["--", "-nographic", "-device", "virtio-rng-pci"];
        let s = choose_settings(&run_args(&same), Some(&recorded), Some(3)).unwrap();
        assert_eq!(s, recorded, "restored as saved");
        let pc = ["--", "-M", "pc", "-nographic", "-device", "virtio-rng-pci"];
        let s = choose_settings(&run_args(&pc), Some(&recorded), Some(3)).unwrap();
        assert_eq!(s, recorded);
        // A real difference is refused, and named.
        let q35 = ["--", "-M", "q35", "-nographic", "-device", "virtio-rng-pci"];
        let err = choose_settings(&run_args(&q35), Some(&recorded), Some(3))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("argument 2: `q35` here, `pc-i440fx-7.2` there"),
            "{err}"
        );
        let other = ["--", "-nographic", "-device", "virtio-net-pci"];
        let err = choose_settings(&run_args(&other), Some(&recorded), Some(3))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("argument 5: `virtio-net-pci` here, `virtio-rng-pci` there"),
            "{err}"
        );
    }

    #[test]
    fn settings_and_suspend_requests_survive_json() {
        let s = VmSettings {
            memory_mib: 64,
            cpus: 1,
            save_format: SaveFormat::MappedRam,
            args: vec!["-device".into(), "virtio-rng-pci".into()],
        };
        assert_eq!(settings_from_json(&settings_to_json(&s)).unwrap(), s);
        let req = json!({ "memory": "/run/isr/p.save", "vm": settings_to_json(&s) });
        let saved = saved_from_json(&req.to_string()).unwrap();
        assert_eq!(saved.memory.as_deref(), Some(Path::new("/run/isr/p.save")));
        assert_eq!(saved.vm, Some(s));
        let none = saved_from_json("").unwrap();
        assert!(none.memory.is_none() && none.vm.is_none());
        assert!(saved_from_json("{not json").is_err());
    }
}
