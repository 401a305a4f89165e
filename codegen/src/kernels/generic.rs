//! The generic kernel compiler: any op, as the primitive graph it means, to loop IR.
//!
//! The kernel's op is written as a small graph over its inputs (`fused`: its body; a composite: its
//! decomposition; a primitive: itself), every composite expanded to primitives. Then:
//! - **elementwise values** (unary, binary, compare, select, cast, constants, `full`, `iota`, and the layout
//!   ops `reshape`, `broadcast`, `slice`, `permute`, `concat`, `gather`, `one_hot`) are never stored: a
//!   consumer computes the element it needs where it needs it, through the index mappings of the views;
//! - **materialised values** (`reduce_*`, `cumsum`, `topk`, `scatter_add`, `matmul`) are computed by a step
//!   of their own into a scratch buffer (or straight into the kernel's output when they are one), their
//!   elementwise prologue read in place, and read back by their consumers;
//! - each output that is not materialised is written by one parallel elementwise phase.
//!
//! A `matmul` becomes a [`GemmStep`] over its operands as strided views when they are views of memory
//! (transposes and broadcasts are strides), else the operand is written to scratch first.

use super::{delinearize, Built, Target, View};
use crate::loops::{Acc, GemmStep, LoopKernel, Operand, Phase, Scalar, Slot, Step, Stmt, Table, E};
use crate::program::{row_major, Kernel};
use crate::CodegenError;
use fulgur_ir::infer::norm_axis;
use fulgur_ir::tensor::round_to;
use fulgur_ir::{BinaryOp, CmpOp, ConstData, DType, Dim, Graph, Op, ReduceOp, Value};
use std::collections::HashMap;

/// Elements of the last axis one item of an elementwise phase writes at most.
const TILE: i64 = 4096;

/// For a constant last axis longer than [`TILE`], the largest tile of at least `TILE / 4` elements that
/// divides it (8192 → 4096, 32000 → 4000); `None` for a short, symbolic or awkward (prime) one.
fn exact_tile(last: &Dim) -> Option<i64> {
    let n = last.as_const()?;
    if n <= TILE {
        return None;
    }
    (TILE / 4..=TILE).rev().find(|t| n % t == 0)
}

/// Appends `op(ins)` to `g` with every composite expanded into primitives.
pub(crate) fn expand(g: &mut Graph, op: &Op, ins: &[Value]) -> Result<Vec<Value>, CodegenError> {
    match op {
        Op::Composite(c) => {
            let mut sub = Graph::new("sub");
            let mut sins = Vec::with_capacity(ins.len());
            for (i, &v) in ins.iter().enumerate() {
                sins.push(sub.input(&format!("a{i}"), g.dtype(v), g.dims(v).to_vec())?);
            }
            let outs = c.decompose(&mut sub, &sins)?;
            let mut map: HashMap<Value, Value> = HashMap::new();
            for (s, &v) in sins.iter().zip(ins) {
                map.insert(*s, v);
            }
            for (id, n) in sub.nodes() {
                if n.op.is_input() {
                    continue;
                }
                let nins: Vec<Value> = n.inputs.iter().map(|v| map[v]).collect();
                let res = expand(g, &n.op, &nins)?;
                for (k, v) in res.into_iter().enumerate() {
                    map.insert(Value::new(id, k as u32), v);
                }
            }
            Ok(outs.iter().map(|v| map[v]).collect())
        }
        op => Ok(g.op(op.clone(), ins)?),
    }
}

/// A CUDA scatter with fewer items than this (the product of the dims but the scattered axis) cuts that axis
/// into ranges, a thread per (item, range) (see `Gen::scatter_add`).
const SCATTER_MIN_ITEMS: i64 = 1 << 17;
/// The shortest range of the scattered axis one thread of a cut scatter covers.
const SCATTER_MIN_RANGE: i64 = 64;

/// The items of a scatter along axis `a` of `dims` (the product of the others), when constant.
fn scatter_items(dims: &[Dim], a: usize) -> Option<i64> {
    dims.iter()
        .enumerate()
        .filter(|(k, _)| *k != a)
        .try_fold(1i64, |acc, (_, d)| d.as_const().map(|c| acc * c))
}

/// Whether a node is computed by a step of its own.
fn materialised(op: &Op) -> bool {
    matches!(
        op,
        Op::Reduce { .. } | Op::CumSum { .. } | Op::TopK { .. } | Op::ScatterAdd { .. } | Op::MatMul
    )
}

pub(crate) struct Gen<'a> {
    pub lk: LoopKernel,
    g: &'a Graph,
    homes: HashMap<Value, View>,
    memo: HashMap<(Value, Vec<E>), E>,
    /// The kernel's name, for error messages of checks.
    kname: String,
    /// The backend the loop form is shaped for.
    target: Target,
}

/// Compiles kernel `k` through its primitive graph.
pub(crate) fn build(k: &Kernel, built: &mut Built) -> Result<(), CodegenError> {
    let mut g = Graph::new("kernel");
    let mut ins = Vec::with_capacity(k.inputs.len());
    for (i, t) in k.inputs.iter().enumerate() {
        ins.push(g.input(&format!("arg{i}"), t.dtype, t.shape.clone())?);
    }
    let outs = expand(&mut g, &k.op, &ins)?;
    if outs.len() != k.outputs.len() {
        return Err(CodegenError::Options(format!(
            "kernel k{} ({}): its op has {} outputs, the kernel {}",
            k.id,
            k.name,
            outs.len(),
            k.outputs.len()
        )));
    }
    let lk = std::mem::take(&mut built.lk);
    let mut gen = Gen {
        lk,
        g: &g,
        homes: HashMap::new(),
        memo: HashMap::new(),
        kname: format!("k{} ({})", k.id, k.name),
        target: built.target,
    };
    for (i, (&v, t)) in ins.iter().zip(&k.inputs).enumerate() {
        let slot = gen.lk.slot(Slot::Input(i));
        gen.homes.insert(v, View::of(slot, t));
    }
    // where each output lives: a materialised value is computed straight into it
    let mut out_home: HashMap<Value, usize> = HashMap::new();
    for (j, &v) in outs.iter().enumerate() {
        if !gen.homes.contains_key(&v) {
            out_home.entry(v).or_insert(j);
        }
    }
    for (id, n) in g.nodes() {
        if !materialised(&n.op) {
            continue;
        }
        let mut homes = Vec::new();
        for (i, ty) in n.outputs.iter().enumerate() {
            let v = Value::new(id, i as u32);
            let home = match out_home.get(&v) {
                Some(&j) => {
                    let slot = gen.lk.slot(Slot::Output(j));
                    View::of(slot, &k.outputs[j])
                }
                None => {
                    let slot = gen.lk.scratch(ty.dtype, ty.shape.numel());
                    View::contiguous(slot, ty.dtype, ty.dims())
                }
            };
            homes.push(home);
        }
        let ins: Vec<Value> = n.inputs.clone();
        let label = n.name.clone().unwrap_or_else(|| n.op.name().to_string());
        match &n.op {
            Op::Reduce { op, axes, keepdims } => gen.reduce(&label, ins[0], *op, axes, *keepdims, &homes[0])?,
            Op::CumSum {
                axis,
                exclusive,
                reverse,
            } => gen.cumsum(&label, ins[0], *axis, *exclusive, *reverse, &homes[0])?,
            Op::TopK { k, axis } => gen.topk(&label, ins[0], *k, *axis, &homes[0], &homes[1])?,
            Op::ScatterAdd { axis } => gen.scatter_add(&label, ins[0], ins[1], ins[2], *axis, &homes[0])?,
            Op::MatMul => gen.matmul(&label, ins[0], ins[1], &homes[0])?,
            _ => unreachable!("materialised ops are matched above"),
        }
        for (i, h) in homes.into_iter().enumerate() {
            gen.homes.insert(Value::new(id, i as u32), h);
        }
    }
    let dsts: Vec<View> = (0..outs.len())
        .map(|j| View::of(gen.lk.slot(Slot::Output(j)), &k.outputs[j]))
        .collect();
    let pending: Vec<usize> = (0..outs.len())
        .filter(|&j| gen.homes.get(&outs[j]).map(|h| h.slot) != Some(dsts[j].slot))
        .collect();
    // several outputs of one shape (sibling kernels merged, `program::merge_siblings`): one loop writes them
    // all, so what they read in common is read once
    let together = pending.len() > 1
        && pending
            .iter()
            .all(|&j| k.outputs[j].shape == k.outputs[pending[0]].shape && k.outputs[j].is_contiguous());
    if together {
        let views: Vec<View> = pending.iter().map(|&j| dsts[j].clone()).collect();
        let vals: Vec<Value> = pending.iter().map(|&j| outs[j]).collect();
        gen.write_many("out", &views, |gen, idx| vals.iter().map(|&v| gen.at(v, idx)).collect())?;
    } else {
        for j in pending {
            let v = outs[j];
            gen.write(&format!("out{j}"), &dsts[j], |gen, idx| gen.at(v, idx))?;
        }
    }
    built.lk = gen.lk;
    Ok(())
}

