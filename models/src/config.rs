//! MiniMax-01 configuration: transformers' `MiniMaxConfig` JSON and MiniMax's original JSON.
//!
//! Which semantics apply follows `MINIMAX.md`: a `model_type: "minimax"` config is computed as transformers
//! computes it (slope ladder `2^(−8(h+1)/H)` for every H, depth factor `1 − l/(L−1+1e-5) + 1e-5`, full-head
//! rotary); an original-format config (`attn_type_list`, `rotary_dim`, …) as MiniMax's own code does (ALiBi
//! slope ladder, depth factor `1 − l/(L−1) + 1e-5`, partial rotary, `postnorm` flag, optional shared expert).

use crate::error::ModelError;
use serde_json::{Map, Value as Json};
use std::path::Path;

/// Attention type of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerType {
    /// Lightning (decayed linear) attention.
    Linear,
    /// Softmax attention with RoPE and grouped KV heads.
    Full,
}

/// Which implementation's conventions the config follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// transformers' `MiniMaxConfig` (`model_type: "minimax"`).
    Transformers,
    /// MiniMax's original remote-code config (`attn_type_list`, …).
    Original,
}

/// A parsed, validated MiniMax-01 configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct MiniMaxConfig {
    pub flavor: Flavor,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub rms_norm_eps: f64,
    /// eps of the RMSNorm over all heads in lightning layers (1e-6 in both implementations).
    pub lightning_norm_eps: f64,
    pub rope_theta: f64,
    /// Number of rotated dims per head (`head_dim` = full rotary, the transformers behaviour).
    pub rotary_dim: usize,
    pub layer_types: Vec<LayerType>,
    pub block_size: usize,
    pub full_attn_alpha: f64,
    pub full_attn_beta: f64,
    pub linear_attn_alpha: f64,
    pub linear_attn_beta: f64,
    pub mlp_alpha: f64,
    pub mlp_beta: f64,
    /// Residual taken after the norm (DeepNorm post-LN); `false` gives ordinary pre-norm.
    pub postnorm: bool,
    /// Width of the shared expert (0: none).
    pub shared_intermediate_size: usize,
    pub tie_word_embeddings: bool,
    pub router_aux_loss_coef: f64,
    /// The longest sequence the model was trained for (`max_position_embeddings`; transformers' default
    /// 131072 when absent).
    pub max_position_embeddings: usize,
    /// The config had no `layer_types` (transformers format): the layers alternate full and linear attention,
    /// starting with full, as transformers defaults. Commands say so, since a checkpoint whose layers differ
    /// then fails on weights that are not where the default puts them.
    pub layer_types_defaulted: bool,
}

struct Fields<'a> {
    obj: &'a Map<String, Json>,
    src: String,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, msg: impl std::fmt::Display) -> ModelError {
        ModelError::Config {
            file: self.src.clone(),
            field: field.to_string(),
            message: msg.to_string(),
        }
    }
    fn get(&self, k: &str) -> Option<&'a Json> {
        self.obj.get(k).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, k: &str) -> Result<Option<usize>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(k, format!("expected a non-negative integer, found {v}"))),
        }
    }
    fn usize_req(&self, k: &str) -> Result<usize, ModelError> {
        self.usize_opt(k)?.ok_or_else(|| self.err(k, "missing (required)"))
    }
    fn usize_or(&self, k: &str, d: usize) -> Result<usize, ModelError> {
        Ok(self.usize_opt(k)?.unwrap_or(d))
    }
    fn f64_opt(&self, k: &str) -> Result<Option<f64>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(k, format!("expected a number, found {v}"))),
        }
    }
    fn f64_or(&self, k: &str, d: f64) -> Result<f64, ModelError> {
        Ok(self.f64_opt(k)?.unwrap_or(d))
    }
    fn bool_or(&self, k: &str, d: bool) -> Result<bool, ModelError> {
        match self.get(k) {
            None => Ok(d),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(k, format!("expected true or false, found {v}"))),
        }
    }
    fn str_opt(&self, k: &str) -> Result<Option<&'a str>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(k, format!("expected a string, found {v}"))),
        }
    }
}

