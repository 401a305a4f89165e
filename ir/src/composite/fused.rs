//! `fused`: a fused kernel, written as the small graph it computes.
//!
//! `fused(a0, ..., aN) { body }` (in `.fir`, the body is a block after the node; see [`crate::text`]) means: run
//! the body graph with its inputs `arg0..argN` bound to `a0..aN` and return its outputs (one, as the optimizer's
//! fusion writes them; several where the kernel program merges sibling kernels into one, `codegen::program`). The body is ordinary IR (primitives and composites other than
//! `fused`), so a pass that fuses a subgraph into one kernel puts *that subgraph* in the body, and the fused
//! node means exactly what was there.
//!
//! A [`FusedBody`] is held as its canonical `.fir` text (the graph named `fused`, printed by
//! [`crate::text::print`]), which is its identity — equality, hashing and serialisation go by the text — plus the
//! parsed graph, so typing and inlining never re-parse.
//!
//! Rules for a body (checked by [`FusedBody::from_graph`] and [`FusedBody::parse`]):
//! - its inputs are `input` nodes named `arg0`, `arg1`, … in node order (at least one), and it has no `param`s;
//! - it has at least one output;
//! - it contains no `fused` node;
//! - every symbol used in an op attribute of the body (a `reshape`/`broadcast`/`full`/`iota` shape, a `slice`
//!   bound) also appears alone as a dimension of some argument, so the body can be instantiated for the
//!   shapes of any call (the interpreter instantiates it for concrete shapes).
//!
//! Typing: the node's inputs must have exactly the argument types the body declares (symbolic dims compared
//! as polynomials); the results are the body's output types, in order.

use crate::dim::Dim;
use crate::error::{IrError, Result};
use crate::graph::{Graph, Value};
use crate::op::{Composite, Op};
use crate::types::TensorType;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// The body of a `fused` node: a graph with inputs `arg0..argN` and its outputs, held as its canonical text
/// and its parsed form.
///
/// ```
/// use fulgur_ir::op::FusedBody;
/// let b = FusedBody::parse(
///     "graph k {\n  %0 = input \"arg0\" : f32[N]\n  %1 = exp(%0) : f32[N]\n  output \"out\" = %1\n}",
/// )
/// .unwrap();
/// assert_eq!(b.num_args(), 1);
/// assert_eq!(b.output_type().to_string(), "f32[N]");
/// assert!(b.text().starts_with("graph fused {"));
/// ```
#[derive(Clone)]
pub struct FusedBody {
    text: Arc<str>,
    graph: Arc<Graph>,
}

impl FusedBody {
    /// Parses and checks a body from `.fir` text; the stored text is the canonical print (graph named `fused`).
    pub fn parse(text: &str) -> std::result::Result<FusedBody, String> {
        let g = crate::text::parse(text).map_err(|e| e.to_string())?;
        FusedBody::from_graph(&g)
    }

    /// Checks `g` as a body (see the [module documentation](self)) and makes its canonical form.
    pub fn from_graph(g: &Graph) -> std::result::Result<FusedBody, String> {
        if !g.params().is_empty() {
            return Err("a fused body has no parameters: its inputs are `input \"arg0\"`, `input \"arg1\"`, …".into());
        }
        let inputs = g.inputs();
        if inputs.is_empty() {
            return Err("a fused body needs at least one input `arg0`".into());
        }
        let mut bound: BTreeSet<String> = BTreeSet::new();
        for (i, &id) in inputs.iter().enumerate() {
            let Some((name, ty, _)) = g.node(id).op.input_decl() else {
                continue;
            };
            if name != format!("arg{i}") {
                return Err(format!(
                    "the inputs of a fused body must be `arg0`, `arg1`, … in order; input {i} is `{name}`"
                ));
            }
            for d in ty.dims() {
                if let [s] = d.symbols().as_slice() {
                    if *d == Dim::sym(s) {
                        bound.insert(s.clone());
                    }
                }
            }
        }
        if g.outputs().is_empty() {
            return Err("a fused body has at least one output, this one has 0".into());
        }
        for (id, n) in g.nodes() {
            if matches!(n.op, Op::Composite(Composite::Fused { .. })) {
                return Err(format!("node %{} of a fused body is itself `fused`", id.index()));
            }
            for s in attr_symbols(&n.op) {
                if !bound.contains(&s) {
                    return Err(format!(
                        "symbol `{s}` in the attributes of node %{} ({}) is not a dimension of any argument",
                        id.index(),
                        n.op.name()
                    ));
                }
            }
        }
        let mut g = g.clone();
        g.name = "fused".into();
        let text: Arc<str> = crate::text::print(&g).into();
        Ok(FusedBody {
            text,
            graph: Arc::new(g),
        })
    }