/// Reductions with at most this many outputs are split when their range is long: one thread per output would
/// walk it alone (a weight's sum of squares for the global gradient norm: 10⁸ elements in one GPU thread). Not
/// more on the CPU: a split chunk finds its elements' coordinates by division, which costs the CPU more than
/// it gains where there are outputs enough to share out (a norm weight's gradient, 2048 outputs over 8192 rows
/// each, stays one item per output: 3× slower split on the 2-core CPU for tiny-hf's training step).
const SPLIT_MAX_OUTPUTS: i64 = 64;
/// The shortest range (elements per output) split; a symbolic range is split.
const SPLIT_MIN_RANGE: i64 = 1 << 15;
/// Elements (or partials) one item of a split reduction combines.
const SPLIT_FAN_IN: i64 = 512;
/// For CUDA, a *column* reduction (the last axis kept, so that neighbouring outputs are neighbours in memory)
/// with at most this many outputs is split too: 2048 threads, one per column of a norm weight's gradient
/// summing 8192 rows, fill 16 of the H200's 132 multiprocessors (1 ms a reduction in bench-m's step). Its
/// first level has about [`SPLIT_COLUMN_ITEMS`] items (neighbouring items on neighbouring columns of one chunk
/// of rows: coalesced), over a range of at least [`SPLIT_COLUMN_MIN_RANGE`]. A row reduction keeps its item,
/// which the CUDA emitter gives a warp (coalesced along the row).
const SPLIT_COLUMN_MAX_OUTPUTS: i64 = 1 << 15;
const SPLIT_COLUMN_ITEMS: i64 = 1 << 16;
const SPLIT_COLUMN_MIN_RANGE: i64 = 1 << 12;

/// How a reduction of `x`'s axes `red` runs in levels, when it should (few outputs, each over a long range; on
/// CUDA also a column reduction of fewer outputs than fill the device): the number of chunks per output at
/// each level, the first over the range (chunks of `SPLIT_FAN_IN` elements, or 1024 chunks of a symbolic
/// range; a CUDA column reduction's chunks give about `SPLIT_COLUMN_ITEMS` items), each next over the last
/// level's partials (`SPLIT_FAN_IN` of them per chunk), until one level has at most `SPLIT_FAN_IN` chunks; a
/// final phase combines those.
fn split_reduction(xd: &[Dim], red: &[bool], target: Target) -> Option<Vec<i64>> {
    let prod = |reduced: bool| {
        xd.iter()
            .zip(red)
            .filter(|(_, r)| **r == reduced)
            .fold(Dim::from(1), |a, (d, _)| a * d.clone())
    };
    let outputs = prod(false).as_const()?;
    let range = prod(true).as_const();
    let column = target == Target::Cuda && red.last() == Some(&false) && red.iter().any(|&r| r);
    let few = outputs <= SPLIT_MAX_OUTPUTS && range.is_none_or(|r| r >= SPLIT_MIN_RANGE);
    let first = if few {
        match range {
            Some(range) => (range + SPLIT_FAN_IN - 1) / SPLIT_FAN_IN,
            None => 1024,
        }
    } else if column && outputs <= SPLIT_COLUMN_MAX_OUTPUTS {
        let chunks = (SPLIT_COLUMN_ITEMS / outputs).clamp(2, 1024);
        match range {
            Some(range) if range < SPLIT_COLUMN_MIN_RANGE => return None,
            Some(range) => chunks.min(range / (SPLIT_COLUMN_MIN_RANGE / 16)),
            None => chunks,
        }
    } else {
        return None;
    };
    let mut levels = vec![first];
    while let Some(&last) = levels.last().filter(|&&c| c > SPLIT_FAN_IN) {
        levels.push((last + SPLIT_FAN_IN - 1) / SPLIT_FAN_IN);
    }
    Some(levels)
}

/// The starting value of a reduction `op` over values of `xt` (its compute type's identity for the op).
fn reduce_init(p: &mut crate::loops::Pool, op: ReduceOp, xt: DType) -> E {
    match (Scalar::of(xt), op) {
        (Scalar::F32, ReduceOp::Max) => p.f(f32::NEG_INFINITY),
        (Scalar::F32, ReduceOp::Min) => p.f(f32::INFINITY),
        (Scalar::F32, _) => p.f(0.0),
        (_, ReduceOp::Max) => p.i(if xt == DType::I32 { i32::MIN as i64 } else { i64::MIN }),
        (_, ReduceOp::Min) => p.i(if xt == DType::I32 { i32::MAX as i64 } else { i64::MAX }),
        _ => p.i(0),
    }
}

/// How a reduction `op` accumulates (a mean sums; the division comes after).
fn reduce_acc(op: ReduceOp) -> Acc {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => Acc::Add,
        ReduceOp::Max => Acc::Max,
        ReduceOp::Min => Acc::Min,
    }
}

impl<'a> Gen<'a> {
    /// An item index split into coordinates of `dims`.
    fn coords(&mut self, item: E, dims: &[Dim]) -> Vec<E> {
        let ds = self.lk.dims(dims);
        delinearize(&mut self.lk.pool, item, &ds)
    }

    /// The element of `v` at `idx`, as an expression of its compute type.
    pub(crate) fn at(&mut self, v: Value, idx: &[E]) -> Result<E, CodegenError> {
        if let Some(home) = self.homes.get(&v) {
            let home = home.clone();
            return Ok(home.load(&mut self.lk, idx));
        }
        let key = (v, idx.to_vec());
        if let Some(&e) = self.memo.get(&key) {
            return Ok(e);
        }
        let e = self.compute(v, idx)?;
        self.memo.insert(key, e);
        Ok(e)
    }

    /// Index of an operand of shape `dims` broadcast to the output index `idx` (right-aligned).
    fn bcast(&mut self, idx: &[E], dims: &[Dim]) -> Vec<E> {
        let off = idx.len() - dims.len();
        dims.iter()
            .enumerate()
            .map(|(i, d)| if d.is_one() { self.lk.pool.i(0) } else { idx[off + i] })
            .collect()
    }

