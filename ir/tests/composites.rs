//! The optimizer's composites against their definitions.
//!
//! Every composite is run through the interpreter in f64 (so through its decomposition) and compared with the
//! definitional computation: a graph of primitives built here (the form the model builders write) or plain
//! loops, on random inputs of random shapes from seeded generators. Further: each decomposition built on
//! symbolic shapes has exactly the inferred output types and runs; typing errors name the shapes; the text
//! format and JSON round-trip every composite.

use fulgur_ir::{json, text, CmpOp, Composite, DType, Dim, Graph, Interpreter, IrError, Op, Precision, Tensor, Value};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

// ------------------------------------------------------------------ helpers

/// A graph input: name, dtype, shape.
type In = (&'static str, DType, Vec<Dim>);

fn cd(v: &[usize]) -> Vec<Dim> {
    v.iter().map(|&x| Dim::from(x)).collect()
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn ft(shape: &[usize], v: Vec<f64>) -> Tensor {
    Tensor::from_f64(DType::F32, shape.to_vec(), v)
}

fn rand_t(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    ft(shape, randn(rng, n))
}

fn it(dtype: DType, shape: &[usize], v: Vec<i64>) -> Tensor {
    Tensor::from_i64(dtype, shape.to_vec(), v)
}

fn try_run(g: &Graph, ins: &[(&str, &Tensor)]) -> Result<BTreeMap<String, Tensor>, IrError> {
    let m: HashMap<String, Tensor> = ins.iter().map(|(n, t)| (n.to_string(), (*t).clone())).collect();
    Interpreter::new(Precision::F64).run(g, &m)
}

fn run(g: &Graph, ins: &[(&str, &Tensor)]) -> BTreeMap<String, Tensor> {
    try_run(g, ins).unwrap_or_else(|e| panic!("{e}\n{}", text::print(g)))
}

/// `|got − want| ≤ tol · (1 + max|want|)` elementwise; NaN only where NaN is wanted.
fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = 1.0
        + want
            .iter()
            .filter(|x| x.is_finite())
            .fold(0.0f64, |a, &x| a.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{what}: element {i}: got {g}, want NaN");
        } else {
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}: element {i}: got {g}, want {w} (|diff| {:e})",
                (g - w).abs()
            );
        }
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The linear index into a tensor of shape `src` (right-aligned, dims of 1 broadcast) of the element at the
/// multi-index `idx` of a broadcast shape.
fn bcast_lin(idx: &[usize], src: &[usize]) -> usize {
    let off = idx.len() - src.len();
    let st = strides(src);
    (0..src.len())
        .map(|i| if src[i] == 1 { 0 } else { idx[off + i] * st[i] })
        .sum()
}

fn multi_index(mut lin: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for i in (0..shape.len()).rev() {
        if shape[i] > 0 {
            idx[i] = lin % shape[i];
            lin /= shape[i];
        }
    }
    idx
}

/// Broadcast of two concrete shapes.
fn bshape(a: &[usize], b: &[usize]) -> Vec<usize> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let x = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let y = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            x.max(y)
        })
        .collect()
}

/// A graph holding one composite node on inputs of the given types; its outputs are `out0`, `out1`, …
fn composite_graph(c: Composite, ins: &[In]) -> Result<Graph, IrError> {
    let mut g = Graph::new(c.name());
    let vs: Vec<Value> = ins
        .iter()
        .map(|(n, d, s)| g.input(n, *d, s.clone()))
        .collect::<Result<_, _>>()?;
    let outs = g.op(Op::Composite(c), &vs)?;
    for (i, v) in outs.iter().enumerate() {
        g.add_output(format!("out{i}"), *v)?;
    }
    Ok(g)
}

/// Builds the composite and, separately, its decomposition on the same (possibly symbolic) input types;
/// checks the decomposition's output types are the inferred ones and that it contains only primitives.
/// Returns (composite graph, decomposition graph), both with outputs `out0`, `out1`, …
fn both_forms(c: Composite, ins: &[In]) -> (Graph, Graph) {
    let g = composite_graph(c.clone(), ins).unwrap_or_else(|e| panic!("{}: {e}", c.name()));
    let mut d = Graph::new(format!("{}_decomposed", c.name()));
    let vs: Vec<Value> = ins
        .iter()
        .map(|(n, dt, s)| d.input(n, *dt, s.clone()).unwrap())
        .collect();
    let outs = c.decompose(&mut d, &vs).unwrap_or_else(|e| panic!("{}: {e}", c.name()));
    assert_eq!(outs.len(), c.num_outputs(), "{}: output count", c.name());
    for (i, v) in outs.iter().enumerate() {
        let want = g.ty(g.outputs()[i].1);
        assert_eq!(d.ty(*v), want, "{}: decomposition output {i} type", c.name());
        d.add_output(format!("out{i}"), *v).unwrap();
    }
    for (_, n) in d.nodes() {
        assert!(
            !matches!(n.op, Op::Composite(_)),
            "{}: decomposition uses {}",
            c.name(),
            n.op.name()
        );
    }
    d.verify().unwrap();
    (g, d)
}

// ------------------------------------------------------------- lightning

/// One lightning-attention case: q, k [batch..., T, D], v [batch..., T, Dv], lam of shape `lam_shape`.
struct Lightning {
    batch: Vec<usize>,
    t: usize,
    dk: usize,
    dv: usize,
    lam_shape: Vec<usize>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Tensor,
}

impl Lightning {
    fn new(rng: &mut StdRng, batch: Vec<usize>, t: usize, dk: usize, dv: usize, lam_shape: Vec<usize>) -> Self {
        let qs: Vec<usize> = batch.iter().copied().chain([t, dk]).collect();
        let vs: Vec<usize> = batch.iter().copied().chain([t, dv]).collect();
        let nl: usize = lam_shape.iter().product();
        // rates in [0, 1.5], some exactly 0, some large
        let lam: Vec<f64> = (0..nl)
            .map(|_| match rng.gen_range(0..6) {
                0 => 0.0,
                1 => rng.gen_range(2.0..6.0),
                _ => rng.gen_range(0.0..1.5),
            })
            .collect();
        Lightning {
            q: rand_t(rng, &qs),
            k: rand_t(rng, &qs),
            v: rand_t(rng, &vs),
            lam: ft(&lam_shape, lam),
            batch,
            t,
            dk,
            dv,
            lam_shape,
        }
    }

    fn types(&self) -> Vec<In> {
        let qs: Vec<usize> = self.batch.iter().copied().chain([self.t, self.dk]).collect();
        let vs: Vec<usize> = self.batch.iter().copied().chain([self.t, self.dv]).collect();
        vec![
            ("q", DType::F32, cd(&qs)),
            ("k", DType::F32, cd(&qs)),
            ("v", DType::F32, cd(&vs)),
            ("lam", DType::F32, cd(&self.lam_shape)),
        ]
    }

    fn inputs(&self) -> Vec<(&str, &Tensor)> {
        vec![("q", &self.q), ("k", &self.k), ("v", &self.v), ("lam", &self.lam)]
    }

    fn composite(&self, block: usize) -> Vec<f64> {
        let g = composite_graph(Composite::LightningAttention { block }, &self.types()).unwrap();
        run(&g, &self.inputs())["out0"].to_f64()
    }

    /// The definitional masked form, from primitives: `((Q Kᵀ) ⊙ M) V`, `M[t, u] = exp(−λ(t − u))` for `t ≥ u`.
    fn masked_form(&self) -> Vec<f64> {
        let mut g = Graph::new("lightning_masked");
        let ty = self.types();
        let v: Vec<Value> = ty.iter().map(|(n, d, s)| g.input(n, *d, s.clone()).unwrap()).collect();
        let (q, k, vv, lam) = (v[0], v[1], v[2], v[3]);
        let t = Dim::from(self.t);
        let kt = g.transpose(k, -2, -1).unwrap();
        let scores = g.matmul(q, kt).unwrap();
        let ti = g.iota(DType::F32, vec![t.clone(), t.clone()], 0).unwrap();
        let ui = g.iota(DType::F32, vec![t.clone(), t], 1).unwrap();
        let dist = g.sub(ti, ui).unwrap();
        let causal = g.compare(CmpOp::Ge, ti, ui).unwrap();
        let ld = g.mul(lam, dist).unwrap();
        let nld = g.neg(ld).unwrap();
        let decay = g.exp(nld).unwrap();
        let zero = g.scalar(0.0, DType::F32).unwrap();
        let mask = g.select(causal, decay, zero).unwrap();
        let masked = g.mul(scores, mask).unwrap();
        let o = g.matmul(masked, vv).unwrap();
        g.add_output("o", o).unwrap();
        run(&g, &self.inputs())["o"].to_f64()
    }

    /// The recurrence, in loops: `S_t = exp(−λ) S_{t−1} + k_tᵀ v_t`, `o_t = q_t S_t`.
    fn recurrence(&self) -> Vec<f64> {
        let (t, dk, dv) = (self.t, self.dk, self.dv);
        let (q, k, v, lam) = (self.q.to_f64(), self.k.to_f64(), self.v.to_f64(), self.lam.to_f64());
        let nbatch: usize = self.batch.iter().product();
        let mut lam_idx_shape = self.batch.clone();
        lam_idx_shape.extend([1, 1]);
        let mut out = vec![0.0; nbatch * t * dv];
        for bi in 0..nbatch {
            let mut idx = multi_index(bi, &self.batch);
            idx.extend([0, 0]);
            let l = lam[bcast_lin(&idx, &self.lam_shape)];
            let gamma = (-l).exp();
            let mut s = vec![0.0; dk * dv];
            for ti in 0..t {
                let row = (bi * t + ti) * dk;
                let vrow = (bi * t + ti) * dv;
                for a in 0..dk {
                    for c in 0..dv {
                        s[a * dv + c] = gamma * s[a * dv + c] + k[row + a] * v[vrow + c];
                    }
                }
                for c in 0..dv {
                    out[vrow + c] = (0..dk).map(|a| q[row + a] * s[a * dv + c]).sum();
                }
            }
        }
        out
    }
}

