//! What the online engine measures: phase times, one accumulator of the
//! per-micro-batch loss diagnostics keyed by metric name, and the small
//! statistics the metrics use.

/// Wall-clock seconds of one iteration's phases (or their sums).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct PhaseTimes {
    /// 1. Sampling the completions (KV-cached decoding).
    pub generate_s: f64,
    /// 2. Policy, reference and value forwards over the rollouts.
    pub forward_s: f64,
    /// 3. The reward functions: decoding and scoring.
    pub score_s: f64,
    /// 6. The passes of forward, backward and optimizer steps.
    pub update_s: f64,
    /// The whole iteration, including advantages and bookkeeping.
    pub total_s: f64,
}

impl std::fmt::Display for PhaseTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "generation {:.2} s, forwards {:.2} s, scoring {:.2} s, updates {:.2} s",
            self.generate_s, self.forward_s, self.score_s, self.update_s
        )
    }
}

impl std::ops::AddAssign for PhaseTimes {
    fn add_assign(&mut self, o: Self) {
        self.generate_s += o.generate_s;
        self.forward_s += o.forward_s;
        self.score_s += o.score_s;
        self.update_s += o.update_s;
        self.total_s += o.total_s;
    }
}

/// The per-micro-batch diagnostics of one iteration, by metric name, in
/// the order first seen; each is logged as its mean over the micro-batches
/// that reported it.
#[derive(Default)]
pub(crate) struct Stats(Vec<(String, Vec<f64>)>);

impl Stats {
    /// Adds one micro-batch's value of `name`.
    pub(crate) fn add(&mut self, name: &str, value: f64) {
        match self.0.iter_mut().find(|(k, _)| k == name) {
            Some((_, values)) => values.push(value),
            None => self.0.push((name.to_string(), vec![value])),
        }
    }

    /// Adds every value of another accumulator (a part of the same micro-batch).
    pub(crate) fn absorb(&mut self, other: Stats) {
        for (k, values) in other.0 {
            for v in values {
                self.add(&k, v);
            }
        }
    }

    /// Each value summed element-wise over the ranks (the ranks report the
    /// same names as often: one per micro-batch; each value is already its
    /// rank's share).
    pub(crate) fn over_ranks(&mut self) {
        let world = crate::dist::world();
        if world.is_single() {
            return;
        }
        let mut flat: Vec<f64> = self.0.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        world.sum(&mut flat);
        let mut it = flat.into_iter();
        for (_, values) in self.0.iter_mut() {
            for v in values.iter_mut() {
                *v = it.next().expect("as many values as before");
            }
        }
    }

    /// Every value of `name` so far.
    pub(crate) fn values(&self, name: &str) -> &[f64] {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or(&[], |(_, v)| v.as_slice())
    }

    pub(crate) fn figures(&self) -> Vec<(String, f64)> {
        self.0.iter().map(|(k, v)| (k.clone(), mean(v))).collect()
    }
}

pub(crate) fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Unbiased standard deviation (torch's `std`); 0 for one value.
pub(crate) fn std(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// The unbiased variance of per-micro-batch values (PPO's `val/ratio_var`).
pub(crate) fn var(x: &[f64]) -> f64 {
    std(x).powi(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_average_each_name_over_its_own_reports() {
        let mut s = Stats::default();
        s.add("loss", 1.0);
        s.add("kl", 0.5);
        s.add("loss", 3.0);
        assert_eq!(
            s.figures(),
            vec![("loss".to_string(), 2.0), ("kl".to_string(), 0.5)]
        );
        assert_eq!(s.values("loss"), &[1.0, 3.0]);
        assert!(s.values("absent").is_empty());
    }

    #[test]
    fn std_and_var_are_torch_unbiased() {
        // torch.tensor([1., 2., 4.]).std() = 1.5275252
        assert!((std(&[1.0, 2.0, 4.0]) - 1.527_525_2).abs() < 1e-6);
        assert!((var(&[1.0, 2.0, 4.0]) - 7.0 / 3.0).abs() < 1e-12);
        assert_eq!(std(&[5.0]), 0.0);
    }
}
