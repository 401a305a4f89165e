//! The MoE family: soundness of the router and dense → grouped rewrites on the definitional MoE (f64, every
//! alternative), refusal of look-alikes, the tiny-a checkpoint after the standard pipeline, and the cost of the
//! grouped form against the dense one at tiny-a and MiniMax-Text-01 shapes.

use egg::Id;
use fulgur_ir::{ConstData, DType, Dim, Graph, Interpreter, Precision, Value};
use fulgur_models::checkpoint::Checkpoint;
use fulgur_models::{decode_graph, forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur_passes::lang::{graph_to_egraph, EGraph, ShapeAnalysis};
use fulgur_passes::rules::{algebra, families, moe, RuleConfig};
use fulgur_passes::testing::{check_soundness, random_inputs, Soundness};
use fulgur_passes::{standard_pipeline, CostModel, Dce, EqSat, Limits, PassContext, Pipeline, Target};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    fulgur_models::fixtures::dir()
}

fn env(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Shapes of one MoE block.
#[derive(Clone, Copy, Debug)]
struct Shape {
    e: usize,
    k: usize,
    c: usize,
    i: usize,
}

/// Variations that make the graph something the grouped form does not equal (or that must still match).
#[derive(Clone, Copy, Debug, Default)]
struct Variant {
    /// Adds a logit bias of −1000 to the last expert, so that no token picks it (when k < E).
    starve_last: bool,
    /// Expert indices come from a graph input instead of `topk` (their range is unknown).
    ids_from_input: bool,
    /// `silu` on the second half, `⊙` the first.
    swapped_halves: bool,
    /// Combine weights reshaped to `[E, N, 1]` without the transpose.
    untransposed_weights: bool,
    /// Softmax over the token axis.
    softmax_over_tokens: bool,
    /// The gate and up halves sliced from the weight and multiplied separately (`split_gate_up`, the forward
    /// of expert-tensor parallelism).
    split_gate_up: bool,
}

/// The definitional MoE of `models::minimax` (`fn moe`) over `x: [n, C]`: output `y: [n, C]`.
fn dense_moe(s: Shape, n: Dim, v: Variant) -> Graph {
    let Shape { e, k, c, i } = s;
    let d = |x: usize| Dim::from(x);
    let mut g = Graph::new("moe");
    let x = g.input("x", DType::F32, vec![n.clone(), d(c)]).unwrap();
    let wg = g.param("wg", DType::F32, vec![d(e), d(c)]).unwrap();
    let w13 = g.param("w13", DType::F32, vec![d(e), d(2 * i), d(c)]).unwrap();
    let w2 = g.param("w2", DType::F32, vec![d(e), d(c), d(i)]).unwrap();
    let mut logits = g.linear(x, wg).unwrap();
    if v.starve_last {
        let mut b = vec![0.0; e];
        b[e - 1] = -1000.0;
        let bias = g.constant(DType::F32, vec![e], ConstData::Float(b)).unwrap();
        logits = g.add(logits, bias).unwrap();
    }
    let probs = g.softmax(logits, if v.softmax_over_tokens { 0 } else { -1 }).unwrap();
    let (w, mut idx) = g.topk(probs, k, -1).unwrap();
    if v.ids_from_input {
        idx = g.input("ids", DType::I64, vec![n.clone(), d(k)]).unwrap();
    }
    let wsum = g.sum(w, &[-1], true).unwrap();
    let w = g.div(w, wsum).unwrap();
    let oh = g.one_hot(idx, e, DType::F32).unwrap();
    let w3 = g.reshape(w, vec![n.clone(), d(k), d(1)]).unwrap();
    let cw = g.mul(oh, w3).unwrap();
    let cw = g.sum(cw, &[1], false).unwrap();
    let (mut gate, mut up) = if v.split_gate_up {
        let half = |g: &mut Graph, start: usize| {
            let w = g.slice(w13, 1, start, start + i).unwrap();
            let wt = g.transpose(w, -2, -1).unwrap();
            g.matmul(x, wt).unwrap()
        };
        (half(&mut g, 0), half(&mut g, i))
    } else {
        let w13t = g.transpose(w13, -2, -1).unwrap();
        let hup = g.matmul(x, w13t).unwrap();
        (g.slice(hup, -1, 0, i).unwrap(), g.slice(hup, -1, i, 2 * i).unwrap())
    };
    if v.swapped_halves {
        std::mem::swap(&mut gate, &mut up);
    }
    let act = g.silu(gate).unwrap();
    let act = g.mul(act, up).unwrap();
    let w2t = g.transpose(w2, -2, -1).unwrap();
    let y = g.matmul(act, w2t).unwrap();
    let cwt: Value = if v.untransposed_weights {
        g.reshape(cw, vec![d(e), n.clone(), d(1)]).unwrap()
    } else {
        let t = g.transpose(cw, 0, 1).unwrap();
        g.reshape(t, vec![d(e), n.clone(), d(1)]).unwrap()
    };
    let yw = g.mul(y, cwt).unwrap();
    let m = g.sum(yw, &[0], false).unwrap();
    g.add_output("y", m).unwrap();
    g
}

/// Saturates `g` with the MoE family (and algebra) and returns the e-graph and its output classes.
fn saturate(g: &Graph) -> (EGraph, Vec<Id>) {
    let mut eg = EGraph::new(ShapeAnalysis::default());
    let vm = graph_to_egraph(g, &mut eg);
    let rules: Vec<_> = [
        moe::family(&RuleConfig::default()),
        algebra::family(&RuleConfig::default()),
    ]
    .into_iter()
    .flat_map(|f| f.rules)
    .collect();
    let runner = Limits::default().runner(eg, None).run(&rules);
    let eg = runner.egraph;
    assert!(eg.classes().all(|c| c.data.conflict.is_none()), "type conflict");
    let roots = g.outputs().iter().map(|(_, v)| eg.find(vm.get(*v))).collect();
    (eg, roots)
}

/// Names of the ops somewhere in the e-graph.
fn ops_in(eg: &EGraph) -> Vec<String> {
    let mut v: Vec<String> = eg
        .classes()
        .flat_map(|c| c.nodes.iter())
        .filter_map(|n| n.ir_op().map(|o| o.name().to_string()))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Whether the class `root` holds a `moe_combine` node.
fn root_is_combined(eg: &EGraph, root: Id) -> bool {
    eg[root]
        .nodes
        .iter()
        .any(|n| n.ir_op().is_some_and(|o| o.name() == "moe_combine"))
}

fn soundness(s: Shape, tokens: i64, symbolic: bool, v: Variant, seed: u64) -> Soundness {
    let n = if symbolic { Dim::sym("N") } else { Dim::from(tokens) };
    let g = dense_moe(s, n, v);
    let (eg, roots) = saturate(&g);
    assert!(
        root_is_combined(&eg, roots[0]),
        "{s:?} N={tokens}: the dense MoE was not joined to moe_combine; ops: {:?}",
        ops_in(&eg)
    );
    assert!(ops_in(&eg).contains(&"moe_router".to_string()), "{s:?}: no router");
    let inputs = random_inputs(&g, &env(&[("N", tokens)]), seed, 4);
    let fams = vec![moe::family(&RuleConfig::default())];
    let checked = check_soundness(&g, fams, &inputs, 1e-9).unwrap_or_else(|e| panic!("{s:?} N={tokens}: {e}"));
    eprintln!("{s:?} N={tokens}: {checked}");
    let fams = vec![
        moe::family(&RuleConfig::default()),
        algebra::family(&RuleConfig::default()),
    ];
    check_soundness(&g, fams, &inputs, 1e-9).unwrap_or_else(|e| panic!("{s:?} N={tokens} with algebra: {e}"));
    checked
}

#[test]
fn dense_moe_to_grouped_is_sound_on_random_shapes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for case in 0..12u64 {
        let e = rng.gen_range(1..=6usize);
        let k = rng.gen_range(1..=e);
        let s = Shape {
            e,
            k,
            c: rng.gen_range(1..=7usize),
            i: rng.gen_range(1..=5usize),
        };
        let tokens = if case % 4 == 0 { 1 } else { rng.gen_range(1..=9i64) };
        let r = soundness(s, tokens, case % 2 == 0, Variant::default(), case);
        // at least router, dispatch, two grouped matmuls and combine beside the definitional form
        assert!(r.checked >= 5, "{s:?}: {r}");
    }
}

#[test]
fn edge_cases_are_sound() {
    let v = Variant::default();
    // k = E: every token uses every expert
    soundness(Shape { e: 3, k: 3, c: 4, i: 2 }, 5, true, v, 1);
    // one expert
    soundness(Shape { e: 1, k: 1, c: 3, i: 3 }, 4, false, v, 2);
    // one token, most experts get none
    soundness(Shape { e: 6, k: 2, c: 5, i: 4 }, 1, true, v, 3);
    // the last expert never gets a token, at any N
    let starve = Variant {
        starve_last: true,
        ..Default::default()
    };
    for (tokens, seed) in [(1, 4), (7, 5), (16, 6)] {
        soundness(Shape { e: 4, k: 2, c: 3, i: 2 }, tokens, tokens % 2 == 0, starve, seed);
    }
    // the gate and up halves apart (expert-tensor parallelism's forward): two grouped matmuls, silu, a product
    let split = Variant {
        split_gate_up: true,
        ..Default::default()
    };
    for (s, tokens, seed) in [
        (Shape { e: 4, k: 2, c: 3, i: 2 }, 6, 7),
        (Shape { e: 3, k: 1, c: 5, i: 3 }, 1, 8),
    ] {
        let r = soundness(s, tokens, seed % 2 == 0, split, seed);
        assert!(r.checked >= 5, "{s:?} split: {r}");
    }
    let (eg, roots) = saturate(&dense_moe(Shape { e: 4, k: 2, c: 3, i: 2 }, Dim::from(5), split));
    assert!(root_is_combined(&eg, roots[0]), "the split form joined to moe_combine");
}

#[test]
fn look_alikes_are_refused() {
    let s = Shape { e: 3, k: 2, c: 4, i: 3 };
    let cases = [
        (
            "indices of unknown range",
            Variant {
                ids_from_input: true,
                ..Default::default()
            },
        ),
        (
            "silu on the second half",
            Variant {
                swapped_halves: true,
                ..Default::default()
            },
        ),
        (
            "combine weights not transposed",
            Variant {
                untransposed_weights: true,
                ..Default::default()
            },
        ),
    ];
    for (what, v) in cases {
        // N = E as well, where [N, E] and [E, N] are the same shape
        for tokens in [5, 3] {
            let g = dense_moe(s, Dim::from(tokens), v);
            let (eg, roots) = saturate(&g);
            assert!(!root_is_combined(&eg, roots[0]), "{what}, N={tokens}: the rule fired");
            // whatever else fired stays sound
            let inputs = random_inputs(&g, &env(&[]), 7, 3);
            let fams = vec![moe::family(&RuleConfig::default())];
            check_soundness(&g, fams, &inputs, 1e-9).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
    // softmax over the token axis is no router; the indices still come from a top-k over E, so the dense
    // combine may still be routed, soundly
    let v = Variant {
        softmax_over_tokens: true,
        ..Default::default()
    };
    let g = dense_moe(s, Dim::from(5), v);
    let (eg, _) = saturate(&g);
    assert!(!ops_in(&eg).contains(&"moe_router".to_string()));
    let inputs = random_inputs(&g, &env(&[]), 8, 3);
    check_soundness(&g, vec![moe::family(&RuleConfig::default())], &inputs, 1e-9).unwrap();
}

#[test]
fn router_on_leading_axes_is_sound() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5e1);
    for case in 0..4 {
        // one expert, one token first; then k = E, then random
        let (b, t, e) = if case == 0 {
            (1, 1, 1)
        } else {
            (rng.gen_range(1..=2), rng.gen_range(1..=4), rng.gen_range(1..=5usize))
        };
        let k = if case == 1 { e } else { rng.gen_range(1..=e) };
        let mut g = Graph::new("router");
        let l = g
            .input("logits", DType::F32, vec![Dim::sym("B"), Dim::sym("T"), Dim::from(e)])
            .unwrap();
        let p = g.softmax(l, 2).unwrap();
        let (w, idx) = g.topk(p, k, -1).unwrap();
        let s = g.sum(w, &[2], true).unwrap();
        let w = g.div(w, s).unwrap();
        g.add_output("w", w).unwrap();
        g.add_output("idx", idx).unwrap();
        let (eg, roots) = saturate(&g);
        for r in roots {
            assert!(
                eg[r]
                    .nodes
                    .iter()
                    .any(|n| n.op == fulgur_passes::lang::FOp::Proj(0) || n.op == fulgur_passes::lang::FOp::Proj(1)),
                "root without a projection"
            );
        }
        assert!(ops_in(&eg).contains(&"moe_router".to_string()));
        let inputs = random_inputs(&g, &env(&[("B", b), ("T", t)]), 11, 3);
        let r = check_soundness(&g, vec![moe::family(&RuleConfig::default())], &inputs, 1e-9).unwrap();
        assert!(r.checked >= 1, "{r}");
    }
}

fn count_ops(g: &Graph) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (_, n) in g.nodes() {
        *m.entry(n.op.name().to_string()).or_insert(0) += 1;
    }
    m
}

