//! A seeded host random-number generator for everything random in a run:
//! initialization, shuffling, dropout masks, sampling.
//!
//! Candle's CPU RNG cannot be seeded (`Device::Cpu.set_seed` fails and
//! `randn` uses a thread RNG), so random tensors are drawn here and uploaded.
//! The generator is xoshiro256++ (Blackman & Vigna): small, fast, and its
//! whole state is four words, saved in every checkpoint so a resumed run
//! draws exactly the numbers an uninterrupted one would.

use candle_core::{DType, Device, Shape, Tensor};
use serde::{Deserialize, Serialize};

use crate::Result;

/// xoshiro256++ with a serializable state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRng {
    state: [u64; 4],
}

/// SplitMix64, the seeding function recommended for xoshiro.
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl HostRng {
    /// A generator fully determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let state = [
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
        ];
        Self { state }
    }

    /// An independent stream for one purpose (say "init" or "data"), so that
    /// drawing more numbers for one purpose does not shift another's.
    pub fn stream(seed: u64, purpose: &str) -> Self {
        // FNV-1a of the purpose, mixed into the seed.
        let tag = purpose.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
        });
        Self::new(seed ^ tag.rotate_left(17))
    }

    /// The stream of one item of a purpose, keyed by numbers (an
    /// iteration, a completion's row in the global batch): the same item
    /// draws the same numbers whichever process or batch draws it.
    pub fn keyed(seed: u64, purpose: &str, keys: &[u64]) -> Self {
        let mut h = Self::stream(seed, purpose).state[0];
        for &k in keys {
            let mut x = h ^ k.rotate_left(29);
            h = splitmix64(&mut x) ^ x;
        }
        Self::new(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n) (Lemire's multiply-shift; the bias is below 2^-64 * n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// A standard normal draw (Box-Muller; no cached second value, so the
    /// state is only the four words).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // in (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// A permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        self.shuffle(&mut idx);
        idx
    }

    /// A tensor of N(0, std^2) draws, made on the host and moved to `device`.
    pub fn normal_tensor(
        &mut self,
        shape: impl Into<Shape>,
        std: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f32> = (0..shape.elem_count())
            .map(|_| (self.normal() * std) as f32)
            .collect();
        Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
    }

    /// A tensor of U[lo, hi) draws, made on the host and moved to `device`.
    pub fn uniform_tensor(
        &mut self,
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f32> = (0..shape.elem_count())
            .map(|_| (lo + (hi - lo) * self.uniform()) as f32)
            .collect();
        Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
    }
}

/// The same generator also serves the `rand` crate's distributions and
/// `SliceRandom` where a caller prefers them.
impl rand::RngCore for HostRng {
    fn next_u32(&mut self) -> u32 {
        (HostRng::next_u64(self) >> 32) as u32
    }
    fn next_u64(&mut self) -> u64 {
        HostRng::next_u64(self)
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let bytes = HostRng::next_u64(self).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_and_state_restores() {
        let mut a = HostRng::new(7);
        let mut b = HostRng::new(7);
        for _ in 0..10 {
            a.next_u64();
        }
        let saved = serde_json::to_string(&a).unwrap();
        let after: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let mut restored: HostRng = serde_json::from_str(&saved).unwrap();
        let again: Vec<u64> = (0..5).map(|_| restored.next_u64()).collect();
        assert_eq!(after, again);
        for _ in 0..15 {
            b.next_u64();
        }
        assert_eq!(a, b);
        assert_ne!(HostRng::new(8).next_u64(), HostRng::new(7).next_u64());
    }

    #[test]
    fn keyed_streams_depend_on_every_key_and_its_place() {
        let first = |keys: &[u64]| HostRng::keyed(1, "sample", keys).next_u64();
        assert_eq!(first(&[3, 4]), first(&[3, 4]));
        let others = [
            first(&[3, 5]),
            first(&[4, 3]),
            first(&[3]),
            first(&[3, 4, 0]),
        ];
        assert!(others.iter().all(|&o| o != first(&[3, 4])), "{others:?}");
        assert_ne!(
            first(&[3, 4]),
            HostRng::keyed(2, "sample", &[3, 4]).next_u64()
        );
        assert_ne!(
            first(&[3, 4]),
            HostRng::keyed(1, "eval", &[3, 4]).next_u64()
        );
    }

    #[test]
    fn streams_differ_by_purpose() {
        let a = HostRng::stream(1, "init").next_u64();
        let b = HostRng::stream(1, "data").next_u64();
        assert_ne!(a, b);
        assert_eq!(a, HostRng::stream(1, "init").next_u64());
    }

    #[test]
    fn normal_draws_have_unit_moments_and_uniform_stays_in_range() {
        let mut r = HostRng::new(3);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert!((0..10_000).all(|_| {
            let u = r.uniform();
            (0.0..1.0).contains(&u)
        }));
        assert!((0..10_000).all(|_| r.below(3) < 3));
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut r = HostRng::new(5);
        let p = r.permutation(100);
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(p, (0..100).collect::<Vec<_>>());
    }
}
