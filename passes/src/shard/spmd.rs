//! The sharding pass (`docs/parallelism.md`, §4): a single-device graph and a [`ShardPlan`] → the simulated SPMD
//! graph, every value of which carries a leading rank axis `R` (slice `[r]` is rank `r`'s shard).
//!
//! The plan places the parameters and inputs (by name pattern); every other value's sharding is *propagated*
//! through the ops, node by node in topological order, by one rule per op: elementwise ops keep a split (the
//! other operands are cut alike) and a partial sum where the op is linear in it; a matmul's rows, columns and
//! batch dims follow its operands' splits and a split contraction dim gives a partial sum; a reduction over a
//! split dim gives a partial sum (a mean scaled by the split's degree); a reshape maps a split onto the dim that
//! carries its chunks; a permute moves it; an op along a split axis (softmax, top-k, slice, concat, cumulative
//! sum) first gathers that axis. Where an operand's sharding is not the one the rule needs, [`reshard`] inserts
//! the collective (`all_reduce`, `all_gather`, `reduce_scatter`, or the local `shard_slice`). On a conflict (a
//! matmul's rows split against its columns split on the same mesh axis) the right operand (the weights, in a
//! linear layer) keeps its split and the left one is resharded, which is what turns a column-parallel weight into
//! a gather-free layer and an expert-split weight into expert parallelism. A value the same on every rank
//! (computed from constants and replicated parameters only) stays without the rank axis, so replicated work is
//! written once. Outputs are made replicated and rank 0's copy is returned: the sharded graph has the
//! single-device graph's inputs, parameters and outputs, which is what makes it checkable against it (the
//! oracle) and differentiable by the same autodiff.

#[path = "attention.rs"]
mod attention;
#[path = "moe.rs"]
mod moe;

use super::{reshard, Mesh, Placement, Sharding};
use crate::PassError;
use fulgur_ir::{BinaryOp, Composite, Dim, Graph, NodeId, Op, ReduceOp, TensorType, UnaryOp, Value};
use std::collections::{BTreeMap, HashMap};

/// Node names (the last component, after the scope) that mark where the rank axis comes and goes, for the
/// per-rank lowering ([`super::lower_rank`]): a value the same on every rank given the axis, a constant per
/// rank, rank 0's copy taken at an output, and the axis moved to the front after a gather placed it inside.
pub(crate) const RANK_REPLICATE: &str = "rank_replicate";
pub(crate) const RANK_CONSTANT: &str = "rank_constant";
pub(crate) const RANK_FIRST: &str = "rank_first";
pub(crate) const RANK_FRONT: &str = "rank_front";

/// What the sharding pass needs besides the graph.
#[derive(Clone, Debug)]
pub struct ShardPlan {
    pub mesh: Mesh,
    /// Sizes bound to the graph's symbols (`B`, `T`): the sharded graph is specialised to them, so that a split
    /// of a symbolic dim can be checked for divisibility.
    pub sizes: HashMap<String, i64>,
    /// `(pattern, placements)`: a parameter or input whose name matches `pattern` (`*` matches any run of
    /// characters) is placed on the named mesh axes as given (axes not named: replicated). The first match
    /// wins; an unmatched one is replicated.
    pub rules: Vec<(String, Vec<(String, Placement)>)>,
    /// `(pattern, placements)`: a parameter or input matching is *stored* split further on these axes (where
    /// its rule leaves them replicated) and gathered to its rule's placement before use: ZeRO-3 / FSDP. Its
    /// gradient comes back reduce-scattered to the stored shard (the gather's backward). First match wins.
    pub stored: Vec<(String, Vec<(String, Placement)>)>,
    /// `(pattern, placements)`: the first output of a node other than an input or parameter whose name (with
    /// its scope) matches is resharded to these placements after its own rule (axes not named: replicated): a
    /// sharding constraint, for a value the rules would not place. A `slice` of a parameter matches as
    /// `PARAM.slice` (`*.mlp.experts.gate_up_proj.slice`: the gate and up halves of a fused weight, each split
    /// alike, which a split of the fused weight itself cannot give); a value the same on every rank becomes
    /// split by the local `shard_slice`. First match wins.
    pub constraints: Vec<(String, Vec<(String, Placement)>)>,
}

/// What the pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardReport {
    /// Collectives inserted, by op name.
    pub collectives: BTreeMap<String, usize>,
    /// Every conversion inserted: the source node (its name, or `%id`), the value's placements before and after.
    pub conversions: Vec<String>,
    /// Parameters and inputs that a rule placed, with their placements.
    pub placed: Vec<(String, String)>,
    /// MoE chains rewritten as the routed exchange (`all_to_all_dispatch` … `all_to_all_combine`, or each rank
    /// on its own tokens where the experts are replicated).
    pub routed_moe: usize,
    /// MoE composites run whole on every rank (a chain whose placements do not fit the exchange, or a training
    /// graph's): correct, with the experts' work repeated.
    pub whole_moe: usize,
}

/// `true` when `name` matches `pattern`, where `*` matches any run of characters.
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

impl ShardPlan {
    /// The sharding of parameter or input `name` of global dims `dims`, its shard checked to divide.
    pub fn placement_of(&self, name: &str, dims: &[Dim]) -> Result<Sharding, PassError> {
        let mut s = Sharding::replicated(&self.mesh);
        if let Some((_, places)) = self.rules.iter().find(|(p, _)| glob(p, name)) {
            for (axis, p) in places {
                let k = self.mesh.axis(axis)?;
                if let Placement::Split(d) = p {
                    if *d >= dims.len() {
                        return Err(PassError::Options(format!(
                            "`{name}` has {} dims; mesh axis `{axis}` cannot split its dim {d}",
                            dims.len()
                        )));
                    }
                }
                s.per_axis[k] = p.clone();
            }
        }
        s.local_dims(&self.mesh, name, dims)?;
        Ok(s)
    }

    /// How parameter or input `name` is stored: its placement, split further on the axes of a `stored` entry
    /// that the placement leaves replicated (checked to divide, naming the value, dim and axis).
    pub fn stored_placement_of(&self, name: &str, dims: &[Dim]) -> Result<Sharding, PassError> {
        let mut s = self.placement_of(name, dims)?;
        if let Some((_, places)) = self.stored.iter().find(|(p, _)| glob(p, name)) {
            for (axis, p) in places {
                let k = self.mesh.axis(axis)?;
                if s.per_axis[k] == Placement::Replicated {
                    s.per_axis[k] = p.clone();
                }
            }
        }
        s.local_dims(&self.mesh, name, dims)?;
        Ok(s)
    }
}

/// A value of the sharded graph standing for a value of the source graph.
#[derive(Clone, Debug)]
struct Sv {
    v: Value,
    /// `false`: the same on every rank, without the rank axis (its sharding is replicated).
    ranked: bool,
    sh: Sharding,
    /// The source value's (global) dims.
    dims: Vec<Dim>,
}

struct Pass<'a> {
    out: Graph,
    mesh: &'a Mesh,
    report: ShardReport,
    /// The source node being rewritten (for the report and errors).
    at: String,
    /// Conversions already written: (value, target placements) → the converted value, so that a value
    /// several consumers need in one placement is converted once.
    converted: HashMap<(Value, Vec<Placement>), Sv>,
    /// Partial sums already reduced (to replicated or split): later consumers take the reduced value
    /// rather than reducing again.
    reduced: HashMap<Value, Sv>,
}

fn norm_axis(axis: i64, rank: usize) -> usize {
    if axis < 0 {
        (axis + rank as i64) as usize
    } else {
        axis as usize
    }
}

fn is_rep(s: &Sharding) -> bool {
    s.per_axis.iter().all(|p| *p == Placement::Replicated)
}

fn describe(mesh: &Mesh, s: &Sharding) -> String {
    let names = mesh.to_string();
    let names: Vec<&str> = names
        .trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .map(|a| a.split('=').next().unwrap_or(""))
        .collect();
    let parts: Vec<String> = s
        .per_axis
        .iter()
        .zip(names)
        .map(|(p, n)| match p {
            Placement::Replicated => format!("{n}:rep"),
            Placement::Split(d) => format!("{n}:split({d})"),
            Placement::Partial => format!("{n}:partial"),
        })
        .collect();
    parts.join(",")
}

