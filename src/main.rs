//! `isr`: Internet Suspend/Resume for virtual-machine disks — the command line.
//!
//! This package owns the CLI and the lifecycle; the formats live in
//! `format`, stores and transfers in `fetcher`.

mod cli;
mod commands;
mod daemon;
mod image;
mod progress;
mod time;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The device commands run their own runtimes (the engine's, the
    // daemon's): keep them out of the CLI's.
    let direct = match cli.command {
        cli::Command::Resume(a) => Some(daemon::resume(a)),
        cli::Command::Suspend(a) => Some(daemon::suspend(a)),
        cli::Command::Status(a) => Some(daemon::status(a)),
        cli::Command::Recover(a) => Some(daemon::recover(a)),
        command => {
            return run_async(cli::Cli { command });
        }
    };
    match direct.expect("set above") {
        Ok(code) => code,
        Err(e) => {
            eprintln!("isr: {}", commands::describe(&e));
            ExitCode::FAILURE
        }
    }
}

fn run_async(cli: cli::Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("isr: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("isr: {}", commands::describe(&e));
            ExitCode::FAILURE
        }
    }
}
