//! Soundness checking for rules: saturate a graph with some families, then for every e-class reachable from
//! the outputs and every e-node in it, build the graph that uses *that* node for its class (the rest chosen by
//! the extractor) and compare it with the original on random inputs through the reference interpreter (f64).

use crate::cost::{CostModel, Target};
use crate::extract::{build_graph, extract};
use crate::lang::{graph_to_egraph, EGraph, ShapeAnalysis};
use crate::rules::Family;
use egg::Runner;
use fulgur_ir::{Buffer, DType, Graph, Interpreter, Op, Precision, Tensor};
use std::collections::HashMap;

/// Random inputs for every input and parameter of `g`, with symbols bound from `env`. Integer inputs are
/// drawn in `[0, int_hi)`.
pub fn random_inputs(g: &Graph, env: &HashMap<String, i64>, seed: u64, int_hi: i64) -> HashMap<String, Tensor> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = HashMap::new();
    for id in g.inputs() {
        let Some((name, ty, _)) = g.node(id).op.input_decl() else {
            continue;
        };
        let shape = ty.shape.eval(env).unwrap_or_default();
        let n: usize = shape.iter().product();
        let data = match ty.dtype {
            d if d.is_float() => Buffer::F(
                (0..n)
                    .map(|_| fulgur_ir::tensor::round_to(d, next() * 2.0 - 1.0))
                    .collect(),
            ),
            DType::Bool => Buffer::B((0..n).map(|_| next() < 0.5).collect()),
            _ => Buffer::I((0..n).map(|_| (next() * int_hi as f64) as i64).collect()),
        };
        out.insert(
            name.to_string(),
            Tensor {
                dtype: ty.dtype,
                shape,
                data,
            },
        );
    }
    out
}

/// Saturates `g` with `families`, then checks every alternative of every reachable class against `g` on
/// `inputs` (relative L2 tolerance `tol`). Returns the number of alternatives checked, or the first mismatch.
pub fn check_soundness(
    g: &Graph,
    families: Vec<Family>,
    inputs: &HashMap<String, Tensor>,
    tol: f64,
) -> Result<usize, String> {
    let interp = Interpreter::new(Precision::F64);
    let want = interp.run(g, inputs).map_err(|e| format!("original graph: {e}"))?;
    let mut egraph = EGraph::new(ShapeAnalysis);
    let vm = graph_to_egraph(g, &mut egraph);
    let rules: Vec<_> = families.into_iter().flat_map(|f| f.rules).collect();
    let runner = Runner::default()
        .with_egraph(egraph)
        .with_iter_limit(8)
        .with_node_limit(5_000)
        .run(&rules);
    let egraph = runner.egraph;
    if let Some(c) = egraph.classes().find_map(|c| c.data.conflict.clone()) {
        return Err(format!("type conflict: {c}"));
    }
    let model = CostModel::new(Target::by_name("H100").expect("H100 is built in"));
    let roots: Vec<(String, egg::Id)> = g
        .outputs()
        .iter()
        .map(|(n, v)| (n.clone(), egraph.find(vm.get(*v))))
        .collect();
    let root_ids: Vec<egg::Id> = roots.iter().map(|r| r.1).collect();
    let base = extract(&egraph, &model, &root_ids);
    let inputs_ops: Vec<Op> = g.inputs().into_iter().map(|id| g.node(id).op.clone()).collect();
    let mut checked = 0;
    let classes: Vec<egg::Id> = base.choice.keys().copied().collect();
    let mut classes = classes;
    classes.sort();
    for c in classes {
        for n in egraph[c].nodes.iter() {
            // the alternative must not depend on its own class through the base choices (a cycle)
            let mut ex = base.clone();
            ex.choice.insert(c, n.clone());
            let Ok(alt) = build_graph(&egraph, &ex, &g.name, &inputs_ops, &roots, &HashMap::new()) else {
                continue;
            };
            let got = interp.run(&alt, inputs).map_err(|e| {
                format!(
                    "alternative `{n}` of e-class {c}: {e}\n{}",
                    fulgur_ir::text::print(&alt)
                )
            })?;
            for (name, w) in &want {
                let e = rel_error(&got[name], w);
                if e.is_nan() || e > tol {
                    return Err(format!(
                        "alternative `{n}` of e-class {c} changes output `{name}` (relative error {e:.3e}):\n{}",
                        fulgur_ir::text::print(&alt)
                    ));
                }
            }
            checked += 1;
        }
    }
    Ok(checked)
}

/// Relative L2 error over the finite elements; non-finite elements must match exactly (NaN with NaN, an
/// infinity with the same infinity), else the error is infinite.
pub fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    let (x, y) = (a.to_f64(), b.to_f64());
    if x.len() != y.len() || a.shape != b.shape {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (p, q) in x.iter().zip(&y) {
        if !q.is_finite() || !p.is_finite() {
            let same = (p.is_nan() && q.is_nan()) || p == q;
            if !same {
                return f64::INFINITY;
            }
            continue;
        }
        num += (p - q) * (p - q);
        den += q * q;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
