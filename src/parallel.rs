//! MiniMax-01's sharding plans (`docs/parallelism.md`, §4): the degrees a user asks for
//! (`--parallel tp=2,ep=2,dp=1`) turned into a mesh and the placements of the model's parameters and inputs,
//! which the sharding pass (`passes::shard::shard_graph`) propagates through the rest of the graph.
//!
//! The mesh is `[dp, ep, sp, tp]` (ranks row-major, `tp` innermost so that a tensor-parallel group is the
//! closest GPUs). Attention and the dense layers are tensor parallel over `tp` (heads split: `qkv`,
//! `q`/`k`/`v` and the output gate column-parallel, the output projection row-parallel), data parallel over
//! `dp` and `ep` (the batch split over both) and sequence parallel over `sp` (the tokens split by position:
//! LASP+ for lightning attention, ring attention for softmax attention, once the optimizer's structural
//! rules have formed those composites: [`structural`]). The experts are split over `ep` and `tp` together, and
//! over `sp` too where `ep·sp·tp` divides them (expert `e` on the rank whose coordinates hold it), so each rank
//! runs `E / (ep·tp)` (or `E / (ep·sp·tp)`) experts and no expert's work is repeated:
//! the tokens of an `ep` group are gathered to the ranks holding the experts and the expert outputs summed
//! back (`all_gather` then `reduce_scatter` over `ep`, `all_reduce` over `tp`), MiniMax-01's decoupling of the
//! expert groups from the attention's. With expert-tensor parallelism (`etp=tp`) the experts are split over
//! `ep` (and `sp`) only and each expert's width over `tp`: the gate and up halves of `gate_up_proj` (sliced apart
//! in the forward built with `ForwardOptions::split_gate_up`, placed by a sharding constraint) and `down_proj`
//! split on the intermediate dim, the down projection's partial sums reduced with the rest. Pipeline
//! parallelism is refused with that reason until it is built.

use crate::ir::Graph;
use crate::models::{ForwardOptions, MiniMaxConfig};
use crate::passes::shard::{Mesh, Placement, ShardPlan};
use std::collections::HashMap;
use std::fmt;

/// Parallel degrees, as `--parallel` spells them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parallel {
    pub dp: usize,
    pub ep: usize,
    pub sp: usize,
    pub tp: usize,
    /// Expert-tensor parallelism: 1 (each expert whole on one rank, the experts split over `ep·tp`) or `tp`
    /// (the experts split over `ep`, each expert's width over the `tp` group).
    pub etp: usize,
    /// Pipeline stages (`fulgur::pipeline`): the layers cut into `pp` contiguous stages, each sharded over the
    /// other degrees; [`Parallel::ranks`] counts one stage's ranks.
    pub pp: usize,
}

impl Default for Parallel {
    fn default() -> Parallel {
        Parallel {
            dp: 1,
            ep: 1,
            sp: 1,
            tp: 1,
            etp: 1,
            pp: 1,
        }
    }
}

impl fmt::Display for Parallel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dp={},ep={},sp={},tp={}", self.dp, self.ep, self.sp, self.tp)?;
        if self.etp > 1 {
            write!(f, ",etp={}", self.etp)?;
        }
        if self.pp > 1 {
            write!(f, ",pp={}", self.pp)?;
        }
        Ok(())
    }
}

