//! Run directories: starting fresh, and resuming (with the check that the
//! config has not changed in a key that matters).
//!
//! ```text
//! RUN_DIR/
//!   manifest.json        resolved config, crate version, git commit, seed, threads, device, dtype
//!   config.toml          the resolved config, reusable with --config
//!   metrics.jsonl        one JSON object per logging step
//!   plots/*.svg          `candle-rlhf plot RUN_DIR`
//!   checkpoints/<step>/  see checkpoint.rs
//! ```

use std::path::{Path, PathBuf};

use crate::checkpoint::{self, Manifest, TrainerState};
use crate::config::Config;
use crate::io;
use crate::metrics::MetricsLog;
use crate::{Error, IoContext, Result};

/// Where a resumed run picks up.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    pub checkpoint: PathBuf,
    pub state: TrainerState,
}

/// An open run directory with its metrics log.
pub struct RunDir {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub metrics: MetricsLog,
    /// Set when the run continues from a checkpoint.
    pub resume: Option<ResumePoint>,
}

impl RunDir {
    /// The trainer state to start from: `fresh`, or, when resuming, the
    /// newest checkpoint's, with its weights and optimizer state loaded into
    /// `optimizer`.
    pub fn restore(
        &self,
        fresh: TrainerState,
        optimizer: &mut crate::optim::AdamW,
        device: &candle_core::Device,
    ) -> Result<TrainerState> {
        let Some(point) = &self.resume else {
            return Ok(fresh);
        };
        checkpoint::load_into_vars(&point.checkpoint, optimizer.vars(), device)?;
        checkpoint::load_optimizer(&point.checkpoint, optimizer, &point.state, device)?;
        Ok(point.state.clone())
    }

    /// Ends a run: the final checkpoint (`last` when this process wrote
    /// one, else the newest on disk, for a run resumed at its end) and the
    /// plots of its metrics (a plotting failure only warns).
    pub fn finish(&self, last: Option<PathBuf>) -> Result<PathBuf> {
        let checkpoint = match last {
            Some(c) => c,
            None => crate::checkpoint::latest(&self.path)?
                .map(|(_, p)| p)
                .ok_or_else(|| crate::Error::Msg("no checkpoint written".into()))?,
        };
        if !crate::dist::world().is_main() {
            return Ok(checkpoint);
        }
        if let Err(e) = crate::plot::plot_run(&self.path) {
            tracing::warn!("plots not drawn: {e}");
        }
        Ok(checkpoint)
    }

    /// Continues the run in `path` when `resume`, else starts it.
    pub fn open(path: &Path, manifest: Manifest, resume: bool) -> Result<RunDir> {
        if resume {
            Self::resume(path, manifest)
        } else {
            Self::create(path, manifest)
        }
    }

    /// Starts a new run in `path`. A directory that already holds
    /// checkpoints is refused, so that no run is overwritten by accident.
    pub fn create(path: &Path, manifest: Manifest) -> Result<RunDir> {
        if let Some((step, _)) = checkpoint::latest(path)? {
            return Err(Error::Msg(format!(
                "{} already holds a run (checkpoint at step {step}); pass --resume {} to continue it, or choose another --out",
                path.display(),
                path.display()
            )));
        }
        if crate::dist::world().is_main() {
            std::fs::create_dir_all(path).with_path(path)?;
            write_run_files(path, &manifest)?;
        }
        let metrics = MetricsLog::open(path, None)?;
        Ok(RunDir {
            path: path.to_path_buf(),
            manifest,
            metrics,
            resume: None,
        })
    }

