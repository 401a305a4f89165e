//! The sharding rules of the attention composites (`docs/parallelism.md`, §4): heads (batch dims) split run
//! the composite on each rank's heads; the sequence split runs **LASP+** for `lightning_attention` and **ring
//! attention** for `flash_attention_rope`.
//!
//! LASP+ (rank `c` of `G` along the sequence axis holds positions `[c·L, (c+1)·L)`): each rank runs the
//! composite on its chunk from a zero state, forms its chunk's summary `S_c = Σ_u γ^(L−1−u) k_uᵀ v_u` (decayed to
//! the chunk's end), one `all_gather` brings every summary to every rank, each rank forms its prefix state
//! `P_c = Σ_{s<c} γ^(L·(c−1−s)) S_s` locally, and adds `γ^(i+1) q_i P_c` to its output: exact, since
//! `γ^(t−u) = γ^(i+1) · γ^(L·(c−1−s)) · γ^(L−1−j)` for `t = c·L + i` and `u = s·L + j`.
//!
//! Ring attention: each rank rotates its queries and keys by its chunk's rows of the rope tables, then `G`
//! rounds: `flash_attention_lse` of its queries against the key/value block it holds (its own first, causal;
//! then each `send_recv[shift=1]` brings the previous rank's, seen whole when it lies before the rank's own
//! and not at all after it), the rounds' outputs merged exactly by their log-sum-exps.

use super::{Pass, Sv};
use crate::shard::Placement;
use crate::PassError;
use fulgur_ir::{Composite, ConstData, DType, Dim, Op, ReduceOp, Value};

/// A large finite negative for a round's log-sum-exp where the rank sees none of the round's keys: its weight
/// in the merge, `exp` of it minus a real log-sum-exp, is exactly 0, and it cannot give `∞ − ∞`.
const MASKED: f64 = -1e30;

