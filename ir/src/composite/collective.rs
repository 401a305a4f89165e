//! Collectives over ranks, simulated in one graph: `all_to_all`, `all_to_all_start`, `collective_wait`,
//! `all_reduce`, `all_gather`, `reduce_scatter`, `send_recv`, and the local `shard_slice`.
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
//!
//! **Groups.** `all_reduce`, `all_gather`, `reduce_scatter`, `send_recv` and (with a mesh) `all_to_all` run within
//! groups of ranks: `mesh` factors the
//! rank axis (`R = Π mesh`, rank `r`'s coordinates row-major over it) and the ranks that differ only in
//! coordinate `over` form a group of `G = mesh[over]`; an empty `mesh` is one group of all `R` ranks. Within a
//! group (ranks `r, s` numbered along `over`):
//!
//! ```text
//! all_reduce:              out[r] = Σ_s x[s]                                      (summed in rank order)
//! all_gather[axis=a]:      out[r, ..., s·c + j, ...] = x[s, ..., j, ...]          [R, .., c, ..] → [R, .., G·c, ..]
//! reduce_scatter[axis=a]:  out[r, ..., j, ...] = Σ_s x[s, ..., r·c + j, ...]      [R, .., G·c, ..] → [R, .., c, ..]
//! send_recv[shift=k]:      out[r] = x[(r − k) mod G]                              (a constant group size)
//! shard_slice[axis=a]:     out[r, ..., j, ...] = x[r, ..., r·c + j, ...]           [R, .., G·c, ..] → [R, .., c, ..]
//! ```
//!
//! `shard_slice` moves no data between ranks: each keeps its own chunk (a replicated value made split). Its
//! decomposition selects the chunk whose index equals the rank's position in its group and sums it out.
//!
//! Decomposition: view the rank axis as the mesh, move axis `over` first and fold the others into one axis
//! carried along, apply the collective of one group along axis 0 (a sum over it broadcast back; the rank
//! axis moved next to `a` and merged into it, then broadcast; the sum, `a` viewed as `[G, c]` and that `G`
//! moved to axis 0; the group axis rotated by `k`), and undo the views. `all_gather` and `reduce_scatter` are
//! each other's transposes (the backward of one is the other), `all_reduce` its own, `send_recv[k]`'s is
//! `send_recv[−k]`.

use crate::dim::Dim;
use crate::error::{IrError, Result};
use crate::graph::{Graph, Value};
use crate::types::TensorType;
use crate::{CmpOp, DType};

