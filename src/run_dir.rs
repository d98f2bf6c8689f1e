//! The run directory (`/run/isr`, or `$ISR_RUN_DIR`) and the processes isr
//! leaves running on this host: each resumed parcel's daemon socket
//! (`NAME.sock`), its state (`NAME.json`, what `isr recover` needs), its log,
//! and the record of the VM `isr run` started (`NAME.vm.json`).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use serde_json::Value;

pub fn run_dir() -> PathBuf {
    std::env::var_os("ISR_RUN_DIR").map_or_else(|| "/run/isr".into(), PathBuf::from)
}

/// The control socket of parcel `parcel`'s daemon.
pub fn socket_path(parcel: &str) -> PathBuf {
    run_dir().join(format!("{parcel}.sock"))
}

/// The state file of parcel `parcel`'s daemon.
pub fn state_path(parcel: &str) -> PathBuf {
    run_dir().join(format!("{parcel}.json"))
}

/// What parcel `parcel`'s daemon recorded (its pid, store, device), if any.
pub fn read_state(parcel: &str) -> Option<Value> {
    let text = std::fs::read_to_string(state_path(parcel)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether process `pid` runs (a zombie, dead but not yet reaped, does not).
pub fn pid_alive(pid: i64) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    if pid <= 0 || unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        return false;
    }
    // "pid (comm) S ...": the state follows the last ')'.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

/// Makes `cmd`'s process leave our session and terminal when it starts, so
/// that it outlives this command (the daemon, a VM's QEMU).
pub fn in_own_session(cmd: &mut std::process::Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory; the child
    // runs it between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}
