//! Every kernel kind of the CPU backend against the f64 interpreter, on random data: shapes not divisible by
//! the vector width, one head, `T = 1`, broadcasts, strided views, every dtype the op takes.
#![cfg(feature = "llvm")]

use fulgur_codegen::program::lower;
use fulgur_ir::{Composite, DType, Dim, Graph, Interpreter, Op, Precision, Tensor, Value};
use fulgur_runtime::cpu::{CpuOptions, CpuProgram};
use std::collections::HashMap;

/// A deterministic generator of test data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn tensor(&mut self, dtype: DType, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        let n: usize = shape.iter().product();
        if dtype.is_float() {
            let v = (0..n).map(|_| lo + (hi - lo) * self.next()).collect();
            Tensor::from_f64(dtype, shape.to_vec(), v)
        } else if dtype.is_int() {
            let v = (0..n).map(|_| (lo + (hi - lo) * self.next()).floor() as i64).collect();
            Tensor::from_i64(dtype, shape.to_vec(), v)
        } else {
            Tensor::from_bool(shape.to_vec(), (0..n).map(|_| self.next() < 0.5).collect())
        }
    }
}

/// A graph applying `op` to inputs of the given tensors' dtypes and shapes (symbolic where `sym` names a
/// symbol for a dimension size).
fn graph(op: &Op, args: &[Tensor]) -> Graph {
    let mut g = Graph::new("k");
    let mut ins = Vec::new();
    for (i, t) in args.iter().enumerate() {
        ins.push(
            g.input(
                &format!("x{i}"),
                t.dtype,
                t.shape.iter().map(|&d| Dim::from(d as i64)).collect(),
            )
            .unwrap(),
        );
    }
    let id = g.add_node(op.clone(), &ins, None).unwrap();
    for i in 0..g.node(id).outputs.len() {
        g.add_output(format!("y{i}"), Value::new(id, i as u32)).unwrap();
    }
    g
}

/// Runs `op` on the CPU backend and on the interpreter (f64); every output within `tol` relative L2 (exact for
/// integers and bools).
fn check(what: &str, op: Op, args: Vec<Tensor>, tol: f64) {
    check_graph(what, &graph(&op, &args), &args, tol);
}

/// Runs graph `g` (inputs `x0`, `x1`, ... given by `args`) on the CPU backend and on the interpreter (f64), as
/// [`check`] does.
fn check_graph(what: &str, g: &Graph, args: &[Tensor], tol: f64) {
    let g = g.clone();
    let feed: HashMap<String, Tensor> = args
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("x{i}"), t.clone()))
        .collect();
    let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
    let p = lower(&g).unwrap();
    let mut cpu = CpuProgram::new(p, CpuOptions::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = cpu.run(&feed).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (name, w) in &want {
        let gt = &got[name];
        assert_eq!(gt.shape, w.shape, "{what} {name}");
        assert_eq!(gt.dtype, w.dtype, "{what} {name}");
        if w.dtype.is_float() {
            let nan_ok = gt
                .to_f64()
                .iter()
                .zip(w.to_f64())
                .all(|(a, b)| a.is_nan() == b.is_nan());
            assert!(nan_ok, "{what} {name}: NaNs differ");
            let finite: (Vec<f64>, Vec<f64>) = gt
                .to_f64()
                .iter()
                .zip(w.to_f64())
                .filter(|(a, b)| a.is_finite() && b.is_finite())
                .map(|(a, b)| (*a, b))
                .unzip();
            let (a, b) = finite;
            let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
            let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-30);
            assert!(
                num / den <= tol,
                "{what} {name}: relative error {:.3e} > {tol:.0e}",
                num / den
            );
        } else {
            assert_eq!(gt.to_f64(), w.to_f64(), "{what} {name}");
        }
    }
}

