//! `isr`: Internet Suspend/Resume for virtual-machine disks — the command line.
//!
//! This package owns the CLI and the lifecycle; the formats live in
//! `format`, stores, the cache and the chunk engine in `fetcher`, the block
//! device in `ublk-target`.

mod check;
mod cli;
mod commands;
mod daemon;
mod image;
mod logging;
mod output;
mod progress;
mod qmp;
mod session;
mod status;
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
    // The device commands run their own runtimes (the engine's, the
    // daemon's): keep them out of the CLI's.
    let result = match cli.command {
        cli::Command::Resume(a) => daemon::resume(a),
        cli::Command::Run(a) => vm::run(a),
        cli::Command::Suspend(a) => daemon::suspend(a),
        cli::Command::Status(a) => status::status(a),
        cli::Command::Recover(a) => daemon::recover(a),
        cli::Command::Sync(a) => session::sync(a),
        cli::Command::Checkin(a) => session::checkin(a),
        command => run_async(cli::Cli {
            command,
            quiet: cli.quiet,
        }),
    };
    result.unwrap_or_else(|e| output::fail(&e, json))
}

fn run_async(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(commands::run(cli))
}