#[test]
fn tiny_a_uses_grouped_matmuls_and_keeps_parity() {
    let dir = fixtures().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let reference = fulgur_ir::tensor::read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
    let cx = PassContext {
        model: CostModel::new(Target::by_name("H100").unwrap()),
    };
    let (opt, _) = standard_pipeline(&RuleConfig::default(), &[], Limits::default())
        .unwrap()
        .run(&g, &cx, None)
        .unwrap();
    let layers = ck.config.num_hidden_layers;
    let ops = count_ops(&opt);
    let n = |name: &str| ops.get(name).copied().unwrap_or(0);
    assert_eq!(n("grouped_matmul"), 2 * layers, "{ops:?}");
    assert_eq!(n("moe_dispatch"), layers, "{ops:?}");
    assert_eq!(n("moe_combine"), layers, "{ops:?}");
    assert_eq!(n("moe_router"), layers, "{ops:?}");
    assert_eq!(n("one_hot"), 0, "the dense combine weights survived: {ops:?}");
    let mut inputs = ck.load_params(&opt).unwrap();
    inputs.insert("input_ids".into(), reference["input_ids"].clone());
    let out = Interpreter::new(Precision::F32).run(&opt, &inputs).unwrap();
    let e = out["logits"].rel_l2(&reference["logits"]);
    assert!(e < 1e-4, "logits: {e}");
}

