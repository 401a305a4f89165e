//! The per-rank lowering (`docs/parallelism.md`, §1): the simulated graph of [`super::shard_graph`] → the
//! program rank `r` runs, every value without the rank axis.
//!
//! A value carries the rank axis when the sharding pass gave it one (a replicated value broadcast to every rank,
//! a per-rank constant: the nodes it names `rank_replicate`, `rank_constant`) or when an input of its node carries
//! it; rank 0's copy taken at an output (`rank_first`) carries none. On such values: an op with a batch axis of its
//! own (elementwise, `matmul`, the attention composites) is unchanged, dims and axes lose the leading one
//! (`reshape`, `broadcast`, `permute`, reductions, `slice`, `concat`, `softmax`, `topk`, `cumsum`), `per_rank[op]`
//! unwraps to `op`, a per-rank constant keeps rank `r`'s slice, `shard_slice` becomes the local slice of the
//! rank's chunk (no communication), and every other collective becomes `on_rank[op, rank=r]`, which a collective
//! transport runs. The simulated graph on the interpreter is the oracle: each rank's program on simulated ranks
//! gives that rank's slice of it.

use super::spmd::{RANK_CONSTANT, RANK_FIRST, RANK_FRONT, RANK_REPLICATE};
use super::Mesh;
use crate::PassError;
use fulgur_ir::{Composite, ConstData, Dim, Graph, NodeId, Op, Shape, Value};
use std::collections::HashMap;

/// Whether node `n` is one the sharding pass marked `mark`: the name and the op it writes under it (a
/// broadcast, a constant, a slice or reshape, a permute), so that a source node that happens to carry such a
/// name is not taken for one.
fn marked(n: &fulgur_ir::Node, mark: &str) -> bool {
    let named = n
        .name
        .as_deref()
        .is_some_and(|x| x == mark || x.ends_with(&format!(".{mark}")));
    let op = match mark {
        RANK_REPLICATE => matches!(n.op, Op::Broadcast { .. }),
        RANK_CONSTANT => matches!(n.op, Op::Constant { .. }),
        RANK_FIRST => matches!(n.op, Op::Slice { .. } | Op::Reshape { .. }),
        RANK_FRONT => matches!(n.op, Op::Permute { .. }),
        _ => false,
    };
    named && op && (mark == RANK_CONSTANT || n.inputs.len() == 1)
}

/// An axis attribute of an op on a value with the rank axis, in the rank's program: non-negative ones lose the
/// rank axis, negative ones (counted from the end) stay.
fn local_axis(a: i64) -> i64 {
    if a >= 0 {
        a - 1
    } else {
        a
    }
}

/// Rank `rank`'s program of the simulated graph `sim` sharded on `mesh`.
pub fn lower_rank(sim: &Graph, mesh: &Mesh, rank: usize) -> Result<Graph, PassError> {
    let ranks = mesh.ranks();
    if rank >= ranks {
        return Err(PassError::Options(format!(
            "rank {rank} of the mesh {mesh} of {ranks} ranks"
        )));
    }
    let coords = mesh.coords(rank);
    let mut out = Graph::new(format!("{}_rank{rank}", sim.name));
    let mut map: HashMap<Value, Value> = HashMap::new();
    let mut ranked: HashMap<Value, bool> = HashMap::new();
    for (id, n) in sim.nodes() {
        let err = |m: String| {
            PassError::Options(format!(
                "lowering `{}` ({}) to rank {rank}: {m}",
                n.name.clone().unwrap_or_else(|| format!("%{}", id.index())),
                n.op.name()
            ))
        };
        let ins: Vec<Value> = n.inputs.iter().map(|v| map[v]).collect();
        let any_ranked = n.inputs.iter().any(|v| ranked[v]);
        let (outs, is_ranked): (Vec<Value>, bool) = if marked(n, RANK_REPLICATE) {
            (vec![ins[0]], true)
        } else if marked(n, RANK_FIRST) || marked(n, RANK_FRONT) {
            (vec![ins[0]], !marked(n, RANK_FIRST))
        } else if marked(n, RANK_CONSTANT) {
            let Op::Constant { dtype, shape, data } = &n.op else {
                return Err(err("a per-rank constant that is not a constant".into()));
            };
            let per: usize = shape[1..].iter().product();
            let data = match data {
                ConstData::Float(v) => ConstData::Float(v[rank * per..(rank + 1) * per].to_vec()),
                ConstData::Int(v) => ConstData::Int(v[rank * per..(rank + 1) * per].to_vec()),
                ConstData::Bool(v) => ConstData::Bool(v[rank * per..(rank + 1) * per].to_vec()),
            };
            let op = Op::Constant {
                dtype: *dtype,
                shape: shape[1..].to_vec(),
                data,
            };
            (out.op(op, &[])?, true)
        } else if !any_ranked {
            (
                out.add_node(n.op.clone(), &ins, n.name.clone())
                    .map(|i| values(&out, i))?,
                false,
            )
        } else {
            match local_op(&n.op, rank, &coords, mesh, sim, n.inputs.first().copied()).map_err(err)? {
                Local::Same => (vec![ins[0]], true),
                Local::Op(op) => {
                    let node = out.add_node(op, &ins, n.name.clone()).map_err(|e| err(e.to_string()))?;
                    (values(&out, node), true)
                }
            }
        };
        for (i, v) in outs.into_iter().enumerate() {
            map.insert(Value::new(id, i as u32), v);
            ranked.insert(Value::new(id, i as u32), is_ranked);
        }
    }
    for (name, v) in sim.outputs() {
        out.add_output(name.clone(), map[v])?;
    }
    Ok(out)
}

