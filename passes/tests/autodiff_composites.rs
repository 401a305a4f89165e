//! Every backward composite against the autodiff of its forward composite's decomposition, in f64 on the
//! reference interpreter: the rules autodiff uses for `lightning_attention`, `flash_attention`,
//! `grouped_matmul`, `moe_dispatch` and `moe_combine` (which emit `lightning_attention` on reversed time,
//! `flash_attention_grad`, `grouped_matmul_wgrad`, `moe_combine` and `scatter_add`) must give the gradients the
//! primitives give. A stray factor, a wrong reversal or a group misplaced shows as a relative error near 1;
//! the tolerance is rounding.

use fulgur_ir::{Buffer, Composite, ConstData, DType, Dim, Graph, Interpreter, Op, Precision, Tensor, Value};
use fulgur_passes::autodiff::{differentiate, differentiate_report, GradOptions, Recompute};
use fulgur_passes::cost::Target;
use std::collections::HashMap;

type Build = dyn Fn(&mut Graph, &[Value]) -> fulgur_ir::Result<Value>;
/// A case: its name, the parameters' shapes, and the graph over them.
type Case = (&'static str, Vec<&'static [usize]>, Box<Build>);

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

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let n: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    d / n.max(1e-300)
}

/// `loss = Σ build(params) ⊙ r`, differentiated with the backward composites and through the decompositions;
/// returns the worst relative difference over the parameters, and the composite graph's op names.
fn compare(name: &str, shapes: &[&[usize]], build: &Build, seed: u64) -> (f64, Vec<String>) {
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
    let fast = differentiate(&g, "loss", &GradOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let slow = differentiate(
        &g,
        "loss",
        &GradOptions {
            expand_all: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let feed: HashMap<String, Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let t = Tensor {
                dtype: DType::F32,
                shape: s.to_vec(),
                data: Buffer::F(values(n, seed + i as u64)),
            };
            (format!("p{i}"), t)
        })
        .collect();
    let interp = Interpreter::new(Precision::F64);
    let a = interp.run(&fast, &feed).unwrap_or_else(|e| panic!("{name}: {e}"));
    let b = interp.run(&slow, &feed).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut worst: f64 = 0.0;
    for i in 0..shapes.len() {
        let k = format!("grad.p{i}");
        let (x, y) = (a[&k].to_f64(), b[&k].to_f64());
        assert!(
            y.iter().any(|v| *v != 0.0),
            "{name}: {k} is zero through the decomposition"
        );
        let e = rel(&x, &y);
        println!("{name}: {k} rel {e:.2e}");
        worst = worst.max(if e.is_nan() { f64::INFINITY } else { e });
    }
    let ops = fast.nodes().map(|(_, n)| n.op.name().to_string()).collect();
    (worst, ops)
}

fn count(ops: &[String], name: &str) -> usize {
    ops.iter().filter(|o| *o == name).count()
}

fn positive(g: &mut Graph, x: Value) -> fulgur_ir::Result<Value> {
    let s = g.mul(x, x)?;
    g.add_scalar(s, 0.5)
}

const TOL: f64 = 1e-10;

#[test]
fn lightning_backward_is_lightning_attention_on_reversed_time() {
    // three blocks, the last short; decay rates differentiated too
    let (e, ops) = compare(
        "lightning, T 7, block 3",
        &[&[2, 7, 3], &[2, 7, 3], &[2, 7, 4], &[2, 1, 1]],
        &|g, p| {
            let lam = positive(g, p[3])?;
            g.lightning_attention(p[0], p[1], p[2], lam, 3)
        },
        3,
    );
    assert!(e < TOL, "lightning attention's backward is off by {e:.3e}");
    // the forward, dq, dk, dv and dλ: five scans, no quadratic decomposition
    assert_eq!(count(&ops, "lightning_attention"), 5, "{ops:?}");
    assert_eq!(count(&ops, "matmul"), 0, "{ops:?}");
    // heads on a batch axis, the rates a constant per head (as MiniMax-01's): no dλ scan
    let (e, ops) = compare(
        "lightning, [1, 2, 8, 4], block 4",
        &[&[1, 2, 8, 4], &[1, 2, 8, 4], &[1, 2, 8, 2]],
        &|g, p| {
            let lam = g.constant(DType::F32, vec![2, 1, 1], ConstData::Float(vec![0.3, 1.1]))?;
            g.lightning_attention(p[0], p[1], p[2], lam, 4)
        },
        4,
    );
    assert!(
        e < TOL,
        "lightning attention's backward (constant rates) is off by {e:.3e}"
    );
    assert_eq!(count(&ops, "lightning_attention"), 4, "{ops:?}");
}

#[test]
fn flash_backward_recomputes_the_softmax() {
    let cases: Vec<Case> = vec![
        (
            "flash, causal, grouped-query (k and v shared by 3 query heads)",
            vec![&[1, 2, 3, 5, 4], &[1, 2, 1, 5, 4], &[1, 2, 1, 5, 3]],
            Box::new(|g, p| g.flash_attention(p[0], p[1], p[2], 0.5, true)),
        ),
        (
            "flash, not causal, S ≠ T",
            vec![&[2, 3, 4], &[2, 6, 4], &[2, 6, 5]],
            Box::new(|g, p| g.flash_attention(p[0], p[1], p[2], 0.8, false)),
        ),
        (
            "flash, causal, queries the last 2 of 5 positions",
            vec![&[2, 2, 4], &[2, 5, 4], &[2, 5, 4]],
            Box::new(|g, p| g.flash_attention(p[0], p[1], p[2], 0.6, true)),
        ),
        (
            "flash with rotary embeddings (its decomposition's rope, then flash)",
            vec![&[1, 2, 4, 4], &[1, 2, 4, 4], &[1, 2, 4, 3], &[4, 4], &[4, 4]],
            Box::new(|g, p| {
                let op = Op::Composite(Composite::FlashAttentionRope {
                    scale: 0.5,
                    causal: true,
                    rotary: 4,
                });
                g.op1(op, &[p[0], p[1], p[2], p[3], p[4]])
            }),
        ),
    ];
    for (i, (name, shapes, build)) in cases.iter().enumerate() {
        let (e, ops) = compare(name, shapes, build.as_ref(), 40 + i as u64);
        assert!(e < TOL, "{name}: off by {e:.3e}");
        assert_eq!(count(&ops, "flash_attention_grad"), 1, "{name}: {ops:?}");
        assert_eq!(
            count(&ops, "softmax"),
            0,
            "{name}: the backward stored a softmax: {ops:?}"
        );
    }
}

#[test]
fn grouped_matmul_backward_runs_over_the_same_groups() {
    let cases: Vec<Case> = vec![
        (
            "grouped matmul, groups 3, 0, 3 (an empty group)",
            vec![&[6, 4], &[3, 4, 5]],
            Box::new(|g, p| {
                let counts = g.constant(DType::I64, vec![3], ConstData::Int(vec![3, 0, 3]))?;
                g.grouped_matmul(p[0], counts, p[1], false)
            }),
        ),
        (
            "grouped swiglu matmul, groups 2, 2, 2",
            vec![&[6, 4], &[3, 4, 10]],
            Box::new(|g, p| {
                let counts = g.constant(DType::I32, vec![3], ConstData::Int(vec![2, 2, 2]))?;
                g.grouped_matmul(p[0], counts, p[1], true)
            }),
        ),
    ];
    for (i, (name, shapes, build)) in cases.iter().enumerate() {
        let (e, ops) = compare(name, shapes, build.as_ref(), 60 + i as u64);
        assert!(e < TOL, "{name}: off by {e:.3e}");
        assert_eq!(count(&ops, "grouped_matmul_wgrad"), 1, "{name}: {ops:?}");
        assert_eq!(
            count(&ops, "gather"),
            0,
            "{name}: the backward gathers weights per row: {ops:?}"
        );
    }
}

/// An expert weight stored `[E, out, in]` (transformers' layout) and read transposed: its gradient is the
/// weight gradient with the operands swapped, `wgrad(xs, dy)ᵀ = wgrad(dy, xs)` per group, so that the gradient
/// output is the weight gradient itself in the stored layout, not a transposed view its readers would stride
/// across; the same values as through the decomposition.
#[test]
fn a_transposed_expert_weight_gets_its_gradient_in_its_own_layout() {
    let build = |g: &mut Graph, p: &[Value]| {
        let counts = g.constant(DType::I64, vec![3], ConstData::Int(vec![2, 0, 4]))?;
        let wt = g.permute(p[1], &[0, 2, 1])?;
        g.grouped_matmul(p[0], counts, wt, false)
    };
    let (e, ops) = compare(
        "grouped matmul, weight [E, out, in]",
        &[&[6, 4], &[3, 5, 4]],
        &build,
        70,
    );
    assert!(e < TOL, "off by {e:.3e}");
    assert_eq!(count(&ops, "grouped_matmul_wgrad"), 1, "{ops:?}");
    let mut g = Graph::new("transposed");
    let x = g.param("x", DType::F32, vec![Dim::from(6), Dim::from(4)]).unwrap();
    let w = g
        .param("w", DType::F32, vec![Dim::from(3), Dim::from(5), Dim::from(4)])
        .unwrap();
    let y = build(&mut g, &[x, w]).unwrap();
    let loss = g.sum(y, &[0, 1], false).unwrap();
    g.add_output("loss", loss).unwrap();
    let dg = differentiate(&g, "loss", &GradOptions::default()).unwrap();
    let (_, gw) = dg.outputs().iter().find(|(n, _)| n.as_str() == "grad.w").unwrap();
    let op = &dg.node(gw.node).op;
    assert_eq!(op.name(), "grouped_matmul_wgrad", "grad.w comes from {op:?}");
    assert_eq!(dg.dims(*gw), g.dims(w), "grad.w in w's layout");
}

#[test]
fn moe_backward_through_router_dispatch_experts_and_combine() {
    let (e, ops) = compare(
        "moe: router, dispatch, grouped swiglu matmul, combine",
        &[&[6, 4], &[4, 3], &[3, 4, 10], &[3, 5, 4]],
        &|g, p| {
            let logits = g.matmul(p[0], p[1])?;
            let (w, ids) = g.moe_router(logits, 2)?;
            let (xs, pos, counts) = g.moe_dispatch(p[0], ids, 3)?;
            let h = g.grouped_matmul(xs, counts, p[2], true)?;
            let ys = g.grouped_matmul(h, counts, p[3], false)?;
            g.moe_combine(ys, pos, w)
        },
        80,
    );
    assert!(e < TOL, "the MoE layer's backward is off by {e:.3e}");
    assert_eq!(count(&ops, "grouped_matmul_wgrad"), 2, "{ops:?}");
    // dispatch's backward is a combine with unit weights (the forward's and that one); combine's is two
    // dispatches (dy's rows, and the weights with the expert ids), no scatter
    assert_eq!(count(&ops, "moe_combine"), 2, "{ops:?}");
    assert_eq!(count(&ops, "moe_dispatch"), 3, "{ops:?}");
    assert_eq!(count(&ops, "scatter_add"), 0, "{ops:?}");
}

/// The swiglu pre-activation stored or recomputed: the same gradients either way, the choice reported with its
/// bytes and FLOPs; `Auto` prices both on the target (a 4-wide product is cheaper to recompute than to store
/// and read back; a 2048-wide one is not).
#[test]
fn the_swiglu_pre_activation_is_stored_or_recomputed_as_asked() {
    let build = |c: usize| {
        let mut g = Graph::new("swiglu");
        let xs = g.param("xs", DType::F32, vec![6.into(), Dim::from(c as i64)]).unwrap();
        let w = g
            .param("w", DType::F32, vec![3.into(), Dim::from(c as i64), 10.into()])
            .unwrap();
        let counts = g.constant(DType::I64, vec![3], ConstData::Int(vec![2, 1, 3])).unwrap();
        let y = g.grouped_matmul(xs, counts, w, true).unwrap();
        let loss = g.sum(y, &[0, 1], false).unwrap();
        g.add_output("loss", loss).unwrap();
        g
    };
    let g = build(4);
    let feed: HashMap<String, Tensor> = [("xs", vec![6, 4], 1), ("w", vec![3, 4, 10], 2)]
        .into_iter()
        .map(|(n, s, seed): (&str, Vec<usize>, u64)| {
            let v = values(s.iter().product(), seed);
            (
                n.to_string(),
                Tensor {
                    dtype: DType::F32,
                    shape: s,
                    data: Buffer::F(v),
                },
            )
        })
        .collect();
    let interp = Interpreter::new(Precision::F64);
    let oracle = interp
        .run(
            &differentiate(
                &g,
                "loss",
                &GradOptions {
                    expand_all: true,
                    ..Default::default()
                },
            )
            .unwrap(),
            &feed,
        )
        .unwrap();
    let h200 = Target::by_name("H200");
    for (policy, target, recomputed, swiglu_nodes, plain_nodes) in [
        (Recompute::Store, None, false, 0, 2),
        (Recompute::All, None, true, 1, 2),
        (Recompute::Auto, None, false, 0, 2),
        (Recompute::Auto, h200.clone(), true, 1, 2),
    ] {
        let opts = GradOptions {
            recompute: policy,
            target,
            ..Default::default()
        };
        let (dg, report) = differentiate_report(&g, "loss", &opts).unwrap();
        assert_eq!(report.choices.len(), 1, "{policy:?}: {report:?}");
        let c = &report.choices[0];
        assert_eq!(c.recomputed, recomputed, "{policy:?}: {c:?}");
        assert_eq!(c.value, "swiglu-pre-activation f32[6, 10]");
        assert_eq!(
            (c.bytes.as_const(), c.flops.as_const()),
            (Some(6 * 10 * 4), Some(2 * 6 * 4 * 10))
        );
        let gm = |swiglu: bool| {
            dg.nodes()
                .filter(|(_, n)| matches!(n.op, Op::Composite(Composite::GroupedMatmul { swiglu: s }) if s == swiglu))
                .count()
        };
        assert_eq!((gm(true), gm(false)), (swiglu_nodes, plain_nodes), "{policy:?}");
        let got = interp.run(&dg, &feed).unwrap();
        for k in ["grad.xs", "grad.w"] {
            let e = rel(&got[k].to_f64(), &oracle[k].to_f64());
            assert!(e < TOL, "{policy:?}: {k} off by {e:.3e}");
        }
    }
    // 2048 wide: storing and reading back 6·10 values is cheaper on an H200 than 2·6·2048·10 FLOPs again
    let opts = GradOptions {
        recompute: Recompute::Auto,
        target: h200,
        ..Default::default()
    };
    let (_, report) = differentiate_report(&build(2048), "loss", &opts).unwrap();
    assert!(!report.choices[0].recomputed, "{report:?}");
    let env = HashMap::new();
    assert_eq!(
        report.summary(&env),
        "1 swiglu-pre-activation stored (0.0 MiB kept for the backward; recomputing would add 0.00 GFLOP)"
    );
}

/// `moe_combine` whose positions are not a dispatch's: its backward scatters.
#[test]
fn moe_combine_backward_without_a_dispatch_scatters() {
    let (e, ops) = compare(
        "combine over positions given as a constant",
        &[&[6, 5], &[3, 2]],
        &|g, p| {
            let pos = g.constant(DType::I64, vec![3, 2], ConstData::Int(vec![5, 0, 2, 3, 1, 4]))?;
            g.moe_combine(p[0], pos, p[1])
        },
        90,
    );
    assert!(e < TOL, "moe_combine's backward is off by {e:.3e}");
    assert_eq!(count(&ops, "scatter_add"), 1, "{ops:?}");
}

/// The backward composites' own decompositions are what the interpreter runs; their types are checked.
#[test]
fn backward_composites_refuse_ill_typed_inputs() {
    let mut g = Graph::new("bad");
    let q = g.param("q", DType::F32, vec![2.into(), 3.into(), 4.into()]).unwrap();
    let k = g.param("k", DType::F32, vec![2.into(), 5.into(), 4.into()]).unwrap();
    let v = g.param("v", DType::F32, vec![2.into(), 5.into(), 6.into()]).unwrap();
    let d = g.param("d", DType::F32, vec![2.into(), 3.into(), 5.into()]).unwrap();
    let e = g.flash_attention_grad(q, k, v, d, 1.0, false).unwrap_err().to_string();
    assert!(
        e.contains("`flash_attention_grad` needs `do` of the forward output's type f32[2, 3, 6], got f32[2, 3, 5]"),
        "{e}"
    );
    let xs = g.param("xs", DType::F32, vec![6.into(), 4.into()]).unwrap();
    let dy = g.param("dy", DType::F32, vec![5.into(), 3.into()]).unwrap();
    let counts = g.constant(DType::I64, vec![2], ConstData::Int(vec![3, 3])).unwrap();
    let e = g.grouped_matmul_wgrad(xs, counts, dy).unwrap_err().to_string();
    assert!(
        e.contains("`grouped_matmul_wgrad` needs one row of dy per row of xs"),
        "{e}"
    );
}

/// A collective's backward is the transposed collective over the same groups (`all_reduce` its own,
/// `all_gather` ↔ `reduce_scatter`, `send_recv[k]` ↔ `send_recv[−k]`, `all_to_all` its own), agreeing with the
/// autodiff of the decompositions.
#[test]
fn collectives_backward_is_the_transposed_collective() {
    let op = |c: Composite| Op::Composite(c);
    let cases: Vec<(&str, Vec<&[usize]>, Op, &str)> = vec![
        (
            "all_reduce, mesh [2, 3] over 1",
            vec![&[6, 4]],
            op(Composite::AllReduce {
                mesh: vec![2, 3],
                over: 1,
            }),
            "all_reduce",
        ),
        (
            "all_gather, axis 1, mesh [2, 3] over 0",
            vec![&[6, 3]],
            op(Composite::AllGather {
                axis: 1,
                mesh: vec![2, 3],
                over: 0,
            }),
            "reduce_scatter",
        ),
        (
            "reduce_scatter, axis -1, one group",
            vec![&[3, 2, 6]],
            op(Composite::ReduceScatter {
                axis: -1,
                mesh: vec![],
                over: 0,
            }),
            "all_gather",
        ),
        (
            "all_to_all, axis 1, mesh [2, 3] over 1",
            vec![&[6, 6, 2]],
            op(Composite::AllToAll {
                axis: 1,
                mesh: vec![2, 3],
                over: 1,
            }),
            "all_to_all",
        ),
        (
            "send_recv, shift 1, mesh [3, 2] over 0",
            vec![&[6, 2, 3]],
            op(Composite::SendRecv {
                shift: 1,
                mesh: vec![3, 2],
                over: 0,
            }),
            "send_recv",
        ),
    ];
    for (i, (name, shapes, op, backward)) in cases.into_iter().enumerate() {
        let build = move |g: &mut Graph, p: &[Value]| Ok(g.op(op.clone(), &[p[0]])?[0]);
        let (e, ops) = compare(name, &shapes, &build, 80 + i as u64);
        assert!(e < TOL, "{name}: off by {e:.3e}");
        // the forward's op and the backward's (all_reduce's backward is another all_reduce)
        let want = if name.starts_with(backward) { 2 } else { 1 };
        assert_eq!(count(&ops, backward), want, "{name}: `{backward}` in {ops:?}");
    }
}

/// The routed exchange's backward: `all_to_all_dispatch`'s is `all_to_all_combine` with the same counts and
/// the other way round (they are each other's transposes), against the autodiff of their decompositions.
#[test]
fn routed_exchange_backward_is_the_other_side() {
    for (i, (mesh, over, ranks)) in [(vec![2usize, 2], 1usize, 4usize), (vec![], 0, 3)]
        .into_iter()
        .enumerate()
    {
        let gs = if mesh.is_empty() { ranks } else { mesh[over] };
        let (e, m) = (2 * gs, 5usize);
        // each rank's rows per expert, some ranks sending fewer than their 5 rows
        let counts: Vec<i64> = (0..ranks * e).map(|j| ((j * 7 + 3) % 4) as i64 % 2).collect();
        for dispatch in [true, false] {
            let op = if dispatch {
                Op::Composite(Composite::dispatch(mesh.clone(), over))
            } else {
                Op::Composite(Composite::combine(mesh.clone(), over))
            };
            let rows = if dispatch { m } else { gs * m };
            let shape = [ranks, rows, 3];
            let counts = counts.clone();
            let build = move |g: &mut Graph, p: &[Value]| {
                let c = g.constant(DType::I64, vec![ranks, e], ConstData::Int(counts.clone()))?;
                Ok(g.op(op.clone(), &[p[0], c])?[0])
            };
            let name = format!("{} on mesh {mesh:?}", if dispatch { "dispatch" } else { "combine" });
            let (err, ops) = compare(&name, &[&shape], &build, 120 + i as u64);
            assert!(err < TOL, "{name}: off by {err:.3e}");
            let other = if dispatch {
                "all_to_all_combine"
            } else {
                "all_to_all_dispatch"
            };
            assert_eq!(count(&ops, other), 1, "{name}: `{other}` in {ops:?}");
        }
    }
}