/// Cost (seconds) of `g` before and after saturation with `fams` under `model`, and the optimized graph.
fn cost(g: &Graph, fams: Vec<fulgur_passes::rules::Family>, model: CostModel) -> (f64, f64, Graph) {
    let cx = PassContext { model };
    let (opt, reports) = Pipeline::new()
        .with(Dce)
        .with(EqSat::new(fams))
        .run(g, &cx, None)
        .unwrap();
    let eq = reports[1].eqsat.as_ref().unwrap();
    let before: f64 = eq
        .templates
        .iter()
        .map(|t| t.cost_before_s * t.instances.len() as f64)
        .sum();
    let after: f64 = eq
        .templates
        .iter()
        .map(|t| t.cost_after_s * t.instances.len() as f64)
        .sum();
    (before, after, opt)
}

#[test]
fn grouped_form_is_cheaper_at_tiny_a_and_minimax_shapes() {
    let h100 = || CostModel::new(Target::by_name("H100").unwrap());
    let shapes = [
        (
            "tiny-a",
            Shape {
                e: 4,
                k: 2,
                c: 128,
                i: 128,
            },
            80,
        ),
        (
            "MiniMax-Text-01",
            Shape {
                e: 32,
                k: 2,
                c: 6144,
                i: 9216,
            },
            4096,
        ),
    ];
    for (name, s, tokens) in shapes {
        let g = dense_moe(s, Dim::sym("N"), Variant::default());
        let mut model = h100();
        model.env.insert("N".into(), tokens);
        let fams = || families(&RuleConfig::default(), &[]).unwrap();
        let (dense, grouped, opt) = cost(&g, fams(), model.clone());
        let ops = count_ops(&opt);
        println!(
            "{name} MoE block on H100 at N={tokens}: dense {:.3} µs, optimized {:.3} µs ({:?})",
            dense * 1e6,
            grouped * 1e6,
            ops
        );
        assert_eq!(ops.get("grouped_matmul"), Some(&2), "{name}: {ops:?}");
        assert!(grouped < dense, "{name}: grouped {grouped} s ≥ dense {dense} s");
        // without the MoE family the extractor keeps the dense form
        let (_, no_moe, _) = cost(&g, families(&RuleConfig::default(), &["moe".into()]).unwrap(), model);
        assert!(
            grouped < no_moe,
            "{name}: grouped {grouped} s ≥ best without MoE {no_moe} s"
        );
    }
}