#[test]
fn lightning_named_cases_against_masked_form_and_recurrence() {
    let mut rng = StdRng::seed_from_u64(1);
    // (batch, T, D, Dv, lam shape, blocks)
    type Case = (Vec<usize>, usize, usize, usize, Vec<usize>, Vec<usize>);
    let cases: Vec<Case> = vec![
        (vec![2, 3], 10, 4, 3, vec![3, 1, 1], vec![4, 3, 1, 5, 10, 16]), // T not divisible, T < b, b = 1, b = T
        (vec![1, 2], 1, 3, 3, vec![2, 1, 1], vec![1, 2, 7]),             // T = 1
        (vec![2, 4], 17, 2, 5, vec![4, 1, 1], vec![4, 16, 17, 32]),      // several blocks, short last block
        (vec![1, 3], 12, 3, 2, vec![3, 1, 1], vec![4, 6, 12]),           // T a multiple of b (no padding)
        (vec![3], 9, 2, 2, vec![], vec![2, 4]),                          // rank 3, one rate for all
        (vec![], 7, 3, 2, vec![1, 1], vec![3]),                          // rank 2
        (vec![2, 1, 2], 6, 2, 3, vec![1, 2, 1, 1], vec![4]),             // rank 5
        (vec![2, 3], 8, 2, 2, vec![2, 3, 1, 1], vec![3]),                // a rate per (batch, head)
    ];
    for (batch, t, dk, dv, lam_shape, blocks) in cases {
        let mut case = Lightning::new(&mut rng, batch.clone(), t, dk, dv, lam_shape.clone());
        if lam_shape.iter().product::<usize>() >= 2 {
            // heads with λ = 0, a large λ and a small one
            let n = lam_shape.iter().product::<usize>();
            let mut l: Vec<f64> = (0..n).map(|i| [0.0, 0.9, 0.05, 8.0][i % 4]).collect();
            l.shuffle(&mut rng);
            case.lam = ft(&lam_shape, l);
        }
        let want = case.masked_form();
        let rec = case.recurrence();
        assert_close(&want, &rec, 1e-11, "masked form vs recurrence");
        for b in blocks {
            let got = case.composite(b);
            let what = format!("lightning batch {batch:?} T={t} D={dk} Dv={dv} lam {lam_shape:?} block {b}");
            assert_close(&got, &want, 1e-11, &what);
            assert_close(&got, &rec, 1e-11, &what);
        }
    }
}

#[test]
fn lightning_with_zero_decay_is_causal_linear_attention() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut case = Lightning::new(&mut rng, vec![1, 2], 11, 3, 2, vec![2, 1, 1]);
    case.lam = ft(&[2, 1, 1], vec![0.0, 0.0]);
    let (q, k, v) = (case.q.to_f64(), case.k.to_f64(), case.v.to_f64());
    let mut want = vec![0.0; 2 * 11 * 2];
    for h in 0..2 {
        for t in 0..11 {
            for u in 0..=t {
                let dot: f64 = (0..3).map(|a| q[(h * 11 + t) * 3 + a] * k[(h * 11 + u) * 3 + a]).sum();
                for c in 0..2 {
                    want[(h * 11 + t) * 2 + c] += dot * v[(h * 11 + u) * 2 + c];
                }
            }
        }
    }
    for b in [1, 4, 5, 11, 20] {
        assert_close(&case.composite(b), &want, 1e-12, &format!("λ = 0, block {b}"));
    }
}

#[test]
fn lightning_random_shapes() {
    let mut rng = StdRng::seed_from_u64(3);
    for case_no in 0..60 {
        let rank = rng.gen_range(2..=5);
        let batch: Vec<usize> = (0..rank - 2).map(|_| rng.gen_range(1..=3)).collect();
        let t = rng.gen_range(1..=30);
        let (dk, dv) = (rng.gen_range(1..=4), rng.gen_range(1..=4));
        // lam: a suffix of batch ++ [1, 1] with some dims replaced by 1
        let mut full: Vec<usize> = batch.clone();
        full.extend([1, 1]);
        let drop = rng.gen_range(0..=full.len());
        let lam_shape: Vec<usize> = full[drop..]
            .iter()
            .map(|&d| if rng.gen_bool(0.3) { 1 } else { d })
            .collect();
        let block = *[1, 2, 3, 4, 5, 8, 16, t, t + 3].choose(&mut rng).unwrap();
        let case = Lightning::new(&mut rng, batch.clone(), t, dk, dv, lam_shape.clone());
        let got = case.composite(block);
        let what = format!("case {case_no}: batch {batch:?} T={t} D={dk} Dv={dv} lam {lam_shape:?} block {block}");
        assert_close(&got, &case.recurrence(), 1e-11, &what);
        assert_close(&got, &case.masked_form(), 1e-11, &what);
    }
}

#[test]
fn lightning_large_decay_does_not_leak_overflow() {
    // exp(+λ·n) overflows in the masked-out halves of the decay matrices; `select` must keep it out
    let mut rng = StdRng::seed_from_u64(4);
    let mut case = Lightning::new(&mut rng, vec![1, 2], 40, 2, 2, vec![2, 1, 1]);
    case.lam = ft(&[2, 1, 1], vec![60.0, 800.0]);
    let got = case.composite(16);
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output: {got:?}");
    assert_close(&got, &case.recurrence(), 1e-12, "large λ");
}

#[test]
fn lightning_decomposition_on_symbolic_shapes() {
    let mut rng = StdRng::seed_from_u64(5);
    let (b, h, t) = (Dim::sym("B"), Dim::sym("H"), Dim::sym("T"));
    for block in [1usize, 3, 4, 16] {
        let ins = vec![
            ("q", DType::F32, vec![b.clone(), h.clone(), t.clone(), 3.into()]),
            ("k", DType::F32, vec![b.clone(), h.clone(), t.clone(), 3.into()]),
            ("v", DType::F32, vec![b.clone(), h.clone(), t.clone(), 2.into()]),
            ("lam", DType::F32, vec![h.clone(), 1.into(), 1.into()]),
        ];
        let (g, d) = both_forms(Composite::LightningAttention { block }, &ins);
        let out_ty = g.ty(g.outputs()[0].1).to_string();
        assert_eq!(out_ty, "f32[B, H, T, 2]");
        let printed = text::print(&d);
        if block > 1 {
            assert!(printed.contains(&format!("ceildiv(T, {block})")), "{printed}");
            assert!(
                printed.contains("concat"),
                "padding expected for symbolic T:\n{printed}"
            );
        } else {
            assert!(!printed.contains("concat") && !printed.contains("slice"), "{printed}");
        }
        // the symbolic decomposition runs, for lengths that are and are not multiples of the block
        for tv in [1usize, 4, 7, 16, 19] {
            let case = Lightning::new(&mut rng, vec![2, 3], tv, 3, 2, vec![3, 1, 1]);
            let want = case.recurrence();
            let got_d = run(&d, &case.inputs())["out0"].to_f64();
            let got_g = run(&g, &case.inputs())["out0"].to_f64();
            assert_close(
                &got_d,
                &want,
                1e-11,
                &format!("symbolic decomposition, block {block}, T={tv}"),
            );
            assert_close(
                &got_g,
                &want,
                1e-11,
                &format!("symbolic composite, block {block}, T={tv}"),
            );
        }
    }
}

#[test]
fn lightning_skips_padding_when_the_block_divides_t() {
    let ins = |t: Dim| {
        vec![
            ("q", DType::F32, vec![2.into(), t.clone(), 4.into()]),
            ("k", DType::F32, vec![2.into(), t.clone(), 4.into()]),
            ("v", DType::F32, vec![2.into(), t, 4.into()]),
            ("lam", DType::F32, vec![2.into(), 1.into(), 1.into()]),
        ]
    };
    for t in [Dim::from(32), Dim::from(8) * Dim::sym("N")] {
        let (_, d) = both_forms(Composite::LightningAttention { block: 8 }, &ins(t.clone()));
        let printed = text::print(&d);
        assert!(
            !printed.contains("concat") && !printed.contains("slice"),
            "T = {t}:\n{printed}"
        );
    }
    let (_, d) = both_forms(Composite::LightningAttention { block: 8 }, &ins(Dim::from(30)));
    let printed = text::print(&d);
    assert!(printed.contains("concat") && printed.contains("slice"), "{printed}");
}

// ---------------------------------------------------------------- flash

