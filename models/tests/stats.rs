//! Model statistics against MINIMAX.md's numbers, the tiny-a fixture's tensor sizes and the graphs' parameters.

use fulgur_ir::Op;
use fulgur_models::stats::stats;
use fulgur_models::{forward_graph, ForwardOptions, MiniMaxConfig};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn configs_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"))
}

fn fixtures() -> PathBuf {
    fulgur_models::fixtures::dir()
}

fn text01() -> MiniMaxConfig {
    MiniMaxConfig::from_file(&configs_dir().join("minimax-text-01.json")).unwrap()
}

fn within(x: u64, want: f64, rel: f64) -> bool {
    ((x as f64) - want).abs() <= rel * want
}

/// Σ numel over the parameters of the forward graph.
fn graph_params(cfg: &MiniMaxConfig) -> u64 {
    let g = forward_graph(cfg, &ForwardOptions::default()).unwrap();
    g.params()
        .into_iter()
        .map(|id| match &g.node(id).op {
            Op::Param { ty, .. } => ty.shape.as_consts().unwrap().iter().product::<usize>() as u64,
            _ => unreachable!(),
        })
        .sum()
}

#[test]
fn minimax_text_01_counts() {
    let cfg = text01();
    let s = stats(&cfg, 4096).unwrap();
    println!(
        "total {} active {} active+emb {} flops/token {:.4e}",
        s.total_params, s.active_params, s.active_params_with_embeddings, s.forward_flops_per_token
    );
    assert!(within(s.total_params, 456.09e9, 1e-3), "total {}", s.total_params);
    assert!(within(s.active_params, 45.94e9, 1e-3), "active {}", s.active_params);
    assert!(
        within(s.active_params_with_embeddings, 48.40e9, 1e-3),
        "active with embeddings {}",
        s.active_params_with_embeddings
    );
    assert_eq!(s.lightning_state_bytes_per_seq, 70 * 64 * 128 * 128 * 4);
    assert_eq!(s.lightning_state_bytes_per_seq, 280 << 20); // 280 MiB
    assert_eq!(s.kv_cache_bytes_per_token, 10 * 2 * 8 * 128 * 2);
    assert_eq!(s.kv_cache_bytes_per_token, 40 << 10); // 40 KiB
    assert_eq!((s.num_lightning_layers, s.num_softmax_layers), (70, 10));
    assert_eq!(s.bf16_weight_bytes, 2 * s.total_params);
    assert_eq!(s.seq_len, 4096);
    let sum: u64 = s.components.iter().map(|c| c.params).sum();
    assert_eq!(sum, s.total_params);
    let active: u64 = s.components.iter().map(|c| c.active).sum();
    assert_eq!(active, s.active_params);

    // exact counts recomputed from MINIMAX.md §1–§4
    let (c, v, h, kvh, d, e, i, k, layers) = (6144u64, 200064u64, 64u64, 8u64, 128u64, 32u64, 9216u64, 2u64, 80u64);
    let hd = h * d;
    let lightning = 4 * hd * c + c * hd + hd; // qkv (3·HD) + gate (HD) + out + norm
    let softmax = hd * c + 2 * kvh * d * c + c * hd;
    assert_eq!(lightning, 251_666_432); // "251.68 M"
    assert_eq!(softmax, 113_246_208); // "113.26 M"
    let expert = 3 * c * i;
    assert_eq!(expert, 169_869_312); // "169.87 M"
    let per_layer_moe = e * expert + e * c;
    let norms = layers * 2 * c + c;
    let total = 2 * v * c + 70 * lightning + 10 * softmax + layers * per_layer_moe + norms;
    assert_eq!(s.total_params, total);
    let active_want = 70 * lightning + 10 * softmax + layers * (k * expert + e * c) + norms;
    assert_eq!(s.active_params, active_want);
    assert_eq!(s.active_params_with_embeddings, active_want + 2 * v * c);

    // forward FLOPs per token: 2 per multiply-add of every matmul a token passes (router and lm_head
    // included), lightning attention blockwise (b = 256 divides 4096: mean in-block count (b+1)/2), softmax
    // attention over the mean causal context (N+1)/2
    let n = 4096.0;
    let matmul = (70 * (lightning - hd) + 10 * softmax + layers * (k * expert + e * c) + v * c) as f64;
    let (hf, df) = (h as f64, d as f64);
    let lin_attn = hf * (4.0 * df * 128.5 + 4.0 * df * df);
    let sm_attn = hf * 4.0 * df * (n + 1.0) / 2.0;
    let want = 2.0 * matmul + 70.0 * lin_attn + 10.0 * sm_attn;
    let got = s.forward_flops_per_token;
    assert!((got - want).abs() <= 1e-12 * want, "flops {got:e} vs {want:e}");
    // the graph's parameters are what the stats count
    assert_eq!(graph_params(&cfg), s.total_params);
}

/// Sizes of the tensors stored in a safetensors file, without derived buffers.
fn stored_params(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(n, _)| {
            !["slope_rate", "query_decay", "key_decay", "diagonal_decay"]
                .iter()
                .any(|d| n.ends_with(d))
        })
        .map(|(_, v)| v.shape().iter().product::<usize>() as u64)
        .sum()
}

#[test]
fn tiny_a_total_is_the_fixture_parameter_count() {
    let dir = fixtures().join("tiny-a");
    let cfg = MiniMaxConfig::from_file(&dir.join("config.json")).unwrap();
    let s = stats(&cfg, 40).unwrap();
    let stored = stored_params(&dir.join("model.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["params"].as_u64(), Some(1_216_000));
    assert_eq!(stored, 1_216_000);
    assert_eq!(s.total_params, stored);
    assert_eq!(graph_params(&cfg), stored);
    assert_eq!(s.lightning_state_bytes_per_seq, 3 * 4 * 32 * 32 * 4);
    assert_eq!(s.kv_cache_bytes_per_token, 2 * 2 * 32 * 2);
}

#[test]
fn stats_count_the_graph_parameters_for_every_shipped_config() {
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let cfg = MiniMaxConfig::from_file(&p).unwrap();
        assert_eq!(
            stats(&cfg, 1000).unwrap().total_params,
            graph_params(&cfg),
            "{}",
            p.display()
        );
    }
}

#[test]
fn shared_expert_and_tied_embeddings_are_counted() {
    let json = r#"{
      "model_type": "minimax_text_01", "vocab_size": 41, "hidden_size": 20, "intermediate_size": 12,
      "num_hidden_layers": 4, "attn_type_list": [0, 0, 1, 0],
      "num_attention_heads": 6, "num_key_value_heads": 1, "head_dim": 8, "rotary_dim": 4,
      "num_local_experts": 4, "num_experts_per_tok": 2,
      "shared_intermediate_size": 9, "shared_moe_mode": "sigmoid", "tie_word_embeddings": true
    }"#;
    let cfg = MiniMaxConfig::from_json_str(json, "shared.json").unwrap();
    let s = stats(&cfg, 64).unwrap();
    assert_eq!(s.total_params, graph_params(&cfg));
    // the shared expert (gate, up, down and the coefficient) is active for every token
    let shared = 4 * (3 * 20 * 9 + 20);
    assert!(s
        .components
        .iter()
        .any(|c| c.name == "shared_expert" && c.params == shared && c.active == shared));
    // tied: embeddings counted once
    assert_eq!(s.active_params_with_embeddings, s.active_params + 41 * 20);
}
