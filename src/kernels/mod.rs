//! Fused CPU kernels, each with its backward, for the elementwise-heavy and
//! memory-bound ops of a transformer: one file per op, its tests at the end.
//!
//! Candle's own fused ops record no backward (see candle-facts), and the
//! composed versions allocate a full tensor per step. Each op here reads its
//! input once and writes one output, forward and backward; tests check
//! values and gradients against the composed ops.
//!
//! The kernels run on the CPU in f32. Elsewhere the composed ops run when a
//! gradient may be needed, and Candle's fused no-grad ops (which run on CUDA
//! and Metal too) when nothing upstream tracks a gradient: the rollout path.
//!
//! This module sits below everything that computes: the models and the
//! optimizer use it, and it uses neither. Here are the pieces every
//! `CustomOp` shares: the fused-path test, the storage unpacking and the
//! parallel-for helpers on Candle's worker pool.

pub mod attention;
pub mod embedding;
pub mod fast_math;
pub mod gelu;
pub mod linear;
pub mod logprobs;
pub mod lora;
pub mod norm;
pub mod product;
pub mod recompute;
pub mod rotary;
pub mod silu_mul;
pub mod softmax;
pub mod squares;

pub use attention::{packed_attention, split_attention, Packing};
pub use embedding::embedding;
pub use gelu::{gelu_erf, gelu_tanh};
pub use linear::{linear, matmul_weight_t, FEW_ROWS};
pub use logprobs::{token_figures_fused, token_logprobs_and_entropy_fused};
pub use lora::{lora_linear, LoraLinearParts};
pub use norm::{layer_norm, rms_norm};
pub use product::matmul;
pub use recompute::{checkpoint, gradients};
pub use rotary::rotary;
pub use silu_mul::silu_mul;
pub use softmax::masked_softmax;

use candle_core::{bail, CpuStorage, DType, Layout, Result as CResult, Tensor};

/// Below this many elements an op runs on the calling thread.
pub(crate) const PARALLEL_MIN: usize = 1 << 13;
/// Elements per task of the elementwise kernels.
pub(crate) const CHUNK: usize = 1 << 13;

pub fn fused_path(xs: &[&Tensor]) -> bool {
    xs.iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
}

pub(crate) fn tracks_grad(xs: &[&Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}

pub(crate) fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{op}: f32 only")
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// Runs `f(i, piece_i)` over the pieces of `out` of `width` elements (the
/// last may be shorter), on Candle's own worker pool when `out` is large.
/// Candle's pool spins while it waits, so a second pool (rayon's) beside it
/// halves the speed (docs/benchmarks-history.md, "Design measurements").
pub(crate) fn for_pieces(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    for_pieces_costing(out, width, out.len(), f)
}

/// [`for_pieces`] for work of about `cost` element operations in all (more
/// than `out.len()` when each output element reads a whole row).
pub(crate) fn for_pieces_costing(
    out: &mut [f32],
    width: usize,
    cost: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    if cost < PARALLEL_MIN {
        out.chunks_mut(width).enumerate().for_each(|(i, p)| f(i, p));
        return;
    }
    let len = out.len();
    let out = SharedOut(out.as_mut_ptr());
    pool_chunked(len.div_ceil(width), |range| {
        for i in range {
            let start = i * width;
            // SAFETY: the pool hands out disjoint ranges of pieces, so no two
            // threads write the same element; start + width.min(..) <= len.
            f(i, unsafe { out.slice(start, width.min(len - start)) });
        }
    });
}

/// Runs `f` over ranges that together cover the tasks 0..n, on Candle's
/// worker pool when the work (about `cost` element operations in all) is
/// large enough; `f` can set up its buffers once per range.
pub(crate) fn for_units(n: usize, cost: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if cost < PARALLEL_MIN {
        f(0..n);
        return;
    }
    pool_chunked(n, f);
}

thread_local! {
    /// Set while this thread runs a piece of a pool job.
    static IN_JOB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Candle's `execute_chunked` over 0..n, run inline when called from inside
/// a job. Candle runs a nested call inline on its workers only: the calling
/// thread does its own share while it holds the pool's lock, so a nested
/// call there (a product inside a kernel's job) would wait on that lock
/// forever.
pub(crate) fn pool_chunked(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if IN_JOB.with(|j| j.get()) {
        f(0..n);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        let outer = IN_JOB.with(|j| j.replace(true));
        // Clears the flag even if `f` panics (Candle re-raises the panic).
        struct Reset(bool);
        impl Drop for Reset {
            fn drop(&mut self) {
                IN_JOB.with(|j| j.set(self.0));
            }
        }
        let _reset = Reset(outer);
        f(range)
    });
}

/// A buffer written by several threads at disjoint places.
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: users write disjoint ranges only (see `slice`).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `start + len` is within the buffer, and no other live slice overlaps it.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }

    /// The address of element `at`, for writes through strides.
    ///
    /// # Safety
    /// `at` is within the buffer.
    pub(crate) unsafe fn ptr(&self, at: usize) -> *mut f32 {
        self.0.add(at)
    }
}

