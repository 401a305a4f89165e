//! Config parsing: the exact error messages (each names the file and the field), the shipped configs, and
//! the layer-pattern defaults.

use fulgur_models::{Flavor, LayerType, MiniMaxConfig, ModelError};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const SRC: &str = "cfg.json";

/// A valid transformers-format config (tiny-a's shape).
fn hf() -> Value {
    json!({
        "model_type": "minimax",
        "vocab_size": 512, "hidden_size": 128, "intermediate_size": 128,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "num_local_experts": 4, "num_experts_per_tok": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "block_size": 16
    })
}

/// A valid original-format config.
fn orig() -> Value {
    json!({
        "model_type": "minimax_text_01",
        "vocab_size": 256, "hidden_size": 96, "intermediate_size": 64,
        "num_hidden_layers": 2, "attn_type_list": [0, 1],
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "rotary_dim": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2,
        "rope_theta": 10000000, "postnorm": true
    })
}

fn with(mut v: Value, key: &str, x: Value) -> Value {
    v.as_object_mut().unwrap().insert(key.to_string(), x);
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

fn parse(v: &Value) -> Result<MiniMaxConfig, ModelError> {
    MiniMaxConfig::from_json_str(&v.to_string(), SRC)
}

/// The Display of the error; also checks it is a `Config` error naming `field`.
fn error(v: &Value, field: &str) -> String {
    let e = parse(v).expect_err("the config should be refused");
    match &e {
        ModelError::Config { file, field: f, .. } => {
            assert_eq!(file, SRC);
            assert_eq!(f, field, "error: {e}");
        }
        other => panic!("expected a Config error, got {other:?}"),
    }
    e.to_string()
}

#[test]
fn valid_bases_parse() {
    let a = parse(&hf()).unwrap();
    assert_eq!(a.flavor, Flavor::Transformers);
    assert_eq!(a.rotary_dim, a.head_dim);
    let b = parse(&orig()).unwrap();
    assert_eq!(b.flavor, Flavor::Original);
    assert_eq!(
        (b.rotary_dim, b.layer_types.clone()),
        (8, vec![LayerType::Linear, LayerType::Full])
    );
}

#[test]
fn missing_model_type() {
    assert_eq!(
        error(&without(hf(), "model_type"), "model_type"),
        "cfg.json: field `model_type`: missing (required to tell the config format)"
    );
}

#[test]
fn unknown_model_type() {
    assert_eq!(
        error(&with(hf(), "model_type", json!("llama")), "model_type"),
        "cfg.json: field `model_type`: expected \"minimax\" or \"minimax_text_01\", found \"llama\""
    );
    assert_eq!(
        error(&with(hf(), "model_type", json!(3)), "model_type"),
        "cfg.json: field `model_type`: expected a string, found 3"
    );
}

#[test]
fn field_of_the_wrong_type() {
    assert_eq!(
        error(&with(hf(), "hidden_size", json!("128")), "hidden_size"),
        "cfg.json: field `hidden_size`: expected a non-negative integer, found \"128\""
    );
    assert_eq!(
        error(&with(hf(), "num_attention_heads", json!(-4)), "num_attention_heads"),
        "cfg.json: field `num_attention_heads`: expected a non-negative integer, found -4"
    );
    assert_eq!(
        error(&with(hf(), "rms_norm_eps", json!("1e-5")), "rms_norm_eps"),
        "cfg.json: field `rms_norm_eps`: expected a number, found \"1e-5\""
    );
    assert_eq!(
        error(&with(hf(), "tie_word_embeddings", json!(1)), "tie_word_embeddings"),
        "cfg.json: field `tie_word_embeddings`: expected true or false, found 1"
    );
    assert_eq!(
        error(&with(orig(), "postnorm", json!("yes")), "postnorm"),
        "cfg.json: field `postnorm`: expected true or false, found \"yes\""
    );
    assert_eq!(
        error(&with(hf(), "layer_types", json!("full_attention")), "layer_types"),
        "cfg.json: field `layer_types`: expected a list, found \"full_attention\""
    );
}

#[test]
fn missing_required_fields() {
    for k in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "intermediate_size",
        "num_local_experts",
    ] {
        assert_eq!(
            error(&without(hf(), k), k),
            format!("cfg.json: field `{k}`: missing (required)")
        );
    }
    assert_eq!(
        error(&without(orig(), "attn_type_list"), "attn_type_list"),
        "cfg.json: field `attn_type_list`: missing (required in the original format)"
    );
}