impl Parallel {
    /// Parses `tp=2,ep=4,dp=1` (any order; a degree not named is 1). `etp` is 1 or `tp` (the expert-tensor
    /// group is the attention's tensor group); `edp` is a known name but only 1 is accepted for it yet.
    pub fn parse(s: &str) -> Result<Parallel, String> {
        let mut p = Parallel::default();
        let mut seen = Vec::new();
        for part in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: a degree is written `name=N` (e.g. `tp=2`)"))?;
            let value: usize = value
                .trim()
                .parse()
                .ok()
                .filter(|&v| v >= 1)
                .ok_or_else(|| format!("`{part}`: the degree must be a whole number at least 1"))?;
            let name = name.trim();
            if seen.contains(&name.to_string()) {
                return Err(format!("`{name}` is given twice"));
            }
            seen.push(name.to_string());
            match name {
                "dp" => p.dp = value,
                "ep" => p.ep = value,
                "tp" => p.tp = value,
                "sp" => p.sp = value,
                "etp" => p.etp = value,
                "pp" => p.pp = value,
                "edp" if value == 1 => {}
                "edp" => {
                    return Err(format!(
                        "`{name}={value}`: a separate expert data-parallel degree is not built yet (dp, ep, sp, tp, \
                         etp and pp are)"
                    ))
                }
                _ => return Err(format!("unknown degree `{name}` (known: dp, ep, tp, etp, sp, pp, edp)")),
            }
        }
        if p.etp != 1 && p.etp != p.tp {
            return Err(format!(
                "`etp={}`: expert-tensor parallelism splits each expert over the tensor-parallel group, so etp is 1 \
                 or tp ({})",
                p.etp, p.tp
            ));
        }
        Ok(p)
    }

    /// The ranks of one pipeline stage (all of them without pipeline parallelism): `dp·ep·sp·tp`.
    pub fn ranks(&self) -> usize {
        self.dp * self.ep * self.sp * self.tp
    }

    /// Every rank of the job: `pp` stages of [`Parallel::ranks`].
    pub fn total_ranks(&self) -> usize {
        self.pp * self.ranks()
    }

    /// These degrees within one pipeline stage (`pp = 1`).
    pub fn stage(&self) -> Parallel {
        Parallel { pp: 1, ..self.clone() }
    }

    /// The tensor-parallel degree the experts are split over (not their width): `tp`, or 1 under
    /// expert-tensor parallelism.
    fn expert_tp(&self) -> usize {
        if self.etp > 1 {
            1
        } else {
            self.tp
        }
    }

    /// Whether the experts are split over `sp` too (when `ep·sp·tp` divides the experts, `tp` left out under
    /// expert-tensor parallelism): the tokens of a sequence-parallel group then go to its experts as an
    /// expert-parallel group's do.
    pub fn expert_sp(&self, cfg: &MiniMaxConfig) -> bool {
        self.sp > 1
            && cfg
                .num_local_experts
                .is_multiple_of(self.ep * self.sp * self.expert_tp())
    }

    /// The ranks the experts are spread over, each holding `E / expert_group` of them: `ep·tp` (`ep` under
    /// expert-tensor parallelism), and `sp` with them when it divides.
    pub fn expert_group(&self, cfg: &MiniMaxConfig) -> usize {
        self.ep * self.expert_tp() * if self.expert_sp(cfg) { self.sp } else { 1 }
    }

    /// The forward options the sharding of these degrees needs on top of `opts`: expert-tensor parallelism
    /// shards the experts' gate and up projections as two matmuls ([`ForwardOptions::split_gate_up`]).
    pub fn forward_options(&self, opts: &ForwardOptions) -> ForwardOptions {
        ForwardOptions {
            split_gate_up: opts.split_gate_up || self.etp > 1,
            ..opts.clone()
        }
    }

    /// The mesh `[dp, ep, sp, tp]`.
    pub fn mesh(&self) -> Mesh {
        Mesh::new(&[("dp", self.dp), ("ep", self.ep), ("sp", self.sp), ("tp", self.tp)])
            .expect("distinct names, degrees ≥ 1")
    }
}

