//! Fused CPU kernels, with a backward pass, for the elementwise-heavy ops of
//! a transformer: tanh-GELU, LayerNorm and the attention softmax (scale and
//! additive mask folded in).
//!
//! Candle's own fused ops record no backward (see candle-facts), and the
//! composed versions allocate a full tensor per step: a GPT-2-small reward
//! step spent a tenth of its time in the composed GELU backward alone (powf,
//! tanh and a dozen temporaries). Each op here reads its input once and
//! writes one output, forward and backward; tests check values and gradients
//! against the composed ops.
//!
//! The kernels run on the CPU in f32. Elsewhere the composed ops run when a
//! gradient may be needed, and Candle's fused no-grad ops (which run on CUDA
//! and Metal too) when nothing upstream tracks a gradient: the rollout path.

use super::fast_math::{self, wide_simd_fn, LANES};
use crate::Result;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result as CResult, Shape,
    Tensor, D,
};

/// Below this many elements an op runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;
/// Elements per task of the elementwise kernels.
const CHUNK: usize = 1 << 13;

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

pub(super) fn fused_path(xs: &[&Tensor]) -> bool {
    xs.iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
}

fn tracks_grad(xs: &[&Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}

pub(super) fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [f32]> {
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
/// Candle's pool spins while it waits: with rayon's pool beside it, the tiny
/// model's reward step took 0.296 s at 2 threads, 0.148 s on Candle's pool.
pub(crate) fn for_pieces(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    for_pieces_costing(out, width, out.len(), f)
}

/// [`for_pieces`] for work of about `cost` element operations in all (more
/// than `out.len()` when each output element reads a whole row).
fn for_pieces_costing(
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
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(width), |range| {
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
pub(super) fn for_units(n: usize, cost: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if cost < PARALLEL_MIN {
        f(0..n);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n, f);
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
fn for_chunks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    for_pieces(out, CHUNK, |i, c| f(i * CHUNK, c))
}

// ---------------------------------------------------------------- GELU (tanh)

/// GELU with the tanh approximation (transformers' "gelu_new"), as Candle's
/// `gelu`: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fused_path(&[x]) {
        Ok(x.contiguous()?.apply_op1(GeluTanh)?)
    } else {
        Ok(x.gelu()?)
    }
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s, l, self.name())?;
        let mut out = vec![0f32; x.len()];
        for_chunks(&mut out, |at, o| gelu_chunk(&x[at..at + o.len()], o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluTanhGrad)?,
        ))
    }
}

/// d gelu / dx times the incoming gradient: (x, dy) -> dx.
struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let dy = f32_data(s2, l2, self.name())?;
        let mut out = vec![0f32; x.len()];
        for_chunks(&mut out, |at, o| {
            let n = o.len();
            gelu_grad_chunk(&x[at..at + n], &dy[at..at + n], o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// 0.5 (1 + tanh u) = sigmoid(2u) = 1 / (1 + e^-2u), with
/// u = sqrt(2/pi) (x + 0.044715 x^3): one exp and one division, where tanh
/// costs an exp, a division and a series for small |u|. For very negative u,
/// e^-2u is +inf and the sigmoid 0, as it should be.
#[inline(always)]
fn gelu_sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + fast_math::exp(-2.0 * SQRT_TWO_OVER_PI * v * (1.0 + GELU_A * v * v)))
}

wide_simd_fn! {
    fn gelu_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * gelu_sigmoid(v);
        }
    }
}

wide_simd_fn! {
    /// out = dy * d gelu(x) / dx, with s = sigmoid(2u):
    /// d (x s) / dx = s + x * 2 s (1 - s) * du/dx.
    fn gelu_grad_chunk(x: &[f32], dy: &[f32], out: &mut [f32]) {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
            let s = gelu_sigmoid(v);
            let du = SQRT_TWO_OVER_PI * (1.0 + 3.0 * GELU_A * v * v);
            *o = g * (s + 2.0 * v * s * (1.0 - s) * du);
        }
    }
}

// ---------------------------------------------------------------- bias add

/// x (N, in) times W plus the bias b (out): W (in, out) as GPT-2's Conv1D
/// stores it, or with `transposed` W^T for W (out, in) as nn.Linear does.
/// The bias is added in the product's own output buffer, so no second
/// (N, out) tensor stays alive for the backward as with a matmul then an add
/// (a quarter of GPT-2-small's activations by a count of tensor sizes); the bias gradient sums the
/// output gradient's rows (Candle's broadcast_add backward divides per element).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, transposed: bool) -> Result<Tensor> {
    if fused_path(&[x, w, b]) && x.rank() == 2 && w.rank() == 2 && b.rank() == 1 {
        return Ok(x.apply_op3(w, b, Linear { transposed })?);
    }
    let y = match transposed {
        true => super::layers::matmul_weight_t(x, w)?,
        false => x.matmul(w)?,
    };
    Ok(y.broadcast_add(b)?)
}

