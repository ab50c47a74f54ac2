//! A toy trainer written the way the real ones are: linear regression with a
//! random input mask, driven by the training core, checkpointed and resumable.
//! Every random draw comes from the checkpointed RNG streams, so a resumed run
//! must reproduce an uninterrupted one bit for bit.

use candle_core::{DType, Device, Tensor, Var};
use candle_rlhf::checkpoint::{self, Checkpoint, Manifest, TrainerState};
use candle_rlhf::optim::{AdamW, AdamWParams, StepOutcome, TrainCore};
use candle_rlhf::run::RunDir;
use candle_rlhf::signal::StopSignal;
use candle_rlhf::{Config, Error, HostRng, Result};
use std::path::Path;

pub const SAMPLES: usize = 48;
pub const FEATURES: usize = 4;

/// What the test can inject into a toy run.
#[derive(Default, Clone)]
pub struct Faults {
    /// Request a stop (as Ctrl-C does) once this step has finished.
    pub stop_after_step: Option<u64>,
    /// Steps whose loss is replaced by NaN.
    pub nan_steps: Vec<u64>,
}

/// The fixed data set: y = x . [1, -2, 0.5, 3] + 0.7 + noise.
fn data() -> (Vec<f32>, Vec<f32>) {
    let mut rng = HostRng::new(1234);
    let x: Vec<f32> = (0..SAMPLES * FEATURES)
        .map(|_| rng.normal() as f32)
        .collect();
    let w = TRUE_WEIGHT;
    let y = (0..SAMPLES)
        .map(|i| {
            (0..FEATURES)
                .map(|j| x[i * FEATURES + j] * w[j])
                .sum::<f32>()
                + 0.7
                + 0.1 * rng.normal() as f32
        })
        .collect();
    (x, y)
}

/// The weight the model starts from, drawn from the seeded init stream.
pub fn initial_weight(seed: u64) -> Vec<f32> {
    let mut init = HostRng::stream(seed, "init");
    (0..FEATURES)
        .map(|_| (0.5 * init.normal()) as f32)
        .collect()
}

/// The weight the data was made with.
pub const TRUE_WEIGHT: [f32; FEATURES] = [1.0, -2.0, 0.5, 3.0];

