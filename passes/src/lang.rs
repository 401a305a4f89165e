//! The `egg` language mirroring the IR, its shape/dtype analysis, and conversion Graph ↔ e-graph.
//!
//! An e-node ([`FNode`]) is an IR [`Op`] with its attributes in the payload ([`OpKey`], compared by its
//! canonical text, e.g. `reduce_sum[axes=[-1], keepdims=true]`) plus child e-class ids, one per input. A node
//! with several outputs (`topk`, the MoE composites) is a *tuple* e-class; its outputs are
//! [`FOp::Proj`] e-nodes over it. Graph inputs, parameters and constants are leaves whose payload includes their
//! name, type or values, so distinct leaves never merge.
//!
//! The analysis ([`ShapeAnalysis`]) gives each e-class the types of its outputs (one for an ordinary value,
//! several for a tuple), inferred with the IR's own typing rules. Two classes with different types must never
//! merge: `merge` records such a conflict (a rule bug) and the optimizer reports it as an error. Rules add
//! right-hand sides through [`add_checked`], which refuses an ill-typed node instead of adding it.

use egg::{DidMerge, Id, Language};
use fulgur_ir::infer::infer;
use fulgur_ir::{Graph, Op, TensorType, Value};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// An IR op in an e-node's payload, compared by its canonical text.
#[derive(Clone, Debug)]
pub struct OpKey {
    text: Arc<str>,
    op: Arc<Op>,
}

impl OpKey {
    pub fn new(op: Op) -> OpKey {
        OpKey {
            text: op_text(&op).into(),
            op: Arc::new(op),
        }
    }
    pub fn op(&self) -> &Op {
        &self.op
    }
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl PartialEq for OpKey {
    fn eq(&self, o: &OpKey) -> bool {
        self.text == o.text
    }
}
impl Eq for OpKey {}
impl std::hash::Hash for OpKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.text.hash(h)
    }
}
impl PartialOrd for OpKey {
    fn partial_cmp(&self, o: &OpKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for OpKey {
    fn cmp(&self, o: &OpKey) -> std::cmp::Ordering {
        self.text.cmp(&o.text)
    }
}

/// Canonical text of an op: `name[attrs]` as the `.fir` format writes it; inputs and parameters as
/// `input "name" : type` / `param "name" : type`.
pub fn op_text(op: &Op) -> String {
    match op {
        Op::Input { name, ty } => format!("input {} : {ty}", fulgur_ir::op::quote(name)),
        Op::Param { name, ty } => format!("param {} : {ty}", fulgur_ir::op::quote(name)),
        op => {
            let attrs = op.attrs();
            if attrs.is_empty() {
                op.name().to_string()
            } else {
                let a: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{}[{}]", op.name(), a.join(", "))
            }
        }
    }
}

/// The operator of an e-node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FOp {
    /// An IR op.
    Op(OpKey),
    /// Output `#i` of a multi-output (tuple) e-class.
    Proj(u32),
}

/// An e-node: an operator and its children (one e-class per input).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FNode {
    pub op: FOp,
    pub children: Vec<Id>,
}

impl FNode {
    pub fn new(op: Op, children: Vec<Id>) -> FNode {
        FNode {
            op: FOp::Op(OpKey::new(op)),
            children,
        }
    }
    pub fn proj(tuple: Id, i: u32) -> FNode {
        FNode {
            op: FOp::Proj(i),
            children: vec![tuple],
        }
    }
    /// The IR op, if this is not a projection.
    pub fn ir_op(&self) -> Option<&Op> {
        match &self.op {
            FOp::Op(k) => Some(k.op()),
            FOp::Proj(_) => None,
        }
    }
}

impl Language for FNode {
    type Discriminant = FOp;
    fn discriminant(&self) -> FOp {
        self.op.clone()
    }
    fn matches(&self, other: &Self) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }
    fn children(&self) -> &[Id] {
        &self.children
    }
    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl fmt::Display for FNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            FOp::Op(k) => f.write_str(k.text()),
            FOp::Proj(i) => write!(f, "proj#{i}"),
        }
    }
}

