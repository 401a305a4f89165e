//! Pipeline parallelism (`docs/parallelism.md` §4.3): the layers cut into `pp` contiguous stages, each stage's
//! forward (and, for gradients, its backward) a graph of its own (`models::stage_graph`) sharded over the other
//! degrees like the whole model (the MoE routed, forward and backward, where its chains fit the exchange), and
//! the stages run one after the other on micro-batches by the 1F1B schedule.
//!
//! Pipeline parallelism is MPMD: a stage runs other layers than its neighbours, so it is not a placement in the
//! SPMD sharding pass but a cut of the model, and the activations cross the cut as whole tensors: the hidden
//! states `[B, T, C]` forward (a stage's `hidden_out` is the next one's `hidden_in`) and their gradient backward
//! (`grad.hidden_in` of a stage is the previous one's `grad.hidden_out`). A stage's backward program is the
//! autodiff of its forward with the pseudo-loss `Σ hidden_out · grad.hidden_out` (the last stage: its loss), so
//! it recomputes the stage's forward from the input it kept (activation recompute at the stage boundary, which
//! is all a stage stores per micro-batch in flight). Gradients of the batch are the micro-batches' mean, as the
//! loss is.
//!
//! [`run`] executes the stages on simulated ranks: a thread per rank of every stage, the ranks of a stage sharing
//! one simulated transport for their collectives, the boundary tensors passed between rank `i` of neighbouring
//! stages by channels, every stage following the 1F1B order (`pp − 1 − s` warm-up forwards, then one forward and
//! one backward in turn, then the remaining backwards).

use crate::ir::{DType, Graph, Precision, Tensor};
use crate::models::{
    decode_stage_graph, stage_graph, ForwardOptions, MiniMaxConfig, STAGE_HIDDEN_IN, STAGE_HIDDEN_OUT,
};
use crate::parallel::{minimax_plan, structural, Parallel};
use crate::passes::autodiff::{differentiate_report, GradOptions, GradReport, MoeChainGrad, GRAD_PREFIX};
use crate::passes::shard::{lower_rank, shard_step, Placement};
use crate::runtime::ranks::{RankEnv, RankProgram, SimTransport, TcpLink, TcpTransport};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

/// The gradient a stage's backward takes for its `hidden_out` (the next stage's `grad.hidden_in`).
pub const GRAD_HIDDEN_OUT: &str = "grad.hidden_out";
/// The gradient a stage's backward gives for its `hidden_in`.
pub const GRAD_HIDDEN_IN: &str = "grad.hidden_in";

/// The layers of each of `pp` stages of a model of `layers` layers: contiguous, as even as the count allows (the
/// first `layers mod pp` stages one layer longer). More stages than layers is refused.
pub fn stage_layers(layers: usize, pp: usize) -> Result<Vec<Range<usize>>, String> {
    if pp == 0 || pp > layers {
        return Err(format!(
            "a model of {layers} layers cuts into 1 to {layers} pipeline stages, not {pp}"
        ));
    }
    let (base, extra) = (layers / pp, layers % pp);
    let mut start = 0;
    Ok((0..pp)
        .map(|s| {
            let n = base + usize::from(s < extra);
            let r = start..start + n;
            start += n;
            r
        })
        .collect())
}

/// One stage: its layers and its programs, one per rank of the stage.
pub struct Stage {
    pub layers: Range<usize>,
    pub forward: Vec<Graph>,
    pub backward: Option<Vec<Graph>>,
}

/// The stages of MiniMax-01 at degrees `par` (`par.pp` stages, each sharded at the other degrees) for
/// micro-batches of `micro_batch` sequences of `seq` tokens: each stage's forward with the outputs `opts` asks
/// for (the last stage's), and with `grads` its backward. `prepare` runs on each stage's structural graph before
/// it is sharded (a dtype, for instance). With `params_as_inputs` the programs take the weights as data inputs of
/// the same names (a training run, whose weights change every step).
#[allow(clippy::too_many_arguments)]
pub fn build(
    cfg: &MiniMaxConfig,
    par: &Parallel,
    micro_batch: usize,
    seq: usize,
    opts: &ForwardOptions,
    grads: bool,
    params_as_inputs: bool,
    prepare: &dyn Fn(Graph) -> Result<Graph, String>,
) -> Result<Vec<Stage>, String> {
    let layers = stage_layers(cfg.num_hidden_layers, par.pp)?;
    let inner = par.stage();
    let plan = stage_plan(cfg, &inner, micro_batch, seq)?;
    let stage_opts = par.forward_options(opts);
    let n = layers.len();
    // the MoE routed (its chains rewritten as the exchange, forward and backward), or where a chain of some
    // stage does not fit the exchange, every stage in the dense form
    let attempt = |routed: bool| -> Result<(Vec<Stage>, usize), String> {
        let mut whole = 0;
        let mut stages = Vec::new();
        for (s, range) in layers.iter().cloned().enumerate() {
            let (first, last) = (s == 0, s + 1 == n);
            let mut o = stage_opts.clone();
            if !last {
                (o.loss, o.hidden_states, o.states) = (false, false, false);
            }
            let fwd = stage_graph(cfg, &o, range.clone()).map_err(|e| e.to_string())?;
            let fwd = prepare(structural(&fwd, routed)?)?;
            let mut programs = |g: &Graph, chains: &[MoeChainGrad]| -> Result<Vec<Graph>, String> {
                // parameters as inputs keep every node: the chains' record holds
                let g = if params_as_inputs {
                    crate::passes::optim::params_to_inputs(g).map_err(|e| e.to_string())?
                } else {
                    g.clone()
                };
                let (sg, report) = shard_step(&g, &plan, chains).map_err(|e| format!("stage {s}: {e}"))?;
                whole += report.whole_moe;
                (0..inner.ranks())
                    .map(|r| lower_rank(&sg, &plan.mesh, r).map_err(|e| format!("stage {s}, rank {r}: {e}")))
                    .collect()
            };
            let backward = if grads {
                let (bg, report) = backward_graph(&fwd, first, last)?;
                Some(programs(&bg, &report.moe_chains)?)
            } else {
                None
            };
            let forward = programs(&fwd, &[])?;
            stages.push(Stage {
                layers: range,
                forward,
                backward,
            });
        }
        Ok((stages, whole))
    };
    let (stages, whole) = attempt(true)?;
    if whole == 0 {
        return Ok(stages);
    }
    Ok(attempt(false)?.0)
}

