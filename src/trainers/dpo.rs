//! Direct Preference Optimization (Rafailov et al., 2023) and its loss
//! family, as TRL 1.12's DPOTrainer runs it: each micro-batch puts the
//! chosen and the rejected sequences of its pairs (prompt + completion,
//! chosen rows first) through the policy in one right-padded batch, sums
//! each completion's token log-probs, takes the reference's sums (a frozen
//! model, the LoRA base with adapters off, or precomputed once), and the
//! loss of `rl::dpo` on the log-ratios. Metrics carry TRL's names.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::online::stats::Stats;
use super::trained::{ModelFiles, Trained};
use crate::chat::TemplateSource;
use crate::checkpoint::{self, Manifest, TrainerState};
use crate::config::{Config, DpoLossType, TruncationMode};
use crate::data::batch::position_ids;
use crate::data::dpo::{prepare_pairs, sequence, DpoDataReport, DpoPair};
use crate::data::{self};
use crate::io;
use crate::metrics::Progress;
use crate::models::{tree_attention_bias, CausalLm, Linears};
use crate::optim::{StepOutcome, TrainCore};
use crate::rl::dpo::{dpo_loss, ld_weights, wpo_weights, DpoHyper, PairLogps};
use crate::rl::{token_figures, TokenFigures};
use crate::run::{checkpoint_if_due, RunDir};
use crate::signal::StopSignal;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The precomputed reference log-probs of a run: `RUN_DIR/ref_logps-<16 hex>.safetensors`,
/// the hex a fingerprint of what they depend on (the reference, its dtype,
/// the cut, LD-DPO's alpha and every pair's tokens), so a changed run never
/// reads another's figures.
pub fn ref_logps_path(run_dir: &Path, fingerprint: &str) -> PathBuf {
    run_dir.join(format!("ref_logps-{fingerprint}.safetensors"))
}

/// The fingerprint of [`ref_logps_path`].
fn ref_fingerprint(
    reference: &str,
    cfg: &Config,
    train: &[DpoPair],
    eval: &[DpoPair],
) -> Result<String> {
    use sha2::{Digest, Sha256};
    let d = &cfg.dpo;
    let what = json!({
        "reference": reference,
        "ref_dtype": d.ref_dtype.map(|x| format!("{x:?}")),
        "dtype": format!("{:?}", cfg.run.dtype),
        "max_length": d.max_length,
        "truncation_mode": d.truncation_mode,
        "ld_alpha": d.ld_alpha,
        "lora": cfg.lora.is_some(),
        "train": train,
        "eval": eval,
    });
    let digest = Sha256::digest(serde_json::to_vec(&what).map_err(|e| Error::Msg(e.to_string()))?);
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// What the loss and the batches read from `[dpo]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub losses: Vec<(DpoLossType, f64)>,
    pub hyper: DpoHyper,
    pub max_length: usize,
    pub mode: TruncationMode,
    pub ld_alpha: Option<f64>,
    pub use_weighting: bool,
}

impl Settings {
    pub fn of(cfg: &Config) -> Self {
        let d = &cfg.dpo;
        Self {
            losses: d.losses(),
            hyper: DpoHyper::of(d),
            max_length: d.max_length,
            mode: d.truncation_mode,
            ld_alpha: d.ld_alpha,
            use_weighting: d.use_weighting,
        }
    }

    fn has(&self, t: DpoLossType) -> bool {
        self.losses.iter().any(|(l, _)| *l == t)
    }
}

/// One micro-batch on the device. Each pair is one row holding its prompt
/// once, then the chosen and the rejected completion, each attending to the
/// prompt and to itself (a tree mask; positions restart after the prompt):
/// the prompt's tokens go through the model once instead of twice, as in
/// prefix-shared DPO (Wang et al., 2024), with the same values as two rows.
/// The LM head runs only at the positions whose next token is a completion
/// token; sequence sums are products with a (2B, N) membership matrix
/// (chosen sequences first, then rejected).
pub struct DpoBatch {
    pub pairs: usize,
    ids: Tensor,
    positions: Tensor,
    /// Per row token: 0 pad, 1 shared, 2 chosen, 3 rejected.
    branch: Vec<Vec<u8>>,
    /// The N flat (row x width) indices of the positions that predict a completion token.
    sel: Tensor,
    /// Those completion tokens (N,).
    labels: Tensor,
    /// (2B, N): 1 where the token is one of the sequence's completion tokens.
    member: Tensor,
    /// (2B, N): the membership with LD-DPO's weights.
    ld: Tensor,
    /// (2B,): each sequence's completion tokens, the first included (ipo's
    /// and sigmoid_norm's counts, TRL's unshifted completion mask).
    completion_tokens: Tensor,
    /// Real tokens of the two sequences of each pair (TRL's num_tokens).
    pub tokens: usize,
}

