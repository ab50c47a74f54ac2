//! The library's one error type. Every message is meant to be read by a user
//! on one line: it names the file, field, key or tensor that is at fault.

use std::path::PathBuf;

/// Errors of the candle-rlhf library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file or `--set` override that cannot be used as written.
    #[error("{source_name}: {message}")]
    Config {
        source_name: String,
        message: String,
    },

    /// A config value that parses but is not allowed.
    #[error("invalid config value `{field}` = {value}: {reason}")]
    InvalidConfig {
        field: String,
        value: String,
        reason: String,
    },

    /// Resuming with a config that differs from the checkpoint's in a key that matters.
    #[error("cannot resume {run_dir}: config key `{key}` changed since the checkpoint (was {was}, now {now}); use the original value or start a new run")]
    ResumeMismatch {
        run_dir: PathBuf,
        key: String,
        was: String,
        now: String,
    },

    /// A file or directory that could not be read or written.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    /// A JSON file (metrics, state, manifest) that does not parse.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },

    /// A checkpoint directory that is missing a part or holds the wrong shapes.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    /// A device that cannot be used by this build or on this machine.
    #[error("device `{spec}`: {message}")]
    Device { spec: String, message: String },

    /// Too many steps in a row whose loss or gradients were NaN or infinite.
    #[error("stopping: {count} steps in a row had a non-finite loss or gradient (last at step {step}: {what}); the weights were not updated by any of them and the last good checkpoint is intact")]
    NonFinite {
        count: usize,
        step: u64,
        what: String,
    },

    /// The user asked the run to stop (Ctrl-C, SIGTERM); a checkpoint was written.
    #[error("interrupted at step {step}; checkpoint written to {checkpoint}")]
    Interrupted { step: u64, checkpoint: PathBuf },

    /// Anything Candle reports (shapes, dtypes, devices), without its backtrace.
    #[error("{0}")]
    Candle(candle_core::Error),

    /// A free-form message for checks that fit no variant above.
    #[error("{0}")]
    Msg(String),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl From<candle_core::Error> for Error {
    /// Candle appends a multi-line backtrace to its errors when RUST_BACKTRACE
    /// is set; users get one line unless they ask for the trace.
    fn from(err: candle_core::Error) -> Self {
        let want_trace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
        Error::Candle(if want_trace {
            err
        } else {
            strip_backtrace(err)
        })
    }
}

fn strip_backtrace(err: candle_core::Error) -> candle_core::Error {
    match err {
        candle_core::Error::WithBacktrace { inner, .. } => strip_backtrace(*inner),
        candle_core::Error::Context { inner, context } => candle_core::Error::Context {
            inner: Box::new(strip_backtrace(*inner)),
            context,
        },
        other => other,
    }
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    /// The process exit code that `main` uses for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Interrupted { .. } => 130,
            Error::Config { .. } | Error::InvalidConfig { .. } => 2,
            _ => 1,
        }
    }
}

/// Adds the path to an `std::io::Result`.
pub trait IoContext<T> {
    fn with_path(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn with_path(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
