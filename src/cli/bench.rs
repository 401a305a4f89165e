//! `fulgur bench CKPT_DIR|CONFIG [--target cpu|reference] [--compare none,full] [--batch B --seq T] [--json]`:
//! the forward pass of a MiniMax-01 model at each optimization level: kernels, compile (JIT) time, forward time
//! (warm-up, then the median of repeats), tokens/s, planned and actual memory, and the kernels that took the
//! most time.
//!
//! Given a config, the weights are random (transformers' initialisation, seeded); given a checkpoint, its own.

use crate::cli::model::{optimize, with_backward, HostWeights, OptLevel};
use anyhow::{bail, Context, Result};
use fulgur_codegen::program::lower;
use fulgur_ir::{Graph, Interpreter, Precision, Tensor};
use fulgur_models::checkpoint::Checkpoint;
use fulgur_models::{forward_graph, random_tokens, random_weights, ForwardOptions, MiniMaxConfig};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

/// Where a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchTarget {
    /// The reference interpreter (f32 precision).
    Reference,
    /// The CPU backend (LLVM JIT).
    Cpu,
    /// The CUDA backend (NVRTC, cuBLAS) on GPU 0.
    Cuda,
}

/// `cuda` where the build has the CUDA backend and a GPU is present, else `cpu` where the build has the CPU
/// backend, else `reference`.
pub fn default_target() -> BenchTarget {
    // asked once per process (every subcommand's arguments name this default)
    #[cfg(feature = "cuda")]
    {
        static GPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *GPU.get_or_init(|| fulgur_runtime::cuda::device_info().is_ok()) {
            return BenchTarget::Cuda;
        }
    }
    if cfg!(feature = "llvm") {
        BenchTarget::Cpu
    } else {
        BenchTarget::Reference
    }
}

impl BenchTarget {
    /// The cost model the optimizer plans for on this target by default.
    pub fn cost_model(self) -> &'static str {
        match self {
            BenchTarget::Cpu => "CPU",
            BenchTarget::Reference => "H100",
            BenchTarget::Cuda => "H200",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A checkpoint directory, or a MiniMax config JSON (random weights).
    pub input: PathBuf,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = default_target())]
    pub target: BenchTarget,
    /// Optimization levels to compare (comma-separated): `none` runs the definitional graph op by op, `full`
    /// the optimizer's output.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none,full")]
    pub compare: Vec<OptLevel>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// Timed forward passes per level (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Untimed forward passes before the timed ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Threads of the CPU backend (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seed of the random weights and tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Kernels listed per level, by time, each row with the bandwidth its kernels' views reached (their bytes,
    /// each element once, over their time).
    #[arg(long, default_value_t = 8)]
    pub top: usize,
    /// Cost model the optimizer plans for (default: the target's: `CPU` for cpu, `H100` for reference).
    #[arg(long, value_name = "NAME")]
    pub cost_model: Option<String>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// The dtype weights and activations are stored in.
    #[arg(long, value_enum, default_value_t = crate::cli::model::Dtype::F32)]
    pub dtype: crate::cli::model::Dtype,
    /// Time decoding instead of the forward: N greedy tokens per sequence after a prompt of --seq tokens
    /// (on cuda the decode step runs as a CUDA graph), reporting decode tokens/s at --batch.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub decode: usize,
    /// With --decode on the cuda target: launch the decode step kernel by kernel instead of as a CUDA graph.
    #[arg(long)]
    pub eager: bool,
    /// Compute the logits of the last position only (transformers' `logits_to_keep=1`), not `[B, T, V]`.
    #[arg(long)]
    pub last_logits: bool,
    /// Time training steps instead of the forward: the loss, its gradients and an AdamW update of every
    /// parameter (`fulgur train`'s step graph, f32 master weights), on random tokens.
    #[arg(long)]
    pub train: bool,
    /// With --train: activation recompute versus storing (`auto`: the cost model's choice per value).
    #[arg(long, value_enum, default_value_t = crate::cli::model::RecomputeArg::Auto)]
    pub recompute: crate::cli::model::RecomputeArg,
}

