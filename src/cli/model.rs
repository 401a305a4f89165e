//! `fulgur eval-model` and `fulgur generate`: MiniMax-01 checkpoints on the reference backend.
//!
//! ```text
//! fulgur eval-model CKPT_DIR --tokens T.safetensors [--tokens-key input_ids] --out O.safetensors [--hidden-states]
//! fulgur generate CKPT_DIR --tokens T.safetensors --tokens-key prompt --max-new-tokens N --greedy --out O.safetensors
//! ```
//! Both check the output path first, load only the weights the graph needs (memory-mapped), and write their
//! outputs atomically.

use crate::cli::files::{check_output, checkpoint_files, write_stdout, InputFile};
use anyhow::{bail, Context, Result};
use fulgur_ir::tensor::write_safetensors;
use fulgur_ir::{Precision, Tensor};
use fulgur_models::checkpoint::{check_tokens, read_tokens, Checkpoint};
use fulgur_models::{decode_graph, forward_graph, ForwardOptions};
use fulgur_runtime::{generate, Backend, Executable, ReferenceBackend, ReferenceExecutable};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Checkpoint directory: config.json plus model.safetensors (or shards with model.safetensors.index.json).
    pub checkpoint: PathBuf,
    /// Safetensors file holding the token ids (i64 or i32, [B, T]).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Name of the token tensor in --tokens.
    #[arg(long, default_value = "input_ids")]
    pub tokens_key: String,
    /// Output safetensors: `logits` [B, T, V] f32 and `loss` [1] (labels = the tokens).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Also write `hidden_states.{i}` (0: embeddings, i: output of layer i-1, last: after the final norm).
    #[arg(long)]
    pub hidden_states: bool,
    /// Also write the gradient of `loss` with respect to every parameter to this safetensors file, under the
    /// parameters' names (transformers' in-memory names, as `grads.safetensors` of the fixtures).
    #[arg(long, value_name = "FILE")]
    pub grads: Option<PathBuf>,
    /// Add the auxiliary load-balancing loss to `loss` and write `aux_loss`.
    #[arg(long)]
    pub aux_loss: bool,
    /// Interpreter precision.
    #[arg(long, value_enum, default_value_t = crate::cli::eval::PrecisionArg::F32)]
    pub precision: crate::cli::eval::PrecisionArg,
    /// Print the outputs' summaries.
    #[arg(long)]
    pub print: bool,
    /// Optimization level: `none` runs the definitional graph, `full` the optimizer's output.
    #[arg(long, value_enum, default_value_t = OptLevel::Full)]
    pub opt: OptLevel,
    /// Where to run: `cpu` (the CPU backend, JIT-compiled; the default where the build has it) or
    /// `reference` (the interpreter, which honours --precision and --memory-limit).
    #[arg(long, value_enum, default_value_t = crate::cli::bench::default_target())]
    pub target: crate::cli::bench::BenchTarget,
    /// Cost model the optimizer plans for (default: `CPU` for the cpu target, `H100` for reference).
    #[arg(long, value_name = "NAME")]
    pub cost_model: Option<String>,
    /// On the cpu target, the most memory the program may plan (weights, prepared values, arena and kernel
    /// scratch), e.g. `4GiB`: a larger plan is refused before anything runs, with its planned peak.
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::files::parse_bytes)]
    pub max_memory: Option<u64>,
    /// On the cpu and cuda targets: after every kernel, check its outputs and stop at the first kernel that
    /// produced a NaN, naming it and its IR node (an infinity alone is not an error: causal masks hold −inf).
    #[arg(long)]
    pub check_finite: bool,
    /// The dtype weights and activations are stored in.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// The most memory the interpreter may hold at once, e.g. `8GiB` (default: the memory available).
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::files::parse_bytes)]
    pub memory_limit: Option<u64>,
    /// Run sharded with these degrees, e.g. `tp=2,ep=2` (dp, ep, sp, tp, and etp = 1 or tp; the ranks are
    /// the product of dp, ep, sp and tp;
    /// `docs/parallelism.md`): on simulated ranks (a thread per rank, collectives through shared memory), or as
    /// one rank of a job started by a launcher (`fulgur launch`, torchrun, Slurm, Open MPI). Each rank runs on
    /// the `--target` (on cuda, collectives staged through the host; launched cuda ranks use their process's first
    /// visible GPU and NCCL with `FULGUR_TRANSPORT=nccl`); the outputs are rank 0's (every rank holds the same).
    #[arg(long, value_name = "DEGREES")]
    pub parallel: Option<String>,
    /// Run with the degrees a plan search chose: the JSON `fulgur plan ... --json` writes (its `best`).
    #[arg(long, value_name = "PLAN.json", conflicts_with = "parallel")]
    pub plan: Option<PathBuf>,
}

/// The degrees of a `fulgur plan --json` file: its chosen plan's `parallel`.
pub fn degrees_of_plan(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the plan {}", path.display()))?;
    let j: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("the plan {} is not JSON", path.display()))?;
    if j.get("best").is_some_and(|b| b.is_null()) {
        bail!("the plan {} chose nothing (no candidate fit)", path.display());
    }
    j["best"]["parallel"].as_str().map(str::to_string).ok_or_else(|| {
        anyhow::anyhow!(
            "the plan {} has no `best.parallel` (not `fulgur plan --json` output?)",
            path.display()
        )
    })
}

/// How much of the optimizer runs before a graph executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptLevel {
    None,
    Full,
}

/// Activation recompute versus storing in a training step (`fulgur_passes::autodiff::Recompute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecomputeArg {
    /// The cost model's choice per value: the cheaper in time on the target's cost model.
    Auto,
    /// Store every value the backward reads.
    Store,
    /// Recompute every value the backward reads that a fused forward kernel does not keep.
    All,
}

impl RecomputeArg {
    /// The autodiff options for this choice, priced on the cost model `target`.
    pub fn grad_options(self, target: &str) -> fulgur_passes::autodiff::GradOptions {
        use fulgur_passes::autodiff::{GradOptions, Recompute};
        GradOptions {
            recompute: match self {
                RecomputeArg::Auto => Recompute::Auto,
                RecomputeArg::Store => Recompute::Store,
                RecomputeArg::All => Recompute::All,
            },
            target: fulgur_passes::cost::Target::by_name(target),
            ..Default::default()
        }
    }
}

/// The dtype a model's weights and activations are stored in (`docs/numerics.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    /// IEEE f32 everywhere (parity with transformers in f32).
    F32,
    /// Weights and activations stored as bf16, arithmetic in f32 inside each kernel; the lightning states
    /// carried between decode steps and the loss stay f32.
    Bf16,
}

