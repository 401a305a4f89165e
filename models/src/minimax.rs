//! MiniMax-01 graph builders in their definitional form.
//!
//! - lightning attention as `o_t = Σ_{u≤t} γ^(t−u) (q_t·k_u) v_u`: a masked decay matrix times `QKᵀ`, then `V`;
//! - softmax attention as `softmax(QKᵀ/√d + causal mask)·V` with grouped KV heads by batch broadcasting;
//! - the MoE as route → top-k → every expert's SwiGLU on every token → weighted combine.
//!
//! These graphs are the "unfused" baseline: deriving the block-tiled lightning algorithm and grouped MoE
//! dispatch from them is the optimizer's job (`fulgur-passes`).
//!
//! Names: parameters carry the checkpoint's names as transformers 5 holds them in memory (the MoE as
//! `mlp.gate.weight`, `mlp.experts.gate_up_proj` `[E, 2I, C]`, `mlp.experts.down_proj` `[E, C, I]`); the loader
//! maps on-disk names onto them. Graph inputs: `input_ids` (i64 `[B, T]`); decode step: `input_ids` `[B, 1]`,
//! `position` (i64 scalar: the number of tokens already processed), `state.{l}` (f32 `[B, H, D, D]`) for each
//! lightning layer `l`, `cache.{l}.k`/`cache.{l}.v` (`[B, KVH, P, D]`) for each softmax layer. Outputs:
//! `logits`, `loss`, `aux_loss`, `hidden_states.{i}`, and the new `state.{l}`, `cache.{l}.k`, `cache.{l}.v`.

use crate::config::{LayerType, MiniMaxConfig};
use fulgur_ir::{CmpOp, ConstData, DType, Dim, Graph, Op, Result, Value};

/// What a forward graph computes besides `logits`.
#[derive(Clone, Debug, Default)]
pub struct ForwardOptions {
    /// Outputs `hidden_states.{0..=L}` as transformers defines them.
    pub hidden_states: bool,
    /// Outputs `loss`: mean next-token cross-entropy with `labels = input_ids`.
    pub loss: bool,
    /// Adds the auxiliary load-balancing loss (`router_aux_loss_coef · L_aux`) to `loss` and outputs `aux_loss`.
    pub aux_loss: bool,
    /// Outputs each lightning layer's final state and each softmax layer's KV cache (prefill for decoding).
    pub states: bool,
    /// `logits` of the last position only (`[B, 1, V]`, as transformers' `logits_to_keep=1`): the LM head
    /// runs on one row per sequence. Not with `loss`, which needs every position.
    pub last_logits: bool,
    /// The experts' gate and up projections as two matmuls on the two halves of `gate_up_proj` (the slices
    /// named `mlp.experts.gate_proj` and `mlp.experts.up_proj`, `[E, I, C]` each) rather than one matmul split
    /// after: the same values (each output element is the same dot product), in the form expert-tensor
    /// parallelism shards (each rank a slice of both halves; `docs/parallelism.md`).
    pub split_gate_up: bool,
}

/// Where the tokens of a graph sit in the sequence.
#[derive(Clone, Copy)]
enum Mode {
    /// A whole sequence `[B, T]` from position 0.
    Prefill,
    /// One new token `[B, 1]` at position `pos` (an i64 scalar value) after `P` cached tokens.
    Decode { pos: Value },
}

fn d(x: usize) -> Dim {
    Dim::from(x)
}

struct Builder<'a> {
    g: Graph,
    cfg: &'a MiniMaxConfig,
    dt: DType,
    /// Router logits of every layer, for the auxiliary loss.
    router_logits: Vec<Value>,
    /// [`ForwardOptions::split_gate_up`].
    split_gate_up: bool,
}

/// The input and output of a pipeline stage that does not begin or end the model: the hidden states `[B, T, C]`
/// between its layers and the next stage's.
pub const STAGE_HIDDEN_IN: &str = "hidden_in";
pub const STAGE_HIDDEN_OUT: &str = "hidden_out";

/// Builds the forward graph: `input_ids` `[B, T]` → `logits` `[B, T, V]` (and the outputs `opts` asks for).
pub fn forward_graph(cfg: &MiniMaxConfig, opts: &ForwardOptions) -> Result<Graph> {
    stage_graph(cfg, opts, 0..cfg.num_hidden_layers)
}

