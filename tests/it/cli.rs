//! The real binary: exit codes, one-line errors, plot.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_candle-rlhf"))
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
        "generate", "sft", "reward", "ppo", "score", "eval", "plot", "demo", "bench",
    ] {
        assert!(out.contains(sub), "{sub} missing from:\n{out}");
    }
}

#[test]
fn subcommands_not_ready_say_so_and_exit_2() {
    let (code, _, err) = run(bin().arg("bench"));
    assert_eq!(code, 2, "bench: {err}");
    assert!(err.contains("not ready"), "bench: {err}");
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
