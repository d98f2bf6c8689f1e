//! `isr`: Internet Suspend/Resume for virtual-machine disks — the command line.
//!
//! This package owns the CLI and the lifecycle; the formats live in
//! `format`, stores and transfers in `fetcher`.

mod cli;
mod commands;
mod image;
mod progress;
mod time;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
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
