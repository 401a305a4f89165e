//! Meshes and shardings (`docs/parallelism.md`, §2 and §4): the vocabulary the sharding pass is built from.
//!
//! A [`Mesh`] is an ordered list of named axes with degrees; a rank's coordinates are row-major over them, and a
//! collective running along one axis names its groups by the mesh's sizes and that axis's index
//! ([`Mesh::group`], the `mesh`/`over` attributes of the IR's collectives). A [`Sharding`] places a value on the
//! mesh, per axis: replicated, split along one of the value's dims, or a partial sum; [`Sharding::local_dims`]
//! gives a rank's shard, refusing a degree that does not divide the dimension it splits, naming both.
//! [`reshard`] inserts the collectives that turn one sharding of a value into another (tested on the
//! interpreter against the target's shards of the same global tensor).

mod lower;
mod spmd;

pub use lower::lower_rank;
pub use spmd::{glob, shard_graph, shard_step, ShardPlan, ShardReport};

use crate::PassError;
use fulgur_ir::Dim;
use std::fmt;

/// A device mesh: named axes (`dp`, `tp`, `ep`, ...) with their degrees, ranks row-major over them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mesh {
    axes: Vec<(String, usize)>,
}

impl Mesh {
    /// A mesh of `axes` (name, degree): names distinct and non-empty, degrees at least 1.
    pub fn new(axes: &[(&str, usize)]) -> Result<Mesh, PassError> {
        let mut seen = std::collections::HashSet::new();
        for &(name, degree) in axes {
            if name.is_empty() {
                return Err(PassError::Options("a mesh axis needs a name".into()));
            }
            if !seen.insert(name) {
                return Err(PassError::Options(format!("mesh axis `{name}` is named twice")));
            }
            if degree == 0 {
                return Err(PassError::Options(format!("mesh axis `{name}` has degree 0")));
            }
        }
        Ok(Mesh {
            axes: axes.iter().map(|&(n, d)| (n.to_string(), d)).collect(),
        })
    }

    /// The number of ranks: the product of the degrees.
    pub fn ranks(&self) -> usize {
        self.axes.iter().map(|a| a.1).product()
    }

    /// The axes' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.axes.iter().map(|a| a.0.clone()).collect()
    }

    /// The axes' degrees, in order (a collective's `mesh` attribute).
    pub fn sizes(&self) -> Vec<usize> {
        self.axes.iter().map(|a| a.1).collect()
    }

    /// The index of axis `name`.
    pub fn axis(&self, name: &str) -> Result<usize, PassError> {
        self.axes
            .iter()
            .position(|a| a.0 == name)
            .ok_or_else(|| PassError::Options(format!("the mesh {self} has no axis `{name}`")))
    }

    /// The degree of axis `name`.
    pub fn degree(&self, name: &str) -> Result<usize, PassError> {
        Ok(self.axes[self.axis(name)?].1)
    }

    /// Rank `r`'s coordinate on each axis (row-major: the last axis varies fastest).
    pub fn coords(&self, r: usize) -> Vec<usize> {
        let mut rest = r;
        let mut c = vec![0; self.axes.len()];
        for (i, a) in self.axes.iter().enumerate().rev() {
            c[i] = rest % a.1;
            rest /= a.1;
        }
        c
    }

    /// The groups of a collective along axis `name`: its `mesh` and `over` attributes.
    pub fn group(&self, name: &str) -> Result<(Vec<usize>, usize), PassError> {
        Ok((self.sizes(), self.axis(name)?))
    }
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.axes.iter().map(|(n, d)| format!("{n}={d}")).collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

/// How a value lies along one mesh axis.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Every rank of the axis holds the whole value.
    Replicated,
    /// The value's dim `d` is cut into as many chunks as the axis's degree, rank `i` of the axis holding chunk
    /// `i` (where several axes split one dim, the earlier axis's chunks are the outer ones).
    Split(usize),
    /// Every rank of the axis holds a summand; the value is their sum.
    Partial,
}

/// A value's placement on each axis of a mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sharding {
    pub per_axis: Vec<Placement>,
}

