//! Recomputation in the backward, the autograd half of activation
//! checkpointing (transformers' `activation_checkpointing`) and of the LM
//! head's chunked log-probs: a value is computed with no graph kept, then
//! attached to its inputs by an op whose backward computes it again, this
//! time with a graph, backpropagates through that graph and drops it.
//!
//! Candle has no such op, and a custom op's backward returns the gradients
//! of its (at most three) tensor arguments only. The weights a recomputed
//! layer uses get their gradients from a backward run inside the op's; they
//! are handed to [`gradients`], the one entry point for a training backward,
//! through a per-thread sink. The gradients themselves are those of the
//! plain graph, bit for bit: the recomputation runs the same ops on the same
//! inputs (except that a layer's last product may skip its value, which no
//! backward reads: [`output_product`]), and the layer's output gradient
//! enters it unchanged (as the factor of sum(y * g), whose backward gives
//! g * 1 = g exactly).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use candle_core::{
    backprop::GradStore, bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, MetalStorage,
    Result as CResult, Shape, Storage, Tensor, TensorId, Var,
};

use crate::Result;

/// The variables one training backward wants, and what the backwards run
/// inside recomputing ops found for them.
struct Sink {
    wanted: HashSet<TensorId>,
    grads: HashMap<TensorId, Tensor>,
    /// Gradients handed over whole by their op ([`hand_over`]): no one else
    /// holds their storage, so the plain gradient is added into them in place.
    owned: HashSet<TensorId>,
}

