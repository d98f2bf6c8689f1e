//! A QMP client (QEMU's JSON machine protocol) over a unix socket: one
//! command at a time, every read bounded by a timeout, so that a QEMU that
//! hangs or dies is reported instead of waited for.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// How long one QMP command may take to be answered.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one QEMU's QMP socket, past capability negotiation.
#[derive(Debug)]
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Who is at the other end, for messages ("QEMU pid N").
    who: String,
}

impl Qmp {
    /// Connects to `socket` and negotiates capabilities, trying for at most
    /// `within` while QEMU starts (and while `alive` says it still runs).
    pub fn connect(
        socket: &Path,
        who: &str,
        within: Duration,
        alive: impl Fn() -> bool,
    ) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) => {
                    if !alive() {
                        bail!(
                            "{who} exited before its QMP socket {} opened",
                            socket.display()
                        );
                    }
                    if Instant::now() >= deadline {
                        return Err(anyhow::Error::new(e).context(format!(
                            "cannot connect to the QMP socket {} of {who} within {} s",
                            socket.display(),
                            within.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            who: who.to_owned(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("{} greeted with {greeting} instead of QMP", qmp.who);
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Sets how long a reply may take.
    pub fn set_timeout(&self, timeout: Duration) -> anyhow::Result<()> {
        self.writer.set_read_timeout(Some(timeout))?;
        Ok(())
    }

    /// Runs one command; its `return` value, or its error as an error.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(a) = arguments {
            request["arguments"] = a;
        }
        writeln!(self.writer, "{request}")
            .with_context(|| format!("sending {command} to {}", self.who))?;
        loop {
            let msg = self
                .read_message()
                .with_context(|| format!("waiting for {} to answer {command}", self.who))?;
            if msg.get("event").is_some() {
                continue;
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                bail!(
                    "{} refused {command}: {}",
                    self.who,
                    e["desc"].as_str().unwrap_or("(no description)")
                );
            }
        }
    }

    fn read_message(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => bail!("{} closed its QMP connection (did it exit?)", self.who),
            Ok(_) => serde_json::from_str(&line)
                .with_context(|| format!("{} sent {line:?}, which is not JSON", self.who)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("{} did not answer on QMP in time", self.who)
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("reading QMP of {}", self.who))),
        }
    }

    /// Polls `query-migrate` until the migration (outgoing or incoming)
    /// completes; fails when it fails, when QEMU exits (`alive`), or after
    /// `limit`.
    pub fn wait_for_migration(
        &mut self,
        limit: Duration,
        alive: impl Fn() -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let r = self.execute("query-migrate", None)?;
            match r["status"].as_str() {
                Some("completed") => return Ok(r),
                Some("failed" | "cancelled") => bail!(
                    "the migration of {} {}: {}",
                    self.who,
                    r["status"].as_str().unwrap_or("?"),
                    r["error-desc"].as_str().unwrap_or("no reason given")
                ),
                _ => {}
            }
            if !alive() {
                bail!("{} exited during the migration", self.who);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the migration of {} did not complete within {} s (status {})",
                    self.who,
                    limit.as_secs(),
                    r["status"]
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `query-status` until the VM's run state is one that `done`
    /// accepts; that state.
    pub fn wait_for_state(
        &mut self,
        what: &str,
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.execute("query-status", None)?;
            let state = s["status"].as_str().unwrap_or("?");
            if done(state) {
                return Ok(state.to_owned());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} stayed {state} instead of becoming {what} within {} s",
                    self.who,
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
