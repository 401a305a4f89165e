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

/// A random e-graph over one leaf: `n` unary/binary nodes on earlier classes, then `u` unions of classes of the
/// same type (every class has one type here), which create cycles and shared alternatives.
fn random_egraph(ops: &[(u8, usize, usize)], unions: &[(usize, usize)], sizes: &[i64]) -> (EGraph, Vec<Id>) {
    let mut eg = EGraph::new(ShapeAnalysis::default());
    let mut ids = vec![leaf(&mut eg, "x", &[sizes[0], 64]), leaf(&mut eg, "y", &[sizes[0], 64])];
    for &(kind, a, b) in ops {
        let (a, b) = (ids[a % ids.len()], ids[b % ids.len()]);
        let id = match kind % 6 {
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

    /// On random e-graphs: costs are exact, choices acyclic, and no class can lower its own DAG cost by
    /// switching to another of its e-nodes (the greedy DAG fixpoint).
    #[test]
    fn random_egraphs_extract_exactly(
        ops in prop::collection::vec((0u8..6, 0usize..64, 0usize..64), 1..40),
        unions in prop::collection::vec((2usize..64, 2usize..64), 0..8),
        size in prop::sample::select(vec![1i64, 256, 4096]),
    ) {
        let (eg, ids) = random_egraph(&ops, &unions, &[size]);
        let m = model();
        let root = *ids.last().unwrap();
        let ex = extract(&eg, &m, &[root]);
        prop_assert!(ex.stats.converged);
        let root = eg.find(root);
        prop_assert!(ex.choice.contains_key(&root));
        prop_assert!(!cyclic(&eg, &ex, root));
        let classes: Vec<Id> = ex.choice.keys().copied().collect();
        for &c in &classes {
            let want = exact(&eg, &ex, c);
            let got = ex.cost[&c];
            prop_assert!((want - got).abs() <= 1e-9 * want.max(1e-30), "class {}: cost {} exact {}", c, got, want);
            // local optimality: every other admissible e-node of `c` costs at least as much
            for n in eg[c].nodes.iter() {
                let mut alt = ex.clone();
                alt.choice.insert(c, n.clone());
                if cyclic(&eg, &alt, c) {
                    continue;
                }
                let t = exact(&eg, &alt, c);
                prop_assert!(t >= got - 1e-9 * got.max(1e-30), "class {}: `{}` costs {} < chosen {}", c, n, t, got);
            }
        }
        let _: HashMap<Id, f64> = ex.cost.clone();
    }
}
