//! Collectives simulated over a leading rank axis: `all_to_all` against a hand loop over ranks (every axis,
//! R = 1..4, random shapes, float and integer data), the asynchronous pair against the blocking op, the
//! exchange as its own inverse, its decomposition on symbolic shapes, typing errors, and the text and JSON
//! round trips.

use fulgur_ir::{json, text, Composite, DType, Dim, Graph, Interpreter, Op, Precision, Tensor, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

fn a2a(axis: i64) -> Op {
    Op::Composite(Composite::AllToAll { axis })
}

fn start(axis: i64, overlap: Dim) -> Op {
    Op::Composite(Composite::AllToAllStart {
        axis,
        overlap_flops: overlap,
    })
}

fn wait() -> Op {
    Op::Composite(Composite::CollectiveWait)
}

fn cd(v: &[usize]) -> Vec<Dim> {
    v.iter().map(|&x| Dim::from(x)).collect()
}

fn run1(g: &Graph, name: &str, x: &Tensor) -> Tensor {
    let ins: HashMap<String, Tensor> = [(name.to_string(), x.clone())].into();
    let out = Interpreter::new(Precision::F64)
        .run(g, &ins)
        .unwrap_or_else(|e| panic!("{e}\n{}", text::print(g)));
    out.into_values().next().expect("one output")
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The all-to-all written as a loop over ranks: rank `r` gets, at chunk `s` of `axis`, rank `s`'s chunk `r`.
fn reference(x: &[f64], shape: &[usize], axis: usize) -> Vec<f64> {
    let ranks = shape[0];
    let c = shape[axis] / ranks;
    let st = strides(shape);
    let mut out = vec![f64::NAN; x.len()];
    let n = x.len();
    for (flat, o) in out.iter_mut().enumerate().take(n) {
        // multi-index of the output element
        let idx: Vec<usize> = (0..shape.len()).map(|d| (flat / st[d]) % shape[d]).collect();
        let (r, s, j) = (idx[0], idx[axis] / c, idx[axis] % c);
        // the element of rank s's buffer that rank r receives: rank s sent its chunk r
        let mut src = idx.clone();
        src[0] = s;
        src[axis] = r * c + j;
        *o = x[src.iter().zip(&st).map(|(i, k)| i * k).sum::<usize>()];
    }
    out
}

/// One-op graph `op(x)` for `x: dtype[dims]`.
fn one_op(op: Op, dtype: DType, dims: Vec<Dim>) -> (Graph, Value) {
    let mut g = Graph::new("c");
    let x = g.input("x", dtype, dims).unwrap();
    let y = g.op1(op, &[x]).unwrap();
    g.add_output("y", y).unwrap();
    (g, y)
}

#[test]
fn all_to_all_matches_a_loop_over_ranks() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut cases = 0;
    for _ in 0..120 {
        let ranks = rng.gen_range(1..=4usize);
        let rank = rng.gen_range(2..=4usize);
        let axis = rng.gen_range(1..rank);
        let mut shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..=3usize)).collect();
        shape[0] = ranks;
        shape[axis] = ranks * rng.gen_range(1..=3usize);
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = (0..n).map(|i| i as f64 + 0.25 * rng.gen_range(0..2) as f64).collect();
        let neg = rng.gen_bool(0.5);
        let ax = if neg { axis as i64 - rank as i64 } else { axis as i64 };
        let want = reference(&vals, &shape, axis);
        // blocking, f32 data
        let (g, _) = one_op(a2a(ax), DType::F32, cd(&shape));
        let got = run1(&g, "x", &Tensor::from_f64(DType::F32, shape.clone(), vals.clone()));
        assert_eq!(got.shape, shape);
        assert_eq!(got.to_f64(), want, "shape {shape:?} axis {ax}");
        // the started form and its wait, integer data
        let mut g = Graph::new("c");
        let x = g.input("x", DType::I64, cd(&shape)).unwrap();
        let h = g.op1(start(ax, Dim::from(123usize)), &[x]).unwrap();
        let y = g.op1(wait(), &[h]).unwrap();
        g.add_output("y", y).unwrap();
        let ints: Vec<i64> = (0..n as i64).collect();
        let got = run1(&g, "x", &Tensor::from_i64(DType::I64, shape.clone(), ints.clone()));
        let want_i = reference(&ints.iter().map(|&i| i as f64).collect::<Vec<_>>(), &shape, axis);
        assert_eq!(got.to_f64(), want_i, "start/wait: shape {shape:?} axis {ax}");
        cases += 1;
    }
    assert_eq!(cases, 120);
}