impl Pass<'_> {
    fn rep(&self) -> Sharding {
        Sharding::replicated(self.mesh)
    }

    fn degree(&self, k: usize) -> usize {
        self.mesh.sizes()[k]
    }

    /// Placements on axes of degree 1 are all the same: written as replicated.
    fn normal(&self, mut s: Sharding) -> Sharding {
        for (k, p) in s.per_axis.iter_mut().enumerate() {
            if self.degree(k) == 1 {
                *p = Placement::Replicated;
            }
        }
        s
    }

    fn local(&self, s: &Sharding, dims: &[Dim]) -> Result<Vec<Dim>, PassError> {
        s.local_dims(self.mesh, &self.at, dims)
    }

    /// `x` with the rank axis: an unranked value broadcast to every rank.
    fn ranked(&mut self, x: &Sv) -> Result<Sv, PassError> {
        if x.ranked {
            return Ok(x.clone());
        }
        let mut shape = vec![Dim::from(self.mesh.ranks())];
        shape.extend(x.dims.iter().cloned());
        let v = self.out.named(
            RANK_REPLICATE,
            Op::Broadcast {
                shape: fulgur_ir::Shape(shape),
            },
            &[x.v],
        )?;
        Ok(Sv {
            v,
            ranked: true,
            sh: self.rep(),
            dims: x.dims.clone(),
        })
    }

    /// `x` converted to sharding `to` by collectives (splits that go first, by `all_gather`, or move to another
    /// dim, by `all_to_all`; then the rest; through the fully replicated form where chunks would nest out of
    /// mesh order).
    fn to(&mut self, x: &Sv, to: &Sharding) -> Result<Sv, PassError> {
        let to = self.normal(to.clone());
        if x.sh == to {
            return Ok(x.clone());
        }
        if !x.ranked && is_rep(&to) {
            return Ok(x.clone());
        }
        self.local(&to, &x.dims)?;
        let key = (x.v, to.per_axis.clone());
        if let Some(done) = self.converted.get(&key) {
            return Ok(done.clone());
        }
        let done = self.convert(x, to)?;
        self.converted.insert(key, done.clone());
        if x.sh.per_axis.contains(&Placement::Partial) && !done.sh.per_axis.contains(&Placement::Partial) {
            self.reduced.entry(x.v).or_insert_with(|| done.clone());
        }
        Ok(done)
    }

    fn convert(&mut self, x: &Sv, to: Sharding) -> Result<Sv, PassError> {
        // a whole value made a partial sum: rank 0 of each such axis keeps it, the others hold zeros
        let fresh: Vec<usize> = (0..to.per_axis.len())
            .filter(|&k| to.per_axis[k] == Placement::Partial && x.sh.per_axis[k] != Placement::Partial)
            .collect();
        if !fresh.is_empty() {
            let mut whole = to.clone();
            for &k in &fresh {
                whole.per_axis[k] = Placement::Replicated;
            }
            let y = self.to(x, &whole)?;
            let dt = self.out.dtype(y.v);
            if !dt.is_float() {
                return Err(PassError::Options(format!(
                    "`{}`: a {dt} value cannot be a partial sum",
                    self.at
                )));
            }
            let keep = self.per_rank(dt, &[], |c| {
                vec![if fresh.iter().all(|&k| c[k] == 0) { 1.0 } else { 0.0 }]
            })?;
            let keep = self.lift(keep, y.dims.len())?;
            let v = self.out.mul(y.v, keep)?;
            return Ok(Sv {
                v,
                ranked: true,
                sh: to,
                dims: y.dims,
            });
        }
        let x = self.ranked(x)?;
        self.report.conversions.push(format!(
            "{}: {} → {}",
            self.at,
            describe(self.mesh, &x.sh),
            describe(self.mesh, &to)
        ));
        let mid = Sharding {
            per_axis: x
                .sh
                .per_axis
                .iter()
                .zip(&to.per_axis)
                .map(|(f, t)| match (f, t) {
                    (Placement::Split(_), Placement::Split(_)) => t.clone(),
                    (Placement::Split(_), _) if f != t => Placement::Replicated,
                    _ => f.clone(),
                })
                .collect(),
        };
        let direct = reshard(&mut self.out, x.v, self.mesh, &x.sh, &mid)
            .and_then(|v| reshard(&mut self.out, v, self.mesh, &mid, &to));
        let v = match direct {
            Ok(v) => v,
            Err(_) => {
                // the nodes of the failed attempt stay unused: dead code, dropped at the end
                let all = Sharding {
                    per_axis: x
                        .sh
                        .per_axis
                        .iter()
                        .map(|p| match p {
                            Placement::Partial => Placement::Partial,
                            _ => Placement::Replicated,
                        })
                        .collect(),
                };
                // whole on every axis, but for the partial sums the target keeps
                let whole = Sharding {
                    per_axis: all
                        .per_axis
                        .iter()
                        .zip(&to.per_axis)
                        .map(|(f, t)| match (f, t) {
                            (Placement::Partial, Placement::Partial) => Placement::Partial,
                            _ => Placement::Replicated,
                        })
                        .collect(),
                };
                let v = reshard(&mut self.out, x.v, self.mesh, &x.sh, &all)?;
                let v = reshard(&mut self.out, v, self.mesh, &all, &whole)?;
                reshard(&mut self.out, v, self.mesh, &whole, &to)?
            }
        };
        Ok(Sv {
            v,
            ranked: true,
            sh: to,
            dims: x.dims,
        })
    }

    /// A ranked value `[R, local...]` reshaped to `[R, 1, ..., local...]` of `1 + rank` dims.
    fn pad(&mut self, x: &Sv, rank: usize) -> Result<Value, PassError> {
        if !x.ranked || x.dims.len() == rank {
            return Ok(x.v);
        }
        let mut shape = vec![Dim::from(self.mesh.ranks())];
        shape.extend(std::iter::repeat_n(Dim::from(1), rank - x.dims.len()));
        shape.extend(self.local(&x.sh, &x.dims)?);
        Ok(self.out.reshape(x.v, shape)?)
    }

    fn emit(&mut self, op: Op, ins: &[Value]) -> Result<Vec<Value>, PassError> {
        Ok(self.out.op(op, ins)?)
    }

    /// Unary, binary, compare, select, cast: numpy broadcasting, operands right-aligned to the output.
    fn elementwise(&mut self, op: &Op, ins: &[Sv], out_dims: &[Dim]) -> Result<Sv, PassError> {
        let n = out_dims.len();
        let naxes = self.mesh.sizes().len();
        let mut target = self.rep();
        for k in 0..naxes {
            let split = ins.iter().find_map(|s| match s.sh.per_axis[k] {
                Placement::Split(d) => Some(d + n - s.dims.len()),
                _ => None,
            });
            if let Some(d) = split {
                target.per_axis[k] = Placement::Split(d);
                continue;
            }
            let partial: Vec<bool> = ins.iter().map(|s| s.sh.per_axis[k] == Placement::Partial).collect();
            if partial.iter().any(|&p| p) && linear_in(op, &partial) {
                target.per_axis[k] = Placement::Partial;
            }
        }
        // a partial sum into an op not linear in it: reduced to a split (`reduce_scatter`, the op then runs on
        // a shard) on the first dim no axis splits, that the degree divides and that every partial operand
        // has whole; only a value with no such dim is reduced whole (`all_reduce`). The same bytes move as an
        // `all_reduce` would (that is a `reduce_scatter` and an `all_gather`), and a later consumer needing the
        // whole value gathers it then.
        for k in 0..naxes {
            let partial: Vec<&Sv> = ins.iter().filter(|s| s.sh.per_axis[k] == Placement::Partial).collect();
            if partial.is_empty() || target.per_axis[k] != Placement::Replicated {
                continue;
            }
            let degree = Dim::from(self.degree(k));
            let free = (0..n).find(|&d| {
                !target.per_axis.contains(&Placement::Split(d))
                    && out_dims[d].div_exact(&degree).is_some()
                    && partial.iter().all(|s| {
                        let off = n - s.dims.len();
                        d >= off && s.dims[d - off] == out_dims[d]
                    })
            });
            if let Some(d) = free {
                target.per_axis[k] = Placement::Split(d);
            }
        }
        let mut vals = Vec::with_capacity(ins.len());
        let mut ranked = false;
        for s in ins {
            let off = n - s.dims.len();
            let want = Sharding {
                per_axis: target
                    .per_axis
                    .iter()
                    .enumerate()
                    .map(|(k, t)| match t {
                        Placement::Split(d) if *d >= off && s.dims[*d - off] == out_dims[*d] => {
                            Placement::Split(*d - off)
                        }
                        Placement::Partial if s.sh.per_axis[k] == Placement::Partial => Placement::Partial,
                        _ => Placement::Replicated,
                    })
                    .collect(),
            };
            let c = self.to(s, &want)?;
            ranked |= c.ranked;
            vals.push(c);
        }
        let vals: Vec<Value> = vals.iter().map(|c| self.pad(c, n)).collect::<Result<_, _>>()?;
        let v = self.emit(op.clone(), &vals)?[0];
        Ok(Sv {
            v,
            ranked,
            sh: if ranked { target } else { self.rep() },
            dims: out_dims.to_vec(),
        })
    }

    fn matmul(&mut self, a: &Sv, b: &Sv, out_dims: &[Dim]) -> Result<Sv, PassError> {
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum C {
            Rep,
            Row,
            Col,
            K,
            Batch(usize),
            Part,
        }
        let no = out_dims.len();
        let (na, nb) = (a.dims.len(), b.dims.len());
        let class = |p: &Placement, n: usize, lhs: bool| match p {
            Placement::Replicated => C::Rep,
            Placement::Partial => C::Part,
            Placement::Split(d) if lhs && *d == n - 2 => C::Row,
            Placement::Split(d) if !lhs && *d == n - 1 => C::Col,
            Placement::Split(d) if (lhs && *d == n - 1) || (!lhs && *d == n - 2) => C::K,
            Placement::Split(d) => C::Batch(d + no - n),
        };
        // whether operand `x` (of rank n) has out batch dim `o` with its full size (not broadcast)
        let has = |x: &Sv, o: usize| {
            o + x.dims.len() >= no
                && o + x.dims.len() - no < x.dims.len() - 2
                && x.dims[o + x.dims.len() - no] == out_dims[o]
        };
        let mut ta = self.rep();
        let mut tb = self.rep();
        let mut out = self.rep();
        for k in 0..self.mesh.sizes().len() {
            let (pa, pb) = (class(&a.sh.per_axis[k], na, true), class(&b.sh.per_axis[k], nb, false));
            let (o, ca, cb) = match (pa, pb) {
                (C::Rep, C::Rep) => (C::Rep, C::Rep, C::Rep),
                (C::Row, C::Rep) => (C::Row, C::Row, C::Rep),
                (_, C::Col) => (C::Col, C::Rep, C::Col),
                (C::K, C::K) | (C::K, C::Rep) | (_, C::K) => (C::Part, C::K, C::K),
                (C::Part, C::Rep) => (C::Part, C::Part, C::Rep),
                (_, C::Part) => (C::Part, C::Rep, C::Part),
                (C::Batch(o), C::Rep) => (C::Batch(o), C::Batch(o), if has(b, o) { C::Batch(o) } else { C::Rep }),
                (_, C::Batch(o)) => (C::Batch(o), if has(a, o) { C::Batch(o) } else { C::Rep }, C::Batch(o)),
                (pa, pb) => unreachable!("matmul placements {pa:?} × {pb:?}"),
            };
            let place = |c: C, n: usize, lhs: bool| match c {
                C::Rep => Placement::Replicated,
                C::Part => Placement::Partial,
                C::Row => Placement::Split(n - 2),
                C::Col => Placement::Split(n - 1),
                C::K => Placement::Split(if lhs { n - 1 } else { n - 2 }),
                C::Batch(o) => Placement::Split(o + n - no),
            };
            ta.per_axis[k] = place(ca, na, true);
            tb.per_axis[k] = place(cb, nb, false);
            out.per_axis[k] = place(o, no, true);
        }
        let a = self.to(a, &ta)?;
        let b = self.to(b, &tb)?;
        let ranked = a.ranked || b.ranked;
        let va = self.pad(&a, no)?;
        let vb = self.pad(&b, no)?;
        let v = self.emit(Op::MatMul, &[va, vb])?[0];
        Ok(Sv {
            v,
            ranked,
            sh: if ranked { out } else { self.rep() },
            dims: out_dims.to_vec(),
        })
    }

    fn reduce(
        &mut self,
        op: ReduceOp,
        axes: &[i64],
        keepdims: bool,
        x: &Sv,
        out_dims: &[Dim],
    ) -> Result<Sv, PassError> {
        let n = x.dims.len();
        let axes: Vec<usize> = axes.iter().map(|&a| norm_axis(a, n)).collect();
        let linear = matches!(op, ReduceOp::Sum | ReduceOp::Mean);
        let mut want = x.sh.clone();
        for p in want.per_axis.iter_mut() {
            let keep = match p {
                Placement::Split(d) => !axes.contains(d) || linear,
                Placement::Partial => linear,
                Placement::Replicated => true,
            };
            if !keep {
                *p = Placement::Replicated;
            }
        }
        let x = self.to(x, &want)?;
        if !x.ranked {
            let v = self.emit(
                Op::Reduce {
                    op,
                    axes: axes.iter().map(|&a| a as i64).collect(),
                    keepdims,
                },
                &[x.v],
            )?[0];
            return Ok(self.unranked(v, out_dims));
        }
        let mut out = self.rep();
        let mut cut = 1usize;
        for (k, p) in x.sh.per_axis.iter().enumerate() {
            out.per_axis[k] = match p {
                Placement::Split(d) if axes.contains(d) => {
                    cut *= self.degree(k);
                    Placement::Partial
                }
                Placement::Split(d) if keepdims => Placement::Split(*d),
                Placement::Split(d) => Placement::Split(d - axes.iter().filter(|&&a| a < *d).count()),
                p => p.clone(),
            };
        }
        let mut v = self.emit(
            Op::Reduce {
                op,
                axes: axes.iter().map(|&a| a as i64 + 1).collect(),
                keepdims,
            },
            &[x.v],
        )?[0];
        if op == ReduceOp::Mean && cut > 1 {
            // a local mean is over 1/cut of the elements: the global mean is the sum of local means over cut
            v = self.out.scale(v, 1.0 / cut as f64)?;
        }
        Ok(Sv {
            v,
            ranked: true,
            sh: out,
            dims: out_dims.to_vec(),
        })
    }

    /// `scatter_add[axis](data, indices, updates)`: updates split along an index dim (their indices cut
    /// alike) scatter into a partial sum (the data made one); split along a data dim other than `axis` (the
    /// data cut alike), into a split; partial updates into partial data, a partial sum. Written as `per_rank`.
    fn scatter_add(&mut self, ins: &[Sv], axis: i64, out_dims: &[Dim]) -> Result<Sv, PassError> {
        let (data, idx, upd) = (&ins[0], &ins[1], &ins[2]);
        let a = norm_axis(axis, data.dims.len());
        let ir = idx.dims.len();
        // an updates dim: an index dim (its position in the indices) or a data dim
        let of_upd = |j: usize| {
            if j >= a && j < a + ir {
                Err(j - a)
            } else if j < a {
                Ok(j)
            } else {
                Ok(j + 1 - ir)
            }
        };
        let upd_of_data = |d: usize| if d < a { d } else { d + ir - 1 };
        let (mut td, mut ti, mut tu, mut out) = (self.rep(), self.rep(), self.rep(), self.rep());
        for k in 0..td.per_axis.len() {
            let from_u = match upd.sh.per_axis[k] {
                Placement::Split(j) => Some(of_upd(j)),
                _ => None,
            };
            let from_i = match idx.sh.per_axis[k] {
                Placement::Split(x) => Some(Err(x)),
                _ => None,
            };
            let from_d = match data.sh.per_axis[k] {
                Placement::Split(d) if d != a => Some(Ok(d)),
                _ => None,
            };
            match from_u.or(from_i).or(from_d) {
                Some(Err(x)) => {
                    tu.per_axis[k] = Placement::Split(a + x);
                    ti.per_axis[k] = Placement::Split(x);
                    td.per_axis[k] = Placement::Partial;
                    out.per_axis[k] = Placement::Partial;
                }
                Some(Ok(d)) => {
                    tu.per_axis[k] = Placement::Split(upd_of_data(d));
                    td.per_axis[k] = Placement::Split(d);
                    out.per_axis[k] = Placement::Split(d);
                }
                None if upd.sh.per_axis[k] == Placement::Partial || data.sh.per_axis[k] == Placement::Partial => {
                    tu.per_axis[k] = Placement::Partial;
                    td.per_axis[k] = Placement::Partial;
                    out.per_axis[k] = Placement::Partial;
                }
                None => {}
            }
        }
        let data = self.to(data, &td)?;
        let data = self.ranked(&data)?;
        let idx = self.to(idx, &ti)?;
        let idx = self.ranked(&idx)?;
        let upd = self.to(upd, &tu)?;
        let upd = self.ranked(&upd)?;
        let op = Op::Composite(Composite::PerRank {
            op: Box::new(Op::ScatterAdd { axis: a as i64 }),
        });
        let v = self.emit(op, &[data.v, idx.v, upd.v])?[0];
        Ok(Sv {
            v,
            ranked: true,
            sh: out,
            dims: out_dims.to_vec(),
        })
    }

    /// `gather[axis](table, indices)` from a table with the rank axis (`per_rank`): a table split along a dim
    /// other than `axis` gives that split; split along `axis` (a vocabulary-parallel embedding), each rank
    /// looks up the indices in its range (others read row 0, zeroed) and the results are a partial sum.
    fn gather_ranked(&mut self, ins: &[Sv], axis: i64, out_dims: &[Dim]) -> Result<Sv, PassError> {
        let (data, idx) = (&ins[0], &ins[1]);
        let a = norm_axis(axis, data.dims.len());
        let ir = idx.dims.len();
        let out_of_data = |d: usize| if d < a { d } else { d + ir - 1 };
        let (mut td, mut ti, mut out) = (self.rep(), self.rep(), self.rep());
        let mut rows_axis = None;
        for k in 0..td.per_axis.len() {
            match (&data.sh.per_axis[k], &idx.sh.per_axis[k]) {
                (Placement::Split(d), _) if *d == a && rows_axis.is_none() => {
                    rows_axis = Some(k);
                    td.per_axis[k] = Placement::Split(a);
                    out.per_axis[k] = Placement::Partial;
                }
                (Placement::Split(d), _) if *d != a => {
                    td.per_axis[k] = Placement::Split(*d);
                    out.per_axis[k] = Placement::Split(out_of_data(*d));
                }
                (_, Placement::Split(x)) => {
                    ti.per_axis[k] = Placement::Split(*x);
                    out.per_axis[k] = Placement::Split(a + x);
                }
                _ => {}
            }
        }
        let data = self.to(data, &td)?;
        let idx = self.to(idx, &ti)?;
        let idx = self.ranked(&idx)?;
        let mut iv = idx.v;
        let mut valid = None;
        if let Some(k) = rows_axis {
            let rows = self.local(&td, &data.dims)?[a].as_const().ok_or_else(|| {
                PassError::Options(format!("`{}`: a split table needs a constant row count", self.at))
            })?;
            let it = self.out.dtype(iv);
            let off = self.per_rank(it, &[], |c| vec![(c[k] as i64 * rows) as f64])?;
            let off = self.lift(off, ir)?;
            let local = self.out.sub(iv, off)?;
            let zero = self.out.scalar(0.0, it)?;
            let end = self.out.scalar(rows as f64, it)?;
            let ge = self.out.compare(fulgur_ir::CmpOp::Ge, local, zero)?;
            let lt = self.out.compare(fulgur_ir::CmpOp::Lt, local, end)?;
            let zi = self.out.cast(ge, it)?;
            let li = self.out.cast(lt, it)?;
            let both = self.out.mul(zi, li)?; // 1 where the row is this rank's
            iv = self.out.mul(local, both)?; // out-of-range rows read row 0 ...
            valid = Some(both);
        }
        let op = Op::Composite(Composite::PerRank {
            op: Box::new(Op::Gather { axis: a as i64 }),
        });
        let mut v = self.emit(op, &[data.v, iv])?[0];
        if let Some(both) = valid {
            // ... and are zeroed: [R, idx...] against [R, data[..a], idx..., data[a+1..]]
            let dt = self.out.dtype(v);
            let m = self.out.cast(both, dt)?;
            let idims = self.out.dims(m).to_vec();
            let mut shape = vec![idims[0].clone()];
            shape.extend(std::iter::repeat_n(Dim::from(1), a));
            shape.extend(idims[1..].iter().cloned());
            shape.extend(std::iter::repeat_n(Dim::from(1), data.dims.len() - a - 1));
            let m = self.out.reshape(m, shape)?;
            v = self.out.mul(v, m)?;
        }
        Ok(Sv {
            v,
            ranked: true,
            sh: out,
            dims: out_dims.to_vec(),
        })
    }

    /// Ranked `x` permuted by `perm` (of its dims, the rank axis kept in front), its splits moved along.
    fn permuted(&mut self, x: &Sv, perm: &[usize], out_dims: &[Dim]) -> Result<Sv, PassError> {
        let mut sh = x.sh.clone();
        for pl in sh.per_axis.iter_mut() {
            if let Placement::Split(d) = pl {
                *d = perm.iter().position(|q| q == d).expect("a permutation");
            }
        }
        let mut perm1 = vec![0];
        perm1.extend(perm.iter().map(|q| q + 1));
        let v = self.out.permute(x.v, &perm1)?;
        Ok(Sv {
            v,
            ranked: true,
            sh,
            dims: out_dims.to_vec(),
        })
    }

    fn unranked(&self, v: Value, dims: &[Dim]) -> Sv {
        Sv {
            v,
            ranked: false,
            sh: self.rep(),
            dims: dims.to_vec(),
        }
    }

    fn reshape(&mut self, x: &Sv, out_dims: &[Dim]) -> Result<Sv, PassError> {
        if !x.ranked {
            let v = self.out.reshape(x.v, out_dims.to_vec())?;
            return Ok(self.unranked(v, out_dims));
        }
        let blocks = blocks(&x.dims, out_dims);
        let mut want = x.sh.clone();
        let mut out = x.sh.clone();
        let local = self.local(&x.sh, &x.dims)?;
        let one = Dim::from(1);
        for (ir, or) in &blocks {
            // the mesh axes splitting dims of this block, in mesh order
            let axes: Vec<(usize, usize)> = (0..x.sh.per_axis.len())
                .filter_map(|k| match x.sh.per_axis[k] {
                    Placement::Split(d) if ir.contains(&d) => Some((k, d)),
                    _ => None,
                })
                .collect();
            let Some(last) = axes.iter().map(|a| a.1).max() else {
                continue;
            };
            // one dim cut into several: the axes, in mesh order, cut the first output dim until it is cut to
            // size 1, then the next (so the shard stays one contiguous run, chunks numbered in mesh order)
            let mut cuts: Vec<usize> = Vec::new();
            if or.len() > 1 && axes.iter().all(|a| a.1 == ir.start) {
                let mut left: Vec<Dim> = out_dims[or.clone()].to_vec();
                let mut o = 0;
                for (k, _) in &axes {
                    while o < left.len() && left[o] == one {
                        o += 1;
                    }
                    match left.get(o).and_then(|d| d.div_exact(&Dim::from(self.degree(*k)))) {
                        Some(rest) => {
                            left[o] = rest;
                            cuts.push(or.start + o);
                        }
                        None => break,
                    }
                }
            }
            if cuts.len() == axes.len() && or.len() > 1 {
                for ((k, _), o) in axes.iter().zip(&cuts) {
                    out.per_axis[*k] = Placement::Split(*o);
                }
                continue;
            }
            let ok = match or.len() {
                0 => false,
                // dims merged into one: the shard is one contiguous run of it when every dim before the last
                // split one is cut to size 1, and its chunks are numbered in mesh order when the axes split the
                // dims in order (earlier dims by earlier axes)
                1 => axes.windows(2).all(|w| w[0].1 <= w[1].1) && (ir.start..last).all(|d| local[d] == one),
                _ => false,
            };
            for (k, _) in axes {
                if ok {
                    out.per_axis[k] = Placement::Split(or.start);
                } else {
                    want.per_axis[k] = Placement::Replicated;
                    out.per_axis[k] = Placement::Replicated;
                }
            }
        }
        // several axes splitting one dim must still divide it
        if self.local(&out, out_dims).is_err() {
            for (w, o) in want.per_axis.iter_mut().zip(out.per_axis.iter_mut()) {
                if let Placement::Split(_) = o {
                    *w = Placement::Replicated;
                    *o = Placement::Replicated;
                }
            }
        }
        let x = self.to(x, &want)?;
        let mut shape = vec![Dim::from(self.mesh.ranks())];
        shape.extend(self.local(&out, out_dims)?);
        let v = self.out.reshape(x.v, shape)?;
        Ok(Sv {
            v,
            ranked: true,
            sh: out,
            dims: out_dims.to_vec(),
        })
    }

    /// An op working along `axis` of its first operand (softmax, top-k, slice, cumulative sum, one-hot on
    /// the indices): that axis gathered, a partial sum reduced unless `linear`; the op's own axis attribute
    /// shifted by the rank axis by `shift`.
    fn along(
        &mut self,
        x: &Sv,
        axis: Option<usize>,
        linear: bool,
        shifted: impl FnOnce(i64) -> Op,
        out_dims: &[Vec<Dim>],
    ) -> Result<Vec<Sv>, PassError> {
        let mut want = x.sh.clone();
        for p in want.per_axis.iter_mut() {
            let gather = match p {
                Placement::Split(d) => Some(*d) == axis,
                Placement::Partial => !linear,
                Placement::Replicated => false,
            };
            if gather {
                *p = Placement::Replicated;
            }
        }
        let x = self.to(x, &want)?;
        let a = axis.unwrap_or(0) as i64;
        if !x.ranked {
            let vs = self.emit(shifted(a), &[x.v])?;
            return Ok(vs.iter().zip(out_dims).map(|(&v, d)| self.unranked(v, d)).collect());
        }
        let vs = self.emit(shifted(a + 1), &[x.v])?;
        Ok(vs
            .iter()
            .zip(out_dims)
            .map(|(&v, d)| Sv {
                v,
                ranked: true,
                sh: want.clone(),
                dims: d.clone(),
            })
            .collect())
    }
}

