//! Greedy decoding with carried states reproduces transformers' `generate` on tiny-a.

use fulgur_ir::Precision;
use fulgur_models::checkpoint::Checkpoint;
use fulgur_models::{decode_graph, forward_graph, ForwardOptions};
use fulgur_runtime::{generate, ReferenceBackend};
use std::path::PathBuf;

fn tiny_a() -> PathBuf {
    let base = fulgur_models::fixtures::dir();
    let p = base.join("tiny-a");
    assert!(
        p.join("config.json").exists(),
        "fixture {} is missing (set FULGUR_FIXTURES)",
        p.display()
    );
    p
}

#[test]
fn tiny_a_greedy_decode_matches_transformers() {
    let dir = tiny_a();
    let ck = Checkpoint::open(&dir).unwrap();
    let fx = fulgur_ir::tensor::read_safetensors(&dir.join("decode.safetensors")).unwrap();
    let prefill = forward_graph(
        &ck.config,
        &ForwardOptions {
            states: true,
            ..Default::default()
        },
    )
    .unwrap();
    let decode = decode_graph(&ck.config).unwrap();
    let params = ck.load_params(&prefill).unwrap();
    let n = fx["step_logits"].shape[0];
    let mut calls = 0;
    let out = generate::greedy(
        &ReferenceBackend {
            precision: Precision::F32,
            memory_limit: None,
        },
        &prefill,
        &decode,
        &params,
        &fx["prompt"],
        n,
        |_, _| calls += 1,
    )
    .unwrap();
    assert_eq!(calls, n);
    assert_eq!(out.generated.shape, fx["generated"].shape);
    assert_eq!(out.generated.to_i64(), fx["generated"].to_i64(), "greedy tokens differ");
    assert_eq!(out.step_logits.shape, fx["step_logits"].shape);
    let e = out.step_logits.rel_l2(&fx["step_logits"]);
    println!("step_logits: rel {e:.3e}");
    assert!(e < 1e-4, "step_logits relative error {e}");
}
