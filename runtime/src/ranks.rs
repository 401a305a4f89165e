//! Simulated ranks (`docs/parallelism.md`, §5): every rank's program on its own thread, their collectives
//! (`on_rank`) through shared memory.
//!
//! [`SimTransport`] is the exact, deterministic transport: each collective waits for every rank's inputs, stacks
//! them along a leading rank axis, runs the collective's own definition on the stack (the interpreter, at the
//! programs' precision: sums in rank order, as the simulated graph computes them) and hands each rank its slice.
//! So the ranks' programs give bit for bit what the simulated graph gives. A rank that fails (its program errs)
//! fails the others at their next collective, naming it; a rank that does not arrive within the timeout fails the
//! others naming it and the collective they waited at.

use fulgur_ir::tensor::Buffer;
use fulgur_ir::{Graph, Interpreter, Op, Precision, Tensor, Transport};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

struct State {
    /// Collectives completed so far (the sequence number of the one being gathered).
    done: u64,
    args: Vec<Option<(Op, Vec<Tensor>)>>,
    results: Vec<Option<Vec<Tensor>>>,
    failed: Option<String>,
    /// Ranks a collective answered with an error (another rank's failure, a timeout, the collective's own).
    answered_err: Vec<bool>,
    /// Ranks that failed on their own: an error of their program, not one a collective handed them.
    own: Vec<bool>,
}

/// The shared-memory transport of [`run_ranks`].
pub struct SimTransport {
    ranks: usize,
    precision: Precision,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

impl SimTransport {
    pub fn new(ranks: usize, precision: Precision, timeout: Duration) -> SimTransport {
        SimTransport {
            ranks,
            precision,
            timeout,
            state: Mutex::new(State {
                done: 0,
                args: vec![None; ranks],
                results: vec![None; ranks],
                failed: None,
                answered_err: vec![false; ranks],
                own: vec![false; ranks],
            }),
            cv: Condvar::new(),
        }
    }

    /// Whether rank `rank` failed on its own (its program's error, marked by [`SimTransport::fail`]), not by an
    /// error a collective handed it.
    pub fn failed_on_its_own(&self, rank: usize) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .own
            .get(rank)
            .copied()
            .unwrap_or(false)
    }

    /// Marks rank `rank` failed: the others fail at their next collective instead of waiting for it.
    pub fn fail(&self, rank: usize, why: &str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.answered_err[rank] {
            s.own[rank] = true;
        }
        if s.failed.is_none() {
            s.failed = Some(format!("rank {rank} failed: {why}"));
        }
        self.cv.notify_all();
    }

    /// The collective on every rank's inputs stacked along a leading rank axis, by its definition (the
    /// interpreter at `precision`): what both transports compute.
    fn compute(ranks: usize, precision: Precision, op: &Op, args: &[Vec<Tensor>]) -> Result<Vec<Vec<Tensor>>, String> {
        let n_in = args[0].len();
        let mut g = Graph::new("collective");
        let mut feed = HashMap::new();
        let mut ins = Vec::new();
        for i in 0..n_in {
            let t0 = &args[0][i];
            let mut shape = vec![ranks];
            shape.extend(&t0.shape);
            let mut data = match &t0.data {
                Buffer::F(_) => Buffer::F(Vec::new()),
                Buffer::I(_) => Buffer::I(Vec::new()),
                Buffer::B(_) => Buffer::B(Vec::new()),
            };
            for a in args {
                if a[i].shape != t0.shape || a[i].dtype != t0.dtype {
                    return Err(format!(
                        "the ranks give `{}` input {i} of different types: {:?} and {:?}",
                        op.name(),
                        t0.shape,
                        a[i].shape
                    ));
                }
                // the values as they are (a rank's f32 value held in f64 by the interpreter stays unrounded)
                match (&mut data, &a[i].data) {
                    (Buffer::F(d), Buffer::F(v)) => d.extend(v),
                    (Buffer::I(d), Buffer::I(v)) => d.extend(v),
                    (Buffer::B(d), Buffer::B(v)) => d.extend(v),
                    _ => return Err("a tensor whose storage disagrees with its dtype".into()),
                }
            }
            let name = format!("x{i}");
            let dims = shape.iter().map(|&d| fulgur_ir::Dim::from(d)).collect();
            ins.push(g.input(&name, t0.dtype, dims).map_err(|e| e.to_string())?);
            feed.insert(
                name,
                Tensor {
                    dtype: t0.dtype,
                    shape,
                    data,
                },
            );
        }
        let outs = g.op(op.clone(), &ins).map_err(|e| e.to_string())?;
        for (i, v) in outs.iter().enumerate() {
            g.add_output(format!("y{i}"), *v).map_err(|e| e.to_string())?;
        }
        let r = Interpreter::new(precision).run(&g, &feed).map_err(|e| e.to_string())?;
        let mut per_rank = vec![Vec::new(); ranks];
        for i in 0..outs.len() {
            let y = &r[&format!("y{i}")];
            let shape = y.shape[1..].to_vec();
            let n: usize = shape.iter().product();
            for (k, p) in per_rank.iter_mut().enumerate() {
                let data = match &y.data {
                    Buffer::F(v) => Buffer::F(v[k * n..(k + 1) * n].to_vec()),
                    Buffer::I(v) => Buffer::I(v[k * n..(k + 1) * n].to_vec()),
                    Buffer::B(v) => Buffer::B(v[k * n..(k + 1) * n].to_vec()),
                };
                p.push(Tensor {
                    dtype: y.dtype,
                    shape: shape.clone(),
                    data,
                });
            }
        }
        Ok(per_rank)
    }
}

impl Transport for SimTransport {
    fn collective(&self, op: &Op, rank: usize, args: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        let out = self.exchange(op, rank, args);
        if out.is_err() {
            self.state.lock().unwrap_or_else(|e| e.into_inner()).answered_err[rank] = true;
        }
        out
    }
}