    /// Continues the run in `path` from its newest complete checkpoint,
    /// refusing a config that changed in a key that matters.
    pub fn resume(path: &Path, manifest: Manifest) -> Result<RunDir> {
        let (step, dir) = checkpoint::latest(path)?.ok_or_else(|| {
            Error::Msg(format!(
                "--resume {}: no complete checkpoint in {}",
                path.display(),
                path.join(checkpoint::CHECKPOINTS_DIR).display()
            ))
        })?;
        let saved: Manifest = io::read_json(&dir.join(checkpoint::MANIFEST_FILE))?;
        if saved.command != manifest.command {
            return Err(Error::Msg(format!(
                "--resume {}: that run was made by `{}`, not `{}`",
                path.display(),
                saved.command,
                manifest.command
            )));
        }
        if let Some((key, was, now)) = resume_difference(&manifest.config, &saved.config) {
            return Err(Error::ResumeMismatch {
                run_dir: path.to_path_buf(),
                key,
                was,
                now,
            });
        }
        let state: TrainerState = io::read_json(&dir.join(checkpoint::TRAINER_STATE_FILE))?;
        if state.step != step {
            return Err(Error::Checkpoint {
                path: dir,
                message: format!("trainer_state.json says step {}", state.step),
            });
        }
        if saved.world_size != manifest.world_size {
            return Err(Error::Msg(format!(
                "--resume {}: that run ran on {} rank(s), this one on {}: resume it with as many (mpirun -np {})",
                path.display(),
                saved.world_size,
                manifest.world_size,
                saved.world_size
            )));
        }
        if crate::dist::world().is_main() {
            write_run_files(path, &manifest)?;
        }
        // Metrics logged after the checkpoint by the interrupted run are dropped:
        // the resumed run logs those steps again.
        let metrics = MetricsLog::open(path, Some(step))?;
        tracing::info!("resuming {} from step {step}", path.display());
        Ok(RunDir {
            path: path.to_path_buf(),
            manifest,
            metrics,
            resume: Some(ResumePoint {
                checkpoint: dir,
                state,
            }),
        })
    }
}

/// Writes a checkpoint with `save` when one is due after step `step` of
/// `total`: every `save_steps`, at the end, or when a stop was requested;
/// records it in `last`. After saving on a stop before the end, returns
/// [`Error::Interrupted`], so the run ends with nothing lost.
pub fn checkpoint_if_due(
    step: u64,
    total: u64,
    save_steps: u64,
    stopping: bool,
    last: &mut Option<PathBuf>,
    save: impl FnOnce() -> Result<PathBuf>,
) -> Result<()> {
    // A stop requested on any rank stops every rank at this step.
    let stopping = crate::dist::world().any(stopping);
    if !(step.is_multiple_of(save_steps) || stopping || step == total) {
        return Ok(());
    }
    let dir = save()?;
    *last = Some(dir.clone());
    if stopping && step < total {
        return Err(Error::Interrupted {
            step,
            checkpoint: dir,
        });
    }
    Ok(())
}

fn write_run_files(path: &Path, manifest: &Manifest) -> Result<()> {
    let json = serde_json::to_string_pretty(manifest).map_err(|e| Error::Msg(e.to_string()))?;
    io::atomic_write(&path.join(checkpoint::MANIFEST_FILE), json.as_bytes())?;
    io::atomic_write(
        &path.join("config.toml"),
        manifest.config.to_toml_string()?.as_bytes(),
    )
}

/// Keys that may change between a checkpoint and its resumption: they change
/// where and how a run reports, not what it computes.
pub const RESUME_MAY_CHANGE: &[&str] = &[
    "run.device",
    "run.out",
    "run.threads",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "train.max_nonfinite_steps",
    "train.per_device_eval_batch_size",
];

/// The first key, in sorted order, whose value differs between the config
/// a run resumes with (`now`) and the one its checkpoint was made with
/// (`saved`), and that is not in [`RESUME_MAY_CHANGE`]: `(key, was, now)`.
pub fn resume_difference(now: &Config, saved: &Config) -> Option<(String, String, String)> {
    let show =
        |v: Option<&serde_json::Value>| v.map_or_else(|| "unset".to_string(), |v| v.to_string());
    let (now, was) = (now.flatten(), saved.flatten());
    let keys: std::collections::BTreeSet<&String> = now.keys().chain(was.keys()).collect();
    let changed = keys
        .into_iter()
        .filter(|k| !RESUME_MAY_CHANGE.contains(&k.as_str()))
        .find(|k| now.get(*k) != was.get(*k))
        .map(|k| (k.clone(), show(was.get(k)), show(now.get(k))));
    changed
}

/// The default run directory: `runs/<command>-<unix seconds>`.
pub fn default_run_dir(command: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("{command}-{secs}"))
}
