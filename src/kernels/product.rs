//! Matrix products on Candle's worker pool: the gemm crate on each thread,
//! the rows (or the columns) of the result split between the pool's threads.
//!
//! Candle's own CPU matmul hands the gemm crate rayon's pool, while Candle's
//! elementwise ops and these kernels run on its barrier pool, whose workers
//! spin between ops. Two pools on the same cores take turns: the barrier
//! pool's spinning worker holds a core the product's rayon workers need
//! (docs/benchmarks-history.md, "One pool for the products"). Here every product of the
//! fused layers runs on the barrier pool, so one set of threads does all the
//! work. With a BLAS feature (`mkl`, `accelerate`) the products go to
//! Candle's matmul, which calls the BLAS.

// With a BLAS feature the pooled gemm below serves the attention op only.
#![cfg_attr(any(feature = "mkl", feature = "accelerate"), allow(dead_code))]

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result as CResult, Shape, Tensor};

use super::fused_path;
use crate::Result;

/// A matrix for gemm: its first element and its row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub(crate) ptr: *const f32,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

// SAFETY: a Mat only reads; the products below read it from several threads
// while its owner keeps the data alive (the calls block until all are done).
unsafe impl Sync for Mat {}
unsafe impl Send for Mat {}

impl Mat {
    /// A row-major matrix of `cols` columns.
    pub(crate) fn rows(data: &[f32], cols: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose (the same memory).
    pub(crate) fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// The matrix starting at row `i`, column `j` of this one.
    ///
    /// # Safety
    /// (i, j) lies within the matrix.
    unsafe fn at(self, i: usize, j: usize) -> Self {
        Self {
            ptr: self.ptr.offset(i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }

    /// A 2-D f32 tensor's storage seen through its layout (any strides).
    fn of(s: &CpuStorage, l: &Layout, op: &str) -> CResult<Self> {
        let CpuStorage::F32(data) = s else {
            bail!("{op}: f32 only")
        };
        let [rs, cs] = l.stride() else {
            bail!("{op}: 2-D operands only, got {:?}", l.dims())
        };
        // The last element the layout reaches must lie in the buffer.
        let (rows, cols) = l.shape().dims2()?;
        let last = l.start_offset() + rows.saturating_sub(1) * rs + cols.saturating_sub(1) * cs;
        if rows > 0 && cols > 0 && last >= data.len() {
            bail!("{op}: layout {l:?} outside its buffer of {}", data.len())
        }
        Ok(Self {
            ptr: data[l.start_offset().min(data.len())..].as_ptr(),
            rs: *rs as isize,
            cs: *cs as isize,
        })
    }
}

/// dst (m x n, row stride dst.1) = a (m x k) b (k x n), plus dst's own
/// values with `accumulate`; on the calling thread.
///
/// # Safety
/// Every pointer addresses a matrix of the stated extent through its strides.
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, usize),
    accumulate: bool,
    a: Mat,
    b: Mat,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        1,
        dst.1 as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Below this many multiply-adds a product runs on the calling thread (the
/// pool's hand-off costs more than the second thread gives back).
const POOL_MIN: usize = 1 << 17;
/// The smallest piece of the split dimension one thread takes.
const MIN_PIECE: usize = 16;

/// How `long` rows (or columns) are cut for `threads` threads: (pieces,
/// piece length); the last piece may be shorter, none is empty.
fn split(long: usize, threads: usize) -> (usize, usize) {
    let pieces = threads.min(long / MIN_PIECE).max(1);
    let piece = long.div_ceil(pieces);
    // Rounding the length up can leave fewer pieces than asked for (321
    // rows for 32 threads: 20 asked, pieces of 17, which cover them in 19).
    (long.div_ceil(piece), piece)
}

/// a (m x k) b (k x n) as a new row-major (m, n) buffer. The longer of m and
/// n is cut into one piece per thread of Candle's pool; each thread runs
/// gemm on its piece alone, reading its part of a (or of b) and all of the
/// other operand.
///
/// # Safety
/// `a` and `b` address matrices of the stated extents through their strides.
pub(crate) unsafe fn product(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f32> {
    if k == 0 || m.min(n) <= 1 {
        // gemm's matrix-vector path takes dst as a slice, which must hold
        // initialised values; zeroing a vector costs little beside it.
        let mut dst = vec![0f32; m * n];
        if k > 0 {
            product_into(m, n, k, a, b, (dst.as_mut_ptr(), false));
        }
        return dst;
    }
    // gemm writes every element of dst without reading it (read_dst false),
    // so the buffer is not zeroed first; its length is set once written.
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    product_into(m, n, k, a, b, (dst.as_mut_ptr(), false));
    dst.set_len(m * n);
    dst
}

/// [`product`] written into `dst`, row-major (m, n), k > 0; with
/// `accumulate`, added to the values `dst` holds.
///
/// # Safety
/// As for [`product`], and `dst` has room for m * n values (initialised
/// ones with `accumulate`).
unsafe fn product_into(m: usize, n: usize, k: usize, a: Mat, b: Mat, dst: (*mut f32, bool)) {
    let (dst, accumulate) = dst;
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    // A row times a matrix stored (k, n) row by row (a Conv1D weight, as in
    // batch-1 decoding), or a matrix stored column by column times a column:
    // cut along k instead, so each thread streams one contiguous block of the
    // matrix (docs/benchmarks-history.md, "Batch-1 decoding on an Intel Xeon").
    if m * n * k >= POOL_MIN && !accumulate {
        if m == 1 && b.cs == 1 {
            return vector_product_split_k(n, k, a, b, dst, threads);
        }
        if n == 1 && a.rs == 1 {
            // dst (m x 1) = a x is dst^T (1 x m) = x^T a^T, with a^T stored (k, m).
            return vector_product_split_k(m, k, b.t(), a.t(), dst, threads);
        }
    }
    let split_rows = m >= n;
    let long = if split_rows { m } else { n };
    let (pieces, piece) = split(long, threads);
    if pieces < 2 || m * n * k < POOL_MIN {
        gemm(m, n, k, (dst, n), accumulate, a, b);
        return;
    }
    let out = super::SharedOut(dst);
    super::pool_chunked(pieces, |range| {
        for p in range {
            let start = p * piece;
            let len = piece.min(long - start);
            // SAFETY: `split` keeps every piece non-empty and within `long`;
            // pieces are disjoint rows (or columns) of dst, and the caller
            // vouched for the extents.
            unsafe {
                if split_rows {
                    let to = (out.ptr(start * n), n);
                    gemm(len, n, k, to, accumulate, a.at(start, 0), b);
                } else {
                    gemm(
                        m,
                        len,
                        k,
                        (out.ptr(start), n),
                        accumulate,
                        a,
                        b.at(0, start),
                    );
                }
            }
        }
    });
}

/// dst (1 x n) = x (1 x k) w (k x n), k cut into one piece per
/// thread (at least [`MIN_PIECE`] each); each piece's partial sum goes to its
/// own buffer (the first straight into dst), and the partials are added at
/// the end, so the sum's order depends on the thread count only.
///
/// # Safety
/// As for [`product_into`]; dst holds n initialised values.
unsafe fn vector_product_split_k(
    n: usize,
    k: usize,
    x: Mat,
    w: Mat,
    dst: *mut f32,
    threads: usize,
) {
    let (pieces, piece) = split(k, threads);
    if pieces < 2 {
        gemm(1, n, k, (dst, n), false, x, w);
        return;
    }
    let mut partial = vec![0f32; (pieces - 1) * n];
    let (out, rest) = (
        super::SharedOut(dst),
        super::SharedOut(partial.as_mut_ptr()),
    );
    super::pool_chunked(pieces, |range| {
        for p in range {
            let start = p * piece;
            let len = piece.min(k - start);
            let to = if p == 0 {
                out.ptr(0)
            } else {
                rest.ptr((p - 1) * n)
            };
            // SAFETY: `split` keeps every piece non-empty and within k; each
            // piece writes its own n values.
            unsafe { gemm(1, n, len, (to, n), false, x.at(0, start), w.at(start, 0)) };
        }
    });
    let dst = std::slice::from_raw_parts_mut(dst, n);
    for part in partial.chunks_exact(n) {
        for (d, v) in dst.iter_mut().zip(part) {
            *d += v;
        }
    }
}

/// The product of two 2-D tensors' CPU storages (any strides), (m, n).
pub(crate) fn storage_product(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    op: &str,
) -> CResult<Vec<f32>> {
    let (m, k) = l1.shape().dims2()?;
    let (k2, n) = l2.shape().dims2()?;
    if k != k2 {
        bail!("{op}: {:?} times {:?} do not fit", l1.dims(), l2.dims())
    }
    #[cfg(any(feature = "mkl", feature = "accelerate"))]
    {
        use candle_core::backend::BackendStorage;
        let CpuStorage::F32(y) = s1.matmul(s2, (1, m, n, k), l1, l2)? else {
            bail!("{op}: f32 only")
        };
        Ok(y)
    }
    #[cfg(not(any(feature = "mkl", feature = "accelerate")))]
    {
        let (a, b) = (Mat::of(s1, l1, op)?, Mat::of(s2, l2, op)?);
        // SAFETY: Mat::of checked both layouts against their buffers.
        Ok(unsafe { product(m, n, k, a, b) })
    }
}

/// a (m, k) times b (k, n). On the CPU in f32 the product runs on Candle's
/// pool ([`product`]) and its backward too; elsewhere Candle's matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(mm(a, b)?)
}

/// [`matmul`] with Candle's error type, for the kernels' backward passes.
pub(crate) fn mm(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    if fused_path(&[a, b]) && a.rank() == 2 && b.rank() == 2 {
        return a.apply_op2(b, Product { skip_value: false });
    }
    a.matmul(b)
}

/// [`mm`] for a product that is a whole linear layer's output: inside
/// `recompute::output_product` during a recomputation it gives zeros
/// instead of its value (its backward reads only a and b).
pub(crate) fn mm_layer_output(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    if fused_path(&[a, b]) && a.rank() == 2 && b.rank() == 2 {
        let skip_value = super::recompute::output_unused();
        return a.apply_op2(b, Product { skip_value });
    }
    a.matmul(b)
}

/// `sum + a b` for 2-D a (m, k) and b (k, n): with `sum` none, the product;
/// on the CPU in f32 with `sum` contiguous, added into `sum`'s own storage
/// by the product itself (no third (m, n) tensor: a 151,936-word head's
/// gradient is 544 MB at Qwen2.5-0.5B's width); elsewhere a new tensor.
/// `sum` must own its storage (a gradient no one else holds).
pub(crate) fn add_product(sum: Option<Tensor>, a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    let Some(sum) = sum else { return mm(a, b) };
    let fits = fused_path(&[&sum, a, b])
        && (a.rank(), b.rank()) == (2, 2)
        && sum.dims() == [a.dim(0)?, b.dim(1)?]
        && sum.is_contiguous();
    match fits {
        true => {
            sum.inplace_op3(a, b, &AddProduct)?;
            Ok(sum)
        }
        false => Ok((sum + mm(a, b)?)?.detach()),
    }
}

struct AddProduct;

impl candle_core::InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "add-product-into"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<()> {
        let ((m, k), (k3, n)) = (l2.shape().dims2()?, l3.shape().dims2()?);
        let (a, b) = (Mat::of(s2, l2, self.name())?, Mat::of(s3, l3, self.name())?);
        let CpuStorage::F32(sum) = s1 else {
            bail!("{}: f32 only", self.name())
        };
        let Some((start, end)) = l1.contiguous_offsets() else {
            bail!("{}: a contiguous sum only", self.name())
        };
        if k != k3 || end - start != m * n || l1.dims() != [m, n] {
            bail!(
                "{}: {:?} + {:?} x {:?} do not fit",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        if k > 0 {
            // SAFETY: Mat::of checked a's and b's layouts against their
            // buffers, and the sum's m x n values lie at start..end.
            unsafe { product_into(m, n, k, a, b, (sum[start..end].as_mut_ptr(), true)) };
        }
        Ok(())
    }
}

struct Product {
    /// Zeros instead of the value (see [`mm_layer_output`]).
    skip_value: bool,
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "pooled-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (m, n) = (l1.dims()[0], l2.dims()[1]);
        let f32s = matches!((s1, s2), (CpuStorage::F32(_), CpuStorage::F32(_)));
        if self.skip_value && f32s && l1.dims()[1] == l2.dims()[0] {
            super::recompute::count_skipped();
            return Ok((CpuStorage::F32(vec![0f32; m * n]), Shape::from((m, n))));
        }
        let y = storage_product(s1, l1, s2, l2, self.name())?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach();
        // y = a b: da = g b^T, db = a^T g.
        let da = match a.track_op() {
            true => Some(mm(&g, &b.detach().t()?)?),
            false => None,
        };
        let db = match b.track_op() {
            true => Some(mm(&a.detach().t()?, &g)?),
            false => None,
        };
        Ok((da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Var;

    /// `ours` (the values of a product) against `want`; a NaN left in
    /// `ours` fails (`max_diff` is NaN then).
    fn assert_close(ours: &[f32], want: &Tensor, what: &str) {
        let ours = Tensor::from_slice(ours, want.shape(), want.device()).unwrap();
        let d = max_diff(&ours, want);
        assert!(d < 1e-4, "{what}: {d}");
    }

    #[test]
    fn the_split_covers_every_row_once_for_any_thread_count() {
        for threads in 1..=256 {
            for long in 1..=3000 {
                let (pieces, piece) = split(long, threads);
                assert!(pieces >= 1 && pieces <= threads && piece >= 1);
                // The last piece starts inside and the pieces reach the end.
                assert!(
                    (pieces - 1) * piece < long,
                    "{long} rows, {threads} threads"
                );
                assert!(pieces * piece >= long, "{long} rows, {threads} threads");
            }
        }
    }

    #[test]
    fn pooled_products_equal_candles_matmul_on_every_layout_and_split() {
        // Shapes split by rows (m >= n), by columns, too small to split, and
        // one-row / one-column (gemm's matrix-vector path); each operand
        // plain or a transposed view.
        let shapes = [
            (300, 70, 50),
            (40, 500, 30),
            (5, 7, 3),
            (64, 64, 64),
            (1, 300, 40),
            (300, 1, 40),
            // Large enough to pool: a plain (k, n) b or a transposed a is
            // cut along k.
            (1, 300, 501),
            (300, 1, 501),
        ];
        for (m, n, k) in shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = match ta {
                    true => seeded(&[k, m], 1, 1.0).t().unwrap(),
                    false => seeded(&[m, k], 1, 1.0),
                };
                let b = match tb {
                    true => seeded(&[n, k], 2, 1.0).t().unwrap(),
                    false => seeded(&[k, n], 2, 1.0),
                };
                let want = a.matmul(&b).unwrap();
                let what = format!("{m}x{n}x{k} ({ta}, {tb})");
                let ours = matmul(&a, &b).unwrap();
                assert_eq!(ours.dims(), &[m, n]);
                let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_close(&ours, &want, &what);
                // The buffer is written without being zeroed: every NaN of a
                // buffer filled with them must be overwritten.
                let (a_s, a_l) = a.storage_and_layout();
                let (b_s, b_l) = b.storage_and_layout();
                let (candle_core::Storage::Cpu(a_s), candle_core::Storage::Cpu(b_s)) =
                    (&*a_s, &*b_s)
                else {
                    unreachable!()
                };
                let (am, bm) = (
                    Mat::of(a_s, a_l, "t").unwrap(),
                    Mat::of(b_s, b_l, "t").unwrap(),
                );
                let mut dst = vec![f32::NAN; m * n];
                unsafe { product_into(m, n, k, am, bm, (dst.as_mut_ptr(), false)) };
                assert_close(&dst, &want, &what);
            }
        }
    }

    #[test]
    fn a_product_added_into_a_sum_writes_sum_plus_product_in_its_storage() {
        // The head's gradient: (V, len) transposed view times (len, E), split
        // by rows, by columns, unsplit, and a row or column alone.
        for (m, n, k) in [
            (300, 70, 50),
            (40, 500, 30),
            (5, 7, 3),
            (1, 300, 40),
            (300, 1, 40),
        ] {
            let a = seeded(&[k, m], 1, 1.0).t().unwrap();
            let b = seeded(&[k, n], 2, 1.0);
            let sum = seeded(&[m, n], 3, 1.0).copy().unwrap();
            let want = (&sum + a.matmul(&b).unwrap()).unwrap();
            let out = add_product(Some(sum.clone()), &a, &b).unwrap();
            let what = format!("{m}x{n}x{k}");
            let ours = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&ours, &want, &what);
            // In place: the tensor passed in holds the sum now.
            let held = sum.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(held, ours, "{what}");
            // With no sum, the product alone.
            let alone = add_product(None, &a, &b).unwrap();
            assert!(max_diff(&alone, &a.matmul(&b).unwrap()) < 1e-4, "{what}");
        }
    }

    #[test]
    fn a_vector_product_cut_along_k_equals_the_whole_for_any_piece_count() {
        let (n, k) = (37, 500);
        let x = seeded(&[1, k], 7, 1.0);
        let w = seeded(&[k, n], 8, 1.0);
        let want = x.matmul(&w).unwrap();
        let (xv, wv) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for threads in 1..=40 {
            let mut dst = vec![0f32; n];
            unsafe {
                vector_product_split_k(
                    n,
                    k,
                    Mat::rows(&xv, k),
                    Mat::rows(&wv, n),
                    dst.as_mut_ptr(),
                    threads,
                )
            };
            assert_close(&dst, &want, &format!("{threads} pieces"));
        }
    }

    #[test]
    fn pooled_products_read_offset_and_broadcast_operands() {
        // a: rows 3.. of a larger matrix (a start offset); b: one row
        // repeated k times (row stride 0).
        let big = seeded(&[310, 50], 5, 1.0);
        let a = big.narrow(0, 3, 300).unwrap();
        let b = seeded(&[1, 70], 6, 1.0).broadcast_as((50, 70)).unwrap();
        let ours = matmul(&a, &b).unwrap();
        let want = a
            .contiguous()
            .unwrap()
            .matmul(&b.contiguous().unwrap())
            .unwrap();
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_close(&ours, &want, "offset and broadcast");
    }

    #[test]
    fn a_product_inside_a_pool_job_runs_inline() {
        // Each of the job's pieces (the calling thread's too) runs a product
        // big enough to split; a nested pool call from the calling thread
        // would wait on the pool's lock for ever.
        // The job runs on its own thread, so a hang fails the test.
        let (a, b) = (seeded(&[300, 64], 7, 1.0), seeded(&[64, 64], 8, 1.0));
        let want = a.matmul(&b).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let got = std::sync::Mutex::new(Vec::new());
            crate::kernels::for_units(4, 1 << 20, |range| {
                for _ in range {
                    let y = matmul(&a, &b).unwrap().flatten_all().unwrap();
                    got.lock().unwrap().push(y.to_vec1::<f32>().unwrap());
                }
            });
            tx.send(got.into_inner().unwrap()).unwrap();
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a nested product did not finish: the pool deadlocked");
        assert_eq!(got.len(), 4);
        for y in got {
            assert_close(&y, &want, "nested");
        }
    }

    #[test]
    fn pooled_matmul_gradients_equal_the_composed_ones() {
        for (m, n, k) in [(300, 70, 50), (6, 9, 4)] {
            let vars = [
                Var::from_tensor(&seeded(&[m, k], 3, 1.0)).unwrap(),
                Var::from_tensor(&seeded(&[k, n], 4, 1.0)).unwrap(),
            ];
            compare(
                &vars,
                |v| matmul(&v[0], &v[1]).unwrap(),
                |v| v[0].matmul(&v[1]).unwrap(),
                1e-4,
            );
        }
    }

    #[test]
    fn a_layout_past_its_buffer_is_an_error() {
        let s = CpuStorage::F32(vec![0.0; 10]);
        let l = Layout::contiguous((3, 4));
        assert!(Mat::of(&s, &l, "test").is_err());
        assert!(Mat::of(&s, &Layout::contiguous((2, 5)), "test").is_ok());
        // A start offset counts: 2 x 4 from element 3 ends at 10.
        assert!(Mat::of(&s, &Layout::contiguous_with_offset((2, 4), 3), "test").is_err());
        assert!(Mat::of(&s, &Layout::contiguous_with_offset((2, 4), 2), "test").is_ok());
    }
}
