//! Model statistics from a config alone: parameters, active parameters, FLOPs, memory.
//!
//! Conventions (as MiniMax's model card counts): active parameters per token exclude the embeddings and
//! `lm_head` and count `num_experts_per_tok` experts (plus the shared expert, if any). Forward FLOPs per token
//! count 2 per multiply-add of every matmul a token goes through (including `lm_head` and the router), plus
//! attention: lightning layers with the block algorithm (block `b`: `4·D·m + 4·D²` per head, `m` the token's
//! average position-in-block count; intra-block `QKᵀ` and `·V`, inter-block `q·KV` and the state update) and
//! softmax layers causally (`4·D·c` per head, `c` the average context `(N+1)/2`). Norms, activations and softmax
//! exponentials are not counted.

use crate::config::{LayerType, MiniMaxConfig};
use serde::Serialize;

/// One line of the per-component breakdown.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Component {
    pub name: String,
    /// Parameters stored.
    pub params: u64,
    /// Parameters a token goes through (0 for embeddings and lm_head, by convention).
    pub active: u64,
}

/// Statistics for one config and sequence length.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelStats {
    pub total_params: u64,
    pub active_params: u64,
    /// Active parameters when embeddings and lm_head are counted too.
    pub active_params_with_embeddings: u64,
    pub components: Vec<Component>,
    pub seq_len: usize,
    pub forward_flops_per_token: f64,
    pub bf16_weight_bytes: u64,
    pub lightning_state_bytes_per_seq: u64,
    pub kv_cache_bytes_per_token: u64,
    pub num_lightning_layers: usize,
    pub num_softmax_layers: usize,
}

/// Computes [`ModelStats`] for `cfg` at sequence length `seq_len`.
pub fn stats(cfg: &MiniMaxConfig, seq_len: usize) -> ModelStats {
    let c = cfg.hidden_size as u64;
    let v = cfg.vocab_size as u64;
    let (h, kvh, dh) = (
        cfg.num_attention_heads as u64,
        cfg.num_key_value_heads as u64,
        cfg.head_dim as u64,
    );
    let hd = h * dh;
    let (e, i, k) = (
        cfg.num_local_experts as u64,
        cfg.intermediate_size as u64,
        cfg.num_experts_per_tok as u64,
    );
    let s = cfg.shared_intermediate_size as u64;
    let n_lin = cfg.layer_types.iter().filter(|t| **t == LayerType::Linear).count() as u64;
    let n_full = cfg.layer_types.len() as u64 - n_lin;
    let layers = cfg.num_hidden_layers as u64;

    let lightning_one = 3 * hd * c + hd * c + c * hd + hd;
    let softmax_one = hd * c + 2 * kvh * dh * c + c * hd;
    let expert_one = 3 * c * i;
    let shared_one = if s > 0 { 3 * c * s + c } else { 0 };
    let mut comps = vec![
        Component {
            name: "embed_tokens".into(),
            params: v * c,
            active: 0,
        },
        Component {
            name: "lm_head".into(),
            params: if cfg.tie_word_embeddings { 0 } else { v * c },
            active: 0,
        },
        Component {
            name: "lightning_attention".into(),
            params: n_lin * lightning_one,
            active: n_lin * lightning_one,
        },
        Component {
            name: "softmax_attention".into(),
            params: n_full * softmax_one,
            active: n_full * softmax_one,
        },
        Component {
            name: "moe_experts".into(),
            params: layers * e * expert_one,
            active: layers * k * expert_one,
        },
        Component {
            name: "moe_router".into(),
            params: layers * e * c,
            active: layers * e * c,
        },
        Component {
            name: "norms".into(),
            params: layers * 2 * c + c,
            active: layers * 2 * c + c,
        },
    ];
    if s > 0 {
        comps.push(Component {
            name: "shared_expert".into(),
            params: layers * shared_one,
            active: layers * shared_one,
        });
    }
    let total: u64 = comps.iter().map(|x| x.params).sum();
    let active: u64 = comps.iter().map(|x| x.active).sum();
    let head = if cfg.tie_word_embeddings { 0 } else { v * c };

    // FLOPs per token
    let n = seq_len.max(1) as f64;
    let matmul_params = (n_lin * (lightning_one - hd) + n_full * softmax_one + layers * (k * expert_one + e * c))
        as f64
        + (layers * shared_one) as f64
        + (v * c) as f64;
    let b = cfg.block_size as f64;
    // average over tokens of (position within its block + 1)
    let full_blocks = (n / b).floor();
    let rem = n - full_blocks * b;
    let m_avg = (full_blocks * b * (b + 1.0) / 2.0 + rem * (rem + 1.0) / 2.0) / n;
    let (hf, df) = (h as f64, dh as f64);
    let lightning_attn = hf * (4.0 * df * m_avg + 4.0 * df * df);
    let softmax_attn = hf * 4.0 * df * (n + 1.0) / 2.0;
    let flops = 2.0 * matmul_params + n_lin as f64 * lightning_attn + n_full as f64 * softmax_attn;

    ModelStats {
        total_params: total,
        active_params: active,
        active_params_with_embeddings: active + v * c + head,
        components: comps,
        seq_len,
        forward_flops_per_token: flops,
        bf16_weight_bytes: total * 2,
        lightning_state_bytes_per_seq: n_lin * h * dh * dh * 4,
        kv_cache_bytes_per_token: n_full * 2 * kvh * dh * 2,
        num_lightning_layers: n_lin as usize,
        num_softmax_layers: n_full as usize,
    }
}
