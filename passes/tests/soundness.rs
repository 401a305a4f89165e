//! The soundness checker itself: an unsound alternative that the extracted graph does not use is still found,
//! and a check whose alternatives cannot be built fails instead of passing vacuously.

use egg::Id;
use fulgur_ir::{DType, Dim, Graph, Op, UnaryOp};
use fulgur_passes::lang::{add_op, class_ops, EGraph, FNode};
use fulgur_passes::rules::{fn_rule, Family, RuleConfig};
use fulgur_passes::testing::{check_soundness, random_inputs};
use std::collections::HashMap;

fn unary(n: &FNode, u: UnaryOp) -> bool {
    matches!(n.ir_op(), Some(Op::Unary(x)) if *x == u)
}

/// A sound rule: `recip(recip(a))` = `a`.
fn probe_recip_recip(eg: &EGraph, _: Id, n: &FNode) -> bool {
    unary(n, UnaryOp::Recip) && class_ops(eg, n.children[0]).any(|(o, _)| matches!(o, Op::Unary(UnaryOp::Recip)))
}

fn build_recip_recip(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    class_ops(eg, n.children[0])
        .filter(|(o, _)| matches!(o, Op::Unary(UnaryOp::Recip)))
        .map(|(_, ch)| ch[0])
        .collect()
}

/// An unsound rule: `recip(a)` = `neg(a)` where `a` is an `exp`.
fn probe_bad(eg: &EGraph, _: Id, n: &FNode) -> bool {
    unary(n, UnaryOp::Recip) && class_ops(eg, n.children[0]).any(|(o, _)| matches!(o, Op::Unary(UnaryOp::Exp)))
}

fn build_bad(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    add_op(eg, Op::Unary(UnaryOp::Neg), &[n.children[0]])
        .into_iter()
        .collect()
}

/// `y = tanh(recip(recip(exp(x))))`: `recip-recip` makes the inner `recip(exp(x))` a class that the extracted
/// graph (`tanh(exp(x))`) no longer uses; the unsound `neg(exp(x))` lands in exactly that class. Choosing it for
/// its class alone changes nothing built; the checker must route a graph through it.
#[test]
fn an_unsound_alternative_that_only_unchosen_nodes_reach_is_caught() {
    let mut g = Graph::new("g");
    let x = g.input("x", DType::F32, vec![Dim::from(5)]).unwrap();
    let e = g.exp(x).unwrap();
    let r1 = g.unary(UnaryOp::Recip, e).unwrap();
    let r2 = g.unary(UnaryOp::Recip, r1).unwrap();
    let y = g.unary(UnaryOp::Tanh, r2).unwrap();
    g.add_output("y", y).unwrap();
    let cfg = RuleConfig::default();
    let family = || Family {
        name: "test",
        rules: vec![
            fn_rule("recip-recip", probe_recip_recip, build_recip_recip, &cfg),
            fn_rule("bad", probe_bad, build_bad, &cfg),
        ],
    };
    let inputs = random_inputs(&g, &HashMap::new(), 1, 4);
    let err = check_soundness(&g, vec![family()], &inputs, 1e-9).unwrap_err();
    assert!(err.starts_with("alternative `neg` of e-class"), "{err}");
    // the sound rule alone passes, with the unchosen inner `recip` checked through a routed graph
    let sound = Family {
        name: "test",
        rules: vec![fn_rule("recip-recip", probe_recip_recip, build_recip_recip, &cfg)],
    };
    let r = check_soundness(&g, vec![sound], &inputs, 1e-9).unwrap();
    assert!(r.checked >= 2 && r.skipped == 0 && r.vacuous == 0, "{r}");
}

fn probe_exp(_: &EGraph, _: Id, n: &FNode) -> bool {
    unary(n, UnaryOp::Exp)
}

/// Adds to `exp(x)`'s class five e-nodes over a class `w = neg(topk(x))` that has no well-typed e-node (its
/// input is a tuple): alternatives no graph can be built with.
fn build_unbuildable(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let t = eg.add(FNode::new(Op::TopK { k: 1, axis: -1 }, vec![n.children[0]]));
    let w = eg.add(FNode::new(Op::Unary(UnaryOp::Neg), vec![t]));
    [
        UnaryOp::Abs,
        UnaryOp::Neg,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Sin,
    ]
    .into_iter()
    .map(|u| eg.add(FNode::new(Op::Unary(u), vec![w])))
    .collect()
}

#[test]
fn a_check_whose_alternatives_cannot_be_built_fails() {
    let mut g = Graph::new("g");
    let x = g.input("x", DType::F32, vec![Dim::from(3)]).unwrap();
    let e = g.exp(x).unwrap();
    let (top, _) = g.topk(x, 1, -1).unwrap();
    g.add_output("y", e).unwrap();
    g.add_output("z", top).unwrap();
    let cfg = RuleConfig::default();
    let family = Family {
        name: "unbuildable",
        rules: vec![fn_rule("unbuildable", probe_exp, build_unbuildable, &cfg)],
    };
    let inputs = random_inputs(&g, &HashMap::new(), 1, 4);
    let err = check_soundness(&g, vec![family], &inputs, 1e-9).unwrap_err();
    assert!(
        err.starts_with("the check proves little: skipped and vacuous alternatives outnumber the checked ones"),
        "{err}"
    );
    assert!(err.contains("5 skipped"), "{err}");
}

/// An e-node in its own class (`neg(c)` added to `c`) can be used: a graph computes `c` once by its extracted
/// node and once more through the new one. `neg(exp(x))` is not `exp(x)`, and the check says so.
fn build_self_loop(eg: &mut EGraph, class: Id, _: &FNode, _: &RuleConfig) -> Vec<Id> {
    add_op(eg, Op::Unary(UnaryOp::Neg), &[class]).into_iter().collect()
}

#[test]
fn an_unsound_e_node_over_its_own_class_is_caught() {
    let mut g = Graph::new("g");
    let x = g.input("x", DType::F32, vec![Dim::from(3)]).unwrap();
    let e = g.exp(x).unwrap();
    g.add_output("y", e).unwrap();
    let cfg = RuleConfig::default();
    let family = Family {
        name: "self",
        rules: vec![fn_rule("self-loop", probe_exp, build_self_loop, &cfg)],
    };
    let inputs = random_inputs(&g, &HashMap::new(), 1, 4);
    let err = check_soundness(&g, vec![family], &inputs, 1e-9).unwrap_err();
    assert!(err.starts_with("alternative `neg` of e-class"), "{err}");
}
