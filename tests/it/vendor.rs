//! The patched candle-core (vendor/README.md) is the one in use, and the
//! candle crates are pinned to the version it was made from: a Candle
//! upgrade that silently drops the patch fails here.

use candle_core::{Device, Tensor, Var};

/// Upstream's store adds each first gradient to fresh zeros, and
/// 0.0 + -0.0 = +0.0; the patched one stores it as it comes. So a gradient
/// of -0.0 keeps its sign only with the patch.
#[test]
fn the_patched_gradient_store_is_in_use() {
    let x = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let z = Tensor::new(&[-0.0f32, 3.0], &Device::Cpu).unwrap();
    let loss = (x.as_tensor() * &z).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(&x).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(g, vec![0.0, 3.0]);
    assert!(
        g[0].is_sign_negative(),
        "the gradient -0.0 became +0.0: Cargo is not using vendor/candle-core's patched store \
         (look for \"patch was not used\" in cargo's output)"
    );
}

/// candle-core, candle-nn and candle-transformers are pinned (`=X`) to the
/// version vendor/candle-core is a copy of, the one scripts/vendor_candle.sh
/// downloads.
#[test]
fn candle_pins_match_the_vendored_version() {
    let repo = crate::repo();
    let read = |p: &str| std::fs::read_to_string(repo.join(p)).unwrap();
    let vendored: toml::Value = toml::from_str(&read("vendor/candle-core/Cargo.toml")).unwrap();
    let version = vendored["package"]["version"].as_str().unwrap().to_string();
    let script = read("scripts/vendor_candle.sh");
    assert!(
        script.contains(&format!("\nVERSION={version}\n")),
        "scripts/vendor_candle.sh vendors another version than {version}"
    );
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let want = format!("={version}");
    for (table, krate) in [
        ("dependencies", "candle-core"),
        ("dependencies", "candle-nn"),
        ("dev-dependencies", "candle-transformers"),
    ] {
        let got = manifest[table][krate].as_str().unwrap_or_default();
        assert_eq!(
            got, want,
            "Cargo.toml's {krate} must be pinned to {want}, vendor/candle-core's version"
        );
    }
    let patched = manifest["patch"]["crates-io"]["candle-core"]["path"].as_str();
    assert_eq!(patched, Some("vendor/candle-core"));
}
