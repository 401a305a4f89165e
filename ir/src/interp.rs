//! The reference interpreter: what every op means.
//!
//! It runs a graph on host [`Tensor`]s. Symbols are bound from the shapes of the tensors given for the inputs
//! and parameters; a tensor of the wrong dtype or shape is refused with an error naming the input.
//!
//! Precision: values are computed in f64. With [`Precision::F32`] every float result is rounded to its node's
//! dtype (f32, bf16 or f16) after each op, so storage behaves like the declared dtype while accumulation is
//! wider (as a GPU kernel accumulating in f32 for bf16 data). With [`Precision::F64`] nothing is rounded: the
//! graph is evaluated exactly in f64, the oracle for rewrites and kernels.

use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::graph::{Graph, Node, NodeId, Value};
use crate::infer::norm_axis;
use crate::op::{BinaryOp, ConstData, Op, ReduceOp};
use crate::tensor::{round_to, Buffer, Tensor};
use crate::types::TensorType;
use std::collections::{BTreeMap, HashMap};

/// How float results are rounded (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Round every float result to its node's dtype.
    #[default]
    F32,
    /// Keep every float result in f64.
    F64,
}

/// Runs the collectives of per-rank programs (`on_rank`): each rank's program calls it with its own slices, in
/// the same order on every rank.
pub trait Transport: Sync {
    /// Rank `rank`'s outputs of collective `op` (its `mesh` names the ranks) given the rank's inputs.
    fn collective(&self, op: &Op, rank: usize, args: &[&Tensor]) -> std::result::Result<Vec<Tensor>, String>;
    /// The transport itself, for a backend that can run some collectives with it directly (NCCL on device
    /// memory); `None` (the default): every collective goes through [`Transport::collective`].
    fn as_any(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        None
    }
}

/// The reference interpreter.
///
/// ```
/// use fulgur_ir::{DType, Dim, Graph, Interpreter, Tensor};
/// let mut g = Graph::new("double");
/// let x = g.input("x", DType::F32, vec![Dim::sym("N")]).unwrap();
/// let y = g.add(x, x).unwrap();
/// g.add_output("y", y).unwrap();
/// let out = Interpreter::default()
///     .run(&g, &[("x".to_string(), Tensor::from_f32(vec![3], vec![1.0, 2.0, 3.0]))].into())
///     .unwrap();
/// assert_eq!(out["y"].to_f64(), vec![2.0, 4.0, 6.0]);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Interpreter {
    pub precision: Precision,
    /// The most bytes the interpreter may hold at once (its values and their temporaries); `None`: the memory
    /// the system reports available when a run starts (see [`available_memory`]). A node that would need more
    /// is an error naming it and the sizes, before anything is allocated.
    pub memory_limit: Option<u64>,
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// For every linear index of `out`, the linear index of the broadcast source of shape `src`.
fn broadcast_map(out: &[usize], src: &[usize]) -> std::result::Result<Vec<usize>, String> {
    if src.len() > out.len() {
        return Err(format!("cannot broadcast {src:?} to {out:?}"));
    }
    let off = out.len() - src.len();
    let ss = strides(src);
    let mut bstr = vec![0usize; out.len()];
    for i in 0..src.len() {
        if src[i] == out[off + i] {
            bstr[off + i] = ss[i];
        } else if src[i] != 1 {
            return Err(format!("cannot broadcast {src:?} to {out:?}"));
        }
    }
    let n: usize = out.iter().product();
    let mut res = Vec::with_capacity(n);
    let mut idx = vec![0usize; out.len()];
    let mut cur = 0usize;
    for _ in 0..n {
        res.push(cur);
        // increment the multi-index
        for ax in (0..out.len()).rev() {
            idx[ax] += 1;
            cur += bstr[ax];
            if idx[ax] < out[ax] {
                break;
            }
            cur -= bstr[ax] * idx[ax];
            idx[ax] = 0;
        }
    }
    Ok(res)
}

fn broadcast_concrete(a: &[usize], b: &[usize]) -> std::result::Result<Vec<usize>, String> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let x = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let y = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            if x == y || y == 1 {
                Ok(x)
            } else if x == 1 {
                Ok(y)
            } else {
                Err(format!("shapes {a:?} and {b:?} do not broadcast"))
            }
        })
        .collect()
}

/// Splits `shape` around `axis` into (outer, len, inner).
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// A buffer gathered through an index map.
fn take_buf(b: &Buffer, map: &[usize]) -> Buffer {
    match b {
        Buffer::F(v) => Buffer::F(map.iter().map(|&i| v[i]).collect()),
        Buffer::I(v) => Buffer::I(map.iter().map(|&i| v[i]).collect()),
        Buffer::B(v) => Buffer::B(map.iter().map(|&i| v[i]).collect()),
    }
}