    fn compute(&mut self, v: Value, idx: &[E]) -> Result<E, CodegenError> {
        let g = self.g;
        let n = g.node(v.node);
        let ty = &n.outputs[v.index as usize];
        let ins = &n.inputs;
        let p = &mut self.lk.pool;
        Ok(match &n.op {
            Op::Input { name, .. } | Op::Param { name, .. } => {
                return Err(CodegenError::Options(format!(
                    "kernel {}: input `{name}` has no buffer",
                    self.kname
                )))
            }
            Op::Constant { dtype, shape, data } => {
                let numel: usize = shape.iter().product();
                if numel == 1 {
                    match data {
                        ConstData::Float(x) => p.f(round_to(*dtype, x[0]) as f32),
                        ConstData::Int(x) => p.i(x[0]),
                        ConstData::Bool(x) => p.b(x[0]),
                    }
                } else {
                    let strides: Vec<i64> = row_major_usize(shape);
                    let st: Vec<E> = strides.iter().map(|&s| p.i(s)).collect();
                    let zero = p.i(0);
                    let at = p.linear(idx, &st, zero);
                    match data {
                        ConstData::Float(x) => self
                            .lk
                            .table(Table::F32(x.iter().map(|&f| round_to(*dtype, f) as f32).collect()), at),
                        ConstData::Int(x) => self.lk.table(Table::I64(x.clone()), at),
                        ConstData::Bool(x) => {
                            let t = self.lk.table(Table::I64(x.iter().map(|&b| i64::from(b)).collect()), at);
                            let z = self.lk.pool.i(0);
                            self.lk.pool.cmp(CmpOp::Ne, t, z)
                        }
                    }
                }
            }
            Op::Full { value, dtype, .. } => scalar_literal(p, *dtype, *value),
            Op::Iota { dtype, axis, .. } => {
                let a = norm_axis(*axis, idx.len()).map_err(CodegenError::Options)?;
                cast_to(p, *dtype, idx[a])
            }
            Op::Unary(u) => {
                let i = self.bcast_same(idx, ins[0]);
                let x = self.at(ins[0], &i)?;
                self.lk.pool.un(*u, x)
            }
            Op::Binary(b) => {
                let ia = self.bcast(idx, g.dims(ins[0]));
                let ib = self.bcast(idx, g.dims(ins[1]));
                let x = self.at(ins[0], &ia)?;
                let y = self.at(ins[1], &ib)?;
                self.binary(*b, x, y)?
            }
            Op::Compare(c) => {
                let ia = self.bcast(idx, g.dims(ins[0]));
                let ib = self.bcast(idx, g.dims(ins[1]));
                let x = self.at(ins[0], &ia)?;
                let y = self.at(ins[1], &ib)?;
                self.lk.pool.cmp(*c, x, y)
            }
            Op::Select => {
                let ic = self.bcast(idx, g.dims(ins[0]));
                let ia = self.bcast(idx, g.dims(ins[1]));
                let ib = self.bcast(idx, g.dims(ins[2]));
                let c = self.at(ins[0], &ic)?;
                let x = self.at(ins[1], &ia)?;
                let y = self.at(ins[2], &ib)?;
                self.lk.pool.select(c, x, y)
            }
            Op::Cast { dtype } => {
                let x = self.at(ins[0], idx)?;
                cast_value(&mut self.lk.pool, g.dtype(ins[0]), *dtype, x)
            }
            Op::Reshape { .. } => {
                let from = g.dims(ins[0]).to_vec();
                let i = self.reshape_index(idx, ty.dims(), &from);
                self.at(ins[0], &i)?
            }
            Op::Broadcast { .. } => {
                let i = self.bcast(idx, g.dims(ins[0]));
                self.at(ins[0], &i)?
            }
            Op::Slice { axis, start, .. } => {
                let a = norm_axis(*axis, idx.len()).map_err(CodegenError::Options)?;
                let s = self.lk.dim(start);
                let mut i = idx.to_vec();
                i[a] = self.lk.pool.addi(idx[a], s);
                self.at(ins[0], &i)?
            }
            Op::Permute { perm } => {
                let mut i = vec![0; idx.len()];
                for (j, &pj) in perm.iter().enumerate() {
                    i[pj] = idx[j];
                }
                self.at(ins[0], &i)?
            }
            Op::Concat { axis } => {
                let a = norm_axis(*axis, idx.len()).map_err(CodegenError::Options)?;
                let mut offs = Vec::with_capacity(ins.len());
                let mut acc = Dim::from(0);
                for &x in ins {
                    offs.push(acc.clone());
                    acc = acc + g.dims(x)[a].clone();
                }
                let mut result = None;
                for (j, &x) in ins.iter().enumerate().rev() {
                    let off = self.lk.dim(&offs[j]);
                    let mut i = idx.to_vec();
                    i[a] = self.lk.pool.sub(idx[a], off);
                    let val = self.at(x, &i)?;
                    result = Some(match result {
                        None => val,
                        Some(later) => {
                            let end = self.lk.dim(&offs[j + 1]);
                            let c = self.lk.pool.cmp(CmpOp::Lt, idx[a], end);
                            self.lk.pool.cond(c, val, later)
                        }
                    });
                }
                result
                    .ok_or_else(|| CodegenError::Options(format!("kernel {}: `concat` without inputs", self.kname)))?
            }
            Op::Gather { axis } => {
                let xd = g.dims(ins[0]).to_vec();
                let ri = g.rank(ins[1]);
                let a = norm_axis(*axis, xd.len()).map_err(CodegenError::Options)?;
                let raw = self.at(ins[1], &idx[a..a + ri])?;
                let raw = self.lk.pool.cast(Scalar::I64, raw);
                let bound = self.lk.dim(&xd[a]);
                let what = format!("an index of `gather` is out of range [0, {}) for axis {a}", xd[a]);
                let j = self.lk.checked(raw, bound, what);
                let mut i: Vec<E> = idx[..a].to_vec();
                i.push(j);
                i.extend_from_slice(&idx[a + ri..]);
                self.at(ins[0], &i)?
            }
            Op::OneHot { depth: _, dtype } => {
                let r = idx.len();
                let raw = self.at(ins[0], &idx[..r - 1])?;
                let raw = self.lk.pool.cast(Scalar::I64, raw);
                let hot = self.lk.pool.cmp(CmpOp::Eq, raw, idx[r - 1]);
                let p = &mut self.lk.pool;
                match Scalar::of(*dtype) {
                    Scalar::F32 => {
                        let (one, zero) = (p.f(1.0), p.f(0.0));
                        p.select(hot, one, zero)
                    }
                    Scalar::I64 => {
                        let (one, zero) = (p.i(1), p.i(0));
                        p.select(hot, one, zero)
                    }
                    Scalar::Bool => hot,
                }
            }
            op if materialised(op) => {
                return Err(CodegenError::Options(format!(
                    "kernel {}: `{}` read before it is computed",
                    self.kname,
                    op.name()
                )))
            }
            op => {
                return Err(CodegenError::Options(format!(
                    "kernel {}: `{}` has no loop form",
                    self.kname,
                    op.name()
                )));
            }
        })
    }

    fn bcast_same(&mut self, idx: &[E], v: Value) -> Vec<E> {
        let d = self.g.dims(v).to_vec();
        self.bcast(idx, &d)
    }

    fn binary(&mut self, b: BinaryOp, x: E, y: E) -> Result<E, CodegenError> {
        let p = &mut self.lk.pool;
        if p.ty(x) != Scalar::I64 {
            return Ok(p.bin(b, x, y));
        }
        match b {
            BinaryOp::Div => {
                // integer division by zero is an error; i64::MIN / -1 wraps
                let zero = p.i(0);
                let is0 = p.cmp(CmpOp::Eq, y, zero);
                let m1 = p.i(-1);
                let bad = p.select(is0, m1, zero);
                let one = p.i(1);
                let what = "integer division by zero".to_string();
                let chk = self.lk.checked(bad, one, what);
                let p = &mut self.lk.pool;
                let neg1 = p.cmp(CmpOp::Eq, y, m1);
                let safe0 = p.select(is0, one, y);
                let safe = p.select(neg1, one, safe0);
                let safe = p.addi(safe, chk);
                let q = p.div(x, safe);
                let negx = p.sub(zero, x);
                Ok(p.select(neg1, negx, q))
            }
            BinaryOp::Pow => Err(CodegenError::Options(format!(
                "kernel {}: integer `pow` has no loop form on this target",
                self.kname
            ))),
            _ => Ok(p.bin(b, x, y)),
        }
    }