/// Typing rule of `all_to_all[axis]` and `all_to_all_start[axis, ..]` (named `op` in messages): the input
/// `[R, ...]` has rank ≥ 2, `axis` is not the rank axis 0, and `R` (a constant or a symbol) divides the size
/// of `axis`. The output has the input's type.
pub fn infer_all_to_all(
    op: &str,
    axis: i64,
    mesh: &[usize],
    over: usize,
    ins: &[&TensorType],
) -> std::result::Result<Vec<TensorType>, String> {
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
    if mesh.is_empty() {
        if over != 0 {
            return Err(format!(
                "`{op}`: over={over} needs a mesh with axis {over}; with mesh=[] the group is all ranks (over=0)"
            ));
        }
        if d.div_exact(ranks).is_none() {
            return Err(format!(
                "`{op}`: axis {axis} of {t} has size `{d}`, which the rank count R = `{ranks}` does not divide"
            ));
        }
        return Ok(vec![t.clone()]);
    }
    let g = group_size(op, mesh, over, ranks, t)?;
    if d.div_exact(&g).is_none() {
        return Err(format!(
            "`{op}`: axis {axis} of {t} has size `{d}`, which the group size G = `{g}` does not divide"
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

/// The group size of `mesh`/`over` on a rank axis of size `ranks` (named `op` in messages): the product of the
/// mesh must be the rank count, `over` one of its axes; an empty mesh is one group of all ranks.
fn group_size(op: &str, mesh: &[usize], over: usize, ranks: &Dim, t: &TensorType) -> std::result::Result<Dim, String> {
    if mesh.is_empty() {
        if over != 0 {
            return Err(format!(
                "`{op}`: over={over} needs a mesh with axis {over}; with mesh=[] the group is all ranks (over=0)"
            ));
        }
        return Ok(ranks.clone());
    }
    if mesh.contains(&0) {
        return Err(format!("`{op}`: mesh {mesh:?} has an axis of size 0"));
    }
    let prod: usize = mesh.iter().product();
    if Dim::from(prod) != *ranks {
        return Err(format!(
            "`{op}`: mesh {mesh:?} has {prod} ranks but the rank axis of {t} has `{ranks}`"
        ));
    }
    match mesh.get(over) {
        Some(&g) => Ok(Dim::from(g)),
        None => Err(format!("`{op}`: over={over} is not an axis of mesh {mesh:?}")),
    }
}

/// Typing rule of `all_reduce`, `all_gather[axis]` and `reduce_scatter[axis]` (`axis` `None` for
/// `all_reduce`): the input `[R, ...]`, `axis` a per-rank axis, the mesh's groups valid (see
/// [`group_size`]); `reduce_scatter`'s axis divisible by the group size.
pub fn infer_grouped(
    op: &str,
    axis: Option<i64>,
    mesh: &[usize],
    over: usize,
    ins: &[&TensorType],
) -> std::result::Result<Vec<TensorType>, String> {
    let t = ins[0];
    if t.rank() < 1 || (axis.is_some() && t.rank() < 2) {
        return Err(format!(
            "`{op}` needs a tensor [R, ...] with a leading rank axis{}, got {t}",
            if axis.is_some() {
                " and at least one more axis"
            } else {
                ""
            }
        ));
    }
    let ranks = t.dims()[0].clone();
    let g = group_size(op, mesh, over, &ranks, t)?;
    let Some(axis) = axis else {
        return Ok(vec![t.clone()]);
    };
    let r = t.rank() as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a <= 0 || a >= r {
        return Err(format!(
            "`{op}`: axis {axis} is {} of {t}; gather or scatter along one of the per-rank axes 1..{}",
            if a == 0 { "the rank axis" } else { "out of range" },
            r - 1
        ));
    }
    let mut dims = t.dims().to_vec();
    let d = dims[a as usize].clone();
    dims[a as usize] = if op == "all_gather" {
        g * d
    } else {
        d.div_exact(&g).ok_or_else(|| {
            format!("`{op}`: axis {axis} of {t} has size `{d}`, which the group size G = `{g}` does not divide")
        })?
    };
    Ok(vec![TensorType::new(t.dtype, dims)])
}

/// Typing rule of `send_recv`: the groups valid (see [`group_size`]) and the group size a constant (the
/// rotation's split point); the output has the input's type.
pub fn infer_send_recv(
    mesh: &[usize],
    over: usize,
    ins: &[&TensorType],
) -> std::result::Result<Vec<TensorType>, String> {
    let t = ins[0];
    if t.rank() < 1 {
        return Err(format!(
            "`send_recv` needs a tensor [R, ...] with a leading rank axis, got {t}"
        ));
    }
    let g = group_size("send_recv", mesh, over, &t.dims()[0], t)?;
    if g.as_const().is_none() {
        return Err(format!("`send_recv` needs a constant group size, got `{g}` in {t}"));
    }
    Ok(vec![t.clone()])
}

/// Per-rank axis `axis` (negative from the end) of a `[R, ...]` tensor of rank `rank`, as an index ≥ 1.
pub fn per_rank_axis(op: &str, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    usize::try_from(a)
        .ok()
        .filter(|&a| a > 0 && (a as i64) < r)
        .ok_or_else(|| IrError::Graph(format!("`{op}`: axis {axis} is not a per-rank axis")))
}

/// Which collective of one group [`grouped`] applies.
#[derive(Clone, Copy)]
pub enum Within {
    Reduce,
    Gather(usize),
    Scatter(usize),
    /// `out[r] = x[(r − k) mod G]`.
    Shift(i64),
    /// `all_to_all` along axis `a` (in `[R, X...]`'s numbering).
    Exchange(usize),
    /// Each member's own chunk of axis `a`.
    Slice(usize),
}

/// `x: [R, X...]` viewed by groups: `[G, B, X...]`, the members of a group along axis 0 (in their order along
/// mesh axis `over`) and the groups along axis 1 (the other coordinates, row-major); an empty `mesh` is one
/// group of all ranks (`B = 1`). [`from_groups`] undoes it.
fn to_groups(g: &mut Graph, op: &str, mesh: &[usize], over: usize, x: Value) -> Result<Value> {
    let dims = g.dims(x).to_vec();
    let err = |m: String| IrError::Graph(format!("`{op}`: {m}"));
    if dims.is_empty() {
        return Err(err("a rank axis is needed".into()));
    }
    if mesh.is_empty() {
        return g.reshape(x, [vec![dims[0].clone(), Dim::from(1)], dims[1..].to_vec()].concat());
    }
    let k = mesh.len();
    if over >= k {
        return Err(err(format!("over={over} is not an axis of mesh {mesh:?}")));
    }
    // [R, X...] → [m0, .., m(k-1), X...] → [m_over, others..., X...] → [G, B, X...]
    let mut split: Vec<Dim> = mesh.iter().map(|&m| Dim::from(m)).collect();
    split.extend_from_slice(&dims[1..]);
    let v = g.reshape(x, split)?;
    let v = g.permute(v, &group_perm(k, over, dims.len() - 1))?;
    let b: usize = mesh
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != over)
        .map(|(_, &m)| m)
        .product();
    let mut folded = vec![Dim::from(mesh[over]), Dim::from(b)];
    folded.extend_from_slice(&dims[1..]);
    g.reshape(v, folded)
}

/// The permutation that moves mesh axis `over` of `k` first, `rest` per-rank axes after.
fn group_perm(k: usize, over: usize, rest: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = vec![over];
    perm.extend((0..k).filter(|&i| i != over));
    perm.extend(k..k + rest);
    perm
}

/// `[G, B, Y...]` back to `[R, Y...]` (the inverse of [`to_groups`] on the same `mesh`/`over`).
fn from_groups(g: &mut Graph, mesh: &[usize], over: usize, ranks: &Dim, y: Value) -> Result<Value> {
    let yd = g.dims(y).to_vec();
    let mut out = vec![ranks.clone()];
    out.extend_from_slice(&yd[2..]);
    if mesh.is_empty() {
        return g.reshape(y, out);
    }
    let k = mesh.len();
    let perm = group_perm(k, over, yd.len() - 2);
    // [G, B, Y...] → [m_over, others..., Y...] → [m0, .., Y...] → [R, Y...]
    let mut unfold: Vec<Dim> = perm[..k].iter().map(|&i| Dim::from(mesh[i])).collect();
    unfold.extend_from_slice(&yd[2..]);
    let y = g.reshape(y, unfold)?;
    let mut inv = vec![0usize; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    let y = g.permute(y, &inv)?;
    g.reshape(y, out)
}

/// Appends the decomposition of a grouped collective on `x: [R, ...]` (see the module's documentation);
/// `axis` is the per-rank axis of `Gather`/`Scatter` in `x`'s numbering.
pub fn grouped(g: &mut Graph, op: &str, within: Within, mesh: &[usize], over: usize, x: Value) -> Result<Value> {
    let ranks = g
        .dims(x)
        .first()
        .cloned()
        .ok_or_else(|| IrError::Graph(format!("`{op}`: a rank axis is needed")))?;
    let v = to_groups(g, op, mesh, over, x)?;
    let y = one_group(g, within, v)?;
    from_groups(g, mesh, over, &ranks, y)
}

/// One group's collective along axis 0 of `v: [G, B, X...]` (axis 1 carried along); `Gather`/`Scatter`'s
/// axis counts in `[R, X...]`, so it is axis `a + 1` here.
fn one_group(g: &mut Graph, within: Within, v: Value) -> Result<Value> {
    let dims = g.dims(v).to_vec();
    let gs = dims[0].clone();
    match within {
        Within::Exchange(a) => all_to_all(g, (a + 1) as i64, v),
        Within::Slice(a) => {
            let a = a + 1;
            let c = dims[a].div_exact(&gs).ok_or_else(|| {
                IrError::Graph(format!(
                    "`shard_slice`: the group size `{gs}` does not divide axis size `{}`",
                    dims[a]
                ))
            })?;
            // [G, B, .., G', c, ..]: keep the chunk G' equal to the member's index on axis 0
            let mut split: Vec<Dim> = dims[..a].to_vec();
            split.push(gs.clone());
            split.push(c);
            split.extend_from_slice(&dims[a + 1..]);
            let t = g.reshape(v, split.clone())?;
            let ones = |at: usize| -> Vec<Dim> {
                (0..split.len())
                    .map(|i| if i == at { gs.clone() } else { Dim::from(1) })
                    .collect()
            };
            let member = g.iota(DType::I64, ones(0), 0)?;
            let chunk = g.iota(DType::I64, ones(a), a as i64)?;
            let mine = g.compare(CmpOp::Eq, member, chunk)?;
            let zero = g.scalar(0.0, g.dtype(t))?;
            let kept = g.select(mine, t, zero)?;
            g.sum(kept, &[a as i64], false)
        }
        Within::Shift(k) => {
            let n = gs
                .as_const()
                .ok_or_else(|| IrError::Graph(format!("`send_recv` needs a constant group size, got `{gs}`")))?;
            let k = k.rem_euclid(n.max(1));
            if k == 0 {
                return Ok(v);
            }
            // the last k members' values first: out[r] = x[r − k]
            let tail = g.slice(v, 0, n - k, n)?;
            let head = g.slice(v, 0, 0, n - k)?;
            g.concat(&[tail, head], 0)
        }
        Within::Reduce => {
            let s = g.sum(v, &[0], true)?;
            g.broadcast(s, dims)
        }
        Within::Gather(a) => {
            let a = a + 1;
            // [G, B, .., c (a), ..] → [B, .., G, c, ..] → [B, .., G·c, ..] → [1, ..] → [G, ..]
            let mut perm: Vec<usize> = (1..a).collect();
            perm.push(0);
            perm.extend(a..dims.len());
            let t = g.permute(v, &perm)?;
            let mut merged: Vec<Dim> = vec![Dim::from(1)];
            merged.extend_from_slice(&dims[1..a]);
            merged.push(gs.clone() * dims[a].clone());
            merged.extend_from_slice(&dims[a + 1..]);
            let t = g.reshape(t, merged.clone())?;
            let mut full = merged;
            full[0] = gs;
            g.broadcast(t, full)
        }
        Within::Scatter(a) => {
            let a = a + 1;
            let c = dims[a].div_exact(&gs).ok_or_else(|| {
                IrError::Graph(format!(
                    "`reduce_scatter`: the group size `{gs}` does not divide axis size `{}`",
                    dims[a]
                ))
            })?;
            // sum over the group, then [B, .., G, c, ..] with that G moved to the front
            let s = g.sum(v, &[0], false)?;
            let mut split: Vec<Dim> = dims[1..a].to_vec();
            split.push(gs);
            split.push(c);
            split.extend_from_slice(&dims[a + 1..]);
            let t = g.reshape(s, split)?;
            let n = dims.len();
            let mut perm: Vec<usize> = vec![a - 1];
            perm.extend(0..a - 1);
            perm.extend(a..n);
            g.permute(t, &perm)
        }
    }
}

/// Typing rule of `all_to_all_dispatch` and `all_to_all_combine` (named `op`): `x [R, M, ...]` (rank ≥ 2) and
/// `counts: int [R, E]`, the groups valid (see [`group_size`]) and the group size dividing `E` (each member
/// holds `E/G` experts). Dispatch gives `[R, G·M, ...]` and `i64 [R, E/G]`; combine, from `[R, G·M, ...]`,
/// gives `[R, M, ...]`.
pub fn infer_exchange(
    op: &str,
    mesh: &[usize],
    over: usize,
    ins: &[&TensorType],
) -> std::result::Result<Vec<TensorType>, String> {
    let (x, c) = (ins[0], ins[1]);
    if x.rank() < 2 {
        return Err(format!(
            "`{op}` needs rows [R, M, ...] with a leading rank axis, got {x}"
        ));
    }
    if c.rank() != 2 || !c.dtype.is_int() {
        return Err(format!("`{op}` needs integer counts [R, E], got {c}"));
    }
    let ranks = x.dims()[0].clone();
    if c.dims()[0] != ranks {
        return Err(format!(
            "`{op}`: the counts {c} and the rows {x} have different rank axes"
        ));
    }
    let gs = group_size(op, mesh, over, &ranks, x)?;
    let e = &c.dims()[1];
    let per = e.div_exact(&gs).ok_or_else(|| {
        format!("`{op}`: {e} experts cannot be shared by a group of {gs} ranks (the group size must divide them)")
    })?;
    let mut dims = x.dims().to_vec();
    if op == "all_to_all_dispatch" {
        dims[1] = gs * dims[1].clone();
        return Ok(vec![
            TensorType::new(x.dtype, dims),
            TensorType::new(DType::I64, vec![ranks, per]),
        ]);
    }
    dims[1] = dims[1].div_exact(&gs).ok_or_else(|| {
        format!("`{op}`: the rows {x} are not a group of {gs} blocks (the group size must divide axis 1)")
    })?;
    Ok(vec![TensorType::new(x.dtype, dims)])
}

/// Where each received row of the routed exchange comes from, per group (`c: i64 [G, B, E]`, each member's
/// rows per expert, `m` rows per member): `(idx, valid, got)` with `idx: i64 [B, G, G·m]` the row of the
/// members' rows stacked as `[B, G, m]` (flattened) that lands at each received position, `valid: bool
/// [B, G, G·m, 1]` whether a row lands there (else it is padding), `got: i64 [G, B, E/G]` the rows each member
/// receives per expert it holds.
///
/// Member `r` receives the segments `(j, s)` (its expert `j`, from member `s`) in order, each
/// `c[s, r·E/G + j]` rows long, from row `off[s, r·E/G + j]` of `s` (`off` the exclusive cumsum of `c[s]`): a
/// received position `q` lies in the segment whose `[start, end)` holds it.
fn routes(g: &mut Graph, op: &str, c: Value, m: &Dim) -> Result<(Value, Value, Value)> {
    let cd = g.dims(c).to_vec();
    let (gs, b, e) = (cd[0].clone(), cd[1].clone(), cd[2].clone());
    let err = |m: String| IrError::Graph(format!("`{op}`: {m}"));
    let el = e
        .div_exact(&gs)
        .ok_or_else(|| err(format!("the group size `{gs}` does not divide the experts `{e}`")))?;
    let (Some(gn), Some(mn)) = (gs.as_const(), m.as_const()) else {
        return Err(err(format!(
            "needs a constant group size and row count, got `{gs}` and `{m}`"
        )));
    };
    let segs = el.clone() * gs.clone();
    let gm = gs.clone() * m.clone();
    let off = g.cumsum(c, 2, true, false)?; // [s, b, e]
                                            // [s, b, r, j] → [b, r, j, s]: the segments of each receiver in (j, s) order
    let by_receiver = |g: &mut Graph, v: Value| -> Result<Value> {
        let v = g.reshape(v, vec![gs.clone(), b.clone(), gs.clone(), el.clone()])?;
        g.permute(v, &[1, 2, 3, 0])
    };
    let len4 = by_receiver(g, c)?;
    let got = g.sum(len4, &[3], false)?; // [b, r, j]
    let got = g.permute(got, &[1, 0, 2])?;
    let len = g.reshape(len4, vec![b.clone(), gs.clone(), segs.clone()])?;
    let from = by_receiver(g, off)?;
    let from = g.reshape(from, vec![b.clone(), gs.clone(), Dim::from(1), segs.clone()])?;
    let end = g.cumsum(len, 2, false, false)?;
    let start = g.sub(end, len)?;
    let end = g.reshape(end, vec![b.clone(), gs.clone(), Dim::from(1), segs.clone()])?;
    let start = g.reshape(start, vec![b.clone(), gs.clone(), Dim::from(1), segs.clone()])?;
    let q = g.iota(DType::I64, vec![Dim::from(1), Dim::from(1), gm, Dim::from(1)], 2)?;
    let ge = g.compare(CmpOp::Ge, q, start)?;
    let lt = g.compare(CmpOp::Lt, q, end)?;
    let ge = g.cast(ge, DType::I64)?;
    let lt = g.cast(lt, DType::I64)?;
    let member = g.mul(ge, lt)?; // [b, r, q, seg]: 1 in the segment holding q
    let valid = g.sum(member, &[3], true)?;
    let zero = g.scalar(0.0, DType::I64)?;
    let valid = g.compare(CmpOp::Ne, valid, zero)?;
    let within = g.sub(q, start)?;
    let row = g.add(from, within)?;
    let row = g.mul(member, row)?;
    let row = g.sum(row, &[3], false)?; // [b, r, q]
                                        // the sender of segment (j, s) is s
    let sender = g.iota(DType::I64, vec![el, gs.clone()], 1)?;
    let sender = g.reshape(sender, vec![Dim::from(1), Dim::from(1), Dim::from(1), segs])?;
    let sender = g.mul(member, sender)?;
    let sender = g.sum(sender, &[3], false)?;
    let bi = g.iota(DType::I64, vec![b, Dim::from(1), Dim::from(1)], 0)?;
    let per_b = g.scalar((gn * mn) as f64, DType::I64)?;
    let per_s = g.scalar(mn as f64, DType::I64)?;
    let bo = g.mul(bi, per_b)?;
    let so = g.mul(sender, per_s)?;
    let idx = g.add(bo, so)?;
    let idx = g.add(idx, row)?;
    Ok((idx, valid, got))
}

/// `[G, B, M, X...]` → `[B·G·M, F]` (the rows of every member of every group, `F` the product of `X`).
fn stacked_rows(g: &mut Graph, v: Value) -> Result<Value> {
    let d = g.dims(v).to_vec();
    let f = d[3..].iter().fold(Dim::from(1), |a, x| a * x.clone());
    let v = g.reshape(v, vec![d[0].clone(), d[1].clone(), d[2].clone(), f.clone()])?;
    let v = g.permute(v, &[1, 0, 2, 3])?;
    g.reshape(v, vec![d[1].clone() * d[0].clone() * d[2].clone(), f])
}

/// `[B, G, Q, F]` → `[G, B, Q, X...]`.
fn unstacked(g: &mut Graph, v: Value, rest: &[Dim]) -> Result<Value> {
    let v = g.permute(v, &[1, 0, 2, 3])?;
    let d = g.dims(v).to_vec();
    let mut shape = d[..3].to_vec();
    shape.extend_from_slice(rest);
    g.reshape(v, shape)
}

/// Appends the decomposition of `all_to_all_dispatch(x, counts)` (see [`crate::Composite::AllToAllDispatch`]):
/// each received position gathers the row [`routes`] names, padding selects zero.
pub fn dispatch_exchange(
    g: &mut Graph,
    mesh: &[usize],
    over: usize,
    x: Value,
    counts: Value,
) -> Result<(Value, Value)> {
    let op = "all_to_all_dispatch";
    let xd = g.dims(x).to_vec();
    let ranks = xd[0].clone();
    let counts = g.cast(counts, DType::I64)?;
    let xg = to_groups(g, op, mesh, over, x)?;
    let cg = to_groups(g, op, mesh, over, counts)?;
    let (idx, valid, got) = routes(g, op, cg, &xd[1])?;
    let table = stacked_rows(g, xg)?;
    let rows = g.gather(table, idx, 0)?; // [B, G, G·M, F]
    let zero = g.scalar(0.0, g.dtype(x))?;
    let rows = g.select(valid, rows, zero)?;
    let y = unstacked(g, rows, &xd[2..])?;
    let y = from_groups(g, mesh, over, &ranks, y)?;
    let got = from_groups(g, mesh, over, &ranks, got)?;
    Ok((y, got))
}

/// Appends the decomposition of `all_to_all_combine(y, counts)` (see [`crate::Composite::AllToAllCombine`]):
/// the transpose of dispatch, each received row added back at the row it came from.
pub fn combine_exchange(g: &mut Graph, mesh: &[usize], over: usize, y: Value, counts: Value) -> Result<Value> {
    let op = "all_to_all_combine";
    let yd = g.dims(y).to_vec();
    let ranks = yd[0].clone();
    let counts = g.cast(counts, DType::I64)?;
    let yg = to_groups(g, op, mesh, over, y)?;
    let gs = g.dims(yg)[0].clone();
    let m = yd[1]
        .div_exact(&gs)
        .ok_or_else(|| IrError::Graph(format!("`{op}`: the group size `{gs}` does not divide `{}`", yd[1])))?;
    let cg = to_groups(g, op, mesh, over, counts)?;
    let (idx, valid, _) = routes(g, op, cg, &m)?;
    let b = g.dims(yg)[1].clone();
    // [G, B, G·M, X...] → [B, G, G·M, F], padding zeroed, then added at the rows it came from
    let rows = stacked_rows(g, yg)?;
    let f = g.dims(rows)[1].clone();
    let rows = g.reshape(rows, vec![b.clone(), gs.clone(), yd[1].clone(), f.clone()])?;
    let zero = g.scalar(0.0, g.dtype(y))?;
    let rows = g.select(valid, rows, zero)?;
    let n = b.clone() * gs.clone() * yd[1].clone();
    let rows = g.reshape(rows, vec![n.clone(), f.clone()])?;
    let idx = g.reshape(idx, vec![n])?;
    let zeros = g.full(0.0, g.dtype(y), vec![b.clone() * gs.clone() * m.clone(), f.clone()])?;
    let x = g.scatter_add(zeros, idx, rows, 0)?;
    let x = g.reshape(x, vec![b, gs, m, f])?;
    let x = unstacked(g, x, &yd[2..])?;
    from_groups(g, mesh, over, &ranks, x)
}
