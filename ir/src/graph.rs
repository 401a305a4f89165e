//! The dataflow graph and its builder API.
//!
//! A [`Graph`] is a `petgraph` directed graph of [`Node`]s. Every node holds an [`Op`], an optional name, the
//! ordered list of its input [`Value`]s and the types of its outputs (a node may have several outputs, e.g.
//! `topk`). Each input also appears as a petgraph edge (source output index → input slot), so graph algorithms
//! (topological order, reachability, DOT) work on the petgraph directly. Nodes are only ever appended: every
//! node's inputs precede it, so node order is a topological order.
//!
//! Adding a node infers its output types immediately (see [`crate::infer`]); an ill-typed node is refused with
//! an error naming the node, its op and the shapes involved.

use crate::dim::{Dim, Shape};
use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::infer::infer;
use crate::op::{BinaryOp, CmpOp, Composite, ConstData, Op, ReduceOp, UnaryOp};
use crate::types::TensorType;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use std::collections::HashMap;

/// Identifies a node of a graph.
pub type NodeId = NodeIndex<u32>;

/// One output of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeId,
    pub index: u32,
}

impl Value {
    pub fn new(node: NodeId, index: u32) -> Value {
        Value { node, index }
    }
}

/// A graph node.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub name: Option<String>,
    pub inputs: Vec<Value>,
    pub outputs: Vec<TensorType>,
}

/// A petgraph edge: which output of the source feeds which input slot of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub src_output: u32,
    pub dst_input: u32,
}

/// A dataflow graph with named inputs, parameters and outputs.
#[derive(Clone, Debug)]
pub struct Graph {
    pub name: String,
    g: DiGraph<Node, Edge>,
    outputs: Vec<(String, Value)>,
    input_names: HashMap<String, NodeId>,
    /// Prefix added to node names created through the builder (see [`Graph::scope`]).
    scope: Vec<String>,
}