impl egg::FromOp for FNode {
    type Error = String;
    /// Parses `proj#i`, `input "x" : type`, `param "w" : type`, or an op with attributes as the text format
    /// writes it (`permute[perm=[0, 2, 1, 3]]`; inside an egg pattern, write it without spaces).
    fn from_op(op: &str, children: Vec<Id>) -> Result<Self, String> {
        if let Some(i) = op.strip_prefix("proj#") {
            let i: u32 = i.parse().map_err(|_| format!("bad projection `{op}`"))?;
            return Ok(FNode {
                op: FOp::Proj(i),
                children,
            });
        }
        for (kw, param) in [("input ", false), ("param ", true)] {
            if let Some(rest) = op.strip_prefix(kw) {
                let src = format!("graph g {{ %0 = {kw}{rest} }}");
                let g = fulgur_ir::text::parse(&src).map_err(|e| format!("bad leaf `{op}`: {e}"))?;
                let n = g.node(g.node_ids().next().ok_or("empty leaf")?);
                let _ = param;
                return Ok(FNode::new(n.op.clone(), children));
            }
        }
        let parsed = fulgur_ir::text::parse_op(op)?;
        Ok(FNode::new(parsed, children))
    }
}

/// Per-e-class data: the output types, the scalar value if the class is a scalar constant, and whether a
/// merge ever joined classes of different types.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassData {
    /// Output types; empty when inference failed (a node that should not have been added).
    pub types: Vec<TensorType>,
    /// The value, when the class holds a scalar (or all-equal) constant.
    pub scalar: Option<f64>,
    /// Set when classes of different types were merged (a rule bug), with both types.
    pub conflict: Option<String>,
    /// The value depends on parameters and constants only (no data input): it is prepared once when the
    /// weights are loaded (e.g. a transposed weight layout), not on every run.
    pub param_only: bool,
    /// The class is an output of the graph the e-graph was built from ([`graph_to_egraph`]: a graph output, or
    /// for a template a value used outside its segment). Its value is needed as it is, so a fused region ends
    /// there rather than only recomputing it inside a consumer.
    pub output: bool,
}

impl ClassData {
    /// The single type of an ordinary (non-tuple) class.
    pub fn ty(&self) -> Option<&TensorType> {
        if self.types.len() == 1 {
            self.types.first()
        } else {
            None
        }
    }
}

/// Shape and dtype analysis, and what the rules remember about one e-graph.
#[derive(Default, Clone, Debug)]
pub struct ShapeAnalysis {
    /// Signatures of the fused regions the fusion family has already built in this e-graph (growing a region
    /// again in a later iteration gives the same kernel: it is not built twice).
    pub(crate) fused_seen: std::collections::HashSet<u64>,
}

/// The e-graph type of the optimizer.
pub type EGraph = egg::EGraph<FNode, ShapeAnalysis>;
/// A rewrite rule of the optimizer.
pub type Rewrite = egg::Rewrite<FNode, ShapeAnalysis>;

/// Types of a node given its children's classes (an error message when the node is ill-typed).
pub fn node_types(egraph: &EGraph, node: &FNode) -> Result<Vec<TensorType>, String> {
    match &node.op {
        FOp::Proj(i) => {
            let t = &egraph[node.children[0]].data.types;
            t.get(*i as usize)
                .cloned()
                .map(|t| vec![t])
                .ok_or_else(|| format!("projection #{i} of a {}-tuple", t.len()))
        }
        FOp::Op(k) => {
            let mut ins = Vec::with_capacity(node.children.len());
            for &c in &node.children {
                match egraph[c].data.ty() {
                    Some(t) => ins.push(t),
                    None => return Err("an input is a tuple or ill-typed".into()),
                }
            }
            infer(k.op(), &ins)
        }
    }
}

fn scalar_of(op: &Op) -> Option<f64> {
    match op {
        Op::Constant {
            data: fulgur_ir::ConstData::Float(v),
            ..
        } if !v.is_empty() && v.iter().all(|x| *x == v[0]) => Some(v[0]),
        Op::Constant {
            data: fulgur_ir::ConstData::Int(v),
            ..
        } if !v.is_empty() && v.iter().all(|x| *x == v[0]) => Some(v[0] as f64),
        Op::Full { value, .. } => Some(*value),
        _ => None,
    }
}