    /// The source index of a reshape from `from` to `to` for the output index `idx`: the axes are matched
    /// in groups whose sizes agree (so the common reshapes, splitting or merging axes, need a division only
    /// within a group), falling back to the linear index.
    fn reshape_index(&mut self, idx: &[E], to: &[Dim], from: &[Dim]) -> Vec<E> {
        let zero = self.lk.pool.i(0);
        let mut out = vec![zero; from.len()];
        match reshape_groups(from, to) {
            Some(groups) => {
                for (fa, ta) in groups {
                    // linear index within the group, over the output axes
                    let mut lin = zero;
                    for &t in &ta {
                        let d = self.lk.dim(&to[t]);
                        let m = self.lk.pool.mul(lin, d);
                        lin = self.lk.pool.addi(m, idx[t]);
                    }
                    let fd: Vec<Dim> = fa.iter().map(|&f| from[f].clone()).collect();
                    let c = self.coords(lin, &fd);
                    for (k, &f) in fa.iter().enumerate() {
                        out[f] = c[k];
                    }
                }
            }
            None => {
                let mut lin = zero;
                for (t, d) in to.iter().enumerate() {
                    let d = self.lk.dim(d);
                    let m = self.lk.pool.mul(lin, d);
                    lin = self.lk.pool.addi(m, idx[t]);
                }
                out = self.coords(lin, from);
            }
        }
        out
    }