#[test]
fn hand_sharded_exchange_of_expert_buffers() {
    // 2 ranks × 2 destinations × 3 tokens × 2 features: send[r, s, j, :] = (100r + 10s + j) for both features
    let (ranks, tokens, c) = (2usize, 3usize, 2usize);
    let shape = vec![ranks, ranks, tokens, c];
    let mut vals = Vec::new();
    for r in 0..ranks {
        for s in 0..ranks {
            for j in 0..tokens {
                for _ in 0..c {
                    vals.push((100 * r + 10 * s + j) as f64);
                }
            }
        }
    }
    let (g, _) = one_op(a2a(1), DType::F32, cd(&shape));
    let got = run1(&g, "x", &Tensor::from_f64(DType::F32, shape.clone(), vals)).to_f64();
    // rank r, block s now holds what rank s addressed to r: 100s + 10r + j
    let mut i = 0;
    for r in 0..ranks {
        for s in 0..ranks {
            for j in 0..tokens {
                for _ in 0..c {
                    assert_eq!(got[i], (100 * s + 10 * r + j) as f64, "rank {r} block {s} token {j}");
                    i += 1;
                }
            }
        }
    }
}

#[test]
fn all_to_all_is_its_own_inverse_and_the_identity_on_one_rank() {
    let mut rng = StdRng::seed_from_u64(3);
    for ranks in 1..=4usize {
        let shape = vec![ranks, 2, 3 * ranks];
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = (0..n).map(|_| rng.gen_range(-8..8) as f64 / 4.0).collect();
        let mut g = Graph::new("c");
        let x = g.input("x", DType::F32, cd(&shape)).unwrap();
        let y = g.op1(a2a(2), &[x]).unwrap();
        let z = g.op1(a2a(-1), &[y]).unwrap();
        g.add_output("y", y).unwrap();
        g.add_output("z", z).unwrap();
        let ins: HashMap<String, Tensor> = [(
            "x".to_string(),
            Tensor::from_f64(DType::F32, shape.clone(), vals.clone()),
        )]
        .into();
        let out = Interpreter::new(Precision::F64).run(&g, &ins).unwrap();
        assert_eq!(out["z"].to_f64(), vals, "R = {ranks}");
        if ranks == 1 {
            assert_eq!(out["y"].to_f64(), vals);
        }
    }
}

#[test]
fn decomposition_on_symbolic_shapes_has_the_inferred_type_and_runs() {
    for (dims, axis) in [
        (
            vec![Dim::sym("R"), Dim::sym("R") * Dim::sym("T"), Dim::from(4usize)],
            1i64,
        ),
        (
            vec![Dim::sym("R"), Dim::sym("E"), Dim::sym("R") * Dim::from(3usize)],
            -1,
        ),
        (
            vec![Dim::from(4usize), Dim::sym("T"), Dim::from(8usize), Dim::sym("C")],
            2,
        ),
    ] {
        for op in [a2a(axis), start(axis, Dim::sym("T") * Dim::from(2usize))] {
            let (g, y) = one_op(op.clone(), DType::BF16, dims.clone());
            let mut d = Graph::new("d");
            let x = d.input("x", DType::BF16, dims.clone()).unwrap();
            let Op::Composite(c) = &op else { unreachable!() };
            let outs = c.decompose(&mut d, &[x]).unwrap();
            assert_eq!(d.ty(outs[0]), g.ty(y), "{op:?} on {dims:?}");
        }
    }
    // and runs with the symbols bound (`T` from an input of its own)
    let mut g = Graph::new("c");
    let x = g
        .input("x", DType::F32, vec![Dim::sym("R"), Dim::sym("R") * Dim::sym("T")])
        .unwrap();
    g.input("t", DType::F32, vec![Dim::sym("T")]).unwrap();
    let y = g.op1(a2a(1), &[x]).unwrap();
    g.add_output("y", y).unwrap();
    let vals: Vec<f64> = (0..3 * 6).map(|i| i as f64).collect();
    let ins: HashMap<String, Tensor> = [
        ("x".to_string(), Tensor::from_f64(DType::F32, vec![3, 6], vals.clone())),
        ("t".to_string(), Tensor::from_f64(DType::F32, vec![2], vec![0.0; 2])),
    ]
    .into();
    let got = Interpreter::new(Precision::F64).run(&g, &ins).unwrap();
    assert_eq!(got["y"].to_f64(), reference(&vals, &[3, 6], 1));
}