impl Sharding {
    /// Replicated on every axis of `mesh`.
    pub fn replicated(mesh: &Mesh) -> Sharding {
        Sharding {
            per_axis: vec![Placement::Replicated; mesh.axes.len()],
        }
    }

    /// A rank's shard of a value of global dims `dims` named `what` (for errors): each dim divided by the
    /// degrees of the axes that split it. A degree that does not divide its dimension, a split of a dim the
    /// value lacks, or a placement list of the wrong length is an error naming the value, the dim and the
    /// axis.
    pub fn local_dims(&self, mesh: &Mesh, what: &str, dims: &[Dim]) -> Result<Vec<Dim>, PassError> {
        if self.per_axis.len() != mesh.axes.len() {
            return Err(PassError::Options(format!(
                "`{what}`: a sharding of {} placements on the mesh {mesh} of {} axes",
                self.per_axis.len(),
                mesh.axes.len()
            )));
        }
        let mut out = dims.to_vec();
        for (p, (name, degree)) in self.per_axis.iter().zip(&mesh.axes) {
            if let Placement::Split(d) = p {
                let Some(size) = out.get(*d).cloned() else {
                    return Err(PassError::Options(format!(
                        "`{what}` has {} dims; mesh axis `{name}` cannot split its dim {d}",
                        dims.len()
                    )));
                };
                out[*d] = size.div_exact(&Dim::from(*degree)).ok_or_else(|| {
                    PassError::Options(format!(
                        "`{what}`: dim {d} of size `{}` is split by mesh axis `{name}` of degree {degree}, which does \
                         not divide `{size}`",
                        dims[*d]
                    ))
                })?;
            }
        }
        Ok(out)
    }
}

/// The collectives turning value `x` (its per-rank shards on the simulated rank axis: `[R, local dims...]`) from
/// sharding `from` into sharding `to`, axis by axis: a partial sum becomes replicated by `all_reduce` or split by
/// `reduce_scatter`, a split becomes replicated by `all_gather`, a replica becomes split by `shard_slice` (each
/// rank keeping its chunk, no communication), a split on one dim becomes a split on another by `all_to_all`. A
/// placement kept adds nothing; a change that would nest chunks out of mesh order is refused, naming the axes.
pub fn reshard(
    g: &mut fulgur_ir::Graph,
    x: fulgur_ir::Value,
    mesh: &Mesh,
    from: &Sharding,
    to: &Sharding,
) -> Result<fulgur_ir::Value, PassError> {
    use fulgur_ir::{Composite, Op};
    let n = mesh.axes.len();
    if from.per_axis.len() != n || to.per_axis.len() != n {
        return Err(PassError::Options(format!(
            "a resharding on the mesh {mesh} needs {n} placements on each side"
        )));
    }
    let sizes = mesh.sizes();
    let mut v = x;
    // gathers first, the innermost axis first (an earlier axis's chunks hold the later axes' chunks), then the
    // rest in mesh order; a collective on a dim that a later axis still splits would nest the chunks wrongly
    let gather = |k: usize| {
        matches!(
            (&from.per_axis[k], &to.per_axis[k]),
            (Placement::Split(_), Placement::Replicated)
        )
    };
    let mut order: Vec<usize> = (0..n).rev().filter(|&k| gather(k)).collect();
    order.extend((0..n).filter(|&k| !gather(k)));
    let mut cur = from.per_axis.clone();
    for k in order {
        let (f, t) = (&from.per_axis[k], &to.per_axis[k]);
        let moved: Vec<usize> = match (f, t) {
            (Placement::Split(p), Placement::Split(q)) if p != q => vec![*p, *q],
            (Placement::Split(d), _) | (_, Placement::Split(d)) if f != t => vec![*d],
            _ => vec![],
        };
        for d in moved {
            if let Some(inner) = (k + 1..n).find(|&j| cur[j] == Placement::Split(d)) {
                return Err(PassError::Options(format!(
                    "resharding dim {d} along mesh axis `{}` while the later axis `{}` splits it (chunks nest in \
                     mesh order) is not supported yet",
                    mesh.axes[k].0, mesh.axes[inner].0
                )));
            }
        }
        cur[k] = t.clone();
        let (mesh_v, over) = (sizes.clone(), k);
        let op = match (f, t) {
            (a, b) if a == b => continue,
            (Placement::Partial, Placement::Replicated) => Composite::AllReduce { mesh: mesh_v, over },
            (Placement::Partial, Placement::Split(d)) => Composite::ReduceScatter {
                axis: *d as i64 + 1,
                mesh: mesh_v,
                over,
            },
            (Placement::Split(d), Placement::Replicated) => Composite::AllGather {
                axis: *d as i64 + 1,
                mesh: mesh_v,
                over,
            },
            (Placement::Replicated, Placement::Split(d)) => Composite::ShardSlice {
                axis: *d as i64 + 1,
                mesh: mesh_v,
                over,
            },
            (Placement::Split(p), Placement::Split(q)) => {
                v = split_to_split(g, v, mesh, k, *p, *q)?;
                continue;
            }
            (a, b) => {
                return Err(PassError::Options(format!(
                    "resharding along mesh axis `{}` from {a:?} to {b:?} is not supported yet",
                    mesh.axes[k].0
                )))
            }
        };
        v = g.op(Op::Composite(op), &[v])?[0];
    }
    Ok(v)
}

