//! Sharded programs run by the commands (`train`, `generate`; `docs/parallelism.md` §5.5): every rank on its own
//! thread of this process (simulated ranks, `runtime::ranks::RankThreads`), or, when a launcher started this
//! process (`fulgur launch`, torchrun, Slurm, Open MPI), this process's rank alone with its collectives over the
//! job's transport (`runtime::ranks::LaunchedRank`): TCP through the rendezvous, or NCCL on the cuda target with
//! `FULGUR_TRANSPORT=nccl`.

use crate::cli::bench::BenchTarget;
use anyhow::Result;
use fulgur::parallel::Parallel;
use fulgur_ir::{Graph, Precision, Tensor};
use fulgur_runtime::ranks::{InterpretedRank, LaunchedRank, RankEnv, RankProgram, RankThreads};
use fulgur_runtime::Executable;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The transport of a launched process.
pub(crate) type Shared = Arc<dyn fulgur_ir::Transport + Send + Sync>;

/// How long a rank waits for the others at a collective: `FULGUR_RANK_TIMEOUT` seconds, default 600.
pub(crate) fn rank_timeout() -> Duration {
    Duration::from_secs(
        std::env::var("FULGUR_RANK_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600),
    )
}

/// This process's place when a launcher started it, with its transport connected (every rank of the job meets
/// at the rendezvous here); `None` when no launcher's variables are set. A job of another size than the
/// degrees' ranks is refused with both numbers.
pub(crate) fn launched(par: &Parallel, target: BenchTarget, precision: Precision) -> Result<Option<(RankEnv, Shared)>> {
    let Some(env) = RankEnv::from_env().map_err(|e| anyhow::anyhow!(e))? else {
        return Ok(None);
    };
    if env.world != par.ranks() {
        anyhow::bail!(
            "launched as {} ranks ({}'s variables) but --parallel {par} needs {}",
            env.world,
            env.source,
            par.ranks()
        );
    }
    let t = transport(&env, &par.mesh().sizes(), target == BenchTarget::Cuda, precision)
        .map_err(|e| anyhow::anyhow!("rank {}: {e}", env.rank))?;
    Ok(Some((env, t)))
}

/// This process's place in a job of pipeline stages (`par.pp > 1`) when a launcher started it, with the job's
/// transport connected (TCP through the rendezvous, whatever the target: it carries the job's host-side
/// collectives, the stages' addresses and, in training, the step's shared losses and gradients;
/// `pipeline::PipelineProcess`); `None` when no launcher's variables are set. A job of another size than the
/// stages' ranks is refused with both numbers.
pub(crate) fn launched_pipeline(
    par: &Parallel,
    precision: Precision,
) -> Result<Option<(RankEnv, Arc<fulgur_runtime::ranks::TcpTransport>)>> {
    let Some(env) = RankEnv::from_env().map_err(|e| anyhow::anyhow!(e))? else {
        return Ok(None);
    };
    if env.world != par.total_ranks() {
        anyhow::bail!(
            "launched as {} ranks ({}'s variables) but --parallel {par} needs {} ({} pipeline stages of {})",
            env.world,
            env.source,
            par.total_ranks(),
            par.pp,
            par.ranks()
        );
    }
    let job = fulgur_runtime::ranks::TcpTransport::connect(&env, precision, rank_timeout())
        .map_err(|e| anyhow::anyhow!("rank {}: {e}", env.rank))?;
    Ok(Some((env, Arc::new(job))))
}

/// A launched rank's transport: NCCL on a GPU program with `FULGUR_TRANSPORT=nccl`, else TCP through the
/// rendezvous at `MASTER_ADDR:MASTER_PORT`, its collectives computed at `precision` (the programs').
pub(crate) fn transport(env: &RankEnv, mesh: &[usize], cuda: bool, precision: Precision) -> Result<Shared> {
    if cuda && std::env::var("FULGUR_TRANSPORT").is_ok_and(|v| v == "nccl") {
        return nccl(env, mesh);
    }
    Ok(Arc::new(
        fulgur_runtime::ranks::TcpTransport::connect(env, precision, rank_timeout()).map_err(|e| anyhow::anyhow!(e))?,
    ))
}

#[cfg(feature = "cuda")]
fn nccl(env: &RankEnv, mesh: &[usize]) -> Result<Shared> {
    Ok(Arc::new(
        fulgur_runtime::nccl::NcclTransport::connect(env, mesh, 0, rank_timeout()).map_err(|e| anyhow::anyhow!(e))?,
    ))
}

#[cfg(not(feature = "cuda"))]
fn nccl(_: &RankEnv, _: &[usize]) -> Result<Shared> {
    anyhow::bail!("FULGUR_TRANSPORT=nccl: this build has no CUDA backend (built without the `cuda` feature)")
}

/// Whether any rank of a launched job wants to stop (its Ctrl-C; `stop`), agreed by every rank after the same
/// step: a sum over each axis of the mesh in turn (one group collective per axis, which both transports run), so
/// the ranks stop together and rank 0 writes the interrupt checkpoint. `FULGUR_STOP_AFTER=RANK:STEP` makes rank
/// `RANK` ask to stop after step `STEP`, for tests.
pub(crate) fn agree(
    t: &(dyn fulgur_ir::Transport + Send + Sync),
    rank: usize,
    mesh: &[usize],
    stop: bool,
    step: u64,
) -> Result<bool> {
    use fulgur_ir::{Composite, Op};
    let forced = std::env::var("FULGUR_STOP_AFTER").ok().is_some_and(|v| {
        let mut it = v.split(':').map(|x| x.trim().parse::<u64>().ok());
        matches!((it.next().flatten(), it.next().flatten()), (Some(r), Some(s)) if r == rank as u64 && s == step)
    });
    let mut x = Tensor::from_f64(
        fulgur_ir::DType::F32,
        vec![1],
        vec![f64::from(u8::from(stop || forced))],
    );
    for over in 0..mesh.len() {
        let op = Op::Composite(Composite::AllReduce {
            mesh: mesh.to_vec(),
            over,
        });
        x = t
            .collective(&op, rank, &[&x])
            .map_err(|e| anyhow::anyhow!(e))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("an all-reduce gave nothing"))?;
    }
    Ok(x.to_f64()[0] > 0.0)
}