#[test]
fn layer_types_length() {
    let v = with(
        hf(),
        "layer_types",
        json!(["linear_attention", "linear_attention", "full_attention"]),
    );
    assert_eq!(
        error(&v, "layer_types"),
        "cfg.json: field `layer_types`: has 3 entries but num_hidden_layers is 4"
    );
    assert_eq!(
        error(&with(orig(), "attn_type_list", json!([0, 1, 0])), "attn_type_list"),
        "cfg.json: field `attn_type_list`: has 3 entries but num_hidden_layers is 2"
    );
}

#[test]
fn unknown_layer_type() {
    let v = with(
        hf(),
        "layer_types",
        json!([
            "linear_attention",
            "sliding_attention",
            "linear_attention",
            "full_attention"
        ]),
    );
    assert_eq!(
        error(&v, "layer_types[1]"),
        "cfg.json: field `layer_types[1]`: expected \"linear_attention\" or \"full_attention\", found \"sliding_attention\""
    );
    assert_eq!(
        error(&with(orig(), "attn_type_list", json!([0, 2])), "attn_type_list[1]"),
        "cfg.json: field `attn_type_list[1]`: expected 0 or 1, found 2"
    );
}

#[test]
fn kv_heads_must_divide_heads() {
    assert_eq!(
        error(&with(hf(), "num_key_value_heads", json!(3)), "num_key_value_heads"),
        "cfg.json: field `num_key_value_heads`: 3 does not divide num_attention_heads = 4"
    );
}

#[test]
fn top_k_exceeds_experts() {
    assert_eq!(
        error(&with(hf(), "num_experts_per_tok", json!(5)), "num_experts_per_tok"),
        "cfg.json: field `num_experts_per_tok`: 5 exceeds num_local_experts = 4"
    );
}

#[test]
fn rope_theta_contradicts_rope_parameters() {
    assert_eq!(
        error(&with(hf(), "rope_theta", json!(1000000.0)), "rope_theta"),
        "cfg.json: field `rope_theta`: 1000000 contradicts rope_parameters.rope_theta = 10000"
    );
    // agreeing values are accepted
    assert_eq!(parse(&with(hf(), "rope_theta", json!(10000))).unwrap().rope_theta, 1e4);
    let v = with(
        hf(),
        "rope_parameters",
        json!({"rope_type": "yarn", "rope_theta": 10000.0}),
    );
    assert_eq!(
        error(&v, "rope_parameters.rope_type"),
        "cfg.json: field `rope_parameters.rope_type`: only \"default\" is supported, found \"yarn\""
    );
}

#[test]
fn num_experts_contradicts_num_local_experts() {
    assert_eq!(
        error(&with(hf(), "num_experts", json!(8)), "num_experts"),
        "cfg.json: field `num_experts`: 8 contradicts num_local_experts = 4"
    );
    // the alias alone (transformers 5) is accepted
    let v = with(without(hf(), "num_local_experts"), "num_experts", json!(4));
    assert_eq!(parse(&v).unwrap().num_local_experts, 4);
}

#[test]
fn attn_type_list_in_a_transformers_config() {
    assert_eq!(
        error(&with(hf(), "attn_type_list", json!([0, 0, 0, 1])), "attn_type_list"),
        "cfg.json: field `attn_type_list`: is an original-format field, but model_type is \"minimax\" \
         (transformers format): use `layer_types`"
    );
    let v = with(orig(), "layer_types", json!(["linear_attention", "full_attention"]));
    assert_eq!(
        error(&v, "layer_types"),
        "cfg.json: field `layer_types`: is a transformers field; the original format uses attn_type_list"
    );
}

