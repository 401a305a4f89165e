//! `fulgur compile` and `fulgur run`: compiled artifacts (`fulgur_codegen::artifact`).
//!
//! ```text
//! fulgur compile CKPT_DIR|CONFIG.json|FILE.fir [--target cpu] -o DIR [--opt none|full] [--graph forward|prefill|decode|train] [--loss] [--hidden-states]
//! fulgur run DIR [--weights CKPT_DIR|W.safetensors] --inputs IN.safetensors --out OUT.safetensors [--print]
//! ```
//! `compile` optimizes, lowers and (for the CPU) emits the LLVM IR of every kernel code, and writes the
//! artifact atomically. `run` refuses an artifact of another version or one modified after it was written,
//! JIT-compiles the kernel program for this CPU, loads the weights once and runs one step.

use crate::cli::files::{check_output, write_stdout, InputFile};
use crate::cli::model::HostWeights;
use anyhow::{anyhow, bail, Context, Result};
use fulgur_codegen::artifact;
use fulgur_ir::tensor::{read_safetensors, write_safetensors};
use fulgur_ir::{Graph, Tensor};
use fulgur_models::{decode_graph, forward_graph, ForwardOptions, MiniMaxConfig};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The backends an artifact can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Cpu,
    /// CUDA C++ per kernel code, compiled by NVRTC (at compile time where NVRTC is present, else at load).
    Cuda,
}

/// Which graph of a model to compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelGraph {
    /// `input_ids` [B, T] to `logits` [B, T, V] (with --loss, --hidden-states).
    Forward,
    /// The forward that also outputs every layer's state (lightning states, KV caches) for decoding.
    Prefill,
    /// One decode step from the carried states.
    Decode,
    /// One training step (`fulgur_passes::optim::train_step`: the loss, its gradients, clipping at 1.0 and
    /// AdamW with `fulgur train`'s defaults); weights and moments are inputs and outputs (`docs/training.md`).
    Train,
}

#[derive(Debug, clap::Args)]
pub struct CompileArgs {
    /// A checkpoint directory (its config.json), a MiniMax config JSON, or a graph (`.fir`, or `.json` as
    /// written by `fulgur show --format json`).
    pub input: PathBuf,
    /// The backend to compile for.
    #[arg(long, value_enum, default_value_t = Target::Cpu)]
    pub target: Target,
    /// The artifact directory to write (new, empty, or an artifact to replace).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Optimization level: `none` lowers the definitional graph, `full` the optimizer's output.
    #[arg(long, value_enum, default_value_t = crate::cli::model::OptLevel::Full)]
    pub opt: crate::cli::model::OptLevel,
    /// For a model: which graph.
    #[arg(long, value_enum, default_value_t = ModelGraph::Forward)]
    pub graph: ModelGraph,
    /// For a model's forward: also output `loss` (labels = the tokens).
    #[arg(long)]
    pub loss: bool,
    /// For a model's forward: also output `hidden_states.{i}`.
    #[arg(long)]
    pub hidden_states: bool,
    /// Cost model the optimizer plans for (default: `CPU` for cpu, `H200` for cuda).
    #[arg(long, value_name = "NAME")]
    pub cost_model: Option<String>,
    /// JSON file of measured ceilings overriding the cost model's: `matmul_flops_bf16`, `matmul_flops_tf32`,
    /// `vector_flops` (FLOP/s), `mem_bw`, `link_bw` (bytes/s), `launch_s` (seconds); as `inspect --ceilings`.
    #[arg(long, value_name = "FILE")]
    pub ceilings: Option<PathBuf>,
    /// For a model: the dtype weights and activations are stored in.
    #[arg(long, value_enum, default_value_t = crate::cli::model::Dtype::F32)]
    pub dtype: crate::cli::model::Dtype,
    /// For cuda: the architecture NVRTC compiles for.
    #[arg(long, default_value = "sm_90")]
    pub arch: String,
    /// Compile one program per rank, sharded with these degrees (e.g. `tp=2,ep=2`; dp, ep, sp, tp, etp;
    /// `docs/parallelism.md`): a parallel artifact, which `fulgur run` runs on simulated ranks or, started by
    /// a launcher, as one rank per process. Needs --batch and --seq.
    #[arg(long, value_name = "DEGREES")]
    pub parallel: Option<String>,
    /// Compile one program per rank with the degrees a plan search chose (`fulgur plan ... --json`'s `best`).
    #[arg(long, value_name = "PLAN.json", conflicts_with = "parallel")]
    pub plan: Option<PathBuf>,
    /// With --parallel: the sequences per step the programs are specialised to.
    #[arg(long)]
    pub batch: Option<usize>,
    /// With --parallel: the tokens per sequence the programs are specialised to.
    #[arg(long)]
    pub seq: Option<usize>,
}

/// Whether `p` names a graph file rather than a model config or checkpoint.
fn is_graph_file(p: &Path) -> bool {
    if p.is_dir() {
        return false;
    }
    match p.extension().and_then(|e| e.to_str()) {
        Some("json") => std::fs::read_to_string(p)
            .map(|s| s.contains("\"nodes\"") && s.contains("\"outputs\""))
            .unwrap_or(false),
        _ => true,
    }
}

/// The graph `compile` lowers, with the warnings its config calls for.
/// The cost model `compile` plans for: `--cost-model`, else the target's.
/// The `--ceilings` file's text and path (read once; `--opt none` runs no optimizer to read them: a warning).
fn read_ceilings(args: &CompileArgs) -> Result<Option<(String, String)>> {
    let Some(c) = &args.ceilings else { return Ok(None) };
    if args.opt == crate::cli::model::OptLevel::None {
        eprintln!("warning: --ceilings {} has no effect with --opt none", c.display());
    }
    Ok(Some((
        std::fs::read_to_string(c).with_context(|| format!("cannot read the ceilings file {}", c.display()))?,
        c.display().to_string(),
    )))
}

/// `args`' graph optimized at `--opt` for its cost model and `ceilings` ([`read_ceilings`]).
fn optimize_for(
    args: &CompileArgs,
    ceilings: &Option<(String, String)>,
    g: fulgur_ir::Graph,
) -> Result<fulgur_ir::Graph> {
    crate::cli::model::optimize_with(g, args.opt, &cost_model_of(args), ceilings.as_ref())
}

