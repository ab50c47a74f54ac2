//! Building blocks shared by the architectures, each with a backward pass
//! (candle's fused layer_norm / rms_norm / softmax / rope record none).

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::matmul_weight_t;
use crate::{Error, Result};

/// A lookup table, as nn.Embedding: rows of `weight` (vocabulary, hidden)
/// by token id, through the kernel whose backward writes the table's
/// gradient once (`kernels::embedding`).
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Tensor,
    hidden: usize,
}

impl Embedding {
    pub fn new(weight: Tensor, hidden: usize) -> Self {
        Self { weight, hidden }
    }

    pub fn embeddings(&self) -> &Tensor {
        &self.weight
    }
}

impl candle_nn::Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.hidden);
        crate::kernels::embedding(&self.weight, &ids.flatten_all()?)?.reshape(dims)
    }
}

/// LayerNorm (fused on the CPU, see `crate::kernels`).
#[derive(Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// RMSNorm as transformers' LlamaRMSNorm: normalized in f32, cast back, then scaled.
#[derive(Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::rms_norm(x, &self.weight, self.eps)
    }
}

/// y = x W^T + b with W stored [out, in] (torch's nn.Linear), or y = x W + b
/// with W stored [in, out] (GPT-2's Conv1D, peft's `fan_in_fan_out`), on
/// (B, T, in); plus a LoRA adapter's update when one is attached
/// ([`super::lora`]).
#[derive(Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The module's name in the checkpoint (`model.layers.0.self_attn.q_proj`):
    /// what peft's `target_modules` match and its adapter tensors are named by.
    name: String,
    /// W is stored [in, out] (GPT-2's Conv1D).
    fan_in_fan_out: bool,
    lora: Option<super::adapter::Adapter>,
}

impl Linear {
    pub fn load(vb: VarBuilder, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: vb.get((d_out, d_in), "weight")?,
            bias: if bias {
                Some(vb.get(d_out, "bias")?)
            } else {
                None
            },
            name: vb.prefix(),
            fan_in_fan_out: false,
            lora: None,
        })
    }

    /// GPT-2's Conv1D: W stored [in, out], always with a bias.
    pub fn load_conv1d(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((d_in, d_out), "weight")?,
            bias: Some(vb.get(d_out, "bias")?),
            name: vb.prefix(),
            fan_in_fan_out: true,
            lora: None,
        })
    }

    /// A layer named `name` from its tensors, W stored [out, in].
    pub fn from_parts(name: &str, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            name: name.to_string(),
            fan_in_fan_out: false,
            lora: None,
        }
    }

    /// The module's checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (in, out) features.
    pub fn features(&self) -> Result<(usize, usize)> {
        let (r, c) = self.weight.dims2()?;
        Ok(if self.fan_in_fan_out { (r, c) } else { (c, r) })
    }

    /// Whether W is stored [in, out] (peft's `fan_in_fan_out`).
    pub fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    /// Whether the weight is trained in full (a Var that records gradients),
    /// as a module of `modules_to_save` or a new head is: such a module gets no adapter.
    pub fn weight_is_trainable(&self) -> bool {
        self.weight.is_variable()
    }

    /// The weight's dtype and device (an adapter's are the same).
    pub fn weight_dtype_device(&self) -> (DType, candle_core::Device) {
        (self.weight.dtype(), self.weight.device().clone())
    }

    /// Whether anything here records gradients: the weight or bias, or an adapter.
    pub fn trains(&self) -> bool {
        self.weight.is_variable()
            || self.bias.as_ref().is_some_and(Tensor::is_variable)
            || self.lora.is_some()
    }

    /// The adapter's dropout, if any.
    pub fn dropout(&self) -> Option<&std::sync::Arc<super::adapter::Dropout>> {
        self.lora.as_ref().and_then(|a| a.dropout())
    }

    /// Attaches (or, with None, removes) a LoRA adapter.
    pub fn set_adapter(&mut self, adapter: Option<super::adapter::Adapter>) {
        self.lora = adapter;
    }

    /// [`Self::forward`] for a layer's last product, whose value the layer
    /// only adds to its residual stream: recomputed under checkpointing, it
    /// skips that value (`kernels::recompute::output_product`).
    pub fn forward_into_residual(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::recompute::output_product(|| self.forward(x))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let x = x.reshape((b * t, d_in))?;
        let base = || -> Result<Tensor> {
            Ok(match (&self.bias, self.fan_in_fan_out) {
                (Some(bias), fan_in_fan_out) => {
                    crate::kernels::linear(&x, &self.weight, bias, !fan_in_fan_out)?
                }
                // The whole output where no adapter adds to it.
                (None, false) if self.lora.is_none() => {
                    crate::kernels::linear::layer_output_weight_t(&x, &self.weight)?
                }
                (None, false) => matmul_weight_t(&x, &self.weight)?,
                (None, true) => crate::kernels::matmul(&x, &self.weight)?,
            })
        };
        let y = match &self.lora {
            Some(adapter) => adapter.forward(
                &x,
                (&self.weight, self.bias.as_ref(), self.fan_in_fan_out),
                base,
            )?,
            None => base()?,
        };
        Ok(y.reshape((b, t, ()))?)
    }
}

