//! The offline steps of `bench`: a DPO step and an SFT step, each as its
//! trainer runs it, on the shape's random weights.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;

use crate::config::{ModelInit, TrainConfig};
use crate::models::{CausalLm, Linears};
use crate::optim::adamw::{AdamW, AdamWParams};
use crate::optim::TrainCore;
use crate::trainers::trained::Trained;
use crate::{HostRng, Result};
use serde::Serialize;

/// What a step bench needs of `bench`'s options.
pub(super) struct StepPlan<'a> {
    pub config: &'a crate::config::Config,
    /// The DPO step's pairs and tokens per sequence (half prompt, half completion).
    pub pairs: (usize, usize),
    pub warmup: usize,
    pub iters: usize,
}

/// One SFT step: every token of every row trained.
#[derive(Debug, Clone, Serialize)]
pub struct SftBench {
    pub rows: usize,
    pub seq_len: usize,
    /// Median seconds per step (forward, loss, backward, optimizer step).
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub peak_rss_mb: f64,
}

/// One DPO step of the reward workload, median seconds of the step and its phases.
#[derive(Debug, Clone, Serialize)]
pub struct DpoBench {
    pub pairs: usize,
    pub seq_len: usize,
    /// The reference's log-probs precomputed: no reference model in memory.
    pub precomputed: bool,
    pub step_s: f64,
    /// The policy's forward and backward over chosen and rejected, with the
    /// loss and the batch's assembly (TRL's policy phase includes its collation).
    pub policy_s: f64,
    pub reference_s: f64,
    /// Gradient clipping and AdamW.
    pub optimizer_s: f64,
    pub peak_rss_mb: f64,
}

