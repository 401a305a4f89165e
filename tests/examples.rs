//! The graphs in `examples/`, evaluated through the library and checked against independent computations
//! written here as plain loops in f64.
//!
//! The inputs files `examples/NAME.inputs.safetensors` are made by [`example_inputs`] (a fixed-seed generator,
//! no dependency on a random-number crate's stream); `inputs_files_are_current` checks that the committed
//! files are exactly what it makes. To regenerate them after changing an example:
//!
//! ```text
//! FULGUR_WRITE_EXAMPLE_INPUTS=1 cargo test -p fulgur --test examples
//! ```

use fulgur::ir::tensor::{read_safetensors, write_safetensors};
use fulgur::ir::{text, Graph, Interpreter, Precision, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

const EXAMPLES: [&str; 3] = ["mlp", "attention", "lightning"];

/// Agreement asked of the interpreter in its default precision (every op rounded to f32).
const TOL_F32: f64 = 1e-5;
/// Agreement asked of the interpreter in f64 (same inputs, same maths, different order of operations).
const TOL_F64: f64 = 1e-12;

fn example_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples").join(file)
}

fn load_graph(name: &str) -> Graph {
    let path = example_path(&format!("{name}.fir"));
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let g = text::parse(&src).unwrap_or_else(|e| panic!("{}:{e}", path.display()));
    g.verify().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    g
}

fn inputs_path(name: &str) -> PathBuf {
    example_path(&format!("{name}.inputs.safetensors"))
}

/// splitmix64: a tiny generator whose stream is fixed forever, so the committed inputs can be re-made.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-scale, scale), as f32.
    fn uniform(&mut self, scale: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32; // [0, 1), exact in f32
        (2.0 * u - 1.0) * scale
    }
    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_f32(shape.to_vec(), (0..n).map(|_| self.uniform(scale)).collect())
    }
}

/// Sizes of the symbols of each example.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    b: usize,
    h: usize,
    t: usize,
}

const D: usize = 16;

/// The committed inputs use these sizes; the tests also run others.
fn committed_sizes(name: &str) -> Sizes {
    match name {
        "mlp" => Sizes { b: 4, h: 0, t: 0 },
        "attention" => Sizes { b: 0, h: 0, t: 12 },
        "lightning" => Sizes { b: 2, h: 4, t: 20 },
        _ => unreachable!("unknown example {name}"),
    }
}

/// Inputs (and parameters) of an example, random but fixed by `seed`.
fn example_inputs(name: &str, s: Sizes, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = Rng(seed);
    let mut m = BTreeMap::new();
    match name {
        "mlp" => {
            m.insert("x".into(), rng.tensor(&[s.b, 64], 1.0));
            m.insert("w1".into(), rng.tensor(&[64, 128], 0.125)); // ~ 1/√64
            m.insert("b1".into(), rng.tensor(&[128], 0.1));
            m.insert("w2".into(), rng.tensor(&[128, 16], 0.088)); // ~ 1/√128
            m.insert("b2".into(), rng.tensor(&[16], 0.1));
        }
        "attention" => {
            for n in ["q", "k", "v"] {
                m.insert(n.into(), rng.tensor(&[s.t, D], 1.0));
            }
        }
        "lightning" => {
            for n in ["q", "k", "v"] {
                m.insert(n.into(), rng.tensor(&[s.b, s.h, s.t, D], 0.5));
            }
            // MiniMax's slope ladder λ_h = 2^(-8(h+1)/H): fast decay in head 0, slow in the last head
            let lambda = (0..s.h)
                .map(|h| (-8.0 * (h + 1) as f64 / s.h as f64).exp2() as f32)
                .collect();
            m.insert("lambda".into(), Tensor::from_f32(vec![s.h], lambda));
        }
        _ => unreachable!("unknown example {name}"),
    }
    m
}

fn run(g: &Graph, inputs: &BTreeMap<String, Tensor>, precision: Precision) -> BTreeMap<String, Tensor> {
    let inputs: HashMap<String, Tensor> = inputs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    Interpreter::new(precision)
        .run(g, &inputs)
        .unwrap_or_else(|e| panic!("graph {}: {e}", g.name))
}

fn vals(m: &BTreeMap<String, Tensor>, name: &str) -> Vec<f64> {
    m[name].to_f64()
}

// ------------------------------------------------------------------ independent computations, f64 loops

/// `silu(x w1 + b1) w2 + b2`.
fn mlp_reference(inp: &BTreeMap<String, Tensor>) -> Vec<f64> {
    let (x, w1, b1, w2, b2) = (
        vals(inp, "x"),
        vals(inp, "w1"),
        vals(inp, "b1"),
        vals(inp, "w2"),
        vals(inp, "b2"),
    );
    let b = x.len() / 64;
    let mut y = vec![0.0; b * 16];
    for r in 0..b {
        let mut hidden = [0.0f64; 128];
        for (j, hj) in hidden.iter_mut().enumerate() {
            let mut acc = b1[j];
            for i in 0..64 {
                acc += x[r * 64 + i] * w1[i * 128 + j];
            }
            *hj = acc / (1.0 + (-acc).exp());
        }
        for o in 0..16 {
            let mut acc = b2[o];
            for (j, hj) in hidden.iter().enumerate() {
                acc += hj * w2[j * 16 + o];
            }
            y[r * 16 + o] = acc;
        }
    }
    y
}