struct Linear {
    transposed: bool,
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, k) = l1.shape().dims2()?;
        let (k_w, n) = match self.transposed {
            true => (l2.dims()[1], l2.dims()[0]),
            false => (l2.dims()[0], l2.dims()[1]),
        };
        let b = f32_data(s3, l3, self.name())?;
        if k_w != k || b.len() != n {
            bail!(
                "{}: x {:?}, weight {:?}, bias {:?} do not fit",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let out = if self.transposed && m <= super::layers::FEW_ROWS {
            // (W x^T)^T, see matmul_weight_t: the product is (n, m), transposed
            // into the output as the bias is added.
            let wx = s2.matmul(s1, (1, n, m, k), l2, &l1.transpose(0, 1)?)?;
            let CpuStorage::F32(wx) = wx else {
                bail!("{}: f32 only", self.name())
            };
            let mut out = vec![0f32; m * n];
            for (j, col) in wx.chunks_exact(m.max(1)).enumerate() {
                for (i, &v) in col.iter().enumerate() {
                    out[i * n + j] = v + b[j];
                }
            }
            out
        } else {
            let w_layout = match self.transposed {
                true => l2.transpose(0, 1)?,
                false => l2.clone(),
            };
            let y = s1.matmul(s2, (1, m, n, k), l1, &w_layout)?;
            let CpuStorage::F32(mut y) = y else {
                bail!("{}: f32 only", self.name())
            };
            for_pieces(&mut y, n, |_, row| add_in_place(row, b));
            y
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.detach(), w.detach(), grad.detach());
        // y = x W^T + b: dx = g W, dW = g^T x; y = x W + b: dx = g W^T, dW = x^T g.
        let (dx, dw) = match self.transposed {
            true => (g.matmul(&w)?, g.t()?.matmul(&x)?),
            false => (g.matmul(&w.t()?)?, x.t()?.matmul(&g)?),
        };
        let db = g.contiguous()?.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(dx), Some(dw), Some(db.reshape(b.shape())?)))
    }
}

wide_simd_fn! {
    /// row += b, elementwise.
    fn add_in_place(row: &mut [f32], b: &[f32]) {
        for (o, &b) in row.iter_mut().zip(b) {
            *o += b;
        }
    }
}

wide_simd_fn! {
    /// out[j] += the sum of g[i * n + j] over rows i, n = out.len().
    fn column_sum(g: &[f32], out: &mut [f32]) {
        for row in g.chunks_exact(out.len()) {
            out.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
        }
    }
}

/// (.., n) -> (n): the sum over every leading index, one row at a time.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "fused-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let g = f32_data(s, l, self.name())?;
        let n = l.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; n];
        if n > 0 {
            column_sum(g, &mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

// ---------------------------------------------------------------- LayerNorm

/// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * w + b,
/// the biased variance, as torch's nn.LayerNorm.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    if fused_path(&[x, w, b]) {
        let x = x.contiguous()?;
        Ok(x.apply_op3(w, b, LayerNorm { eps })?)
    } else if tracks_grad(&[x, w, b]) {
        Ok(candle_nn::ops::layer_norm_slow(x, w, b, eps)?)
    } else {
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps)?)
    }
}

#[derive(Clone, Copy)]
struct LayerNorm {
    eps: f32,
}

wide_simd_fn! {
    fn layer_norm_row(row: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
        let (mean, rstd) = row_stats(row, eps);
        for j in 0..row.len() {
            out[j] = (row[j] - mean) * rstd * w[j] + b[j];
        }
    }
}

/// Mean and 1/std of a row (two passes, as the composed op).
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = fast_math::sum_by(x, |v| v) / n;
    let var = fast_math::sum_by(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The backward of LayerNorm or RMSNorm over the last dimension as one
/// kernel ([`NormGrad`]): dx in x's shape, and the parameter gradients (dw,
/// then db for LayerNorm) as the rows the kernel appends after dx's.
fn norm_backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    norm: Norm,
    eps: f32,
) -> CResult<(Tensor, Tensor)> {
    let rows = x.elem_count() / w.elem_count();
    let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormGrad { norm, eps })?;
    let params = all.dim(0)? - rows;
    Ok((
        all.narrow(0, 0, rows)?.reshape(x.shape())?,
        all.narrow(0, rows, params)?,
    ))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let b = f32_data(s3, l3, self.name())?;
        let d = w.len();
        if d == 0 || l1.dims().last() != Some(&d) || b.len() != d {
            bail!(
                "{}: weight and bias must match the last dimension",
                self.name()
            )
        }
        let mut out = vec![0f32; x.len()];
        for_pieces(&mut out, d, |i, o| {
            layer_norm_row(&x[i * d..(i + 1) * d], w, b, self.eps, o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, params) = norm_backward(x, w, grad, Norm::Layer, self.eps)?;
        Ok((Some(dx), Some(params.get(0)?), Some(params.get(1)?)))
    }
}

/// The (rows + sums, d) output of a normalization's backward: `row(i, acc,
/// out_i)` writes row i of dx and adds that row's parameter gradients into
/// `acc` (sums x d: dw, then db). One task per block of 64 rows, each with its
/// own partial sums, added up at the end: one pass over x and dy in all.
fn rows_and_sums(
    rows: usize,
    d: usize,
    sums: usize,
    row: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    const BLOCK: usize = 64;
    let mut out = vec![0f32; (rows + sums) * d];
    let (dx, total) = out.split_at_mut(rows * d);
    let width = sums * d;
    let mut partials = vec![0f32; rows.div_ceil(BLOCK) * width];
    let partial_out = SharedOut(partials.as_mut_ptr());
    for_pieces(dx, BLOCK * d, |blk, dx_block| {
        // SAFETY: block blk alone writes partials[blk * width..(blk + 1) * width].
        let acc = unsafe { partial_out.slice(blk * width, width) };
        for (r, o) in dx_block.chunks_mut(d).enumerate() {
            row(blk * BLOCK + r, acc, o);
        }
    });
    for acc in partials.chunks(width.max(1)) {
        total.iter_mut().zip(acc).for_each(|(s, a)| *s += a);
    }
    out
}

