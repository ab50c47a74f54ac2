//! Model architectures, written for training: every op has a backward
//! (no fused softmax / layer-norm / rope, which drop gradients in Candle),
//! and tensor names equal Hugging Face's so checkpoints are interchangeable.

pub mod gpt2;
pub mod weights;

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// Keys and values of every layer, detached: a cache never holds an autograd graph.
pub type KvCache = Vec<Option<(Tensor, Tensor)>>;

/// The additive attention mask for `queries` new positions over `mask.len()`
/// keys per row: 0 where key j is a real token at or before the query, a
/// large finite negative elsewhere (a row of -inf would give NaN). Pad
/// queries attend to nothing real, get a uniform softmax, and are ignored.
/// Shape (B, 1, queries, keys).
pub fn attention_bias(
    mask: &[Vec<u8>],
    queries: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let b = mask.len();
    let keys = mask.first().map_or(0, Vec::len);
    let blocked = if dtype == DType::F16 { -6.0e4 } else { -1.0e9 };
    let mut data = Vec::with_capacity(b * queries * keys);
    for row in mask {
        for i in 0..queries {
            let query_pos = keys - queries + i;
            data.extend((0..keys).map(|j| {
                if j <= query_pos && row[j] == 1 {
                    0.0f32
                } else {
                    blocked
                }
            }));
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, queries, keys), device)?.to_dtype(dtype)?)
}

/// Left-pads `rows` with `pad_id` to the longest row: flat ids (B x T, row
/// major) and the attention mask (1 real, 0 pad).
pub fn left_pad(rows: &[Vec<u32>], pad_id: u32) -> (Vec<u32>, Vec<Vec<u8>>) {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let ids = rows
        .iter()
        .flat_map(|r| std::iter::repeat_n(pad_id, width - r.len()).chain(r.iter().copied()))
        .collect();
    let mask = rows
        .iter()
        .map(|r| [vec![0u8; width - r.len()], vec![1u8; r.len()]].concat())
        .collect();
    (ids, mask)
}

/// Position ids from a left- or right-padded mask: cumsum(mask) - mask, so
/// pad positions get 0 (TRL's rule; -1 would index outside GPT-2's wpe).
pub fn position_ids(mask: &[Vec<u8>]) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|row| {
            let mut seen = 0u32;
            row.iter()
                .map(|&m| {
                    let p = seen;
                    seen += m as u32;
                    if m == 1 {
                        p
                    } else {
                        0
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_pad_pads_on_the_left_with_a_mask() {
        let (ids, mask) = left_pad(&[vec![7, 8, 9], vec![5]], 0);
        assert_eq!(ids, vec![7, 8, 9, 0, 0, 5]);
        assert_eq!(mask, vec![vec![1, 1, 1], vec![0, 0, 1]]);
    }

    #[test]
    fn positions_skip_left_padding() {
        let mask = vec![vec![0, 0, 1, 1, 1], vec![1, 1, 1, 1, 1]];
        assert_eq!(
            position_ids(&mask),
            vec![vec![0, 0, 0, 1, 2], vec![0, 1, 2, 3, 4]]
        );
    }

    #[test]
    fn bias_is_causal_and_hides_padding() {
        let mask = vec![vec![0, 1, 1]];
        let bias = attention_bias(&mask, 2, DType::F32, &Device::Cpu).unwrap();
        let v = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // query at position 1 sees key 1 only; query at 2 sees keys 1 and 2.
        assert_eq!(v, vec![-1e9, 0.0, -1e9, -1e9, 0.0, 0.0]);
    }
}
