//! `fulgur train CONFIG|CKPT_DIR --data FILE --steps N --out DIR`: AdamW training of a MiniMax-01 model on the
//! chosen backend (`docs/training.md`).
//!
//! The step is one graph (`fulgur_passes::optim::train_step`: the loss, its gradients, clipping and AdamW),
//! optimized and lowered like any other; the weights and moments stay in the executable between steps. The
//! run directory holds `log.jsonl` (a line per step, and one per held-out evaluation) and `checkpoint/` (a
//! transformers checkpoint plus `optimizer.safetensors` and `trainer.json`), replaced atomically at every save.

use crate::cli::bench::BenchTarget;
use crate::cli::model::{optimize, optimized_forward, OptLevel};
use anyhow::{bail, Context, Result};
use fulgur_ir::tensor::read_safetensors;
use fulgur_ir::{DType, Tensor};
use fulgur_models::checkpoint::{save_checkpoint, Checkpoint};
use fulgur_models::random::random_weights;
use fulgur_models::{forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur_passes::optim::{params_to_inputs, train_step_with, AdamW, ADAM_M, ADAM_V, GRAD_ACC};
use fulgur_runtime::train::{Data, DataCursor, LrSchedule, Schedule, Trainer};
use fulgur_runtime::Executable;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleArg {
    Constant,
    Cosine,
    Wsd,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model config (`config.json` of transformers' `MiniMaxConfig`) to train from random weights, or a
    /// checkpoint directory to train on from.
    pub input: PathBuf,
    /// Training data: a plain-text file (a token per byte) or a safetensors file of pre-tokenized batches
    /// (`input_ids` [steps, B, T], used in order).
    #[arg(long)]
    pub data: PathBuf,
    /// Steps to train (in all, counting those of a resumed run).
    #[arg(long)]
    pub steps: u64,
    /// The tokenizer of text data: a `tokenizer.json` (default: the checkpoint's own `tokenizer.json` where it
    /// has one, else a token per byte).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Sequences per step (text data).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (text data).
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Sequences per micro-batch: each step accumulates the gradients of --batch / M micro-batches before one
    /// update (M must divide the batch; default: the whole batch at once).
    #[arg(long, value_name = "M")]
    pub micro_batch: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Constant)]
    pub schedule: ScheduleArg,
    /// Steps of linear warm-up.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// The last learning rate of `cosine` and `wsd`, as a fraction of --lr.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// The fraction of the steps `wsd` decays over.
    #[arg(long, default_value_t = 0.1)]
    pub decay_fraction: f64,
    /// Decoupled weight decay (on parameters of two or more dimensions only).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Clip the gradients to this global L2 norm before each update (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Seed of the random weights and of the data's split and shuffle.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Standard deviation of the random weights (norm weights start at 1).
    #[arg(long, default_value_t = 0.02)]
    pub init_std: f64,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = crate::cli::bench::default_target())]
    pub target: BenchTarget,
    /// The dtype of the forward and backward's stored values: `bf16` stores activations and their gradients in
    /// bf16 (arithmetic in f32 inside kernels) with f32 master weights, AdamW moments and update.
    #[arg(long, value_enum, default_value_t = crate::cli::model::Dtype::F32)]
    pub dtype: crate::cli::model::Dtype,
    /// After every kernel of the step, check its outputs and stop at the first NaN, naming the kernel and its
    /// IR node (slow: for finding where a run that went NaN went wrong; cpu and cuda targets).
    #[arg(long)]
    pub check_finite: bool,
    /// Optimization level of the step graph.
    #[arg(long, value_enum, default_value_t = OptLevel::Full)]
    pub opt: OptLevel,
    /// Activation recompute versus storing: `auto` lets the target's cost model choose per value.
    #[arg(long, value_enum, default_value_t = crate::cli::model::RecomputeArg::Auto)]
    pub recompute: crate::cli::model::RecomputeArg,
    /// Evaluate the held-out loss every K steps (text data; 0: at the end only).
    #[arg(long, value_name = "K", default_value_t = 50)]
    pub eval_every: u64,
    /// Held-out batches per evaluation.
    #[arg(long, default_value_t = 8)]
    pub eval_batches: usize,
    /// Write the checkpoint every K steps (0: at the end only).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub save_every: u64,
    /// The run directory: `log.jsonl` and `checkpoint/`.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Continue the run in this directory (its `checkpoint/`): weights, optimizer state, step and data position.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Train sharded with these degrees, e.g. `dp=2,tp=2` (dp, ep, sp, tp, etp; `docs/parallelism.md`): the
    /// training step sharded as one graph (ZeRO-1 moments over dp and ep) and run on simulated ranks, a thread
    /// per rank with its own `--target` program; the held-out loss too.
    #[arg(long, value_name = "DEGREES")]
    pub parallel: Option<String>,
    /// Train with the degrees a plan search chose (`fulgur plan ... --json`'s `best`).
    #[arg(long, value_name = "PLAN.json", conflicts_with = "parallel")]
    pub plan: Option<PathBuf>,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// What `trainer.json` records: enough to continue the run exactly.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TrainerState {
    step: u64,
    cursor: DataCursor,
    seed: u64,
    /// The config the weights belong to (its canonical JSON).
    config: serde_json::Value,
    /// What the data position means: the data file's size and hash, the sequence length and the batch.
    data: String,
    seq: usize,
    batch: usize,
    /// The tokenizer file's hash, where one tokenized the data.
    tokenizer: Option<String>,
}

fn hyper(args: &Args) -> AdamW {
    AdamW {
        beta1: args.beta1,
        beta2: args.beta2,
        eps: args.eps,
        weight_decay: args.weight_decay,
        clip: (args.clip > 0.0).then_some(args.clip),
    }
}

/// The loss graph training runs: as built (f32), or stored in bf16 with f32 master weights.
pub(crate) fn compute_graph(
    loss_graph: &fulgur_ir::Graph,
    dtype: crate::cli::model::Dtype,
) -> Result<fulgur_ir::Graph, fulgur_passes::PassError> {
    Ok(match dtype {
        crate::cli::model::Dtype::F32 => loss_graph.clone(),
        crate::cli::model::Dtype::Bf16 => {
            use fulgur_passes::precision::{keep_f32, master_weights, store_as};
            master_weights(&store_as(loss_graph, DType::BF16, &keep_f32)?)?
        }
    })
}

