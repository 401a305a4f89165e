//! An independent f64 implementation of the MiniMax-01 forward pass, written from `MINIMAX.md` with plain
//! loops over `Vec<f64>`, compared with the definitional graphs (`forward_graph`, `decode_graph`) run by the
//! reference interpreter in f64.
//!
//! The reference differs from the graph in algorithm where it can: lightning attention runs as the
//! recurrence `S_t = γ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t` (the graph uses the masked decay matrix), softmax
//! attention loops over the KV head each query head reads (the graph broadcasts a batch dimension), the MoE
//! runs only the selected experts (the graph runs every expert densely), and the slope ladders and depth
//! factors are recomputed here from the formulas of `MINIMAX.md` §2a.
//!
//! One deliberate coupling: the graph is an f32 graph, so its constant tables (the decay rates `λ` and the
//! RoPE inverse frequencies) hold f32 values. The reference rounds those two tables to f32 as well
//! ([`Rounding::F32Constants`]); everything else is exact f64 on both sides, and agreement is required to
//! 1e-13 relative (hidden states, logits, loss, auxiliary loss, prefill and every decode step; measured at most
//! 1.8e-15, printed with `--nocapture`). With exact f64 constants the two agree to 1e-7 (measured at most
//! 1.4e-8), which is also checked, so the rounding is the only modelling shortcut.

use fulgur_ir::{DType, Interpreter, Op, Precision, Tensor};
use fulgur_models::{decode_graph, forward_graph, Flavor, ForwardOptions, LayerType, MiniMaxConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

const TOL: f64 = 1e-13;

// ------------------------------------------------------------------------------------------------
// configs: each covers something the tiny-a fixture does not

/// transformers flavor, 6 heads (non-power-of-two: ladder 2^(−8(h+1)/6)), H·D = 36 ≠ hidden 24, two
/// softmax layers, block size 5 not dividing the sequence, tied embeddings, distinct alphas and betas, a
/// `rotary_dim` that transformers ignores (full-head rotary).
const HF_6HEADS: &str = r#"{
  "model_type": "minimax",
  "vocab_size": 37, "hidden_size": 24, "intermediate_size": 10,
  "num_hidden_layers": 5,
  "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention", "linear_attention"],
  "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 6,
  "num_local_experts": 5, "num_experts_per_tok": 2,
  "full_attn_alpha_factor": 1.7, "full_attn_beta_factor": 0.8,
  "linear_attn_alpha_factor": 2.3, "linear_attn_beta_factor": 1.1,
  "mlp_alpha_factor": 1.9, "mlp_beta_factor": 0.9,
  "block_size": 5, "rms_norm_eps": 1e-6,
  "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
  "rotary_dim": 2,
  "tie_word_embeddings": true,
  "router_aux_loss_coef": 0.02
}"#;

/// original flavor, 6 heads (ALiBi's interleaved `get_slopes`), one KV head, partial rotary 4 of 8,
/// shared expert with sigmoid coefficient, post-norm, block size 3.
const ORIG_6HEADS_SHARED: &str = r#"{
  "model_type": "minimax_text_01",
  "vocab_size": 41, "hidden_size": 20, "intermediate_size": 12,
  "num_hidden_layers": 4, "attn_type_list": [0, 0, 1, 0],
  "num_attention_heads": 6, "num_key_value_heads": 1, "head_dim": 8, "rotary_dim": 4,
  "num_local_experts": 4, "num_experts_per_tok": 2,
  "shared_intermediate_size": 9, "shared_moe_mode": "sigmoid",
  "layernorm_full_attention_alpha": 1.5, "layernorm_full_attention_beta": 1.2,
  "layernorm_linear_attention_alpha": 2.1, "layernorm_linear_attention_beta": 0.7,
  "layernorm_mlp_alpha": 1.3, "layernorm_mlp_beta": 1.0,
  "postnorm": true, "block_size": 3, "rms_norm_eps": 1e-5, "rope_theta": 50,
  "tie_word_embeddings": false
}"#;

/// original flavor without `model_type` (recognised by `attn_type_list`), pre-norm (`postnorm: false`),
/// rotary 2 of 6, top-1 routing, tied embeddings, a block larger than the sequence.
const ORIG_PRENORM: &str = r#"{
  "vocab_size": 29, "hidden_size": 16, "intermediate_size": 8,
  "num_hidden_layers": 3, "attn_type_list": [1, 0, 1],
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6, "rotary_dim": 2,
  "num_local_experts": 3, "num_experts_per_tok": 1,
  "layernorm_full_attention_alpha": 0.9, "layernorm_full_attention_beta": 1.0,
  "layernorm_linear_attention_alpha": 1.1, "layernorm_linear_attention_beta": 0.6,
  "layernorm_mlp_alpha": 1.0, "layernorm_mlp_beta": 0.5,
  "postnorm": false, "block_size": 100, "rope_theta": 1000,
  "tie_word_embeddings": true
}"#;