/// Permutes are views (`program::lower`): a GEMM reads a transposed operand as it is, an operand whose last
/// axis moved into the batch (no unit stride) is copied inside the GEMM's kernel, an elementwise kernel reads
/// the strided view, and a permute that is an output is read through its strides. No copy kernel is left.
#[test]
fn permutes_are_views_read_by_their_consumers() {
    let mut r = Rng(7);
    let x = r.tensor(DType::F32, &[4, 3, 5], -1.0, 1.0);
    let w = r.tensor(DType::F32, &[6, 5], -1.0, 1.0);
    let y = r.tensor(DType::F32, &[5, 4, 6], -1.0, 1.0);
    let mut g = Graph::new("permutes");
    let d = |v: &[i64]| v.iter().map(|&x| Dim::from(x)).collect::<Vec<_>>();
    let xi = g.input("x0", DType::F32, d(&[4, 3, 5])).unwrap();
    let wi = g.input("x1", DType::F32, d(&[6, 5])).unwrap();
    let yi = g.input("x2", DType::F32, d(&[5, 4, 6])).unwrap();
    let a = g.permute(xi, &[2, 1, 0]).unwrap(); // [5, 3, 4], strides [1, 5, 15]
    let r1 = g.matmul(a, yi).unwrap();
    let wt = g.permute(wi, &[1, 0]).unwrap(); // [5, 6], strides [1, 5]
    let r2 = g.matmul(xi, wt).unwrap();
    let xt = g.permute(xi, &[0, 2, 1]).unwrap();
    let r3 = g.exp(xt).unwrap();
    let r4 = g.permute(xi, &[1, 0, 2]).unwrap();
    for (i, v) in [r1, r2, r3, r4].into_iter().enumerate() {
        g.add_output(format!("y{i}"), v).unwrap();
    }
    let p = lower(&g).unwrap();
    let copies: Vec<&str> = p
        .step
        .iter()
        .filter(|k| k.kind == fulgur_passes::classify::KernelKind::Copy)
        .map(|k| k.name.as_str())
        .collect();
    assert!(copies.is_empty(), "copy kernels left: {copies:?}");
    check_graph("permuted views", &g, &[x, w, y], 1e-5);
}

#[test]
fn flash_attention() {
    let mut r = Rng(1);
    for (b, h, t, s, d, causal) in [
        (1, 1, 1, 1, 8, true),
        (2, 3, 7, 7, 16, true),
        (1, 2, 70, 70, 12, true),
        (1, 1, 5, 9, 4, true),
        (1, 2, 9, 5, 4, true),
        (2, 1, 65, 130, 8, false),
    ] {
        let q = r.tensor(DType::F32, &[b, h, t, d], -1.0, 1.0);
        let k = r.tensor(DType::F32, &[b, h, s, d], -1.0, 1.0);
        let v = r.tensor(DType::F32, &[b, h, s, d + 1], -1.0, 1.0);
        let op = Op::Composite(Composite::FlashAttention { scale: 0.3, causal });
        check(
            &format!("flash_attention b{b} h{h} t{t} s{s} d{d} causal {causal}"),
            op,
            vec![q, k, v],
            1e-5,
        );
    }
}

#[test]
fn flash_attention_rope_grouped() {
    let mut r = Rng(2);
    for (b, t, d, rot) in [(1, 1, 8, 8), (2, 7, 16, 8), (1, 67, 8, 4)] {
        let q = r.tensor(DType::F32, &[b, 2, 3, t, d], -1.0, 1.0);
        let k = r.tensor(DType::F32, &[b, 2, 1, t, d], -1.0, 1.0);
        let v = r.tensor(DType::F32, &[b, 2, 1, t, d], -1.0, 1.0);
        let cos = r.tensor(DType::F32, &[t, rot], -1.0, 1.0);
        let sin = r.tensor(DType::F32, &[t, rot], -1.0, 1.0);
        let op = Op::Composite(Composite::FlashAttentionRope {
            scale: 0.25,
            causal: true,
            rotary: rot,
        });
        check(
            &format!("flash_attention_rope b{b} t{t} d{d} rotary {rot}"),
            op,
            vec![q, k, v, cos, sin],
            1e-5,
        );
    }
}