impl SimTransport {
    fn exchange(&self, op: &Op, rank: usize, args: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = &s.failed {
            return Err(f.clone());
        }
        let seq = s.done;
        s.args[rank] = Some((op.clone(), args.iter().map(|&t| t.clone()).collect()));
        if s.args.iter().all(Option::is_some) {
            // the last to arrive runs the collective for everyone
            let all: Vec<(Op, Vec<Tensor>)> = s.args.iter_mut().map(|a| a.take().expect("arrived")).collect();
            if let Some((r, (other, _))) = all.iter().enumerate().find(|(_, (o, _))| o != &all[0].0) {
                let f = format!(
                    "the ranks disagree at collective #{seq}: rank 0 runs `{}`, rank {r} runs `{}`",
                    all[0].0.name(),
                    other.name()
                );
                s.failed = Some(f.clone());
                self.cv.notify_all();
                return Err(f);
            }
            let stacked: Vec<Vec<Tensor>> = all.into_iter().map(|(_, a)| a).collect();
            let computed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                SimTransport::compute(self.ranks, self.precision, op, &stacked)
            }))
            .unwrap_or_else(|_| Err("the collective panicked".into()));
            match computed {
                Ok(res) => {
                    for (slot, r) in s.results.iter_mut().zip(res) {
                        *slot = Some(r);
                    }
                }
                Err(e) => s.failed = Some(format!("collective #{seq} (`{}`): {e}", op.name())),
            }
            s.done += 1;
            self.cv.notify_all();
        } else {
            let start = Instant::now();
            while s.done == seq && s.failed.is_none() {
                let left = self.timeout.saturating_sub(start.elapsed());
                if left.is_zero() {
                    let missing: Vec<String> = (0..self.ranks)
                        .filter(|&r| s.args[r].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    let f = format!(
                        "rank(s) {} did not reach collective #{seq} (`{}`) within {:.1} s",
                        missing.join(", "),
                        op.name(),
                        self.timeout.as_secs_f64()
                    );
                    s.failed = Some(f.clone());
                    self.cv.notify_all();
                    return Err(f);
                }
                s = self.cv.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
        if let Some(f) = &s.failed {
            return Err(f.clone());
        }
        s.results[rank]
            .take()
            .ok_or_else(|| format!("collective #{seq}: no result for rank {rank}"))
    }
}

/// Runs `rank(r, transport)` for every rank `r` on its own thread, the ranks' collectives through one
/// [`SimTransport`] at `precision`: a rank that errs or panics fails the others at their next collective.
/// Returns each rank's outputs, or the failure of the first rank (by index) that failed on its own rather than
/// by an error a collective handed it (else the first error), naming it.
pub fn on_threads<F>(
    ranks: usize,
    precision: Precision,
    timeout: Duration,
    rank: F,
) -> Result<Vec<BTreeMap<String, Tensor>>, String>
where
    F: Fn(usize, std::sync::Arc<SimTransport>) -> Result<BTreeMap<String, Tensor>, String> + Sync,
{
    let t = std::sync::Arc::new(SimTransport::new(ranks, precision, timeout));
    let results: Vec<Result<BTreeMap<String, Tensor>, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                let (t, rank) = (t.clone(), &rank);
                sc.spawn(move || {
                    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rank(r, t.clone())))
                        .unwrap_or_else(|_| Err("its program panicked".into()));
                    if let Err(e) = &out {
                        t.fail(r, e);
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| h.join().unwrap_or_else(|_| Err(format!("rank {r} panicked"))))
            .collect()
    });
    first_failure(&t, results)
}

/// Every rank's outputs, or the failure of the first rank (by index) that failed on its own rather than by an
/// error a collective handed it (else the first error), naming it.
fn first_failure(
    t: &SimTransport,
    results: Vec<Result<BTreeMap<String, Tensor>, String>>,
) -> Result<Vec<BTreeMap<String, Tensor>>, String> {
    let own = t.state.lock().unwrap_or_else(|e| e.into_inner()).own.clone();
    let first = (0..results.len()).find(|&r| own[r] && results[r].is_err());
    if let Some(r) = first.or_else(|| results.iter().position(Result::is_err)) {
        if let Err(e) = &results[r] {
            return Err(format!("rank {r}: {e}"));
        }
    }
    results
        .into_iter()
        .map(|x| x.map_err(|e| format!("a rank: {e}")))
        .collect()
}

/// One rank's program as [`RankThreads`] runs it: on the rank's own thread, its collectives through `t`.
pub trait RankProgram {
    /// The data inputs the program takes, not its parameters (every rank's program takes the same).
    fn input_names(&self) -> Vec<String>;
    /// Runs the program once on the inputs of `feed` it takes.
    fn run_rank(
        &mut self,
        feed: &HashMap<String, Tensor>,
        t: std::sync::Arc<dyn Transport + Send + Sync>,
    ) -> Result<BTreeMap<String, Tensor>, String>;
}

/// A rank's program on the reference interpreter, with its weights (parameters by name) held between calls.
pub struct InterpretedRank {
    pub graph: Graph,
    pub precision: Precision,
    /// The interpreter's memory budget ([`Interpreter::memory_limit`]).
    pub memory_limit: Option<u64>,
    pub weights: HashMap<String, Tensor>,
}

