//! Data parallelism: this process's place in a job of several (its rank)
//! and the collectives the trainers call, as Horovod does it: MPI launches
//! the ranks (`mpirun -np N candle-rlhf ...`, or `srun --mpi=pmix`) and
//! carries control and CPU tensors; NCCL carries GPU gradients (feature
//! `nccl`, its id broadcast over MPI). No transport of our own.
//!
//! Every rank runs the same program on its shard of each global batch.
//! Collectives are called by every rank in the same order; with one rank
//! (no `mpi` feature, or not launched by an MPI launcher) each is the
//! identity and nothing touches MPI.

use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// This process's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// Rank and rank count on this node (for the GPU and the thread count).
    pub local_rank: usize,
    pub local_size: usize,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// Bytes this rank has sent into collectives (all-reduces and gathers).
static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes this rank has sent into collectives so far (0 with one rank).
pub fn bytes_sent() -> u64 {
    SENT.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn count(bytes: usize) {
    SENT.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
}

/// The job this process is in: one rank unless [`init`] joined an MPI job.
pub fn world() -> &'static World {
    WORLD.get_or_init(World::single)
}

/// Held by `main` for the whole run: finalizes MPI when dropped.
pub struct Session {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

impl Session {
    /// Ends the job for this rank (MPI_Finalize, when MPI was joined).
    pub fn finish(self) {}
}

/// The ranks an MPI launcher says this process is one of (OpenMPI's,
/// MPICH's/PMI's, PMIx's or Slurm's variables); None outside a launcher.
fn launched_size() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "SLURM_NTASKS",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse().ok())
    .filter(|_| {
        // srun without --mpi sets SLURM_NTASKS but no MPI: only trust
        // Slurm's count beside an MPI launcher's rank variable.
        ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"]
            .iter()
            .any(|k| std::env::var(k).is_ok())
    })
}

/// Joins the MPI job this process was launched in, if any. Call once, first
/// thing in `main`; keep the session until the end.
pub fn init() -> Result<Session> {
    let size = launched_size().unwrap_or(1);
    #[cfg(feature = "mpi")]
    if size > 1 {
        use mpi::topology::Communicator;
        // Only the main thread calls MPI (the tensor ops' threads never do).
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Msg("MPI was already initialized".into()))?;
        let comm = universe.world();
        let node = comm.split_shared(comm.rank());
        let w = World {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            local_rank: node.rank() as usize,
            local_size: node.size() as usize,
        };
        WORLD
            .set(w)
            .map_err(|_| Error::Msg("dist::init called after dist::world".into()))?;
        install_panic_abort();
        return Ok(Session {
            _universe: Some(universe),
        });
    }
    if size > 1 {
        return Err(Error::Msg(format!(
            "launched as one of {size} MPI ranks, but this binary was built without MPI: \
             build it with `cargo build --release --features mpi` (docs/distributed.md)"
        )));
    }
    Ok(Session {
        #[cfg(feature = "mpi")]
        _universe: None,
    })
}

/// A panic on one rank stops the whole job: the message, then MPI_Abort
/// (otherwise the other ranks would wait forever in their next collective).
#[cfg(feature = "mpi")]
fn install_panic_abort() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        world().abort(101);
    }));
}

#[cfg(feature = "mpi")]
fn comm() -> mpi::topology::SimpleCommunicator {
    mpi::topology::SimpleCommunicator::world()
}

/// Elements per all-reduce of gradients: 2^24 f32 (64 MiB), so the
/// buffer a bucket needs stays small beside the gradients themselves (as
/// DDP's gradient buckets).
const BUCKET: usize = 1 << 24;