/// `true` when elementwise `op` is linear in the operands marked `partial` jointly (so that per-rank summands
/// stay summands): negation; a sum or difference of summands; a product or a quotient with one summand factor
/// (the numerator) and replicated others.
fn linear_in(op: &Op, partial: &[bool]) -> bool {
    let count = partial.iter().filter(|&&p| p).count();
    match op {
        Op::Unary(UnaryOp::Neg) => true,
        Op::Binary(BinaryOp::Add | BinaryOp::Sub) => count == partial.len(),
        Op::Binary(BinaryOp::Mul) => count == 1,
        Op::Binary(BinaryOp::Div) => partial == [true, false],
        _ => false,
    }
}

/// The dims of a reshape grouped into blocks of equal size: `(input dims, output dims)` ranges. Equal dims
/// pair up; constant dims are merged until the products agree; what cannot be matched is one last block.
fn blocks(a: &[Dim], b: &[Dim]) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    let one = Dim::from(1);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push((i..i + 1, j..j + 1));
            i += 1;
            j += 1;
            continue;
        }
        if i < a.len() && a[i] == one {
            out.push((i..i + 1, j..j));
            i += 1;
            continue;
        }
        if j < b.len() && b[j] == one {
            out.push((i..i, j..j + 1));
            j += 1;
            continue;
        }
        let (si, sj) = (i, j);
        let rest = (si..a.len(), sj..b.len());
        let (Some(mut pa), Some(mut pb)) = (a.get(i).and_then(|d| d.as_const()), b.get(j).and_then(|d| d.as_const()))
        else {
            out.push(rest);
            break;
        };
        i += 1;
        j += 1;
        let mut ok = true;
        while pa != pb {
            let next = if pa < pb { a.get(i) } else { b.get(j) };
            match next.and_then(|d| d.as_const()) {
                Some(c) if pa < pb => {
                    pa *= c;
                    i += 1;
                }
                Some(c) => {
                    pb *= c;
                    j += 1;
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            out.push(rest);
            break;
        }
        out.push((si..i, sj..j));
    }
    out
}