impl RankProgram for InterpretedRank {
    fn input_names(&self) -> Vec<String> {
        self.graph
            .inputs()
            .into_iter()
            .filter_map(|id| match self.graph.node(id).op.input_decl() {
                Some((n, _, false)) => Some(n.to_string()),
                _ => None,
            })
            .collect()
    }
    fn run_rank(
        &mut self,
        feed: &HashMap<String, Tensor>,
        t: std::sync::Arc<dyn Transport + Send + Sync>,
    ) -> Result<BTreeMap<String, Tensor>, String> {
        let interp = Interpreter {
            precision: self.precision,
            memory_limit: self.memory_limit,
        };
        if self.weights.is_empty() {
            return interp.run_on(&self.graph, feed, &*t).map_err(|e| e.to_string());
        }
        // the call's inputs join the weights for the run (one of a weight's name stands in for it) and leave after,
        // even if the run panics (the weights are never copied)
        let mut displaced = Vec::new();
        for (n, v) in feed {
            displaced.push((n.clone(), self.weights.insert(n.clone(), v.clone())));
        }
        let (graph, weights) = (&self.graph, &self.weights);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| interp.run_on(graph, weights, &*t)));
        for (n, old) in displaced {
            match old {
                Some(w) => self.weights.insert(n, w),
                None => self.weights.remove(&n),
            };
        }
        match out {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("its program panicked".into()),
        }
    }
}

/// `RankProgram` for a compiled backend's program: its kernel program's inputs, fed by name, its collectives
/// through the rank's transport.
macro_rules! compiled_rank_program {
    ($feature:literal, $ty:ty) => {
        #[cfg(feature = $feature)]
        impl RankProgram for $ty {
            fn input_names(&self) -> Vec<String> {
                self.program.inputs.iter().map(|io| io.name.clone()).collect()
            }
            fn run_rank(
                &mut self,
                feed: &HashMap<String, Tensor>,
                t: std::sync::Arc<dyn Transport + Send + Sync>,
            ) -> Result<BTreeMap<String, Tensor>, String> {
                self.set_transport(t);
                let inputs = inputs_from(&self.program.inputs, feed);
                self.run(&inputs).map_err(|e| e.to_string())
            }
        }
    };
}

compiled_rank_program!("llvm", crate::cpu::CpuProgram);
compiled_rank_program!("cuda", crate::cuda::CudaProgram);

/// A rank's outputs, or why it failed.
type RankResult = Result<BTreeMap<String, Tensor>, String>;

/// What a rank's thread is asked: run on these inputs through this transport.
type Job = (std::sync::Arc<HashMap<String, Tensor>>, std::sync::Arc<SimTransport>);

/// Simulated ranks that live from call to call (a training loop's steps, a generation's decode steps): a thread
/// per rank owns its program, built on that thread (a JIT-compiled or GPU program is made, and stays, where it
/// runs), and every call runs all ranks on the same inputs with a fresh [`SimTransport`]. As an
/// [`Executable`](crate::Executable) it returns rank 0's outputs: the sharding pass makes every output
/// replicated, so every rank holds the same. A rank that fails fails the call, named as [`on_threads`] names it.
pub struct RankThreads {
    name: String,
    inputs: Vec<String>,
    precision: Precision,
    timeout: Duration,
    jobs: Vec<std::sync::mpsc::Sender<Job>>,
    results: std::sync::mpsc::Receiver<(usize, RankResult)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RankThreads {
    /// Starts `ranks` threads, thread `r` building its program with `make(r)`; fails naming the first rank whose
    /// program could not be made. `precision` is the transport's (the programs' own precision).
    pub fn new<F>(
        name: &str,
        ranks: usize,
        precision: Precision,
        timeout: Duration,
        make: F,
    ) -> Result<RankThreads, String>
    where
        F: Fn(usize) -> Result<Box<dyn RankProgram>, String> + Send + Sync + 'static,
    {
        let make = std::sync::Arc::new(make);
        let (out_tx, results) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for r in 0..ranks {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            jobs.push(tx);
            let (make, out_tx, ready_tx) = (make.clone(), out_tx.clone(), ready_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("rank{r}"))
                .spawn(move || {
                    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make(r)))
                        .unwrap_or_else(|_| Err("building its program panicked".into()));
                    let mut program = match built {
                        Ok(p) => {
                            let _ = ready_tx.send((r, Ok(p.input_names())));
                            p
                        }
                        Err(e) => {
                            let _ = ready_tx.send((r, Err(e)));
                            return;
                        }
                    };
                    while let Ok((feed, t)) = rx.recv() {
                        let shared: std::sync::Arc<dyn Transport + Send + Sync> = t.clone();
                        let out =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| program.run_rank(&feed, shared)))
                                .unwrap_or_else(|_| Err("its program panicked".into()));
                        if let Err(e) = &out {
                            t.fail(r, e);
                        }
                        if out_tx.send((r, out)).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| format!("cannot start rank {r}'s thread: {e}"))?;
            threads.push(spawned);
        }
        drop(ready_tx);
        let mut built: Vec<Option<Result<Vec<String>, String>>> = vec![None; ranks];
        for _ in 0..ranks {
            match ready.recv() {
                Ok((r, b)) => built[r] = Some(b),
                Err(_) => break,
            }
        }
        let mut inputs = Vec::new();
        for (r, b) in built.into_iter().enumerate() {
            match b {
                Some(Ok(names)) if r == 0 => inputs = names,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("rank {r}: {e}")),
                None => return Err(format!("rank {r}: its thread ended before its program was built")),
            }
        }
        Ok(RankThreads {
            name: format!("{name} on {ranks} simulated ranks"),
            inputs,
            precision,
            timeout,
            jobs,
            results,
            threads,
        })
    }

    /// The number of ranks.
    pub fn ranks(&self) -> usize {
        self.jobs.len()
    }

    /// Runs every rank once on `feed`: each rank's outputs, or the failure naming the rank.
    pub fn run_all(&mut self, feed: &HashMap<String, Tensor>) -> Result<Vec<BTreeMap<String, Tensor>>, String> {
        let n = self.jobs.len();
        let t = std::sync::Arc::new(SimTransport::new(n, self.precision, self.timeout));
        let feed = std::sync::Arc::new(feed.clone());
        for (r, j) in self.jobs.iter().enumerate() {
            j.send((feed.clone(), t.clone()))
                .map_err(|_| format!("rank {r}: its thread has ended"))?;
        }
        let mut results: Vec<Result<BTreeMap<String, Tensor>, String>> =
            (0..n).map(|_| Err("it did not answer".to_string())).collect();
        for _ in 0..n {
            let (r, out) = self
                .results
                .recv()
                .map_err(|_| "the ranks' threads have ended".to_string())?;
            results[r] = out;
        }
        first_failure(&t, results)
    }
}

