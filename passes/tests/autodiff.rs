//! The autodiff pass against central finite differences, in f64 on the reference interpreter: every rule on
//! random inputs and shapes with broadcasting, the composites the optimizer introduces (through their
//! decompositions), and the errors for what cannot be differentiated.

use fulgur_ir::{Buffer, CmpOp, ConstData, DType, Dim, Graph, Interpreter, Precision, Tensor, UnaryOp, Value};
use fulgur_passes::autodiff::{differentiate, GradOptions};
use std::collections::HashMap;

type Build = dyn Fn(&mut Graph, &[Value]) -> fulgur_ir::Result<Value>;
/// A case: its name, the parameters' shapes, and the graph over them.
type Case<'a> = (&'a str, Vec<&'a [usize]>, Box<Build>);

/// Random values in [-1, 1], from a seed.
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x2545_F491);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// An f32 tensor holding unrounded f64 values (the f64 interpreter keeps them).
fn tensor(shape: &[usize], v: Vec<f64>) -> Tensor {
    Tensor {
        dtype: DType::F32,
        shape: shape.to_vec(),
        data: Buffer::F(v),
    }
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let n: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    d / n.max(1e-12)
}

/// Builds `loss = Σ build(params) ⊙ r` (r random), differentiates it, and compares every parameter's gradient
/// with central differences of the loss. Returns the worst relative error.
fn check(name: &str, shapes: &[&[usize]], build: &Build, seed: u64) -> f64 {
    let mut g = Graph::new(name);
    let ps: Vec<Value> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            g.param(&format!("p{i}"), DType::F32, s.iter().map(|&d| Dim::from(d)).collect())
                .unwrap()
        })
        .collect();
    let y = build(&mut g, &ps).unwrap_or_else(|e| panic!("{name}: {e}"));
    let yd: Vec<usize> = g.dims(y).iter().map(|d| d.as_const().unwrap() as usize).collect();
    let n: usize = yd.iter().product();
    let r = g
        .constant(DType::F32, yd.clone(), ConstData::Float(values(n, seed ^ 0xABCD)))
        .unwrap();
    let p = g.mul(y, r).unwrap();
    let all: Vec<i64> = (0..yd.len() as i64).collect();
    let loss = g.sum(p, &all, false).unwrap();
    g.add_output("loss", loss).unwrap();
    let dg = differentiate(&g, "loss", &GradOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut feed: HashMap<String, Tensor> = HashMap::new();
    for (i, s) in shapes.iter().enumerate() {
        let n: usize = s.iter().product();
        feed.insert(format!("p{i}"), tensor(s, values(n, seed + i as u64)));
    }
    let interp = Interpreter::new(Precision::F64);
    let got = interp.run(&dg, &feed).unwrap_or_else(|e| panic!("{name}: {e}"));
    let base = interp.run(&g, &feed).unwrap();
    assert!(
        (got["loss"].to_f64()[0] - base["loss"].to_f64()[0]).abs() < 1e-12,
        "{name}: the differentiated graph changed the loss"
    );
    let h = 1e-5;
    let mut worst: f64 = 0.0;
    for (i, s) in shapes.iter().enumerate() {
        let pname = format!("p{i}");
        let x0 = feed[&pname].to_f64();
        let mut fd = vec![0.0; x0.len()];
        for j in 0..x0.len() {
            let mut f = [0.0; 2];
            for (k, sign) in [1.0, -1.0].into_iter().enumerate() {
                let mut x = x0.clone();
                x[j] += sign * h;
                let mut fe = feed.clone();
                fe.insert(pname.clone(), tensor(s, x));
                f[k] = interp.run(&g, &fe).unwrap()["loss"].to_f64()[0];
            }
            fd[j] = (f[0] - f[1]) / (2.0 * h);
        }
        let an = got[&format!("grad.{pname}")].to_f64();
        assert_eq!(an.len(), fd.len(), "{name}: gradient of {pname} has the wrong size");
        let e = rel(&an, &fd);
        println!("{name}: {pname} rel {e:.2e}");
        worst = worst.max(e);
    }
    worst
}

/// Runs the cases, prints each, and fails naming every case past the tolerance.
fn run_cases(cases: Vec<Case>) {
    let mut bad = Vec::new();
    for (i, (name, shapes, build)) in cases.iter().enumerate() {
        let e = check(name, shapes, build.as_ref(), 17 + 31 * i as u64);
        if e.is_nan() || e > 1e-6 {
            bad.push(format!("{name}: {e:.3e}"));
        }
    }
    assert!(bad.is_empty(), "gradients off their finite differences: {bad:?}");
}