/// The source graph with `sizes` bound: every symbol `sizes` names replaced in every type and attribute.
fn specialise(g: &Graph, sizes: &HashMap<String, i64>) -> Result<Graph, PassError> {
    let env: HashMap<String, Dim> = sizes.iter().map(|(k, &v)| (k.clone(), Dim::from(v))).collect();
    let mut out = Graph::new(g.name.clone());
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    for (id, n) in g.nodes() {
        let op = match &n.op {
            Op::Input { name, ty } => Op::Input {
                name: name.clone(),
                ty: TensorType::new(ty.dtype, ty.shape.0.iter().map(|d| d.substitute(&env)).collect()),
            },
            Op::Param { name, ty } => Op::Param {
                name: name.clone(),
                ty: TensorType::new(ty.dtype, ty.shape.0.iter().map(|d| d.substitute(&env)).collect()),
            },
            op => op.substitute_dims(&env),
        };
        let ins: Vec<Value> = n.inputs.iter().map(|v| Value::new(map[&v.node], v.index)).collect();
        map.insert(id, out.add_node(op, &ins, n.name.clone())?);
    }
    for (name, v) in g.outputs() {
        out.add_output(name.clone(), Value::new(map[&v.node], v.index))?;
    }
    Ok(out)
}

/// Shards `g` by `plan`: the simulated SPMD graph (same inputs, parameters and outputs as `g`, specialised to
/// `plan.sizes`) and a report of what was inserted. Errors name the node, value, dim and mesh axis.
/// Whether the recorded chain `c` is one of `g`: its dispatch, members, combine and backward the ops and order
/// recorded, the backward's values read from outside it only its contributions, the members' and the
/// dispatch's values read only by the chain and its backward.
fn step_chain_fits(g: &Graph, c: &crate::autodiff::MoeChainGrad) -> bool {
    let n = g.node_count();
    let ids = std::iter::once(c.dispatch)
        .chain(c.members.iter().copied())
        .chain([c.combine])
        .chain(c.backward.iter().copied());
    if ids.clone().any(|id| id.index() >= n) || c.backward.is_empty() {
        return false;
    }
    if !matches!(g.node(c.dispatch).op, Op::Composite(Composite::MoeDispatch { .. }))
        || !matches!(g.node(c.combine).op, Op::Composite(Composite::MoeCombine))
        || c.backward.windows(2).any(|w| w[0] >= w[1])
        || c.backward[0] <= c.combine
        || c.cotangent.node >= c.backward[0]
    {
        return false;
    }
    let backward: std::collections::HashSet<NodeId> = c.backward.iter().copied().collect();
    // a contribution's values: the contributions, and what a contribution permutes (a weight's gradient in
    // its stored layout, which the optimizer may read as it is)
    let mut contributions: std::collections::HashSet<Value> = c.contributions.iter().map(|(_, v)| *v).collect();
    for &(_, v) in &c.contributions {
        if let (Op::Permute { .. }, [x]) = (&g.node(v.node).op, g.node(v.node).inputs.as_slice()) {
            contributions.insert(*x);
        }
    }
    let outputs: std::collections::HashSet<Value> = g.outputs().iter().map(|(_, v)| *v).collect();
    let chain: std::collections::HashSet<NodeId> =
        std::iter::once(c.dispatch).chain(c.members.iter().copied()).collect();
    for &b in &c.backward {
        for (u, _, k) in g.users(b) {
            let v = Value::new(b, k);
            if !backward.contains(&u) && !contributions.contains(&v) {
                return false;
            }
        }
        if (0..g.node(b).outputs.len() as u32).any(|k| {
            let v = Value::new(b, k);
            outputs.contains(&v) && !contributions.contains(&v)
        }) {
            return false;
        }
    }
    chain.iter().all(|&m| {
        g.users(m)
            .into_iter()
            .all(|(u, _, _)| chain.contains(&u) || u == c.combine || backward.contains(&u))
            && (0..g.node(m).outputs.len() as u32).all(|k| !outputs.contains(&Value::new(m, k)))
    })
}