#[test]
fn elementwise_reduction_scan_and_index_kernels() {
    use fulgur_ir::{BinaryOp, CmpOp, ReduceOp, UnaryOp};
    let mut r = Rng(3);
    let x = r.tensor(DType::F32, &[3, 17], -2.0, 2.0);
    let y = r.tensor(DType::F32, &[17], -2.0, 2.0);
    for u in [
        UnaryOp::Exp,
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
        UnaryOp::Tanh,
        UnaryOp::Sin,
    ] {
        check(&format!("unary {}", u.name()), Op::Unary(u), vec![x.clone()], 2e-6);
    }
    for b in [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
    ] {
        check(
            &format!("binary {}", b.name()),
            Op::Binary(b),
            vec![x.clone(), y.clone()],
            1e-7,
        );
    }
    check("compare", Op::Compare(CmpOp::Lt), vec![x.clone(), y.clone()], 0.0);
    let xi = r.tensor(DType::I64, &[4, 9], -50.0, 50.0);
    let yi = r.tensor(DType::I64, &[9], 1.0, 7.0);
    check(
        "integer div",
        Op::Binary(BinaryOp::Div),
        vec![xi.clone(), yi.clone()],
        0.0,
    );
    // rows longer than a tile, split into tiles that divide them (8192 → 4096, 12000 → 4000), or not (8191)
    for width in [8192usize, 12000, 8191] {
        let a = r.tensor(DType::F32, &[2, width], -2.0, 2.0);
        let b = r.tensor(DType::F32, &[width], -2.0, 2.0);
        check(
            &format!("exp over rows of {width}"),
            Op::Unary(UnaryOp::Exp),
            vec![a.clone()],
            1e-6,
        );
        check(
            &format!("broadcast add over rows of {width}"),
            Op::Binary(BinaryOp::Add),
            vec![a, b],
            1e-6,
        );
    }
    check("cast to bf16", Op::Cast { dtype: DType::BF16 }, vec![x.clone()], 1e-7);
    check("cast to i32", Op::Cast { dtype: DType::I32 }, vec![x.clone()], 0.0);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
        for (axes, keep) in [(vec![-1], true), (vec![0], false), (vec![0, 1], false)] {
            check(
                &format!("{} {axes:?}", op.name()),
                Op::Reduce {
                    op,
                    axes: axes.clone(),
                    keepdims: keep,
                },
                vec![x.clone()],
                1e-6,
            );
        }
    }
    check(
        "integer sum",
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![1],
            keepdims: false,
        },
        vec![xi.clone()],
        0.0,
    );
    // few outputs over long ranges run in levels (partials per chunk, then combined): a full reduction,
    // the middle axis of three (kept axes on both sides), a range that is not a multiple of the chunk size, and
    // one of two levels of partials (600001 elements: 1172 chunks, then 3)
    let very_long = r.tensor(DType::F32, &[600_001], -2.0, 2.0);
    for op in [ReduceOp::Sum, ReduceOp::Max] {
        check(
            &format!("split in two levels {}", op.name()),
            Op::Reduce {
                op,
                axes: vec![0],
                keepdims: true,
            },
            vec![very_long.clone()],
            if op == ReduceOp::Sum { 1e-5 } else { 0.0 },
        );
    }
    let long = r.tensor(DType::F32, &[3, 40_001, 2], -2.0, 2.0);
    let long_i = r.tensor(DType::I64, &[70_003], -50.0, 50.0);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
        for (axes, keep) in [(vec![0, 1, 2], false), (vec![1], true), (vec![0, 1], false)] {
            check(
                &format!("split {} {axes:?}", op.name()),
                Op::Reduce {
                    op,
                    axes: axes.clone(),
                    keepdims: keep,
                },
                vec![long.clone()],
                // f32 sums of 10⁵ terms of either sign, against f64
                if matches!(op, ReduceOp::Sum | ReduceOp::Mean) {
                    1e-5
                } else {
                    0.0
                },
            );
        }
        if op != ReduceOp::Mean {
            check(
                &format!("split integer {}", op.name()),
                Op::Reduce {
                    op,
                    axes: vec![0],
                    keepdims: false,
                },
                vec![long_i.clone()],
                0.0,
            );
        }
    }
    for (exclusive, reverse) in [(false, false), (true, false), (false, true), (true, true)] {
        check(
            &format!("cumsum {exclusive} {reverse}"),
            Op::CumSum {
                axis: 1,
                exclusive,
                reverse,
            },
            vec![x.clone()],
            1e-6,
        );
    }
    check("topk", Op::TopK { k: 3, axis: -1 }, vec![x.clone()], 0.0);
    check(
        "softmax",
        Op::Composite(Composite::Softmax { axis: -1 }),
        vec![x.clone()],
        1e-6,
    );
    check(
        "log_softmax",
        Op::Composite(Composite::LogSoftmax { axis: 0 }),
        vec![x.clone()],
        1e-6,
    );
    check(
        "rms_norm",
        Op::Composite(Composite::RmsNorm { eps: 1e-5 }),
        vec![x.clone(), y.clone()],
        1e-6,
    );
    check("permute", Op::Permute { perm: vec![1, 0] }, vec![x.clone()], 0.0);
    check(
        "concat",
        Op::Concat { axis: 1 },
        vec![x.clone(), r.tensor(DType::F32, &[3, 5], -1.0, 1.0)],
        0.0,
    );
    let ids = r.tensor(DType::I64, &[2, 5], 0.0, 3.0);
    check("gather", Op::Gather { axis: 0 }, vec![x.clone(), ids.clone()], 0.0);
    check(
        "one_hot",
        Op::OneHot {
            depth: 4,
            dtype: DType::F32,
        },
        vec![ids.clone()],
        0.0,
    );
    let upd = r.tensor(DType::F32, &[2, 5, 17], -1.0, 1.0);
    check(
        "scatter_add",
        Op::ScatterAdd { axis: 0 },
        vec![x.clone(), ids, upd],
        1e-6,
    );
    check(
        "matmul",
        Op::MatMul,
        vec![
            r.tensor(DType::F32, &[2, 13, 37], -1.0, 1.0),
            r.tensor(DType::F32, &[37, 33], -1.0, 1.0),
        ],
        1e-6,
    );
}