/// `g` with its floats stored as `dtype` (`fulgur_passes::precision`): applied to the optimizer's output, so
/// that the kernels it chose keep their intermediates in f32 and store `dtype`.
pub fn with_dtype(g: fulgur_ir::Graph, dtype: Dtype) -> Result<fulgur_ir::Graph> {
    Ok(match dtype {
        Dtype::F32 => g,
        Dtype::Bf16 => {
            fulgur_passes::precision::store_as(&g, fulgur_ir::DType::BF16, &fulgur_passes::precision::keep_f32)?
        }
    })
}

impl From<OptLevel> for fulgur_codegen::compile::OptLevel {
    fn from(o: OptLevel) -> Self {
        match o {
            OptLevel::None => fulgur_codegen::compile::OptLevel::None,
            OptLevel::Full => fulgur_codegen::compile::OptLevel::Full,
        }
    }
}

/// Compiles `g` at `opt` for `target` (the library's compile; warnings printed here).
pub fn optimize(g: fulgur_ir::Graph, opt: OptLevel, target: &str) -> Result<fulgur_ir::Graph> {
    optimize_with(g, opt, target, None)
}

/// [`optimize`] for a target whose ceilings are overridden by a JSON file's `(text, path)` (`compile
/// --ceilings`, as `inspect --ceilings`).
pub fn optimize_with(
    g: fulgur_ir::Graph,
    opt: OptLevel,
    target: &str,
    ceilings: Option<&(String, String)>,
) -> Result<fulgur_ir::Graph> {
    let opts = fulgur_codegen::compile::CompileOptions {
        opt: opt.into(),
        target: target.to_string(),
        ceilings: ceilings.cloned(),
        ..Default::default()
    };
    let t = Instant::now();
    let compiled = fulgur_codegen::compile::compile(&g, &opts, None)?;
    for w in &compiled.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(r) = compiled.reports.last() {
        tracing::info!(elapsed = ?t.elapsed(), kernels_before = compiled.reports[0].kernels_before, kernels_after = r.kernels_after, "optimized");
    }
    Ok(compiled.graph)
}

/// A graph holding the backward of the loss graph `g`, built by `build` (autodiff, or a whole training step)
/// the way every command builds it: at `--opt full` the forward is optimized first, so that autodiff sees the
/// optimizer's composites and emits their backward composites (flash attention's, the grouped GEMMs', lightning
/// attention on reversed time; `docs/training.md`), then the whole graph is optimized; at `none` the
/// definitional graph is differentiated as it is.
pub fn with_backward(
    g: fulgur_ir::Graph,
    opt: OptLevel,
    target: &str,
    build: impl FnOnce(&fulgur_ir::Graph) -> Result<fulgur_ir::Graph, fulgur_passes::PassError>,
) -> Result<fulgur_ir::Graph> {
    let fwd = optimized_forward(g, opt, target)?;
    optimize(build(&fwd)?, opt, target)
}

/// The forward a backward is built from (see [`with_backward`]): optimized at `--opt full`, as it is at `none`.
/// In f32: a bf16 training step converts it after (`train::compute_graph`), since the optimizer's patterns are
/// those of the f32 model.
pub fn optimized_forward(g: fulgur_ir::Graph, opt: OptLevel, target: &str) -> Result<fulgur_ir::Graph> {
    match opt {
        OptLevel::None => Ok(g),
        OptLevel::Full => optimize(g, opt, target),
    }
}

/// Where a backend's weights come from: a map already on the host, or a checkpoint read one tensor at a time
/// (so that a compiled backend never holds the checkpoint twice).
#[cfg_attr(not(feature = "llvm"), allow(dead_code))]
pub enum HostWeights<'a> {
    Map(std::collections::HashMap<String, Tensor>),
    Checkpoint(&'a Checkpoint),
}

#[cfg_attr(not(feature = "llvm"), allow(dead_code))]
impl HostWeights<'_> {
    /// The weight `name` of type `ty`.
    pub fn fetch(&self, name: &str, ty: &fulgur_ir::TensorType) -> Result<Tensor> {
        match self {
            HostWeights::Map(m) => m
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("weight `{name}` ({ty}) is missing")),
            HostWeights::Checkpoint(ck) => Ok(ck.load_param(name, ty)?),
        }
    }

    /// The weight `name` of type `ty`, moved out of a map (so that a caller building its own copy of the
    /// weights never holds them twice).
    pub fn take(&mut self, name: &str, ty: &fulgur_ir::TensorType) -> Result<Tensor> {
        match self {
            HostWeights::Map(m) => m
                .remove(name)
                .ok_or_else(|| anyhow::anyhow!("weight `{name}` ({ty}) is missing")),
            HostWeights::Checkpoint(ck) => Ok(ck.load_param(name, ty)?),
        }
    }
}

/// The files `eval-model` and `generate` read: the checkpoint's and the tokens file.
fn model_inputs(checkpoint: &std::path::Path, tokens: &std::path::Path) -> Vec<InputFile> {
    let mut v = checkpoint_files(checkpoint);
    v.push(InputFile::new("the tokens file", tokens));
    v
}