impl PartialEq for Graph {
    fn eq(&self, other: &Graph) -> bool {
        self.name == other.name
            && self.outputs == other.outputs
            && self.g.node_count() == other.g.node_count()
            && self.g.node_weights().zip(other.g.node_weights()).all(|(a, b)| a == b)
    }
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            g: DiGraph::default(),
            outputs: Vec::new(),
            input_names: HashMap::new(),
            scope: Vec::new(),
        }
    }

    /// The underlying petgraph.
    pub fn petgraph(&self) -> &DiGraph<Node, Edge> {
        &self.g
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// Node ids in topological order (the insertion order).
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices()
    }

    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> + '_ {
        self.g.node_indices().map(move |i| (i, &self.g[i]))
    }

    /// The type of a value.
    pub fn ty(&self, v: Value) -> &TensorType {
        &self.g[v.node].outputs[v.index as usize]
    }

    pub fn dtype(&self, v: Value) -> DType {
        self.ty(v).dtype
    }

    pub fn shape(&self, v: Value) -> &Shape {
        &self.ty(v).shape
    }

    pub fn dims(&self, v: Value) -> &[Dim] {
        &self.ty(v).shape.0
    }

    pub fn rank(&self, v: Value) -> usize {
        self.ty(v).rank()
    }

    /// Named outputs in declaration order.
    pub fn outputs(&self) -> &[(String, Value)] {
        &self.outputs
    }

    /// Input and parameter nodes in order.
    pub fn inputs(&self) -> Vec<NodeId> {
        self.node_ids().filter(|&i| self.g[i].op.is_input()).collect()
    }

    /// Parameter nodes only.
    pub fn params(&self) -> Vec<NodeId> {
        self.node_ids()
            .filter(|&i| matches!(self.g[i].op, Op::Param { .. }))
            .collect()
    }

    /// The input or parameter node with that name.
    pub fn input_by_name(&self, name: &str) -> Option<NodeId> {
        self.input_names.get(name).copied()
    }

    /// Number of uses of every value (outputs count as uses).
    pub fn use_counts(&self) -> HashMap<Value, usize> {
        let mut m = HashMap::new();
        for (_, n) in self.nodes() {
            for &v in &n.inputs {
                *m.entry(v).or_insert(0) += 1;
            }
        }
        for (_, v) in &self.outputs {
            *m.entry(*v).or_insert(0) += 1;
        }
        m
    }

    /// Users of a node: (user node, input slot, which output of `id`).
    pub fn users(&self, id: NodeId) -> Vec<(NodeId, u32, u32)> {
        let mut v: Vec<_> = self
            .g
            .edges_directed(id, petgraph::Direction::Outgoing)
            .map(|e| (e.target(), e.weight().dst_input, e.weight().src_output))
            .collect();
        v.sort();
        v
    }

    fn error(&self, id: usize, name: Option<String>, op: &Op, message: impl Into<String>) -> IrError {
        IrError::Node {
            id,
            name,
            op: op.name().to_string(),
            message: message.into(),
        }
    }

    /// Appends a node after checking its inputs and inferring its output types.
    pub fn add_node(&mut self, op: Op, inputs: &[Value], name: Option<String>) -> Result<NodeId> {
        let id = self.g.node_count();
        for v in inputs {
            if v.node.index() >= id {
                return Err(self.error(id, name, &op, format!("input %{} does not exist", v.node.index())));
            }
            let n = &self.g[v.node];
            if v.index as usize >= n.outputs.len() {
                return Err(self.error(
                    id,
                    name,
                    &op,
                    format!(
                        "input %{}#{} does not exist: that node has {} output(s)",
                        v.node.index(),
                        v.index,
                        n.outputs.len()
                    ),
                ));
            }
        }
        if let Some((iname, _, _)) = op.input_decl() {
            if self.input_names.contains_key(iname) {
                return Err(self.error(
                    id,
                    name,
                    &op,
                    format!("an input or parameter named `{iname}` already exists"),
                ));
            }
        }
        let in_types: Vec<&TensorType> = inputs.iter().map(|&v| self.ty(v)).collect();
        let outputs = infer(&op, &in_types).map_err(|m| self.error(id, name.clone(), &op, m))?;
        Ok(self.push_typed(op, inputs, name, outputs))
    }

    /// Appends a node whose inputs exist and whose output types are already known to be what inference gives
    /// (a node copied from another valid graph over equally typed inputs).
    fn push_typed(&mut self, op: Op, inputs: &[Value], name: Option<String>, outputs: Vec<TensorType>) -> NodeId {
        let node = self.g.add_node(Node {
            op,
            name,
            inputs: inputs.to_vec(),
            outputs,
        });
        for (slot, v) in inputs.iter().enumerate() {
            self.g.add_edge(
                v.node,
                node,
                Edge {
                    src_output: v.index,
                    dst_input: slot as u32,
                },
            );
        }
        if let Some((iname, _, _)) = self.g[node].op.input_decl() {
            self.input_names.insert(iname.to_string(), node);
        }
        node
    }

    /// Declares a named output.
    pub fn add_output(&mut self, name: impl Into<String>, v: Value) -> Result<()> {
        let name = name.into();
        if v.node.index() >= self.g.node_count() || v.index as usize >= self.g[v.node].outputs.len() {
            return Err(IrError::Graph(format!(
                "output `{name}` refers to %{}#{}, which does not exist",
                v.node.index(),
                v.index
            )));
        }
        if self.outputs.iter().any(|(n, _)| n == &name) {
            return Err(IrError::Graph(format!("output `{name}` is declared twice")));
        }
        self.outputs.push((name, v));
        Ok(())
    }

    /// Re-checks every node's types and the graph's structure (used after deserialising or rewriting).
    pub fn verify(&self) -> Result<()> {
        let mut names = HashMap::new();
        for (id, n) in self.nodes() {
            for v in &n.inputs {
                if v.node >= id {
                    return Err(self.error(
                        id.index(),
                        n.name.clone(),
                        &n.op,
                        format!("input %{} does not precede the node", v.node.index()),
                    ));
                }
            }
            if let Some(k) = n.op.num_inputs() {
                if n.inputs.len() != k {
                    return Err(self.error(
                        id.index(),
                        n.name.clone(),
                        &n.op,
                        format!("expects {k} input(s), got {}", n.inputs.len()),
                    ));
                }
            }
            let in_types: Vec<&TensorType> = n.inputs.iter().map(|&v| self.ty(v)).collect();
            let out = infer(&n.op, &in_types).map_err(|m| self.error(id.index(), n.name.clone(), &n.op, m))?;
            if out != n.outputs {
                return Err(self.error(
                    id.index(),
                    n.name.clone(),
                    &n.op,
                    "stored output types differ from inferred ones",
                ));
            }
            if let Some((iname, _, _)) = n.op.input_decl() {
                if names.insert(iname.to_string(), id).is_some() {
                    return Err(IrError::Graph(format!(
                        "input or parameter `{iname}` is declared twice"
                    )));
                }
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- builder

    /// Runs `f` with `name` appended to the name scope: nodes created inside are named `scope.op`.
    pub fn scope<T>(&mut self, name: impl Into<String>, f: impl FnOnce(&mut Graph) -> Result<T>) -> Result<T> {
        self.scope.push(name.into());
        let r = f(self);
        self.scope.pop();
        r
    }

    /// Enters a name scope (see [`Graph::scope`]); pair with [`Graph::pop_scope`].
    pub fn push_scope(&mut self, name: impl Into<String>) {
        self.scope.push(name.into());
    }

    /// Leaves the innermost name scope.
    pub fn pop_scope(&mut self) {
        self.scope.pop();
    }

    fn scoped_name(&self, base: &str) -> Option<String> {
        if self.scope.is_empty() {
            None
        } else {
            Some(format!("{}.{base}", self.scope.join(".")))
        }
    }

    /// Adds a node in the current scope and returns its outputs.
    pub fn op(&mut self, op: Op, inputs: &[Value]) -> Result<Vec<Value>> {
        let name = self.scoped_name(op.name());
        let id = self.add_node(op, inputs, name)?;
        Ok((0..self.g[id].outputs.len() as u32)
            .map(|i| Value::new(id, i))
            .collect())
    }

    /// Adds a one-output node in the current scope.
    pub fn op1(&mut self, op: Op, inputs: &[Value]) -> Result<Value> {
        Ok(self.op(op, inputs)?[0])
    }

    /// Adds a one-output node with an explicit name (the scope is prefixed).
    pub fn named(&mut self, name: &str, op: Op, inputs: &[Value]) -> Result<Value> {
        let full = self.scoped_name(name).unwrap_or_else(|| name.to_string());
        let id = self.add_node(op, inputs, Some(full))?;
        Ok(Value::new(id, 0))
    }

    pub fn input(&mut self, name: &str, dtype: DType, dims: Vec<Dim>) -> Result<Value> {
        let ty = TensorType::new(dtype, dims);
        let id = self.add_node(
            Op::Input {
                name: name.to_string(),
                ty,
            },
            &[],
            None,
        )?;
        Ok(Value::new(id, 0))
    }

    pub fn param(&mut self, name: &str, dtype: DType, dims: Vec<Dim>) -> Result<Value> {
        let ty = TensorType::new(dtype, dims);
        let id = self.add_node(
            Op::Param {
                name: name.to_string(),
                ty,
            },
            &[],
            None,
        )?;
        Ok(Value::new(id, 0))
    }

    /// A scalar constant (shape `[]`).
    pub fn scalar(&mut self, value: f64, dtype: DType) -> Result<Value> {
        let data = if dtype.is_float() {
            ConstData::Float(vec![value])
        } else if dtype.is_int() {
            ConstData::Int(vec![value as i64])
        } else {
            ConstData::Bool(vec![value != 0.0])
        };
        self.op1(
            Op::Constant {
                dtype,
                shape: vec![],
                data,
            },
            &[],
        )
    }

    /// A scalar constant with `x`'s dtype.
    pub fn scalar_like(&mut self, value: f64, x: Value) -> Result<Value> {
        let dt = self.dtype(x);
        self.scalar(value, dt)
    }

    pub fn constant(&mut self, dtype: DType, shape: Vec<usize>, data: ConstData) -> Result<Value> {
        self.op1(Op::Constant { dtype, shape, data }, &[])
    }

    pub fn full(&mut self, value: f64, dtype: DType, dims: Vec<Dim>) -> Result<Value> {
        self.op1(
            Op::Full {
                value,
                dtype,
                shape: Shape(dims),
            },
            &[],
        )
    }

    pub fn iota(&mut self, dtype: DType, dims: Vec<Dim>, axis: i64) -> Result<Value> {
        self.op1(
            Op::Iota {
                dtype,
                shape: Shape(dims),
                axis,
            },
            &[],
        )
    }

    pub fn unary(&mut self, op: UnaryOp, x: Value) -> Result<Value> {
        self.op1(Op::Unary(op), &[x])
    }

    pub fn binary(&mut self, op: BinaryOp, a: Value, b: Value) -> Result<Value> {
        self.op1(Op::Binary(op), &[a, b])
    }

    pub fn compare(&mut self, op: CmpOp, a: Value, b: Value) -> Result<Value> {
        self.op1(Op::Compare(op), &[a, b])
    }

    pub fn add(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryOp::Add, a, b)
    }
    pub fn sub(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryOp::Sub, a, b)
    }
    pub fn mul(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryOp::Mul, a, b)
    }
    pub fn div(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryOp::Div, a, b)
    }
    pub fn maximum(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary(BinaryOp::Max, a, b)
    }
    /// `x * c` for a scalar `c` of `x`'s dtype.
    pub fn scale(&mut self, x: Value, c: f64) -> Result<Value> {
        let s = self.scalar_like(c, x)?;
        self.mul(x, s)
    }
    /// `x + c` for a scalar `c` of `x`'s dtype.
    pub fn add_scalar(&mut self, x: Value, c: f64) -> Result<Value> {
        let s = self.scalar_like(c, x)?;
        self.add(x, s)
    }
    pub fn neg(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Neg, x)
    }
    pub fn exp(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Exp, x)
    }
    pub fn log(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Log, x)
    }
    pub fn sqrt(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Sqrt, x)
    }
    pub fn rsqrt(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Rsqrt, x)
    }
    pub fn sigmoid(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Sigmoid, x)
    }
    pub fn silu(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Silu, x)
    }
    pub fn sin(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Sin, x)
    }
    pub fn cos(&mut self, x: Value) -> Result<Value> {
        self.unary(UnaryOp::Cos, x)
    }

    pub fn select(&mut self, cond: Value, a: Value, b: Value) -> Result<Value> {
        self.op1(Op::Select, &[cond, a, b])
    }

    pub fn cast(&mut self, x: Value, dtype: DType) -> Result<Value> {
        if self.dtype(x) == dtype {
            return Ok(x);
        }
        self.op1(Op::Cast { dtype }, &[x])
    }

    pub fn matmul(&mut self, a: Value, b: Value) -> Result<Value> {
        self.op1(Op::MatMul, &[a, b])
    }

    /// `x · wᵀ` for a weight `w` stored `[out, in]` (a bias-free linear layer).
    pub fn linear(&mut self, x: Value, w: Value) -> Result<Value> {
        let wt = self.transpose(w, -2, -1)?;
        self.matmul(x, wt)
    }

    pub fn reduce(&mut self, op: ReduceOp, x: Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        self.op1(
            Op::Reduce {
                op,
                axes: axes.to_vec(),
                keepdims,
            },
            &[x],
        )
    }
    pub fn sum(&mut self, x: Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        self.reduce(ReduceOp::Sum, x, axes, keepdims)
    }
    pub fn mean(&mut self, x: Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        self.reduce(ReduceOp::Mean, x, axes, keepdims)
    }
    pub fn max(&mut self, x: Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        self.reduce(ReduceOp::Max, x, axes, keepdims)
    }

    pub fn reshape(&mut self, x: Value, dims: Vec<Dim>) -> Result<Value> {
        if self.dims(x) == dims.as_slice() {
            return Ok(x);
        }
        self.op1(Op::Reshape { shape: Shape(dims) }, &[x])
    }

    pub fn permute(&mut self, x: Value, perm: &[usize]) -> Result<Value> {
        if perm.iter().enumerate().all(|(i, &p)| i == p) && perm.len() == self.rank(x) {
            return Ok(x);
        }
        self.op1(Op::Permute { perm: perm.to_vec() }, &[x])
    }

    /// Swaps two axes (negative axes count from the end).
    pub fn transpose(&mut self, x: Value, a: i64, b: i64) -> Result<Value> {
        let r = self.rank(x) as i64;
        let norm = |ax: i64| if ax < 0 { ax + r } else { ax };
        let (a, b) = (norm(a), norm(b));
        if a < 0 || b < 0 || a >= r || b >= r {
            return Err(IrError::Graph(format!(
                "transpose axes ({a}, {b}) out of range for rank {r}"
            )));
        }
        let mut perm: Vec<usize> = (0..r as usize).collect();
        perm.swap(a as usize, b as usize);
        self.permute(x, &perm)
    }

    pub fn broadcast(&mut self, x: Value, dims: Vec<Dim>) -> Result<Value> {
        if self.dims(x) == dims.as_slice() {
            return Ok(x);
        }
        self.op1(Op::Broadcast { shape: Shape(dims) }, &[x])
    }

    pub fn slice(&mut self, x: Value, axis: i64, start: impl Into<Dim>, end: impl Into<Dim>) -> Result<Value> {
        self.op1(
            Op::Slice {
                axis,
                start: start.into(),
                end: end.into(),
            },
            &[x],
        )
    }

    pub fn concat(&mut self, xs: &[Value], axis: i64) -> Result<Value> {
        self.op1(Op::Concat { axis }, xs)
    }

    pub fn gather(&mut self, data: Value, indices: Value, axis: i64) -> Result<Value> {
        self.op1(Op::Gather { axis }, &[data, indices])
    }

    pub fn scatter_add(&mut self, data: Value, indices: Value, updates: Value, axis: i64) -> Result<Value> {
        self.op1(Op::ScatterAdd { axis }, &[data, indices, updates])
    }

    /// Returns (values, indices).
    pub fn topk(&mut self, x: Value, k: usize, axis: i64) -> Result<(Value, Value)> {
        let v = self.op(Op::TopK { k, axis }, &[x])?;
        Ok((v[0], v[1]))
    }

    pub fn one_hot(&mut self, indices: Value, depth: usize, dtype: DType) -> Result<Value> {
        self.op1(Op::OneHot { depth, dtype }, &[indices])
    }

    pub fn cumsum(&mut self, x: Value, axis: i64, exclusive: bool, reverse: bool) -> Result<Value> {
        self.op1(
            Op::CumSum {
                axis,
                exclusive,
                reverse,
            },
            &[x],
        )
    }

    pub fn softmax(&mut self, x: Value, axis: i64) -> Result<Value> {
        self.op1(Op::Composite(Composite::Softmax { axis }), &[x])
    }

    pub fn log_softmax(&mut self, x: Value, axis: i64) -> Result<Value> {
        self.op1(Op::Composite(Composite::LogSoftmax { axis }), &[x])
    }

    pub fn rms_norm(&mut self, x: Value, w: Value, eps: f64) -> Result<Value> {
        self.op1(Op::Composite(Composite::RmsNorm { eps }), &[x, w])
    }

    /// `lightning_attention[block](q, k, v, lam)`: causal decayed linear attention, `[batch..., T, Dv]`.
    pub fn lightning_attention(&mut self, q: Value, k: Value, v: Value, lam: Value, block: usize) -> Result<Value> {
        self.op1(Op::Composite(Composite::LightningAttention { block }), &[q, k, v, lam])
    }

    /// `flash_attention[scale, causal](q, k, v)`: `softmax(q kᵀ · scale + mask) v`.
    pub fn flash_attention(&mut self, q: Value, k: Value, v: Value, scale: f64, causal: bool) -> Result<Value> {
        self.op1(Op::Composite(Composite::FlashAttention { scale, causal }), &[q, k, v])
    }

    /// `moe_router[k](logits)`; returns (weights, experts).
    pub fn moe_router(&mut self, logits: Value, k: usize) -> Result<(Value, Value)> {
        let v = self.op(Op::Composite(Composite::MoeRouter { k }), &[logits])?;
        Ok((v[0], v[1]))
    }

    /// `moe_dispatch[experts](x, ids)`; returns (xs, pos, counts).
    pub fn moe_dispatch(&mut self, x: Value, ids: Value, experts: usize) -> Result<(Value, Value, Value)> {
        let v = self.op(Op::Composite(Composite::MoeDispatch { experts }), &[x, ids])?;
        Ok((v[0], v[1], v[2]))
    }

    /// `grouped_matmul[swiglu](xs, counts, w)`.
    pub fn grouped_matmul(&mut self, xs: Value, counts: Value, w: Value, swiglu: bool) -> Result<Value> {
        self.op1(Op::Composite(Composite::GroupedMatmul { swiglu }), &[xs, counts, w])
    }

    /// `flash_attention_grad[scale, causal](q, k, v, do)`; returns (dq, dk, dv).
    pub fn flash_attention_grad(
        &mut self,
        q: Value,
        k: Value,
        v: Value,
        d_out: Value,
        scale: f64,
        causal: bool,
    ) -> Result<(Value, Value, Value)> {
        let o = self.op(
            Op::Composite(Composite::FlashAttentionGrad { scale, causal }),
            &[q, k, v, d_out],
        )?;
        Ok((o[0], o[1], o[2]))
    }

    /// `grouped_matmul_wgrad(xs, counts, dy)`: the per-group weight gradient `[E, C, O]`.
    pub fn grouped_matmul_wgrad(&mut self, xs: Value, counts: Value, dy: Value) -> Result<Value> {
        self.op1(Op::Composite(Composite::GroupedMatmulWgrad), &[xs, counts, dy])
    }

    /// `moe_combine(ys, pos, weights)`.
    pub fn moe_combine(&mut self, ys: Value, pos: Value, weights: Value) -> Result<Value> {
        self.op1(Op::Composite(Composite::MoeCombine), &[ys, pos, weights])
    }

    // ------------------------------------------------------------ rewriting

    /// Returns a copy without nodes that no output depends on; node order (and so topological order) kept.
    pub fn dead_code_eliminated(&self) -> Graph {
        let mut live = vec![false; self.g.node_count()];
        let mut stack: Vec<NodeId> = self.outputs.iter().map(|(_, v)| v.node).collect();
        // inputs and parameters are part of the signature: keep them
        stack.extend(self.inputs());
        while let Some(n) = stack.pop() {
            if live[n.index()] {
                continue;
            }
            live[n.index()] = true;
            stack.extend(self.g[n].inputs.iter().map(|v| v.node));
        }
        if live.iter().all(|&l| l) {
            return self.clone();
        }
        let mut out = Graph::new(self.name.clone());
        let mut map: Vec<NodeId> = vec![NodeId::new(0); self.g.node_count()];
        for (id, n) in self.nodes() {
            if !live[id.index()] {
                continue;
            }
            let inputs: Vec<Value> = n
                .inputs
                .iter()
                .map(|v| Value::new(map[v.node.index()], v.index))
                .collect();
            // the same op over the same types: no need to infer again
            map[id.index()] = out.push_typed(n.op.clone(), &inputs, n.name.clone(), n.outputs.clone());
        }
        for (name, v) in &self.outputs {
            out.add_output(name.clone(), Value::new(map[v.node.index()], v.index))
                .expect("outputs of a valid graph");
        }
        out
    }

    /// Summary counts: (nodes, data inputs, parameters, outputs).
    pub fn summary(&self) -> GraphSummary {
        let mut s = GraphSummary {
            nodes: self.node_count(),
            outputs: self.outputs.len(),
            ..Default::default()
        };
        for (_, n) in self.nodes() {
            match &n.op {
                Op::Input { .. } => s.inputs += 1,
                Op::Param { ty, .. } => {
                    s.params += 1;
                    if let Some(c) = ty.shape.numel().as_const() {
                        s.param_elements += c as u64;
                    }
                }
                _ => {}
            }
            *s.op_counts.entry(n.op.name().to_string()).or_insert(0) += 1;
        }
        s.symbols = {
            let mut v: Vec<String> = self
                .nodes()
                .filter_map(|(_, n)| n.op.input_decl().map(|(_, t, _)| t.shape.symbols()))
                .flatten()
                .collect();
            v.sort();
            v.dedup();
            v
        };
        s
    }
}

/// Counts printed by `fulgur check`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GraphSummary {
    pub nodes: usize,
    pub inputs: usize,
    pub params: usize,
    pub outputs: usize,
    pub param_elements: u64,
    pub symbols: Vec<String>,
    pub op_counts: std::collections::BTreeMap<String, usize>,
}
