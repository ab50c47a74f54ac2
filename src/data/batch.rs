//! Rows of token ids made into a batch: padding, the attention mask, and
//! position ids that follow it. Host-side only; the models turn masks into
//! attention biases.

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

/// Right-pads `rows` with `pad_id` to the longest row: flat ids (B x T, row
/// major) and the attention mask (1 real, 0 pad).
pub fn right_pad(rows: &[Vec<u32>], pad_id: u32) -> (Vec<u32>, Vec<Vec<u8>>) {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let ids = rows
        .iter()
        .flat_map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, width - r.len()))
        })
        .collect();
    let mask = rows
        .iter()
        .map(|r| [vec![1u8; r.len()], vec![0u8; width - r.len()]].concat())
        .collect();
    (ids, mask)
}

/// Position ids from a left- or right-padded mask: cumsum(mask) - mask, so
/// pad positions get 0 (TRL's rule; -1 would index outside GPT-2's wpe).
/// A mask of segment ids (packed rows: 0 pad, k > 0 the k-th sequence)
/// restarts the count at each new segment.
pub fn position_ids<M: Copy + Into<u32>>(mask: &[Vec<M>]) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|row| {
            let (mut seen, mut segment) = (0u32, 0u32);
            row.iter()
                .map(|&m| {
                    let m: u32 = m.into();
                    if m == 0 {
                        return 0;
                    }
                    if m != segment {
                        (seen, segment) = (0, m);
                    }
                    seen += 1;
                    seen - 1
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
        let mask: Vec<Vec<u8>> = vec![vec![0, 0, 1, 1, 1], vec![1, 1, 1, 1, 1]];
        assert_eq!(
            position_ids(&mask),
            vec![vec![0, 0, 0, 1, 2], vec![0, 1, 2, 3, 4]]
        );
    }
}
