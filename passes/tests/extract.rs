//! DAG extraction: the choice is a fixpoint of the greedy DAG rule, `Extraction::cost` is the exact DAG cost of
//! every class's choice, and the choice never needs a class through itself: on a hand-built e-graph where a
//! class's unchanged choice gets cheaper below it, and on random e-graphs.

use egg::Id;
use fulgur_ir::{BinaryOp, DType, Dim, Op, Shape, TensorType, UnaryOp};
use fulgur_passes::extract::{dag_cost, enode_cost, extract, Extraction};
use fulgur_passes::lang::{EGraph, FNode, ShapeAnalysis};
use fulgur_passes::{CostModel, Target};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

fn model() -> CostModel {
    CostModel::new(Target::by_name("H100").unwrap())
}

fn ty(dims: &[i64]) -> TensorType {
    TensorType::new(DType::F32, dims.iter().map(|&d| Dim::from(d)).collect())
}

fn leaf(eg: &mut EGraph, name: &str, dims: &[i64]) -> Id {
    eg.add(FNode::new(
        Op::Input {
            name: name.into(),
            ty: ty(dims),
        },
        vec![],
    ))
}

fn un(eg: &mut EGraph, u: UnaryOp, x: Id) -> Id {
    eg.add(FNode::new(Op::Unary(u), vec![x]))
}

fn bin(eg: &mut EGraph, b: BinaryOp, x: Id, y: Id) -> Id {
    eg.add(FNode::new(Op::Binary(b), vec![x, y]))
}

fn reshape(eg: &mut EGraph, x: Id, dims: &[i64]) -> Id {
    eg.add(FNode::new(
        Op::Reshape {
            shape: Shape::new(dims.iter().map(|&d| Dim::from(d)).collect()),
        },
        vec![x],
    ))
}

/// The exact DAG cost of class `c` under the extraction's choices (every needed class once).
fn exact(eg: &EGraph, ex: &Extraction, c: Id) -> f64 {
    dag_cost(eg, &model(), ex, &[c]).0
}

/// Whether the choices reachable from `c` form a cycle.
fn cyclic(eg: &EGraph, ex: &Extraction, c: Id) -> bool {
    fn go(eg: &EGraph, ex: &Extraction, c: Id, open: &mut HashSet<Id>, done: &mut HashSet<Id>) -> bool {
        let c = eg.find(c);
        if done.contains(&c) {
            return false;
        }
        if !open.insert(c) {
            return true;
        }
        let r = ex.choice[&c].children.iter().any(|&ch| go(eg, ex, ch, open, done));
        open.remove(&c);
        done.insert(c);
        r
    }
    go(eg, ex, c, &mut HashSet::new(), &mut HashSet::new())
}

/// `P = sigmoid(C)`, `C = neg(A)`, `A = exp(x)`; later `A` also equals `reshape(reshape(x))` (two free views)
/// through a class created after `P`, so `A`'s cheap form is found only in a later pass while `C` keeps its
/// choice `neg(A)`. `C` must still be refreshed: then `P = sigmoid(C)` (two kernels) beats the alternative
/// `add(tanh(x), x)` (a unary and a binary kernel), which is cheaper than the stale three-kernel `sigmoid(C)`.
#[test]
fn a_choice_that_gets_cheaper_below_is_refreshed() {
    let mut eg = EGraph::new(ShapeAnalysis::default());
    let d = [1024, 1024];
    let x = leaf(&mut eg, "x", &d);
    let a = un(&mut eg, UnaryOp::Exp, x);
    let c = un(&mut eg, UnaryOp::Neg, a);
    let p = un(&mut eg, UnaryOp::Sigmoid, c);
    let t1 = un(&mut eg, UnaryOp::Tanh, x);
    let alt = bin(&mut eg, BinaryOp::Add, t1, x);
    eg.union(p, alt);
    let z = reshape(&mut eg, x, &[1024 * 1024]);
    let a2 = reshape(&mut eg, z, &d);
    eg.union(a, a2);
    eg.rebuild();
    let m = model();
    let ex = extract(&eg, &m, &[p]);
    let unary = enode_cost(&eg, &m, &FNode::new(Op::Unary(UnaryOp::Neg), vec![a]), c);
    let chosen = ex.choice[&eg.find(p)].to_string();
    assert_eq!(chosen, "sigmoid", "P chose {chosen}");
    assert!(
        (exact(&eg, &ex, p) - 2.0 * unary).abs() < 1e-15,
        "{} vs {}",
        exact(&eg, &ex, p),
        2.0 * unary
    );
    for cl in [x, a, c, p] {
        let cl = eg.find(cl);
        let (want, got) = (exact(&eg, &ex, cl), ex.cost[&cl]);
        assert!(
            (want - got).abs() <= 1e-12 * want.max(1e-30),
            "class {cl}: cost {got}, exact {want}"
        );
    }
    assert!(ex.stats.converged);
}