    /// The body with symbols replaced by `env` in its argument types and attributes (symbols not in `env`
    /// stay): the body for given shapes.
    pub fn substitute(&self, env: &HashMap<String, Dim>) -> std::result::Result<FusedBody, String> {
        let bg = self.graph();
        let mut g = Graph::new("fused");
        let mut map: HashMap<Value, Value> = HashMap::new();
        for (id, n) in bg.nodes() {
            let v = match &n.op {
                Op::Input { name, ty } => {
                    let dims = ty.dims().iter().map(|d| d.substitute(env)).collect();
                    g.input(name, ty.dtype, dims).map_err(|e| e.to_string())?
                }
                op => {
                    let ins: Vec<Value> = n.inputs.iter().map(|v| map[v]).collect();
                    let nid = g
                        .add_node(op.substitute_dims(env), &ins, n.name.clone())
                        .map_err(|e| e.to_string())?;
                    for i in 1..n.outputs.len() {
                        map.insert(Value::new(id, i as u32), Value::new(nid, i as u32));
                    }
                    Value::new(nid, 0)
                }
            };
            map.insert(Value::new(id, 0), v);
        }
        for (name, v) in bg.outputs() {
            g.add_output(name.clone(), map[v]).map_err(|e| e.to_string())?;
        }
        FusedBody::from_graph(&g)
    }

    /// The canonical `.fir` text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The body graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Number of arguments (`arg0..`).
    pub fn num_args(&self) -> usize {
        self.graph.inputs().len()
    }

    /// The declared argument types, in order.
    pub fn arg_types(&self) -> Vec<&TensorType> {
        self.graph
            .inputs()
            .into_iter()
            .map(|id| &self.graph.node(id).outputs[0])
            .collect()
    }

    /// The body's (first) output value.
    pub fn output(&self) -> Value {
        self.graph.outputs()[0].1
    }

    /// The type of the body's (first) output (the fused node's type where it has one output).
    pub fn output_type(&self) -> &TensorType {
        self.graph.ty(self.output())
    }

    /// The number of outputs.
    pub fn num_outputs(&self) -> usize {
        self.graph.outputs().len()
    }

    /// The fused node's output types given its inputs' types: the arguments must match exactly.
    pub fn infer(&self, ins: &[&TensorType]) -> std::result::Result<Vec<TensorType>, String> {
        let args = self.arg_types();
        if ins.len() != args.len() {
            return Err(format!(
                "`fused` expects {} input(s) (its body's arguments), got {}",
                args.len(),
                ins.len()
            ));
        }
        for (i, (got, want)) in ins.iter().zip(&args).enumerate() {
            if got != want {
                return Err(format!("`fused`: input {i} is {got}, the body's `arg{i}` is {want}"));
            }
        }
        Ok(self
            .graph
            .outputs()
            .iter()
            .map(|(_, v)| self.graph.ty(*v).clone())
            .collect())
    }
}

/// Symbols used in an op's attributes (not in its operand types).
fn attr_symbols(op: &Op) -> Vec<String> {
    let mut v = match op {
        Op::Full { shape, .. } | Op::Iota { shape, .. } | Op::Reshape { shape } | Op::Broadcast { shape } => {
            shape.symbols()
        }
        Op::Slice { start, end, .. } => {
            let mut s = start.symbols();
            s.extend(end.symbols());
            s
        }
        _ => vec![],
    };
    v.sort();
    v.dedup();
    v
}

