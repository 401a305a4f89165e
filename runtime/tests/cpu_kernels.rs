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
    let g = graph(&op, &args);
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