/// MiniMax-01's plan at the degrees `inner` (a stage's) for `b` sequences of `t` tokens, with the hidden states
/// crossing a cut (and their gradient) placed as the tokens are: the batch over dp and ep, the sequence over sp.
fn stage_plan(
    cfg: &MiniMaxConfig,
    inner: &Parallel,
    b: usize,
    t: usize,
) -> Result<crate::passes::shard::ShardPlan, String> {
    let mut plan = minimax_plan(cfg, inner, b, t)?;
    let tokens = vec![
        ("dp".to_string(), Placement::Split(0)),
        ("ep".to_string(), Placement::Split(0)),
        ("sp".to_string(), Placement::Split(1)),
    ];
    for name in [STAGE_HIDDEN_IN, GRAD_HIDDEN_OUT] {
        plan.rules.push((name.to_string(), tokens.clone()));
    }
    Ok(plan)
}

/// The stages of MiniMax-01's generation at degrees `par` (`par.pp` stages, each sharded at the other degrees,
/// the MoE routed where its chains fit the exchange): each stage's prefill of `b` prompts of `p` tokens (its
/// layers' forward, outputting their states; the last stage also the logits) and its decode step (one token per
/// sequence, taking `position` and its layers' states and giving their new values), as the `forward` programs of
/// two lists of stages. `prepare` runs on each stage's structural graph before it is sharded.
pub fn build_generation(
    cfg: &MiniMaxConfig,
    par: &Parallel,
    b: usize,
    p: usize,
    prepare: &dyn Fn(Graph) -> Result<Graph, String>,
) -> Result<(Vec<Stage>, Vec<Stage>), String> {
    let layers = stage_layers(cfg.num_hidden_layers, par.pp)?;
    let inner = par.stage();
    let (prefill_plan, decode_plan) = (stage_plan(cfg, &inner, b, p)?, stage_plan(cfg, &inner, b, 1)?);
    let opts = par.forward_options(&ForwardOptions {
        states: true,
        ..Default::default()
    });
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for (s, range) in layers.into_iter().enumerate() {
        let programs = |g: &Graph, plan: &crate::passes::shard::ShardPlan| -> Result<Vec<Graph>, String> {
            let (_, sg, _) = crate::parallel::shard_forward(g, plan, prepare).map_err(|e| format!("stage {s}: {e}"))?;
            (0..inner.ranks())
                .map(|r| lower_rank(&sg, &plan.mesh, r).map_err(|e| format!("stage {s}, rank {r}: {e}")))
                .collect()
        };
        let fwd = stage_graph(cfg, &opts, range.clone()).map_err(|e| e.to_string())?;
        let dec = decode_stage_graph(cfg, &opts, range.clone()).map_err(|e| e.to_string())?;
        prefill.push(Stage {
            layers: range.clone(),
            forward: programs(&fwd, &prefill_plan)?,
            backward: None,
        });
        decode.push(Stage {
            layers: range,
            forward: programs(&dec, &decode_plan)?,
            backward: None,
        });
    }
    Ok((prefill, decode))
}

