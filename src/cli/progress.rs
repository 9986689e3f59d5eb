//! The one progress bar style of the binary (drawn on stderr, only on a terminal).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Denoising steps, with a message (`denoising`, `queued (2 ahead)`).
pub const STEPS: &str = "{spinner} {msg} [{bar:40}] {pos}/{len} steps, {elapsed} (eta {eta})";
/// Training steps, the loss as the message.
pub const TRAINING: &str = "{bar:30} {pos}/{len} {msg} eta {eta}";

/// A bar of `total` in `template` (one of the above).
pub fn bar(total: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A training bar of `total` steps; hidden when stderr is not a terminal (the caller then logs
/// every tenth step instead: `bar.is_hidden()`).
pub fn training_bar(total: u64) -> ProgressBar {
    let bar = bar(total, TRAINING);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}