pub fn eval_model(args: EvalArgs) -> Result<()> {
    let mut guarded = model_inputs(&args.checkpoint, &args.tokens);
    if let Some(p) = &args.plan {
        guarded.push(InputFile::new("the --plan file", p));
    }
    check_output(&args.out, &guarded)?;
    if let Some(gp) = &args.grads {
        let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut inputs = model_inputs(&args.checkpoint, &args.tokens);
        inputs.push(crate::cli::files::InputFile::new("the --out file", &args.out));
        if abs(gp) == abs(&args.out) {
            bail!(
                "refusing to write {}: it is the --out file too; choose another path for --grads",
                gp.display()
            );
        }
        check_output(gp, &inputs)?;
    }
    let t0 = Instant::now();
    let ck = Checkpoint::open(&args.checkpoint)?;
    let tokens = read_tokens(&args.tokens, &args.tokens_key)?;
    check_tokens(&tokens, ck.config.vocab_size, &args.tokens_key, &args.tokens)?;
    if tokens.shape[1] < 2 {
        bail!(
            "tensor `{}` in `{}`: the loss needs at least 2 tokens per sequence, found shape {:?}",
            args.tokens_key,
            args.tokens.display(),
            tokens.shape
        );
    }
    let t = tokens.shape[1];
    let limit = ck.config.max_position_embeddings;
    let mut warnings = Vec::new();
    if t > limit {
        warnings.push(format!(
            "the sequences have {t} tokens, more than the model's max_position_embeddings {limit} ({}): \
             positions past {limit} are outside what the model was trained for",
            args.checkpoint.join("config.json").display()
        ));
    }
    let opts = ForwardOptions {
        hidden_states: args.hidden_states,
        loss: true,
        aux_loss: args.aux_loss,
        states: false,
        last_logits: false,
        split_gate_up: false,
    };
    let cost_model = args
        .cost_model
        .clone()
        .unwrap_or_else(|| args.target.cost_model().to_string());
    let g = forward_graph(&ck.config, &opts)?;
    let from_plan = match &args.plan {
        Some(p) => Some(degrees_of_plan(p)?),
        None => None,
    };
    if let Some(degrees) = args.parallel.as_ref().or(from_plan.as_ref()) {
        let par = fulgur::parallel::Parallel::parse(degrees).map_err(|e| anyhow::anyhow!("--parallel: {e}"))?;
        let target = args.target;
        if args.grads.is_some() {
            bail!("--parallel does not take --grads yet");
        }
        if par.pp > 1 {
            let Some(outputs) = pipelined(&ck, &par, &tokens, &opts, &args)? else {
                return Ok(());
            };
            write_safetensors(&args.out, &outputs)?;
            if args.print {
                write_stdout(
                    &outputs
                        .iter()
                        .map(|(n, t)| crate::cli::eval::describe(n, t))
                        .collect::<String>(),
                )?;
            }
            return Ok(());
        }
        let (b, t) = (tokens.shape[0], tokens.shape[1]);
        let plan = fulgur::parallel::minimax_plan(&ck.config, &par, b, t)
            .map_err(|e| anyhow::anyhow!("--parallel {degrees}: {e}"))?;
        let g = forward_graph(&ck.config, &par.forward_options(&opts))?;
        let dtype = args.dtype;
        let (g, sg, report) =
            fulgur::parallel::shard_forward(&g, &plan, |g| with_dtype(g, dtype).map_err(|e| format!("{e:#}")))
                .map_err(|e| anyhow::anyhow!("sharding the forward: {e}"))?;
        let weights = std::sync::Arc::new(ck.load_params(&g)?);
        let t1 = Instant::now();
        // started by a launcher: this process is one rank, its collectives over the job's transport
        let launch = match fulgur_runtime::ranks::RankEnv::from_env().map_err(|e| anyhow::anyhow!(e))? {
            Some(env) if env.world != par.ranks() => bail!(
                "launched as {} ranks ({}'s variables) but --parallel {degrees} needs {}",
                env.world,
                env.source,
                par.ranks()
            ),
            Some(_) => crate::cli::ranks::launched(&par, target, Precision::from(args.precision))?,
            None => None,
        };
        let programs = crate::cli::ranks::local_ranks(&par, launch.as_ref())
            .into_iter()
            .map(|r| fulgur_passes::shard::lower_rank(&sg, &plan.mesh, r))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let interp = fulgur_ir::Interpreter {
            precision: Precision::from(args.precision),
            memory_limit: args.memory_limit,
        };
        let mut exe = crate::cli::ranks::executable("the forward", programs, target, interp, weights, launch.as_ref())?;
        let run = exe.run(&[("input_ids".to_string(), tokens)].into());
        if let Some((env, _)) = &launch {
            let outputs = run.map_err(|e| anyhow::anyhow!("rank {}: {e}", env.rank))?;
            if env.rank == 0 {
                eprintln!(
                    "ran as {} processes ({par}) in {:.2} s",
                    env.world,
                    t1.elapsed().as_secs_f64()
                );
                write_safetensors(&args.out, &outputs)?;
                if args.print {
                    write_stdout(
                        &outputs
                            .iter()
                            .map(|(n, t)| crate::cli::eval::describe(n, t))
                            .collect::<String>(),
                    )?;
                }
            }
            return Ok(());
        }
        let outputs = run?;
        let collectives: usize = report.collectives.values().sum();
        eprintln!(
            "ran on {} simulated ranks ({par}) in {:.2} s: {collectives} collectives ({})",
            par.ranks(),
            t1.elapsed().as_secs_f64(),
            report
                .collectives
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        write_safetensors(&args.out, &outputs)?;
        if args.print {
            write_stdout(
                &outputs
                    .iter()
                    .map(|(n, t)| crate::cli::eval::describe(n, t))
                    .collect::<String>(),
            )?;
        }
        return Ok(());
    }
    let g = if args.grads.is_some() {
        with_backward(g, args.opt, &cost_model, |f| {
            fulgur_passes::autodiff::differentiate(f, "loss", &Default::default())
        })?
    } else {
        optimize(g, args.opt, &cost_model)?
    };
    let g = with_dtype(g, args.dtype)?;
    tracing::info!(elapsed = ?t0.elapsed(), nodes = g.node_count(), "graph built");
    let t1 = Instant::now();
    let outputs = match args.target {
        crate::cli::bench::BenchTarget::Reference => {
            let mut inputs = ck.load_params(&g)?;
            inputs.insert("input_ids".into(), tokens);
            let backend = ReferenceBackend {
                precision: Precision::from(args.precision),
                memory_limit: args.memory_limit,
            };
            backend.run(&g, &inputs).context("running the forward graph")?
        }
        crate::cli::bench::BenchTarget::Cpu => run_cpu(
            &g,
            &HostWeights::Checkpoint(&ck),
            tokens,
            args.max_memory,
            args.check_finite,
        )?,
        crate::cli::bench::BenchTarget::Cuda => run_cuda(&g, &HostWeights::Checkpoint(&ck), tokens, args.check_finite)?,
    };
    tracing::info!(elapsed = ?t1.elapsed(), target = ?args.target, "forward done");
    for (name, t) in &outputs {
        if t.has_non_finite() {
            eprintln!("warning: output `{name}` contains NaN or infinite values");
        }
    }
    let (grads, outputs): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) = outputs
        .into_iter()
        .partition(|(n, _)| n.starts_with(fulgur_passes::autodiff::GRAD_PREFIX));
    if let Some(gp) = &args.grads {
        let grads: BTreeMap<String, Tensor> = grads
            .into_iter()
            .map(|(n, t)| (n[fulgur_passes::autodiff::GRAD_PREFIX.len()..].to_string(), t))
            .collect();
        write_safetensors(gp, &grads)?;
        if let Err(e) = write_safetensors(&args.out, &outputs) {
            // neither file is left as if the run had succeeded
            let _ = std::fs::remove_file(gp);
            return Err(e.into());
        }
    } else {
        write_safetensors(&args.out, &outputs)?;
    }
    warnings.extend(crate::cli::files::config_warnings(
        &args.checkpoint.join("config.json"),
        &ck.config,
    ));
    for w in warnings {
        eprintln!("warning: {w}");
    }
    if args.print {
        write_stdout(
            &outputs
                .iter()
                .map(|(n, t)| crate::cli::eval::describe(n, t))
                .collect::<String>(),
        )?;
    }
    Ok(())
}