/// Split on dim `p` → split on dim `q` along mesh axis `k` (group size `G`) by one `all_to_all`: dim `q` of each
/// shard is cut into `G` chunks on a new axis, the exchange sends chunk `r` to rank `r` of the group (the new
/// axis then indexes the source rank), and that axis is merged into dim `p` as its outer factor (the source's
/// chunk of `p`).
fn split_to_split(
    g: &mut fulgur_ir::Graph,
    x: fulgur_ir::Value,
    mesh: &Mesh,
    k: usize,
    p: usize,
    q: usize,
) -> Result<fulgur_ir::Value, PassError> {
    use fulgur_ir::{Composite, Op};
    let gsize = mesh.axes[k].1;
    let dims = g.dims(x).to_vec(); // [R, local...]
    let (p1, q1) = (p + 1, q + 1);
    let chunk = dims[q1].div_exact(&Dim::from(gsize)).ok_or_else(|| {
        PassError::Options(format!(
            "dim {q} of size `{}` is split by mesh axis `{}` of degree {gsize}, which does not divide it",
            dims[q1], mesh.axes[k].0
        ))
    })?;
    let mut cut = dims[..q1].to_vec();
    cut.push(Dim::from(gsize));
    cut.push(chunk.clone());
    cut.extend(dims[q1 + 1..].iter().cloned());
    let y = g.reshape(x, cut)?;
    let y = g.op(
        Op::Composite(Composite::AllToAll {
            axis: q1 as i64,
            mesh: mesh.sizes(),
            over: k,
        }),
        &[y],
    )?[0];
    // move the source axis (at q1) to just before dim p, then merge the two
    let at_p = if p1 < q1 { p1 } else { p1 + 1 };
    let mut perm: Vec<usize> = (0..dims.len() + 1).filter(|&i| i != q1).collect();
    let pos = perm.iter().position(|&i| i == at_p).expect("dim p is kept");
    perm.insert(pos, q1);
    let y = g.permute(y, &perm)?;
    let mut merged = dims.clone();
    merged[p1] = dims[p1].clone() * Dim::from(gsize);
    merged[q1] = chunk;
    Ok(g.reshape(y, merged)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulgur_ir::{DType, Graph, Interpreter, Precision, Tensor};
    use std::collections::HashMap;

    /// The simulated shards `[R, local...]` of a global row-major tensor: per rank, each split dim cut to the
    /// rank's chunk (axes in mesh order, the earlier outer); a partial sum held whole by the ranks at
    /// coordinate 0 of that axis and zero elsewhere.
    fn shards(global: &[f64], dims: &[usize], mesh: &Mesh, s: &Sharding) -> (Vec<f64>, Vec<usize>) {
        let ld: Vec<usize> = s
            .local_dims(mesh, "t", &dims.iter().map(|&d| Dim::from(d)).collect::<Vec<_>>())
            .unwrap()
            .iter()
            .map(|d| d.as_const().unwrap() as usize)
            .collect();
        let st = |ds: &[usize]| {
            let mut s = vec![1; ds.len()];
            for i in (0..ds.len().saturating_sub(1)).rev() {
                s[i] = s[i + 1] * ds[i + 1];
            }
            s
        };
        let (gst, lst) = (st(dims), st(&ld));
        let local_n: usize = ld.iter().product();
        let mut out = Vec::with_capacity(mesh.ranks() * local_n);
        for r in 0..mesh.ranks() {
            let c = mesh.coords(r);
            let zero = s
                .per_axis
                .iter()
                .zip(&c)
                .any(|(p, &ci)| *p == Placement::Partial && ci != 0);
            for flat in 0..local_n {
                let mut idx: Vec<usize> = (0..ld.len()).map(|d| (flat / lst[d]) % ld[d]).collect();
                // the chunk offsets: for each dim, the splitting axes in order, outermost first
                for d in 0..dims.len() {
                    let mut chunk = dims[d];
                    let mut off = 0;
                    for (k, p) in s.per_axis.iter().enumerate() {
                        if *p == Placement::Split(d) {
                            chunk /= mesh.axes[k].1;
                            off += c[k] * chunk;
                        }
                    }
                    idx[d] += off;
                }
                let at: usize = idx.iter().zip(&gst).map(|(i, s)| i * s).sum();
                out.push(if zero { 0.0 } else { global[at] });
            }
        }
        let mut shape = vec![mesh.ranks()];
        shape.extend(ld);
        (out, shape)
    }

    #[test]
    fn resharding_through_collectives_gives_the_target_shards() {
        use Placement::*;
        let mesh = Mesh::new(&[("dp", 2), ("tp", 3)]).unwrap();
        let dims = [6usize, 6];
        let global: Vec<f64> = (0..36).map(|i| (i * 5 % 13) as f64 - 6.0).collect();
        let cases = [
            (vec![Replicated, Partial], vec![Replicated, Replicated]),
            (vec![Replicated, Partial], vec![Replicated, Split(1)]),
            (vec![Partial, Partial], vec![Split(0), Replicated]),
            (vec![Split(0), Split(1)], vec![Replicated, Replicated]),
            (vec![Split(0), Split(1)], vec![Split(0), Replicated]),
            (vec![Split(1), Split(1)], vec![Split(1), Replicated]),
            (vec![Partial, Split(1)], vec![Replicated, Replicated]),
            (vec![Split(1), Split(1)], vec![Replicated, Replicated]),
            (vec![Split(1), Partial], vec![Split(1), Split(1)]),
            (vec![Replicated, Replicated], vec![Split(0), Split(1)]),
            (vec![Replicated, Partial], vec![Split(1), Replicated]),
            // split to split: one all_to_all per axis that moves
            (vec![Replicated, Split(0)], vec![Replicated, Split(1)]),
            (vec![Split(0), Split(0)], vec![Split(0), Split(1)]),
            (vec![Split(0), Replicated], vec![Split(1), Replicated]),
            (vec![Split(1), Replicated], vec![Split(0), Split(1)]),
        ];
        for (from, to) in cases {
            let (from, to) = (Sharding { per_axis: from }, Sharding { per_axis: to });
            let (xs, shape) = shards(&global, &dims, &mesh, &from);
            let (want, want_shape) = shards(&global, &dims, &mesh, &to);
            let mut g = Graph::new("reshard");
            let x = g
                .input("x", DType::F32, shape.iter().map(|&d| Dim::from(d)).collect())
                .unwrap();
            let y = reshard(&mut g, x, &mesh, &from, &to).unwrap();
            g.add_output("y", y).unwrap();
            let feed: HashMap<String, Tensor> = [("x".to_string(), Tensor::from_f64(DType::F32, shape, xs))].into();
            let got = Interpreter::new(Precision::F64).run(&g, &feed).unwrap()["y"].clone();
            assert_eq!(got.shape, want_shape, "{from:?} → {to:?}");
            assert_eq!(got.to_f64(), want, "{from:?} → {to:?}");
        }
        let mut g = Graph::new("g");
        let x = g
            .input("x", DType::F32, vec![Dim::from(6), Dim::from(4), Dim::from(6)])
            .unwrap();
        let e = reshard(
            &mut g,
            x,
            &mesh,
            &Sharding {
                per_axis: vec![Split(1), Split(0)],
            },
            &Sharding {
                per_axis: vec![Split(0), Split(1)],
            },
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "resharding dim 0 along mesh axis `dp` while the later axis `tp` splits it (chunks nest in mesh order) is \
             not supported yet"
        );
        let e = reshard(
            &mut g,
            x,
            &mesh,
            &Sharding {
                per_axis: vec![Split(1), Split(1)],
            },
            &Sharding {
                per_axis: vec![Replicated, Split(1)],
            },
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "resharding dim 1 along mesh axis `dp` while the later axis `tp` splits it (chunks nest in mesh order) is \
             not supported yet"
        );
    }

    #[test]
    fn ranks_coordinates_and_groups() {
        let m = Mesh::new(&[("dp", 2), ("tp", 4)]).unwrap();
        assert_eq!(m.ranks(), 8);
        assert_eq!(m.coords(6), vec![1, 2]);
        assert_eq!(m.group("tp").unwrap(), (vec![2, 4], 1));
        assert_eq!(m.degree("dp").unwrap(), 2);
        assert_eq!(m.to_string(), "[dp=2, tp=4]");
        let e = m.axis("ep").unwrap_err().to_string();
        assert_eq!(e, "the mesh [dp=2, tp=4] has no axis `ep`");
        let e = Mesh::new(&[("dp", 2), ("dp", 2)]).unwrap_err().to_string();
        assert_eq!(e, "mesh axis `dp` is named twice");
        let e = Mesh::new(&[("tp", 0)]).unwrap_err().to_string();
        assert_eq!(e, "mesh axis `tp` has degree 0");
    }

    #[test]
    fn local_dims_divide_by_the_splitting_degrees_or_name_what_does_not_divide() {
        let m = Mesh::new(&[("dp", 2), ("tp", 4)]).unwrap();
        let dims = vec![Dim::sym("B"), Dim::from(4096), Dim::from(6144)];
        let s = Sharding {
            per_axis: vec![Placement::Split(0), Placement::Split(2)],
        };
        // B over dp: symbolic, divisible only where B is a multiple of 2
        let e = s.local_dims(&m, "x", &dims).unwrap_err().to_string();
        assert!(
            e.contains("`x`: dim 0 of size `B` is split by mesh axis `dp` of degree 2"),
            "{e}"
        );
        let dims = vec![Dim::from(8), Dim::from(4096), Dim::from(6144)];
        assert_eq!(
            s.local_dims(&m, "x", &dims).unwrap(),
            vec![Dim::from(4), Dim::from(4096), Dim::from(1536)]
        );
        // two axes splitting one dim divide it by both degrees
        let both = Sharding {
            per_axis: vec![Placement::Split(1), Placement::Split(1)],
        };
        assert_eq!(
            both.local_dims(&m, "x", &dims).unwrap(),
            vec![Dim::from(8), Dim::from(512), Dim::from(6144)]
        );
        let tp3 = Mesh::new(&[("tp", 3)]).unwrap();
        let e = Sharding {
            per_axis: vec![Placement::Split(1)],
        }
        .local_dims(&tp3, "w_qkv", &dims)
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "`w_qkv`: dim 1 of size `4096` is split by mesh axis `tp` of degree 3, which does not divide `4096`"
        );
        let e = Sharding {
            per_axis: vec![Placement::Split(5), Placement::Partial],
        }
        .local_dims(&m, "x", &dims)
        .unwrap_err()
        .to_string();
        assert_eq!(e, "`x` has 3 dims; mesh axis `dp` cannot split its dim 5");
        let e = Sharding::replicated(&tp3)
            .local_dims(&m, "x", &dims)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "`x`: a sharding of 1 placements on the mesh [dp=2, tp=4] of 2 axes");
        // partial sums and replicas keep the global dims
        let p = Sharding {
            per_axis: vec![Placement::Replicated, Placement::Partial],
        };
        assert_eq!(p.local_dims(&m, "y", &dims).unwrap(), dims);
    }
}