/// MiniMax-01's plan at degrees `par` for a batch of `batch` sequences of `seq` tokens. A degree that does not
/// divide the dimension it splits (heads, key-value heads, experts, batch) is refused naming both.
pub fn minimax_plan(cfg: &MiniMaxConfig, par: &Parallel, batch: usize, seq: usize) -> Result<ShardPlan, String> {
    let check = |what: &str, n: usize, by: usize, axes: &str| {
        if n.is_multiple_of(by) {
            Ok(())
        } else {
            Err(format!("{what} ({n}) is not divisible by {axes} ({by})"))
        }
    };
    if par.pp > 1 {
        return Err(format!(
            "pp={}: pipeline parallelism cuts the model into stages (`fulgur::pipeline`); each stage is sharded \
             with pp=1",
            par.pp
        ));
    }
    check("the batch", batch, par.dp * par.ep, "dp·ep")?;
    check("the sequence length", seq, par.sp, "sp")?;
    check("num_attention_heads", cfg.num_attention_heads, par.tp, "tp")?;
    check("num_key_value_heads", cfg.num_key_value_heads, par.tp, "tp")?;
    if par.etp > 1 {
        check("num_local_experts", cfg.num_local_experts, par.ep, "ep")?;
        check("intermediate_size", cfg.intermediate_size, par.etp, "etp")?;
    } else {
        check("num_local_experts", cfg.num_local_experts, par.ep * par.tp, "ep·tp")?;
    }
    if cfg.shared_intermediate_size > 0 {
        check("shared_intermediate_size", cfg.shared_intermediate_size, par.tp, "tp")?;
    }
    let split = |d: usize| vec![("tp".to_string(), Placement::Split(d))];
    let mut experts = vec![("ep".to_string(), Placement::Split(0))];
    if par.expert_sp(cfg) {
        experts.push(("sp".to_string(), Placement::Split(0)));
    }
    let mut constraints = Vec::new();
    let experts_down = if par.etp > 1 {
        // each expert's width over tp: the gate and up halves of `gate_up_proj` [E, 2I, C] split on I (the
        // forward built with `split_gate_up` slices them apart), `down_proj` [E, C, I] on I
        let width = |d: usize| {
            let mut v = experts.clone();
            v.push(("tp".to_string(), Placement::Split(d)));
            v
        };
        constraints.push(("*.mlp.experts.gate_up_proj.slice".to_string(), width(1)));
        width(2)
    } else {
        experts.push(("tp".to_string(), Placement::Split(0)));
        experts.clone()
    };
    let rules = vec![
        // lightning attention: per-head interleaved qkv, so whole heads go to each rank
        ("*.self_attn.qkv_proj.weight".to_string(), split(0)),
        ("*.self_attn.output_gate.weight".to_string(), split(0)),
        ("*.self_attn.norm.weight".to_string(), split(0)),
        ("*.self_attn.out_proj.weight".to_string(), split(1)),
        // softmax attention
        ("*.self_attn.q_proj.weight".to_string(), split(0)),
        ("*.self_attn.k_proj.weight".to_string(), split(0)),
        ("*.self_attn.v_proj.weight".to_string(), split(0)),
        ("*.self_attn.o_proj.weight".to_string(), split(1)),
        // MoE
        ("*.mlp.experts.gate_up_proj".to_string(), experts.clone()),
        ("*.mlp.experts.down_proj".to_string(), experts_down),
        ("*.shared_mlp.gate_proj.weight".to_string(), split(0)),
        ("*.shared_mlp.up_proj.weight".to_string(), split(0)),
        ("*.shared_mlp.down_proj.weight".to_string(), split(1)),
        (
            "input_ids".to_string(),
            vec![
                ("dp".to_string(), Placement::Split(0)),
                ("ep".to_string(), Placement::Split(0)),
                ("sp".to_string(), Placement::Split(1)),
            ],
        ),
    ];
    Ok(ShardPlan {
        mesh: par.mesh(),
        sizes: HashMap::from([("B".to_string(), batch as i64), ("T".to_string(), seq as i64)]),
        rules,
        stored: Vec::new(),
        constraints,
    })
}

/// Adds to `plan` the sharded storage of the expert weights over the expert-data-parallel ranks (`dp`, ZeRO-3 /
/// FSDP for the experts): each expert weight stored split over `dp` on its first dim no other axis splits and
/// `dp` divides (the hidden dim: the expert dim is split over the expert group), gathered before its layer
/// uses it, its gradient reduce-scattered back. `params` are the model's parameters with their dims.
pub fn store_experts_sharded(plan: &mut ShardPlan, params: &[(String, Vec<crate::ir::Dim>)]) -> Result<(), String> {
    let mesh = plan.mesh.clone();
    let k = mesh.axis("dp").map_err(|e| e.to_string())?;
    let degree = mesh.sizes()[k];
    if degree == 1 {
        return Ok(());
    }
    for (name, dims) in params {
        if !name.contains(".mlp.experts.") {
            continue;
        }
        let s = plan.placement_of(name, dims).map_err(|e| e.to_string())?;
        let local = s.local_dims(&mesh, name, dims).map_err(|e| e.to_string())?;
        let free = (0..dims.len()).find(|&d| {
            !s.per_axis
                .iter()
                .zip(mesh.sizes())
                .any(|(p, g)| g > 1 && *p == Placement::Split(d))
                && local[d].as_const().is_some_and(|n| (n as usize).is_multiple_of(degree))
        });
        if let Some(d) = free {
            plan.stored
                .push((name.clone(), vec![("dp".to_string(), Placement::Split(d))]));
        }
    }
    Ok(())
}