/// The forward graph on the CPU backend: lowered, JIT-compiled, weights loaded once, one step.
#[cfg(feature = "llvm")]
fn run_cpu(
    g: &fulgur_ir::Graph,
    weights: &HostWeights,
    tokens: Tensor,
    max_memory: Option<u64>,
    check_finite: bool,
) -> Result<BTreeMap<String, Tensor>> {
    use fulgur_runtime::cpu::{CpuOptions, CpuProgram};
    let program = fulgur_codegen::program::lower(g)?;
    let opts = CpuOptions {
        max_memory,
        check_finite,
        ..Default::default()
    };
    let mut cpu = CpuProgram::new(program, opts).context("compiling for the CPU")?;
    tracing::info!(seconds = cpu.compile_seconds, "JIT-compiled");
    cpu.load_weights_from(|name, ty| weights.fetch(name, ty))?;
    cpu.run(&[("input_ids".to_string(), tokens)].into())
        .context("running the forward pass on the CPU")
}

/// `eval-model --parallel ...,pp=N`: the model cut into `pp` stages (`fulgur::pipeline`), each sharded at the
/// other degrees, run on simulated ranks over micro-batches (the most, up to `pp`, that divide the batch into
/// pieces the data-parallel degrees split): the logits of every micro-batch and their mean loss. Started by a
/// launcher, this process runs one rank of one stage (`pipeline::PipelineProcess`) and only the last stage's rank 0
/// has outputs to write (`None` elsewhere).
fn pipelined(
    ck: &Checkpoint,
    par: &fulgur::parallel::Parallel,
    tokens: &Tensor,
    opts: &ForwardOptions,
    args: &EvalArgs,
) -> Result<Option<BTreeMap<String, Tensor>>> {
    let launched = crate::cli::ranks::launched_pipeline(par, Precision::from(args.precision))?;
    if opts.hidden_states || opts.aux_loss {
        bail!("--parallel {par}: pipeline stages do not output --hidden-states or --aux-loss");
    }
    let (b, t) = (tokens.shape[0], tokens.shape[1]);
    let m = fulgur::pipeline::micro_batch_count(par, b).map_err(|e| anyhow::anyhow!("--parallel {par}: {e}"))?;
    let dtype = args.dtype;
    let prepare = move |g: fulgur_ir::Graph| with_dtype(g, dtype).map_err(|e| e.to_string());
    let stages = fulgur::pipeline::build(&ck.config, par, b / m, t, opts, false, false, &prepare)
        .map_err(|e| anyhow::anyhow!("--parallel {par}: {e}"))?;
    // the weights in the dtype the stages take
    let g = with_dtype(forward_graph(&ck.config, opts)?, args.dtype)?;
    let weights = std::sync::Arc::new(ck.load_params(&g)?);
    let (target, precision) = (args.target, Precision::from(args.precision));
    let interp = fulgur_ir::Interpreter {
        precision,
        memory_limit: args.memory_limit,
    };
    let make = stage_maker(weights, target, interp, par, None);
    let micro = fulgur::pipeline::micro_batches(tokens, m).map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    let last = if let Some((env, job)) = launched {
        // this process is one rank of one stage; the last stage's rank 0 holds the outputs and writes them
        let mesh = par.stage().mesh().sizes();
        let cuda = target == crate::cli::bench::BenchTarget::Cuda;
        let connect = |e: &fulgur_runtime::ranks::RankEnv| {
            crate::cli::ranks::transport(e, &mesh, cuda, precision).map_err(|e| format!("{e:#}"))
        };
        let run = fulgur::pipeline::PipelineProcess::new(
            &env,
            job,
            &stages,
            make,
            &connect,
            crate::cli::ranks::rank_timeout(),
        )
        .and_then(|mut p| p.run(&micro, &std::collections::HashMap::new()))
        .map_err(|e| anyhow::anyhow!("rank {}: {e}", env.rank))?;
        if run.stage + 1 != par.pp || run.rank != 0 {
            return Ok(None);
        }
        eprintln!(
            "ran {} pipeline stages of {} launched ranks each ({par}, {m} micro-batches) in {:.2} s; rank {} (stage {}, \
             rank 0) writes the outputs",
            par.pp,
            par.ranks(),
            t0.elapsed().as_secs_f64(),
            env.rank,
            run.stage
        );
        run.outputs
    } else {
        let run = fulgur::pipeline::run(&stages, &micro, make, precision, crate::cli::ranks::rank_timeout())
            .map_err(|e| anyhow::anyhow!("running the pipeline on simulated ranks: {e}"))?;
        eprintln!(
            "ran {} pipeline stages of {} simulated ranks each ({par}, {m} micro-batches) in {:.2} s",
            par.pp,
            par.ranks(),
            t0.elapsed().as_secs_f64()
        );
        run.outputs
    };
    let mut outputs = BTreeMap::new();
    let logits: Vec<&Tensor> = last.iter().map(|o| &o["logits"]).collect();
    outputs.insert(
        "logits".to_string(),
        fulgur::pipeline::concat_batches(&logits).map_err(anyhow::Error::msg)?,
    );
    let loss = last.iter().map(|o| o["loss"].to_f64()[0]).sum::<f64>() / m as f64;
    outputs.insert(
        "loss".to_string(),
        Tensor::from_f64(fulgur_ir::DType::F32, vec![1], vec![loss]),
    );
    Ok(Some(outputs))
}