/// Which normalization a [`NormGrad`] differentiates.
#[derive(Clone, Copy)]
enum Norm {
    Layer,
    Rms,
}

/// (x, w, dy) -> dx with the parameter gradients appended as rows:
/// LayerNorm [dx; dw; db] (rows + 2, d), RMSNorm [dx; dw] (rows + 1, d), in
/// one pass over x and dy ([`layer_norm_grad_row`], [`rms_norm_grad_row`]).
struct NormGrad {
    norm: Norm,
    eps: f32,
}

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        match self.norm {
            Norm::Layer => "fused-layer-norm-grad",
            Norm::Rms => "fused-rms-norm-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let dy = f32_data(s3, l3, self.name())?;
        let d = w.len();
        let rows = x.len() / d;
        let sums = match self.norm {
            Norm::Layer => 2,
            Norm::Rms => 1,
        };
        let out = rows_and_sums(rows, d, sums, |i, acc, o| {
            let (x, dy) = (&x[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d]);
            match self.norm {
                Norm::Layer => layer_norm_grad_row(x, dy, w, self.eps, acc, o),
                Norm::Rms => rms_norm_grad_row(x, dy, w, self.eps, acc, o),
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows + sums, d))))
    }
}

wide_simd_fn! {
    /// dx of one row into `out`; dw and db of the row added to acc[..d], acc[d..]:
    /// xhat = (x - mean) * rstd, g = dy * w,
    /// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dw = dy * xhat, db = dy.
    fn layer_norm_grad_row(row: &[f32], g_row: &[f32], w: &[f32], eps: f32, acc: &mut [f32], out: &mut [f32]) {
        let d = row.len();
        let (mean, rstd) = row_stats(row, eps);
        let (dw, db) = acc.split_at_mut(d);
        // out holds g = dy * w until the last loop.
        for j in 0..d {
            let xhat = (row[j] - mean) * rstd;
            out[j] = g_row[j] * w[j];
            dw[j] += g_row[j] * xhat;
            db[j] += g_row[j];
        }
        let mean_g = fast_math::sum_by(out, |g| g) / d as f32;
        let mean_gx = fast_math::sum_by2(out, row, |g, x| g * (x - mean) * rstd) / d as f32;
        for j in 0..d {
            let xhat = (row[j] - mean) * rstd;
            out[j] = rstd * (out[j] - mean_g - xhat * mean_gx);
        }
    }
}

// ---------------------------------------------------------------- RMSNorm

/// RMSNorm over the last dimension as transformers' LlamaRMSNorm:
/// x / sqrt(mean(x^2) + eps), normalized in f32, cast back, times w. The
/// composed op's backward reduces the weight gradient over the leading
/// dimensions, which Candle does with a division per element.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_path(&[x, w]) {
        let eps = eps as f32;
        return Ok(x
            .contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps })?);
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(variance + eps)?.sqrt()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(w)?)
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let d = w.len();
        if d == 0 || l1.dims().last() != Some(&d) {
            bail!("{}: the weight must match the last dimension", self.name())
        }
        let mut out = vec![0f32; x.len()];
        for_pieces(&mut out, d, |i, o| {
            rms_norm_row(&x[i * d..(i + 1) * d], w, self.eps, o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dx, params) = norm_backward(x, w, grad, Norm::Rms, self.eps)?;
        Ok((Some(dx), Some(params.get(0)?.reshape(w.shape())?)))
    }
}