impl crate::Executable for RankThreads {
    fn name(&self) -> &str {
        &self.name
    }
    fn input_names(&self) -> Vec<String> {
        self.inputs.clone()
    }
    fn run(&mut self, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, crate::RuntimeError> {
        let mut outs = self
            .run_all(inputs)
            .map_err(|e| crate::RuntimeError::Other(format!("running on simulated ranks: {e}")))?;
        Ok(outs.swap_remove(0))
    }
}

/// This process's rank of a launched job (`fulgur launch`, torchrun, Slurm, Open MPI) as an
/// [`Executable`](crate::Executable): its program run on the calling thread, its collectives through the job's
/// transport (shared by every executable of the process, in the same order on every rank). Every rank returns
/// its own outputs, which the sharding pass made the same on every rank.
pub struct LaunchedRank {
    name: String,
    program: Box<dyn RankProgram>,
    transport: std::sync::Arc<dyn Transport + Send + Sync>,
}

impl LaunchedRank {
    pub fn new(
        name: &str,
        program: Box<dyn RankProgram>,
        transport: std::sync::Arc<dyn Transport + Send + Sync>,
    ) -> LaunchedRank {
        LaunchedRank {
            name: name.to_string(),
            program,
            transport,
        }
    }
}

impl crate::Executable for LaunchedRank {
    fn name(&self) -> &str {
        &self.name
    }
    fn input_names(&self) -> Vec<String> {
        self.program.input_names()
    }
    fn run(&mut self, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, crate::RuntimeError> {
        self.program
            .run_rank(inputs, self.transport.clone())
            .map_err(crate::RuntimeError::Other)
    }
}

impl Drop for RankThreads {
    fn drop(&mut self) {
        self.jobs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The inputs of a compiled rank's program taken from `feed` by name.
pub fn inputs_from(ios: &[fulgur_codegen::program::Io], feed: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    ios.iter()
        .filter_map(|io| feed.get(&io.name).map(|v| (io.name.clone(), v.clone())))
        .collect()
}

/// Runs `programs[r]` (rank `r`'s program, as the per-rank lowering writes it) on its own thread with the
/// interpreter at `precision`, every rank fed `feed` (see [`on_threads`]).
pub fn run_ranks(
    programs: &[Graph],
    feed: &HashMap<String, Tensor>,
    precision: Precision,
    timeout: Duration,
) -> Result<Vec<BTreeMap<String, Tensor>>, String> {
    on_threads(programs.len(), precision, timeout, |r, t| {
        Interpreter::new(precision)
            .run_on(&programs[r], feed, &*t)
            .map_err(|e| e.to_string())
    })
}

/// A rank's place in a job started by a launcher: from torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, Slurm's
/// `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` or Open MPI's `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`,
/// `OMPI_COMM_WORLD_LOCAL_RANK` (in that order of precedence), and the rendezvous at `MASTER_ADDR:MASTER_PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Which launcher's variables were read.
    pub source: &'static str,
}

impl RankEnv {
    /// The job's rank from the process environment: `None` when no launcher variables are set.
    pub fn from_env() -> Result<Option<RankEnv>, String> {
        RankEnv::from_vars(&|k| std::env::var(k).ok())
    }

    /// [`RankEnv::from_env`] over any variable lookup (tests).
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<RankEnv>, String> {
        let families: [(&'static str, [&str; 3]); 3] = [
            ("torchrun", ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
            ("Slurm", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]),
            (
                "Open MPI",
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                ],
            ),
        ];
        let Some((source, [r, w, l])) = families.into_iter().find(|(_, v)| get(v[0]).is_some()) else {
            return Ok(None);
        };
        let num = |k: &str, need: bool| -> Result<Option<usize>, String> {
            match get(k) {
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| format!("{source}'s `{k}` must be a whole number, found `{v}`")),
                None if need => Err(format!("{source}'s `{k}` is not set (it is read with `{r}`)")),
                None => Ok(None),
            }
        };
        let rank = num(r, true)?.expect("needed");
        let world = num(w, true)?.expect("needed");
        let local_rank = num(l, false)?.unwrap_or(rank);
        if world == 0 || rank >= world {
            return Err(format!("{source}'s `{r}`={rank} is not a rank of `{w}`={world}"));
        }
        let master_addr = get("MASTER_ADDR").ok_or_else(|| {
            format!("`MASTER_ADDR` is not set: the ranks meet at MASTER_ADDR:MASTER_PORT ({source} job)")
        })?;
        let port = get("MASTER_PORT").ok_or_else(|| {
            format!("`MASTER_PORT` is not set: the ranks meet at MASTER_ADDR:MASTER_PORT ({source} job)")
        })?;
        let master_port = port
            .trim()
            .parse::<u16>()
            .map_err(|_| format!("`MASTER_PORT` must be a port number, found `{port}`"))?;
        Ok(Some(RankEnv {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
            source,
        }))
    }
}

/// The largest frame a rank accepts (16 GiB): a tensor of a collective, or a message's header.
const MAX_FRAME: u64 = 16 << 30;

/// Frames on a stream: a little-endian `u64` length, then that many bytes.
fn write_frame(s: &mut std::net::TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)
}

fn read_frame(s: &mut std::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {n} bytes, more than {MAX_FRAME} (not a rank of this job?)"),
        ));
    }
    let mut buf = Vec::new();
    buf.try_reserve_exact(n as usize)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::OutOfMemory, format!("a frame of {n} bytes: {e}")))?;
    buf.resize(n as usize, 0);
    s.read_exact(&mut buf)?;
    Ok(buf)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    dtype: fulgur_ir::DType,
    shape: Vec<usize>,
}

