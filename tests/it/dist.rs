//! Data parallelism over MPI (built with `--features mpi`; .ci/run installs
//! OpenMPI and runs these with `mpirun -np 2`, one thread per rank):
//! 2 ranks x per-device batch 8 train what 1 rank x 16 trains (reward, sft,
//! grpo); a GRPO command reward scores the same completions the same; a
//! killed rank stops the job and `--resume` completes it bit-identically;
//! a scorer failing on rank 1 stops both ranks with its message.
//!
//! The model is tiny-llama (no biases): a parameter whose true gradient is
//! exactly zero (GPT-2's key biases under softmax's shift invariance, a
//! final LayerNorm bias under the Bradley-Terry loss) gets rounding noise
//! as its gradient, which AdamW scales up to a full step, and any other
//! order of summation (more ranks, more micro-batches) moves it elsewhere.
//! The learning rate is 1e-4 for the same reason: AdamW's update scales
//! the last bits of a small gradient to the learning rate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_rlhf::app::fixtures;

use crate::models::{fixtures_root, model_dir};

/// `np` ranks of the binary: under mpirun (as root, more ranks than cores
/// allowed), or the plain binary for one rank (no MPI at all).
fn ranks(np: usize) -> Command {
    if np == 1 {
        return Command::new(crate::bin());
    }
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ])
    .arg(crate::bin());
    c
}

fn quoted(p: &Path) -> String {
    format!("{:?}", p.to_string_lossy())
}

/// `candle-rlhf <command>` on `np` ranks with the tiny preset's config,
/// tiny-llama, one thread per rank, and `sets`.
fn train(np: usize, command: &str, preset: &str, out: &Path, sets: &[String]) -> Command {
    let mut c = ranks(np);
    c.env_remove("RUST_BACKTRACE")
        .arg(command)
        .arg("--config")
        .arg(crate::repo().join("configs").join(preset))
        .args(["--out", &out.to_string_lossy()]);
    let common = [
        format!("model.name_or_path={}", quoted(&model_dir("tiny-llama"))),
        "run.threads=1".to_string(),
        "train.learning_rate=1e-4".to_string(),
        "train.max_steps=4".to_string(),
        "train.save_steps=4".to_string(),
        "train.logging_steps=1".to_string(),
    ];
    for s in common.iter().chain(sets) {
        c.args(["--set", s]);
    }
    c
}