/// softmax(q kᵀ·scale + mask) v in loops, for q [qb..., T, D], k [kb..., S, D], v [vb..., S, Dv].
fn flash_loops(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> (Vec<usize>, Vec<f64>) {
    let (qs, ks, vs) = (&q.shape, &k.shape, &v.shape);
    let (t, d) = (qs[qs.len() - 2], qs[qs.len() - 1]);
    let s = ks[ks.len() - 2];
    let dv = vs[vs.len() - 1];
    let batch = bshape(&bshape(&qs[..qs.len() - 2], &ks[..ks.len() - 2]), &vs[..vs.len() - 2]);
    let nb: usize = batch.iter().product();
    let (qv, kv, vv) = (q.to_f64(), k.to_f64(), v.to_f64());
    let mut out = vec![0.0; nb * t * dv];
    for bi in 0..nb {
        let idx = multi_index(bi, &batch);
        let (qo, ko, vo) = (
            bcast_lin(&idx, &qs[..qs.len() - 2]) * t * d,
            bcast_lin(&idx, &ks[..ks.len() - 2]) * s * d,
            bcast_lin(&idx, &vs[..vs.len() - 2]) * s * dv,
        );
        for ti in 0..t {
            let scores: Vec<f64> = (0..s)
                .map(|u| {
                    if causal && u as i64 > ti as i64 + s as i64 - t as i64 {
                        f64::NEG_INFINITY
                    } else {
                        (0..d).map(|a| qv[qo + ti * d + a] * kv[ko + u * d + a]).sum::<f64>() * scale
                    }
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..dv {
                out[(bi * t + ti) * dv + c] = (0..s).map(|u| e[u] / z * vv[vo + u * dv + c]).sum();
            }
        }
    }
    let mut shape = batch;
    shape.extend([t, dv]);
    (shape, out)
}

fn flash_graph(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Graph {
    composite_graph(
        Composite::FlashAttention { scale, causal },
        &[
            ("q", DType::F32, cd(&q.shape)),
            ("k", DType::F32, cd(&k.shape)),
            ("v", DType::F32, cd(&v.shape)),
        ],
    )
    .unwrap()
}

#[test]
fn flash_attention_grouped_heads_against_loops() {
    let mut rng = StdRng::seed_from_u64(10);
    for case_no in 0..50 {
        let (b, kvh, grp) = (rng.gen_range(1..=2), rng.gen_range(1..=3), rng.gen_range(1..=3));
        let (d, dv) = (rng.gen_range(1..=5), rng.gen_range(1..=5));
        let causal = rng.gen_bool(0.7);
        let s = rng.gen_range(1..=12);
        let t = match rng.gen_range(0..4) {
            0 => 1,                    // a decode step
            1 => s,                    // prefill
            _ => rng.gen_range(1..=s), // a chunk after a cache
        };
        let scale = if rng.gen_bool(0.5) {
            1.0 / (d as f64).sqrt()
        } else {
            rng.gen_range(0.1..3.0)
        };
        let q = rand_t(&mut rng, &[b, kvh, grp, t, d]);
        let k = rand_t(&mut rng, &[b, kvh, 1, s, d]);
        let v = rand_t(&mut rng, &[b, kvh, 1, s, dv]);
        let g = flash_graph(&q, &k, &v, scale, causal);
        let got = &run(&g, &[("q", &q), ("k", &k), ("v", &v)])["out0"];
        let (shape, want) = flash_loops(&q, &k, &v, scale, causal);
        assert_eq!(got.shape, shape);
        let what = format!("case {case_no}: B={b} KVH={kvh} G={grp} T={t} S={s} D={d} Dv={dv} causal={causal}");
        assert_close(&got.to_f64(), &want, 1e-12, &what);
    }
}

#[test]
fn flash_attention_causal_mask_cases() {
    let mut rng = StdRng::seed_from_u64(11);
    // T = S: the ordinary causal mask; row 0 sees only key 0, so its output is v[0]
    let q = rand_t(&mut rng, &[1, 5, 3]);
    let k = rand_t(&mut rng, &[1, 5, 3]);
    let v = rand_t(&mut rng, &[1, 5, 2]);
    let got = run(&flash_graph(&q, &k, &v, 0.5, true), &[("q", &q), ("k", &k), ("v", &v)])["out0"].to_f64();
    assert_close(&got[..2], &v.to_f64()[..2], 1e-15, "first row sees only the first key");
    assert_close(&got, &flash_loops(&q, &k, &v, 0.5, true).1, 1e-12, "T = S");
    // T = 1 sees everything: equal to the non-causal result
    let q1 = rand_t(&mut rng, &[1, 1, 3]);
    let ins = [("q", &q1), ("k", &k), ("v", &v)];
    let causal = run(&flash_graph(&q1, &k, &v, 0.5, true), &ins)["out0"].to_f64();
    let full = run(&flash_graph(&q1, &k, &v, 0.5, false), &ins)["out0"].to_f64();
    assert_close(&causal, &full, 1e-15, "decode step");
    // T > S: the first T − S queries see no key and give NaN
    let q7 = rand_t(&mut rng, &[1, 7, 3]);
    let ins = [("q", &q7), ("k", &k), ("v", &v)];
    let got = run(&flash_graph(&q7, &k, &v, 0.5, true), &ins)["out0"].to_f64();
    assert!(got[..4].iter().all(|x| x.is_nan()), "{got:?}");
    assert!(got[4..].iter().all(|x| x.is_finite()), "{got:?}");
    assert_close(&got, &flash_loops(&q7, &k, &v, 0.5, true).1, 1e-12, "T > S");
}

#[test]
fn flash_attention_broadcasts_batch_axes_like_matmul() {
    let mut rng = StdRng::seed_from_u64(12);
    let q = rand_t(&mut rng, &[3, 4, 2]);
    let k = rand_t(&mut rng, &[2, 1, 6, 2]);
    let v = rand_t(&mut rng, &[6, 3]);
    let got = &run(&flash_graph(&q, &k, &v, 0.7, true), &[("q", &q), ("k", &k), ("v", &v)])["out0"];
    let (shape, want) = flash_loops(&q, &k, &v, 0.7, true);
    assert_eq!(got.shape, vec![2, 3, 4, 3]);
    assert_eq!(shape, got.shape);
    assert_close(&got.to_f64(), &want, 1e-12, "broadcast batch");
}

#[test]
fn flash_attention_decomposition_on_symbolic_shapes() {
    let mut rng = StdRng::seed_from_u64(13);
    let (b, t, p) = (Dim::sym("B"), Dim::sym("T"), Dim::sym("P"));
    let s = p.clone() + t.clone(); // keys: P cached plus the T new ones
    let ins = [
        (
            "q",
            DType::F32,
            vec![b.clone(), 2.into(), 3.into(), t.clone(), 4.into()],
        ),
        (
            "k",
            DType::F32,
            vec![b.clone(), 2.into(), 1.into(), s.clone(), 4.into()],
        ),
        ("v", DType::F32, vec![b.clone(), 2.into(), 1.into(), s, 5.into()]),
        ("pos", DType::I64, vec![p]),
    ];
    for causal in [false, true] {
        let c = Composite::FlashAttention { scale: 0.5, causal };
        let (g, mut d) = both_forms(c, &ins[..3]);
        assert_eq!(g.ty(g.outputs()[0].1).to_string(), "f32[B, 2, 3, T, 5]");
        // `P` occurs only inside `P + T`: bind it through an extra input of shape [P]
        d.input("pos", DType::I64, ins[3].2.clone()).unwrap();
        for (tv, pv) in [(1usize, 0usize), (1, 5), (4, 0), (3, 2)] {
            let q = rand_t(&mut rng, &[2, 2, 3, tv, 4]);
            let k = rand_t(&mut rng, &[2, 2, 1, pv + tv, 4]);
            let v = rand_t(&mut rng, &[2, 2, 1, pv + tv, 5]);
            let pos = it(DType::I64, &[pv], vec![0; pv]);
            let got = run(&d, &[("q", &q), ("k", &k), ("v", &v), ("pos", &pos)])["out0"].to_f64();
            let want = flash_loops(&q, &k, &v, 0.5, causal).1;
            assert_close(
                &got,
                &want,
                1e-12,
                &format!("symbolic flash causal={causal} T={tv} P={pv}"),
            );
        }
    }
}

// ---------------------------------------------------------------- router

/// softmax, top-k (descending, ties to the lower index), renormalised; in loops.
fn router_loops(logits: &[f64], n: usize, e: usize, k: usize) -> (Vec<f64>, Vec<i64>) {
    let mut w = Vec::new();
    let mut idx = Vec::new();
    for r in 0..n {
        let row = &logits[r * e..(r + 1) * e];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let ex: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = ex.iter().sum();
        let p: Vec<f64> = ex.iter().map(|x| x / z).collect();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
        let top = &order[..k];
        let s: f64 = top.iter().map(|&i| p[i]).sum();
        w.extend(top.iter().map(|&i| p[i] / s));
        idx.extend(top.iter().map(|&i| i as i64));
    }
    (w, idx)
}

#[test]
fn moe_router_against_loops() {
    let mut rng = StdRng::seed_from_u64(20);
    for case_no in 0..80 {
        let n = rng.gen_range(1..=9);
        let e = rng.gen_range(1..=10);
        let k = rng.gen_range(1..=e);
        // integer logits from a small range make ties; they must go to the lower expert
        let logits: Vec<f64> = if rng.gen_bool(0.4) {
            (0..n * e).map(|_| rng.gen_range(-2..=2) as f64).collect()
        } else {
            (0..n * e).map(|_| rng.gen_range(-4.0..4.0)).collect()
        };
        let lt = ft(&[n, e], logits);
        let g = composite_graph(Composite::MoeRouter { k }, &[("logits", DType::F32, cd(&[n, e]))]).unwrap();
        let out = run(&g, &[("logits", &lt)]);
        let (w, idx) = router_loops(&lt.to_f64(), n, e, k);
        let what = format!("case {case_no}: N={n} E={e} k={k}");
        assert_eq!(out["out1"].dtype, DType::I64);
        assert_eq!(out["out1"].to_i64(), idx, "{what}: experts");
        assert_close(&out["out0"].to_f64(), &w, 1e-14, &what);
        for r in 0..n {
            let s: f64 = out["out0"].to_f64()[r * k..(r + 1) * k].iter().sum();
            assert!((s - 1.0).abs() < 1e-14, "{what}: weights of row {r} sum to {s}");
        }
    }
}

#[test]
fn moe_router_on_leading_axes() {
    let mut rng = StdRng::seed_from_u64(21);
    let lt = rand_t(&mut rng, &[2, 3, 5]);
    let g = composite_graph(Composite::MoeRouter { k: 2 }, &[("logits", DType::F32, cd(&[2, 3, 5]))]).unwrap();
    let out = run(&g, &[("logits", &lt)]);
    assert_eq!(out["out0"].shape, vec![2, 3, 2]);
    let (w, idx) = router_loops(&lt.to_f64(), 6, 5, 2);
    assert_eq!(out["out1"].to_i64(), idx);
    assert_close(&out["out0"].to_f64(), &w, 1e-14, "rank 3");
}

// -------------------------------------------------------------- dispatch

/// (xs, pos, counts) in loops: the (n, slot) rows stably sorted by expert.
fn dispatch_loops(x: &[f64], ids: &[i64], n: usize, k: usize, c: usize, e: usize) -> (Vec<f64>, Vec<i64>, Vec<i64>) {
    let mut rows: Vec<(i64, usize, usize)> = (0..n)
        .flat_map(|t| (0..k).map(move |s| (t, s)))
        .map(|(t, s)| (ids[t * k + s], t, s))
        .collect();
    rows.sort_by_key(|&(ex, t, s)| (ex, t, s));
    let mut xs = Vec::new();
    let mut pos = vec![0i64; n * k];
    for (r, &(_, t, s)) in rows.iter().enumerate() {
        xs.extend_from_slice(&x[t * c..(t + 1) * c]);
        pos[t * k + s] = r as i64;
    }
    let counts = (0..e as i64)
        .map(|ex| ids.iter().filter(|&&i| i == ex).count() as i64)
        .collect();
    (xs, pos, counts)
}

#[test]
fn moe_dispatch_against_loops() {
    let mut rng = StdRng::seed_from_u64(30);
    let mut empty_experts = 0;
    for case_no in 0..80 {
        let n = rng.gen_range(1..=8);
        let e = rng.gen_range(1..=7);
        let k = rng.gen_range(1..=e.min(3));
        let c = rng.gen_range(1..=4);
        let idt = if rng.gen_bool(0.5) { DType::I64 } else { DType::I32 };
        // either top-k-like (distinct experts per token) or arbitrary ids
        let distinct = rng.gen_bool(0.5);
        let ids: Vec<i64> = (0..n)
            .flat_map(|_| {
                if distinct {
                    let mut all: Vec<i64> = (0..e as i64).collect();
                    all.shuffle(&mut rng);
                    all[..k].to_vec()
                } else {
                    (0..k).map(|_| rng.gen_range(0..e as i64)).collect()
                }
            })
            .collect();
        let x = rand_t(&mut rng, &[n, c]);
        let idt_t = it(idt, &[n, k], ids.clone());
        let g = composite_graph(
            Composite::MoeDispatch { experts: e },
            &[("x", DType::F32, cd(&[n, c])), ("ids", idt, cd(&[n, k]))],
        )
        .unwrap();
        let out = run(&g, &[("x", &x), ("ids", &idt_t)]);
        let (xs, pos, counts) = dispatch_loops(&x.to_f64(), &ids, n, k, c, e);
        let what = format!("case {case_no}: N={n} E={e} k={k} C={c} ids {ids:?}");
        assert_eq!(out["out0"].shape, vec![n * k, c], "{what}");
        assert_eq!(out["out0"].to_f64(), xs, "{what}: xs");
        assert_eq!(out["out1"].to_i64(), pos, "{what}: pos");
        assert_eq!(out["out2"].to_i64(), counts, "{what}: counts");
        empty_experts += counts.iter().filter(|&&c| c == 0).count();
    }
    assert!(empty_experts > 0, "no case had an expert without rows");
}

#[test]
fn moe_dispatch_out_of_range_expert_is_a_run_time_error() {
    let g = composite_graph(
        Composite::MoeDispatch { experts: 3 },
        &[("x", DType::F32, cd(&[2, 2])), ("ids", DType::I64, cd(&[2, 1]))],
    )
    .unwrap();
    let x = ft(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
    for bad in [3, -1] {
        let ids = it(DType::I64, &[2, 1], vec![0, bad]);
        let e = try_run(&g, &[("x", &x), ("ids", &ids)]).unwrap_err().to_string();
        assert!(e.contains("moe_dispatch") && e.contains("out of range"), "{e}");
    }
}

// -------------------------------------------------------- grouped matmul

fn grouped_loops(xs: &[f64], counts: &[i64], w: &[f64], c: usize, o: usize, swiglu: bool) -> Vec<f64> {
    let m = xs.len() / c.max(1);
    let mut group = Vec::new();
    for (e, &n) in counts.iter().enumerate() {
        group.extend(std::iter::repeat_n(e, n as usize));
    }
    let mut out = Vec::new();
    for r in 0..m {
        let e = group[r];
        let y: Vec<f64> = (0..o)
            .map(|j| (0..c).map(|a| xs[r * c + a] * w[(e * c + a) * o + j]).sum())
            .collect();
        if swiglu {
            let i = o / 2;
            out.extend((0..i).map(|j| y[j] / (1.0 + (-y[j]).exp()) * y[i + j]));
        } else {
            out.extend(y);
        }
    }
    out
}

fn random_counts(rng: &mut StdRng, e: usize, m: usize) -> Vec<i64> {
    let mut counts = vec![0i64; e];
    for _ in 0..m {
        counts[rng.gen_range(0..e)] += 1;
    }
    counts
}

#[test]
fn grouped_matmul_against_loops() {
    let mut rng = StdRng::seed_from_u64(40);
    for case_no in 0..60 {
        let e = rng.gen_range(1..=6);
        let m = rng.gen_range(1..=12);
        let c = rng.gen_range(1..=4);
        let swiglu = rng.gen_bool(0.5);
        let o = if swiglu {
            2 * rng.gen_range(1..=3)
        } else {
            rng.gen_range(1..=5)
        };
        let counts = random_counts(&mut rng, e, m);
        let cdt = if rng.gen_bool(0.5) { DType::I64 } else { DType::I32 };
        let xs = rand_t(&mut rng, &[m, c]);
        let w = rand_t(&mut rng, &[e, c, o]);
        let ct = it(cdt, &[e], counts.clone());
        let g = composite_graph(
            Composite::GroupedMatmul { swiglu },
            &[
                ("xs", DType::F32, cd(&[m, c])),
                ("counts", cdt, cd(&[e])),
                ("w", DType::F32, cd(&[e, c, o])),
            ],
        )
        .unwrap();
        let got = &run(&g, &[("xs", &xs), ("counts", &ct), ("w", &w)])["out0"];
        let want = grouped_loops(&xs.to_f64(), &counts, &w.to_f64(), c, o, swiglu);
        let what = format!("case {case_no}: E={e} M={m} C={c} O={o} swiglu={swiglu} counts {counts:?}");
        assert_eq!(got.shape, vec![m, if swiglu { o / 2 } else { o }], "{what}");
        assert_close(&got.to_f64(), &want, 1e-13, &what);
    }
}

/// Rows past the sum of the counts belong to no group and give zeros (a routed exchange's padding); groups
/// reaching past the rows are cut.
#[test]
fn grouped_matmul_rows_past_the_groups_are_zeros() {
    for swiglu in [false, true] {
        let g = composite_graph(
            Composite::GroupedMatmul { swiglu },
            &[
                ("xs", DType::F32, cd(&[4, 1])),
                ("counts", DType::I64, cd(&[2])),
                ("w", DType::F32, cd(&[2, 1, 2])),
            ],
        )
        .unwrap();
        let xs = ft(&[4, 1], vec![1.0; 4]);
        let w = ft(&[2, 1, 2], vec![2.0, 5.0, 3.0, 7.0]);
        let silu = |x: f64| x / (1.0 + (-x).exp());
        let row = |e: usize| if e == 0 { [2.0, 5.0] } else { [3.0, 7.0] };
        let want = |groups: &[Option<usize>]| -> Vec<f64> {
            groups
                .iter()
                .flat_map(|e| match e {
                    None if swiglu => vec![0.0],
                    None => vec![0.0, 0.0],
                    Some(e) if swiglu => vec![silu(row(*e)[0]) * row(*e)[1]],
                    Some(e) => row(*e).to_vec(),
                })
                .collect()
        };
        let short = it(DType::I64, &[2], vec![1, 2]);
        let out = run(&g, &[("xs", &xs), ("counts", &short), ("w", &w)]);
        assert_close(
            &out["out0"].to_f64(),
            &want(&[Some(0), Some(1), Some(1), None]),
            1e-6,
            &format!("swiglu {swiglu}: one row past the groups"),
        );
        let none = it(DType::I64, &[2], vec![0, 0]);
        let out = run(&g, &[("xs", &xs), ("counts", &none), ("w", &w)]);
        assert_close(&out["out0"].to_f64(), &want(&[None; 4]), 0.0, "no rows in any group");
        // groups reaching past the rows are cut
        let long = it(DType::I64, &[2], vec![1, 9]);
        let out = run(&g, &[("xs", &xs), ("counts", &long), ("w", &w)]);
        assert_close(
            &out["out0"].to_f64(),
            &want(&[Some(0), Some(1), Some(1), Some(1)]),
            1e-6,
            &format!("swiglu {swiglu}: groups past the rows"),
        );
    }
}

// --------------------------------------------------------------- combine

#[test]
fn moe_combine_against_loops() {
    let mut rng = StdRng::seed_from_u64(50);
    for case_no in 0..60 {
        let n = rng.gen_range(1..=7);
        let k = rng.gen_range(1..=3);
        let m = rng.gen_range(1..=10);
        let c = rng.gen_range(1..=4);
        let pdt = if rng.gen_bool(0.5) { DType::I64 } else { DType::I32 };
        let pos: Vec<i64> = (0..n * k).map(|_| rng.gen_range(0..m as i64)).collect();
        let ys = rand_t(&mut rng, &[m, c]);
        let wt = rand_t(&mut rng, &[n, k]);
        let pt = it(pdt, &[n, k], pos.clone());
        let g = composite_graph(
            Composite::MoeCombine,
            &[
                ("ys", DType::F32, cd(&[m, c])),
                ("pos", pdt, cd(&[n, k])),
                ("weights", DType::F32, cd(&[n, k])),
            ],
        )
        .unwrap();
        let got = run(&g, &[("ys", &ys), ("pos", &pt), ("weights", &wt)])["out0"].to_f64();
        let (y, w) = (ys.to_f64(), wt.to_f64());
        let want: Vec<f64> = (0..n)
            .flat_map(|t| {
                let (y, w, pos) = (&y, &w, &pos);
                (0..c).map(move |a| (0..k).map(|s| w[t * k + s] * y[pos[t * k + s] as usize * c + a]).sum())
            })
            .collect();
        assert_close(&got, &want, 1e-14, &format!("case {case_no}: N={n} k={k} M={m} C={c}"));
    }
}

#[test]
fn grouped_matmul_wgrad_against_loops() {
    let mut rng = StdRng::seed_from_u64(51);
    for case_no in 0..40 {
        let e = rng.gen_range(1..=4);
        let m = rng.gen_range(1..=9);
        let (c, o) = (rng.gen_range(1..=4), rng.gen_range(1..=5));
        // group sizes summing to at most M (rows past them belong to no group), some empty
        let mut counts = vec![0i64; e];
        let mut left = rng.gen_range(0..=m) as i64;
        for slot in counts.iter_mut() {
            let take = rng.gen_range(0..=left);
            *slot = take;
            left -= take;
        }
        let cdt = if rng.gen_bool(0.5) { DType::I64 } else { DType::I32 };
        let xs = rand_t(&mut rng, &[m, c]);
        let dy = rand_t(&mut rng, &[m, o]);
        let ct = it(cdt, &[e], counts.clone());
        let g = composite_graph(
            Composite::GroupedMatmulWgrad,
            &[
                ("xs", DType::F32, cd(&[m, c])),
                ("counts", cdt, cd(&[e])),
                ("dy", DType::F32, cd(&[m, o])),
            ],
        )
        .unwrap();
        let got = run(&g, &[("xs", &xs), ("counts", &ct), ("dy", &dy)])["out0"].to_f64();
        let (x, d) = (xs.to_f64(), dy.to_f64());
        let mut want = vec![0.0; e * c * o];
        let mut start = 0usize;
        for (ex, &n) in counts.iter().enumerate() {
            for r in start..start + n as usize {
                for a in 0..c {
                    for b in 0..o {
                        want[(ex * c + a) * o + b] += x[r * c + a] * d[r * o + b];
                    }
                }
            }
            start += n as usize;
        }
        assert_close(
            &got,
            &want,
            1e-14,
            &format!("case {case_no}: E={e} M={m} counts {counts:?}"),
        );
    }
}

/// `flash_attention_grad` against the gradients written out by loops (softmax rows, then `dV = Pᵀ dO`,
/// `dS = P ⊙ (dO Vᵀ − rowsum) · scale`, `dQ = dS K`, `dK = dSᵀ Q`), causal with `S ≥ T`, and grouped-query keys
/// shared by two query heads (their gradients summed).
#[test]
fn flash_attention_grad_against_loops() {
    let mut rng = StdRng::seed_from_u64(52);
    for case_no in 0..20 {
        let (t, d, dv) = (rng.gen_range(1..=5), rng.gen_range(1..=4), rng.gen_range(1..=3));
        let s = t + rng.gen_range(0..=3);
        let causal = rng.gen_bool(0.5);
        let scale = 0.7;
        let hq = 2; // query heads per key head
        let q = rand_t(&mut rng, &[hq, t, d]);
        let k = rand_t(&mut rng, &[1, s, d]);
        let v = rand_t(&mut rng, &[1, s, dv]);
        let dout = rand_t(&mut rng, &[hq, t, dv]);
        let g = composite_graph(
            Composite::FlashAttentionGrad { scale, causal },
            &[
                ("q", DType::F32, cd(&[hq, t, d])),
                ("k", DType::F32, cd(&[1, s, d])),
                ("v", DType::F32, cd(&[1, s, dv])),
                ("do", DType::F32, cd(&[hq, t, dv])),
            ],
        )
        .unwrap();
        let out = run(&g, &[("q", &q), ("k", &k), ("v", &v), ("do", &dout)]);
        let (qv, kv, vv, ov) = (q.to_f64(), k.to_f64(), v.to_f64(), dout.to_f64());
        let (mut dq, mut dk, mut dvv) = (vec![0.0; hq * t * d], vec![0.0; s * d], vec![0.0; s * dv]);
        for h in 0..hq {
            for i in 0..t {
                let seen = |u: usize| !causal || u <= i + (s - t);
                let sc: Vec<f64> = (0..s)
                    .map(|u| (0..d).map(|a| qv[(h * t + i) * d + a] * kv[u * d + a]).sum::<f64>() * scale)
                    .collect();
                let mx = (0..s)
                    .filter(|&u| seen(u))
                    .map(|u| sc[u])
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = (0..s).filter(|&u| seen(u)).map(|u| (sc[u] - mx).exp()).sum();
                let p: Vec<f64> = (0..s)
                    .map(|u| if seen(u) { (sc[u] - mx).exp() / z } else { 0.0 })
                    .collect();
                let dp: Vec<f64> = (0..s)
                    .map(|u| (0..dv).map(|b| ov[(h * t + i) * dv + b] * vv[u * dv + b]).sum())
                    .collect();
                let delta: f64 = (0..s).map(|u| p[u] * dp[u]).sum();
                for u in 0..s {
                    let ds = p[u] * (dp[u] - delta) * scale;
                    for a in 0..d {
                        dq[(h * t + i) * d + a] += ds * kv[u * d + a];
                        dk[u * d + a] += ds * qv[(h * t + i) * d + a];
                    }
                    for b in 0..dv {
                        dvv[u * dv + b] += p[u] * ov[(h * t + i) * dv + b];
                    }
                }
            }
        }
        let what = format!("case {case_no}: T={t} S={s} D={d} causal {causal}");
        assert_close(&out["out0"].to_f64(), &dq, 1e-13, &format!("{what}: dq"));
        assert_close(&out["out1"].to_f64(), &dk, 1e-13, &format!("{what}: dk"));
        assert_close(&out["out2"].to_f64(), &dvv, 1e-13, &format!("{what}: dv"));
    }
}

// ------------------------------------------------------------- the chain

/// The dense definitional MoE from primitives (as `fulgur-models` writes it): softmax, top-k, renormalise,
/// every expert's SwiGLU on every token, weighted by the one-hot combine weights.
#[allow(clippy::too_many_arguments)]
fn dense_moe(g: &mut Graph, x: Value, wg: Value, w13: Value, w2: Value, e: usize, k: usize, i: usize) -> Value {
    let n = g.dims(x)[0].clone();
    let logits = g.linear(x, wg).unwrap(); // [N, E]
    let probs = g.softmax(logits, -1).unwrap();
    let (w, idx) = g.topk(probs, k, -1).unwrap();
    let wsum = g.sum(w, &[-1], true).unwrap();
    let w = g.div(w, wsum).unwrap();
    let oh = g.one_hot(idx, e, DType::F32).unwrap(); // [N, k, E]
    let w3 = g.reshape(w, vec![n.clone(), k.into(), 1.into()]).unwrap();
    let cw = g.mul(oh, w3).unwrap();
    let cw = g.sum(cw, &[1], false).unwrap(); // [N, E]
    let w13t = g.transpose(w13, -2, -1).unwrap();
    let hup = g.matmul(x, w13t).unwrap(); // [E, N, 2I]
    let gate = g.slice(hup, -1, 0, i).unwrap();
    let up = g.slice(hup, -1, i, 2 * i).unwrap();
    let act = g.silu(gate).unwrap();
    let act = g.mul(act, up).unwrap();
    let w2t = g.transpose(w2, -2, -1).unwrap();
    let y = g.matmul(act, w2t).unwrap(); // [E, N, C]
    let cwt = g.transpose(cw, 0, 1).unwrap();
    let cwt = g.reshape(cwt, vec![e.into(), n, 1.into()]).unwrap();
    let yw = g.mul(y, cwt).unwrap();
    g.sum(yw, &[0], false).unwrap()
}

/// The same MoE through the composites.
fn composite_moe(g: &mut Graph, x: Value, wg: Value, w13: Value, w2: Value, e: usize, k: usize) -> Value {
    let logits = g.linear(x, wg).unwrap();
    let (w, idx) = g.moe_router(logits, k).unwrap();
    let (xs, pos, counts) = g.moe_dispatch(x, idx, e).unwrap();
    let w13t = g.transpose(w13, -2, -1).unwrap(); // [E, C, 2I]
    let h = g.grouped_matmul(xs, counts, w13t, true).unwrap(); // [N·k, I]
    let w2t = g.transpose(w2, -2, -1).unwrap(); // [E, I, C]
    let ys = g.grouped_matmul(h, counts, w2t, false).unwrap(); // [N·k, C]
    g.moe_combine(ys, pos, w).unwrap()
}

#[test]
fn moe_chain_equals_the_dense_definitional_moe() {
    let mut rng = StdRng::seed_from_u64(60);
    let mut saw_empty = false;
    let mut saw_n1 = false;
    for case_no in 0..40 {
        let e = rng.gen_range(1..=8);
        let k = rng.gen_range(1..=e.min(3));
        let c = rng.gen_range(1..=5);
        let i = rng.gen_range(1..=4);
        let n = if case_no % 5 == 0 { 1 } else { rng.gen_range(1..=9) };
        saw_n1 |= n == 1;
        let build = |dense: bool| {
            let mut g = Graph::new("moe");
            let nd = Dim::sym("N");
            let x = g.input("x", DType::F32, vec![nd, c.into()]).unwrap();
            let wg = g.param("gate", DType::F32, cd(&[e, c])).unwrap();
            let w13 = g.param("gate_up", DType::F32, cd(&[e, 2 * i, c])).unwrap();
            let w2 = g.param("down", DType::F32, cd(&[e, c, i])).unwrap();
            let out = if dense {
                dense_moe(&mut g, x, wg, w13, w2, e, k, i)
            } else {
                composite_moe(&mut g, x, wg, w13, w2, e, k)
            };
            g.add_output("out", out).unwrap();
            g
        };
        let x = rand_t(&mut rng, &[n, c]);
        let wg = ft(&[e, c], randn(&mut rng, e * c).into_iter().map(|v| 3.0 * v).collect());
        let w13 = rand_t(&mut rng, &[e, 2 * i, c]);
        let w2 = rand_t(&mut rng, &[e, c, i]);
        let ins = [("x", &x), ("gate", &wg), ("gate_up", &w13), ("down", &w2)];
        let composite = build(false);
        let got = run(&composite, &ins);
        let want = run(&build(true), &ins)["out"].to_f64();
        let what = format!("case {case_no}: E={e} k={k} C={c} I={i} N={n}");
        assert_eq!(got["out"].shape, vec![n, c], "{what}");
        assert_close(&got["out"].to_f64(), &want, 1e-12, &what);
        // how many experts got no rows
        let mut probe = composite.clone();
        let counts = probe
            .nodes()
            .find(|(_, nd)| nd.op.name() == "moe_dispatch")
            .map(|(id, _)| Value::new(id, 2))
            .unwrap();
        probe.add_output("counts", counts).unwrap();
        let counts = run(&probe, &ins)["counts"].to_i64();
        assert_eq!(counts.iter().sum::<i64>(), (n * k) as i64, "{what}");
        saw_empty |= counts.contains(&0);
    }
    assert!(
        saw_empty && saw_n1,
        "cases must include N = 1 and experts without tokens"
    );
}

// ------------------------------------------------- symbolic decompositions

#[test]
fn moe_decompositions_on_symbolic_shapes() {
    let mut rng = StdRng::seed_from_u64(70);
    let (n, m, c) = (Dim::sym("N"), Dim::sym("M"), Dim::sym("C"));
    let (_, d) = both_forms(
        Composite::MoeRouter { k: 2 },
        &[("logits", DType::F32, vec![n.clone(), 5.into()])],
    );
    let lt = rand_t(&mut rng, &[3, 5]);
    let out = run(&d, &[("logits", &lt)]);
    let (w, idx) = router_loops(&lt.to_f64(), 3, 5, 2);
    assert_eq!(out["out1"].to_i64(), idx);
    assert_close(&out["out0"].to_f64(), &w, 1e-14, "symbolic router");

    let (g, d) = both_forms(
        Composite::MoeDispatch { experts: 4 },
        &[
            ("x", DType::F32, vec![n.clone(), c.clone()]),
            ("ids", DType::I32, vec![n.clone(), 2.into()]),
        ],
    );
    assert_eq!(g.ty(g.outputs()[0].1).to_string(), "f32[2*N, C]");
    let x = rand_t(&mut rng, &[3, 2]);
    let ids = it(DType::I32, &[3, 2], vec![3, 1, 1, 0, 3, 2]);
    let out = run(&d, &[("x", &x), ("ids", &ids)]);
    let (xs, pos, counts) = dispatch_loops(&x.to_f64(), &ids.to_i64(), 3, 2, 2, 4);
    assert_eq!(
        (out["out0"].to_f64(), out["out1"].to_i64(), out["out2"].to_i64()),
        (xs, pos, counts)
    );

    for swiglu in [false, true] {
        let o = Dim::from(2) * Dim::sym("I");
        let (_, mut d) = both_forms(
            Composite::GroupedMatmul { swiglu },
            &[
                ("xs", DType::F32, vec![m.clone(), c.clone()]),
                ("counts", DType::I64, vec![3.into()]),
                ("w", DType::F32, vec![3.into(), c.clone(), o]),
            ],
        );
        // `I` occurs only inside `2*I`: bind it through an extra input of shape [I]
        d.input("i", DType::F32, vec![Dim::sym("I")]).unwrap();
        let xs = rand_t(&mut rng, &[5, 2]);
        let w = rand_t(&mut rng, &[3, 2, 4]);
        let counts = it(DType::I64, &[3], vec![2, 0, 3]);
        let iv = ft(&[2], vec![0.0, 0.0]);
        let got = run(&d, &[("xs", &xs), ("counts", &counts), ("w", &w), ("i", &iv)])["out0"].to_f64();
        let want = grouped_loops(&xs.to_f64(), &[2, 0, 3], &w.to_f64(), 2, 4, swiglu);
        assert_close(&got, &want, 1e-13, &format!("symbolic grouped_matmul swiglu={swiglu}"));
    }

    let k = Dim::sym("K");
    let (g, _) = both_forms(
        Composite::MoeCombine,
        &[
            ("ys", DType::F32, vec![m, c.clone()]),
            ("pos", DType::I64, vec![n.clone(), k.clone()]),
            ("weights", DType::F32, vec![n, k]),
        ],
    );
    assert_eq!(g.ty(g.outputs()[0].1).to_string(), "f32[N, C]");
}

// ------------------------------------------------------------ typing errors

fn type_error(c: Composite, ins: &[In]) -> String {
    match composite_graph(c.clone(), ins) {
        Ok(_) => panic!("{} on {ins:?} should not type-check", c.name()),
        Err(e) => e.to_string(),
    }
}

fn f(dims: &[usize]) -> In {
    ("a", DType::F32, cd(dims))
}

/// Inputs named a, b, c, … for an error test.
fn named(v: Vec<In>) -> Vec<In> {
    const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
    v.into_iter()
        .enumerate()
        .map(|(i, (_, d, s))| (NAMES[i], d, s))
        .collect()
}

fn ity(dt: DType, dims: &[usize]) -> In {
    ("a", dt, cd(dims))
}

#[test]
fn typing_errors_name_the_shapes() {
    let la = |b| Composite::LightningAttention { block: b };
    let cases: Vec<(Composite, Vec<In>, &[&str])> = vec![
        (
            la(0),
            named(vec![f(&[2, 4, 3]), f(&[2, 4, 3]), f(&[2, 4, 3]), f(&[])]),
            &["block >= 1"],
        ),
        (
            la(4),
            named(vec![f(&[2, 4, 3]), f(&[2, 5, 3]), f(&[2, 4, 3]), f(&[2, 1, 1])]),
            &["f32[2, 4, 3]", "f32[2, 5, 3]"],
        ),
        (
            la(4),
            named(vec![f(&[2, 4, 3]), f(&[2, 4, 3]), f(&[2, 6, 3]), f(&[2, 1, 1])]),
            &["v", "f32[2, 6, 3]"],
        ),
        (
            la(4),
            named(vec![f(&[2, 4, 3]), f(&[2, 4, 3]), f(&[2, 4, 3]), f(&[3, 1, 1])]),
            &["lam", "[2, 1, 1]", "f32[3, 1, 1]"],
        ),
        (
            la(4),
            named(vec![f(&[2, 4, 3]), f(&[2, 4, 3]), f(&[2, 4, 3]), f(&[2])]),
            &["lam", "f32[2]"],
        ),
        (
            la(4),
            named(vec![f(&[4, 3]), f(&[4, 3]), f(&[4, 3]), f(&[1, 1, 1])]),
            &["lam", "f32[1, 1, 1]"],
        ),
        (
            la(4),
            named(vec![f(&[4]), f(&[4]), f(&[4]), f(&[])]),
            &["rank >= 2", "f32[4]"],
        ),
        (
            la(4),
            named(vec![
                f(&[2, 4, 3]),
                f(&[2, 4, 3]),
                f(&[2, 4, 3]),
                ity(DType::BF16, &[2, 1, 1]),
            ]),
            &["one float dtype", "bf16[2, 1, 1]"],
        ),
        (
            Composite::FlashAttention {
                scale: 1.0,
                causal: true,
            },
            named(vec![f(&[2, 4, 3]), f(&[2, 5, 4]), f(&[2, 5, 3])]),
            &["head dim", "`3` vs `4`"],
        ),
        (
            Composite::FlashAttention {
                scale: 1.0,
                causal: true,
            },
            named(vec![f(&[2, 4, 3]), f(&[2, 5, 3]), f(&[2, 6, 3])]),
            &["length S", "`5` vs `6`"],
        ),
        (
            Composite::FlashAttention {
                scale: 1.0,
                causal: false,
            },
            named(vec![f(&[2, 4, 3]), f(&[3, 5, 3]), f(&[1, 5, 3])]),
            &["batch", "f32[2, 4, 3]", "f32[3, 5, 3]"],
        ),
        (
            Composite::FlashAttention {
                scale: 1.0,
                causal: false,
            },
            named(vec![
                ity(DType::I64, &[4, 3]),
                ity(DType::I64, &[5, 3]),
                ity(DType::I64, &[5, 3]),
            ]),
            &["float", "i64[4, 3]"],
        ),
        (
            Composite::MoeRouter { k: 3 },
            named(vec![f(&[4, 2])]),
            &["k=3", "f32[4, 2]"],
        ),
        (Composite::MoeRouter { k: 0 }, named(vec![f(&[4, 2])]), &["k >= 1"]),
        (
            Composite::MoeRouter { k: 1 },
            named(vec![ity(DType::I64, &[4, 2])]),
            &["float", "i64[4, 2]"],
        ),
        (
            Composite::MoeDispatch { experts: 4 },
            named(vec![f(&[4, 3]), ity(DType::I64, &[5, 2])]),
            &["f32[4, 3]", "i64[5, 2]"],
        ),
        (
            Composite::MoeDispatch { experts: 4 },
            named(vec![f(&[4, 3]), f(&[4, 2])]),
            &["integer", "f32[4, 2]"],
        ),
        (
            Composite::MoeDispatch { experts: 4 },
            named(vec![f(&[4, 3, 1]), ity(DType::I64, &[4, 2])]),
            &["[N, C]", "f32[4, 3, 1]"],
        ),
        (
            Composite::MoeDispatch { experts: 0 },
            named(vec![f(&[4, 3]), ity(DType::I64, &[4, 2])]),
            &["experts >= 1"],
        ),
        (
            Composite::GroupedMatmul { swiglu: false },
            named(vec![f(&[6, 3]), ity(DType::I64, &[2]), f(&[2, 4, 5])]),
            &["inner", "f32[6, 3]", "f32[2, 4, 5]"],
        ),
        (
            Composite::GroupedMatmul { swiglu: false },
            named(vec![f(&[6, 3]), ity(DType::I64, &[3]), f(&[2, 3, 5])]),
            &["one weight per group", "i64[3]", "f32[2, 3, 5]"],
        ),
        (
            Composite::GroupedMatmul { swiglu: true },
            named(vec![f(&[6, 3]), ity(DType::I64, &[2]), f(&[2, 3, 5])]),
            &["even", "f32[2, 3, 5]"],
        ),
        (
            Composite::GroupedMatmul { swiglu: false },
            named(vec![f(&[6, 3]), f(&[2]), f(&[2, 3, 5])]),
            &["integer", "f32[2]"],
        ),
        (
            Composite::GroupedMatmul { swiglu: false },
            named(vec![f(&[6, 3]), ity(DType::I64, &[2]), f(&[3, 5])]),
            &["[E, C, O]", "f32[3, 5]"],
        ),
        (
            Composite::MoeCombine,
            named(vec![f(&[6, 3]), ity(DType::I64, &[4, 2]), f(&[4, 3])]),
            &["i64[4, 2]", "f32[4, 3]"],
        ),
        (
            Composite::MoeCombine,
            named(vec![f(&[6, 3]), f(&[4, 2]), f(&[4, 2])]),
            &["integer", "f32[4, 2]"],
        ),
        (
            Composite::MoeCombine,
            named(vec![f(&[6]), ity(DType::I64, &[4, 2]), f(&[4, 2])]),
            &["[M, C]", "f32[6]"],
        ),
    ];
    for (c, ins, needles) in cases {
        let e = type_error(c.clone(), &ins);
        assert!(
            e.contains(&format!("({})", c.name())),
            "error does not name the op: {e}"
        );
        for nd in needles {
            assert!(e.contains(nd), "{} error `{e}` lacks `{nd}`", c.name());
        }
    }
    // a symbolic output width must be provably even
    let e = type_error(
        Composite::GroupedMatmul { swiglu: true },
        &named(vec![
            ("", DType::F32, vec![Dim::sym("M"), 3.into()]),
            ity(DType::I64, &[2]),
            ("", DType::F32, vec![2.into(), 3.into(), Dim::sym("O")]),
        ]),
    );
    assert!(e.contains("f32[2, 3, O]"), "{e}");
    // wrong input counts
    let mut g = Graph::new("t");
    let x = g.input("x", DType::F32, cd(&[2, 2])).unwrap();
    let e = g
        .op(Op::Composite(Composite::MoeCombine), &[x, x])
        .unwrap_err()
        .to_string();
    assert!(e.contains("expects 3 input(s), got 2"), "{e}");
    let e = Composite::MoeCombine.decompose(&mut g, &[x]).unwrap_err().to_string();
    assert!(e.contains("expects 3 input(s), got 1"), "{e}");
}

// ------------------------------------------------------------ text and JSON

#[test]
fn composites_round_trip_through_text_and_json() {
    let src = r#"graph moe {
  %0 = input "q" : f32[B, 4, T, 8]
  %1 = input "lam" : f32[4, 1, 1]
  %2 = lightning_attention[block=256](%0, %0, %0, %1) : f32[B, 4, T, 8]
  %3 = input "k" : f32[B, 2, 1, S, 8]
  %4 = input "q5" : f32[B, 2, 2, T, 8]
  %5 = flash_attention[scale=0.125, causal=true](%4, %3, %3) : f32[B, 2, 2, T, 8]
  %6 = input "x" : f32[N, 16]
  %7 = param "gate" : f32[16, 4]
  %8 = matmul(%6, %7) : f32[N, 4]
  %9 = moe_router[k=2](%8) : (f32[N, 2], i64[N, 2])
  %10 = moe_dispatch[experts=4](%6, %9#1) : (f32[2*N, 16], i64[N, 2], i64[4])
  %11 = param "w13" : f32[4, 16, 6]
  %12 = grouped_matmul[swiglu=true](%10#0, %10#2, %11) : f32[2*N, 3]
  %13 = param "w2" : f32[4, 3, 16]
  %14 = grouped_matmul[swiglu=false](%12, %10#2, %13) : f32[2*N, 16]
  %15 = moe_combine(%14, %10#1, %9#0) : f32[N, 16]
  output "o" = %2
  output "a" = %5
  output "m" = %15
}
"#;
    let g = text::parse(src).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(text::print(&g), src);
    let back = json::from_json(&json::to_json(&g)).unwrap();
    assert_eq!(text::print(&back), src);
    // JSON names the composites like the text format
    let j = json::to_json(&g);
    for name in [
        "lightning_attention",
        "flash_attention",
        "moe_router",
        "moe_dispatch",
        "grouped_matmul",
        "moe_combine",
    ] {
        assert!(
            j.contains(&format!("\"kind\":\"{name}\"")) || j.contains(&format!("\"kind\": \"{name}\"")),
            "{name} in {j}"
        );
    }
    // attribute errors name the attribute
    let e = text::parse("graph g {\n  %0 = input \"x\" : f32[2, 2]\n  %1 = moe_router(%0)\n}\n").unwrap_err();
    assert!(e.to_string().contains("`moe_router` needs attribute `k`"), "{e}");
    let e =
        text::parse("graph g {\n  %0 = input \"x\" : f32[2, 2]\n  %1 = moe_combine[k=1](%0, %0, %0)\n}\n").unwrap_err();
    assert!(e.to_string().contains("`moe_combine` has no attribute `k`"), "{e}");
}

#[test]
fn every_composite_has_a_name_attrs_and_a_decomposition_with_its_output_count() {
    let all = [
        Composite::Softmax { axis: -1 },
        Composite::LogSoftmax { axis: 0 },
        Composite::RmsNorm { eps: 1e-5 },
        Composite::LightningAttention { block: 4 },
        Composite::LightningLayer {
            block: 4,
            heads: 2,
            eps: 1e-6,
        },
        Composite::FlashAttention {
            scale: 0.5,
            causal: false,
        },
        Composite::FlashAttentionRope {
            scale: 0.5,
            causal: true,
            rotary: 2,
        },
        Composite::MoeRouter { k: 1 },
        Composite::MoeDispatch { experts: 2 },
        Composite::GroupedMatmul { swiglu: true },
        Composite::MoeCombine,
        Composite::FlashAttentionGrad {
            scale: 0.5,
            causal: true,
        },
        Composite::GroupedMatmulWgrad,
        Composite::Fused {
            body: fulgur_ir::op::FusedBody::parse(
                "graph f {\n  %0 = input \"arg0\" : f32[N]\n  %1 = exp(%0)\n  output \"out\" = %1\n}",
            )
            .unwrap(),
        },
        Composite::AllToAll {
            axis: 1,
            mesh: vec![],
            over: 0,
        },
        Composite::AllToAllStart {
            axis: -1,
            overlap_flops: fulgur_ir::Dim::from(0usize),
            mesh: vec![2, 3],
            over: 1,
        },
        Composite::CollectiveWait,
        Composite::AllReduce { mesh: vec![], over: 0 },
        Composite::AllGather {
            axis: 1,
            mesh: vec![2, 3],
            over: 1,
        },
        Composite::ReduceScatter {
            axis: -1,
            mesh: vec![4],
            over: 0,
        },
        Composite::SendRecv {
            shift: -1,
            mesh: vec![2, 2],
            over: 1,
        },
        Composite::ShardSlice {
            axis: 2,
            mesh: vec![],
            over: 0,
        },
        Composite::PerRank {
            op: Box::new(Op::ScatterAdd { axis: 0 }),
        },
        Composite::OnRank {
            op: Box::new(Op::Composite(Composite::AllGather {
                axis: 1,
                mesh: vec![2, 2],
                over: 1,
            })),
            rank: 3,
        },
        Composite::FlashAttentionLse {
            scale: 0.5,
            causal: true,
        },
        Composite::dispatch(vec![2, 2], 1),
        Composite::AllToAllCombine {
            mesh: vec![],
            over: 0,
            overlap_flops: Dim::from(8usize),
        },
    ];
    let names: Vec<&str> = all.iter().map(|c| c.name()).collect();
    assert_eq!(names, Composite::NAMES.to_vec());
    for c in &all {
        let attrs: Vec<(String, fulgur_ir::AttrValue)> =
            c.attrs().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(Op::from_parts(c.name(), &attrs).unwrap(), Op::Composite(c.clone()));
        assert!(Op::all_names().contains(&c.name()));
    }
}

// ------------------------------------------------------------ lightning_layer

/// The definitional MiniMax lightning block (§2a steps 1–8) in primitives, masked quadratic form.
#[allow(clippy::too_many_arguments)] // mirrors the composite's inputs one by one
fn lightning_layer_reference(
    g: &mut Graph,
    heads: usize,
    d: usize,
    eps: f64,
    qkv: Value,
    lam: Value,
    w: Value,
    gate: Value,
) -> Value {
    let dims = g.dims(qkv).to_vec();
    let (b, t) = (dims[0].clone(), dims[1].clone());
    let x = g.silu(qkv).unwrap();
    let x = g
        .reshape(x, vec![b.clone(), t.clone(), Dim::from(heads), Dim::from(3 * d)])
        .unwrap();
    let x = g.permute(x, &[0, 2, 1, 3]).unwrap();
    let q = g.slice(x, -1, 0, d).unwrap();
    let k = g.slice(x, -1, d, 2 * d).unwrap();
    let v = g.slice(x, -1, 2 * d, 3 * d).unwrap();
    let kt = g.transpose(k, -2, -1).unwrap();
    let s = g.matmul(q, kt).unwrap();
    let ti = g.iota(DType::F32, vec![t.clone(), t.clone()], 0).unwrap();
    let ui = g.iota(DType::F32, vec![t.clone(), t.clone()], 1).unwrap();
    let dist = g.sub(ti, ui).unwrap();
    let causal = g.compare(fulgur_ir::CmpOp::Ge, ti, ui).unwrap();
    let ld = g.mul(lam, dist).unwrap();
    let nld = g.neg(ld).unwrap();
    let decay = g.exp(nld).unwrap();
    let zero = g.scalar(0.0, DType::F32).unwrap();
    let m = g.select(causal, decay, zero).unwrap();
    let sm = g.mul(s, m).unwrap();
    let o = g.matmul(sm, v).unwrap();
    let o = g.permute(o, &[0, 2, 1, 3]).unwrap();
    let o = g.reshape(o, vec![b, t, Dim::from(heads * d)]).unwrap();
    let y = g.rms_norm(o, w, eps).unwrap();
    let sg = g.sigmoid(gate).unwrap();
    g.mul(sg, y).unwrap()
}

#[test]
fn lightning_layer_matches_the_definitional_block() {
    let mut seed = 17u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    for (b, t, heads, d, block) in [(1, 1, 1, 2, 4), (2, 7, 2, 3, 3), (1, 16, 3, 2, 4), (2, 9, 2, 4, 16)] {
        let mut g = Graph::new("layer");
        let (bd, td) = (Dim::sym("B"), Dim::sym("T"));
        let qkv = g
            .input(
                "qkv",
                DType::F32,
                vec![bd.clone(), td.clone(), Dim::from(3 * heads * d)],
            )
            .unwrap();
        let lam = g
            .input("lam", DType::F32, vec![Dim::from(heads), Dim::from(1), Dim::from(1)])
            .unwrap();
        let w = g.input("w", DType::F32, vec![Dim::from(heads * d)]).unwrap();
        let gate = g.input("gate", DType::F32, vec![bd, td, Dim::from(heads * d)]).unwrap();
        let want = lightning_layer_reference(&mut g, heads, d, 1e-6, qkv, lam, w, gate);
        let got = g
            .op1(
                Op::Composite(Composite::LightningLayer {
                    block,
                    heads,
                    eps: 1e-6,
                }),
                &[qkv, lam, w, gate],
            )
            .unwrap();
        g.add_output("want", want).unwrap();
        g.add_output("got", got).unwrap();
        let mut inputs = std::collections::HashMap::new();
        let mut t_of = |shape: Vec<usize>, scale: f64, off: f64| {
            let n: usize = shape.iter().product();
            Tensor::from_f64(DType::F32, shape, (0..n).map(|_| rnd() * scale + off).collect())
        };
        inputs.insert("qkv".to_string(), t_of(vec![b, t, 3 * heads * d], 1.0, 0.0));
        inputs.insert("lam".to_string(), t_of(vec![heads, 1, 1], 0.4, 0.5));
        inputs.insert("w".to_string(), t_of(vec![heads * d], 0.2, 1.0));
        inputs.insert("gate".to_string(), t_of(vec![b, t, heads * d], 1.0, 0.0));
        let out = Interpreter::new(Precision::F64).run(&g, &inputs).unwrap();
        let e = out["got"].rel_l2(&out["want"]);
        assert!(e < 1e-12, "b={b} t={t} heads={heads} d={d} block={block}: {e}");
    }
}

// ------------------------------------------------------------ flash_attention_rope

#[test]
fn flash_attention_rope_rotates_then_attends() {
    let mut seed = 5u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    // (T, D, rotary, causal): full and partial rotary, grouped heads
    for (t, d, r, causal) in [
        (1usize, 4usize, 4usize, true),
        (5, 4, 2, true),
        (6, 8, 8, false),
        (7, 6, 4, true),
    ] {
        let mut g = Graph::new("rope");
        let td = Dim::sym("T");
        let q = g
            .input(
                "q",
                DType::F32,
                vec![Dim::from(2), Dim::from(3), td.clone(), Dim::from(d)],
            )
            .unwrap();
        let k = g
            .input(
                "k",
                DType::F32,
                vec![Dim::from(2), Dim::from(1), td.clone(), Dim::from(d)],
            )
            .unwrap();
        let v = g
            .input(
                "v",
                DType::F32,
                vec![Dim::from(2), Dim::from(1), td.clone(), Dim::from(d)],
            )
            .unwrap();
        let cos = g.input("cos", DType::F32, vec![td.clone(), Dim::from(r)]).unwrap();
        let sin = g.input("sin", DType::F32, vec![td, Dim::from(r)]).unwrap();
        let got = g
            .op1(
                Op::Composite(Composite::FlashAttentionRope {
                    scale: 0.7,
                    causal,
                    rotary: r,
                }),
                &[q, k, v, cos, sin],
            )
            .unwrap();
        g.add_output("got", got).unwrap();
        let n = |s: &[usize]| s.iter().product::<usize>();
        let mut mk = |s: Vec<usize>| Tensor::from_f64(DType::F32, s.clone(), (0..n(&s)).map(|_| rnd()).collect());
        let inputs: HashMap<String, Tensor> = [
            ("q", mk(vec![2, 3, t, d])),
            ("k", mk(vec![2, 1, t, d])),
            ("v", mk(vec![2, 1, t, d])),
            ("cos", mk(vec![t, r])),
            ("sin", mk(vec![t, r])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let out = Interpreter::new(Precision::F64).run(&g, &inputs).unwrap();
        // hand loops: rotate, then causal softmax attention with grouped heads
        let (qv, kv, vv, cv, sv) = (
            inputs["q"].to_f64(),
            inputs["k"].to_f64(),
            inputs["v"].to_f64(),
            inputs["cos"].to_f64(),
            inputs["sin"].to_f64(),
        );
        let rot = |x: &[f64], pos: usize| -> Vec<f64> {
            let h = r / 2;
            (0..d)
                .map(|i| {
                    if i >= r {
                        x[i]
                    } else {
                        let partner = if i < h { -x[i + h] } else { x[i - h] };
                        x[i] * cv[pos * r + i] + partner * sv[pos * r + i]
                    }
                })
                .collect()
        };
        let got = out["got"].to_f64();
        for b in 0..2 {
            for hq in 0..3 {
                for ti in 0..t {
                    let qrow = rot(&qv[((b * 3 + hq) * t + ti) * d..][..d], ti);
                    let visible: Vec<usize> = (0..t).filter(|&u| !causal || u <= ti).collect();
                    let scores: Vec<f64> = visible
                        .iter()
                        .map(|&u| {
                            let krow = rot(&kv[(b * t + u) * d..][..d], u);
                            0.7 * qrow.iter().zip(&krow).map(|(a, c)| a * c).sum::<f64>()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    for j in 0..d {
                        let want: f64 = visible
                            .iter()
                            .zip(&scores)
                            .map(|(&u, s)| (s - m).exp() / z * vv[(b * t + u) * d + j])
                            .sum();
                        let have = got[((b * 3 + hq) * t + ti) * d + j];
                        assert!((want - have).abs() < 1e-12, "t={t} d={d} r={r}: {want} vs {have}");
                    }
                }
            }
        }
    }
    // q and k at different lengths are refused
    let mut g = Graph::new("bad");
    let q = g.input("q", DType::F32, vec![Dim::from(1), Dim::from(4)]).unwrap();
    let k = g.input("k", DType::F32, vec![Dim::from(3), Dim::from(4)]).unwrap();
    let c = g.input("c", DType::F32, vec![Dim::from(1), Dim::from(4)]).unwrap();
    let e = g
        .op1(
            Op::Composite(Composite::FlashAttentionRope {
                scale: 1.0,
                causal: false,
                rotary: 4,
            }),
            &[q, k, k, c, c],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("one length"), "{e}");
}

// ------------------------------------------------------------ per_rank

/// `per_rank[op]` against the op applied to each slice of the leading axis by hand: one output
/// (`scatter_add`), two (`topk`), three (`moe_dispatch`); its text round trip; its typing errors.
#[test]
fn per_rank_applies_the_op_to_each_slice() {
    use fulgur_ir::{Interpreter, Precision, Tensor};
    let src = r#"graph g {
  %0 = input "data" : f32[3, 5, 2]
  %1 = input "idx" : i64[3, 4]
  %2 = input "upd" : f32[3, 4, 2]
  %3 = input "x" : f32[3, 4, 6]
  %4 = input "e" : i64[3, 4, 2]
  %5 = per_rank[op="scatter_add", axis=0](%0, %1, %2) : f32[3, 5, 2]
  %6 = per_rank[op="topk", k=2, axis=-1](%3) : (f32[3, 4, 2], i64[3, 4, 2])
  %7 = per_rank[op="moe_dispatch", experts=3](%3, %4) : (f32[3, 8, 6], i64[3, 4, 2], i64[3, 3])
  output "s" = %5
  output "tv" = %6#0
  output "ti" = %6#1
  output "xs" = %7#0
  output "pos" = %7#1
  output "counts" = %7#2
}
"#;
    let g = text::parse(src).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(text::print(&g), src);
    let f = |n: usize, k: u64| -> Vec<f64> { (0..n).map(|i| ((i as u64 * 7 + k * 13) % 11) as f64 - 5.0).collect() };
    let feed: HashMap<String, Tensor> = [
        (
            "data".to_string(),
            Tensor::from_f64(DType::F32, vec![3, 5, 2], f(30, 1)),
        ),
        (
            "idx".to_string(),
            Tensor::from_i64(DType::I64, vec![3, 4], (0..12).map(|i| (i * 3) % 5).collect()),
        ),
        ("upd".to_string(), Tensor::from_f64(DType::F32, vec![3, 4, 2], f(24, 2))),
        ("x".to_string(), Tensor::from_f64(DType::F32, vec![3, 4, 6], f(72, 3))),
        (
            "e".to_string(),
            Tensor::from_i64(
                DType::I64,
                vec![3, 4, 2],
                (0..24).map(|i| (i * 2 + i / 5) % 3).collect(),
            ),
        ),
    ]
    .into();
    let interp = Interpreter::new(Precision::F64);
    let got = interp.run(&g, &feed).unwrap();
    // each slice by hand, through the unwrapped ops
    let slice = |t: &Tensor, r: usize| {
        let n: usize = t.shape[1..].iter().product();
        if t.dtype.is_float() {
            Tensor::from_f64(t.dtype, t.shape[1..].to_vec(), t.to_f64()[r * n..(r + 1) * n].to_vec())
        } else {
            Tensor::from_i64(t.dtype, t.shape[1..].to_vec(), t.to_i64()[r * n..(r + 1) * n].to_vec())
        }
    };
    for r in 0..3 {
        let one = r#"graph one {
  %0 = input "data" : f32[5, 2]
  %1 = input "idx" : i64[4]
  %2 = input "upd" : f32[4, 2]
  %3 = input "x" : f32[4, 6]
  %4 = input "e" : i64[4, 2]
  %5 = scatter_add[axis=0](%0, %1, %2) : f32[5, 2]
  %6 = topk[k=2, axis=-1](%3) : (f32[4, 2], i64[4, 2])
  %7 = moe_dispatch[experts=3](%3, %4) : (f32[8, 6], i64[4, 2], i64[3])
  output "s" = %5
  output "tv" = %6#0
  output "ti" = %6#1
  output "xs" = %7#0
  output "pos" = %7#1
  output "counts" = %7#2
}
"#;
        let g1 = text::parse(one).unwrap();
        let feed1: HashMap<String, Tensor> = feed.iter().map(|(k, v)| (k.clone(), slice(v, r))).collect();
        let want = interp.run(&g1, &feed1).unwrap();
        for (name, w) in &want {
            assert_eq!(slice(&got[name], r).to_f64(), w.to_f64(), "{name} of slice {r}");
        }
    }
    let e = text::parse("graph g {\n  %0 = input \"x\" : f32[3, 4]\n  %1 = input \"y\" : f32[2, 4]\n  %2 = per_rank[op=\"add\"](%0, %1)\n}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`per_rank` needs inputs with one common leading axis"),
        "{e}"
    );
    let e =
        text::parse("graph g {\n  %0 = input \"x\" : f32[3, 4]\n  %1 = per_rank[op=\"topk\", k=9, axis=-1](%0)\n}\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("`per_rank` of"), "{e}");
    let e = text::parse("graph g {\n  %0 = input \"x\" : f32[3, 4]\n  %1 = per_rank[op=\"per_rank\"](%0)\n}\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("per_rank"), "{e}");
}

// ------------------------------------------------------------ on_rank

/// `on_rank`: typed as the rank's slice of the wrapped collective, round-trips through the text, refuses what is
/// not a collective with a mesh or a rank outside it, and needs a transport to run.
#[test]
fn on_rank_is_a_rank_view_of_a_collective() {
    use fulgur_ir::{Interpreter, Tensor};
    let src = r#"graph g {
  %0 = input "x" : f32[3, 4]
  %1 = on_rank[op="all_gather", rank=1, axis=1, mesh=[2, 2], over=0](%0) : f32[6, 4]
  %2 = on_rank[op="reduce_scatter", rank=3, axis=-1, mesh=[4], over=0](%0) : f32[3, 1]
  %3 = on_rank[op="all_reduce", rank=0, mesh=[2], over=0](%0) : f32[3, 4]
  output "y" = %1
  output "z" = %2
  output "w" = %3
}
"#;
    let g = text::parse(src).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(text::print(&g), src);
    let bad = |body: &str| {
        text::parse(&format!(
            "graph g {{\n  %0 = input \"x\" : f32[3, 4]\n  %1 = {body}(%0)\n}}\n"
        ))
        .unwrap_err()
        .to_string()
    };
    let e = bad(r#"on_rank[op="exp", rank=0]"#);
    assert!(e.contains("`on_rank` wraps a collective with its `mesh`"), "{e}");
    let e = bad(r#"on_rank[op="all_reduce", rank=0]"#);
    assert!(e.contains("`on_rank` wraps a collective with its `mesh`"), "{e}");
    let e = bad(r#"on_rank[op="all_reduce", rank=2, mesh=[2], over=0]"#);
    assert!(e.contains("`on_rank`: rank 2 of a mesh of 2 ranks"), "{e}");
    let feed: HashMap<String, Tensor> = [("x".to_string(), Tensor::from_f32(vec![3, 4], vec![1.0; 12]))].into();
    let e = Interpreter::default().run(&g, &feed).unwrap_err().to_string();
    assert!(e.contains("needs a collective transport"), "{e}");
}

// ------------------------------------------------------------ flash_attention_lse

/// `flash_attention_lse`: its output is `flash_attention`'s, its log-sum-exp is the masked scores' by a loop,
/// and two halves of the keys merged by their log-sum-exps give the whole (what ring attention relies on).
#[test]
fn flash_attention_lse_merges_halves_of_the_keys_exactly() {
    let (t, s, d) = (5usize, 6usize, 3usize);
    let f = |n: usize, k: u64| -> Vec<f64> {
        (0..n)
            .map(|i| (((i as u64 * 37 + k * 11) % 23) as f64 - 11.0) / 7.0)
            .collect()
    };
    let (qv, kv, vv) = (f(t * d, 1), f(s * d, 2), f(s * d, 3));
    let scale = 0.7;
    for causal in [false, true] {
        let mut g = Graph::new("lse");
        let q = g.input("q", DType::F32, vec![Dim::from(t), Dim::from(d)]).unwrap();
        let k = g.input("k", DType::F32, vec![Dim::from(s), Dim::from(d)]).unwrap();
        let v = g.input("v", DType::F32, vec![Dim::from(s), Dim::from(d)]).unwrap();
        let r = g
            .op(
                Op::Composite(Composite::FlashAttentionLse { scale, causal }),
                &[q, k, v],
            )
            .unwrap();
        let whole = g
            .op(Op::Composite(Composite::FlashAttention { scale, causal }), &[q, k, v])
            .unwrap()[0];
        g.add_output("o", r[0]).unwrap();
        g.add_output("lse", r[1]).unwrap();
        g.add_output("whole", whole).unwrap();
        // the keys in two halves (non-causal), merged
        if !causal {
            let h = s / 2;
            let k1 = g.slice(k, 0, 0, h).unwrap();
            let k2 = g.slice(k, 0, h, s).unwrap();
            let v1 = g.slice(v, 0, 0, h).unwrap();
            let v2 = g.slice(v, 0, h, s).unwrap();
            let op = Op::Composite(Composite::FlashAttentionLse { scale, causal: false });
            let a = g.op(op.clone(), &[q, k1, v1]).unwrap();
            let b = g.op(op, &[q, k2, v2]).unwrap();
            let mx = g.maximum(a[1], b[1]).unwrap();
            let da = g.sub(a[1], mx).unwrap();
            let ea = g.exp(da).unwrap();
            let db = g.sub(b[1], mx).unwrap();
            let eb = g.exp(db).unwrap();
            let sum = g.add(ea, eb).unwrap();
            let ls = g.log(sum).unwrap();
            let l = g.add(mx, ls).unwrap();
            let wa = g.sub(a[1], l).unwrap();
            let wa = g.exp(wa).unwrap();
            let wb = g.sub(b[1], l).unwrap();
            let wb = g.exp(wb).unwrap();
            let oa = g.mul(a[0], wa).unwrap();
            let ob = g.mul(b[0], wb).unwrap();
            let o = g.add(oa, ob).unwrap();
            g.add_output("merged", o).unwrap();
            g.add_output("merged_lse", l).unwrap();
        }
        let feed: HashMap<String, Tensor> = [
            ("q".to_string(), Tensor::from_f64(DType::F32, vec![t, d], qv.clone())),
            ("k".to_string(), Tensor::from_f64(DType::F32, vec![s, d], kv.clone())),
            ("v".to_string(), Tensor::from_f64(DType::F32, vec![s, d], vv.clone())),
        ]
        .into();
        let out = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
        assert_eq!(out["lse"].shape, vec![t, 1]);
        // the inputs as stored (rounded to f32)
        let (qv, kv) = (feed["q"].to_f64(), feed["k"].to_f64());
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(close(&out["o"].to_f64(), &out["whole"].to_f64()));
        // the log-sum-exp by a loop: keys u ≤ i + (S − T) when causal
        let lse = out["lse"].to_f64();
        for i in 0..t {
            let mut terms = Vec::new();
            for u in 0..s {
                if causal && u > i + (s - t) {
                    continue;
                }
                let dot: f64 = (0..d).map(|j| qv[i * d + j] * kv[u * d + j]).sum();
                terms.push(dot * scale);
            }
            let m = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let want = m + terms.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            assert!(
                (lse[i] - want).abs() < 1e-12,
                "causal {causal}, row {i}: {} vs {want}",
                lse[i]
            );
        }
        if !causal {
            assert!(close(&out["merged"].to_f64(), &out["whole"].to_f64()));
            assert!(close(&out["merged_lse"].to_f64(), &lse));
        }
    }
}