#[cfg(not(feature = "llvm"))]
fn run_cpu(
    _: &fulgur_ir::Graph,
    _: &HostWeights,
    _: Tensor,
    _: Option<u64>,
    _: bool,
) -> Result<BTreeMap<String, Tensor>> {
    bail!("this build has no CPU backend (built without the `llvm` feature): use --target reference")
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory: config.json plus model.safetensors (or shards with model.safetensors.index.json).
    pub checkpoint: PathBuf,
    /// Safetensors file holding the prompt token ids (i64 or i32, [B, P]).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Name of the prompt tensor in --tokens.
    #[arg(long, default_value = "prompt")]
    pub tokens_key: String,
    /// Number of tokens to generate.
    #[arg(long, value_name = "TOKENS")]
    pub max_new_tokens: usize,
    /// Greedy decoding (the only mode implemented; the flag may be omitted).
    #[arg(long)]
    pub greedy: bool,
    /// Output safetensors: `generated` [B, P+N] i64 and `step_logits` [N·B, V] f32.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Interpreter precision.
    #[arg(long, value_enum, default_value_t = crate::cli::eval::PrecisionArg::F32)]
    pub precision: crate::cli::eval::PrecisionArg,
    /// Optimization level: `none` runs the definitional graphs, `full` the optimizer's output.
    #[arg(long, value_enum, default_value_t = OptLevel::Full)]
    pub opt: OptLevel,
    /// Where to run: `cpu` (the CPU backend, prefill and decode JIT-compiled once, weights loaded once and
    /// shared; the default where the build has it) or `reference` (the interpreter).
    #[arg(long, value_enum, default_value_t = crate::cli::bench::default_target())]
    pub target: crate::cli::bench::BenchTarget,
    /// The dtype weights and activations are stored in.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// On the cuda target: launch the decode step kernel by kernel instead of as a CUDA graph.
    #[arg(long)]
    pub eager: bool,
    /// Print the generated tokens of every sequence and the prefill and decode times.
    #[arg(long)]
    pub print: bool,
    /// The most memory the interpreter may hold at once, e.g. `8GiB` (default: the memory available).
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::files::parse_bytes)]
    pub memory_limit: Option<u64>,
    /// Generate past the model's max_position_embeddings (prompt plus new tokens) with a warning, instead of
    /// refusing.
    #[arg(long)]
    pub allow_longer: bool,
    /// Generate sharded with these degrees, e.g. `tp=2,ep=2` (dp, ep, tp, etp; sp must be 1: a decode step
    /// has one token per sequence): the prefill and the decode step sharded (`docs/parallelism.md`) and run on
    /// simulated ranks, a thread per rank with its own `--target` program.
    #[arg(long, value_name = "DEGREES")]
    pub parallel: Option<String>,
    /// Generate with the degrees a plan search chose (`fulgur plan ... --json`'s `best`).
    #[arg(long, value_name = "PLAN.json", conflicts_with = "parallel")]
    pub plan: Option<PathBuf>,
}

/// A prefill and a decode step.
type ExecutablePair = (Box<dyn Executable>, Box<dyn Executable>);

/// The prefill and decode step sharded at `degrees` for `b` prompts of `p` tokens, each rank's program
/// optimized at `opt` and built on its own thread for `target` with the checkpoint's weights.
/// Started by a launcher, only this process's rank is built, its collectives over the job's transport; the
/// flag says whether this process writes the outputs (rank 0, or the only process).
fn sharded_pair(
    ck: &Checkpoint,
    degrees: &str,
    b: usize,
    p: usize,
    args: &GenerateArgs,
) -> Result<(ExecutablePair, bool)> {
    let par = fulgur::parallel::Parallel::parse(degrees).map_err(|e| anyhow::anyhow!("--parallel: {e}"))?;
    if par.sp > 1 {
        bail!("--parallel {par}: generation takes sp=1 (a decode step has one token per sequence to split)");
    }
    if par.pp > 1 {
        return pipelined_pair(ck, &par, b, p, args);
    }
    let cfg = &ck.config;
    let plan = |t: usize| {
        fulgur::parallel::minimax_plan(cfg, &par, b, t).map_err(|e| anyhow::anyhow!("--parallel {degrees}: {e}"))
    };
    let (prefill_plan, decode_plan) = (plan(p)?, plan(1)?);
    let opts = par.forward_options(&ForwardOptions {
        states: true,
        ..Default::default()
    });
    let dtype = args.dtype;
    let prepare = |g: fulgur_ir::Graph| with_dtype(g, dtype).map_err(|e| format!("{e:#}"));
    let prefill = forward_graph(cfg, &opts)?;
    let decode = fulgur_models::decode_graph_with(cfg, &opts)?;
    let weights = std::sync::Arc::new(ck.load_params(&prepare(prefill.clone()).map_err(|e| anyhow::anyhow!(e))?)?);
    let cost_model = args.target.cost_model();
    let launch = crate::cli::ranks::launched(&par, args.target, Precision::from(args.precision))?;
    let ranks =
        |g: &fulgur_ir::Graph, plan: &fulgur_passes::shard::ShardPlan, what: &str| -> Result<Box<dyn Executable>> {
            let (_, sg, _) = fulgur::parallel::shard_forward(g, plan, prepare)
                .map_err(|e| anyhow::anyhow!(e))
                .with_context(|| format!("sharding {what}"))?;
            let programs = crate::cli::ranks::local_ranks(&par, launch.as_ref())
                .into_iter()
                .map(|r| {
                    let rg = fulgur_passes::shard::lower_rank(&sg, &plan.mesh, r)?;
                    optimize(rg, args.opt, cost_model).with_context(|| format!("optimizing rank {r}'s {what}"))
                })
                .collect::<Result<Vec<_>>>()?;
            fulgur::parallel::check_same_collectives(&programs)
                .map_err(|e| anyhow::anyhow!(e))
                .with_context(|| format!("optimizing {what}"))?;
            crate::cli::ranks::executable(
                what,
                programs,
                args.target,
                fulgur_ir::Interpreter {
                    precision: Precision::from(args.precision),
                    memory_limit: args.memory_limit,
                },
                weights.clone(),
                launch.as_ref(),
            )
        };
    let (prefill, decode) = (
        ranks(&prefill, &prefill_plan, "the prefill")?,
        ranks(&decode, &decode_plan, "the decode step")?,
    );
    let writer = match &launch {
        Some((env, _)) => env.rank == 0,
        None => true,
    };
    if writer {
        eprintln!(
            "generating on {} {} ({par})",
            par.ranks(),
            if launch.is_some() {
                "launched ranks"
            } else {
                "simulated ranks"
            }
        );
    }
    Ok(((prefill, decode), writer))
}

/// Builds a pipeline stage rank's program from its graph for `target` with its weights from `weights`, on the
/// thread (or process) that runs it, optimized first at `opt` where given; the cores shared among every rank of
/// every stage.
fn stage_maker(
    weights: std::sync::Arc<std::collections::HashMap<String, Tensor>>,
    target: crate::cli::bench::BenchTarget,
    interp: fulgur_ir::Interpreter,
    par: &fulgur::parallel::Parallel,
    opt: Option<OptLevel>,
) -> fulgur::pipeline::MakeProgram {
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let threads = (cores / par.total_ranks()).max(1);
    std::sync::Arc::new(move |g: &fulgur_ir::Graph| {
        let w = weights.clone();
        let fetch = move |name: &str| {
            w.get(name)
                .cloned()
                .ok_or_else(|| format!("weight `{name}` is missing"))
        };
        let g = match opt {
            Some(opt) => optimize(g.clone(), opt, target.cost_model()).map_err(|e| format!("{e:#}"))?,
            None => g.clone(),
        };
        crate::cli::ranks::rank_program(g, target, interp, threads, &fetch)
    })
}

