//! Plan search (`docs/parallelism.md`, §6): the parallel degrees, micro-batches and activation recompute that
//! run MiniMax-01 fastest on a cluster within its GPUs' memory.
//!
//! Each candidate's layers are **sharded** by the sharding pass (one lightning and one softmax layer of the
//! model's sizes, from the structural graph in bf16) and priced per rank: every kernel by the cost model at the
//! GPU's peaks, every collective the pass inserted by the ring algorithm at the bandwidth and latency of the
//! link its group spans (inside a node or across nodes, from the cluster file). The MoE is priced in its routed
//! form (each token's `k` experts, on the tokens' share of the experts' ranks, dispatched and combined by
//! `all_to_all` overlapped with the expert compute as the chunked-overlap rule schedules it), because the
//! definitional graph the pass reads runs every expert on every token. A training step is the forward, a
//! backward of twice its compute and the same collectives again, a forward more with recompute, the gradients'
//! reduce-scatter and the weights' gather of optimizer-state sharding overlapping the backward, and the AdamW
//! update. Memory per GPU: weights (bf16), gradients (f32), master weights and moments (f32, sharded over `dp`
//! and `ep`), the activations the backward reads (all of them, or with recompute each layer's input and one
//! layer's), the logits of the loss, and for inference the KV caches and lightning states; a candidate needing
//! more than 90% of a GPU's memory is rejected.

use crate::ir::{Composite, DType, Graph, Op, TensorType};
use crate::models::{LayerType, MiniMaxConfig};
use crate::parallel::{minimax_plan, optimizer_state_placement, store_experts_sharded, structural, Parallel};
use crate::passes::cost::{CostModel, Target};
use crate::passes::shard::shard_graph;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// A link: bandwidth per GPU per direction and latency per message.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub bandwidth_gb_s: f64,
    pub latency_us: f64,
}

/// A cluster file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    /// `H100`, `H200`, `H800` or `H20` (the cost model's targets).
    pub gpu: String,
    pub gpus_per_node: usize,
    pub nodes: usize,
    /// Memory per GPU.
    pub memory_gib: f64,
    pub intra_node: Link,
    pub inter_node: Link,
}

impl Cluster {
    /// Reads and checks a cluster file; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Cluster, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let c: Cluster = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let bad = |m: String| Err(format!("{}: {m}", path.display()));
        if Target::by_name(&c.gpu).is_none() {
            let known: Vec<String> = Target::all().into_iter().map(|t| t.name).collect();
            return bad(format!("unknown gpu `{}` (known: {})", c.gpu, known.join(", ")));
        }
        if c.gpus_per_node == 0 || c.nodes == 0 {
            return bad("`gpus_per_node` and `nodes` must be at least 1".into());
        }
        for (what, l) in [("intra_node", &c.intra_node), ("inter_node", &c.inter_node)] {
            let positive = l.bandwidth_gb_s.is_finite() && l.bandwidth_gb_s > 0.0;
            if !positive || l.latency_us.is_nan() || l.latency_us < 0.0 {
                return bad(format!(
                    "`{what}` needs a positive bandwidth and a latency of at least 0"
                ));
            }
        }
        if c.memory_gib.is_nan() || c.memory_gib <= 0.0 {
            return bad("`memory_gib` must be positive".into());
        }
        Ok(c)
    }

    pub fn gpus(&self) -> usize {
        self.gpus_per_node * self.nodes
    }
}

/// What is planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Train,
    Infer,
}

/// Memory per GPU, bytes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Memory {
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub activations: f64,
    /// Inference: KV caches and lightning states.
    pub states: f64,
    pub total: f64,
}

/// One candidate, priced.
#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    pub parallel: String,
    pub micro_batches: usize,
    pub recompute: bool,
    /// Training: the expert weights stored sharded over `dp` (ZeRO-3 for the experts: gathered per layer,
    /// their gradients reduce-scattered).
    pub experts_sharded: bool,
    /// Seconds per training step, or per prefill in inference.
    pub step_s: f64,
    pub compute_s: f64,
    /// Communication not hidden behind compute.
    pub exposed_comm_s: f64,
    /// Pipeline parallelism: the time the stages idle while the pipeline fills and drains.
    pub bubble_s: f64,
    /// All communication, hidden or not.
    pub comm_s: f64,
    pub tokens_per_s: f64,
    pub mfu: f64,
    /// Inference: seconds per decoded token (memory-bound estimate).
    pub decode_token_s: Option<f64>,
    pub memory: Memory,
    /// Why it was rejected (memory), if it was.
    pub rejected: Option<String>,
}