/// transformers flavor with the default layer pattern (no `layer_types`: full, linear, full), head_dim
/// derived from hidden/heads, one KV head, v5 alias `num_experts`, flat `rope_theta` (4.x style), top-k = E.
const HF_DEFAULT_PATTERN: &str = r#"{
  "model_type": "minimax",
  "vocab_size": 23, "hidden_size": 16, "intermediate_size": 6,
  "num_hidden_layers": 3,
  "num_attention_heads": 4, "num_key_value_heads": 1,
  "num_experts": 3, "num_experts_per_tok": 3,
  "rope_theta": 10000.0, "block_size": 4
}"#;

/// original flavor, one softmax layer, partial rotary 4 of 8 with a small base: the RoPE test.
const ORIG_ROPE_1LAYER: &str = r#"{
  "model_type": "minimax_text_01",
  "vocab_size": 19, "hidden_size": 12, "intermediate_size": 8,
  "num_hidden_layers": 1, "attn_type_list": [1],
  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "rotary_dim": 4,
  "num_local_experts": 2, "num_experts_per_tok": 1,
  "postnorm": true, "rope_theta": 10
}"#;

/// original flavor, one lightning layer (depth factor `1 + 1e-5` when L ≤ 1), 3 heads.
const ORIG_LIGHTNING_1LAYER: &str = r#"{
  "model_type": "minimax_text_01",
  "vocab_size": 19, "hidden_size": 12, "intermediate_size": 8,
  "num_hidden_layers": 1, "attn_type_list": [0],
  "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 4,
  "num_local_experts": 2, "num_experts_per_tok": 2,
  "postnorm": true, "block_size": 2
}"#;