    /// A phase writing every element of `dst` with `f(index)`: one item per row of the last axis (rows longer
    /// than [`TILE`] split into tiles), the last axis an inner loop.
    pub(crate) fn write(
        &mut self,
        name: &str,
        dst: &View,
        mut f: impl FnMut(&mut Gen<'a>, &[E]) -> Result<E, CodegenError>,
    ) -> Result<(), CodegenError> {
        self.write_many(name, std::slice::from_ref(dst), |gen, idx| Ok(vec![f(gen, idx)?]))
    }

    /// [`Self::write`] of several destinations of one shape by one phase: `f(index)` gives each one's value at
    /// the index, stored together (their values computed before any is stored).
    pub(crate) fn write_many(
        &mut self,
        name: &str,
        dsts: &[View],
        mut f: impl FnMut(&mut Gen<'a>, &[E]) -> Result<Vec<E>, CodegenError>,
    ) -> Result<(), CodegenError> {
        let dst = &dsts[0];
        let stores = |gen: &mut Gen<'a>, idx: &[E], vals: Vec<E>| -> Vec<Stmt> {
            dsts.iter()
                .zip(vals)
                .map(|(d, value)| Stmt::Store {
                    arg: d.slot,
                    dtype: d.dtype,
                    index: d.index(&mut gen.lk, idx),
                    value,
                })
                .collect()
        };
        let (item_var, item) = self.lk.loop_var();
        let r = dst.shape.len();
        if r == 0 {
            let vals = f(self, &[])?;
            let body = stores(self, &[], vals);
            let one = self.lk.pool.i(1);
            self.lk.steps.push(Step::Phase(Phase {
                name: name.into(),
                grid: one,
                item: item_var,
                body,
                item_cost: one,
            }));
            return Ok(());
        }
        let last = self.lk.dim(&dst.shape[r - 1]);
        let (item_row, lo, hi, j, jv, ntiles, cost);
        if let Some(tile) = exact_tile(&dst.shape[r - 1]) {
            // a constant row longer than a tile, split into tiles that divide it: the loop runs 0..tile, which a
            // GPU launch can give a thread per iteration (`cuda.rs`, `flat_loop`)
            let p = &mut self.lk.pool;
            let te = p.i(tile);
            let n = p.i(dst.shape[r - 1].as_const().unwrap_or(tile) / tile);
            let row = p.div(item, n);
            let t = p.rem(item, n);
            let base = p.mul(t, te);
            let (kv, k) = self.lk.loop_var();
            let p = &mut self.lk.pool;
            item_row = row;
            lo = p.i(0);
            hi = te;
            j = p.addi(base, k);
            jv = kv;
            ntiles = n;
            cost = te;
        } else {
            let tile = self.lk.pool.i(TILE);
            let p = &mut self.lk.pool;
            let tm1 = p.i(TILE - 1);
            let lt = p.addi(last, tm1);
            let n = p.div(lt, tile);
            let row = p.div(item, n);
            let t = p.rem(item, n);
            let l = p.mul(t, tile);
            let hi0 = p.addi(l, tile);
            let h = p.min(hi0, last);
            let c = p.min(last, tile);
            let (v, e) = self.lk.loop_var();
            item_row = row;
            lo = l;
            hi = h;
            j = e;
            jv = v;
            ntiles = n;
            cost = c;
        }
        let mut idx = self.coords(item_row, &dst.shape[..r - 1]);
        idx.push(j);
        let vals = f(self, &idx)?;
        let body = stores(self, &idx, vals);
        let rows = dst.shape[..r - 1].iter().fold(Dim::from(1), |a, d| a * d.clone());
        let rows = self.lk.dim(&rows);
        let grid = self.lk.pool.mul(rows, ntiles);
        self.lk.steps.push(Step::Phase(Phase {
            name: name.into(),
            grid,
            item: item_var,
            body: vec![Stmt::For { var: jv, lo, hi, body }],
            item_cost: cost,
        }));
        Ok(())
    }

    fn reduce(
        &mut self,
        name: &str,
        x: Value,
        op: ReduceOp,
        axes: &[i64],
        keepdims: bool,
        home: &View,
    ) -> Result<(), CodegenError> {
        let xd = self.g.dims(x).to_vec();
        let xt = self.g.dtype(x);
        let n = xd.len();
        let mut red = vec![false; n];
        for &a in axes {
            red[norm_axis(a, n).map_err(CodegenError::Options)?] = true;
        }
        let kept: Vec<usize> = (0..n).filter(|&a| !red[a]).collect();
        let kept_dims: Vec<Dim> = kept.iter().map(|&a| xd[a].clone()).collect();
        if let Some(levels) = split_reduction(&xd, &red, self.target) {
            return self.reduce_split(name, x, op, &red, keepdims, home, levels);
        }
        let (item_var, item) = self.lk.loop_var();
        let kc = self.coords(item, &kept_dims);
        let s = Scalar::of(xt);
        let (acc_var, acc) = self.lk.mutable(s);
        let p = &mut self.lk.pool;
        let init = reduce_init(p, op, xt);
        let zero = p.i(0);
        // the full index: kept axes from the item, reduced axes from loops
        let mut idx = vec![zero; n];
        for (k, &a) in kept.iter().enumerate() {
            idx[a] = kc[k];
        }
        let mut loops = Vec::new();
        for a in (0..n).filter(|&a| red[a]) {
            let (v, e) = self.lk.loop_var();
            idx[a] = e;
            let hi = self.lk.dim(&xd[a]);
            loops.push((v, hi));
        }
        let val = self.at(x, &idx)?;
        let mut body = vec![Stmt::Accumulate {
            var: acc_var,
            op: reduce_acc(op),
            value: val,
        }];
        for (v, hi) in loops.into_iter().rev() {
            body = vec![Stmt::For {
                var: v,
                lo: zero,
                hi,
                body,
            }];
        }
        let count = xd
            .iter()
            .enumerate()
            .filter(|(a, _)| red[*a])
            .fold(Dim::from(1), |c, (_, d)| c * d.clone());
        let count_e = self.lk.dim(&count);
        let result = if op == ReduceOp::Mean {
            let p = &mut self.lk.pool;
            let c = p.cast(Scalar::F32, count_e);
            p.bin(BinaryOp::Div, acc, c)
        } else {
            acc
        };
        let out_idx: Vec<E> = if keepdims {
            idx.iter()
                .enumerate()
                .map(|(a, &e)| if red[a] { zero } else { e })
                .collect()
        } else {
            kc.clone()
        };
        let index = home.index(&mut self.lk, &out_idx);
        let mut stmts = vec![Stmt::Set {
            var: acc_var,
            value: init,
        }];
        stmts.extend(body);
        stmts.push(Stmt::Store {
            arg: home.slot,
            dtype: home.dtype,
            index,
            value: result,
        });
        let grid = kept_dims.iter().fold(Dim::from(1), |a, d| a * d.clone());
        let grid = self.lk.dim(&grid);
        self.lk.steps.push(Step::Phase(Phase {
            name: name.into(),
            grid,
            item: item_var,
            body: stmts,
            item_cost: count_e,
        }));
        Ok(())
    }

    /// A reduction in levels (see [`split_reduction`]): item `c · outputs + k` of the first phase reduces chunk
    /// `c` of output `k`'s range (the reduced axes linearized, row-major; on the CPU consecutive elements, on
    /// CUDA the elements `c + j · chunks`) into a partial, each next phase reduces chunks of the last one's
    /// partials, and the final phase combines each output's partials in order. Deterministic: the same chunks
    /// in the same order on every launch of a target (the CPU and CUDA sum in different orders).
    #[allow(clippy::too_many_arguments)] // the arguments of `reduce`, and the levels
    fn reduce_split(
        &mut self,
        name: &str,
        x: Value,
        op: ReduceOp,
        red: &[bool],
        keepdims: bool,
        home: &View,
        levels: Vec<i64>,
    ) -> Result<(), CodegenError> {
        let xd = self.g.dims(x).to_vec();
        let xt = self.g.dtype(x);
        let n = xd.len();
        let kept_dims: Vec<Dim> = (0..n).filter(|&a| !red[a]).map(|a| xd[a].clone()).collect();
        let red_dims: Vec<Dim> = (0..n).filter(|&a| red[a]).map(|a| xd[a].clone()).collect();
        let s = Scalar::of(xt);
        let part_dtype = if s == Scalar::F32 { DType::F32 } else { DType::I64 };
        let items = kept_dims.iter().fold(Dim::from(1), |a, d| a * d.clone());
        let accop = reduce_acc(op);
        let init = |p: &mut crate::loops::Pool| reduce_init(p, op, xt);
        let count = red_dims.iter().fold(Dim::from(1), |c, d| c * d.clone());
        let count_e = self.lk.dim(&count);
        // the previous level's partials: (slot, chunks per output), or None for the range itself
        let mut prev: Option<(u32, i64)> = None;
        for &chunks in &levels {
            let part = self.lk.scratch(part_dtype, items.clone() * Dim::from(chunks));
            let ce = self.lk.pool.i(chunks);
            // item c · outputs + k: neighbouring items take neighbouring outputs of one chunk (coalesced where
            // neighbouring outputs are neighbours in memory, as a column reduction's are)
            let (item_var, item) = self.lk.loop_var();
            let oe = self.lk.dim(&items);
            let k = self.lk.pool.rem(item, oe);
            let c = self.lk.pool.div(item, oe);
            // the chunk's range [lo, hi) of the level's input (the reduced elements, or the last partials)
            let total = match prev {
                None => count_e,
                Some((_, pc)) => self.lk.pool.i(pc),
            };
            // on CUDA the first level's chunks interleave: chunk c takes elements c, c + chunks, …, so that
            // neighbouring items read neighbouring elements of a contiguous range (one thread walking 512
            // consecutive elements made every load of a warp touch 32 sectors: 0.55 ms for a sum of squares
            // over 134M bf16 on the H200); the CPU's threads walk their consecutive chunks
            let interleave = prev.is_none() && self.target == Target::Cuda;
            let p = &mut self.lk.pool;
            let c1 = p.i(chunks - 1);
            let up = p.addi(total, c1);
            let size = p.div(up, ce);
            let (lo, hi) = if interleave {
                let left = p.sub(up, c);
                (p.i(0), p.div(left, ce))
            } else {
                let lo = p.mul(c, size);
                let lo = p.min(lo, total);
                let end = p.addi(lo, size);
                (lo, p.min(end, total))
            };
            let (acc_var, acc) = self.lk.mutable(s);
            let (rv, r) = self.lk.loop_var();
            let val = match prev {
                None => {
                    let kc = self.coords(k, &kept_dims);
                    let r = if interleave {
                        let p = &mut self.lk.pool;
                        let step = p.mul(r, ce);
                        p.addi(c, step)
                    } else {
                        r
                    };
                    let rc = self.coords(r, &red_dims);
                    let (mut ki, mut ri) = (0, 0);
                    let idx: Vec<E> = (0..n)
                        .map(|a| {
                            if red[a] {
                                ri += 1;
                                rc[ri - 1]
                            } else {
                                ki += 1;
                                kc[ki - 1]
                            }
                        })
                        .collect();
                    self.at(x, &idx)?
                }
                Some((slot, _)) => {
                    let p = &mut self.lk.pool;
                    let base = p.mul(r, oe);
                    let at = p.addi(base, k);
                    p.load(slot, part_dtype, at)
                }
            };
            let body = vec![
                Stmt::Set {
                    var: acc_var,
                    value: init(&mut self.lk.pool),
                },
                Stmt::For {
                    var: rv,
                    lo,
                    hi,
                    body: vec![Stmt::Accumulate {
                        var: acc_var,
                        op: accop,
                        value: val,
                    }],
                },
                Stmt::Store {
                    arg: part,
                    dtype: part_dtype,
                    index: item,
                    value: acc,
                },
            ];
            let grid = items.clone() * Dim::from(chunks);
            let grid = self.lk.dim(&grid);
            self.lk.steps.push(Step::Phase(Phase {
                name: format!("{name} (partials)"),
                grid,
                item: item_var,
                body,
                item_cost: size,
            }));
            prev = Some((part, chunks));
        }
        let Some((part, chunks)) = prev else {
            return Err(CodegenError::Options(format!(
                "kernel {}: a split reduction without levels",
                self.kname
            )));
        };
        // the final phase: output k combines its partials
        let (item_var, k) = self.lk.loop_var();
        let kc = self.coords(k, &kept_dims);
        let (acc_var, acc) = self.lk.mutable(s);
        let (cv, c) = self.lk.loop_var();
        let oe = self.lk.dim(&items);
        let p = &mut self.lk.pool;
        let ce = p.i(chunks);
        let zero = p.i(0);
        let base = p.mul(c, oe);
        let at = p.addi(base, k);
        let partial = p.load(part, part_dtype, at);
        let result = if op == ReduceOp::Mean {
            let cnt = p.cast(Scalar::F32, count_e);
            p.bin(BinaryOp::Div, acc, cnt)
        } else {
            acc
        };
        let out_idx: Vec<E> = if keepdims {
            let mut ki = 0;
            (0..n)
                .map(|a| {
                    if red[a] {
                        zero
                    } else {
                        ki += 1;
                        kc[ki - 1]
                    }
                })
                .collect()
        } else {
            kc
        };
        let index = home.index(&mut self.lk, &out_idx);
        let body = vec![
            Stmt::Set {
                var: acc_var,
                value: init(&mut self.lk.pool),
            },
            Stmt::For {
                var: cv,
                lo: zero,
                hi: ce,
                body: vec![Stmt::Accumulate {
                    var: acc_var,
                    op: accop,
                    value: partial,
                }],
            },
            Stmt::Store {
                arg: home.slot,
                dtype: home.dtype,
                index,
                value: result,
            },
        ];
        let grid = self.lk.dim(&items);
        self.lk.steps.push(Step::Phase(Phase {
            name: name.into(),
            grid,
            item: item_var,
            body,
            item_cost: ce,
        }));
        Ok(())
    }

    /// Items over every axis but `axis` and the index with `axis` left to fill: (item var, index, grid).
    fn around_axis(&mut self, dims: &[Dim], axis: usize) -> (u32, Vec<E>, E) {
        let (item_var, item) = self.lk.loop_var();
        let (idx, grid) = self.around_axis_at(dims, axis, item);
        (item_var, idx, grid)
    }

    /// [`Self::around_axis`] for item expression `item`: the index (0 on `axis`) and the number of items.
    fn around_axis_at(&mut self, dims: &[Dim], axis: usize, item: E) -> (Vec<E>, E) {
        let others: Vec<Dim> = dims
            .iter()
            .enumerate()
            .filter(|(a, _)| *a != axis)
            .map(|(_, d)| d.clone())
            .collect();
        let c = self.coords(item, &others);
        let zero = self.lk.pool.i(0);
        let mut idx = vec![zero; dims.len()];
        let mut k = 0;
        for (a, slot) in idx.iter_mut().enumerate() {
            if a != axis {
                *slot = c[k];
                k += 1;
            }
        }
        let grid = others.iter().fold(Dim::from(1), |a, d| a * d.clone());
        let grid = self.lk.dim(&grid);
        (idx, grid)
    }

    fn cumsum(
        &mut self,
        name: &str,
        x: Value,
        axis: i64,
        exclusive: bool,
        reverse: bool,
        home: &View,
    ) -> Result<(), CodegenError> {
        let xd = self.g.dims(x).to_vec();
        let a = norm_axis(axis, xd.len()).map_err(CodegenError::Options)?;
        let (item_var, mut idx, grid) = self.around_axis(&xd, a);
        let s = Scalar::of(self.g.dtype(x));
        let (acc_var, acc) = self.lk.mutable(s);
        let (pv, pe) = self.lk.loop_var();
        let len = self.lk.dim(&xd[a]);
        let p = &mut self.lk.pool;
        let zero = match s {
            Scalar::F32 => p.f(0.0),
            _ => p.i(0),
        };
        let pos = if reverse {
            let one = p.i(1);
            let l1 = p.sub(len, one);
            p.sub(l1, pe)
        } else {
            pe
        };
        idx[a] = pos;
        let val = self.at(x, &idx)?;
        let sum = self.lk.pool.bin(BinaryOp::Add, acc, val);
        let index = home.index(&mut self.lk, &idx);
        let store = |value| Stmt::Store {
            arg: home.slot,
            dtype: home.dtype,
            index,
            value,
        };
        let body = if exclusive {
            vec![
                store(acc),
                Stmt::Set {
                    var: acc_var,
                    value: sum,
                },
            ]
        } else {
            vec![
                Stmt::Set {
                    var: acc_var,
                    value: sum,
                },
                store(acc),
            ]
        };
        let izero = self.lk.pool.i(0);
        self.lk.steps.push(Step::Phase(Phase {
            name: name.into(),
            grid,
            item: item_var,
            body: vec![
                Stmt::Set {
                    var: acc_var,
                    value: zero,
                },
                Stmt::For {
                    var: pv,
                    lo: izero,
                    hi: len,
                    body,
                },
            ],
            item_cost: len,
        }));
        Ok(())
    }

    /// `topk` by `k` passes over each row, each taking the best element ranked after the previous pick
    /// (descending, NaN first, ties to the lower index: the interpreter's stable order).
    fn topk(
        &mut self,
        name: &str,
        x: Value,
        k: usize,
        axis: i64,
        vals: &View,
        inds: &View,
    ) -> Result<(), CodegenError> {
        let xd = self.g.dims(x).to_vec();
        let a = norm_axis(axis, xd.len()).map_err(CodegenError::Options)?;
        let (item_var, mut idx, grid) = self.around_axis(&xd, a);
        let s = Scalar::of(self.g.dtype(x));
        let (pv_var, pv) = self.lk.mutable(s); // previous pick
        let (pi_var, pi) = self.lk.mutable(Scalar::I64);
        let (bv_var, bv) = self.lk.mutable(s); // best so far
        let (bi_var, bi) = self.lk.mutable(Scalar::I64);
        let (rv, re) = self.lk.loop_var(); // pass
        let (jv, je) = self.lk.loop_var(); // element
        let len = self.lk.dim(&xd[a]);
        idx[a] = je;
        let xv = self.at(x, &idx)?;
        let p = &mut self.lk.pool;
        let zero = p.i(0);
        let minus1 = p.i(-1);
        // before(a, ia, b, ib): a ranks before b
        let before = |p: &mut crate::loops::Pool, av: E, ai: E, bv: E, bi: E| -> E {
            let lt_i = p.cmp(CmpOp::Lt, ai, bi);
            if s == Scalar::F32 {
                let an = p.is_nan(av);
                let bn = p.is_nan(bv);
                let gt = p.cmp(CmpOp::Gt, av, bv);
                let eq = p.cmp(CmpOp::Eq, av, bv);
                let eq_lt = p.and(eq, lt_i);
                let plain = p.or(gt, eq_lt);
                let nb = p.not(bn);
                let both = p.and(an, bn);
                let both_lt = p.and(both, lt_i);
                let an_nb = p.and(an, nb);
                let na = p.not(an);
                let neither = p.and(na, nb);
                let plain_ok = p.and(neither, plain);
                let t = p.or(both_lt, an_nb);
                p.or(t, plain_ok)
            } else {
                let gt = p.cmp(CmpOp::Gt, av, bv);
                let eq = p.cmp(CmpOp::Eq, av, bv);
                let eq_lt = p.and(eq, lt_i);
                p.or(gt, eq_lt)
            }
        };
        let first = p.cmp(CmpOp::Eq, re, zero);
        let after_prev = before(p, pv, pi, xv, je);
        let eligible = p.or(first, after_prev);
        let none = p.cmp(CmpOp::Lt, bi, zero);
        let better = before(p, xv, je, bv, bi);
        let take0 = p.or(none, better);
        let take = p.and(eligible, take0);
        let mut out_idx = idx.clone();
        out_idx[a] = re;
        let vi = vals.index(&mut self.lk, &out_idx);
        let ii = inds.index(&mut self.lk, &out_idx);
        let kk = self.lk.pool.i(k as i64);
        let init_pv = match s {
            Scalar::F32 => self.lk.pool.f(0.0),
            _ => zero,
        };
        let body = vec![
            Stmt::Set {
                var: bi_var,
                value: minus1,
            },
            Stmt::Set {
                var: bv_var,
                value: init_pv,
            },
            Stmt::For {
                var: jv,
                lo: zero,
                hi: len,
                body: vec![Stmt::If {
                    cond: take,
                    then: vec![
                        Stmt::Set { var: bv_var, value: xv },
                        Stmt::Set { var: bi_var, value: je },
                    ],
                    els: vec![],
                }],
            },
            Stmt::Store {
                arg: vals.slot,
                dtype: vals.dtype,
                index: vi,
                value: bv,
            },
            Stmt::Store {
                arg: inds.slot,
                dtype: inds.dtype,
                index: ii,
                value: bi,
            },
            Stmt::Set { var: pv_var, value: bv },
            Stmt::Set { var: pi_var, value: bi },
        ];
        let cost = self.lk.pool.mul(len, kk);
        self.lk.steps.push(Step::Phase(Phase {
            name: name.into(),
            grid,
            item: item_var,
            body: vec![
                Stmt::Set {
                    var: pv_var,
                    value: init_pv,
                },
                Stmt::Set {
                    var: pi_var,
                    value: zero,
                },
                Stmt::For {
                    var: rv,
                    lo: zero,
                    hi: kk,
                    body,
                },
            ],
            item_cost: cost,
        }));
        Ok(())
    }

    fn scatter_add(
        &mut self,
        name: &str,
        data: Value,
        indices: Value,
        updates: Value,
        axis: i64,
        home: &View,
    ) -> Result<(), CodegenError> {
        // the result starts as a copy of `data`
        self.write(&format!("{name}.copy"), home, |gen, idx| gen.at(data, idx))?;
        let xd = self.g.dims(data).to_vec();
        let id = self.g.dims(indices).to_vec();
        let a = norm_axis(axis, xd.len()).map_err(CodegenError::Options)?;
        // on CUDA, few items (an embedding's gradient: a thread per column, 2048 of them) over a long axis:
        // each item's axis cut into ranges, a thread per (item, range) walking every index in order and adding
        // those in its range: the device filled, each element still summed in index order by one thread
        let ranges = match (self.target == Target::Cuda, scatter_items(&xd, a), xd[a].as_const()) {
            (true, Some(items), Some(len)) if items < SCATTER_MIN_ITEMS => {
                (SCATTER_MIN_ITEMS / items.max(1)).clamp(1, (len / SCATTER_MIN_RANGE).max(1))
            }
            _ => 1,
        };
        let (item_var, mut idx, grid, range) = if ranges > 1 {
            // the item's coordinates from `item mod items`, its range from `item / items` (neighbouring threads
            // on neighbouring elements)
            let (item_var, item) = self.lk.loop_var();
            let items = scatter_items(&xd, a).expect("constant items");
            let ie = self.lk.pool.i(items);
            let col = self.lk.pool.rem(item, ie);
            let r = self.lk.pool.div(item, ie);
            let (idx, grid) = self.around_axis_at(&xd, a, col);
            let len = xd[a].as_const().expect("a constant axis");
            let chunk = (len + ranges - 1) / ranges;
            let p = &mut self.lk.pool;
            let ce = p.i(chunk);
            let lo = p.mul(r, ce);
            let hi = p.addi(lo, ce);
            let n = p.i(ranges);
            let grid = p.mul(grid, n);
            (item_var, idx, grid, Some((lo, hi)))
        } else {
            let (v, idx, grid) = self.around_axis(&xd, a);
            (v, idx, grid, None)
        };
        let (kv, ke) = self.lk.loop_var();
        let nids = id.iter().fold(Dim::from(1), |x, d| x * d.clone());
        let nids_e = self.lk.dim(&nids);
        let ic = self.coords(ke, &id);
        let raw = self.at(indices, &ic)?;
        let raw = self.lk.pool.cast(Scalar::I64, raw);
        let bound = self.lk.dim(&xd[a]);
        let what = format!("an index of `scatter_add` is out of range [0, {}) for axis {a}", xd[a]);
        let j = self.lk.checked(raw, bound, what);
        // updates: data[..a] ++ indices ++ data[a+1..]
        let mut ui: Vec<E> = idx[..a].to_vec();
        ui.extend_from_slice(&ic);
        ui.extend_from_slice(&idx[a + 1..]);
        let u = self.at(updates, &ui)?;
        idx[a] = j;
        let cur = home.load(&mut self.lk, &idx);
        let sum = self.lk.pool.bin(BinaryOp::Add, cur, u);
        let index = home.index(&mut self.lk, &idx);
        let zero = self.lk.pool.i(0);
        let store = Stmt::Store {
            arg: home.slot,
            dtype: home.dtype,
            index,
            value: sum,
        };
        let body = match range {
            Some((lo, hi)) => {
                let p = &mut self.lk.pool;
                let ge = p.cmp(fulgur_ir::CmpOp::Ge, j, lo);
                let lt = p.cmp(fulgur_ir::CmpOp::Lt, j, hi);
                let inside = p.and(ge, lt);
                vec![Stmt::If {
                    cond: inside,
                    then: vec![store],
                    els: vec![],
                }]
            }
            None => vec![store],
        };
        self.lk.steps.push(Step::Phase(Phase {
            name: name.into(),
            grid,
            item: item_var,
            body: vec![Stmt::For {
                var: kv,
                lo: zero,
                hi: nids_e,
                body,
            }],
            item_cost: nids_e,
        }));
        Ok(())
    }

    /// A value as a strided view of memory, if it is one (a materialised value or input seen through
    /// reshapes of contiguous data, permutes, broadcasts and slices).
    fn view_of(&self, v: Value) -> Option<View> {
        if let Some(h) = self.homes.get(&v) {
            return Some(h.clone());
        }
        let n = self.g.node(v.node);
        let out = n.outputs[v.index as usize].dims().to_vec();
        let x = n.inputs.first().copied()?;
        let xv = self.view_of(x)?;
        match &n.op {
            Op::Reshape { .. } => xv.is_contiguous().then(|| View {
                strides: row_major(&out),
                shape: out,
                ..xv
            }),
            Op::Permute { perm } => Some(View {
                shape: perm.iter().map(|&p| xv.shape[p].clone()).collect(),
                strides: perm.iter().map(|&p| xv.strides[p].clone()).collect(),
                ..xv
            }),
            Op::Broadcast { .. } => {
                let (ri, ro) = (xv.shape.len(), out.len());
                let strides = (0..ro)
                    .map(|j| match (j + ri).checked_sub(ro) {
                        Some(i) if xv.shape[i] == out[j] => xv.strides[i].clone(),
                        _ => Dim::from(0),
                    })
                    .collect();
                Some(View {
                    shape: out,
                    strides,
                    ..xv
                })
            }
            Op::Slice { axis, start, .. } => {
                let a = norm_axis(*axis, xv.shape.len()).ok()?;
                let offset = xv.offset.clone() + start.clone() * xv.strides[a].clone();
                Some(View {
                    shape: out,
                    offset,
                    ..xv
                })
            }
            _ => None,
        }
    }

    /// A value as a view of memory, written to scratch first when it is not one.
    fn in_memory(&mut self, v: Value, name: &str) -> Result<View, CodegenError> {
        if let Some(view) = self.view_of(v) {
            return Ok(view);
        }
        let ty = self.g.ty(v).clone();
        let slot = self.lk.scratch(ty.dtype, ty.shape.numel());
        let home = View::contiguous(slot, ty.dtype, ty.dims());
        self.write(name, &home, |gen, idx| gen.at(v, idx))?;
        self.homes.insert(v, home.clone());
        Ok(home)
    }

    /// A GEMM operand: a view of memory whose rows or columns are unit-strided (what a BLAS reads), copied to
    /// scratch when it is not (a permute that moved the last axis into the batch).
    fn gemm_operand(&mut self, v: Value, name: &str) -> Result<View, CodegenError> {
        let view = self.in_memory(v, name)?;
        let r = view.shape.len();
        if r < 2 || view.strides[r - 1].is_one() || view.strides[r - 2].is_one() {
            return Ok(view);
        }
        let ty = self.g.ty(v).clone();
        let slot = self.lk.scratch(ty.dtype, ty.shape.numel());
        let home = View::contiguous(slot, ty.dtype, ty.dims());
        self.write(name, &home, |gen, idx| gen.at(v, idx))?;
        Ok(home)
    }

    fn matmul(&mut self, name: &str, a: Value, b: Value, home: &View) -> Result<(), CodegenError> {
        let at = self.g.dtype(a);
        if !at.is_float() {
            return self.matmul_loops(name, a, b, home);
        }
        let av = self.gemm_operand(a, &format!("{name}.lhs"))?;
        let bv = self.gemm_operand(b, &format!("{name}.rhs"))?;
        let (ra, rb, rc) = (av.shape.len(), bv.shape.len(), home.shape.len());
        let m = self.lk.dim(&av.shape[ra - 2]);
        let k = self.lk.dim(&av.shape[ra - 1]);
        let n = self.lk.dim(&bv.shape[rb - 1]);
        let mut batch = Vec::new();
        for j in 0..rc - 2 {
            let ext = home.shape[j].clone();
            let stride_of = |v: &View, r: usize| -> Dim {
                match (j + r).checked_sub(rc) {
                    Some(i) if v.shape[i] == ext => v.strides[i].clone(),
                    _ => Dim::from(0),
                }
            };
            let sa = stride_of(&av, ra);
            let sb = stride_of(&bv, rb);
            let sc = home.strides[j].clone();
            batch.push([self.lk.dim(&ext), self.lk.dim(&sa), self.lk.dim(&sb), self.lk.dim(&sc)]);
        }
        let operand = |lk: &mut LoopKernel, v: &View, r: usize| Operand {
            arg: v.slot,
            dtype: v.dtype,
            offset: lk.dim(&v.offset),
            rs: lk.dim(&v.strides[r - 2]),
            cs: lk.dim(&v.strides[r - 1]),
        };
        let a_op = operand(&mut self.lk, &av, ra);
        let b_op = operand(&mut self.lk, &bv, rb);
        let c_op = operand(&mut self.lk, home, rc);
        self.lk.steps.push(Step::Gemm(GemmStep {
            m,
            n,
            k,
            batch,
            a: a_op,
            b: b_op,
            c: c_op,
        }));
        Ok(())
    }

    /// An integer matmul as loops (no GEMM kernel computes integers).
    fn matmul_loops(&mut self, name: &str, a: Value, b: Value, home: &View) -> Result<(), CodegenError> {
        let ad = self.g.dims(a).to_vec();
        let kd = ad[ad.len() - 1].clone();
        let od = home.shape.clone();
        let r = od.len();
        let (item_var, item) = self.lk.loop_var();
        let oi = self.coords(item, &od);
        let (kv, ke) = self.lk.loop_var();
        let mut ia = self.bcast(&oi[..r - 2], &ad[..ad.len() - 2]);
        ia.push(oi[r - 2]);
        ia.push(ke);
        let bd = self.g.dims(b).to_vec();
        let mut ib = self.bcast(&oi[..r - 2], &bd[..bd.len() - 2]);
        ib.push(ke);
        ib.push(oi[r - 1]);
        let x = self.at(a, &ia)?;
        let y = self.at(b, &ib)?;
        let prod = self.lk.pool.mul(x, y);
        let (acc_var, acc) = self.lk.mutable(Scalar::I64);
        let index = home.index(&mut self.lk, &oi);
        let zero = self.lk.pool.i(0);
        let kk = self.lk.dim(&kd);
        let grid = od.iter().fold(Dim::from(1), |x, d| x * d.clone());
        let grid = self.lk.dim(&grid);
        self.lk.steps.push(Step::Phase(Phase {
            name: name.into(),
            grid,
            item: item_var,
            body: vec![
                Stmt::Set {
                    var: acc_var,
                    value: zero,
                },
                Stmt::For {
                    var: kv,
                    lo: zero,
                    hi: kk,
                    body: vec![Stmt::Accumulate {
                        var: acc_var,
                        op: Acc::Add,
                        value: prod,
                    }],
                },
                Stmt::Store {
                    arg: home.slot,
                    dtype: home.dtype,
                    index,
                    value: acc,
                },
            ],
            item_cost: kk,
        }));
        Ok(())
    }
}

fn row_major_usize(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1] as i64;
    }
    s
}