pub(crate) fn random_rows(
    rows: usize,
    len: usize,
    vocab: usize,
    rng: &mut HostRng,
) -> Vec<Vec<u32>> {
    (0..rows)
        .map(|_| {
            (0..len)
                .map(|_| (rng.uniform() * vocab as f64) as u32 % vocab as u32)
                .collect()
        })
        .collect()
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Peak resident set size since the last reset, in MB (0 where unknown).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resets the kernel's peak-RSS counter of this process (Linux; elsewhere a no-op).
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// While alive, resets the peak RSS once the run directory's metrics.jsonl
/// holds `warmup` lines (the warm-up iterations logged: `logging_steps = 1`),
/// so that an online run's peak covers its timed iterations only, as
/// scripts/bench_trl.py's does after TRL's warm-up steps. A thread polls the
/// file every 20 ms; the next iteration starts with generation, which holds
/// little, so the poll's lag loses nothing.
pub(crate) struct PeakAfterWarmup {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakAfterWarmup {
    pub(crate) fn watch(run_dir: &Path, warmup: usize) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, metrics) = (done.clone(), run_dir.join("metrics.jsonl"));
        let thread = std::thread::spawn(move || {
            let logged = || std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count());
            while !flag.load(SeqCst) {
                if logged() >= warmup {
                    reset_peak_rss();
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        Self {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for PeakAfterWarmup {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// After the last warm-up step: the peak RSS from here on counts (the
/// timed steps, with the optimizer's moments already allocated).
pub(crate) fn after_warmup(step: u64, warmup: usize) {
    if step + 1 == warmup as u64 {
        reset_peak_rss();
    }
}

/// The policy of a step bench: the shape's model, trained in full or with
/// the config's LoRA, checkpointing as the config says; and its trainer core.
fn policy(
    opts: &StepPlan,
    model_dir: &Path,
    device: &Device,
    batch: usize,
) -> Result<(CausalLm, Trained, TrainCore)> {
    let cfg = opts.config;
    let (arch, vb, mut params) = Trained::load(
        model_dir,
        "model",
        cfg.lora.as_ref(),
        "CAUSAL_LM",
        ModelInit::Pretrained,
        cfg.run.dtype.dtype(),
        device,
        cfg.run.seed,
    )?;
    let mut lm = CausalLm::load(vb, &arch, true)?;
    params.attach(&mut lm)?;
    lm.set_activation_checkpointing(cfg.train.activation_checkpointing);
    let train = TrainConfig {
        per_device_train_batch_size: batch,
        ..cfg.train.clone()
    };
    let steps = (opts.warmup + opts.iters) as u64;
    let core = TrainCore::new(
        AdamW::from_varmap(params.varmap(), AdamWParams::from_config(&train))?,
        &train,
        steps,
    );
    Ok((lm, params, core))
}

/// Median seconds of an SFT step as the trainer runs it: `batch` rows of
/// `len` tokens, every token trained, forward, loss, backward, clipping, AdamW.
pub(super) fn sft_steps(
    opts: &StepPlan,
    model_dir: &Path,
    (batch, len): (usize, usize),
    vocab: usize,
    device: &Device,
    rng: &mut HostRng,
) -> Result<f64> {
    let (lm, _params, mut core) = policy(opts, model_dir, device, batch)?;
    let mut times = Vec::new();
    for step in 0..(opts.warmup + opts.iters) as u64 {
        let rows: Vec<crate::data::sft::SftRow> = random_rows(batch, len, vocab, rng)
            .into_iter()
            .map(|ids| crate::data::sft::SftRow {
                trained: vec![1; ids.len()],
                segments: vec![1; ids.len()],
                ids,
            })
            .collect();
        let refs: Vec<_> = rows.iter().collect();
        let started = Instant::now();
        {
            let (loss, _, _) = crate::trainers::sft::batch_loss(&lm, &refs, 0, device)?;
            core.backward(&loss)?;
        } // the graph is freed before the optimizer step, as in the trainer
        core.step(step)?;
        device.synchronize()?;
        if step >= opts.warmup as u64 {
            times.push(started.elapsed().as_secs_f64());
        }
        after_warmup(step, opts.warmup);
    }
    Ok(median(times))
}

/// A DPO step as the trainer runs it (sigmoid loss, beta 0.1), each phase
/// timed after a device sync: the reference's summed log-probs (or random
/// stand-ins for precomputed ones), the policy's loss and backward, AdamW.
pub(super) fn dpo_steps(
    opts: &StepPlan,
    model_dir: &Path,
    vocab: usize,
    device: &Device,
    rng: &mut HostRng,
    precomputed: bool,
) -> Result<DpoBench> {
    use crate::trainers::dpo::{policy_loss, reference_logps, DpoBatch, Settings};
    let (cfg, (b, seq_len)) = (opts.config, opts.pairs);
    let (lm, params, mut core) = policy(opts, model_dir, device, b)?;
    let (dtype, arch) = (
        cfg.run.dtype.dtype(),
        crate::models::ArchConfig::load(&model_dir.join("config.json"))?,
    );
    let reference = match precomputed {
        true => None,
        // In `dpo.ref_dtype` where set (`--set dpo.ref_dtype="bf16"`), as the trainer.
        false => {
            let ref_dtype = cfg.dpo.ref_dtype.map(|x| x.dtype());
            Some(params.reference(&arch, None, model_dir, ref_dtype, dtype, device)?)
        }
    };
    let steps = (opts.warmup + opts.iters) as u64;
    let settings = Settings::of(cfg);
    let half = seq_len / 2;
    let mut phases: [Vec<f64>; 4] = Default::default();
    for step in 0..steps {
        let rows = random_rows(3 * b, half, vocab, rng);
        let pairs: Vec<crate::data::dpo::DpoPair> = (0..b)
            .map(|i| crate::data::dpo::DpoPair {
                prompt: rows[3 * i].clone(),
                chosen: rows[3 * i + 1].clone(),
                rejected: rows[3 * i + 2].clone(),
            })
            .collect();
        let refs: Vec<_> = pairs.iter().collect();
        let lap = |t: &mut Instant| -> Result<f64> {
            device.synchronize()?;
            let s = t.elapsed().as_secs_f64();
            *t = Instant::now();
            Ok(s)
        };
        let mut t = Instant::now();
        let batch = DpoBatch::new(&refs, &settings, 0, device)?;
        let batch_s = lap(&mut t)?;
        let r = match &reference {
            Some(lm) => reference_logps(lm, &batch)?,
            None => {
                let stand_in = || candle_core::Tensor::randn(-40f32, 5.0, b, device);
                (stand_in()?, stand_in()?)
            }
        };
        let reference_s = lap(&mut t)?;
        {
            let (loss, _) = policy_loss(&lm, &batch, &settings, r)?;
            core.backward(&loss)?;
        } // the graph is freed before the optimizer step, as in the trainer
        let policy_s = batch_s + lap(&mut t)?;
        core.step(step)?;
        let optimizer_s = lap(&mut t)?;
        if step >= opts.warmup as u64 {
            for (v, x) in phases.iter_mut().zip([
                reference_s,
                policy_s,
                optimizer_s,
                reference_s + policy_s + optimizer_s,
            ]) {
                v.push(x);
            }
        }
        after_warmup(step, opts.warmup);
    }
    let [reference_s, policy_s, optimizer_s, step_s] = phases.map(median);
    Ok(DpoBench {
        pairs: b,
        seq_len,
        precomputed,
        step_s,
        policy_s,
        reference_s,
        optimizer_s,
        peak_rss_mb: peak_rss_mb(),
    })
}