/// A search's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Search {
    pub cluster: String,
    pub mode: Mode,
    pub seq: usize,
    pub batch: usize,
    pub gpus: usize,
    /// The fastest candidate that fits (none: nothing fits).
    pub best: Option<Estimate>,
    /// Every candidate that fits, fastest first (the best among them).
    pub fitting: Vec<Estimate>,
    /// Candidates rejected for memory, least memory first.
    pub too_big: Vec<Estimate>,
    /// Degrees refused before pricing (not dividing heads, experts, batch or sequence), with the reason.
    pub refused: Vec<(String, String)>,
    pub candidates: usize,
    pub search_s: f64,
}

/// Per-rank costs of one sharded layer (per micro-batch, forward).
#[derive(Clone, Debug, Default)]
struct LayerCost {
    compute_s: f64,
    comm_s: f64,
    activations: f64,
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// The group a collective runs in: its size and whether it spans nodes.
fn group(c: &Composite, ranks: usize) -> Option<(usize, usize)> {
    let (mesh, over) = match c {
        Composite::AllReduce { mesh, over }
        | Composite::AllGather { mesh, over, .. }
        | Composite::ReduceScatter { mesh, over, .. }
        | Composite::AllToAll { mesh, over, .. }
        | Composite::SendRecv { mesh, over, .. } => (mesh, *over),
        _ => return None,
    };
    if mesh.is_empty() {
        return Some((ranks, ranks));
    }
    let stride: usize = mesh[over + 1..].iter().product();
    Some((mesh[over], stride * mesh[over]))
}

struct Pricing<'a> {
    cluster: &'a Cluster,
    model: CostModel,
}

impl Pricing<'_> {
    fn link(&self, span: usize) -> &Link {
        if span <= self.cluster.gpus_per_node && self.cluster.gpus_per_node.is_multiple_of(span) {
            &self.cluster.intra_node
        } else {
            &self.cluster.inter_node
        }
    }

    /// Seconds of a ring collective moving `bytes` per rank (`steps` messages) in a group of `g` spanning
    /// `span` consecutive ranks.
    fn ring(&self, bytes: f64, steps: f64, span: usize) -> f64 {
        let l = self.link(span);
        bytes / (l.bandwidth_gb_s * 1e9) + steps * l.latency_us * 1e-6
    }

    /// Whether every path from node `id` reaches an op reading this layer's MoE parameters (`moe_param`) before
    /// leaving the MoE: the layout ops and conversions feeding the expert matmuls.
    fn only_moe(&self, g: &Graph, id: crate::ir::NodeId, moe: &[bool], moe_param: &str) -> bool {
        let n = g.node(id);
        let reads = n.inputs.iter().any(|v| {
            g.node(v.node)
                .op
                .input_decl()
                .is_some_and(|(name, _, _)| name.starts_with(moe_param))
        });
        if reads || moe[id.index()] {
            return true;
        }
        let layout = matches!(
            n.op,
            Op::Reshape { .. } | Op::Permute { .. } | Op::Broadcast { .. } | Op::Composite(_)
        );
        let users = g.users(id);
        layout && !users.is_empty() && users.iter().all(|(u, _, _)| self.only_moe(g, *u, moe, moe_param))
    }

    /// Per-rank forward costs of the nodes of `g` (the sharded two-layer graph, `ranks` ranks) in layer scope
    /// `scope`, the MoE's nodes (those reading this layer's `mlp.` parameters) left out.
    fn layer(&self, g: &Graph, scope: &str, layer: usize, ranks: usize) -> LayerCost {
        let r = ranks as f64;
        let param_only = crate::passes::pass::param_only_nodes(g);
        let moe_param = format!("model.layers.{layer}.mlp.");
        let mut moe = vec![false; g.node_count()];
        for (id, n) in g.nodes() {
            moe[id.index()] = match n.op.input_decl() {
                Some((name, _, _)) => name.starts_with(&moe_param),
                None => n.inputs.iter().any(|v| moe[v.node.index()]),
            };
        }
        let mut out = LayerCost::default();
        for (id, n) in g.nodes() {
            let from_moe = moe[id.index()];
            let in_layer = n.name.as_deref().is_some_and(|s| s.starts_with(scope));
            if !in_layer || from_moe || param_only[id.index()] {
                continue;
            }
            let ins: Vec<&TensorType> = n.inputs.iter().map(|&v| g.ty(v)).collect();
            let bytes = |t: &TensorType| {
                t.shape.as_consts().map(|d| d.iter().product::<usize>()).unwrap_or(0) as f64
                    * t.dtype.size_bytes() as f64
                    / r
            };
            if let Op::Composite(c) = &n.op {
                // the MoE's own exchanges (its tokens gathered to the experts' ranks) are priced with it
                let users = g.users(id);
                if !users.is_empty()
                    && users
                        .iter()
                        .all(|(u, _, _)| moe[u.index()] || self.only_moe(g, *u, &moe, &moe_param))
                {
                    continue;
                }
                if let Some((gsize, span)) = group(c, ranks) {
                    let gf = gsize as f64;
                    let (b_in, b_out) = (bytes(ins[0]), bytes(&n.outputs[0]));
                    out.comm_s += match c {
                        Composite::AllReduce { .. } => self.ring(2.0 * (gf - 1.0) / gf * b_in, 2.0 * (gf - 1.0), span),
                        Composite::AllGather { .. } => self.ring((gf - 1.0) / gf * b_out, gf - 1.0, span),
                        Composite::ReduceScatter { .. } | Composite::AllToAll { .. } => {
                            self.ring((gf - 1.0) / gf * b_in, gf - 1.0, span)
                        }
                        _ => self.ring(b_in, 1.0, span),
                    };
                    out.activations += b_out;
                    continue;
                }
            }
            let c = self.model.node_cost(&n.op, &ins, &n.outputs);
            let dt = n.outputs.first().map(|t| t.dtype).unwrap_or(DType::BF16);
            out.compute_s += self.model.time(&c, dt) / r;
            if c.kernel {
                out.activations += n.outputs.iter().map(bytes).sum::<f64>();
            }
        }
        out
    }
}