/// A prefill or a decode step through pipeline stages (`fulgur::pipeline::build_generation`): the whole batch as
/// one micro-batch, every input but the tokens given to every stage (a stage's programs take what they read: the
/// decode's `position` and its layers' states); the outputs of every stage (the logits and the layers' states),
/// or launched, this process's stage's and the logits (`pipeline::SharingProcess`).
struct PipelineGeneration {
    name: &'static str,
    runner: Box<dyn fulgur::pipeline::Runner>,
    inputs: Vec<String>,
}

impl Executable for PipelineGeneration {
    fn name(&self) -> &str {
        self.name
    }
    fn input_names(&self) -> Vec<String> {
        self.inputs.clone()
    }
    fn run(
        &mut self,
        inputs: &std::collections::HashMap<String, Tensor>,
    ) -> std::result::Result<BTreeMap<String, Tensor>, fulgur_runtime::RuntimeError> {
        use fulgur_runtime::RuntimeError;
        let ids = inputs
            .get("input_ids")
            .ok_or_else(|| RuntimeError::Other(format!("{} has no `input_ids`", self.name)))?;
        let mut feed = inputs.clone();
        feed.remove("input_ids");
        let run = self
            .runner
            .step(std::slice::from_ref(ids), &feed)
            .map_err(|e| RuntimeError::Other(format!("the pipeline: {e}")))?;
        run.outputs
            .into_iter()
            .next()
            .ok_or_else(|| RuntimeError::Other(format!("{} gave no outputs", self.name)))
    }
}

/// `generate --parallel ...,pp=N`: the prefill and the decode step cut into `pp` stages, each sharded at the
/// other degrees (`fulgur::pipeline::build_generation`), on simulated ranks (the stages' states going whole from
/// step to step as one device's do), or started by a launcher, this process's rank of each (it keeps its stage's
/// states; the last stage's logits are shared with every process, which all choose the same tokens, and rank 0
/// writes).
fn pipelined_pair(
    ck: &Checkpoint,
    par: &fulgur::parallel::Parallel,
    b: usize,
    p: usize,
    args: &GenerateArgs,
) -> Result<(ExecutablePair, bool)> {
    let precision = Precision::from(args.precision);
    let launched = crate::cli::ranks::launched_pipeline(par, precision)?;
    let dtype = args.dtype;
    let prepare = move |g: fulgur_ir::Graph| with_dtype(g, dtype).map_err(|e| format!("{e:#}"));
    let (prefill, decode) = fulgur::pipeline::build_generation(&ck.config, par, b, p, &prepare)
        .map_err(|e| anyhow::anyhow!("--parallel {par}: {e}"))?;
    // the weights in the dtype the stages take
    let g = with_dtype(
        forward_graph(
            &ck.config,
            &par.forward_options(&ForwardOptions {
                states: true,
                ..Default::default()
            }),
        )?,
        dtype,
    )?;
    let weights = std::sync::Arc::new(ck.load_params(&g)?);
    let (target, opt) = (args.target, args.opt);
    let interp = fulgur_ir::Interpreter {
        precision,
        memory_limit: args.memory_limit,
    };
    let make = stage_maker(weights, target, interp, par, Some(opt));
    let timeout = crate::cli::ranks::rank_timeout();
    let inputs = |stages: &[fulgur::pipeline::Stage]| -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for st in stages {
            for n in fulgur::pipeline::stage_inputs(st) {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        names
    };
    let is_launched = launched.is_some();
    let (pair, writer): (ExecutablePair, bool) = match launched {
        None => {
            let threads =
                |stages: &[fulgur::pipeline::Stage], what: &str| -> Result<Box<dyn fulgur::pipeline::Runner>> {
                    Ok(Box::new(
                        fulgur::pipeline::PipelineThreads::new(stages, make.clone(), precision, timeout)
                            .map_err(|e| anyhow::anyhow!("building {what}'s pipeline stages: {e}"))?,
                    ))
                };
            (
                (
                    Box::new(PipelineGeneration {
                        name: "the prefill through pipeline stages",
                        runner: threads(&prefill, "the prefill")?,
                        inputs: inputs(&prefill),
                    }),
                    Box::new(PipelineGeneration {
                        name: "the decode step through pipeline stages",
                        runner: threads(&decode, "the decode step")?,
                        inputs: inputs(&decode),
                    }),
                ),
                true,
            )
        }
        Some((env, job)) => {
            let mesh = par.stage().mesh().sizes();
            let cuda = target == crate::cli::bench::BenchTarget::Cuda;
            let connect = |e: &fulgur_runtime::ranks::RankEnv| {
                crate::cli::ranks::transport(e, &mesh, cuda, precision).map_err(|e| format!("{e:#}"))
            };
            let stage = env.rank / par.ranks();
            let process = |stages: &[fulgur::pipeline::Stage],
                           what: &str|
             -> Result<Box<dyn fulgur::pipeline::Runner>> {
                let process =
                    fulgur::pipeline::PipelineProcess::new(&env, job.clone(), stages, make.clone(), &connect, timeout)
                        .map_err(|e| anyhow::anyhow!("rank {}: building {what}'s pipeline stages: {e}", env.rank))?;
                Ok(Box::new(fulgur::pipeline::SharingProcess {
                    process,
                    share: vec!["logits".to_string()],
                }))
            };
            (
                (
                    Box::new(PipelineGeneration {
                        name: "the prefill through pipeline stages",
                        runner: process(&prefill, "the prefill")?,
                        inputs: inputs(&prefill[stage..=stage]),
                    }),
                    Box::new(PipelineGeneration {
                        name: "the decode step through pipeline stages",
                        runner: process(&decode, "the decode step")?,
                        inputs: inputs(&decode[stage..=stage]),
                    }),
                ),
                env.rank == 0,
            )
        }
    };
    if writer {
        eprintln!(
            "generating through {} pipeline stages of {} {} each ({par})",
            par.pp,
            par.ranks(),
            if is_launched {
                "launched ranks"
            } else {
                "simulated ranks"
            }
        );
    }
    Ok((pair, writer))
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let mut guarded = model_inputs(&args.checkpoint, &args.tokens);
    if let Some(p) = &args.plan {
        guarded.push(InputFile::new("the --plan file", p));
    }
    check_output(&args.out, &guarded)?;
    let ck = Checkpoint::open(&args.checkpoint)?;
    let prompt = read_tokens(&args.tokens, &args.tokens_key)?;
    check_tokens(&prompt, ck.config.vocab_size, &args.tokens_key, &args.tokens)?;
    // the whole length, up front: refused past what the model was trained for unless asked
    let p = prompt.shape[1];
    let limit = ck.config.max_position_embeddings;
    let total = p
        .checked_add(args.max_new_tokens)
        .ok_or_else(|| anyhow::anyhow!("--max-new-tokens {} overflows the sequence length", args.max_new_tokens))?;
    if total > limit {
        let what = format!(
            "the prompt ({p} tokens) and --max-new-tokens {} make {total} positions, more than the model's \
             max_position_embeddings {limit} ({})",
            args.max_new_tokens,
            args.checkpoint.join("config.json").display()
        );
        if !args.allow_longer {
            bail!("{what}; pass --allow-longer to generate past it");
        }
        eprintln!("warning: {what}; generating past it (--allow-longer)");
    }
    // the logits of every step are kept: refuse up front what cannot be held
    let (b, v) = (prompt.shape[0] as u64, ck.config.vocab_size as u64);
    let need = (args.max_new_tokens as u64)
        .saturating_mul(b)
        .saturating_mul(v)
        .saturating_mul(8);
    let (budget, source) = match args.memory_limit {
        Some(m) => (m, "the --memory-limit"),
        None => (
            fulgur_ir::interp::available_memory().unwrap_or(u64::MAX),
            "the memory available",
        ),
    };
    if need > budget {
        bail!(
            "the step logits of {} tokens × {b} sequences × {v} vocabulary entries need {}, more than {source} ({})",
            args.max_new_tokens,
            fulgur_ir::interp::fmt_bytes(need),
            fulgur_ir::interp::fmt_bytes(budget)
        );
    }
    let degrees = match (&args.parallel, &args.plan) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(p)) => Some(degrees_of_plan(p)?),
        (None, None) => None,
    };
    let cost_model = args.target.cost_model();
    let t_load = Instant::now();
    let mut writer = true;
    let (mut prefill, mut decode): (Box<dyn Executable>, Box<dyn Executable>) = match &degrees {
        Some(d) => {
            let (pair, w) = sharded_pair(&ck, d, prompt.shape[0], p, &args)?;
            writer = w;
            pair
        }
        None => unsharded_pair(&ck, &args, cost_model)?,
    };
    tracing::info!(elapsed = ?t_load.elapsed(), target = ?args.target, "prefill and decode loaded");
    generate_with(args, &ck.config, prefill.as_mut(), decode.as_mut(), &prompt, p, writer)
}