/// A literal of `dtype`'s compute type.
fn scalar_literal(p: &mut crate::loops::Pool, dtype: DType, value: f64) -> E {
    match Scalar::of(dtype) {
        Scalar::F32 => p.f(round_to(dtype, value) as f32),
        Scalar::I64 => p.i(value as i64),
        Scalar::Bool => p.b(value != 0.0),
    }
}

/// An i64 index as a value of `dtype`.
fn cast_to(p: &mut crate::loops::Pool, dtype: DType, i: E) -> E {
    let v = p.cast(Scalar::of(dtype), i);
    if matches!(dtype, DType::BF16 | DType::F16) {
        p.add(crate::loops::Expr::Round(dtype, v))
    } else {
        v
    }
}

/// `cast` from `from` to `to` (the interpreter's semantics: floats round to the target dtype, float → int
/// saturates with NaN → 0, int → i32 wraps, anything → bool is `!= 0`).
pub(crate) fn cast_value(p: &mut crate::loops::Pool, from: DType, to: DType, x: E) -> E {
    match Scalar::of(to) {
        Scalar::F32 => {
            let f = p.cast(Scalar::F32, x);
            if matches!(to, DType::BF16 | DType::F16) && to != from {
                p.add(crate::loops::Expr::Round(to, f))
            } else {
                f
            }
        }
        Scalar::I64 => {
            let i = p.cast(Scalar::I64, x);
            if to == DType::I32 && from != DType::I32 {
                if from.is_float() {
                    let lo = p.i(i32::MIN as i64);
                    let hi = p.i(i32::MAX as i64);
                    let c = p.max(i, lo);
                    p.min(c, hi)
                } else {
                    // wrap to 32 bits
                    let m = p.i(1 << 32);
                    let h = p.i(1 << 31);
                    let r = p.rem(i, m);
                    let r = p.addi(r, m);
                    let r = p.rem(r, m);
                    let big = p.cmp(CmpOp::Ge, r, h);
                    let w = p.sub(r, m);
                    p.select(big, w, r)
                }
            } else {
                i
            }
        }
        Scalar::Bool => {
            let s = Scalar::of(from);
            let zero = match s {
                Scalar::F32 => p.f(0.0),
                Scalar::I64 => p.i(0),
                Scalar::Bool => return x,
            };
            p.cmp(CmpOp::Ne, x, zero)
        }
    }
}