impl MiniMaxConfig {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<MiniMaxConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        MiniMaxConfig::from_json_str(&text, &path.display().to_string())
    }

    /// Parses a config from JSON text; `src` names the file in errors.
    pub fn from_json_str(text: &str, src: &str) -> Result<MiniMaxConfig, ModelError> {
        let json: Json = serde_json::from_str(text).map_err(|e| ModelError::Config {
            file: src.to_string(),
            field: "(file)".into(),
            message: format!("invalid JSON: {e}"),
        })?;
        let obj = json.as_object().ok_or_else(|| ModelError::Config {
            file: src.to_string(),
            field: "(file)".into(),
            message: "expected a JSON object".into(),
        })?;
        let f = Fields {
            obj,
            src: src.to_string(),
        };
        let model_type = f.str_opt("model_type")?;
        let flavor = match (model_type, f.get("attn_type_list").is_some()) {
            (Some("minimax"), false) => Flavor::Transformers,
            (Some("minimax"), true) => return Err(f.err(
                "attn_type_list",
                "is an original-format field, but model_type is \"minimax\" (transformers format): use `layer_types`",
            )),
            (Some("minimax_text_01"), _) | (None, true) => Flavor::Original,
            (Some(other), _) => {
                return Err(f.err(
                    "model_type",
                    format!("expected \"minimax\" or \"minimax_text_01\", found \"{other}\""),
                ))
            }
            (None, false) => return Err(f.err("model_type", "missing (required to tell the config format)")),
        };

        let hidden_size = f.usize_req("hidden_size")?;
        let num_hidden_layers = f.usize_req("num_hidden_layers")?;
        let num_attention_heads = f.usize_req("num_attention_heads")?;
        let vocab_size = f.usize_req("vocab_size")?;
        let intermediate_size = f.usize_req("intermediate_size")?;
        // transformers-5 alias `num_experts`
        let num_local_experts = match (f.usize_opt("num_local_experts")?, f.usize_opt("num_experts")?) {
            (Some(a), Some(b)) if a != b => {
                return Err(f.err("num_experts", format!("{b} contradicts num_local_experts = {a}")))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(f.err("num_local_experts", "missing (required)")),
        };
        let num_key_value_heads = f.usize_or("num_key_value_heads", 8)?;
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err(f.err(
                        "head_dim",
                        "missing, and hidden_size is not divisible by num_attention_heads",
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let num_experts_per_tok = f.usize_or("num_experts_per_tok", 2)?;
        let rms_norm_eps = f.f64_or("rms_norm_eps", 1e-5)?;

        // rope: transformers 5 `rope_parameters`, 4.x / original `rope_theta`
        let theta_flat = f.f64_opt("rope_theta")?;
        let theta_nested =
            match f.get("rope_parameters") {
                None => None,
                Some(Json::Object(rp)) => {
                    if let Some(t) = rp.get("rope_type").filter(|t| !t.is_null()) {
                        if t.as_str() != Some("default") {
                            return Err(f.err(
                                "rope_parameters.rope_type",
                                format!("only \"default\" is supported, found {t}"),
                            ));
                        }
                    }
                    match rp.get("rope_theta") {
                        None | Some(Json::Null) => None,
                        Some(v) => Some(v.as_f64().ok_or_else(|| {
                            f.err("rope_parameters.rope_theta", format!("expected a number, found {v}"))
                        })?),
                    }
                }
                Some(v) => return Err(f.err("rope_parameters", format!("expected an object, found {v}"))),
            };
        let rope_theta = match (theta_flat, theta_nested) {
            (Some(a), Some(b)) if a != b => {
                return Err(f.err(
                    "rope_theta",
                    format!("{a} contradicts rope_parameters.rope_theta = {b}"),
                ))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => 1e6,
        };

        let layer_types_defaulted = flavor == Flavor::Transformers && f.get("layer_types").is_none();
        let layer_types: Vec<LayerType> = match flavor {
            Flavor::Transformers => match f.get("layer_types") {
                None => (0..num_hidden_layers)
                    .map(|i| {
                        if (i + 1) % 2 == 1 {
                            LayerType::Full
                        } else {
                            LayerType::Linear
                        }
                    })
                    .collect(),
                Some(Json::Array(a)) => a
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v.as_str() {
                        Some("linear_attention") => Ok(LayerType::Linear),
                        Some("full_attention") => Ok(LayerType::Full),
                        _ => Err(f.err(
                            &format!("layer_types[{i}]"),
                            format!("expected \"linear_attention\" or \"full_attention\", found {v}"),
                        )),
                    })
                    .collect::<Result<_, _>>()?,
                Some(v) => return Err(f.err("layer_types", format!("expected a list, found {v}"))),
            },
            Flavor::Original => {
                if f.get("layer_types").is_some() {
                    return Err(f.err(
                        "layer_types",
                        "is a transformers field; the original format uses attn_type_list",
                    ));
                }
                match f.get("attn_type_list") {
                    Some(Json::Array(a)) => a
                        .iter()
                        .enumerate()
                        .map(|(i, v)| match v.as_u64() {
                            Some(0) => Ok(LayerType::Linear),
                            Some(1) => Ok(LayerType::Full),
                            _ => Err(f.err(&format!("attn_type_list[{i}]"), format!("expected 0 or 1, found {v}"))),
                        })
                        .collect::<Result<_, _>>()?,
                    Some(v) => return Err(f.err("attn_type_list", format!("expected a list, found {v}"))),
                    None => return Err(f.err("attn_type_list", "missing (required in the original format)")),
                }
            }
        };
        let (field, names) = match flavor {
            Flavor::Transformers => (
                "layer_types",
                ["full_attn", "linear_attn", "mlp"].map(|p| (format!("{p}_alpha_factor"), format!("{p}_beta_factor"))),
            ),
            Flavor::Original => (
                "attn_type_list",
                [
                    "layernorm_full_attention",
                    "layernorm_linear_attention",
                    "layernorm_mlp",
                ]
                .map(|p| (format!("{p}_alpha"), format!("{p}_beta"))),
            ),
        };
        if layer_types.len() != num_hidden_layers {
            return Err(f.err(
                field,
                format!(
                    "has {} entries but num_hidden_layers is {num_hidden_layers}",
                    layer_types.len()
                ),
            ));
        }
        let ab = |i: usize| -> Result<(f64, f64), ModelError> {
            Ok((f.f64_or(&names[i].0, 1.0)?, f.f64_or(&names[i].1, 1.0)?))
        };
        let (full_attn_alpha, full_attn_beta) = ab(0)?;
        let (linear_attn_alpha, linear_attn_beta) = ab(1)?;
        let (mlp_alpha, mlp_beta) = ab(2)?;

        let (rotary_dim, postnorm, shared_intermediate_size, block_size) = match flavor {
            Flavor::Transformers => {
                // transformers stores but ignores `rotary_dim`/`partial_rotary_factor` (MINIMAX.md §2b)
                (head_dim, true, 0, f.usize_or("block_size", 256)?)
            }
            Flavor::Original => {
                let rd = f.usize_or("rotary_dim", head_dim)?;
                let shared = f.usize_or("shared_intermediate_size", 0)?;
                if shared > 0 {
                    if let Some(mode) = f.str_opt("shared_moe_mode")? {
                        if mode != "sigmoid" {
                            return Err(f.err(
                                "shared_moe_mode",
                                format!("only \"sigmoid\" is supported, found \"{mode}\""),
                            ));
                        }
                    }
                }
                (
                    rd,
                    f.bool_or("postnorm", false)?,
                    shared,
                    f.usize_or("block_size", 256)?,
                )
            }
        };

        let cfg = MiniMaxConfig {
            flavor,
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size,
            num_local_experts,
            num_experts_per_tok,
            rms_norm_eps,
            lightning_norm_eps: 1e-6,
            rope_theta,
            rotary_dim,
            layer_types,
            block_size,
            full_attn_alpha,
            full_attn_beta,
            linear_attn_alpha,
            linear_attn_beta,
            mlp_alpha,
            mlp_beta,
            postnorm,
            shared_intermediate_size,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            router_aux_loss_coef: f.f64_or("router_aux_loss_coef", 0.001)?,
            max_position_embeddings: f.usize_or("max_position_embeddings", 4096 * 32)?,
            layer_types_defaulted,
        };
        cfg.validate(&f)?;
        Ok(cfg)
    }

    fn validate(&self, f: &Fields<'_>) -> Result<(), ModelError> {
        /// The most values of a constant table the model graph holds (decay rates, rotary frequencies).
        const MAX_TABLE: usize = 1 << 24;
        let positive = [
            ("max_position_embeddings", self.max_position_embeddings),
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("block_size", self.block_size),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(f.err(k, "must be positive"));
            }
            if i64::try_from(v).is_err() {
                return Err(f.err(k, format!("{v} does not fit a 64-bit signed dimension")));
            }
        }
        // tables the graph holds as constants: one decay rate per head, one frequency per rotary pair
        for (k, v, what) in [
            (
                "num_attention_heads",
                self.num_attention_heads,
                "decay rates (one per head)",
            ),
            (
                if self.flavor == Flavor::Transformers {
                    "head_dim"
                } else {
                    "rotary_dim"
                },
                self.rotary_dim / 2,
                "rotary frequencies (one per pair of dimensions)",
            ),
        ] {
            if v > MAX_TABLE {
                return Err(f.err(
                    k,
                    format!("the graph would hold {v} {what}; at most {MAX_TABLE} are supported"),
                ));
            }
        }
        // every parameter count must be a number: none may overflow
        crate::stats::stats(self, 1).map_err(|o| f.err(o.field, o.message))?;
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(f.err(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return Err(f.err(
                "num_experts_per_tok",
                format!(
                    "{} exceeds num_local_experts = {}",
                    self.num_experts_per_tok, self.num_local_experts
                ),
            ));
        }
        if self.rotary_dim == 0 || self.rotary_dim > self.head_dim || !self.rotary_dim.is_multiple_of(2) {
            return Err(f.err(
                "rotary_dim",
                format!("{} must be even and in 2..={}", self.rotary_dim, self.head_dim),
            ));
        }
        if !self.head_dim.is_multiple_of(2) && self.layer_types.contains(&LayerType::Full) {
            return Err(f.err(
                "head_dim",
                format!("{} must be even for rotary embeddings", self.head_dim),
            ));
        }
        if self.rms_norm_eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(f.err("rms_norm_eps", "must be positive"));
        }
        if self.rope_theta.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(f.err("rope_theta", "must be positive"));
        }
        Ok(())
    }

    /// What a command should say about this config before using it (one line each, without the file name):
    /// today, that `layer_types` was absent and defaulted.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.layer_types_defaulted {
            w.push(format!(
                "no `layer_types`: the {} layers alternate full and linear attention, starting with full \
                 (transformers' default); give `layer_types` if the model's layers differ",
                self.num_hidden_layers
            ));
        }
        w
    }

    /// Total heads × head dim (8192 for MiniMax-Text-01; not necessarily `hidden_size`).
    pub fn hd(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Per-head slope `s_h` of the decay ladder (before the depth factor).
    pub fn slopes(&self) -> Vec<f64> {
        let h = self.num_attention_heads;
        match self.flavor {
            Flavor::Transformers => {
                let base = 1.0 / 2f64.powf(8.0 / h as f64);
                (0..h).map(|i| base.powi(i as i32 + 1)).collect()
            }
            Flavor::Original => alibi_slopes(h),
        }
    }

    /// Depth factor `f_l` of layer `l`.
    pub fn depth_factor(&self, l: usize) -> f64 {
        let lf = l as f64;
        let n = self.num_hidden_layers as f64;
        match self.flavor {
            Flavor::Transformers => 1.0 - lf / (n - 1.0 + 1e-5) + 1e-5,
            Flavor::Original => {
                if self.num_hidden_layers <= 1 {
                    1.0 + 1e-5
                } else {
                    1.0 - lf / (n - 1.0) + 1e-5
                }
            }
        }
    }

    /// Decay rates `λ_{h,l} = s_h · f_l` of a lightning layer.
    pub fn decay_rates(&self, l: usize) -> Vec<f64> {
        let f = self.depth_factor(l);
        self.slopes().into_iter().map(|s| s * f).collect()
    }

    /// The (alpha, beta) of the attention residual of layer `l`.
    pub fn attn_alpha_beta(&self, l: usize) -> (f64, f64) {
        match self.layer_types[l] {
            LayerType::Linear => (self.linear_attn_alpha, self.linear_attn_beta),
            LayerType::Full => (self.full_attn_alpha, self.full_attn_beta),
        }
    }

    pub fn linear_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.layer_types[l] == LayerType::Linear)
            .collect()
    }

    pub fn full_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.layer_types[l] == LayerType::Full)
            .collect()
    }
}

/// ALiBi's `get_slopes` (original MiniMax code, vLLM, lightning-attention): a ladder `2^(−8(h+1)/n)` for a
/// power-of-two `n`; otherwise the ladder of the closest lower power of two, interleaved with every other step
/// of the ladder for twice that.
pub fn alibi_slopes(n: usize) -> Vec<f64> {
    fn pow2(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    if n.is_power_of_two() {
        pow2(n)
    } else {
        let closest = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let mut v = pow2(closest);
        let extra = alibi_slopes(2 * closest);
        v.extend(extra.into_iter().step_by(2).take(n - closest));
        v
    }
}
