//! What every op means: each op of [`Op`] is built with the builder API, run by the reference interpreter and
//! compared against values computed independently here (hand-written, or plain loops in this file).

// The oracles are deliberately written as plain index loops, the most obviously correct form.
#![allow(clippy::needless_range_loop)]

use fulgur_ir::{
    BinaryOp, Buffer, CmpOp, ConstData, DType, Dim, Graph, Interpreter, IrError, Op, Precision, Tensor, UnaryOp,
};
use proptest::collection::vec as pvec;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};

// ------------------------------------------------------------------ helpers

fn sym(s: &str) -> Dim {
    Dim::sym(s)
}

fn cd(v: &[usize]) -> Vec<Dim> {
    v.iter().map(|&n| Dim::from(n)).collect()
}

fn f32t(shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::from_f64(DType::F32, shape.to_vec(), v.to_vec())
}

fn ft(dtype: DType, shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::from_f64(dtype, shape.to_vec(), v.to_vec())
}

fn it(dtype: DType, shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::from_i64(dtype, shape.to_vec(), v.to_vec())
}

fn bt(shape: &[usize], v: &[bool]) -> Tensor {
    Tensor::from_bool(shape.to_vec(), v.to_vec())
}

fn inputs(v: Vec<(&str, Tensor)>) -> HashMap<String, Tensor> {
    v.into_iter().map(|(n, t)| (n.to_string(), t)).collect()
}

fn try_run(p: Precision, g: &Graph, ins: Vec<(&str, Tensor)>) -> Result<BTreeMap<String, Tensor>, IrError> {
    Interpreter::new(p).run(g, &inputs(ins))
}

fn run_p(p: Precision, g: &Graph, ins: Vec<(&str, Tensor)>) -> BTreeMap<String, Tensor> {
    try_run(p, g, ins).unwrap_or_else(|e| panic!("run failed: {e}"))
}

fn run64(g: &Graph, ins: Vec<(&str, Tensor)>) -> BTreeMap<String, Tensor> {
    run_p(Precision::F64, g, ins)
}

/// Runs in f64 and returns the output `y`.
fn y64(g: &Graph, ins: Vec<(&str, Tensor)>) -> Tensor {
    run64(g, ins).remove("y").expect("output y")
}

fn floats(t: &Tensor) -> Vec<f64> {
    match &t.data {
        Buffer::F(v) => v.clone(),
        other => panic!("expected float storage, got {other:?}"),
    }
}

fn ints(t: &Tensor) -> Vec<i64> {
    match &t.data {
        Buffer::I(v) => v.clone(),
        other => panic!("expected integer storage, got {other:?}"),
    }
}

fn bools(t: &Tensor) -> Vec<bool> {
    match &t.data {
        Buffer::B(v) => v.clone(),
        other => panic!("expected bool storage, got {other:?}"),
    }
}

/// Equal within `tol` (absolute for |want| <= 1, relative above); NaN matches NaN, infinities match exactly.
fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= tol * w.abs().max(1.0)
        };
        assert!(
            ok,
            "element {i}: got {g}, want {w} (tol {tol})\n got {got:?}\nwant {want:?}"
        );
    }
}

/// Bit-exact equality (NaN matches NaN).
fn assert_exact(got: &[f64], want: &[f64]) {
    assert_close(got, want, 0.0);
}

/// Row-major strides of a shape.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Every multi-index of `shape` in row-major order.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let n: usize = shape.iter().product();
    let st = strides(shape);
    (0..n)
        .map(|lin| shape.iter().enumerate().map(|(i, &d)| (lin / st[i]) % d).collect())
        .collect()
}

fn lin(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(strides(shape)).map(|(i, s)| i * s).sum()
}

/// A deterministic pseudo-random sequence in [-1, 1) (xorshift), for test data.
fn data(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // multiples of 1/1024: exact in f32 and products exact in f64
            ((s >> 11) % 2048) as f64 / 1024.0 - 1.0
        })
        .collect()
}

/// Hand reduction: folds the elements of `x` (shape `shape`) over the axes in `red`, keepdims layout.
fn hand_reduce(x: &[f64], shape: &[usize], red: &[usize], init: f64, f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    let kshape: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if red.contains(&i) { 1 } else { d })
        .collect();
    let mut out = vec![init; kshape.iter().product()];
    for idx in indices(shape) {
        let oidx: Vec<usize> = idx
            .iter()
            .enumerate()
            .map(|(i, &v)| if red.contains(&i) { 0 } else { v })
            .collect();
        let o = lin(&oidx, &kshape);
        out[o] = f(out[o], x[lin(&idx, shape)]);
    }
    out
}

/// A scalar function of one float.
type F1 = fn(f64) -> f64;

/// A scalar function of two floats.
type F2 = fn(f64, f64) -> f64;

/// A graph `y = f(x)` for one input `x`.
fn unary_graph(
    dtype: DType,
    dims: Vec<Dim>,
    f: impl FnOnce(&mut Graph, fulgur_ir::Value) -> fulgur_ir::Value,
) -> Graph {
    let mut g = Graph::new("t");
    let x = g.input("x", dtype, dims).unwrap();
    let y = f(&mut g, x);
    g.add_output("y", y).unwrap();
    g
}

/// Every op name this file tests; checked against [`Op::all_names`].
const TESTED: &[&str] = &[
    "input",
    "param",
    "constant",
    "full",
    "iota",
    "neg",
    "abs",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "recip",
    "sigmoid",
    "silu",
    "tanh",
    "sin",
    "cos",
    "add",
    "sub",
    "mul",
    "div",
    "max",
    "min",
    "pow",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "select",
    "cast",
    "matmul",
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_mean",
    "reshape",
    "permute",
    "broadcast",
    "slice",
    "concat",
    "gather",
    "scatter_add",
    "topk",
    "one_hot",
    "cumsum",
    "softmax",
    "log_softmax",
    "rms_norm",
];

/// Composites tested against their definitions in `composites.rs` (not here; `fused` in `fused.rs`).
const TESTED_IN_COMPOSITES_RS: &[&str] = &[
    "fused",
    "lightning_attention",
    "lightning_layer",
    "flash_attention",
    "flash_attention_lse",
    "flash_attention_rope",
    "moe_router",
    "moe_dispatch",
    "grouped_matmul",
    "moe_combine",
    "flash_attention_grad",
    "grouped_matmul_wgrad",
    // in `collectives.rs`
    "all_to_all",
    "all_to_all_start",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "send_recv",
    "shard_slice",
    "all_to_all_dispatch",
    "all_to_all_combine",
    "collective_wait",
    "per_rank",
    "on_rank",
];

#[test]
fn every_op_is_tested() {
    let all: BTreeSet<&str> = Op::all_names().into_iter().collect();
    let tested: BTreeSet<&str> = TESTED.iter().chain(TESTED_IN_COMPOSITES_RS).copied().collect();
    assert_eq!(all, tested, "ops without tests, or tests of unknown ops");
}

// ------------------------------------------------------------- sources

#[test]
fn symbol_bound_by_no_input_is_an_error_naming_the_node() {
    let mut g = Graph::new("t");
    let _x = g.input("x", DType::F32, vec![sym("N")]).unwrap();
    let f = g.scope("blk", |g| g.full(0.0, DType::F32, vec![sym("M")])).unwrap();
    g.add_output("y", f).unwrap();
    let err = try_run(Precision::F64, &g, vec![("x", f32t(&[1], &[0.0]))]).unwrap_err();
    assert_eq!(err.to_string(), "node %1 \"blk.full\" (full): symbol `M` is not bound");
}

#[test]
fn input_and_param_pass_through() {
    let mut g = Graph::new("t");
    let x = g.input("x", DType::F32, vec![sym("N")]).unwrap();
    let w = g.param("w", DType::I32, vec![Dim::from(2)]).unwrap();
    let b = g.input("b", DType::Bool, vec![]).unwrap();
    g.add_output("x", x).unwrap();
    g.add_output("w", w).unwrap();
    g.add_output("b", b).unwrap();
    g.add_output("x_again", x).unwrap();
    let out = run64(
        &g,
        vec![
            ("x", f32t(&[3], &[1.5, -2.0, 0.25])),
            ("w", it(DType::I32, &[2], &[7, -8])),
            ("b", bt(&[], &[true])),
        ],
    );
    assert_eq!(out.len(), 4);
    assert_eq!(out["x"], f32t(&[3], &[1.5, -2.0, 0.25]));
    assert_eq!(out["x_again"], out["x"]);
    assert_eq!(out["w"], it(DType::I32, &[2], &[7, -8]));
    assert_eq!(out["b"], bt(&[], &[true]));
    assert_eq!(g.params().len(), 1);
    assert_eq!(g.inputs().len(), 3);
}

#[test]
fn constant_values_and_dtypes() {
    let mut g = Graph::new("t");
    let a = g
        .constant(DType::F32, vec![2, 2], ConstData::Float(vec![1.0, -2.5, 3.0, 0.5]))
        .unwrap();
    let b = g.constant(DType::I32, vec![3], ConstData::Int(vec![1, -2, 3])).unwrap();
    let c = g
        .constant(DType::Bool, vec![2], ConstData::Bool(vec![true, false]))
        .unwrap();
    let s = g.scalar(4.0, DType::I64).unwrap();
    let e = g.constant(DType::F32, vec![0, 3], ConstData::Float(vec![])).unwrap();
    for (n, v) in [("a", a), ("b", b), ("c", c), ("s", s), ("e", e)] {
        g.add_output(n, v).unwrap();
    }
    let out = run64(&g, vec![]);
    assert_eq!(out["a"].shape, vec![2, 2]);
    assert_exact(&floats(&out["a"]), &[1.0, -2.5, 3.0, 0.5]);
    assert_eq!(out["b"], it(DType::I32, &[3], &[1, -2, 3]));
    assert_eq!(out["c"], bt(&[2], &[true, false]));
    assert_eq!(out["s"], it(DType::I64, &[], &[4]));
    assert_eq!(out["e"].shape, vec![0, 3]);
    assert!(floats(&out["e"]).is_empty());
}

#[test]
fn constant_is_rounded_to_its_dtype_in_f32_precision() {
    let mut g = Graph::new("t");
    let a = g
        .constant(DType::BF16, vec![2], ConstData::Float(vec![1.0 + 2f64.powi(-9), 0.1]))
        .unwrap();
    g.add_output("y", a).unwrap();
    let rounded = run_p(Precision::F32, &g, vec![]).remove("y").unwrap();
    // bf16 keeps 8 significant bits: 0.1 = 0x3DCC_CCCD (f32) -> 0x3DCD (bf16) = 0.10009765625
    assert_exact(&floats(&rounded), &[1.0, 0.10009765625]);
    let exact = y64(&g, vec![]);
    assert_exact(&floats(&exact), &[1.0 + 2f64.powi(-9), 0.1]);
}

#[test]
fn full_fills_symbolic_shapes() {
    let mut g = Graph::new("t");
    let x = g.input("x", DType::F32, vec![sym("N")]).unwrap();
    let f = g.full(2.5, DType::F32, vec![sym("N"), Dim::from(2)]).unwrap();
    let i = g.full(-2.7, DType::I32, vec![Dim::from(3)]).unwrap();
    let b = g.full(1.0, DType::Bool, vec![sym("N")]).unwrap();
    let z = g.full(7.0, DType::F32, vec![sym("N"), Dim::from(0)]).unwrap();
    let _ = x;
    for (n, v) in [("f", f), ("i", i), ("b", b), ("z", z)] {
        g.add_output(n, v).unwrap();
    }
    let out = run64(&g, vec![("x", f32t(&[3], &[0.0; 3]))]);
    assert_eq!(out["f"].shape, vec![3, 2]);
    assert_exact(&floats(&out["f"]), &[2.5; 6]);
    // integer fill truncates toward zero
    assert_eq!(out["i"], it(DType::I32, &[3], &[-2, -2, -2]));
    assert_eq!(out["b"], bt(&[3], &[true; 3]));
    assert_eq!(out["z"].shape, vec![3, 0]);
}