impl World {
    fn single() -> Self {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
        }
    }

    /// Whether this rank writes logs, metrics, samples, plots and
    /// checkpoints and draws the progress bar (rank 0).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn is_single(&self) -> bool {
        self.size == 1
    }

    /// This rank's rows of a global batch of `n` (a multiple of the rank
    /// count): the `rank`-th of `size` equal contiguous parts.
    pub fn shard<T: Clone>(&self, global: &[T]) -> Vec<T> {
        let part = global.len() / self.size;
        debug_assert_eq!(
            part * self.size,
            global.len(),
            "a global batch splits evenly"
        );
        global[self.rank * part..(self.rank + 1) * part].to_vec()
    }

    /// This rank's part of `n` items split as evenly as can be (the first
    /// `n % size` ranks take one more): for evaluation sets, which need
    /// not divide.
    pub fn split(&self, n: usize) -> std::ops::Range<usize> {
        let (q, r) = (n / self.size, n % self.size);
        let start = self.rank * q + self.rank.min(r);
        start..start + q + usize::from(self.rank < r)
    }

    /// Sums `values` over the ranks, in place.
    pub fn sum(&self, values: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if !self.is_single() && !values.is_empty() {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let mine = values.to_vec();
            comm().all_reduce_into(&mine[..], values, SystemOperation::sum());
            count(8 * values.len());
        }
        #[cfg(not(feature = "mpi"))]
        let _ = values;
    }

    /// `local` summed over the ranks.
    pub fn sum_of(&self, local: f64) -> f64 {
        let mut v = [local];
        self.sum(&mut v);
        v[0]
    }

    /// This rank's share of a count summed over the ranks: `local /
    /// global` (1 with one rank; 0 where no rank counts any). A loss that
    /// is a mean over this rank's `local` items, times this share, is its
    /// part of the mean over every rank's items: summing the ranks'
    /// gradients then gives the gradient of the global mean.
    pub fn share(&self, local: f64) -> f64 {
        if self.is_single() {
            return 1.0;
        }
        let global = self.sum_of(local);
        match global > 0.0 {
            true => local / global,
            false => 0.0,
        }
    }

    /// The largest of the ranks' `local`.
    pub fn max(&self, local: usize) -> usize {
        if self.is_single() {
            return local;
        }
        #[cfg(feature = "mpi")]
        {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let mut out = 0u64;
            comm().all_reduce_into(&(local as u64), &mut out, SystemOperation::max());
            count(8);
            out as usize
        }
        #[cfg(not(feature = "mpi"))]
        local
    }

    /// Whether any rank says `local` (a stop request, a skipped step).
    pub fn any(&self, local: bool) -> bool {
        self.max(local as usize) > 0
    }

    /// Every rank's bytes, in rank order.
    pub fn gather_bytes(&self, local: &[u8]) -> Vec<Vec<u8>> {
        if self.is_single() {
            return vec![local.to_vec()];
        }
        #[cfg(feature = "mpi")]
        {
            use mpi::collective::CommunicatorCollectives;
            use mpi::datatype::PartitionMut;
            let c = comm();
            let mut counts = vec![0i32; self.size];
            let len =
                i32::try_from(local.len()).expect("a rank's gathered bytes fit MPI's count (2^31)");
            c.all_gather_into(&len, &mut counts[..]);
            count(4 + local.len());
            let displs: Vec<i32> = counts
                .iter()
                .scan(0i32, |at, &n| {
                    let d = *at;
                    *at += n;
                    Some(d)
                })
                .collect();
            let total: usize = counts.iter().map(|&n| n as usize).sum();
            let mut all = vec![0u8; total];
            {
                let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                c.all_gather_varcount_into(local, &mut parts);
            }
            counts
                .iter()
                .zip(&displs)
                .map(|(&n, &d)| all[d as usize..(d + n) as usize].to_vec())
                .collect()
        }
        #[cfg(not(feature = "mpi"))]
        vec![local.to_vec()]
    }

    /// Every rank's `local`, in rank order (serialized as JSON on the way).
    pub fn gather<T: Serialize + DeserializeOwned>(&self, local: T) -> Result<Vec<T>> {
        if self.is_single() {
            return Ok(vec![local]);
        }
        let bytes = serde_json::to_vec(&local).map_err(|e| Error::Msg(e.to_string()))?;
        self.gather_bytes(&bytes)
            .iter()
            .map(|b| serde_json::from_slice(b).map_err(|e| Error::Msg(e.to_string())))
            .collect()
    }

    /// The ranks' `local` vectors concatenated in rank order.
    pub fn concat<T: Serialize + DeserializeOwned>(&self, local: Vec<T>) -> Result<Vec<T>> {
        Ok(self.gather(local)?.into_iter().flatten().collect())
    }

    /// The ranks' f32 values concatenated in rank order, sent as their
    /// bits (NaN and infinities pass, which JSON would refuse).
    pub fn concat_f32(&self, local: Vec<f32>) -> Vec<f32> {
        if self.is_single() {
            return local;
        }
        let bytes: Vec<u8> = local.iter().flat_map(|v| v.to_le_bytes()).collect();
        (self.gather_bytes(&bytes).concat().chunks_exact(4))
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// [`Self::concat_f32`] for f64 values.
    pub fn concat_f64(&self, local: Vec<f64>) -> Vec<f64> {
        if self.is_single() {
            return local;
        }
        let bytes: Vec<u8> = local.iter().flat_map(|v| v.to_le_bytes()).collect();
        (self.gather_bytes(&bytes).concat().chunks_exact(8))
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect()
    }

    /// The ranks' (rows, ...) tensors concatenated along the rows, in rank
    /// order, as f32 on `local`'s device (identity with one rank).
    pub fn concat_rows(&self, local: &Tensor) -> Result<Tensor> {
        if self.is_single() {
            return Ok(local.clone());
        }
        let dims = local.dims().to_vec();
        let values: Vec<f32> = local.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let all = self.concat_f32(values);
        let row: usize = dims[1..].iter().product();
        let mut shape = dims;
        shape[0] = all.len() / row.max(1);
        Ok(Tensor::from_vec(all, shape, local.device())?.to_dtype(local.dtype())?)
    }

    /// Checks that every rank holds the same `value` of `what` (a hash of
    /// the config, a checksum of the weights); the error names the ranks
    /// that differ from rank 0.
    pub fn check_same(&self, what: &str, value: u64) -> Result<()> {
        if self.is_single() {
            return Ok(());
        }
        let all = self.gather(value)?;
        let differ: Vec<String> = (all.iter().enumerate())
            .filter(|(_, v)| **v != all[0])
            .map(|(r, _)| r.to_string())
            .collect();
        match differ.is_empty() {
            true => Ok(()),
            false => Err(Error::Msg(format!(
                "{what} differs between rank 0 and rank(s) {} of {}",
                differ.join(", "),
                self.size
            ))),
        }
    }

    /// Sums gradients over the ranks, in place, before clipping. A
    /// gradient some rank lacks (no micro-batch of it reached the weight)
    /// counts as zeros there. CPU tensors go through MPI in buckets of
    /// [`BUCKET`] elements; CUDA tensors through NCCL (feature `nccl`), or
    /// through the host otherwise.
    pub fn sum_gradients(&self, grads: &mut [Option<Tensor>], shapes: &[Tensor]) -> Result<()> {
        if self.is_single() {
            return Ok(());
        }
        let mut present: Vec<f64> = grads.iter().map(|g| g.is_some() as u8 as f64).collect();
        self.sum(&mut present);
        for ((g, n), like) in grads.iter_mut().zip(&present).zip(shapes) {
            if *n > 0.0 && g.is_none() {
                *g = Some(like.zeros_like()?);
            }
        }
        #[cfg(feature = "nccl")]
        if grads.iter().flatten().any(|g| g.device().is_cuda()) {
            return nccl::sum_in_place(grads);
        }
        self.sum_on_host(grads)
    }

    /// [`Self::sum_gradients`] through host buffers and MPI.
    fn sum_on_host(&self, grads: &mut [Option<Tensor>]) -> Result<()> {
        let mut bucket: Vec<f32> = Vec::with_capacity(BUCKET);
        let mut members: Vec<usize> = Vec::new();
        let flush =
            |bucket: &mut Vec<f32>, members: &mut Vec<usize>, grads: &mut [Option<Tensor>]| {
                self.sum_f32(bucket);
                let mut at = 0;
                for &i in members.iter() {
                    let g = grads[i].as_ref().expect("a bucket member has a gradient");
                    let n = g.elem_count();
                    let summed = Tensor::from_slice(&bucket[at..at + n], g.shape(), g.device())?
                        .to_dtype(g.dtype())?;
                    grads[i] = Some(summed);
                    at += n;
                }
                bucket.clear();
                members.clear();
                Ok::<(), Error>(())
            };
        for i in 0..grads.len() {
            let Some(n) = grads[i].as_ref().map(Tensor::elem_count) else {
                continue;
            };
            if !bucket.is_empty() && bucket.len() + n > BUCKET {
                flush(&mut bucket, &mut members, grads)?;
            }
            let g = grads[i].as_ref().expect("checked above");
            if n > BUCKET {
                // One tensor larger than a bucket: summed in slices of its own.
                let flat: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let mut out = Vec::with_capacity(n);
                for part in flat.chunks(BUCKET) {
                    let mut part = part.to_vec();
                    self.sum_f32(&mut part);
                    out.extend(part);
                }
                grads[i] = Some(Tensor::from_vec(out, g.shape(), g.device())?.to_dtype(g.dtype())?);
                continue;
            }
            bucket.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            members.push(i);
        }
        if !bucket.is_empty() {
            flush(&mut bucket, &mut members, grads)?;
        }
        Ok(())
    }

    /// Sums f32 values over the ranks, in place.
    fn sum_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let mine = values.to_vec();
            comm().all_reduce_into(&mine[..], values, SystemOperation::sum());
            count(4 * values.len());
        }
        #[cfg(not(feature = "mpi"))]
        let _ = values;
    }

    /// Stops the whole job after this rank's error (MPI_Abort): no rank
    /// is left waiting in a collective. With one rank, exits.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if !self.is_single() {
            use mpi::topology::Communicator;
            comm().abort(code);
        }
        std::process::exit(code)
    }
}

