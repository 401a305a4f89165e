//! Greedy decoding with carried states reproduces transformers' `generate` on tiny-a.

use fulgur_ir::Precision;
use fulgur_models::checkpoint::Checkpoint;
use fulgur_models::{decode_graph, forward_graph, ForwardOptions};
use fulgur_runtime::{generate, ReferenceBackend, ReferenceExecutable};
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
    let weights = std::rc::Rc::new(std::cell::RefCell::new(ck.load_params(&prefill).unwrap()));
    let backend = ReferenceBackend {
        precision: Precision::F32,
        memory_limit: None,
    };
    let mut prefill = ReferenceExecutable {
        backend,
        graph: prefill,
        weights: weights.clone(),
    };
    let mut decode = ReferenceExecutable {
        backend,
        graph: decode,
        weights,
    };
    let n = fx["step_logits"].shape[0];
    let mut calls = 0;
    let out = generate::greedy(&mut prefill, &mut decode, &fx["prompt"], n, |_, _| calls += 1).unwrap();
    assert_eq!(calls, n);
    assert_eq!(out.generated.shape, fx["generated"].shape);
    assert_eq!(out.generated.to_i64(), fx["generated"].to_i64(), "greedy tokens differ");
    assert_eq!(out.step_logits.shape, fx["step_logits"].shape);
    let e = out.step_logits.rel_l2(&fx["step_logits"]);
    println!("step_logits: rel {e:.3e}");
    assert!(e < 1e-4, "step_logits relative error {e}");
}

/// The same decode on the CPU backend: prefill and decode JIT-compiled from the optimized graphs, the weights
/// loaded once into the prefill and shared with the decode.
#[cfg(feature = "llvm")]
#[test]
fn tiny_a_greedy_decode_on_cpu_matches_transformers() {
    use fulgur_runtime::cpu::{CpuOptions, CpuProgram};
    let dir = tiny_a();
    let ck = Checkpoint::open(&dir).unwrap();
    let fx = fulgur_ir::tensor::read_safetensors(&dir.join("decode.safetensors")).unwrap();
    let opts = fulgur_codegen::compile::CompileOptions {
        target: "CPU".into(),
        ..Default::default()
    };
    let optimize = |g| fulgur_codegen::compile::compile(&g, &opts, None).unwrap().graph;
    let prefill = optimize(
        forward_graph(
            &ck.config,
            &ForwardOptions {
                states: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let decode = optimize(decode_graph(&ck.config).unwrap());
    let weights = ck.load_params(&prefill).unwrap();
    let lower = |g: &fulgur_ir::Graph| fulgur_codegen::program::lower(g).unwrap();
    let mut p = CpuProgram::new(lower(&prefill), CpuOptions::default()).unwrap();
    let mut d = CpuProgram::new(lower(&decode), CpuOptions::default()).unwrap();
    p.load_weights(&weights).unwrap();
    let shared = d.share_weights(&p);
    assert_eq!(shared, d.program.params.len(), "every decode weight is shared");
    assert!(d.missing_weights().is_empty());
    let n = fx["step_logits"].shape[0];
    let out = generate::greedy(&mut p, &mut d, &fx["prompt"], n, |_, _| {}).unwrap();
    // the weights were prepared and packed once per program, not once per decode step
    assert_eq!((p.prepare_runs(), d.prepare_runs()), (1, 1));
    // from the second decode step on, the states stayed in the program's memory
    assert_eq!(d.carried_runs, n - 2, "decode steps that carried their states");
    assert_eq!(out.generated.to_i64(), fx["generated"].to_i64(), "greedy tokens differ");
    let e = out.step_logits.rel_l2(&fx["step_logits"]);
    println!("cpu step_logits: rel {e:.3e}");
    assert!(e < 1e-4, "step_logits relative error {e}");
}
