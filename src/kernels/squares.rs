//! The sum of a tensor's squares without the tensor of squares: the
//! gradient norm for clipping. Composed, `sqr()` makes a copy of each
//! gradient, at Qwen2.5-0.5B a 544 MB one for the tied embedding, which the
//! allocator keeps resident for the rest of the run.

use candle_core::{Storage, Tensor};

/// Lanes of Candle's AVX sum (`cpu::avx::vec_sum`): 4 vectors of 8.
const LANES: usize = 32;

/// `t.sqr().sum_all()` as an f32, bit for bit, for a contiguous f32 CPU
/// tensor on a CPU where Candle sums with AVX2: the squares go into the
/// 32 running sums Candle's vector sum keeps, which are then added in its
/// order, then the tail one by one. None elsewhere (the caller composes).
pub fn sum_of_squares(t: &Tensor) -> Option<f32> {
    if !avx2() || !super::fused_path(&[t]) {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return None;
    };
    Some(squares_in_candles_order(&data[start..end]))
}

fn avx2() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    return false;
}

/// The sum of `xs`'s squares, added in the order of Candle's AVX `vec_sum`
/// over the squares.
fn squares_in_candles_order(xs: &[f32]) -> f32 {
    let whole = xs.len() / LANES * LANES;
    let mut sum = [0f32; LANES];
    for block in xs[..whole].chunks_exact(LANES) {
        for (s, &x) in sum.iter_mut().zip(block) {
            *s += x * x;
        }
    }
    // vec_reduce: vectors 0 += 1 and 2 += 3, then 0 += 2 (8 lanes each);
    // then lanes l += l + 4, and the two horizontal adds.
    let v = |i: usize| -> [f32; 8] { std::array::from_fn(|l| sum[i * 8 + l]) };
    let add = |a: [f32; 8], b: [f32; 8]| -> [f32; 8] { std::array::from_fn(|l| a[l] + b[l]) };
    let x = add(add(v(0), v(1)), add(v(2), v(3)));
    let t0: [f32; 4] = std::array::from_fn(|l| x[l] + x[l + 4]);
    let mut total = (t0[0] + t0[1]) + (t0[2] + t0[3]);
    for &x in &xs[whole..] {
        total += x * x;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::seeded;

    #[test]
    fn the_sum_of_squares_equals_candles_sqr_then_sum_bit_for_bit() {
        if !avx2() {
            // Candle sums in another order there: declined, the caller composes.
            assert!(sum_of_squares(&seeded(&[40], 1, 1.0)).is_none());
            return;
        }
        for n in [0, 1, 31, 32, 33, 100, 4096, 100_003] {
            let t = seeded(&[n], n as u64 + 1, 3.0);
            let want: f32 = t.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            let got = sum_of_squares(&t).expect("a contiguous f32 CPU tensor");
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{n} values: {got} against {want}"
            );
        }
        // A view into a larger tensor (its offset), and what it declines.
        let big = seeded(&[7, 50], 9, 1.0);
        let rows = big.narrow(0, 2, 3).unwrap();
        let want: f32 = rows.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(sum_of_squares(&rows).unwrap().to_bits(), want.to_bits());
        assert!(sum_of_squares(&big.t().unwrap()).is_none());
        assert!(sum_of_squares(&big.to_dtype(candle_core::DType::BF16).unwrap()).is_none());
    }
}