fn values(g: &Graph, id: NodeId) -> Vec<Value> {
    (0..g.node(id).outputs.len() as u32)
        .map(|i| Value::new(id, i))
        .collect()
}

enum Local {
    Op(Op),
    /// The node's value is its first input's (a permute that only moves the rank axis).
    Same,
}

/// The rank's op for `op` on inputs with the rank axis.
fn local_op(
    op: &Op,
    rank: usize,
    coords: &[usize],
    mesh: &Mesh,
    sim: &Graph,
    first: Option<Value>,
) -> Result<Local, String> {
    let drop = |s: &Shape| -> Result<Shape, String> {
        match s.0.first() {
            Some(d) if *d == Dim::from(mesh.ranks()) => Ok(Shape(s.0[1..].to_vec())),
            _ => Err(format!("expected the rank axis ({}) first in {s:?}", mesh.ranks())),
        }
    };
    Ok(Local::Op(match op {
        Op::Reshape { shape } => Op::Reshape { shape: drop(shape)? },
        Op::Broadcast { shape } => Op::Broadcast { shape: drop(shape)? },
        Op::Permute { perm } => {
            if perm.first() != Some(&0) {
                return Err(format!("a permute moving the rank axis: {perm:?}"));
            }
            let p: Vec<usize> = perm[1..].iter().map(|&x| x - 1).collect();
            if p.iter().enumerate().all(|(i, &x)| i == x) {
                return Ok(Local::Same);
            }
            Op::Permute { perm: p }
        }
        Op::Reduce { op, axes, keepdims } => Op::Reduce {
            op: *op,
            axes: axes.iter().map(|&a| local_axis(a)).collect(),
            keepdims: *keepdims,
        },
        Op::Slice { axis, start, end } => Op::Slice {
            axis: local_axis(*axis),
            start: start.clone(),
            end: end.clone(),
        },
        Op::Concat { axis } => Op::Concat {
            axis: local_axis(*axis),
        },
        Op::TopK { k, axis } => Op::TopK {
            k: *k,
            axis: local_axis(*axis),
        },
        Op::CumSum {
            axis,
            exclusive,
            reverse,
        } => Op::CumSum {
            axis: local_axis(*axis),
            exclusive: *exclusive,
            reverse: *reverse,
        },
        Op::Gather { axis } => Op::Gather { axis: *axis },
        Op::Composite(Composite::Softmax { axis }) => Op::Composite(Composite::Softmax {
            axis: local_axis(*axis),
        }),
        Op::Composite(Composite::LogSoftmax { axis }) => Op::Composite(Composite::LogSoftmax {
            axis: local_axis(*axis),
        }),
        Op::Composite(Composite::PerRank { op }) => (**op).clone(),
        Op::Composite(Composite::ShardSlice { axis, mesh: m, over }) => {
            // the rank's own chunk: a local slice
            let x = first.ok_or("a shard_slice without input")?;
            let dims = sim.dims(x);
            let a = fulgur_ir::infer::norm_axis(*axis, dims.len()).map_err(|e| e.to_string())?;
            let g = m.get(*over).copied().ok_or("a shard_slice without its mesh")?;
            if m.as_slice() != mesh.sizes().as_slice() {
                return Err(format!("a shard_slice on the mesh {m:?}, not the plan's {mesh}"));
            }
            let c = dims[a]
                .div_exact(&Dim::from(g))
                .ok_or_else(|| format!("dim {a} not divisible by {g}"))?;
            let i = Dim::from(coords[*over]);
            Op::Slice {
                axis: a as i64 - 1,
                start: c.clone() * i.clone(),
                end: c * (i + Dim::from(1)),
            }
        }
        Op::Composite(
            c @ (Composite::AllReduce { .. }
            | Composite::AllGather { .. }
            | Composite::ReduceScatter { .. }
            | Composite::AllToAll { .. }
            | Composite::AllToAllDispatch { .. }
            | Composite::AllToAllCombine { .. }
            | Composite::SendRecv { .. }),
        ) => Op::Composite(Composite::OnRank {
            op: Box::new(Op::Composite(c.clone())),
            rank,
        }),
        Op::Composite(Composite::OnRank { .. } | Composite::AllToAllStart { .. } | Composite::CollectiveWait) => {
            return Err("not produced by the sharding pass".into())
        }
        Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Full { .. } | Op::Iota { .. } => {
            return Err("a leaf with the rank axis".into())
        }
        Op::OneHot { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::Select
        | Op::Cast { .. }
        | Op::MatMul
        | Op::ScatterAdd { .. }
        | Op::Composite(_) => op.clone(),
    }))
}