/// The data inputs of a stage's programs (its rank 0's forward) but the hidden states crossing its cut: the
/// tokens, a decode step's `position` and the layers' states.
pub fn stage_inputs(stage: &Stage) -> Vec<String> {
    let g = &stage.forward[0];
    g.inputs()
        .into_iter()
        .filter_map(|v| match g.node(v).op.input_decl() {
            Some((n, _, false)) if n != STAGE_HIDDEN_IN => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

/// A stage's backward: its forward with the pseudo-loss `Σ hidden_out · grad.hidden_out` (the last stage keeps its
/// loss), differentiated for every parameter and, past the first stage, for `hidden_in`; with where its MoE
/// chains' backward lies (for the sharding pass's routed exchange).
fn backward_graph(fwd: &Graph, first: bool, last: bool) -> Result<(Graph, GradReport), String> {
    let mut g = fwd.clone();
    if !last {
        let h = g
            .outputs()
            .iter()
            .find(|(n, _)| n == STAGE_HIDDEN_OUT)
            .map(|(_, v)| *v)
            .ok_or("a stage without `hidden_out`")?;
        let dims = g.dims(h).to_vec();
        let dt = g.ty(h).dtype;
        let seed = g.input(GRAD_HIDDEN_OUT, dt, dims).map_err(|e| e.to_string())?;
        let p = g.mul(h, seed).map_err(|e| e.to_string())?;
        let s = g.sum(p, &[0, 1, 2], false).map_err(|e| e.to_string())?;
        let s = g.reshape(s, vec![crate::ir::Dim::from(1)]).map_err(|e| e.to_string())?;
        g.add_output("loss", s).map_err(|e| e.to_string())?;
    }
    let opts = GradOptions {
        inputs: if first {
            Vec::new()
        } else {
            vec![STAGE_HIDDEN_IN.to_string()]
        },
        ..Default::default()
    };
    differentiate_report(&g, "loss", &opts).map_err(|e| e.to_string())
}

/// What a pipeline run gives.
pub struct PipelineRun {
    /// The stages' outputs (their rank 0's) for each micro-batch, in order: the last stage's, and what the earlier
    /// ones output beside the hidden states they pass on (their layers' states in a generation).
    pub outputs: Vec<BTreeMap<String, Tensor>>,
    /// With the backward: every parameter's gradient of the batch's loss (the micro-batches' mean), by
    /// parameter name (`grad.` prefix dropped); a parameter two stages read (tied embeddings) gets their sum. For
    /// an update per stage ([`PipelineProcess::step_stage`]), the stage's parameters' alone.
    pub grads: BTreeMap<String, Tensor>,
    /// For an update per stage: the squared norm of every gradient of the model (all stages'), which clips the
    /// stage's update (`passes::optim::update_step_given_norm`); `None` where `grads` holds every gradient.
    pub grad_sq: Option<f64>,
}

/// A launched pipeline's training state, held and updated per stage: each process holds and updates the
/// parameters its stage reads (and their moments); a parameter more than one stage reads (tied embeddings) is
/// updated alike by each of them, by the gradient summed over them. At a checkpoint the whole state is gathered
/// ([`gather_state`]), each parameter given by the rank 0 of the first stage that reads it.
#[derive(Clone, Debug)]
pub struct StageState {
    /// This process's stage.
    pub stage: usize,
    /// The parameters this stage reads (name and shape), sorted by name.
    pub own: Vec<(String, Vec<usize>)>,
    /// The parameters more than one stage reads, sorted by name (the same list on every process).
    pub tied: Vec<(String, Vec<usize>)>,
    /// The parameters this process gives at a checkpoint (none unless it is its stage's rank 0).
    pub gives: BTreeSet<String>,
    /// Every parameter (name and shape), sorted by name.
    pub all: Vec<(String, Vec<usize>)>,
}

impl StageState {
    /// The state of global rank `job_rank` of a launched pipeline of `stages` whose model has the parameters
    /// `params` (name and shape). Every parameter must be read by some stage, and a stage's programs take its
    /// parameters as inputs of the same names (built with the weights as inputs).
    pub fn new(stages: &[Stage], job_rank: usize, params: &BTreeMap<String, Vec<usize>>) -> Result<StageState, String> {
        let r = stages.first().map(|s| s.forward.len()).unwrap_or(0);
        if r == 0 {
            return Err("a pipeline needs a stage and a rank".into());
        }
        let (stage, leader) = (job_rank / r, job_rank.is_multiple_of(r));
        if stage >= stages.len() {
            return Err(format!(
                "rank {job_rank} is past the {} stages of {r} ranks",
                stages.len()
            ));
        }
        let reads: Vec<BTreeSet<String>> = stages.iter().map(|st| stage_reads(st, params)).collect();
        let mut first_reader: BTreeMap<&str, usize> = BTreeMap::new();
        let mut readers: BTreeMap<&str, usize> = BTreeMap::new();
        for (k, set) in reads.iter().enumerate() {
            for n in set {
                first_reader.entry(n.as_str()).or_insert(k);
                *readers.entry(n.as_str()).or_default() += 1;
            }
        }
        if let Some(n) = params.keys().find(|n| !first_reader.contains_key(n.as_str())) {
            return Err(format!("parameter `{n}` is read by no pipeline stage"));
        }
        let with_shape = |n: &str| (n.to_string(), params[n].clone());
        Ok(StageState {
            stage,
            own: reads[stage].iter().map(|n| with_shape(n)).collect(),
            tied: readers
                .iter()
                .filter(|(_, &c)| c > 1)
                .map(|(n, _)| with_shape(n))
                .collect(),
            gives: if leader {
                first_reader
                    .iter()
                    .filter(|(_, &k)| k == stage)
                    .map(|(n, _)| n.to_string())
                    .collect()
            } else {
                BTreeSet::new()
            },
            all: params.iter().map(|(n, s)| (n.clone(), s.clone())).collect(),
        })
    }
}

/// The parameters of `params` that a stage's programs take (its rank 0's forward and backward).
fn stage_reads(stage: &Stage, params: &BTreeMap<String, Vec<usize>>) -> BTreeSet<String> {
    let mut graphs = vec![&stage.forward[0]];
    if let Some(b) = &stage.backward {
        graphs.push(&b[0]);
    }
    graphs
        .into_iter()
        .flat_map(|g| {
            g.inputs()
                .into_iter()
                .filter_map(move |v| g.node(v).op.input_decl().map(|(n, _, _)| n.to_string()))
        })
        .filter(|n| params.contains_key(n))
        .collect()
}

/// The whole training state of a launched pipeline whose stages hold their own parts ([`StageState`]), for a
/// checkpoint, on the job's rank 0 (an empty map elsewhere): for each parameter of `all` in order, and for it and
/// each of its moments (the names with each of `moments` prefixed), one sum over the job's transport `job` (this
/// process global rank `job_rank` of `world`), given by the process whose `gives` holds the parameter (from
/// `mine`) and as zeros by every other. A collective per tensor: every process holds one whole tensor more than
/// its own part at a time, and rank 0 the whole state it writes.
pub fn gather_state(
    job: &dyn crate::ir::Transport,
    (job_rank, world): (usize, usize),
    mine: &HashMap<String, Tensor>,
    state: &StageState,
    moments: &[&str],
) -> Result<HashMap<String, Tensor>, String> {
    let op = crate::ir::Op::Composite(crate::ir::Composite::AllReduce {
        mesh: vec![world],
        over: 0,
    });
    let mut out = HashMap::new();
    for (name, shape) in &state.all {
        let n: usize = shape.iter().product();
        let keys = std::iter::once(name.clone()).chain(moments.iter().map(|p| format!("{p}{name}")));
        for key in keys {
            let flat = if state.gives.contains(name) {
                let t = mine
                    .get(&key)
                    .ok_or_else(|| format!("stage {}: its state has no `{key}`", state.stage))?;
                if t.shape != *shape {
                    return Err(format!(
                        "stage {}: `{key}` has shape {:?}, the parameter {shape:?}",
                        state.stage, t.shape
                    ));
                }
                t.to_f64()
            } else {
                vec![0.0; n]
            };
            let part = unrounded(DType::F32, vec![n], flat);
            let sum = crate::ir::Transport::collective(job, &op, job_rank, &[&part])
                .map_err(|e| format!("gathering `{key}` over the job: {e}"))?
                .pop()
                .ok_or("gathering the state gave nothing")?;
            if job_rank == 0 {
                out.insert(key, Tensor::from_f64(DType::F32, shape.clone(), sum.to_f64()));
            }
        }
    }
    Ok(out)
}

/// Builds a rank's program from its graph, on the thread that runs it.
pub type MakeProgram = Arc<dyn Fn(&Graph) -> Result<Box<dyn RankProgram>, String> + Send + Sync>;

/// A rank's forward and (for gradients) backward programs.
pub type RankPrograms = (Box<dyn RankProgram>, Option<Box<dyn RankProgram>>);

/// Builds the programs of rank `i` of stage `s` (called as `build(s, i)`), on the thread that runs them: from the
/// stages' graphs ([`MakeProgram`]), or from programs compiled earlier (a parallel artifact's).
pub type BuildRank = Arc<dyn Fn(usize, usize) -> Result<RankPrograms, String> + Send + Sync>;

/// A stage's forward graphs and backward graphs, one per rank.
type StageGraphs = (Vec<Graph>, Option<Vec<Graph>>);

/// The [`BuildRank`] of `stages`' graphs, each built by `make`.
pub fn from_graphs(stages: &[Stage], make: MakeProgram) -> BuildRank {
    let graphs: Arc<Vec<StageGraphs>> = Arc::new(
        stages
            .iter()
            .map(|st| (st.forward.clone(), st.backward.clone()))
            .collect(),
    );
    Arc::new(move |s: usize, i: usize| {
        let (fwd, bwd) = graphs.get(s).ok_or_else(|| format!("no stage {s}"))?;
        let f = make(fwd.get(i).ok_or_else(|| format!("no rank {i} in stage {s}"))?)?;
        let b = match bwd {
            Some(b) => Some(make(&b[i])?),
            None => None,
        };
        Ok((f, b))
    })
}

/// A stage rank's forward outputs (the last stage's, per micro-batch) and its gradients summed over them.
type RankRun = (Vec<BTreeMap<String, Tensor>>, BTreeMap<String, Tensor>);

/// A stage rank's step, by (stage, rank).
type RankResult = ((usize, usize), Result<RankRun, String>);

/// One step of the 1F1B order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Forward(usize),
    Backward(usize),
}

/// The 1F1B order of stage `s` of `pp` over `m` micro-batches: `pp − 1 − s` warm-up forwards, then a forward and a
/// backward in turn, then the remaining backwards. Without `backward`, the forwards in order.
pub fn one_f_one_b(s: usize, pp: usize, m: usize, backward: bool) -> Vec<Op> {
    if !backward {
        return (0..m).map(Op::Forward).collect();
    }
    let warm = (pp - 1 - s).min(m);
    let mut ops: Vec<Op> = (0..warm).map(Op::Forward).collect();
    for j in 0..m - warm {
        ops.push(Op::Forward(warm + j));
        ops.push(Op::Backward(j));
    }
    ops.extend((m - warm..m).map(Op::Backward));
    ops
}

/// A failure handed on by a neighbour or a collective, not a rank's own.
const HANDED: &str = "(handed on) ";

/// What a rank's thread is given per step: the micro-batches, the inputs every call takes (weights passed as
/// inputs), and its stage's transport for the step.
type Job = (Arc<Vec<Tensor>>, Arc<HashMap<String, Tensor>>, Arc<SimTransport>);

/// Where a rank receives a boundary tensor from: a channel from a thread of this process (simulated ranks) or
/// the connection to a launched neighbour.
enum Inbox {
    Chan(Receiver<Tensor>),
    Tcp(Arc<TcpLink>),
}

/// Where a rank sends a boundary tensor to.
enum Outbox {
    Chan(Sender<Tensor>),
    Tcp(Arc<TcpLink>),
}

impl Inbox {
    /// The next tensor; `what` names the neighbouring stage ("previous", "next") for a channel's failure.
    fn recv(&self, what: &str) -> Result<Tensor, String> {
        match self {
            Inbox::Chan(rx) => rx.recv().map_err(|_| format!("{HANDED}the {what} stage failed")),
            Inbox::Tcp(l) => l.recv().map_err(|e| format!("{HANDED}the {what} stage: {e}")),
        }
    }
}

impl Outbox {
    fn send(&self, t: Tensor, what: &str) -> Result<(), String> {
        match self {
            Outbox::Chan(tx) => tx.send(t).map_err(|_| format!("{HANDED}the {what} stage failed")),
            Outbox::Tcp(l) => l.send(t).map_err(|e| format!("{HANDED}the {what} stage: {e}")),
        }
    }
}

/// A rank's ends of the cuts: from the cut before (s − 1 → s) and the cut after (s → s + 1).
#[derive(Default)]
struct Links {
    recv_fwd: Option<Inbox>,
    send_fwd: Option<Outbox>,
    recv_bwd: Option<Inbox>,
    send_bwd: Option<Outbox>,
}

/// A pipeline whose ranks live from step to step (a training run): a thread per rank of every stage owns its
/// programs, built once on it; every [`PipelineThreads::step`] runs the stages' 1F1B order over the step's
/// micro-batches, each stage's ranks through a fresh simulated transport. A rank that fails ends the pipeline
/// (its neighbours stop at their next exchange): that step fails naming it, and so does every later one.
pub struct PipelineThreads {
    pp: usize,
    ranks: usize,
    precision: Precision,
    timeout: Duration,
    jobs: Vec<Sender<Job>>,
    results: Receiver<RankResult>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl PipelineThreads {
    /// Starts a thread per rank of every stage of `stages`, each building its programs with `make`; fails
    /// naming the first stage and rank whose program could not be made.
    pub fn new(
        stages: &[Stage],
        make: MakeProgram,
        precision: Precision,
        timeout: Duration,
    ) -> Result<PipelineThreads, String> {
        let pp = stages.len();
        let ranks = stages.first().map(|s| s.forward.len()).unwrap_or(0);
        PipelineThreads::with_builder((pp, ranks), from_graphs(stages, make), precision, timeout)
    }

    /// Starts a thread per rank of `pp` stages of `ranks` ranks, rank `i` of stage `s` building its programs
    /// with `build(s, i)`; fails naming the first stage and rank whose programs could not be built.
    pub fn with_builder(
        (pp, ranks): (usize, usize),
        build: BuildRank,
        precision: Precision,
        timeout: Duration,
    ) -> Result<PipelineThreads, String> {
        if pp == 0 || ranks == 0 {
            return Err("a pipeline needs a stage and a rank".into());
        }
        let mut links: Vec<Links> = (0..pp * ranks).map(|_| Links::default()).collect();
        for s in 0..pp - 1 {
            for i in 0..ranks {
                let (tx, rx) = channel();
                links[s * ranks + i].send_fwd = Some(Outbox::Chan(tx));
                links[(s + 1) * ranks + i].recv_fwd = Some(Inbox::Chan(rx));
                let (tx, rx) = channel();
                links[(s + 1) * ranks + i].send_bwd = Some(Outbox::Chan(tx));
                links[s * ranks + i].recv_bwd = Some(Inbox::Chan(rx));
            }
        }
        let (out_tx, results) = channel();
        let (ready_tx, ready) = channel();
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for (k, l) in links.into_iter().enumerate() {
            let (s, i) = (k / ranks, k % ranks);
            let (tx, rx) = channel::<Job>();
            jobs.push(tx);
            let (build, out_tx, ready_tx) = (build.clone(), out_tx.clone(), ready_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("stage{s}.rank{i}"))
                .spawn(move || {
                    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| build(s, i)))
                        .unwrap_or_else(|_| Err("building its programs panicked".into()));
                    let (mut fwd, mut bwd) = match built {
                        Ok(p) => {
                            let _ = ready_tx.send(((s, i), Ok(())));
                            p
                        }
                        Err(e) => {
                            let _ = ready_tx.send(((s, i), Err(e)));
                            return;
                        }
                    };
                    while let Ok((micro, feed, t)) = rx.recv() {
                        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            one_step((s, pp, i), &mut fwd, bwd.as_mut(), &micro, &feed, t.clone(), &l)
                        }))
                        .unwrap_or_else(|_| Err("its program panicked".into()));
                        let failed = out.is_err();
                        if let Err(e) = &out {
                            t.fail(i, e);
                        }
                        if out_tx.send(((s, i), out)).is_err() || failed {
                            // a failed rank ends the pipeline: its channels close, its neighbours stop
                            return;
                        }
                    }
                })
                .map_err(|e| format!("cannot start stage {s}, rank {i}'s thread: {e}"))?;
            threads.push(spawned);
        }
        drop(ready_tx);
        let mut first_err: Option<((usize, usize), String)> = None;
        for _ in 0..pp * ranks {
            match ready.recv() {
                Ok((at, Err(e))) => {
                    if first_err.as_ref().is_none_or(|(a, _)| at < *a) {
                        first_err = Some((at, e));
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let p = PipelineThreads {
            pp,
            ranks,
            precision,
            timeout,
            jobs,
            results,
            threads,
        };
        match first_err {
            Some(((s, i), e)) => Err(format!("stage {s}, rank {i}: {e}")),
            None => Ok(p),
        }
    }

    /// One step over `micro` (each micro-batch's `input_ids`), every call of every program also given `feed`
    /// (weights passed as inputs): the last stage's outputs per micro-batch and, with backward programs, the
    /// gradients (the micro-batches' mean).
    pub fn step(&mut self, micro: &[Tensor], feed: &HashMap<String, Tensor>) -> Result<PipelineRun, String> {
        let (pp, ranks) = (self.pp, self.ranks);
        let m = micro.len();
        if m == 0 {
            return Err("a pipeline step needs a micro-batch".into());
        }
        let micro = Arc::new(micro.to_vec());
        let feed = Arc::new(feed.clone());
        let transports: Vec<Arc<SimTransport>> = (0..pp)
            .map(|_| Arc::new(SimTransport::new(ranks, self.precision, self.timeout)))
            .collect();
        for (k, j) in self.jobs.iter().enumerate() {
            j.send((micro.clone(), feed.clone(), transports[k / ranks].clone()))
                .map_err(|_| format!("stage {}, rank {}: the pipeline failed earlier", k / ranks, k % ranks))?;
        }
        let mut results: Vec<RankResult> = Vec::new();
        for _ in 0..pp * ranks {
            results.push(
                self.results
                    .recv()
                    .map_err(|_| "the pipeline's threads have ended".to_string())?,
            );
        }
        results.sort_by_key(|(at, _)| *at);
        // the first failure a rank met on its own (not handed on by a neighbouring stage, nor by its stage's
        // collectives: the stage's transport records which), else the first one
        let own = |(s, i): (usize, usize), e: &String| !e.starts_with(HANDED) && transports[s].failed_on_its_own(i);
        let failed: Vec<&RankResult> = results.iter().filter(|(_, r)| r.is_err()).collect();
        if let Some(((s, i), Err(e))) = failed
            .iter()
            .find(|(at, r)| r.as_ref().err().is_some_and(|e| own(*at, e)))
            .or(failed.first())
            .copied()
        {
            return Err(format!("stage {s}, rank {i}: {}", e.trim_start_matches(HANDED)));
        }
        let mut outputs: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new(); m];
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        for ((_, i), r) in results {
            let (outs, g) = r?;
            if i != 0 {
                continue;
            }
            for (j, o) in outs.into_iter().enumerate() {
                outputs[j].extend(o);
            }
            for (name, t) in g {
                match grads.get_mut(&name) {
                    Some(acc) => add_into(acc, &t)?,
                    None => {
                        grads.insert(name, t);
                    }
                }
            }
        }
        for t in grads.values_mut() {
            scale(t, 1.0 / m as f64);
        }
        Ok(PipelineRun {
            outputs,
            grads,
            grad_sq: None,
        })
    }
}

impl Drop for PipelineThreads {
    fn drop(&mut self) {
        self.jobs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `stages` once on simulated ranks over the micro-batches `micro` (each `input_ids` `[b, T]`), the programs
/// built on their threads by `make` (see [`PipelineThreads`]).
pub fn run(
    stages: &[Stage],
    micro: &[Tensor],
    make: MakeProgram,
    precision: Precision,
    timeout: Duration,
) -> Result<PipelineRun, String> {
    PipelineThreads::new(stages, make, precision, timeout)?.step(micro, &HashMap::new())
}

/// What a launched pipeline rank gives of a step: its place (stage, rank within the stage), its outputs (its
/// forwards', per micro-batch, but the hidden states it passed on: the last stage's logits and loss, an earlier
/// stage's layers' states where it outputs them) and its gradients (summed over the micro-batches).
pub struct LaunchedRun {
    pub stage: usize,
    pub rank: usize,
    pub outputs: Vec<BTreeMap<String, Tensor>>,
    pub grads: BTreeMap<String, Tensor>,
}

/// This process's rank of a pipeline started by a launcher (`fulgur launch`, torchrun, Slurm, Open MPI), living
/// from step to step: global rank `g` of the job is rank `g mod R` of stage `g / R` (`R` the ranks of a stage),
/// so the job has `pp · R` processes. At [`PipelineProcess::new`] every process exchanges addresses with the
/// others through the job's transport (one all-gather): each stage's rank 0 gives the port of its stage's own
/// rendezvous (the stage's collectives go through `connect_stage` there, among its `R` ranks only: the stages run
/// different programs, so no collective spans them), and each rank that has a next stage the port where rank
/// `i` of that stage connects to it (the cut, a [`TcpLink`] carrying the activations forward and their
/// gradients back). A neighbour that fails or exits makes this rank fail at its next exchange with it, naming
/// it. Addresses are IPv4.
pub struct PipelineProcess {
    stage: usize,
    rank: usize,
    pp: usize,
    world: usize,
    job_rank: usize,
    job: Arc<dyn crate::ir::Transport + Send + Sync>,
    transport: Arc<dyn crate::ir::Transport + Send + Sync>,
    links: Links,
    fwd: Box<dyn RankProgram>,
    bwd: Option<Box<dyn RankProgram>>,
}

/// A stage's transport for its collectives, connected from the stage's own rendezvous (rank and world within
/// the stage).
pub type ConnectStage<'a> = &'a dyn Fn(&RankEnv) -> Result<Arc<dyn crate::ir::Transport + Send + Sync>, String>;

impl PipelineProcess {
    /// Meets the job's other processes through `job` (connected at the job's rendezvous, `env`), connects this
    /// rank's stage and cuts, and builds its programs with `make`.
    pub fn new(
        env: &RankEnv,
        job: Arc<TcpTransport>,
        stages: &[Stage],
        make: MakeProgram,
        connect_stage: ConnectStage,
        timeout: Duration,
    ) -> Result<PipelineProcess, String> {
        let pp = stages.len();
        let r = stages.first().map(|s| s.forward.len()).unwrap_or(0);
        PipelineProcess::with_builder(env, job, (pp, r), from_graphs(stages, make), connect_stage, timeout)
    }

    /// [`PipelineProcess::new`] for `pp` stages of `r` ranks, this rank's programs built by `build(stage, rank)`.
    pub fn with_builder(
        env: &RankEnv,
        job: Arc<TcpTransport>,
        (pp, r): (usize, usize),
        build: BuildRank,
        connect_stage: ConnectStage,
        timeout: Duration,
    ) -> Result<PipelineProcess, String> {
        use std::net::{IpAddr, SocketAddr, TcpListener};
        if pp == 0 || r == 0 {
            return Err("a pipeline needs a stage and a rank".into());
        }
        if env.world != pp * r {
            return Err(format!(
                "launched as {} ranks ({}'s variables) but {pp} pipeline stages of {r} ranks need {}",
                env.world,
                env.source,
                pp * r
            ));
        }
        let (s, i) = (env.rank / r, env.rank % r);
        let me = format!("stage {s}, rank {i}");
        let listen = || TcpListener::bind("0.0.0.0:0").map_err(|e| format!("{me}: cannot listen: {e}"));
        let port_of = |l: &TcpListener| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string());
        // the cut to the next stage: listening before the exchange, so the next stage's connection waits in the
        // backlog however the processes are scheduled
        let cut = if s + 1 < pp { Some(listen()?) } else { None };
        // the stage's rendezvous: a free port, bound again by the stage's transport
        let stage_port = if i == 0 { port_of(&listen()?)? } else { 0 };
        let ip = match job.local_ip() {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(a) => {
                return Err(format!(
                    "{me}: an IPv6 address ({a}); launched pipeline stages need IPv4"
                ))
            }
        };
        let cut_port = match &cut {
            Some(l) => port_of(l)?,
            None => 0,
        };
        let row: Vec<f64> = ip
            .iter()
            .map(|&b| f64::from(b))
            .chain([f64::from(cut_port), f64::from(stage_port)])
            .collect();
        const ROW: usize = 6;
        // axis 1 of the simulated view `[R, ROW]` (axis 0 is the rank axis)
        let op = crate::ir::Op::Composite(crate::ir::Composite::AllGather {
            axis: 1,
            mesh: vec![env.world],
            over: 0,
        });
        let mine = Tensor::from_f64(DType::F32, vec![ROW], row);
        let table = crate::ir::Transport::collective(job.as_ref(), &op, env.rank, &[&mine])
            .map_err(|e| format!("{me}: exchanging addresses: {e}"))?
            .pop()
            .ok_or("exchanging addresses gave nothing")?
            .to_f64();
        let addr = |g: usize, col: usize| -> SocketAddr {
            let v = &table[g * ROW..(g + 1) * ROW];
            let ip = IpAddr::from([v[0] as u8, v[1] as u8, v[2] as u8, v[3] as u8]);
            SocketAddr::new(ip, v[col] as u16)
        };
        let head = addr(s * r, 5);
        let stage_env = RankEnv {
            rank: i,
            world: r,
            local_rank: env.local_rank,
            master_addr: head.ip().to_string(),
            master_port: head.port(),
            source: env.source,
        };
        let transport = connect_stage(&stage_env).map_err(|e| format!("{me}: the stage's rendezvous: {e}"))?;
        let mut links = Links::default();
        if s > 0 {
            let peer = format!("stage {}, rank {i}", s - 1);
            let l = TcpLink::connect(addr((s - 1) * r + i, 4), env.rank, &peer, timeout)
                .map_err(|e| format!("{me}: {e}"))?;
            let l = Arc::new(l);
            links.recv_fwd = Some(Inbox::Tcp(l.clone()));
            links.send_bwd = Some(Outbox::Tcp(l));
        }
        if let Some(listener) = &cut {
            let peer = format!("stage {}, rank {i}", s + 1);
            let l = TcpLink::accept(listener, (s + 1) * r + i, &peer, timeout).map_err(|e| format!("{me}: {e}"))?;
            let l = Arc::new(l);
            links.send_fwd = Some(Outbox::Tcp(l.clone()));
            links.recv_bwd = Some(Inbox::Tcp(l));
        }
        let (fwd, bwd) = build(s, i).map_err(|e| format!("{me}: {e}"))?;
        Ok(PipelineProcess {
            stage: s,
            rank: i,
            pp,
            world: env.world,
            job_rank: env.rank,
            job,
            transport,
            links,
            fwd,
            bwd,
        })
    }

    /// This rank's step: its stage's 1F1B order over `micro`, every call also given `feed` (weights passed as
    /// inputs); its own outputs and gradients.
    pub fn run(&mut self, micro: &[Tensor], feed: &HashMap<String, Tensor>) -> Result<LaunchedRun, String> {
        let (s, i) = (self.stage, self.rank);
        let (outputs, grads) = one_step(
            (s, self.pp, i),
            &mut self.fwd,
            self.bwd.as_mut(),
            micro,
            feed,
            self.transport.clone(),
            &self.links,
        )
        .map_err(|e| format!("stage {s}, rank {i}: {}", e.trim_start_matches(HANDED)))?;
        Ok(LaunchedRun {
            stage: s,
            rank: i,
            outputs,
            grads,
        })
    }

    /// A step whose results every process of the job shares as far as an update per stage needs them: the loss
    /// of each micro-batch (the last stage's), this stage's gradients of `state.own` (the micro-batches' mean), a
    /// parameter of `state.tied` getting the sum over the stages that read it, and the squared norm of every
    /// gradient of the model. One sum over the job's ranks in rank order carries the losses (from the last
    /// stage's rank 0), the tied gradients (from the rank 0 of each stage that reads them) and each stage's
    /// squared norm of its other gradients (from its rank 0); every other place gives zeros. Without `state`
    /// (a forward alone) the sum carries the losses.
    pub fn step_stage(
        &mut self,
        micro: &[Tensor],
        feed: &HashMap<String, Tensor>,
        state: Option<&StageState>,
    ) -> Result<PipelineRun, String> {
        let m = micro.len();
        let run = self.run(micro, feed)?;
        let leader = self.rank == 0;
        let last = leader && self.stage + 1 == self.pp;
        let none = Vec::new();
        let (own, tied) = match state {
            Some(st) => (&st.own, &st.tied),
            None => (&none, &none),
        };
        let grad_of = |name: &str, shape: &[usize]| -> Result<&Tensor, String> {
            let g = run
                .grads
                .get(name)
                .ok_or_else(|| format!("stage {}: no gradient of `{name}`", self.stage))?;
            if g.shape != shape {
                return Err(format!(
                    "stage {}: the gradient of `{name}` has shape {:?}, the parameter {shape:?}",
                    self.stage, g.shape
                ));
            }
            Ok(g)
        };
        let is_tied = |name: &str| tied.iter().any(|(t, _)| t == name);
        let mut grads = BTreeMap::new();
        let mut own_sq = 0.0;
        for (name, shape) in own.iter().filter(|(n, _)| !is_tied(n)) {
            let v: Vec<f64> = grad_of(name, shape)?.to_f64().iter().map(|x| x / m as f64).collect();
            own_sq += v.iter().map(|x| x * x).sum::<f64>();
            grads.insert(name.clone(), unrounded(DType::F32, shape.clone(), v));
        }
        let mut flat: Vec<f64> = Vec::new();
        for j in 0..m {
            let loss = match run.outputs.get(j) {
                Some(o) if last => o
                    .get("loss")
                    .ok_or("the last stage gave no `loss`")?
                    .to_f64()
                    .first()
                    .copied()
                    .unwrap_or(f64::NAN),
                _ => 0.0,
            };
            flat.push(loss);
        }
        let reads = |name: &str| own.iter().any(|(o, _)| o == name);
        for (name, shape) in tied {
            if leader && reads(name) {
                flat.extend(grad_of(name, shape)?.to_f64());
            } else {
                flat.extend(std::iter::repeat_n(0.0, shape.iter().product()));
            }
        }
        flat.push(if leader { own_sq } else { 0.0 });
        let op = crate::ir::Op::Composite(crate::ir::Composite::AllReduce {
            mesh: vec![self.world],
            over: 0,
        });
        let len = flat.len();
        let mine = unrounded(DType::F32, vec![len], flat);
        let sum = crate::ir::Transport::collective(self.job.as_ref(), &op, self.job_rank, &[&mine])
            .map_err(|e| format!("summing the step's gradients over the job: {e}"))?
            .pop()
            .ok_or("summing the step's gradients gave nothing")?
            .to_f64();
        let mut outputs = Vec::new();
        for &loss in &sum[..m] {
            outputs.push([("loss".to_string(), Tensor::from_f64(DType::F32, vec![1], vec![loss]))].into());
        }
        let mut at = m;
        let mut tied_sq = 0.0;
        for (name, shape) in tied {
            let n: usize = shape.iter().product();
            let v: Vec<f64> = sum[at..at + n].iter().map(|x| x / m as f64).collect();
            at += n;
            tied_sq += v.iter().map(|x| x * x).sum::<f64>();
            if reads(name) {
                grads.insert(name.clone(), unrounded(DType::F32, shape.clone(), v));
            }
        }
        Ok(PipelineRun {
            outputs,
            grads,
            grad_sq: state.map(|_| sum[at] + tied_sq),
        })
    }
}

impl PipelineProcess {
    /// This rank's step with the outputs named `share` (the last stage's, such as the logits) given to every
    /// process of the job beside its own outputs: per micro-batch and name, one sum over the job of the shape
    /// (the last stage's rank 0 gives it, every other process zeros), then one of the values. A generation's
    /// greedy choice needs the logits in every process, while each keeps its own stage's states.
    pub fn step_sharing(
        &mut self,
        micro: &[Tensor],
        feed: &HashMap<String, Tensor>,
        share: &[String],
    ) -> Result<PipelineRun, String> {
        const MAX_RANK: usize = 8;
        let run = self.run(micro, feed)?;
        let giver = self.rank == 0 && self.stage + 1 == self.pp;
        let mut outputs = run.outputs;
        outputs.resize(micro.len(), BTreeMap::new());
        let op = crate::ir::Op::Composite(crate::ir::Composite::AllReduce {
            mesh: vec![self.world],
            over: 0,
        });
        let sum = |flat: Vec<f64>, name: &str| -> Result<Vec<f64>, String> {
            let len = flat.len();
            let mine = unrounded(DType::F32, vec![len], flat);
            Ok(
                crate::ir::Transport::collective(self.job.as_ref(), &op, self.job_rank, &[&mine])
                    .map_err(|e| format!("sharing `{name}` over the job: {e}"))?
                    .pop()
                    .ok_or("sharing an output gave nothing")?
                    .to_f64(),
            )
        };
        for out in outputs.iter_mut() {
            for name in share {
                let mine = if giver {
                    let t = out
                        .get(name)
                        .ok_or_else(|| format!("the last stage gave no `{name}`"))?;
                    if t.shape.len() > MAX_RANK {
                        return Err(format!("`{name}` has {} dims, more than {MAX_RANK}", t.shape.len()));
                    }
                    Some(t)
                } else {
                    None
                };
                let mut dims = vec![0.0; 1 + MAX_RANK];
                if let Some(t) = mine {
                    dims[0] = t.shape.len() as f64;
                    for (k, &d) in t.shape.iter().enumerate() {
                        dims[1 + k] = d as f64;
                    }
                }
                let dims = sum(dims, name)?;
                let shape: Vec<usize> = (0..dims[0] as usize).map(|k| dims[1 + k] as usize).collect();
                let n: usize = shape.iter().product();
                let values = match mine {
                    Some(t) => t.to_f64(),
                    None => vec![0.0; n],
                };
                let values = sum(values, name)?;
                out.insert(name.clone(), Tensor::from_f64(DType::F32, shape, values));
            }
        }
        Ok(PipelineRun {
            outputs,
            grads: BTreeMap::new(),
            grad_sq: None,
        })
    }
}

/// A launched rank's step with the outputs `share` given to every process ([`PipelineProcess::step_sharing`]).
pub struct SharingProcess {
    pub process: PipelineProcess,
    pub share: Vec<String>,
}

impl Runner for SharingProcess {
    fn step(&mut self, micro: &[Tensor], feed: &HashMap<String, Tensor>) -> Result<PipelineRun, String> {
        self.process.step_sharing(micro, feed, &self.share)
    }
}

/// A pipeline's step as the trainer drives it: every rank on a thread of this process ([`PipelineThreads`]), or
/// this process's rank of a launched job, the step's losses and gradients shared with every process
/// ([`SharedProcess`]).
pub trait Runner {
    fn step(&mut self, micro: &[Tensor], feed: &HashMap<String, Tensor>) -> Result<PipelineRun, String>;
}

impl Runner for PipelineThreads {
    fn step(&mut self, micro: &[Tensor], feed: &HashMap<String, Tensor>) -> Result<PipelineRun, String> {
        PipelineThreads::step(self, micro, feed)
    }
}

/// A launched rank's step with its results shared ([`PipelineProcess::step_stage`]) for its stage's update
/// (`None`: a forward alone, the losses shared).
pub struct SharedProcess {
    pub process: PipelineProcess,
    pub state: Option<StageState>,
}

impl Runner for SharedProcess {
    fn step(&mut self, micro: &[Tensor], feed: &HashMap<String, Tensor>) -> Result<PipelineRun, String> {
        self.process.step_stage(micro, feed, self.state.as_ref())
    }
}

/// Rank `i` of stage `s` of `pp`, one step: its 1F1B order over the micro-batches. Returns the outputs of its
/// forwards (but the hidden states passed on) and its gradients summed over the micro-batches.
fn one_step(
    (s, pp, _): (usize, usize, usize),
    fwd: &mut Box<dyn RankProgram>,
    mut bwd: Option<&mut Box<dyn RankProgram>>,
    micro: &[Tensor],
    common: &HashMap<String, Tensor>,
    shared: Arc<dyn crate::ir::Transport + Send + Sync>,
    l: &Links,
) -> Result<RankRun, String> {
    let takes_ids = fwd.input_names().iter().any(|n| n == "input_ids");
    // the inputs every call takes (weights passed as inputs), only those a program reads; a backward's are added
    // when it runs, so a micro-batch in flight keeps only its own tensors
    let common_for = |p: &dyn RankProgram| -> HashMap<String, Tensor> {
        p.input_names()
            .into_iter()
            .filter_map(|n| common.get(&n).map(|t| (n, t.clone())))
            .collect()
    };
    let fwd_common = common_for(fwd.as_ref());
    let mut kept: HashMap<usize, HashMap<String, Tensor>> = HashMap::new();
    let mut outputs = Vec::new();
    let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
    for op in one_f_one_b(s, pp, micro.len(), bwd.is_some()) {
        match op {
            Op::Forward(j) => {
                let mut own = HashMap::new();
                if takes_ids {
                    own.insert("input_ids".to_string(), micro[j].clone());
                }
                if let Some(rx) = &l.recv_fwd {
                    own.insert(STAGE_HIDDEN_IN.to_string(), rx.recv("previous")?);
                }
                let mut feed = fwd_common.clone();
                feed.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
                let mut out = fwd.run_rank(&feed, shared.clone())?;
                drop(feed);
                if let Some(tx) = &l.send_fwd {
                    let h = out
                        .remove(STAGE_HIDDEN_OUT)
                        .ok_or("the stage's forward has no `hidden_out`")?;
                    tx.send(h, "next")?;
                }
                outputs.push(out);
                if bwd.is_some() {
                    kept.insert(j, own);
                }
            }
            Op::Backward(j) => {
                let own = kept.remove(&j).ok_or("a backward before its forward")?;
                let b = bwd.as_mut().ok_or("no backward program")?;
                let mut feed = common_for(b.as_ref());
                feed.extend(own);
                if let Some(rx) = &l.recv_bwd {
                    feed.insert(GRAD_HIDDEN_OUT.to_string(), rx.recv("next")?);
                }
                let mut out = b.run_rank(&feed, shared.clone())?;
                if let Some(tx) = &l.send_bwd {
                    let g = out
                        .remove(GRAD_HIDDEN_IN)
                        .ok_or("the stage's backward has no `grad.hidden_in`")?;
                    tx.send(g, "previous")?;
                }
                for (name, g) in out {
                    let Some(param) = name.strip_prefix(GRAD_PREFIX) else {
                        continue;
                    };
                    match grads.get_mut(param) {
                        Some(acc) => add_into(acc, &g)?,
                        None => {
                            grads.insert(param.to_string(), g);
                        }
                    }
                }
            }
        }
    }
    Ok((outputs, grads))
}

/// A float tensor of `values` as computed: not rounded to its dtype (the interpreter's values at f64 are not,
/// and a sum of gradients stays as exact as its terms).
fn unrounded(dtype: DType, shape: Vec<usize>, values: Vec<f64>) -> Tensor {
    Tensor {
        dtype,
        shape,
        data: crate::ir::tensor::Buffer::F(values),
    }
}

/// `acc += x` (same shape).
fn add_into(acc: &mut Tensor, x: &Tensor) -> Result<(), String> {
    if acc.shape != x.shape {
        return Err(format!("gradients of shapes {:?} and {:?} to add", acc.shape, x.shape));
    }
    let sum: Vec<f64> = acc.to_f64().iter().zip(x.to_f64()).map(|(a, b)| a + b).collect();
    *acc = unrounded(acc.dtype, acc.shape.clone(), sum);
    Ok(())
}

fn scale(t: &mut Tensor, k: f64) {
    let v: Vec<f64> = t.to_f64().iter().map(|a| a * k).collect();
    *t = unrounded(t.dtype, t.shape.clone(), v);
}

/// How many micro-batches a pipeline of `par` cuts a batch of `batch` sequences into: the most, up to `par.pp`
/// (one per stage, so that the stages overlap), that divide it into pieces the data-parallel degrees (`dp·ep`)
/// split; refused naming both when even the whole batch is not divisible by them.
pub fn micro_batch_count(par: &Parallel, batch: usize) -> Result<usize, String> {
    let data = par.dp * par.ep;
    (1..=par.pp)
        .rev()
        .find(|m| batch.is_multiple_of(m * data))
        .ok_or_else(|| format!("the batch ({batch}) is not divisible by dp·ep ({data})"))
}

/// The micro-batches of `ids` `[B, T]`: `m` of `B/m` sequences each (`m` must divide `B`).
pub fn micro_batches(ids: &Tensor, m: usize) -> Result<Vec<Tensor>, String> {
    let [b, t] = ids.shape[..] else {
        return Err(format!("the tokens must be [batch, sequence], not {:?}", ids.shape));
    };
    if m == 0 || !b.is_multiple_of(m) {
        return Err(format!("{m} micro-batches do not divide the batch of {b} sequences"));
    }
    let v = ids.to_i64();
    let per = b / m;
    Ok((0..m)
        .map(|j| Tensor::from_i64(DType::I64, vec![per, t], v[j * per * t..(j + 1) * per * t].to_vec()))
        .collect())
}

/// The micro-batches' tensors of one name stacked back along the batch dim (dim 0).
pub fn concat_batches(parts: &[&Tensor]) -> Result<Tensor, String> {
    let first = parts.first().ok_or("nothing to concatenate")?;
    let mut shape = first.shape.clone();
    shape[0] = parts.iter().map(|p| p.shape[0]).sum();
    if first.dtype.is_float() {
        let values: Vec<f64> = parts.iter().flat_map(|p| p.to_f64()).collect();
        Ok(unrounded(first.dtype, shape, values))
    } else {
        let values: Vec<i64> = parts.iter().flat_map(|p| p.to_i64()).collect();
        Ok(Tensor::from_i64(first.dtype, shape, values))
    }
}
