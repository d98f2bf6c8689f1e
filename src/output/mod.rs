//! What the commands write to stdout and stderr, and how a failure ends the
//! process: writes that return errors instead of panicking (a closed pipe,
//! a full disk), one JSON error object on stdout with `--json`, and the exit
//! status.
//!
//! stderr carries three kinds of lines: informational notes ([`note`],
//! silenced by `--quiet`), warnings ([`warn`]) and errors ([`error`]),
//! which are always written.
//!
//! Exit status: 0 success; 1 failure; 2 usage error (clap); 3 the store is
//! unreachable; 4 a conflict (the parcel is leased elsewhere, this session
//! was fenced, another writer published first); 141 (like a SIGPIPE
//! death) when stdout was closed before everything was written, e.g.
//! `isr log | head -1`.

use std::fmt::Display;
use std::io::{ErrorKind, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use fetcher::ErrorClass;
use serde_json::{Value, json};

pub mod progress;

/// Exit status when stdout's reader went away (128 + SIGPIPE, as a shell
/// reports a process killed by SIGPIPE).
pub const BROKEN_PIPE: u8 = 141;
/// Exit status of a usage error (as clap uses).
pub const USAGE: u8 = 2;

/// Text for `--help`: the exit statuses.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    success
  1    failure (verify: a bad chunk; log, ls: an unreadable version); with --json,
       stdout holds one JSON object with \"error\" and \"kind\" fields
  2    usage error (bad arguments, a malformed store URL or endpoint)
  3    the store is unreachable (connections refused or timed out for the
       whole --retry-timeout)
  4    conflict: the parcel is leased by another host, this session was
       fenced or lost its lease, or another writer published first
  130  interrupted (SIGINT; 143: SIGTERM) after letting go of what it held:
       import and rollback publish nothing and release the parcel's lease
  141  stdout was closed before all output was written (a broken pipe)

Logging: RUST_LOG=isr=debug,fetcher=debug (tracing's filter syntax) writes
debug events to stderr (the daemon's: <run dir>/NAME.log); -q silences
notes and progress bars.";

/// What kind of failure ended a command: its exit status and the `kind`
/// field of its JSON error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anything not classified below (exit 1).
    Failure,
    /// Bad arguments (exit 2).
    Usage,
    /// The store could not be reached (exit 3).
    Unreachable,
    /// The parcel is someone else's now, or another writer won (exit 4).
    Conflict,
    /// Stopped by this signal (exit 128 + the signal).
    Interrupted(i32),
}

/// A command stopped by a signal (SIGINT, SIGTERM) once it had let go of
/// what it held; `what` says what it left behind.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub what: String,
}

impl Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.signal {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            _ => "a signal",
        };
        write!(f, "interrupted by {name}: {}", self.what)
    }
}

impl std::error::Error for Interrupted {}

impl Kind {
    /// The exit status.
    pub fn code(self) -> u8 {
        match self {
            Kind::Failure => 1,
            Kind::Usage => USAGE,
            Kind::Unreachable => 3,
            Kind::Conflict => 4,
            Kind::Interrupted(signal) => (128 + signal).clamp(0, 255) as u8,
        }
    }

    /// The name in JSON (`"kind"`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Failure => "failure",
            Kind::Usage => "usage",
            Kind::Unreachable => "unreachable",
            Kind::Conflict => "conflict",
            Kind::Interrupted(_) => "interrupted",
        }
    }

    /// The kind named `name` (from a daemon's reply); anything unknown is a
    /// plain failure.
    pub fn from_name(name: &str) -> Kind {
        match name {
            "usage" => Kind::Usage,
            "unreachable" => Kind::Unreachable,
            "conflict" => Kind::Conflict,
            "interrupted" => Kind::Interrupted(libc::SIGINT),
            _ => Kind::Failure,
        }
    }

    /// The kind of `e`: that of the first fetcher error in its chain (or of
    /// a daemon's reply it carries).
    pub fn of(e: &anyhow::Error) -> Kind {
        for cause in e.chain() {
            if let Some(r) = cause.downcast_ref::<ReplyError>() {
                return r.kind;
            }
            if let Some(i) = cause.downcast_ref::<Interrupted>() {
                return Kind::Interrupted(i.signal);
            }
            if let Some(f) = cause.downcast_ref::<fetcher::Error>() {
                return match f.class() {
                    ErrorClass::Unreachable => Kind::Unreachable,
                    ErrorClass::Conflict => Kind::Conflict,
                    ErrorClass::Usage => Kind::Usage,
                    ErrorClass::Other => Kind::Failure,
                };
            }
        }
        Kind::Failure
    }
}

/// Whether `--quiet` was given: notes and progress bars are not shown.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Sets `--quiet` for the process.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// One line for the user: the error and its causes, each said once.
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Bytes in MiB, for a message.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// The JSON form of a failure: `{"error": MESSAGE, "kind": KIND}` (what
/// `--json` prints, and what a daemon answers with).
pub fn error_json(e: &anyhow::Error) -> Value {
    json!({ "error": describe(e), "kind": Kind::of(e).name() })
}

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