fn succeed(c: &mut Command) -> String {
    let o = c.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{c:?}\n{}{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn tensors(path: &Path) -> HashMap<String, Vec<f32>> {
    let t = candle_rlhf::io::load_safetensors(path, &candle_core::Device::Cpu).unwrap();
    t.into_iter()
        .map(|(k, v)| {
            let v = v.to_dtype(candle_core::DType::F32).unwrap();
            (k, v.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect()
}

/// Every tensor of `file` in two checkpoints within `tol` x the tensor's
/// largest magnitude; returns the worst ratio seen.
fn same_weights(a: &Path, b: &Path, file: &str, tol: f64) -> f64 {
    let (a, b) = (tensors(&a.join(file)), tensors(&b.join(file)));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for (name, x) in &a {
        let y = &b[name];
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs())) as f64;
        let rel = diff / scale.max(1e-30);
        assert!(
            rel <= tol,
            "{file}: {name} differs by {rel:e} of its largest value"
        );
        worst = worst.max(rel);
    }
    worst
}

/// Every logged value of the keys containing "loss" (eval_loss, loss,
/// loss/policy_avg, ...), step by step.
fn losses(run: &Path) -> Vec<(String, f64)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for (k, x) in v.as_object().unwrap() {
            if let (true, Some(x)) = (k.contains("loss"), x.as_f64()) {
                out.push((format!("{k} at step {}", v["step"]), x));
            }
        }
    }
    out
}

/// The logged losses within 1e-6 relative. GRPO's loss at the sampling
/// policy is a mean of advantages that sum to zero: its value is f32
/// rounding of terms of order 1 (about 1e-7), so it is compared against
/// 1e-6 x max(|loss|, 0.01).
fn same_losses(a: &Path, b: &Path) {
    let (a, b) = (losses(a), losses(b));
    assert!(!a.is_empty());
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    for ((k, x), (_, y)) in a.iter().zip(&b) {
        let rel = (x - y).abs() / x.abs().max(y.abs()).max(0.01);
        assert!(rel <= 1e-6, "{k}: {x} on 1 rank, {y} on 2 ({rel:e})");
    }
}

/// 1 rank x per-device batch 16 against 2 ranks x 8, four optimizer steps.
fn one_rank_against_two(command: &str, preset: &str, sets: &[String]) -> (PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap().keep();
    let (one, two) = (tmp.join("one"), tmp.join("two"));
    let with = |b: usize| {
        let mut s = sets.to_vec();
        s.push(format!("train.per_device_train_batch_size={b}"));
        s
    };
    succeed(&mut train(1, command, preset, &one, &with(16)));
    succeed(&mut train(2, command, preset, &two, &with(8)));
    let ckpt = |d: &Path| d.join("checkpoints/4");
    let worst = same_weights(&ckpt(&one), &ckpt(&two), "model.safetensors", 1e-5);
    eprintln!("{command}: 1 rank x 16 against 2 ranks x 8: weights within {worst:e}");
    same_losses(&one, &two);
    (one, two)
}

#[test]
fn two_ranks_train_the_reward_model_one_rank_trains() {
    let data = fixtures_root().join(fixtures::PREFERENCES);
    let (one, two) = one_rank_against_two(
        "reward",
        "reward-tiny.toml",
        &[format!("reward.dataset={}", quoted(&data))],
    );
    // The evaluation, each rank on its part of the pairs, is one rank's.
    let eval = |d: &Path| {
        let m = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        assert!(m.contains("eval_accuracy"), "{m}");
    };
    eval(&one);
    eval(&two);
}

#[test]
fn two_ranks_fine_tune_what_one_rank_does() {
    let data = fixtures_root().join(fixtures::SFT_ROWS);
    one_rank_against_two(
        "sft",
        "sft-tiny.toml",
        &[format!("sft.dataset={}", quoted(&data))],
    );
}

/// A shell scorer whose reward depends on the completion (its JSON line's
/// length mod 5); it appends each (reward, line) to `log`.<rank>.
fn logging_scorer(log: &Path) -> String {
    let script = r#"while IFS= read -r l; do r=$(( ${#l} % 5 )); printf "%s\t%s\n" "$r" "$l" >> "$0.$OMPI_COMM_WORLD_RANK"; echo $r; done"#;
    format!(
        "reward_funcs=[{{name = \"judge\", type = \"command\", command = ['sh', '-c', '{script}', {}]}}]",
        quoted(log)
    )
}

fn grpo_sets(scorer: String) -> Vec<String> {
    vec![
        format!(
            "grpo.dataset={}",
            quoted(&fixtures_root().join(fixtures::PREFERENCES))
        ),
        format!("grpo.eval_dataset={}", quoted(&crate::ppo::eval_prompts())),
        "grpo.num_sample_generations=4".into(),
        "grpo.beta=0.05".into(),
        scorer,
    ]
}

/// Every line a scorer logged, sorted: (reward, the completion's JSON).
fn scored(log: &Path) -> Vec<String> {
    let dir = log.parent().unwrap();
    let stem = log.file_name().unwrap().to_string_lossy().into_owned();
    let mut lines: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&stem))
        .flat_map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap();
            text.lines().map(str::to_string).collect::<Vec<_>>()
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn two_ranks_sample_score_and_train_what_one_rank_does_in_grpo() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = |n: &str| {
        let d = tmp.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d.join("scored")
    };
    let (log1, log2) = (logs("log1"), logs("log2"));
    let tmp1 = tempfile::tempdir().unwrap().keep();
    let (one, two) = (tmp1.join("one"), tmp1.join("two"));
    let sets = |log: &Path, b: usize| {
        let mut s = grpo_sets(logging_scorer(log));
        s.push(format!("train.per_device_train_batch_size={b}"));
        s
    };
    succeed(&mut train(
        1,
        "grpo",
        "grpo-tiny.toml",
        &one,
        &sets(&log1, 16),
    ));
    succeed(&mut train(
        2,
        "grpo",
        "grpo-tiny.toml",
        &two,
        &sets(&log2, 8),
    ));
    // The same completions, each scored once, with the same reward: rank
    // 1 sampled and scored rows 8-15 of each batch as one rank did.
    let (s1, s2) = (scored(&log1), scored(&log2));
    assert_eq!(
        s1.len(),
        4 * 16 + 2 * 32 * 4,
        "4 batches of 16, 2 evaluations of 32 x 4"
    );
    assert_eq!(s1, s2, "the scored completions differ");
    assert!(
        s1.iter()
            .map(|l| &l[..1])
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 2,
        "the rewards vary"
    );
    // The same advantages (samples.jsonl), weights, losses and evaluations.
    let samples = |d: &Path| std::fs::read_to_string(d.join("samples.jsonl")).unwrap();
    let advantages = |d: &Path| -> Vec<f64> {
        (samples(d).lines())
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["advantage"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    // samples.jsonl spreads its rows over the batch: rank 1's part too.
    let (a1, a2) = (advantages(&one), advantages(&two));
    assert_eq!(a1.len(), a2.len());
    assert_eq!(a1.len(), 4 * 8, "8 rows of each of the 4 batches");
    assert!(a1.iter().any(|a| a.abs() > 0.1), "{a1:?}");
    for (x, y) in a1.iter().zip(&a2) {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} {y}");
    }
    let ckpt = |d: &Path| d.join("checkpoints/4");
    same_weights(&ckpt(&one), &ckpt(&two), "model.safetensors", 1e-5);
    same_losses(&one, &two);
    let eval = |d: &Path| {
        let text = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        (text.lines())
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["eval/reward"].as_f64()
            })
            .collect::<Vec<f64>>()
    };
    assert_eq!(eval(&one).len(), 2);
    assert_eq!(eval(&one), eval(&two));
}

