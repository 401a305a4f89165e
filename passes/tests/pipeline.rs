//! The whole pipeline on MiniMax graphs: parity after optimization, per-template saturation, determinism.

use fulgur_ir::{Interpreter, Precision};
use fulgur_models::checkpoint::Checkpoint;
use fulgur_models::{forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur_passes::rules::{families, RuleConfig};
use fulgur_passes::{CostModel, Dce, EqSat, PassContext, Pipeline, Target};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    fulgur_models::fixtures::dir()
}

fn pipeline() -> Pipeline {
    Pipeline::new()
        .with(Dce)
        .with(EqSat::new(families(&RuleConfig::default(), &[]).unwrap()))
}

fn cx() -> PassContext {
    PassContext {
        model: CostModel::new(Target::by_name("H100").unwrap()),
    }
}

#[test]
fn tiny_a_parity_after_optimization() {
    let dir = fixtures().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let reference = fulgur_ir::tensor::read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            hidden_states: true,
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (opt, reports) = pipeline().run(&g, &cx(), None).unwrap();
    let eq = reports[1].eqsat.as_ref().unwrap();
    // three lightning layers share one template; the softmax layer has its own
    let layer_templates: Vec<_> = eq.templates.iter().filter(|t| t.name.starts_with("layers.")).collect();
    assert_eq!(
        layer_templates.len(),
        2,
        "{:?}",
        eq.templates.iter().map(|t| (&t.name, &t.instances)).collect::<Vec<_>>()
    );
    assert_eq!(layer_templates[0].instances, vec!["layers.0", "layers.1", "layers.2"]);
    let mut inputs = ck.load_params(&opt).unwrap();
    inputs.insert("input_ids".into(), reference["input_ids"].clone());
    let out = Interpreter::new(Precision::F32).run(&opt, &inputs).unwrap();
    for name in ["logits", "hidden_states.1", "hidden_states.4"] {
        let e = out[name].rel_l2(&reference[name]);
        assert!(e < 1e-4, "{name}: {e}");
    }
    let (a, b) = (out["loss"].to_f64()[0], reference["loss"].to_f64()[0]);
    assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
}

#[test]
fn optimization_is_deterministic() {
    let cfg = MiniMaxConfig::from_file(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/configs/minimax-small.json"
    )))
    .unwrap();
    let g = forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let a = fulgur_ir::text::print(&pipeline().run(&g, &cx(), None).unwrap().0);
    let b = fulgur_ir::text::print(&pipeline().run(&g, &cx(), None).unwrap().0);
    assert_eq!(a, b);
}

/// The template reports of the standard pipeline on a config's forward-with-loss graph.
fn templates_of(cfg: &MiniMaxConfig) -> Vec<(String, Vec<String>)> {
    let g = forward_graph(
        cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (_, reports) = pipeline().run(&g, &cx(), None).unwrap();
    let eq = reports[1].eqsat.as_ref().unwrap();
    eq.templates
        .iter()
        .map(|t| (t.name.clone(), t.instances.clone()))
        .collect()
}

/// docs/passes.md: "MiniMax-Text-01 has 80 layers but 4 templates (embedding, lightning+MoE ×70, softmax+MoE ×10,
/// head+loss)".
#[test]
fn full_config_has_exactly_four_templates() {
    let cfg = MiniMaxConfig::from_file(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/configs/minimax-text-01.json"
    )))
    .unwrap();
    let t = templates_of(&cfg);
    let counts: Vec<usize> = t.iter().map(|(_, i)| i.len()).collect();
    assert_eq!(counts, vec![1, 70, 10, 1], "{t:?}");
    assert!(t[1]
        .1
        .iter()
        .all(|s| cfg.layer_types[s[7..].parse::<usize>().unwrap()] == fulgur_models::LayerType::Linear));
    assert!(t[2]
        .1
        .iter()
        .all(|s| cfg.layer_types[s[7..].parse::<usize>().unwrap()] == fulgur_models::LayerType::Full));
}