fn matmul(eg: &mut EGraph, x: Id, y: Id) -> Id {
    eg.add(FNode::new(Op::MatMul, vec![x, y]))
}

/// A class whose cheapest form alone is a matmul of its own, but whose other form reads a matmul the program
/// computes anyway for another root: `A = x·w` is an output, and `P` is `neg(A)` or `x·v`. Alone, `P` takes
/// `x·v` (one matmul beats a matmul and a unary kernel); with `A` an output too, the whole-program refinement
/// makes `P = neg(A)`, one unary kernel instead of a second matmul.
#[test]
fn a_matmul_computed_anyway_is_reused_by_the_whole_program_refinement() {
    let mut eg = EGraph::new(ShapeAnalysis::default());
    let x = leaf(&mut eg, "x", &[1024, 1024]);
    let w = leaf(&mut eg, "w", &[1024, 1024]);
    let v = leaf(&mut eg, "v", &[1024, 1024]);
    let a = matmul(&mut eg, x, w);
    let p = un(&mut eg, UnaryOp::Neg, a);
    let alt = matmul(&mut eg, x, v);
    eg.union(p, alt);
    eg.rebuild();
    let (a, p) = (eg.find(a), eg.find(p));
    let m = model();
    let alone = extract(&eg, &m, &[p]);
    assert_eq!(alone.choice[&p].to_string(), "matmul", "P alone");
    assert_eq!(alone.stats.refined, 0);
    let ex = extract(&eg, &m, &[a, p]);
    assert_eq!(ex.choice[&p].to_string(), "neg", "P beside A");
    assert_eq!(ex.stats.refined, 1);
    assert!(ex.stats.refine_converged);
    let unary = enode_cost(&eg, &m, &FNode::new(Op::Unary(UnaryOp::Neg), vec![a]), p);
    let mm = enode_cost(&eg, &m, &FNode::new(Op::MatMul, vec![x, w]), a);
    assert!(unary < mm, "{unary} {mm}");
    let (total, kernels) = dag_cost(&eg, &m, &ex, &[a, p]);
    assert!(
        (total - (mm + unary)).abs() <= 1e-12 * total,
        "{total} vs {}",
        mm + unary
    );
    assert_eq!(kernels, 2);
    let (greedy, _) = dag_cost(&eg, &m, &alone, &[a, p]);
    assert!(total < greedy, "{total} vs the greedy {greedy}");
}

/// Elementwise work alone is never traded (the code generators merge and fold it after extraction, which the
/// cost model does not see): `A = exp(x)` is an output and `P` is `neg(A)` or `add(x, y)`; `P` keeps
/// `add(x, y)`, its own cheapest form, although reading `A` would look cheaper to the cost model.
#[test]
fn elementwise_work_alone_is_not_traded_by_the_refinement() {
    let mut eg = EGraph::new(ShapeAnalysis::default());
    let d = [1024, 1024];
    let x = leaf(&mut eg, "x", &d);
    let y = leaf(&mut eg, "y", &d);
    let a = un(&mut eg, UnaryOp::Exp, x);
    let p = un(&mut eg, UnaryOp::Neg, a);
    let alt = bin(&mut eg, BinaryOp::Add, x, y);
    eg.union(p, alt);
    eg.rebuild();
    let (a, p) = (eg.find(a), eg.find(p));
    let m = model();
    let unary = enode_cost(&eg, &m, &FNode::new(Op::Unary(UnaryOp::Neg), vec![a]), p);
    let binary = enode_cost(&eg, &m, &FNode::new(Op::Binary(BinaryOp::Add), vec![x, y]), p);
    assert!(unary < binary, "{unary} {binary}");
    let ex = extract(&eg, &m, &[a, p]);
    assert_eq!(ex.choice[&p].to_string(), "add");
    assert_eq!(ex.stats.refined, 0);
}

/// The classes the roots need under the extraction's choices.
fn needed(eg: &EGraph, ex: &Extraction, roots: &[Id]) -> HashSet<Id> {
    let mut seen = HashSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
    while let Some(c) = stack.pop() {
        if seen.insert(c) {
            stack.extend(ex.choice[&c].children.iter().map(|&ch| eg.find(ch)));
        }
    }
    seen
}