/// The ranks mpirun started for the job `mpirun_pid` (its children).
fn children(mpirun_pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so read after ')'.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid == mpirun_pid {
            out.push(pid);
        }
    }
    out
}

fn wait_for(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < limit,
            "the job did not stop within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_rank_stops_the_job_and_resume_completes_it_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = |log: &str| {
        let mut s = grpo_sets(logging_scorer(&tmp.path().join(log)));
        s.retain(|k| !k.starts_with("grpo.eval_dataset"));
        s.extend([
            "train.per_device_train_batch_size=8".to_string(),
            "train.max_steps=60".to_string(),
            "train.save_steps=1".to_string(),
        ]);
        s
    };
    let killed = tmp.path().join("killed");
    let mut job = train(2, "grpo", "grpo-tiny.toml", &killed, &sets("a"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = killed.join("checkpoints/3/trainer_state.json");
    let started = Instant::now();
    while !marker.exists() {
        assert!(started.elapsed().as_secs() < 300, "no checkpoint 3");
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before a rank was killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let ranks_pids = children(job.id());
    assert_eq!(ranks_pids.len(), 2, "{ranks_pids:?}");
    let killed_at = Instant::now();
    let kill = Command::new("sh")
        .args(["-c", &format!("kill -9 {}", ranks_pids[1])])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_for(&mut job, Duration::from_secs(60));
    assert!(!status.success(), "the job exits non-zero");
    eprintln!(
        "the job stopped {:?} after a rank was killed",
        killed_at.elapsed()
    );
    // Resuming on another number of ranks is refused, naming both.
    let o = train(1, "grpo", "grpo-tiny.toml", &killed, &sets("a"))
        .arg("--resume")
        .arg(&killed)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("ran on 2 rank(s), this one on 1"),
        "{err}"
    );
    // On 2 ranks it completes, to the weights of a job never stopped.
    let mut resume = train(2, "grpo", "grpo-tiny.toml", &killed, &sets("a"));
    let out = succeed(resume.arg("--resume").arg(&killed));
    assert!(out.contains("iterations: 60"), "{out}");
    let straight = tmp.path().join("straight");
    succeed(&mut train(
        2,
        "grpo",
        "grpo-tiny.toml",
        &straight,
        &sets("a"),
    ));
    let read = |d: &Path| std::fs::read(d.join("checkpoints/60/model.safetensors")).unwrap();
    assert!(
        read(&killed) == read(&straight),
        "resumed after a kill differs"
    );
}

#[test]
fn a_scorer_failing_on_rank_1_stops_both_ranks_with_its_message() {
    let tmp = tempfile::tempdir().unwrap();
    // Rank 1's rows (8-15 of each batch) only: the row in the message.
    let script = r#"while IFS= read -r l; do [ "$OMPI_COMM_WORLD_RANK" = 1 ] && { echo "cannot score $l" >&2; exit 3; }; echo 1; done"#;
    let mut sets = grpo_sets(format!(
        "reward_funcs=[{{name = \"judge\", type = \"command\", command = ['sh', '-c', '{script}']}}]"
    ));
    sets.retain(|k| !k.starts_with("grpo.eval_dataset"));
    sets.push("train.per_device_train_batch_size=8".into());
    let out = tmp.path().join("run");
    let mut job = train(2, "grpo", "grpo-tiny.toml", &out, &sets)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(&mut job, Duration::from_secs(60));
    let Output { stderr, .. } = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&stderr);
    assert!(!status.success());
    for want in [
        "rank 1 of 2",
        "reward function `judge`",
        "scoring completions 8..16 of 16",
        "cannot score {",
        "\"prompt\":",
        "iteration 1 (prompts of ",
        fixtures::PREFERENCES,
    ] {
        assert!(err.contains(want), "no {want:?} in:\n{err}");
    }
}

#[test]
fn ranks_with_different_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures_root().join(fixtures::PREFERENCES);
    let args = |lr: &str| {
        let c = train(
            1,
            "reward",
            "reward-tiny.toml",
            &tmp.path().join("run"),
            &[
                format!("reward.dataset={}", quoted(&data)),
                format!("train.learning_rate={lr}"),
            ],
        );
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    // MPMD: rank 0 and rank 1 with one --set apart.
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "1"])
        .arg(crate::bin())
        .args(args("1e-4"))
        .arg(":")
        .args(["-np", "1"])
        .arg(crate::bin())
        .args(args("2e-4"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("the config (--config and --set) differs between rank 0 and rank(s) 1 of 2"),
        "{err}"
    );
}