/// Causal softmax attention, one row at a time, over the visible positions only (no mask values at all).
fn attention_reference(inp: &BTreeMap<String, Tensor>) -> Vec<f64> {
    let (q, k, v) = (vals(inp, "q"), vals(inp, "k"), vals(inp, "v"));
    let t_len = q.len() / D;
    let scale = 1.0 / (D as f64).sqrt();
    let mut o = vec![0.0; t_len * D];
    for t in 0..t_len {
        let scores: Vec<f64> = (0..=t)
            .map(|u| (0..D).map(|d| q[t * D + d] * k[u * D + d]).sum::<f64>() * scale)
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (u, w) in weights.iter().enumerate() {
            for d in 0..D {
                o[t * D + d] += w / total * v[u * D + d];
            }
        }
    }
    o
}

/// The recurrent form of decayed linear attention (MINIMAX.md §2a step 5), a different algorithm from the
/// graph's masked quadratic form: `S_t = γ S_{t-1} + k_tᵀ v_t`, `o_t = q_t S_t`, `γ = exp(-λ_h)`.
fn lightning_reference(inp: &BTreeMap<String, Tensor>, s: Sizes) -> Vec<f64> {
    let (q, k, v, lambda) = (vals(inp, "q"), vals(inp, "k"), vals(inp, "v"), vals(inp, "lambda"));
    let at = |b: usize, h: usize, t: usize, d: usize| ((b * s.h + h) * s.t + t) * D + d;
    let mut o = vec![0.0; s.b * s.h * s.t * D];
    for b in 0..s.b {
        for h in 0..s.h {
            let gamma = (-lambda[h]).exp();
            let mut state = [[0.0f64; D]; D]; // [d_k][d_v]
            for t in 0..s.t {
                for (dk, row) in state.iter_mut().enumerate() {
                    for (dv, x) in row.iter_mut().enumerate() {
                        *x = gamma * *x + k[at(b, h, t, dk)] * v[at(b, h, t, dv)];
                    }
                }
                for dv in 0..D {
                    o[at(b, h, t, dv)] = (0..D).map(|dk| q[at(b, h, t, dk)] * state[dk][dv]).sum();
                }
            }
        }
    }
    o
}

fn reference(name: &str, inp: &BTreeMap<String, Tensor>, s: Sizes) -> (String, Vec<usize>, Vec<f64>) {
    match name {
        "mlp" => ("y".into(), vec![s.b, 16], mlp_reference(inp)),
        "attention" => ("o".into(), vec![s.t, D], attention_reference(inp)),
        "lightning" => ("o".into(), vec![s.b, s.h, s.t, D], lightning_reference(inp, s)),
        _ => unreachable!("unknown example {name}"),
    }
}

/// Relative L2 error ‖a−b‖/‖b‖.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    assert!(den > 0.0, "reference is all zeros: a useless test");
    (num / den).sqrt()
}

/// Runs an example in both precisions and compares with the reference.
fn check(name: &str, inputs: &BTreeMap<String, Tensor>, s: Sizes) {
    let g = load_graph(name);
    let (out_name, shape, want) = reference(name, inputs, s);
    for (precision, tol) in [(Precision::F32, TOL_F32), (Precision::F64, TOL_F64)] {
        let got = run(&g, inputs, precision);
        assert_eq!(got.len(), 1, "{name}: one output expected, got {:?}", got.keys());
        let t = &got[&out_name];
        assert_eq!(t.shape, shape, "{name} ({precision:?}): output shape");
        let err = rel_err(&t.to_f64(), &want);
        assert!(
            err < tol,
            "{name} ({precision:?}, {s:?}): relative error {err:.3e} exceeds {tol:e}"
        );
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn inputs_files_are_current() {
    let write = std::env::var_os("FULGUR_WRITE_EXAMPLE_INPUTS").is_some_and(|v| v == "1");
    for (seed, name) in EXAMPLES.iter().enumerate() {
        let want = example_inputs(name, committed_sizes(name), 1000 + seed as u64);
        let path = inputs_path(name);
        if write {
            write_safetensors(&path, &want).unwrap_or_else(|e| panic!("{e}"));
        }
        let have = read_safetensors(&path).unwrap_or_else(|e| {
            panic!("{e}; make it with FULGUR_WRITE_EXAMPLE_INPUTS=1 cargo test -p fulgur --test examples")
        });
        assert_eq!(
            have,
            want,
            "{} differs from what the generator makes; regenerate with \
             FULGUR_WRITE_EXAMPLE_INPUTS=1 cargo test -p fulgur --test examples",
            path.display()
        );
    }
}

#[test]
fn examples_match_independent_computations() {
    for name in EXAMPLES {
        let inputs = read_safetensors(&inputs_path(name)).unwrap_or_else(|e| panic!("{e}"));
        check(name, &inputs, committed_sizes(name));
    }
}

/// One compile serves every size: the same graphs at other symbol values, including length-1 sequences and
/// a lightning sequence longer than MiniMax's 256-token block.
#[test]
fn examples_at_other_sizes() {
    let cases = [
        ("mlp", Sizes { b: 1, h: 0, t: 0 }),
        ("mlp", Sizes { b: 7, h: 0, t: 0 }),
        ("attention", Sizes { b: 0, h: 0, t: 1 }),
        ("attention", Sizes { b: 0, h: 0, t: 33 }),
        ("lightning", Sizes { b: 1, h: 1, t: 1 }),
        ("lightning", Sizes { b: 1, h: 3, t: 5 }),
        ("lightning", Sizes { b: 1, h: 2, t: 300 }),
    ];
    for (i, (name, s)) in cases.into_iter().enumerate() {
        check(name, &example_inputs(name, s, 7 + i as u64), s);
    }
}

#[test]
fn examples_are_canonical_fir_up_to_comments() {
    for name in EXAMPLES {
        let path = example_path(&format!("{name}.fir"));
        let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        let without_comments: String = src
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .map(|l| format!("{l}\n"))
            .collect();
        let g = load_graph(name);
        assert_eq!(text::print(&g), without_comments, "{}", path.display());
    }
}