/// One level's measurements.
#[derive(Debug, serde::Serialize)]
pub struct LevelResult {
    pub level: String,
    pub kernels: usize,
    pub optimize_s: f64,
    pub compile_s: f64,
    pub forward_ms: f64,
    pub forward_ms_all: Vec<f64>,
    pub tokens_per_s: f64,
    pub peak_bytes: u64,
    pub actual_bytes: u64,
    pub top_kernels: Vec<KernelTime>,
    /// Why the level could not run (it does not fit the device, ...); the other levels still run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelTime {
    pub name: String,
    pub op: String,
    pub calls: usize,
    pub ms: f64,
    /// The bytes its kernels' views address per step (each element once among the inputs and once among the
    /// outputs; 0 when the sizes are not known), and so the bandwidth they reached.
    #[serde(skip_serializing_if = "is_zero")]
    pub bytes: f64,
    /// For a kernel of several steps (phases and GEMMs): each step's name and ms per forward.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<(String, f64)>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The bytes kernel `k`'s views address at the symbols `env`: each distinct view's elements once among the
/// inputs and once among the outputs (an axis of stride 0, a broadcast, counted once; a view the kernel reads
/// and writes in place, such as an optimizer's state, counted as a read and a write, the two transfers it
/// makes); 0 when a size does not evaluate.
#[cfg(any(feature = "llvm", feature = "cuda"))]
fn kernel_bytes(k: &fulgur_codegen::program::Kernel, env: &std::collections::HashMap<String, i64>) -> f64 {
    let mut seen: Vec<(bool, &fulgur_codegen::program::TensorRef)> = Vec::new();
    let mut total = 0.0;
    let views = k
        .inputs
        .iter()
        .map(|t| (false, t))
        .chain(k.outputs.iter().map(|t| (true, t)));
    for (written, t) in views {
        if seen.contains(&(written, t)) {
            continue;
        }
        seen.push((written, t));
        let mut n = 1.0;
        for (d, st) in t.shape.iter().zip(&t.strides) {
            match (d.eval(env), st.eval(env)) {
                (Ok(_), Ok(0)) => {}
                (Ok(x), Ok(_)) => n *= x.max(0) as f64,
                _ => return 0.0,
            }
        }
        total += n * t.dtype.size_bytes() as f64;
    }
    total
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A progress line on stderr (rewritten in place on a terminal).
struct Progress {
    tty: bool,
}

impl Progress {
    fn say(&self, m: &str) {
        if self.tty {
            eprint!("\r\x1b[2K{m}");
        } else {
            eprintln!("{m}");
        }
    }
    fn done(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.batch == 0 || args.seq == 0 {
        bail!("--batch and --seq must be at least 1");
    }
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let (cfg, ckpt) = if args.input.is_dir() {
        let ck = Checkpoint::open(&args.input)?;
        (ck.config.clone(), Some(ck))
    } else {
        (MiniMaxConfig::from_file(&args.input)?, None)
    };
    let progress = Progress {
        tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let base = forward_graph(
        &cfg,
        &ForwardOptions {
            last_logits: args.last_logits,
            ..Default::default()
        },
    )?;
    // the CPU backend reads a checkpoint one tensor at a time; the interpreter needs them all on the host
    let weights = match (&ckpt, args.target) {
        (Some(ck), BenchTarget::Cpu | BenchTarget::Cuda) => HostWeights::Checkpoint(ck),
        (Some(ck), BenchTarget::Reference) => {
            progress.say("loading the checkpoint");
            HostWeights::Map(ck.load_params(&base)?)
        }
        (None, _) => HostWeights::Map(random_weights(&base, 0.02, args.seed)),
    };
    let tokens = random_tokens(args.batch, args.seq, cfg.vocab_size, args.seed);
    if args.decode > 0 {
        return bench_decode(&args, &cfg, &weights, &tokens, &progress);
    }
    if args.train {
        return bench_train(&args, &cfg, weights, &tokens, &progress);
    }
    let cost_model = args
        .cost_model
        .clone()
        .unwrap_or_else(|| args.target.cost_model().to_string());
    let mut results = Vec::new();
    for &level in &args.compare {
        let lname = format!("{level:?}").to_lowercase();
        progress.say(&format!("{lname}: optimizing"));
        let t = Instant::now();
        let g = crate::cli::model::with_dtype(optimize(base.clone(), level, &cost_model)?, args.dtype)?;
        let optimize_s = t.elapsed().as_secs_f64();
        let program = lower(&g)?;
        let kernels = program.step.len();
        let r = match args.target {
            BenchTarget::Reference => bench_reference(&args, &g, &weights, &tokens, &lname, &progress),
            BenchTarget::Cpu => bench_cpu(&args, program, &weights, &tokens, &lname, &progress),
            BenchTarget::Cuda => bench_cuda(&args, program, &weights, &tokens, &lname, &progress),
        };
        let (compile_s, mut times, peak, actual, top) = match r {
            Ok(r) => r,
            // a level that cannot run (a plan larger than the device) is reported; the others still run
            Err(e) if args.compare.len() > 1 => {
                let msg = format!("{e:#}");
                progress.say(&format!("{lname}: {msg}"));
                results.push(LevelResult {
                    level: lname,
                    kernels,
                    optimize_s,
                    compile_s: 0.0,
                    forward_ms: f64::NAN,
                    forward_ms_all: Vec::new(),
                    tokens_per_s: f64::NAN,
                    peak_bytes: 0,
                    actual_bytes: 0,
                    top_kernels: Vec::new(),
                    error: Some(msg),
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        let forward_ms = median(&mut times.clone()) * 1e3;
        times.iter_mut().for_each(|t| *t *= 1e3);
        results.push(LevelResult {
            level: lname,
            kernels,
            optimize_s,
            compile_s,
            forward_ms,
            forward_ms_all: times,
            tokens_per_s: (args.batch * args.seq) as f64 / (forward_ms / 1e3),
            peak_bytes: peak,
            actual_bytes: actual,
            top_kernels: top,
            error: None,
        });
    }
    progress.done();
    let target = format!("{:?}", args.target).to_lowercase();
    if args.json {
        let v = serde_json::json!({
            "model": args.input.display().to_string(),
            "target": target,
            "batch": args.batch,
            "seq": args.seq,
            "repeats": args.repeats,
            "levels": results,
        });
        crate::cli::files::write_stdout(&(serde_json::to_string_pretty(&v)? + "\n"))?;
        return Ok(());
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "bench {} on {target}: batch {} × {} tokens, median of {} after {} warm-up",
        args.input.display(),
        args.batch,
        args.seq,
        args.repeats,
        args.warmup
    );
    let _ = writeln!(
        s,
        "{:<6} {:>8} {:>11} {:>11} {:>12} {:>12} {:>12} {:>12}",
        "level", "kernels", "optimize s", "compile s", "forward ms", "tokens/s", "planned", "actual"
    );
    for r in &results {
        if let Some(e) = &r.error {
            let _ = writeln!(
                s,
                "{:<6} {:>8} {:>11.2}  could not run: {e}",
                r.level, r.kernels, r.optimize_s
            );
            continue;
        }
        let _ = writeln!(
            s,
            "{:<6} {:>8} {:>11.2} {:>11.2} {:>12.1} {:>12.0} {:>12} {:>12}",
            r.level,
            r.kernels,
            r.optimize_s,
            r.compile_s,
            r.forward_ms,
            r.tokens_per_s,
            fulgur_ir::interp::fmt_bytes(r.peak_bytes),
            fulgur_ir::interp::fmt_bytes(r.actual_bytes)
        );
    }
    if results.len() == 2 && results[1].forward_ms > 0.0 && results.iter().all(|r| r.error.is_none()) {
        let _ = writeln!(
            s,
            "{} is {:.2}x the speed of {}",
            results[1].level,
            results[0].forward_ms / results[1].forward_ms,
            results[0].level
        );
    }
    for r in &results {
        if r.top_kernels.is_empty() {
            continue;
        }
        let _ = writeln!(s, "top kernels ({}), ms per forward:", r.level);
        for k in &r.top_kernels {
            let _ = writeln!(s, "  {:>9.2}  {:>4}×  {}  {}", k.ms, k.calls, k.op, k.name);
            for (step, ms) in &k.steps {
                let _ = writeln!(s, "  {:>9.2}         {step}", ms);
            }
        }
    }
    crate::cli::files::write_stdout(&s)?;
    Ok(())
}

type Measured = (f64, Vec<f64>, u64, u64, Vec<KernelTime>);

/// `--decode N`: per level, the prefill of the prompt and N greedy tokens; the decode rate from the median
/// step (the first step, which prepares the decode program, apart).
fn bench_decode(
    args: &Args,
    cfg: &MiniMaxConfig,
    weights: &HostWeights,
    tokens: &Tensor,
    progress: &Progress,
) -> Result<()> {
    use crate::cli::model::{load_cpu_pair, with_dtype};
    if args.target == BenchTarget::Reference {
        bail!("--decode runs on the cpu or cuda target");
    }
    let cost_model = args
        .cost_model
        .clone()
        .unwrap_or_else(|| args.target.cost_model().to_string());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "decode {} on {}: batch {}, prompt {} tokens, {} new tokens per sequence{}",
        args.input.display(),
        format!("{:?}", args.target).to_lowercase(),
        args.batch,
        args.seq,
        args.decode,
        match (args.target, args.eager) {
            (BenchTarget::Cuda, false) => " (the step replayed as a CUDA graph)",
            (BenchTarget::Cuda, true) => " (the step launched kernel by kernel)",
            _ => "",
        }
    );
    let _ = writeln!(
        s,
        "{:<6} {:>12} {:>16} {:>16} {:>12}",
        "level", "prefill ms", "first step ms", "median step ms", "tokens/s"
    );
    let mut rows = Vec::new();
    let mut tops: Vec<(String, Vec<KernelTime>)> = Vec::new();
    for &level in &args.compare {
        let lname = format!("{level:?}").to_lowercase();
        progress.say(&format!("{lname}: optimizing the prefill and the decode step"));
        let prefill = forward_graph(
            cfg,
            &ForwardOptions {
                states: true,
                last_logits: true,
                ..Default::default()
            },
        )?;
        let prefill = with_dtype(optimize(prefill, level, &cost_model)?, args.dtype)?;
        let decode = with_dtype(
            optimize(fulgur_models::decode_graph(cfg)?, level, &cost_model)?,
            args.dtype,
        )?;
        progress.say(&format!("{lname}: compiling and loading"));
        let mut stamps = Vec::new();
        let mut stamp = |t0: Instant, i: usize, n: usize| {
            stamps.push(t0.elapsed().as_secs_f64());
            progress.say(&format!("{lname}: token {i}/{n}"));
        };
        match args.target {
            BenchTarget::Cuda => {
                let top = decode_cuda(args, &prefill, &decode, weights, tokens, &mut stamp)?;
                if !top.is_empty() {
                    tops.push((lname.clone(), top));
                }
            }
            BenchTarget::Cpu => {
                let (mut p, mut d) = load_cpu_pair(&prefill, &decode, weights)?;
                let t0 = Instant::now();
                fulgur_runtime::generate::greedy(p.as_mut(), d.as_mut(), tokens, args.decode, |i, n| stamp(t0, i, n))
                    .context("decoding")?;
            }
            BenchTarget::Reference => bail!("--decode runs on the cpu or cuda target"),
        }
        let prefill_ms = stamps.first().copied().unwrap_or(0.0) * 1e3;
        let mut steps: Vec<f64> = stamps.windows(2).map(|w| (w[1] - w[0]) * 1e3).collect();
        let first = if steps.is_empty() { f64::NAN } else { steps.remove(0) };
        let med = median(&mut steps);
        let rate = args.batch as f64 / (med / 1e3);
        let _ = writeln!(
            s,
            "{lname:<6} {prefill_ms:>12.1} {first:>16.2} {med:>16.2} {rate:>12.1}"
        );
        let top = tops
            .iter()
            .find(|(l, _)| *l == lname)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(Vec::new);
        rows.push(serde_json::json!({
            "level": lname, "prefill_ms": prefill_ms, "first_step_ms": first, "median_step_ms": med,
            "tokens_per_s": rate, "top_kernels": top,
        }));
    }
    progress.done();
    for (lname, top) in &tops {
        let title = format!("top kernels of one more decode step ({lname}, launched kernel by kernel), ms per step:");
        write_top(&mut s, &title, top);
    }
    if args.json {
        let v = serde_json::json!({
            "model": args.input.display().to_string(), "target": format!("{:?}", args.target).to_lowercase(),
            "batch": args.batch, "prompt": args.seq, "new_tokens": args.decode, "levels": rows,
        });
        crate::cli::files::write_stdout(&(serde_json::to_string_pretty(&v)? + "\n"))?;
    } else {
        crate::cli::files::write_stdout(&s)?;
    }
    Ok(())
}

/// The median of each part of the timed steps' [`fulgur_runtime::CallTiming`]s.
fn timing_median(ts: &[fulgur_runtime::CallTiming]) -> Option<fulgur_runtime::CallTiming> {
    if ts.is_empty() {
        return None;
    }
    let m = |f: &dyn Fn(&fulgur_runtime::CallTiming) -> f64| median(&mut ts.iter().map(f).collect::<Vec<_>>());
    Some(fulgur_runtime::CallTiming {
        device_ms: m(&|t| t.device_ms),
        host_waits: m(&|t| t.host_waits as f64) as usize,
        host_wait_ms: m(&|t| t.host_wait_ms),
        expert_gemms: m(&|t| t.expert_gemms as f64) as usize,
        expert_enqueue_ms: m(&|t| t.expert_enqueue_ms),
        expert_queries: m(&|t| t.expert_queries as f64) as usize,
        begin_ms: m(&|t| t.begin_ms),
        launch_ms: m(&|t| t.launch_ms),
        finish_ms: m(&|t| t.finish_ms),
        outputs_ms: m(&|t| t.outputs_ms),
    })
}

fn timing_json(ts: &[fulgur_runtime::CallTiming]) -> serde_json::Value {
    match timing_median(ts) {
        None => serde_json::Value::Null,
        Some(t) => serde_json::json!({
            "device_ms": t.device_ms, "host_waits": t.host_waits, "host_wait_ms": t.host_wait_ms,
            "expert_gemms": t.expert_gemms, "expert_enqueue_ms": t.expert_enqueue_ms,
            "expert_queries": t.expert_queries,
            "begin_ms": t.begin_ms, "launch_ms": t.launch_ms, "finish_ms": t.finish_ms, "outputs_ms": t.outputs_ms,
        }),
    }
}

/// Where a step's wall time `wall` (ms) went, by the medians of the timed steps' parts.
fn timing_note(ts: &[fulgur_runtime::CallTiming], wall: f64) -> Option<String> {
    let t = timing_median(ts)?;
    let parts = t.begin_ms + t.launch_ms + t.finish_ms + t.outputs_ms;
    Some(format!(
        "where a step's {wall:.1} ms went (medians): the device ran {:.1} ms from the first kernel to the last; \
         the host bound and uploaded the inputs in {:.1} ms, enqueued the kernels in {:.1} ms ({} waits on the \
         device for group sizes, {:.1} ms; {} experts' products, {:.1} ms, {} cuBLASLt heuristic queries), waited {:.1} ms for the end, read the outputs in {:.1} ms; {:.1} ms \
         elsewhere (carrying the state between steps)",
        t.device_ms,
        t.begin_ms,
        t.launch_ms,
        t.host_waits,
        t.host_wait_ms,
        t.expert_gemms,
        t.expert_enqueue_ms,
        t.expert_queries,
        t.finish_ms,
        t.outputs_ms,
        wall - parts
    ))
}

/// What timing one level's training steps gives: compile seconds, the step times (ms), the profiled step's
/// kernels, and (CUDA) the bytes the program holds and the device's memory in use after the profiled step.
/// With them, where the timed steps' time went (GPU).
type TrainRun = (
    f64,
    Vec<f64>,
    Vec<KernelTime>,
    Option<(u64, u64)>,
    Vec<fulgur_runtime::CallTiming>,
);

/// `--train`: per level, the median wall time of a whole training step (forward, backward, clipping, AdamW)
/// over --repeats steps after --warmup, the state kept in the executable between steps.
fn bench_train(
    args: &Args,
    cfg: &MiniMaxConfig,
    mut weights: HostWeights,
    tokens: &Tensor,
    progress: &Progress,
) -> Result<()> {
    use fulgur_passes::optim::{train_step_with, AdamW, ADAM_M, ADAM_V};
    use fulgur_runtime::train::Trainer;
    use std::collections::HashMap;
    if args.last_logits || args.decode > 0 {
        bail!("--train times the training step: it takes neither --last-logits nor --decode");
    }
    let cost_model = args
        .cost_model
        .clone()
        .unwrap_or_else(|| args.target.cost_model().to_string());
    let loss_graph = forward_graph(
        cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )?;
    let hp = AdamW::default();
    let mut state = HashMap::new();
    for id in loss_graph.params() {
        if let fulgur_ir::Op::Param { name, ty } = &loss_graph.node(id).op {
            let w = weights.take(name, ty)?;
            let z = Tensor::from_f64(fulgur_ir::DType::F32, w.shape.clone(), vec![0.0; w.numel()]);
            state.insert(format!("{ADAM_M}{name}"), z.clone());
            state.insert(format!("{ADAM_V}{name}"), z);
            state.insert(name.clone(), w);
        }
    }
    let env: HashMap<String, i64> = [("B".to_string(), args.batch as i64), ("T".to_string(), args.seq as i64)].into();
    let tokens_per_step = (args.batch * args.seq) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "bench {} on {}: training steps of {} × {} tokens ({:?}), median of {} after {} warm-up",
        args.input.display(),
        format!("{:?}", args.target).to_lowercase(),
        args.batch,
        args.seq,
        args.dtype,
        args.repeats,
        args.warmup
    );
    let _ = writeln!(
        s,
        "{:<6} {:>8} {:>11} {:>10} {:>10} {:>12} {:>12} {:>12}",
        "level", "kernels", "optimize s", "compile s", "step ms", "tokens/s", "state", "transient"
    );
    let mut rows = Vec::new();
    let mut steps_ms = Vec::new();
    let mut tops: Vec<(String, Vec<KernelTime>)> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    #[cfg_attr(not(any(feature = "llvm", feature = "cuda")), allow(unused_variables))] // the profiles'
    let carried: Vec<String> = state.keys().cloned().collect();
    for (li, &level) in args.compare.iter().enumerate() {
        // the last level takes the state itself: bench-m's weights and moments are tens of GB on the host
        let level_state = std::cell::RefCell::new(Some(if li + 1 == args.compare.len() {
            std::mem::take(&mut state)
        } else {
            state.clone()
        }));
        let lname = format!("{level:?}").to_lowercase();
        progress.say(&format!("{lname}: building and optimizing the training step"));
        let t = Instant::now();
        // optimized in f32, then stored as --dtype (see `train::compute_graph`), then differentiated
        let mut report = None;
        let g = with_backward(loss_graph.clone(), level, &cost_model, |f| {
            let compute = crate::cli::train::compute_graph(f, args.dtype)?;
            let (g, r) = train_step_with(&compute, "loss", &hp, 1, &args.recompute.grad_options(&cost_model))?;
            report = Some(r);
            Ok(g)
        })?;
        let activations = report.map(|r| r.summary(&env)).unwrap_or_default();
        let optimize_s = t.elapsed().as_secs_f64();
        let program = lower(&g)?;
        let plan = program.layout(&env)?;
        let kernels = program.step.len();
        // called once: it takes the lowered program
        let run = || -> Result<TrainRun> {
            progress.say(&format!("{lname}: compiling {kernels} kernels"));
            let t = Instant::now();
            let steps = args.warmup + args.repeats;
            let timings = std::cell::RefCell::new(Vec::new());
            let time_steps = |exe: &mut dyn fulgur_runtime::Executable| -> Result<Vec<f64>> {
                let st = level_state.borrow_mut().take().unwrap_or_default();
                let mut trainer = Trainer::new(exe, st);
                let mut times = Vec::new();
                for i in 0..steps {
                    progress.say(&format!("{lname}: step {}/{steps}", i + 1));
                    let t = Instant::now();
                    let out = trainer.step(tokens.clone(), &hp.scalars(1e-4, i as u64 + 1))?;
                    if !out.loss.is_finite() {
                        bail!("step {}: the loss is {}", i + 1, out.loss);
                    }
                    if i >= args.warmup {
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                        timings.borrow_mut().extend(trainer.timing());
                    }
                }
                Ok(times)
            };
            match args.target {
                // on the CPU with --top, the program itself, to profile one more step
                #[cfg(feature = "llvm")]
                BenchTarget::Cpu if args.top > 0 => {
                    let opts = fulgur_runtime::cpu::CpuOptions {
                        threads: args.threads,
                        ..Default::default()
                    };
                    let mut cpu = fulgur_runtime::cpu::CpuProgram::new(program, opts)?;
                    let compile_s = t.elapsed().as_secs_f64();
                    let times = time_steps(&mut cpu)?;
                    let top = profile_cpu_step(
                        &mut cpu,
                        tokens,
                        &hp.scalars(1e-4, steps as u64 + 1),
                        &carried,
                        args.top,
                    )?;
                    Ok((compile_s, times, top, None, timings.take()))
                }
                // on the GPU with --top, one more step profiled kernel by kernel (an event after each)
                #[cfg(feature = "cuda")]
                BenchTarget::Cuda if args.top > 0 => {
                    use fulgur_runtime::cuda::{CudaOptions, CudaProfile, CudaProgram};
                    let mut gpu = CudaProgram::new(program, CudaOptions::default())?;
                    let compile_s = t.elapsed().as_secs_f64();
                    let times = time_steps(&mut gpu)?;
                    gpu.profile = Some(CudaProfile::default());
                    let mut inputs: HashMap<String, Tensor> = HashMap::new();
                    inputs.insert("input_ids".into(), tokens.clone());
                    for (name, v) in hp.scalars(1e-4, steps as u64 + 1) {
                        inputs.insert(
                            name.to_string(),
                            Tensor::from_f64(fulgur_ir::DType::F32, vec![], vec![v]),
                        );
                    }
                    match gpu.run_carried(&inputs, &carried) {
                        Some(r) => {
                            r.context("the profiled step")?;
                        }
                        None => bail!("the training step cannot keep its state in the program"),
                    }
                    let held = gpu.memory().map(|m| m.1);
                    let used = gpu.device_used()?;
                    Ok((
                        compile_s,
                        times,
                        cuda_top(&gpu, args.top),
                        Some((held.unwrap_or(0), used)),
                        timings.take(),
                    ))
                }
                _ => {
                    let mut exe = crate::cli::train::executable(&g, Some(program), args.target, false)?;
                    let compile_s = t.elapsed().as_secs_f64();
                    let times = time_steps(exe.as_mut())?;
                    Ok((compile_s, times, Vec::new(), None, timings.take()))
                }
            }
        };
        match run() {
            Ok((compile_s, mut times, top, device, timings)) => {
                if !top.is_empty() {
                    tops.push((lname.clone(), top));
                }
                let ms = median(&mut times);
                let _ = writeln!(
                    s,
                    "{lname:<6} {kernels:>8} {optimize_s:>11.2} {compile_s:>10.2} {ms:>10.1} {:>12.0} {:>12} {:>12}",
                    tokens_per_step / (ms / 1e3),
                    crate::cli::stats::bytes(plan.persistent_bytes),
                    crate::cli::stats::bytes(plan.arena_bytes)
                );
                steps_ms.push((lname.clone(), ms));
                rows.push(serde_json::json!({
                    "level": lname, "kernels": kernels, "optimize_s": optimize_s, "compile_s": compile_s,
                    "step_ms": ms, "step_ms_all": times, "tokens_per_s": tokens_per_step / (ms / 1e3),
                    "state_bytes": plan.persistent_bytes, "transient_bytes": plan.arena_bytes,
                    "activations": activations,
                    "held_bytes": device.map(|d| d.0), "device_used_bytes": device.map(|d| d.1),
                    "timing": timing_json(&timings),
                }));
                notes.push(format!("{lname}: activations for the backward: {activations}"));
                if let Some(t) = timing_note(&timings, ms) {
                    notes.push(format!("{lname}: {t}"));
                }
                if let Some((held, used)) = device {
                    notes.push(format!(
                        "{lname}: memory after the profiled step: {} held by the program (state, arena, scratch, \
                         spill), {} in use on the device (cuMemGetInfo: with cuBLAS's workspace, the modules and \
                         the CUDA context)",
                        crate::cli::stats::bytes(held),
                        crate::cli::stats::bytes(used)
                    ));
                }
            }
            Err(e) if args.compare.len() > 1 => {
                let msg = format!("{e:#}");
                let _ = writeln!(s, "{lname:<6} {kernels:>8} {optimize_s:>11.2}  could not run: {msg}");
                rows.push(serde_json::json!({"level": lname, "kernels": kernels, "error": msg}));
            }
            Err(e) => return Err(e),
        }
    }
    progress.done();
    if let ([(a, x), (b, y)], true) = (steps_ms.as_slice(), steps_ms.len() == 2) {
        let _ = writeln!(s, "{b} is {:.2}x the speed of {a}", x / y);
    }
    for n in &notes {
        let _ = writeln!(s, "{n}");
    }
    for (lname, top) in &tops {
        write_top(
            &mut s,
            &format!("top kernels of one more step ({lname}), ms per step:"),
            top,
        );
    }
    if args.json {
        let v = serde_json::json!({
            "model": args.input.display().to_string(), "target": format!("{:?}", args.target).to_lowercase(),
            "batch": args.batch, "seq": args.seq, "train": true, "levels": rows,
        });
        crate::cli::files::write_stdout(&(serde_json::to_string_pretty(&v)? + "\n"))?;
    } else {
        crate::cli::files::write_stdout(&s)?;
    }
    Ok(())
}

fn bench_reference(
    args: &Args,
    g: &Graph,
    weights: &HostWeights,
    tokens: &Tensor,
    lname: &str,
    progress: &Progress,
) -> Result<Measured> {
    let HostWeights::Map(weights) = weights else {
        bail!("the reference target needs the weights on the host");
    };
    let mut inputs = weights.clone();
    inputs.insert("input_ids".into(), tokens.clone());
    let interp = Interpreter::new(Precision::F32);
    let mut times = Vec::new();
    for i in 0..args.warmup + args.repeats {
        progress.say(&format!(
            "{lname}: forward {}/{} on the reference interpreter",
            i + 1,
            args.warmup + args.repeats
        ));
        let t = Instant::now();
        interp.run(g, &inputs).context("running the forward graph")?;
        if i >= args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let planned = lower(g)?
        .layout(&[("B".to_string(), args.batch as i64), ("T".to_string(), args.seq as i64)].into())?
        .planned_peak();
    Ok((0.0, times, planned, 0, Vec::new()))
}

#[cfg(feature = "llvm")]
fn bench_cpu(
    args: &Args,
    program: fulgur_codegen::program::KernelProgram,
    weights: &HostWeights,
    tokens: &Tensor,
    lname: &str,
    progress: &Progress,
) -> Result<Measured> {
    use fulgur_runtime::cpu::{CpuOptions, CpuProgram, Profile};
    progress.say(&format!("{lname}: compiling {} kernels", program.step.len()));
    let mut cpu = CpuProgram::new(
        program,
        CpuOptions {
            threads: args.threads,
            ..Default::default()
        },
    )?;
    let compile_s = cpu.compile_seconds;
    progress.say(&format!("{lname}: loading the weights"));
    cpu.load_weights_from(|name, ty| weights.fetch(name, ty))?;
    use std::collections::HashMap;
    let inputs: HashMap<String, Tensor> = [("input_ids".to_string(), tokens.clone())].into();
    let mut times = Vec::new();
    for i in 0..args.warmup + args.repeats {
        progress.say(&format!("{lname}: forward {}/{}", i + 1, args.warmup + args.repeats));
        if i == args.warmup {
            cpu.profile = Some(Profile::default());
        }
        let t = Instant::now();
        cpu.run(&inputs).context("running the forward pass")?;
        if i >= args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let (planned, actual) = cpu.memory().unwrap_or((0, 0));
    let mut top = Vec::new();
    if let Some(p) = &cpu.profile {
        // by op summary and node name without the layer index
        type Group = (usize, f64, Vec<(String, f64)>);
        let mut by: HashMap<(String, String), Group> = HashMap::new();
        for k in &cpu.program.step {
            let name = strip_layer(&k.name);
            let e = by
                .entry((fulgur_codegen::program::op_summary(&k.op), name))
                .or_default();
            e.0 += 1;
            e.1 += p.kernel_seconds.get(k.id).copied().unwrap_or(0.0);
            let lk = &cpu.kernels[k.code];
            if lk.steps.len() > 1 {
                let secs = p.step_seconds.get(k.id).cloned().unwrap_or_default();
                e.2.resize(lk.steps.len(), (String::new(), 0.0));
                for (i, st) in lk.steps.iter().enumerate() {
                    e.2[i].0 = match st {
                        fulgur_codegen::loops::Step::Phase(ph) => ph.name.clone(),
                        fulgur_codegen::loops::Step::Gemm(_) => format!("gemm {i}"),
                        fulgur_codegen::loops::Step::GroupedGemm(_) => "grouped gemm".into(),
                        fulgur_codegen::loops::Step::Collective(op) => format!("collective {}", op.name()),
                    };
                    e.2[i].1 += secs.get(i).copied().unwrap_or(0.0);
                }
            }
        }
        let runs = p.runs.max(1) as f64;
        let mut v: Vec<KernelTime> = by
            .into_iter()
            .map(|((op, name), (calls, s, steps))| KernelTime {
                name,
                op: truncate(&op, 60),
                calls,
                ms: s * 1e3 / runs,
                bytes: 0.0,
                steps: steps.into_iter().map(|(n, s)| (n, s * 1e3 / runs)).collect(),
            })
            .collect();
        v.push(KernelTime {
            name: "(host)".into(),
            op: "inputs in, outputs out to host tensors".into(),
            calls: 1,
            ms: p.host_seconds * 1e3 / p.runs.max(1) as f64,
            bytes: 0.0,
            steps: Vec::new(),
        });
        v.sort_by(|a, b| b.ms.partial_cmp(&a.ms).unwrap_or(std::cmp::Ordering::Equal));
        v.truncate(args.top);
        top = v;
    }
    Ok((compile_s, times, planned, actual, top))
}

#[cfg(not(feature = "llvm"))]
fn bench_cpu(
    _: &Args,
    _: fulgur_codegen::program::KernelProgram,
    _: &HostWeights,
    _: &Tensor,
    _: &str,
    _: &Progress,
) -> Result<Measured> {
    bail!("this build has no CPU backend (built without the `llvm` feature): use --target reference")
}

/// The forward on the GPU: its time is the device time of the step's kernels (CUDA events), median over the
/// repeats; the top kernels come from one more, profiled, run (an event after every kernel).
#[cfg(feature = "cuda")]
fn bench_cuda(
    args: &Args,
    program: fulgur_codegen::program::KernelProgram,
    weights: &HostWeights,
    tokens: &Tensor,
    lname: &str,
    progress: &Progress,
) -> Result<Measured> {
    use fulgur_runtime::cuda::{CudaOptions, CudaProfile, CudaProgram};
    use std::collections::HashMap;
    progress.say(&format!("{lname}: compiling {} kernels with NVRTC", program.step.len()));
    let mut gpu = CudaProgram::new(program, CudaOptions::default())?;
    let compile_s = gpu.compile_seconds;
    progress.say(&format!("{lname}: uploading the weights"));
    gpu.load_weights_from(|name, ty| weights.fetch(name, ty))?;
    let inputs: HashMap<String, Tensor> = [("input_ids".to_string(), tokens.clone())].into();
    let mut times = Vec::new();
    for i in 0..args.warmup + args.repeats {
        progress.say(&format!("{lname}: forward {}/{}", i + 1, args.warmup + args.repeats));
        gpu.run(&inputs).context("running the forward pass")?;
        if i >= args.warmup {
            times.push(gpu.last_step_ms / 1e3);
        }
    }
    let (planned, actual) = gpu.memory().unwrap_or((0, 0));
    let mut top = Vec::new();
    if args.top > 0 {
        gpu.profile = Some(CudaProfile::default());
        gpu.run(&inputs).context("running the profiled forward pass")?;
        top = cuda_top(&gpu, args.top);
    }
    Ok((compile_s, times, planned, actual, top))
}

/// The profiled kernels of a CUDA program, grouped by op and layer-free name, slowest first.
#[cfg(feature = "cuda")]
fn cuda_top(gpu: &fulgur_runtime::cuda::CudaProgram, n: usize) -> Vec<KernelTime> {
    let Some(p) = &gpu.profile else {
        return Vec::new();
    };
    let empty = std::collections::HashMap::new();
    let env = gpu.bound_env().unwrap_or(&empty);
    top_kernels(
        &gpu.program.step,
        |id| p.kernel_ms.get(id).copied().unwrap_or(0.0) / p.runs.max(1) as f64,
        |k| kernel_bytes(k, env),
        n,
    )
}

/// Step kernels grouped by op and layer-free name with their summed ms per step (`ms` of a kernel id), the
/// slowest `n` first; then the `n` slowest kinds of kernel (`(by kind)`: elementwise, reduction, gemm, copy,
/// index, each composite by its op) and the sum over every kernel (`(every kernel)`).
#[cfg(any(feature = "llvm", feature = "cuda"))]
fn top_kernels(
    step: &[fulgur_codegen::program::Kernel],
    ms: impl Fn(usize) -> f64,
    bytes: impl Fn(&fulgur_codegen::program::Kernel) -> f64,
    n: usize,
) -> Vec<KernelTime> {
    use std::collections::HashMap;
    let mut by: HashMap<(String, String), (usize, f64, f64)> = HashMap::new();
    for k in step {
        let e = by
            .entry((fulgur_codegen::program::op_summary(&k.op), strip_layer(&k.name)))
            .or_default();
        e.0 += 1;
        e.1 += ms(k.id);
        e.2 += bytes(k);
    }
    let mut v: Vec<KernelTime> = by
        .into_iter()
        .map(|((op, name), (calls, ms, bytes))| KernelTime {
            name,
            op: truncate(&op, 60),
            calls,
            ms,
            bytes,
            steps: Vec::new(),
        })
        .collect();
    v.sort_by(|a, b| b.ms.partial_cmp(&a.ms).unwrap_or(std::cmp::Ordering::Equal));
    v.truncate(n);
    // then every kernel by kind (a composite by its op), and all of them: where the time of the many small
    // kernels the rows above leave out goes (each kernel's time runs from the event after the one before, so
    // the whole is the step's time on the device, waits between kernels included)
    let mut kinds: HashMap<String, (usize, f64, f64)> = HashMap::new();
    let mut all = (0usize, 0.0f64, 0.0f64);
    for k in step {
        let kind = match &k.op {
            fulgur_ir::Op::Composite(c) if !matches!(c, fulgur_ir::Composite::Fused { .. }) => c.name().to_string(),
            _ => format!("{:?}", k.kind).to_lowercase(),
        };
        let (t, b) = (ms(k.id), bytes(k));
        let e = kinds.entry(kind).or_default();
        e.0 += 1;
        e.1 += t;
        e.2 += b;
        all.0 += 1;
        all.1 += t;
        all.2 += b;
    }
    let mut kinds: Vec<KernelTime> = kinds
        .into_iter()
        .map(|(kind, (calls, ms, bytes))| KernelTime {
            name: "(by kind)".into(),
            op: kind,
            calls,
            ms,
            bytes,
            steps: Vec::new(),
        })
        .collect();
    kinds.sort_by(|a, b| b.ms.partial_cmp(&a.ms).unwrap_or(std::cmp::Ordering::Equal));
    kinds.truncate(n);
    v.extend(kinds);
    v.push(KernelTime {
        name: "(every kernel)".into(),
        op: "all".into(),
        calls: all.0,
        ms: all.1,
        bytes: all.2,
        steps: Vec::new(),
    });
    v
}

/// Greedy decoding on the GPU, `stamp` called at every token; with --top, one more decode step runs
/// profiled (kernel by kernel, an event after each) and its slowest kernels are returned.
#[cfg(feature = "cuda")]
fn decode_cuda(
    args: &Args,
    prefill: &Graph,
    decode: &Graph,
    weights: &HostWeights,
    tokens: &Tensor,
    stamp: &mut dyn FnMut(Instant, usize, usize),
) -> Result<Vec<KernelTime>> {
    use fulgur_runtime::cuda::CudaProfile;
    use fulgur_runtime::Executable;
    use std::collections::HashMap;
    let (mut p, mut d) = crate::cli::model::load_cuda_programs(prefill, decode, weights, !args.eager)?;
    let t0 = Instant::now();
    fulgur_runtime::generate::greedy(&mut p, &mut d, tokens, args.decode, |i, n| stamp(t0, i, n))
        .context("decoding")?;
    if args.top == 0 || args.decode < 2 {
        return Ok(Vec::new());
    }
    // the states the last step left stay on the device; the tokens do not change what the kernels do
    let b = tokens.shape[0];
    let position = (tokens.shape[1] + args.decode - 1) as i64;
    let inputs: HashMap<String, Tensor> = [
        (
            "input_ids".to_string(),
            Tensor::from_i64(fulgur_ir::DType::I64, vec![b, 1], vec![0; b]),
        ),
        (
            "position".to_string(),
            Tensor::from_i64(fulgur_ir::DType::I64, vec![], vec![position]),
        ),
    ]
    .into();
    let carried: Vec<String> = d
        .input_names()
        .into_iter()
        .filter(|n| n != "input_ids" && n != "position")
        .collect();
    d.profile = Some(CudaProfile::default());
    match d.run_carried(&inputs, &carried) {
        Some(r) => {
            r.context("running the profiled decode step")?;
        }
        None => bail!("the decode step cannot keep its states on the device"),
    }
    Ok(cuda_top(&d, args.top))
}

#[cfg(not(feature = "cuda"))]
fn decode_cuda(
    _: &Args,
    _: &Graph,
    _: &Graph,
    _: &HostWeights,
    _: &Tensor,
    _: &mut dyn FnMut(Instant, usize, usize),
) -> Result<Vec<KernelTime>> {
    bail!("this build has no CUDA backend (built without the `cuda` feature): use --target cpu or reference")
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(
    _: &Args,
    _: fulgur_codegen::program::KernelProgram,
    _: &HostWeights,
    _: &Tensor,
    _: &str,
    _: &Progress,
) -> Result<Measured> {
    bail!("this build has no CUDA backend (built without the `cuda` feature): use --target cpu or reference")
}

/// One more training step on a CPU program that kept its state from the last, profiled kernel by kernel: its
/// slowest kernel groups.
#[cfg(feature = "llvm")]
fn profile_cpu_step(
    cpu: &mut fulgur_runtime::cpu::CpuProgram,
    tokens: &Tensor,
    scalars: &[(&str, f64)],
    carried: &[String],
    n: usize,
) -> Result<Vec<KernelTime>> {
    use std::collections::HashMap;
    cpu.profile = Some(fulgur_runtime::cpu::Profile::default());
    let mut inputs: HashMap<String, Tensor> = HashMap::new();
    inputs.insert("input_ids".into(), tokens.clone());
    for (name, v) in scalars {
        inputs.insert(
            name.to_string(),
            Tensor::from_f64(fulgur_ir::DType::F32, vec![], vec![*v]),
        );
    }
    match cpu.run_carried(&inputs, carried) {
        Some(r) => {
            r.context("the profiled step")?;
        }
        None => bail!("the training step cannot keep its state in the program"),
    }
    let Some(p) = &cpu.profile else {
        return Ok(Vec::new());
    };
    let env: HashMap<String, i64> = [
        ("B".to_string(), tokens.shape[0] as i64),
        ("T".to_string(), tokens.shape[1] as i64),
    ]
    .into();
    Ok(top_kernels(
        &cpu.program.step,
        |id| p.kernel_seconds.get(id).copied().unwrap_or(0.0) * 1e3 / p.runs.max(1) as f64,
        |k| kernel_bytes(k, &env),
        n,
    ))
}

/// A table of the slowest kernels under `title`.
fn write_top(s: &mut String, title: &str, top: &[KernelTime]) {
    let _ = writeln!(s, "{title}");
    for k in top {
        // the bandwidth the kernels' views reached (GB/s), where their bytes are known
        let bw = if k.bytes > 0.0 && k.ms > 0.0 {
            format!("{:>7.0} GB/s", k.bytes / k.ms / 1e6)
        } else {
            String::new()
        };
        let _ = writeln!(s, "  {:>9.3}  {:>4}×  {bw:>12}  {}  {}", k.ms, k.calls, k.op, k.name);
    }
}

/// `layers.3.matmul.1` → `layers.*.matmul.1`.
#[cfg(any(feature = "llvm", feature = "cuda"))]
fn strip_layer(name: &str) -> String {
    match name.strip_prefix("layers.") {
        Some(rest) => match rest.split_once('.') {
            Some((_, tail)) => format!("layers.*.{tail}"),
            None => name.to_string(),
        },
        None => name.to_string(),
    }
}

#[cfg(any(feature = "llvm", feature = "cuda"))]
fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let t: String = s.chars().take(n - 1).collect();
        format!("{t}…")
    }
}

#[cfg(all(test, any(feature = "llvm", feature = "cuda")))]
mod tests {
    use super::*;
    use fulgur_codegen::program::{Kernel, TensorRef};
    use fulgur_ir::{DType, Dim, Op, UnaryOp};
    use fulgur_passes::classify::KernelKind;

    fn view(buffer: usize, dtype: DType, shape: &[Dim], strides: &[Dim]) -> TensorRef {
        TensorRef {
            buffer,
            dtype,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            offset: Dim::from(0),
        }
    }

    /// The bandwidth column's bytes: each distinct view's elements once, an axis of stride 0 (a broadcast)
    /// once, a view read twice once, a view read and written in place twice; a size naming an unbound symbol
    /// gives 0 (no bandwidth printed).
    #[test]
    fn kernel_bytes_counts_each_element_once() {
        let (b, t) = (Dim::sym("B"), Dim::sym("T"));
        let x = view(
            0,
            DType::BF16,
            &[b.clone(), t.clone(), Dim::from(8)],
            &[t.clone() * Dim::from(8), Dim::from(8), Dim::from(1)],
        );
        // a row vector broadcast over B and T
        let w = view(
            1,
            DType::F32,
            &[b.clone(), t.clone(), Dim::from(8)],
            &[Dim::from(0), Dim::from(0), Dim::from(1)],
        );
        let out = view(
            2,
            DType::F32,
            &[b.clone(), t.clone(), Dim::from(8)],
            &[t.clone() * Dim::from(8), Dim::from(8), Dim::from(1)],
        );
        let k = Kernel {
            id: 0,
            name: "k".into(),
            kind: KernelKind::Elementwise,
            op: Op::Unary(UnaryOp::Exp),
            inputs: vec![x.clone(), w, x],
            outputs: vec![out],
            code: 0,
            stream: 0,
            waits: Vec::new(),
        };
        let env: std::collections::HashMap<String, i64> = [("B".to_string(), 2), ("T".to_string(), 3)].into();
        // x: 2·3·8 bf16 once (read twice), w: 8 f32, out: 2·3·8 f32
        assert_eq!(kernel_bytes(&k, &env), (48 * 2 + 8 * 4 + 48 * 4) as f64);
        // updated in place (read and written, as AdamW's state is): a read and a write
        let mut inplace = k.clone();
        inplace.outputs = vec![inplace.inputs[0].clone()];
        assert_eq!(kernel_bytes(&inplace, &env), (48 * 2 + 8 * 4 + 48 * 2) as f64);
        let partial: std::collections::HashMap<String, i64> = [("B".to_string(), 2)].into();
        assert_eq!(kernel_bytes(&k, &partial), 0.0);
    }
}
