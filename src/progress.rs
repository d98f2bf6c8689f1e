//! Progress bars: shown on a terminal, hidden otherwise, with `--json` and
//! with `--quiet`. Every bar shows bytes done, the rate and the ETA.

use std::io::IsTerminal;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-counting bar on stderr, and the sink that feeds it.
pub fn bytes_bar(total: u64, what: &str, json: bool) -> (ProgressBar, fetcher::Progress) {
    let bar = if json || crate::output::quiet() || !std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:8} [{bar:32}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    let sink = bar.clone();
    (bar, Arc::new(move |n| sink.inc(n)))
}
