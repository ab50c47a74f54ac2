//! The rows of an embedding table by token id, with a backward that writes
//! the table's gradient once.
//!
//! Candle's index_select backward builds it as `zeros_like(table)` then
//! `index_add` (a second table-sized buffer: a copy of the zeros, then the
//! rows added). For a vocabulary-sized table (BERT's 30522 x 384) those
//! passes cost more than the lookup's whole forward. Here: one zeroed
//! buffer, the rows added into it.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result as CResult, Shape, Tensor};

use super::{f32_data, fused_path, u32_data};

/// `table` (V, D) rows at `ids` (N,): (N, D). The fused op runs for a trained
/// CPU f32 table and u32 ids; elsewhere Candle's index_select.
pub fn embedding(table: &Tensor, ids: &Tensor) -> CResult<Tensor> {
    if table.is_variable()
        && fused_path(&[table])
        && ids.dtype() == DType::U32
        && table.rank() == 2
        && ids.rank() == 1
    {
        return table.apply_op2(&ids.contiguous()?, Rows);
    }
    table.index_select(ids, 0)
}

struct Rows;

impl CustomOp2 for Rows {
    fn name(&self) -> &'static str {
        "embedding-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (v, d) = l1.shape().dims2()?;
        let table = f32_data(s1, l1, "embedding")?;
        let ids = u32_data(s2, l2, "embedding")?;
        let mut out = vec![0f32; ids.len() * d];
        for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
            let id = id as usize;
            if id >= v {
                bail!("embedding: token id {id} is outside the table of {v} rows");
            }
            row.copy_from_slice(&table[id * d..(id + 1) * d]);
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), d))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (v, d) = table.dims2()?;
        let ids = ids.to_vec1::<u32>()?;
        let grad = grad
            .contiguous()?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Added into the training backward's running sum for the table
        // where it holds one (a tied head's gradient, or the micro-batches'
        // so far), else into one zeroed table: no second table-sized buffer.
        let rows = AddRows {
            ids: &ids,
            grad: &grad,
        };
        let sum = match super::recompute::take_sum(table) {
            Some(sum) if fused_path(&[&sum]) && sum.is_contiguous() && sum.dims() == [v, d] => {
                sum.inplace_op1(&rows)?;
                sum
            }
            other => {
                let dense = Tensor::zeros((v, d), DType::F32, table.device())?;
                dense.inplace_op1(&rows)?;
                super::recompute::accumulate(other, dense)?
            }
        };
        Ok((super::recompute::hand_over(table, sum)?, None))
    }
}

/// Adds each row of `grad` (ids.len() rows) into the table's row of its id, in turn.
struct AddRows<'a> {
    ids: &'a [u32],
    grad: &'a [f32],
}

impl candle_core::InplaceOp1 for AddRows<'_> {
    fn name(&self) -> &'static str {
        "embedding-rows-backward"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> CResult<()> {
        let (v, d) = l.shape().dims2()?;
        let (CpuStorage::F32(table), Some((start, end))) = (s, l.contiguous_offsets()) else {
            bail!("{}: a contiguous f32 table only", self.name())
        };
        let table = &mut table[start..end];
        if self.grad.len() != self.ids.len() * d {
            bail!(
                "{}: {} ids, {} values of width {d}",
                self.name(),
                self.ids.len(),
                self.grad.len()
            )
        }
        for (row, &id) in self.grad.chunks_exact(d.max(1)).zip(self.ids) {
            let id = id as usize;
            if id >= v {
                bail!("embedding: token id {id} is outside the table of {v} rows");
            }
            for (acc, g) in table[id * d..(id + 1) * d].iter_mut().zip(row) {
                *acc += g;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_diff, seeded};
    use candle_core::{Device, Var};

    /// Rows and the table's gradient (a repeated id included) equal Candle's
    /// index_select.
    #[test]
    fn rows_and_gradient_equal_index_select() {
        let table = Var::from_tensor(&seeded(&[7, 3], 1, 1.0)).unwrap();
        let ids = Tensor::new(&[4u32, 0, 4, 6, 2], &Device::Cpu).unwrap();
        let up = seeded(&[5, 3], 2, 1.0);
        let ours = embedding(&table, &ids).unwrap();
        let theirs = table.index_select(&ids, 0).unwrap();
        assert_eq!(max_diff(&ours, &theirs), 0.0);
        let g_theirs = (theirs * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_theirs = g_theirs.get(&table).unwrap();
        let g_ours = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g_ours.get(&table).unwrap(), g_theirs) < 1e-6);
        // An id outside the table is an error that names it.
        let bad = Tensor::new(&[7u32], &Device::Cpu).unwrap();
        let err = embedding(&table, &bad).unwrap_err().to_string();
        assert!(
            err.contains("token id 7") && err.contains("7 rows"),
            "{err}"
        );
    }
}