/// Tensors as frames: their types as JSON, then each one's values as they are held (f64, i64, or a byte per
/// bool), so that a value crosses ranks unrounded.
fn send_tensors(s: &mut std::net::TcpStream, header: serde_json::Value, ts: &[&Tensor]) -> std::io::Result<()> {
    let metas: Vec<Meta> = ts
        .iter()
        .map(|t| Meta {
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let head = serde_json::json!({ "head": header, "tensors": metas });
    write_frame(s, head.to_string().as_bytes())?;
    for t in ts {
        let bytes: Vec<u8> = match &t.data {
            Buffer::F(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Buffer::I(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Buffer::B(v) => v.iter().map(|&b| u8::from(b)).collect(),
        };
        write_frame(s, &bytes)?;
    }
    Ok(())
}

/// A stream's failure as a message: an end of stream where a frame was due is the peer's connection closing.
fn io_text(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "its connection closed".to_string()
    } else {
        e.to_string()
    }
}

fn recv_tensors(s: &mut std::net::TcpStream) -> Result<(serde_json::Value, Vec<Tensor>), String> {
    let head = read_frame(s).map_err(io_text)?;
    let head: serde_json::Value = serde_json::from_slice(&head).map_err(|e| format!("a malformed message: {e}"))?;
    let metas: Vec<Meta> =
        serde_json::from_value(head["tensors"].clone()).map_err(|e| format!("a malformed message: {e}"))?;
    let mut ts = Vec::new();
    for m in metas {
        let bytes = read_frame(s).map_err(io_text)?;
        let n: usize = m.shape.iter().product();
        let data = if m.dtype.is_float() {
            Buffer::F(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            )
        } else if m.dtype.is_int() {
            Buffer::I(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            )
        } else {
            Buffer::B(bytes.iter().map(|&b| b != 0).collect())
        };
        let got = match &data {
            Buffer::F(v) => v.len(),
            Buffer::I(v) => v.len(),
            Buffer::B(v) => v.len(),
        };
        if got != n {
            return Err(format!("a tensor of shape {:?} with {got} values", m.shape));
        }
        ts.push(Tensor {
            dtype: m.dtype,
            shape: m.shape,
            data,
        });
    }
    Ok((head["head"].clone(), ts))
}

/// The transport of ranks in separate processes (started by `fulgur launch` or another launcher): every rank
/// connects to rank 0 at `MASTER_ADDR:MASTER_PORT`; at each collective the ranks send their inputs to rank 0,
/// which computes it as [`SimTransport`] does (the collective's definition on the stacked inputs, exact and
/// deterministic) and sends each its slice. Rank 0 names a rank that disconnects (it exited or failed) or does
/// not answer within the timeout, and every other rank fails with that message rather than waiting.
pub struct TcpTransport {
    rank: usize,
    world: usize,
    precision: Precision,
    timeout: Duration,
    /// Rank 0: a stream per other rank (index = rank; its own is `None`). Others: the stream to rank 0.
    streams: Mutex<Vec<Option<std::net::TcpStream>>>,
    seq: Mutex<u64>,
}

impl TcpTransport {
    /// Meets the other ranks at the rendezvous (rank 0 listens, the others connect, retrying until `timeout`).
    pub fn connect(env: &RankEnv, precision: Precision, timeout: Duration) -> Result<TcpTransport, String> {
        use std::net::{TcpListener, TcpStream, ToSocketAddrs};
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let deadline = Instant::now() + timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..env.world).map(|_| None).collect();
        if env.rank == 0 {
            let listener = TcpListener::bind(&addr).map_err(|e| format!("rank 0 cannot listen at {addr}: {e}"))?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut joined = 1;
            while joined < env.world {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        s.set_nonblocking(false).map_err(|e| e.to_string())?;
                        s.set_nodelay(true).ok();
                        // a greeting is due at once: a silent or stray peer is dropped, not waited for
                        let left = deadline
                            .saturating_duration_since(Instant::now())
                            .max(Duration::from_millis(50));
                        s.set_read_timeout(Some(left.min(Duration::from_secs(10)))).ok();
                        let hello = read_frame(&mut s)
                            .ok()
                            .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok());
                        let Some(hello) = hello else {
                            eprintln!("rank 0: a connection from {peer} sent no greeting; dropped");
                            continue;
                        };
                        let (r, w) = (
                            hello["rank"].as_u64().unwrap_or(u64::MAX) as usize,
                            hello["world"].as_u64(),
                        );
                        if w != Some(env.world as u64) || r == 0 || r >= env.world || streams[r].is_some() {
                            eprintln!(
                                "rank 0: a connection from {peer} greeted as rank {r} of {w:?} (this job has {} \
                                 ranks); dropped",
                                env.world
                            );
                            continue;
                        }
                        s.set_read_timeout(Some(timeout)).ok();
                        s.set_write_timeout(Some(timeout)).ok();
                        streams[r] = Some(s);
                        joined += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = (1..env.world)
                                .filter(|&r| streams[r].is_none())
                                .map(|r| r.to_string())
                                .collect();
                            return Err(format!(
                                "rank(s) {} did not connect to {addr} within {:.1} s",
                                missing.join(", "),
                                timeout.as_secs_f64()
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(format!("rank 0 accepting at {addr}: {e}")),
                }
            }
        } else {
            let target = addr
                .to_socket_addrs()
                .map_err(|e| format!("MASTER_ADDR:MASTER_PORT {addr}: {e}"))?
                .next()
                .ok_or_else(|| format!("MASTER_ADDR:MASTER_PORT {addr} resolves to nothing"))?;
            let mut s = loop {
                match TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!(
                            "rank {} could not reach rank 0 at {addr} within {:.1} s: {e}",
                            env.rank,
                            timeout.as_secs_f64()
                        ))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            s.set_nodelay(true).ok();
            // rank 0 answers after the slowest rank's inputs arrive (each within `timeout`): wait for it longer
            s.set_read_timeout(Some(timeout * 2 + Duration::from_secs(5))).ok();
            s.set_write_timeout(Some(timeout)).ok();
            let hello = serde_json::json!({ "rank": env.rank, "world": env.world });
            write_frame(&mut s, hello.to_string().as_bytes()).map_err(|e| e.to_string())?;
            streams[0] = Some(s);
        }
        Ok(TcpTransport {
            rank: env.rank,
            world: env.world,
            precision,
            timeout,
            streams: Mutex::new(streams),
            seq: Mutex::new(0),
        })
    }

    /// Passes bytes from rank 0 to every rank (`data` on rank 0, `None` elsewhere): what a transport built on
    /// this rendezvous needs before its first collective (NCCL's unique ids). Every rank calls it at the same
    /// point.
    pub fn share(&self, data: Option<Vec<u8>>) -> Result<Vec<u8>, String> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if self.rank == 0 {
            let data = data.ok_or("rank 0 shares no bytes")?;
            for (r, s) in streams.iter_mut().enumerate().skip(1) {
                let s = s.as_mut().expect("connected");
                write_frame(s, &data).map_err(|e| format!("sharing with rank {r}: {e}"))?;
            }
            Ok(data)
        } else {
            let s = streams[0].as_mut().expect("connected to rank 0");
            read_frame(s).map_err(|e| format!("rank {}: rank 0 shared nothing: {e}", self.rank))
        }
    }

    /// A fault for tests of failure handling: `FULGUR_FAULT_EXIT=RANK:SEQ` makes rank `RANK` exit (status 3) when
    /// it reaches collective `SEQ`, as a crashed process would.
    fn fault(&self, seq: u64) {
        if let Ok(v) = std::env::var("FULGUR_FAULT_EXIT") {
            if let Some((r, s)) = v.split_once(':') {
                if r.parse::<usize>().ok() == Some(self.rank) && s.parse::<u64>().ok() == Some(seq) {
                    eprintln!("rank {}: exiting at collective #{seq} (FULGUR_FAULT_EXIT)", self.rank);
                    std::process::exit(3);
                }
            }
        }
    }
}

impl Transport for TcpTransport {
    fn collective(&self, op: &Op, rank: usize, args: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        if rank != self.rank {
            return Err(format!("rank {} was asked for rank {rank}'s collective", self.rank));
        }
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        let n = *seq;
        *seq += 1;
        self.fault(n);
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let op_json = serde_json::to_value(op).map_err(|e| e.to_string())?;
        if self.rank != 0 {
            let s = streams[0].as_mut().expect("connected to rank 0");
            send_tensors(s, serde_json::json!({ "seq": n, "op": op_json }), args)
                .map_err(|e| format!("sending collective #{n} (`{}`) to rank 0: {e}", op.name()))?;
            let (head, ts) = recv_tensors(s).map_err(|e| {
                format!(
                    "rank 0 did not answer collective #{n} (`{}`): {e} (it exited, failed, or waited past {:.1} s)",
                    op.name(),
                    self.timeout.as_secs_f64()
                )
            })?;
            if let Some(err) = head["error"].as_str() {
                return Err(err.to_string());
            }
            return Ok(ts);
        }
        // rank 0: gather every rank's inputs, compute, answer
        let mut all: Vec<Vec<Tensor>> = vec![args.iter().map(|&t| t.clone()).collect()];
        let mut failure = None;
        for r in 1..self.world {
            let s = streams[r].as_mut().expect("connected");
            match recv_tensors(s) {
                Ok((head, ts)) => {
                    let other: Option<Op> = serde_json::from_value(head["op"].clone()).ok();
                    if head["seq"].as_u64() != Some(n) || other.as_ref() != Some(op) {
                        failure = Some(format!(
                            "the ranks disagree at collective #{n}: rank 0 runs `{}`, rank {r} runs `{}` (#{})",
                            op.name(),
                            other.map(|o| o.name().to_string()).unwrap_or_default(),
                            head["seq"]
                        ));
                        break;
                    }
                    all.push(ts);
                }
                Err(e) => {
                    failure = Some(format!(
                        "rank {r} did not reach collective #{n} (`{}`): {e} (it exited, failed, or waited past {:.1} s)",
                        op.name(),
                        self.timeout.as_secs_f64()
                    ));
                    break;
                }
            }
        }
        let result = match failure {
            Some(f) => Err(f),
            None => SimTransport::compute(self.world, self.precision, op, &all),
        };
        for r in 1..self.world {
            if let Some(s) = streams[r].as_mut() {
                let sent = match &result {
                    Ok(per) => {
                        let refs: Vec<&Tensor> = per[r].iter().collect();
                        send_tensors(s, serde_json::json!({ "seq": n }), &refs)
                    }
                    Err(e) => send_tensors(s, serde_json::json!({ "seq": n, "error": e }), &[]),
                };
                let _ = sent;
            }
        }
        result.map(|mut per| per.swap_remove(0))
    }
}

impl TcpTransport {
    /// This rank's address as the others reach it: the local end of its connection to rank 0 (rank 0: of its
    /// connection to rank 1); the loopback address in a job of one rank.
    pub fn local_ip(&self) -> std::net::IpAddr {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .iter()
            .flatten()
            .next()
            .and_then(|s| s.local_addr().ok())
            .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| a.ip())
    }
}