#[test]
fn minimax_text_01_forward_cost_with_and_without_moe() {
    let cfg = MiniMaxConfig::from_file(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/configs/minimax-text-01.json"
    )))
    .unwrap();
    let g = forward_graph(&cfg, &ForwardOptions::default()).unwrap();
    let model = CostModel::new(Target::by_name("H100").unwrap());
    let (before, with_moe, opt) = cost(&g, families(&RuleConfig::default(), &[]).unwrap(), model.clone());
    let (_, without_moe, _) = cost(&g, families(&RuleConfig::default(), &["moe".into()]).unwrap(), model);
    let ops = count_ops(&opt);
    println!(
        "MiniMax-Text-01 forward on H100 (B=1, T=4096): unoptimized {:.3} ms, all families but moe {:.3} ms, all families {:.3} ms",
        before * 1e3,
        without_moe * 1e3,
        with_moe * 1e3
    );
    assert_eq!(ops.get("grouped_matmul"), Some(&(2 * cfg.num_hidden_layers)), "{ops:?}");
    assert!(with_moe < without_moe);
}

#[test]
fn tiny_a_decode_step_is_routed_and_unchanged() {
    let ck = Checkpoint::open(&fixtures().join("tiny-a")).unwrap();
    let g = decode_graph(&ck.config).unwrap();
    let cx = PassContext {
        model: CostModel::new(Target::by_name("H100").unwrap()),
    };
    let (opt, _) = standard_pipeline(&RuleConfig::default(), &[], Limits::default())
        .unwrap()
        .run(&g, &cx, None)
        .unwrap();
    let layers = ck.config.num_hidden_layers;
    let ops = count_ops(&opt);
    assert_eq!(ops.get("grouped_matmul"), Some(&(2 * layers)), "{ops:?}");
    let vocab = ck.config.vocab_size as i64;
    let mut inputs = random_inputs(&g, &env(&[("B", 3), ("P", 6)]), 21, vocab);
    inputs.insert(
        "position".into(),
        fulgur_ir::Tensor::from_i64(DType::I64, vec![], vec![6]),
    );
    let interp = Interpreter::new(Precision::F64);
    let (want, got) = (interp.run(&g, &inputs).unwrap(), interp.run(&opt, &inputs).unwrap());
    for (name, w) in &want {
        let e = got[name].rel_l2(w);
        assert!(e < 1e-9, "{name}: {e}");
    }
}
