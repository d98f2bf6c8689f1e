//! Logging through `tracing`, to stderr, filtered by `RUST_LOG` (tracing's
//! `EnvFilter` syntax: `RUST_LOG=isr=debug,fetcher=debug`).
//!
//! By default only warnings pass, so a user sees nothing new; a daemon
//! (`isr resume --foreground`, whose stderr is `<run dir>/NAME.log`) also
//! logs the lifecycle at info (device up, suspend requested, publish,
//! lease, cache open). The daemon inherits `RUST_LOG` from the `isr resume`
//! that starts it.
//!
//! Warnings and errors read as isr's own do (`isr: warning: …`, one line,
//! no timestamp); the more verbose levels carry a timestamp, the level and
//! the module, to be read in a log.

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// The filter when `RUST_LOG` is not set in a daemon.
const DAEMON_DEFAULT: &str = "warn,isr=info,fetcher=info";

/// Installs the subscriber; `daemon` selects the daemon's default filter.
/// A `RUST_LOG` that does not parse is ignored (directive by directive).
pub fn init(daemon: bool) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::builder()
            .with_default_directive(LevelFilter::WARN.into())
            .parse_lossy(v),
        _ if daemon => EnvFilter::new(DAEMON_DEFAULT),
        _ => EnvFilter::new("warn"),
    };
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .event_format(IsrFormat::default())
        // A stderr closed early (`2>&1 | head`) must not end the command:
        // the layer's own report of a failed write would panic (eprintln!)
        // on the same closed pipe.
        .log_internal_errors(false);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init();
}

/// Warnings and errors as `isr: warning: MESSAGE key=value…`; the other
/// levels in tracing's full format.
#[derive(Debug, Default)]
struct IsrFormat {
    full: Format,
}

impl<S, N> FormatEvent<S, N> for IsrFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return self.full.format_event(ctx, writer, event);
        }
        let what = if level == Level::ERROR {
            "error"
        } else {
            "warning"
        };
        write!(writer, "isr: {what}: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn warnings_read_like_isr_warnings_and_debug_has_context() {
        let buf = Buffer::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("debug"))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .event_format(IsrFormat::default())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!("store s3://b is not answering");
            tracing::debug!(attempt = 3, "retrying");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("isr: warning: store s3://b is not answering")
        );
        let debug = lines.next().unwrap();
        assert!(debug.contains("DEBUG"), "{debug}");
        assert!(debug.contains("retrying attempt=3"), "{debug}");
    }
}