impl egg::Analysis<FNode> for ShapeAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut EGraph, enode: &FNode, _id: Id) -> ClassData {
        let types = node_types(egraph, enode).unwrap_or_default();
        let scalar = enode.ir_op().and_then(scalar_of);
        let param_only = match enode.ir_op() {
            Some(Op::Input { .. }) => false,
            Some(op) if op.num_inputs() == Some(0) => true,
            _ => !enode.children.is_empty() && enode.children.iter().all(|&c| egraph[c].data.param_only),
        };
        ClassData {
            types,
            scalar,
            conflict: None,
            param_only,
            output: false,
        }
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        let mut changed_a = false;
        if a.types != b.types && a.conflict.is_none() {
            if a.types.is_empty() {
                a.types = b.types.clone();
                changed_a = true;
            } else if !b.types.is_empty() {
                let show = |t: &[TensorType]| t.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ");
                a.conflict = Some(format!(
                    "merged classes of types ({}) and ({})",
                    show(&a.types),
                    show(&b.types)
                ));
                changed_a = true;
            }
        }
        if a.scalar.is_none() && b.scalar.is_some() {
            a.scalar = b.scalar;
            changed_a = true;
        }
        if b.param_only && !a.param_only {
            a.param_only = true;
            changed_a = true;
        }
        if b.conflict.is_some() && a.conflict.is_none() {
            a.conflict = b.conflict.clone();
            changed_a = true;
        }
        if b.output && !a.output {
            a.output = true;
            changed_a = true;
        }
        DidMerge(
            changed_a,
            a.types != b.types || a.scalar != b.scalar || a.param_only != b.param_only || a.output != b.output,
        )
    }
}

/// Adds `node` if it is well typed; `None` (nothing added) otherwise. Rules add right-hand sides through this.
pub fn add_checked(egraph: &mut EGraph, node: FNode) -> Option<Id> {
    match node_types(egraph, &node) {
        Ok(t) if !t.is_empty() => Some(egraph.add(node)),
        _ => None,
    }
}

/// Adds an IR op over child classes, checked.
pub fn add_op(egraph: &mut EGraph, op: Op, children: &[Id]) -> Option<Id> {
    add_checked(egraph, FNode::new(op, children.to_vec()))
}

/// The e-classes standing for a graph's values after [`graph_to_egraph`].
#[derive(Clone, Debug, Default)]
pub struct ValueMap {
    pub ids: HashMap<Value, Id>,
}

impl ValueMap {
    pub fn get(&self, v: Value) -> Id {
        self.ids[&v]
    }
}

/// Adds every node of `g` to `egraph`; returns the class of every value. The classes of `g`'s outputs are
/// marked ([`ClassData::output`]).
pub fn graph_to_egraph(g: &Graph, egraph: &mut EGraph) -> ValueMap {
    let mut map = ValueMap::default();
    for (id, n) in g.nodes() {
        let children: Vec<Id> = n.inputs.iter().map(|v| map.ids[v]).collect();
        let class = egraph.add(FNode::new(n.op.clone(), children));
        if n.outputs.len() == 1 {
            map.ids.insert(Value::new(id, 0), class);
        } else {
            for i in 0..n.outputs.len() {
                let p = egraph.add(FNode::proj(class, i as u32));
                map.ids.insert(Value::new(id, i as u32), p);
            }
        }
    }
    for (_, v) in g.outputs() {
        let c = egraph.find(map.ids[v]);
        egraph[c].data.output = true;
    }
    map
}

/// Shape check used by rules' conditions: the class's single type.
pub fn class_ty(egraph: &EGraph, id: Id) -> Option<TensorType> {
    egraph[id].data.ty().cloned()
}

/// The IR ops present in an e-class.
pub fn class_ops(egraph: &EGraph, id: Id) -> impl Iterator<Item = (&Op, &[Id])> {
    egraph[id]
        .nodes
        .iter()
        .filter_map(|n| n.ir_op().map(|op| (op, n.children.as_slice())))
}