/// An error a daemon answered with: its message and kind, and whether the
/// command printed the reply on stdout already (`--json`: then the exit
/// path must not print a second object).
#[derive(Debug)]
pub struct ReplyError {
    pub message: String,
    pub kind: Kind,
    pub printed: bool,
}

impl ReplyError {
    /// The error of daemon reply `reply` (`{"error": …, "kind": …}`).
    pub fn of(reply: &Value, printed: bool) -> ReplyError {
        ReplyError {
            message: reply["error"].as_str().unwrap_or("?").to_owned(),
            kind: Kind::from_name(reply["kind"].as_str().unwrap_or_default()),
            printed,
        }
    }
}

impl Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ReplyError {}

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
fn stderr_line(text: impl Display) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
}

/// An informational line on stderr (not with `--quiet`).
pub fn note(text: impl Display) {
    if !quiet() {
        stderr_line(text);
    }
}

/// `isr: warning: …` on stderr (also with `--quiet`).
pub fn warn(text: impl Display) {
    stderr_line(format_args!("isr: warning: {text}"));
}

/// An error line on stderr, as given (also with `--quiet`).
pub fn error(text: impl Display) {
    stderr_line(text);
}

/// Ends a failed command: the message on stderr, and with `json` one JSON
/// object `{"error": …, "kind": …}` on stdout (unless one is there
/// already); the exit status says the [`Kind`]. A closed stdout ends the
/// process quietly with [`BROKEN_PIPE`].
pub fn fail(e: &anyhow::Error, json: bool) -> ExitCode {
    let stdout_error = e
        .chain()
        .find_map(|c| c.downcast_ref::<StdoutError>())
        .map(|s| s.source.kind());
    if stdout_error == Some(ErrorKind::BrokenPipe) {
        return ExitCode::from(BROKEN_PIPE);
    }
    let message = describe(e);
    error(format_args!("isr: {message}"));
    let printed = e
        .chain()
        .any(|c| c.downcast_ref::<ReplyError>().is_some_and(|r| r.printed));
    if json && !printed && stdout_error.is_none() {
        let _ = line(error_json(e));
    }
    ExitCode::from(Kind::of(e).code())
}

/// Ends the process on a usage error (clap's), or prints help or the
/// version: with `json` (a `--json` among the arguments) also one JSON
/// error object on stdout.
pub fn usage(e: &clap::Error, json: bool) -> ExitCode {
    let _ = e.print();
    if e.exit_code() == 0 {
        return ExitCode::SUCCESS; // --help, --version
    }
    if json {
        let _ = line(json!({ "error": usage_message(&e.to_string()), "kind": Kind::Usage.name() }));
    }
    ExitCode::from(USAGE)
}

/// A clap error's message on one line: what precedes its usage lines (a
/// missing argument's name is on the lines after the first).
fn usage_message(text: &str) -> String {
    let body = text.split("\n\nUsage:").next().unwrap_or(text);
    let body = body
        .split("\n\nFor more information")
        .next()
        .unwrap_or(body);
    let words: Vec<&str> = body.split_whitespace().collect();
    let joined = words.join(" ");
    joined
        .trim_start_matches("error: ")
        .trim_end_matches(':')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_keep_what_is_missing() {
        let text = "error: the following required arguments were not provided:\n  --store <STORE>\n  --to <N>\n\nUsage: isr rollback --store <STORE> --to <N> <PARCEL>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_message(text),
            "the following required arguments were not provided: --store <STORE> --to <N>"
        );
        let text = "error: unexpected argument '--x' found\n\nUsage: isr log\n";
        assert_eq!(usage_message(text), "unexpected argument '--x' found");
    }

    #[test]
    fn fetcher_errors_map_to_exit_statuses() {
        let held = fetcher::Error::LeaseHeld {
            parcel: "vm".into(),
            holder: "host h".into(),
        };
        let e = anyhow::Error::new(held).context("importing");
        assert_eq!(Kind::of(&e), Kind::Conflict);
        assert_eq!(Kind::of(&e).code(), 4);
        let conflict = fetcher::Error::Conflict("no".into());
        let shared = fetcher::Error::Shared(std::sync::Arc::new(conflict));
        assert_eq!(Kind::of(&shared.into()), Kind::Conflict);
        let other = fetcher::Error::Invalid("x".into());
        assert_eq!(Kind::of(&other.into()).code(), 1);
        assert_eq!(Kind::of(&anyhow::anyhow!("plain")), Kind::Failure);
        // A daemon's reply keeps the kind it was sent with.
        let reply = ReplyError::of(&json!({"error": "m", "kind": "unreachable"}), false);
        assert_eq!(Kind::of(&reply.into()).code(), 3);
        for k in [
            Kind::Failure,
            Kind::Usage,
            Kind::Unreachable,
            Kind::Conflict,
        ] {
            assert_eq!(Kind::from_name(k.name()), k);
        }
    }

    #[test]
    fn errors_in_json_carry_their_kind() {
        let e = anyhow::Error::new(fetcher::Error::VersionExists {
            parcel: "vm".into(),
            version: 3,
            concurrent: false,
        });
        let j = error_json(&e);
        assert_eq!(j["kind"], "conflict");
        assert!(j["error"].as_str().unwrap().contains("version 3"), "{j}");
    }
}