/// The plan search for `cfg` on `cluster`: training steps of `batch` sequences of `seq` tokens, or their
/// prefill (and decode) in inference.
pub fn search(cfg: &MiniMaxConfig, cluster: &Cluster, mode: Mode, seq: usize, batch: usize) -> Result<Search, String> {
    let t0 = Instant::now();
    let gpus = cluster.gpus();
    let target = Target::by_name(&cluster.gpu).ok_or_else(|| format!("unknown gpu `{}`", cluster.gpu))?;
    let pricing = Pricing {
        cluster,
        model: CostModel::new(target.clone()),
    };
    // one layer of each kind at the model's sizes, structural, in bf16
    let kinds: Vec<LayerType> = [LayerType::Linear, LayerType::Full]
        .into_iter()
        .filter(|k| cfg.layer_types.contains(k))
        .collect();
    let counts: Vec<usize> = kinds
        .iter()
        .map(|k| cfg.layer_types.iter().filter(|t| *t == k).count())
        .collect();
    let mut small = cfg.clone();
    small.num_hidden_layers = kinds.len();
    small.layer_types = kinds.clone();
    let opts = crate::models::ForwardOptions::default();
    let g = crate::models::forward_graph(&small, &opts).map_err(|e| e.to_string())?;
    let g = structural(&g, false)?;
    let g = crate::passes::precision::store_as(&g, DType::BF16, &crate::passes::precision::keep_f32)
        .map_err(|e| e.to_string())?;
    // the whole model's parameters, for memory
    let full = crate::models::forward_graph(cfg, &opts).map_err(|e| e.to_string())?;
    let params: Vec<(String, Vec<crate::ir::Dim>)> = full
        .params()
        .into_iter()
        .filter_map(|id| {
            full.node(id)
                .op
                .input_decl()
                .map(|(n, t, _)| (n.to_string(), t.shape.0.clone()))
        })
        .collect();
    // every layer's parameters are placed alike (the plans' rules name suffixes, `*.NAME`): one representative
    // of each (name past the layer index, dims) and how many layers hold it, so that memory is priced per kind
    // of parameter rather than per parameter of every layer (80 layers: ~1,200 names per candidate before)
    let mut kinds_of_params: Vec<(String, Vec<crate::ir::Dim>, f64)> = Vec::new();
    let mut seen: HashMap<(String, Vec<crate::ir::Dim>), usize> = HashMap::new();
    for (name, dims) in &params {
        let key = match name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
            Some((_, rest)) => format!("model.layers.*.{rest}"),
            None => name.clone(),
        };
        match seen.get(&(key.clone(), dims.clone())) {
            Some(&i) => kinds_of_params[i].2 += 1.0,
            None => {
                seen.insert((key, dims.clone()), kinds_of_params.len());
                kinds_of_params.push((name.clone(), dims.clone(), 1.0));
            }
        }
    }
    let representatives: Vec<(String, Vec<crate::ir::Dim>)> =
        kinds_of_params.iter().map(|(n, d, _)| (n.clone(), d.clone())).collect();
    let stats = crate::models::stats::stats(cfg, seq).map_err(|e| e.message)?;
    let (c, i_w, k, e, v) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.num_experts_per_tok as f64,
        cfg.num_local_experts as f64,
        cfg.vocab_size as f64,
    );
    let peak = target.matmul_flops_bf16;
    let budget = cluster.memory_gib * 1024f64.powi(3) * 0.9;
    let over_budget = |total: f64| {
        (total > budget).then(|| {
            format!(
                "needs {:.1} GiB per GPU, more than 90% of {:.0} GiB",
                total / 1024f64.powi(3),
                cluster.memory_gib
            )
        })
    };
    let mut fitting = Vec::new();
    let mut too_big = Vec::new();
    let mut refused = Vec::new();
    let mut candidates = 0;
    // pipeline stages outermost: each stage's ranks are searched as the whole job's are without stages
    let layers_total = cfg.num_hidden_layers;
    // stages of equal layer counts only (an uneven cut idles the shorter stages every micro-batch)
    let pps: Vec<usize> = divisors(gpus)
        .into_iter()
        .filter(|&p| layers_total.is_multiple_of(p))
        .collect();
    for (pp, tp) in pps.iter().flat_map(|&pp| {
        divisors(cluster.gpus_per_node.min(gpus / pp))
            .into_iter()
            .map(move |tp| (pp, tp))
    }) {
        let inner = gpus / pp;
        // the bottleneck stage's share of the layers (the first stages hold a layer more where pp does not
        // divide them)
        let frac = layers_total.div_ceil(pp) as f64 / layers_total as f64;
        for ep in divisors(inner / tp) {
            for (sp, etp) in divisors(inner / (tp * ep)).into_iter().flat_map(|sp| {
                if tp > 1 {
                    vec![(sp, 1), (sp, tp)]
                } else {
                    vec![(sp, 1)]
                }
            }) {
                let dp = inner / (tp * ep * sp);
                let par = Parallel {
                    dp,
                    ep,
                    sp,
                    tp,
                    etp,
                    pp,
                };
                if sp > 1 && batch.is_multiple_of(dp * ep) && batch / (dp * ep) > 1 && mode == Mode::Infer {
                    candidates += 1;
                    refused.push((
                        par.to_string(),
                        "sequence parallelism keeps one sequence per rank (more would gather the MoE's tokens)"
                            .to_string(),
                    ));
                    continue;
                }
                let micro: Vec<usize> = if mode == Mode::Train && batch.is_multiple_of(dp * ep) {
                    // under sequence parallelism, one sequence per rank per micro-batch
                    let per = batch / (dp * ep);
                    divisors(per).into_iter().filter(|&m| sp == 1 || m == per).collect()
                } else {
                    vec![1]
                };
                // price the layers once per degrees at the largest micro-batch count's batch, scaling after
                let b_m = batch / micro[micro.len() - 1].max(1);
                let plan = match minimax_plan(&small, &par.stage(), b_m, seq) {
                    Ok(p) => p,
                    Err(why) => {
                        candidates += 1;
                        refused.push((par.to_string(), why));
                        continue;
                    }
                };
                let (sg, _) = match shard_graph(&g, &plan) {
                    Ok(x) => x,
                    Err(why) => {
                        candidates += 1;
                        refused.push((par.to_string(), why.to_string()));
                        continue;
                    }
                };
                let ranks = par.ranks();
                let layers: Vec<LayerCost> = (0..kinds.len())
                    .map(|l| pricing.layer(&sg, &format!("layers.{l}."), l, ranks))
                    .collect();
                // the routed MoE per layer, per rank, for b_m sequences
                let tokens_m = (b_m * seq) as f64;
                let moe_flops = 2.0 * tokens_m * (k * 3.0 * c * i_w + c * e) / ranks as f64;
                let moe_s = moe_flops / peak;
                let expert_group_span = ep * sp * tp;
                let mut a2a_bytes = tokens_m / ranks as f64 * k * c * 2.0;
                let eg = par.expert_group(cfg) as f64;
                // under expert-tensor parallelism every rank of a tp group holds a slice of the same experts:
                // the group's tokens are gathered over tp first (each rank dispatches tp ranks' tokens over the
                // expert group) and the partial outputs reduce-scattered back over tp
                let etp_s = if etp > 1 {
                    a2a_bytes *= tp as f64;
                    let tf = tp as f64;
                    pricing.ring((tf - 1.0) / tf * tokens_m / ranks as f64 * tf * c * 2.0, tf - 1.0, tp)
                } else {
                    0.0
                };
                let a2a_one = etp_s
                    + if eg > 1.0 {
                        pricing.ring((eg - 1.0) / eg * a2a_bytes, eg - 1.0, expert_group_span)
                    } else {
                        0.0
                    };
                let a2a_s = 2.0 * a2a_one; // dispatch and combine
                let a2a_exposed = (a2a_s - 0.5 * moe_s).max(0.0);
                let moe_act = tokens_m / ranks as f64 * k * (2.0 * c + 2.0 * i_w) * 2.0;
                let mut fwd_compute = 0.0;
                let mut fwd_comm = 0.0;
                let mut act_store = 0.0;
                let mut act_layer_max: f64 = 0.0;
                for (lc, &n) in layers.iter().zip(&counts) {
                    let nf = n as f64;
                    fwd_compute += nf * (lc.compute_s + moe_s);
                    fwd_comm += nf * (lc.comm_s + a2a_s);
                    act_store += nf * (lc.activations + moe_act);
                    act_layer_max = act_layer_max.max(lc.activations + moe_act);
                }
                let fwd_exposed: f64 = frac
                    * layers
                        .iter()
                        .zip(&counts)
                        .map(|(lc, &n)| n as f64 * (lc.comm_s + a2a_exposed))
                        .sum::<f64>();
                // a pipeline stage's share of the layers (its bottleneck stage's)
                fwd_compute *= frac;
                fwd_comm *= frac;
                act_store *= frac;
                // embedding and head (vocabulary-sized matmul, the loss's logits)
                let tokens_rank = tokens_m / ranks as f64;
                let head_s = 2.0 * tokens_m * c * v / ranks as f64 / peak;
                fwd_compute += head_s;
                let logits = tokens_rank * (ranks as f64 / (dp * ep * sp) as f64) * v * 4.0 / tp as f64;
                // memory that does not depend on the micro-batch count
                let mut weights = 0.0;
                let mut gradients = 0.0;
                let mut optimizer = 0.0;
                // the experts' weights as placed, and as stored sharded over dp (ZeRO-3 for the experts)
                let (mut experts, mut experts_stored) = (0.0, 0.0);
                // the embedding, the final norm and the head (counted whole on the bottleneck stage)
                let mut outside_layers = 0.0;
                let full_plan = minimax_plan(cfg, &par.stage(), b_m, seq).map_err(|e| e.to_string())?;
                // the pricing per kind of parameter holds while no rule names one layer's
                if let Some((p, _)) = full_plan.rules.iter().find(|(p, _)| p.starts_with("model.layers.")) {
                    return Err(format!(
                        "the plan places `{p}`, one layer's parameters, but the search prices every layer's alike"
                    ));
                }
                let mut zero3 = full_plan.clone();
                store_experts_sharded(&mut zero3, &representatives)?;
                for (name, dims, layers_holding) in &kinds_of_params {
                    let local = |s: &crate::passes::shard::Sharding| -> Result<f64, String> {
                        let d = s.local_dims(&full_plan.mesh, name, dims).map_err(|e| e.to_string())?;
                        Ok(d.iter().map(|x| x.as_const().unwrap_or(1) as f64).product())
                    };
                    let ws = full_plan.placement_of(name, dims).map_err(|e| e.to_string())?;
                    // under expert-tensor parallelism `gate_up_proj`'s placement splits it over ep only; its
                    // halves are split over tp by the plan's constraint (down_proj's placement has its tp split)
                    let tp_axis = full_plan.mesh.axis("tp").map_err(|e| e.to_string())?;
                    let width = if etp > 1
                        && name.contains(".mlp.experts.")
                        && ws.per_axis[tp_axis] == crate::passes::shard::Placement::Replicated
                    {
                        etp as f64
                    } else {
                        1.0
                    };
                    // a layer's parameters live on its stage: the bottleneck stage's share; the embedding, the
                    // final norm and the head are counted whole (a stage may hold both when pp = 1)
                    let share = if name.starts_with("model.layers.") { frac } else { 1.0 } * layers_holding;
                    let n_w = local(&ws)? / width * share;
                    weights += 2.0 * n_w;
                    if share == 1.0 && !name.starts_with("model.layers.") {
                        outside_layers += 2.0 * n_w;
                    }
                    if name.contains(".mlp.experts.") {
                        experts += n_w;
                        experts_stored +=
                            share * local(&zero3.stored_placement_of(name, dims).map_err(|e| e.to_string())?)?;
                    }
                    if mode == Mode::Train {
                        gradients += 4.0 * n_w;
                        let os = optimizer_state_placement(&full_plan, name, dims)?;
                        optimizer += 12.0 * local(&os)? / width * share;
                    }
                }
                // the layers of the (bottleneck) stage
                let layers_n = cfg.num_hidden_layers as f64 * frac;
                // 1F1B: `m + pp − 1` micro-batch times per step (the bubble), at most `pp` micro-batches in
                // flight on the first stage; the hidden states cross each cut forward and back per micro-batch
                let flops_per_step = stats.forward_flops_per_token * (batch * seq) as f64;
                match mode {
                    Mode::Train => {
                        for &m in &micro {
                            let scale = (batch / m) as f64 / b_m as f64;
                            let shardings: &[bool] = if experts_stored < experts {
                                &[false, true]
                            } else {
                                &[false]
                            };
                            for (&recompute, &sharded) in
                                [false, true].iter().flat_map(|r| shardings.iter().map(move |s| (r, s)))
                            {
                                candidates += 1;
                                let passes = if recompute { 4.0 } else { 3.0 };
                                // experts stored sharded over dp: one layer's gathered at a time (and the next
                                // prefetched), their gradients reduce-scattered as each layer's backward ends
                                let dense = weights + gradients;
                                let (weights, gradients, fsdp, zero1) = if sharded {
                                    let w = weights - 2.0 * (experts - experts_stored) + 2.0 * 2.0 * experts / layers_n;
                                    let g = gradients - 4.0 * (experts - experts_stored) + 4.0 * experts / layers_n;
                                    let gf = dp as f64;
                                    let gathers = if recompute { 3.0 } else { 2.0 };
                                    let bytes = (gf - 1.0) / gf * (gathers * 2.0 * experts + 4.0 * experts);
                                    let per = pricing.ring(bytes, (gathers + 1.0) * (gf - 1.0) * layers_n, gpus);
                                    (w, g, m as f64 * per, 6.0 * experts)
                                } else {
                                    (weights, gradients, 0.0, 0.0)
                                };
                                let mf = m as f64;
                                let compute = mf * scale * fwd_compute * passes;
                                let bwd_compute = mf * scale * fwd_compute * (passes - 1.0);
                                // the forward's collectives again in the backward, and once more with recompute
                                let rounds = passes - 1.0;
                                // the hidden states of a micro-batch across a cut, forward and back: exposed
                                // while the pipeline fills and drains
                                let cut = if pp > 1 {
                                    let bytes = scale * tokens_m / (dp * ep * sp) as f64 * c * 2.0;
                                    pricing.ring(bytes, 1.0, gpus)
                                } else {
                                    0.0
                                };
                                let blocking = mf * scale * fwd_exposed * rounds + 2.0 * (pp - 1) as f64 * cut;
                                let comm_all = mf * (scale * fwd_comm * rounds + 2.0 * cut);
                                // 1F1B's bubble: the stages idle `pp − 1` micro-batch times per step
                                let bubble = (pp - 1) as f64 * scale * (fwd_compute * passes + fwd_exposed * rounds);
                                // gradients reduce-scattered and weights gathered over the data-parallel ranks
                                let dgroup = dp * ep;
                                let sync = if dgroup > 1 {
                                    let gf = dgroup as f64;
                                    let span = dgroup * sp * tp;
                                    // the experts' own gradients and weights go by the ZeRO-3 exchanges
                                    let bytes = (dense - zero1).max(0.0);
                                    pricing.ring((gf - 1.0) / gf * bytes, 2.0 * (gf - 1.0), span)
                                } else {
                                    0.0
                                };
                                let sync_exposed = (sync - bwd_compute).max(0.0) + (fsdp - compute).max(0.0);
                                let sync = sync + fsdp;
                                let adam = optimizer / 12.0 * 32.0 / target.mem_bw;
                                let step = compute + blocking + bubble + sync_exposed + adam;
                                let in_flight = m.min(pp) as f64;
                                let act = scale
                                    * in_flight
                                    * if recompute {
                                        // each layer's input, for the rank's tokens (replicated over tp)
                                        layers_n * tokens_m / (dp * ep * sp) as f64 * c * 2.0
                                    } else {
                                        act_store
                                    }
                                    + if recompute { scale * act_layer_max } else { 0.0 }
                                    + logits * scale;
                                let memory = Memory {
                                    weights,
                                    gradients,
                                    optimizer,
                                    activations: act,
                                    states: 0.0,
                                    total: weights + gradients + optimizer + act,
                                };
                                let est = Estimate {
                                    parallel: par.to_string(),
                                    micro_batches: m,
                                    recompute,
                                    experts_sharded: sharded,
                                    step_s: step,
                                    compute_s: compute,
                                    exposed_comm_s: blocking + sync_exposed,
                                    bubble_s: bubble,
                                    comm_s: comm_all + sync,
                                    tokens_per_s: (batch * seq) as f64 / step,
                                    mfu: 3.0 * flops_per_step / (step * gpus as f64 * peak),
                                    decode_token_s: None,
                                    rejected: over_budget(memory.total),
                                    memory,
                                };
                                if est.rejected.is_some() {
                                    too_big.push(est);
                                } else {
                                    fitting.push(est);
                                }
                            }
                        }
                    }
                    Mode::Infer => {
                        candidates += 1;
                        // the bottleneck stage's caches and states
                        let n_full = frac * cfg.layer_types.iter().filter(|t| **t == LayerType::Full).count() as f64;
                        let n_lin = layers_n - n_full;
                        let b = batch as f64;
                        let kv = n_full * b * seq as f64 * (cfg.num_key_value_heads * cfg.head_dim) as f64 * 2.0 * 2.0
                            / (tp * sp * dp * ep) as f64;
                        let lstate = n_lin * b * (cfg.num_attention_heads * cfg.head_dim * cfg.head_dim) as f64 * 4.0
                            / (tp * dp * ep) as f64;
                        // the working set of one layer at a time: about eight hidden-sized buffers of the rank's
                        // tokens (residual, normed input, q/k/v, attention output, gate, expert buffers), for one
                        // chunk of a chunked prefill (the fewest chunks that fit, of at least 4,096 tokens); the
                        // logits of the last position only
                        let tokens_local = (batch * seq) as f64 / (dp * ep * sp) as f64;
                        let fixed = weights + kv + lstate + b * v * 4.0;
                        let mut chunks = 1usize;
                        while fixed + 8.0 * tokens_local * c * 2.0 / chunks as f64 > budget
                            && (seq / sp) / (chunks * 2) >= 4096
                        {
                            chunks *= 2;
                        }
                        let act = 8.0 * tokens_local * c * 2.0 / chunks as f64 + b * v * 4.0;
                        // the prefill's chunks flow through the stages: `chunks + pp − 1` chunk times
                        let step = (fwd_compute + fwd_exposed) * (chunks + pp - 1) as f64 / chunks as f64;
                        // one decoded token per sequence: every local weight of attention, the experts the
                        // batch's tokens reach, the caches and states read once; a collective latency per layer
                        let experts_local = e / par.expert_group(cfg) as f64;
                        let per_expert = 3.0 * c * i_w * 2.0 / etp as f64;
                        let reached = experts_local.min(b * k / (dp as f64)).max(1.0);
                        let dense_weights = weights - experts_local * per_expert * layers_n;
                        // a token passes the stages one after the other, each reading its share of the layers;
                        // the embedding and the head are read once
                        let read = pp as f64
                            * (dense_weights - outside_layers + reached * per_expert * layers_n + kv + lstate)
                            + outside_layers;
                        let latency = if ranks > 1 {
                            cfg.num_hidden_layers as f64 * 3.0 * cluster.intra_node.latency_us * 1e-6
                        } else {
                            0.0
                        };
                        let memory = Memory {
                            weights,
                            gradients: 0.0,
                            optimizer: 0.0,
                            activations: act,
                            states: kv + lstate,
                            total: weights + act + kv + lstate,
                        };
                        // each chunk after the first pays the layers' collective latencies once more
                        let step = step
                            + (chunks - 1) as f64
                                * cfg.num_hidden_layers as f64
                                * 4.0
                                * pricing.link(ranks).latency_us
                                * 1e-6;
                        let est = Estimate {
                            parallel: par.to_string(),
                            micro_batches: chunks,
                            recompute: false,
                            experts_sharded: false,
                            step_s: step,
                            compute_s: fwd_compute,
                            exposed_comm_s: fwd_exposed,
                            bubble_s: (fwd_compute + fwd_exposed) * (pp - 1) as f64 / chunks as f64,
                            comm_s: fwd_comm,
                            tokens_per_s: (batch * seq) as f64 / step,
                            mfu: flops_per_step / (step * gpus as f64 * peak),
                            decode_token_s: Some(read / target.mem_bw + latency),
                            rejected: over_budget(memory.total),
                            memory,
                        };
                        if est.rejected.is_some() {
                            too_big.push(est);
                        } else {
                            fitting.push(est);
                        }
                    }
                }
            }
        }
    }
    fitting.sort_by(|a, b| a.step_s.total_cmp(&b.step_s));
    too_big.sort_by(|a, b| a.memory.total.total_cmp(&b.memory.total));
    let best = fitting.first().cloned();
    Ok(Search {
        cluster: cluster.name.clone(),
        mode,
        seq,
        batch,
        gpus,
        best,
        fitting,
        too_big,
        refused,
        candidates,
        search_s: t0.elapsed().as_secs_f64(),
    })
}