/// `x² + 0.5`: a positive input for rules defined on positive numbers.
fn positive(g: &mut Graph, x: Value) -> fulgur_ir::Result<Value> {
    let s = g.mul(x, x)?;
    g.add_scalar(s, 0.5)
}

#[test]
fn unary_rules_match_finite_differences() {
    let mut cases: Vec<Case> = Vec::new();
    for u in UnaryOp::ALL {
        let needs_positive = matches!(u, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip);
        cases.push((
            u.name(),
            vec![&[3, 5]],
            Box::new(move |g: &mut Graph, p: &[Value]| {
                let x = if needs_positive { positive(g, p[0])? } else { p[0] };
                g.unary(u, x)
            }),
        ));
    }
    run_cases(cases);
}

#[test]
fn binary_rules_with_broadcasting_match_finite_differences() {
    use fulgur_ir::BinaryOp::*;
    let mut cases: Vec<Case> = Vec::new();
    for b in [Add, Sub, Mul, Div, Max, Min, Pow] {
        for shapes in [vec![&[3usize, 4][..], &[4][..]], vec![&[2, 1, 4][..], &[3, 1][..]]] {
            cases.push((
                b.name(),
                shapes,
                Box::new(move |g: &mut Graph, p: &[Value]| {
                    let (a, c) = match b {
                        Div => (p[0], positive(g, p[1])?),
                        Pow => (positive(g, p[0])?, p[1]),
                        _ => (p[0], p[1]),
                    };
                    g.binary(b, a, c)
                }),
            ));
        }
    }
    // the same value on both sides, and a tie of max shared evenly
    cases.push(("mul x x", vec![&[6]], Box::new(|g, p| g.mul(p[0], p[0]))));
    run_cases(cases);
}

#[test]
fn structural_rules_match_finite_differences() {
    let cases: Vec<Case> = vec![
        (
            "select",
            vec![&[3, 4], &[4], &[3, 1]],
            Box::new(|g, p| {
                let z = g.scalar(0.0, DType::F32)?;
                let c = g.compare(CmpOp::Gt, p[2], z)?;
                g.select(c, p[0], p[1])
            }),
        ),
        (
            "matmul",
            vec![&[2, 3, 4], &[4, 5]],
            Box::new(|g, p| g.matmul(p[0], p[1])),
        ),
        (
            "matmul, batch broadcast",
            vec![&[2, 1, 3, 4], &[3, 4, 2]],
            Box::new(|g, p| g.matmul(p[0], p[1])),
        ),
        ("sum", vec![&[2, 3, 4]], Box::new(|g, p| g.sum(p[0], &[0, 2], false))),
        (
            "sum keepdims",
            vec![&[2, 3, 4]],
            Box::new(|g, p| g.sum(p[0], &[-1], true)),
        ),
        ("mean", vec![&[2, 3, 4]], Box::new(|g, p| g.mean(p[0], &[1], false))),
        ("max", vec![&[3, 5]], Box::new(|g, p| g.max(p[0], &[1], true))),
        (
            "min",
            vec![&[3, 5]],
            Box::new(|g, p| g.reduce(fulgur_ir::ReduceOp::Min, p[0], &[0], false)),
        ),
        (
            "reshape",
            vec![&[2, 6]],
            Box::new(|g, p| g.reshape(p[0], vec![Dim::from(3), Dim::from(4)])),
        ),
        (
            "permute",
            vec![&[2, 3, 4]],
            Box::new(|g, p| g.permute(p[0], &[2, 0, 1])),
        ),
        (
            "broadcast",
            vec![&[3, 1]],
            Box::new(|g, p| g.broadcast(p[0], vec![Dim::from(2), Dim::from(3), Dim::from(4)])),
        ),
        ("slice", vec![&[3, 7]], Box::new(|g, p| g.slice(p[0], 1, 2, 5))),
        ("slice from 0", vec![&[6, 2]], Box::new(|g, p| g.slice(p[0], 0, 0, 4))),
        (
            "concat",
            vec![&[2, 3], &[2, 1], &[2, 2]],
            Box::new(|g, p| g.concat(&[p[0], p[1], p[2]], -1)),
        ),
        (
            "gather (repeated indices)",
            vec![&[5, 3]],
            Box::new(|g, p| {
                let i = g.constant(DType::I64, vec![2, 3], ConstData::Int(vec![4, 0, 4, 1, 1, 2]))?;
                g.gather(p[0], i, 0)
            }),
        ),
        (
            "scatter_add",
            vec![&[4, 3], &[5, 3]],
            Box::new(|g, p| {
                let i = g.constant(DType::I64, vec![5], ConstData::Int(vec![3, 0, 3, 2, 0]))?;
                g.scatter_add(p[0], i, p[1], 0)
            }),
        ),
        (
            "topk",
            vec![&[3, 6]],
            Box::new(|g, p| {
                let (v, _) = g.topk(p[0], 2, -1)?;
                Ok(v)
            }),
        ),
        (
            "cumsum",
            vec![&[3, 5]],
            Box::new(|g, p| g.cumsum(p[0], 1, false, false)),
        ),
        (
            "cumsum exclusive reverse",
            vec![&[4, 3]],
            Box::new(|g, p| g.cumsum(p[0], 0, true, true)),
        ),
        ("softmax", vec![&[3, 5]], Box::new(|g, p| g.softmax(p[0], -1))),
        ("log_softmax", vec![&[3, 5]], Box::new(|g, p| g.log_softmax(p[0], 0))),
    ];
    run_cases(cases);
}