/// An executable for a graph without weights on `target`; `program` is the graph already lowered, where the
/// caller has it (the cpu and cuda targets lower it otherwise).
pub(crate) fn executable(
    g: &fulgur_ir::Graph,
    program: Option<fulgur_codegen::program::KernelProgram>,
    target: BenchTarget,
    check_finite: bool,
) -> Result<Box<dyn Executable>> {
    if check_finite && target == BenchTarget::Reference {
        bail!("--check-finite runs on the cpu and cuda targets");
    }
    Ok(match target {
        BenchTarget::Reference => Box::new(fulgur_runtime::ReferenceExecutable {
            backend: fulgur_runtime::ReferenceBackend {
                precision: fulgur_ir::Precision::F32,
                memory_limit: None,
            },
            graph: g.clone(),
            weights: Default::default(),
        }),
        #[cfg(feature = "llvm")]
        BenchTarget::Cpu => {
            use fulgur_runtime::cpu::{CpuOptions, CpuProgram};
            let program = match program {
                Some(p) => p,
                None => fulgur_codegen::program::lower(g)?,
            };
            Box::new(CpuProgram::new(
                program,
                CpuOptions {
                    check_finite,
                    ..Default::default()
                },
            )?)
        }
        #[cfg(feature = "cuda")]
        BenchTarget::Cuda => {
            use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
            let program = match program {
                Some(p) => p,
                None => fulgur_codegen::program::lower(g)?,
            };
            Box::new(CudaProgram::new(
                program,
                CudaOptions {
                    check_finite,
                    ..Default::default()
                },
            )?)
        }
        #[allow(unreachable_patterns)]
        t => {
            drop(program);
            bail!("this build has no {t:?} backend")
        }
    })
}

/// A training step through pipeline stages (`fulgur::pipeline`): the micro-batches' forward and backward by 1F1B
/// on simulated ranks that live between steps, then the clipping and AdamW update of every parameter
/// (`passes::optim::update_step`, the same update the single step computes) on the target.
struct PipelineStep {
    threads: Box<dyn fulgur::pipeline::Runner>,
    update: Box<dyn Executable>,
    params: Vec<String>,
    micro_batches: usize,
}

/// The held-out loss through the pipeline's stages (their forwards alone), the weights given as inputs.
struct PipelineEval {
    threads: Box<dyn fulgur::pipeline::Runner>,
}

impl Executable for PipelineEval {
    fn name(&self) -> &str {
        "the held-out loss through pipeline stages"
    }
    fn input_names(&self) -> Vec<String> {
        vec!["input_ids".to_string()]
    }
    fn run(
        &mut self,
        inputs: &HashMap<String, Tensor>,
    ) -> std::result::Result<BTreeMap<String, Tensor>, fulgur_runtime::RuntimeError> {
        use fulgur_runtime::RuntimeError;
        let ids = inputs
            .get("input_ids")
            .ok_or_else(|| RuntimeError::Other("the held-out loss has no `input_ids`".into()))?;
        let mut weights = inputs.clone();
        weights.remove("input_ids");
        let run = self
            .threads
            .step(std::slice::from_ref(ids), &weights)
            .map_err(|e| RuntimeError::Other(format!("the pipeline: {e}")))?;
        let loss = run
            .outputs
            .first()
            .and_then(|o| o.get("loss"))
            .cloned()
            .ok_or_else(|| RuntimeError::Other("the last stage gave no `loss`".into()))?;
        Ok([("loss".to_string(), loss)].into())
    }
}

impl Executable for PipelineStep {
    fn name(&self) -> &str {
        "the training step through pipeline stages"
    }
    fn input_names(&self) -> Vec<String> {
        vec!["input_ids".to_string()]
    }
    fn run(
        &mut self,
        inputs: &HashMap<String, Tensor>,
    ) -> std::result::Result<BTreeMap<String, Tensor>, fulgur_runtime::RuntimeError> {
        use fulgur_runtime::RuntimeError;
        let ids = inputs
            .get("input_ids")
            .ok_or_else(|| RuntimeError::Other("the step has no `input_ids`".into()))?;
        let micro = fulgur::pipeline::micro_batches(ids, self.micro_batches).map_err(RuntimeError::Other)?;
        let weights: HashMap<String, Tensor> = self
            .params
            .iter()
            .filter_map(|n| inputs.get(n).map(|t| (n.clone(), t.clone())))
            .collect();
        let run = self
            .threads
            .step(&micro, &weights)
            .map_err(|e| RuntimeError::Other(format!("the pipeline: {e}")))?;
        let loss = run.outputs.iter().map(|o| o["loss"].to_f64()[0]).sum::<f64>() / run.outputs.len() as f64;
        let mut feed = inputs.clone();
        feed.remove("input_ids");
        for (name, g) in run.grads {
            feed.insert(format!("{}{name}", fulgur_passes::autodiff::GRAD_PREFIX), g);
        }
        if let Some(sq) = run.grad_sq {
            feed.insert(
                fulgur_passes::optim::GRAD_SQ.to_string(),
                Tensor::from_f64(DType::F32, vec![], vec![sq]),
            );
        }
        let mut out = self.update.run(&feed)?;
        out.insert("loss".to_string(), Tensor::from_f64(DType::F32, vec![1], vec![loss]));
        Ok(out)
    }
}

/// The pipeline's step and held-out loss, the graph whose kernels are reported, and for a launched pipeline the
/// part of the training state this process holds and updates.
type PipelineExecutables = (
    Box<dyn Executable>,
    Box<dyn Executable>,
    fulgur_ir::Graph,
    Option<fulgur::pipeline::StageState>,
);

