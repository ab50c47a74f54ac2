//! Records the git commit the binary is built from, for run manifests, and
//! checks that a `--features mkl` build has a local MKL to link.
use std::path::Path;
use std::process::Command;

fn main() {
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    check_mkl();
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok());
    if let Some(commit) = commit {
        println!("cargo:rustc-env=CANDLE_RLHF_GIT_COMMIT={}", commit.trim());
    }
}

/// Candle's `mkl` feature builds intel-mkl-src, which links the MKL it finds
/// under $MKLROOT (or through pkg-config) and otherwise tries a download from
/// ghcr.io that fails offline and leaves only a link error about `sgemm_`.
/// Say what to do instead, before that happens.
fn check_mkl() {
    println!("cargo:rerun-if-env-changed=MKLROOT");
    if std::env::var_os("CARGO_FEATURE_MKL").is_none() {
        return;
    }
    let found = std::env::var_os("MKLROOT").is_some_and(|root| Path::new(&root).is_dir());
    if !found {
        panic!(
            "--features mkl needs a local MKL: run scripts/fetch_mkl.sh, then \
             `export MKLROOT=$PWD/.mkl` and build again (README, \"A BLAS build\")"
        );
    }
}