/// The name a [`ShardPlan::constraints`] pattern matches for node `n`: `PARAM.slice` for a `slice` of a parameter
/// (the form the optimizer's passes keep, whatever they name the node), of the input a training step takes it as,
/// or of a cast of either; else the node's name; none for an input or parameter (their rules place them).
fn constraint_name(g: &Graph, n: &fulgur_ir::Node) -> Option<String> {
    if n.op.input_decl().is_some() {
        return None;
    }
    if let (Op::Slice { .. }, [x]) = (&n.op, n.inputs.as_slice()) {
        // through casts (bf16 compute reads f32 master weights cast), to a parameter or to the input a training
        // step or a pipeline stage takes the parameter as
        let mut v = *x;
        while let (Op::Cast { .. }, [y]) = (&g.node(v.node).op, g.node(v.node).inputs.as_slice()) {
            v = *y;
        }
        if let Some((name, _, _)) = g.node(v.node).op.input_decl() {
            return Some(format!("{name}.slice"));
        }
    }
    n.name.clone()
}

pub fn shard_graph(g: &Graph, plan: &ShardPlan) -> Result<(Graph, ShardReport), PassError> {
    shard_step(g, plan, &[])
}

/// [`shard_graph`] of a training step whose MoE chains' backward autodiff recorded (`GradReport::moe_chains`,
/// in `g`'s nodes): each such chain whose placements fit is rewritten as the routed exchange, forward and
/// backward (its recorded backward replaced by the autodiff of the per-rank parts, joined by the exchanges
/// transposed); the others, and the chains of `g` not recorded, take the rules they take in [`shard_graph`].
pub fn shard_step(
    g: &Graph,
    plan: &ShardPlan,
    trained: &[crate::autodiff::MoeChainGrad],
) -> Result<(Graph, ShardReport), PassError> {
    let g = specialise(g, &plan.sizes)?;
    // the recorded chains that fit the step: its nodes as recorded, and every value of the backward read from
    // outside it a contribution
    let trained: Vec<&crate::autodiff::MoeChainGrad> = trained.iter().filter(|c| step_chain_fits(&g, c)).collect();
    let mut trained_at: HashMap<NodeId, usize> = HashMap::new();
    let mut trained_skip: std::collections::HashSet<NodeId> = Default::default();
    let mut backward_of: HashMap<NodeId, usize> = HashMap::new();
    for (k, c) in trained.iter().enumerate() {
        trained_at.insert(c.combine, k);
        trained_at.insert(c.backward[0], k);
        trained_skip.extend(c.members.iter().copied());
        trained_skip.insert(c.dispatch);
        backward_of.extend(c.backward[1..].iter().map(|&b| (b, k)));
    }
    let mut routed_train: HashMap<usize, moe::RoutedTrain> = HashMap::new();
    let mut p = Pass {
        out: Graph::new(format!("{}_sharded", g.name)),
        mesh: &plan.mesh,
        report: ShardReport::default(),
        at: String::new(),
        converted: HashMap::new(),
        reduced: HashMap::new(),
    };
    let mut vals: HashMap<Value, Sv> = HashMap::new();
    // the routed MoE chains, rewritten as a whole at their `moe_combine` (their other nodes wait for it)
    let chains = moe::chains(&g);
    let members: std::collections::HashSet<NodeId> = chains.values().flat_map(|c| c.members()).collect();
    for (id, _) in g.nodes() {
        if let Some(&k) = trained_at.get(&id) {
            let rec = trained[k];
            if id == rec.combine {
                let n = g.node(id);
                p.at = node_label(n, id);
                let scope = scope_of(n);
                if let Some(s) = &scope {
                    p.out.push_scope(s.clone());
                }
                let res = p.routed_train_forward(&g, rec, &vals);
                if scope.is_some() {
                    p.out.pop_scope();
                }
                match res.map_err(|e| at_node(&p, n, e))? {
                    Some((out, st)) => {
                        vals.insert(Value::new(id, 0), out);
                        routed_train.insert(k, st);
                        p.report.routed_moe += 1;
                    }
                    None => {
                        // the chain's own rules, its members first
                        for &m in std::iter::once(&rec.dispatch).chain(&rec.members) {
                            sharded_node(&mut p, plan, &g, m, &mut vals)?;
                        }
                        sharded_node(&mut p, plan, &g, id, &mut vals)?;
                    }
                }
            } else if let Some(st) = routed_train.get(&k) {
                let n = g.node(rec.combine);
                p.at = node_label(n, rec.combine);
                let scope = scope_of(g.node(id));
                if let Some(s) = &scope {
                    p.out.push_scope(s.clone());
                }
                let res = p.routed_train_backward(&g, rec, st, &vals);
                if scope.is_some() {
                    p.out.pop_scope();
                }
                for (c, sv) in res.map_err(|e| at_node(&p, n, e))? {
                    vals.insert(c, sv);
                }
            } else {
                // not routed: the backward's nodes by their own rules, each in its place
                sharded_node(&mut p, plan, &g, id, &mut vals)?;
            }
            continue;
        }
        if let Some(&k) = backward_of.get(&id) {
            if !routed_train.contains_key(&k) {
                sharded_node(&mut p, plan, &g, id, &mut vals)?;
            }
            continue;
        }
        if trained_skip.contains(&id) {
            continue;
        }
        if members.contains(&id) {
            continue;
        }
        if let Some(chain) = chains.get(&id) {
            if routed_chain(&mut p, &g, chain, &mut vals)? {
                continue;
            }
            for m in chain.members() {
                sharded_node(&mut p, plan, &g, m, &mut vals)?;
            }
        }
        sharded_node(&mut p, plan, &g, id, &mut vals)?;
    }
    for (name, v) in g.outputs() {
        p.at = format!("output `{name}`");
        let rep = p.rep();
        let sv = p.to(&vals[v], &rep)?;
        let v = if sv.ranked {
            let s = p.out.named(
                RANK_FIRST,
                Op::Slice {
                    axis: 0,
                    start: Dim::from(0),
                    end: Dim::from(1),
                },
                &[sv.v],
            )?;
            p.out.named(
                RANK_FIRST,
                Op::Reshape {
                    shape: fulgur_ir::Shape(sv.dims.clone()),
                },
                &[s],
            )?
        } else {
            sv.v
        };
        p.out.add_output(name.clone(), v)?;
    }
    let out = p.out.dead_code_eliminated();
    for (_, n) in out.nodes() {
        if let Op::Composite(c) = &n.op {
            if matches!(
                c,
                Composite::AllReduce { .. }
                    | Composite::AllGather { .. }
                    | Composite::ReduceScatter { .. }
                    | Composite::AllToAll { .. }
                    | Composite::SendRecv { .. }
                    | Composite::ShardSlice { .. }
                    | Composite::AllToAllDispatch { .. }
                    | Composite::AllToAllCombine { .. }
            ) {
                *p.report.collectives.entry(c.name().to_string()).or_default() += 1;
            }
        }
    }
    Ok((out, p.report))
}

