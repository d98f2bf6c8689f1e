//! What the commands write to stdout and stderr, and how a failure ends the
//! process: writes that return errors instead of panicking (a closed pipe,
//! a full disk), one JSON error object on stdout with `--json`, and the exit
//! status.
//!
//! Exit status: 0 success; 1 failure; 2 usage error (clap); 141 (like a
//! SIGPIPE death) when stdout was closed before everything was written,
//! e.g. `isr log | head -1`.

use std::fmt::Display;
use std::io::{ErrorKind, Write};
use std::process::ExitCode;

/// Exit status when stdout's reader went away (128 + SIGPIPE, as a shell
/// reports a process killed by SIGPIPE).
pub const BROKEN_PIPE: u8 = 141;

/// Text for `--help`: the exit statuses.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    success
  1    failure (verify: a bad chunk; log, ls: an unreadable version); with --json,
       stdout holds one JSON object with an \"error\" field
  2    usage error (bad arguments)
  141  stdout was closed before all output was written (a broken pipe)";

/// A write to stdout failed.
#[derive(Debug)]
pub struct StdoutError {
    source: std::io::Error,
}

impl Display for StdoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write to standard output: {}", self.source)
    }
}

impl std::error::Error for StdoutError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// An error whose JSON form the command already printed on stdout (e.g. a
/// daemon's reply): the exit path must not print a second object.
#[derive(Debug)]
pub struct JsonPrinted(pub String);

impl Display for JsonPrinted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsonPrinted {}

/// Writes `text` and a newline to stdout, flushed: a failure is an error,
/// not a panic.
pub fn line(text: impl Display) -> Result<(), StdoutError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|source| StdoutError { source })
}

/// Writes one line to stderr; a failure to do so is ignored (there is
/// nowhere left to report it).
pub fn note(text: impl Display) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
}

/// `isr: warning: …` on stderr.
pub fn warn(text: impl Display) {
    note(format_args!("isr: warning: {text}"));
}

/// Ends a failed command: the message on stderr, and with `json` one JSON
/// object `{"error": …}` on stdout (unless one is there already). A closed
/// stdout ends the process quietly with [`BROKEN_PIPE`].
pub fn fail(e: &anyhow::Error, json: bool) -> ExitCode {
    let stdout_error = e
        .chain()
        .find_map(|c| c.downcast_ref::<StdoutError>())
        .map(|s| s.source.kind());
    if stdout_error == Some(ErrorKind::BrokenPipe) {
        return ExitCode::from(BROKEN_PIPE);
    }
    let message = crate::commands::describe(e);
    note(format_args!("isr: {message}"));
    let printed = e.chain().any(|c| c.is::<JsonPrinted>());
    if json && !printed && stdout_error.is_none() {
        let _ = line(serde_json::json!({ "error": message }));
    }
    ExitCode::FAILURE
}