/// The backward composites autodiff emits: `flash_attention_grad` (the generic kernel of its decomposition)
/// and `grouped_matmul_wgrad` (a grouped GEMM over the depth, after zeroing for the empty groups).
#[test]
fn backward_composite_kernels() {
    let mut r = Rng(9);
    for (b, h, g, t, s, d, causal) in [
        (1, 2, 3, 7, 7, 16, true),
        (2, 1, 1, 5, 9, 4, false),
        (1, 1, 2, 3, 6, 8, true),
    ] {
        let q = r.tensor(DType::F32, &[b, h, g, t, d], -1.0, 1.0);
        let k = r.tensor(DType::F32, &[b, h, 1, s, d], -1.0, 1.0);
        let v = r.tensor(DType::F32, &[b, h, 1, s, d + 1], -1.0, 1.0);
        let dout = r.tensor(DType::F32, &[b, h, g, t, d + 1], -1.0, 1.0);
        check(
            &format!("flash_attention_grad b{b} h{h} g{g} t{t} s{s} d{d} causal {causal}"),
            Op::Composite(Composite::FlashAttentionGrad { scale: 0.4, causal }),
            vec![q, k, v, dout],
            1e-5,
        );
    }
    // groups 3, 0, 5, 2 of 10 rows (an empty group gets zeros), and groups covering 12 of 13 rows
    for (m, counts) in [(10, vec![3, 0, 5, 2]), (13, vec![0, 12, 0, 0])] {
        let e = counts.len();
        let xs = r.tensor(DType::F32, &[m, 24], -1.0, 1.0);
        let dy = r.tensor(DType::F32, &[m, 14], -1.0, 1.0);
        for dtype in [DType::I64, DType::I32] {
            let c = Tensor::from_i64(dtype, vec![e], counts.clone());
            check(
                &format!("grouped_matmul_wgrad counts {counts:?} ({dtype})"),
                Op::Composite(Composite::GroupedMatmulWgrad),
                vec![xs.clone(), c, dy.clone()],
                1e-6,
            );
        }
    }
}

