//! Attention's weight-free middle as one CPU op with its own backward:
//! splitting heads, rotary, scores, the masked softmax, the weighted sum and
//! merging heads, for training and scoring (no KV cache).
//!
//! Composed, the middle is about fifteen Candle ops (narrows, reshapes,
//! transposes, copies, two batched products, the softmax), and Candle's
//! backward adds each op's gradient into a fresh zero tensor: zero fills and
//! adds were 12% of a tiny-model PPO iteration. Here each (batch, key/value
//! head) is one task with the gemm crate's products, reading q, k and v in
//! place from the projections' output (copying only blocks it rotates).
//!
//! Where a layer has many scores, the backward recomputes the probabilities
//! from q and k as FlashAttention's does (Dao et al., 2022), and the op keeps
//! nothing alive but its inputs: no per-head copies, rotated q and k, scores
//! or probabilities (about a fifth of a GPT-2-small reward step's
//! activations, by a count of tensor sizes). Below that the forward keeps the
//! probabilities ([`Middle::keeps_probabilities`]).

use std::sync::OnceLock;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result as CResult, Shape, Storage, Tensor,
};

use super::product::{gemm, Mat};
use super::rotary::rotate_row;
use super::softmax::{softmax_grad_row, softmax_row};
use super::{f32_data, for_units, fused_path, SharedOut};
use crate::Result;

/// How q, k and v sit in one (B, T, C) projection output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Packing {
    /// All query heads, then all key heads, then all value heads (GPT-2's c_attn).
    Blocks,
    /// q, k and v of each head side by side (GPT-NeoX's query_key_value).
    PerHead,
}