#[test]
fn composites_match_finite_differences_through_their_decompositions() {
    let cases: Vec<Case> = vec![
        (
            "rms_norm",
            vec![&[2, 3, 6], &[6]],
            Box::new(|g, p| g.rms_norm(p[0], p[1], 1e-5)),
        ),
        (
            "lightning_attention (3 blocks, the last short)",
            vec![&[2, 7, 3], &[2, 7, 3], &[2, 7, 4], &[2, 1, 1]],
            Box::new(|g, p| {
                let lam = positive(g, p[3])?;
                g.lightning_attention(p[0], p[1], p[2], lam, 3)
            }),
        ),
        (
            "flash_attention, causal",
            vec![&[2, 5, 3], &[2, 5, 3], &[2, 5, 4]],
            Box::new(|g, p| g.flash_attention(p[0], p[1], p[2], 0.7, true)),
        ),
        (
            "moe: router, dispatch, grouped swiglu matmul, combine",
            vec![&[6, 4], &[4, 3], &[3, 4, 10], &[3, 5, 4]],
            Box::new(|g, p| {
                let logits = g.matmul(p[0], p[1])?;
                let (w, ids) = g.moe_router(logits, 2)?;
                let (xs, pos, counts) = g.moe_dispatch(p[0], ids, 3)?;
                let h = g.grouped_matmul(xs, counts, p[2], true)?;
                let ys = g.grouped_matmul(h, counts, p[3], false)?;
                g.moe_combine(ys, pos, w)
            }),
        ),
    ];
    run_cases(cases);
}

