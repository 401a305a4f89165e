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

/// A count that does not fit in 64 bits: what was being counted and the config field whose factor overflowed.
#[derive(Clone, Debug, PartialEq)]
pub struct Overflow {
    pub field: &'static str,
    pub message: String,
}

/// A config size and the field it comes from (checked arithmetic over these names the field that overflowed).
fn field(name: &'static str, v: usize) -> (u64, &'static str) {
    (v as u64, name)
}

/// The product of `factors` (value, field name), named `what` in the error.
fn product(what: &str, factors: &[(u64, &'static str)]) -> Result<u64, Overflow> {
    let mut acc: u64 = 1;
    let mut shown = Vec::new();
    for &(v, name) in factors {
        shown.push(if name.is_empty() {
            v.to_string()
        } else {
            format!("{name} {v}")
        });
        acc = acc.checked_mul(v).ok_or_else(|| Overflow {
            field: if name.is_empty() { factors[0].1 } else { name },
            message: format!(
                "{what} needs {} elements: more than a 64-bit count holds",
                shown.join(" × ")
            ),
        })?;
    }
    Ok(acc)
}

/// The sum of `parts`, named `what` in the error.
fn sum(what: &str, field: &'static str, parts: &[u64]) -> Result<u64, Overflow> {
    parts.iter().try_fold(0u64, |a, &b| {
        a.checked_add(b).ok_or_else(|| Overflow {
            field,
            message: format!("{what} is more than a 64-bit count holds"),
        })
    })
}

/// Computes [`ModelStats`] for `cfg` at sequence length `seq_len`; a count that overflows 64 bits is an error
/// naming what was being counted (never a wrapped or saturated number).
pub fn stats(cfg: &MiniMaxConfig, seq_len: usize) -> Result<ModelStats, Overflow> {
    let c = field("hidden_size", cfg.hidden_size);
    let v = field("vocab_size", cfg.vocab_size);
    let h = field("num_attention_heads", cfg.num_attention_heads);
    let kvh = field("num_key_value_heads", cfg.num_key_value_heads);
    let dh = field("head_dim", cfg.head_dim);
    let e = field("num_local_experts", cfg.num_local_experts);
    let i = field("intermediate_size", cfg.intermediate_size);
    let k = field("num_experts_per_tok", cfg.num_experts_per_tok);
    let s = field("shared_intermediate_size", cfg.shared_intermediate_size);
    let n_lin_u = cfg.layer_types.iter().filter(|t| **t == LayerType::Linear).count() as u64;
    let n_lin = (n_lin_u, "layer_types");
    let n_full = (cfg.layer_types.len() as u64 - n_lin_u, "layer_types");
    let layers = field("num_hidden_layers", cfg.num_hidden_layers);
    let two = (2, "");
    let three = (3, "");
    let five = (5, "");

    let hd = product("the attention width (heads × head_dim)", &[h, dh])?;
    let hd_f = (hd, "head_dim");
    // q, k, v, gate and output projections, and the output norm
    let lightning_one = sum(
        "a lightning layer's parameters",
        "hidden_size",
        &[product("a lightning layer's projections", &[five, hd_f, c])?, hd],
    )?;
    let softmax_one = sum(
        "a softmax layer's parameters",
        "hidden_size",
        &[
            product("a softmax layer's projections", &[two, hd_f, c])?,
            product("a softmax layer's key and value projections", &[two, kvh, dh, c])?,
        ],
    )?;
    let expert_one = product("one expert's weights", &[three, c, i])?;
    let shared_one = if s.0 > 0 {
        sum(
            "the shared expert",
            "shared_intermediate_size",
            &[product("the shared expert's weights", &[three, c, s])?, c.0],
        )?
    } else {
        0
    };
    let embed = product("embed_tokens", &[v, c])?;
    let mut comps = vec![
        Component {
            name: "embed_tokens".into(),
            params: embed,
            active: 0,
        },
        Component {
            name: "lm_head".into(),
            params: if cfg.tie_word_embeddings { 0 } else { embed },
            active: 0,
        },
        Component {
            name: "lightning_attention".into(),
            params: product("the lightning layers", &[n_lin, (lightning_one, "hidden_size")])?,
            active: product("the lightning layers", &[n_lin, (lightning_one, "hidden_size")])?,
        },
        Component {
            name: "softmax_attention".into(),
            params: product("the softmax layers", &[n_full, (softmax_one, "hidden_size")])?,
            active: product("the softmax layers", &[n_full, (softmax_one, "hidden_size")])?,
        },
        Component {
            name: "moe_experts".into(),
            params: product("the experts", &[layers, e, (expert_one, "intermediate_size")])?,
            active: product("the active experts", &[layers, k, (expert_one, "intermediate_size")])?,
        },
        Component {
            name: "moe_router".into(),
            params: product("the routers", &[layers, e, c])?,
            active: product("the routers", &[layers, e, c])?,
        },
        Component {
            name: "norms".into(),
            params: sum(
                "the norms",
                "hidden_size",
                &[product("the norms", &[layers, two, c])?, c.0],
            )?,
            active: sum(
                "the norms",
                "hidden_size",
                &[product("the norms", &[layers, two, c])?, c.0],
            )?,
        },
    ];
    let shared_total = product(
        "the shared experts",
        &[layers, (shared_one, "shared_intermediate_size")],
    )?;
    if s.0 > 0 {
        comps.push(Component {
            name: "shared_expert".into(),
            params: shared_total,
            active: shared_total,
        });
    }
    let params: Vec<u64> = comps.iter().map(|x| x.params).collect();
    let actives: Vec<u64> = comps.iter().map(|x| x.active).collect();
    let total = sum("the total parameter count", "hidden_size", &params)?;
    let active = sum("the active parameter count", "hidden_size", &actives)?;
    let head = if cfg.tie_word_embeddings { 0 } else { embed };

    // FLOPs per token (f64: no overflow to guard; an enormous config gives an enormous number)
    let n = seq_len.max(1) as f64;
    let f = |x: u64| x as f64;
    let matmul_params = f(n_lin.0) * (f(lightning_one) - f(hd))
        + f(n_full.0) * f(softmax_one)
        + f(layers.0) * (f(k.0) * f(expert_one) + f(e.0) * f(c.0))
        + f(layers.0) * f(shared_one)
        + f(v.0) * f(c.0);
    let b = cfg.block_size as f64;
    // average over tokens of (position within its block + 1)
    let full_blocks = (n / b).floor();
    let rem = n - full_blocks * b;
    let m_avg = (full_blocks * b * (b + 1.0) / 2.0 + rem * (rem + 1.0) / 2.0) / n;
    let (hf, df) = (f(h.0), f(dh.0));
    let lightning_attn = hf * (4.0 * df * m_avg + 4.0 * df * df);
    let softmax_attn = hf * 4.0 * df * (n + 1.0) / 2.0;
    let flops = 2.0 * matmul_params + f(n_lin.0) * lightning_attn + f(n_full.0) * softmax_attn;

    Ok(ModelStats {
        total_params: total,
        active_params: active,
        active_params_with_embeddings: sum("the active parameter count", "vocab_size", &[active, embed, head])?,
        components: comps,
        seq_len,
        forward_flops_per_token: flops,
        bf16_weight_bytes: product("the bf16 weight bytes", &[(total, "hidden_size"), two])?,
        lightning_state_bytes_per_seq: product("the lightning state", &[n_lin, h, dh, dh, (4, "")])?,
        kv_cache_bytes_per_token: product("the KV cache", &[n_full, two, kvh, dh, two])?,
        num_lightning_layers: n_lin.0 as usize,
        num_softmax_layers: n_full.0 as usize,
    })
}