/// One sequence's entries: (position in the row predicting it, token).
type Entries = Vec<(usize, u32)>;

impl DpoBatch {
    /// The collated batch of `pairs`, cut as `s` says, one row per pair.
    pub fn new(pairs: &[&DpoPair], s: &Settings, pad: u32, device: &Device) -> Result<Self> {
        let mut rows = Vec::with_capacity(pairs.len());
        let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
        let (mut n_chosen, mut n_rejected) = (Vec::new(), Vec::new());
        let mut tokens = 0;
        let ones = |m: &[u8]| m.iter().filter(|&&x| x == 1).count() as f32;
        for p in pairs {
            let (c, c_mask) = sequence(&p.prompt, &p.chosen, s.max_length, s.mode);
            let (r, r_mask) = sequence(&p.prompt, &p.rejected, s.max_length, s.mode);
            tokens += c.len() + r.len();
            n_chosen.push(ones(&c_mask));
            n_rejected.push(ones(&r_mask));
            // The shared prefix: the prompt tokens both sequences start with.
            let shared = (0..c.len().min(r.len()))
                .take_while(|&i| c[i] == r[i] && c_mask[i] == 0 && r_mask[i] == 0)
                .count();
            let mut row: Vec<(u32, u8, u32)> = Vec::with_capacity(c.len() + r.len() - shared);
            row.extend((0..shared).map(|i| (c[i], 1, i as u32)));
            row.extend((shared..c.len()).map(|i| (c[i], 2, i as u32)));
            row.extend((shared..r.len()).map(|i| (r[i], 3, i as u32)));
            // The position predicting token t of a side: t - 1 in the row for
            // chosen; for rejected, t - 1 while shared, else after chosen's branch.
            let at_r = |u: usize| if u < shared { u } else { c.len() + u - shared };
            let entries = |ids: &[u32], mask: &[u8], at: &dyn Fn(usize) -> usize| -> Entries {
                (1..ids.len())
                    .filter(|&t| mask[t] == 1)
                    .map(|t| (at(t - 1), ids[t]))
                    .collect()
            };
            chosen.push(entries(&c, &c_mask, &|u| u));
            rejected.push(entries(&r, &r_mask, &at_r));
            rows.push(row);
        }
        let width = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut positions = Vec::with_capacity(rows.len() * width);
        let mut branch = Vec::with_capacity(rows.len());
        for row in &rows {
            let fill = width - row.len();
            ids.extend(
                row.iter()
                    .map(|x| x.0)
                    .chain(std::iter::repeat_n(pad, fill)),
            );
            positions.extend(row.iter().map(|x| x.2).chain(std::iter::repeat_n(0, fill)));
            branch.push(
                row.iter()
                    .map(|x| x.1)
                    .chain(std::iter::repeat_n(0, fill))
                    .collect(),
            );
        }
        let n = rows.len();
        let ids = Tensor::from_vec(ids, (n, width), device)?;
        let positions = Tensor::from_vec(positions, (n, width), device)?;
        let sequences: Vec<Entries> = chosen.into_iter().chain(rejected).collect();
        let counts = (tokens, [n_chosen, n_rejected].concat());
        Self::assemble(
            ids, positions, branch, width, &sequences, s.ld_alpha, counts, device,
        )
    }

