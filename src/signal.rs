//! Stopping a run cleanly. The first Ctrl-C (or SIGTERM) asks the trainer to
//! finish its current step, write a checkpoint and exit with code 130; a
//! second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A flag a trainer checks between steps.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// A flag no signal sets (tests and library callers request stops themselves).
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

static PROCESS_SIGNAL: OnceLock<StopSignal> = OnceLock::new();

/// The process-wide flag set by Ctrl-C and SIGTERM; installs the handler on first use.
pub fn install() -> crate::Result<StopSignal> {
    if let Some(s) = PROCESS_SIGNAL.get() {
        return Ok(s.clone());
    }
    let signal = StopSignal::new();
    let for_handler = signal.clone();
    ctrlc::set_handler(move || {
        if for_handler.requested() {
            eprintln!("\nsecond interrupt: exiting now");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing this step and writing a checkpoint (interrupt again to exit at once)");
        for_handler.request();
    })
    .map_err(|e| crate::Error::Msg(format!("cannot install the Ctrl-C handler: {e}")))?;
    Ok(PROCESS_SIGNAL.get_or_init(|| signal).clone())
}