/// Appends the body of `fused[body](inputs)` to `g`, instantiated for the inputs' shapes: each symbol that is
/// a whole dimension of an argument is bound to the input's dimension there (so a body written for
/// `f32[B, T, 64]` inlines onto `f32[2, 5, 64]`), and the body's attribute dimensions are rewritten accordingly.
/// Returns its (first) output; [`inline_all`] every output.
pub fn inline(g: &mut Graph, body: &FusedBody, inputs: &[Value]) -> Result<Value> {
    Ok(inline_all(g, body, inputs)?[0])
}

/// [`inline`], every output of the body in order.
pub fn inline_all(g: &mut Graph, body: &FusedBody, inputs: &[Value]) -> Result<Vec<Value>> {
    let bg = body.graph();
    let args = bg.inputs();
    let err = |m: String| IrError::Graph(format!("decomposing `fused`: {m}"));
    if inputs.len() != args.len() {
        return Err(err(format!(
            "expects {} input(s) (its body's arguments), got {}",
            args.len(),
            inputs.len()
        )));
    }
    let mut env: HashMap<String, Dim> = HashMap::new();
    for (i, (&a, &x)) in args.iter().zip(inputs).enumerate() {
        let want = &bg.node(a).outputs[0];
        let got = g.ty(x);
        if want.rank() != got.rank() || want.dtype != got.dtype {
            return Err(err(format!("input {i} is {got}, the body's `arg{i}` is {want}")));
        }
        for (d, e) in want.dims().iter().zip(got.dims()) {
            if let [s] = d.symbols().as_slice() {
                if *d == Dim::sym(s) {
                    match env.get(s) {
                        Some(b) if b != e => {
                            return Err(err(format!(
                                "symbol `{s}` of the body is both `{b}` and `{e}` in the inputs' shapes"
                            )))
                        }
                        Some(_) => {}
                        None => {
                            env.insert(s.clone(), e.clone());
                        }
                    }
                }
            }
        }
    }
    // every argument dimension whose symbols are all bound must agree with the input's
    for (i, (&a, &x)) in args.iter().zip(inputs).enumerate() {
        let want = &bg.node(a).outputs[0];
        let got = g.ty(x).clone();
        for (d, e) in want.dims().iter().zip(got.dims()) {
            if d.symbols().iter().all(|s| env.contains_key(s)) && d.substitute(&env) != *e {
                return Err(err(format!("input {i} is {got}, the body's `arg{i}` is {want}")));
            }
        }
    }
    let mut map: HashMap<Value, Value> = HashMap::new();
    for (i, &a) in args.iter().enumerate() {
        map.insert(Value::new(a, 0), inputs[i]);
    }
    for (id, n) in bg.nodes() {
        if n.op.is_input() {
            continue;
        }
        let ins: Vec<Value> = n.inputs.iter().map(|v| map[v]).collect();
        let op = n.op.substitute_dims(&env);
        // a body node keeps its name (which node of the original graph it was); others are named by scope
        let outs = match &n.name {
            Some(name) => {
                let nid = g.add_node(op, &ins, Some(name.clone()))?;
                (0..n.outputs.len() as u32).map(|k| Value::new(nid, k)).collect()
            }
            None => g.op(op, &ins)?,
        };
        for (k, v) in outs.into_iter().enumerate() {
            map.insert(Value::new(id, k as u32), v);
        }
    }
    Ok(bg.outputs().iter().map(|(_, v)| map[v]).collect())
}

impl PartialEq for FusedBody {
    fn eq(&self, other: &FusedBody) -> bool {
        self.text == other.text
    }
}

impl Eq for FusedBody {}

impl std::hash::Hash for FusedBody {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.text.hash(h)
    }
}

impl std::fmt::Debug for FusedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FusedBody").field(&&*self.text).finish()
    }
}

impl Serialize for FusedBody {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for FusedBody {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<FusedBody, D::Error> {
        let s = String::deserialize(d)?;
        FusedBody::parse(&s).map_err(|e| serde::de::Error::custom(format!("fused body: {e}")))
    }
}