/// Layers that differ only in their decay rates share a template, also when there is one head (the rates are
/// then a one-element constant).
#[test]
fn a_model_with_one_head_shares_one_template_across_layers() {
    let text = r#"{"model_type": "minimax", "vocab_size": 20, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 4, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8,
        "num_local_experts": 2, "num_experts_per_tok": 1,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "linear_attention"],
        "block_size": 4}"#;
    let cfg = MiniMaxConfig::from_json_str(text, "test").unwrap();
    let t = templates_of(&cfg);
    let layers: Vec<_> = t.iter().filter(|(n, _)| n.starts_with("layers.")).collect();
    assert_eq!(layers.len(), 1, "{t:?}");
    assert_eq!(layers[0].1, vec!["layers.0", "layers.1", "layers.2", "layers.3"]);
}

/// A chain of `n` elementwise ops over `x: [B, 64]` without layer names, cycling through a few ops.
fn chain(n: usize) -> fulgur_ir::Graph {
    use fulgur_ir::{DType, Dim, Graph, UnaryOp};
    let mut g = Graph::new("chain");
    let mut v = g.input("x", DType::F32, vec![Dim::sym("B"), Dim::from(64)]).unwrap();
    let c = g.scalar(0.5, DType::F32).unwrap();
    for i in 0..n {
        v = match i % 5 {
            0 => g.unary(UnaryOp::Tanh, v).unwrap(),
            1 => g.mul(v, c).unwrap(),
            2 => g.unary(UnaryOp::Sin, v).unwrap(),
            3 => g.add(v, c).unwrap(),
            _ => g.unary(UnaryOp::Sigmoid, v).unwrap(),
        };
    }
    g.add_output("y", v).unwrap();
    g
}

/// A graph without layer names is cut into windows of `Limits::window` nodes; windows alike share a template,
/// each is optimized, and the result still computes the same function.
#[test]
fn a_graph_without_layer_names_is_optimized_in_windows() {
    let g = chain(2000);
    let mut eq = EqSat::new(families(&RuleConfig::default(), &[]).unwrap());
    eq.limits.window = 250;
    let (opt, reports) = Pipeline::new().with(Dce).with(eq).run(&g, &cx(), None).unwrap();
    let r = reports[1].eqsat.as_ref().unwrap();
    assert_eq!(r.windows, r.segments);
    assert!(r.segments >= 8, "{} segments", r.segments);
    // windows of one period of the op cycle are alike: far fewer templates than windows
    assert!(r.templates.len() < r.segments, "{} templates", r.templates.len());
    assert!(r.templates.iter().all(|t| t.name.starts_with("main@")));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    // fused: ~2000 ops in chunks of at most 32
    assert!(
        reports[1].kernels_after <= 2000 / 32 + 2 * r.segments,
        "{}",
        reports[1].kernels_after
    );
    let env = [("B".to_string(), 3)].into();
    let inputs = fulgur_passes::testing::random_inputs(&g, &env, 5, 4);
    let interp = Interpreter::new(Precision::F64);
    let (a, b) = (interp.run(&g, &inputs).unwrap(), interp.run(&opt, &inputs).unwrap());
    assert!(fulgur_passes::testing::rel_error(&b["y"], &a["y"]) < 1e-12);
}

/// A wall-clock budget covers saturation and extraction of every template; what it cuts short is named in a
/// warning, and the graph is still complete and correct.
#[test]
fn a_time_limit_stops_templates_with_warnings() {
    let g = chain(3000);
    let mut eq = EqSat::new(families(&RuleConfig::default(), &[]).unwrap());
    eq.limits = fulgur_passes::Limits::new(20_000, 12, Some(1e-6), 100).unwrap();
    let (opt, reports) = Pipeline::new().with(eq).run(&g, &cx(), None).unwrap();
    let r = reports[0].eqsat.as_ref().unwrap();
    assert!(!r.warnings.is_empty());
    assert!(
        r.warnings.iter().any(|w| w.contains("templates not optimized (main@")
            && w.contains("the time limit (0.000 s) was reached before them; the result depends on machine speed")),
        "{:?}",
        r.warnings
    );
    let env = [("B".to_string(), 2)].into();
    let inputs = fulgur_passes::testing::random_inputs(&g, &env, 6, 4);
    let interp = Interpreter::new(Precision::F64);
    let (a, b) = (interp.run(&g, &inputs).unwrap(), interp.run(&opt, &inputs).unwrap());
    assert!(fulgur_passes::testing::rel_error(&b["y"], &a["y"]) < 1e-12);
}