/// A hash of bytes (FNV-1a, 64 bits): for checks that ranks agree.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// A checksum of tensors' exact values (their bytes, in order), for the
/// check at every checkpoint that the ranks' weights are identical.
pub fn checksum<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for t in tensors {
        // f32 already: to_dtype is a cheap clone.
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bits = values.iter().map(|v| v.to_bits());
        // A word at a time (a byte-wise FNV over gigabytes would take seconds).
        for w in bits {
            h = (h ^ w as u64)
                .wrapping_mul(0x0000_0100_0000_01B3)
                .rotate_left(5);
        }
    }
    Ok(h)
}

#[cfg(feature = "nccl")]
mod nccl {
    //! Gradients summed with NCCL on each rank's GPU; the communicator is
    //! made once, its unique id made by rank 0 and broadcast over MPI.

    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{Storage, Tensor};

    use super::world;
    use crate::{Error, Result};

    struct Shared(Comm);
    // SAFETY: the communicator is only used from the main thread (the
    // collectives are called there, in order, by every rank).
    unsafe impl Send for Shared {}
    unsafe impl Sync for Shared {}

    static COMM: OnceLock<Shared> = OnceLock::new();

    fn comm(device: &candle_core::CudaDevice) -> Result<&'static Comm> {
        if let Some(c) = COMM.get() {
            return Ok(&c.0);
        }
        use mpi::collective::Root;
        use mpi::topology::Communicator;
        let w = world();
        let mut internal = [0i8; 128];
        if w.is_main() {
            let id = Id::new().map_err(|e| Error::Msg(format!("NCCL id: {e:?}")))?;
            internal.copy_from_slice(&id.internal().map(|c| c as i8));
        }
        super::comm()
            .process_at_rank(0)
            .broadcast_into(&mut internal[..]);
        let id = Id::uninit(internal.map(|c| c as _));
        let c = Comm::from_rank(device.cuda_stream(), w.rank, w.size, id)
            .map_err(|e| Error::Msg(format!("NCCL communicator: {e:?}")))?;
        Ok(&COMM.get_or_init(|| Shared(c)).0)
    }

    /// Sums every gradient over the ranks on the GPU (f32 tensors; others
    /// pass through f32).
    pub(super) fn sum_in_place(grads: &mut [Option<Tensor>]) -> Result<()> {
        for g in grads.iter_mut().flatten() {
            let t = g.to_dtype(candle_core::DType::F32)?.contiguous()?;
            let candle_core::Device::Cuda(device) = t.device() else {
                return Err(Error::Msg("NCCL sums CUDA tensors".into()));
            };
            let c = comm(device)?;
            let out = {
                let (storage, layout) = t.storage_and_layout();
                let Storage::Cuda(s) = &*storage else {
                    return Err(Error::Msg("NCCL sums CUDA tensors".into()));
                };
                let src = s.as_cuda_slice::<f32>()?;
                let src = src.slice(layout.start_offset()..layout.start_offset() + t.elem_count());
                let mut dst = device.alloc_zeros::<f32>(t.elem_count())?;
                super::count(4 * t.elem_count());
                c.all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
                let storage = candle_core::CudaStorage::wrap_cuda_slice(dst, device.clone());
                Tensor::from_storage(
                    Storage::Cuda(storage),
                    t.shape().clone(),
                    candle_core::op::BackpropOp::none(),
                    false,
                )
            };
            *g = out.to_dtype(g.dtype())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rank_collectives_are_the_identity() {
        let w = World::single();
        let mut v = [1.5, -2.0];
        w.sum(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(w.share(7.0), 1.0);
        assert_eq!(w.max(3), 3);
        assert!(!w.any(false) && w.any(true));
        assert_eq!(w.concat(vec![1, 2]).unwrap(), vec![1, 2]);
        assert_eq!(w.shard(&[1, 2, 3]), vec![1, 2, 3]);
        assert_eq!(w.split(5), 0..5);
        w.check_same("x", 3).unwrap();
    }

    #[test]
    fn shards_and_splits_cover_the_batch_once_in_rank_order() {
        let ranks = |size| {
            (0..size).map(move |rank| World {
                rank,
                size,
                local_rank: rank,
                local_size: size,
            })
        };
        let global: Vec<usize> = (0..12).collect();
        let shards: Vec<usize> = ranks(3).flat_map(|w| w.shard(&global)).collect();
        assert_eq!(shards, global);
        assert_eq!(ranks(3).nth(1).unwrap().shard(&global), vec![4, 5, 6, 7]);
        // 7 eval items over 3 ranks: 3, 2, 2.
        let parts: Vec<_> = ranks(3).map(|w| w.split(7)).collect();
        assert_eq!(parts, vec![0..3, 3..5, 5..7]);
        // Fewer items than ranks: the last ranks get none.
        let parts: Vec<_> = ranks(3).map(|w| w.split(2)).collect();
        assert_eq!(parts, vec![0..1, 1..2, 2..2]);
    }

    #[test]
    fn checksums_see_one_bit_and_fingerprints_differ() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(&[1.0f32, 2.0, 3.0], &dev).unwrap();
        let b = Tensor::new(&[1.0f32, 2.0, f32::from_bits(3.0f32.to_bits() + 1)], &dev).unwrap();
        assert_eq!(checksum([&a]).unwrap(), checksum([&a.clone()]).unwrap());
        assert_ne!(checksum([&a]).unwrap(), checksum([&b]).unwrap());
        assert_ne!(checksum([&a, &b]).unwrap(), checksum([&b, &a]).unwrap());
        assert_ne!(fingerprint(b"a = 1"), fingerprint(b"a = 2"));
    }
}