/// One end of a point-to-point connection between two launched processes (a pipeline cut: rank `i` of two
/// neighbouring stages): tensors each way, in order, whole and unrounded, as a collective's are. A send goes
/// through a writer thread, so it never waits for the peer to read: both ends of a cut may send at once (in
/// 1F1B a stage sends its activations forward while the next sends a gradient back), and with blocking writes
/// on buffers smaller than the tensors the two would wait for each other forever. Dropping the link waits for
/// its queued sends to be written.
pub struct TcpLink {
    /// The peer, as messages name it ("stage 1, rank 0").
    peer: String,
    timeout: Duration,
    reader: Mutex<std::net::TcpStream>,
    writer: Option<std::sync::mpsc::Sender<Tensor>>,
    /// The writer thread's failure, if its stream broke.
    failed: std::sync::Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpLink {
    /// Accepts the connection of global rank `from` (named `peer`) on `listener`, within `timeout`; a
    /// connection that greets as another rank is refused.
    pub fn accept(
        listener: &std::net::TcpListener,
        from: usize,
        peer: &str,
        timeout: Duration,
    ) -> Result<TcpLink, String> {
        let deadline = Instant::now() + timeout;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        loop {
            match listener.accept() {
                Ok((mut s, addr)) => {
                    s.set_nonblocking(false).map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                    let hello = read_frame(&mut s)
                        .ok()
                        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok());
                    match hello.and_then(|h| h["rank"].as_u64()) {
                        Some(r) if r as usize == from => return TcpLink::over(s, peer, timeout),
                        r => eprintln!(
                            "a connection from {addr} greeted as rank {r:?}, not {peer} (rank {from}); dropped"
                        ),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "{peer} (rank {from}) did not connect within {:.1} s",
                            timeout.as_secs_f64()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(format!("accepting {peer}'s connection: {e}")),
            }
        }
    }

    /// Connects to `peer` listening at `addr`, greeting as global rank `me`, retrying until `timeout`.
    pub fn connect(addr: std::net::SocketAddr, me: usize, peer: &str, timeout: Duration) -> Result<TcpLink, String> {
        let deadline = Instant::now() + timeout;
        let mut s = loop {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "could not reach {peer} at {addr} within {:.1} s: {e}",
                        timeout.as_secs_f64()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        write_frame(&mut s, serde_json::json!({ "rank": me }).to_string().as_bytes())
            .map_err(|e| format!("greeting {peer} at {addr}: {e}"))?;
        TcpLink::over(s, peer, timeout)
    }

    fn over(s: std::net::TcpStream, peer: &str, timeout: Duration) -> Result<TcpLink, String> {
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(timeout)).ok();
        s.set_write_timeout(Some(timeout)).ok();
        let mut w = s.try_clone().map_err(|e| format!("the connection to {peer}: {e}"))?;
        let (tx, rx) = std::sync::mpsc::channel::<Tensor>();
        let failed = std::sync::Arc::new(Mutex::new(None));
        let (f, who) = (failed.clone(), peer.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("link to {peer}"))
            .spawn(move || {
                while let Ok(t) = rx.recv() {
                    if let Err(e) = send_tensors(&mut w, serde_json::json!({}), &[&t]) {
                        *f.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("sending to {who}: {e}"));
                        return;
                    }
                }
            })
            .map_err(|e| format!("cannot start the writer to {peer}: {e}"))?;
        Ok(TcpLink {
            peer: peer.to_string(),
            timeout,
            reader: Mutex::new(s),
            writer: Some(tx),
            failed,
            thread: Some(thread),
        })
    }

    /// Queues `t` for the peer.
    pub fn send(&self, t: Tensor) -> Result<(), String> {
        if let Some(e) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(e);
        }
        self.writer
            .as_ref()
            .and_then(|w| w.send(t).ok())
            .ok_or_else(|| format!("the link to {} is closed", self.peer))
    }