#[test]
fn moe_and_lightning_kernels() {
    let mut r = Rng(4);
    // 150 tokens: 300 rows, past one chunk of the parallel counting sort
    for (n, c, e) in [(1, 8, 4), (13, 24, 8), (150, 16, 8)] {
        let logits = r.tensor(DType::F32, &[n, e], -2.0, 2.0);
        check(
            "moe_router",
            Op::Composite(Composite::MoeRouter { k: 2 }),
            vec![logits],
            1e-6,
        );
        let x = r.tensor(DType::F32, &[n, c], -1.0, 1.0);
        let ids = r.tensor(DType::I64, &[n, 2], 0.0, e as f64);
        check(
            "moe_dispatch",
            Op::Composite(Composite::MoeDispatch { experts: e }),
            vec![x, ids],
            0.0,
        );
    }
    // grouped matmul: counts that sum to the rows, an empty expert among them; and counts short of the rows
    // (a routed exchange's padding: those rows are zeros, as the interpreter's definition says)
    let xs = r.tensor(DType::F32, &[10, 24], -1.0, 1.0);
    let w = r.tensor(DType::F32, &[4, 24, 14], -1.0, 1.0);
    for sizes in [vec![3, 0, 5, 2], vec![1, 0, 3, 2], vec![0, 0, 0, 0]] {
        let counts = Tensor::from_i64(DType::I64, vec![4], sizes.clone());
        for swiglu in [false, true] {
            check(
                &format!("grouped_matmul swiglu {swiglu} counts {sizes:?}"),
                Op::Composite(Composite::GroupedMatmul { swiglu }),
                vec![xs.clone(), counts.clone(), w.clone()],
                1e-6,
            );
        }
    }
    let ys = r.tensor(DType::F32, &[10, 6], -1.0, 1.0);
    let pos = Tensor::from_i64(DType::I64, vec![5, 2], (0..10).rev().collect());
    let wts = r.tensor(DType::F32, &[5, 2], 0.0, 1.0);
    check(
        "moe_combine",
        Op::Composite(Composite::MoeCombine),
        vec![ys, pos, wts],
        1e-6,
    );
    // channels not a multiple of the vector width, three slots, rows picked twice
    let ys = r.tensor(DType::F32, &[21, 37], -1.0, 1.0);
    let pos = Tensor::from_i64(DType::I64, vec![7, 3], (0..21).map(|i| (i * 5) % 21 / 2).collect());
    let wts = r.tensor(DType::F32, &[7, 3], 0.0, 1.0);
    check(
        "moe_combine 37 channels",
        Op::Composite(Composite::MoeCombine),
        vec![ys.clone(), pos, wts.clone()],
        1e-6,
    );
    // a position past the rows is an error naming the kernel, never a read out of bounds
    let bad = Tensor::from_i64(
        DType::I64,
        vec![7, 3],
        (0..21).map(|i| if i == 9 { 21 } else { 0 }).collect(),
    );
    let args = vec![ys, bad, wts];
    let g = graph(&Op::Composite(Composite::MoeCombine), &args);
    let feed: HashMap<String, Tensor> = args
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("x{i}"), t.clone()))
        .collect();
    let mut cpu = CpuProgram::new(lower(&g).unwrap(), CpuOptions::default()).unwrap();
    let e = cpu.run(&feed).unwrap_err().to_string();
    assert!(
        e.contains("a row index of `moe_combine` is out of range [0, 21): got 21"),
        "{e}"
    );
    for (b, h, t, d, block) in [(1, 1, 1, 8, 4), (2, 3, 37, 8, 16), (1, 2, 64, 16, 16)] {
        let q = r.tensor(DType::F32, &[b, h, t, d], -1.0, 1.0);
        let k = r.tensor(DType::F32, &[b, h, t, d], -1.0, 1.0);
        let v = r.tensor(DType::F32, &[b, h, t, d], -1.0, 1.0);
        let lam = r.tensor(DType::F32, &[h, 1, 1], 0.01, 0.5);
        check(
            &format!("lightning_attention b{b} h{h} t{t} block {block}"),
            Op::Composite(Composite::LightningAttention { block }),
            vec![q, k, v, lam],
            1e-5,
        );
    }
    for (b, t, heads, d, block) in [(1, 1, 2, 8, 4), (2, 21, 3, 8, 8)] {
        let hd = heads * d;
        let qkv = r.tensor(DType::F32, &[b, t, 3 * hd], -1.0, 1.0);
        let lam = r.tensor(DType::F32, &[heads, 1, 1], 0.01, 0.5);
        let nw = r.tensor(DType::F32, &[hd], 0.5, 1.5);
        let gate = r.tensor(DType::F32, &[b, t, hd], -1.0, 1.0);
        check(
            &format!("lightning_layer b{b} t{t} heads {heads}"),
            Op::Composite(Composite::LightningLayer {
                block,
                heads,
                eps: 1e-6,
            }),
            vec![qkv, lam, nw, gate],
            1e-5,
        );
    }
}

