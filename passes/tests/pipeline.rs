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