fn cost_model_of(args: &CompileArgs) -> String {
    args.cost_model.clone().unwrap_or_else(|| {
        match args.target {
            Target::Cpu => "CPU",
            Target::Cuda => "H200",
        }
        .to_string()
    })
}

/// A model input's config (a checkpoint directory's `config.json`, or a config file) and its warnings.
fn model_config(input: &Path) -> Result<(MiniMaxConfig, Vec<String>)> {
    let cfg_path = if input.is_dir() {
        input.join("config.json")
    } else {
        input.to_path_buf()
    };
    let cfg = MiniMaxConfig::from_file(&cfg_path)?;
    let warnings = crate::cli::files::config_warnings(&cfg_path, &cfg);
    Ok((cfg, warnings))
}

fn compile_input(args: &CompileArgs) -> Result<(Graph, Vec<String>)> {
    if is_graph_file(&args.input) {
        return Ok((crate::cli::files::load_graph(&args.input)?, Vec::new()));
    }
    let (cfg, warnings) = model_config(&args.input)?;
    if (args.loss || args.hidden_states) && args.graph != ModelGraph::Forward {
        bail!("--loss and --hidden-states apply to --graph forward only");
    }
    let g = match args.graph {
        ModelGraph::Forward => forward_graph(
            &cfg,
            &ForwardOptions {
                loss: args.loss,
                hidden_states: args.hidden_states,
                ..Default::default()
            },
        )?,
        ModelGraph::Prefill => forward_graph(
            &cfg,
            &ForwardOptions {
                states: true,
                ..Default::default()
            },
        )?,
        ModelGraph::Decode => decode_graph(&cfg)?,
        ModelGraph::Train => {
            let g = forward_graph(
                &cfg,
                &ForwardOptions {
                    loss: true,
                    ..Default::default()
                },
            )?;
            // what `fulgur train` runs: the forward optimized first in f32 (see `model::with_backward`), stored
            // as --dtype with f32 master weights (`train::compute_graph`), then the step; `compile` optimizes the
            // whole step after and leaves its dtypes as they are
            let g = match args.opt {
                crate::cli::model::OptLevel::None => g,
                crate::cli::model::OptLevel::Full => optimize_for(args, &read_ceilings(args)?, g)?,
            };
            let g = crate::cli::train::compute_graph(&g, args.dtype)?;
            fulgur_passes::optim::train_step(&g, "loss", &fulgur_passes::optim::AdamW::default())?
        }
    };
    Ok((g, warnings))
}

pub fn compile(args: CompileArgs) -> Result<()> {
    artifact::check_destination(&args.out)?;
    if let Some(p) = &args.plan {
        crate::cli::files::check_not_input(&args.out, &[InputFile::new("the --plan file", p)])?;
    }
    if let Some(c) = &args.ceilings {
        crate::cli::files::check_not_input(&args.out, &[InputFile::new("the ceilings file", c)])?;
    }
    let degrees = match (&args.parallel, &args.plan) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(p)) => Some(crate::cli::model::degrees_of_plan(p)?),
        (None, None) => None,
    };
    if let Some(degrees) = degrees {
        return compile_parallel(&args, &degrees);
    }
    if args.batch.is_some() || args.seq.is_some() {
        bail!("--batch and --seq apply with --parallel or --plan only (a single program takes any batch and length)");
    }
    let (g, warnings) = compile_input(&args)?;
    let t0 = Instant::now();
    let g = optimize_for(&args, &read_ceilings(&args)?, g)?;
    // a training step is already in --dtype, its master weights and moments f32 (`compile_input`)
    let g = if args.graph == ModelGraph::Train && !is_graph_file(&args.input) {
        g
    } else {
        crate::cli::model::with_dtype(g, args.dtype)?
    };
    let optimize_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (program, codegen, files) = emit(&g, &args, "")?;
    let manifest = artifact::manifest(&program, target_name(args.target), &codegen, &files);
    artifact::write(&args.out, &manifest, &files)?;
    let lower_s = t1.elapsed().as_secs_f64();
    for w in warnings {
        eprintln!("warning: {w}");
    }
    write_stdout(&format!(
        "wrote {}: {}\noptimize {:.2} s, lower and emit {:.2} s\n",
        args.out.display(),
        artifact::describe(&manifest),
        optimize_s,
        lower_s
    ))?;
    Ok(())
}

fn target_name(t: Target) -> &'static str {
    match t {
        Target::Cpu => "cpu",
        Target::Cuda => "cuda",
    }
}

/// Lowers `g` to a kernel program and emits its files for `--target`, each path under `prefix` (`""`, or
/// `rankR/` in a parallel artifact): the program, what made its code, and the files.
fn emit(
    g: &Graph,
    args: &CompileArgs,
    prefix: &str,
) -> Result<(fulgur_codegen::program::KernelProgram, String, Files)> {
    let program = fulgur_codegen::program::lower(g)?;
    let mut loops = fulgur_codegen::kernels::build_program_for(
        &program,
        match args.target {
            Target::Cpu => fulgur_codegen::kernels::Target::Cpu,
            Target::Cuda => fulgur_codegen::kernels::Target::Cuda,
        },
    )?;
    let loop_texts: Vec<String> = loops.iter().map(|lk| lk.text()).collect();
    let ((codegen, code), binaries) = match args.target {
        Target::Cpu => (target_code(&loops)?, Vec::new()),
        Target::Cuda => cuda_code(&program, &mut loops, &args.arch)?,
    };
    let mut files = artifact::files(
        &program,
        &fulgur_ir::text::print(g),
        &loop_texts,
        code.as_ref().map(|(ext, v)| (*ext, v.as_slice())),
    )?;
    files.extend(binaries);
    let files = files.into_iter().map(|(p, b)| (format!("{prefix}{p}"), b)).collect();
    Ok((program, codegen, files))
}