#[test]
fn nonsensical_limits_are_refused() {
    use fulgur_passes::Limits;
    assert_eq!(
        Limits::new(20_000, 12, Some(f64::NAN), 512).unwrap_err(),
        "the time limit must be a positive number of seconds, found NaN"
    );
    assert_eq!(
        Limits::new(20_000, 12, Some(-1.0), 512).unwrap_err(),
        "the time limit must be a positive number of seconds, found -1.0"
    );
    assert_eq!(
        Limits::new(20_000, 12, Some(0.0), 512).unwrap_err(),
        "the time limit must be a positive number of seconds, found 0.0"
    );
    assert_eq!(
        Limits::new(20_000, 12, Some(f64::INFINITY), 512).unwrap_err(),
        "the time limit must be a finite number of seconds, found infinity (leave it out for no limit)"
    );
    assert_eq!(
        Limits::new(20_000, 12, Some(f64::NEG_INFINITY), 512).unwrap_err(),
        "the time limit must be a positive number of seconds, found -inf"
    );
    assert_eq!(
        Limits::new(0, 12, None, 512).unwrap_err(),
        "the node limit must be at least 1 e-node"
    );
    assert_eq!(
        Limits::new(1, 12, None, 0).unwrap_err(),
        "the window must be at least 1 node"
    );
    assert!(Limits::new(1, 0, Some(0.5), 1).is_ok());
}

/// `--why` explains every node of the optimized graph: kernels a rewrite produced (also inside a larger term:
/// the MoE router, dispatch and grouped GEMMs, the wide matmul and slices of joined projections) and the input
/// graph's own nodes; a wrong name lists what may be asked.
#[test]
fn every_kernel_of_tiny_a_can_be_explained() {
    let dir = fixtures().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let g = g.dead_code_eliminated();
    let eq = EqSat::new(families(&RuleConfig::default(), &[]).unwrap());
    let (opt, _) = Pipeline::new()
        .with(Dce)
        .with(EqSat::new(families(&RuleConfig::default(), &[]).unwrap()))
        .run(&g, &cx(), None)
        .unwrap();
    let model = cx().model;
    let mut why = fulgur_passes::why::Why::new(&g, &opt, &eq, &model).unwrap();
    let mut rewritten = 0;
    let mut within = Vec::new();
    for (_, n) in opt.nodes() {
        let Some(name) = &n.name else { continue };
        // one instance of each template is enough: the others are the same
        if n.op.is_input()
            || matches!(n.op, fulgur_ir::Op::Constant { .. })
            || name.starts_with("layers.1.")
            || name.starts_with("layers.2.")
        {
            continue;
        }
        let r = why.explain(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&r.kernel, name);
        assert!(!r.steps.is_empty());
        if r.rewritten {
            rewritten += 1;
            assert!(r.steps.len() >= 2, "{name}: {r:?}");
            assert!(r.steps.iter().skip(1).all(|s| s.rule.is_some()), "{name}: {r:?}");
        }
        if let Some(w) = r.within {
            within.push((r.op, w));
        }
    }
    assert!(rewritten >= 10, "{rewritten}");
    // the kernels a rewrite introduced inside a larger term are explained through it
    for op in ["moe_router", "moe_dispatch", "grouped_matmul[swiglu=true]"] {
        assert!(within.iter().any(|(o, _)| o.starts_with(op)), "{op}: {within:?}");
    }
    let err = why.explain("nope").unwrap_err().to_string();
    assert!(
        err.starts_with("no kernel named `nope` in the optimized graph: give a kernel's name ("),
        "{err}"
    );
    assert!(
        err.contains("or an op, for its first kernel: concat, cos, flash_attention_rope, fused,"),
        "{err}"
    );
}