thread_local! {
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
    static RECOMPUTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Inside a recomputation: [`checkpoint`]'s backward running the layer again.
    static RECOMPUTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Inside [`output_product`] during a recomputation.
    static OUTPUT_UNUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static SKIPPED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs `f`, a layer's last product, whose value reaches nothing but the
/// residual sum that is the layer's output. While [`checkpoint`]'s backward
/// runs the layer again, no backward reads that value: the sum's backward
/// and the output gradient's product pass the gradient through unread. So
/// there the CPU's products that compute a whole linear layer's output (a
/// LoRA layer, a layer with a bias, a trained or frozen weight's product;
/// `models::layers::Linear::forward` picks them) give zeros instead of
/// computing it: their backward reads only their inputs. The recomputation
/// then costs one product less per layer (Llama's down_proj: a third of
/// its MLP), and the gradients are the same bits.
/// Elsewhere (the forward, checkpointing off) `f` runs as it is.
pub fn output_product<T>(f: impl FnOnce() -> T) -> T {
    let unused = RECOMPUTING.with(|r| r.get());
    let _restore = Setting::set(&OUTPUT_UNUSED, unused);
    f()
}

/// Runs `f`, products whose values other ops read (a composed LoRA
/// update's), with no value skipped even inside [`output_product`].
pub(crate) fn values_needed<T>(f: impl FnOnce() -> T) -> T {
    let _restore = Setting::set(&OUTPUT_UNUSED, false);
    f()
}

/// A per-thread flag set for a scope, restored when dropped (also when the
/// scope unwinds).
struct Setting {
    flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    before: bool,
}

impl Setting {
    fn set(flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>, value: bool) -> Self {
        let before = flag.with(|f| f.replace(value));
        Self { flag, before }
    }
}

impl Drop for Setting {
    fn drop(&mut self) {
        let before = self.before;
        self.flag.with(|f| f.set(before));
    }
}

/// Whether a whole-output product made now may skip its value (see [`output_product`]).
pub(crate) fn output_unused() -> bool {
    OUTPUT_UNUSED.with(|o| o.get())
}

/// Counts a product whose value was skipped (a test's evidence).
pub(crate) fn count_skipped() {
    SKIPPED.with(|c| c.set(c.get() + 1));
}

/// How many products on this thread skipped their value in a recomputation.
pub fn skipped_on_this_thread() -> u64 {
    SKIPPED.with(|c| c.get())
}

/// How many recomputations backwards on this thread have run (a test's
/// evidence that checkpointing was on).
pub fn recomputed_on_this_thread() -> u64 {
    RECOMPUTED.with(|c| c.get())
}

/// Backpropagates `loss` and returns the gradients of `vars`, detached, in
/// their order (None: no gradient), including those found inside
/// recomputing ops. Every training backward goes through here.
pub fn gradients(loss: &Tensor, vars: &[&Tensor]) -> Result<Vec<Option<Tensor>>> {
    gradients_into(loss, vars, vec![None; vars.len()])
}

/// [`gradients`] added to `sums`, one per variable (gradient accumulation:
/// the micro-batches so far), each with a storage no one else holds. The
/// weights of a recomputed layer get theirs added into their sums in place
/// as the layer's backward produces them, so a step of several
/// micro-batches holds one set of gradients and one layer's, not two sets
/// (torch adds into `.grad` the same way). A recomputed layer's weight gets
/// the sum backward-then-add gives, bit for bit. The chunked head adds each
/// chunk's product into the sum in turn, and an embedding each row (a tied
/// table gets both), which may differ in the last bit from adding their
/// whole gradients to it. With checkpointing on and off both take this path.
pub fn gradients_into(
    loss: &Tensor,
    vars: &[&Tensor],
    sums: Vec<Option<Tensor>>,
) -> Result<Vec<Option<Tensor>>> {
    let mut sink = Sink {
        wanted: vars.iter().map(|v| v.id()).collect(),
        grads: HashMap::new(),
        owned: HashSet::new(),
    };
    for (v, sum) in vars.iter().zip(sums) {
        if let Some(sum) = sum {
            sink.grads.insert(v.id(), sum);
            sink.owned.insert(v.id());
        }
    }
    let outer = SINK.with(|s| s.replace(Some(sink)));
    let store = loss.backward();
    let mut sink = SINK.with(|s| s.replace(outer)).expect("the sink set above");
    let store = store?;
    vars.iter()
        .map(|v| {
            let plain = store.get(v).map(Tensor::detach);
            Ok(match (plain, sink.grads.remove(&v.id())) {
                // A tied head: its gradient from the chunked head (owned) and
                // from the embedding, without a third tensor of their size.
                (Some(a), Some(b)) if sink.owned.contains(&v.id()) => Some(accumulate(Some(b), a)?),
                (Some(a), Some(b)) => Some((a + b)?.detach()),
                (a, b) => a.or(b),
            })
        })
        .collect()
}

/// Hands the wanted variables' gradients in `store` to the running
/// [`gradients`], skipping `exclude` (the recomputation's own input).
fn sink(store: &GradStore, exclude: TensorId) -> CResult<()> {
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let Some(sink) = s.as_mut() else {
            bail!("a recomputing op (activation checkpointing, chunked log-probs) ran its backward outside kernels::gradients: its weights' gradients would be lost")
        };
        for id in store.get_ids() {
            if *id == exclude || !sink.wanted.contains(id) {
                continue;
            }
            let g = store.get_id(*id).expect("listed").detach();
            let sum = match sink.grads.remove(id) {
                // The micro-batches' sum (or a gradient handed over whole):
                // added into in place, and still its holder's alone.
                Some(before) if sink.owned.contains(id) => accumulate(Some(before), g)?,
                // A weight in several recomputed layers (none in the models
                // here): a new sum, since a store's gradients may share storage.
                Some(before) => (before + g)?.detach(),
                None => {
                    sink.owned.remove(id);
                    g
                }
            };
            sink.grads.insert(*id, sum);
        }
        Ok(())
    })
}

/// `sum + g`, written into `sum`'s own storage where both are contiguous
/// f32 CPU tensors of one shape (no third tensor of their size: a
/// 151,936-word head's gradient is 544 MB at Qwen2.5-0.5B's width), else a
/// new tensor. `sum` must own its storage (a gradient no one else holds).
pub(crate) fn accumulate(sum: Option<Tensor>, g: Tensor) -> CResult<Tensor> {
    let Some(sum) = sum else { return Ok(g) };
    let fits = super::fused_path(&[&sum, &g])
        && sum.shape() == g.shape()
        && sum.is_contiguous()
        && g.is_contiguous();
    match fits {
        true => {
            sum.inplace_op2(&g, &AddInto)?;
            Ok(sum)
        }
        false => Ok((sum + g)?.detach()),
    }
}

