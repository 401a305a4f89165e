//! Parity with the transformers reference fixtures (`../shared/fixtures/tiny-a`).

use fulgur_ir::{Interpreter, Precision, Tensor};
use fulgur_models::checkpoint::Checkpoint;
use fulgur_models::{forward_graph, ForwardOptions};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    fulgur_models::fixtures::dir()
}

fn tiny_a() -> PathBuf {
    let p = fixtures().join("tiny-a");
    assert!(
        p.join("config.json").exists(),
        "fixture {} is missing (set FULGUR_FIXTURES)",
        p.display()
    );
    p
}

#[test]
fn tiny_a_forward_matches_transformers() {
    let dir = tiny_a();
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
    let mut inputs: HashMap<String, Tensor> = ck.load_params(&g).unwrap();
    inputs.insert("input_ids".into(), reference["input_ids"].clone());
    let out = Interpreter::new(Precision::F32).run(&g, &inputs).unwrap();
    let n = ck.config.num_hidden_layers;
    for i in 0..=n {
        let name = format!("hidden_states.{i}");
        let e = out[&name].rel_l2(&reference[&name]);
        println!("{name}: rel {e:.3e}");
        assert!(e < 1e-4, "{name}: relative error {e}");
    }
    let e = out["logits"].rel_l2(&reference["logits"]);
    println!("logits: rel {e:.3e}");
    assert!(e < 1e-4, "logits: relative error {e}");
    let (a, b) = (out["loss"].to_f64()[0], reference["loss"].to_f64()[0]);
    println!("loss: {a} vs {b}");
    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "loss {a} vs reference {b}");
}