    /// A batch of 2B unpadded rows `ids` (chosen then rejected, no sharing)
    /// with their completion masks: the collator's layout, as TRL's.
    pub fn from_rows(
        ids: Vec<Vec<u32>>,
        completion: Vec<Vec<u8>>,
        ld_alpha: Option<f64>,
        pad: u32,
        device: &Device,
    ) -> Result<Self> {
        let n = ids.len();
        let width = ids.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut flat = Vec::with_capacity(n * width);
        let mut branch = Vec::with_capacity(n);
        let mut sequences = Vec::with_capacity(n);
        for (r, (row, comp)) in ids.iter().zip(&completion).enumerate() {
            flat.extend(
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, width - row.len())),
            );
            let mut b = vec![1u8; row.len()];
            b.resize(width, 0);
            branch.push(b);
            let entries: Entries = (1..row.len())
                .filter(|&t| comp[t] == 1)
                .map(|t| (r * width + t - 1, row[t]))
                .collect();
            sequences.push(entries);
        }
        let positions = position_ids(&branch).concat();
        let tokens = ids.iter().map(Vec::len).sum();
        let n_completion = completion
            .iter()
            .map(|m| m.iter().filter(|&&x| x == 1).count() as f32);
        let counts = (tokens, n_completion.collect());
        let ids = Tensor::from_vec(flat, (n, width), device)?;
        let positions = Tensor::from_vec(positions, (n, width), device)?;
        // Entries above already index the flat (row x width) layout.
        let flat_width = 0;
        Self::assemble(
            ids, positions, branch, flat_width, &sequences, ld_alpha, counts, device,
        )
    }

    /// The batch from its rows and each sequence's entries (position in its
    /// pair's row, or a flat index when `width` is 0; sequence k < B is
    /// chosen of pair k, else rejected of pair k - B), with the real tokens
    /// and each sequence's completion tokens.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        ids: Tensor,
        positions: Tensor,
        branch: Vec<Vec<u8>>,
        width: usize,
        sequences: &[Entries],
        ld_alpha: Option<f64>,
        (tokens, completion_tokens): (usize, Vec<f32>),
        device: &Device,
    ) -> Result<Self> {
        let pairs = sequences.len() / 2;
        let total: usize = sequences.iter().map(Vec::len).sum();
        let (mut sel, mut labels) = (Vec::with_capacity(total), Vec::with_capacity(total));
        let mut member = vec![0f32; sequences.len() * total];
        let ones: Vec<Vec<f32>> = sequences.iter().map(|e| vec![1.0; e.len()]).collect();
        let weights = ld_weights(&ones, ld_alpha);
        let mut ld = vec![0f32; sequences.len() * total];
        for (k, entries) in sequences.iter().enumerate() {
            for (j, &(at, token)) in entries.iter().enumerate() {
                let row = if width == 0 {
                    0
                } else {
                    (k % pairs.max(1)) * width
                };
                member[k * total + sel.len()] = 1.0;
                ld[k * total + sel.len()] = weights[k][j];
                sel.push((row + at) as u32);
                labels.push(token);
            }
        }
        let table = |v: Vec<f32>| Tensor::from_vec(v, (sequences.len(), total), device);
        Ok(Self {
            pairs,
            ids,
            positions,
            branch,
            sel: Tensor::from_vec(sel, total, device)?,
            labels: Tensor::from_vec(labels, total, device)?,
            member: table(member)?,
            ld: table(ld)?,
            completion_tokens: Tensor::from_vec(completion_tokens, sequences.len(), device)?,
            tokens,
        })
    }

    /// The rows of flat (row x width, V) logits at the selected positions.
    pub fn select(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.index_select(&self.sel, 0)?)
    }

    /// What `lm`'s logits give at the selected positions (N rows), the
    /// head fused with the log-probs (no (N, V) logits held).
    fn figures(&self, lm: &CausalLm, weighting: bool) -> Result<TokenFigures> {
        let bias = tree_attention_bias(&self.branch, lm.dtype(), self.ids.device())?;
        let hidden = lm.forward(&self.ids, &self.positions, &bias, None)?;
        let (rows, width, e) = hidden.dims3()?;
        let picked = self.select(&hidden.reshape((rows * width, e))?)?;
        lm.token_figures(&picked, &self.labels, 1.0, weighting)
    }

    /// (chosen, rejected) halves of a (2B, ..) tensor.
    fn halves(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = self.pairs;
        Ok((x.narrow(0, 0, b)?, x.narrow(0, b, b)?))
    }

    /// Per sequence (2B,): the sum of a per-token (N,) tensor under `weights`.
    fn per_sequence(weights: &Tensor, x: &Tensor) -> Result<Tensor> {
        Ok(weights.matmul(&x.unsqueeze(1)?)?.squeeze(1)?)
    }
}