/// 1 / sqrt(mean(x^2) + eps) of a row.
#[inline(always)]
fn rms_rstd(x: &[f32], eps: f32) -> f32 {
    let mean_sq = fast_math::sum_by(x, |v| v * v) / x.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

wide_simd_fn! {
    fn rms_norm_row(row: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let r = rms_rstd(row, eps);
        for j in 0..row.len() {
            out[j] = row[j] * r * w[j];
        }
    }
}

wide_simd_fn! {
    /// dx of one row into `out`; the row's dw added to `acc`: with
    /// r = 1/sqrt(mean(x^2) + eps) and g = dy * w,
    /// dx = r * (g - x * r^2 * mean(g * x)), dw = dy * x * r.
    fn rms_norm_grad_row(row: &[f32], g_row: &[f32], w: &[f32], eps: f32, acc: &mut [f32], out: &mut [f32]) {
        let d = row.len();
        let r = rms_rstd(row, eps);
        // out holds g = dy * w until the last loop.
        for j in 0..d {
            out[j] = g_row[j] * w[j];
            acc[j] += g_row[j] * row[j] * r;
        }
        let mean_gx = fast_math::sum_by2(out, row, |g, x| g * x) / d as f32;
        for j in 0..d {
            out[j] = r * (out[j] - row[j] * r * r * mean_gx);
        }
    }
}

// ---------------------------------------------------------------- SwiGLU

/// silu(gate) * up, the gated activation of Llama's MLP, with silu(x) = x sigmoid(x).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_path(&[gate, up]) && gate.shape() == up.shape() {
        Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)?)
    } else {
        Ok((gate.silu()? * up)?)
    }
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let gate = f32_data(s1, l1, self.name())?;
        let up = f32_data(s2, l2, self.name())?;
        if gate.len() != up.len() {
            bail!("{}: gate and up differ in shape", self.name())
        }
        let mut out = vec![0f32; gate.len()];
        for_chunks(&mut out, |at, o| {
            let n = o.len();
            silu_mul_chunk(&gate[at..at + n], &up[at..at + n], o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        // One kernel returns d gate and d up stacked on a new first dimension.
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SiluMulGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// (gate, up, dy) -> [d gate; d up]: with s = sigmoid(gate),
/// d gate = dy * up * s * (1 + gate * (1 - s)), d up = dy * gate * s.
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "fused-silu-mul-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let gate = f32_data(s1, l1, self.name())?;
        let up = f32_data(s2, l2, self.name())?;
        let dy = f32_data(s3, l3, self.name())?;
        let n = gate.len();
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        let d_up_out = SharedOut(d_up.as_mut_ptr());
        for_chunks(d_gate, |at, dg| {
            let m = dg.len();
            // SAFETY: chunks are disjoint and at + m <= n, the length of d_up.
            let du = unsafe { d_up_out.slice(at, m) };
            let ins = (&gate[at..at + m], &up[at..at + m], &dy[at..at + m]);
            silu_mul_grad_chunk(ins, dg, du)
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

wide_simd_fn! {
    fn silu_mul_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + fast_math::exp(-g)) * u;
        }
    }
}

wide_simd_fn! {
    fn silu_mul_grad_chunk(ins: (&[f32], &[f32], &[f32]), d_gate: &mut [f32], d_up: &mut [f32]) {
        let (gate, up, dy) = ins;
        for j in 0..d_gate.len() {
            let (g, u, dy) = (gate[j], up[j], dy[j]);
            let s = 1.0 / (1.0 + fast_math::exp(-g));
            d_gate[j] = dy * u * s * (1.0 + g * (1.0 - s));
            d_up[j] = dy * g * s;
        }
    }
}

// ---------------------------------------------------------------- rotary

/// Rotary position embedding in transformers' "rotate half" layout on x
/// (B, H, T, d): with r the last dimension of cos and sin (B, 1, T, r), the
/// first r features of each head turn pairwise, (x_j, x_{j+r/2}) by the
/// angle at j, and the other d - r pass unchanged. cos and sin take no
/// gradient. The composed version (narrow, neg, cat, two products and a sum)
/// keeps five (B, H, T, d) tensors per call alive for the backward; this
/// keeps none (its backward is the inverse rotation of the gradient).
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    let r = cos.dim(D::Minus1)?;
    let fits = cos.dims() == [b, 1, t, r] && sin.dims() == cos.dims() && r <= d && r % 2 == 0;
    if fits && fused_path(&[x, cos, sin]) {
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        return Ok(x
            .contiguous()?
            .apply_op3(&cos, &sin, Rotate { inverse: false })?);
    }
    if fits && r == d && !tracks_grad(&[x]) {
        // The rollout on other devices: Candle's no-grad kernel, which takes
        // one copy of the (duplicated) half angles, (B, T, d/2).
        let half = |c: &Tensor| c.squeeze(1)?.narrow(2, 0, r / 2)?.contiguous();
        let (cos, sin) = (half(cos)?, half(sin)?);
        return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?);
    }
    let (rot, pass) = (x.narrow(3, 0, r)?, x.narrow(3, r, d - r)?);
    let h = r / 2;
    let rotated_half = Tensor::cat(&[&rot.narrow(3, h, h)?.neg()?, &rot.narrow(3, 0, h)?], 3)?;
    let out = (rot.broadcast_mul(cos)? + rotated_half.broadcast_mul(sin)?)?;
    Ok(if r == d {
        out
    } else {
        Tensor::cat(&[&out, &pass], 3)?
    })
}

/// The rotation of [`rotary`] (x, cos, sin) -> y, or with `inverse` its
/// transpose, which maps the gradient of y to that of x.
struct Rotate {
    inverse: bool,
}

