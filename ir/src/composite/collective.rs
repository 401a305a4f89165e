//! Collectives over ranks, simulated in one graph: `all_to_all`, `all_to_all_start`, `collective_wait`.
//!
//! A graph spanning `R` ranks carries a **leading rank axis**: the per-rank tensor `[X...]` of every rank is
//! the simulated tensor `[R, X...]`, whose slice `[r]` is rank `r`'s copy. A collective is then an ordinary
//! op that moves data across axis 0, and the interpreter runs a whole cluster's program on one host.
//!
//! `all_to_all[axis=a]`, on `x: [R, ..., R·c (axis a), ...]`: every rank cuts its axis `a` into `R` chunks of
//! `c` rows, chunk `s` destined for rank `s`; rank `r` receives chunk `r` of every rank `s`, in rank order:
//!
//! ```text
//! out[r, ..., s·c + j, ...] = x[s, ..., r·c + j, ...]        0 ≤ r, s < R, 0 ≤ j < c
//! ```
//!
//! Decomposition: view axis `a` as `[R, c]`, swap that `R` with the rank axis 0, view back. It is its own
//! inverse, and axes other than `a` and 0 are carried along untouched (a chunk along any of them commutes
//! with the exchange).
//!
//! The asynchronous pair expresses overlap: `all_to_all_start[axis=a, overlap_flops=F](x)` *starts* the same
//! exchange (its value is the exchanged tensor, as for `all_to_all`) and `collective_wait(h)` is where the
//! data is needed (the identity). `collective_wait(all_to_all_start(x)) = all_to_all(x)`; a scheduler may run
//! independent compute between the two. `overlap_flops` is a schedule annotation with no effect on the
//! meaning: the matmul FLOPs of the independent compute the transfer was placed alongside (the optimizer's
//! cost model hides the transfer behind part of it; see `docs/passes.md`); `0` for a transfer with none.

use crate::dim::Dim;
use crate::error::{IrError, Result};
use crate::graph::{Graph, Value};
use crate::types::TensorType;

/// Typing rule of `all_to_all[axis]` and `all_to_all_start[axis, ..]` (named `op` in messages): the input
/// `[R, ...]` has rank ≥ 2, `axis` is not the rank axis 0, and `R` (a constant or a symbol) divides the size
/// of `axis`. The output has the input's type.
pub fn infer_all_to_all(op: &str, axis: i64, ins: &[&TensorType]) -> std::result::Result<Vec<TensorType>, String> {
    let t = ins[0];
    if t.rank() < 2 {
        return Err(format!(
            "`{op}` needs a tensor [R, ...] with a leading rank axis and at least one more axis, got {t}"
        ));
    }
    let r = t.rank() as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(format!("`{op}`: axis {axis} is out of range for {t} (rank {r})"));
    }
    if a == 0 {
        return Err(format!(
            "`{op}`: axis {axis} is the rank axis of {t}; exchange along one of the per-rank axes 1..{}",
            r - 1
        ));
    }
    let ranks = &t.dims()[0];
    if let Some(0) = ranks.as_const() {
        return Err(format!("`{op}` needs at least one rank, got R = 0 in {t}"));
    }
    let d = &t.dims()[a as usize];
    if d.div_exact(ranks).is_none() {
        return Err(format!(
            "`{op}`: axis {axis} of {t} has size `{d}`, which the rank count R = `{ranks}` does not divide"
        ));
    }
    Ok(vec![t.clone()])
}

/// Typing rule of `collective_wait`: the identity on the started transfer's value.
pub fn infer_wait(ins: &[&TensorType]) -> std::result::Result<Vec<TensorType>, String> {
    Ok(vec![ins[0].clone()])
}

/// Appends the decomposition of `all_to_all[axis](x)`: reshape axis `a` into `[R, c]`, swap that `R` with
/// axis 0, reshape back.
pub fn all_to_all(g: &mut Graph, axis: i64, x: Value) -> Result<Value> {
    let dims = g.dims(x).to_vec();
    let rank = dims.len() as i64;
    let a = if axis < 0 { axis + rank } else { axis };
    if a <= 0 || a >= rank {
        return Err(IrError::Graph(format!(
            "`all_to_all`: axis {axis} is the rank axis or out of range for rank {rank}"
        )));
    }
    let a = a as usize;
    let ranks = dims[0].clone();
    let c = dims[a].div_exact(&ranks).ok_or_else(|| {
        IrError::Graph(format!(
            "`all_to_all`: R = `{ranks}` does not divide axis {a} of size `{}`",
            dims[a]
        ))
    })?;
    let mut split: Vec<Dim> = dims[..a].to_vec();
    split.push(ranks);
    split.push(c);
    split.extend_from_slice(&dims[a + 1..]);
    let v = g.reshape(x, split)?;
    let mut perm: Vec<usize> = (0..dims.len() + 1).collect();
    perm.swap(0, a);
    let v = g.permute(v, &perm)?;
    g.reshape(v, dims)
}