/// The reference's summed completion log-probs (chosen, rejected), (B,) each, no graph.
pub fn reference_logps(reference: &CausalLm, batch: &DpoBatch) -> Result<(Tensor, Tensor)> {
    let logps = batch.figures(reference, false)?.logps.detach();
    let sums = DpoBatch::per_sequence(&batch.ld, &logps)?.detach();
    batch.halves(&sums)
}

/// The loss and TRL's metrics of one micro-batch, from the policy's logits
/// (N, V) at the batch's selected positions and the reference's sums.
pub fn loss_from_logits(
    logits: &Tensor,
    batch: &DpoBatch,
    s: &Settings,
    reference: (Tensor, Tensor),
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let tf = token_figures(logits, &batch.labels, 1.0, s.use_weighting)?;
    loss_from_figures(&tf, batch, s, reference)
}

/// [`loss_from_logits`] from what the logits give (TokenFigures).
fn loss_from_figures(
    tf: &TokenFigures,
    batch: &DpoBatch,
    s: &Settings,
    reference: (Tensor, Tensor),
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let per_seq = |x: &Tensor| DpoBatch::per_sequence(&batch.member, x);
    let (chosen, rejected) = batch.halves(&DpoBatch::per_sequence(&batch.ld, &tf.logps)?)?;
    let (chosen_tokens, rejected_tokens) = batch.halves(&batch.completion_tokens)?;
    let scalar = |t: &Tensor| -> Result<f64> { Ok(t.sum_all()?.to_scalar::<f32>()? as f64) };
    let n_chosen = scalar(&chosen_tokens)?;
    let n_all = scalar(&batch.member)?;
    let sft_nll = if s.has(DpoLossType::Sft) {
        let (sum_c, _) = batch.halves(&per_seq(&tf.logps)?)?;
        Some((sum_c.sum_all()? / -n_chosen.max(1.0))?)
    } else {
        None
    };
    let x = PairLogps {
        chosen,
        rejected,
        ref_chosen: reference.0,
        ref_rejected: reference.1,
        chosen_tokens,
        rejected_tokens,
        sft_nll,
    };
    let wpo = match &tf.log_denom {
        Some(d) => Some(wpo_weights(&tf.logps, d, &batch.member)?),
        None => None,
    };
    let loss = dpo_loss(&s.losses, &s.hyper, &x, wpo.as_ref())?;

    // Metrics, as DPOTrainer logs them (host values, no graph).
    let v = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.detach()
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    };
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let beta = s.hyper.beta;
    let (c, r) = (v(&x.chosen)?, v(&x.rejected)?);
    let (rc, rr) = (v(&x.ref_chosen)?, v(&x.ref_rejected)?);
    let cr: Vec<f64> = c.iter().zip(&rc).map(|(a, b)| beta * (a - b)).collect();
    let rj: Vec<f64> = r.iter().zip(&rr).map(|(a, b)| beta * (a - b)).collect();
    let wins: Vec<f64> = cr
        .iter()
        .zip(&rj)
        .map(|(a, b)| f64::from(u8::from(a > b)))
        .collect();
    let margins: Vec<f64> = cr.iter().zip(&rj).map(|(a, b)| a - b).collect();
    let (logit_c, logit_r) = batch.halves(&per_seq(&tf.mean_logit)?)?;
    let (correct_c, _) = batch.halves(&per_seq(&tf.correct)?)?;
    let n_rejected = n_all - n_chosen;
    let ratio = |a: f64, n: f64| if n > 0.0 { a / n } else { 0.0 };
    let figures = vec![
        ("entropy", ratio(scalar(&per_seq(&tf.entropy)?)?, n_all)),
        ("logits/chosen", ratio(scalar(&logit_c)?, n_chosen)),
        ("logits/rejected", ratio(scalar(&logit_r)?, n_rejected)),
        ("mean_token_accuracy", ratio(scalar(&correct_c)?, n_chosen)),
        ("rewards/chosen", mean(&cr)),
        ("rewards/rejected", mean(&rj)),
        ("rewards/accuracies", mean(&wins)),
        ("rewards/margins", mean(&margins)),
        ("logps/chosen", mean(&c)),
        ("logps/rejected", mean(&r)),
    ];
    Ok((loss, figures))
}