#[test]
fn odd_rotary_dim() {
    assert_eq!(
        error(&with(orig(), "rotary_dim", json!(7)), "rotary_dim"),
        "cfg.json: field `rotary_dim`: 7 must be even and in 2..=16"
    );
    assert_eq!(
        error(&with(orig(), "rotary_dim", json!(18)), "rotary_dim"),
        "cfg.json: field `rotary_dim`: 18 must be even and in 2..=16"
    );
}

#[test]
fn other_validation_errors() {
    assert_eq!(
        error(&with(hf(), "num_key_value_heads", json!(0)), "num_key_value_heads"),
        "cfg.json: field `num_key_value_heads`: must be positive"
    );
    assert_eq!(
        error(&with(hf(), "rms_norm_eps", json!(0.0)), "rms_norm_eps"),
        "cfg.json: field `rms_norm_eps`: must be positive"
    );
    assert_eq!(
        error(
            &with(hf(), "rope_parameters", json!({"rope_theta": -1.0})),
            "rope_theta"
        ),
        "cfg.json: field `rope_theta`: must be positive"
    );
    let v = with(
        with(without(hf(), "head_dim"), "num_attention_heads", json!(3)),
        "num_key_value_heads",
        json!(1),
    );
    assert_eq!(
        error(&v, "head_dim"),
        "cfg.json: field `head_dim`: missing, and hidden_size is not divisible by num_attention_heads"
    );
    let v = with(
        with(orig(), "shared_intermediate_size", json!(16)),
        "shared_moe_mode",
        json!("softmax"),
    );
    assert_eq!(
        error(&v, "shared_moe_mode"),
        "cfg.json: field `shared_moe_mode`: only \"sigmoid\" is supported, found \"softmax\""
    );
}

#[test]
fn invalid_json() {
    let e = MiniMaxConfig::from_json_str("{\"model_type\": \"minimax\",\n  \"hidden_size\": }", SRC).unwrap_err();
    let s = e.to_string();
    assert!(
        s.starts_with("cfg.json: field `(file)`: invalid JSON: expected value at line 2 column"),
        "{s}"
    );
    let e = MiniMaxConfig::from_json_str("[1, 2]", SRC).unwrap_err();
    assert_eq!(e.to_string(), "cfg.json: field `(file)`: expected a JSON object");
    let e = MiniMaxConfig::from_file(Path::new("/nonexistent/dir/config.json")).unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    assert!(e.to_string().starts_with("`/nonexistent/dir/config.json`: "), "{e}");
}

fn configs_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"))
}

#[test]
fn every_shipped_config_parses() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let cfg = MiniMaxConfig::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(cfg.layer_types.len(), cfg.num_hidden_layers, "{}", p.display());
        n += 1;
    }
    assert!(n >= 3, "expected the shipped configs, found {n}");
}

#[test]
fn minimax_text_01_layer_pattern() {
    let cfg = MiniMaxConfig::from_file(&configs_dir().join("minimax-text-01.json")).unwrap();
    assert_eq!(cfg.flavor, Flavor::Original);
    assert_eq!(cfg.num_hidden_layers, 80);
    let full: Vec<usize> = (7..80).step_by(8).collect();
    assert_eq!(cfg.full_layers(), full);
    assert_eq!(cfg.linear_layers().len(), 70);
    for l in 0..80 {
        let want = if (l + 1) % 8 == 0 {
            LayerType::Full
        } else {
            LayerType::Linear
        };
        assert_eq!(cfg.layer_types[l], want, "layer {l}");
    }
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.head_dim,
            cfg.num_key_value_heads
        ),
        (6144, 64, 128, 8)
    );
    assert_eq!(
        (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size),
        (32, 2, 9216)
    );
    assert_eq!((cfg.rotary_dim, cfg.rope_theta, cfg.vocab_size), (64, 1e7, 200064));
    assert!(cfg.postnorm && !cfg.tie_word_embeddings && cfg.shared_intermediate_size == 0);
    assert_eq!(cfg.block_size, 256);
    let alpha = 160f64.powf(0.25);
    for a in [cfg.linear_attn_alpha, cfg.full_attn_alpha, cfg.mlp_alpha] {
        assert!((a - alpha).abs() < 1e-12, "alpha {a}");
    }
    assert_eq!(cfg.hd(), 8192);
    assert_eq!(cfg.lightning_norm_eps, 1e-6);
}