/// Rank program `g` built for `target` with its parameters from `fetch`; `threads` CPU threads; `interp` the
/// reference interpreter's precision and memory budget.
#[cfg_attr(not(feature = "llvm"), allow(unused_variables))]
pub(crate) fn rank_program(
    g: Graph,
    target: BenchTarget,
    interp: fulgur_ir::Interpreter,
    threads: usize,
    fetch: &dyn Fn(&str) -> std::result::Result<Tensor, String>,
) -> std::result::Result<Box<dyn RankProgram>, String> {
    match target {
        BenchTarget::Reference => {
            let weights: HashMap<String, Tensor> = g
                .params()
                .into_iter()
                .filter_map(|id| g.node(id).op.input_decl().map(|(n, _, _)| n.to_string()))
                .map(|n| fetch(&n).map(|t| (n, t)))
                .collect::<std::result::Result<_, _>>()?;
            Ok(Box::new(InterpretedRank {
                graph: g,
                precision: interp.precision,
                memory_limit: interp.memory_limit,
                weights,
            }))
        }
        #[cfg(feature = "llvm")]
        BenchTarget::Cpu => {
            use fulgur_runtime::cpu::{CpuOptions, CpuProgram};
            let p = fulgur_codegen::program::lower(&g).map_err(|e| e.to_string())?;
            let opts = CpuOptions {
                threads: Some(threads),
                ..Default::default()
            };
            let mut cpu = CpuProgram::new(p, opts).map_err(|e| e.to_string())?;
            cpu.load_weights_from(|name, _| fetch(name))
                .map_err(|e| e.to_string())?;
            Ok(Box::new(cpu))
        }
        #[cfg(feature = "cuda")]
        BenchTarget::Cuda => {
            use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
            let p = fulgur_codegen::program::lower(&g).map_err(|e| e.to_string())?;
            let mut gpu = CudaProgram::new(p, CudaOptions::default()).map_err(|e| e.to_string())?;
            gpu.load_weights_from(|name, _| fetch(name))
                .map_err(|e| e.to_string())?;
            Ok(Box::new(gpu))
        }
        #[allow(unreachable_patterns)]
        t => Err(format!("this build has no {t:?} backend")),
    }
}

/// The ranks whose programs this process builds: its own when launched, else all of them.
pub(crate) fn local_ranks(par: &Parallel, launch: Option<&(RankEnv, Shared)>) -> Vec<usize> {
    match launch {
        Some((env, _)) => vec![env.rank],
        None => (0..par.ranks()).collect(),
    }
}

/// `programs` (one per rank of [`local_ranks`], in order) as one executable for `target` with the parameters in
/// `weights`: on simulated ranks (a thread each), or this launched process's rank. `interp` is the reference
/// interpreter's precision and memory budget (the precision the simulated collectives compute at too).
pub(crate) fn executable(
    what: &str,
    programs: Vec<Graph>,
    target: BenchTarget,
    interp: fulgur_ir::Interpreter,
    weights: Arc<HashMap<String, Tensor>>,
    launch: Option<&(RankEnv, Shared)>,
) -> Result<Box<dyn Executable>> {
    let n = programs.len();
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let fetch = move |name: &str| {
        weights
            .get(name)
            .cloned()
            .ok_or_else(|| format!("weight `{name}` is missing"))
    };
    if let Some((env, t)) = launch {
        let g = programs
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no program for rank {}", env.rank))?;
        let p = rank_program(g, target, interp, cores, &fetch)
            .map_err(|e| anyhow::anyhow!("rank {}: building {what}: {e}", env.rank))?;
        return Ok(Box::new(LaunchedRank::new(what, p, t.clone())));
    }
    let programs = Arc::new(programs);
    let make = move |r: usize| rank_program(programs[r].clone(), target, interp, (cores / n).max(1), &fetch);
    Ok(Box::new(
        RankThreads::new(what, n, interp.precision, rank_timeout(), make)
            .map_err(|e| anyhow::anyhow!("running on simulated ranks: {e}").context(format!("building {what}")))?,
    ))
}