fn empty_like(b: &Buffer) -> Buffer {
    match b {
        Buffer::F(_) => Buffer::F(Vec::new()),
        Buffer::I(_) => Buffer::I(Vec::new()),
        Buffer::B(_) => Buffer::B(Vec::new()),
    }
}

fn extend_range(dst: &mut Buffer, src: &Buffer, start: usize, len: usize) {
    match (dst, src) {
        (Buffer::F(d), Buffer::F(s)) => d.extend_from_slice(&s[start..start + len]),
        (Buffer::I(d), Buffer::I(s)) => d.extend_from_slice(&s[start..start + len]),
        (Buffer::B(d), Buffer::B(s)) => d.extend_from_slice(&s[start..start + len]),
        _ => unreachable!("concat operands share a dtype"),
    }
}

impl Interpreter {
    pub fn new(precision: Precision) -> Interpreter {
        Interpreter {
            precision,
            memory_limit: None,
        }
    }

    /// The same interpreter holding at most `bytes` at once.
    pub fn with_memory_limit(self, bytes: u64) -> Interpreter {
        Interpreter {
            memory_limit: Some(bytes),
            ..self
        }
    }

    /// Binds symbols from the inputs' shapes and checks every input's dtype and shape.
    pub fn bind(&self, g: &Graph, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, i64>> {
        let mut env: HashMap<String, i64> = HashMap::new();
        let decls: Vec<(&str, &TensorType)> = g
            .nodes()
            .filter_map(|(_, n)| n.op.input_decl().map(|(name, ty, _)| (name, ty)))
            .collect();
        for (name, ty) in &decls {
            let t = inputs.get(*name).ok_or_else(|| IrError::Input {
                name: name.to_string(),
                message: format!("no tensor given (expected {ty})"),
            })?;
            if t.dtype != ty.dtype {
                return Err(IrError::Input {
                    name: name.to_string(),
                    message: format!("expected {ty}, got a {} tensor of shape {:?}", t.dtype, t.shape),
                });
            }
            if t.shape.len() != ty.rank() {
                return Err(IrError::Input {
                    name: name.to_string(),
                    message: format!("expected {ty} (rank {}), got shape {:?}", ty.rank(), t.shape),
                });
            }
            // `Tensor`'s fields are public: refuse storage that disagrees with the dtype or shape
            let storage = match &t.data {
                Buffer::F(_) if !t.dtype.is_float() => Some("float"),
                Buffer::I(_) if !t.dtype.is_int() => Some("integer"),
                Buffer::B(_) if t.dtype != DType::Bool => Some("bool"),
                _ => None,
            };
            if let Some(kind) = storage {
                return Err(IrError::Input {
                    name: name.to_string(),
                    message: format!("a {} tensor holding {kind} values", t.dtype),
                });
            }
            if t.data.len() != t.numel() {
                return Err(IrError::Input {
                    name: name.to_string(),
                    message: format!(
                        "the tensor holds {} values, its shape {:?} needs {}",
                        t.data.len(),
                        t.shape,
                        t.numel()
                    ),
                });
            }
            // bind dims that are a lone symbol
            for (d, &n) in ty.dims().iter().zip(&t.shape) {
                let syms = d.symbols();
                if syms.len() == 1 && *d == crate::Dim::sym(&syms[0]) && !env.contains_key(&syms[0]) {
                    env.insert(syms[0].clone(), n as i64);
                }
            }
        }
        for (name, ty) in &decls {
            let t = &inputs[*name];
            let want = ty.shape.eval(&env).map_err(|m| IrError::Input {
                name: name.to_string(),
                message: format!("cannot bind the symbols of {ty}: {m}"),
            })?;
            if want != t.shape {
                return Err(IrError::Input {
                    name: name.to_string(),
                    message: format!(
                        "expected {ty} = {want:?} with {}, got shape {:?}",
                        fmt_env(&env),
                        t.shape
                    ),
                });
            }
        }
        Ok(env)
    }

    /// Runs the graph; returns every declared output by name.
    pub fn run(&self, g: &Graph, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
        self.run_within(g, inputs, self.budget(), None)
    }

    /// [`Interpreter::run`] of one rank's program, its collectives (`on_rank`) run by `transport`.
    pub fn run_on(
        &self,
        g: &Graph,
        inputs: &HashMap<String, Tensor>,
        transport: &dyn Transport,
    ) -> Result<BTreeMap<String, Tensor>> {
        self.run_within(g, inputs, self.budget(), Some(transport))
    }

    /// The memory a run may hold: the limit, or what the system reports available when it starts.
    fn budget(&self) -> Budget {
        match self.memory_limit {
            Some(b) => Budget {
                bytes: b,
                source: "the --memory-limit",
            },
            None => Budget {
                bytes: available_memory().unwrap_or(u64::MAX),
                source: "the memory available",
            },
        }
    }

    fn run_within(
        &self,
        g: &Graph,
        inputs: &HashMap<String, Tensor>,
        budget: Budget,
        transport: Option<&dyn Transport>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let env = self.bind(g, inputs)?;
        check_sizes(g, &env)?;
        let mut uses = g.use_counts();
        let mut vals: HashMap<Value, Tensor> = HashMap::new();
        let mut out = BTreeMap::new();
        let wanted: HashMap<Value, Vec<&str>> = g.outputs().iter().fold(HashMap::new(), |mut m, (n, v)| {
            m.entry(*v).or_default().push(n.as_str());
            m
        });
        // bytes held now: the values kept for later nodes and the outputs collected so far
        let mut held: u64 = 0;
        for (id, node) in g.nodes() {
            let need = node_bytes(node, &env);
            if held.saturating_add(need) > budget.bytes {
                return Err(IrError::Node {
                    id: id.index(),
                    name: node.name.clone(),
                    op: node.op.name().to_string(),
                    message: format!(
                        "out of memory: its {} and their temporaries need {} while {} are held, more than {} \
                         ({})",
                        describe_outputs(node, &env),
                        fmt_bytes(need),
                        fmt_bytes(held),
                        budget.source,
                        fmt_bytes(budget.bytes)
                    ),
                });
            }
            let args: Vec<&Tensor> = node.inputs.iter().map(|v| &vals[v]).collect();
            let inner = Budget {
                bytes: budget.bytes - held,
                source: budget.source,
            };
            let results = self.eval_node(id, node, &args, inputs, &env, inner, transport)?;
            for v in &node.inputs {
                if let Some(c) = uses.get_mut(v) {
                    *c -= 1;
                    if *c == 0 {
                        if let Some(t) = vals.remove(v) {
                            held = held.saturating_sub(tensor_bytes(&t));
                        }
                    }
                }
            }
            for (i, t) in results.into_iter().enumerate() {
                let v = Value::new(id, i as u32);
                if let Some(names) = wanted.get(&v) {
                    for n in names {
                        held = held.saturating_add(tensor_bytes(&t));
                        out.insert(n.to_string(), t.clone());
                    }
                }
                if uses.get(&v).copied().unwrap_or(0) > 0 {
                    held = held.saturating_add(tensor_bytes(&t));
                    vals.insert(v, t);
                }
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)] // the node, its arguments, and where it runs
    fn eval_node(
        &self,
        id: NodeId,
        node: &Node,
        args: &[&Tensor],
        inputs: &HashMap<String, Tensor>,
        env: &HashMap<String, i64>,
        budget: Budget,
        transport: Option<&dyn Transport>,
    ) -> Result<Vec<Tensor>> {
        let err = |m: String| IrError::Node {
            id: id.index(),
            name: node.name.clone(),
            op: node.op.name().to_string(),
            message: m,
        };
        let out_shapes: Vec<Vec<usize>> = node
            .outputs
            .iter()
            .map(|t| t.shape.eval(env))
            .collect::<std::result::Result<_, _>>()
            .map_err(err)?;
        let mut res = if let Op::Composite(crate::op::Composite::OnRank { op, rank }) = &node.op {
            let t = transport.ok_or_else(|| {
                err(format!(
                    "`on_rank[op={}]` needs a collective transport: run the rank's program on simulated ranks or \
                     NCCL",
                    op.name()
                ))
            })?;
            t.collective(op, *rank, args).map_err(err)?
        } else if let Op::Composite(c) = &node.op {
            let mut sub = Graph::new(format!("{}_decomposition", c.name()));
            let mut sub_inputs = HashMap::new();
            let mut vs = Vec::new();
            for (i, t) in args.iter().enumerate() {
                let name = format!("arg{i}");
                let ty = TensorType {
                    dtype: t.dtype,
                    shape: crate::Shape::from_consts(&t.shape),
                };
                vs.push(sub.input(&name, ty.dtype, ty.shape.0).map_err(|e| err(e.to_string()))?);
                sub_inputs.insert(name, (*t).clone());
            }
            let outs = c
                .decompose(&mut sub, &vs)
                .map_err(|e| err(format!("decomposition failed: {e}")))?;
            for (i, v) in outs.iter().enumerate() {
                sub.add_output(format!("out{i}"), *v).map_err(|e| err(e.to_string()))?;
            }
            // the arguments were copied for the decomposition: what is left of the budget is its own
            let copied: u64 = args.iter().map(|t| tensor_bytes(t)).sum();
            let inner = Budget {
                bytes: budget.bytes.saturating_sub(copied),
                source: budget.source,
            };
            let r = self
                .run_within(&sub, &sub_inputs, inner, transport)
                .map_err(|e| err(format!("in decomposition: {e}")))?;
            (0..outs.len()).map(|i| r[&format!("out{i}")].clone()).collect()
        } else {
            self.eval_primitive(&node.op, args, &out_shapes, node, inputs, env)
                .map_err(err)?
        };
        for (i, t) in res.iter_mut().enumerate() {
            if t.shape != out_shapes[i] || t.dtype != node.outputs[i].dtype {
                return Err(err(format!(
                    "produced {} {:?}, its type is {} = {:?}",
                    t.dtype, t.shape, node.outputs[i], out_shapes[i]
                )));
            }
            if self.precision == Precision::F32 && t.dtype.is_float() {
                if let Buffer::F(v) = &mut t.data {
                    let d = t.dtype;
                    v.iter_mut().for_each(|x| *x = round_to(d, *x));
                }
            }
            // integer results are computed in i64: i32 wraps at 32 bits
            if t.dtype == DType::I32 {
                if let Buffer::I(v) = &mut t.data {
                    v.iter_mut().for_each(|x| *x = i64::from(*x as i32));
                }
            }
        }
        Ok(res)
    }

    fn eval_primitive(
        &self,
        op: &Op,
        a: &[&Tensor],
        out_shapes: &[Vec<usize>],
        node: &Node,
        inputs: &HashMap<String, Tensor>,
        env: &HashMap<String, i64>,
    ) -> std::result::Result<Vec<Tensor>, String> {
        let oshape = out_shapes[0].clone();
        let odt = node.outputs[0].dtype;
        let n_out: usize = oshape.iter().product();
        let t = |data: Buffer| {
            Ok(vec![Tensor {
                dtype: odt,
                shape: oshape.clone(),
                data,
            }])
        };
        match op {
            Op::Input { name, .. } | Op::Param { name, .. } => Ok(vec![inputs[name].clone()]),
            Op::Constant { data, .. } => t(match data {
                ConstData::Float(v) => Buffer::F(v.clone()),
                ConstData::Int(v) => Buffer::I(v.clone()),
                ConstData::Bool(v) => Buffer::B(v.clone()),
            }),
            Op::Full { value, dtype, .. } => t(if dtype.is_float() {
                Buffer::F(vec![*value; n_out])
            } else if dtype.is_int() {
                Buffer::I(vec![*value as i64; n_out])
            } else {
                Buffer::B(vec![*value != 0.0; n_out])
            }),
            Op::Iota { dtype, axis, .. } => {
                let ax = norm_axis(*axis, oshape.len())?;
                let (_, len, inner) = split_at_axis(&oshape, ax);
                let idx = (0..n_out).map(|i| (i / inner) % len.max(1));
                t(if dtype.is_float() {
                    Buffer::F(idx.map(|i| i as f64).collect())
                } else {
                    Buffer::I(idx.map(|i| i as i64).collect())
                })
            }
            Op::Unary(u) => t(match &a[0].data {
                Buffer::F(v) => Buffer::F(v.iter().map(|&x| u.apply(x)).collect()),
                Buffer::I(v) => Buffer::I(
                    v.iter()
                        .map(|&x| match u {
                            crate::UnaryOp::Neg => x.wrapping_neg(),
                            _ => x.wrapping_abs(),
                        })
                        .collect(),
                ),
                Buffer::B(_) => return Err("unary op on bool".into()),
            }),
            Op::Binary(b) => {
                let ma = broadcast_map(&oshape, &a[0].shape)?;
                let mb = broadcast_map(&oshape, &a[1].shape)?;
                t(match (&a[0].data, &a[1].data) {
                    (Buffer::F(x), Buffer::F(y)) => {
                        Buffer::F(ma.iter().zip(&mb).map(|(&i, &j)| b.apply_f(x[i], y[j])).collect())
                    }
                    (Buffer::I(x), Buffer::I(y)) => Buffer::I(
                        ma.iter()
                            .zip(&mb)
                            .map(|(&i, &j)| {
                                b.apply_i(x[i], y[j]).ok_or_else(|| match b {
                                    BinaryOp::Div => "integer division by zero".to_string(),
                                    _ => format!("negative integer exponent {}", y[j]),
                                })
                            })
                            .collect::<std::result::Result<_, _>>()?,
                    ),
                    _ => return Err("binary operands of different kinds".into()),
                })
            }
            Op::Compare(c) => {
                let ma = broadcast_map(&oshape, &a[0].shape)?;
                let mb = broadcast_map(&oshape, &a[1].shape)?;
                t(Buffer::B(match (&a[0].data, &a[1].data) {
                    (Buffer::F(x), Buffer::F(y)) => ma.iter().zip(&mb).map(|(&i, &j)| c.apply(x[i], y[j])).collect(),
                    (Buffer::I(x), Buffer::I(y)) => ma.iter().zip(&mb).map(|(&i, &j)| c.apply(x[i], y[j])).collect(),
                    (Buffer::B(x), Buffer::B(y)) => ma.iter().zip(&mb).map(|(&i, &j)| c.apply(x[i], y[j])).collect(),
                    _ => return Err("compare operands of different kinds".into()),
                }))
            }
            Op::Select => {
                let mc = broadcast_map(&oshape, &a[0].shape)?;
                let ma = broadcast_map(&oshape, &a[1].shape)?;
                let mb = broadcast_map(&oshape, &a[2].shape)?;
                let Buffer::B(c) = &a[0].data else {
                    return Err("select condition is not bool".into());
                };
                let pick: Vec<(bool, usize, usize)> = (0..n_out).map(|k| (c[mc[k]], ma[k], mb[k])).collect();
                t(match (&a[1].data, &a[2].data) {
                    (Buffer::F(x), Buffer::F(y)) => {
                        Buffer::F(pick.iter().map(|&(c, i, j)| if c { x[i] } else { y[j] }).collect())
                    }
                    (Buffer::I(x), Buffer::I(y)) => {
                        Buffer::I(pick.iter().map(|&(c, i, j)| if c { x[i] } else { y[j] }).collect())
                    }
                    (Buffer::B(x), Buffer::B(y)) => {
                        Buffer::B(pick.iter().map(|&(c, i, j)| if c { x[i] } else { y[j] }).collect())
                    }
                    _ => return Err("select branches of different kinds".into()),
                })
            }
            Op::Cast { dtype } => Ok(vec![a[0].cast(*dtype)]),
            Op::MatMul => {
                let (x, y) = (a[0], a[1]);
                let (rx, ry) = (x.shape.len(), y.shape.len());
                let (m, k) = (x.shape[rx - 2], x.shape[rx - 1]);
                let (k2, n) = (y.shape[ry - 2], y.shape[ry - 1]);
                if k != k2 {
                    return Err(format!(
                        "inner dimensions differ at run time: {:?} x {:?}",
                        x.shape, y.shape
                    ));
                }
                let bshape = &oshape[..oshape.len() - 2];
                let mx = broadcast_map(bshape, &x.shape[..rx - 2])?;
                let my = broadcast_map(bshape, &y.shape[..ry - 2])?;
                let (Buffer::F(xv), Buffer::F(yv)) = (&x.data, &y.data) else {
                    return Err("matmul on non-float".into());
                };
                let mut out = vec![0f64; n_out];
                let mut row = vec![0f64; n];
                for (bi, (&ox, &oy)) in mx.iter().zip(&my).enumerate() {
                    let xb = &xv[ox * m * k..(ox + 1) * m * k];
                    let yb = &yv[oy * k * n..(oy + 1) * k * n];
                    for i in 0..m {
                        row.iter_mut().for_each(|r| *r = 0.0);
                        for p in 0..k {
                            let xa = xb[i * k + p];
                            let yr = &yb[p * n..(p + 1) * n];
                            for (r, &yy) in row.iter_mut().zip(yr) {
                                *r += xa * yy;
                            }
                        }
                        out[(bi * m + i) * n..(bi * m + i + 1) * n].copy_from_slice(&row);
                    }
                }
                t(Buffer::F(out))
            }
            Op::Reduce { op: r, axes, .. } => {
                let x = a[0];
                let rank = x.shape.len();
                let mut red = vec![false; rank];
                for &ax in axes {
                    red[norm_axis(ax, rank)?] = true;
                }
                // output index (keepdims layout) for every input element
                let kshape: Vec<usize> = x
                    .shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| if red[i] { 1 } else { d })
                    .collect();
                let kstr = strides(&kshape);
                let n_in = x.numel();
                let count: usize = x
                    .shape
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| red[*i])
                    .map(|(_, &d)| d)
                    .product();
                let mut target = Vec::with_capacity(n_in);
                let mut idx = vec![0usize; rank];
                for _ in 0..n_in {
                    target.push(
                        idx.iter()
                            .enumerate()
                            .map(|(i, &v)| if red[i] { 0 } else { v * kstr[i] })
                            .sum::<usize>(),
                    );
                    for ax in (0..rank).rev() {
                        idx[ax] += 1;
                        if idx[ax] < x.shape[ax] {
                            break;
                        }
                        idx[ax] = 0;
                    }
                }
                t(match &x.data {
                    Buffer::F(v) => {
                        let init = match r {
                            ReduceOp::Sum | ReduceOp::Mean => 0.0,
                            ReduceOp::Max => f64::NEG_INFINITY,
                            ReduceOp::Min => f64::INFINITY,
                        };
                        let mut o = vec![init; n_out];
                        for (&ti, &val) in target.iter().zip(v) {
                            let acc = &mut o[ti];
                            *acc = match r {
                                ReduceOp::Sum | ReduceOp::Mean => *acc + val,
                                ReduceOp::Max => BinaryOp::Max.apply_f(*acc, val),
                                ReduceOp::Min => BinaryOp::Min.apply_f(*acc, val),
                            };
                        }
                        if *r == ReduceOp::Mean {
                            o.iter_mut().for_each(|x| *x /= count as f64);
                        }
                        Buffer::F(o)
                    }
                    Buffer::I(v) => {
                        let (lo, hi) = if x.dtype == DType::I32 {
                            (i64::from(i32::MIN), i64::from(i32::MAX))
                        } else {
                            (i64::MIN, i64::MAX)
                        };
                        let init = match r {
                            ReduceOp::Max => lo,
                            ReduceOp::Min => hi,
                            _ => 0,
                        };
                        let mut o = vec![init; n_out];
                        for (&ti, &val) in target.iter().zip(v) {
                            let acc = &mut o[ti];
                            *acc = match r {
                                ReduceOp::Max => (*acc).max(val),
                                ReduceOp::Min => (*acc).min(val),
                                _ => acc.wrapping_add(val),
                            };
                        }
                        Buffer::I(o)
                    }
                    Buffer::B(_) => return Err("reduction on bool".into()),
                })
            }
            Op::Reshape { .. } => {
                if a[0].numel() != n_out {
                    return Err(format!("cannot reshape {:?} to {oshape:?}", a[0].shape));
                }
                t(a[0].data.clone())
            }
            Op::Permute { perm } => {
                let x = a[0];
                let xs = strides(&x.shape);
                let pstr: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
                let mut map = Vec::with_capacity(n_out);
                let mut idx = vec![0usize; oshape.len()];
                let mut cur = 0usize;
                for _ in 0..n_out {
                    map.push(cur);
                    for ax in (0..oshape.len()).rev() {
                        idx[ax] += 1;
                        cur += pstr[ax];
                        if idx[ax] < oshape[ax] {
                            break;
                        }
                        cur -= pstr[ax] * idx[ax];
                        idx[ax] = 0;
                    }
                }
                t(take_buf(&x.data, &map))
            }
            Op::Broadcast { .. } => t(take_buf(&a[0].data, &broadcast_map(&oshape, &a[0].shape)?)),
            Op::Slice { axis, start, end } => {
                let x = a[0];
                let ax = norm_axis(*axis, x.shape.len())?;
                let s = start.eval(env)?;
                let e = end.eval(env)?;
                if s < 0 || e < s || e as usize > x.shape[ax] {
                    return Err(format!(
                        "slice [{s}, {e}) out of range for axis {ax} of size {}",
                        x.shape[ax]
                    ));
                }
                let (outer, len, inner) = split_at_axis(&x.shape, ax);
                let mut out = empty_like(&x.data);
                for o in 0..outer {
                    extend_range(
                        &mut out,
                        &x.data,
                        (o * len + s as usize) * inner,
                        (e - s) as usize * inner,
                    );
                }
                t(out)
            }
            Op::Concat { axis } => {
                let ax = norm_axis(*axis, oshape.len())?;
                let (outer, _, inner) = split_at_axis(&oshape, ax);
                let mut out = empty_like(&a[0].data);
                for o in 0..outer {
                    for x in a {
                        let len = x.shape[ax];
                        extend_range(&mut out, &x.data, o * len * inner, len * inner);
                    }
                }
                t(out)
            }
            Op::Gather { axis } => {
                let (x, idx) = (a[0], a[1]);
                let ax = norm_axis(*axis, x.shape.len())?;
                let (outer, len, inner) = split_at_axis(&x.shape, ax);
                let ids = idx.to_i64();
                let mut map = Vec::with_capacity(n_out);
                for o in 0..outer {
                    for &i in &ids {
                        if i < 0 || i as usize >= len {
                            return Err(format!("index {i} out of range for axis {ax} of size {len}"));
                        }
                        map.extend((0..inner).map(|j| (o * len + i as usize) * inner + j));
                    }
                }
                t(take_buf(&x.data, &map))
            }
            Op::ScatterAdd { axis } => {
                let (x, idx, upd) = (a[0], a[1], a[2]);
                let ax = norm_axis(*axis, x.shape.len())?;
                let (outer, len, inner) = split_at_axis(&x.shape, ax);
                let ids = idx.to_i64();
                let mut data = x.data.clone();
                for o in 0..outer {
                    for (k, &i) in ids.iter().enumerate() {
                        if i < 0 || i as usize >= len {
                            return Err(format!("index {i} out of range for axis {ax} of size {len}"));
                        }
                        for j in 0..inner {
                            let dst = (o * len + i as usize) * inner + j;
                            let src = (o * ids.len() + k) * inner + j;
                            match (&mut data, &upd.data) {
                                (Buffer::F(d), Buffer::F(u)) => d[dst] += u[src],
                                (Buffer::I(d), Buffer::I(u)) => d[dst] = d[dst].wrapping_add(u[src]),
                                _ => return Err("scatter_add on bool".into()),
                            }
                        }
                    }
                }
                t(data)
            }
            Op::TopK { k, axis } => {
                let x = a[0];
                let ax = norm_axis(*axis, x.shape.len())?;
                let (outer, len, inner) = split_at_axis(&x.shape, ax);
                if *k > len {
                    return Err(format!("k={k} exceeds the size {len} of axis {ax}"));
                }
                let vals = x.to_f64();
                let mut vi = Vec::with_capacity(n_out);
                let mut ii = Vec::with_capacity(n_out);
                let mut pos: Vec<(usize, usize)> = Vec::with_capacity(n_out);
                for o in 0..outer {
                    for j in 0..inner {
                        let mut order: Vec<usize> = (0..len).collect();
                        let at = |p: usize| (o * len + p) * inner + j;
                        let key = |p: usize| vals[at(p)];
                        // descending, NaN largest, stable (ties keep the lower index first)
                        order.sort_by(|&p, &q| {
                            // integers compare exactly (an i64 above 2^53 has no exact f64)
                            if let Buffer::I(iv) = &x.data {
                                return iv[at(q)].cmp(&iv[at(p)]);
                            }
                            let (x, y) = (key(p), key(q));
                            match (x.is_nan(), y.is_nan()) {
                                (true, true) => std::cmp::Ordering::Equal,
                                (true, false) => std::cmp::Ordering::Less,
                                (false, true) => std::cmp::Ordering::Greater,
                                _ => y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal),
                            }
                        });
                        for (r, &p) in order.iter().take(*k).enumerate() {
                            pos.push(((o * k + r) * inner + j, (o * len + p) * inner + j));
                            ii.push(p as i64);
                        }
                    }
                }
                // place results in output order
                let mut idx_out = vec![0i64; n_out];
                let mut src_map = vec![0usize; n_out];
                for (n, &(dst, src)) in pos.iter().enumerate() {
                    idx_out[dst] = ii[n];
                    src_map[dst] = src;
                }
                vi.extend(src_map.iter().copied());
                let values = Tensor {
                    dtype: x.dtype,
                    shape: oshape.clone(),
                    data: take_buf(&x.data, &vi),
                };
                let indices = Tensor {
                    dtype: DType::I64,
                    shape: out_shapes[1].clone(),
                    data: Buffer::I(idx_out),
                };
                Ok(vec![values, indices])
            }
            Op::OneHot { depth, dtype } => {
                let ids = a[0].to_i64();
                let mut hot = vec![false; n_out];
                for (r, &i) in ids.iter().enumerate() {
                    if i >= 0 && (i as usize) < *depth {
                        hot[r * depth + i as usize] = true;
                    }
                }
                t(if dtype.is_float() {
                    Buffer::F(hot.iter().map(|&h| if h { 1.0 } else { 0.0 }).collect())
                } else if dtype.is_int() {
                    Buffer::I(hot.iter().map(|&h| i64::from(h)).collect())
                } else {
                    Buffer::B(hot)
                })
            }
            Op::CumSum {
                axis,
                exclusive,
                reverse,
            } => {
                let x = a[0];
                let ax = norm_axis(*axis, x.shape.len())?;
                let (outer, len, inner) = split_at_axis(&x.shape, ax);
                let order: Vec<usize> = if *reverse {
                    (0..len).rev().collect()
                } else {
                    (0..len).collect()
                };
                macro_rules! scan {
                    ($v:expr, $zero:expr, $add:expr) => {{
                        let mut o = vec![$zero; n_out];
                        for ou in 0..outer {
                            for j in 0..inner {
                                let mut acc = $zero;
                                for &p in &order {
                                    let at = (ou * len + p) * inner + j;
                                    if *exclusive {
                                        o[at] = acc;
                                        acc = $add(acc, $v[at]);
                                    } else {
                                        acc = $add(acc, $v[at]);
                                        o[at] = acc;
                                    }
                                }
                            }
                        }
                        o
                    }};
                }
                t(match &x.data {
                    Buffer::F(v) => Buffer::F(scan!(v, 0.0f64, |p: f64, q: f64| p + q)),
                    Buffer::I(v) => Buffer::I(scan!(v, 0i64, |p: i64, q: i64| p.wrapping_add(q))),
                    Buffer::B(_) => return Err("cumsum on bool".into()),
                })
            }
            Op::Composite(_) => unreachable!("composites are run through their decomposition"),
        }
    }
}