/// The search as text: the plan chosen, and with `why` the best alternatives and why they lost.
pub fn report(s: &Search, why: bool) -> String {
    let gib = |b: f64| b / 1024f64.powi(3);
    let one = |e: &Estimate| {
        let mut t = format!(
            "{} {}: {} {:.3} s, {:.0} tokens/s, MFU {:.1}%, compute {:.3} s, exposed communication {:.3} s of \
             {:.3} s; memory per GPU {:.1} GiB (weights {:.1}, gradients {:.1}, optimizer {:.1}, activations {:.1}, \
             states {:.1})",
            e.parallel,
            if s.mode == Mode::Train {
                format!(
                    "micro-batches {} recompute {}{}",
                    e.micro_batches,
                    if e.recompute { "on" } else { "off" },
                    if e.experts_sharded {
                        " experts sharded over dp"
                    } else {
                        ""
                    }
                )
            } else {
                format!("prefill chunks {}", e.micro_batches)
            },
            if s.mode == Mode::Train { "step" } else { "prefill" },
            e.step_s,
            e.tokens_per_s,
            100.0 * e.mfu,
            e.compute_s,
            e.exposed_comm_s,
            e.comm_s,
            gib(e.memory.total),
            gib(e.memory.weights),
            gib(e.memory.gradients),
            gib(e.memory.optimizer),
            gib(e.memory.activations),
            gib(e.memory.states),
        );
        if e.bubble_s > 0.0 {
            t.push_str(&format!("; pipeline bubble {:.3} s", e.bubble_s));
        }
        if let Some(d) = e.decode_token_s {
            t.push_str(&format!("; decode {:.2} ms per token", d * 1e3));
        }
        t
    };
    let mut out = format!(
        "{} ({} GPUs), {} of {} × {} tokens: {} candidates in {:.2} s\n",
        s.cluster,
        s.gpus,
        if s.mode == Mode::Train { "training" } else { "inference" },
        s.batch,
        s.seq,
        s.candidates,
        s.search_s,
    );
    match &s.best {
        Some(b) => out.push_str(&format!("chosen: {}\n", one(b))),
        None => out.push_str("chosen: none fits\n"),
    }
    if why {
        out.push_str("next fastest:\n");
        for e in s.fitting.iter().skip(1).take(5) {
            let best = s.best.as_ref().map(|b| b.step_s).unwrap_or(e.step_s);
            out.push_str(&format!("  {:.2}× slower: {}\n", e.step_s / best, one(e)));
        }
        out.push_str("rejected for memory (least first):\n");
        for e in s.too_big.iter().take(5) {
            out.push_str(&format!("  {}: {}\n", e.rejected.clone().unwrap_or_default(), one(e)));
        }
        let mut reasons: HashMap<&str, usize> = HashMap::new();
        for (_, r) in &s.refused {
            *reasons.entry(r.as_str()).or_default() += 1;
        }
        let mut reasons: Vec<_> = reasons.into_iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        out.push_str("refused degrees:\n");
        for (r, n) in reasons {
            out.push_str(&format!("  {n}: {r}\n"));
        }
    }
    out
}
