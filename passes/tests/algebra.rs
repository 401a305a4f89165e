//! Soundness of the algebra family: every alternative the rules add agrees with the original (f64), on sizes
//! drawn from a seeded generator.

use fulgur_ir::{DType, Dim, Graph};
use fulgur_passes::rules::{algebra, RuleConfig};
use fulgur_passes::testing::{check_soundness, random_inputs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

fn env(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Checks soundness on three input draws; `min_checked` alternatives must differ from the extracted graph.
fn check(g: &Graph, env: &HashMap<String, i64>, min_checked: usize) {
    for seed in 0..3 {
        let inputs = random_inputs(g, env, seed, 4);
        let r = check_soundness(g, vec![algebra::family(&RuleConfig::default())], &inputs, 1e-12)
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{r}");
        assert!(r.checked >= min_checked, "{r}");
    }
}

/// `g` through the whole optimizer (every rule family), as a compile runs it.
fn optimized(g: &Graph) -> Graph {
    let pipeline = fulgur_passes::Pipeline::new()
        .with(fulgur_passes::Dce)
        .with(fulgur_passes::EqSat::new(
            fulgur_passes::rules::families(&RuleConfig::default(), &[]).unwrap(),
        ));
    let cx = fulgur_passes::PassContext {
        model: fulgur_passes::CostModel::new(fulgur_passes::Target::by_name("H100").unwrap()),
    };
    pipeline.run(g, &cx, None).unwrap().0
}

#[test]
fn layout_folding_is_sound() {
    let mut rng = StdRng::seed_from_u64(0xa1);
    for case in 0..4 {
        // the first case is the smallest: B = T = 1
        let (b, t) = if case == 0 {
            (1, 1)
        } else {
            (rng.gen_range(1..=4), rng.gen_range(1..=6))
        };
        let mut g = Graph::new("layout");
        let x = g
            .input(
                "x",
                DType::F32,
                vec![Dim::sym("B"), Dim::sym("T"), Dim::from(4), Dim::from(6)],
            )
            .unwrap();
        let p = g.permute(x, &[0, 2, 1, 3]).unwrap();
        let p = g.permute(p, &[3, 1, 0, 2]).unwrap();
        let q = g.permute(p, &[2, 0, 1, 3]).unwrap();
        let r = g
            .reshape(q, vec![Dim::sym("B") * Dim::sym("T"), Dim::from(24)])
            .unwrap();
        let r = g
            .reshape(r, vec![Dim::sym("B"), Dim::sym("T") * Dim::from(24)])
            .unwrap();
        let c = g.cast(r, DType::F32).unwrap();
        let one = g.scalar(1.0, DType::F32).unwrap();
        let m = g.mul(c, one).unwrap();
        let zero = g.scalar(0.0, DType::F32).unwrap();
        let a = g.add(zero, m).unwrap();
        let s = g.scale(a, 2.5).unwrap();
        let s = g.scale(s, -0.5).unwrap();
        g.add_output("y", s).unwrap();
        check(&g, &env(&[("B", b), ("T", t)]), 5);
    }
}

#[test]
fn matmul_reassociation_is_sound() {
    let mut rng = StdRng::seed_from_u64(0xa2);
    for _ in 0..4 {
        let [m, k, n, p] = [0; 4].map(|_| rng.gen_range(1..=8i64));
        let mut g = Graph::new("chain");
        let a = g.input("a", DType::F32, vec![Dim::sym("M"), Dim::from(k)]).unwrap();
        let b = g.input("b", DType::F32, vec![Dim::from(k), Dim::from(n)]).unwrap();
        let c = g.input("c", DType::F32, vec![Dim::from(n), Dim::from(p)]).unwrap();
        let ab = g.matmul(a, b).unwrap();
        let abc = g.matmul(ab, c).unwrap();
        g.add_output("y", abc).unwrap();
        check(&g, &env(&[("M", m)]), 1);
    }
}

#[test]
fn broadcasting_neutral_elements_are_not_folded() {
    // x [1] * ones [3] changes the shape: the rule must not fire
    let mut g = Graph::new("bcast");
    let x = g.input("x", DType::F32, vec![Dim::from(1)]).unwrap();
    let ones = g.full(1.0, DType::F32, vec![Dim::from(3)]).unwrap();
    let y = g.mul(x, ones).unwrap();
    g.add_output("y", y).unwrap();
    check(&g, &env(&[]), 0);
}

/// `(x · c1) · c2` = `x · (c1·c2)` only where `c1·c2` is exact in the dtype: f32 `0.1 · 3` rounds (the product
/// is not an f32), so folding it would change the result; `0.1 · 4` (a power of two) and `1.5 · 2.5` are exact
/// and fold. A literal that is not a value of its dtype (`0.1` in an f32 constant, which the interpreter's f64
/// mode keeps as written) is never folded. bf16 constants round much earlier (`1.5 · 1.0078125` needs 9
/// significant bits).
#[test]
fn scale_folding_only_where_the_product_is_exact() {
    let tenth = 0.1f32 as f64;
    let cases: [(DType, f64, f64, bool); 7] = [
        (DType::F32, tenth, 3.0, false),
        (DType::F32, tenth, 4.0, true),
        (DType::F32, 1.5, 2.5, true),
        (DType::F32, (1.0f32 / 3.0) as f64, 3.0, false),
        (DType::F32, 0.1, 4.0, false),
        (DType::BF16, 1.5, 1.0078125, false),
        (DType::BF16, 1.5, 2.5, true),
    ];
    for (dtype, c1, c2, folds) in cases {
        let mut g = Graph::new("scales");
        let x = g.input("x", dtype, vec![Dim::sym("N")]).unwrap();
        let a = g.scalar(c1, dtype).unwrap();
        let b = g.scalar(c2, dtype).unwrap();
        let y = g.mul(x, a).unwrap();
        let y = g.mul(y, b).unwrap();
        g.add_output("y", y).unwrap();
        let inputs = random_inputs(&g, &env(&[("N", 7)]), 3, 4);
        let r = check_soundness(&g, vec![algebra::family(&RuleConfig::default())], &inputs, 1e-15)
            .unwrap_or_else(|e| panic!("{dtype} {c1} · {c2}: {e}"));
        assert_eq!(r.checked > 0, folds, "{dtype} {c1} · {c2}: {r}");
    }
}

/// A weight's gradient as autodiff writes it, `reduce_sum[0](Xᵀ·dY)` over the batch, equals one matmul over the
/// merged contraction (`batch-sum-matmul`); with the whole optimizer it is what gets built: one matmul of
/// `[K, B·T]` by `[B·T, N]` and no reduction.
#[test]
fn a_batched_matmul_summed_over_the_batch_is_one_matmul() {
    let mut rng = StdRng::seed_from_u64(0xa3);
    for case in 0..4 {
        let (b, t) = if case == 0 {
            (1, 1)
        } else {
            (rng.gen_range(1..=4), rng.gen_range(1..=6))
        };
        let [k, n] = [0; 2].map(|_| rng.gen_range(1..=8i64));
        let mut g = Graph::new("wgrad");
        let x = g
            .input("x", DType::F32, vec![Dim::sym("B"), Dim::sym("T"), Dim::from(k)])
            .unwrap();
        let dy = g
            .input("dy", DType::F32, vec![Dim::sym("B"), Dim::sym("T"), Dim::from(n)])
            .unwrap();
        let xt = g.permute(x, &[0, 2, 1]).unwrap();
        let per = g.matmul(xt, dy).unwrap();
        let dw = g.reduce(fulgur_ir::ReduceOp::Sum, per, &[0], false).unwrap();
        g.add_output("dw", dw).unwrap();
        check(&g, &env(&[("B", b), ("T", t)]), 1);
    }
    // at a size where the reduction's traffic matters, the optimizer builds the single matmul
    let mut g = Graph::new("wgrad");
    let x = g
        .input("x", DType::BF16, vec![Dim::sym("B"), Dim::sym("T"), Dim::from(2048)])
        .unwrap();
    let dy = g
        .input("dy", DType::BF16, vec![Dim::sym("B"), Dim::sym("T"), Dim::from(4096)])
        .unwrap();
    let xt = g.permute(x, &[0, 2, 1]).unwrap();
    let per = g.matmul(xt, dy).unwrap();
    let dw = g.reduce(fulgur_ir::ReduceOp::Sum, per, &[0], false).unwrap();
    g.add_output("dw", dw).unwrap();
    let opt = optimized(&g);
    let ops: Vec<String> = opt.nodes().map(|(_, n)| n.op.name().to_string()).collect();
    assert_eq!(ops.iter().filter(|o| *o == "matmul").count(), 1, "{ops:?}");
    assert!(!ops.iter().any(|o| o == "reduce_sum" || o == "fused"), "{ops:?}");
}

/// A one-hot equals the comparison of the indices with the positions (`one-hot-compare`), out-of-range
/// indices (3 of depth 3: `check` draws indices in 0..4) giving a zero row. With the whole optimizer, the
/// loss `−mean(Σ log_softmax(logits[:, :-1]) ⊙ one_hot(ids[:, 1:]))` reads no one-hot tensor: the comparison is
/// computed inside the reduction (whose body leaves the reshape to `[B, T − 1, 1]`, whose `T` no argument has
/// as a whole dimension, as an argument: a view).
#[test]
fn a_one_hot_is_a_comparison_its_readers_compute() {
    let mut g = Graph::new("one_hot");
    let idx = g.input("idx", DType::I64, vec![Dim::sym("B"), Dim::sym("T")]).unwrap();
    let x = g
        .input("x", DType::F32, vec![Dim::sym("B"), Dim::sym("T"), Dim::from(3)])
        .unwrap();
    let oh = g.one_hot(idx, 3, DType::F32).unwrap();
    let m = g.mul(oh, x).unwrap();
    let y = g.sum(m, &[2], false).unwrap();
    g.add_output("oh", oh).unwrap();
    g.add_output("y", y).unwrap();
    check(&g, &env(&[("B", 2), ("T", 5)]), 1);

    let mut g = Graph::new("loss");
    let ids = g.input("ids", DType::I64, vec![Dim::sym("B"), Dim::sym("T")]).unwrap();
    let h = g
        .input("h", DType::F32, vec![Dim::sym("B"), Dim::sym("T"), Dim::from(96)])
        .unwrap();
    let w = g.input("w", DType::F32, vec![Dim::from(96), Dim::from(256)]).unwrap();
    let logits = g.matmul(h, w).unwrap();
    let t1 = Dim::sym("T") - Dim::from(1);
    let x = g.slice(logits, 1, Dim::from(0), t1).unwrap();
    let lsm = g.log_softmax(x, -1).unwrap();
    let labels = g.slice(ids, 1, Dim::from(1), Dim::sym("T")).unwrap();
    let oh = g.one_hot(labels, 256, DType::F32).unwrap();
    let m = g.mul(lsm, oh).unwrap();
    let y = g.sum(m, &[-1], false).unwrap();
    let n = g.neg(y).unwrap();
    let l = g.mean(n, &[0, 1], false).unwrap();
    g.add_output("logits", logits).unwrap();
    g.add_output("loss", l).unwrap();
    check(&g, &env(&[("B", 2), ("T", 5)]), 1);
    let opt = optimized(&g);
    let ops: Vec<String> = opt.nodes().map(|(_, n)| n.op.name().to_string()).collect();
    assert!(!ops.iter().any(|o| o == "one_hot" || o == "mul"), "{ops:?}");
}
