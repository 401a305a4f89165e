//! Reference-interpreter throughput on the tiny-a MiniMax checkpoint (forward with loss, B=2, T=40).
//!
//! `cargo bench --bench interpreter`. Needs `../shared/fixtures` (or `FULGUR_FIXTURES`).

use criterion::{criterion_group, criterion_main, Criterion};
use fulgur::ir::{Interpreter, Precision};
use fulgur::models::checkpoint::Checkpoint;
use fulgur::models::{forward_graph, ForwardOptions};
use std::path::PathBuf;

fn tiny_a() -> PathBuf {
    let base = fulgur::models::fixtures::dir();
    base.join("tiny-a")
}

fn bench(c: &mut Criterion) {
    let dir = tiny_a();
    let Ok(ck) = Checkpoint::open(&dir) else {
        eprintln!("skipping: fixture {} not found", dir.display());
        return;
    };
    let reference = fulgur::ir::tensor::read_safetensors(&dir.join("reference.safetensors")).expect("reference");
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .expect("graph");
    let mut inputs = ck.load_params(&g).expect("params");
    inputs.insert("input_ids".into(), reference["input_ids"].clone());
    c.bench_function("tiny_a_forward_f32", |b| {
        b.iter(|| Interpreter::new(Precision::F32).run(&g, &inputs).expect("run"))
    });
    c.bench_function("tiny_a_build_forward_graph", |b| {
        b.iter(|| {
            forward_graph(
                &ck.config,
                &ForwardOptions {
                    loss: true,
                    ..Default::default()
                },
            )
            .expect("graph")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