impl CustomOp3 for Rotate {
    fn name(&self) -> &'static str {
        "fused-rotary"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let cos = f32_data(s2, l2, self.name())?;
        let sin = f32_data(s3, l3, self.name())?;
        let (_, h, t, d) = l1.shape().dims4()?;
        let r = l2.dims()[3];
        let mut out = vec![0f32; x.len()];
        for_pieces(&mut out, d, |i, o| {
            // Row i is (batch, head, position); its angles are row (batch, position).
            let at = (i / (h * t) * t + i % t) * r;
            let (c, s) = (&cos[at..at + r], &sin[at..at + r]);
            rotate_row(&x[i * d..(i + 1) * d], c, s, self.inverse, o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rotate {
            inverse: !self.inverse,
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}

wide_simd_fn! {
    /// y_j = a c_j - b s_j, y_{j+h} = b c_{j+h} + a s_{j+h} for (a, b) =
    /// (x_j, x_{j+h}); the inverse is the transpose: a c_j + b s_{j+h}, b c_{j+h} - a s_j.
    pub(super) fn rotate_row(x: &[f32], cos: &[f32], sin: &[f32], inverse: bool, out: &mut [f32]) {
        let h = cos.len() / 2;
        let (x1, x2) = x[..2 * h].split_at(h);
        let (c1, c2) = cos.split_at(h);
        let (s1, s2) = sin.split_at(h);
        let (o1, rest) = out.split_at_mut(h);
        let (o2, pass) = rest.split_at_mut(h);
        if inverse {
            for j in 0..h {
                o1[j] = x1[j] * c1[j] + x2[j] * s2[j];
                o2[j] = x2[j] * c2[j] - x1[j] * s1[j];
            }
        } else {
            for j in 0..h {
                o1[j] = x1[j] * c1[j] - x2[j] * s1[j];
                o2[j] = x2[j] * c2[j] + x1[j] * s2[j];
            }
        }
        pass.copy_from_slice(&x[2 * h..]);
    }
}

// ---------------------------------------------------------------- attention softmax

/// softmax(scores * scale + bias) over the last dimension, for attention:
/// scores (B, H, T, L), bias (B or 1, 1, T, L) — the additive mask of
/// [`crate::models::attention_bias`], which takes no gradient.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_path(&[scores, bias]) && scores.rank() == 4 && bias.rank() == 4 {
        let (b, _, t, l) = scores.dims4()?;
        let (bb, bh, bt, bl) = bias.dims4()?;
        if (bb == b || bb == 1) && bh == 1 && bt == t && bl == l {
            let scores = scores.contiguous()?;
            let bias = bias.contiguous()?;
            return Ok(scores.apply_op2(
                &bias,
                MaskedSoftmax {
                    scale: scale as f32,
                },
            )?);
        }
    }
    // bf16/f16 scores are normalized in f32 (as transformers' eager Llama
    // attention does): a bf16 sum over hundreds of keys loses the small ones.
    let dtype = scores.dtype();
    let x = (scores * scale)?
        .broadcast_add(bias)?
        .to_dtype(DType::F32)?;
    let p = if tracks_grad(&[scores]) {
        candle_nn::ops::softmax(&x, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&x)?
    };
    Ok(p.to_dtype(dtype)?)
}

struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let bias = f32_data(s2, l2, self.name())?;
        let (_, h, t, l) = l1.shape().dims4()?;
        let bias_batch = l2.dims()[0];
        let mut out = vec![0f32; x.len()];
        for_pieces(&mut out, l, |r, o| {
            // Row r is (batch, head, query); its mask row is (batch, query).
            let batch = if bias_batch == 1 { 0 } else { r / (h * t) };
            let m = &bias[(batch * t + r % t) * l..][..l];
            softmax_row(&x[r * l..(r + 1) * l], m, self.scale, o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dx = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

wide_simd_fn! {
    pub(super) fn softmax_row(row: &[f32], mask: &[f32], scale: f32, out: &mut [f32]) {
        for j in 0..row.len() {
            out[j] = row[j] * scale + mask[j];
        }
        let max = fast_math::max(out);
        out.iter_mut().for_each(|v| *v = fast_math::exp(*v - max));
        let inv = 1.0 / fast_math::sum_by(out, |v| v);
        out.iter_mut().for_each(|v| *v *= inv);
    }
}

/// (y, dy) -> scale * y * (dy - sum(dy * y)) per row of the last dimension.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let y = f32_data(s1, l1, self.name())?;
        let dy = f32_data(s2, l2, self.name())?;
        let l = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; y.len()];
        for_pieces(&mut out, l, |r, o| {
            softmax_grad_row(
                &y[r * l..(r + 1) * l],
                &dy[r * l..(r + 1) * l],
                self.scale,
                o,
            )
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

wide_simd_fn! {
    pub(super) fn softmax_grad_row(y: &[f32], dy: &[f32], scale: f32, out: &mut [f32]) {
        let dot = fast_math::sum_by2(y, dy, |a, b| a * b);
        for j in 0..y.len() {
            out[j] = scale * y[j] * (dy[j] - dot);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A tensor of uniform values in [-scale, scale), from a seeded generator.
    pub(in crate::models) fn seeded(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut rng = crate::HostRng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest |x| of a tensor.
    pub(in crate::models) fn max_abs(x: &Tensor) -> f32 {
        x.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    pub(in crate::models) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    /// Value and gradients (w.r.t. every var) of sum(f(vars) * probe), fused vs composed.
    pub(in crate::models) fn compare(
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

    #[test]
    fn gelu_matches_candle_gelu_in_value_and_gradient() {
        let x = Var::from_tensor(&seeded(&[3, 70, 130], 1, 4.0)).unwrap();
        compare(
            &[x],
            |v| gelu_tanh(&v[0]).unwrap(),
            |v| v[0].gelu().unwrap(),
            1e-5,
        );
    }

    #[test]
    fn gelu_saturates_without_nan_far_from_zero() {
        let x = Var::new(
            &[-1e4f32, -100.0, -12.0, 0.0, 12.0, 100.0, 1e4],
            &Device::Cpu,
        )
        .unwrap();
        let y = gelu_tanh(x.as_tensor()).unwrap();
        assert_eq!(
            y.to_vec1::<f32>().unwrap(),
            x.gelu().unwrap().to_vec1::<f32>().unwrap()
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx = g.get(&x).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dx, [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn linear_matches_matmul_plus_bias_in_value_and_gradient() {
        // Both weight layouts; 5 rows (the transposed product of few rows)
        // and 300 (the plain product, parallel bias pass).
        for rows in [5, 300] {
            for transposed in [false, true] {
                let w_dims = if transposed { [70, 50] } else { [50, 70] };
                let vars = [
                    Var::from_tensor(&seeded(&[rows, 50], 11, 2.0)).unwrap(),
                    Var::from_tensor(&seeded(&w_dims, 12, 1.0)).unwrap(),
                    Var::from_tensor(&seeded(&[70], 13, 1.0)).unwrap(),
                ];
                let composed = |v: &[Tensor]| {
                    let w = if transposed {
                        v[1].t().unwrap()
                    } else {
                        v[1].clone()
                    };
                    v[0].matmul(&w).unwrap().broadcast_add(&v[2]).unwrap()
                };
                compare(
                    &vars,
                    |v| linear(&v[0], &v[1], &v[2], transposed).unwrap(),
                    composed,
                    1e-4,
                );
            }
        }
    }

    #[test]
    fn token_logprobs_and_entropy_match_the_composed_ops_in_value_and_gradient() {
        // Rows peaked and flat, a temperature, enough rows for the parallel path.
        let mut logits = seeded(&[3, 40, 300], 21, 6.0);
        logits = logits
            .slice_assign(&[0..1, 0..1, 0..300], &(seeded(&[1, 1, 300], 22, 0.01)))
            .unwrap();
        let tokens: Vec<u32> = (0..120).map(|i| (i * 37 % 300) as u32).collect();
        let tokens = Tensor::from_vec(tokens, (3, 40), &Device::Cpu).unwrap();
        let x = Var::from_tensor(&logits).unwrap();
        let scale = 1.0 / 0.7;
        let stack = |(lp, h): (Tensor, Tensor)| Tensor::stack(&[lp, h], 0).unwrap();
        compare(
            &[x],
            |v| stack(token_logprobs_and_entropy(&v[0], &tokens, scale).unwrap()),
            |v| {
                let scaled = (&v[0] * scale).unwrap();
                stack((
                    crate::rl::token_logprobs(&scaled, &tokens).unwrap(),
                    crate::rl::entropy_from_logits(&scaled).unwrap(),
                ))
            },
            2e-5,
        );
    }

    #[test]
    fn token_logprobs_and_entropy_reject_a_token_outside_the_vocabulary() {
        let logits = seeded(&[2, 5], 23, 1.0);
        let tokens = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
        let err = token_logprobs_and_entropy(&logits, &tokens, 1.0).unwrap_err();
        assert!(
            err.to_string()
                .contains("token 5 is outside the vocabulary of 5"),
            "{err}"
        );
    }

    #[test]
    fn rms_norm_matches_the_composed_op_in_value_and_gradient() {
        let vars = [
            Var::from_tensor(&(seeded(&[4, 100, 96], 31, 3.0) + 0.5).unwrap()).unwrap(),
            Var::from_tensor(&seeded(&[96], 32, 1.0)).unwrap(),
        ];
        let composed = |v: &[Tensor]| {
            let variance = v[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let rstd = (variance + 1e-6).unwrap().sqrt().unwrap();
            v[0].broadcast_div(&rstd)
                .unwrap()
                .broadcast_mul(&v[1])
                .unwrap()
        };
        compare(
            &vars,
            |v| rms_norm(&v[0], &v[1], 1e-6).unwrap(),
            composed,
            1e-5,
        );
    }

    #[test]
    fn silu_mul_matches_the_composed_op_in_value_and_gradient() {
        // Large enough for the parallel path; gates over the silu's bend and tails.
        let vars = [
            Var::from_tensor(&seeded(&[3, 70, 200], 41, 8.0)).unwrap(),
            Var::from_tensor(&seeded(&[3, 70, 200], 42, 2.0)).unwrap(),
        ];
        compare(
            &vars,
            |v| silu_mul(&v[0], &v[1]).unwrap(),
            |v| (v[0].silu().unwrap() * &v[1]).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn layer_norm_matches_the_composed_op_in_value_and_gradient() {
        // Rows with an offset and a spread, so mean and variance both matter;
        // large enough to take the parallel path.
        let x = (seeded(&[4, 100, 96], 2, 3.0) + 0.7).unwrap();
        let vars = [
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&seeded(&[96], 3, 1.0)).unwrap(),
            Var::from_tensor(&seeded(&[96], 4, 1.0)).unwrap(),
        ];
        compare(
            &vars,
            |v| layer_norm(&v[0], &v[1], &v[2], 1e-5).unwrap(),
            |v| candle_nn::ops::layer_norm_slow(&v[0], &v[1], &v[2], 1e-5).unwrap(),
            2e-5,
        );
        // A small batch on one thread.
        let small = [
            Var::from_tensor(&seeded(&[2, 3, 8], 5, 2.0)).unwrap(),
            Var::from_tensor(&seeded(&[8], 6, 1.0)).unwrap(),
            Var::from_tensor(&seeded(&[8], 7, 1.0)).unwrap(),
        ];
        compare(
            &small,
            |v| layer_norm(&v[0], &v[1], &v[2], 1e-5).unwrap(),
            |v| candle_nn::ops::layer_norm_slow(&v[0], &v[1], &v[2], 1e-5).unwrap(),
            2e-5,
        );
    }

    #[test]
    fn masked_softmax_matches_the_composed_op_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (b, h, t, l) = (2, 3, 5, 7);
        // A causal mask over the last t of l keys; row 1 also masks its first key.
        let mut m = vec![0f32; b * t * l];
        for bi in 0..b {
            for q in 0..t {
                for k in 0..l {
                    let blocked = k > l - t + q || (bi == 1 && k == 0);
                    m[(bi * t + q) * l + k] = if blocked { -1e9 } else { 0.0 };
                }
            }
        }
        let bias = Tensor::from_vec(m, (b, 1, t, l), &dev).unwrap();
        let scale = 1.0 / 8f64.sqrt();
        for bias in [bias.clone(), bias.narrow(0, 0, 1).unwrap()] {
            let x = Var::from_tensor(&seeded(&[b, h, t, l], 8, 5.0)).unwrap();
            compare(
                &[x],
                |v| masked_softmax(&v[0], &bias, scale).unwrap(),
                |v| {
                    let s = (&v[0] * scale).unwrap().broadcast_add(&bias).unwrap();
                    candle_nn::ops::softmax(&s, D::Minus1).unwrap()
                },
                1e-6,
            );
        }
        // Large enough for the parallel path.
        let x = Var::from_tensor(&seeded(&[4, 12, 64, 64], 9, 5.0)).unwrap();
        let bias = Tensor::zeros((4, 1, 64, 64), DType::F32, &dev).unwrap();
        compare(
            &[x],
            |v| masked_softmax(&v[0], &bias, 0.125).unwrap(),
            |v| {
                candle_nn::ops::softmax(
                    &(&v[0] * 0.125).unwrap().broadcast_add(&bias).unwrap(),
                    D::Minus1,
                )
                .unwrap()
            },
            1e-6,
        );
    }

    /// cos and sin (B, 1, T, r) of Rotary::cos_sin for left-padded position rows.
    fn rotary_angles(r: usize) -> (Tensor, Tensor) {
        let rot = crate::models::layers::Rotary::new(
            r,
            10_000.0,
            &crate::models::layers::RopeScaling::Default,
        )
        .unwrap();
        let pos = Tensor::new(&[[0u32, 0, 0, 1, 2], [0, 1, 2, 3, 4]], &Device::Cpu).unwrap();
        rot.cos_sin(&(pos * 7.0).unwrap(), DType::F32).unwrap()
    }

    #[test]
    fn rotary_matches_rotate_half_in_value_and_gradient() {
        // Full rotation (Llama) and a part of each head (GPT-NeoX's rotary_pct).
        for r in [8, 6] {
            let (cos, sin) = rotary_angles(r);
            let x = Var::from_tensor(&seeded(&[2, 3, 5, 8], 51, 2.0)).unwrap();
            // transformers' apply_rotary_pos_emb: x cos + rotate_half(x) sin on the first r.
            let reference = |v: &[Tensor]| {
                let (rot, pass) = (
                    v[0].narrow(3, 0, r).unwrap(),
                    v[0].narrow(3, r, 8 - r).unwrap(),
                );
                let (x1, x2) = (
                    rot.narrow(3, 0, r / 2).unwrap(),
                    rot.narrow(3, r / 2, r / 2).unwrap(),
                );
                let half = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
                let y =
                    (rot.broadcast_mul(&cos).unwrap() + half.broadcast_mul(&sin).unwrap()).unwrap();
                Tensor::cat(&[&y, &pass], 3).unwrap()
            };
            compare(
                &[x],
                |v| rotary(&v[0], &cos, &sin).unwrap(),
                reference,
                1e-5,
            );
        }
    }

    #[test]
    fn rotary_without_a_gradient_elsewhere_takes_candles_kernel() {
        // bf16 on the CPU stands in for a GPU: no graph, so Candle's rope runs.
        let (cos, sin) = rotary_angles(8);
        let x = seeded(&[2, 3, 5, 8], 52, 2.0);
        let want = rotary(&x, &cos, &sin).unwrap();
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = rotary(&bf(&x), &bf(&cos), &bf(&sin)).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert!(max_diff(&got.to_dtype(DType::F32).unwrap(), &want) < 0.05);
    }

    #[test]
    fn other_dtypes_take_the_composed_path() {
        let x = seeded(&[2, 8], 10, 2.0).to_dtype(DType::BF16).unwrap();
        let y = gelu_tanh(&x).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let want = x.gelu().unwrap().to_dtype(DType::F32).unwrap();
        assert!(max_diff(&y.to_dtype(DType::F32).unwrap(), &want) == 0.0);
    }
}

// ---------------------------------------------------------------- token log-probs and entropy

/// Per row of `logits` (.., V) scaled by `scale` (1 / temperature): the
/// log-probability of the row's token in `tokens` (..) u32, and the entropy
/// of the row's softmax; both (..), with a backward through the logits.
///
/// The composed version ([`crate::rl::token_logprobs`] and
/// [`crate::rl::entropy_from_logits`]) makes a dozen (.., V) tensors forward
/// and as many backward: with GPT-2's 50,257-word vocabulary, hundreds of
/// megabytes per micro-batch. This reads the logits twice forward and three
/// times backward, and writes only the (.., V) gradient.
pub fn token_logprobs_and_entropy(
    logits: &Tensor,
    tokens: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    // The kernel takes the row maximum before scaling, so it needs scale > 0
    // (a temperature is positive; the composed path takes any scale).
    let fused = fused_path(&[logits]) && scale > 0.0;
    if fused && tokens.dtype() == DType::U32 && tokens.device().is_cpu() {
        let v = logits.dim(D::Minus1)?;
        let rows = logits.contiguous()?.reshape(((), v))?;
        let both = rows.apply_op2(
            &tokens.flatten_all()?.contiguous()?,
            LogprobEntropy {
                scale: scale as f32,
            },
        )?;
        let shape = tokens.shape();
        return Ok((
            both.narrow(1, 0, 1)?.reshape(shape)?,
            both.narrow(1, 1, 1)?.reshape(shape)?,
        ));
    }
    let scaled = (logits * scale)?;
    Ok((
        crate::rl::token_logprobs(&scaled, tokens)?,
        crate::rl::entropy_from_logits(&scaled)?,
    ))
}

struct LogprobEntropy {
    scale: f32,
}

fn u32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [u32]> {
    let CpuStorage::U32(data) = s else {
        bail!("{op}: the tokens must be u32")
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the tokens must be contiguous"),
    }
}

/// The (N, V) logits and N tokens of the op, checked.
fn logits_and_tokens<'a>(
    op: &str,
    logits: (&'a CpuStorage, &Layout),
    tokens: (&'a CpuStorage, &Layout),
) -> CResult<(&'a [f32], &'a [u32], usize)> {
    let x = f32_data(logits.0, logits.1, op)?;
    let t = u32_data(tokens.0, tokens.1, op)?;
    let (n, v) = logits.1.shape().dims2()?;
    if t.len() != n || v == 0 {
        bail!("{op}: {n} rows of logits but {} tokens", t.len())
    }
    if let Some(&bad) = t.iter().find(|&&tok| tok as usize >= v) {
        bail!("{op}: token {bad} is outside the vocabulary of {v}")
    }
    Ok((x, t, v))
}

impl CustomOp2 for LogprobEntropy {
    fn name(&self) -> &'static str {
        "fused-logprob-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, tokens, v) = logits_and_tokens(self.name(), (s1, l1), (s2, l2))?;
        let n = tokens.len();
        let mut out = vec![0f32; 2 * n];
        for_pieces_costing(&mut out, 2, n * v, |i, o| {
            let row = &x[i * v..(i + 1) * v];
            let st = row_softmax_stats(row, self.scale);
            o[0] = self.scale * row[tokens[i] as usize] - st.lse;
            o[1] = st.entropy;
        });
        Ok((CpuStorage::F32(out), Shape::from((n, 2))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        tokens: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx =
            logits.apply_op3_no_bwd(tokens, &grad, &LogprobEntropyGrad { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

/// (logits, tokens, d[logp, entropy]) -> d logits, with p = softmax(s l),
/// log p_j = s l_j - lse and H = -sum p log p:
/// d logp / d l_j = s (1[j = token] - p_j), dH / d l_j = -s p_j (log p_j + H).
struct LogprobEntropyGrad {
    scale: f32,
}

impl CustomOp3 for LogprobEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-logprob-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, tokens, v) = logits_and_tokens(self.name(), (s1, l1), (s2, l2))?;
        let g = f32_data(s3, l3, self.name())?;
        let n = tokens.len();
        let mut out = vec![0f32; n * v];
        for_pieces_costing(&mut out, v, 3 * n * v, |i, o| {
            let row = &x[i * v..(i + 1) * v];
            let st = row_softmax_stats(row, self.scale);
            let (g_logp, g_entropy) = (g[2 * i], g[2 * i + 1]);
            logprob_entropy_grad_row(row, self.scale, st, g_logp, g_entropy, o);
            o[tokens[i] as usize] += self.scale * g_logp;
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Of the softmax of s * row: log-sum-exp and entropy.
#[derive(Clone, Copy)]
struct SoftmaxStats {
    lse: f32,
    entropy: f32,
}

wide_simd_fn! {
    /// Two passes over the row: its maximum, then sum(e) and sum(e z) with
    /// z = s l - max and e = exp(z); lse = max + ln sum(e), H = ln sum(e) - sum(e z) / sum(e).
    fn row_softmax_stats(row: &[f32], scale: f32) -> SoftmaxStats {
        // scale > 0 (checked by the caller), so the maximum of s l is s max(l).
        let m = scale * fast_math::max(row);
        let (mut sum, mut sum_ez) = ([0f32; LANES], [0f32; LANES]);
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for k in 0..LANES {
                let z = scale * c[k] - m;
                let e = fast_math::exp(z);
                sum[k] += e;
                sum_ez[k] += e * z;
            }
        }
        let (mut s, mut sez) = (sum.iter().sum::<f32>(), sum_ez.iter().sum::<f32>());
        for &l in tail {
            let z = scale * l - m;
            let e = fast_math::exp(z);
            s += e;
            sez += e * z;
        }
        let log_sum = s.ln();
        SoftmaxStats {
            lse: m + log_sum,
            entropy: log_sum - sez / s,
        }
    }
}

wide_simd_fn! {
    /// out_j = s (-g_logp p_j - g_entropy p_j (log p_j + H)); the caller adds
    /// s g_logp at the token.
    fn logprob_entropy_grad_row(
        row: &[f32],
        scale: f32,
        st: SoftmaxStats,
        g_logp: f32,
        g_entropy: f32,
        out: &mut [f32],
    ) {
        for (o, &l) in out.iter_mut().zip(row) {
            let logp = scale * l - st.lse;
            let p = fast_math::exp(logp);
            *o = -scale * p * (g_logp + g_entropy * (logp + st.entropy));
        }
    }
}
