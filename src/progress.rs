//! What the CLI shows while it works: a spinner for a step that takes longer than a second
//! ([`progress`]), turned into a bar with a count when the runtime reports how far a long load
//! is (`kiln_runtime::progress`, e.g. preparing each step of a program: packing weights,
//! materialising permuted views). It draws on stderr only when stderr is a terminal
//! (indicatif hides it otherwise), so piped output and logs stay clean.

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The bar of the step running now, if any.
static CURRENT: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Routes the runtime's progress reports to the current step's bar.
pub fn install() {
    kiln_runtime::progress::set_hook(Some(Box::new(|stage, done, total| {
        if let Some(bar) = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if bar.length() != Some(total) {
                let style = ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                bar.set_style(style);
                bar.set_length(total);
            }
            bar.set_message(stage.to_string());
            bar.set_position(done);
        }
    })));
}

/// Sets its flag when dropped (also while unwinding).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `f`, showing `msg` with a spinner (or a bar, see [`install`]) once it has taken more
/// than a second, and how long it took at the end.
pub fn progress<T>(msg: &str, f: impl FnOnce() -> T) -> T {
    let bar = ProgressBar::new_spinner().with_message(msg.to_string());
    let shown = AtomicBool::new(false);
    let t = Instant::now();
    let done = AtomicBool::new(false);
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if t.elapsed() > Duration::from_secs(1) {
                    shown.store(true, Ordering::Relaxed);
                    bar.tick();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // Set even when `f` panics, or the spinner would spin on and the scope never end.
        let out = {
            let _stop = StopOnDrop(&done);
            f()
        };
        let _ = h.join();
        out
    });
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
    if shown.load(Ordering::Relaxed) {
        bar.finish_with_message(format!("{msg} done in {:.1} s", t.elapsed().as_secs_f64()));
    } else {
        bar.finish_and_clear();
    }
    out
}
