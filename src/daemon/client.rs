//! The client side of the daemon's control socket: one command line out,
//! JSON lines back (progress lines first for long commands), and how a reply
//! becomes output and an exit status.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::output::{self, ReplyError};
use crate::run_dir::{pid_alive, read_state, run_dir, socket_path};
/// How long a daemon may take to answer a command (for `suspend`: to
/// acknowledge it; the publish that follows may take as long as the upload).
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one command to a parcel's daemon; its one-line JSON answer.
pub fn ask(parcel: &str, command: &str) -> anyhow::Result<Value> {
    let (_stream, mut reader) = send(parcel, command)?;
    read_answer(parcel, command, &mut reader, ANSWER_TIMEOUT)
}

pub(super) fn send(
    parcel: &str,
    command: &str,
) -> anyhow::Result<(UnixStream, BufReader<UnixStream>)> {
    let path = socket_path(parcel);
    let mut stream = UnixStream::connect(&path).map_err(|_| {
        anyhow::anyhow!(
            "parcel {parcel} is not resumed on this host (no daemon at {})",
            path.display()
        )
    })?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .with_context(|| format!("sending {command:?} to the daemon of parcel {parcel}"))?;
    let reader = BufReader::new(stream.try_clone()?);
    Ok((stream, reader))
}

/// Reads one JSON line, waiting at most `timeout`.
pub(super) fn read_answer(
    parcel: &str,
    command: &str,
    reader: &mut BufReader<UnixStream>,
    timeout: Duration,
) -> anyhow::Result<Value> {
    read_answer_while(parcel, command, reader, timeout, || false)
}

/// Reads one JSON line, waiting `timeout` at a time for as long as
/// `keep_waiting` says (a partial line read before a timeout is kept).
pub(super) fn read_answer_while(
    parcel: &str,
    command: &str,
    reader: &mut BufReader<UnixStream>,
    timeout: Duration,
    keep_waiting: impl Fn() -> bool,
) -> anyhow::Result<Value> {
    reader.get_ref().set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if keep_waiting() {
                    continue;
                }
                bail!(
                    "the daemon of parcel {parcel} did not answer {command:?} within {} s (pid {}); see {}",
                    timeout.as_secs(),
                    read_state(parcel).map_or("unknown".into(), |s| s["pid"].to_string()),
                    run_dir().join(format!("{parcel}.log")).display()
                )
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("reading the daemon of parcel {parcel}"))
                );
            }
        }
    }
    if line.is_empty() {
        bail!("the daemon of parcel {parcel} closed the connection without an answer");
    }
    serde_json::from_str(&line).with_context(|| {
        format!("the daemon of parcel {parcel} answered {command:?} with {line:?}")
    })
}

/// Sends `command JSON` to a parcel's daemon and waits for its answer for
/// as long as the daemon lives, showing the progress lines it sends before
/// it (`{"progress": DONE, "total": BYTES}`) on a bar labelled `what`.
pub fn ask_with_progress(
    parcel: &str,
    command: &str,
    request: &Value,
    what: &str,
    json: bool,
) -> anyhow::Result<Value> {
    let pid = read_state(parcel)
        .and_then(|s| s["pid"].as_i64())
        .unwrap_or(0);
    let (_stream, mut reader) = send(parcel, &format!("{command} {request}"))?;
    let (bar, _) = output::progress::bytes_bar(0, what, json);
    let result = loop {
        let v = read_answer_while(parcel, command, &mut reader, Duration::from_secs(2), || {
            pid_alive(pid)
        })?;
        if v.get("accepted").is_some() {
            continue;
        }
        match (v.get("progress"), v.get("total")) {
            (Some(done), Some(total)) => {
                bar.set_length(total.as_u64().unwrap_or(0));
                bar.set_position(done.as_u64().unwrap_or(0));
            }
            _ => break v,
        }
    };
    bar.finish_and_clear();
    Ok(result)
}

/// Prints a daemon's reply (with `json` as it is, else as `text` makes
/// it); a reply with an `error` fails with the exit status of its `kind`.
pub fn answer(
    mut reply: Value,
    json: bool,
    text: impl FnOnce(&Value) -> String,
) -> anyhow::Result<ExitCode> {
    if reply.get("error").is_some() {
        let error = ReplyError::of(&reply, json);
        if json {
            reply["kind"] = json!(error.kind.name());
            output::line(&reply)?;
        }
        return Err(error.into());
    }
    if json {
        output::line(&reply)?;
    } else {
        output::line(text(&reply))?;
    }
    Ok(ExitCode::SUCCESS)
}