/// The policy's loss and metrics over a batch.
pub fn policy_loss(
    policy: &CausalLm,
    batch: &DpoBatch,
    s: &Settings,
    reference: (Tensor, Tensor),
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    loss_from_figures(
        &batch.figures(policy, s.use_weighting)?,
        batch,
        s,
        reference,
    )
}

/// Where the reference's log-probs come from.
enum Reference {
    Model(Box<CausalLm>),
    /// Per pair (chosen, rejected), computed once: train pairs, then eval pairs.
    Precomputed {
        train: Vec<(f32, f32)>,
        eval: Vec<(f32, f32)>,
    },
}

impl Reference {
    fn of(
        &self,
        batch: &DpoBatch,
        which: &[usize],
        eval: bool,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Model(lm) => reference_logps(lm, batch),
            Self::Precomputed { train, eval: ev } => {
                let table = if eval { ev } else { train };
                let (c, r): (Vec<f32>, Vec<f32>) = which.iter().map(|&i| table[i]).unzip();
                let n = c.len();
                Ok((Tensor::from_vec(c, n, dev)?, Tensor::from_vec(r, n, dev)?))
            }
        }
    }
}

/// Every pair's reference log-probs, `batch` pairs per forward.
fn precompute(
    reference: &CausalLm,
    pairs: &[DpoPair],
    s: &Settings,
    batch: usize,
    pad: u32,
    dev: &Device,
) -> Result<Vec<(f32, f32)>> {
    let mut out = Vec::with_capacity(pairs.len());
    let refs: Vec<&DpoPair> = pairs.iter().collect();
    let progress = Progress::new(
        pairs.len().div_ceil(batch.max(1)) as u64,
        "reference log-probs",
    );
    for (i, chunk) in refs.chunks(batch.max(1)).enumerate() {
        let b = DpoBatch::new(chunk, s, pad, dev)?;
        let (c, r) = reference_logps(reference, &b)?;
        out.extend(c.to_vec1::<f32>()?.into_iter().zip(r.to_vec1::<f32>()?));
        progress.update(i as u64 + 1, &[]);
    }
    progress.finish();
    Ok(out)
}

/// Reads the precomputed reference log-probs of a run, if they are there
/// and fit the pair counts.
fn read_precomputed(path: &Path, n_train: usize, n_eval: usize) -> Result<Option<Reference>> {
    if !path.exists() {
        return Ok(None);
    }
    let t = candle_core::safetensors::load(path, &Device::Cpu)?;
    let pairs = |name: &str, n: usize| -> Result<Option<Vec<(f32, f32)>>> {
        let Some(x) = t.get(name) else {
            return Ok(None);
        };
        let rows = x.to_vec2::<f32>()?;
        Ok((rows.len() == n).then(|| rows.into_iter().map(|r| (r[0], r[1])).collect()))
    };
    Ok(match (pairs("train", n_train)?, pairs("eval", n_eval)?) {
        (Some(train), Some(eval)) => Some(Reference::Precomputed { train, eval }),
        _ => None,
    })
}

fn write_precomputed(path: &Path, train: &[(f32, f32)], eval: &[(f32, f32)]) -> Result<()> {
    let table = |rows: &[(f32, f32)]| -> Result<Tensor> {
        let flat: Vec<f32> = rows.iter().flat_map(|&(c, r)| [c, r]).collect();
        Ok(Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu)?)
    };
    let mut map = std::collections::HashMap::new();
    map.insert("train".to_string(), table(train)?);
    map.insert("eval".to_string(), table(eval)?);
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
}

