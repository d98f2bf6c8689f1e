//! Command-line syntax: the commands `isr` has (each one's arguments live
//! beside it in `crate::commands`), and running the one given.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands::check::CheckArgs;
use crate::commands::checkin::CheckinArgs;
use crate::commands::discard::DiscardArgs;
use crate::commands::export::ExportArgs;
use crate::commands::fork::ForkArgs;
use crate::commands::gc::GcArgs;
use crate::commands::hoard::HoardArgs;
use crate::commands::import::ImportArgs;
use crate::commands::keygen::KeygenArgs;
use crate::commands::log::LogArgs;
use crate::commands::ls::LsArgs;
use crate::commands::recover::RecoverArgs;
use crate::commands::resume::ResumeArgs;
use crate::commands::rollback::RollbackArgs;
use crate::commands::run::RunArgs;
use crate::commands::status::StatusArgs;
use crate::commands::suspend::SuspendArgs;
use crate::commands::sync::SyncArgs;
use crate::commands::verify::VerifyArgs;
use crate::commands::*;

/// Internet Suspend/Resume for virtual-machine disks.
#[derive(Debug, Parser)]
#[command(name = "isr", version, about, after_help = crate::output::EXIT_STATUS_HELP)]
pub struct Cli {
    /// No progress bars and no informational notes on stderr: only
    /// warnings and errors (results still go to stdout).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new secret key file (32 random bytes, mode 0600).
    Keygen(KeygenArgs),
    /// Import a disk image (raw; qcow2, vmdk, vhdx via qemu-img; a regular
    /// file or a block device) as the next version of a parcel.
    Import(ImportArgs),
    /// Write a version of a parcel's disk to a new file (sparse), or with
    /// --force over an existing file or a block device.
    Export(ExportArgs),
    /// Check that every chunk of a version exists and decodes.
    Verify(VerifyArgs),
    /// List a parcel's versions.
    Log(LogArgs),
    /// Fetch every chunk of a parcel into the local cache (to work offline).
    Hoard(HoardArgs),
    /// Verify a parcel's local cache against its manifest (every cached
    /// chunk re-hashed, the map and the image's size checked); damaged
    /// chunks are dropped, to be fetched again. Exits 1 if it found damage.
    Check(CheckArgs),
    /// Publish a parcel's local cache (its base version and local changes)
    /// as version 1 of a new parcel, and move the cache to it: keeps the
    /// work of a session that was fenced (its lease was stolen) or is in
    /// conflict.
    Fork(ForkArgs),
    /// Present a parcel's disk as a block device (/dev/ublkbN) on this host.
    Resume(ResumeArgs),
    /// Resume a parcel and start its VM in QEMU on the device, restoring the
    /// version's memory image when it has one (else a cold boot).
    Run(RunArgs),
    /// Drain, flush, publish the new version, release the parcel and remove
    /// its block device. A VM started by `isr run` is stopped, its memory
    /// saved and published with the disk, and QEMU quit first.
    Suspend(SuspendArgs),
    /// Upload a resumed parcel's dirty chunks while its device keeps
    /// serving, without publishing a version: the next suspend then uploads
    /// only what changed since.
    Sync(SyncArgs),
    /// Publish the work of a parcel suspended with `--offline` (or whose
    /// suspend could not reach the store): its local changes become the
    /// next version, and its lease is released.
    Checkin(CheckinArgs),
    /// Show a resumed parcel's device, cache, rates, lease and VM; without
    /// a name, every parcel resumed on this host.
    Status(StatusArgs),
    /// Reattach a resumed parcel's device after its daemon died.
    Recover(RecoverArgs),
    /// List every parcel of a store: HEAD, versions, disk size, memory
    /// image, and who holds its lease (sizes and memory images need the key).
    Ls(LsArgs),
    /// Publish an older version's content (disk, memory image, settings)
    /// as the parcel's next version.
    Rollback(RollbackArgs),
    /// Drop this host's unpublished changes to a parcel: its cache goes
    /// back to the version it is based on, and the lease it holds is
    /// released.
    Discard(DiscardArgs),
    /// Remove each parcel's versions older than its last N, and every chunk
    /// that no kept version names (see the README for the safety rules).
    Gc(GcArgs),
}

impl Command {
    /// Whether the command was asked for JSON output (`--json`).
    pub fn json(&self) -> bool {
        match self {
            Command::Keygen(a) => a.json,
            Command::Import(a) => a.json,
            Command::Export(a) => a.json,
            Command::Verify(a) => a.json,
            Command::Log(a) => a.json,
            Command::Hoard(a) | Command::Check(a) => a.json,
            Command::Fork(a) => a.cache.json,
            Command::Resume(a) => a.json,
            Command::Run(a) => a.json,
            Command::Suspend(a) => a.json,
            Command::Sync(a) => a.json,
            Command::Checkin(a) => a.json,
            Command::Status(a) => a.json,
            Command::Recover(a) => a.json,
            Command::Ls(a) => a.json,
            Command::Rollback(a) => a.json,
            Command::Discard(a) => a.json,
            Command::Gc(a) => a.json,
        }
    }

    /// Runs the command. The device commands run their own runtimes (the
    /// engine's, the daemon's, QEMU's): they stay out of the CLI's.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let ok = |()| ExitCode::SUCCESS;
        match self {
            Command::Keygen(a) => keygen::keygen(a).map(ok),
            Command::Resume(a) => resume::resume(a),
            Command::Run(a) => run::run(a),
            Command::Suspend(a) => suspend::suspend(a),
            Command::Status(a) => status::status(a),
            Command::Recover(a) => recover::recover(a),
            Command::Sync(a) => sync::sync(a),
            Command::Checkin(a) => checkin::checkin(a),
            Command::Import(a) => on_runtime(async { import::import(a).await.map(ok) }),
            Command::Export(a) => on_runtime(async { export::export(a).await.map(ok) }),
            Command::Verify(a) => on_runtime(verify::verify(a)),
            Command::Log(a) => on_runtime(log::log(a)),
            Command::Hoard(a) => on_runtime(async { hoard::hoard(a).await.map(ok) }),
            Command::Check(a) => on_runtime(check::check(a)),
            Command::Fork(a) => on_runtime(fork::fork(a)),
            Command::Ls(a) => on_runtime(ls::ls(a)),
            Command::Rollback(a) => on_runtime(async { rollback::rollback(a).await.map(ok) }),
            Command::Discard(a) => on_runtime(discard::discard(a)),
            Command::Gc(a) => on_runtime(async { gc::gc(a).await.map(ok) }),
        }
    }
}

/// Runs a command on a multi-threaded async runtime.
fn on_runtime(
    command: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