    /// The peer's next tensor, waiting up to the timeout.
    pub fn recv(&self) -> Result<Tensor, String> {
        let mut s = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let (_, mut ts) = recv_tensors(&mut s).map_err(|e| {
            format!(
                "{} sent nothing: {e} (it exited, failed, or waited past {:.1} s)",
                self.peer,
                self.timeout.as_secs_f64()
            )
        })?;
        match ts.len() {
            1 => Ok(ts.remove(0)),
            n => Err(format!("{} sent {n} tensors where one was due", self.peer)),
        }
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.writer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// [`run_ranks`] with each rank's program compiled by the CPU backend (LLVM JIT), its collectives (`on_rank`
/// kernels) through a [`SimTransport`] at f32: the per-rank programs as compiled code. Weights and inputs come
/// from `feed` by name.
#[cfg(feature = "llvm")]
pub fn run_ranks_cpu(
    programs: &[Graph],
    feed: &HashMap<String, Tensor>,
    timeout: Duration,
) -> Result<Vec<BTreeMap<String, Tensor>>, String> {
    use crate::cpu::{CpuOptions, CpuProgram};
    on_threads(programs.len(), Precision::F32, timeout, |r, t| {
        let program = fulgur_codegen::program::lower(&programs[r]).map_err(|e| e.to_string())?;
        let mut cpu = CpuProgram::new(program, CpuOptions::default()).map_err(|e| e.to_string())?;
        cpu.set_transport(t);
        cpu.load_weights_from(|name, _| feed.get(name).cloned().ok_or_else(|| format!("no weight `{name}`")))
            .map_err(|e| e.to_string())?;
        let inputs = inputs_from(&cpu.program.inputs, feed);
        cpu.run(&inputs).map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| m.get(k).cloned()
    }

    #[test]
    fn ranks_come_from_the_launchers_variables() {
        assert_eq!(RankEnv::from_vars(&vars(&[])).unwrap(), None);
        let addr = [("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500")];
        let torchrun = [
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            addr[0],
            addr[1],
        ];
        let e = RankEnv::from_vars(&vars(&torchrun)).unwrap().unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.source), (3, 8, 3, "torchrun"));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("10.0.0.1", 29500));
        let slurm = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            addr[0],
            addr[1],
        ];
        let e = RankEnv::from_vars(&vars(&slurm)).unwrap().unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.source), (5, 16, 1, "Slurm"));
        let ompi = [
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            addr[0],
            addr[1],
        ];
        let e = RankEnv::from_vars(&vars(&ompi)).unwrap().unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.source), (0, 2, 0, "Open MPI"));
        let e = RankEnv::from_vars(&vars(&[("RANK", "2"), ("WORLD_SIZE", "2"), addr[0], addr[1]])).unwrap_err();
        assert_eq!(e, "torchrun's `RANK`=2 is not a rank of `WORLD_SIZE`=2");
        let e = RankEnv::from_vars(&vars(&[("RANK", "0"), addr[0], addr[1]])).unwrap_err();
        assert_eq!(e, "torchrun's `WORLD_SIZE` is not set (it is read with `RANK`)");
        let e = RankEnv::from_vars(&vars(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert_eq!(e, "torchrun's `RANK` must be a whole number, found `x`");
        let e = RankEnv::from_vars(&vars(&[("RANK", "0"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert_eq!(
            e,
            "`MASTER_ADDR` is not set: the ranks meet at MASTER_ADDR:MASTER_PORT (torchrun job)"
        );
        let e = RankEnv::from_vars(&vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            addr[0],
            ("MASTER_PORT", "70000"),
        ]))
        .unwrap_err();
        assert_eq!(e, "`MASTER_PORT` must be a port number, found `70000`");
    }

    /// Two ranks in one process over the TCP transport: an all-reduce of each rank's value gives both the sum;
    /// a rank that never connects is named after the timeout.
    /// Ranks that live between calls: each call reduces across them through a fresh transport, a rank whose
    /// program fails fails the call naming it, and a program that cannot be built is named at the start.
    #[test]
    fn rank_threads_run_call_after_call() {
        use fulgur_ir::{Composite, DType, Dim};
        let program = |r: usize, input: &str| {
            let mut g = Graph::new("rank");
            let x = g.input(input, DType::F32, vec![Dim::from(3)]).unwrap();
            let op = Op::Composite(Composite::OnRank {
                op: Box::new(Op::Composite(Composite::AllReduce { mesh: vec![2], over: 0 })),
                rank: r,
            });
            let y = g.op1(op, &[x]).unwrap();
            g.add_output("y", y).unwrap();
            g
        };
        let make = move |second: &'static str| {
            move |r: usize| -> Result<Box<dyn RankProgram>, String> {
                Ok(Box::new(InterpretedRank {
                    graph: program(r, if r == 1 { second } else { "x" }),
                    precision: Precision::F64,
                    memory_limit: None,
                    weights: HashMap::new(),
                }))
            }
        };
        let mut ranks = RankThreads::new("sum", 2, Precision::F64, Duration::from_secs(30), make("x")).unwrap();
        assert_eq!(crate::Executable::input_names(&ranks), vec!["x".to_string()]);
        for call in 0..3 {
            let x = Tensor::from_f64(DType::F32, vec![3], vec![call as f64; 3]);
            let out = crate::Executable::run(&mut ranks, &[("x".to_string(), x)].into()).unwrap();
            assert_eq!(out["y"].to_f64(), vec![2.0 * call as f64; 3]);
        }
        // rank 1 takes an input nobody gives
        let mut ranks = RankThreads::new("sum", 2, Precision::F64, Duration::from_secs(30), make("z")).unwrap();
        let x = Tensor::from_f64(DType::F32, vec![3], vec![1.0; 3]);
        let e = ranks.run_all(&[("x".to_string(), x)].into()).unwrap_err();
        assert!(e.starts_with("rank 1: "), "{e}");
        assert!(e.contains("`z`"), "{e}");
        let e = RankThreads::new("sum", 2, Precision::F64, Duration::from_secs(30), |r| {
            if r == 1 {
                Err("no such backend".to_string())
            } else {
                Ok(Box::new(InterpretedRank {
                    graph: Graph::new("empty"),
                    precision: Precision::F64,
                    memory_limit: None,
                    weights: HashMap::new(),
                }) as Box<dyn RankProgram>)
            }
        })
        .err()
        .unwrap();
        assert_eq!(e, "rank 1: no such backend");
    }

    #[test]
    fn tcp_ranks_meet_and_reduce() {
        use fulgur_ir::Composite;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let env = |rank| RankEnv {
            rank,
            world: 2,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            source: "test",
        };
        let op = Op::Composite(Composite::AllReduce { mesh: vec![2], over: 0 });
        let outs: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    let (env, op) = (env(r), op.clone());
                    s.spawn(move || {
                        let t = TcpTransport::connect(&env, Precision::F64, Duration::from_secs(30)).unwrap();
                        let x = Tensor::from_f64(fulgur_ir::DType::F32, vec![3], vec![r as f64 + 0.25; 3]);
                        t.collective(&op, r, &[&x]).unwrap()[0].to_f64()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(outs, vec![vec![1.5; 3], vec![1.5; 3]]);
        let port2 = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let alone = RankEnv {
            master_port: port2,
            ..env(0)
        };
        let e = TcpTransport::connect(&alone, Precision::F64, Duration::from_millis(300))
            .err()
            .unwrap();
        assert_eq!(
            e,
            format!("rank(s) 1 did not connect to 127.0.0.1:{port2} within 0.3 s")
        );
    }
}