/// Every Linear of a model, in a fixed order: what LoRA attaches adapters to.
pub trait Linears {
    fn linears_mut(&mut self) -> Vec<&mut Linear>;

    /// Turns activation checkpointing on or off ([`run_layer`]); models
    /// without layers to recompute ignore it.
    fn set_activation_checkpointing(&mut self, _on: bool) {}
}

/// A decoder or encoder layer that activation checkpointing runs again in
/// the backward: cheap to clone (its tensors are shared).
pub(crate) trait Recomputable: Clone + Send + Sync + 'static {
    fn linears(&self) -> Vec<&Linear>;
}

/// One layer's forward `f(layer, x)`. With `checkpointing` on, where the
/// layer or its input trains, the layer keeps its input and output only
/// and runs again during the backward (`kernels::checkpoint`), with its
/// LoRA dropout rewound so that it draws the same masks: gradients are bit
/// for bit those without checkpointing.
pub(crate) fn run_layer<L: Recomputable>(
    checkpointing: bool,
    layer: &L,
    x: &Tensor,
    f: impl Fn(&L, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let linears = layer.linears();
    if !(checkpointing && (x.track_op() || linears.iter().any(|l| l.trains()))) {
        return f(layer, x);
    }
    let dropout = linears.iter().find_map(|l| l.dropout().cloned());
    let start = dropout.as_ref().map_or(0, |d| d.position());
    let after = std::sync::atomic::AtomicU64::new(0);
    let replay = move |before: bool| {
        if let Some(d) = &dropout {
            use std::sync::atomic::Ordering::SeqCst;
            match before {
                true => {
                    after.store(d.position(), SeqCst);
                    d.set_position(start);
                }
                false => d.set_position(after.load(SeqCst)),
            }
        }
    };
    let layer = layer.clone();
    crate::kernels::checkpoint(x, move |x| f(&layer, x), replay)
}

/// The activations of the supported configs, by their transformers names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// "gelu": the exact, erf-based GELU.
    Gelu,
    /// "gelu_new", "gelu_pytorch_tanh", "gelu_fast": the tanh approximation.
    GeluTanh,
    Silu,
    Relu,
}

impl Activation {
    /// Parses a `hidden_act` / `activation` value of config.json.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            _ => return None,
        })
    }

    /// Parses config.json's `field`, refusing names it does not know.
    pub fn from_config(name: &str, field: &str) -> Result<Self> {
        Self::parse(name).ok_or_else(|| {
            Error::Msg(format!(
                "config.json: {field} `{name}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu, swish, relu)"
            ))
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Gelu => crate::kernels::gelu_erf(x)?,
            Self::GeluTanh => crate::kernels::gelu_tanh(x)?,
            Self::Silu => x.silu()?,
            Self::Relu => x.relu()?,
        })
    }
}

/// Refuses a width that the heads do not divide, naming config.json's fields.
pub fn check_heads(width: (usize, &str), heads: (usize, &str)) -> Result<()> {
    if heads.0 == 0 || !width.0.is_multiple_of(heads.0) {
        return Err(Error::Msg(format!(
            "config.json: {} {} is not divisible by {} {}",
            width.1, width.0, heads.1, heads.0
        )));
    }
    Ok(())
}

/// Scaled dot-product attention with an additive bias, as matmul + softmax so
/// that it has a backward. q (B, H, T, d), k and v (B, Hkv, L, d) with H a
/// multiple of Hkv (grouped-query attention repeats each key/value head),
/// bias broadcastable to (B, H, T, L). Returns (B, T, H * d).
///
/// Grouped-query attention repeats no key or value: the n query heads that
/// share key/value head i (heads i n .. i n + n - 1, as transformers'
/// repeat_kv pairs them) are stacked into one (n T, d) matrix against that
/// head's keys, and (B, Hkv, n T, L) scores are the (B, H, T, L) scores in
/// the same memory. transformers copies every key and value n times instead,
/// at each decoding step for the whole cache.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kv_heads, l) = (k.dim(1)?, k.dim(2)?);
    if kv_heads == 0 || h % kv_heads != 0 {
        return Err(Error::Msg(format!(
            "attention: {h} query heads are not a multiple of {kv_heads} key/value heads"
        )));
    }
    let grouped = q.reshape((b, kv_heads, (h / kv_heads) * t, d))?;
    let scores = grouped.matmul(&k.t()?)?.reshape((b, h, t, l))?;
    let probs = crate::kernels::masked_softmax(&scores, bias, 1.0 / (d as f64).sqrt())?;
    let out = probs
        .reshape((b, kv_heads, (h / kv_heads) * t, l))?
        .matmul(v)?
        .reshape((b, h, t, d))?;
    Ok(out.transpose(1, 2)?.reshape((b, t, h * d))?)
}

