//! The training core end to end on the toy trainer: bit-for-bit resume,
//! interruption, the non-finite guard, and a real SIGTERM.

use crate::toy::{self, Faults};
use candle_rlhf::checkpoint;
use candle_rlhf::io;
use candle_rlhf::metrics::read_metrics;
use candle_rlhf::signal::StopSignal;
use candle_rlhf::Error;

#[test]
fn two_n_steps_equal_n_then_resume_then_n_bit_for_bit() {
    let cfg = toy::config(20, 5);
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = toy::train(
        straight_dir.path(),
        &cfg,
        false,
        &Faults::default(),
        &StopSignal::new(),
    )
    .unwrap();

    // Same run, stopped after step 10 (as Ctrl-C would), then resumed.
    let split_dir = tempfile::tempdir().unwrap();
    let stop = StopSignal::new();
    let faults = Faults {
        stop_after_step: Some(9),
        ..Default::default()
    };
    let err = toy::train(split_dir.path(), &cfg, false, &faults, &stop).unwrap_err();
    assert!(matches!(err, Error::Interrupted { step: 10, .. }), "{err}");
    assert_eq!(err.exit_code(), 130);
    assert_eq!(checkpoint::latest(split_dir.path()).unwrap().unwrap().0, 10);
    let resumed = toy::train(
        split_dir.path(),
        &cfg,
        true,
        &Faults::default(),
        &StopSignal::new(),
    )
    .unwrap();

    assert_eq!(
        straight, resumed,
        "resumed run must equal the uninterrupted one bit for bit"
    );
    // The toy learned: its weight is closer to the true one than at the start.
    let dist = |w: &[f32]| {
        w.iter()
            .zip(toy::TRUE_WEIGHT)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    let (before, after) = (
        dist(&toy::initial_weight(cfg.run.seed)),
        dist(&straight[0].1),
    );
    assert!(
        after < 0.8 * before,
        "distance to the true weight {before} -> {after}"
    );
    // Metrics: every step logged once, in order, despite the interruption.
    let steps: Vec<u64> = read_metrics(&split_dir.path().join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>());
    // Only the newest two checkpoints are kept.
    let kept: Vec<u64> = checkpoint::list(split_dir.path())
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, vec![15, 20]);
}

#[test]
fn different_seeds_give_different_runs() {
    let a = toy::train(
        tempfile::tempdir().unwrap().path(),
        &toy::config(4, 4),
        false,
        &Faults::default(),
        &StopSignal::new(),
    )
    .unwrap();
    let mut cfg = toy::config(4, 4);
    cfg.run.seed = 7;
    let b = toy::train(
        tempfile::tempdir().unwrap().path(),
        &cfg,
        false,
        &Faults::default(),
        &StopSignal::new(),
    )
    .unwrap();
    assert_ne!(a, b);
}

#[test]
fn resume_refuses_a_changed_config_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = toy::config(6, 3);
    toy::train(
        dir.path(),
        &cfg,
        false,
        &Faults {
            stop_after_step: Some(2),
            ..Default::default()
        },
        &StopSignal::new(),
    )
    .unwrap_err();
    let mut changed = cfg.clone();
    changed.train.learning_rate = 0.1;
    let err = toy::train(
        dir.path(),
        &changed,
        true,
        &Faults::default(),
        &StopSignal::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("train.learning_rate") && err.contains("0.2") && err.contains("0.1"),
        "{err}"
    );
    // Keys that only change reporting may differ.
    let mut reporting = cfg.clone();
    reporting.train.logging_steps = 2;
    toy::train(
        dir.path(),
        &reporting,
        true,
        &Faults::default(),
        &StopSignal::new(),
    )
    .unwrap();
    // A fresh start in a directory that holds a run is refused.
    let err = toy::train(
        dir.path(),
        &cfg,
        false,
        &Faults::default(),
        &StopSignal::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn non_finite_losses_are_skipped_then_stop_with_the_last_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = toy::config(12, 2);
    // One NaN step is skipped and the run finishes.
    let ok = toy::train(
        dir.path(),
        &cfg,
        false,
        &Faults {
            nan_steps: vec![3],
            ..Default::default()
        },
        &StopSignal::new(),
    )
    .unwrap();
    assert!(ok.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));

    // Three in a row (max_nonfinite_steps = 3) stop the run.
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults {
        nan_steps: vec![5, 6, 7],
        ..Default::default()
    };
    let err = toy::train(dir.path(), &cfg, false, &faults, &StopSignal::new()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFinite {
                count: 3,
                step: 7,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("last good checkpoint"));
    let (step, path) = checkpoint::latest(dir.path()).unwrap().unwrap();
    assert_eq!(
        step, 6,
        "the checkpoint of step 6 was written before the stop"
    );
    let weights = io::load_safetensors(
        &path.join(checkpoint::WEIGHTS_FILE),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let w = weights["linear.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(w.iter().all(|x| x.is_finite()), "{w:?}");
    // It resumes from there once the data is fixed.
    toy::train(
        dir.path(),
        &cfg,
        true,
        &Faults::default(),
        &StopSignal::new(),
    )
    .unwrap();
}

#[cfg(unix)]
#[test]
fn sigterm_sets_the_stop_flag_instead_of_killing_the_process() {
    let signal = candle_rlhf::signal::install().unwrap();
    assert!(!signal.requested());
    let status = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !signal.requested() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        signal.requested(),
        "the handler saw SIGTERM and we are still running"
    );
}