/// Where the pass is: the source node's name (a leaf's declared name, else `%id`) for reports and errors.
fn node_label(n: &fulgur_ir::Node, id: NodeId) -> String {
    match n.op.input_decl() {
        Some((name, _, _)) => name.to_string(),
        None => n.name.clone().unwrap_or_else(|| format!("%{}", id.index())),
    }
}

/// The scope new nodes of source node `n` are named in (`layers.3.moe.all_gather`), keeping layer templates.
fn scope_of(n: &fulgur_ir::Node) -> Option<String> {
    n.name
        .as_deref()
        .and_then(|s| s.rsplit_once('.'))
        .map(|(s, _)| s.to_string())
}

/// An error of a rule, named by the source node.
fn at_node(p: &Pass, n: &fulgur_ir::Node, e: PassError) -> PassError {
    match e {
        PassError::Options(m) | PassError::Rule(m) if !m.starts_with("sharding ") => {
            PassError::Options(format!("sharding `{}` ({}): {m}", p.at, n.op.name()))
        }
        e => e,
    }
}

/// Source node `id` rewritten by its rule (and a sharding constraint on its first output), its outputs'
/// sharded values recorded in `vals`.
fn sharded_node(
    p: &mut Pass,
    plan: &ShardPlan,
    g: &Graph,
    id: NodeId,
    vals: &mut HashMap<Value, Sv>,
) -> Result<(), PassError> {
    let n = g.node(id);
    p.at = node_label(n, id);
    let ins: Vec<Sv> = n
        .inputs
        .iter()
        .map(|v| {
            let sv = &vals[v];
            p.reduced.get(&sv.v).unwrap_or(sv).clone()
        })
        .collect();
    let outs: Vec<Vec<Dim>> = n.outputs.iter().map(|t| t.shape.0.clone()).collect();
    let scope = scope_of(n);
    if let Some(s) = &scope {
        p.out.push_scope(s.clone());
    }
    let res = rewrite(p, plan, n, &ins, &outs);
    if scope.is_some() {
        p.out.pop_scope();
    }
    let mut res = res.map_err(|e| at_node(p, n, e))?;
    if let Some(name) = constraint_name(g, n) {
        if let Some((_, places)) = plan.constraints.iter().find(|(p, _)| glob(p, &name)) {
            let mut to = Sharding::replicated(&plan.mesh);
            for (axis, pl) in places {
                to.per_axis[plan.mesh.axis(axis)?] = pl.clone();
            }
            to.local_dims(&plan.mesh, &name, &res[0].dims)?;
            res[0] = p.to(&res[0], &to)?;
        }
    }
    for (i, sv) in res.into_iter().enumerate() {
        vals.insert(Value::new(id, i as u32), sv);
    }
    Ok(())
}

