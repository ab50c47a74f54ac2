//! What the online trainers measure: phase times, the per-micro-batch
//! loss diagnostics of PPO and of GRPO/RLOO, and the small statistics their
//! metrics use.

/// Wall-clock seconds of one PPO update's phases (or their sums).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct PhaseTimes {
    /// Sampling the responses (KV-cached decoding).
    pub generate_s: f64,
    /// Policy, reference and value forwards over the rollouts.
    pub forward_s: f64,
    /// The reward: decoding and the reward model's forward.
    pub score_s: f64,
    /// num_ppo_epochs of forward, backward and optimizer steps.
    pub update_s: f64,
    /// The whole update, including advantages and bookkeeping.
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

/// Sums of the per-micro-batch diagnostics of one update.
#[derive(Default)]
pub(crate) struct UpdateStats {
    pub(crate) n: usize,
    pub(crate) approxkl: f64,
    pub(crate) clipfrac: f64,
    pub(crate) pg_loss: f64,
    pub(crate) vf_loss: f64,
    pub(crate) vf_clipfrac: f64,
    pub(crate) entropy: f64,
    pub(crate) ratios: Vec<f64>,
}

impl UpdateStats {
    /// Adds another micro-batch's (or part's) figures.
    pub(crate) fn absorb(&mut self, other: UpdateStats) {
        self.n += other.n;
        self.approxkl += other.approxkl;
        self.clipfrac += other.clipfrac;
        self.pg_loss += other.pg_loss;
        self.vf_loss += other.vf_loss;
        self.vf_clipfrac += other.vf_clipfrac;
        self.entropy += other.entropy;
        self.ratios.extend(other.ratios);
    }

    pub(crate) fn figures(&self) -> Vec<(String, f64)> {
        let n = self.n.max(1) as f64;
        let ratio = self.ratios.iter().sum::<f64>() / n;
        let ratio_var = if self.ratios.len() > 1 {
            self.ratios.iter().map(|r| (r - ratio).powi(2)).sum::<f64>()
                / (self.ratios.len() - 1) as f64
        } else {
            0.0
        };
        vec![
            ("policy/approxkl_avg".into(), self.approxkl / n),
            ("policy/clipfrac_avg".into(), self.clipfrac / n),
            ("loss/policy_avg".into(), self.pg_loss / n),
            ("loss/value_avg".into(), self.vf_loss / n),
            ("val/clipfrac_avg".into(), self.vf_clipfrac / n),
            ("policy/entropy_avg".into(), self.entropy / n),
            ("val/ratio".into(), ratio),
            ("val/ratio_var".into(), ratio_var),
        ]
    }
}

/// Sums of the per-micro-batch loss diagnostics of one iteration.
#[derive(Default)]
pub(crate) struct LossStats {
    pub(crate) n: usize,
    pub(crate) loss: f64,
    pub(crate) entropy: f64,
    pub(crate) kl: f64,
    pub(crate) has_kl: bool,
    pub(crate) low: f64,
    pub(crate) high: f64,
    pub(crate) region: f64,
}

impl LossStats {
    pub(crate) fn absorb(&mut self, o: LossStats) {
        self.n += o.n;
        self.loss += o.loss;
        self.entropy += o.entropy;
        self.kl += o.kl;
        self.has_kl |= o.has_kl;
        self.low += o.low;
        self.high += o.high;
        self.region += o.region;
    }

    pub(crate) fn figures(&self) -> Vec<(String, f64)> {
        let n = self.n.max(1) as f64;
        let mut f = vec![
            ("loss".into(), self.loss / n),
            ("entropy".into(), self.entropy / n),
            ("clip_ratio/low_mean".into(), self.low / n),
            ("clip_ratio/high_mean".into(), self.high / n),
            ("clip_ratio/region_mean".into(), self.region / n),
        ];
        if self.has_kl {
            f.push(("kl".into(), self.kl / n));
        }
        f
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