/// The plan of MiniMax-01's training step (`passes::optim::train_step` of the forward graph): the model's plan
/// for the weights (the step's inputs named as the parameters) and the tokens, and each AdamW moment
/// (`adam_m.NAME`, `adam_v.NAME`) placed as its weight and, for optimizer-state sharding over `dp` and `ep`
/// (ZeRO-1), split on the first dim that no other axis splits and that the data-parallel degree divides (a
/// moment with none stays replicated).
pub fn minimax_train_plan(
    cfg: &MiniMaxConfig,
    par: &Parallel,
    batch: usize,
    seq: usize,
    step: &Graph,
) -> Result<ShardPlan, String> {
    let mut plan = minimax_plan(cfg, par, batch, seq)?;
    let mut moments = Vec::new();
    for id in step.inputs() {
        let (name, ty, _) = step.node(id).op.input_decl().expect("an input");
        let Some(weight) = name.strip_prefix("adam_m.").or_else(|| name.strip_prefix("adam_v.")) else {
            continue;
        };
        let s = optimizer_state_placement(&plan, weight, &ty.shape.0)?;
        let places = s
            .per_axis
            .iter()
            .enumerate()
            .filter(|(_, p)| **p != Placement::Replicated)
            .map(|(k, p)| (["dp", "ep", "sp", "tp"][k].to_string(), p.clone()))
            .collect();
        moments.push((name.to_string(), places));
    }
    plan.rules.splice(0..0, moments);
    Ok(plan)
}

/// Where the optimizer state of weight `weight` (of dims `dims`) lies: as the weight, and split over `dp` and
/// `ep` (where the weight is not split over them already) on the first dim no other axis splits and that the
/// degree divides.
pub fn optimizer_state_placement(
    plan: &ShardPlan,
    weight: &str,
    dims: &[crate::ir::Dim],
) -> Result<crate::passes::shard::Sharding, String> {
    let mesh = &plan.mesh;
    let mut s = plan.placement_of(weight, dims).map_err(|e| e.to_string())?;
    for (p, degree) in s.per_axis.iter_mut().zip(mesh.sizes()) {
        if degree == 1 {
            *p = Placement::Replicated;
        }
    }
    for axis in ["dp", "ep"] {
        let k = mesh.axis(axis).map_err(|e| e.to_string())?;
        let degree = mesh.sizes()[k];
        // an axis that already splits the weight (the experts over `ep`) leaves each rank its own state
        if degree == 1 || s.per_axis[k] != Placement::Replicated {
            continue;
        }
        let local = s.local_dims(mesh, weight, dims).map_err(|e| e.to_string())?;
        let free = (0..dims.len()).find(|&d| {
            !s.per_axis.contains(&Placement::Split(d))
                && local[d].as_const().is_some_and(|n| (n as usize).is_multiple_of(degree))
        });
        if let Some(d) = free {
            s.per_axis[k] = Placement::Split(d);
        }
    }
    Ok(s)
}

/// The graph the sharding pass reads: the model's definitional graph with the optimizer's structural rule
/// families applied (`algebra`, `lightning`: lightning attention and flash attention become their composites,
/// whose sharding rules know LASP+ and ring attention), not yet fusion or the collectives' overlap, which run on
/// the sharded graph. With `routed_moe` the `moe` family runs too: the MoE becomes the composites' chain
/// (`moe_dispatch` … `moe_combine`), which the sharding pass rewrites as the routed exchange; without, the
/// MoE stays dense and its expert parallelism gathers the tokens (the training step's form: its backward reads
/// the chain's values, see [`shard_forward`]).
pub fn structural(g: &Graph, routed_moe: bool) -> Result<Graph, String> {
    use crate::passes::rules::{families, RuleConfig};
    use crate::passes::{CostModel, Dce, EqSat, PassContext, Pipeline, Target};
    let disabled: Vec<String> = if routed_moe {
        vec!["fusion".into(), "collectives".into()]
    } else {
        vec!["moe".into(), "fusion".into(), "collectives".into()]
    };
    let fams = families(&RuleConfig::default(), &disabled)?;
    let p = Pipeline::new().with(Dce).with(EqSat::new(fams));
    let cx = PassContext {
        model: CostModel::new(Target::by_name("H100").expect("a known target")),
    };
    Ok(p.run(g, &cx, None).map_err(|e| e.to_string())?.0)
}