fn parse(json: &str, name: &str) -> MiniMaxConfig {
    MiniMaxConfig::from_json_str(json, name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

// ------------------------------------------------------------------------------------------------
// slopes and depth factors, from MINIMAX.md §2a

/// ALiBi's `get_slopes`: for a power of two n the ladder 2^(−8(i+1)/n); otherwise the ladder of the closest
/// lower power of two followed by every other entry of the ladder for twice that.
fn alibi(n: usize) -> Vec<f64> {
    let ladder = |m: usize| -> Vec<f64> { (0..m).map(|i| 2f64.powf(-8.0 * (i + 1) as f64 / m as f64)).collect() };
    if n.is_power_of_two() {
        return ladder(n);
    }
    let mut p = 1;
    while p * 2 <= n {
        p *= 2;
    }
    let mut v = ladder(p);
    v.extend(alibi(2 * p).into_iter().step_by(2).take(n - p));
    v
}

fn my_slopes(cfg: &MiniMaxConfig) -> Vec<f64> {
    let h = cfg.num_attention_heads;
    match cfg.flavor {
        Flavor::Transformers => (0..h).map(|i| 2f64.powf(-8.0 * (i + 1) as f64 / h as f64)).collect(),
        Flavor::Original => alibi(h),
    }
}

fn my_depth(cfg: &MiniMaxConfig, l: usize) -> f64 {
    let (lf, n) = (l as f64, cfg.num_hidden_layers as f64);
    match cfg.flavor {
        Flavor::Transformers => 1.0 - lf / (n - 1.0 + 1e-5) + 1e-5,
        Flavor::Original if cfg.num_hidden_layers <= 1 => 1.0 + 1e-5,
        Flavor::Original => 1.0 - lf / (n - 1.0) + 1e-5,
    }
}

fn my_rotary_dim(cfg: &MiniMaxConfig) -> usize {
    match cfg.flavor {
        Flavor::Transformers => cfg.head_dim,
        Flavor::Original => cfg.rotary_dim,
    }
}

// ------------------------------------------------------------------------------------------------
// the reference model

#[derive(Clone, Copy, PartialEq)]
enum Rounding {
    /// λ and the RoPE inverse frequencies rounded to f32, as the f32 graph stores them.
    F32Constants,
    /// Everything in exact f64.
    Exact,
}

struct Weights {
    w: HashMap<String, Vec<f64>>,
    used: RefCell<BTreeSet<String>>,
}

impl Weights {
    fn get(&self, name: &str) -> &[f64] {
        self.used.borrow_mut().insert(name.to_string());
        self.w
            .get(name)
            .unwrap_or_else(|| panic!("the graph has no parameter `{name}`"))
    }
}

struct Reference<'a> {
    cfg: &'a MiniMaxConfig,
    w: &'a Weights,
    rounding: Rounding,
    /// Overrides the rotary width (negative control of the RoPE test).
    rotary_dim: usize,
}

struct RefOut {
    /// `[B][T][V]`
    logits: Vec<Vec<Vec<f64>>>,
    /// `hidden[i][b][t][C]`
    hidden: Vec<Vec<Vec<Vec<f64>>>>,
    loss: f64,
    aux: f64,
}

/// `W x` for `W` `[out, in]` row-major.
fn linear(w: &[f64], x: &[f64]) -> Vec<f64> {
    let n = x.len();
    assert_eq!(w.len() % n, 0);
    w.chunks(n)
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Indices of the k largest values, ties to the lower index.
fn topk(p: &[f64], k: usize) -> Vec<usize> {
    let mut chosen: Vec<usize> = Vec::new();
    for _ in 0..k {
        let mut best: Option<usize> = None;
        for (e, &v) in p.iter().enumerate() {
            if chosen.contains(&e) {
                continue;
            }
            if best.is_none_or(|b| v > p[b]) {
                best = Some(e);
            }
        }
        chosen.push(best.unwrap());
    }
    chosen
}

fn axpy(alpha: f64, x: &[f64], beta: f64, y: &[f64]) -> Vec<f64> {
    x.iter().zip(y).map(|(a, b)| alpha * a + beta * b).collect()
}

impl Reference<'_> {
    fn round(&self, x: f64) -> f64 {
        match self.rounding {
            Rounding::F32Constants => x as f32 as f64,
            Rounding::Exact => x,
        }
    }

    fn forward(&self, ids: &[Vec<usize>]) -> RefOut {
        let cfg = self.cfg;
        let c = cfg.hidden_size;
        let n_layers = cfg.num_hidden_layers;
        let mut hidden: Vec<Vec<Vec<Vec<f64>>>> = vec![Vec::new(); n_layers + 1];
        let mut logits = Vec::new();
        let mut router: Vec<Vec<Vec<f64>>> = vec![Vec::new(); n_layers];
        let emb = self.w.get("model.embed_tokens.weight");
        for seq in ids {
            let mut x: Vec<Vec<f64>> = seq.iter().map(|&id| emb[id * c..(id + 1) * c].to_vec()).collect();
            hidden[0].push(x.clone());
            for l in 0..n_layers {
                x = self.layer(l, &x, &mut router[l]);
                if l + 1 < n_layers {
                    hidden[l + 1].push(x.clone());
                }
            }
            let wn = self.w.get("model.norm.weight");
            let hn: Vec<Vec<f64>> = x.iter().map(|v| rms_norm(v, wn, cfg.rms_norm_eps)).collect();
            hidden[n_layers].push(hn.clone());
            let head = if cfg.tie_word_embeddings {
                self.w.get("model.embed_tokens.weight")
            } else {
                self.w.get("lm_head.weight")
            };
            logits.push(hn.iter().map(|v| linear(head, v)).collect::<Vec<_>>());
        }
        // mean next-token cross-entropy
        let (mut nll, mut count) = (0.0, 0usize);
        for (b, seq) in ids.iter().enumerate() {
            for t in 0..seq.len() - 1 {
                let row: &Vec<f64> = &logits[b][t];
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                nll += lse - row[seq[t + 1]];
                count += 1;
            }
        }
        // transformers' load_balancing_loss_func over all layers' router logits
        let (e, k) = (cfg.num_local_experts, cfg.num_experts_per_tok);
        let all: Vec<&Vec<f64>> = router.iter().flatten().collect();
        let mut f = vec![vec![0.0; e]; k];
        let mut pm = vec![0.0; e];
        for lg in &all {
            let p = softmax(lg);
            for (slot, &ex) in topk(&p, k).iter().enumerate() {
                f[slot][ex] += 1.0;
            }
            for (a, b) in pm.iter_mut().zip(&p) {
                *a += b;
            }
        }
        let nt = all.len() as f64;
        let mut aux = 0.0;
        for row in &f {
            for ex in 0..e {
                aux += (row[ex] / nt) * (pm[ex] / nt);
            }
        }
        RefOut {
            logits,
            hidden,
            loss: nll / count as f64,
            aux: aux * e as f64,
        }
    }

    fn layer(&self, l: usize, x: &[Vec<f64>], router: &mut Vec<Vec<f64>>) -> Vec<Vec<f64>> {
        let cfg = self.cfg;
        let p = format!("model.layers.{l}");
        let eps = cfg.rms_norm_eps;
        let w_in = self.w.get(&format!("{p}.input_layernorm.weight"));
        let h: Vec<Vec<f64>> = x.iter().map(|v| rms_norm(v, w_in, eps)).collect();
        let (a, alpha, beta) = match cfg.layer_types[l] {
            LayerType::Linear => (self.lightning(l, &h), cfg.linear_attn_alpha, cfg.linear_attn_beta),
            LayerType::Full => (self.softmax_attention(l, &h), cfg.full_attn_alpha, cfg.full_attn_beta),
        };
        let resid = if cfg.postnorm { &h } else { x };
        let x1: Vec<Vec<f64>> = resid.iter().zip(&a).map(|(r, a)| axpy(alpha, r, beta, a)).collect();
        let w_post = self.w.get(&format!("{p}.post_attention_layernorm.weight"));
        let h2: Vec<Vec<f64>> = x1.iter().map(|v| rms_norm(v, w_post, eps)).collect();
        let resid = if cfg.postnorm { &h2 } else { &x1 };
        h2.iter()
            .zip(resid)
            .map(|(hv, r)| {
                let m = self.moe(l, hv, router);
                axpy(cfg.mlp_alpha, r, cfg.mlp_beta, &m)
            })
            .collect()
    }

    /// Lightning attention by the recurrence, per head.
    fn lightning(&self, l: usize, h: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let cfg = self.cfg;
        let p = format!("model.layers.{l}.self_attn");
        let (nh, dh) = (cfg.num_attention_heads, cfg.head_dim);
        let w_qkv = self.w.get(&format!("{p}.qkv_proj.weight"));
        let w_gate = self.w.get(&format!("{p}.output_gate.weight"));
        let w_out = self.w.get(&format!("{p}.out_proj.weight"));
        let w_norm = self.w.get(&format!("{p}.norm.weight"));
        let depth = my_depth(cfg, l);
        let gamma: Vec<f64> = my_slopes(cfg).iter().map(|s| (-self.round(s * depth)).exp()).collect();
        let mut state = vec![vec![0.0; dh * dh]; nh];
        let mut out = Vec::new();
        for ht in h {
            let u: Vec<f64> = linear(w_qkv, ht).into_iter().map(silu).collect();
            let mut o = vec![0.0; nh * dh];
            for head in 0..nh {
                let base = head * 3 * dh;
                let q = &u[base..base + dh];
                let k = &u[base + dh..base + 2 * dh];
                let v = &u[base + 2 * dh..base + 3 * dh];
                let s = &mut state[head];
                for i in 0..dh {
                    for j in 0..dh {
                        s[i * dh + j] = gamma[head] * s[i * dh + j] + k[i] * v[j];
                    }
                }
                for j in 0..dh {
                    o[head * dh + j] = (0..dh).map(|i| q[i] * s[i * dh + j]).sum();
                }
            }
            let y = rms_norm(&o, w_norm, 1e-6);
            let gate = linear(w_gate, ht);
            let y: Vec<f64> = y.iter().zip(&gate).map(|(a, g)| a * sigmoid(*g)).collect();
            out.push(linear(w_out, &y));
        }
        out
    }

    /// Rotate-half RoPE on the first `rotary_dim` dims of one head vector at position `pos`.
    fn rope(&self, x: &mut [f64], pos: usize) {
        let r = self.rotary_dim;
        let half = r / 2;
        for i in 0..half {
            let inv = self.round(1.0 / self.cfg.rope_theta.powf(2.0 * i as f64 / r as f64));
            let phi = pos as f64 * inv;
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * phi.cos() - b * phi.sin();
            x[i + half] = b * phi.cos() + a * phi.sin();
        }
    }

    fn softmax_attention(&self, l: usize, h: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let cfg = self.cfg;
        let p = format!("model.layers.{l}.self_attn");
        let (nh, kvh, dh) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let group = nh / kvh;
        let wq = self.w.get(&format!("{p}.q_proj.weight"));
        let wk = self.w.get(&format!("{p}.k_proj.weight"));
        let wv = self.w.get(&format!("{p}.v_proj.weight"));
        let wo = self.w.get(&format!("{p}.o_proj.weight"));
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, ht) in h.iter().enumerate() {
            let mut q = linear(wq, ht);
            let mut k = linear(wk, ht);
            for head in 0..nh {
                self.rope(&mut q[head * dh..(head + 1) * dh], pos);
            }
            for head in 0..kvh {
                self.rope(&mut k[head * dh..(head + 1) * dh], pos);
            }
            qs.push(q);
            ks.push(k);
            vs.push(linear(wv, ht));
        }
        let scale = 1.0 / (dh as f64).sqrt();
        (0..h.len())
            .map(|t| {
                let mut o = vec![0.0; nh * dh];
                for head in 0..nh {
                    let g = head / group;
                    let q = &qs[t][head * dh..(head + 1) * dh];
                    let scores: Vec<f64> = (0..=t)
                        .map(|u| {
                            let k = &ks[u][g * dh..(g + 1) * dh];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale
                        })
                        .collect();
                    let pr = softmax(&scores);
                    for (u, pu) in pr.iter().enumerate() {
                        for j in 0..dh {
                            o[head * dh + j] += pu * vs[u][g * dh + j];
                        }
                    }
                }
                linear(wo, &o)
            })
            .collect()
    }

    fn moe(&self, l: usize, x: &[f64], router: &mut Vec<Vec<f64>>) -> Vec<f64> {
        let cfg = self.cfg;
        let p = format!("model.layers.{l}");
        let (c, e, i, k) = (
            cfg.hidden_size,
            cfg.num_local_experts,
            cfg.intermediate_size,
            cfg.num_experts_per_tok,
        );
        let wg = self.w.get(&format!("{p}.mlp.gate.weight"));
        let gate_up = self.w.get(&format!("{p}.mlp.experts.gate_up_proj"));
        let down = self.w.get(&format!("{p}.mlp.experts.down_proj"));
        let logits = linear(wg, x);
        assert_eq!(logits.len(), e);
        let probs = softmax(&logits);
        router.push(logits);
        let chosen = topk(&probs, k);
        let total: f64 = chosen.iter().map(|&ex| probs[ex]).sum();
        let mut m = vec![0.0; c];
        for &ex in &chosen {
            let w13 = &gate_up[ex * 2 * i * c..(ex + 1) * 2 * i * c];
            let (w1, w3) = w13.split_at(i * c);
            let w2 = &down[ex * c * i..(ex + 1) * c * i];
            let a: Vec<f64> = linear(w1, x)
                .into_iter()
                .zip(linear(w3, x))
                .map(|(g, u)| silu(g) * u)
                .collect();
            let y = linear(w2, &a);
            let wk = probs[ex] / total;
            for (mm, yy) in m.iter_mut().zip(&y) {
                *mm += wk * yy;
            }
        }
        if cfg.shared_intermediate_size > 0 {
            let sg = self.w.get(&format!("{p}.shared_mlp.gate_proj.weight"));
            let su = self.w.get(&format!("{p}.shared_mlp.up_proj.weight"));
            let sd = self.w.get(&format!("{p}.shared_mlp.down_proj.weight"));
            let wc = self.w.get(&format!("{p}.coefficient.weight"));
            let a: Vec<f64> = linear(sg, x)
                .into_iter()
                .zip(linear(su, x))
                .map(|(g, u)| silu(g) * u)
                .collect();
            let sh = linear(sd, &a);
            let coef = sigmoid(linear(wc, x)[0]);
            m = m.iter().zip(&sh).map(|(a, b)| a * (1.0 - coef) + b * coef).collect();
        }
        m
    }
}