/// Refuses, before running, a graph whose value shapes cannot be evaluated under the bound symbols (an unbound
/// symbol) or whose element counts do not fit 64 bits. Whether the values fit in memory is checked node by
/// node as the graph runs, against the interpreter's budget.
fn check_sizes(g: &Graph, env: &HashMap<String, i64>) -> Result<()> {
    for (id, n) in g.nodes() {
        let node_error = |message: String| IrError::Node {
            id: id.index(),
            name: n.name.clone(),
            op: n.op.name().to_string(),
            message,
        };
        for ty in &n.outputs {
            let shape = ty.shape.eval(env).map_err(node_error)?;
            if shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .is_none()
            {
                return Err(node_error(format!(
                    "its output {ty} = {shape:?} has more elements than a 64-bit count holds"
                )));
            }
        }
    }
    Ok(())
}

/// A memory budget and where it comes from (for the error message).
#[derive(Clone, Copy, Debug)]
struct Budget {
    bytes: u64,
    source: &'static str,
}

/// The memory the system reports available (Linux: `MemAvailable` in `/proc/meminfo`), if it can tell.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// Bytes one element takes in the interpreter (values are held widened: f64, i64, bool).
fn elem_bytes(dtype: DType) -> u64 {
    if dtype == DType::Bool {
        1
    } else {
        8
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.data.len() as u64).saturating_mul(elem_bytes(t.dtype))
}