/// A forward graph sharded under `plan`: its structural form with the routed MoE (`prepare` applied, e.g. the
/// dtype), sharded; where a MoE chain does not fit the exchange (the experts split over axes not adjacent in
/// the mesh, or tokens the group does not divide: `ShardReport::whole_moe`), the dense form's expert
/// parallelism instead, which gathers the tokens. Returns the structural graph sharded (its parameters are the
/// model's), the simulated graph and the pass's report.
pub fn shard_forward(
    g: &Graph,
    plan: &crate::passes::shard::ShardPlan,
    prepare: impl Fn(Graph) -> Result<Graph, String>,
) -> Result<(Graph, Graph, crate::passes::shard::ShardReport), String> {
    use crate::passes::shard::shard_graph;
    let routed = prepare(structural(g, true)?)?;
    let (sg, report) = shard_graph(&routed, plan).map_err(|e| e.to_string())?;
    if report.whole_moe == 0 {
        return Ok((routed, sg, report));
    }
    let dense = prepare(structural(g, false)?)?;
    let (sg, report) = shard_graph(&dense, plan).map_err(|e| e.to_string())?;
    Ok((dense, sg, report))
}

/// The collectives a rank's program issues, in the order its kernels run (`codegen::program::step_order`):
/// each the wrapped collective with its attributes (the rank left out).
pub fn collective_sequence(g: &crate::ir::Graph) -> Vec<String> {
    use crate::ir::{Composite, Op};
    crate::codegen::program::step_order(g)
        .into_iter()
        .filter_map(|id| match &g.node(id).op {
            Op::Composite(Composite::OnRank { op, .. }) => Some(crate::passes::lang::op_text(op)),
            _ => None,
        })
        .collect()
}

/// Every rank's program issues the same collectives in the same order. Each rank's program is optimized on its
/// own (the collectives family chooses whether and how to chunk a routed exchange per program), and ranks whose
/// collectives differ would meet mismatched: a hang or wrong data. The error names the first rank and the
/// first collective that differ from rank 0's.
pub fn check_same_collectives(programs: &[crate::ir::Graph]) -> Result<(), String> {
    let Some(first) = programs.first().map(collective_sequence) else {
        return Ok(());
    };
    for (r, g) in programs.iter().enumerate().skip(1) {
        same_collectives(r, &first, &collective_sequence(g))?;
    }
    Ok(())
}