/// GEMMs whose `B` is a weight read it packed once per weights (`examples/mlp.fir`'s two matmuls, one of them
/// transposed by strides): the results stay the interpreter's across calls with other inputs, and a weight
/// replaced after a run is used by the next one (never a stale packing).
#[test]
fn packed_weights_follow_the_weights() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mlp.fir")).unwrap();
    let g = fulgur_ir::text::parse(&src).unwrap();
    let mut rng = Rng(7);
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    for (name, shape) in [
        ("w1", vec![64, 128]),
        ("b1", vec![128]),
        ("w2", vec![128, 16]),
        ("b2", vec![16]),
    ] {
        weights.insert(name.into(), rng.tensor(DType::F32, &shape, -0.5, 0.5));
    }
    let mut cpu = CpuProgram::new(lower(&g).unwrap(), CpuOptions::default()).unwrap();
    cpu.load_weights(&weights).unwrap();
    for (call, b) in [(0, 5usize), (1, 37), (2, 5), (3, 1)] {
        if call == 2 {
            let w1 = rng.tensor(DType::F32, &[64, 128], -0.5, 0.5);
            cpu.set_weight("w1", &w1).unwrap();
            weights.insert("w1".into(), w1);
        }
        let x = rng.tensor(DType::F32, &[b, 64], -1.0, 1.0);
        let mut feed = weights.clone();
        feed.insert("x".into(), x.clone());
        let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
        let got = cpu.run(&[("x".to_string(), x)].into()).unwrap();
        let e = got["y"].rel_l2(&want["y"]);
        assert!(e < 1e-6, "call {call} (B = {b}): relative error {e}");
        // both weights packed: [64, 128] and [128, 16], each padded to whole NR-wide panels
        assert!(
            cpu.packed_bytes() >= (64 * 128 + 128 * 16) * 4,
            "{}",
            cpu.packed_bytes()
        );
    }
}

/// The CPU backend's inline `exp` (`codegen/src/llvm.rs`, `expf`): within 2 ulp of the correctly rounded value
/// for normal results, gradual underflow for results below the smallest normal, 0 below the underflow threshold
/// (a causal mask's −inf), infinity past the overflow threshold, and NaN for NaN; across a sweep of inputs.
#[test]
fn inline_exp_is_within_2_ulp_and_exact_at_the_edges() {
    let mut xs: Vec<f32> = vec![
        f32::NEG_INFINITY,
        -1e30,
        -200.0,
        -104.0,
        -103.98,
        -103.97,
        -100.0,
        -90.0,
        -87.5,
        -87.3,
        0.0,
        -0.0,
        1e-30,
        88.72,
        88.73,
        100.0,
        f32::INFINITY,
        f32::NAN,
    ];
    xs.extend((0..2000).map(|i| -103.0 + i as f32 * (192.0 / 2000.0)));
    let n = xs.len();
    let x = Tensor::from_f64(DType::F32, vec![n], xs.iter().map(|&v| v as f64).collect());
    let g = graph(&Op::Unary(fulgur_ir::UnaryOp::Exp), std::slice::from_ref(&x));
    let mut cpu = CpuProgram::new(lower(&g).unwrap(), CpuOptions::default()).unwrap();
    let got = cpu.run(&[("x0".to_string(), x)].into()).unwrap()["y0"].to_f64();
    for (i, &xi) in xs.iter().enumerate() {
        let y = got[i] as f32;
        let want = (xi as f64).exp() as f32; // correctly rounded to f32, subnormals included
        if xi.is_nan() {
            assert!(y.is_nan(), "exp({xi}) = {y}");
        } else if want == 0.0 || want.is_infinite() {
            assert_eq!(y, want, "exp({xi})");
        } else if want < f32::MIN_POSITIVE {
            // gradual underflow: within 2 subnormal steps
            let d = (y.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(d <= 2, "exp({xi}) = {y:e}, want {want:e} (subnormal, {d} steps)");
        } else {
            let d = (y.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(d <= 2, "exp({xi}) = {y:e}, want {want:e} ({d} ulp)");
        }
    }
}