/// One pipeline stage of the forward: the layers `layers` (a range of `0..num_hidden_layers`). The first stage
/// embeds `input_ids`, a later one takes `hidden_in` `[B, T, C]` (f32, as the layers compute); the last ends with
/// the final norm, `logits` and what `opts` asks for (its loss takes `input_ids` as the labels), an earlier one
/// outputs `hidden_out`. The whole range is [`forward_graph`]. `opts.hidden_states` numbers the layers as the
/// whole model does; a stage's states (`opts.states`) are its own layers'.
pub fn stage_graph(cfg: &MiniMaxConfig, opts: &ForwardOptions, layers: std::ops::Range<usize>) -> Result<Graph> {
    let (first, last) = stage_ends(cfg, &layers)?;
    let whole = first && last;
    if opts.aux_loss && !whole {
        return Err(fulgur_ir::IrError::Graph(
            "the auxiliary loss spans every layer's router: a pipeline stage cannot output it".into(),
        ));
    }
    let mut b = Builder {
        g: Graph::new(if whole {
            "minimax_forward".to_string()
        } else {
            format!("minimax_stage_{}_{}", layers.start, layers.end)
        }),
        cfg,
        dt: DType::F32,
        router_logits: Vec::new(),
        split_gate_up: opts.split_gate_up,
    };
    let (bs, t) = (Dim::sym("B"), Dim::sym("T"));
    let needs_ids = first || (last && (opts.loss || opts.aux_loss));
    let ids = if needs_ids {
        Some(b.g.input("input_ids", DType::I64, vec![bs.clone(), t.clone()])?)
    } else {
        None
    };
    let mut x = match ids {
        Some(ids) if first => b.embed(ids)?,
        _ => b.g.input(
            STAGE_HIDDEN_IN,
            DType::F32,
            vec![bs.clone(), t.clone(), d(cfg.hidden_size)],
        )?,
    };
    if opts.hidden_states && first {
        b.g.add_output("hidden_states.0", x)?;
    }
    for l in layers.clone() {
        b.g.push_scope(format!("layers.{l}"));
        let r = b.layer(l, x, Mode::Prefill);
        b.g.pop_scope();
        let (y, states) = r?;
        x = y;
        if opts.states {
            for (name, v) in states {
                b.g.add_output(name, v)?;
            }
        }
        if opts.hidden_states && l + 1 < cfg.num_hidden_layers {
            b.g.add_output(format!("hidden_states.{}", l + 1), x)?;
        }
    }
    if !last {
        b.g.add_output(STAGE_HIDDEN_OUT, x)?;
        return Ok(b.g);
    }
    let hn = b.final_norm(x)?;
    if opts.hidden_states {
        b.g.add_output(format!("hidden_states.{}", cfg.num_hidden_layers), hn)?;
    }
    if opts.last_logits && (opts.loss || opts.aux_loss) {
        return Err(fulgur_ir::IrError::Graph(
            "`last_logits` keeps one position; the loss needs them all".into(),
        ));
    }
    let head_in = if opts.last_logits {
        let end = t.clone();
        let start = t.clone() - Dim::from(1);
        b.g.slice(hn, 1, start, end)?
    } else {
        hn
    };
    let logits = b.lm_head(head_in)?;
    b.g.add_output("logits", logits)?;
    if opts.loss || opts.aux_loss {
        let ids = ids.expect("the last stage with a loss takes the tokens");
        let mut loss = b.g.scope("loss", |g| cross_entropy(g, logits, ids, &t))?;
        if opts.aux_loss {
            let aux = b.aux_loss()?;
            b.g.add_output("aux_loss", aux)?;
            let scaled = b.g.scale(aux, cfg.router_aux_loss_coef)?;
            loss = b.g.add(loss, scaled)?;
        }
        let loss = b.g.reshape(loss, vec![d(1)])?;
        b.g.add_output("loss", loss)?;
    }
    Ok(b.g)
}