/// Trains (or resumes) the toy in `run_dir`; returns the final weights.
pub fn train(
    run_dir: &Path,
    cfg: &Config,
    resume: bool,
    faults: &Faults,
    stop: &StopSignal,
) -> Result<Vec<(String, Vec<f32>)>> {
    let dev = Device::Cpu;
    let manifest = Manifest::new("toy", cfg, "cpu");
    let mut run = if resume {
        RunDir::resume(run_dir, manifest)?
    } else {
        RunDir::create(run_dir, manifest)?
    };
    let total = cfg.train.max_steps.expect("toy configs set max_steps");
    let seed = cfg.run.seed;

    // 1. Model: weights drawn from the seeded init stream.
    let w = Var::from_tensor(&Tensor::from_vec(
        initial_weight(seed),
        (FEATURES, 1),
        &dev,
    )?)?;
    let b = Var::from_tensor(&Tensor::zeros(1, DType::F32, &dev)?)?;
    let named = vec![
        ("linear.weight".to_string(), w.clone()),
        ("linear.bias".to_string(), b.clone()),
    ];
    let mut core = TrainCore::new(
        AdamW::new(named, AdamWParams::from_config(&cfg.train))?,
        &cfg.train,
        total,
    );

    // 2. State: fresh, or restored from the newest checkpoint.
    let mut state = TrainerState {
        rngs: [("data".to_string(), HostRng::stream(seed, "data"))].into(),
        data_position: serde_json::json!({"offset": SAMPLES, "order": []}),
        ..Default::default()
    };
    if let Some(resume) = &run.resume {
        checkpoint::load_into_vars(&resume.checkpoint, core.optimizer.vars(), &dev)?;
        checkpoint::load_optimizer(&resume.checkpoint, &mut core.optimizer, &resume.state, &dev)?;
        state = resume.state.clone();
    }
    let (xs, ys) = data();
    let batch = cfg.train.per_device_train_batch_size;

    // 3. The loop: accumulate micro-batches, step, log, checkpoint.
    while state.step < total {
        let step = state.step;
        for _ in 0..cfg.train.gradient_accumulation_steps {
            let rng = state.rngs.get_mut("data").expect("data stream");
            let mut offset = state.data_position["offset"].as_u64().unwrap_or(0) as usize;
            let mut order: Vec<usize> =
                serde_json::from_value(state.data_position["order"].clone()).unwrap_or_default();
            if offset + batch > order.len() {
                order = rng.permutation(SAMPLES); // a new epoch, reshuffled
                offset = 0;
            }
            let idx = &order[offset..offset + batch];
            let x: Vec<f32> = idx
                .iter()
                .flat_map(|&i| xs[i * FEATURES..(i + 1) * FEATURES].to_vec())
                .collect();
            let y: Vec<f32> = idx.iter().map(|&i| ys[i]).collect();
            // Random input mask (like dropout): makes the RNG state matter.
            let mask = rng
                .uniform_tensor((batch, FEATURES), 0.0, 1.0, DType::F32, &dev)?
                .ge(0.1)?
                .to_dtype(DType::F32)?;
            let x = (Tensor::from_vec(x, (batch, FEATURES), &dev)? * mask)?;
            let y = Tensor::from_vec(y, (batch, 1), &dev)?;
            let pred = x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            let mut loss = (pred - y)?.sqr()?.mean_all()?;
            if faults.nan_steps.contains(&step) {
                loss = (loss * f64::NAN)?;
            }
            core.backward(&loss)?;
            state.data_position = serde_json::json!({"offset": offset + batch, "order": order});
        }
        let outcome = core.step(step)?;
        state.step += 1;
        state.optimizer_steps = core.optimizer.steps();
        if let StepOutcome::Applied { grad_norm, lr } = outcome {
            if state.step.is_multiple_of(cfg.train.logging_steps) {
                run.metrics.log(
                    state.step,
                    &[("grad_norm", grad_norm), ("learning_rate", lr)],
                )?;
            }
        }
        if faults.stop_after_step == Some(step) {
            stop.request();
        }
        let stopping = stop.requested();
        if state.step.is_multiple_of(cfg.train.save_steps) || stopping || state.step == total {
            let weights = vec![
                ("linear.weight".to_string(), w.as_tensor().clone()),
                ("linear.bias".to_string(), b.as_tensor().clone()),
            ];
            let dir = checkpoint::save(
                &run.path,
                &Checkpoint {
                    weights: &weights,
                    model_config: None,
                    tokenizer_files: &[],
                    extra_weights: &[],
                    optimizer: Some(&core.optimizer),
                    state: &state,
                    manifest: &run.manifest,
                    lora: None,
                },
                cfg.train.save_total_limit,
            )?;
            if stopping {
                return Err(Error::Interrupted {
                    step: state.step,
                    checkpoint: dir,
                });
            }
        }
    }
    Ok(vec![
        (
            "linear.weight".into(),
            w.as_tensor().flatten_all()?.to_vec1()?,
        ),
        ("linear.bias".into(), b.as_tensor().to_vec1()?),
    ])
}

/// A toy config: `steps` optimizer steps of 2 micro-batches of 6, warmup and
/// linear decay, a checkpoint every `save_steps`.
pub fn config(steps: u64, save_steps: u64) -> Config {
    Config::load(
        None,
        &[
            format!("train.max_steps={steps}"),
            format!("train.save_steps={save_steps}"),
            "train.save_total_limit=2".into(),
            "train.learning_rate=0.2".into(),
            "train.per_device_train_batch_size=6".into(),
            "train.gradient_accumulation_steps=2".into(),
            "train.warmup_steps=3".into(),
            "train.weight_decay=0.01".into(),
            "train.logging_steps=1".into(),
            "train.max_nonfinite_steps=3".into(),
        ],
    )
    .expect("toy config is valid")
}
