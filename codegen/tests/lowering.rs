//! Lowering: the kernel program, run kernel by kernel on the interpreter with the buffer plan's memory, computes
//! exactly what the graph computes (f32 precision, bit for bit), on every shipped config, the examples and
//! tiny-a, optimized and not; the arena reuses memory; kernels of one template share their code.

use fulgur_codegen::compile::{compile, CompileOptions, OptLevel};
use fulgur_codegen::oracle;
use fulgur_codegen::program::{lower, BufferKind, KernelProgram};
use fulgur_ir::{Graph, Interpreter, Precision, Tensor};
use fulgur_models::{forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur_passes::testing::random_inputs;
use std::collections::HashMap;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn model_graph(cfg: &MiniMaxConfig) -> Graph {
    forward_graph(
        cfg,
        &ForwardOptions {
            loss: true,
            hidden_states: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn compiled(g: &Graph, opt: OptLevel) -> Graph {
    let opts = CompileOptions {
        opt,
        ..CompileOptions::default()
    };
    compile(g, &opts, None).unwrap().graph
}

/// Inputs with weights scaled down (deep products of unit weights explode).
fn inputs(g: &Graph, env: &[(&str, i64)], vocab: i64) -> HashMap<String, Tensor> {
    let env: HashMap<String, i64> = env.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let mut ins = random_inputs(g, &env, 3, vocab);
    for (name, t) in ins.iter_mut() {
        if !name.ends_with("norm.weight") && !name.ends_with("layernorm.weight") {
            if let fulgur_ir::Buffer::F(v) = &mut t.data {
                v.iter_mut()
                    .for_each(|x| *x = fulgur_ir::tensor::round_to(t.dtype, *x * 0.2));
            }
        }
    }
    ins
}

/// The program on the oracle equals the graph on the interpreter, bit for bit.
fn agrees(g: &Graph, p: &KernelProgram, ins: &HashMap<String, Tensor>, what: &str) {
    let want = Interpreter::new(Precision::F32).run(g, ins).unwrap();
    let got = oracle::run(p, ins, Precision::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(want.len(), got.len(), "{what}");
    for (name, w) in &want {
        let g = &got[name];
        let same = g.dtype == w.dtype
            && g.shape == w.shape
            && g.to_f64()
                .iter()
                .zip(w.to_f64())
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        assert!(same, "{what}: output `{name}` differs: {g:?} vs {w:?}");
    }
}

#[test]
fn shipped_configs_lower_exactly() {
    for file in ["minimax-small.json", "minimax-tiny-hf.json"] {
        let cfg = MiniMaxConfig::from_file(&root().join("models/configs").join(file)).unwrap();
        let g = model_graph(&cfg);
        for opt in [OptLevel::None, OptLevel::Full] {
            let og = compiled(&g, opt);
            let p = lower(&og).unwrap();
            for (b, t) in [(1, 1), (2, 7)] {
                let ins = inputs(&og, &[("B", b), ("T", t)], cfg.vocab_size as i64);
                agrees(&og, &p, &ins, &format!("{file} {opt:?} B={b} T={t}"));
            }
            // memory is reused: the arena is smaller than the transient buffers side by side
            let env: HashMap<String, i64> = [("B".into(), 2), ("T".into(), 64)].into();
            let l = p.layout(&env).unwrap();
            assert!(l.arena_bytes < l.transient_total_bytes, "{file} {opt:?}: {l:?}");
            assert!(l.planned_peak() >= l.persistent_bytes);
        }
    }
}

#[test]
fn tiny_a_lowers_exactly_and_shares_template_code() {
    let dir = fulgur_models::fixtures::dir().join("tiny-a");
    let ck = fulgur_models::checkpoint::Checkpoint::open(&dir).unwrap();
    let reference = fulgur_ir::tensor::read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let g = model_graph(&ck.config);
    let og = compiled(&g, OptLevel::Full);
    let p = lower(&og).unwrap();
    let mut ins = ck.load_params(&og).unwrap();
    ins.insert("input_ids".into(), reference["input_ids"].clone());
    agrees(&og, &p, &ins, "tiny-a");
    // three lightning layers share one template: their kernels share codes
    let codes_of = |layer: &str| -> Vec<usize> {
        p.step
            .iter()
            .filter(|k| k.name.starts_with(&format!("{layer}.")))
            .map(|k| k.code)
            .collect()
    };
    assert!(!codes_of("layers.0").is_empty());
    assert_eq!(codes_of("layers.0"), codes_of("layers.1"));
    assert_eq!(codes_of("layers.0"), codes_of("layers.2"));
    assert!(p.codes < p.step.len());
    // what depends on weights alone is prepared at load
    assert!(!p.prepare.is_empty());
    assert!(p.buffers.iter().any(|b| b.kind == BufferKind::Prepared));
}

#[test]
fn examples_lower_exactly() {
    for (name, env) in [
        ("mlp", vec![("B", 3)]),
        ("attention", vec![("T", 5)]),
        ("lightning", vec![("B", 2), ("H", 2), ("T", 9)]),
    ] {
        let src = std::fs::read_to_string(root().join("examples").join(format!("{name}.fir"))).unwrap();
        let g = fulgur_ir::text::parse(&src).unwrap();
        for opt in [OptLevel::None, OptLevel::Full] {
            let og = compiled(&g, opt);
            let p = lower(&og).unwrap();
            let ins = inputs(&og, &env, 4);
            agrees(&og, &p, &ins, &format!("{name} {opt:?}"));
        }
    }
}

/// The full-size config (whose weights cannot be materialised here) lowers, its 80 layers sharing the codes of
/// their templates, and its memory plans at a 4096-token prefill.
#[test]
fn the_full_config_lowers_with_codes_per_template() {
    let cfg = MiniMaxConfig::from_file(&root().join("models/configs/minimax-text-01.json")).unwrap();
    let g = forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let og = compiled(&g, OptLevel::Full);
    let p = lower(&og).unwrap();
    // the codes of the 80 layers are those of two layer templates (and the head's), not 80 layers' worth
    let layer_kernels = p.step.iter().filter(|k| k.name.starts_with("layers.")).count();
    assert!(layer_kernels > 500, "{layer_kernels}");
    assert!(p.codes < 60, "{} codes for {} step kernels", p.codes, p.step.len());
    let env: HashMap<String, i64> = [("B".into(), 1), ("T".into(), 4096)].into();
    let l = p.layout(&env).unwrap();
    // the weights alone are 456B parameters in f32
    assert!(l.persistent_bytes > 456_000_000_000 * 4, "{l:?}");
    assert!(l.arena_bytes < l.transient_total_bytes / 10, "{l:?}");
}
