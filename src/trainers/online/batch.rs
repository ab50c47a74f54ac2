//! Prompts and completions as one padded batch, and the policy's per-token
//! log-probs, entropies and hidden states on it: what every forward of the
//! online engine (step 2, the loss of step 6, the critic) reads.

use candle_core::{DType, Device, Tensor};

use crate::data::batch::position_ids;
use crate::models::{attention_bias, CausalLm};
use crate::Result;

/// Queries and responses as one batch: each row is the left-padded query
/// (width q) followed by its response, right-padded to r tokens.
#[derive(Clone)]
pub(crate) struct Batch {
    pub ids: Tensor,
    pub mask: Vec<Vec<u8>>,
    pub positions: Tensor,
    pub bias: Tensor,
    /// (B, r) u32: the response tokens (pad after the end).
    pub responses: Tensor,
    pub q: usize,
    pub r: usize,
}

impl Batch {
    pub fn new(
        queries: &[&[u32]],
        responses: &[&[u32]],
        r: usize,
        pad: u32,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let b = queries.len();
        let q = queries.iter().map(|x| x.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * (q + r));
        let mut mask = Vec::with_capacity(b);
        let mut resp = Vec::with_capacity(b * r);
        for (query, response) in queries.iter().zip(responses) {
            let (lp, rp) = (q - query.len(), r - response.len());
            ids.extend(std::iter::repeat_n(pad, lp));
            ids.extend_from_slice(query);
            ids.extend_from_slice(response);
            ids.extend(std::iter::repeat_n(pad, rp));
            let mut m = vec![0u8; lp];
            m.extend(std::iter::repeat_n(1u8, query.len() + response.len()));
            m.extend(std::iter::repeat_n(0u8, rp));
            mask.push(m);
            resp.extend_from_slice(response);
            resp.extend(std::iter::repeat_n(pad, rp));
        }
        let positions: Vec<u32> = position_ids(&mask).concat();
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, q + r), device)?,
            positions: Tensor::from_vec(positions, (b, q + r), device)?,
            bias: attention_bias(&mask, q + r, dtype, device)?,
            mask,
            responses: Tensor::from_vec(resp, (b, r), device)?,
            q,
            r,
        })
    }
}

/// Per response token: log-probs of the sampled tokens and entropies, with
/// logits divided by (temperature + 1e-7) as TRL does, and the hidden
/// states that predicted them (B, r, E). Position ids come from the mask.
pub(crate) fn policy_outputs(
    lm: &CausalLm,
    b: &Batch,
    temperature: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let hidden = lm.forward(&b.ids, &b.positions, &b.bias, None)?;
    let h = hidden.narrow(1, b.q - 1, b.r)?;
    let (rows, r, e) = h.dims3()?;
    let scale = 1.0 / (temperature + 1e-7);
    let flat = h.reshape((rows * r, e))?;
    let tf = lm.token_figures(&flat, &b.responses.flatten_all()?, scale, false)?;
    Ok((
        tf.logps.reshape((rows, r))?,
        tf.entropy.reshape((rows, r))?,
        h,
    ))
}