/// Rank `r`'s [`collective_sequence`] `seq` against rank 0's `first`, as [`check_same_collectives`] says.
pub fn same_collectives(r: usize, first: &[String], seq: &[String]) -> Result<(), String> {
    if seq == first {
        return Ok(());
    }
    let i = seq.iter().zip(first).take_while(|(a, b)| a == b).count();
    let say = |s: &[String]| s.get(i).cloned().unwrap_or_else(|| "nothing more".into());
    Err(format!(
        "rank {r}'s program issues {} collectives and rank 0's {}: its collective #{i} is `{}` where rank 0's is \
         `{}` (each rank's program is optimized on its own; they must agree)",
        seq.len(),
        first.len(),
        say(seq),
        say(first)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks whose programs issue other collectives are refused, naming the rank and the first difference.
    #[test]
    fn ranks_must_issue_the_same_collectives() {
        use crate::ir::{Composite, DType, Dim, Graph, Op};
        let program = |rank: usize, gathers: usize| {
            let mut g = Graph::new("p");
            let mut x = g.input("x", DType::F32, vec![Dim::from(4)]).unwrap();
            let reduce = Op::Composite(Composite::OnRank {
                op: Box::new(Op::Composite(Composite::AllReduce { mesh: vec![2], over: 0 })),
                rank,
            });
            x = g.op(reduce, &[x]).unwrap()[0];
            for _ in 0..gathers {
                let gather = Op::Composite(Composite::OnRank {
                    op: Box::new(Op::Composite(Composite::AllGather {
                        axis: 1,
                        mesh: vec![2],
                        over: 0,
                    })),
                    rank,
                });
                x = g.op(gather, &[x]).unwrap()[0];
            }
            g.add_output("y", x).unwrap();
            g
        };
        // the rank itself is not a difference
        assert_eq!(check_same_collectives(&[program(0, 1), program(1, 1)]), Ok(()));
        assert_eq!(
            check_same_collectives(&[program(0, 1), program(1, 2)]).unwrap_err(),
            "rank 1's program issues 3 collectives and rank 0's 2: its collective #2 is `all_gather[axis=1, mesh=[2], \
             over=0]` where rank 0's is `nothing more` (each rank's program is optimized on its own; they must agree)"
        );
    }

    #[test]
    fn degrees_parse_or_say_why_not() {
        assert_eq!(
            Parallel::parse("tp=2, ep=4").unwrap(),
            Parallel {
                dp: 1,
                ep: 4,
                sp: 1,
                tp: 2,
                etp: 1,
                pp: 1
            }
        );
        assert_eq!(Parallel::parse("").unwrap(), Parallel::default());
        assert_eq!(Parallel::parse("etp=1,sp=1,pp=1").unwrap(), Parallel::default());
        assert_eq!(Parallel::parse("sp=4,tp=2").unwrap().to_string(), "dp=1,ep=1,sp=4,tp=2");
        assert_eq!(Parallel::parse("tp=2,dp=2,ep=2").unwrap().ranks(), 8);
        assert_eq!(
            Parallel::parse("tp").unwrap_err(),
            "`tp`: a degree is written `name=N` (e.g. `tp=2`)"
        );
        assert_eq!(
            Parallel::parse("tp=0").unwrap_err(),
            "`tp=0`: the degree must be a whole number at least 1"
        );
        assert_eq!(Parallel::parse("tp=2,tp=2").unwrap_err(), "`tp` is given twice");
        assert_eq!(Parallel::parse("pp=2,tp=2").unwrap().total_ranks(), 4);
        assert_eq!(
            Parallel::parse("pp=2,tp=2").unwrap().to_string(),
            "dp=1,ep=1,sp=1,tp=2,pp=2"
        );
        assert_eq!(
            Parallel::parse("edp=2").unwrap_err(),
            "`edp=2`: a separate expert data-parallel degree is not built yet (dp, ep, sp, tp, etp and pp are)"
        );
        assert_eq!(
            Parallel::parse("xp=2").unwrap_err(),
            "unknown degree `xp` (known: dp, ep, tp, etp, sp, pp, edp)"
        );
    }

    /// A moment lies as its weight, split further over `dp` and `ep` where the weight is not: an expert weight
    /// split over `ep` keeps that split (each rank its own experts' state) and takes `dp` on its next dim; a
    /// weight replicated over both takes each on a free dim.
    #[test]
    fn optimizer_state_keeps_the_weights_own_splits() {
        let cfg = crate::models::MiniMaxConfig::from_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/configs/minimax-small.json"),
        )
        .unwrap();
        let par = Parallel::parse("dp=2,ep=2").unwrap();
        let plan = minimax_plan(&cfg, &par, 4, 16).unwrap();
        let dims = |v: &[i64]| v.iter().map(|&d| crate::ir::Dim::from(d)).collect::<Vec<_>>();
        let (e, c, i) = (
            cfg.num_local_experts as i64,
            cfg.hidden_size as i64,
            cfg.intermediate_size as i64,
        );
        // mesh axes: dp, ep, sp, tp
        let s = optimizer_state_placement(&plan, "model.layers.0.mlp.experts.down_proj", &dims(&[e, i, c])).unwrap();
        assert_eq!(s.per_axis[..2], [Placement::Split(1), Placement::Split(0)], "{s:?}");
        let s = optimizer_state_placement(&plan, "model.norm.weight", &dims(&[c])).unwrap();
        assert_eq!(s.per_axis[..2], [Placement::Split(0), Placement::Replicated], "{s:?}");
        let s = optimizer_state_placement(&plan, "lm_head.weight", &dims(&[cfg.vocab_size as i64, c])).unwrap();
        assert_eq!(s.per_axis[..2], [Placement::Split(0), Placement::Split(1)], "{s:?}");
    }
}