/// Evaluation as transformers and DPOTrainer report it: `eval_loss` the mean
/// over pairs (each batch's loss weighted by its pairs), every other metric
/// the mean over batches, each with the `eval_` prefix.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    policy: &CausalLm,
    reference: &Reference,
    pairs: &[DpoPair],
    s: &Settings,
    batch: usize,
    pad: u32,
    num_tokens: u64,
    dev: &Device,
) -> Result<Vec<(String, f64)>> {
    // Each rank evaluates its part of the pairs: the loss is all-reduced,
    // the other figures are means over every rank's batches.
    let world = crate::dist::world();
    let mut stats = Stats::default();
    let (mut loss_sum, mut n) = (0.0, 0usize);
    // Whole batches per rank, so the batches are those of one rank.
    let idx: Vec<usize> = (0..pairs.len()).collect();
    let batches: Vec<&[usize]> = idx.chunks(batch.max(1)).collect();
    for &which in &batches[world.split(batches.len())] {
        let chunk: Vec<&DpoPair> = which.iter().map(|&i| &pairs[i]).collect();
        let b = DpoBatch::new(&chunk, s, pad, dev)?;
        let r = reference.of(&b, which, true, dev)?;
        let (loss, figures) = policy_loss(policy, &b, s, r)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * which.len() as f64;
        n += which.len();
        for (k, v) in figures {
            stats.add(k, v);
        }
    }
    let mut sums = [loss_sum, n as f64];
    world.sum(&mut sums);
    let mut out = vec![("eval_loss".to_string(), sums[0] / sums[1].max(1.0))];
    let figures = match world.is_single() {
        true => stats.figures(),
        false => {
            // Every rank's batch means, averaged.
            // Every rank's batch means (as bits: a NaN figure passes).
            // The names from a rank that had batches (one may have none).
            let mine: Vec<String> = stats.figures().into_iter().map(|(k, _)| k).collect();
            let names = (world.gather(mine)?.into_iter())
                .find(|n| !n.is_empty())
                .unwrap_or_default();
            let mut merged = Stats::default();
            for k in names {
                for v in world.concat_f64(stats.values(&k).to_vec()) {
                    merged.add(&k, v);
                }
            }
            merged.figures()
        }
    };
    out.extend(figures.into_iter().map(|(k, v)| (format!("eval_{k}"), v)));
    out.push(("eval_num_tokens".into(), num_tokens as f64));
    Ok(out)
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct DpoRun {
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub steps: u64,
    /// The last evaluation's figures (`eval_loss`, `eval_rewards/accuracies`, ...).
    pub eval: Vec<(String, f64)>,
    pub seconds_per_step: f64,
    pub data: DpoDataReport,
}

impl DpoRun {
    /// A figure of the last evaluation (NaN when absent).
    pub fn eval(&self, name: &str) -> f64 {
        self.eval
            .iter()
            .find(|(k, _)| k == name)
            .map_or(f64::NAN, |(_, v)| *v)
    }
}

/// Trains (or resumes) a policy with DPO in `run_dir` as `cfg` says.
pub fn train(cfg: &Config, run_dir: &Path, resume: bool, stop: &StopSignal) -> Result<DpoRun> {
    let (device, device_name) = crate::device::resolve_device(&cfg.run.device)?;
    let manifest = Manifest::new("dpo", cfg, &device_name);
    let mut run = RunDir::open(run_dir, manifest, resume)?;
    let (d, t, seed) = (&cfg.dpo, &cfg.train, cfg.run.seed);
    let s = Settings::of(cfg);
    let hub = crate::hub::HubSettings::from_env();
    if d.padding_free {
        tracing::warn!(
            "dpo.padding_free = true is ignored, as TRL 1.12 ignores it: sequences are padded"
        );
    }
    if d.truncation_mode == TruncationMode::KeepEnd {
        tracing::warn!("dpo.truncation_mode = \"keep_end\" is deprecated in TRL 1.12 (to be removed in v2.0.0); use keep_start");
    }
    if d.loss_type.contains(&DpoLossType::Robust) && !(0.0..0.5).contains(&d.label_smoothing) {
        tracing::warn!(
            "dpo.label_smoothing should lie in [0.0, 0.5) for the robust loss; it is {}",
            d.label_smoothing
        );
    }

    // 1. Policy and tokenizer.
    let model_dir = crate::models::resolve_model(&cfg.model.resolved_name()?, &hub)?;
    let tok = Tokenizer::from_dir(&model_dir)?;
    let base_config: Value = io::read_json(&model_dir.join("config.json"))?;
    let (arch, vb, mut params) =
        Trained::for_run(cfg, &model_dir, "CAUSAL_LM", cfg.model.init, &device)?;
    let mut lm = CausalLm::load(vb, &arch, true).map_err(|e| {
        Error::Msg(format!(
            "DPO needs a causal LM; {} cannot be one: {e}",
            arch.model_type()
        ))
    })?;
    if d.disable_dropout {
        params = params.without_dropout();
    }
    params.attach(&mut lm)?;
    lm.set_activation_checkpointing(cfg.train.activation_checkpointing);
    let varmap = params.varmap().clone();

    // 2. Data: prepared as TRL prepares it, split.
    d.data().train()?;
    let template = TemplateSource::new(&model_dir, cfg.model.chat_template.as_deref());
    let prepare = |spec: &str, split: &str| -> Result<(Vec<DpoPair>, DpoDataReport)> {
        let rows = data::load_preferences(spec, split, &hub)?;
        let (pairs, report) =
            prepare_pairs(&rows, &tok, &template, d.max_length, d.truncation_mode)?;
        tracing::info!("{spec}: {report}");
        Ok((pairs, report))
    };
    let (pairs, report) = prepare(&d.dataset, &d.dataset_train_split)?;
    let (train_pairs, eval_pairs) = match &d.eval_dataset {
        Some(spec) => (pairs, prepare(spec, &d.dataset_test_split)?.0),
        None => data::split(&pairs, d.eval_ratio, seed),
    };

    let longest = train_pairs
        .iter()
        .chain(&eval_pairs)
        .map(|p| (p.prompt.len() + p.chosen.len().max(p.rejected.len())).min(d.max_length));
    if let Some(longest) = longest.max().filter(|&n| n > lm.max_positions()) {
        return Err(Error::InvalidConfig {
            field: "dpo.max_length".into(),
            value: d.max_length.to_string(),
            reason: format!(
                "sequences of up to {longest} tokens remain, beyond the model's {} positions",
                lm.max_positions()
            ),
        });
    }

    // 3. The reference: precomputed once (and kept in the run directory),
    // or a frozen model (the LoRA base with adapters off: no second copy).
    let ref_dtype = d.ref_dtype.map(|x| x.dtype());
    let dtype = cfg.run.dtype.dtype();
    let load_reference = || {
        params.reference(
            &arch,
            d.ref_model.as_deref(),
            &model_dir,
            ref_dtype,
            dtype,
            &device,
        )
    };
    let reference = if d.precompute_ref_log_probs {
        let named = d
            .ref_model
            .clone()
            .unwrap_or_else(|| model_dir.display().to_string());
        let fingerprint = ref_fingerprint(&named, cfg, &train_pairs, &eval_pairs)?;
        let ref_path = ref_logps_path(&run.path, &fingerprint);
        match read_precomputed(&ref_path, train_pairs.len(), eval_pairs.len())? {
            Some(r) => r,
            None => {
                let model = load_reference()?;
                // TRL's batch sizes: precompute_ref_batch_size, else the train and the eval one.
                let batch = |b: usize| d.precompute_ref_batch_size.unwrap_or(b);
                let (b_train, b_eval) = (
                    batch(t.per_device_train_batch_size),
                    batch(t.per_device_eval_batch_size),
                );
                let train = precompute(&model, &train_pairs, &s, b_train, tok.pad_id, &device)?;
                let eval = precompute(&model, &eval_pairs, &s, b_eval, tok.pad_id, &device)?;
                if crate::dist::world().is_main() {
                    write_precomputed(&ref_path, &train, &eval)?;
                }
                Reference::Precomputed { train, eval } // the model is freed here
            }
        }
    } else {
        Reference::Model(Box::new(load_reference()?))
    };

    // 4. Optimizer, schedule and state.
    let super::OfflineStart {
        mut core,
        mut state,
        batch,
        per_epoch,
        total,
    } = super::offline_start(&run, t, &varmap, train_pairs.len(), seed, &device)?;
    let tokenizer_files = checkpoint::tokenizer_files(&model_dir);
    let files = ModelFiles {
        config: &base_config,
        tokenizer_files: &tokenizer_files,
    };
    let save = |run: &RunDir, core: &TrainCore, state: &TrainerState| -> Result<PathBuf> {
        params.save_checkpoint(run, &files, &[], core, state, t.save_total_limit)
    };
    let eval_now = |run: &mut RunDir, step: u64, num_tokens: u64| -> Result<Vec<(String, f64)>> {
        params.set_training(false);
        let figures = evaluate(
            &lm,
            &reference,
            &eval_pairs,
            &s,
            t.per_device_eval_batch_size,
            tok.pad_id,
            num_tokens,
            &device,
        )?;
        params.set_training(true);
        run.metrics.log(step, &figures)?;
        Ok(figures)
    };

    // 5. The loop: accumulate micro-batches, step, log, evaluate, checkpoint.
    let mut eval_figures = Vec::new();
    // transformers evaluates on start at every start, resumed ones included.
    if t.eval_on_start.unwrap_or(false) && !eval_pairs.is_empty() {
        let num_tokens = state.extra["num_tokens"].as_u64().unwrap_or(0);
        eval_figures = eval_now(&mut run, state.step, num_tokens)?;
    }
    let progress = Progress::new(total, "dpo");
    let started = Instant::now();
    let first_step = state.step;
    let mut last_checkpoint = None;
    let mut window = Stats::default();
    let world = crate::dist::world();
    let mut tokens_this_run = 0usize;
    while state.step < total {
        let step = state.step;
        params.begin_step(step);
        let mut step_loss = 0.0;
        let mut step_tokens = 0;
        for _ in 0..t.gradient_accumulation_steps {
            // Seeded shuffling, reshuffled each epoch; the position is checkpointed.
            let which = state.next_shard(train_pairs.len(), batch);
            let chunk: Vec<&DpoPair> = which.iter().map(|&i| &train_pairs[i]).collect();
            let b = DpoBatch::new(&chunk, &s, tok.pad_id, &device)?;
            let r = reference.of(&b, &which, false, &device)?;
            let (loss, figures) = policy_loss(&lm, &b, &s, r)?;
            // The mean over every rank's pairs of this micro-batch.
            let loss = (loss * world.share(chunk.len() as f64))?;
            step_loss += core.backward(&loss)?;
            step_tokens += b.tokens;
            // Each figure a mean over the pairs: the ranks' mean of theirs.
            let mut values: Vec<f64> = figures.iter().map(|(_, v)| *v).collect();
            world.sum(&mut values);
            for ((k, _), v) in figures.iter().zip(values) {
                window.add(k, v / world.size as f64);
            }
        }
        let mut sums = [step_loss, step_tokens as f64];
        world.sum(&mut sums);
        let (step_loss, step_tokens) = (sums[0], sums[1] as usize);
        let outcome = core.step(step)?;
        state.step += 1;
        state.optimizer_steps = core.optimizer.steps();
        let num_tokens = state.extra["num_tokens"].as_u64().unwrap_or(0) + step_tokens as u64;
        state.extra["num_tokens"] = json!(num_tokens);
        tokens_this_run += step_tokens;
        let loss = step_loss / t.gradient_accumulation_steps as f64;
        window.add("loss", loss);
        if let StepOutcome::Applied { grad_norm, lr } = outcome {
            if state.step.is_multiple_of(t.logging_steps) || state.step == total {
                let elapsed = started.elapsed().as_secs_f64().max(1e-9);
                let mut figures = std::mem::take(&mut window).figures();
                figures.extend([
                    ("grad_norm".to_string(), grad_norm),
                    ("learning_rate".to_string(), lr),
                    ("num_tokens".to_string(), num_tokens as f64),
                    (
                        "tokens_per_second".to_string(),
                        tokens_this_run as f64 / elapsed,
                    ),
                    ("epoch".to_string(), state.step as f64 / per_epoch as f64),
                ]);
                run.metrics.log(state.step, &figures)?;
            }
        }
        progress.update(state.step, &[("loss", loss)]);
        let due = t.eval_steps.is_some_and(|n| state.step.is_multiple_of(n)) || state.step == total;
        if due && !eval_pairs.is_empty() {
            eval_figures = eval_now(&mut run, state.step, num_tokens)?;
        }
        let stopping = stop.requested();
        checkpoint_if_due(
            state.step,
            total,
            t.save_steps,
            stopping,
            &mut last_checkpoint,
            || save(&run, &core, &state),
        )?;
    }
    progress.finish();
    let steps_run = (state.step - first_step).max(1);
    let checkpoint = run.finish(last_checkpoint)?;
    Ok(DpoRun {
        run_dir: run.path.clone(),
        checkpoint,
        steps: state.step,
        eval: eval_figures,
        seconds_per_step: started.elapsed().as_secs_f64() / steps_run as f64,
        data: report,
    })
}