/// The pipeline's step and held-out loss executables for `fulgur train --parallel ...,pp=N`, and the graph whose
/// kernels are reported (the first stage's backward, rank 0's). On simulated ranks (one update of every
/// parameter), or, with `job` (started by a launcher: this process's place and the job's transport), as this
/// process's rank of each, updating its stage's parameters alone, clipped by the whole model's gradient norm
/// (`pipeline::PipelineProcess::step_stage`, `pipeline::StageState`).
#[allow(clippy::too_many_arguments)]
fn pipeline_step(
    cfg: &MiniMaxConfig,
    par: &fulgur::parallel::Parallel,
    args: &Args,
    hp: &AdamW,
    micro: usize,
    micro_batches: usize,
    t: usize,
    state: &HashMap<String, Tensor>,
    job: Option<&(
        fulgur_runtime::ranks::RankEnv,
        std::sync::Arc<fulgur_runtime::ranks::TcpTransport>,
    )>,
) -> Result<PipelineExecutables> {
    let dtype = args.dtype;
    let prepare = move |g: fulgur_ir::Graph| compute_graph(&g, dtype).map_err(|e| e.to_string());
    let opts = ForwardOptions {
        loss: true,
        ..Default::default()
    };
    let stages = fulgur::pipeline::build(cfg, par, micro, t, &opts, true, true, &prepare)
        .map_err(|e| anyhow::anyhow!("--parallel {par}: {e}"))?;
    let report = stages[0].backward.as_ref().expect("built with gradients")[0].clone();
    let (target, ranks) = (args.target, par.total_ranks());
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let make: fulgur::pipeline::MakeProgram = std::sync::Arc::new(move |g: &fulgur_ir::Graph| {
        let none = |name: &str| Err(format!("weight `{name}` is an input of a pipeline stage"));
        crate::cli::ranks::rank_program(
            g.clone(),
            target,
            fulgur_ir::Interpreter::new(fulgur_ir::Precision::F32),
            (cores / ranks).max(1),
            &none,
        )
    });
    // the held-out loss: the stages' forwards alone, one micro-batch of the same size at a time
    let forwards = fulgur::pipeline::build(cfg, par, micro, t, &opts, false, true, &prepare)
        .map_err(|e| anyhow::anyhow!("--parallel {par}: {e}"))?;
    let timeout = crate::cli::ranks::rank_timeout();
    let shapes: BTreeMap<String, Vec<usize>> = state
        .iter()
        .filter(|(n, _)| !n.starts_with(ADAM_M) && !n.starts_with(ADAM_V) && !n.starts_with(GRAD_ACC))
        .map(|(n, w)| (n.clone(), w.shape.clone()))
        .collect();
    let stage_state = match job {
        Some((env, _)) => Some(
            fulgur::pipeline::StageState::new(&stages, env.rank, &shapes)
                .map_err(|e| anyhow::anyhow!("rank {}: {e}", env.rank))?,
        ),
        None => None,
    };
    let (threads, eval_threads): (Box<dyn fulgur::pipeline::Runner>, Box<dyn fulgur::pipeline::Runner>) = match job {
        None => (
            Box::new(
                fulgur::pipeline::PipelineThreads::new(&stages, make.clone(), fulgur_ir::Precision::F32, timeout)
                    .map_err(|e| anyhow::anyhow!("building the pipeline's stages: {e}"))?,
            ),
            Box::new(
                fulgur::pipeline::PipelineThreads::new(&forwards, make, fulgur_ir::Precision::F32, timeout)
                    .map_err(|e| anyhow::anyhow!("building the pipeline's stages for the held-out loss: {e}"))?,
            ),
        ),
        Some((env, job)) => {
            let mesh = par.stage().mesh().sizes();
            let cuda = target == BenchTarget::Cuda;
            let connect = |e: &fulgur_runtime::ranks::RankEnv| {
                crate::cli::ranks::transport(e, &mesh, cuda, fulgur_ir::Precision::F32).map_err(|e| format!("{e:#}"))
            };
            let process = |stages: &[fulgur::pipeline::Stage], what: &str| {
                fulgur::pipeline::PipelineProcess::new(env, job.clone(), stages, make.clone(), &connect, timeout)
                    .map_err(|e| anyhow::anyhow!("rank {}: building the pipeline's {what}: {e}", env.rank))
            };
            (
                Box::new(fulgur::pipeline::SharedProcess {
                    process: process(&stages, "stages")?,
                    state: stage_state.clone(),
                }),
                Box::new(fulgur::pipeline::SharedProcess {
                    process: process(&forwards, "stages for the held-out loss")?,
                    state: None,
                }),
            )
        }
    };
    // the parameters this process updates: every one, or a launched stage's own
    let params: Vec<(String, fulgur_ir::TensorType)> = match &stage_state {
        Some(st) => st.own.clone(),
        None => shapes.into_iter().collect(),
    }
    .into_iter()
    .map(|(n, shape)| {
        let dims = shape.iter().map(|&d| fulgur_ir::Dim::from(d)).collect();
        (n, fulgur_ir::TensorType::new(DType::F32, dims))
    })
    .collect();
    let update = match &stage_state {
        Some(_) => fulgur_passes::optim::update_step_given_norm(&params, hp)?,
        None => fulgur_passes::optim::update_step(&params, hp)?,
    };
    let update = executable(&update, None, args.target, false).context("compiling the optimizer's update")?;
    Ok((
        Box::new(PipelineStep {
            threads,
            update,
            params: params.into_iter().map(|(n, _)| n).collect(),
            micro_batches,
        }),
        Box::new(PipelineEval { threads: eval_threads }),
        report,
        stage_state,
    ))
}

/// FNV-1a over bytes: identifies a data or tokenizer file in `trainer.json` (not a security hash).
fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The training data, the identity of its file, and the tokenizer file's bytes where one tokenized it.
struct Loaded {
    data: Data,
    data_id: String,
    tokenizer: Option<Vec<u8>>,
}

fn load_data(args: &Args) -> Result<Loaded> {
    let what = format!("`{}`", args.data.display());
    let bytes = std::fs::read(&args.data).with_context(|| format!("reading the data {what}"))?;
    let data_id = format!("{} bytes, fnv {}", bytes.len(), fnv(&bytes));
    if args.data.extension().is_some_and(|e| e == "safetensors") {
        drop(bytes);
        let t = read_safetensors(&args.data)?;
        let ids = t
            .get("input_ids")
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{what} has no tensor `input_ids` (pre-tokenized batches [steps, B, T])"))?;
        let data = Data::batches(ids, &what).map_err(anyhow::Error::msg)?;
        return Ok(Loaded {
            data,
            data_id,
            tokenizer: None,
        });
    }
    let tokenizer = args.tokenizer.clone().or_else(|| {
        let own = args.input.join("tokenizer.json");
        (args.input.is_dir() && own.is_file()).then_some(own)
    });
    if let Some(tp) = tokenizer {
        let tok_bytes = std::fs::read(&tp).with_context(|| format!("reading the tokenizer `{}`", tp.display()))?;
        let tok = tokenizers::Tokenizer::from_file(&tp)
            .map_err(|e| anyhow::anyhow!("`{}`: not a tokenizer the tokenizers crate reads: {e}", tp.display()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{what} is not UTF-8 text (byte {}), which `{}` needs",
                e.utf8_error().valid_up_to(),
                tp.display()
            )
        })?;
        let enc = tok
            .encode(text.as_str(), false)
            .map_err(|e| anyhow::anyhow!("tokenizing {what} with `{}`: {e}", tp.display()))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
        eprintln!(
            "{what}: {} tokens by `{}` ({} ids)",
            ids.len(),
            tp.display(),
            tok.get_vocab_size(true)
        );
        let data = Data::tokens(
            ids,
            tok.get_vocab_size(true),
            "tokens",
            args.seq,
            args.batch,
            args.seed,
            &what,
        )
        .map_err(anyhow::Error::msg)?;
        return Ok(Loaded {
            data,
            data_id,
            tokenizer: Some(tok_bytes),
        });
    }
    let data = Data::text(&bytes, args.seq, args.batch, args.seed, &what).map_err(anyhow::Error::msg)?;
    Ok(Loaded {
        data,
        data_id,
        tokenizer: None,
    })
}