/// Gradients of data inputs with symbolic dimensions: the mean's count comes from the bound shape.
#[test]
fn inputs_with_symbolic_dimensions_get_gradients() {
    let mut g = Graph::new("sym");
    let x = g.input("x", DType::F32, vec![Dim::sym("N"), Dim::from(3)]).unwrap();
    let m = g.mean(x, &[0], false).unwrap();
    let s = g.mul(m, m).unwrap();
    let l = g.sum(s, &[0], false).unwrap();
    g.add_output("loss", l).unwrap();
    let dg = differentiate(
        &g,
        "loss",
        &GradOptions {
            inputs: vec!["x".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let v = values(12, 5);
    let feed: HashMap<String, Tensor> = [("x".to_string(), tensor(&[4, 3], v.clone()))].into();
    let got = Interpreter::new(Precision::F64).run(&dg, &feed).unwrap();
    // d/dx_ij Σ_j (mean_i x_ij)² = 2 · mean_j / N
    let want: Vec<f64> = (0..12)
        .map(|k| {
            let j = k % 3;
            let mean = (0..4).map(|i| v[i * 3 + j]).sum::<f64>() / 4.0;
            2.0 * mean / 4.0
        })
        .collect();
    let e = rel(&got["grad.x"].to_f64(), &want);
    assert!(e < 1e-12, "rel {e}");
}

#[test]
fn what_cannot_be_differentiated_is_refused() {
    let mut g = Graph::new("bad");
    let x = g.param("w", DType::F32, vec![Dim::from(3)]).unwrap();
    let i = g.input("ids", DType::I64, vec![Dim::from(3)]).unwrap();
    g.add_output("y", x).unwrap();
    let s = g.sum(x, &[0], false).unwrap();
    g.add_output("loss", s).unwrap();
    let _ = i;
    let e = |r: Result<Graph, fulgur_passes::PassError>| r.unwrap_err().to_string();
    assert_eq!(
        e(differentiate(&g, "nope", &GradOptions::default())),
        "autodiff: the graph has no output `nope` to differentiate"
    );
    assert_eq!(
        e(differentiate(&g, "y", &GradOptions::default())),
        "autodiff: the loss `y` must be a float value of one element, got f32[3]"
    );
    assert_eq!(
        e(differentiate(
            &g,
            "loss",
            &GradOptions {
                inputs: vec!["ids".into()],
                ..Default::default()
            }
        )),
        "autodiff: the input `ids` is i64[3]: only float inputs have gradients"
    );
    assert_eq!(
        e(differentiate(
            &g,
            "loss",
            &GradOptions {
                inputs: vec!["w".into()],
                ..Default::default()
            }
        )),
        "autodiff: the graph has no data input `w` to differentiate"
    );
    // a parameter the loss does not use gets zeros
    let mut g2 = g.clone();
    g2.param("unused", DType::F32, vec![Dim::from(2)]).unwrap();
    let dg = differentiate(&g2, "loss", &GradOptions::default()).unwrap();
    let feed: HashMap<String, Tensor> = [
        ("w".to_string(), tensor(&[3], vec![1.0, 2.0, 3.0])),
        ("unused".to_string(), tensor(&[2], vec![1.0, 1.0])),
        ("ids".to_string(), Tensor::from_i64(DType::I64, vec![3], vec![0, 1, 2])),
    ]
    .into();
    let got = Interpreter::new(Precision::F64).run(&dg, &feed).unwrap();
    assert_eq!(got["grad.unused"].to_f64(), vec![0.0, 0.0]);
    assert_eq!(got["grad.w"].to_f64(), vec![1.0, 1.0, 1.0]);
}

/// A cast passes the gradient straight through (rounding to f16 makes the function piecewise constant, so
/// finite differences do not apply), converted to the input's dtype.
#[test]
fn casts_pass_the_gradient_straight_through() {
    let mut g = Graph::new("cast");
    let x = g.param("x", DType::F32, vec![Dim::from(4)]).unwrap();
    let h = g.cast(x, DType::F16).unwrap();
    let r = g
        .constant(DType::F16, vec![4], ConstData::Float(vec![0.5, -2.0, 3.0, 0.25]))
        .unwrap();
    let p = g.mul(h, r).unwrap();
    let s = g.sum(p, &[0], false).unwrap();
    let l = g.cast(s, DType::F32).unwrap();
    g.add_output("loss", l).unwrap();
    let dg = differentiate(&g, "loss", &GradOptions::default()).unwrap();
    let out = dg.outputs().iter().find(|(n, _)| n == "grad.x").unwrap().1;
    assert_eq!(dg.dtype(out), DType::F32);
    let feed: HashMap<String, Tensor> = [("x".to_string(), tensor(&[4], values(4, 9)))].into();
    let got = Interpreter::new(Precision::F64).run(&dg, &feed).unwrap();
    assert_eq!(got["grad.x"].to_f64(), vec![0.5, -2.0, 3.0, 0.25]);
}

/// `pow` at a zero base with a zero exponent: the base's gradient is 0, not NaN (as PyTorch).
#[test]
fn pow_at_zero_to_the_zero_has_a_zero_gradient() {
    let mut g = Graph::new("pow");
    let a = g.param("a", DType::F32, vec![Dim::from(2)]).unwrap();
    let c = g.param("c", DType::F32, vec![Dim::from(2)]).unwrap();
    let y = g.binary(fulgur_ir::BinaryOp::Pow, a, c).unwrap();
    let l = g.sum(y, &[0], false).unwrap();
    g.add_output("loss", l).unwrap();
    let dg = differentiate(&g, "loss", &GradOptions::default()).unwrap();
    let feed: HashMap<String, Tensor> = [
        ("a".to_string(), tensor(&[2], vec![0.0, 2.0])),
        ("c".to_string(), tensor(&[2], vec![0.0, 0.0])),
    ]
    .into();
    let got = Interpreter::new(Precision::F64).run(&dg, &feed).unwrap();
    assert_eq!(got["grad.a"].to_f64(), vec![0.0, 0.0]);
}