/// Whether a stage of `layers` is the model's first and its last; a range of no layers or past the model's is
/// refused naming both.
fn stage_ends(cfg: &MiniMaxConfig, layers: &std::ops::Range<usize>) -> Result<(bool, bool)> {
    if layers.start >= layers.end || layers.end > cfg.num_hidden_layers {
        return Err(fulgur_ir::IrError::Graph(format!(
            "a pipeline stage of layers {}..{} in a model of {} layers",
            layers.start, layers.end, cfg.num_hidden_layers
        )));
    }
    Ok((layers.start == 0, layers.end == cfg.num_hidden_layers))
}

/// Builds the decode-step graph: one new token per sequence, carrying lightning states and KV caches.
pub fn decode_graph(cfg: &MiniMaxConfig) -> Result<Graph> {
    decode_graph_with(cfg, &ForwardOptions::default())
}

/// [`decode_graph`] with the options that shape the layers rather than the outputs (`split_gate_up`); the
/// others do not apply to a decode step and are ignored.
pub fn decode_graph_with(cfg: &MiniMaxConfig, opts: &ForwardOptions) -> Result<Graph> {
    decode_stage_graph(cfg, opts, 0..cfg.num_hidden_layers)
}

/// The decode step of the layers `layers` alone (a pipeline stage, `fulgur::pipeline`), as [`stage_graph`] is the
/// forward's: the first stage embeds `input_ids` `[B, 1]`, a later one takes [`STAGE_HIDDEN_IN`] `[B, 1, C]`;
/// every stage takes `position` and its layers' states and outputs their new values; the last ends with the
/// norm and the logits, an earlier one outputs [`STAGE_HIDDEN_OUT`]. All the layers give [`decode_graph_with`].
pub fn decode_stage_graph(cfg: &MiniMaxConfig, opts: &ForwardOptions, layers: std::ops::Range<usize>) -> Result<Graph> {
    let (first, last) = stage_ends(cfg, &layers)?;
    let mut b = Builder {
        g: Graph::new(if first && last {
            "minimax_decode".to_string()
        } else {
            format!("minimax_decode_stage_{}_{}", layers.start, layers.end)
        }),
        cfg,
        dt: DType::F32,
        router_logits: Vec::new(),
        split_gate_up: opts.split_gate_up,
    };
    let bs = Dim::sym("B");
    let ids = if first {
        Some(b.g.input("input_ids", DType::I64, vec![bs.clone(), d(1)])?)
    } else {
        None
    };
    let pos = b.g.input("position", DType::I64, vec![])?;
    let mut x = match ids {
        Some(ids) => b.embed(ids)?,
        None => {
            b.g.input(STAGE_HIDDEN_IN, DType::F32, vec![bs, d(1), d(cfg.hidden_size)])?
        }
    };
    for l in layers {
        b.g.push_scope(format!("layers.{l}"));
        let r = b.layer(l, x, Mode::Decode { pos });
        b.g.pop_scope();
        let (y, states) = r?;
        x = y;
        for (name, v) in states {
            b.g.add_output(name, v)?;
        }
    }
    if !last {
        b.g.add_output(STAGE_HIDDEN_OUT, x)?;
        return Ok(b.g);
    }
    let hn = b.final_norm(x)?;
    let logits = b.lm_head(hn)?;
    b.g.add_output("logits", logits)?;
    Ok(b.g)
}

/// Mean next-token cross-entropy: position `t` predicts token `t+1`.
fn cross_entropy(g: &mut Graph, logits: Value, ids: Value, t: &Dim) -> Result<Value> {
    let v = g.dims(logits)[2].clone();
    let vocab = v.as_const().unwrap_or(0) as usize;
    let tm1 = t.clone() - d(1);
    let lg = g.slice(logits, 1, 0, tm1.clone())?;
    let labels = g.slice(ids, 1, 1, t.clone())?;
    let lp = g.log_softmax(lg, -1)?;
    let oh = g.one_hot(labels, vocab, DType::F32)?;
    let picked = g.mul(lp, oh)?;
    let ll = g.sum(picked, &[-1], false)?;
    let nll = g.neg(ll)?;
    g.mean(nll, &[0, 1], false)
}