// ------------------------------------------------------------------------------------------------
// driving the graphs

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.gen::<f64>().max(1e-300);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Random weights for every parameter of `g`, as graph inputs and (f32-rounded, identical) reference values.
fn random_params(g: &fulgur_ir::Graph, seed: u64) -> (HashMap<String, Tensor>, Weights) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    let mut w = HashMap::new();
    for id in g.params() {
        let Op::Param { name, ty } = &g.node(id).op else {
            unreachable!()
        };
        assert_eq!(ty.dtype, DType::F32, "{name}");
        let shape = ty
            .shape
            .as_consts()
            .unwrap_or_else(|| panic!("{name} has a symbolic shape"));
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        let scale = if name.contains("embed_tokens") { 0.5 } else { 0.25 };
        let v: Vec<f64> = (0..n)
            .map(|_| {
                let z = normal(&mut rng);
                let x = if is_norm { 1.0 + 0.2 * z } else { scale * z };
                x as f32 as f64
            })
            .collect();
        tensors.insert(name.clone(), Tensor::from_f64(DType::F32, shape, v.clone()));
        w.insert(name.clone(), v);
    }
    (
        tensors,
        Weights {
            w,
            used: RefCell::new(BTreeSet::new()),
        },
    )
}

fn random_ids(vocab: usize, b: usize, t: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..b)
        .map(|_| (0..t).map(|_| rng.gen_range(0..vocab)).collect())
        .collect()
}

