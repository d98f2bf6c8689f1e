//! Progress bars: shown on a terminal, hidden otherwise, with `--json` and
//! with `--quiet`. Every bar shows bytes done, the rate and the ETA.

use std::io::IsTerminal;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-counting bar on stderr, and the sink that feeds it.
pub fn bytes_bar(total: u64, what: &str, json: bool) -> (ProgressBar, fetcher::Progress) {
    let bar = if json || super::quiet() || !std::io::stderr().is_terminal() {
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

/// A bar counting items (not bytes) on stderr, hidden like [`bytes_bar`];
/// its length and message are set as the work goes.
pub fn count_bar(json: bool) -> ProgressBar {
    let bar = if json || !std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:14} [{bar:32}] {pos}/{len} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}