#[test]
fn iota_on_symbolic_shapes() {
    let mut g = Graph::new("t");
    let _x = g.input("x", DType::F32, vec![sym("N")]).unwrap();
    let a0 = g.iota(DType::I64, vec![sym("N"), Dim::from(2)], 0).unwrap();
    let a1 = g.iota(DType::I32, vec![sym("N"), Dim::from(2)], -1).unwrap();
    let f = g
        .iota(DType::F32, vec![Dim::from(2), sym("N"), Dim::from(1)], 1)
        .unwrap();
    let e = g.iota(DType::I64, vec![Dim::from(0), sym("N")], 1).unwrap();
    for (n, v) in [("a0", a0), ("a1", a1), ("f", f), ("e", e)] {
        g.add_output(n, v).unwrap();
    }
    let out = run64(&g, vec![("x", f32t(&[3], &[0.0; 3]))]);
    assert_eq!(out["a0"], it(DType::I64, &[3, 2], &[0, 0, 1, 1, 2, 2]));
    assert_eq!(out["a1"], it(DType::I32, &[3, 2], &[0, 1, 0, 1, 0, 1]));
    assert_eq!(out["f"].dtype, DType::F32);
    assert_eq!(out["f"].shape, vec![2, 3, 1]);
    assert_exact(&floats(&out["f"]), &[0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
    assert_eq!(out["e"].shape, vec![0, 3]);
}

// ------------------------------------------------------------- elementwise

#[test]
fn unary_float_ops() {
    let xs = [-2.0, -0.5, 0.0, 0.25, 1.0, 3.0];
    let pos = [0.25, 1.0, 4.0, 9.0];
    let cases: Vec<(UnaryOp, &[f64], F1)> = vec![
        (UnaryOp::Neg, &xs, |x| -x),
        (UnaryOp::Abs, &xs, |x| if x < 0.0 { -x } else { x }),
        (UnaryOp::Exp, &xs, f64::exp),
        (UnaryOp::Log, &pos, f64::ln),
        (UnaryOp::Sqrt, &pos, f64::sqrt),
        (UnaryOp::Rsqrt, &pos, |x| 1.0 / x.sqrt()),
        (UnaryOp::Recip, &pos, |x| 1.0 / x),
        (UnaryOp::Sigmoid, &xs, |x| 1.0 / (1.0 + (-x).exp())),
        (UnaryOp::Silu, &xs, |x| x * (1.0 / (1.0 + (-x).exp()))),
        (UnaryOp::Tanh, &xs, f64::tanh),
        (UnaryOp::Sin, &xs, f64::sin),
        (UnaryOp::Cos, &xs, f64::cos),
    ];
    assert_eq!(cases.len(), UnaryOp::ALL.len());
    for (op, vals, f) in cases {
        let g = unary_graph(DType::F32, vec![sym("N")], |g, x| g.unary(op, x).unwrap());
        let y = y64(&g, vec![("x", f32t(&[vals.len()], vals))]);
        let want: Vec<f64> = vals.iter().map(|&x| f(x)).collect();
        assert_close(&floats(&y), &want, 1e-15);
        assert_eq!(y.dtype, DType::F32, "{}", op.name());
    }
}

#[test]
fn unary_hand_values_and_special_cases() {
    let check = |op: UnaryOp, x: &[f64], want: &[f64]| {
        let g = unary_graph(DType::F32, vec![Dim::from(x.len())], |g, v| g.unary(op, v).unwrap());
        // stored unrounded: Precision::F64 computes on exactly these values
        let t = Tensor {
            dtype: DType::F32,
            shape: vec![x.len()],
            data: Buffer::F(x.to_vec()),
        };
        let y = y64(&g, vec![("x", t)]);
        assert_close(&floats(&y), want, 1e-15);
    };
    check(UnaryOp::Neg, &[1.5, -0.0], &[-1.5, 0.0]);
    check(UnaryOp::Abs, &[-1.5, 2.0], &[1.5, 2.0]);
    check(UnaryOp::Exp, &[0.0, f64::NEG_INFINITY], &[1.0, 0.0]);
    check(UnaryOp::Log, &[1.0, 0.0, -1.0], &[0.0, f64::NEG_INFINITY, f64::NAN]);
    check(UnaryOp::Sqrt, &[0.25, 16.0, -1.0], &[0.5, 4.0, f64::NAN]);
    check(UnaryOp::Rsqrt, &[0.25, 4.0, 0.0], &[2.0, 0.5, f64::INFINITY]);
    check(UnaryOp::Recip, &[0.25, -2.0, 0.0], &[4.0, -0.5, f64::INFINITY]);
    check(UnaryOp::Sigmoid, &[0.0, 1000.0, -1000.0], &[0.5, 1.0, 0.0]);
    check(UnaryOp::Silu, &[0.0, 1000.0], &[0.0, 1000.0]);
    check(UnaryOp::Tanh, &[0.0, 1000.0, -1000.0], &[0.0, 1.0, -1.0]);
    check(UnaryOp::Sin, &[0.0, std::f64::consts::FRAC_PI_2], &[0.0, 1.0]);
    check(UnaryOp::Cos, &[0.0, std::f64::consts::PI], &[1.0, -1.0]);
}

#[test]
fn unary_integer_ops() {
    for dt in [DType::I32, DType::I64] {
        let g = unary_graph(dt, vec![Dim::from(4)], |g, x| g.neg(x).unwrap());
        let y = y64(&g, vec![("x", it(dt, &[4], &[3, -4, 0, 7]))]);
        assert_eq!(y, it(dt, &[4], &[-3, 4, 0, -7]));
        let g = unary_graph(dt, vec![Dim::from(4)], |g, x| g.unary(UnaryOp::Abs, x).unwrap());
        let y = y64(&g, vec![("x", it(dt, &[4], &[3, -4, 0, -7]))]);
        assert_eq!(y, it(dt, &[4], &[3, 4, 0, 7]));
    }
    // wrapping at the dtype's width
    let g = unary_graph(DType::I64, vec![Dim::from(1)], |g, x| g.neg(x).unwrap());
    assert_eq!(
        y64(&g, vec![("x", it(DType::I64, &[1], &[i64::MIN]))]).to_i64(),
        vec![i64::MIN]
    );
    let g = unary_graph(DType::I32, vec![Dim::from(2)], |g, x| g.unary(UnaryOp::Abs, x).unwrap());
    let y = y64(&g, vec![("x", it(DType::I32, &[2], &[i32::MIN as i64, -5]))]);
    assert_eq!(ints(&y), vec![i32::MIN as i64, 5]);
}

fn binary_graph(op: BinaryOp, dt: DType, a: Vec<Dim>, b: Vec<Dim>) -> Graph {
    let mut g = Graph::new("t");
    let x = g.input("a", dt, a).unwrap();
    let y = g.input("b", dt, b).unwrap();
    let z = g.binary(op, x, y).unwrap();
    g.add_output("y", z).unwrap();
    g
}

#[test]
fn binary_float_ops_broadcast_a_row() {
    let a = [1.0, -2.0, 3.0, 4.0, 0.5, -6.0];
    let b = [2.0, 4.0, -3.0];
    let cases: [(BinaryOp, F2); 7] = [
        (BinaryOp::Add, |x, y| x + y),
        (BinaryOp::Sub, |x, y| x - y),
        (BinaryOp::Mul, |x, y| x * y),
        (BinaryOp::Div, |x, y| x / y),
        (BinaryOp::Max, |x, y| if x > y { x } else { y }),
        (BinaryOp::Min, |x, y| if x < y { x } else { y }),
        (BinaryOp::Pow, f64::powf),
    ];
    for (op, f) in cases {
        let g = binary_graph(op, DType::F32, cd(&[2, 3]), cd(&[3]));
        let y = y64(&g, vec![("a", f32t(&[2, 3], &a)), ("b", f32t(&[3], &b))]);
        assert_eq!(y.shape, vec![2, 3]);
        let mut want = vec![];
        for i in 0..2 {
            for j in 0..3 {
                want.push(f(a[i * 3 + j], b[j]));
            }
        }
        assert_close(&floats(&y), &want, 1e-15);
    }
    // a few by hand
    let g = binary_graph(BinaryOp::Sub, DType::F32, cd(&[2, 1]), cd(&[3]));
    let y = y64(
        &g,
        vec![("a", f32t(&[2, 1], &[10.0, 20.0])), ("b", f32t(&[3], &[1.0, 2.0, 3.0]))],
    );
    assert_eq!(y.shape, vec![2, 3]);
    assert_exact(&floats(&y), &[9.0, 8.0, 7.0, 19.0, 18.0, 17.0]);
    let g = binary_graph(BinaryOp::Pow, DType::F32, cd(&[3]), cd(&[]));
    let y = y64(&g, vec![("a", f32t(&[3], &[2.0, 9.0, -2.0])), ("b", f32t(&[], &[0.5]))]);
    assert_close(&floats(&y), &[std::f64::consts::SQRT_2, 3.0, f64::NAN], 1e-15);
}

#[test]
fn max_min_propagate_nan() {
    for op in [BinaryOp::Max, BinaryOp::Min] {
        let g = binary_graph(op, DType::F32, cd(&[3]), cd(&[3]));
        let y = y64(
            &g,
            vec![
                ("a", f32t(&[3], &[f64::NAN, 1.0, 2.0])),
                ("b", f32t(&[3], &[1.0, f64::NAN, -2.0])),
            ],
        );
        let last = if op == BinaryOp::Max { 2.0 } else { -2.0 };
        assert_exact(&floats(&y), &[f64::NAN, f64::NAN, last]);
    }
}

#[test]
fn broadcasting_rules() {
    // size-1 dims on both sides, rank promotion
    let g = binary_graph(BinaryOp::Add, DType::F32, cd(&[2, 1, 3]), cd(&[4, 1]));
    let a: Vec<f64> = (0..6).map(|v| v as f64 * 100.0).collect();
    let b: Vec<f64> = (0..4).map(|v| v as f64).collect();
    let y = y64(&g, vec![("a", f32t(&[2, 1, 3], &a)), ("b", f32t(&[4, 1], &b))]);
    assert_eq!(y.shape, vec![2, 4, 3]);
    let mut want = vec![];
    for i in 0..2 {
        for j in 0..4 {
            for k in 0..3 {
                want.push(a[i * 3 + k] + b[j]);
            }
        }
    }
    assert_exact(&floats(&y), &want);

    // scalar against a tensor, both orders
    let g = binary_graph(BinaryOp::Sub, DType::F32, cd(&[]), cd(&[2, 2]));
    let y = y64(
        &g,
        vec![("a", f32t(&[], &[1.0])), ("b", f32t(&[2, 2], &[1.0, 2.0, 3.0, 4.0]))],
    );
    assert_exact(&floats(&y), &[0.0, -1.0, -2.0, -3.0]);

    // a zero-size dim broadcasts against 1
    let g = binary_graph(BinaryOp::Add, DType::F32, cd(&[0, 1]), cd(&[3]));
    let y = y64(&g, vec![("a", f32t(&[0, 1], &[])), ("b", f32t(&[3], &[1.0, 2.0, 3.0]))]);
    assert_eq!(y.shape, vec![0, 3]);
    assert!(floats(&y).is_empty());
}

#[test]
fn broadcasting_symbolic_dims_bound_at_run_time() {
    // [B, 1] + [T] -> [B, T]
    let g = binary_graph(BinaryOp::Add, DType::F32, vec![sym("B"), Dim::from(1)], vec![sym("T")]);
    assert_eq!(g.ty(g.outputs()[0].1).to_string(), "f32[B, T]");
    let y = y64(
        &g,
        vec![("a", f32t(&[2, 1], &[10.0, 20.0])), ("b", f32t(&[3], &[1.0, 2.0, 3.0]))],
    );
    assert_eq!(y.shape, vec![2, 3]);
    assert_exact(&floats(&y), &[11.0, 12.0, 13.0, 21.0, 22.0, 23.0]);
    // the same graph with other bindings, B = 1 and T = 0
    let y = y64(&g, vec![("a", f32t(&[1, 1], &[10.0])), ("b", f32t(&[0], &[]))]);
    assert_eq!(y.shape, vec![1, 0]);
    // B bound to 1 is still [B, T], not broadcast against anything else
    let y = y64(&g, vec![("a", f32t(&[1, 1], &[5.0])), ("b", f32t(&[2], &[1.0, 2.0]))]);
    assert_exact(&floats(&y), &[6.0, 7.0]);
}

#[test]
fn integer_binary_ops() {
    let a = [7, -7, 7, -7, 0, 9];
    let b = [2, 2, -2, -2, 3, 3];
    for dt in [DType::I32, DType::I64] {
        let run = |op| {
            let g = binary_graph(op, dt, cd(&[6]), cd(&[6]));
            ints(&y64(&g, vec![("a", it(dt, &[6], &a)), ("b", it(dt, &[6], &b))]))
        };
        assert_eq!(run(BinaryOp::Add), vec![9, -5, 5, -9, 3, 12]);
        assert_eq!(run(BinaryOp::Sub), vec![5, -9, 9, -5, -3, 6]);
        assert_eq!(run(BinaryOp::Mul), vec![14, -14, -14, 14, 0, 27]);
        // division truncates toward zero
        assert_eq!(run(BinaryOp::Div), vec![3, -3, -3, 3, 0, 3]);
        assert_eq!(run(BinaryOp::Max), vec![7, 2, 7, -2, 3, 9]);
        assert_eq!(run(BinaryOp::Min), vec![2, -7, -2, -7, 0, 3]);
    }
    let g = binary_graph(BinaryOp::Pow, DType::I64, cd(&[4]), cd(&[4]));
    let y = y64(
        &g,
        vec![
            ("a", it(DType::I64, &[4], &[2, -3, 5, 0])),
            ("b", it(DType::I64, &[4], &[10, 3, 0, 0])),
        ],
    );
    assert_eq!(ints(&y), vec![1024, -27, 1, 1]);
}

#[test]
fn integer_arithmetic_wraps_at_the_dtype_width() {
    let g = binary_graph(BinaryOp::Add, DType::I64, cd(&[1]), cd(&[1]));
    let y = y64(
        &g,
        vec![
            ("a", it(DType::I64, &[1], &[i64::MAX])),
            ("b", it(DType::I64, &[1], &[1])),
        ],
    );
    assert_eq!(ints(&y), vec![i64::MIN]);
    let g = binary_graph(BinaryOp::Add, DType::I32, cd(&[2]), cd(&[2]));
    let y = y64(
        &g,
        vec![
            ("a", it(DType::I32, &[2], &[i32::MAX as i64, i32::MIN as i64])),
            ("b", it(DType::I32, &[2], &[1, -1])),
        ],
    );
    assert_eq!(ints(&y), vec![i32::MIN as i64, i32::MAX as i64]);
    let g = binary_graph(BinaryOp::Mul, DType::I32, cd(&[1]), cd(&[1]));
    let y = y64(
        &g,
        vec![
            ("a", it(DType::I32, &[1], &[65536])),
            ("b", it(DType::I32, &[1], &[65536])),
        ],
    );
    assert_eq!(ints(&y), vec![0]);
    let g = binary_graph(BinaryOp::Div, DType::I32, cd(&[1]), cd(&[1]));
    let y = y64(
        &g,
        vec![
            ("a", it(DType::I32, &[1], &[i32::MIN as i64])),
            ("b", it(DType::I32, &[1], &[-1])),
        ],
    );
    assert_eq!(ints(&y), vec![i32::MIN as i64]);
}

#[test]
fn integer_division_by_zero_is_a_node_error() {
    let mut g = Graph::new("t");
    let a = g.input("a", DType::I32, vec![sym("N")]).unwrap();
    let b = g.input("b", DType::I32, vec![sym("N")]).unwrap();
    let q = g.scope("blk", |g| g.div(a, b)).unwrap();
    g.add_output("y", q).unwrap();
    let err = try_run(
        Precision::F64,
        &g,
        vec![
            ("a", it(DType::I32, &[2], &[4, 5])),
            ("b", it(DType::I32, &[2], &[2, 0])),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, IrError::Node { id: 2, .. }), "{err:?}");
    assert_eq!(err.to_string(), "node %2 \"blk.div\" (div): integer division by zero");

    // float division by zero is IEEE
    let g = binary_graph(BinaryOp::Div, DType::F32, cd(&[3]), cd(&[3]));
    let y = y64(
        &g,
        vec![("a", f32t(&[3], &[1.0, -1.0, 0.0])), ("b", f32t(&[3], &[0.0; 3]))],
    );
    assert_exact(&floats(&y), &[f64::INFINITY, f64::NEG_INFINITY, f64::NAN]);
}

#[test]
fn integer_negative_exponent_is_a_node_error() {
    let g = binary_graph(BinaryOp::Pow, DType::I64, cd(&[2]), cd(&[2]));
    let err = try_run(
        Precision::F64,
        &g,
        vec![
            ("a", it(DType::I64, &[2], &[2, 2])),
            ("b", it(DType::I64, &[2], &[1, -1])),
        ],
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "node %2 (pow): negative integer exponent -1");
}

#[test]
fn comparisons() {
    let a = [1.0, 2.0, f64::NAN, -0.0, 3.0];
    let b = [2.0, 2.0, f64::NAN, 0.0, 1.0];
    let want: [(CmpOp, [bool; 5]); 6] = [
        (CmpOp::Eq, [false, true, false, true, false]),
        (CmpOp::Ne, [true, false, true, false, true]),
        (CmpOp::Lt, [true, false, false, false, false]),
        (CmpOp::Le, [true, true, false, true, false]),
        (CmpOp::Gt, [false, false, false, false, true]),
        (CmpOp::Ge, [false, true, false, true, true]),
    ];
    for (op, w) in want {
        let mut g = Graph::new("t");
        let x = g.input("a", DType::F32, cd(&[5])).unwrap();
        let y = g.input("b", DType::F32, cd(&[5])).unwrap();
        let z = g.compare(op, x, y).unwrap();
        g.add_output("y", z).unwrap();
        let out = y64(&g, vec![("a", f32t(&[5], &a)), ("b", f32t(&[5], &b))]);
        assert_eq!(out.dtype, DType::Bool);
        assert_eq!(bools(&out), w.to_vec(), "{}", op.name());
    }
    // integers with broadcasting: [3, 1] vs [2]
    let mut g = Graph::new("t");
    let x = g.input("a", DType::I64, cd(&[3, 1])).unwrap();
    let y = g.input("b", DType::I64, cd(&[2])).unwrap();
    let z = g.compare(CmpOp::Lt, x, y).unwrap();
    g.add_output("y", z).unwrap();
    let out = y64(
        &g,
        vec![
            ("a", it(DType::I64, &[3, 1], &[0, 1, 2])),
            ("b", it(DType::I64, &[2], &[1, 2])),
        ],
    );
    assert_eq!(out.shape, vec![3, 2]);
    assert_eq!(bools(&out), vec![true, true, false, true, false, false]);
    // booleans: false < true
    let mut g = Graph::new("t");
    let x = g.input("a", DType::Bool, cd(&[4])).unwrap();
    let y = g.input("b", DType::Bool, cd(&[4])).unwrap();
    let lt = g.compare(CmpOp::Lt, x, y).unwrap();
    let eq = g.compare(CmpOp::Eq, x, y).unwrap();
    g.add_output("lt", lt).unwrap();
    g.add_output("eq", eq).unwrap();
    let out = run64(
        &g,
        vec![
            ("a", bt(&[4], &[false, false, true, true])),
            ("b", bt(&[4], &[false, true, false, true])),
        ],
    );
    assert_eq!(bools(&out["lt"]), vec![false, true, false, false]);
    assert_eq!(bools(&out["eq"]), vec![true, false, false, true]);
}

#[test]
fn select_broadcasts_all_three() {
    let mut g = Graph::new("t");
    let c = g.input("c", DType::Bool, cd(&[2, 1])).unwrap();
    let a = g.input("a", DType::F32, cd(&[3])).unwrap();
    let b = g.input("b", DType::F32, cd(&[])).unwrap();
    let s = g.select(c, a, b).unwrap();
    g.add_output("y", s).unwrap();
    let y = y64(
        &g,
        vec![
            ("c", bt(&[2, 1], &[true, false])),
            ("a", f32t(&[3], &[1.0, 2.0, 3.0])),
            ("b", f32t(&[], &[9.0])),
        ],
    );
    assert_eq!(y.shape, vec![2, 3]);
    assert_exact(&floats(&y), &[1.0, 2.0, 3.0, 9.0, 9.0, 9.0]);

    let mut g = Graph::new("t");
    let c = g.input("c", DType::Bool, cd(&[4])).unwrap();
    let a = g.input("a", DType::I32, cd(&[4])).unwrap();
    let b = g.input("b", DType::I32, cd(&[1])).unwrap();
    let s = g.select(c, a, b).unwrap();
    g.add_output("y", s).unwrap();
    let y = y64(
        &g,
        vec![
            ("c", bt(&[4], &[true, false, false, true])),
            ("a", it(DType::I32, &[4], &[1, 2, 3, 4])),
            ("b", it(DType::I32, &[1], &[-1])),
        ],
    );
    assert_eq!(y, it(DType::I32, &[4], &[1, -1, -1, 4]));
}

#[test]
fn cast_between_dtypes() {
    let cast = |x: Tensor, to: DType| {
        let g = unary_graph(x.dtype, cd(&x.shape), |g, v| g.cast(v, to).unwrap());
        y64(&g, vec![("x", x)])
    };
    let xs = f32t(&[6], &[2.7, -2.7, 0.5, -0.0, f64::NAN, 3.0]);
    // float -> int truncates toward zero; NaN gives 0
    assert_eq!(cast(xs.clone(), DType::I64), it(DType::I64, &[6], &[2, -2, 0, 0, 0, 3]));
    assert_eq!(cast(xs.clone(), DType::I32), it(DType::I32, &[6], &[2, -2, 0, 0, 0, 3]));
    // float -> bool: nonzero (NaN included) is true
    assert_eq!(cast(xs, DType::Bool), bt(&[6], &[true, true, true, false, true, true]));
    assert_exact(&floats(&cast(bt(&[2], &[true, false]), DType::F32)), &[1.0, 0.0]);
    assert_eq!(
        cast(bt(&[2], &[true, false]), DType::I32),
        it(DType::I32, &[2], &[1, 0])
    );
    assert_eq!(
        cast(it(DType::I64, &[3], &[0, 5, -1]), DType::Bool),
        bt(&[3], &[false, true, true])
    );
    // i64 -> i32 wraps
    assert_eq!(
        cast(it(DType::I64, &[3], &[(1 << 32) + 5, 1 << 31, -1]), DType::I32),
        it(DType::I32, &[3], &[5, -(1 << 31), -1])
    );
    assert_eq!(
        cast(it(DType::I32, &[1], &[-7]), DType::I64),
        it(DType::I64, &[1], &[-7])
    );
    // int -> float rounds to the target dtype
    let y = cast(it(DType::I64, &[2], &[16_777_217, 3]), DType::F32);
    assert_exact(&floats(&y), &[16_777_216.0, 3.0]);
    let y = cast(it(DType::I64, &[2], &[257, 3]), DType::BF16);
    assert_eq!(y.dtype, DType::BF16);
    assert_exact(&floats(&y), &[256.0, 3.0]);
    // f32 -> bf16 -> f32 rounds to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7
    let y = cast(
        f32t(&[3], &[1.0 + 2f64.powi(-8), 1.0 + 3.0 * 2f64.powi(-8), 0.1]),
        DType::BF16,
    );
    assert_exact(&floats(&y), &[1.0, 1.0 + 2f64.powi(-6), 0.10009765625]);
    let y = cast(f32t(&[2], &[1.0 + 2f64.powi(-11), 65520.0]), DType::F16);
    assert_exact(&floats(&y), &[1.0, f64::INFINITY]);
}

#[test]
fn cast_float_to_int_in_f32_precision() {
    let g = unary_graph(DType::F32, cd(&[3]), |g, v| g.cast(v, DType::I32).unwrap());
    let y = run_p(Precision::F32, &g, vec![("x", f32t(&[3], &[1.9999, -0.9, 100.5]))])
        .remove("y")
        .unwrap();
    assert_eq!(y, it(DType::I32, &[3], &[1, 0, 100]));
}

// ------------------------------------------------------------- matmul

fn hand_matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                out[i * n + j] += a[i * k + p] * b[p * n + j];
            }
        }
    }
    out
}