/// `compile --parallel D` (or `--plan`): MiniMax-01's forward sharded at degrees `D` for `--batch` sequences of
/// `--seq` tokens (`fulgur::parallel::minimax_plan`, the pass of `docs/parallelism.md` §4.1), one program per
/// rank lowered from the sharded graph (`passes::shard::lower_rank`), written as one parallel artifact.
fn compile_parallel(args: &CompileArgs, degrees: &str) -> Result<()> {
    if is_graph_file(&args.input) {
        bail!(
            "--parallel compiles a model (a checkpoint directory or a config), not the graph file {}: the plan \
             places a model's parameters by name",
            args.input.display()
        );
    }
    if args.graph != ModelGraph::Forward {
        bail!(
            "--parallel compiles --graph forward only (per-rank prefill, decode and training steps are not built yet)"
        );
    }
    if args.hidden_states {
        bail!("--parallel does not take --hidden-states");
    }
    let (Some(batch), Some(seq)) = (args.batch, args.seq) else {
        bail!("--parallel needs --batch and --seq: each rank's program is specialised to the batch and sequence it splits");
    };
    if batch == 0 || seq == 0 {
        bail!("--batch and --seq must be at least 1");
    }
    let par = fulgur::parallel::Parallel::parse(degrees).map_err(|e| anyhow!("--parallel: {e}"))?;
    let (cfg, warnings) = model_config(&args.input)?;
    if par.pp > 1 {
        return compile_pipeline(args, &par, &cfg, warnings, (batch, seq));
    }
    let plan =
        fulgur::parallel::minimax_plan(&cfg, &par, batch, seq).map_err(|e| anyhow!("--parallel {degrees}: {e}"))?;
    let t0 = Instant::now();
    let g = forward_graph(
        &cfg,
        &par.forward_options(&ForwardOptions {
            loss: args.loss,
            ..Default::default()
        }),
    )?;
    let dtype = args.dtype;
    let (_, sg, report) = fulgur::parallel::shard_forward(&g, &plan, |g| {
        crate::cli::model::with_dtype(g, dtype).map_err(|e| format!("{e:#}"))
    })
    .map_err(|e| anyhow!("sharding the forward: {e}"))?;
    let shard_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let ranks = par.ranks();
    let mut files = Vec::new();
    let mut first: Option<(fulgur_codegen::program::KernelProgram, String)> = None;
    let mut first_collectives: Option<Vec<String>> = None;
    let ceilings = read_ceilings(args)?;
    let progress = emit_progress(ranks, "ranks");
    for r in 0..ranks {
        let rg = fulgur_passes::shard::lower_rank(&sg, &plan.mesh, r)?;
        let rg = optimize_for(args, &ceilings, rg).with_context(|| format!("optimizing rank {r}'s program"))?;
        let seq = fulgur::parallel::collective_sequence(&rg);
        match &first_collectives {
            None => first_collectives = Some(seq),
            Some(s0) => fulgur::parallel::same_collectives(r, s0, &seq).map_err(|e| anyhow!(e))?,
        }
        let (program, codegen, rank_files) = emit(&rg, args, &format!("{}/", artifact::ParallelManifest::rank_dir(r)))?;
        files.extend(rank_files);
        match &first {
            None => first = Some((program, codegen)),
            Some((p0, _)) => {
                let io = |p: &fulgur_codegen::program::KernelProgram| {
                    (p.inputs.clone(), p.params.clone(), p.outputs.clone())
                };
                if io(p0) != io(&program) {
                    bail!("rank {r}'s program has another interface than rank 0's (a bug in the per-rank lowering)");
                }
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    let (program, codegen) = first.expect("at least one rank");
    let mut manifest = artifact::manifest(&program, target_name(args.target), &codegen, &files);
    manifest.parallel = Some(artifact::ParallelManifest {
        degrees: par.to_string(),
        mesh: plan.mesh.names().into_iter().zip(plan.mesh.sizes()).collect(),
        ranks,
        collectives: report.collectives.clone(),
        pp: 1,
        micro_batches: 1,
    });
    artifact::write(&args.out, &manifest, &files)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let collectives: usize = report.collectives.values().sum();
    write_stdout(&format!(
        "wrote {}: {} programs ({par}), {collectives} collectives in the sharded graph ({}); rank 0: {}\nshard \
         {:.2} s, lower and emit {:.2} s\n",
        args.out.display(),
        ranks,
        by_kind(&report.collectives),
        artifact::describe(&manifest),
        shard_s,
        t1.elapsed().as_secs_f64()
    ))?;
    Ok(())
}

/// Progress on stderr (shown on a terminal): one tick per program lowered and emitted, of `n` `what`.
fn emit_progress(n: usize, what: &str) -> indicatif::ProgressBar {
    let progress = indicatif::ProgressBar::new(n as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} lowering and emitting {{pos}}/{{len}} {what} [{{elapsed_precise}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress
}

/// Collectives counted by kind, for people: `2 all_gather, 4 reduce_scatter`.
fn by_kind(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `compile --parallel ...,pp=N`: MiniMax-01's forward cut into `pp` stages (`fulgur::pipeline::build`), each
/// sharded at the other degrees, one program per rank of every stage (program `rankG` is rank `G mod R` of stage
/// `G / R`, `R` the ranks of a stage), each specialised to one micro-batch: the most micro-batches up to `pp`
/// that divide the batch into pieces the data-parallel degrees split, as `eval-model` cuts it. The manifest's
/// interface is the whole pipeline's: the first stage's tokens and the last stage's outputs at the whole batch
/// (the micro-batches' outputs put back together, the loss their mean), and every stage's weights.
fn compile_pipeline(
    args: &CompileArgs,
    par: &fulgur::parallel::Parallel,
    cfg: &MiniMaxConfig,
    warnings: Vec<String>,
    (batch, seq): (usize, usize),
) -> Result<()> {
    let m = fulgur::pipeline::micro_batch_count(par, batch).map_err(|e| anyhow!("--parallel {par}: {e}"))?;
    let t0 = Instant::now();
    let dtype = args.dtype;
    let prepare = move |g: Graph| crate::cli::model::with_dtype(g, dtype).map_err(|e| format!("{e:#}"));
    let opts = ForwardOptions {
        loss: args.loss,
        ..Default::default()
    };
    let stages = fulgur::pipeline::build(cfg, par, batch / m, seq, &opts, false, false, &prepare)
        .map_err(|e| anyhow!("--parallel {par}: {e}"))?;
    let shard_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let r = par.ranks();
    let total = par.pp * r;
    let progress = emit_progress(total, "stage ranks");
    let mut files = Vec::new();
    // each stage's rank 0 program and what made it
    let mut heads: Vec<(fulgur_codegen::program::KernelProgram, String)> = Vec::new();
    let mut collectives: BTreeMap<String, usize> = BTreeMap::new();
    let ceilings = read_ceilings(args)?;
    for (s, st) in stages.iter().enumerate() {
        let mut first_collectives: Option<Vec<String>> = None;
        for (i, g) in st.forward.iter().enumerate() {
            let at = s * r + i;
            if i == 0 {
                for (_, n) in g.nodes() {
                    if let fulgur_ir::Op::Composite(fulgur_ir::Composite::OnRank { op, .. }) = &n.op {
                        *collectives.entry(op.name().to_string()).or_default() += 1;
                    }
                }
            }
            let g = optimize_for(args, &ceilings, g.clone())
                .with_context(|| format!("optimizing stage {s}, rank {i}'s program"))?;
            let seq = fulgur::parallel::collective_sequence(&g);
            match &first_collectives {
                None => first_collectives = Some(seq),
                Some(s0) => fulgur::parallel::same_collectives(i, s0, &seq).map_err(|e| anyhow!("stage {s}: {e}"))?,
            }
            let (program, codegen, rank_files) =
                emit(&g, args, &format!("{}/", artifact::ParallelManifest::rank_dir(at)))?;
            files.extend(rank_files);
            if i == 0 {
                heads.push((program, codegen));
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let (first, codegen) = &heads[0];
    let last = &heads[heads.len() - 1].0;
    let mut manifest = artifact::manifest(first, target_name(args.target), codegen, &files);
    // the whole batch: a constant batch dim (dim 0) times the micro-batches; the loss (their mean) stays
    let whole = |d: &artifact::Decl| {
        let mut d = d.clone();
        if d.name != "loss" {
            let mut dims = d.ty.dims().to_vec();
            if let Some(b) = dims.first().and_then(|b| b.as_const()) {
                dims[0] = fulgur_ir::Dim::from(b as usize * m);
            }
            d.ty = fulgur_ir::TensorType::new(d.ty.dtype, dims);
        }
        d
    };
    manifest.inputs = manifest.inputs.iter().map(whole).collect();
    manifest.outputs = artifact::manifest(last, target_name(args.target), codegen, &[])
        .outputs
        .iter()
        .map(whole)
        .collect();
    let mut weights: Vec<artifact::Decl> = Vec::new();
    for (p, _) in &heads {
        for w in artifact::manifest(p, target_name(args.target), codegen, &[]).weights {
            if !weights.iter().any(|x| x.name == w.name) {
                weights.push(w);
            }
        }
    }
    manifest.weights = weights;
    let mesh = par.stage().mesh();
    manifest.parallel = Some(artifact::ParallelManifest {
        degrees: par.to_string(),
        mesh: mesh.names().into_iter().zip(mesh.sizes()).collect(),
        ranks: total,
        collectives: collectives.clone(),
        pp: par.pp,
        micro_batches: m,
    });
    artifact::write(&args.out, &manifest, &files)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let n: usize = collectives.values().sum();
    write_stdout(&format!(
        "wrote {}: {} pipeline stages of {r} programs ({par}), {m} micro-batches of {} sequences; {n} collectives \
         in the stages' rank 0 programs ({}); stage 0, rank 0: {}\nshard {:.2} s, lower and emit {:.2} s\n",
        args.out.display(),
        par.pp,
        batch / m,
        by_kind(&collectives),
        artifact::describe(&manifest),
        shard_s,
        t1.elapsed().as_secs_f64()
    ))?;
    Ok(())
}

/// What produced a target's code, and the code of every kernel code with its file extension.
type TargetCode = (String, Option<(&'static str, Vec<String>)>);

/// The LLVM IR of every kernel code, and what made it.
#[cfg(feature = "llvm")]
fn target_code(loops: &[fulgur_codegen::loops::LoopKernel]) -> Result<TargetCode> {
    let (cpu, _) = fulgur_codegen::llvm::host_cpu();
    let texts = fulgur_codegen::llvm::emit_text(loops)?;
    Ok((
        format!(
            "LLVM {} IR for {cpu} (the JIT re-targets the host that runs it)",
            fulgur_codegen::llvm::llvm_version()
        ),
        Some(("ll", texts)),
    ))
}

#[cfg(not(feature = "llvm"))]
fn target_code(_: &[fulgur_codegen::loops::LoopKernel]) -> Result<TargetCode> {
    Ok((
        "no LLVM IR (built without the `llvm` feature; the CPU backend JIT-compiles at load)".into(),
        None,
    ))
}

/// Named files of an artifact (path, bytes).
type Files = Vec<(String, Vec<u8>)>;

/// The CUDA C++ of every kernel code and, where NVRTC can be opened, each compiled for `arch`.
fn cuda_code(
    program: &fulgur_codegen::program::KernelProgram,
    loops: &mut [fulgur_codegen::loops::LoopKernel],
    arch: &str,
) -> Result<(TargetCode, Files)> {
    let cuda = fulgur_codegen::cuda::emit_program(program, loops)?;
    let (what, bins) = nvrtc_binaries(&cuda, arch)?;
    Ok(((what, Some(("cu", cuda.into_iter().map(|c| c.source).collect()))), bins))
}

#[cfg(feature = "cuda")]
fn nvrtc_binaries(cuda: &[fulgur_codegen::cuda::CudaKernel], arch: &str) -> Result<(String, Files)> {
    use fulgur_codegen::nvrtc;
    let version = match nvrtc::available() {
        Ok(v) => v,
        Err(why) => {
            return Ok((
                format!("CUDA C++ (not compiled: {why}; the runtime compiles it with NVRTC at load)"),
                Vec::new(),
            ))
        }
    };
    let cache = nvrtc::cache_dir();
    let mut bins = Vec::new();
    for c in cuda {
        let out = nvrtc::compile(&c.file, &c.source, arch, cache.as_deref())?;
        bins.push((format!("kernels/code{}.{arch}.cubin", c.code), out.cubin));
    }
    Ok((
        format!("CUDA C++ compiled for {arch} by NVRTC {}.{}", version.0, version.1),
        bins,
    ))
}

#[cfg(not(feature = "cuda"))]
fn nvrtc_binaries(_: &[fulgur_codegen::cuda::CudaKernel], _: &str) -> Result<(String, Files)> {
    Ok((
        "CUDA C++ (not compiled: built without the `cuda` feature; the runtime compiles it with NVRTC at load)".into(),
        Vec::new(),
    ))
}

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// The artifact directory `fulgur compile` wrote.
    pub artifact: PathBuf,
    /// The weights: a checkpoint directory (config.json plus safetensors) or a safetensors file with one
    /// tensor per weight by name (default: the weights are in --inputs).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Safetensors file with one tensor per data input by name (and the weights when --weights is not given).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output safetensors: one tensor per output by name.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Print the outputs' summaries and the time of the step.
    #[arg(long)]
    pub print: bool,
    /// Threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The most memory the program may plan (weights, prepared values, arena and kernel scratch), e.g.
    /// `4GiB`: a larger plan is refused before anything runs, with its planned peak.
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::files::parse_bytes)]
    pub max_memory: Option<u64>,
    /// After every kernel, check its outputs and stop at the first kernel that produced a NaN, naming it and
    /// its IR node (an infinity alone is not an error: causal masks hold −inf).
    #[arg(long)]
    pub check_finite: bool,
    /// Convert weights stored in another dtype than the artifact's (an f32 checkpoint into a bf16 artifact)
    /// as they load; without it such a weight is refused before anything is loaded.
    #[arg(long)]
    pub convert_weights: bool,
}

/// The weights of the artifact's program from a safetensors file (`--weights FILE`, or the inputs file),
/// checked against the manifest's names and shapes.
fn weights_from_map(
    m: &BTreeMap<String, Tensor>,
    file: &Path,
    manifest: &artifact::Manifest,
    hint: bool,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for d in &manifest.weights {
        let t = m.get(&d.name).ok_or_else(|| {
            anyhow!(
                "weight `{}` ({}) is not in {}{}",
                d.name,
                d.ty,
                file.display(),
                if hint { " (give the weights with --weights)" } else { "" }
            )
        })?;
        if d.ty.shape.as_consts().as_deref() != Some(t.shape.as_slice()) {
            bail!(
                "weight `{}` in {}: the artifact needs {}, the file has shape {:?}",
                d.name,
                file.display(),
                d.ty,
                t.shape
            );
        }
        out.insert(d.name.clone(), t.clone());
    }
    Ok(out)
}

pub fn run(args: RunArgs) -> Result<()> {
    let mut files = vec![InputFile::new("the inputs file", &args.inputs)];
    if let Some(w) = &args.weights {
        if w.is_dir() {
            files.extend(crate::cli::files::checkpoint_files(w));
        } else {
            files.push(InputFile::new("the weights file", w));
        }
    }
    crate::cli::files::check_not_input(&args.out, &files)?;
    if args.out.starts_with(&args.artifact) {
        bail!(
            "refusing to write {}: it is inside the artifact {}; choose another output path",
            args.out.display(),
            args.artifact.display()
        );
    }
    check_output(&args.out, &files)?;
    let manifest = artifact::read_manifest(&args.artifact)?;
    let (manifest, program) = match manifest.parallel {
        Some(_) => (manifest, None),
        None => {
            let (m, p) = artifact::load(&args.artifact, &["cpu", "cuda"])?;
            (m, Some(p))
        }
    };
    let inputs = read_safetensors(&args.inputs)?;
    // a checkpoint is read one tensor at a time as the program loads it; a file is checked whole first
    let ck = match &args.weights {
        Some(w) if w.is_dir() => Some(fulgur_models::checkpoint::Checkpoint::open(w)?),
        _ => None,
    };
    let weights = match (&ck, &args.weights) {
        (Some(ck), _) => HostWeights::Checkpoint(ck),
        (None, Some(w)) => HostWeights::Map(weights_from_map(&read_safetensors(w)?, w, &manifest, false)?),
        (None, None) => HostWeights::Map(weights_from_map(&inputs, &args.inputs, &manifest, true)?),
    };
    // every weight in the artifact's dtype, checked before anything loads
    if !args.convert_weights {
        for d in &manifest.weights {
            let (stored, file) = match (&ck, &weights) {
                (Some(ck), _) => (ck.stored_dtype(&d.name), args.weights.clone().unwrap_or_default()),
                (None, HostWeights::Map(m)) => (
                    m.get(&d.name).map(|t| t.dtype),
                    args.weights.clone().unwrap_or_else(|| args.inputs.clone()),
                ),
                _ => (None, PathBuf::new()),
            };
            if let Some(s) = stored {
                if s != d.ty.dtype {
                    bail!(
                        "weight `{}` in {} is stored as {s} but artifact {} takes {}: compile the artifact with                          --dtype {s}, or pass --convert-weights to convert the weights as they load",
                        d.name,
                        file.display(),
                        args.artifact.display(),
                        d.ty.dtype
                    );
                }
            }
        }
    }
    let mut data: HashMap<String, Tensor> = HashMap::new();
    for d in &manifest.inputs {
        let t = inputs
            .get(&d.name)
            .ok_or_else(|| anyhow!("input `{}` ({}) is not in {}", d.name, d.ty, args.inputs.display()))?;
        data.insert(d.name.clone(), t.clone());
    }
    for (name, t) in &data {
        if t.has_non_finite() {
            eprintln!("warning: input `{name}` contains NaN or infinite values");
        }
    }
    let (outputs, jit_s, step_s, memory) = match (program, &manifest.parallel) {
        (Some(program), _) => match manifest.target.as_str() {
            "cuda" => run_cuda(program, &weights, &data, &args)?,
            _ => run_cpu(program, &weights, &data, &args)?,
        },
        (None, Some(pm)) => match run_parallel(pm, &manifest, &weights, &data, &args)? {
            Some(r) => r,
            // a launched rank other than 0: rank 0 writes the outputs
            None => return Ok(()),
        },
        (None, None) => unreachable!("an artifact of one program is loaded above"),
    };
    for (name, t) in &outputs {
        if t.has_non_finite() {
            eprintln!("warning: output `{name}` contains NaN or infinite values");
        }
    }
    write_safetensors(&args.out, &outputs)?;
    if args.print {
        let mut text: String = outputs.iter().map(|(n, t)| crate::cli::eval::describe(n, t)).collect();
        let load = if manifest.target == "cuda" {
            "load (NVRTC)"
        } else {
            "JIT"
        };
        let mem = match memory {
            Some((planned, held)) => format!(
                "; memory planned {}, held {}",
                fulgur_ir::interp::fmt_bytes(planned),
                fulgur_ir::interp::fmt_bytes(held)
            ),
            None => String::new(),
        };
        text.push_str(&format!(
            "{}: {load} {:.2} s, step {:.1} ms{mem}\n",
            manifest.target,
            jit_s,
            step_s * 1e3
        ));
        write_stdout(&text)?;
    }
    Ok(())
}

/// The outputs, the load (JIT or NVRTC) seconds, the step's seconds, and the memory (planned peak, held).
type RunResult = (BTreeMap<String, Tensor>, f64, f64, Option<(u64, u64)>);

/// A parallel artifact's ranks (`docs/parallelism.md` §5.4). Started by a launcher (torchrun's, Slurm's or
/// Open MPI's variables; `fulgur launch`), this process runs its rank's program, its collectives over the TCP
/// rendezvous (NCCL with `FULGUR_TRANSPORT=nccl` on cuda), and returns rank 0's outputs on rank 0 and `None`
/// on the others; otherwise every rank runs on its own thread, collectives through the simulated transport,
/// and rank 0's outputs are returned (every rank holds the same).
fn run_parallel(
    pm: &artifact::ParallelManifest,
    manifest: &artifact::Manifest,
    weights: &HostWeights,
    data: &HashMap<String, Tensor>,
    args: &RunArgs,
) -> Result<Option<RunResult>> {
    use fulgur_runtime::ranks::RankEnv;
    if pm.pp > 1 {
        return run_pipeline(pm, manifest, weights, data, args);
    }
    let timeout = crate::cli::ranks::rank_timeout();
    let cuda = manifest.target == "cuda";
    let targets = ["cpu", "cuda"];
    if let Some(env) = RankEnv::from_env().map_err(|e| anyhow!(e))? {
        if env.world != pm.ranks {
            bail!(
                "launched as {} ranks ({}'s variables) but artifact {} has {} ({})",
                env.world,
                env.source,
                args.artifact.display(),
                pm.ranks,
                pm.degrees
            );
        }
        let (_, program) = artifact::load_rank(&args.artifact, &targets, env.rank)?;
        let sizes: Vec<usize> = pm.mesh.iter().map(|a| a.1).collect();
        let out = rank_program(
            program,
            cuda,
            weights,
            data,
            args,
            RankTransport::Launched(&env, &sizes),
        )
        .map_err(|e| anyhow!("rank {}: {e}", env.rank))?;
        if env.rank == 0 {
            eprintln!("ran as {} processes ({})", env.world, pm.degrees);
            return Ok(Some(out));
        }
        return Ok(None);
    }
    let programs = (0..pm.ranks)
        .map(|r| artifact::load_rank(&args.artifact, &targets, r).map(|(_, p)| p))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let rank_args = RunArgs {
        threads: args.threads.or(Some((threads / pm.ranks).max(1))),
        ..args.clone()
    };
    let first = std::sync::Mutex::new(None);
    let t = Instant::now();
    let mut outs = fulgur_runtime::ranks::on_threads(pm.ranks, fulgur_ir::interp::Precision::F32, timeout, |r, t| {
        let (out, jit_s, step_s, memory) = rank_program(
            programs[r].clone(),
            cuda,
            weights,
            data,
            &rank_args,
            RankTransport::Simulated(t),
        )
        .map_err(|e| format!("{e:#}"))?;
        if r == 0 {
            *first.lock().unwrap_or_else(|e| e.into_inner()) = Some((jit_s, step_s, memory));
        }
        Ok(out)
    })
    .map_err(|e| anyhow!("running on simulated ranks: {e}"))?;
    eprintln!(
        "ran on {} simulated ranks ({}) in {:.2} s",
        pm.ranks,
        pm.degrees,
        t.elapsed().as_secs_f64()
    );
    let (jit_s, step_s, memory) = first
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or((0.0, 0.0, None));
    Ok(Some((outs.swap_remove(0), jit_s, step_s, memory)))
}

/// A pipeline artifact's stages (`compile --parallel ...,pp=N`, `docs/parallelism.md` §5.4): the batch cut into
/// the artifact's micro-batches and run through the stages by `fulgur::pipeline`, every rank of every stage on
/// its own thread with the simulated transport, or started by a launcher, this process's rank alone (each
/// stage's collectives over its own rendezvous, the cuts point to point); the micro-batches' outputs put back
/// together (the loss their mean). Launched, the last stage's rank 0 holds the outputs and returns them (`None`
/// elsewhere).
fn run_pipeline(
    pm: &artifact::ParallelManifest,
    manifest: &artifact::Manifest,
    weights: &HostWeights,
    data: &HashMap<String, Tensor>,
    args: &RunArgs,
) -> Result<Option<RunResult>> {
    use fulgur_runtime::ranks::RankEnv;
    let par = fulgur::parallel::Parallel::parse(&pm.degrees).map_err(|e| {
        anyhow!(
            "artifact {}: its degrees `{}`: {e}",
            args.artifact.display(),
            pm.degrees
        )
    })?;
    let (pp, r) = (pm.pp, pm.ranks / pm.pp.max(1));
    if par.pp != pp || pp * r != pm.ranks || r != par.ranks() {
        bail!(
            "artifact {}: {} programs in {pp} pipeline stages do not match its degrees {}",
            args.artifact.display(),
            pm.ranks,
            pm.degrees
        );
    }
    let ids = data
        .get("input_ids")
        .ok_or_else(|| anyhow!("a pipeline artifact takes `input_ids` ({})", args.inputs.display()))?;
    // the whole batch the programs were specialised to
    if let Some(d) = manifest.inputs.iter().find(|d| d.name == "input_ids") {
        let fits = ids.shape.len() == d.ty.dims().len()
            && ids
                .shape
                .iter()
                .zip(d.ty.dims())
                .all(|(&n, want)| want.as_const().is_none_or(|w| w as usize == n));
        if !fits {
            bail!(
                "input `input_ids` in {} has shape {:?}, but artifact {} takes {}",
                args.inputs.display(),
                ids.shape,
                args.artifact.display(),
                d.ty
            );
        }
    }
    let micro = fulgur::pipeline::micro_batches(ids, pm.micro_batches)
        .map_err(|e| anyhow!("`input_ids` in {}: {e}", args.inputs.display()))?;
    let timeout = crate::cli::ranks::rank_timeout();
    let cuda = manifest.target == "cuda";
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let opts = RankOptions {
        cuda,
        threads: args.threads.unwrap_or((cores / pm.ranks).max(1)),
        max_memory: args.max_memory,
        check_finite: args.check_finite,
    };
    // a program and its weights, read here (a checkpoint is not shared with the threads)
    let load = |g: usize| -> Result<LoadedRank> {
        let (_, program) = artifact::load_rank(&args.artifact, &["cpu", "cuda"], g)?;
        let mut w = HashMap::new();
        for p in &program.params {
            w.insert(p.name.clone(), weights.fetch(&p.name, &p.ty)?);
        }
        Ok((program, w))
    };
    let t = Instant::now();
    let (outputs, build_s) = match crate::cli::ranks::launched_pipeline(&par, fulgur_ir::Precision::F32)? {
        Some((env, job)) => {
            let mine = std::sync::Arc::new(load(env.rank)?);
            let build: fulgur::pipeline::BuildRank =
                std::sync::Arc::new(move |_, _| Ok((artifact_rank(&mine, &opts)?, None)));
            let sizes: Vec<usize> = pm.mesh.iter().map(|a| a.1).collect();
            let connect = |e: &RankEnv| {
                crate::cli::ranks::transport(e, &sizes, cuda, fulgur_ir::Precision::F32).map_err(|e| format!("{e:#}"))
            };
            let mut process =
                fulgur::pipeline::PipelineProcess::with_builder(&env, job, (pp, r), build, &connect, timeout)
                    .map_err(|e| anyhow!("rank {}: {e}", env.rank))?;
            let build_s = t.elapsed().as_secs_f64();
            let run = process
                .run(&micro, &HashMap::new())
                .map_err(|e| anyhow!("rank {}: {e}", env.rank))?;
            if run.stage + 1 != pp || run.rank != 0 {
                return Ok(None);
            }
            eprintln!(
                "ran {pp} pipeline stages of {r} launched ranks each ({}, {} micro-batches); rank {} (stage {}, \
                 rank 0) writes the outputs",
                pm.degrees, pm.micro_batches, env.rank, run.stage
            );
            (run.outputs, build_s)
        }
        None => {
            let all = std::sync::Arc::new((0..pm.ranks).map(load).collect::<Result<Vec<_>>>()?);
            let build: fulgur::pipeline::BuildRank =
                std::sync::Arc::new(move |s, i| Ok((artifact_rank(&all[s * r + i], &opts)?, None)));
            let mut threads =
                fulgur::pipeline::PipelineThreads::with_builder((pp, r), build, fulgur_ir::Precision::F32, timeout)
                    .map_err(|e| anyhow!("building the pipeline's stages: {e}"))?;
            let build_s = t.elapsed().as_secs_f64();
            let run = threads
                .step(&micro, &HashMap::new())
                .map_err(|e| anyhow!("running the pipeline on simulated ranks: {e}"))?;
            eprintln!(
                "ran {pp} pipeline stages of {r} simulated ranks each ({}, {} micro-batches)",
                pm.degrees, pm.micro_batches
            );
            (run.outputs, build_s)
        }
    };
    let step_s = t.elapsed().as_secs_f64() - build_s;
    let names: Vec<String> = outputs.first().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let mut whole = BTreeMap::new();
    for name in names {
        let parts: Vec<&Tensor> = outputs
            .iter()
            .map(|o| o.get(&name).ok_or_else(|| anyhow!("a micro-batch gave no `{name}`")))
            .collect::<Result<_>>()?;
        let t = if name == "loss" {
            let mean = parts.iter().map(|p| p.to_f64()[0]).sum::<f64>() / parts.len() as f64;
            Tensor::from_f64(parts[0].dtype, parts[0].shape.clone(), vec![mean])
        } else {
            fulgur::pipeline::concat_batches(&parts).map_err(|e| anyhow!("`{name}`: {e}"))?
        };
        whole.insert(name, t);
    }
    Ok(Some((whole, build_s, step_s, None)))
}

/// A stage rank's program of a pipeline artifact and its weights.
type LoadedRank = (fulgur_codegen::program::KernelProgram, HashMap<String, Tensor>);

/// How a pipeline artifact's rank programs are built.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "llvm"), allow(dead_code))]
struct RankOptions {
    cuda: bool,
    threads: usize,
    max_memory: Option<u64>,
    check_finite: bool,
}

/// A pipeline artifact's rank program on the CPU or the GPU, its weights loaded.
fn artifact_rank(
    loaded: &LoadedRank,
    opts: &RankOptions,
) -> std::result::Result<Box<dyn fulgur_runtime::ranks::RankProgram>, String> {
    if opts.cuda {
        cuda_rank(loaded, opts)
    } else {
        cpu_rank(loaded, opts)
    }
}

/// The loaded weight `name` of a rank's program.
#[cfg_attr(not(any(feature = "llvm", feature = "cuda")), allow(dead_code))]
fn loaded_weight(
    weights: &HashMap<String, Tensor>,
    name: &str,
) -> std::result::Result<Tensor, fulgur_runtime::RuntimeError> {
    weights
        .get(name)
        .cloned()
        .ok_or_else(|| fulgur_runtime::RuntimeError::Other(format!("weight `{name}` is missing")))
}

#[cfg(feature = "cuda")]
fn cuda_rank(
    (program, weights): &LoadedRank,
    opts: &RankOptions,
) -> std::result::Result<Box<dyn fulgur_runtime::ranks::RankProgram>, String> {
    use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
    let o = CudaOptions {
        check_finite: opts.check_finite,
        ..Default::default()
    };
    let mut gpu = CudaProgram::new(program.clone(), o).map_err(|e| e.to_string())?;
    gpu.load_weights_from(|name, _| loaded_weight(weights, name))
        .map_err(|e| e.to_string())?;
    Ok(Box::new(gpu))
}

#[cfg(not(feature = "cuda"))]
fn cuda_rank(
    _: &LoadedRank,
    _: &RankOptions,
) -> std::result::Result<Box<dyn fulgur_runtime::ranks::RankProgram>, String> {
    Err("this build has no CUDA backend (built without the `cuda` feature)".into())
}

#[cfg(feature = "llvm")]
fn cpu_rank(
    (program, weights): &LoadedRank,
    opts: &RankOptions,
) -> std::result::Result<Box<dyn fulgur_runtime::ranks::RankProgram>, String> {
    use fulgur_runtime::cpu::{CpuOptions, CpuProgram};
    let o = CpuOptions {
        threads: Some(opts.threads),
        max_memory: opts.max_memory,
        check_finite: opts.check_finite,
        ..Default::default()
    };
    let mut cpu = CpuProgram::new(program.clone(), o).map_err(|e| e.to_string())?;
    cpu.load_weights_from(|name, _| loaded_weight(weights, name))
        .map_err(|e| e.to_string())?;
    Ok(Box::new(cpu))
}

#[cfg(not(feature = "llvm"))]
fn cpu_rank(
    _: &LoadedRank,
    _: &RankOptions,
) -> std::result::Result<Box<dyn fulgur_runtime::ranks::RankProgram>, String> {
    Err("this build has no CPU backend (built without the `llvm` feature)".into())
}

/// Where a rank's collectives go.
enum RankTransport<'a> {
    /// The in-process simulated transport of threads.
    Simulated(std::sync::Arc<fulgur_runtime::ranks::SimTransport>),
    /// A launched process: its rank and the mesh's sizes.
    Launched(&'a fulgur_runtime::ranks::RankEnv, &'a [usize]),
}

/// Runs one rank's program on the CPU or the GPU with its collectives through `transport`.
fn rank_program(
    program: fulgur_codegen::program::KernelProgram,
    cuda: bool,
    weights: &HostWeights,
    data: &HashMap<String, Tensor>,
    args: &RunArgs,
    transport: RankTransport,
) -> Result<RunResult> {
    let transport: crate::cli::ranks::Shared = match transport {
        RankTransport::Simulated(t) => t,
        RankTransport::Launched(env, sizes) => {
            crate::cli::ranks::transport(env, sizes, cuda, fulgur_ir::Precision::F32)?
        }
    };
    if cuda {
        run_cuda_with(program, weights, data, args, Some(transport))
    } else {
        run_cpu_with(program, weights, data, args, Some(transport))
    }
}

fn run_cpu(
    program: fulgur_codegen::program::KernelProgram,
    weights: &HostWeights,
    data: &HashMap<String, Tensor>,
    args: &RunArgs,
) -> Result<RunResult> {
    run_cpu_with(program, weights, data, args, None)
}

fn run_cuda(
    program: fulgur_codegen::program::KernelProgram,
    weights: &HostWeights,
    data: &HashMap<String, Tensor>,
    args: &RunArgs,
) -> Result<RunResult> {
    run_cuda_with(program, weights, data, args, None)
}

#[cfg(feature = "llvm")]
fn run_cpu_with(
    program: fulgur_codegen::program::KernelProgram,
    weights: &HostWeights,
    data: &HashMap<String, Tensor>,
    args: &RunArgs,
    transport: Option<std::sync::Arc<dyn fulgur_ir::Transport + Send + Sync>>,
) -> Result<RunResult> {
    use anyhow::Context;
    use fulgur_runtime::cpu::{CpuOptions, CpuProgram};
    let opts = CpuOptions {
        threads: args.threads,
        max_memory: args.max_memory,
        check_finite: args.check_finite,
        ..Default::default()
    };
    let mut cpu = CpuProgram::new(program, opts).context("compiling the artifact for this CPU")?;
    if let Some(t) = transport {
        cpu.set_transport(t);
    }
    let source = match &args.weights {
        Some(w) => w.display().to_string(),
        None => args.inputs.display().to_string(),
    };
    cpu.load_weights_from(|name, ty| weights.fetch(name, ty))
        .with_context(|| {
            format!(
                "the weights in {source} do not fit artifact {}",
                args.artifact.display()
            )
        })?;
    let t = Instant::now();
    let out = cpu.run(data).context("running the artifact")?;
    Ok((out, cpu.compile_seconds, t.elapsed().as_secs_f64(), cpu.memory()))
}

#[cfg(not(feature = "llvm"))]
fn run_cpu_with(
    _: fulgur_codegen::program::KernelProgram,
    _: &HostWeights,
    _: &HashMap<String, Tensor>,
    _: &RunArgs,
    _: Option<std::sync::Arc<dyn fulgur_ir::Transport + Send + Sync>>,
) -> Result<RunResult> {
    bail!("this build has no CPU backend (built without the `llvm` feature): it cannot run a cpu artifact")
}

#[cfg(feature = "cuda")]
fn run_cuda_with(
    program: fulgur_codegen::program::KernelProgram,
    weights: &HostWeights,
    data: &HashMap<String, Tensor>,
    args: &RunArgs,
    transport: Option<std::sync::Arc<dyn fulgur_ir::Transport + Send + Sync>>,
) -> Result<RunResult> {
    use anyhow::Context;
    use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
    let opts = CudaOptions {
        check_finite: args.check_finite,
        ..Default::default()
    };
    let mut gpu = CudaProgram::new(program, opts).context("loading the artifact on the GPU")?;
    if let Some(t) = transport {
        gpu.set_transport(t);
    }
    let source = match &args.weights {
        Some(w) => w.display().to_string(),
        None => args.inputs.display().to_string(),
    };
    gpu.load_weights_from(|name, ty| weights.fetch(name, ty))
        .with_context(|| {
            format!(
                "the weights in {source} do not fit artifact {}",
                args.artifact.display()
            )
        })?;
    let t = Instant::now();
    let out = gpu.run(data).context("running the artifact")?;
    Ok((out, gpu.compile_seconds, t.elapsed().as_secs_f64(), gpu.memory()))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda_with(
    _: fulgur_codegen::program::KernelProgram,
    _: &HostWeights,
    _: &HashMap<String, Tensor>,
    _: &RunArgs,
    _: Option<std::sync::Arc<dyn fulgur_ir::Transport + Send + Sync>>,
) -> Result<RunResult> {
    bail!("this build has no CUDA backend (built without the `cuda` feature): it cannot run a cuda artifact")
}
