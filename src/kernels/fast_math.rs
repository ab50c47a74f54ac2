//! exp for f32 that the compiler can vectorize (straight-line code: selects
//! instead of branches, bit tricks instead of calls) and row reductions in
//! parallel lanes, inlined into the fused kernels' loops.
//!
//! glibc's scalar `tanhf` (through `expm1f`) was a large share of the fused
//! GELU's time (docs/benchmarks-history.md, "Design measurements"); the GELU now takes
//! one of these exps. It stays within a few f32 ulps (the
//! tests bound the error over a dense grid).

/// Defines a function whose body is compiled twice: for AVX2 and FMA, taken
/// when the CPU has them (std caches the check), and as the crate is built
/// (baseline x86-64: 4-wide SSE2). The kernels' loops then vectorize 8 wide
/// on most x86 CPUs while the binary still runs on any. The results do not
/// change: both bodies do the same f32 operations in the same order (Rust
/// contracts no a * b + c into an FMA unasked).
macro_rules! wide_simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? $body
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has both features, checked just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            fn narrow($($arg: $ty),*) $(-> $ret)? $body
            narrow($($arg),*)
        }
    };
}
pub(crate) use wide_simd_fn;

/// 1.5 * 2^23: adding it to a float of magnitude below 2^22 rounds it to an
/// integer, which then sits in the low mantissa bits of the sum.
const ROUND_MAGIC: f32 = 12_582_912.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cody and Waite) so that n * LN2_HI is exact for the
/// n that occur here: r = x - n ln 2 loses no bits.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this the result is 0 (e^x < 3e-38, near the smallest normal f32),
/// which keeps 2^(n - 1) below a normal number.
const EXP_MIN: f32 = -86.5;
/// Above this exp(x) overflows f32.
const EXP_MAX: f32 = 88.722_83;

/// e^x for f32, relative error about 2e-7; 0 below -86.5 (where e^x is
/// under 3e-38), +inf above 88.72, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_MIN, EXP_MAX);
    // x = n ln2 + r with n an integer and |r| <= ln2 / 2.
    let shifted = xc * LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // e^r by its Taylor series to r^7 (truncation error below 1e-8 on |r| <= ln2/2).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n = 2 * 2^(n - 1) built from exponent bits (n sits in the low bits
    // of `shifted`); n - 1 because n reaches 128, whose 2^n is not an f32.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND_MAGIC.to_bits());
    let half_two_n = f32::from_bits(n_bits.wrapping_add(126) << 23);
    let y = p * half_two_n * 2.0;
    let y = if x < EXP_MIN { 0.0 } else { y };
    if x > EXP_MAX {
        f32::INFINITY
    } else {
        y
    }
}

/// Lanes of the row reductions: eight running sums or maxima, which the
/// compiler keeps in one vector register. A single running sum does not
/// vectorize (f32 addition is not associative, so the compiler keeps the
/// order) and waits on the previous add at every element: on 40-element
/// attention rows the softmax's sum and maximum took about 10 cycles an element.
pub const LANES: usize = 8;

/// sum of f(a_i, b_i) over i, in `LANES` running sums (a and b of one length).
#[inline(always)]
pub fn sum_by2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = n - ca.remainder().len();
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += f(x[k], y[k]);
        }
    }
    let mut total = acc.iter().sum::<f32>();
    for i in tail..n {
        total += f(a[i], b[i]);
    }
    total
}

/// sum of f(x_i) over i, in `LANES` running sums.
#[inline(always)]
pub fn sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum_by2(x, x, |v, _| f(v))
}

/// The largest element (-inf for an empty slice), in `LANES` running maxima.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] = acc[k].max(c[k]);
        }
    }
    tail.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_reductions_equal_the_plain_ones_at_every_length() {
        for n in 0..40 {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25)
                .collect();
            let y: Vec<f32> = (0..n).map(|i| (i % 3) as f32 + 0.5).collect();
            let plain: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((sum_by(&x, |v| v) as f64 - plain).abs() < 1e-5, "n = {n}");
            let dot: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!(
                (sum_by2(&x, &y, |a, b| a * b) as f64 - dot).abs() < 1e-5,
                "n = {n}"
            );
            let want = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max(&x), want, "n = {n}");
        }
        // The maximum of a row whose largest element sits in the tail.
        let mut x = vec![0f32; 19];
        x[18] = 3.0;
        assert_eq!(max(&x), 3.0);
    }

    /// Every f32 from -lim to lim in `steps` even steps, plus the edges.
    fn grid(lim: f32, steps: usize) -> impl Iterator<Item = f32> {
        (0..=steps).map(move |i| -lim + 2.0 * lim * i as f32 / steps as f32)
    }

    #[test]
    fn exp_is_within_a_few_ulps_of_the_f64_exp() {
        let mut worst = 0f64;
        for x in grid(86.0, 2_000_000).chain([0.0, -0.0, 1e-30, 88.7, -86.4]) {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn exp_underflows_to_zero_overflows_to_inf_and_keeps_nan() {
        assert_eq!(exp(-86.6), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }
}