/// Splits (B, T, H * d) into heads (B, H, T, d).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    Ok(x.reshape((b, t, heads, ()))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// One layer's cached keys and values: (B, Hkv, capacity, d) buffers that
/// each decoding step writes in place, the first `len` positions filled.
/// Appending by concatenation instead copies the whole cache at every step
/// (quadratic in the response length).
#[derive(Clone, Default)]
pub struct KvSlot {
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
    /// Positions to allocate at the first write (the buffers' own length after).
    capacity: usize,
}

impl KvSlot {
    /// An empty slot whose buffers, once allocated, hold `capacity` positions
    /// (it grows when a longer sequence comes).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buffers: None,
            len: 0,
            capacity,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies k and v (B, Hkv, T, d) after the cached positions (a copy, so
    /// the cache holds no autograd graph); returns views of all cached keys
    /// and values.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let needed = self.len + t;
        let full = self
            .buffers
            .as_ref()
            .is_none_or(|(kb, _)| kb.dims()[2] < needed);
        if full {
            // Allocate (first call) or grow, copying what is cached.
            let capacity = needed.max(self.capacity).max(2 * self.len);
            let alloc = |x: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = x.dims4()?;
                Ok(Tensor::zeros((b, h, capacity, d), x.dtype(), x.device())?)
            };
            let (kb, vb) = (alloc(k)?, alloc(v)?);
            if let Some((old_k, old_v)) = &self.buffers {
                kb.slice_set(&old_k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                vb.slice_set(&old_v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.buffers = Some((kb, vb));
        }
        let (kb, vb) = self.buffers.as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?))
    }
}

/// With a cache slot, appends the new keys and values to it and returns all
/// cached ones to attend over; without, returns k and v.
pub fn extend_cache(slot: Option<&mut KvSlot>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    match slot {
        Some(slot) => slot.append(&k, &v),
        None => Ok((k, v)),
    }
}

/// How rotary frequencies are scaled (config.json's rope_scaling / rope_parameters).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding (Su et al., 2021) in transformers' "rotate half"
/// layout, applied to the first `rotary_dim` features of each head (GPT-NeoX
/// rotates a fraction, Llama all). cos/sin are computed per (row, position)
/// from the position ids, so left-padded rows rotate by their own positions.
#[derive(Debug, Clone)]
pub struct Rotary {
    /// One frequency per rotated pair: rotary_dim / 2 of them.
    inv_freq: Vec<f32>,
}

impl Rotary {
    pub fn new(rotary_dim: usize, theta: f64, scaling: &RopeScaling) -> Result<Self> {
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(Error::Msg(format!(
                "config.json: the rotary dimension {rotary_dim} must be even and positive"
            )));
        }
        // transformers computes inv_freq in f32: 1 / theta^(2i / dim).
        let base: Vec<f64> = (0..rotary_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / rotary_dim as f64))
            .collect();
        let inv_freq = match *scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f // high frequencies kept
                        } else if wavelen > low_wavelen {
                            f / factor // low frequencies scaled
                        } else {
                            // in between: interpolate smoothly
                            let smooth = (old_ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Ok(Self {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        })
    }

    /// cos and sin (B, 1, T, rotary_dim) for position ids (B, T), in `dtype`.
    pub fn cos_sin(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let dev = positions.device();
        let half = self.inv_freq.len();
        let inv = Tensor::from_slice(&self.inv_freq, (1, 1, half), dev)?;
        let freqs = positions
            .to_dtype(DType::F32)?
            .unsqueeze(2)?
            .broadcast_mul(&inv)?; // (B, T, half), f32 as in transformers
        let emb = Tensor::cat(&[&freqs, &freqs], 2)?.unsqueeze(1)?;
        Ok((emb.cos()?.to_dtype(dtype)?, emb.sin()?.to_dtype(dtype)?))
    }
}

