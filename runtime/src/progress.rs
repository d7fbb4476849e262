//! Progress of long loads (packing a 3B model's weights takes seconds): the runtime reports
//! `(stage, done, total)` to a hook the embedding program may install, once per process. The
//! CLI draws a progress bar from it on a terminal; the C API and library users install none,
//! and nothing is reported then.

use std::sync::RwLock;

/// A progress callback: stage name, units done, units in all.
pub type Hook = Box<dyn Fn(&str, u64, u64) + Send + Sync>;

static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

/// Installs (or, with `None`, removes) the process's progress hook.
pub fn set_hook(hook: Option<Hook>) {
    *HOOK.write().unwrap_or_else(|e| e.into_inner()) = hook;
}

/// Reports that `done` of `total` units of `stage` are finished.
pub fn report(stage: &str, done: u64, total: u64) {
    if let Some(h) = HOOK.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        h(stage, done, total);
    }
}
