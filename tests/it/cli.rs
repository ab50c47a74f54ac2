//! The real binary: exit codes, one-line errors, plot.

use std::process::Command;

fn bin() -> Command {
    Command::new(crate::bin())
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.env_remove("RUST_BACKTRACE").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_subcommand() {
    let (code, out, _) = run(bin().arg("--help"));
    assert_eq!(code, 0);
    for sub in [
        "generate", "sft", "reward", "ppo", "grpo", "rloo", "score", "eval", "plot", "demo",
        "bench",
    ] {
        assert!(out.contains(sub), "{sub} missing from:\n{out}");
    }
}

#[test]
fn bench_measures_every_part_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let (code, out, err) = run(bin()
        .args([
            "bench",
            "--model",
            "configs/models/tiny.toml",
            "--iters",
            "1",
            "--warmup",
            "0",
        ])
        .args(["--threads", "1", "--work-dir"])
        .arg(dir.path().join("work"))
        .arg("--json")
        .arg(&json));
    assert_eq!(code, 0, "{err}");
    for row in [
        "reward step, 8 pairs x 64 tokens",
        "generate, batch 1,",
        "generate, batch 16,",
        "PPO iteration, batch 16",
    ] {
        assert!(out.contains(row), "{row} missing from:\n{out}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["threads"], 1, "--threads sets the thread count");
    assert_eq!(report["shape"], "tiny");
    let positive = |v: &serde_json::Value| v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite());
    assert!(
        positive(&report["reward"]["step_s"]) && positive(&report["reward"]["peak_rss_mb"]),
        "{report}"
    );
    assert_eq!(report["generate"].as_array().unwrap().len(), 2);
    assert!(positive(&report["generate"][1]["tokens_per_s"]), "{report}");
    let ppo = &report["ppo"]["iteration"];
    let phases: f64 = ["generate_s", "forward_s", "score_s", "update_s"]
        .iter()
        .map(|k| ppo[k].as_f64().unwrap())
        .sum();
    let total = ppo["total_s"].as_f64().unwrap();
    assert!(
        phases > 0.0 && phases <= total,
        "phases {phases} within the iteration {total}"
    );
    // The parameters of the tiny GPT-2: its config.json's shapes.
    let (v, e, p, l) = (445, 64, 128, 2);
    let per_layer =
        2 * 2 * e + (3 * e * e + 3 * e) + (e * e + e) + (4 * e * e + 4 * e) + (4 * e * e + e);
    assert_eq!(report["parameters"], v * e + p * e + l * per_layer + 2 * e);

    // --batch-sizes replaces the shape's generation batch sizes.
    let (code, _, err) = run(bin()
        .args([
            "bench",
            "--parts",
            "generate",
            "--batch-sizes",
            "2,3",
            "--iters",
            "1",
        ])
        .args(["--warmup", "0", "--work-dir"])
        .arg(dir.path().join("work"))
        .arg("--json")
        .arg(&json));
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let sizes: Vec<u64> = report["generate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["batch_size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [2, 3]);
    let (code, _, err) = run(bin().args(["bench", "--batch-sizes", "0"]));
    assert_ne!(code, 0);
    assert!(err.contains("--batch-sizes"), "{err}");

    let (code, _, err) = run(bin().args(["bench", "--parts", "train"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown bench part `train`"), "{err}");
    let bad = dir.path().join("shape.toml");
    std::fs::write(
        &bad,
        "[config]\nmodel_type = \"gpt2\"\n[workload]\nreward_batch_size = 0\n",
    )
    .unwrap();
    let (code, _, err) = run(bin().args(["bench", "--model"]).arg(&bad));
    assert_ne!(code, 0);
    assert!(
        err.contains("shape.toml"),
        "the error names the file: {err}"
    );
}

#[test]
fn config_errors_are_one_line_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[ppo]\ncliprange = -1.0\n").unwrap();
    let (code, _, err) = run(bin().args(["ppo", "--config"]).arg(&path));
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("ppo.cliprange") && err.contains("must be > 0"),
        "{err}"
    );

    let (code, _, err) = run(bin().args(["reward", "--set", "train.lerning_rate=1"]));
    assert_eq!(code, 2);
    assert!(err.contains("did you mean `train.learning_rate`"), "{err}");

    let (code, _, err) = run(bin().args(["reward", "--config", "/no/such/file.toml"]));
    assert_eq!(code, 2, "a missing file is a usage error: {err}");
    assert!(err.contains("/no/such/file.toml"), "{err}");
}

#[test]
fn plot_draws_one_svg_per_metric_family() {
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (1..=20)
        .map(|s| {
            format!(
                "{{\"step\":{s},\"timestamp\":1.0,\"loss\":{},\"eval_loss\":{},\"objective/kl\":{},\"objective/entropy\":{}}}\n",
                1.0 / s as f64,
                1.2 / s as f64,
                0.01 * s as f64,
                2.0
            )
        })
        .collect();
    std::fs::write(dir.path().join("metrics.jsonl"), lines).unwrap();
    let (code, out, err) = run(bin().arg("plot").arg(dir.path()));
    assert_eq!(code, 0, "{err}");
    let mut files: Vec<String> = out
        .lines()
        .map(|l| l.rsplit('/').next().unwrap().to_string())
        .collect();
    files.sort();
    assert_eq!(files, vec!["loss.svg", "objective.svg"]);
    let svg = std::fs::read_to_string(dir.path().join("plots/objective.svg")).unwrap();
    assert!(
        svg.starts_with("<svg")
            && svg.contains("objective/kl")
            && svg.contains("objective/entropy")
    );
    assert!(
        svg.contains("<polyline") || svg.contains("<path"),
        "has a line"
    );

    let (code, _, err) = run(bin().arg("plot").arg(dir.path().join("nothing-here")));
    assert_eq!(code, 1);
    assert!(err.contains("metrics.jsonl"), "{err}");
}

#[test]
fn a_config_pointing_into_missing_fixtures_says_how_to_make_them() {
    // The fixture generator runs only when asked: in a directory without
    // fixtures/, the tiny preset is refused with the command that makes them.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(bin()
        .current_dir(dir.path())
        .args(["reward", "--config"])
        .arg(crate::repo().join("configs/reward-tiny.toml"))
        .args(["--device", "cpu"]));
    assert_ne!(code, 0);
    assert!(
        err.contains("fixtures/models/tiny-gpt2") && err.contains("candle-rlhf fixtures"),
        "{err}"
    );
    assert!(
        !dir.path().join("fixtures").exists(),
        "nothing was generated"
    );
}

#[test]
fn grpo_and_rloo_run_from_the_preset_and_save_a_loadable_policy() {
    use crate::models::{fixtures_root, model_dir};
    use candle_rlhf::app::fixtures;
    let tmp = tempfile::tempdir().unwrap();
    let quoted = |p: &std::path::Path| format!("{:?}", p.to_string_lossy());
    let data = quoted(&fixtures_root().join(fixtures::PREFERENCES));
    for algo in ["grpo", "rloo"] {
        let out = tmp.path().join(algo);
        let (code, stdout, err) = run(bin()
            .arg(algo)
            .arg("--config")
            .arg(crate::repo().join("configs/grpo-tiny.toml"))
            .args([
                "--set",
                &format!("model.name_or_path={}", quoted(&model_dir("tiny-gpt2"))),
            ])
            .args(["--set", &format!("{algo}.dataset={data}")])
            .args(["--set", &format!("{algo}.num_generations=4")])
            .args(["--set", "train.max_steps=2"])
            .args(["--out", &out.to_string_lossy()]));
        assert_eq!(code, 0, "{algo}: {err}{stdout}");
        assert!(
            stdout.contains("iterations: 2 (2 optimizer steps)"),
            "{stdout}"
        );
        let ckpt = out.join("checkpoints/2");
        for f in ["model.safetensors", "config.json", "tokenizer.json"] {
            assert!(ckpt.join(f).is_file(), "{algo}: {f}");
        }
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert!(
            metrics.contains("\"rewards/mentions_movie/mean\"")
                && metrics.contains("\"rewards/length/mean\"")
        );
    }
    // A reward function without the key its type needs: one line, exit 2.
    let (code, _, err) = run(bin()
        .arg("grpo")
        .arg("--config")
        .arg(crate::repo().join("configs/grpo-tiny.toml"))
        .args([
            "--set",
            "reward_funcs=[{name = \"x\", type = \"exact_match\"}]",
        ]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("reward_funcs[0].column") && err.lines().count() == 1,
        "{err}"
    );
}
