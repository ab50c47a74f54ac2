//! Learning-rate schedules with linear warmup, as transformers'
//! `get_scheduler` defines them: the rate for optimizer step `s` (0-based)
//! is `learning_rate * factor(s)`.

use crate::config::LrSchedulerType;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: LrSchedulerType,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn from_config(train: &crate::config::TrainConfig, total_steps: u64) -> Self {
        Self {
            kind: train.lr_scheduler_type,
            base_lr: train.learning_rate,
            warmup_steps: train.warmup_steps_for(total_steps),
            total_steps,
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        let (s, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if self.kind == LrSchedulerType::Constant {
            return 1.0; // transformers' "constant" has no warmup
        }
        if step < self.warmup_steps {
            return s / warmup.max(1.0);
        }
        let progress = (s - warmup) / (total - warmup).max(1.0);
        match self.kind {
            LrSchedulerType::Constant | LrSchedulerType::ConstantWithWarmup => 1.0,
            LrSchedulerType::Linear => ((total - s) / (total - warmup).max(1.0)).max(0.0),
            // Half a cosine period from 1 to 0 (num_cycles = 0.5).
            LrSchedulerType::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LrSchedulerType::*;

    fn sched(kind: LrSchedulerType) -> LrSchedule {
        LrSchedule {
            kind,
            base_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
        }
    }

    #[test]
    fn warmup_rises_linearly_from_zero() {
        for kind in [ConstantWithWarmup, Linear, Cosine] {
            let s = sched(kind);
            assert_eq!(s.lr(0), 0.0);
            assert!((s.lr(5) - 0.5).abs() < 1e-12);
            assert!(
                (s.lr(10) - 1.0).abs() < 1e-12,
                "{kind:?} peaks at the end of warmup"
            );
        }
        assert_eq!(sched(Constant).lr(0), 1.0);
    }

    #[test]
    fn decays_reach_their_turning_points() {
        let lin = sched(Linear);
        assert!((lin.lr(60) - 0.5).abs() < 1e-12); // halfway through decay
        assert_eq!(lin.lr(110), 0.0);
        assert_eq!(lin.lr(500), 0.0); // never negative past the end
        let cos = sched(Cosine);
        assert!((cos.lr(60) - 0.5).abs() < 1e-12); // cos(pi/2)
        assert!((cos.lr(35) - (0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos()))).abs() < 1e-12);
        assert!(cos.lr(110).abs() < 1e-12);
        assert_eq!(sched(ConstantWithWarmup).lr(109), 1.0);
    }

    #[test]
    fn warmup_from_ratio_rounds_up_like_transformers() {
        let mut t = crate::config::TrainConfig {
            warmup_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(LrSchedule::from_config(&t, 25).warmup_steps, 3); // ceil(2.5)
        t.warmup_steps = 7;
        assert_eq!(LrSchedule::from_config(&t, 25).warmup_steps, 7);
    }
}