#[test]
fn transformers_default_layer_pattern_alternates_from_full() {
    let cfg = parse(&without(with(hf(), "num_hidden_layers", json!(5)), "layer_types")).unwrap();
    use LayerType::*;
    assert_eq!(cfg.layer_types, vec![Full, Linear, Full, Linear, Full]);
    // and the config says so
    assert!(cfg.layer_types_defaulted);
    assert_eq!(
        cfg.warnings(),
        vec![
            "no `layer_types`: the 5 layers alternate full and linear attention, starting with full \
              (transformers' default); give `layer_types` if the model's layers differ"
                .to_string()
        ]
    );
    assert!(parse(&hf()).unwrap().warnings().is_empty());
    assert!(parse(&orig()).unwrap().warnings().is_empty());
}

#[test]
fn tiny_a_fixture_config() {
    let dir = fulgur_models::fixtures::dir();
    let cfg = MiniMaxConfig::from_file(&dir.join("tiny-a/config.json")).unwrap();
    assert_eq!(cfg.flavor, Flavor::Transformers);
    use LayerType::*;
    assert_eq!(cfg.layer_types, vec![Linear, Linear, Linear, Full]);
    assert_eq!((cfg.rope_theta, cfg.rotary_dim, cfg.block_size), (1e4, 32, 16));
}

/// Sizes whose products overflow are errors naming the field, never wrapped counts (a config with dimensions
/// near 2⁴⁰ once gave zero parameters), and tables the graph would materialise are bounded.
#[test]
fn sizes_that_overflow_are_refused() {
    let big = json!(1u64 << 40);
    assert_eq!(
        error(
            &with(with(hf(), "hidden_size", big.clone()), "vocab_size", json!(1u64 << 30)),
            "hidden_size"
        ),
        "cfg.json: field `hidden_size`: embed_tokens needs vocab_size 1073741824 × hidden_size 1099511627776 \
         elements: more than a 64-bit count holds"
    );
    assert_eq!(
        error(
            &with(with(hf(), "hidden_size", big.clone()), "intermediate_size", big.clone()),
            "intermediate_size"
        ),
        "cfg.json: field `intermediate_size`: one expert's weights needs 3 × hidden_size 1099511627776 × \
         intermediate_size 1099511627776 elements: more than a 64-bit count holds"
    );
    assert_eq!(
        error(&with(hf(), "head_dim", big.clone()), "head_dim"),
        "cfg.json: field `head_dim`: the graph would hold 549755813888 rotary frequencies (one per pair of \
         dimensions); at most 16777216 are supported"
    );
    assert_eq!(
        error(
            &with(
                with(hf(), "num_attention_heads", big.clone()),
                "num_key_value_heads",
                big
            ),
            "num_attention_heads"
        ),
        "cfg.json: field `num_attention_heads`: the graph would hold 1099511627776 decay rates (one per head); at \
         most 16777216 are supported"
    );
    assert_eq!(
        error(&with(hf(), "vocab_size", json!(u64::MAX)), "vocab_size"),
        "cfg.json: field `vocab_size`: 18446744073709551615 does not fit a 64-bit signed dimension"
    );
}