/// What evaluating `node` allocates at most: its outputs and, for elementwise and layout ops, an index map of
/// one `usize` per output element and operand (broadcasting), bounded above by three times its outputs.
fn node_bytes(node: &Node, env: &HashMap<String, i64>) -> u64 {
    let out: u64 = node
        .outputs
        .iter()
        .map(|t| {
            let n = t
                .shape
                .eval(env)
                .ok()
                .and_then(|s| s.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64)))
                .unwrap_or(u64::MAX);
            n.saturating_mul(8).max(n.saturating_mul(elem_bytes(t.dtype)))
        })
        .fold(0u64, |a, b| a.saturating_add(b));
    out.saturating_mul(3)
}

/// `output f32[B, T] = [2, 40]` (or `outputs ...` for several).
fn describe_outputs(node: &Node, env: &HashMap<String, i64>) -> String {
    let parts: Vec<String> = node
        .outputs
        .iter()
        .map(|t| match t.shape.eval(env) {
            Ok(s) => format!("{t} = {s:?}"),
            Err(_) => t.to_string(),
        })
        .collect();
    let word = if parts.len() == 1 { "output" } else { "outputs" };
    format!("{word} {}", parts.join(", "))
}

/// Bytes in binary units: `12.0 GiB`.
pub fn fmt_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn fmt_env(env: &HashMap<String, i64>) -> String {
    let mut v: Vec<_> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    if v.is_empty() {
        "no symbols bound".into()
    } else {
        v.join(", ")
    }
}

/// Concrete broadcast of two shapes (exposed for tests and backends).
pub fn broadcast_concrete_shapes(a: &[usize], b: &[usize]) -> std::result::Result<Vec<usize>, String> {
    broadcast_concrete(a, b)
}