/// Attention over q, k and v packed in `qkv` (B, T, 3 H d), with the additive
/// `bias` (B, 1, T, T) of [`super::attention_bias`] and optionally rotary
/// angles (cos, sin) (B, 1, T, r) as [`super::fused::rotary`] takes them.
/// Returns (B, T, H d), or None where the op does not apply (not the CPU in
/// f32, other shapes): the caller then composes the ops.
pub fn packed_attention(
    qkv: &Tensor,
    packing: Packing,
    heads: usize,
    bias: &Tensor,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Option<Tensor>> {
    let (b, t, c) = qkv.dims3()?;
    if heads == 0 || c % (3 * heads) != 0 {
        return Ok(None);
    }
    let d = c / (3 * heads);
    let Some(op) = Middle::new(qkv, (b, t), (heads, heads, d), bias, rope)? else {
        return Ok(None);
    };
    let op = Packed { op, packing };
    Ok(Some(qkv.contiguous()?.apply_op1(op)?))
}

/// Attention over separate q (B, T, H d), k and v (B, T, Hkv d) (grouped
/// query attention when Hkv < H), otherwise as [`packed_attention`].
pub fn split_attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    bias: &Tensor,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Option<Tensor>> {
    let (b, t, c) = q.dims3()?;
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || c % heads != 0 {
        return Ok(None);
    }
    let d = c / heads;
    if k.dims() != [b, t, kv_heads * d] || v.dims() != k.dims() {
        return Ok(None);
    }
    let Some(op) = Middle::new(q, (b, t), (heads, kv_heads, d), bias, rope)? else {
        return Ok(None);
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(Some(q.apply_op3(&k, &v, Split(op))?))
}

/// Element (b, t, head, j) of a (B, T, C) buffer sits at
/// offset + b * b_stride + t * t_stride + head * h_stride + j.
#[derive(Clone, Copy)]
struct View {
    offset: usize,
    b_stride: usize,
    t_stride: usize,
    h_stride: usize,
}

impl View {
    fn at(&self, b: usize, t: usize, head: usize) -> usize {
        self.offset + b * self.b_stride + t * self.t_stride + head * self.h_stride
    }
}

/// The op's settings: head counts, the mask and the rotary angles (neither
/// takes a gradient).
struct Middle {
    /// B and T.
    batch: usize,
    len: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    scale: f32,
    /// The mask (B, 1, T, T), row-major.
    bias: Vec<f32>,
    /// cos and sin (B, 1, T, r), row-major, and r.
    rope: Option<(Vec<f32>, Vec<f32>, usize)>,
    /// The probabilities (B, H, T, T) where the forward keeps them.
    kept: OnceLock<Vec<f32>>,
}

impl Middle {
    /// The settings, or None where the op does not apply.
    fn new(
        x: &Tensor,
        (b, t): (usize, usize),
        (heads, kv_heads, d): (usize, usize, usize),
        bias: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Option<Self>> {
        if !fused_path(&[x, bias]) || bias.dims() != [b, 1, t, t] || d == 0 {
            return Ok(None);
        }
        let rope = match rope {
            None => None,
            Some((cos, sin)) => {
                let r = cos.dims().last().copied().unwrap_or(0);
                let fits = cos.dims() == [b, 1, t, r] && sin.dims() == cos.dims();
                if !fits || r > d || r % 2 != 0 || !fused_path(&[cos, sin]) {
                    return Ok(None);
                }
                Some((flat(cos)?, flat(sin)?, r))
            }
        };
        Ok(Some(Self {
            batch: b,
            len: t,
            heads,
            kv_heads,
            d,
            scale: 1.0 / (d as f32).sqrt(),
            bias: flat(bias)?,
            rope,
            kept: OnceLock::new(),
        }))
    }

    /// Views of q, k and v in a contiguous (B, T, C) buffer packed as `packing`.
    fn packed_views(&self, packing: Packing) -> [View; 3] {
        let (t, h, d) = (self.len, self.heads, self.d);
        let c = 3 * h * d;
        let view = |offset, h_stride| View {
            offset,
            b_stride: t * c,
            t_stride: c,
            h_stride,
        };
        match packing {
            Packing::Blocks => [view(0, d), view(h * d, d), view(2 * h * d, d)],
            Packing::PerHead => [view(0, 3 * d), view(d, 3 * d), view(2 * d, 3 * d)],
        }
    }

    /// The view of a contiguous (B, T, heads d) buffer.
    fn plain_view(&self, heads: usize) -> View {
        View {
            offset: 0,
            b_stride: self.len * heads * self.d,
            t_stride: heads * self.d,
            h_stride: self.d,
        }
    }

    /// Whether q and k turn by rotary angles (else every operand is read and
    /// every gradient written in place, through its view).
    fn rotates(&self) -> bool {
        self.rope.is_some()
    }

    /// The (t x d) block of `head` at batch b in `src` as a gemm operand: in
    /// place, or rotated into `buf` when `rotate` and the op has angles.
    fn operand(
        &self,
        src: &[f32],
        view: View,
        (b, head): (usize, usize),
        rotate: bool,
        buf: &mut [f32],
    ) -> Mat {
        if !(rotate && self.rotates()) {
            let at = view.at(b, 0, head);
            // The block's last row ends within src (checked in cpu_fwd).
            return Mat {
                ptr: src[at..].as_ptr(),
                rs: view.t_stride as isize,
                cs: 1,
            };
        }
        for (t, out) in buf.chunks_mut(self.d).enumerate() {
            let at = view.at(b, t, head);
            let (cos, sin) = self.angles(b, t).expect("the op rotates");
            rotate_row(&src[at..at + self.d], cos, sin, false, out);
        }
        Mat::rows(buf, self.d)
    }

    /// Where the gradient of the (t x d) block of `head` at batch b goes:
    /// in place in `dst` (pointer, row stride), or `buf` when it has to turn
    /// back first ([`Self::put_back`]).
    fn target(
        &self,
        dst: &SharedOut,
        view: View,
        (b, head): (usize, usize),
        rotated: bool,
        buf: &mut [f32],
    ) -> (*mut f32, usize) {
        if rotated && self.rotates() {
            (buf.as_mut_ptr(), self.d)
        } else {
            // SAFETY: within the buffer (checked in cpu_fwd, same views).
            (unsafe { dst.ptr(view.at(b, 0, head)) }, view.t_stride)
        }
    }

    /// Turns a gradient block computed in `buf` by [`Self::target`] back by
    /// the rotary angles into `dst`; nothing to do where it went in place.
    ///
    /// # Safety
    /// No other thread writes that block of `dst` meanwhile.
    unsafe fn put_back(&self, buf: &[f32], dst: &SharedOut, view: View, (b, head): (usize, usize)) {
        if !self.rotates() {
            return;
        }
        for (t, row) in buf.chunks(self.d).enumerate() {
            let (cos, sin) = self.angles(b, t).expect("the op rotates");
            rotate_row(row, cos, sin, true, dst.slice(view.at(b, t, head), self.d));
        }
    }

    /// Checks that `len` elements hold (B, T) rows of `heads` heads through `view`.
    fn check(&self, name: &str, len: usize, view: View, heads: usize) -> CResult<()> {
        let (b, t) = (self.batch, self.len);
        if b == 0 || t == 0 || view.at(b - 1, t - 1, heads - 1) + self.d > len {
            bail!(
                "{name}: {len} values do not hold {b} x {t} rows of {heads} heads of {}",
                self.d
            )
        }
        Ok(())
    }

    /// The rotary angles (cos, sin) of position t at batch b, if any.
    fn angles(&self, b: usize, t: usize) -> Option<(&[f32], &[f32])> {
        let (cos, sin, r) = self.rope.as_ref()?;
        let len = self.len;
        let at = (b * len + t) * r;
        Some((&cos[at..at + r], &sin[at..at + r]))
    }

    /// The mask of batch b, T x T.
    fn bias_of(&self, b: usize) -> &[f32] {
        let n = self.len.pow(2);
        &self.bias[b * n..(b + 1) * n]
    }

    /// Whether the forward keeps the probabilities for the backward: below
    /// 2^19 (B, H, T, T) scores (2 MB) per layer, where recomputing them
    /// (a product and a softmax per head) costs more time than the memory is
    /// worth (docs/benchmarks-history.md, "Design measurements"). GPT-2's reward step
    /// (3.1M scores per layer) and SmolLM2's PPO micro-batch (0.99M) recompute.
    fn keeps_probabilities(&self) -> bool {
        self.batch * self.heads * self.len * self.len < 1 << 19
    }

    /// The forward: softmax(q k^T / sqrt(d) + bias) v per head, (B, T, H d).
    fn forward(&self, srcs: [(&[f32], View); 3]) -> Vec<f32> {
        let (bsz, t) = (self.batch, self.len);
        let (h, d, group) = (self.heads, self.d, self.heads / self.kv_heads);
        let mut out = vec![0f32; bsz * t * h * d];
        let out_view = self.plain_view(h);
        let dst = SharedOut(out.as_mut_ptr());
        let keep = self.keeps_probabilities();
        let mut kept = vec![0f32; if keep { bsz * h * t * t } else { 0 }];
        let kept_dst = SharedOut(kept.as_mut_ptr());
        let [(q, qv), (k, kv), (v, vv)] = srcs;
        for_units(bsz * self.kv_heads, bsz * h * t * t * d, |units| {
            let mut buf = Buffers::new(t, d);
            for unit in units {
                let (b, g) = (unit / self.kv_heads, unit % self.kv_heads);
                let km = self.operand(k, kv, (b, g), true, &mut buf.k);
                let vm = self.operand(v, vv, (b, g), false, &mut buf.v);
                for head in g * group..(g + 1) * group {
                    let qm = self.operand(q, qv, (b, head), true, &mut buf.q);
                    let p = match keep {
                        // SAFETY: unit (b, g) alone writes the block of (b, head).
                        true => unsafe { kept_dst.slice((b * h + head) * t * t, t * t) },
                        false => &mut buf.p[..],
                    };
                    self.probabilities((qm, km), &mut buf.s, p, b);
                    // out[b, :, head] = p v, written in place (row stride H d).
                    // SAFETY: unit (b, g) alone writes the columns of its heads
                    // at batch b; p holds t x t values, v addresses t x d.
                    unsafe {
                        let o = dst.ptr(out_view.at(b, 0, head));
                        gemm(t, d, t, (o, h * d), false, Mat::rows(p, t), vm);
                    }
                }
            }
        });
        if keep {
            // Set once: Candle runs an op's forward once.
            let _ = self.kept.set(kept);
        }
        out
    }

    /// The backward: d q, d k and d v through the views `dst_views` of `dst`,
    /// from the output gradient `dy` (B, T, H d) contiguous.
    fn backward(
        &self,
        srcs: [(&[f32], View); 3],
        dy: &[f32],
        dst: &SharedOut,
        dst_views: [View; 3],
    ) {
        let (bsz, t) = (self.batch, self.len);
        let (h, d, group) = (self.heads, self.d, self.heads / self.kv_heads);
        let dy_view = self.plain_view(h);
        let [(q, qv), (k, kv), (v, vv)] = srcs;
        let [dqv, dkv, dvv] = dst_views;
        let kept = self.kept.get();
        for_units(bsz * self.kv_heads, 3 * bsz * h * t * t * d, |units| {
            let mut buf = Buffers::new(t, d);
            let (mut dk_buf, mut dq_buf) = (vec![0f32; t * d], vec![0f32; t * d]);
            let mut dp = vec![0f32; t * t];
            for unit in units {
                let (b, g) = (unit / self.kv_heads, unit % self.kv_heads);
                let km = self.operand(k, kv, (b, g), true, &mut buf.k);
                let vm = self.operand(v, vv, (b, g), false, &mut buf.v);
                let dk = self.target(dst, dkv, (b, g), true, &mut dk_buf);
                let dv = self.target(dst, dvv, (b, g), false, &mut []);
                for head in g * group..(g + 1) * group {
                    let qm = self.operand(q, qv, (b, head), true, &mut buf.q);
                    let p = match kept {
                        Some(all) => &all[(b * h + head) * t * t..][..t * t],
                        None => {
                            self.probabilities((qm, km), &mut buf.s, &mut buf.p, b);
                            &buf.p[..]
                        }
                    };
                    let dy_h = Mat {
                        ptr: dy[dy_view.at(b, 0, head)..].as_ptr(),
                        rs: (h * d) as isize,
                        cs: 1,
                    };
                    // The first head of the group sets dk and dv, the others add.
                    let first = head == g * group;
                    // SAFETY: p, dp and s hold t x t values; every other
                    // operand and target addresses a t x d block through its
                    // strides, and unit (b, g) alone writes the targets.
                    unsafe {
                        // dv += p^T dy; dp = dy v^T.
                        gemm(t, d, t, dv, !first, Mat::rows(p, t).t(), dy_h);
                        gemm(t, t, d, (dp.as_mut_ptr(), t), false, dy_h, vm.t());
                    }
                    // ds = scale p (dp - sum(dp p)), into s (the scores are spent).
                    for i in 0..t {
                        let r = i * t..(i + 1) * t;
                        softmax_grad_row(&p[r.clone()], &dp[r.clone()], self.scale, &mut buf.s[r]);
                    }
                    let dq = self.target(dst, dqv, (b, head), true, &mut dq_buf);
                    // SAFETY: as above.
                    unsafe {
                        // dq = ds k; dk += ds^T q.
                        let ds = Mat::rows(&buf.s, t);
                        gemm(t, d, t, dq, false, ds, km);
                        gemm(t, d, t, dk, !first, ds.t(), qm);
                        self.put_back(&dq_buf, dst, dqv, (b, head));
                    }
                }
                // SAFETY: unit (b, g) alone writes key/value head g at batch b.
                unsafe { self.put_back(&dk_buf, dst, dkv, (b, g)) };
            }
        });
    }

    /// s = q k^T, then p = softmax(s scale + bias) row by row (q and k
    /// t x d, s and p t x t), with the mask of batch b.
    fn probabilities(&self, (q, k): (Mat, Mat), s: &mut [f32], p: &mut [f32], b: usize) {
        let (t, d) = (self.len, self.d);
        // SAFETY: q and k address t x d blocks, s holds t x t values.
        unsafe { gemm(t, t, d, (s.as_mut_ptr(), t), false, q, k.t()) };
        let bias = self.bias_of(b);
        for i in 0..t {
            let r = i * t..(i + 1) * t;
            softmax_row(&s[r.clone()], &bias[r.clone()], self.scale, &mut p[r]);
        }
    }
}

/// The op on packed q, k, v.
struct Packed {
    op: Middle,
    packing: Packing,
}

impl Packed {
    fn views(&self) -> [View; 3] {
        self.op.packed_views(self.packing)
    }
}

impl CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s, l, self.name())?;
        let views = self.views();
        for view in views {
            self.op.check(self.name(), x.len(), view, self.op.heads)?;
        }
        let out = self.op.forward(views.map(|view| (x, view)));
        let (b, t, hd) = (self.op.batch, self.op.len, self.op.heads * self.op.d);
        Ok((CpuStorage::F32(out), Shape::from((b, t, hd))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let views = self.views();
        let mut dx = vec![0f32; x.elem_count()];
        let dst = SharedOut(dx.as_mut_ptr());
        with_f32(x, |x| {
            with_f32(grad, |dy| {
                self.op
                    .backward(views.map(|view| (x, view)), dy, &dst, views);
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// The op on separate q, k, v.
struct Split(Middle);

impl Split {
    fn views(&self) -> [View; 3] {
        let op = &self.0;
        let kv = op.plain_view(op.kv_heads);
        [op.plain_view(op.heads), kv, kv]
    }
}

impl CustomOp3 for Split {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let op = &self.0;
        let [qv, kv, vv] = self.views();
        let q = f32_data(s1, l1, self.name())?;
        let k = f32_data(s2, l2, self.name())?;
        let v = f32_data(s3, l3, self.name())?;
        op.check(self.name(), q.len(), qv, op.heads)?;
        op.check(self.name(), k.len(), kv, op.kv_heads)?;
        op.check(self.name(), v.len(), vv, op.kv_heads)?;
        let out = op.forward([(q, qv), (k, kv), (v, vv)]);
        Ok((
            CpuStorage::F32(out),
            Shape::from((op.batch, op.len, op.heads * op.d)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let views = self.views();
        // dq, dk and dv in one buffer, dk's and dv's views shifted past dq.
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let mut all = vec![0f32; nq + 2 * nk];
        let dst = SharedOut(all.as_mut_ptr());
        let shifted = |view: View, by: usize| View {
            offset: view.offset + by,
            ..view
        };
        let dst_views = [views[0], shifted(views[1], nq), shifted(views[2], nq + nk)];
        with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(grad, |dy| {
                        self.0.backward(
                            [(q, views[0]), (k, views[1]), (v, views[2])],
                            dy,
                            &dst,
                            dst_views,
                        );
                        Ok(())
                    })
                })
            })
        })?;
        let dv = all.split_off(nq + nk);
        let dk = all.split_off(nq);
        let cpu = q.device();
        Ok((
            Some(Tensor::from_vec(all, q.shape(), cpu)?),
            Some(Tensor::from_vec(dk, k.shape(), cpu)?),
            Some(Tensor::from_vec(dv, v.shape(), cpu)?),
        ))
    }
}

/// f(the f32 values of x), x made contiguous.
fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> CResult<R>) -> CResult<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(f32_data(s, layout, "fused-attention")?),
        _ => bail!("fused-attention: CPU tensors only"),
    }
}

/// One task's working buffers: a head's q, its key/value head's k and v
/// (t x d each, rotated), the scores s and the probabilities p (t x t).
struct Buffers {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    p: Vec<f32>,
}

impl Buffers {
    fn new(t: usize, d: usize) -> Self {
        Self {
            q: vec![0f32; t * d],
            k: vec![0f32; t * d],
            v: vec![0f32; t * d],
            s: vec![0f32; t * t],
            p: vec![0f32; t * t],
        }
    }
}

/// The f32 values of `x`, row-major.
fn flat(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rotary;
    use crate::kernels::testing::{causal_bias, compare, rope_angles, seeded};
    use candle_core::{DType, Var, D};

    /// A causal mask over t positions for 2 rows, the first left-padded by 2.
    fn bias(t: usize) -> Tensor {
        causal_bias(&[(0..t).map(|j| u32::from(j >= 2)).collect(), vec![1; t]])
    }

    /// Rotary angles (2, 1, t, r), positions 0.. with a per-row shift.
    fn angles(t: usize, r: usize) -> (Tensor, Tensor) {
        let t32 = t as u32;
        rope_angles(&[(0..t32).collect(), (3..3 + t32).collect()], r)
    }

    /// (B, T, H d) -> (B, H, T, d).
    fn split_heads(x: &Tensor, heads: usize) -> Tensor {
        let (b, t, _) = x.dims3().unwrap();
        x.reshape((b, t, heads, ()))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    /// The composed middle, op by op as transformers writes it: heads split,
    /// rotary, softmax(q k^T / sqrt(d) + bias) v with each key/value head
    /// repeated for its group of query heads, heads merged.
    fn composed(
        (q, k, v): (Tensor, Tensor, Tensor),
        (heads, kv_heads): (usize, usize),
        bias: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
    ) -> Tensor {
        let rotate = |x: Tensor| match rope {
            Some((cos, sin)) => rotary(&x, cos, sin).unwrap(),
            None => x,
        };
        let repeat = |x: Tensor| {
            let parts: Vec<Tensor> = (0..kv_heads)
                .flat_map(|g| (0..heads / kv_heads).map(move |_| g))
                .map(|g| x.narrow(1, g, 1).unwrap())
                .collect();
            Tensor::cat(&parts, 1).unwrap()
        };
        let q = rotate(split_heads(&q, heads));
        let k = repeat(rotate(split_heads(&k, kv_heads)))
            .contiguous()
            .unwrap();
        let v = repeat(split_heads(&v, kv_heads)).contiguous().unwrap();
        let (b, h, t, d) = q.dims4().unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let probs =
            candle_nn::ops::softmax(&scores.broadcast_add(bias).unwrap(), D::Minus1).unwrap();
        let out = probs.matmul(&v).unwrap();
        out.transpose(1, 2).unwrap().reshape((b, t, h * d)).unwrap()
    }

    #[test]
    fn packed_blocks_equal_the_composed_attention_in_value_and_gradient() {
        // GPT-2's layout: 3 heads of 8, no rotary; 7 positions (one task on
        // the calling thread), 40 (the pool) and 300 (probabilities
        // recomputed in the backward, not kept).
        for (t, kept) in [(7, true), (40, true), (300, false)] {
            let (h, d) = (3, 8);
            let qkv = Var::from_tensor(&seeded(&[2, t, 3 * h * d], 1, 1.5)).unwrap();
            let mask = bias(t);
            let op = Middle::new(&qkv, (2, t), (h, h, d), &mask, None)
                .unwrap()
                .unwrap();
            assert_eq!(op.keeps_probabilities(), kept);
            compare(
                &[qkv],
                |x| {
                    packed_attention(&x[0], Packing::Blocks, h, &mask, None)
                        .unwrap()
                        .expect("the fused op applies")
                },
                |x| {
                    let part = |i: usize| x[0].narrow(2, i * h * d, h * d).unwrap();
                    composed((part(0), part(1), part(2)), (h, h), &mask, None)
                },
                1e-5,
            );
        }
    }

    #[test]
    fn packed_per_head_with_partial_rotary_equals_the_composed_attention() {
        // GPT-NeoX's layout: q, k, v side by side per head; rotary on 4 of 8.
        let (t, h, d) = (9, 2, 8);
        let qkv = Var::from_tensor(&seeded(&[2, t, 3 * h * d], 2, 1.5)).unwrap();
        let mask = bias(t);
        let rope = angles(t, 4);
        compare(
            &[qkv],
            |x| {
                packed_attention(&x[0], Packing::PerHead, h, &mask, Some((&rope.0, &rope.1)))
                    .unwrap()
                    .expect("the fused op applies")
            },
            |x| {
                let per_head = x[0].reshape((2, t, h, 3 * d)).unwrap();
                let part = |i: usize| {
                    per_head
                        .narrow(3, i * d, d)
                        .unwrap()
                        .reshape((2, t, h * d))
                        .unwrap()
                };
                composed((part(0), part(1), part(2)), (h, h), &mask, Some(&rope))
            },
            1e-5,
        );
    }

    #[test]
    fn split_grouped_query_attention_with_rotary_equals_the_composed_attention() {
        // Llama's layout: 4 query heads over 2 key/value heads of 8, full rotary.
        let (t, h, kvh, d) = (11, 4, 2, 8);
        let vars = [
            Var::from_tensor(&seeded(&[2, t, h * d], 3, 1.5)).unwrap(),
            Var::from_tensor(&seeded(&[2, t, kvh * d], 4, 1.5)).unwrap(),
            Var::from_tensor(&seeded(&[2, t, kvh * d], 5, 1.5)).unwrap(),
        ];
        let mask = bias(t);
        let rope = angles(t, d);
        compare(
            &vars,
            |x| {
                split_attention(
                    (&x[0], &x[1], &x[2]),
                    (h, kvh),
                    &mask,
                    Some((&rope.0, &rope.1)),
                )
                .unwrap()
                .expect("the fused op applies")
            },
            |x| {
                composed(
                    (x[0].clone(), x[1].clone(), x[2].clone()),
                    (h, kvh),
                    &mask,
                    Some(&rope),
                )
            },
            1e-5,
        );
    }

    #[test]
    fn bidirectional_attention_with_key_padding_equals_the_composed_attention() {
        // BERT's layout: separate q, k, v, no rotary, every query sees every
        // real key (before and after it); the second row right-padded by 3.
        let (t, h, d) = (9, 3, 8);
        let keys = [
            vec![1u32; t],
            (0..t).map(|j| u32::from(j < t - 3)).collect(),
        ];
        let rows: Vec<f32> = keys
            .iter()
            .flat_map(|k| {
                let row: Vec<f32> = k.iter().map(|&m| if m == 1 { 0.0 } else { -1e9 }).collect();
                std::iter::repeat_n(row, t).flatten()
            })
            .collect();
        let mask = Tensor::from_vec(rows, (2, 1, t, t), &candle_core::Device::Cpu).unwrap();
        let vars = [
            Var::from_tensor(&seeded(&[2, t, h * d], 7, 1.5)).unwrap(),
            Var::from_tensor(&seeded(&[2, t, h * d], 8, 1.5)).unwrap(),
            Var::from_tensor(&seeded(&[2, t, h * d], 9, 1.5)).unwrap(),
        ];
        compare(
            &vars,
            |x| {
                split_attention((&x[0], &x[1], &x[2]), (h, h), &mask, None)
                    .unwrap()
                    .expect("the fused op applies")
            },
            |x| {
                composed(
                    (x[0].clone(), x[1].clone(), x[2].clone()),
                    (h, h),
                    &mask,
                    None,
                )
            },
            1e-5,
        );
    }

    #[test]
    fn the_op_declines_what_it_does_not_cover() {
        let qkv = seeded(&[2, 5, 24], 6, 1.0);
        let mask = bias(5);
        // Heads that do not divide the width, a mask of another length, bf16.
        assert!(packed_attention(&qkv, Packing::Blocks, 5, &mask, None)
            .unwrap()
            .is_none());
        assert!(packed_attention(&qkv, Packing::Blocks, 2, &bias(6), None)
            .unwrap()
            .is_none());
        let bf16 = qkv.to_dtype(DType::BF16).unwrap();
        assert!(packed_attention(&bf16, Packing::Blocks, 2, &mask, None)
            .unwrap()
            .is_none());
        assert!(packed_attention(&qkv, Packing::Blocks, 2, &mask, None)
            .unwrap()
            .is_some());
    }
}
