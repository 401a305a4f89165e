//! Soundness of the attention family: every alternative (block-form lightning attention at several block
//! sizes, flash attention) agrees with the definitional graph in f64 on random inputs, at sizes drawn from a
//! seeded generator (with the edge cases T = 1 and blocks that do and do not divide T).

use fulgur_ir::{Graph, Op};
use fulgur_models::{forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur_passes::rules::{lightning, RuleConfig};
use fulgur_passes::testing::Soundness;
use fulgur_passes::testing::{check_soundness, random_inputs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn example(name: &str) -> Graph {
    let src = std::fs::read_to_string(root().join("examples").join(name)).unwrap();
    fulgur_ir::text::parse(&src).unwrap()
}

fn cfg() -> RuleConfig {
    RuleConfig {
        lightning_blocks: vec![1, 3, 4, 16],
        ..RuleConfig::default()
    }
}

fn env(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// The attention family and the rule `lightning_layer` builds on: `rms-norm-pattern` (fusion family), which
/// turns the model's written-out RMSNorm into the `rms_norm` the layer kernel absorbs.
fn with_rms_pattern() -> Vec<fulgur_passes::rules::Family> {
    let rms = fulgur_passes::rules::fusion::family(&cfg())
        .rules
        .into_iter()
        .filter(|r| r.name.as_str() == "rms-norm-pattern")
        .collect();
    vec![
        lightning::family(&cfg()),
        fulgur_passes::rules::Family {
            name: "rms-norm-pattern",
            rules: rms,
        },
    ]
}

/// Saturates with the attention family and checks soundness.
fn check(g: &Graph, env: &HashMap<String, i64>, seed: u64) -> Soundness {
    check_with(g, env, seed, vec![lightning::family(&cfg())])
}

fn check_with(
    g: &Graph,
    env: &HashMap<String, i64>,
    seed: u64,
    families: Vec<fulgur_passes::rules::Family>,
) -> Soundness {
    let mut inputs = random_inputs(g, env, seed, 8);
    // decay rates must be non-negative for the definitional form not to overflow above the diagonal
    if let Some(l) = inputs.get_mut("lambda") {
        if let fulgur_ir::Buffer::F(v) = &mut l.data {
            v.iter_mut().for_each(|x| *x = x.abs() * 0.5);
        }
    }
    let r = check_soundness(g, families, &inputs, 1e-9).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{env:?}: {r}");
    r
}

/// The op names of the graph the standard extraction builds after saturating with the attention family.
fn extracted_ops(g: &Graph) -> Vec<String> {
    let model = fulgur_passes::CostModel::new(fulgur_passes::Target::by_name("H100").unwrap());
    let mut eq = fulgur_passes::EqSat::new(vec![lightning::family(&cfg())]);
    eq.limits = fulgur_passes::Limits::default();
    let cx = fulgur_passes::PassContext { model };
    let (opt, _) = fulgur_passes::Pass::run(&eq, g, &cx).unwrap();
    opt.nodes().map(|(_, n)| n.op.name().to_string()).collect()
}

#[test]
fn lightning_example_block_forms_are_sound() {
    let g = example("lightning.fir");
    let mut rng = StdRng::seed_from_u64(0x11);
    for seed in 0..6u64 {
        // T = 1 first; blocks 1, 3, 4 and 16 then divide some lengths and not others
        let t = if seed == 0 { 1 } else { rng.gen_range(2..=40) };
        let (b, h) = (rng.gen_range(1..=2), rng.gen_range(1..=3));
        let r = check(&g, &env(&[("B", b), ("H", h), ("T", t)]), seed);
        // one lightning_attention per block size, at least
        assert!(r.checked >= 4, "{r}");
    }
}

#[test]
fn attention_example_becomes_flash_attention_soundly() {
    let g = example("attention.fir");
    let mut rng = StdRng::seed_from_u64(0x12);
    for seed in 0..4u64 {
        let t = if seed == 0 { 1 } else { rng.gen_range(2..=33) };
        let r = check(&g, &env(&[("T", t)]), seed);
        assert!(r.checked >= 1, "{r}");
    }
    // and flash attention is what the extractor builds
    let ops = extracted_ops(&g);
    assert!(ops.iter().any(|o| o == "flash_attention"), "{ops:?}");
    assert!(!ops.iter().any(|o| o == "softmax"), "{ops:?}");
}

#[test]
fn minimax_layers_are_rewritten_soundly() {
    let text = r#"{"model_type": "minimax", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 8,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
        "num_local_experts": 3, "num_experts_per_tok": 2, "layer_types": ["linear_attention", "full_attention"],
        "block_size": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}"#;
    let cfg = MiniMaxConfig::from_json_str(text, "test").unwrap();
    let g = forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(0x13);
    for seed in 0..3u64 {
        let t = if seed == 0 { 1 } else { rng.gen_range(2..=10) };
        let r = check_with(
            &g,
            &env(&[("B", rng.gen_range(1..=2)), ("T", t)]),
            seed,
            with_rms_pattern(),
        );
        assert!(r.checked >= 4, "{r}");
    }
    // and the rules do fire on this graph
    let mut eg = fulgur_passes::lang::EGraph::new(fulgur_passes::lang::ShapeAnalysis::default());
    fulgur_passes::lang::graph_to_egraph(&g, &mut eg);
    let rules: Vec<_> = with_rms_pattern().into_iter().flat_map(|f| f.rules).collect();
    let runner = fulgur_passes::Limits::default().runner(eg, None).run(&rules);
    let names: Vec<String> = runner
        .egraph
        .classes()
        .flat_map(|c| {
            c.nodes
                .iter()
                .filter_map(|n| n.ir_op().map(|o: &Op| o.name().to_string()))
        })
        .collect();
    assert!(names.iter().any(|n| n == "lightning_attention"));
    assert!(names.iter().any(|n| n == "flash_attention"));
    assert!(names.iter().any(|n| n == "lightning_layer"));
    assert!(names.iter().any(|n| n == "flash_attention_rope"));
}

fn cfg_rules() -> RuleConfig {
    RuleConfig::default()
}

#[test]
fn partial_rotary_moves_into_the_flash_prologue_soundly() {
    // MiniMax's original format: rotary over the first 4 of 8 dims, GQA 4:1, pre-norm
    let text = r#"{"model_type": "minimax_text_01", "vocab_size": 30, "hidden_size": 16, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "rotary_dim": 4,
        "num_local_experts": 2, "num_experts_per_tok": 1, "attn_type_list": [1], "rope_theta": 10000000}"#;
    let cfg = MiniMaxConfig::from_json_str(text, "test").unwrap();
    let g = forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(0x14);
    for seed in 0..2u64 {
        let r = check(
            &g,
            &env(&[("B", rng.gen_range(1..=2)), ("T", rng.gen_range(1..=8))]),
            seed,
        );
        assert!(r.checked >= 1, "{r}");
    }
    let mut eg = fulgur_passes::lang::EGraph::new(fulgur_passes::lang::ShapeAnalysis::default());
    fulgur_passes::lang::graph_to_egraph(&g, &mut eg);
    let runner = fulgur_passes::Limits::default()
        .runner(eg, None)
        .run(&lightning::family(&cfg_rules()).rules);
    let found = runner.egraph.classes().any(|c| {
        c.nodes.iter().any(|n| {
            matches!(
                n.ir_op(),
                Some(Op::Composite(fulgur_ir::Composite::FlashAttentionRope {
                    rotary: 4,
                    ..
                }))
            )
        })
    });
    assert!(found, "flash_attention_rope[rotary=4] not derived");
}