/// Rotary settings from either config shape.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Fraction of each head's features that rotate (GPT-NeoX: rotary_pct).
    pub partial_rotary_factor: f64,
}

impl Default for RopeConfig {
    fn default() -> Self {
        Self {
            theta: 10_000.0,
            scaling: RopeScaling::Default,
            partial_rotary_factor: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rotary;
    use candle_core::{Device, D};

    #[test]
    fn rotary_at_position_zero_is_identity_and_preserves_norm() {
        let dev = Device::Cpu;
        let rot = Rotary::new(4, 10_000.0, &RopeScaling::Default).unwrap();
        let x = Tensor::new(&[1f32, 2., 3., 4., 5., 6.], &dev)
            .unwrap()
            .reshape((1, 1, 1, 6))
            .unwrap();
        let pos0 = Tensor::new(&[[0u32]], &dev).unwrap();
        let (c, s) = rot.cos_sin(&pos0, DType::F32).unwrap();
        let y = rotary(&x, &c, &s).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 2., 3., 4., 5., 6.]
        );
        // At position 1 the first pair (x0, x2) turns by 1 radian, the second
        // (x1, x3) by 1/100 radian; the unrotated tail (x4, x5) is untouched.
        let pos1 = Tensor::new(&[[1u32]], &dev).unwrap();
        let (c, s) = rot.cos_sin(&pos1, DType::F32).unwrap();
        let y = rotary(&x, &c, &s)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (c1, s1) = (1f32.cos(), 1f32.sin());
        let (c2, s2) = (0.01f32.cos(), 0.01f32.sin());
        let want = [
            1. * c1 - 3. * s1,
            2. * c2 - 4. * s2,
            3. * c1 + 1. * s1,
            4. * c2 + 2. * s2,
            5.,
            6.,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        // Frequencies of dim 8, theta 10000: 1, 0.1, 0.01, 0.001 (wavelengths
        // 6.3, 63, 628, 6283). Context 64, low factor 1, high factor 4:
        // wavelength < 16 kept, > 64 divided by 8, in between smoothed.
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let r = Rotary::new(8, 10_000.0, &scaling).unwrap();
        let wavelen = 2.0 * std::f64::consts::PI / 0.1;
        let smooth = (64.0 / wavelen - 1.0) / 3.0;
        let mid = (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1;
        let want = [1.0, mid, 0.01 / 8.0, 0.001 / 8.0];
        for (a, b) in r.inv_freq.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-7 * b.max(1e-3), "{a} vs {b}");
        }
    }

    #[test]
    fn rms_norm_matches_the_formula() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let n = RmsNorm {
            weight: w,
            eps: 0.0,
        };
        let x = Tensor::new(&[[[3f32, 4.0]]], &dev).unwrap();
        let y = n
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rms = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 8.0 / rms).abs() < 1e-6);
    }

    /// (B, Hkv, L, d) -> (B, Hkv * n, L, d), each head repeated n times in
    /// place: transformers' repeat_kv, the reference for grouped attention.
    fn repeat_kv(x: &Tensor, n: usize) -> Tensor {
        let (b, kv, l, d) = x.dims4().unwrap();
        let x = x.unsqueeze(2).unwrap().expand((b, kv, n, l, d)).unwrap();
        x.reshape((b, kv * n, l, d)).unwrap()
    }

    #[test]
    fn grouped_query_attention_equals_attention_with_repeated_kv_heads() {
        use crate::kernels::testing::{max_diff, seeded};
        let dev = Device::Cpu;
        // 6 query heads over 2 key/value heads, 3 queries against 5 keys, a
        // causal-style bias that masks some keys of some rows.
        let (q, k, v) = (
            seeded(&[2, 6, 3, 4], 5, 1.0),
            seeded(&[2, 2, 5, 4], 6, 1.0),
            seeded(&[2, 2, 5, 4], 7, 1.0),
        );
        let bias: Vec<f32> = (0..2 * 3 * 5)
            .map(|i| {
                if (i % 5) > 2 + (i / 5) % 3 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (2, 1, 3, 5), &dev).unwrap();
        let got = attention(&q, &k, &v, &bias).unwrap();
        let (k3, v3) = (repeat_kv(&k, 3), repeat_kv(&v, 3));
        let scores = (q.matmul(&k3.t().unwrap()).unwrap() * 0.5).unwrap();
        let probs =
            candle_nn::ops::softmax(&scores.broadcast_add(&bias).unwrap(), D::Minus1).unwrap();
        let want = probs
            .matmul(&v3)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((2, 3, 24))
            .unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-6, "differs by {diff}");
    }
}