/// Groups of axes of `from` and `to` whose sizes agree (each group: the `from` axes, the `to` axes), or `None`
/// when the sizes cannot be matched symbolically. Axes of size 1 form groups of their own.
fn reshape_groups(from: &[Dim], to: &[Dim]) -> Option<Vec<(Vec<usize>, Vec<usize>)>> {
    let mut groups = Vec::new();
    let (mut i, mut j) = (0, 0);
    loop {
        while i < from.len() && from[i].is_one() {
            groups.push((vec![i], vec![]));
            i += 1;
        }
        while j < to.len() && to[j].is_one() {
            j += 1;
        }
        if i == from.len() || j == to.len() {
            break;
        }
        let (mut fa, mut ta) = (vec![i], vec![j]);
        let (mut pf, mut pt) = (from[i].clone(), to[j].clone());
        i += 1;
        j += 1;
        while pf != pt {
            if pt.div_exact(&pf).is_some() && i < from.len() {
                pf = pf * from[i].clone();
                fa.push(i);
                i += 1;
            } else if pf.div_exact(&pt).is_some() && j < to.len() {
                pt = pt * to[j].clone();
                ta.push(j);
                j += 1;
            } else {
                return None;
            }
        }
        groups.push((fa, ta));
    }
    while i < from.len() {
        if !from[i].is_one() {
            return None;
        }
        groups.push((vec![i], vec![]));
        i += 1;
    }
    while j < to.len() {
        if !to[j].is_one() {
            return None;
        }
        j += 1;
    }
    Some(groups)
}

#[cfg(test)]
mod tests {
    use super::reshape_groups;
    use fulgur_ir::Dim;

    fn d(s: &str) -> Dim {
        s.parse().unwrap()
    }

    #[test]
    fn reshape_groups_match_split_and_merged_axes() {
        let g = reshape_groups(&[d("B*T"), d("128")], &[d("B"), d("T"), d("128")]).unwrap();
        assert_eq!(g, vec![(vec![0], vec![0, 1]), (vec![1], vec![2])]);
        let g = reshape_groups(&[d("B"), d("T"), d("4"), d("32")], &[d("B"), d("T"), d("128")]).unwrap();
        assert_eq!(g, vec![(vec![0], vec![0]), (vec![1], vec![1]), (vec![2, 3], vec![2])]);
        let g = reshape_groups(&[d("1"), d("6")], &[d("6"), d("1")]).unwrap();
        assert_eq!(g, vec![(vec![0], vec![]), (vec![1], vec![0])]);
        assert!(reshape_groups(&[d("6"), d("4")], &[d("4"), d("6")]).is_none());
    }
}