impl Pass<'_> {
    /// A constant with the rank axis: rank `r`'s slice is `f(coords of r)`, of shape `shape`.
    pub(super) fn per_rank(
        &mut self,
        dtype: DType,
        shape: &[usize],
        f: impl Fn(&[usize]) -> Vec<f64>,
    ) -> Result<Value, PassError> {
        let mut data = Vec::new();
        // the ranks' coordinates in order, counted row-major (the last axis fastest) as `Mesh::coords` gives them
        let sizes = self.mesh.sizes();
        let mut c = vec![0usize; sizes.len()];
        for _ in 0..self.mesh.ranks() {
            let v = f(&c);
            debug_assert_eq!(v.len(), shape.iter().product::<usize>());
            data.extend(v);
            for k in (0..c.len()).rev() {
                c[k] += 1;
                if c[k] < sizes[k] {
                    break;
                }
                c[k] = 0;
            }
        }
        let mut full = vec![self.mesh.ranks()];
        full.extend_from_slice(shape);
        let data = if dtype.is_float() {
            ConstData::Float(data)
        } else {
            ConstData::Int(data.into_iter().map(|x| x as i64).collect())
        };
        Ok(self.out.named(
            super::RANK_CONSTANT,
            Op::Constant {
                dtype,
                shape: full,
                data,
            },
            &[],
        )?)
    }

    /// `[R, s...]` viewed as `[R, 1, ..., s...]` of `1 + rank` dims.
    pub(super) fn lift(&mut self, v: Value, rank: usize) -> Result<Value, PassError> {
        let dims = self.out.dims(v).to_vec();
        if dims.len() == rank + 1 {
            return Ok(v);
        }
        let mut shape = vec![dims[0].clone()];
        shape.extend(std::iter::repeat_n(Dim::from(1), rank + 1 - dims.len()));
        shape.extend(dims[1..].iter().cloned());
        Ok(self.out.reshape(v, shape)?)
    }

    /// The placements of `q`, `k`, `v` (`[batch..., T, D]`, `k`/`v` broadcast along the batch dims where they
    /// have size 1): batch dims split as `q` (or `k`) is, the sequence split on at most one axis (returned),
    /// the head dim and partial sums gathered.
    fn attention_placements(
        &self,
        q: &Sv,
        k: &Sv,
        seq_ok: bool,
    ) -> (crate::shard::Sharding, crate::shard::Sharding, Option<usize>) {
        let n = q.dims.len();
        let t = n - 2;
        let nk = k.dims.len();
        let mut tq = self.rep();
        let mut tk = self.rep();
        let mut seq = None;
        if nk != n {
            // keys of another rank than the queries (batch dims broadcast from either side): run replicated
            return (tq, tk, seq);
        }
        for ax in 0..tq.per_axis.len() {
            let from_q = match q.sh.per_axis[ax] {
                Placement::Split(d) if d < n - 1 => Some(d),
                _ => None,
            };
            let from_k = match k.sh.per_axis[ax] {
                Placement::Split(d) if d < nk - 1 => Some(d + n - nk),
                _ => None,
            };
            match from_q.or(from_k) {
                Some(d) if d == t && seq_ok && seq.is_none() => {
                    seq = Some(ax);
                    tq.per_axis[ax] = Placement::Split(t);
                    tk.per_axis[ax] = Placement::Split(nk - 2);
                }
                Some(d) if d == t => {}
                Some(d) => {
                    // a batch dim: q must have it at full size (not broadcast); k/v follow where they have it
                    if q.dims[d] == Dim::from(1) && k.dims[d] != Dim::from(1) {
                        continue;
                    }
                    tq.per_axis[ax] = Placement::Split(d);
                    if k.dims[d] == q.dims[d] {
                        tk.per_axis[ax] = Placement::Split(d);
                    }
                }
                None => {}
            }
        }
        (tq, tk, seq)
    }

    /// `lightning_attention[block](q, k, v, lam)`.
    pub(super) fn lightning_attention(&mut self, ins: &[Sv], block: usize, out_dims: &[Dim]) -> Result<Sv, PassError> {
        let (q, k, v, lam) = (&ins[0], &ins[1], &ins[2], &ins[3]);
        let n = q.dims.len();
        let (tq, _, seq) = self.attention_placements(q, k, true);
        let q = self.to(q, &tq)?;
        let q = self.ranked(&q)?;
        let k = self.to(k, &tq)?;
        let k = self.ranked(&k)?;
        let v = self.to(v, &tq)?;
        let v = self.ranked(&v)?;
        // λ is broadcast along [batch..., 1, 1]: cut where it has a split batch dim at full size
        let off = n - lam.dims.len();
        let tl = crate::shard::Sharding {
            per_axis: tq
                .per_axis
                .iter()
                .map(|p| match p {
                    Placement::Split(d) if *d < n - 2 && *d >= off && lam.dims[*d - off] == q.dims[*d] => {
                        Placement::Split(*d - off)
                    }
                    _ => Placement::Replicated,
                })
                .collect(),
        };
        let lam = self.to(lam, &tl)?;
        let lamv = self.pad(&lam, n)?;
        let o = self.emit(
            Op::Composite(Composite::LightningAttention { block }),
            &[q.v, k.v, v.v, lamv],
        )?[0];
        let done = |v: Value| Sv {
            v,
            ranked: true,
            sh: tq.clone(),
            dims: out_dims.to_vec(),
        };
        let Some(ax) = seq else {
            return Ok(done(o));
        };
        // LASP+
        let g = self.degree(ax);
        let dt = self.out.dtype(q.v);
        let local = self.local(&tq, &q.dims)?;
        let l = local[n - 2]
            .as_const()
            .ok_or_else(|| PassError::Options(format!("`{}`: a sequence split needs a constant length", self.at)))?
            as usize;
        let after: Vec<f64> = (0..l).map(|i| (l - 1 - i) as f64).collect();
        let upto: Vec<f64> = (0..l).map(|i| (i + 1) as f64).collect();
        let after = self.out.constant(dt, vec![l, 1], ConstData::Float(after))?;
        let upto = self.out.constant(dt, vec![l, 1], ConstData::Float(upto))?;
        // decay weights exp(−λ·c): λ lifted to the ranked rank where it has the rank axis
        let decay = |p: &mut Self, c: Value| -> Result<Value, PassError> {
            let x = p.out.mul(lamv, c)?;
            let x = p.out.neg(x)?;
            Ok(p.out.exp(x)?)
        };
        let wk = decay(self, after)?;
        let kw = self.out.mul(k.v, wk)?;
        let kwt = self.out.transpose(kw, -2, -1)?;
        let summary = self.out.matmul(kwt, v.v)?; // [R, batch..., D, Dv]
        let sdims = self.out.dims(summary).to_vec();
        let mut one = vec![sdims[0].clone(), Dim::from(1)];
        one.extend(sdims[1..].iter().cloned());
        let summary = self.out.reshape(summary, one)?;
        let (mesh, over) = (self.mesh.sizes(), ax);
        let gathered = self.emit(Op::Composite(Composite::AllGather { axis: 1, mesh, over }), &[summary])?[0]; // [R, G, batch..., D, Dv]
                                                                                                               // prefix weights: γ^(L·(c−1−s)) for s < c, else 0
        let e = self.per_rank(dt, &[g], |c| {
            (0..g)
                .map(|s| if s < c[ax] { (l * (c[ax] - 1 - s)) as f64 } else { 0.0 })
                .collect()
        })?;
        let m = self.per_rank(dt, &[g], |c| {
            (0..g).map(|s| if s < c[ax] { 1.0 } else { 0.0 }).collect()
        })?;
        let mut shape = vec![Dim::from(self.mesh.ranks()), Dim::from(g)];
        shape.extend(std::iter::repeat_n(Dim::from(1), n));
        let e = self.out.reshape(e, shape.clone())?;
        let m = self.out.reshape(m, shape)?;
        // λ against [R, G, batch..., 1, 1]: a ranked λ gets its G axis
        let lam_g = if lam.ranked {
            let d = self.out.dims(lamv).to_vec();
            let mut s = vec![d[0].clone(), Dim::from(1)];
            s.extend(d[1..].iter().cloned());
            self.out.reshape(lamv, s)?
        } else {
            lamv
        };
        let x = self.out.mul(lam_g, e)?;
        let x = self.out.neg(x)?;
        let w = self.out.exp(x)?;
        let w = self.out.mul(w, m)?;
        let weighted = self.out.mul(gathered, w)?;
        let prefix = self.out.reduce(ReduceOp::Sum, weighted, &[1], false)?; // [R, batch..., D, Dv]
        let wq = decay(self, upto)?;
        let qd = self.out.mul(q.v, wq)?;
        let inter = self.out.matmul(qd, prefix)?;
        let o = self.out.add(o, inter)?;
        Ok(done(o))
    }

    /// `flash_attention[scale, causal](q, k, v)` and `flash_attention_rope[scale, causal, rotary](q, k, v, cos,
    /// sin)`; the sequence may be split only where the keys are the queries' own (a causal prefill with rope).
    /// `flash_attention_grad[scale, causal](q, k, v, dout)` → `(dq, dk, dv)`: split batch dims (heads) run the
    /// composite per rank (a split sequence gathers first: the backward of ring attention is not written as a
    /// ring); where `q` is split along a dim `k`/`v` broadcast (grouped key-value heads), each rank's `dk`, `dv`
    /// sum over its queries only: partial sums on that axis.
    pub(super) fn flash_attention_grad(
        &mut self,
        ins: &[Sv],
        scale: f64,
        causal: bool,
        outs: &[Vec<Dim>],
    ) -> Result<Vec<Sv>, PassError> {
        let (q, k, v, dout) = (&ins[0], &ins[1], &ins[2], &ins[3]);
        let (mut tq, mut tk, _) = self.attention_placements(q, k, false);
        if v.dims.len() != k.dims.len() || dout.dims != q.dims {
            (tq, tk) = (self.rep(), self.rep());
        }
        let q = self.to(q, &tq)?;
        let q = self.ranked(&q)?;
        let k = self.to(k, &tk)?;
        let k = self.ranked(&k)?;
        let v = self.to(v, &tk)?;
        let v = self.ranked(&v)?;
        let d = self.to(dout, &tq)?;
        let d = self.ranked(&d)?;
        let r = self.emit(
            Op::Composite(Composite::FlashAttentionGrad { scale, causal }),
            &[q.v, k.v, v.v, d.v],
        )?;
        let mut tkd = tk.clone();
        for (pk, pq) in tkd.per_axis.iter_mut().zip(&tq.per_axis) {
            if matches!(pq, Placement::Split(_)) && *pk == Placement::Replicated {
                *pk = Placement::Partial;
            }
        }
        let sv = |v: Value, sh: &crate::shard::Sharding, dims: &[Dim]| Sv {
            v,
            ranked: true,
            sh: sh.clone(),
            dims: dims.to_vec(),
        };
        Ok(vec![
            sv(r[0], &tq, &outs[0]),
            sv(r[1], &tkd, &outs[1]),
            sv(r[2], &tkd, &outs[2]),
        ])
    }

    pub(super) fn flash_attention(
        &mut self,
        ins: &[Sv],
        scale: f64,
        causal: bool,
        rotary: Option<usize>,
        out_dims: &[Dim],
    ) -> Result<Sv, PassError> {
        let (q, k, v) = (&ins[0], &ins[1], &ins[2]);
        let n = q.dims.len();
        let prefill = k.dims[k.dims.len() - 2] == q.dims[n - 2];
        let (mut tq, mut tk, mut seq) = self.attention_placements(q, k, prefill);
        if v.dims.len() != k.dims.len() {
            (tq, tk, seq) = (self.rep(), self.rep(), None);
        }
        let q = self.to(q, &tq)?;
        let q = self.ranked(&q)?;
        let k = self.to(k, &tk)?;
        let k = self.ranked(&k)?;
        let v = self.to(v, &tk)?;
        let v = self.ranked(&v)?;
        let rep = self.rep();
        let done = |v: Value| Sv {
            v,
            ranked: true,
            sh: tq.clone(),
            dims: out_dims.to_vec(),
        };
        let Some(ax) = seq else {
            let mut vals = vec![q.v, k.v, v.v];
            let op = match rotary {
                Some(r) => {
                    for t in &ins[3..5] {
                        let t = self.to(t, &rep)?;
                        if t.ranked {
                            return Err(PassError::Options(
                                "rope tables computed per rank are not supported yet".into(),
                            ));
                        }
                        vals.push(t.v);
                    }
                    Composite::FlashAttentionRope {
                        scale,
                        causal,
                        rotary: r,
                    }
                }
                None => Composite::FlashAttention { scale, causal },
            };
            return Ok(done(self.emit(Op::Composite(op), &vals)?[0]));
        };
        // ring attention along mesh axis `ax`
        let g = self.degree(ax);
        let dt = self.out.dtype(q.v);
        let (mut qr, mut kr) = (q.v, k.v);
        if let Some(r) = rotary {
            let mut rows = rep.clone();
            rows.per_axis[ax] = Placement::Split(0);
            let cos = self.to(&ins[3], &rows)?;
            let sin = self.to(&ins[4], &rows)?;
            let cos = self.ranked(&cos)?;
            let sin = self.ranked(&sin)?;
            qr = self.rope(qr, cos.v, sin.v, r)?;
            kr = self.rope(kr, cos.v, sin.v, r)?;
        }
        // round 0: the rank's own block (causal where the attention is); round j: the block of rank c − j, seen
        // whole before the rank's own and not at all after it (its log-sum-exp pushed to MASKED, so its weight in
        // the merge is exactly zero); each round one flash attention with its log-sum-exp, merged exactly
        let (mesh, over) = (self.mesh.sizes(), ax);
        let (mut kj, mut vj) = (kr, v.v);
        let mut acc: Option<(Value, Value)> = None; // (output, log-sum-exp)
        for j in 0..g {
            if j > 0 {
                let op = Op::Composite(Composite::SendRecv {
                    shift: 1,
                    mesh: mesh.clone(),
                    over,
                });
                kj = self.emit(op.clone(), &[kj])?[0];
                vj = self.emit(op, &[vj])?[0];
            }
            let round = Op::Composite(Composite::FlashAttentionLse {
                scale,
                causal: causal && j == 0,
            });
            let r = self.emit(round, &[qr, kj, vj])?;
            let (oj, mut lj) = (r[0], r[1]);
            if causal && j > 0 {
                let hidden = self.per_rank(dt, &[], |c| vec![if c[ax] < j { MASKED } else { 0.0 }])?;
                let hidden = self.lift(hidden, n)?;
                lj = self.out.add(lj, hidden)?;
            }
            acc = Some(match acc {
                None => (oj, lj),
                Some((o, l)) => {
                    let mx = self.out.maximum(l, lj)?;
                    let da = self.out.sub(l, mx)?;
                    let a = self.out.exp(da)?;
                    let db = self.out.sub(lj, mx)?;
                    let b = self.out.exp(db)?;
                    let sum = self.out.add(a, b)?;
                    let log = self.out.log(sum)?;
                    let l2 = self.out.add(mx, log)?;
                    let wa = self.out.sub(l, l2)?;
                    let wa = self.out.exp(wa)?;
                    let wb = self.out.sub(lj, l2)?;
                    let wb = self.out.exp(wb)?;
                    let oa = self.out.mul(o, wa)?;
                    let ob = self.out.mul(oj, wb)?;
                    (self.out.add(oa, ob)?, l2)
                }
            });
        }
        let (o, _) = acc.expect("at least one round");
        Ok(done(o))
    }

    /// `rope(x)` on `x: [R, batch..., L, D]` with the rank's table rows `cos, sin: [R, L, r]`, as
    /// `flash_attention_rope` defines it.
    fn rope(&mut self, x: Value, cos: Value, sin: Value, r: usize) -> Result<Value, PassError> {
        let n = self.out.rank(x) - 1;
        let d = self.out.dims(x)[n].as_const().unwrap_or(0) as usize;
        let cos = self.lift(cos, n)?;
        let sin = self.lift(sin, n)?;
        let h = r / 2;
        let xr = if r == d { x } else { self.out.slice(x, -1, 0, r)? };
        let x1 = self.out.slice(xr, -1, 0, h)?;
        let x2 = self.out.slice(xr, -1, h, r)?;
        let nx2 = self.out.neg(x2)?;
        let rot = self.out.concat(&[nx2, x1], -1)?;
        let a = self.out.mul(xr, cos)?;
        let b = self.out.mul(rot, sin)?;
        let y = self.out.add(a, b)?;
        if r == d {
            Ok(y)
        } else {
            let pass = self.out.slice(x, -1, r, d)?;
            Ok(self.out.concat(&[y, pass], -1)?)
        }
    }
}