/// The prefill and decode step on one device.
fn unsharded_pair(
    ck: &Checkpoint,
    args: &GenerateArgs,
    cost_model: &str,
) -> Result<(Box<dyn Executable>, Box<dyn Executable>)> {
    let prefill = with_dtype(
        optimize(
            forward_graph(
                &ck.config,
                &ForwardOptions {
                    states: true,
                    ..Default::default()
                },
            )?,
            args.opt,
            cost_model,
        )?,
        args.dtype,
    )?;
    let decode = with_dtype(optimize(decode_graph(&ck.config)?, args.opt, cost_model)?, args.dtype)?;
    Ok(match args.target {
        crate::cli::bench::BenchTarget::Reference => {
            let backend = ReferenceBackend {
                precision: Precision::from(args.precision),
                memory_limit: args.memory_limit,
            };
            let weights = std::rc::Rc::new(std::cell::RefCell::new(ck.load_params(&prefill)?));
            (
                Box::new(ReferenceExecutable {
                    backend,
                    graph: prefill,
                    weights: weights.clone(),
                }),
                Box::new(ReferenceExecutable {
                    backend,
                    graph: decode,
                    weights,
                }),
            )
        }
        crate::cli::bench::BenchTarget::Cpu => load_cpu_pair(&prefill, &decode, &HostWeights::Checkpoint(ck))?,
        crate::cli::bench::BenchTarget::Cuda => {
            load_cuda_pair(&prefill, &decode, &HostWeights::Checkpoint(ck), !args.eager)?
        }
    })
}

