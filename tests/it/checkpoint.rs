//! The atomic checkpoint writer and reader.

use candle_core::{Device, Tensor};
use candle_rlhf::checkpoint::Manifest;
use candle_rlhf::checkpoint::{self, Checkpoint, TrainerState};
use candle_rlhf::io;
use candle_rlhf::{Config, Error, HostRng};
use std::fs;
use std::path::Path;

fn save_step(run_dir: &Path, step: u64, value: f32, keep: Option<usize>) -> std::path::PathBuf {
    let weights = vec![(
        "w".to_string(),
        Tensor::new(&[value, value], &Device::Cpu).unwrap(),
    )];
    let state = TrainerState {
        step,
        rngs: [("data".to_string(), HostRng::new(step))].into(),
        ..Default::default()
    };
    let manifest = Manifest::new("test", &Config::default(), "cpu");
    let config = serde_json::json!({"model_type": "toy", "hidden_size": 2});
    checkpoint::save(
        run_dir,
        &Checkpoint {
            weights: &weights,
            model_config: Some(&config),
            tokenizer_files: &[],
            extra_weights: &[],
            optimizer: None,
            state: &state,
            manifest: &manifest,
            lora: None,
        },
        keep,
    )
    .unwrap()
}

fn weight_of(dir: &Path) -> Vec<f32> {
    let t = io::load_safetensors(&dir.join(checkpoint::WEIGHTS_FILE), &Device::Cpu).unwrap();
    t["w"].to_vec1().unwrap()
}

#[test]
fn checkpoint_holds_hf_layout_state_and_manifest() {
    let run = tempfile::tempdir().unwrap();
    let dir = save_step(run.path(), 7, 1.5, None);
    assert_eq!(dir, run.path().join("checkpoints").join("7"));
    assert_eq!(weight_of(&dir), vec![1.5, 1.5]);
    let state: TrainerState = io::read_json(&dir.join(checkpoint::TRAINER_STATE_FILE)).unwrap();
    assert_eq!(state.step, 7);
    assert_eq!(state.rngs["data"], HostRng::new(7));
    let manifest: Manifest = io::read_json(&dir.join(checkpoint::MANIFEST_FILE)).unwrap();
    assert_eq!(manifest.seed, 42);
    assert!(manifest.threads >= 1);
    let config: serde_json::Value = io::read_json(&dir.join("config.json")).unwrap();
    assert_eq!(config["model_type"], "toy");
    // transformers refuses safetensors without `format` metadata.
    let bytes = fs::read(dir.join(checkpoint::WEIGHTS_FILE)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
}

#[test]
fn a_write_that_dies_midway_leaves_the_previous_checkpoint_whole() {
    let run = tempfile::tempdir().unwrap();
    save_step(run.path(), 1, 1.0, None);

    // A write that fails halfway: one file written, then an error.
    let err = checkpoint::write_atomically(run.path(), 2, |tmp| {
        fs::write(tmp.join(checkpoint::WEIGHTS_FILE), b"half a file").unwrap();
        Err(Error::Msg("disk full".into()))
    })
    .unwrap_err();
    assert!(err.to_string().contains("disk full"));
    let (step, dir) = checkpoint::latest(run.path()).unwrap().unwrap();
    assert_eq!(step, 1);
    assert_eq!(weight_of(&dir), vec![1.0, 1.0]);

    // A process killed midway leaves its temporary directory behind, and a
    // directory named by a step but without trainer_state.json is not complete.
    let killed = run.path().join("checkpoints").join(".tmp-3-99999");
    fs::create_dir_all(&killed).unwrap();
    fs::write(killed.join(checkpoint::WEIGHTS_FILE), b"partial").unwrap();
    fs::create_dir_all(run.path().join("checkpoints").join("4")).unwrap();
    assert_eq!(checkpoint::latest(run.path()).unwrap().unwrap().0, 1);

    // The next write cleans the leftovers and publishes its own.
    save_step(run.path(), 5, 5.0, None);
    assert!(!killed.exists());
    let steps: Vec<u64> = checkpoint::list(run.path())
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, vec![1, 5]);
}

#[test]
fn keeps_the_last_k_and_resaving_a_step_replaces_it() {
    let run = tempfile::tempdir().unwrap();
    for step in 1..=5 {
        save_step(run.path(), step * 10, step as f32, Some(2));
    }
    let steps: Vec<u64> = checkpoint::list(run.path())
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, vec![40, 50], "numeric order, not string order");
    let dir = save_step(run.path(), 50, 9.0, Some(2));
    assert_eq!(weight_of(&dir), vec![9.0, 9.0]);
    assert_eq!(checkpoint::list(run.path()).unwrap().len(), 2);
}

#[test]
fn a_corrupt_weights_file_is_named() {
    let run = tempfile::tempdir().unwrap();
    let dir = save_step(run.path(), 1, 1.0, None);
    let path = dir.join(checkpoint::WEIGHTS_FILE);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = io::load_safetensors(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && !err.contains('\n'),
        "{err}"
    );
}