struct AddInto;

impl candle_core::InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "add-into"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<()> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            bail!("add-into: f32 tensors only")
        };
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("add-into: contiguous tensors only")
        };
        if a1 - a0 != b1 - b0 {
            bail!("add-into: {} and {} elements", a1 - a0, b1 - b0)
        }
        let b = &b[b0..b1];
        let width = super::CHUNK;
        super::for_pieces(&mut a[a0..a1], width, |i, piece| {
            for (x, y) in piece.iter_mut().zip(&b[i * width..]) {
                *x += *y;
            }
        });
        Ok(())
    }
}

/// Hands `grad`, the whole gradient of variable `var` from one op that
/// alone holds it, to the running [`gradients`] (None: taken, or added into
/// the micro-batches' sum in place), or gives it back where no backward
/// wants it that way (Some: the op returns it as usual).
pub(crate) fn hand_over(var: &Tensor, grad: Tensor) -> CResult<Option<Tensor>> {
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let Some(sink) = s.as_mut() else {
            return Ok(Some(grad));
        };
        let id = var.id();
        if !(var.is_variable() && sink.wanted.contains(&id)) {
            return Ok(Some(grad));
        }
        match sink.grads.remove(&id) {
            None => {
                sink.grads.insert(id, grad);
                sink.owned.insert(id);
                Ok(None)
            }
            Some(sum) if sink.owned.contains(&id) => {
                sink.grads.insert(id, accumulate(Some(sum), grad)?);
                Ok(None)
            }
            Some(other) => {
                sink.grads.insert(id, other);
                Ok(Some(grad))
            }
        }
    })
}

/// Takes out of the running [`gradients`] the sum it holds for variable
/// `var` alone (the micro-batches' so far, or a tied weight's first part),
/// for an op to add its gradient into in place and give back with
/// [`hand_over`]. None where there is no such sum.
pub(crate) fn take_sum(var: &Tensor) -> Option<Tensor> {
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let sink = s.as_mut()?;
        let id = var.id();
        match var.is_variable() && sink.owned.contains(&id) {
            true => {
                sink.owned.remove(&id);
                sink.grads.remove(&id)
            }
            false => None,
        }
    })
}

/// `x` as a leaf variable of its own (a copy), so that a backward reaches it.
pub(crate) fn leaf(x: &Tensor) -> CResult<Var> {
    Var::from_tensor(&x.detach())
}

/// Runs `f` on `x` keeping no graph inside it: the result is attached to
/// `x` alone, and the backward runs `f` again from a copy of `x` and
/// backpropagates through it. `replay(true)` runs before the recomputation
/// and `replay(false)` after it: they put back, then restore, what `f` reads
/// besides its input (a dropout stream's position). The
/// gradients of the variables `f` uses reach [`gradients`]. Where `x`
/// records no graph (a frozen embedding under LoRA), the result is attached
/// to a copy of it that does, so that the backward still gets here.
pub fn checkpoint(
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
    replay: impl Fn(bool) + Send + Sync + 'static,
) -> Result<Tensor> {
    // The layer runs on an input that records a graph exactly when `x`
    // does, forward and recomputed: kernels that pick their path by that
    // (the CUDA path's no-grad fused ops) then compute the same values.
    let tracked = x.track_op();
    let input = move |t: &Tensor| -> CResult<Tensor> {
        match tracked {
            true => Ok(leaf(t)?.into_inner()),
            false => Ok(t.detach()),
        }
    };
    let value = f(&input(x)?)?.detach();
    let arg = match tracked {
        true => x.clone(),
        false => leaf(x)?.into_inner(),
    };
    let backward = move |arg: &Tensor, grad: &Tensor| -> CResult<Option<Tensor>> {
        RECOMPUTED.with(|c| c.set(c.get() + 1));
        replay(true);
        let x = input(arg)?;
        let y = {
            let _restore = Setting::set(&RECOMPUTING, true);
            f(&x)
        };
        replay(false);
        let y = y.map_err(candle_core::Error::wrap)?;
        let store = (y * grad.detach())?.sum_all()?.backward()?;
        sink(&store, x.id())?;
        Ok(store.get(&x).map(Tensor::detach).filter(|_| tracked))
    };
    Ok(arg.apply_op1(Attached1 {
        value: Mutex::new(Some(contiguous(value)?)),
        backward: Box::new(backward),
    })?)
}