/// Greedy generation with the prefill and decode executables; writes and prints what `generate` does.
fn generate_with(
    args: GenerateArgs,
    config: &fulgur_models::MiniMaxConfig,
    prefill: &mut dyn Executable,
    decode: &mut dyn Executable,
    prompt: &Tensor,
    p: usize,
    writer: bool,
) -> Result<()> {
    // progress on stderr when it is a terminal: the prefill, then one tick per token
    // a launched rank other than 0 generates alongside and shows and writes nothing
    let bar = if writer {
        indicatif::ProgressBar::new(args.max_new_tokens as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {pos}/{len} tokens [{elapsed_precise}] {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("prefill of {p} tokens, then generating"));
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let t0 = Instant::now();
    // when each token was ready: the first after the prefill, each next after one decode step
    let mut stamps: Vec<f64> = Vec::with_capacity(args.max_new_tokens);
    let out = generate::greedy(prefill, decode, prompt, args.max_new_tokens, |done, _| {
        stamps.push(t0.elapsed().as_secs_f64());
        bar.set_message("generating");
        bar.set_position(done as u64)
    })
    .context("generating")?;
    bar.finish_and_clear();
    if !writer {
        return Ok(());
    }
    let total_s = t0.elapsed().as_secs_f64();
    tracing::info!(elapsed = ?t0.elapsed(), tokens = args.max_new_tokens, "generation done");
    let mut outputs: BTreeMap<String, Tensor> = BTreeMap::new();
    outputs.insert("generated".into(), out.generated);
    outputs.insert("step_logits".into(), out.step_logits);
    let generated = outputs["generated"].to_i64();
    write_safetensors(&args.out, &outputs)?;
    for w in crate::cli::files::config_warnings(&args.checkpoint.join("config.json"), config) {
        eprintln!("warning: {w}");
    }
    if args.print {
        let width = p + args.max_new_tokens;
        let mut text = String::new();
        for (i, row) in generated.chunks(width.max(1)).enumerate() {
            let fmt = |v: &[i64]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ");
            text.push_str(&format!("sequence {i}: {} | {}\n", fmt(&row[..p]), fmt(&row[p..])));
        }
        let prefill_s = stamps.first().copied().unwrap_or(total_s);
        let decode_s = total_s - prefill_s;
        let steps = args.max_new_tokens.saturating_sub(1);
        // the first decode step also prepares the decode program; the median of the others is the steady rate
        let mut each: Vec<f64> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
        let split = match each.len() {
            0 => String::new(),
            1 => format!("; the step {:.1} ms", each[0] * 1e3),
            _ => {
                let first = each.remove(0);
                each.sort_by(|a, b| a.total_cmp(b));
                format!(
                    "; the first {:.1} ms, then a median of {:.1} ms per step",
                    first * 1e3,
                    each[each.len() / 2] * 1e3
                )
            }
        };
        text.push_str(&format!(
            "{}: prefill of {} × {p} tokens {:.1} ms; {steps} decode steps {:.1} ms ({:.1} tokens/s){split}\n",
            prefill.name(),
            prompt.shape[0],
            prefill_s * 1e3,
            decode_s * 1e3,
            if decode_s > 0.0 {
                (steps * prompt.shape[0]) as f64 / decode_s
            } else {
                0.0
            }
        ));
        write_stdout(&text)?;
    }
    Ok(())
}

/// Prefill and decode on the CPU backend: both JIT-compiled, the weights loaded into the prefill and shared
/// (not copied) with the decode.
#[cfg(feature = "llvm")]
pub(crate) fn load_cpu_pair(
    prefill: &fulgur_ir::Graph,
    decode: &fulgur_ir::Graph,
    weights: &HostWeights,
) -> Result<(Box<dyn Executable>, Box<dyn Executable>)> {
    use fulgur_runtime::cpu::{CpuOptions, CpuProgram};
    let mut p = CpuProgram::new(fulgur_codegen::program::lower(prefill)?, CpuOptions::default())
        .context("compiling the prefill for the CPU")?;
    let mut d = CpuProgram::new(fulgur_codegen::program::lower(decode)?, CpuOptions::default())
        .context("compiling the decode step for the CPU")?;
    tracing::info!(
        prefill_s = p.compile_seconds,
        decode_s = d.compile_seconds,
        "JIT-compiled"
    );
    p.load_weights_from(|name, ty| weights.fetch(name, ty))?;
    d.share_weights(&p);
    // a weight the decode takes in another type than the prefill (or the prefill lacks) is loaded for it alone
    for name in d.missing_weights() {
        let ty = d
            .program
            .params
            .iter()
            .find(|io| io.name == name)
            .map(|io| io.ty.clone())
            .ok_or_else(|| anyhow::anyhow!("decode weight `{name}` has no parameter"))?;
        d.set_weight(&name, &weights.fetch(&name, &ty)?)?;
    }
    Ok((Box::new(p), Box::new(d)))
}

#[cfg(not(feature = "llvm"))]
pub(crate) fn load_cpu_pair(
    _: &fulgur_ir::Graph,
    _: &fulgur_ir::Graph,
    _: &HostWeights,
) -> Result<(Box<dyn Executable>, Box<dyn Executable>)> {
    bail!("this build has no CPU backend (built without the `llvm` feature): use --target reference")
}

/// The forward graph on the CUDA backend: lowered, compiled by NVRTC, weights uploaded once, one step.
#[cfg(feature = "cuda")]
fn run_cuda(
    g: &fulgur_ir::Graph,
    weights: &HostWeights,
    tokens: Tensor,
    check_finite: bool,
) -> Result<BTreeMap<String, Tensor>> {
    use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
    let program = fulgur_codegen::program::lower(g)?;
    let opts = CudaOptions {
        check_finite,
        ..Default::default()
    };
    let mut gpu = CudaProgram::new(program, opts).context("compiling for the GPU")?;
    tracing::info!(
        seconds = gpu.compile_seconds,
        cached = gpu.cached_codes,
        "compiled and loaded"
    );
    gpu.load_weights_from(|name, ty| weights.fetch(name, ty))?;
    gpu.run(&[("input_ids".to_string(), tokens)].into())
        .context("running the forward pass on the GPU")
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &fulgur_ir::Graph, _: &HostWeights, _: Tensor, _: bool) -> Result<BTreeMap<String, Tensor>> {
    bail!("this build has no CUDA backend (built without the `cuda` feature): use --target cpu or reference")
}

/// Prefill and decode on the CUDA backend, the decode sharing the prefill's device weights.
#[cfg(feature = "cuda")]
pub(crate) fn load_cuda_pair(
    prefill: &fulgur_ir::Graph,
    decode: &fulgur_ir::Graph,
    weights: &HostWeights,
    graphs: bool,
) -> Result<(Box<dyn Executable>, Box<dyn Executable>)> {
    let (p, d) = load_cuda_programs(prefill, decode, weights, graphs)?;
    Ok((Box::new(p), Box::new(d)))
}

/// The prefill and decode programs on the GPU, the decode sharing the prefill's weights.
#[cfg(feature = "cuda")]
pub(crate) fn load_cuda_programs(
    prefill: &fulgur_ir::Graph,
    decode: &fulgur_ir::Graph,
    weights: &HostWeights,
    graphs: bool,
) -> Result<(fulgur_runtime::cuda::CudaProgram, fulgur_runtime::cuda::CudaProgram)> {
    use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
    let mut p = CudaProgram::new(fulgur_codegen::program::lower(prefill)?, CudaOptions::default())
        .context("compiling the prefill for the GPU")?;
    let mut d = CudaProgram::new(
        fulgur_codegen::program::lower(decode)?,
        CudaOptions {
            graphs,
            ..Default::default()
        },
    )
    .context("compiling the decode step for the GPU")?;
    tracing::info!(
        prefill_s = p.compile_seconds,
        decode_s = d.compile_seconds,
        "compiled and loaded"
    );
    p.load_weights_from(|name, ty| weights.fetch(name, ty))?;
    d.share_weights(&p);
    for name in d.missing_weights() {
        let ty = d
            .program
            .params
            .iter()
            .find(|io| io.name == name)
            .map(|io| io.ty.clone())
            .ok_or_else(|| anyhow::anyhow!("decode weight `{name}` has no parameter"))?;
        d.set_weight(&name, &weights.fetch(&name, &ty)?)?;
    }
    Ok((p, d))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn load_cuda_pair(
    _: &fulgur_ir::Graph,
    _: &fulgur_ir::Graph,
    _: &HostWeights,
    _: bool,
) -> Result<(Box<dyn Executable>, Box<dyn Executable>)> {
    bail!("this build has no CUDA backend (built without the `cuda` feature): use --target cpu or reference")
}
