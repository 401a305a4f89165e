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