pub fn run(args: Args) -> Result<()> {
    let t_start = Instant::now();
    let hp = hyper(&args);
    let run_dir = &args.out;
    let ck_dir = run_dir.join("checkpoint");
    let resume_dir = args.resume.as_ref().map(|d| {
        if d.join("trainer.json").exists() {
            d.clone()
        } else {
            d.join("checkpoint")
        }
    });
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    // saves interrupted between their two renames are put right first
    fulgur_models::checkpoint::recover_checkpoint(&ck_dir)?;
    if let Some(rd) = &resume_dir {
        fulgur_models::checkpoint::recover_checkpoint(rd)?;
        let same = |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        };
        if ck_dir.exists() && !same(&ck_dir, rd) {
            bail!(
                "--out {} holds another training run ({}); resuming {} would write over it: choose another --out",
                run_dir.display(),
                ck_dir.display(),
                rd.display()
            );
        }
    }
    if resume_dir.is_none() && ck_dir.exists() {
        bail!(
            "{} already holds a training run ({}): pass --resume {} to continue it, or choose another --out",
            run_dir.display(),
            ck_dir.display(),
            run_dir.display()
        );
    }
    if run_dir.exists() && !run_dir.is_dir() {
        bail!("--out {} is not a directory", run_dir.display());
    }
    // the model
    let (config_text, cfg, init): (String, MiniMaxConfig, Option<Checkpoint>) = if args.input.is_dir() {
        let ck = Checkpoint::open(&args.input)?;
        let text = std::fs::read_to_string(args.input.join("config.json"))?;
        (text, ck.config.clone(), Some(ck))
    } else {
        let text = std::fs::read_to_string(&args.input)
            .with_context(|| format!("reading the config `{}`", args.input.display()))?;
        (text, MiniMaxConfig::from_file(&args.input)?, None)
    };
    let Loaded {
        data,
        data_id,
        tokenizer: tokenizer_bytes,
    } = load_data(&args)?;
    let tokenizer_id = tokenizer_bytes.as_deref().map(fnv);
    if data.vocab_needed() > cfg.vocab_size {
        bail!(
            "the data needs token ids up to {} (`{}`), but the model's vocabulary has {} ids (vocab_size in {})",
            data.vocab_needed() - 1,
            args.data.display(),
            cfg.vocab_size,
            args.input.display()
        );
    }
    if let Some(n) = data.steps_available() {
        if args.steps > n {
            bail!("--steps {} but `{}` holds {n} batches", args.steps, args.data.display());
        }
    }
    let (b, t) = data.shape();
    let micro = args.micro_batch.unwrap_or(b);
    if micro == 0 || b % micro != 0 {
        bail!("--micro-batch {micro} does not divide the batch of {b} sequences");
    }
    let micro_batches = b / micro;
    let degrees = match (&args.parallel, &args.plan) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(p)) => Some(crate::cli::model::degrees_of_plan(p)?),
        (None, None) => None,
    };
    let par = match &degrees {
        Some(d) => {
            let par = fulgur::parallel::Parallel::parse(d).map_err(|e| anyhow::anyhow!("--parallel: {e}"))?;
            if micro_batches > 1 && par.pp == 1 {
                bail!(
                    "--parallel does not take --micro-batch without pipeline stages yet: each step is one batch of {b} \
                     sequences split over the ranks"
                );
            }
            if args.check_finite {
                bail!("--parallel does not take --check-finite yet");
            }
            // refused here, before anything is written, when the degrees do not divide the model or the batch
            fulgur::parallel::minimax_plan(&cfg, &par.stage(), micro, t)
                .map_err(|e| anyhow::anyhow!("--parallel {d}: {e}"))?;
            if par.pp > 1 {
                fulgur::pipeline::stage_layers(cfg.num_hidden_layers, par.pp)
                    .map_err(|e| anyhow::anyhow!("--parallel {d}: {e}"))?;
            }
            Some(par)
        }
        None => None,
    };
    // pipeline stages without --micro-batch: as many micro-batches as stages where the batch allows (each one
    // split by the data-parallel degrees), so that the stages overlap
    let (micro, micro_batches) = match &par {
        Some(p) if p.pp > 1 && args.micro_batch.is_none() => {
            let m = fulgur::pipeline::micro_batch_count(p, b).unwrap_or(1);
            (b / m, m)
        }
        _ => (micro, micro_batches),
    };
    // started by a launcher: this process is one rank (its collectives over the job's transport), every rank
    // runs the same loop on the same data and outputs, and rank 0 alone writes the run directory
    // pipeline stages started by a launcher: the job's transport (its host-side collectives: the addresses'
    // exchange, the step's shared losses and gradients, the agreement to stop), kept beside as itself
    let mut pipeline_job = None;
    let launch = match &par {
        Some(p) if p.pp > 1 => match crate::cli::ranks::launched_pipeline(p, fulgur_ir::Precision::F32)? {
            Some((env, job)) => {
                pipeline_job = Some((env.clone(), job.clone()));
                let shared: crate::cli::ranks::Shared = job;
                Some((env, shared))
            }
            None => None,
        },
        Some(p) => crate::cli::ranks::launched(p, args.target, fulgur_ir::Precision::F32)?,
        None => None,
    };
    let writer = launch.as_ref().is_none_or(|(env, _)| env.rank == 0);
    let loss_opts = ForwardOptions {
        loss: true,
        ..Default::default()
    };
    let loss_graph = forward_graph(
        &cfg,
        &match &par {
            Some(p) => p.forward_options(&loss_opts),
            None => loss_opts,
        },
    )?;
    let config_json: serde_json::Value = serde_json::from_str(&config_text).context("parsing the config as JSON")?;
    // the state: weights and moments, from a checkpoint being resumed, a checkpoint, or random
    let (mut state, mut step0, mut cursor) = (HashMap::new(), 0u64, DataCursor::default());
    if let Some(rd) = &resume_dir {
        let ts: TrainerState = serde_json::from_slice(
            &std::fs::read(rd.join("trainer.json"))
                .with_context(|| format!("--resume: reading {}", rd.join("trainer.json").display()))?,
        )
        .with_context(|| format!("--resume: {} is not a trainer state", rd.join("trainer.json").display()))?;
        if ts.config != config_json {
            bail!(
                "--resume {}: its checkpoint was trained with another config than {}",
                rd.display(),
                args.input.display()
            );
        }
        // the data position means something only for the same data, split and shuffled the same way
        let differs = |what: &str, then: String, now: String| -> Result<()> {
            if then != now {
                bail!(
                    "--resume {}: the run was trained with {what} {then}, this command gives {now}: its data position \
                     would not continue the run",
                    rd.display()
                );
            }
            Ok(())
        };
        differs("--seed", ts.seed.to_string(), args.seed.to_string())?;
        differs("the data", ts.data.clone(), data_id.clone())?;
        differs("--seq", ts.seq.to_string(), t.to_string())?;
        differs("--batch", ts.batch.to_string(), b.to_string())?;
        differs(
            "the tokenizer",
            ts.tokenizer.clone().unwrap_or_else(|| "bytes".into()),
            tokenizer_id.clone().unwrap_or_else(|| "bytes".into()),
        )?;
        let ck = Checkpoint::open(rd)?;
        state = ck.load_params(&loss_graph)?.into_iter().collect();
        let opt_file = rd.join("optimizer.safetensors");
        let moments =
            read_safetensors(&opt_file).with_context(|| format!("--resume: reading {}", opt_file.display()))?;
        let names: Vec<String> = state.keys().cloned().collect();
        for name in names {
            for pre in [ADAM_M, ADAM_V] {
                let key = format!("{pre}{name}");
                let m = moments.get(&key).ok_or_else(|| {
                    anyhow::anyhow!(
                        "tensor `{key}` in `{}`: missing (the optimizer state is incomplete)",
                        opt_file.display()
                    )
                })?;
                if m.shape != state[&name].shape {
                    bail!(
                        "tensor `{key}` in `{}`: shape {:?}, but the parameter has {:?}",
                        opt_file.display(),
                        m.shape,
                        state[&name].shape
                    );
                }
                state.insert(key, m.clone());
            }
        }
        step0 = ts.step;
        cursor = ts.cursor;
        if step0 >= args.steps {
            bail!(
                "--resume {}: the run is already at step {step0}, not before --steps {}",
                rd.display(),
                args.steps
            );
        }
    } else {
        let weights: HashMap<String, Tensor> = match &init {
            Some(ck) => ck.load_params(&loss_graph)?,
            None => random_weights(&loss_graph, args.init_std, args.seed),
        };
        for (name, w) in weights {
            let zeros = Tensor::from_f64(DType::F32, w.shape.clone(), vec![0.0; w.numel()]);
            state.insert(format!("{ADAM_M}{name}"), zeros.clone());
            state.insert(format!("{ADAM_V}{name}"), zeros);
            state.insert(name, w);
        }
    }
    // pipeline stages: the micro-batches flow through the stages, their gradients summed by the pipeline
    let pipelined = par.as_ref().is_some_and(|p| p.pp > 1);
    if micro_batches > 1 && !pipelined {
        let names: Vec<(String, Vec<usize>)> = state
            .iter()
            .filter(|(n, _)| !n.starts_with(ADAM_M) && !n.starts_with(ADAM_V))
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect();
        for (n, shape) in names {
            let z = Tensor::from_f64(DType::F32, shape.clone(), vec![0.0; shape.iter().product()]);
            state.insert(format!("{GRAD_ACC}{n}"), z);
        }
    }
    // the programs
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let say = |m: &str| {
        if !writer {
            // a launched rank other than 0 shows nothing
        } else if tty {
            eprint!("\r\x1b[2K{m}");
        } else {
            eprintln!("{m}");
        }
    };
    say("building and optimizing the training step");
    let cost_model = args.target.cost_model().to_string();
    let t0 = Instant::now();
    // the forward optimized in f32 (the optimizer's patterns are f32 ones), then for bf16 stored in bf16 with
    // its parameters f32 master weights cast where read; then differentiated (see `model::with_backward`)
    // sharded: the sharding pass reads the structural forward (its rules know the attention composites, not the
    // optimizer's fused kernels); each rank's program is optimized after
    // sharded without pipeline stages: the MoE as the composites' chain, routed forward and backward (the
    // dense form instead where a chain does not fit the exchange, below)
    let build = |routed: bool| -> Result<_> {
        let fwd = match &par {
            Some(_) => fulgur::parallel::structural(&loss_graph, routed).map_err(|e| anyhow::anyhow!(e))?,
            None => optimized_forward(loss_graph.clone(), args.opt, &cost_model)?,
        };
        let compute_graph = compute_graph(&fwd, args.dtype)?;
        let (step_graph, grad_report) = train_step_with(
            &compute_graph,
            "loss",
            &hp,
            if pipelined { 1 } else { micro_batches },
            &args.recompute.grad_options(&cost_model),
        )?;
        let eval_graph = params_to_inputs(&compute_graph)?;
        Ok((step_graph, grad_report, eval_graph))
    };
    let (mut step_graph, mut grad_report, mut eval_graph) = build(par.as_ref().is_some_and(|p| p.pp == 1))?;
    let mut pipeline = match &par {
        Some(par) if par.pp > 1 => {
            say(&format!("cutting the model into {} pipeline stages ({par})", par.pp));
            Some(pipeline_step(
                &cfg,
                par,
                &args,
                &hp,
                micro,
                micro_batches,
                t,
                &state,
                pipeline_job.as_ref(),
            )?)
        }
        _ => None,
    };
    // a launched pipeline's process holds its stage's part of the state alone (the whole is gathered at a
    // checkpoint)
    let stage_state = pipeline.as_mut().and_then(|p| p.3.take());
    if let Some(st) = &stage_state {
        let keep: std::collections::BTreeSet<&str> = st.own.iter().map(|(n, _)| n.as_str()).collect();
        state.retain(|n, _| {
            let param = n.strip_prefix(ADAM_M).or(n.strip_prefix(ADAM_V)).unwrap_or(n);
            keep.contains(param)
        });
    }
    let sharded = match &par {
        Some(par) if par.pp == 1 => {
            say(&format!("sharding the training step ({par})"));
            let mut plan = fulgur::parallel::minimax_train_plan(&cfg, par, micro, t, &step_graph)
                .map_err(|e| anyhow::anyhow!("--parallel {par}: {e}"))?;
            let (mut step_sg, mut report) =
                fulgur_passes::shard::shard_step(&step_graph, &plan, &grad_report.moe_chains)?;
            if report.whole_moe > 0 {
                // a chain the exchange does not fit (experts over axes apart, tokens the group does not divide):
                // the dense form, whose expert parallelism gathers the tokens
                (step_graph, grad_report, eval_graph) = build(false)?;
                plan = fulgur::parallel::minimax_train_plan(&cfg, par, micro, t, &step_graph)
                    .map_err(|e| anyhow::anyhow!("--parallel {par}: {e}"))?;
                (step_sg, report) = fulgur_passes::shard::shard_graph(&step_graph, &plan)?;
            }
            let eval_plan = fulgur::parallel::minimax_plan(&cfg, par, micro, t)
                .map_err(|e| anyhow::anyhow!("--parallel {par}: {e}"))?;
            let (eval_sg, _) = fulgur_passes::shard::shard_graph(&eval_graph, &eval_plan)?;
            let programs = |sg: &fulgur_ir::Graph,
                            mesh: &fulgur_passes::shard::Mesh|
             -> Result<Vec<fulgur_ir::Graph>> {
                let programs = crate::cli::ranks::local_ranks(par, launch.as_ref())
                    .into_iter()
                    .map(|r| {
                        let rg = fulgur_passes::shard::lower_rank(sg, mesh, r)?;
                        optimize(rg, args.opt, &cost_model).with_context(|| format!("optimizing rank {r}'s program"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                fulgur::parallel::check_same_collectives(&programs).map_err(|e| anyhow::anyhow!(e))?;
                Ok(programs)
            };
            Some((
                programs(&step_sg, &plan.mesh)?,
                programs(&eval_sg, &eval_plan.mesh)?,
                report,
            ))
        }
        _ => None,
    };
    let (step_graph, eval_graph) = if sharded.is_some() || pipeline.is_some() {
        (step_graph, eval_graph)
    } else {
        (
            optimize(step_graph, args.opt, &cost_model)?,
            optimize(eval_graph, args.opt, &cost_model)?,
        )
    };
    let optimize_s = t0.elapsed().as_secs_f64();
    // the program whose kernels and memory are reported: the step's, rank 0's, or the first stage's backward
    let step_program = fulgur_codegen::program::lower(match (&sharded, &pipeline) {
        (Some((steps, _, _)), _) => &steps[0],
        (None, Some((_, _, report, _))) => report,
        (None, None) => &step_graph,
    })?;
    let kernels = step_program.step.len();
    // the step's planned memory: the state (weights, moments, accumulators, inputs) and the arena of transient
    // values (the activations the backward reads, the gradients, the update's temporaries)
    let env: HashMap<String, i64> = [("B".to_string(), micro as i64), ("T".to_string(), t as i64)].into();
    let plan = step_program.layout(&env)?;
    // what the backward keeps and what it recomputes (`--recompute`), at this run's shape
    if tty && writer {
        eprint!("\r\x1b[2K");
    }
    if writer {
        eprintln!("activations for the backward: {}", grad_report.summary(&env));
    }
    say("compiling");
    // held out in micro-batches, so an evaluation fits where a step does; no program where nothing is held out
    let heldout = data.heldout(micro, args.eval_batches);
    let (mut step_exe, mut eval_exe) = match (sharded, pipeline) {
        (_, Some((exe, eval, _, _))) => {
            let par = par.as_ref().expect("pipelined with degrees");
            if writer {
                eprintln!(
                    "training step in {} pipeline stages of {} {} each ({par}), {micro_batches} micro-batches by 1F1B{}",
                    par.pp,
                    par.ranks(),
                    if launch.is_some() {
                        "launched ranks"
                    } else {
                        "simulated ranks"
                    },
                    match &stage_state {
                        Some(st) => format!(
                            "; each stage holds and updates the parameters it reads (stage {}: {} of {}, {} tied)",
                            st.stage,
                            st.own.len(),
                            st.all.len(),
                            st.tied.len()
                        ),
                        None => String::new(),
                    }
                );
            }
            (exe, if heldout.is_empty() { None } else { Some(eval) })
        }
        (Some((steps, evals, report)), None) => {
            let par = par.as_ref().expect("sharded with degrees");
            let collectives: usize = report.collectives.values().sum();
            if writer {
                eprintln!(
                    "training step sharded over {} {} ({par}): {collectives} collectives ({})",
                    par.ranks(),
                    if launch.is_some() {
                        "launched ranks"
                    } else {
                        "simulated ranks"
                    },
                    report
                        .collectives
                        .iter()
                        .map(|(k, v)| format!("{v} {k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let ranks = |what: &str, programs| {
                crate::cli::ranks::executable(
                    what,
                    programs,
                    args.target,
                    fulgur_ir::Interpreter::new(fulgur_ir::Precision::F32),
                    Default::default(),
                    launch.as_ref(),
                )
            };
            let eval = if heldout.is_empty() {
                None
            } else {
                Some(ranks("the held-out loss", evals)?)
            };
            (ranks("the training step", steps)?, eval)
        }
        (None, None) => {
            let step = executable(&step_graph, Some(step_program), args.target, args.check_finite)
                .context("compiling the training step")?;
            let eval = if heldout.is_empty() {
                None
            } else {
                Some(executable(&eval_graph, None, args.target, false).context("compiling the held-out loss")?)
            };
            (step, eval)
        }
    };
    let param_names: Vec<String> = state
        .keys()
        .filter(|n| !n.starts_with(ADAM_M) && !n.starts_with(ADAM_V) && !n.starts_with(GRAD_ACC))
        .cloned()
        .collect();
    // the log: a resumed run keeps the lines of the steps its checkpoint holds (a run that stopped after its last
    // save logged steps the resumed run takes again); a new run starts it afresh
    let log_path = run_dir.join("log.jsonl");
    let kept: String = if step0 > 0 {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|st| st <= step0)
            })
            .map(|l| format!("{l}\n"))
            .collect()
    } else {
        String::new()
    };
    // the run directory, once everything it needs is built (a failure before leaves nothing); a launched rank
    // other than 0 writes nothing
    if writer {
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    }
    let mut log: Box<dyn std::io::Write> = if writer {
        fulgur_ir::tensor::write_atomic(&log_path, kept.as_bytes())?;
        Box::new(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log_path)
                .with_context(|| format!("opening {}", log_path.display()))?,
        )
    } else {
        Box::new(std::io::sink())
    };
    // Ctrl-C finishes the step and saves; a second one ends the process at once
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted twice: stopping without a checkpoint");
            std::process::exit(130);
        }
    });
    let schedule = LrSchedule {
        lr: args.lr,
        warmup: args.warmup,
        total: args.steps,
        kind: match args.schedule {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Cosine => Schedule::Cosine {
                min_ratio: args.min_lr_ratio,
            },
            ScheduleArg::Wsd => Schedule::Wsd {
                decay_fraction: args.decay_fraction,
                min_ratio: args.min_lr_ratio,
            },
        },
    };
    let mut trainer = Trainer::new(step_exe.as_mut(), state);
    let eval = |trainer: &mut Trainer, eval_exe: &mut Option<Box<dyn Executable>>| -> Result<Option<f64>> {
        let Some(eval_exe) = eval_exe else {
            return Ok(None);
        };
        // the weights alone: the moments stay where they are
        let mut inputs = trainer.state_of(&param_names)?;
        let mut total = 0.0;
        for h in &heldout {
            inputs.insert("input_ids".into(), h.clone());
            total += eval_exe.run(&inputs)?["loss"].to_f64()[0];
        }
        Ok(Some(total / heldout.len() as f64))
    };
    // the whole state, for a checkpoint: the trainer's, or gathered from a launched pipeline's stages (every
    // process takes part)
    let whole_state = |trainer: &mut Trainer| -> Result<HashMap<String, Tensor>> {
        let mine = trainer.state()?;
        match (&stage_state, &pipeline_job) {
            (Some(st), Some((env, job))) => {
                fulgur::pipeline::gather_state(job.as_ref(), (env.rank, env.world), &mine, st, &[ADAM_M, ADAM_V])
                    .map_err(|e| anyhow::anyhow!("rank {}: {e}", env.rank))
            }
            _ => Ok(mine),
        }
    };
    let save = |state: HashMap<String, Tensor>, step: u64, cursor: &DataCursor| -> Result<()> {
        // the state minus the gradient accumulators (zero between steps), split without copies
        let (moments, weights): (HashMap<String, Tensor>, HashMap<String, Tensor>) = state
            .into_iter()
            .filter(|(n, _)| !n.starts_with(GRAD_ACC))
            .partition(|(n, _)| n.starts_with(ADAM_M) || n.starts_with(ADAM_V));
        let moments: BTreeMap<String, Tensor> = moments.into_iter().collect();
        let opt_bytes = fulgur_ir::tensor::safetensors_bytes(&moments)?;
        let ts = TrainerState {
            step,
            cursor: cursor.clone(),
            seed: args.seed,
            config: config_json.clone(),
            data: data_id.clone(),
            seq: t,
            batch: b,
            tokenizer: tokenizer_id.clone(),
        };
        let mut extra = vec![
            ("optimizer.safetensors", opt_bytes),
            ("trainer.json", serde_json::to_vec_pretty(&ts)?),
        ];
        // the tokenizer travels with the weights it was trained with
        if let Some(tb) = &tokenizer_bytes {
            extra.push(("tokenizer.json", tb.clone()));
        }
        save_checkpoint(&ck_dir, &config_text, &weights, &extra)?;
        Ok(())
    };
    let tokens_per_step = (b * t) as f64;
    let mut first_loss = None;
    let mut last = (f64::NAN, f64::NAN);
    // the last good checkpoint: the one resumed from, then each one written
    let mut last_good: Option<(u64, PathBuf)> = resume_dir.clone().map(|d| (step0, d));
    let mut last_heldout: Option<f64> = None;
    let t_loop = Instant::now();
    let mut done = step0;
    for step in step0 + 1..=args.steps {
        let ids = data.next(&mut cursor).map_err(anyhow::Error::msg)?;
        let lr = schedule.at(step);
        let ts = Instant::now();
        let mut scalars: Vec<(&str, f64)> = hp.scalars(lr, step).to_vec();
        let mut out = fulgur_runtime::train::StepOutput {
            loss: 0.0,
            grad_norm: f64::NAN,
        };
        // a pipeline takes the whole batch and cuts it into its micro-batches itself
        if micro_batches == 1 || pipelined {
            out = trainer
                .step(ids, &scalars)
                .with_context(|| format!("training step {step}"))?;
        } else {
            // the micro-batches in order; the last applies the update
            scalars.push(("opt.apply", 0.0));
            let all = ids.to_i64();
            for j in 0..micro_batches {
                let last = scalars.len() - 1;
                scalars[last].1 = if j + 1 == micro_batches { 1.0 } else { 0.0 };
                let part = Tensor::from_i64(
                    DType::I64,
                    vec![micro, t],
                    all[j * micro * t..(j + 1) * micro * t].to_vec(),
                );
                let o = trainer
                    .step(part, &scalars)
                    .with_context(|| format!("training step {step}, micro-batch {}", j + 1))?;
                out.loss += o.loss / micro_batches as f64;
                out.grad_norm = o.grad_norm;
            }
        }
        let secs = ts.elapsed().as_secs_f64();
        if !out.loss.is_finite() || !out.grad_norm.is_finite() {
            let what = if out.loss.is_finite() {
                format!("the gradient norm is {} (loss {})", out.grad_norm, out.loss)
            } else {
                format!("the loss is {} (gradient norm {})", out.loss, out.grad_norm)
            };
            bail!(
                "step {step}: {what} at learning rate {lr:e}; stopped. {}",
                match (&last_good, args.check_finite) {
                    (Some((at, d)), false) => format!(
                        "The last good checkpoint, of step {at}, is {}; resume from it with --check-finite to name \
                         the first kernel that produces a NaN",
                        d.display()
                    ),
                    (Some((at, d)), true) => format!("The last good checkpoint, of step {at}, is {}", d.display()),
                    (None, false) => "No checkpoint was written; rerun with --check-finite to name the first \
                                      kernel that produces a NaN"
                        .to_string(),
                    (None, true) => "No checkpoint was written".to_string(),
                }
            );
        }
        first_loss.get_or_insert(out.loss);
        last = (out.loss, out.grad_norm);
        done = step;
        let mut line = serde_json::json!({
            "step": step, "loss": out.loss, "grad_norm": out.grad_norm, "lr": lr,
            "tokens_per_s": tokens_per_step / secs, "seconds": secs,
        });
        let eval_now = (args.eval_every > 0 && step % args.eval_every == 0) || step == args.steps;
        if eval_now {
            if let Some(h) = eval(&mut trainer, &mut eval_exe)? {
                line["heldout_loss"] = serde_json::json!(h);
                last_heldout = Some(h);
            }
        }
        writeln!(log, "{line}")?;
        let elapsed = t_loop.elapsed().as_secs_f64();
        let rate = (step - step0) as f64 * tokens_per_step / elapsed;
        // on a terminal every step rewrites the line; elsewhere (a log) about fifty lines in all, and the last
        let every = (args.steps / 50).max(1);
        let show = tty || step % every == 0 || step == args.steps || line.get("heldout_loss").is_some();
        if show {
            say(&format!(
                "step {step}/{}  loss {:.4}  lr {lr:.2e}  {:.0} tokens/s{}",
                args.steps,
                out.loss,
                rate,
                line.get("heldout_loss")
                    .and_then(|h| h.as_f64())
                    .map(|h| format!("  held-out {h:.4}"))
                    .unwrap_or_default()
            ));
        }
        let mut stop = STOP.load(Ordering::SeqCst);
        if let Some((env, t)) = &launch {
            // launched ranks stop after the same step: any rank's Ctrl-C stops them all
            // over the job's mesh: the pipeline's stages first where there are several
            let p = par.as_ref().expect("launched with degrees");
            let mut mesh = p.mesh().sizes();
            if p.pp > 1 {
                mesh.insert(0, p.pp);
            }
            stop = crate::cli::ranks::agree(t.as_ref(), env.rank, &mesh, stop, step)
                .with_context(|| format!("agreeing whether to stop after step {step}"))?;
        }
        if stop || (args.save_every > 0 && step % args.save_every == 0) || step == args.steps {
            // gathered by every process of a launched pipeline, written by rank 0
            let state = if writer || stage_state.is_some() {
                Some(whole_state(&mut trainer).with_context(|| format!("the checkpoint of step {step}"))?)
            } else {
                None
            };
            if let (true, Some(state)) = (writer, state) {
                save(state, step, &cursor)?;
                last_good = Some((step, ck_dir.clone()));
            }
        }
        if stop && step < args.steps {
            if !writer {
                break;
            }
            if tty {
                eprintln!();
            }
            eprintln!(
                "interrupted: stopped after step {step}; checkpoint written to {}",
                ck_dir.display()
            );
            break;
        }
    }
    if !writer {
        return Ok(());
    }
    if tty {
        eprintln!();
    }
    let heldout_final = last_heldout;
    let trained = done - step0;
    println!(
        "trained steps {}–{done} on {:?} in {:.1} s ({:.0} tokens/s; optimize {optimize_s:.1} s, {} kernels, planned memory {} state + {} transient): loss {:.4} → {:.4}, gradient norm {:.3}{}; unigram entropy of the data {:.4}; checkpoint {}",
        step0 + 1,
        args.target,
        t_start.elapsed().as_secs_f64(),
        trained as f64 * tokens_per_step / t_loop.elapsed().as_secs_f64(),
        kernels,
        crate::cli::stats::bytes(plan.persistent_bytes),
        crate::cli::stats::bytes(plan.arena_bytes),
        first_loss.unwrap_or(f64::NAN),
        last.0,
        last.1,
        heldout_final.map(|h| format!("; held-out loss {h:.4}")).unwrap_or_default(),
        data.unigram_entropy(),
        ck_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bf16 training step is built from the f32-optimized forward: its lightning, attention and MoE layers
    /// are the optimizer's composites (not the quadratic definitional forms the f32 patterns would miss in
    /// bf16), and their backward is the backward composites.
    #[test]
    fn a_bf16_training_step_keeps_the_optimizers_composites() {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/configs/minimax-tiny-hf.json"
        ));
        let cfg = MiniMaxConfig::from_file(&path).unwrap();
        let opts = ForwardOptions {
            loss: true,
            ..Default::default()
        };
        let loss_graph = forward_graph(&cfg, &opts).unwrap();
        let fwd = optimized_forward(loss_graph, OptLevel::Full, "CPU").unwrap();
        let compute = compute_graph(&fwd, crate::cli::model::Dtype::Bf16).unwrap();
        let step = fulgur_passes::optim::train_step(&compute, "loss", &AdamW::default()).unwrap();
        let count = |g: &fulgur_ir::Graph, op: &str| g.nodes().filter(|(_, n)| n.op.name() == op).count();
        let lightning = count(&fwd, "lightning_layer") + count(&fwd, "lightning_attention");
        let softmax = count(&fwd, "flash_attention_rope") + count(&fwd, "flash_attention");
        assert_eq!(
            lightning + softmax,
            cfg.num_hidden_layers,
            "every attention layer is a composite"
        );
        assert!(lightning > 0 && softmax > 0);
        assert_eq!(
            count(&step, "lightning_attention"),
            4 * lightning,
            "three backward scans per forward one"
        );
        assert_eq!(count(&step, "flash_attention_grad"), softmax);
        assert_eq!(count(&step, "grouped_matmul_wgrad"), 2 * cfg.num_hidden_layers);
        assert!(
            step.nodes()
                .any(|(_, n)| n.outputs.iter().any(|t| t.dtype == DType::BF16)),
            "the step computes in bf16"
        );
    }

    /// What `__restrict__` slots (the default, `restrict_slots` in `codegen::cuda`) rely on: within a kernel, a buffer it
    /// writes is read, if at all, only through the same view as it is written and by an op that reads it in
    /// place (each element read by the thread that then writes it). Distinct buffers never overlap inside a
    /// kernel (the arena packs buffers whose live ranges meet apart), so this is every way two slots of one
    /// launch could alias. Checked on the training steps `fulgur compile --graph train` builds: tiny-hf in f32
    /// for the CPU, bench-m in bf16 for the H200 (its every kernel: AdamW's updates in place among them).
    #[test]
    fn no_kernel_of_a_training_step_reads_what_it_writes_but_in_place() {
        use fulgur_codegen::program::{lower, reads_in_place};
        for (config, dtype, cost) in [
            ("minimax-tiny-hf.json", crate::cli::model::Dtype::F32, "CPU"),
            ("bench-m.json", crate::cli::model::Dtype::Bf16, "H200"),
        ] {
            let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/configs")).join(config);
            let cfg = MiniMaxConfig::from_file(&path).unwrap();
            let opts = ForwardOptions {
                loss: true,
                ..Default::default()
            };
            let fwd = optimized_forward(forward_graph(&cfg, &opts).unwrap(), OptLevel::Full, cost).unwrap();
            let compute = compute_graph(&fwd, dtype).unwrap();
            let step = fulgur_passes::optim::train_step(&compute, "loss", &AdamW::default()).unwrap();
            let p = lower(&optimize(step, OptLevel::Full, cost).unwrap()).unwrap();
            let mut in_place = 0;
            for k in p.prepare.iter().chain(&p.step) {
                for (i, t) in k.inputs.iter().enumerate() {
                    for o in k.outputs.iter().filter(|o| o.buffer == t.buffer) {
                        assert!(
                            t == o && reads_in_place(&k.op, i),
                            "{config}: kernel k{} {} reads buffer b{} through input {i} and writes it through \
                             another view or by an op that does not read in place",
                            k.id,
                            k.name,
                            t.buffer
                        );
                        in_place += 1;
                    }
                }
            }
            assert!(in_place > 0, "{config}: the step updates its state in place");
        }
    }
}
