//! Soundness of the fusion family: every alternative the rules add (fused kernels, `rms_norm`, joined
//! projections) agrees with the original graph in f64 on random inputs, on hand-written and random graphs with
//! symbolic shapes; the rules fire where they should and not on look-alikes; and on the tiny-a checkpoint the
//! standard pipeline fuses further while the logits still match the reference.

use fulgur_ir::{BinaryOp, CmpOp, Composite, DType, Dim, Graph, Interpreter, Op, Precision, ReduceOp, UnaryOp, Value};
use fulgur_models::checkpoint::Checkpoint;
use fulgur_models::{forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur_passes::extract::{build_graph, extract};
use fulgur_passes::lang::{graph_to_egraph, EGraph, ShapeAnalysis};
use fulgur_passes::rules::{fusion, RuleConfig};
use fulgur_passes::testing::{check_soundness, random_inputs, Soundness};
use fulgur_passes::{standard_pipeline, CostModel, Limits, PassContext, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::PathBuf;

fn env(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn fam() -> fulgur_passes::rules::Family {
    fusion::family(&RuleConfig::default())
}

/// Checks every alternative on a few inputs at each binding; returns the report at the last.
fn check(g: &Graph, envs: &[HashMap<String, i64>]) -> Soundness {
    let mut last = Soundness::default();
    for (seed, e) in envs.iter().enumerate() {
        let inputs = random_inputs(g, e, seed as u64 + 1, 4);
        last = check_soundness(g, vec![fam()], &inputs, 1e-9).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{e:?}: {last}");
    }
    last
}

/// Saturates with the fusion family under the pipeline's limits.
fn saturate(g: &Graph) -> (EGraph, Vec<(String, egg::Id)>) {
    let mut eg = EGraph::new(ShapeAnalysis::default());
    let vm = graph_to_egraph(g, &mut eg);
    let runner = Limits::default().runner(eg, None).run(&fam().rules);
    let eg = runner.egraph;
    let roots = g
        .outputs()
        .iter()
        .map(|(n, v)| (n.clone(), eg.find(vm.get(*v))))
        .collect();
    (eg, roots)
}

/// The ops of every e-node after saturating with the fusion family.
fn ops_after(g: &Graph) -> Vec<Op> {
    let (eg, _) = saturate(g);
    eg.classes()
        .flat_map(|c| c.nodes.iter().filter_map(|n| n.ir_op().cloned()))
        .collect()
}

/// The fused bodies among the alternatives.
fn bodies(ops: &[Op]) -> Vec<Graph> {
    ops.iter()
        .filter_map(|o| match o {
            Op::Composite(Composite::Fused { body }) => Some(body.graph().clone()),
            _ => None,
        })
        .collect()
}

fn has_op(g: &Graph, f: impl Fn(&Op) -> bool) -> bool {
    g.nodes().any(|(_, n)| f(&n.op))
}

/// The graph the extractor builds after saturation (H100 costs).
fn extracted(g: &Graph) -> Graph {
    let (eg, roots) = saturate(g);
    let model = CostModel::new(Target::by_name("H100").unwrap());
    let ids: Vec<egg::Id> = roots.iter().map(|r| r.1).collect();
    let ex = extract(&eg, &model, &ids);
    let inputs: Vec<Op> = g.inputs().into_iter().map(|id| g.node(id).op.clone()).collect();
    build_graph(&eg, &ex, &g.name, &inputs, &roots, &HashMap::new()).unwrap()
}

fn bt(d: i64) -> Vec<Dim> {
    vec![Dim::sym("B"), Dim::sym("T"), Dim::from(d)]
}

/// Three bindings of `B` and `T`: the smallest (1, 1), then two drawn from a seeded generator.
fn sizes() -> Vec<HashMap<String, i64>> {
    let mut rng = StdRng::seed_from_u64(0xf5);
    let mut out = vec![env(&[("B", 1), ("T", 1)])];
    for _ in 0..2 {
        out.push(env(&[("B", rng.gen_range(1..=3)), ("T", rng.gen_range(2..=8))]));
    }
    out
}

/// Widths for a test: 1 (the edge case) and `n - 1` more drawn from a seeded generator in `2..=hi`.
fn widths(seed: u64, n: usize, hi: i64) -> Vec<i64> {
    let mut rng = StdRng::seed_from_u64(seed);
    std::iter::once(1)
        .chain((1..n).map(|_| rng.gen_range(2..=hi)))
        .collect()
}

// ------------------------------------------------------------------------------------------- elementwise

#[test]
fn elementwise_chains_fuse_soundly() {
    for d in widths(0xf1, 2, 6) {
        let mut g = Graph::new("chain");
        let x = g.input("x", DType::F32, bt(d)).unwrap();
        let y = g.input("y", DType::F32, vec![Dim::sym("T"), Dim::from(d)]).unwrap();
        let a = g.neg(x).unwrap();
        let a = g.exp(a).unwrap(); // used twice below
        let b = g.mul(a, y).unwrap();
        let c = g.sigmoid(b).unwrap();
        let dd = g.add(c, a).unwrap();
        let half = g.scalar(0.5, DType::F32).unwrap();
        let cond = g.compare(CmpOp::Gt, dd, half).unwrap();
        let fl = g.cast(cond, DType::F32).unwrap();
        let e = g.select(cond, dd, fl).unwrap();
        let f = g.unary(UnaryOp::Tanh, e).unwrap();
        g.add_output("f", f).unwrap();
        g.add_output("b", b).unwrap(); // an intermediate that is also an output
        let r = check(&g, &sizes());
        assert!(r.checked >= 8, "{r}");
        // the extracted graph runs fewer kernels than the eleven ops
        let kernels = extracted(&g).nodes().filter(|(_, n)| !n.op.is_input()).count();
        assert!(kernels <= 4, "{kernels} kernels");
    }
    // the whole chain is one kernel among the alternatives, and so is the part that duplicates nothing
    let mut g = Graph::new("chain");
    let x = g.input("x", DType::F32, bt(4)).unwrap();
    let a = g.exp(x).unwrap();
    let b = g.sigmoid(a).unwrap();
    let c = g.mul(a, b).unwrap();
    let s = g.scale(c, 3.0).unwrap();
    g.add_output("y", s).unwrap();
    let bs = bodies(&ops_after(&g));
    let big = bs.iter().map(|b| b.node_count()).max().unwrap_or(0);
    // 1 argument + exp, sigmoid, mul, constant, mul
    assert_eq!(big, 6, "{bs:?}");
    let opt = extracted(&g);
    let kernels = opt.nodes().filter(|(_, n)| !n.op.is_input()).count();
    assert_eq!(kernels, 1, "{}", fulgur_ir::text::print(&opt));
}

#[test]
fn fused_producers_are_inlined_into_their_consumers() {
    // `y = fused{exp(arg0) · arg1}(x, x)`, then `tanh(y) · x`: the consumer's kernel holds the producer's body
    let mut body = Graph::new("fused");
    let a0 = body.input("arg0", DType::F32, bt(3)).unwrap();
    let a1 = body.input("arg1", DType::F32, bt(3)).unwrap();
    let e = body.exp(a0).unwrap();
    let m = body.mul(e, a1).unwrap();
    body.add_output("out", m).unwrap();
    let body = fulgur_ir::op::FusedBody::from_graph(&body).unwrap();
    let mut g = Graph::new("g");
    let x = g.input("x", DType::F32, bt(3)).unwrap();
    let y = g.op1(Op::Composite(Composite::Fused { body }), &[x, x]).unwrap();
    let t = g.unary(UnaryOp::Tanh, y).unwrap();
    let z = g.mul(t, x).unwrap();
    g.add_output("z", z).unwrap();
    check(&g, &sizes());
    let bs = bodies(&ops_after(&g));
    assert!(
        bs.iter().any(|b| b.inputs().len() == 1
            && has_op(b, |o| matches!(o, Op::Unary(UnaryOp::Exp)))
            && has_op(b, |o| matches!(o, Op::Unary(UnaryOp::Tanh)))),
        "{bs:?}"
    );
    let opt = extracted(&g);
    assert_eq!(
        opt.nodes().filter(|(_, n)| !n.op.is_input()).count(),
        1,
        "{}",
        fulgur_ir::text::print(&opt)
    );
}

/// A value the graph outputs ends a kernel even when one elementwise op reads it: AdamW's new moment
/// `m1 = m + (g·c − m)·0.1` is an output and the update `w − m1 / (√v + ε)` reads it. Before, only the update was
/// fused (recomputing `m1`) and the output `m1` stayed four kernels (`mul`, `sub`, `mul`, `add`); now the
/// extracted graph is two kernels.
#[test]
fn an_output_read_by_one_elementwise_op_is_its_own_kernel() {
    let mut g = Graph::new("adam");
    let w = g.input("w", DType::F32, bt(3)).unwrap();
    let m = g.input("m", DType::F32, bt(3)).unwrap();
    let v = g.input("v", DType::F32, bt(3)).unwrap();
    let gr = g.input("g", DType::F32, bt(3)).unwrap();
    let c = g.input("c", DType::F32, vec![]).unwrap();
    let gc = g.mul(gr, c).unwrap();
    let d = g.sub(gc, m).unwrap();
    let d = g.scale(d, 0.1).unwrap();
    let m1 = g.add(m, d).unwrap();
    let r = g.sqrt(v).unwrap();
    let den = g.add_scalar(r, 1e-8).unwrap();
    let q = g.div(m1, den).unwrap();
    let w1 = g.sub(w, q).unwrap();
    g.add_output("m1", m1).unwrap();
    g.add_output("w1", w1).unwrap();
    check(&g, &sizes());
    let opt = extracted(&g);
    let kernels: Vec<String> = opt
        .nodes()
        .filter(|(_, n)| !n.op.is_input())
        .map(|(_, n)| n.op.name().to_string())
        .collect();
    assert_eq!(kernels, ["fused", "fused"], "{}", fulgur_ir::text::print(&opt));
}

#[test]
fn views_and_broadcasts_of_arguments_are_absorbed() {
    let mut g = Graph::new("views");
    let x = g.input("x", DType::F32, bt(6)).unwrap();
    let b = g.input("bias", DType::F32, vec![Dim::from(6)]).unwrap();
    let r = g.reshape(x, vec![Dim::sym("B") * Dim::sym("T"), Dim::from(6)]).unwrap();
    let e = g.exp(r).unwrap();
    let bb = g
        .broadcast(b, vec![Dim::sym("B") * Dim::sym("T"), Dim::from(6)])
        .unwrap();
    let s = g.add(e, bb).unwrap();
    let s = g.reshape(s, bt(6)).unwrap();
    let p = g.permute(s, &[1, 0, 2]).unwrap();
    let t = g.unary(UnaryOp::Tanh, p).unwrap();
    g.add_output("y", t).unwrap();
    check(&g, &sizes());
    let ops = ops_after(&g);
    // one body reads `x` and `bias` themselves: the reshape and the broadcast are inside
    assert!(
        bodies(&ops).iter().any(|b| {
            b.inputs().len() == 2
                && has_op(b, |o| matches!(o, Op::Broadcast { .. }))
                && has_op(b, |o| matches!(o, Op::Permute { .. }))
        }),
        "{:?}",
        bodies(&ops)
    );
}

#[test]
fn long_chains_are_capped() {
    let mut g = Graph::new("long");
    let mut v = g.input("x", DType::F32, vec![Dim::sym("N")]).unwrap();
    for i in 0..80 {
        v = if i % 2 == 0 {
            g.unary(UnaryOp::Sin, v).unwrap()
        } else {
            g.scale(v, 0.9).unwrap()
        };
    }
    g.add_output("y", v).unwrap();
    let (eg, _) = saturate(&g);
    let mut n_fused = 0;
    for c in eg.classes() {
        for n in &c.nodes {
            if let Some(Op::Composite(Composite::Fused { body })) = n.ir_op() {
                n_fused += 1;
                let ops = body.graph().nodes().filter(|(_, n)| !n.op.is_input()).count();
                assert!(ops <= fusion::MAX_BODY_OPS, "{ops}");
            }
        }
    }
    // at most two kernels per root (the chain has no shared producers: one), and some were built
    assert!(n_fused > 0 && n_fused <= 80, "{n_fused}");
    assert!(eg.total_number_of_nodes() < 500, "{}", eg.total_number_of_nodes());
    check(&g, &[env(&[("N", 3)])]);
}

// ------------------------------------------------------------------------------------------- GEMM epilogues

#[test]
fn gemm_epilogues_fuse_soundly() {
    let mut rng = StdRng::seed_from_u64(0xf2);
    for (d, e) in [
        (1, 1),
        (rng.gen_range(1..=5), rng.gen_range(1..=5)),
        (rng.gen_range(1..=5), rng.gen_range(1..=5)),
    ] {
        let mut g = Graph::new("gemm");
        let x = g.input("x", DType::F32, bt(d)).unwrap();
        let w = g.param("w", DType::F32, vec![Dim::from(e), Dim::from(d)]).unwrap();
        let wg = g.param("wg", DType::F32, vec![Dim::from(e), Dim::from(d)]).unwrap();
        let res = g.input("res", DType::F32, bt(e)).unwrap();
        // scaled SiLU, gated, plus residual
        let h = g.linear(x, w).unwrap();
        let h = g.scale(h, 0.5).unwrap();
        let h = g.silu(h).unwrap();
        let gate = g.linear(x, wg).unwrap();
        let gate = g.sigmoid(gate).unwrap();
        let h = g.mul(h, gate).unwrap();
        let y = g.add(res, h).unwrap();
        // a matmul on flattened rows, reshaped back, then an epilogue
        let flat = g.reshape(y, vec![Dim::sym("B") * Dim::sym("T"), Dim::from(e)]).unwrap();
        let w2 = g.param("w2", DType::F32, vec![Dim::from(e), Dim::from(e)]).unwrap();
        let z = g.matmul(flat, w2).unwrap();
        let z = g.reshape(z, bt(e)).unwrap();
        let z = g.add(z, y).unwrap();
        g.add_output("z", z).unwrap();
        check(&g, &sizes());
    }
    let mut g = Graph::new("gemm");
    let x = g.input("x", DType::F32, bt(3)).unwrap();
    let w = g.param("w", DType::F32, vec![Dim::from(5), Dim::from(3)]).unwrap();
    let h = g.linear(x, w).unwrap();
    let h = g.silu(h).unwrap();
    let h = g.scale(h, 2.0).unwrap();
    g.add_output("y", h).unwrap();
    let ops = ops_after(&g);
    let gemm: Vec<Graph> = bodies(&ops)
        .into_iter()
        .filter(|b| has_op(b, |o| matches!(o, Op::MatMul)))
        .collect();
    // one kernel per elementwise root: matmul + silu, and matmul + silu + scale
    assert_eq!(gemm.len(), 2, "{gemm:?}");
    assert!(gemm.iter().any(|b| b.node_count() == 6), "{gemm:?}");
    // the transposed weight stays an argument: prepared at load time
    assert!(gemm.iter().all(|b| !has_op(b, |o| matches!(o, Op::Permute { .. }))));
    let opt = extracted(&g);
    assert!(has_op(
        &opt,
        |o| matches!(o, Op::Composite(Composite::Fused { body }) if has_op(body.graph(), |o| matches!(o, Op::MatMul)))
    ));
}

/// A matmul read by two epilogues is computed once: no GEMM kernel repeats it (the extractor, pricing each
/// reader alone, took one GEMM-with-epilogue per reader: three products of the lm head's input gradient in
/// bench-m's step), and the extracted graph holds one matmul.
#[test]
fn a_matmul_with_two_readers_is_not_repeated_in_their_epilogues() {
    let mut g = Graph::new("g");
    let x = g.input("x", DType::F32, bt(3)).unwrap();
    let w = g.param("w", DType::F32, vec![Dim::from(5), Dim::from(3)]).unwrap();
    let h = g.linear(x, w).unwrap();
    let a = g.silu(h).unwrap();
    let a = g.scale(a, 2.0).unwrap();
    let b = g.exp(h).unwrap();
    let b = g.scale(b, 3.0).unwrap();
    g.add_output("a", a).unwrap();
    g.add_output("b", b).unwrap();
    check(&g, &sizes());
    let gemm = bodies(&ops_after(&g))
        .into_iter()
        .filter(|b| has_op(b, |o| matches!(o, Op::MatMul)))
        .count();
    assert_eq!(gemm, 0, "a GEMM kernel repeats the shared matmul");
    let opt = extracted(&g);
    let matmuls: usize = opt
        .nodes()
        .map(|(_, n)| match &n.op {
            Op::MatMul => 1,
            Op::Composite(Composite::Fused { body }) => {
                body.graph().nodes().filter(|(_, m)| matches!(m.op, Op::MatMul)).count()
            }
            _ => 0,
        })
        .sum();
    assert_eq!(matmuls, 1, "{opt:?}");
}

#[test]
fn matmuls_behind_slices_or_reductions_are_not_epilogues() {
    let mut g = Graph::new("g");
    let x = g.input("x", DType::F32, bt(3)).unwrap();
    let w = g.param("w", DType::F32, vec![Dim::from(6), Dim::from(3)]).unwrap();
    let h = g.linear(x, w).unwrap();
    let s = g.slice(h, -1, 0, 3).unwrap();
    let s = g.exp(s).unwrap();
    let s = g.scale(s, 2.0).unwrap();
    let r = g.sum(h, &[-1], true).unwrap();
    let r = g.exp(r).unwrap();
    let r = g.scale(r, 2.0).unwrap();
    let y = g.add(s, r).unwrap();
    g.add_output("y", y).unwrap();
    check(&g, &sizes());
    for b in bodies(&ops_after(&g)) {
        let mm = has_op(&b, |o| matches!(o, Op::MatMul));
        assert!(
            !mm || !has_op(&b, |o| matches!(o, Op::Slice { .. } | Op::Reduce { .. })),
            "{b:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------- reductions

#[test]
fn reductions_absorb_their_prologue_soundly() {
    for d in widths(0xf3, 3, 9) {
        let mut g = Graph::new("red");
        let a = g.input("a", DType::F32, bt(d)).unwrap();
        let b = g.input("b", DType::F32, bt(d)).unwrap();
        let w = g.param("w", DType::F32, vec![Dim::from(d)]).unwrap();
        let ab = g.mul(a, b).unwrap();
        let dot = g.sum(ab, &[-1], false).unwrap(); // reduce_sum(mul(a, b))
        let z = g.add(a, b).unwrap();
        let n = g.rms_norm(z, w, 1e-5).unwrap(); // rms_norm(add(x, r), w)
        let m = g.scale(b, 0.25).unwrap();
        let sm = g.softmax(m, -1).unwrap();
        let e = g.exp(a).unwrap();
        let mx = g.max(e, &[1, 2], true).unwrap();
        let ls = g.op1(Op::Composite(Composite::LogSoftmax { axis: 1 }), &[ab]).unwrap();
        let mean = g.mean(ls, &[0], false).unwrap();
        g.add_output("dot", dot).unwrap();
        g.add_output("norm", n).unwrap();
        g.add_output("sm", sm).unwrap();
        g.add_output("mx", mx).unwrap();
        g.add_output("mean", mean).unwrap();
        check(&g, &sizes());
    }
    let mut g = Graph::new("dot");
    let a = g.input("a", DType::F32, bt(4)).unwrap();
    let b = g.input("b", DType::F32, bt(4)).unwrap();
    let ab = g.mul(a, b).unwrap();
    let dot = g.sum(ab, &[-1], true).unwrap();
    g.add_output("dot", dot).unwrap();
    let opt = extracted(&g);
    let kernels = opt.nodes().filter(|(_, n)| !n.op.is_input()).count();
    assert_eq!(kernels, 1, "{}", fulgur_ir::text::print(&opt));
    assert!(has_op(&opt, |o| matches!(o, Op::Composite(Composite::Fused { .. }))));
}

#[test]
fn elementwise_consumers_of_a_norm_fuse_with_it() {
    // mul(rms_norm(add(x, r), w), c) with the norm also read by a matmul: the fused kernel recomputes it
    let mut g = Graph::new("norm");
    let x = g.input("x", DType::F32, bt(4)).unwrap();
    let r = g.input("r", DType::F32, bt(4)).unwrap();
    let w = g.param("w", DType::F32, vec![Dim::from(4)]).unwrap();
    let wo = g.param("wo", DType::F32, vec![Dim::from(2), Dim::from(4)]).unwrap();
    let z = g.add(x, r).unwrap();
    let n = g.rms_norm(z, w, 1e-6).unwrap();
    let s = g.scale(n, 1.5).unwrap();
    let p = g.linear(n, wo).unwrap();
    g.add_output("s", s).unwrap();
    g.add_output("p", p).unwrap();
    check(&g, &sizes());
    let bs = bodies(&ops_after(&g));
    assert!(
        bs.iter()
            .any(|b| has_op(b, |o| matches!(o, Op::Composite(Composite::RmsNorm { .. })))
                && has_op(b, |o| matches!(o, Op::Binary(BinaryOp::Add)))
                && has_op(b, |o| matches!(o, Op::Binary(BinaryOp::Mul)))),
        "{bs:?}"
    );
}

// ------------------------------------------------------------------------------------------- RMSNorm

/// `x · rsqrt(mean(x²) + eps) · w` written out, in one of several equivalent spellings.
fn decomposed_rms(variant: usize, d: i64) -> Graph {
    let mut g = Graph::new("rms");
    let x = g.input("x", DType::F32, bt(d)).unwrap();
    let w = g.param("w", DType::F32, vec![Dim::from(d)]).unwrap();
    let sq = if variant.is_multiple_of(2) {
        g.mul(x, x).unwrap()
    } else {
        let two = g.scalar(2.0, DType::F32).unwrap();
        g.binary(BinaryOp::Pow, x, two).unwrap()
    };
    let axis = if variant.is_multiple_of(3) { -1 } else { 2 };
    let ms = g.mean(sq, &[axis], true).unwrap();
    let eps = g.scalar(1e-6, DType::F32).unwrap();
    let s = if variant % 4 < 2 {
        g.add(ms, eps).unwrap()
    } else {
        g.add(eps, ms).unwrap()
    };
    let r = g.rsqrt(s).unwrap();
    let y = if variant % 5 < 3 {
        g.mul(x, r).unwrap()
    } else {
        g.mul(r, x).unwrap()
    };
    let out = if variant % 7 < 4 {
        g.mul(y, w).unwrap()
    } else {
        g.mul(w, y).unwrap()
    };
    g.add_output("y", out).unwrap();
    g
}

#[test]
fn decomposed_rms_norm_becomes_rms_norm() {
    for variant in 0..12 {
        for d in widths(0xf4 + variant as u64, 2, 6) {
            let g = decomposed_rms(variant, d);
            check(&g, &sizes());
            let ops = ops_after(&g);
            assert!(
                ops.iter()
                    .any(|o| matches!(o, Op::Composite(Composite::RmsNorm { eps }) if *eps == 1e-6)),
                "variant {variant}: no rms_norm"
            );
        }
    }
    // and the extractor keeps the composite
    let opt = extracted(&decomposed_rms(0, 8));
    assert!(
        has_op(&opt, |o| matches!(o, Op::Composite(Composite::RmsNorm { .. }))),
        "{}",
        fulgur_ir::text::print(&opt)
    );
}

#[test]
fn rms_norm_look_alikes_are_left_alone() {
    let d = 4;
    // (name, builder) — each differs from RMSNorm in one place
    type Build = fn(&mut Graph, Value, Value) -> Value;
    let cases: Vec<(&str, Build)> = vec![
        ("mean over axis 1", |g, x, w| {
            let sq = g.mul(x, x).unwrap();
            let ms = g.mean(sq, &[1], true).unwrap();
            let s = g.add_scalar(ms, 1e-6).unwrap();
            let r = g.rsqrt(s).unwrap();
            let y = g.mul(x, r).unwrap();
            g.mul(y, w).unwrap()
        }),
        ("sum, not mean", |g, x, w| {
            let sq = g.mul(x, x).unwrap();
            let ms = g.sum(sq, &[-1], true).unwrap();
            let s = g.add_scalar(ms, 1e-6).unwrap();
            let r = g.rsqrt(s).unwrap();
            let y = g.mul(x, r).unwrap();
            g.mul(y, w).unwrap()
        }),
        ("sqrt, not rsqrt", |g, x, w| {
            let sq = g.mul(x, x).unwrap();
            let ms = g.mean(sq, &[-1], true).unwrap();
            let s = g.add_scalar(ms, 1e-6).unwrap();
            let r = g.sqrt(s).unwrap();
            let y = g.mul(x, r).unwrap();
            g.mul(y, w).unwrap()
        }),
        ("square of another value", |g, x, w| {
            let x2 = g.neg(x).unwrap();
            let sq = g.mul(x2, x2).unwrap();
            let ms = g.mean(sq, &[-1], true).unwrap();
            let s = g.add_scalar(ms, 1e-6).unwrap();
            let r = g.rsqrt(s).unwrap();
            let y = g.mul(x, r).unwrap();
            g.mul(y, w).unwrap()
        }),
        ("pow 3", |g, x, w| {
            let three = g.scalar(3.0, DType::F32).unwrap();
            let sq = g.binary(BinaryOp::Pow, x, three).unwrap();
            let ms = g.mean(sq, &[-1], true).unwrap();
            let s = g.add_scalar(ms, 1e-6).unwrap();
            let r = g.rsqrt(s).unwrap();
            let y = g.mul(x, r).unwrap();
            g.mul(y, w).unwrap()
        }),
        ("eps per row, not a scalar", |g, x, w| {
            let sq = g.mul(x, x).unwrap();
            let ms = g.mean(sq, &[-1], true).unwrap();
            let e = g.full(1e-6, DType::F32, vec![Dim::from(1)]).unwrap();
            let s = g.add(ms, e).unwrap();
            let r = g.rsqrt(s).unwrap();
            let y = g.mul(x, r).unwrap();
            g.mul(y, w).unwrap()
        }),
    ];
    for (name, f) in cases {
        let mut g = Graph::new("look-alike");
        let x = g.input("x", DType::F32, bt(d)).unwrap();
        let w = g.param("w", DType::F32, vec![Dim::from(d)]).unwrap();
        let y = f(&mut g, x, w);
        g.add_output("y", y).unwrap();
        let ops = ops_after(&g);
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::Composite(Composite::RmsNorm { .. }))),
            "{name}: became rms_norm"
        );
        check(&g, &sizes()[1..2]);
    }
    // a weight of shape [1, d] is not an rms_norm weight
    let mut g = Graph::new("w2");
    let x = g.input("x", DType::F32, bt(d)).unwrap();
    let w = g.param("w", DType::F32, vec![Dim::from(1), Dim::from(d)]).unwrap();
    let sq = g.mul(x, x).unwrap();
    let ms = g.mean(sq, &[-1], true).unwrap();
    let s = g.add_scalar(ms, 1e-6).unwrap();
    let r = g.rsqrt(s).unwrap();
    let y = g.mul(x, r).unwrap();
    let y = g.mul(y, w).unwrap();
    g.add_output("y", y).unwrap();
    assert!(!ops_after(&g)
        .iter()
        .any(|o| matches!(o, Op::Composite(Composite::RmsNorm { .. }))));
}

// ------------------------------------------------------------------------------------------- projections

fn wide_matmul_in(g: &Graph) -> bool {
    g.nodes()
        .any(|(_, n)| matches!(n.op, Op::MatMul) && matches!(g.node(n.inputs[1].node).op, Op::Concat { .. }))
}

#[test]
fn projections_meeting_in_a_consumer_are_joined_soundly() {
    let mut rng = StdRng::seed_from_u64(0xf6);
    for (d, e) in [
        (1, 1),
        (rng.gen_range(1..=5), rng.gen_range(1..=5)),
        (rng.gen_range(1..=5), rng.gen_range(1..=5)),
    ] {
        let mut g = Graph::new("proj");
        let x = g.input("x", DType::F32, bt(d)).unwrap();
        let wq = g.param("wq", DType::F32, vec![Dim::from(e), Dim::from(d)]).unwrap();
        let wk = g.param("wk", DType::F32, vec![Dim::from(e), Dim::from(d)]).unwrap();
        let wv = g.param("wv", DType::F32, vec![Dim::from(2 * e), Dim::from(d)]).unwrap();
        let q = g.linear(x, wq).unwrap();
        let k = g.linear(x, wk).unwrap();
        let v = g.linear(x, wv).unwrap();
        // q and k meet in a matmul after views; v is read apart
        let q = g.reshape(q, vec![Dim::sym("B") * Dim::sym("T"), Dim::from(e)]).unwrap();
        let k = g.reshape(k, vec![Dim::sym("B") * Dim::sym("T"), Dim::from(e)]).unwrap();
        let kt = g.transpose(k, 0, 1).unwrap();
        let y = g.matmul(q, kt).unwrap();
        let vs = g.sum(v, &[-1], false).unwrap();
        g.add_output("y", y).unwrap();
        g.add_output("v", vs).unwrap();
        check(&g, &sizes());
        let opt = extracted(&g);
        assert!(wide_matmul_in(&opt), "{}", fulgur_ir::text::print(&opt));
        // where q and k have elementwise epilogues of their own and are wider than x, GEMM-epilogue kernels read
        // less than one wide matmul whose halves are re-read: the joined form is an alternative, and the cost
        // model declines it (where x is the wider, reading it once wins)
        let mut g = Graph::new("proj");
        let x = g.input("x", DType::F32, bt(d)).unwrap();
        let wq = g.param("wq", DType::F32, vec![Dim::from(e), Dim::from(d)]).unwrap();
        let wk = g.param("wk", DType::F32, vec![Dim::from(e), Dim::from(d)]).unwrap();
        let q = g.linear(x, wq).unwrap();
        let k = g.linear(x, wk).unwrap();
        let q = g.silu(q).unwrap();
        let k = g.scale(k, 0.5).unwrap();
        let y = g.mul(q, k).unwrap();
        g.add_output("y", y).unwrap();
        check(&g, &sizes());
        assert!(ops_after(&g).iter().any(|o| matches!(o, Op::Concat { .. })));
        let opt = extracted(&g);
        assert_eq!(wide_matmul_in(&opt), d > e, "{}", fulgur_ir::text::print(&opt));
    }
}

#[test]
fn projections_into_attention_are_joined() {
    // q, k, v projections of one x, split into heads, into flash attention: one matmul against [Wq | Wk | Wv]
    let (d, h, hd) = (8, 2, 4);
    let mut g = Graph::new("attn");
    let x = g.input("x", DType::F32, bt(d)).unwrap();
    let mut heads = Vec::new();
    for name in ["wq", "wk", "wv"] {
        let w = g
            .param(name, DType::F32, vec![Dim::from(h * hd), Dim::from(d)])
            .unwrap();
        let p = g.linear(x, w).unwrap();
        let p = g
            .reshape(p, vec![Dim::sym("B"), Dim::sym("T"), Dim::from(h), Dim::from(hd)])
            .unwrap();
        heads.push(g.permute(p, &[0, 2, 1, 3]).unwrap());
    }
    let q = g.scale(heads[0], 0.5).unwrap();
    let o = g.flash_attention(q, heads[1], heads[2], 0.5, true).unwrap();
    g.add_output("o", o).unwrap();
    check(&g, &sizes());
    let opt = extracted(&g);
    assert!(wide_matmul_in(&opt), "{}", fulgur_ir::text::print(&opt));
    let matmuls = opt.nodes().filter(|(_, n)| matches!(n.op, Op::MatMul)).count();
    assert_eq!(matmuls, 1, "{}", fulgur_ir::text::print(&opt));
}

#[test]
fn projections_that_never_meet_or_stand_alone_are_left_alone() {
    // one projection: nothing to join
    let mut g = Graph::new("one");
    let x = g.input("x", DType::F32, bt(3)).unwrap();
    let w = g.param("w", DType::F32, vec![Dim::from(2), Dim::from(3)]).unwrap();
    let y = g.linear(x, w).unwrap();
    let y = g.exp(y).unwrap();
    g.add_output("y", y).unwrap();
    assert!(!ops_after(&g).iter().any(|o| matches!(o, Op::Concat { .. })));
    // two projections of different inputs meeting: not projections of one x
    let mut g = Graph::new("two-x");
    let x = g.input("x", DType::F32, bt(3)).unwrap();
    let x2 = g.input("x2", DType::F32, bt(3)).unwrap();
    let w = g.param("w", DType::F32, vec![Dim::from(2), Dim::from(3)]).unwrap();
    let w2 = g.param("w2", DType::F32, vec![Dim::from(2), Dim::from(3)]).unwrap();
    let a = g.linear(x, w).unwrap();
    let b = g.linear(x2, w2).unwrap();
    let y = g.add(a, b).unwrap();
    g.add_output("y", y).unwrap();
    assert!(!ops_after(&g).iter().any(|o| matches!(o, Op::Concat { .. })));
    // projections of one x by data-dependent (not weight) operands
    let mut g = Graph::new("data");
    let x = g.input("x", DType::F32, vec![Dim::sym("T"), Dim::from(3)]).unwrap();
    let u = g.input("u", DType::F32, vec![Dim::from(3), Dim::from(2)]).unwrap();
    let v = g.input("v", DType::F32, vec![Dim::from(3), Dim::from(2)]).unwrap();
    let a = g.matmul(x, u).unwrap();
    let b = g.matmul(x, v).unwrap();
    let y = g.add(a, b).unwrap();
    g.add_output("y", y).unwrap();
    assert!(!ops_after(&g).iter().any(|o| matches!(o, Op::Concat { .. })));
    check(&g, &[env(&[("T", 3)])]);
}

// ------------------------------------------------------------------------------------------- random graphs

/// A random graph of elementwise ops, views, reductions, norms and projections over `[B, T, D]` values, with
/// shared intermediates and several outputs.
fn random_graph(seed: u64) -> Graph {
    let mut rng = StdRng::seed_from_u64(seed);
    let d = rng.gen_range(1..5i64);
    let mut g = Graph::new("random");
    let x = g.input("x", DType::F32, bt(d)).unwrap();
    let y = g.input("y", DType::F32, vec![Dim::sym("T"), Dim::from(d)]).unwrap();
    let w = g.param("w", DType::F32, vec![Dim::from(d)]).unwrap();
    let mut pool: Vec<Value> = vec![x, y];
    let steps = rng.gen_range(6..16);
    for _ in 0..steps {
        let a = pool[rng.gen_range(0..pool.len())];
        let b = pool[rng.gen_range(0..pool.len())];
        let v = match rng.gen_range(0..12) {
            0 => {
                let u = [
                    UnaryOp::Neg,
                    UnaryOp::Sigmoid,
                    UnaryOp::Silu,
                    UnaryOp::Tanh,
                    UnaryOp::Sin,
                    UnaryOp::Cos,
                ][rng.gen_range(0..6)];
                g.unary(u, a).ok()
            }
            1 => {
                // safe square root, log, reciprocal: of |a| + 1
                let p = g.unary(UnaryOp::Abs, a).unwrap();
                let p = g.add_scalar(p, 1.0).unwrap();
                let u = [UnaryOp::Sqrt, UnaryOp::Log, UnaryOp::Recip, UnaryOp::Rsqrt][rng.gen_range(0..4)];
                g.unary(u, p).ok()
            }
            2 | 3 => {
                let op = [
                    BinaryOp::Add,
                    BinaryOp::Sub,
                    BinaryOp::Mul,
                    BinaryOp::Max,
                    BinaryOp::Min,
                ][rng.gen_range(0..5)];
                g.binary(op, a, b).ok()
            }
            4 => {
                let c = g.compare(CmpOp::Lt, a, b).ok();
                c.and_then(|c| {
                    let f = g.cast(c, DType::F32).ok()?;
                    g.select(c, f, a).ok()
                })
            }
            5 => {
                let s: f64 = rng.gen_range(-2.0..2.0);
                g.scale(a, s).ok()
            }
            6 => {
                let keep = rng.gen_bool(0.5);
                let op = [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean][rng.gen_range(0..3)];
                g.reduce(op, a, &[-1], keep).ok()
            }
            7 => g.softmax(a, -1).ok(),
            8 => {
                if g.dims(a).last() == Some(&Dim::from(d)) {
                    g.rms_norm(a, w, 1e-5).ok()
                } else {
                    None
                }
            }
            9 => {
                // projections of one value by weights
                if g.rank(a) >= 2 && g.dims(a).last() == Some(&Dim::from(d)) {
                    let name = format!("p{}", g.node_count());
                    let wp = g.param(&name, DType::F32, vec![Dim::from(d), Dim::from(d)]).unwrap();
                    g.linear(a, wp).ok()
                } else {
                    None
                }
            }
            10 => {
                if g.dims(a) == bt(d).as_slice() {
                    let r = g.reshape(a, vec![Dim::sym("B") * Dim::sym("T"), Dim::from(d)]).unwrap();
                    let r = g.exp(r).unwrap();
                    g.reshape(r, bt(d)).ok()
                } else {
                    None
                }
            }
            _ => {
                let b2 = g.broadcast(y, bt(d)).ok();
                b2.and_then(|b2| g.mul(a, b2).ok())
            }
        };
        if let Some(v) = v {
            pool.push(v);
        }
    }
    let last = *pool.last().unwrap();
    g.add_output("out", last).unwrap();
    let other = pool[rng.gen_range(2.min(pool.len() - 1)..pool.len())];
    if other != last {
        g.add_output("mid", other).unwrap();
    }
    g
}

#[test]
fn random_graphs_fuse_soundly() {
    let mut fused = 0;
    for seed in 0..40 {
        let g = random_graph(seed);
        let e = [env(&[("B", 2), ("T", 3)]), env(&[("B", 1), ("T", 1)])];
        for (i, e) in e.iter().enumerate() {
            let inputs = random_inputs(&g, e, seed * 7 + i as u64, 4);
            check_soundness(&g, vec![fam()], &inputs, 1e-9)
                .unwrap_or_else(|err| panic!("seed {seed}: {err}\n{}", fulgur_ir::text::print(&g)));
        }
        fused += bodies(&ops_after(&g)).len();
    }
    assert!(
        fused > 40,
        "the rules rarely fired: {fused} fused kernels over 40 graphs"
    );
}

// ------------------------------------------------------------------------------------------- MiniMax

fn fixtures() -> PathBuf {
    fulgur_models::fixtures::dir()
}

fn cx() -> PassContext {
    PassContext {
        model: CostModel::new(Target::by_name("H100").unwrap()),
    }
}

fn optimize(g: &Graph, disabled: &[&str]) -> (Graph, usize, f64) {
    let disabled: Vec<String> = disabled.iter().map(|s| s.to_string()).collect();
    let p = standard_pipeline(&RuleConfig::default(), &disabled, Limits::default()).unwrap();
    let (opt, reports) = p.run(g, &cx(), None).unwrap();
    let last = reports.last().unwrap();
    (opt, last.kernels_after, last.cost_after_s)
}

#[test]
fn tiny_a_fuses_further_and_keeps_parity() {
    let dir = fixtures().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let reference = fulgur_ir::tensor::read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            hidden_states: true,
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (_, k_without, c_without) = optimize(&g, &["fusion"]);
    let (opt, k_with, c_with) = optimize(&g, &[]);
    assert!(k_with < k_without, "kernels {k_with} with fusion, {k_without} without");
    assert!(c_with < c_without, "cost {c_with} with fusion, {c_without} without");
    assert!(has_op(&opt, |o| matches!(o, Op::Composite(Composite::Fused { .. }))));
    assert!(wide_matmul_in(&opt), "no joined projection");
    let mut inputs = ck.load_params(&opt).unwrap();
    inputs.insert("input_ids".into(), reference["input_ids"].clone());
    let out = Interpreter::new(Precision::F32).run(&opt, &inputs).unwrap();
    for name in ["logits", "hidden_states.1", "hidden_states.4"] {
        let e = out[name].rel_l2(&reference[name]);
        assert!(e < 1e-4, "{name}: {e}");
    }
    let (a, b) = (out["loss"].to_f64()[0], reference["loss"].to_f64()[0]);
    assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
}

#[test]
fn full_config_fuses_per_template() {
    let cfg = MiniMaxConfig::from_file(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/configs/minimax-text-01.json"
    )))
    .unwrap();
    let g = forward_graph(&cfg, &ForwardOptions::default()).unwrap();
    let (_, k_without, c_without) = optimize(&g, &["fusion"]);
    let (opt, k_with, c_with) = optimize(&g, &[]);
    assert!(k_with < k_without, "kernels {k_with} with fusion, {k_without} without");
    assert!(c_with < c_without, "cost {c_with} with fusion, {c_without} without");
    opt.verify().unwrap();
}

/// Every `rsqrt` in a graph, including those inside fused bodies.
fn rsqrt_count(g: &Graph) -> usize {
    g.nodes()
        .map(|(_, n)| match &n.op {
            Op::Unary(UnaryOp::Rsqrt) => 1,
            Op::Composite(Composite::Fused { body }) => rsqrt_count(body.graph()),
            _ => 0,
        })
        .sum()
}

/// `rms-norm-pattern` was written for MiniMax's RMSNorm, which the definitional model writes out as MINIMAX.md
/// defines it: it fires in every layer template (input and post-attention norms, and the lightning output
/// norm) and in the head (final norm), and no written-out norm is left after optimization.
#[test]
fn rms_norm_pattern_fires_on_the_minimax_model() {
    let dir = fixtures().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let written_out = rsqrt_count(&g);
    // 4 layers x 2 norms, 3 lightning output norms, the final norm
    assert_eq!(written_out, 12);
    let cx = PassContext {
        model: CostModel::new(Target::by_name("H100").unwrap()),
    };
    let p = standard_pipeline(&RuleConfig::default(), &[], Limits::default()).unwrap();
    let (opt, reports) = p.run(&g, &cx, None).unwrap();
    let eq = reports[1].eqsat.as_ref().unwrap();
    let applied = |name: &str| {
        eq.templates
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.rules["rms-norm-pattern"].applications)
    };
    // lightning layers: two layer norms and the output norm; the softmax layer: two; the head: one (a rewrite
    // that copies a path, such as joining projections, may give the rule more to apply to)
    assert!(applied("layers.0") >= Some(3), "{:?}", applied("layers.0"));
    assert!(applied("layers.3") >= Some(2), "{:?}", applied("layers.3"));
    let head = eq.templates.last().unwrap();
    assert!(head.rules["rms-norm-pattern"].applications >= 1, "{}", head.name);
    assert_eq!(rsqrt_count(&opt), 0, "{}", fulgur_ir::text::print(&opt));
}
