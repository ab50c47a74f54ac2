//! Parameter gradients handed past Candle's GradStore.
//!
//! Candle's backward adds every gradient it receives into its store as
//! `zeros_like(param) + grad`: for a weight, a zeroed allocation and a
//! three-operand pass the size of the weight, at every step, only to copy
//! the one gradient the op computed. While a sink is open on a thread (the
//! trainers' backward, [`collecting`]), the fused ops give a trained
//! variable's gradient to it instead ([`deposit`]), and the caller adds it
//! to what the store has. With no sink open they return it to Candle as
//! before, so `loss.backward()` alone still sees every gradient.

use std::cell::RefCell;

use candle_core::{Tensor, TensorId};

thread_local! {
    static SINK: RefCell<Option<Vec<(TensorId, Tensor)>>> = const { RefCell::new(None) };
}

/// Runs `f` (a backward pass) with a sink open on this thread; returns what
/// it returned and the gradients deposited meanwhile, by variable id (one
/// entry per use of a variable). A sink already open is set aside meanwhile.
pub fn collecting<R>(f: impl FnOnce() -> R) -> (R, Vec<(TensorId, Tensor)>) {
    let outer = SINK.with(|s| s.replace(Some(Vec::new())));
    // Restores the outer sink even if `f` panics.
    struct Restore(Option<Option<Vec<(TensorId, Tensor)>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                SINK.with(|s| s.replace(outer));
            }
        }
    }
    let mut restore = Restore(Some(outer));
    let r = f();
    let outer = restore.0.take().expect("set above");
    let collected = SINK.with(|s| s.replace(outer)).unwrap_or_default();
    (r, collected)
}

/// In an op's backward: gives `grad` (detached) for `param` to the open
/// sink when `param` is a variable, and returns None; otherwise returns the
/// gradient for Candle's store.
pub fn deposit(param: &Tensor, grad: Tensor) -> Option<Tensor> {
    if !param.is_variable() {
        return Some(grad);
    }
    SINK.with(|s| match s.borrow_mut().as_mut() {
        Some(sink) => {
            sink.push((param.id(), grad.detach()));
            None
        }
        None => Some(grad),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn deposits_go_to_the_open_sink_of_variables_only() {
        let dev = Device::Cpu;
        let v = Var::new(&[1f32, 2.0], &dev).unwrap();
        let t = Tensor::new(&[3f32], &dev).unwrap();
        let g = Tensor::new(&[0.5f32, 0.25], &dev).unwrap();
        // No sink: the gradient goes back to Candle.
        assert!(deposit(v.as_tensor(), g.clone()).is_some());
        let (inner, got) = collecting(|| {
            assert!(deposit(v.as_tensor(), g.clone()).is_none());
            assert!(deposit(&t, t.clone()).is_some(), "not a variable");
            // A nested sink collects its own and leaves the outer one alone.
            let ((), nested) = collecting(|| assert!(deposit(v.as_tensor(), g.clone()).is_none()));
            nested.len()
        });
        assert_eq!(inner, 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, v.id());
        assert_eq!(got[0].1.to_vec1::<f32>().unwrap(), vec![0.5, 0.25]);
        assert!(deposit(v.as_tensor(), g).is_some(), "closed again");
    }
}