fn ids_tensor(ids: &[Vec<usize>], range: std::ops::Range<usize>) -> Tensor {
    let v: Vec<i64> = ids
        .iter()
        .flat_map(|s| s[range.clone()].iter().map(|&x| x as i64))
        .collect();
    Tensor::from_i64(DType::I64, vec![ids.len(), range.len()], v)
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

fn flat3(x: &[Vec<Vec<f64>>]) -> Vec<f64> {
    x.iter().flatten().flatten().copied().collect()
}

fn rel_scalar(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

const B: usize = 2;
const T: usize = 13;

/// Full forward (logits, every hidden state, loss, aux loss) against the reference; then the decode path.
fn check_config(name: &str, json: &str, seed: u64) {
    let cfg = parse(json, name);
    // the config's own slope ladder and decay rates agree with the formulas of MINIMAX.md
    let s = my_slopes(&cfg);
    for (a, b) in cfg.slopes().iter().zip(&s) {
        assert!(rel_scalar(*a, *b) < 1e-14, "{name}: slope {a} vs {b}");
    }
    for l in cfg.linear_layers() {
        for (h, (a, sh)) in cfg.decay_rates(l).iter().zip(&s).enumerate() {
            let b = sh * my_depth(&cfg, l);
            assert!(rel_scalar(*a, b) < 1e-14, "{name}: layer {l} head {h}: λ {a} vs {b}");
        }
    }

    let opts = ForwardOptions {
        hidden_states: true,
        loss: true,
        ..Default::default()
    };
    let g = forward_graph(&cfg, &opts).unwrap();
    let (params, weights) = random_params(&g, seed);
    let ids = random_ids(cfg.vocab_size, B, T, seed + 1);
    let mut inputs = params.clone();
    inputs.insert("input_ids".into(), ids_tensor(&ids, 0..T));
    let interp = Interpreter::new(Precision::F64);
    let out = interp.run(&g, &inputs).unwrap();

    let reference = Reference {
        cfg: &cfg,
        w: &weights,
        rounding: Rounding::F32Constants,
        rotary_dim: my_rotary_dim(&cfg),
    };
    let r = reference.forward(&ids);
    // every graph parameter is one the reference reads, and vice versa
    let used = weights.used.borrow().clone();
    let declared: BTreeSet<String> = weights.w.keys().cloned().collect();
    assert_eq!(used, declared, "{name}: parameter sets differ");

    let n = cfg.num_hidden_layers;
    for i in 0..=n {
        let key = format!("hidden_states.{i}");
        let e = rel(&out[&key].to_f64(), &flat3(&r.hidden[i]));
        println!("{name}: {key}: rel {e:.2e}");
        assert!(e < TOL, "{name}: {key}: relative error {e:e}");
    }
    assert!(!out.contains_key(&format!("hidden_states.{}", n + 1)));
    assert_eq!(out["logits"].shape, vec![B, T, cfg.vocab_size]);
    let e = rel(&out["logits"].to_f64(), &flat3(&r.logits));
    println!("{name}: logits: rel {e:.2e}");
    assert!(e < TOL, "{name}: logits: relative error {e:e}");
    let loss = out["loss"].to_f64();
    assert_eq!(loss.len(), 1);
    let e = rel_scalar(loss[0], r.loss);
    println!("{name}: loss {} vs {}: rel {e:.2e}", loss[0], r.loss);
    assert!(e < TOL, "{name}: loss {} vs reference {}", loss[0], r.loss);

    // with exact f64 constants the only gap is the f32 constant tables (f32 rounding, ~1e-8): above 1e-7
    // would mean the rounding model hides something
    let exact = Reference {
        rounding: Rounding::Exact,
        ..reference
    };
    let rx = exact.forward(&ids);
    let e = rel(&out["logits"].to_f64(), &flat3(&rx.logits));
    println!("{name}: logits vs exact-constant reference: rel {e:.2e}");
    assert!(e < 1e-7, "{name}: logits vs exact-constant reference: {e:e}");

    // the auxiliary load-balancing loss
    let ga = forward_graph(
        &cfg,
        &ForwardOptions {
            aux_loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let oa = interp.run(&ga, &inputs).unwrap();
    let aux = oa["aux_loss"].to_f64()[0];
    let e = rel_scalar(aux, r.aux);
    println!("{name}: aux_loss {aux} vs {}: rel {e:.2e}", r.aux);
    assert!(e < TOL, "{name}: aux_loss {aux} vs reference {}", r.aux);
    let total = oa["loss"].to_f64()[0];
    let want = r.loss + cfg.router_aux_loss_coef * r.aux;
    assert!(rel_scalar(total, want) < TOL, "{name}: loss with aux {total} vs {want}");

    check_decode(name, &cfg, &params, &ids, &r, &out["logits"]);
}

/// Prefill on a prefix with `states: true`, then decode step by step; each step's logits must equal the full
/// forward's logits at that position.
fn check_decode(
    name: &str,
    cfg: &MiniMaxConfig,
    params: &HashMap<String, Tensor>,
    ids: &[Vec<usize>],
    r: &RefOut,
    full_logits: &Tensor,
) {
    let interp = Interpreter::new(Precision::F64);
    let prefix = 5;
    let gp = forward_graph(
        cfg,
        &ForwardOptions {
            states: true,
            ..Default::default()
        },
    )
    .unwrap();
    let gd = decode_graph(cfg).unwrap();
    let v = cfg.vocab_size;
    let full = full_logits.to_f64();
    let at = |t: usize| -> Vec<f64> {
        (0..B)
            .flat_map(|b| full[(b * T + t) * v..(b * T + t + 1) * v].to_vec())
            .collect()
    };
    let mut inputs = params.clone();
    inputs.insert("input_ids".into(), ids_tensor(ids, 0..prefix));
    let mut prev: BTreeMap<String, Tensor> = interp.run(&gp, &inputs).unwrap();
    // prefill logits are the full forward's on the prefix (causality)
    let pl = prev["logits"].to_f64();
    for t in 0..prefix {
        let got: Vec<f64> = (0..B)
            .flat_map(|b| pl[(b * prefix + t) * v..(b * prefix + t + 1) * v].to_vec())
            .collect();
        let e = rel(&got, &at(t));
        assert!(e < TOL, "{name}: prefill logits at {t}: {e:e}");
    }
    let carried: Vec<String> = gd
        .nodes()
        .filter_map(|(_, n)| match &n.op {
            Op::Input { name, .. } if name != "input_ids" && name != "position" => Some(name.clone()),
            _ => None,
        })
        .collect();
    let expected_carried = cfg.linear_layers().len() + 2 * cfg.full_layers().len();
    assert_eq!(carried.len(), expected_carried, "{name}: decode inputs {carried:?}");
    let mut worst: f64 = 0.0;
    for t in prefix..T {
        let mut inputs = params.clone();
        inputs.insert("input_ids".into(), ids_tensor(ids, t..t + 1));
        inputs.insert("position".into(), Tensor::from_i64(DType::I64, vec![], vec![t as i64]));
        for c in &carried {
            let s = prev
                .remove(c)
                .unwrap_or_else(|| panic!("{name}: no output `{c}` for the decode input"));
            inputs.insert(c.clone(), s);
        }
        prev = interp.run(&gd, &inputs).unwrap();
        assert_eq!(prev["logits"].shape, vec![B, 1, v]);
        let got = prev["logits"].to_f64();
        let e = rel(&got, &at(t));
        let want_ref: Vec<f64> = (0..B).flat_map(|b| r.logits[b][t].clone()).collect();
        let e_ref = rel(&got, &want_ref);
        worst = worst.max(e).max(e_ref);
        assert!(
            e < TOL,
            "{name}: decode step at position {t}: rel {e:e} vs the full forward"
        );
        assert!(
            e_ref < TOL,
            "{name}: decode step at position {t}: rel {e_ref:e} vs the reference"
        );
    }
    // the carried caches have grown to the whole sequence
    for l in cfg.full_layers() {
        assert_eq!(
            prev[&format!("cache.{l}.k")].shape,
            vec![B, cfg.num_key_value_heads, T, cfg.head_dim]
        );
    }
    println!("{name}: decode steps {prefix}..{T}: worst rel {worst:.2e}");
}

// ------------------------------------------------------------------------------------------------

#[test]
fn slope_ladders_follow_minimax_md() {
    // ALiBi's get_slopes for 6 heads: the 4-ladder, then every other entry of the 8-ladder
    assert_eq!(alibi(6), vec![0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]);
    // 64 heads: 2^(−(h+1)/8), from 0.917 down to 1/256
    let s = alibi(64);
    assert!((s[0] - 2f64.powf(-0.125)).abs() < 1e-15 && (s[63] - 1.0 / 256.0).abs() < 1e-15);
    let hf = parse(HF_6HEADS, "hf6");
    assert_eq!(hf.flavor, Flavor::Transformers);
    for (h, x) in hf.slopes().iter().enumerate() {
        assert!(rel_scalar(*x, 2f64.powf(-8.0 * (h + 1) as f64 / 6.0)) < 1e-14);
    }
    let orig = parse(ORIG_6HEADS_SHARED, "orig6");
    assert_eq!(orig.flavor, Flavor::Original);
    for (a, b) in orig.slopes().iter().zip(alibi(6)) {
        assert!(rel_scalar(*a, b) < 1e-14, "{a} vs {b}");
    }
    // depth factors: transformers 1 − l/(L−1+1e-5) + 1e-5; original 1 − l/(L−1) + 1e-5 (1 + 1e-5 for L = 1)
    assert!(rel_scalar(hf.depth_factor(4), 1.0 - 4.0 / (4.0 + 1e-5) + 1e-5) < 1e-12);
    assert!(rel_scalar(orig.depth_factor(3), 1e-5) < 1e-9);
    let one = parse(ORIG_LIGHTNING_1LAYER, "orig1");
    assert_eq!(one.depth_factor(0), 1.0 + 1e-5);
    // full size: layer 0 → 1.00001, layer 38 → 0.519, layer 78 → 0.01267
    let full = MiniMaxConfig::from_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/minimax-text-01.json"
    )))
    .unwrap();
    assert!((full.depth_factor(0) - 1.00001).abs() < 1e-12);
    assert!((full.depth_factor(38) - 0.519).abs() < 1e-3);
    assert!((full.depth_factor(78) - 0.01267).abs() < 1e-5);
}

#[test]
fn hf_six_heads_two_softmax_layers_tied() {
    check_config("hf_6heads", HF_6HEADS, 11);
}

#[test]
fn original_six_heads_one_kv_head_shared_expert_partial_rope() {
    check_config("orig_6heads_shared", ORIG_6HEADS_SHARED, 23);
}

#[test]
fn original_prenorm_top1_tied() {
    let cfg = parse(ORIG_PRENORM, "orig_prenorm");
    assert!(!cfg.postnorm && cfg.tie_word_embeddings && cfg.rotary_dim == 2);
    check_config("orig_prenorm", ORIG_PRENORM, 37);
}

#[test]
fn hf_default_layer_pattern_one_kv_head() {
    let cfg = parse(HF_DEFAULT_PATTERN, "hf_default");
    assert_eq!(
        cfg.layer_types,
        vec![LayerType::Full, LayerType::Linear, LayerType::Full]
    );
    assert_eq!(cfg.head_dim, 4);
    check_config("hf_default", HF_DEFAULT_PATTERN, 41);
}

#[test]
fn original_single_lightning_layer() {
    check_config("orig_lightning_1layer", ORIG_LIGHTNING_1LAYER, 53);
}

/// Partial rotary (original flavor): 4 of 8 dims rotated with pairs (i, i+2), dims 4..8 pass through. The
/// output of the one softmax layer (`hidden_states.1`) matches the reference, and does not match a
/// full-head rotary (the transformers behaviour), so the test can tell the two apart.
#[test]
fn partial_rotary_original_flavor() {
    let name = "orig_rope_1layer";
    let cfg = parse(ORIG_ROPE_1LAYER, name);
    assert_eq!((cfg.rotary_dim, cfg.head_dim), (4, 8));
    check_config(name, ORIG_ROPE_1LAYER, 67);

    let g = forward_graph(
        &cfg,
        &ForwardOptions {
            hidden_states: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (params, weights) = random_params(&g, 71);
    let ids = random_ids(cfg.vocab_size, 1, 16, 72);
    let mut inputs = params;
    inputs.insert("input_ids".into(), ids_tensor(&ids, 0..16));
    let out = Interpreter::new(Precision::F64).run(&g, &inputs).unwrap();
    let got = out["hidden_states.1"].to_f64();
    let mk = |rotary_dim| Reference {
        cfg: &cfg,
        w: &weights,
        rounding: Rounding::F32Constants,
        rotary_dim,
    };
    let partial = rel(&got, &flat3(&mk(4).forward(&ids).hidden[1]));
    let full_head = rel(&got, &flat3(&mk(8).forward(&ids).hidden[1]));
    let none = rel(&got, &flat3(&mk(0).forward(&ids).hidden[1]));
    println!("{name}: partial {partial:.2e}, full-head {full_head:.2e}, no rotary {none:.2e}");
    assert!(partial < TOL, "partial rotary: {partial:e}");
    assert!(full_head > 1e-3, "the full-head rotary should not match: {full_head:e}");
    assert!(none > 1e-3, "no rotary should not match: {none:e}");
}