/// A random e-graph over one leaf: `n` unary/binary nodes on earlier classes, then `u` unions of classes of the
/// same type (every class has one type here), which create cycles and shared alternatives.
fn random_egraph(ops: &[(u8, usize, usize)], unions: &[(usize, usize)], sizes: &[i64]) -> (EGraph, Vec<Id>) {
    let mut eg = EGraph::new(ShapeAnalysis::default());
    let mut ids = vec![leaf(&mut eg, "x", &[sizes[0], 64]), leaf(&mut eg, "y", &[sizes[0], 64])];
    let w = leaf(&mut eg, "w", &[64, 64]);
    for &(kind, a, b) in ops {
        let (a, b) = (ids[a % ids.len()], ids[b % ids.len()]);
        let id = match kind % 7 {
            6 => matmul(&mut eg, a, w),
            0 => un(&mut eg, UnaryOp::Exp, a),
            1 => un(&mut eg, UnaryOp::Tanh, a),
            2 => bin(&mut eg, BinaryOp::Add, a, b),
            3 => bin(&mut eg, BinaryOp::Mul, a, b),
            4 => reshape(&mut eg, a, &[sizes[0], 64]),
            _ => un(&mut eg, UnaryOp::Neg, a),
        };
        ids.push(id);
    }
    for &(a, b) in unions {
        let (a, b) = (ids[a % ids.len()], ids[b % ids.len()]);
        // never merge the two leaves into one class: every class must keep a finite, acyclic choice
        eg.union(a, b);
    }
    eg.rebuild();
    (eg, ids)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// On random e-graphs with one or two roots: costs are exact, choices acyclic, no class the roots do not
    /// need can lower its own DAG cost by switching to another of its e-nodes (the greedy DAG fixpoint), and no
    /// switch of one needed class lowers the cost of the whole program (the refinement's fixpoint), which is
    /// never above the greedy choice's.
    #[test]
    fn random_egraphs_extract_exactly(
        ops in prop::collection::vec((0u8..7, 0usize..64, 0usize..64), 1..40),
        unions in prop::collection::vec((2usize..64, 2usize..64), 0..8),
        size in prop::sample::select(vec![1i64, 256, 4096]),
        second in prop::option::of(0usize..64),
    ) {
        let (eg, ids) = random_egraph(&ops, &unions, &[size]);
        let m = model();
        let mut roots = vec![eg.find(*ids.last().unwrap())];
        if let Some(s) = second {
            roots.push(eg.find(ids[s % ids.len()]));
        }
        let ex = extract(&eg, &m, &roots);
        prop_assert!(ex.stats.converged);
        prop_assert!(ex.stats.refine_converged);
        for &r in &roots {
            prop_assert!(ex.choice.contains_key(&r));
            prop_assert!(!cyclic(&eg, &ex, r));
        }
        let need = needed(&eg, &ex, &roots);
        let (total, _) = dag_cost(&eg, &m, &ex, &roots);
        let classes: Vec<Id> = ex.choice.keys().copied().collect();
        for &c in &classes {
            let want = exact(&eg, &ex, c);
            let got = ex.cost[&c];
            prop_assert!((want - got).abs() <= 1e-9 * want.max(1e-30), "class {}: cost {} exact {}", c, got, want);
            for n in eg[c].nodes.iter() {
                let mut alt = ex.clone();
                alt.choice.insert(c, n.clone());
                if cyclic(&eg, &alt, c) || roots.iter().any(|&r| cyclic(&eg, &alt, r)) {
                    continue;
                }
                if need.contains(&c) {
                    // the program's optimality: no single switch that takes a matmul out of the program lowers
                    // the roots' cost (elementwise work alone is not traded)
                    let after = needed(&eg, &alt, &roots);
                    let heavy = ex.choice[&c].to_string() == "matmul"
                        || need.iter().any(|r| !after.contains(r) && ex.choice[r].to_string() == "matmul");
                    let t = dag_cost(&eg, &m, &alt, &roots).0;
                    prop_assert!(!heavy || t >= total - 1e-9 * total.max(1e-30), "class {}: `{}` gives {} < {}", c, n, t, total);
                } else if ex.stats.refined == 0 {
                    // local optimality: every other admissible e-node of `c` costs at least as much
                    let t = exact(&eg, &alt, c);
                    prop_assert!(t >= got - 1e-9 * got.max(1e-30), "class {}: `{}` costs {} < chosen {}", c, n, t, got);
                }
            }
        }
        let _: HashMap<Id, f64> = ex.cost.clone();
    }
}