impl Builder<'_> {
    fn param(&mut self, name: &str, dims: Vec<usize>) -> Result<Value> {
        self.g.param(name, self.dt, dims.into_iter().map(Dim::from).collect())
    }

    fn constant_f32(&mut self, values: Vec<f64>, shape: Vec<usize>) -> Result<Value> {
        let values = values.into_iter().map(|x| x as f32 as f64).collect();
        self.g.constant(DType::F32, shape, ConstData::Float(values))
    }

    fn embed(&mut self, ids: Value) -> Result<Value> {
        let w = self.param(
            "model.embed_tokens.weight",
            vec![self.cfg.vocab_size, self.cfg.hidden_size],
        )?;
        self.g.scope("embed_tokens", |g| g.gather(w, ids, 0))
    }

    fn norm(&mut self, name: &str, x: Value, width: usize, eps: f64) -> Result<Value> {
        let w = self.param(name, vec![width])?;
        rms_norm(&mut self.g, x, w, eps)
    }

    fn final_norm(&mut self, x: Value) -> Result<Value> {
        let (c, eps) = (self.cfg.hidden_size, self.cfg.rms_norm_eps);
        self.g.push_scope("norm");
        let r = self.norm("model.norm.weight", x, c, eps);
        self.g.pop_scope();
        r
    }

    fn lm_head(&mut self, h: Value) -> Result<Value> {
        // tied: the embedding's table, also in a pipeline's last stage, which does not embed (the stages then
        // share the parameter and sum its gradient)
        let name = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let w = match self.g.input_by_name(name) {
            Some(n) => Value::new(n, 0),
            None => self.param(name, vec![self.cfg.vocab_size, self.cfg.hidden_size])?,
        };
        self.g.scope("lm_head", |g| g.linear(h, w))
    }

    /// One decoder layer; returns its output and the states it produces (named graph outputs).
    fn layer(&mut self, l: usize, x: Value, mode: Mode) -> Result<(Value, Vec<(String, Value)>)> {
        let cfg = self.cfg;
        let p = format!("model.layers.{l}");
        let (c, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let h = self.norm(&format!("{p}.input_layernorm.weight"), x, c, eps)?;
        let (a, states) = match cfg.layer_types[l] {
            LayerType::Linear => {
                self.g.push_scope("lightning");
                let r = self.lightning(l, h, mode);
                self.g.pop_scope();
                r?
            }
            LayerType::Full => {
                self.g.push_scope("attention");
                let r = self.softmax_attention(l, h, mode);
                self.g.pop_scope();
                r?
            }
        };
        let (alpha, beta) = cfg.attn_alpha_beta(l);
        let resid = if cfg.postnorm { h } else { x };
        let x1 = self.residual(resid, alpha, a, beta)?;
        let h2 = self.norm(&format!("{p}.post_attention_layernorm.weight"), x1, c, eps)?;
        self.g.push_scope("moe");
        let m = self.moe(l, h2);
        self.g.pop_scope();
        let m = m?;
        let resid = if cfg.postnorm { h2 } else { x1 };
        let out = self.residual(resid, cfg.mlp_alpha, m, cfg.mlp_beta)?;
        Ok((out, states))
    }

    /// `alpha·r + beta·y`.
    fn residual(&mut self, r: Value, alpha: f64, y: Value, beta: f64) -> Result<Value> {
        let ra = self.g.scale(r, alpha)?;
        let yb = if beta == 1.0 { y } else { self.g.scale(y, beta)? };
        self.g.add(ra, yb)
    }

    /// `[B, T, H·D] → [B, H, T, D]`.
    fn split_heads(&mut self, x: Value, heads: usize) -> Result<Value> {
        let dims = self.g.dims(x).to_vec();
        let dh = self.cfg.head_dim;
        let r = self
            .g
            .reshape(x, vec![dims[0].clone(), dims[1].clone(), d(heads), d(dh)])?;
        self.g.permute(r, &[0, 2, 1, 3])
    }

    /// `[B, H, T, D] → [B, T, H·D]`.
    fn merge_heads(&mut self, x: Value) -> Result<Value> {
        let dims = self.g.dims(x).to_vec();
        let p = self.g.permute(x, &[0, 2, 1, 3])?;
        let hd = dims[1].clone() * dims[3].clone();
        self.g.reshape(p, vec![dims[0].clone(), dims[2].clone(), hd])
    }

    fn lightning(&mut self, l: usize, h: Value, mode: Mode) -> Result<(Value, Vec<(String, Value)>)> {
        let cfg = self.cfg;
        let p = format!("model.layers.{l}.self_attn");
        let (c, nh, dh, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hd());
        let w_qkv = self.param(&format!("{p}.qkv_proj.weight"), vec![3 * hd, c])?;
        let w_gate = self.param(&format!("{p}.output_gate.weight"), vec![hd, c])?;
        let w_out = self.param(&format!("{p}.out_proj.weight"), vec![c, hd])?;
        let w_norm = self.param(&format!("{p}.norm.weight"), vec![hd])?;
        let lambda = cfg.decay_rates(l);
        let g = &mut self.g;
        let dims = g.dims(h).to_vec();
        let (bs, t) = (dims[0].clone(), dims[1].clone());
        // 1-2: SiLU on the fused projection, per-head interleaved split into q, k, v
        let qkv = g.linear(h, w_qkv)?;
        let qkv = g.silu(qkv)?;
        let qkv = g.reshape(qkv, vec![bs.clone(), t.clone(), d(nh), d(3 * dh)])?;
        let qkv = g.permute(qkv, &[0, 2, 1, 3])?; // [B, H, T, 3D]
        let q = g.slice(qkv, -1, 0, dh)?;
        let k = g.slice(qkv, -1, dh, 2 * dh)?;
        let v = g.slice(qkv, -1, 2 * dh, 3 * dh)?;
        let lam = g.constant(
            DType::F32,
            vec![nh, 1, 1],
            ConstData::Float(lambda.iter().map(|&x| x as f32 as f64).collect()),
        )?;
        let mut states = Vec::new();
        let o = match mode {
            Mode::Prefill => {
                // 5: o = ((Q Kᵀ) ⊙ M) V with M[h, t, u] = exp(−λ_h (t − u)) for t ≥ u, else 0
                let kt = g.transpose(k, -2, -1)?;
                let scores = g.matmul(q, kt)?; // [B, H, T, T]
                let ti = g.iota(DType::F32, vec![t.clone(), t.clone()], 0)?;
                let ui = g.iota(DType::F32, vec![t.clone(), t.clone()], 1)?;
                let dist = g.sub(ti, ui)?;
                let causal = g.compare(CmpOp::Ge, ti, ui)?;
                let ld = g.mul(lam, dist)?; // [H, T, T]
                let nld = g.neg(ld)?;
                let decay = g.exp(nld)?;
                let zero = g.scalar(0.0, DType::F32)?;
                let mask = g.select(causal, decay, zero)?;
                let masked = g.mul(scores, mask)?;
                let o = g.matmul(masked, v)?;
                // final state S_{T-1} = Σ_u γ^(T−1−u) k_uᵀ v_u, for decoding after this prefill
                let ones = g.full(1.0, DType::F32, vec![t.clone()])?;
                let after = g.cumsum(ones, 0, true, true)?; // T−1−u
                let after = g.reshape(after, vec![d(1), t.clone(), d(1)])?;
                let la = g.mul(lam, after)?; // [H, T, 1]
                let nla = g.neg(la)?;
                let w = g.exp(nla)?;
                let kw = g.mul(k, w)?;
                let kwt = g.transpose(kw, -2, -1)?;
                let s = g.matmul(kwt, v)?; // [B, H, D, D]
                states.push((format!("state.{l}"), s));
                o
            }
            Mode::Decode { .. } => {
                // S ← γ S + k_tᵀ v_t; o_t = q_t S
                let s_in = g.input(&format!("state.{l}"), DType::F32, vec![bs.clone(), d(nh), d(dh), d(dh)])?;
                // γ = exp(−λ) from the same f32 λ as the prefill's mask, so that γ^n = exp(−λ·n) holds to
                // rounding (a separately rounded γ constant drifts from the prefill by ~1e-8 relative)
                let nlam = g.neg(lam)?;
                let gamma = g.exp(nlam)?;
                let decayed = g.mul(gamma, s_in)?;
                let kt = g.transpose(k, -2, -1)?;
                let kv = g.matmul(kt, v)?;
                let s = g.add(decayed, kv)?;
                states.push((format!("state.{l}"), s));
                g.matmul(q, s)?
            }
        };
        // 6-9: merge heads, RMSNorm over all heads, sigmoid output gate, output projection
        let o = self.merge_heads(o)?;
        let eps = cfg.lightning_norm_eps;
        let g = &mut self.g;
        let y = rms_norm(g, o, w_norm, eps)?;
        let gate = g.linear(h, w_gate)?;
        let gate = g.sigmoid(gate)?;
        let y = g.mul(gate, y)?;
        Ok((g.linear(y, w_out)?, states))
    }

    /// cos and sin tables `[T, rotary_dim]` for the positions of this graph's tokens.
    fn rope_tables(&mut self, t: &Dim, mode: Mode) -> Result<(Value, Value)> {
        let cfg = self.cfg;
        let r = cfg.rotary_dim;
        let inv: Vec<f64> = (0..r / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / r as f64))
            .collect();
        let inv = self.constant_f32(inv, vec![r / 2])?;
        let g = &mut self.g;
        let pos = match mode {
            Mode::Prefill => g.iota(DType::F32, vec![t.clone(), d(1)], 0)?,
            Mode::Decode { pos } => {
                let p = g.cast(pos, DType::F32)?;
                g.reshape(p, vec![d(1), d(1)])?
            }
        };
        let freqs = g.mul(pos, inv)?; // [T, r/2]
        let emb = g.concat(&[freqs, freqs], -1)?;
        Ok((g.cos(emb)?, g.sin(emb)?))
    }

    /// Rotary embedding of `x` `[..., T, D]` on its first `rotary_dim` dims, rotate-half pairing `(i, i + r/2)`.
    fn rope(&mut self, x: Value, cos: Value, sin: Value) -> Result<Value> {
        let (r, dh) = (self.cfg.rotary_dim, self.cfg.head_dim);
        let g = &mut self.g;
        let (xr, pass) = if r == dh {
            (x, None)
        } else {
            (g.slice(x, -1, 0, r)?, Some(g.slice(x, -1, r, dh)?))
        };
        let x1 = g.slice(xr, -1, 0, r / 2)?;
        let x2 = g.slice(xr, -1, r / 2, r)?;
        let nx2 = g.neg(x2)?;
        let rot = g.concat(&[nx2, x1], -1)?;
        let a = g.mul(xr, cos)?;
        let b = g.mul(rot, sin)?;
        let y = g.add(a, b)?;
        match pass {
            Some(p) => g.concat(&[y, p], -1),
            None => Ok(y),
        }
    }

    fn softmax_attention(&mut self, l: usize, h: Value, mode: Mode) -> Result<(Value, Vec<(String, Value)>)> {
        let cfg = self.cfg;
        let p = format!("model.layers.{l}.self_attn");
        let (c, nh, kvh, dh, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.hd(),
        );
        let grp = cfg.kv_group();
        let wq = self.param(&format!("{p}.q_proj.weight"), vec![hd, c])?;
        let wk = self.param(&format!("{p}.k_proj.weight"), vec![kvh * dh, c])?;
        let wv = self.param(&format!("{p}.v_proj.weight"), vec![kvh * dh, c])?;
        let wo = self.param(&format!("{p}.o_proj.weight"), vec![c, hd])?;
        let dims = self.g.dims(h).to_vec();
        let (bs, t) = (dims[0].clone(), dims[1].clone());
        let q = self.g.linear(h, wq)?;
        let q = self.split_heads(q, nh)?;
        let k = self.g.linear(h, wk)?;
        let k = self.split_heads(k, kvh)?;
        let v = self.g.linear(h, wv)?;
        let v = self.split_heads(v, kvh)?;
        let (cos, sin) = self.rope_tables(&t, mode)?;
        let q = self.rope(q, cos, sin)?;
        let k = self.rope(k, cos, sin)?;
        let g = &mut self.g;
        let mut states = Vec::new();
        let (k_all, v_all, ctx) = match mode {
            Mode::Prefill => (k, v, t.clone()),
            Mode::Decode { .. } => {
                let past = Dim::sym("P");
                let kc = g.input(
                    &format!("cache.{l}.k"),
                    DType::F32,
                    vec![bs.clone(), d(kvh), past.clone(), d(dh)],
                )?;
                let vc = g.input(
                    &format!("cache.{l}.v"),
                    DType::F32,
                    vec![bs.clone(), d(kvh), past.clone(), d(dh)],
                )?;
                let ka = g.concat(&[kc, k], 2)?;
                let va = g.concat(&[vc, v], 2)?;
                (ka, va, past + d(1))
            }
        };
        states.push((format!("cache.{l}.k"), k_all));
        states.push((format!("cache.{l}.v"), v_all));
        // grouped heads: q [B, KVH, G, T, D] against k, v [B, KVH, 1, S, D] by batch broadcasting
        let q5 = g.reshape(q, vec![bs.clone(), d(kvh), d(grp), t.clone(), d(dh)])?;
        let k5 = g.reshape(k_all, vec![bs.clone(), d(kvh), d(1), ctx.clone(), d(dh)])?;
        let v5 = g.reshape(v_all, vec![bs.clone(), d(kvh), d(1), ctx.clone(), d(dh)])?;
        let kt = g.transpose(k5, -2, -1)?;
        let s = g.matmul(q5, kt)?;
        let s = g.scale(s, 1.0 / (dh as f64).sqrt())?;
        let s = match mode {
            Mode::Prefill => {
                let ti = g.iota(DType::I64, vec![t.clone(), t.clone()], 0)?;
                let ui = g.iota(DType::I64, vec![t.clone(), t.clone()], 1)?;
                let causal = g.compare(CmpOp::Ge, ti, ui)?;
                let zero = g.scalar(0.0, DType::F32)?;
                let ninf = g.scalar(f64::NEG_INFINITY, DType::F32)?;
                let bias = g.select(causal, zero, ninf)?;
                g.add(s, bias)?
            }
            Mode::Decode { .. } => s,
        };
        let pr = g.softmax(s, -1)?;
        let o = g.matmul(pr, v5)?; // [B, KVH, G, T, D]
        let o = g.reshape(o, vec![bs.clone(), d(nh), t.clone(), d(dh)])?;
        let o = self.merge_heads(o)?;
        Ok((self.g.linear(o, wo)?, states))
    }

    fn moe(&mut self, l: usize, h2: Value) -> Result<Value> {
        let cfg = self.cfg;
        let p = format!("model.layers.{l}");
        let (c, e, i, k) = (
            cfg.hidden_size,
            cfg.num_local_experts,
            cfg.intermediate_size,
            cfg.num_experts_per_tok,
        );
        let wg = self.param(&format!("{p}.mlp.gate.weight"), vec![e, c])?;
        let w13 = self.param(&format!("{p}.mlp.experts.gate_up_proj"), vec![e, 2 * i, c])?;
        let w2 = self.param(&format!("{p}.mlp.experts.down_proj"), vec![e, c, i])?;
        let shared = if cfg.shared_intermediate_size > 0 {
            let s = cfg.shared_intermediate_size;
            Some((
                self.param(&format!("{p}.shared_mlp.gate_proj.weight"), vec![s, c])?,
                self.param(&format!("{p}.shared_mlp.up_proj.weight"), vec![s, c])?,
                self.param(&format!("{p}.shared_mlp.down_proj.weight"), vec![c, s])?,
                self.param(&format!("{p}.coefficient.weight"), vec![1, c])?,
            ))
        } else {
            None
        };
        let g = &mut self.g;
        let dims = g.dims(h2).to_vec();
        let n = dims[0].clone() * dims[1].clone();
        let x = g.reshape(h2, vec![n.clone(), d(c)])?;
        // route: softmax over experts, top-k, renormalise
        let logits = g.linear(x, wg)?; // [N, E]
        self.router_logits.push(logits);
        let g = &mut self.g;
        let probs = g.softmax(logits, -1)?;
        let (w, idx) = g.topk(probs, k, -1)?;
        let wsum = g.sum(w, &[-1], true)?;
        let w = g.div(w, wsum)?;
        // dense combine weights [N, E]: Σ_k one_hot(idx_k) · w_k
        let oh = g.one_hot(idx, e, DType::F32)?; // [N, k, E]
        let w3 = g.reshape(w, vec![n.clone(), d(k), d(1)])?;
        let cw = g.mul(oh, w3)?;
        let cw = g.sum(cw, &[1], false)?; // [N, E]
                                          // every expert's SwiGLU on every token: [N, C] × [E, C, 2I] → [E, N, 2I]
        let (gate, up) = if self.split_gate_up {
            let half = |g: &mut Graph, name: &str, start: usize| -> Result<Value> {
                let w = g.named(
                    name,
                    Op::Slice {
                        axis: 1,
                        start: Dim::from(start),
                        end: Dim::from(start + i),
                    },
                    &[w13],
                )?;
                let wt = g.transpose(w, -2, -1)?;
                g.matmul(x, wt)
            };
            (half(g, "mlp.experts.gate_proj", 0)?, half(g, "mlp.experts.up_proj", i)?)
        } else {
            let w13t = g.transpose(w13, -2, -1)?;
            let hup = g.matmul(x, w13t)?;
            (g.slice(hup, -1, 0, i)?, g.slice(hup, -1, i, 2 * i)?)
        };
        let act = g.silu(gate)?;
        let act = g.mul(act, up)?;
        let w2t = g.transpose(w2, -2, -1)?;
        let y = g.matmul(act, w2t)?; // [E, N, C]
        let cwt = g.transpose(cw, 0, 1)?;
        let cwt = g.reshape(cwt, vec![d(e), n.clone(), d(1)])?;
        let yw = g.mul(y, cwt)?;
        let mut m = g.sum(yw, &[0], false)?; // [N, C]
        if let Some((sg, su, sd, coef)) = shared {
            let a = g.linear(x, sg)?;
            let a = g.silu(a)?;
            let b = g.linear(x, su)?;
            let ab = g.mul(a, b)?;
            let sh = g.linear(ab, sd)?;
            let cl = g.linear(x, coef)?; // [N, 1]
            let cs = g.sigmoid(cl)?;
            let one = g.scalar(1.0, DType::F32)?;
            let omc = g.sub(one, cs)?;
            let mm = g.mul(m, omc)?;
            let sc = g.mul(sh, cs)?;
            m = g.add(mm, sc)?;
        }
        g.reshape(m, vec![dims[0].clone(), dims[1].clone(), d(c)])
    }

    /// transformers' `load_balancing_loss_func` over all layers' router logits.
    fn aux_loss(&mut self) -> Result<Value> {
        let (e, k) = (self.cfg.num_local_experts, self.cfg.num_experts_per_tok);
        let logits = self.router_logits.clone();
        let g = &mut self.g;
        let all = g.concat(&logits, 0)?; // [L·N, E]
        let p = g.softmax(all, -1)?;
        let (_, idx) = g.topk(p, k, -1)?;
        let mask = g.one_hot(idx, e, DType::F32)?; // [L·N, k, E]
        let tokens_per_expert = g.mean(mask, &[0], false)?; // [k, E]
        let prob_per_expert = g.mean(p, &[0], false)?; // [E]
        let prod = g.mul(tokens_per_expert, prob_per_expert)?;
        let s = g.sum(prod, &[0, 1], false)?;
        g.scale(s, e as f64)
    }
}

/// RMSNorm written out as MINIMAX.md and transformers define it, `(x · rsqrt(mean(x², −1) + eps)) · w`: the
/// definitional graph holds the formula, and the optimizer derives the `rms_norm` kernel from it (the fusion
/// family's `rms-norm-pattern`). The ops are exactly the `rms_norm` composite's decomposition.
fn rms_norm(g: &mut Graph, x: Value, w: Value, eps: f64) -> Result<Value> {
    g.scope("rms_norm", |g| {
        let sq = g.mul(x, x)?;
        let ms = g.mean(sq, &[-1], true)?;
        let ms = g.add_scalar(ms, eps)?;
        let r = g.rsqrt(ms)?;
        let y = g.mul(x, r)?;
        g.mul(y, w)
    })
}