#[test]
fn typing_errors_say_what_is_wrong() {
    let cases: Vec<(Op, Vec<Dim>, &str)> = vec![
        (a2a(0), cd(&[2]), "leading rank axis and at least one more axis"),
        (a2a(0), cd(&[2, 4]), "is the rank axis"),
        (a2a(-2), cd(&[2, 4]), "is the rank axis"),
        (a2a(2), cd(&[2, 4]), "out of range"),
        (a2a(1), cd(&[3, 4]), "does not divide"),
        (a2a(1), cd(&[0, 4]), "at least one rank"),
        (a2a(1), vec![Dim::sym("R"), Dim::sym("T")], "does not divide"),
        (
            start(1, Dim::from(0usize)),
            cd(&[4, 6]),
            "`all_to_all_start`: axis 1 of f32[4, 6]",
        ),
    ];
    for (op, dims, want) in cases {
        let mut g = Graph::new("c");
        let x = g.input("x", DType::F32, dims.clone()).unwrap();
        let e = g.op1(op.clone(), &[x]).unwrap_err().to_string();
        assert!(e.contains(want), "{op:?} on {dims:?}: `{e}` lacks `{want}`");
    }
    // a symbolic rank count divides its own multiples
    let (g, _) = one_op(
        a2a(1),
        DType::F32,
        vec![Dim::sym("R"), Dim::from(2usize) * Dim::sym("R")],
    );
    g.verify().unwrap();
    // attributes are checked by the parser
    let e =
        text::parse("graph g {\n  %0 = input \"x\" : f32[2, 4]\n  %1 = all_to_all_start[axis=1](%0)\n}\n").unwrap_err();
    assert!(e.to_string().contains("needs attribute `overlap_flops`"), "{e}");
    let e =
        text::parse("graph g {\n  %0 = input \"x\" : f32[2, 4]\n  %1 = collective_wait[axis=1](%0)\n}\n").unwrap_err();
    assert!(e.to_string().contains("has no attribute `axis`"), "{e}");
}

#[test]
fn text_and_json_round_trip() {
    let src = "graph ep {
  %0 = input \"x\" : bf16[R, 4, R*T, 8]
  %1 = all_to_all[axis=2](%0)
  %2 = all_to_all_start[axis=-2, overlap_flops=64*T](%1)
  %3 = collective_wait(%2)
  %4 = all_to_all_start[axis=2, overlap_flops=0](%3)
  %5 = collective_wait(%4)
  output \"y\" = %5
}
";
    let g = text::parse(src).unwrap();
    let printed = text::print(&g);
    assert_eq!(text::print(&text::parse(&printed).unwrap()), printed);
    assert!(
        printed.contains("all_to_all_start[axis=-2, overlap_flops=64*T]"),
        "{printed}"
    );
    assert!(printed.contains("collective_wait(%2)"), "{printed}");
    let j = json::to_json(&g);
    let back = json::from_json(&j).unwrap();
    assert_eq!(text::print(&back), printed);
    assert!(j.contains("\"all_to_all_start\""), "{j}");
}
