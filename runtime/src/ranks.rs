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
            }),
            cv: Condvar::new(),
        }
    }

    /// Marks rank `rank` failed: the others fail at their next collective instead of waiting for it.
    pub fn fail(&self, rank: usize, why: &str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.failed.is_none() {
            s.failed = Some(format!("rank {rank} failed: {why}"));
        }
        self.cv.notify_all();
    }

    /// The collective on every rank's inputs stacked along a leading rank axis.
    fn compute(&self, op: &Op, args: &[Vec<Tensor>]) -> Result<Vec<Vec<Tensor>>, String> {
        let n_in = args[0].len();
        let mut g = Graph::new("collective");
        let mut feed = HashMap::new();
        let mut ins = Vec::new();
        for i in 0..n_in {
            let t0 = &args[0][i];
            let mut shape = vec![self.ranks];
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
        let r = Interpreter::new(self.precision)
            .run(&g, &feed)
            .map_err(|e| e.to_string())?;
        let mut per_rank = vec![Vec::new(); self.ranks];
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
            match self.compute(op, &stacked) {
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

/// Runs `programs[r]` (rank `r`'s program, as the per-rank lowering writes it) on its own thread with the
/// interpreter at `precision`, every rank fed `feed`, collectives through a [`SimTransport`]. Returns each rank's
/// outputs, or the first failure naming its rank.
pub fn run_ranks(
    programs: &[Graph],
    feed: &HashMap<String, Tensor>,
    precision: Precision,
    timeout: Duration,
) -> Result<Vec<BTreeMap<String, Tensor>>, String> {
    let t = SimTransport::new(programs.len(), precision, timeout);
    let results: Vec<Result<BTreeMap<String, Tensor>, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = programs
            .iter()
            .enumerate()
            .map(|(r, g)| {
                let t = &t;
                sc.spawn(move || {
                    let out = Interpreter::new(precision)
                        .run_on(g, feed, t)
                        .map_err(|e| e.to_string());
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
    // the first rank to fail on its own, not one failed by another's failure
    let own = results
        .iter()
        .enumerate()
        .find(|(_, r)| matches!(r, Err(e) if !e.contains("failed:") && !e.contains("did not reach")));
    if let Some((r, Err(e))) = own {
        return Err(format!("rank {r}: {e}"));
    }
    results
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.map_err(|e| format!("rank {r}: {e}")))
        .collect()
}
