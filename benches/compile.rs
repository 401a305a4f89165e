//! Compile time of the optimizer: MiniMax-Text-01's layout at 8, 16 and 80 layers (symbolic batch and
//! length) and the small configs, through the standard pipeline (build graph + DCE + per-template
//! equality saturation + extraction + stitching).
//!
//! `cargo bench --bench compile`

use criterion::{criterion_group, criterion_main, Criterion};
use fulgur::models::{forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur::passes::rules::RuleConfig;
use fulgur::passes::{standard_pipeline, CostModel, Limits, PassContext, Target};
use std::path::PathBuf;

fn config(file: &str) -> MiniMaxConfig {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/configs")).join(file);
    MiniMaxConfig::from_file(&p).expect("config")
}

fn compile(cfg: &MiniMaxConfig) -> usize {
    let g = forward_graph(
        cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .expect("graph");
    let cx = PassContext {
        model: CostModel::new(Target::by_name("H100").expect("target")),
    };
    let p = standard_pipeline(&RuleConfig::default(), &[], Limits::default()).expect("pipeline");
    p.run(&g, &cx, None).expect("optimize").0.node_count()
}

fn bench(c: &mut Criterion) {
    let full = config("minimax-text-01.json");
    let mut group = c.benchmark_group("compile_minimax_text_01");
    group.sample_size(10);
    for layers in [8usize, 16, 80] {
        let mut cfg = full.clone();
        cfg.num_hidden_layers = layers;
        cfg.layer_types.truncate(layers);
        group.bench_function(format!("{layers}_layers"), |b| b.iter(|| compile(&cfg)));
    }
    group.finish();
    let mut group = c.benchmark_group("compile_small");
    group.sample_size(10);
    for file in ["minimax-small.json", "minimax-tiny-hf.json"] {
        let cfg = config(file);
        group.bench_function(file.trim_end_matches(".json"), |b| b.iter(|| compile(&cfg)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