/// The backward of [`attach2`]: the gradients of both inputs from theirs
/// and the output's gradient.
pub type Backward2 = Box<
    dyn Fn(&Tensor, &Tensor, &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> + Send + Sync,
>;

/// `value`, computed from `a` and `b` with no graph kept, attached to them
/// with `backward` (which recomputes what it needs).
pub fn attach2(a: &Tensor, b: &Tensor, value: Tensor, backward: Backward2) -> Result<Tensor> {
    Ok(a.apply_op2(
        b,
        Attached2 {
            value: Mutex::new(Some(contiguous(value)?)),
            backward,
        },
    )?)
}

/// The value as the op hands it out: its own contiguous storage from offset 0.
fn contiguous(value: Tensor) -> CResult<Tensor> {
    match value.is_contiguous() && value.layout().start_offset() == 0 {
        true => Ok(value),
        false => value.copy(),
    }
}

/// A copy of the precomputed value's storage, on whichever device it is.
fn hand_out(slot: &Mutex<Option<Tensor>>) -> CResult<(Storage, Shape)> {
    let value =
        slot.lock().expect("not poisoned").take().ok_or_else(|| {
            candle_core::Error::Msg("a recomputing op ran its forward twice".into())
        })?;
    let (storage, layout) = value.storage_and_layout();
    let copy = match &*storage {
        Storage::Cpu(s) => {
            Storage::Cpu(candle_core::backend::BackendStorage::try_clone(s, layout)?)
        }
        Storage::Cuda(s) => {
            Storage::Cuda(candle_core::backend::BackendStorage::try_clone(s, layout)?)
        }
        Storage::Metal(s) => {
            Storage::Metal(candle_core::backend::BackendStorage::try_clone(s, layout)?)
        }
    };
    Ok((copy, layout.shape().clone()))
}

macro_rules! forwards {
    ($($args:ident),*) => {
        fn cpu_fwd(&self, $($args: &CpuStorage, _: &Layout),*) -> CResult<(CpuStorage, Shape)> {
            $(let _ = $args;)*
            match hand_out(&self.value)? {
                (Storage::Cpu(s), shape) => Ok((s, shape)),
                _ => bail!("recompute: the value is not on the CPU like its inputs"),
            }
        }
        fn cuda_fwd(&self, $($args: &CudaStorage, _: &Layout),*) -> CResult<(CudaStorage, Shape)> {
            $(let _ = $args;)*
            match hand_out(&self.value)? {
                (Storage::Cuda(s), shape) => Ok((s, shape)),
                _ => bail!("recompute: the value is not on CUDA like its inputs"),
            }
        }
        fn metal_fwd(&self, $($args: &MetalStorage, _: &Layout),*) -> CResult<(MetalStorage, Shape)> {
            $(let _ = $args;)*
            match hand_out(&self.value)? {
                (Storage::Metal(s), shape) => Ok((s, shape)),
                _ => bail!("recompute: the value is not on Metal like its inputs"),
            }
        }
    };
}

/// The backward of [`checkpoint`]: the input's gradient from it and the output's gradient.
type Backward1 = Box<dyn Fn(&Tensor, &Tensor) -> CResult<Option<Tensor>> + Send + Sync>;

struct Attached1 {
    value: Mutex<Option<Tensor>>,
    backward: Backward1,
}

impl CustomOp1 for Attached1 {
    fn name(&self) -> &'static str {
        "recompute"
    }
    forwards!(x);
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        (self.backward)(arg, grad)
    }
}

struct Attached2 {
    value: Mutex<Option<Tensor>>,
    backward: Backward2,
}

impl CustomOp2 for Attached2 {
    fn name(&self) -> &'static str {
        "recompute2"
    }
    forwards!(a, b);
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        (self.backward)(a, b, grad)
    }
}