fn matmul_graph(dt: DType, a: Vec<Dim>, b: Vec<Dim>) -> Graph {
    let mut g = Graph::new("t");
    let x = g.input("a", dt, a).unwrap();
    let y = g.input("b", dt, b).unwrap();
    let z = g.matmul(x, y).unwrap();
    g.add_output("y", z).unwrap();
    g
}

#[test]
fn matmul_by_hand() {
    let g = matmul_graph(DType::F32, cd(&[2, 3]), cd(&[3, 2]));
    let y = y64(
        &g,
        vec![
            ("a", f32t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            ("b", f32t(&[3, 2], &[7.0, 8.0, 9.0, 10.0, 11.0, 12.0])),
        ],
    );
    assert_eq!(y.shape, vec![2, 2]);
    assert_exact(&floats(&y), &[58.0, 64.0, 139.0, 154.0]);
}

#[test]
fn matmul_batch_broadcasting() {
    // [2, 1, 3, 4] x [5, 4, 2] -> [2, 5, 3, 2]
    let g = matmul_graph(DType::F32, cd(&[2, 1, 3, 4]), cd(&[5, 4, 2]));
    assert_eq!(g.ty(g.outputs()[0].1).to_string(), "f32[2, 5, 3, 2]");
    let a = data(24, 1);
    let b = data(40, 2);
    let y = y64(&g, vec![("a", f32t(&[2, 1, 3, 4], &a)), ("b", f32t(&[5, 4, 2], &b))]);
    assert_eq!(y.shape, vec![2, 5, 3, 2]);
    let mut want = vec![0.0; 2 * 5 * 3 * 2];
    for i in 0..2 {
        for j in 0..5 {
            for r in 0..3 {
                for c in 0..2 {
                    let mut s = 0.0;
                    for p in 0..4 {
                        s += a[i * 12 + r * 4 + p] * b[j * 8 + p * 2 + c];
                    }
                    want[((i * 5 + j) * 3 + r) * 2 + c] = s;
                }
            }
        }
    }
    assert_close(&floats(&y), &want, 1e-14);

    // rank 2 x rank 3: the matrix is shared by every batch
    let g = matmul_graph(DType::F32, cd(&[3, 4]), cd(&[2, 4, 5]));
    let a = data(12, 3);
    let b = data(40, 4);
    let y = y64(&g, vec![("a", f32t(&[3, 4], &a)), ("b", f32t(&[2, 4, 5], &b))]);
    assert_eq!(y.shape, vec![2, 3, 5]);
    let mut want = hand_matmul(&a, &b[..20], 3, 4, 5);
    want.extend(hand_matmul(&a, &b[20..], 3, 4, 5));
    assert_close(&floats(&y), &want, 1e-14);
}

#[test]
fn matmul_symbolic_and_empty() {
    let g = matmul_graph(DType::F32, vec![sym("B"), sym("T"), Dim::from(2)], cd(&[2, 3]));
    assert_eq!(g.ty(g.outputs()[0].1).to_string(), "f32[B, T, 3]");
    let a = data(2 * 2 * 2, 5);
    let b = data(6, 6);
    let y = y64(&g, vec![("a", f32t(&[2, 2, 2], &a)), ("b", f32t(&[2, 3], &b))]);
    assert_eq!(y.shape, vec![2, 2, 3]);
    assert_close(&floats(&y), &hand_matmul(&a, &b, 4, 2, 3), 1e-14);
    // K = 0 gives zeros; M = 0 gives an empty result
    let g = matmul_graph(DType::F32, cd(&[2, 0]), cd(&[0, 3]));
    let y = y64(&g, vec![("a", f32t(&[2, 0], &[])), ("b", f32t(&[0, 3], &[]))]);
    assert_eq!(y.shape, vec![2, 3]);
    assert_exact(&floats(&y), &[0.0; 6]);
    let g = matmul_graph(DType::F32, cd(&[0, 2]), cd(&[2, 3]));
    let y = y64(&g, vec![("a", f32t(&[0, 2], &[])), ("b", f32t(&[2, 3], &[0.0; 6]))]);
    assert_eq!(y.shape, vec![0, 3]);
}

// ------------------------------------------------------------- reductions

#[test]
fn reductions_axes_keepdims_negative_axes() {
    let shape = [2, 3, 4];
    let x: Vec<f64> = (0..24).map(|v| ((v * 7) % 11) as f64 - 5.0).collect();
    let ops: [(fulgur_ir::ReduceOp, f64, F2); 4] = [
        (fulgur_ir::ReduceOp::Sum, 0.0, |a, b| a + b),
        (
            fulgur_ir::ReduceOp::Max,
            f64::NEG_INFINITY,
            |a, b| if b > a { b } else { a },
        ),
        (
            fulgur_ir::ReduceOp::Min,
            f64::INFINITY,
            |a, b| if b < a { b } else { a },
        ),
        (fulgur_ir::ReduceOp::Mean, 0.0, |a, b| a + b),
    ];
    // (axes given, normalised axes)
    let axes_cases: [(&[i64], &[usize]); 7] = [
        (&[1], &[1]),
        (&[-1], &[2]),
        (&[0, 2], &[0, 2]),
        (&[-3, -2], &[0, 1]),
        (&[2, 0], &[0, 2]),
        (&[0, 1, 2], &[0, 1, 2]),
        (&[], &[]),
    ];
    for (op, init, f) in ops {
        for (axes, red) in axes_cases {
            let mut want = hand_reduce(&x, &shape, red, init, f);
            if op == fulgur_ir::ReduceOp::Mean {
                let count: usize = red.iter().map(|&a| shape[a]).product();
                want.iter_mut().for_each(|v| *v /= count as f64);
            }
            for keepdims in [true, false] {
                let g = unary_graph(DType::F32, cd(&shape), |g, v| g.reduce(op, v, axes, keepdims).unwrap());
                let y = y64(&g, vec![("x", f32t(&shape, &x))]);
                let want_shape: Vec<usize> = (0..3)
                    .filter_map(|i| {
                        if !red.contains(&i) {
                            Some(shape[i])
                        } else if keepdims {
                            Some(1)
                        } else {
                            None
                        }
                    })
                    .collect();
                assert_eq!(y.shape, want_shape, "{} {axes:?} keepdims={keepdims}", op.name());
                assert_close(&floats(&y), &want, 1e-15);
            }
        }
    }
}

#[test]
fn reductions_by_hand() {
    let x = f32t(&[2, 3], &[1.0, 5.0, -2.0, 4.0, 0.0, 6.0]);
    let r = |op, axes: &[i64], keep| {
        let g = unary_graph(DType::F32, cd(&[2, 3]), |g, v| g.reduce(op, v, axes, keep).unwrap());
        y64(&g, vec![("x", x.clone())])
    };
    use fulgur_ir::ReduceOp::*;
    let y = r(Sum, &[1], false);
    assert_eq!(y.shape, vec![2]);
    assert_exact(&floats(&y), &[4.0, 10.0]);
    let y = r(Sum, &[0], true);
    assert_eq!(y.shape, vec![1, 3]);
    assert_exact(&floats(&y), &[5.0, 5.0, 4.0]);
    assert_exact(&floats(&r(Max, &[-1], false)), &[5.0, 6.0]);
    assert_exact(&floats(&r(Min, &[-2], false)), &[1.0, 0.0, -2.0]);
    let y = r(Mean, &[0, 1], false);
    assert_eq!(y.shape, Vec::<usize>::new());
    assert_exact(&floats(&y), &[14.0 / 6.0]);
    let y = r(Mean, &[0, 1], true);
    assert_eq!(y.shape, vec![1, 1]);
}

#[test]
fn reductions_on_symbolic_shapes() {
    let g = unary_graph(DType::F32, vec![sym("B"), sym("T")], |g, v| {
        g.sum(v, &[-1], true).unwrap()
    });
    assert_eq!(g.ty(g.outputs()[0].1).to_string(), "f32[B, 1]");
    let y = y64(&g, vec![("x", f32t(&[2, 2], &[1.0, 2.0, 3.0, 4.0]))]);
    assert_eq!(y.shape, vec![2, 1]);
    assert_exact(&floats(&y), &[3.0, 7.0]);
}

#[test]
fn reductions_nan_and_integers() {
    let g = unary_graph(DType::F32, cd(&[3]), |g, v| g.max(v, &[0], false).unwrap());
    assert_exact(
        &floats(&y64(&g, vec![("x", f32t(&[3], &[1.0, f64::NAN, 3.0]))])),
        &[f64::NAN],
    );
    let g = unary_graph(DType::F32, cd(&[3]), |g, v| {
        g.reduce(fulgur_ir::ReduceOp::Min, v, &[0], false).unwrap()
    });
    assert_exact(
        &floats(&y64(&g, vec![("x", f32t(&[3], &[1.0, 2.0, f64::NAN]))])),
        &[f64::NAN],
    );
    for dt in [DType::I32, DType::I64] {
        let x = it(dt, &[2, 3], &[3, -1, 4, 1, -5, 9]);
        let r = |op, axes: &[i64]| {
            let g = unary_graph(dt, cd(&[2, 3]), |g, v| g.reduce(op, v, axes, false).unwrap());
            y64(&g, vec![("x", x.clone())])
        };
        assert_eq!(r(fulgur_ir::ReduceOp::Sum, &[1]), it(dt, &[2], &[6, 5]));
        assert_eq!(r(fulgur_ir::ReduceOp::Max, &[0]), it(dt, &[3], &[3, -1, 9]));
        assert_eq!(r(fulgur_ir::ReduceOp::Min, &[0, 1]), it(dt, &[], &[-5]));
    }
}

#[test]
fn reductions_over_empty_axes() {
    use fulgur_ir::ReduceOp::*;
    let x = f32t(&[0, 3], &[]);
    let r = |op, axes: &[i64]| {
        let g = unary_graph(DType::F32, cd(&[0, 3]), |g, v| g.reduce(op, v, axes, false).unwrap());
        y64(&g, vec![("x", x.clone())])
    };
    // reducing a size-0 axis gives the identity: 0 for sum, ±inf for max/min, NaN (0/0) for mean
    let y = r(Sum, &[0]);
    assert_eq!(y.shape, vec![3]);
    assert_exact(&floats(&y), &[0.0; 3]);
    assert_exact(&floats(&r(Sum, &[0, 1])), &[0.0]);
    assert_exact(&floats(&r(Max, &[0])), &[f64::NEG_INFINITY; 3]);
    assert_exact(&floats(&r(Min, &[0])), &[f64::INFINITY; 3]);
    assert_exact(&floats(&r(Mean, &[0])), &[f64::NAN; 3]);
    // reducing the other axis of an empty tensor gives an empty result
    let y = r(Sum, &[1]);
    assert_eq!(y.shape, vec![0]);
    assert!(floats(&y).is_empty());
    // integer identities are the dtype's extremes
    for (dt, lo, hi) in [
        (DType::I32, i32::MIN as i64, i32::MAX as i64),
        (DType::I64, i64::MIN, i64::MAX),
    ] {
        let x = it(dt, &[0], &[]);
        let r = |op| {
            let g = unary_graph(dt, cd(&[0]), |g, v| g.reduce(op, v, &[0], false).unwrap());
            ints(&y64(&g, vec![("x", x.clone())]))
        };
        assert_eq!(r(Sum), vec![0]);
        assert_eq!(r(Max), vec![lo], "{dt}");
        assert_eq!(r(Min), vec![hi], "{dt}");
    }
}

// ------------------------------------------------------------- layout

#[test]
fn reshape_keeps_row_major_order() {
    let x: Vec<f64> = (0..6).map(f64::from).collect();
    let g = unary_graph(DType::F32, cd(&[2, 3]), |g, v| g.reshape(v, cd(&[3, 2])).unwrap());
    let y = y64(&g, vec![("x", f32t(&[2, 3], &x))]);
    assert_eq!(y.shape, vec![3, 2]);
    assert_exact(&floats(&y), &x);
    let g = unary_graph(DType::I64, cd(&[2, 3]), |g, v| g.reshape(v, cd(&[6, 1, 1])).unwrap());
    let y = y64(&g, vec![("x", it(DType::I64, &[2, 3], &[1, 2, 3, 4, 5, 6]))]);
    assert_eq!(y, it(DType::I64, &[6, 1, 1], &[1, 2, 3, 4, 5, 6]));
    // to and from a scalar
    let g = unary_graph(DType::F32, cd(&[1, 1]), |g, v| g.reshape(v, vec![]).unwrap());
    let y = y64(&g, vec![("x", f32t(&[1, 1], &[7.0]))]);
    assert_eq!(y.shape, Vec::<usize>::new());
    // symbolic: [B, T] -> [B*T] -> [T, B]
    let mut g = Graph::new("t");
    let x = g.input("x", DType::F32, vec![sym("B"), sym("T")]).unwrap();
    let f = g.reshape(x, vec![sym("B") * sym("T")]).unwrap();
    let t = g.reshape(f, vec![sym("T"), sym("B")]).unwrap();
    g.add_output("f", f).unwrap();
    g.add_output("t", t).unwrap();
    assert_eq!(g.ty(f).to_string(), "f32[B*T]");
    let out = run64(&g, vec![("x", f32t(&[2, 3], &x_vals()))]);
    assert_eq!(out["f"].shape, vec![6]);
    assert_eq!(out["t"].shape, vec![3, 2]);
    assert_exact(&floats(&out["t"]), &x_vals());
    // empty
    let g = unary_graph(DType::F32, cd(&[0, 3]), |g, v| g.reshape(v, cd(&[3, 0, 5])).unwrap());
    let y = y64(&g, vec![("x", f32t(&[0, 3], &[]))]);
    assert_eq!(y.shape, vec![3, 0, 5]);
}

fn x_vals() -> Vec<f64> {
    vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
}

#[test]
fn permute_by_loop() {
    let shape = [2, 3, 4];
    let x: Vec<f64> = (0..24).map(f64::from).collect();
    let g = unary_graph(DType::F32, cd(&shape), |g, v| g.permute(v, &[2, 0, 1]).unwrap());
    let y = y64(&g, vec![("x", f32t(&shape, &x))]);
    assert_eq!(y.shape, vec![4, 2, 3]);
    let mut want = vec![];
    for i in 0..4 {
        for j in 0..2 {
            for k in 0..3 {
                want.push(x[j * 12 + k * 4 + i]);
            }
        }
    }
    assert_exact(&floats(&y), &want);
    // transpose of a symbolic matrix
    let g = unary_graph(DType::I32, vec![sym("B"), Dim::from(2)], |g, v| {
        g.transpose(v, 0, -1).unwrap()
    });
    assert_eq!(g.ty(g.outputs()[0].1).to_string(), "i32[2, B]");
    let y = y64(&g, vec![("x", it(DType::I32, &[3, 2], &[1, 2, 3, 4, 5, 6]))]);
    assert_eq!(y, it(DType::I32, &[2, 3], &[1, 3, 5, 2, 4, 6]));
    // empty
    let g = unary_graph(DType::F32, cd(&[0, 2]), |g, v| g.permute(v, &[1, 0]).unwrap());
    assert_eq!(y64(&g, vec![("x", f32t(&[0, 2], &[]))]).shape, vec![2, 0]);
}

#[test]
fn broadcast_op() {
    let b = |x: Tensor, to: Vec<Dim>| {
        let g = unary_graph(x.dtype, cd(&x.shape), |g, v| {
            g.op1(Op::Broadcast { shape: to.into() }, &[v]).unwrap()
        });
        y64(&g, vec![("x", x)])
    };
    let y = b(f32t(&[3], &[1.0, 2.0, 3.0]), cd(&[2, 3]));
    assert_exact(&floats(&y), &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let y = b(f32t(&[2, 1], &[1.0, 2.0]), cd(&[2, 3]));
    assert_exact(&floats(&y), &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
    let y = b(f32t(&[2, 1], &[1.0, 2.0]), cd(&[2, 2, 3]));
    assert_eq!(y.shape, vec![2, 2, 3]);
    assert_exact(
        &floats(&y),
        &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0],
    );
    let y = b(it(DType::I64, &[], &[4]), cd(&[2, 2]));
    assert_eq!(y, it(DType::I64, &[2, 2], &[4; 4]));
    let y = b(bt(&[1], &[true]), cd(&[0]));
    assert_eq!(y, bt(&[0], &[]));
    // to a symbolic shape bound by another input
    let mut g = Graph::new("t");
    let x = g.input("x", DType::F32, cd(&[1, 2])).unwrap();
    let _n = g.input("n", DType::F32, vec![sym("N")]).unwrap();
    let y = g.broadcast(x, vec![sym("N"), Dim::from(2)]).unwrap();
    g.add_output("y", y).unwrap();
    let y = y64(
        &g,
        vec![("x", f32t(&[1, 2], &[5.0, 6.0])), ("n", f32t(&[3], &[0.0; 3]))],
    );
    assert_eq!(y.shape, vec![3, 2]);
    assert_exact(&floats(&y), &[5.0, 6.0, 5.0, 6.0, 5.0, 6.0]);
}

#[test]
fn slice_along_any_axis() {
    let shape = [2, 4, 3];
    let x: Vec<f64> = (0..24).map(f64::from).collect();
    let s = |axis: i64, start: usize, end: usize| {
        let g = unary_graph(DType::F32, cd(&shape), |g, v| g.slice(v, axis, start, end).unwrap());
        y64(&g, vec![("x", f32t(&shape, &x))])
    };
    let y = s(1, 1, 3);
    assert_eq!(y.shape, vec![2, 2, 3]);
    let mut want = vec![];
    for i in 0..2 {
        for j in 1..3 {
            for k in 0..3 {
                want.push(x[i * 12 + j * 3 + k]);
            }
        }
    }
    assert_exact(&floats(&y), &want);
    let y = s(-1, 2, 3);
    assert_eq!(y.shape, vec![2, 4, 1]);
    assert_exact(&floats(&y), &[2.0, 5.0, 8.0, 11.0, 14.0, 17.0, 20.0, 23.0]);
    let y = s(0, 1, 2);
    assert_exact(&floats(&y), &x[12..]);
    // empty slices
    let y = s(1, 2, 2);
    assert_eq!(y.shape, vec![2, 0, 3]);
    assert!(floats(&y).is_empty());
    let g = unary_graph(DType::F32, cd(&[0, 3]), |g, v| g.slice(v, 1, 1, 3).unwrap());
    assert_eq!(y64(&g, vec![("x", f32t(&[0, 3], &[]))]).shape, vec![0, 2]);
}

#[test]
fn slice_with_symbolic_bounds() {
    // x[1 : N] of x: [N]
    let g = unary_graph(DType::I64, vec![sym("N")], |g, v| g.slice(v, 0, 1, sym("N")).unwrap());
    assert_eq!(g.ty(g.outputs()[0].1).to_string(), "i64[N - 1]");
    let y = y64(&g, vec![("x", it(DType::I64, &[4], &[1, 2, 3, 4]))]);
    assert_eq!(y, it(DType::I64, &[3], &[2, 3, 4]));
    let y = y64(&g, vec![("x", it(DType::I64, &[1], &[1]))]);
    assert_eq!(y, it(DType::I64, &[0], &[]));
    // with N = 0 the slice [1, 0) is invalid: an error naming the node
    let err = try_run(Precision::F64, &g, vec![("x", it(DType::I64, &[0], &[]))]).unwrap_err();
    assert!(matches!(err, IrError::Node { id: 1, .. }), "{err}");
    assert!(err.to_string().starts_with("node %1 (slice): "), "{err}");
}

#[test]
fn concat_along_any_axis() {
    let mut g = Graph::new("t");
    let a = g.input("a", DType::F32, cd(&[2, 1])).unwrap();
    let b = g.input("b", DType::F32, cd(&[2, 2])).unwrap();
    let c1 = g.concat(&[a, b], 1).unwrap();
    let c2 = g.concat(&[b, a, a], -1).unwrap();
    g.add_output("c1", c1).unwrap();
    g.add_output("c2", c2).unwrap();
    let out = run64(
        &g,
        vec![
            ("a", f32t(&[2, 1], &[1.0, 2.0])),
            ("b", f32t(&[2, 2], &[3.0, 4.0, 5.0, 6.0])),
        ],
    );
    assert_eq!(out["c1"].shape, vec![2, 3]);
    assert_exact(&floats(&out["c1"]), &[1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
    assert_eq!(out["c2"].shape, vec![2, 4]);
    assert_exact(&floats(&out["c2"]), &[3.0, 4.0, 1.0, 1.0, 5.0, 6.0, 2.0, 2.0]);

    // axis 0 with an empty operand; integers
    let mut g = Graph::new("t");
    let a = g.input("a", DType::I32, cd(&[1, 2])).unwrap();
    let e = g.input("e", DType::I32, cd(&[0, 2])).unwrap();
    let b = g.input("b", DType::I32, cd(&[2, 2])).unwrap();
    let c = g.concat(&[a, e, b], 0).unwrap();
    let ee = g.concat(&[e, e], 0).unwrap();
    let one = g.concat(&[a], 0).unwrap();
    g.add_output("c", c).unwrap();
    g.add_output("ee", ee).unwrap();
    g.add_output("one", one).unwrap();
    let out = run64(
        &g,
        vec![
            ("a", it(DType::I32, &[1, 2], &[1, 2])),
            ("e", it(DType::I32, &[0, 2], &[])),
            ("b", it(DType::I32, &[2, 2], &[3, 4, 5, 6])),
        ],
    );
    assert_eq!(out["c"], it(DType::I32, &[3, 2], &[1, 2, 3, 4, 5, 6]));
    assert_eq!(out["ee"], it(DType::I32, &[0, 2], &[]));
    assert_eq!(out["one"], it(DType::I32, &[1, 2], &[1, 2]));

    // symbolic: [B, 2] ++ [B, 3] -> [B, 5]; [S, 2] ++ [T, 2] -> [S + T, 2]
    let mut g = Graph::new("t");
    let a = g.input("a", DType::F32, vec![sym("B"), Dim::from(2)]).unwrap();
    let b = g.input("b", DType::F32, vec![sym("B"), Dim::from(3)]).unwrap();
    let c = g.concat(&[a, b], -1).unwrap();
    g.add_output("y", c).unwrap();
    assert_eq!(g.ty(c).to_string(), "f32[B, 5]");
    let y = y64(
        &g,
        vec![
            ("a", f32t(&[1, 2], &[1.0, 2.0])),
            ("b", f32t(&[1, 3], &[3.0, 4.0, 5.0])),
        ],
    );
    assert_exact(&floats(&y), &[1.0, 2.0, 3.0, 4.0, 5.0]);
    let mut g = Graph::new("t");
    let a = g.input("a", DType::F32, vec![sym("S"), Dim::from(2)]).unwrap();
    let b = g.input("b", DType::F32, vec![sym("T"), Dim::from(2)]).unwrap();
    let c = g.concat(&[a, b], 0).unwrap();
    g.add_output("y", c).unwrap();
    assert_eq!(g.ty(c).to_string(), "f32[S + T, 2]");
    let y = y64(
        &g,
        vec![
            ("a", f32t(&[1, 2], &[1.0, 2.0])),
            ("b", f32t(&[2, 2], &[3.0, 4.0, 5.0, 6.0])),
        ],
    );
    assert_eq!(y.shape, vec![3, 2]);
    assert_exact(&floats(&y), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
}

// ------------------------------------------------------------- gather / scatter

fn gather_graph(dshape: &[usize], ishape: &[usize], idt: DType, axis: i64) -> Graph {
    let mut g = Graph::new("t");
    let d = g.input("d", DType::F32, cd(dshape)).unwrap();
    let i = g.input("i", idt, cd(ishape)).unwrap();
    let y = g.scope("emb", |g| g.gather(d, i, axis)).unwrap();
    g.add_output("y", y).unwrap();
    g
}

#[test]
fn gather_middle_axis_with_2d_indices() {
    let d: Vec<f64> = (0..12).map(f64::from).collect(); // [2, 3, 2]
    let idx = [2i64, 0, 1, 1]; // [2, 2]
    for axis in [1, -2] {
        let g = gather_graph(&[2, 3, 2], &[2, 2], DType::I64, axis);
        let y = y64(
            &g,
            vec![("d", f32t(&[2, 3, 2], &d)), ("i", it(DType::I64, &[2, 2], &idx))],
        );
        assert_eq!(y.shape, vec![2, 2, 2, 2]);
        let mut want = vec![];
        for a in 0..2 {
            for p in 0..2 {
                for q in 0..2 {
                    for b in 0..2 {
                        want.push(d[a * 6 + idx[p * 2 + q] as usize * 2 + b]);
                    }
                }
            }
        }
        assert_exact(&floats(&y), &want);
    }
}

#[test]
fn gather_rows_and_scalars() {
    // an embedding lookup: axis 0, i32 indices, repeated rows
    let g = gather_graph(&[4, 2], &[3], DType::I32, 0);
    let d = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0];
    let y = y64(
        &g,
        vec![("d", f32t(&[4, 2], &d)), ("i", it(DType::I32, &[3], &[3, 0, 3]))],
    );
    assert_eq!(y.shape, vec![3, 2]);
    assert_exact(&floats(&y), &[30.0, 31.0, 0.0, 1.0, 30.0, 31.0]);
    // a scalar index drops the axis
    let g = gather_graph(&[4, 2], &[], DType::I64, -1);
    let y = y64(&g, vec![("d", f32t(&[4, 2], &d)), ("i", it(DType::I64, &[], &[1]))]);
    assert_eq!(y.shape, vec![4]);
    assert_exact(&floats(&y), &[1.0, 11.0, 21.0, 31.0]);
    // no indices
    let g = gather_graph(&[4, 2], &[0], DType::I64, 0);
    let y = y64(&g, vec![("d", f32t(&[4, 2], &d)), ("i", it(DType::I64, &[0], &[]))]);
    assert_eq!(y.shape, vec![0, 2]);
}

#[test]
fn gather_out_of_range_is_an_error_naming_the_node() {
    let g = gather_graph(&[2, 3, 2], &[2], DType::I64, 1);
    let d = f32t(&[2, 3, 2], &[0.0; 12]);
    for (bad, msg) in [
        (
            3,
            "node %2 \"emb.gather\" (gather): index 3 out of range for axis 1 of size 3",
        ),
        (
            -1,
            "node %2 \"emb.gather\" (gather): index -1 out of range for axis 1 of size 3",
        ),
    ] {
        let err = try_run(
            Precision::F64,
            &g,
            vec![("d", d.clone()), ("i", it(DType::I64, &[2], &[0, bad]))],
        )
        .unwrap_err();
        assert!(matches!(err, IrError::Node { id: 2, .. }));
        assert_eq!(err.to_string(), msg);
    }
}

fn scatter_graph(dt: DType, dshape: &[usize], ishape: &[usize], ushape: &[usize], axis: i64) -> Graph {
    let mut g = Graph::new("t");
    let d = g.input("d", dt, cd(dshape)).unwrap();
    let i = g.input("i", DType::I64, cd(ishape)).unwrap();
    let u = g.input("u", dt, cd(ushape)).unwrap();
    let y = g.scope("blk", |g| g.scatter_add(d, i, u, axis)).unwrap();
    g.add_output("y", y).unwrap();
    g
}

#[test]
fn scatter_add_middle_axis_with_2d_indices() {
    // data [2, 3, 2], indices [2, 2] on axis 1, updates [2, 2, 2, 2]; index 1 repeats (accumulates)
    let d: Vec<f64> = (0..12).map(|v| v as f64 * 100.0).collect();
    let idx = [1i64, 0, 1, 1];
    let u: Vec<f64> = (0..16).map(f64::from).collect();
    for axis in [1, -2] {
        let g = scatter_graph(DType::F32, &[2, 3, 2], &[2, 2], &[2, 2, 2, 2], axis);
        let y = y64(
            &g,
            vec![
                ("d", f32t(&[2, 3, 2], &d)),
                ("i", it(DType::I64, &[2, 2], &idx)),
                ("u", f32t(&[2, 2, 2, 2], &u)),
            ],
        );
        assert_eq!(y.shape, vec![2, 3, 2]);
        let mut want = d.clone();
        for a in 0..2 {
            for p in 0..2 {
                for q in 0..2 {
                    for b in 0..2 {
                        want[a * 6 + idx[p * 2 + q] as usize * 2 + b] += u[((a * 2 + p) * 2 + q) * 2 + b];
                    }
                }
            }
        }
        assert_exact(&floats(&y), &want);
    }
    // by hand: integer rows, axis 0
    let g = scatter_graph(DType::I32, &[3], &[4], &[4], 0);
    let y = y64(
        &g,
        vec![
            ("d", it(DType::I32, &[3], &[1, 1, 1])),
            ("i", it(DType::I64, &[4], &[2, 0, 2, 2])),
            ("u", it(DType::I32, &[4], &[10, 20, 30, 40])),
        ],
    );
    assert_eq!(y, it(DType::I32, &[3], &[21, 1, 81]));
}

#[test]
fn scatter_add_out_of_range_is_an_error_naming_the_node() {
    let g = scatter_graph(DType::F32, &[3], &[2], &[2], 0);
    let err = try_run(
        Precision::F64,
        &g,
        vec![
            ("d", f32t(&[3], &[0.0; 3])),
            ("i", it(DType::I64, &[2], &[0, 3])),
            ("u", f32t(&[2], &[1.0, 2.0])),
        ],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "node %3 \"blk.scatter_add\" (scatter_add): index 3 out of range for axis 0 of size 3"
    );
}

// ------------------------------------------------------------- topk, one_hot, cumsum

fn topk_graph(dt: DType, dims: Vec<Dim>, k: usize, axis: i64) -> Graph {
    let mut g = Graph::new("t");
    let x = g.input("x", dt, dims).unwrap();
    let (v, i) = g.topk(x, k, axis).unwrap();
    g.add_output("v", v).unwrap();
    g.add_output("i", i).unwrap();
    g
}

#[test]
fn topk_ties_lower_index_first_and_nan_largest() {
    let g = topk_graph(DType::F32, cd(&[3, 5]), 3, -1);
    let nan = f64::NAN;
    let inf = f64::INFINITY;
    let x = [
        1.0, 3.0, 3.0, 2.0, 3.0, //
        nan, 5.0, nan, -inf, 5.0, //
        -1.0, -2.0, inf, -0.0, 0.0,
    ];
    let out = run64(&g, vec![("x", f32t(&[3, 5], &x))]);
    assert_eq!(out["v"].shape, vec![3, 3]);
    assert_eq!(out["i"].dtype, DType::I64);
    assert_eq!(ints(&out["i"]), vec![1, 2, 4, 0, 2, 1, 2, 3, 4]);
    assert_exact(&floats(&out["v"]), &[3.0, 3.0, 3.0, nan, nan, 5.0, inf, -0.0, 0.0]);
}

#[test]
fn topk_other_axes_and_dtypes() {
    // along axis 0 of [3, 2]
    let g = topk_graph(DType::F32, cd(&[3, 2]), 2, 0);
    let out = run64(&g, vec![("x", f32t(&[3, 2], &[1.0, 6.0, 5.0, 2.0, 3.0, 4.0]))]);
    assert_eq!(out["v"].shape, vec![2, 2]);
    assert_exact(&floats(&out["v"]), &[5.0, 6.0, 3.0, 4.0]);
    assert_eq!(ints(&out["i"]), vec![1, 0, 2, 2]);
    // integers keep their dtype
    let g = topk_graph(DType::I32, cd(&[4]), 2, 0);
    let out = run64(&g, vec![("x", it(DType::I32, &[4], &[7, -1, 7, 9]))]);
    assert_eq!(out["v"], it(DType::I32, &[2], &[9, 7]));
    assert_eq!(out["i"], it(DType::I64, &[2], &[3, 0]));
    // k = 0 and k = len
    let g = topk_graph(DType::F32, cd(&[3]), 0, 0);
    let out = run64(&g, vec![("x", f32t(&[3], &[1.0, 2.0, 3.0]))]);
    assert_eq!(out["v"].shape, vec![0]);
    let g = topk_graph(DType::F32, cd(&[3]), 3, 0);
    let out = run64(&g, vec![("x", f32t(&[3], &[1.0, 3.0, 2.0]))]);
    assert_exact(&floats(&out["v"]), &[3.0, 2.0, 1.0]);
    assert_eq!(ints(&out["i"]), vec![1, 2, 0]);
}

#[test]
fn topk_compares_large_integers_exactly() {
    // 2^53 and 2^53 + 1 are one f64
    let big = 1i64 << 53;
    let g = topk_graph(DType::I64, cd(&[3]), 2, 0);
    let out = run64(&g, vec![("x", it(DType::I64, &[3], &[big, big + 1, -big]))]);
    assert_eq!(out["v"], it(DType::I64, &[2], &[big + 1, big]));
    assert_eq!(out["i"], it(DType::I64, &[2], &[1, 0]));
}

#[test]
fn topk_symbolic_dim_shorter_than_k_is_an_error() {
    let g = topk_graph(DType::F32, vec![sym("N")], 3, 0);
    let out = run64(&g, vec![("x", f32t(&[4], &[1.0, 4.0, 2.0, 3.0]))]);
    assert_eq!(ints(&out["i"]), vec![1, 3, 2]);
    for n in [2usize, 0] {
        let err = try_run(Precision::F64, &g, vec![("x", f32t(&[n], &vec![1.0; n]))]).unwrap_err();
        assert!(matches!(err, IrError::Node { id: 1, .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("node %1 (topk): k=3 exceeds the size {n} of axis 0")
        );
    }
}

#[test]
fn one_hot_rows_and_out_of_range() {
    let mut g = Graph::new("t");
    let i = g.input("i", DType::I64, cd(&[2, 2])).unwrap();
    let f = g.one_hot(i, 3, DType::F32).unwrap();
    let n = g.one_hot(i, 3, DType::I32).unwrap();
    let b = g.one_hot(i, 3, DType::Bool).unwrap();
    g.add_output("f", f).unwrap();
    g.add_output("n", n).unwrap();
    g.add_output("b", b).unwrap();
    let out = run64(&g, vec![("i", it(DType::I64, &[2, 2], &[0, 3, -1, 2]))]);
    assert_eq!(out["f"].shape, vec![2, 2, 3]);
    let want = [
        1.0, 0.0, 0.0, /**/ 0.0, 0.0, 0.0, // 3 is out of range: a zero row
        0.0, 0.0, 0.0, /**/ 0.0, 0.0, 1.0, // -1 too
    ];
    assert_exact(&floats(&out["f"]), &want);
    let wi: Vec<i64> = want.iter().map(|&v| v as i64).collect();
    assert_eq!(out["n"], it(DType::I32, &[2, 2, 3], &wi));
    let wb: Vec<bool> = want.iter().map(|&v| v == 1.0).collect();
    assert_eq!(out["b"], bt(&[2, 2, 3], &wb));
    // symbolic indices, i32
    let g = unary_graph(DType::I32, vec![sym("N")], |g, v| g.one_hot(v, 2, DType::F32).unwrap());
    let y = y64(&g, vec![("x", it(DType::I32, &[3], &[1, 0, 1]))]);
    assert_eq!(y.shape, vec![3, 2]);
    assert_exact(&floats(&y), &[0.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
}

#[test]
fn cumsum_inclusive_exclusive_forward_reverse() {
    let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let cs = |axis: i64, exclusive: bool, reverse: bool| {
        let g = unary_graph(DType::F32, cd(&[2, 3]), |g, v| {
            g.cumsum(v, axis, exclusive, reverse).unwrap()
        });
        floats(&y64(&g, vec![("x", f32t(&[2, 3], &x))]))
    };
    assert_exact(&cs(1, false, false), &[1.0, 3.0, 6.0, 4.0, 9.0, 15.0]);
    assert_exact(&cs(-1, true, false), &[0.0, 1.0, 3.0, 0.0, 4.0, 9.0]);
    assert_exact(&cs(1, false, true), &[6.0, 5.0, 3.0, 15.0, 11.0, 6.0]);
    assert_exact(&cs(1, true, true), &[5.0, 3.0, 0.0, 11.0, 6.0, 0.0]);
    assert_exact(&cs(0, false, false), &[1.0, 2.0, 3.0, 5.0, 7.0, 9.0]);
    assert_exact(&cs(-2, true, false), &[0.0, 0.0, 0.0, 1.0, 2.0, 3.0]);
    assert_exact(&cs(0, true, true), &[4.0, 5.0, 6.0, 0.0, 0.0, 0.0]);
    // integers, and an empty axis
    let g = unary_graph(DType::I32, vec![sym("N")], |g, v| g.cumsum(v, 0, false, false).unwrap());
    assert_eq!(
        y64(&g, vec![("x", it(DType::I32, &[4], &[1, -2, 3, 4]))]),
        it(DType::I32, &[4], &[1, -1, 2, 6])
    );
    assert_eq!(
        y64(&g, vec![("x", it(DType::I32, &[0], &[]))]),
        it(DType::I32, &[0], &[])
    );
}

// ------------------------------------------------------------- composites

fn hand_softmax_rows(x: &[f64], rows: usize, cols: usize, log: bool) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mut m = f64::NEG_INFINITY;
        for &v in row {
            if v > m {
                m = v;
            }
        }
        let mut s = 0.0;
        for &v in row {
            s += (v - m).exp();
        }
        for c in 0..cols {
            out[r * cols + c] = if log {
                row[c] - m - s.ln()
            } else {
                (row[c] - m).exp() / s
            };
        }
    }
    out
}

#[test]
fn softmax_matches_a_hand_loop_and_rows_sum_to_one() {
    let x = [1.0, 2.0, 3.0, 1000.0, 1000.0, 1000.0, -5.0, 0.0, 5.0];
    let g = unary_graph(DType::F32, vec![sym("B"), Dim::from(3)], |g, v| {
        g.softmax(v, -1).unwrap()
    });
    let y = y64(&g, vec![("x", f32t(&[3, 3], &x))]);
    assert_eq!(y.shape, vec![3, 3]);
    let want = hand_softmax_rows(&x, 3, 3, false);
    assert_close(&floats(&y), &want, 1e-15);
    let yv = floats(&y);
    for r in 0..3 {
        let s: f64 = yv[r * 3..r * 3 + 3].iter().sum();
        assert!((s - 1.0).abs() < 1e-15, "row {r} sums to {s}");
    }
    // large equal values: exactly uniform (the max is subtracted)
    assert_exact(&yv[3..6], &[1.0 / 3.0; 3]);
    // by hand: softmax([0, ln 3]) = [1/4, 3/4]
    let g = unary_graph(DType::F32, cd(&[2]), |g, v| g.softmax(v, 0).unwrap());
    let y = y64(
        &g,
        vec![(
            "x",
            Tensor {
                dtype: DType::F32,
                shape: vec![2],
                data: Buffer::F(vec![0.0, 3f64.ln()]),
            },
        )],
    );
    assert_close(&floats(&y), &[0.25, 0.75], 1e-15);
}

#[test]
fn softmax_along_axis_zero_and_in_f32() {
    // columns of [3, 2]
    let x = [1.0, 0.5, 2.0, -0.5, 3.0, 0.25];
    let g = unary_graph(DType::F32, cd(&[3, 2]), |g, v| g.softmax(v, 0).unwrap());
    let y = y64(&g, vec![("x", f32t(&[3, 2], &x))]);
    // transpose, softmax rows, transpose back
    let xt = [x[0], x[2], x[4], x[1], x[3], x[5]];
    let st = hand_softmax_rows(&xt, 2, 3, false);
    let want = [st[0], st[3], st[1], st[4], st[2], st[5]];
    assert_close(&floats(&y), &want, 1e-15);
    // in f32 precision every value is an f32 and the result is within f32 rounding
    let y32 = run_p(Precision::F32, &g, vec![("x", f32t(&[3, 2], &x))])
        .remove("y")
        .unwrap();
    for &v in &floats(&y32) {
        assert_eq!(v, v as f32 as f64);
    }
    assert_close(&floats(&y32), &want, 1e-6);
}

#[test]
fn log_softmax_matches_a_hand_loop() {
    let x = data(12, 9);
    let g = unary_graph(DType::F32, cd(&[3, 4]), |g, v| g.log_softmax(v, 1).unwrap());
    let y = y64(&g, vec![("x", f32t(&[3, 4], &x))]);
    assert_close(&floats(&y), &hand_softmax_rows(&x, 3, 4, true), 1e-14);
    // log_softmax([0, 0]) = [-ln 2, -ln 2]
    let g = unary_graph(DType::F32, cd(&[2]), |g, v| g.log_softmax(v, -1).unwrap());
    let y = y64(&g, vec![("x", f32t(&[2], &[0.0, 0.0]))]);
    assert_close(&floats(&y), &[-std::f64::consts::LN_2; 2], 1e-15);
}

fn hand_rms_norm(x: &[f64], w: &[f64], rows: usize, d: usize, eps: f64) -> Vec<f64> {
    let mut out = vec![0.0; rows * d];
    for r in 0..rows {
        let mut ss = 0.0;
        for c in 0..d {
            ss += x[r * d + c] * x[r * d + c];
        }
        let inv = 1.0 / (ss / d as f64 + eps).sqrt();
        for c in 0..d {
            out[r * d + c] = x[r * d + c] * inv * w[c];
        }
    }
    out
}

#[test]
fn rms_norm_matches_a_hand_loop() {
    let mut g = Graph::new("t");
    let x = g
        .input("x", DType::F32, vec![sym("B"), sym("T"), Dim::from(4)])
        .unwrap();
    let w = g.param("w", DType::F32, cd(&[4])).unwrap();
    let y = g.scope("norm", |g| g.rms_norm(x, w, 1e-5)).unwrap();
    g.add_output("y", y).unwrap();
    let xv = data(2 * 3 * 4, 11);
    let wv = [1.0, 0.5, -2.0, 0.25];
    let y = y64(&g, vec![("x", f32t(&[2, 3, 4], &xv)), ("w", f32t(&[4], &wv))]);
    assert_eq!(y.shape, vec![2, 3, 4]);
    assert_close(&floats(&y), &hand_rms_norm(&xv, &wv, 6, 4, 1e-5), 1e-14);
    // by hand: x = [3, 4], w = [1, 1], eps = 0: rms = sqrt(12.5)
    let mut g = Graph::new("t");
    let x = g.input("x", DType::F32, cd(&[2])).unwrap();
    let w = g.input("w", DType::F32, cd(&[2])).unwrap();
    let y = g.rms_norm(x, w, 0.0).unwrap();
    g.add_output("y", y).unwrap();
    let y = y64(&g, vec![("x", f32t(&[2], &[3.0, 4.0])), ("w", f32t(&[2], &[1.0, 1.0]))]);
    let r = 12.5f64.sqrt();
    assert_close(&floats(&y), &[3.0 / r, 4.0 / r], 1e-15);
}

#[test]
fn rms_norm_in_bf16() {
    let mut g = Graph::new("t");
    let x = g.input("x", DType::BF16, cd(&[2, 8])).unwrap();
    let w = g.input("w", DType::BF16, cd(&[8])).unwrap();
    let y = g.rms_norm(x, w, 1e-6).unwrap();
    g.add_output("y", y).unwrap();
    let xv: Vec<f64> = data(16, 12);
    let wv: Vec<f64> = data(8, 13).iter().map(|v| v + 1.5).collect();
    let xt = ft(DType::BF16, &[2, 8], &xv);
    let wt = ft(DType::BF16, &[8], &wv);
    let want = hand_rms_norm(&xt.to_f64(), &wt.to_f64(), 2, 8, 1e-6);
    let y = run_p(Precision::F32, &g, vec![("x", xt), ("w", wt)])
        .remove("y")
        .unwrap();
    assert_eq!(y.dtype, DType::BF16);
    // a few bf16 roundings along the way
    assert_close(&floats(&y), &want, 2f64.powi(-6));
}

// ------------------------------------------------------------- precision

#[test]
fn reduced_precision_rounds_every_result() {
    let add = |dt: DType, a: f64, b: f64, p: Precision| {
        let mut g = Graph::new("t");
        let x = g.input("a", dt, cd(&[1])).unwrap();
        let y = g.input("b", dt, cd(&[1])).unwrap();
        let z = g.add(x, y).unwrap();
        g.add_output("y", z).unwrap();
        floats(&run_p(p, &g, vec![("a", ft(dt, &[1], &[a])), ("b", ft(dt, &[1], &[b]))])["y"])[0]
    };
    let e9 = 2f64.powi(-9);
    // bf16 has 8 significant bits: 1 + 2^-9 rounds back to 1
    assert_eq!(add(DType::BF16, 1.0, e9, Precision::F32), 1.0);
    assert_eq!(add(DType::BF16, 1.0, e9, Precision::F64), 1.0 + e9);
    // 1 + 3*2^-9 is nearer 1 + 2^-7; 1 + 2^-8 is a tie, which goes to the even 1
    assert_eq!(add(DType::BF16, 1.0, 3.0 * e9, Precision::F32), 1.0 + 2f64.powi(-7));
    assert_eq!(add(DType::BF16, 1.0, 2f64.powi(-8), Precision::F32), 1.0);
    // f16: 11 significant bits
    assert_eq!(add(DType::F16, 1.0, 2f64.powi(-11), Precision::F32), 1.0);
    assert_eq!(
        add(DType::F16, 1.0, 3.0 * 2f64.powi(-11), Precision::F32),
        1.0 + 2f64.powi(-9)
    );
    assert_eq!(add(DType::F16, 60000.0, 10000.0, Precision::F32), f64::INFINITY);
    // f32: 24 significant bits
    assert_eq!(add(DType::F32, 1.0, 2f64.powi(-24), Precision::F32), 1.0);
    assert_eq!(
        add(DType::F32, 1.0, 2f64.powi(-24), Precision::F64),
        1.0 + 2f64.powi(-24)
    );
    assert_eq!(add(DType::F32, 0.1, 0.2, Precision::F32), (0.1f32 + 0.2f32) as f64);
}

#[test]
fn reduced_precision_accumulates_wide() {
    // the sum is rounded once, at the end: 1 + 4 * 2^-9 = 1 + 2^-7 is a bf16
    let e9 = 2f64.powi(-9);
    let xs = [1.0, e9, e9, e9, e9];
    let g = unary_graph(DType::BF16, cd(&[5]), |g, v| g.sum(v, &[0], false).unwrap());
    let y = run_p(Precision::F32, &g, vec![("x", ft(DType::BF16, &[5], &xs))])
        .remove("y")
        .unwrap();
    assert_exact(&floats(&y), &[1.0 + 2f64.powi(-7)]);
    // likewise a dot product
    let mut g = Graph::new("t");
    let a = g.input("a", DType::BF16, cd(&[1, 5])).unwrap();
    let b = g.input("b", DType::BF16, cd(&[5, 1])).unwrap();
    let z = g.matmul(a, b).unwrap();
    g.add_output("y", z).unwrap();
    let y = run_p(
        Precision::F32,
        &g,
        vec![
            ("a", ft(DType::BF16, &[1, 5], &xs)),
            ("b", ft(DType::BF16, &[5, 1], &[1.0; 5])),
        ],
    )
    .remove("y")
    .unwrap();
    assert_exact(&floats(&y), &[1.0 + 2f64.powi(-7)]);
    // and a cumulative sum: the running sums 1 + j*2^-9 are exact, each output is rounded once
    // (1 + 2^-8 is a tie that goes to the even 1; 1 + 3*2^-9 is nearer 1 + 2^-7)
    let g = unary_graph(DType::BF16, cd(&[5]), |g, v| g.cumsum(v, 0, false, false).unwrap());
    let y = run_p(Precision::F32, &g, vec![("x", ft(DType::BF16, &[5], &xs))])
        .remove("y")
        .unwrap();
    let e7 = 2f64.powi(-7);
    assert_exact(&floats(&y), &[1.0, 1.0, 1.0, 1.0 + e7, 1.0 + e7]);
}

#[test]
fn f64_precision_keeps_reduced_dtypes_exact_except_casts() {
    // x: bf16 1 + 2^-7, y = x * x = 1 + 2^-6 + 2^-14: kept in f64, rounded in f32 precision
    let g = unary_graph(DType::BF16, cd(&[1]), |g, v| g.mul(v, v).unwrap());
    let x = 1.0 + 2f64.powi(-7);
    let exact = x * x;
    assert_eq!(floats(&y64(&g, vec![("x", ft(DType::BF16, &[1], &[x]))]))[0], exact);
    let r = run_p(Precision::F32, &g, vec![("x", ft(DType::BF16, &[1], &[x]))])
        .remove("y")
        .unwrap();
    assert_eq!(floats(&r)[0], 1.0 + 2f64.powi(-6));
    // a cast is a conversion: it rounds in either precision
    let g = unary_graph(DType::F32, cd(&[1]), |g, v| g.cast(v, DType::BF16).unwrap());
    let y = y64(&g, vec![("x", f32t(&[1], &[1.0 + 2f64.powi(-9)]))]);
    assert_eq!(floats(&y)[0], 1.0);
}

// ------------------------------------------------------------- input checking

fn two_inputs() -> Graph {
    let mut g = Graph::new("t");
    let x = g.input("x", DType::F32, vec![sym("N")]).unwrap();
    let y = g.input("y", DType::F32, vec![sym("N")]).unwrap();
    let z = g.add(x, y).unwrap();
    g.add_output("z", z).unwrap();
    g
}

#[test]
fn run_checks_its_inputs() {
    let g = two_inputs();
    let ok = run64(&g, vec![("x", f32t(&[2], &[1.0, 2.0])), ("y", f32t(&[2], &[3.0, 4.0]))]);
    assert_exact(&floats(&ok["z"]), &[4.0, 6.0]);

    let err = |ins: Vec<(&str, Tensor)>| {
        let e = try_run(Precision::F64, &g, ins).unwrap_err();
        assert!(matches!(e, IrError::Input { .. }), "{e:?}");
        e.to_string()
    };
    // missing
    assert_eq!(
        err(vec![("x", f32t(&[2], &[1.0, 2.0]))]),
        "input `y`: no tensor given (expected f32[N])"
    );
    // wrong dtype
    assert_eq!(
        err(vec![
            ("x", it(DType::I32, &[2], &[1, 2])),
            ("y", f32t(&[2], &[1.0, 2.0]))
        ]),
        "input `x`: expected f32[N], got a i32 tensor of shape [2]"
    );
    // wrong rank
    assert_eq!(
        err(vec![("x", f32t(&[2], &[1.0, 2.0])), ("y", f32t(&[2, 1], &[1.0, 2.0]))]),
        "input `y`: expected f32[N] (rank 1), got shape [2, 1]"
    );
    // inconsistent symbol
    assert_eq!(
        err(vec![("x", f32t(&[3], &[1.0; 3])), ("y", f32t(&[4], &[1.0; 4]))]),
        "input `y`: expected f32[N] = [3] with N=3, got shape [4]"
    );
}

#[test]
fn run_checks_constant_dims_and_expressions() {
    let mut g = Graph::new("t");
    let x = g.input("x", DType::F32, vec![sym("B"), Dim::from(2)]).unwrap();
    let y = g.input("y", DType::F32, vec![sym("B") * Dim::from(2)]).unwrap();
    g.add_output("x", x).unwrap();
    g.add_output("y", y).unwrap();
    let e = try_run(
        Precision::F64,
        &g,
        vec![("x", f32t(&[1, 3], &[0.0; 3])), ("y", f32t(&[2], &[0.0; 2]))],
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "input `x`: expected f32[B, 2] = [1, 2] with B=1, got shape [1, 3]"
    );
    let e = try_run(
        Precision::F64,
        &g,
        vec![("x", f32t(&[2, 2], &[0.0; 4])), ("y", f32t(&[2], &[0.0; 2]))],
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "input `y`: expected f32[2*B] = [4] with B=2, got shape [2]"
    );
    // a dimension no input binds
    let mut g = Graph::new("t");
    let x = g.input("x", DType::F32, vec![sym("B") + Dim::from(1)]).unwrap();
    g.add_output("x", x).unwrap();
    let e = try_run(Precision::F64, &g, vec![("x", f32t(&[2], &[0.0; 2]))]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "input `x`: cannot bind the symbols of f32[B + 1]: symbol `B` is not bound"
    );
}

#[test]
fn run_refuses_malformed_tensors() {
    let g = two_inputs();
    let short = Tensor {
        dtype: DType::F32,
        shape: vec![3],
        data: Buffer::F(vec![1.0, 2.0]),
    };
    let e = try_run(Precision::F64, &g, vec![("x", short), ("y", f32t(&[3], &[0.0; 3]))]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "input `x`: the tensor holds 2 values, its shape [3] needs 3"
    );
    let ints_as_f32 = Tensor {
        dtype: DType::F32,
        shape: vec![2],
        data: Buffer::I(vec![1, 2]),
    };
    let e = try_run(
        Precision::F64,
        &g,
        vec![("x", f32t(&[2], &[0.0; 2])), ("y", ints_as_f32)],
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "input `y`: a f32 tensor holding integer values");
}

// ------------------------------------------------------------- properties

/// A shape (rank 0..=max_rank, dims 0..max_dim) and that many values.
fn shape_and_values(max_rank: usize, min_dim: usize, max_dim: usize) -> impl Strategy<Value = (Vec<usize>, Vec<f64>)> {
    pvec(min_dim..max_dim, 0..=max_rank).prop_flat_map(|s| {
        let n: usize = s.iter().product();
        (Just(s), pvec(-8.0f64..8.0, n))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn prop_broadcast_add_matches_a_hand_loop(
        out in pvec(0usize..4, 0..=4),
        ones_a in pvec(any::<bool>(), 4),
        ones_b in pvec(any::<bool>(), 4),
        drop_a in 0usize..=4,
        drop_b in 0usize..=4,
        seed in any::<u64>(),
    ) {
        // each operand: a suffix of `out` with some dims replaced by 1
        let mk = |ones: &[bool], drop: usize| -> Vec<usize> {
            let drop = drop.min(out.len());
            out[drop..].iter().zip(ones).map(|(&d, &o)| if o { 1 } else { d }).collect()
        };
        let sa = mk(&ones_a, drop_a);
        let sb = mk(&ones_b, drop_b);
        let na: usize = sa.iter().product();
        let nb: usize = sb.iter().product();
        let a = data(na, seed);
        let b = data(nb, seed ^ 0xABCD);
        let g = binary_graph(BinaryOp::Add, DType::F32, cd(&sa), cd(&sb));
        let y = y64(&g, vec![("a", f32t(&sa, &a)), ("b", f32t(&sb, &b))]);
        // expected output shape: per axis, the non-1 dim (or 1)
        let r = sa.len().max(sb.len());
        let dim = |s: &[usize], i: usize| if i + s.len() >= r { s[i + s.len() - r] } else { 1 };
        let oshape: Vec<usize> = (0..r).map(|i| if dim(&sa, i) == 1 { dim(&sb, i) } else { dim(&sa, i) }).collect();
        prop_assert_eq!(&y.shape, &oshape);
        let src = |s: &[usize], idx: &[usize]| -> usize {
            let off = r - s.len();
            let sidx: Vec<usize> = (0..s.len()).map(|i| if s[i] == 1 { 0 } else { idx[off + i] }).collect();
            lin(&sidx, s)
        };
        let want: Vec<f64> = indices(&oshape).iter().map(|idx| a[src(&sa, idx)] + b[src(&sb, idx)]).collect();
        prop_assert_eq!(floats(&y), want);
    }

    #[test]
    fn prop_matmul_matches_a_triple_loop(
        b1 in 1usize..3, b2 in 1usize..3, a_one in any::<bool>(), b_one in any::<bool>(),
        m in 0usize..4, k in 0usize..4, n in 0usize..4, seed in any::<u64>(),
    ) {
        // a: [b1, ab2, m, k], b: [bb2, k, n], out: [b1, b2, m, n]
        let ab2 = if a_one { 1 } else { b2 };
        let bb2 = if b_one && !a_one { 1 } else { b2 };
        let av = data(b1 * ab2 * m * k, seed);
        let bv = data(bb2 * k * n, seed.wrapping_add(1));
        let g = matmul_graph(DType::F32, cd(&[b1, ab2, m, k]), cd(&[bb2, k, n]));
        let y = y64(&g, vec![("a", f32t(&[b1, ab2, m, k], &av)), ("b", f32t(&[bb2, k, n], &bv))]);
        prop_assert_eq!(&y.shape, &vec![b1, b2, m, n]);
        let mut want = vec![0.0; b1 * b2 * m * n];
        for i in 0..b1 {
            for j in 0..b2 {
                let ja = if ab2 == 1 { 0 } else { j };
                let jb = if bb2 == 1 { 0 } else { j };
                for r in 0..m {
                    for c in 0..n {
                        let mut s = 0.0;
                        for p in 0..k {
                            s += av[((i * ab2 + ja) * m + r) * k + p] * bv[(jb * k + p) * n + c];
                        }
                        want[((i * b2 + j) * m + r) * n + c] = s;
                    }
                }
            }
        }
        // values are multiples of 2^-10 with |v| <= 1: products and short sums are exact
        prop_assert_eq!(floats(&y), want);
    }

    #[test]
    fn prop_permute_then_inverse_is_identity(
        (shape, vals) in shape_and_values(4, 1, 4),
        perm_seed in any::<u64>(),
    ) {
        let r = shape.len();
        // a permutation from the seed (Fisher-Yates)
        let mut perm: Vec<usize> = (0..r).collect();
        let mut s = perm_seed | 1;
        for i in (1..r).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            perm.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let mut inv = vec![0; r];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, cd(&shape)).unwrap();
        let y = g.op1(Op::Permute { perm: perm.clone() }, &[x]).unwrap();
        let z = g.op1(Op::Permute { perm: inv }, &[y]).unwrap();
        g.add_output("y", y).unwrap();
        g.add_output("z", z).unwrap();
        let xt = Tensor { dtype: DType::F32, shape: shape.clone(), data: Buffer::F(vals.clone()) };
        let out = run64(&g, vec![("x", xt.clone())]);
        prop_assert_eq!(&out["z"], &xt);
        // and y[i] = x[i permuted back]
        let yshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        prop_assert_eq!(&out["y"].shape, &yshape);
        let yv = floats(&out["y"]);
        for idx in indices(&yshape) {
            let mut xidx = vec![0; r];
            for (i, &p) in perm.iter().enumerate() {
                xidx[p] = idx[i];
            }
            prop_assert_eq!(yv[lin(&idx, &yshape)], vals[lin(&xidx, &shape)]);
        }
    }

    #[test]
    fn prop_reduce_sum_over_all_axes_is_the_total(
        (shape, vals) in shape_and_values(4, 0, 4),
        keepdims in any::<bool>(),
    ) {
        let vals: Vec<f64> = vals.iter().map(|v| v.round()).collect(); // integers: sums are exact
        let axes: Vec<i64> = (0..shape.len() as i64).collect();
        let g = unary_graph(DType::F32, cd(&shape), |g, v| g.sum(v, &axes, keepdims).unwrap());
        let xt = Tensor { dtype: DType::F32, shape: shape.clone(), data: Buffer::F(vals.clone()) };
        let y = y64(&g, vec![("x", xt)]);
        let mut total = 0.0;
        for &v in &vals {
            total += v;
        }
        prop_assert_eq!(floats(&y), vec![total]);
        prop_assert_eq!(y.shape, if keepdims { vec![1; shape.len()] } else { vec![] });
    }

    #[test]
    fn prop_topk_matches_a_stable_sort(
        outer in 1usize..3, len in 1usize..7, inner in 1usize..3, kk in 0usize..7, seed in any::<u64>(),
    ) {
        // coarse values: many ties, which must keep the lower index first
        let k = kk.min(len);
        let x: Vec<f64> = data(outer * len * inner, seed).iter().map(|v| (v * 2.0).round()).collect();
        let g = topk_graph(DType::F32, cd(&[outer, len, inner]), k, 1);
        let out = run64(&g, vec![("x", f32t(&[outer, len, inner], &x))]);
        prop_assert_eq!(&out["v"].shape, &vec![outer, k, inner]);
        let (v, i) = (floats(&out["v"]), ints(&out["i"]));
        for o in 0..outer {
            for j in 0..inner {
                // selection by hand: repeatedly take the first maximum not yet taken
                let mut taken = vec![false; len];
                for r in 0..k {
                    let mut best: Option<usize> = None;
                    for p in 0..len {
                        let val = x[(o * len + p) * inner + j];
                        let better = match best {
                            None => true,
                            Some(b) => val > x[(o * len + b) * inner + j],
                        };
                        if !taken[p] && better {
                            best = Some(p);
                        }
                    }
                    let b = best.unwrap();
                    taken[b] = true;
                    let at = (o * k + r) * inner + j;
                    prop_assert_eq!(i[at], b as i64);
                    prop_assert_eq!(v[at], x[(o * len + b) * inner + j]);
                }
            }
        }
    }

    #[test]
    fn prop_softmax_rows_sum_to_one(
        rows in 1usize..5, cols in 1usize..8, seed in any::<u64>(), scale in 0.0f64..100.0,
    ) {
        let x: Vec<f64> = data(rows * cols, seed).iter().map(|v| v * scale).collect();
        let g = unary_graph(DType::F32, cd(&[rows, cols]), |g, v| g.softmax(v, -1).unwrap());
        let xt = f32t(&[rows, cols], &x);
        let y = y64(&g, vec![("x", xt.clone())]);
        let y32 = run_p(Precision::F32, &g, vec![("x", xt.clone())]).remove("y").unwrap();
        let want = hand_softmax_rows(&xt.to_f64(), rows, cols, false);
        let (yv, y32v) = (floats(&y), floats(&y32));
        for r in 0..rows {
            let s: f64 = yv[r * cols..(r + 1) * cols].iter().sum();
            prop_assert!((s - 1.0).abs() < 1e-12, "row {} sums to {}", r, s);
            let s32: f64 = y32v[r * cols..(r + 1) * cols].iter().sum();
            prop_assert!((s32 - 1.0).abs() < 1e-5, "f32 row {} sums to {}", r, s32);
        }
        for (i, (&a, &b)) in yv.iter().zip(&want).enumerate() {
            prop_assert!((a - b).abs() <= 1e-14, "element {}: {} vs {}", i, a, b);
            prop_assert!((0.0..=1.0).contains(&a));
        }
    }
}