/// Runs `f(offset, out_chunk)` over fixed-size chunks of `out`.
pub(crate) fn for_chunks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    for_pieces(out, CHUNK, |i, c| f(i * CHUNK, c))
}

/// The u32 data of a contiguous token tensor.
pub(crate) fn u32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [u32]> {
    let CpuStorage::U32(data) = s else {
        bail!("{op}: the tokens must be u32")
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the tokens must be contiguous"),
    }
}

/// Helpers for the kernels' tests and for the tests of the modules that use them.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor, Var};

    /// A tensor of uniform values in [-scale, scale), from a seeded generator.
    pub(crate) fn seeded(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut rng = crate::HostRng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest |x| of a tensor; NaN when any element is NaN (a max
    /// by comparisons could skip it, and then a NaN would pass `< tol`).
    pub(crate) fn max_abs(x: &Tensor) -> f32 {
        let v = x
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        v.to_vec1::<f32>().unwrap().iter().fold(0f32, |m, &e| {
            if m.is_nan() || e.is_nan() {
                f32::NAN
            } else {
                m.max(e.abs())
            }
        })
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    /// Value and gradients (w.r.t. every var) of sum(f(vars) * probe), fused vs composed.
    pub(crate) fn compare(
        vars: &[Var],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (yf, yc) = (fused(&xs), composed(&xs));
        assert!(
            max_diff(&yf, &yc) < tol,
            "values differ by {}",
            max_diff(&yf, &yc)
        );
        // A fixed random probe makes every output element's gradient count.
        let probe = seeded(yf.dims(), 99, 1.0);
        let gf = (yf * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (yc * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert_eq!(a.dims(), b.dims());
            let scale = max_abs(b);
            assert!(scale > 0.0, "input {i}: zero gradient");
            assert!(
                max_diff(a, b) < tol * scale.max(1.0),
                "input {i}: gradients differ by {}",
                max_diff(a, b)
            );
        }
    }

    /// The additive causal mask (B, 1, t, t) over rows of 0/1 key masks
    /// (-1e9 where blocked, as `models::attention_bias` builds it): a real
    /// query sees the real keys at or before it, a pad query every real key
    /// before it.
    pub(crate) fn causal_bias(mask: &[Vec<u32>]) -> Tensor {
        let t = mask[0].len();
        let mut data = Vec::new();
        for row in mask {
            for i in 0..t {
                data.extend((0..t).map(|j| if j <= i && row[j] != 0 { 0f32 } else { -1e9 }));
            }
        }
        Tensor::from_vec(data, (mask.len(), 1, t, t), &Device::Cpu).unwrap()
    }

    /// Rotary angles (cos, sin) (B, 1, T, r) of position ids (B, T) with
    /// base 10,000, the halves repeated as transformers' rotary embedding does.
    pub(crate) fn rope_angles(positions: &[Vec<u32>], r: usize) -> (Tensor, Tensor) {
        let (b, t) = (positions.len(), positions[0].len());
        let mut angles: Vec<f32> = Vec::with_capacity(b * t * r);
        for row in positions {
            for &p in row {
                let half: Vec<f32> = (0..r / 2)
                    .map(|i| p as f32 / 10_000f32.powf(2.0 * i as f32 / r as f32))
                    .collect();
                angles.extend(half.iter().chain(&half));
            }
        }
        let a = Tensor::from_vec(angles, (b, 1, t, r), &Device::Cpu).unwrap();
        (a.cos().unwrap(), a.sin().unwrap())
    }
}