/// A routed MoE chain rewritten as the exchange (see [`moe`]), its combine's output recorded in `vals`;
/// `false` when the placements do not fit it.
fn routed_chain(
    p: &mut Pass,
    g: &Graph,
    chain: &moe::MoeChain,
    vals: &mut HashMap<Value, Sv>,
) -> Result<bool, PassError> {
    let n = g.node(chain.combine);
    p.at = node_label(n, chain.combine);
    let Op::Composite(Composite::MoeDispatch { experts }) = g.node(chain.dispatch).op else {
        return Ok(false);
    };
    let sv = |p: &Pass, v: Value| {
        let s = &vals[&v];
        p.reduced.get(&s.v).unwrap_or(s).clone()
    };
    let d = &g.node(chain.dispatch).inputs;
    let x = sv(p, d[0]);
    let ids = sv(p, d[1]);
    let w_down = sv(p, g.node(chain.down).inputs[2]);
    let weights = sv(p, n.inputs[2]);
    let ups: Vec<Sv> = match chain.up {
        moe::ChainUp::Fused(u) => vec![sv(p, g.node(u).inputs[2])],
        moe::ChainUp::Split { gate, up, .. } => vec![sv(p, g.node(gate).inputs[2]), sv(p, g.node(up).inputs[2])],
    };
    let up = match &ups[..] {
        [w13] => moe::UpWeights::Fused(w13),
        [gate, up] => moe::UpWeights::Split { gate, up },
        _ => return Ok(false),
    };
    let scope = scope_of(n);
    if let Some(s) = &scope {
        p.out.push_scope(s.clone());
    }
    let res = p.routed_moe(experts, [&x, &ids, &weights], up, &w_down, &n.outputs[0].shape.0);
    if scope.is_some() {
        p.out.pop_scope();
    }
    match res.map_err(|e| at_node(p, n, e))? {
        Some(out) => {
            vals.insert(Value::new(chain.combine, 0), out);
            p.report.routed_moe += 1;
            Ok(true)
        }
        None => Ok(false),
    }
}

