//! `isr`: Internet Suspend/Resume for virtual-machine disks — the command line.
//!
//! This package owns the CLI and the lifecycle; the formats live in
//! `format`, stores, the cache and the chunk engine in `fetcher`, the block
//! device in `ublk-target`. Its modules, top to bottom (each uses only
//! those below it; `scripts/check-layers` checks):
//!
//! ```text
//! main, cli      the command line: which command, and running it
//! commands/      one file per command, with its arguments
//! daemon/        the daemon that serves a device, its control protocol
//! session, vm/   a daemon's lease and offline work; the VM, QEMU and QMP
//! args, run_dir, interrupt   where a parcel is and opening it; the run
//!                directory; a command's SIGINT/SIGTERM
//! output/, image, logging, time   stdout/stderr, exit status, progress bars;
//!                raw images; the daemon's log; dates
//! ```

mod args;
mod cli;
mod commands;
mod daemon;
mod image;
mod interrupt;
mod logging;
mod output;
mod run_dir;
mod session;
mod time;
mod vm;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return output::usage(&e, std::env::args().any(|a| a == "--json")),
    };
    let json = cli.command.json();
    output::set_quiet(cli.quiet);
    logging::init(matches!(&cli.command, cli::Command::Resume(a) if a.foreground));
    cli.command.run().unwrap_or_else(|e| output::fail(&e, json))
}