fn rewrite(
    p: &mut Pass,
    plan: &ShardPlan,
    n: &fulgur_ir::Node,
    ins: &[Sv],
    outs: &[Vec<Dim>],
) -> Result<Vec<Sv>, PassError> {
    let all_unranked = ins.iter().all(|s| !s.ranked);
    let first = || ins[0].clone();
    let rank0 = ins.first().map(|s| s.dims.len()).unwrap_or(0);
    match &n.op {
        Op::Input { name, .. } | Op::Param { name, .. } => {
            let v = p.out.add_node(n.op.clone(), &[], n.name.clone())?;
            let sv = p.unranked(Value::new(v, 0), &outs[0]);
            let sh = p.normal(plan.placement_of(name, &outs[0])?);
            let stored = p.normal(plan.stored_placement_of(name, &outs[0])?);
            if is_rep(&stored) {
                return Ok(vec![sv]);
            }
            p.report.placed.push((name.clone(), describe(p.mesh, &stored)));
            let kept = p.to(&sv, &stored)?;
            // stored split further: gathered to the rule's placement for its use
            Ok(vec![p.to(&kept, &sh)?])
        }
        _ if all_unranked => {
            let vals: Vec<Value> = ins.iter().map(|s| s.v).collect();
            let vs = p.out.op(n.op.clone(), &vals)?;
            Ok(vs.iter().zip(outs).map(|(&v, d)| p.unranked(v, d)).collect())
        }
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. } => {
            Ok(vec![p.elementwise(&n.op, ins, &outs[0])?])
        }
        Op::MatMul => Ok(vec![p.matmul(&ins[0], &ins[1], &outs[0])?]),
        Op::Reduce { op, axes, keepdims } => Ok(vec![p.reduce(*op, axes, *keepdims, &ins[0], &outs[0])?]),
        Op::Reshape { .. } => Ok(vec![p.reshape(&ins[0], &outs[0])?]),
        Op::Permute { perm } => Ok(vec![p.permuted(&first(), perm, &outs[0])?]),
        Op::Broadcast { .. } => {
            let x = first();
            let off = outs[0].len() - x.dims.len();
            let mut sh = x.sh.clone();
            for pl in sh.per_axis.iter_mut() {
                if let Placement::Split(d) = pl {
                    *d += off;
                }
            }
            let mut shape = vec![Dim::from(p.mesh.ranks())];
            shape.extend(p.local(&sh, &outs[0])?);
            let v = p.pad(&x, outs[0].len())?;
            let v = p.out.broadcast(v, shape)?;
            Ok(vec![Sv {
                v,
                ranked: true,
                sh,
                dims: outs[0].clone(),
            }])
        }
        Op::Slice { axis, start, end } => {
            let a = norm_axis(*axis, rank0);
            let (s, e) = (start.clone(), end.clone());
            p.along(
                &first(),
                Some(a),
                true,
                |ax| Op::Slice {
                    axis: ax,
                    start: s,
                    end: e,
                },
                outs,
            )
        }
        Op::CumSum {
            axis,
            exclusive,
            reverse,
        } => {
            let a = norm_axis(*axis, rank0);
            let (ex, rv) = (*exclusive, *reverse);
            p.along(
                &first(),
                Some(a),
                true,
                |ax| Op::CumSum {
                    axis: ax,
                    exclusive: ex,
                    reverse: rv,
                },
                outs,
            )
        }
        Op::TopK { k, axis } => {
            let a = norm_axis(*axis, rank0);
            let k = *k;
            p.along(&first(), Some(a), false, |ax| Op::TopK { k, axis: ax }, outs)
        }
        Op::OneHot { .. } => {
            let op = n.op.clone();
            p.along(&first(), None, false, |_| op, outs)
        }
        Op::Composite(Composite::Softmax { axis }) => {
            let a = norm_axis(*axis, rank0);
            p.along(
                &first(),
                Some(a),
                false,
                |ax| Op::Composite(Composite::Softmax { axis: ax }),
                outs,
            )
        }
        Op::Composite(Composite::LogSoftmax { axis }) => {
            let a = norm_axis(*axis, rank0);
            p.along(
                &first(),
                Some(a),
                false,
                |ax| Op::Composite(Composite::LogSoftmax { axis: ax }),
                outs,
            )
        }
        Op::Concat { axis } => {
            let a = norm_axis(*axis, rank0);
            let mut target = p.rep();
            for k in 0..target.per_axis.len() {
                let split = ins.iter().find_map(|s| match s.sh.per_axis[k] {
                    Placement::Split(d) if d != a => Some(d),
                    _ => None,
                });
                target.per_axis[k] = match split {
                    Some(d) => Placement::Split(d),
                    None if ins.iter().all(|s| s.sh.per_axis[k] == Placement::Partial) => Placement::Partial,
                    None => Placement::Replicated,
                };
            }
            let mut vals = Vec::new();
            for s in ins {
                let c = p.to(s, &target)?;
                vals.push(p.ranked(&c)?.v);
            }
            let v = p.emit(Op::Concat { axis: a as i64 + 1 }, &vals)?[0];
            Ok(vec![Sv {
                v,
                ranked: true,
                sh: target,
                dims: outs[0].clone(),
            }])
        }
        Op::ScatterAdd { axis } => Ok(vec![p.scatter_add(ins, *axis, &outs[0])?]),
        Op::Gather { axis } if ins[0].ranked => Ok(vec![p.gather_ranked(ins, *axis, &outs[0])?]),
        Op::Gather { axis } => {
            let (data, idx) = (&ins[0], &ins[1]);
            let a = norm_axis(*axis, data.dims.len());
            let mut want = idx.sh.clone();
            for pl in want.per_axis.iter_mut() {
                if *pl == Placement::Partial {
                    *pl = Placement::Replicated;
                }
            }
            let idx = p.to(idx, &want)?;
            let mut v = p.emit(Op::Gather { axis: a as i64 }, &[data.v, idx.v])?[0];
            if a > 0 {
                // the rank axis lands at `a`: moved to the front
                let r = outs[0].len() + 1;
                let mut perm = vec![a];
                perm.extend((0..r).filter(|&q| q != a));
                v = p.out.named(RANK_FRONT, Op::Permute { perm }, &[v])?;
            }
            let mut sh = want;
            for pl in sh.per_axis.iter_mut() {
                if let Placement::Split(d) = pl {
                    *d += a;
                }
            }
            Ok(vec![Sv {
                v,
                ranked: true,
                sh,
                dims: outs[0].clone(),
            }])
        }
        Op::Composite(Composite::RmsNorm { eps }) => {
            let (x, w) = (&ins[0], &ins[1]);
            let last = x.dims.len() - 1;
            let mut want = x.sh.clone();
            for pl in want.per_axis.iter_mut() {
                if *pl == Placement::Partial || *pl == Placement::Split(last) {
                    *pl = Placement::Replicated;
                }
            }
            let x = p.to(x, &want)?;
            let x = p.ranked(&x)?;
            let rep = p.rep();
            let w = p.to(w, &rep)?;
            // the weight must be rank 1: a weight with the rank axis (a gathered shard) goes per rank
            let op = Op::Composite(Composite::RmsNorm { eps: *eps });
            let v = if w.ranked {
                let op = Op::Composite(Composite::PerRank { op: Box::new(op) });
                p.emit(op, &[x.v, w.v])?[0]
            } else {
                p.emit(op, &[x.v, w.v])?[0]
            };
            Ok(vec![Sv {
                v,
                ranked: true,
                sh: want,
                dims: outs[0].clone(),
            }])
        }
        Op::Composite(Composite::LightningAttention { block }) => {
            Ok(vec![p.lightning_attention(ins, *block, &outs[0])?])
        }
        Op::Composite(Composite::FlashAttention { scale, causal }) => {
            Ok(vec![p.flash_attention(ins, *scale, *causal, None, &outs[0])?])
        }
        Op::Composite(Composite::FlashAttentionGrad { scale, causal }) => {
            p.flash_attention_grad(ins, *scale, *causal, outs)
        }
        Op::Composite(Composite::FlashAttentionRope { scale, causal, rotary }) => Ok(vec![p.flash_attention(
            ins,
            *scale,
            *causal,
            Some(*rotary),
            &outs[0],
        )?]),
        Op::Composite(Composite::MoeRouter { k }) => {
            let k = *k;
            p.along(
                &first(),
                Some(rank0 - 1),
                false,
                |_| Op::Composite(Composite::MoeRouter { k }),
                outs,
            )
        }
        Op::Composite(
            Composite::MoeDispatch { .. }
            | Composite::GroupedMatmul { .. }
            | Composite::MoeCombine
            | Composite::GroupedMatmulWgrad,
        ) => {
            p.report.whole_moe += 1;
            p.moe_whole(&n.op, ins, outs)
        }
        op => Err(PassError::Options(format!(
            "the sharding pass has no rule for `{}` on per-rank operands",
            op.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*.qkv_proj.weight", "model.layers.3.self_attn.qkv_proj.weight"));
        assert!(glob("model.*.mlp.*", "model.layers.0.mlp.experts.down_proj"));
        assert!(!glob("*.o_proj.weight", "model.layers.3.self_attn.out_proj.weight"));
        assert!(glob("input_ids", "input_ids"));
        assert!(!glob("a*a", "a"));
    }

    /// Regressions: an input placed as a partial sum (its value kept by rank 0, zeros elsewhere) comes back
    /// whole; an `rms_norm` whose weight is split is run per rank with the gathered weight.
    #[test]
    fn partial_inputs_and_split_norm_weights_give_the_single_device_result() {
        use fulgur_ir::{DType, Interpreter, Precision, Tensor};
        let mut g = Graph::new("g");
        let x = g.input("x", DType::F32, vec![Dim::from(4), Dim::from(8)]).unwrap();
        let w = g.param("w", DType::F32, vec![Dim::from(8)]).unwrap();
        let y = g.rms_norm(x, w, 1e-5).unwrap();
        let z = g.add(y, x).unwrap();
        g.add_output("z", z).unwrap();
        g.add_output("x", x).unwrap();
        let feed: HashMap<String, Tensor> = [
            (
                "x".to_string(),
                Tensor::from_f64(DType::F32, vec![4, 8], (0..32).map(|i| (i % 7) as f64 - 3.0).collect()),
            ),
            (
                "w".to_string(),
                Tensor::from_f64(DType::F32, vec![8], (0..8).map(|i| 1.0 + i as f64 / 8.0).collect()),
            ),
        ]
        .into();
        let single = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
        let plan = ShardPlan {
            mesh: Mesh::new(&[("a", 2), ("b", 2)]).unwrap(),
            sizes: HashMap::new(),
            rules: vec![
                ("x".into(), vec![("a".into(), Placement::Partial)]),
                ("w".into(), vec![("b".into(), Placement::Split(0))]),
            ],
            stored: vec![("w".into(), vec![("a".into(), Placement::Split(0))])],
            constraints: Vec::new(),
        };
        let (sg, _) = shard_graph(&g, &plan).unwrap();
        let out = Interpreter::new(Precision::F64).run(&sg, &feed).unwrap();
        for name in ["z", "x"] {
            assert_eq!(out[name].shape, single[name].shape, "{name}");
            let e = out[name].rel_l2(&single[name]);
            assert!(e < 1e-12, "`{name}` off by {e}");
        }
    }

    #[test]
    fn reshape_blocks() {
        let d = |v: &[i64]| v.iter().map(|&x| Dim::from(x)).collect::<Vec<_>>();
        assert_eq!(
            blocks(&d(&[2, 40, 128]), &d(&[2, 40, 4, 32])),
            vec![(0..1, 0..1), (1..2, 1..2), (2..3, 2..4)]
        );
        assert_eq!(
            blocks(&d(&[2, 40, 128]), &d(&[80, 128])),
            vec![(0..2, 0..1), (2..3, 1..2)]
        );
        assert_eq!(blocks(&d(&[6, 1, 4]), &d(&[24])), vec![(0..3, 0..1)]);
        assert_eq!(
            blocks(&d(&[1, 6]), &d(&[6, 1])),
            vec![(0..1, 0..0), (1..2, 0..1), (2..2, 1..2)]
        );
    }
}
