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
//! rounds: scores of its queries against the key/value block it holds (its own first, then each
//! `send_recv[shift=1]` brings the previous rank's), masked by where that block lies (before: all visible;
//! its own: causal; after: none), merged by the online softmax (running max, sum and output rescaled).

use super::{Pass, Sv};
use crate::shard::Placement;
use crate::PassError;
use fulgur_ir::{CmpOp, Composite, ConstData, DType, Dim, Op, ReduceOp, Value};

/// A large finite negative for masked scores: `exp` of it minus any real score is exactly 0, and it cannot
/// give `∞ − ∞` in a fully masked row (that row's weight is zeroed by the merge).
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
        for r in 0..self.mesh.ranks() {
            let v = f(&self.mesh.coords(r));
            debug_assert_eq!(v.len(), shape.iter().product::<usize>());
            data.extend(v);
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
                    // a batch dim: q must have it at full size; k/v follow where they have it
                    let kd = d as isize - (n - nk) as isize;
                    let k_full = kd >= 0 && k.dims[kd as usize] == q.dims[d];
                    tq.per_axis[ax] = Placement::Split(d);
                    if k_full {
                        tk.per_axis[ax] = Placement::Split(kd as usize);
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
        let (tq, tk, seq) = self.attention_placements(q, k, prefill);
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
        let l = self.local(&tq, &q.dims)?[n - 2]
            .as_const()
            .ok_or_else(|| PassError::Options(format!("`{}`: a sequence split needs a constant length", self.at)))?
            as usize;
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
        // the causal mask of the diagonal block, and which blocks each rank sees whole or not at all
        let tri = if causal {
            let i = self.out.iota(DType::I64, vec![Dim::from(l), Dim::from(l)], 0)?;
            let u = self.out.iota(DType::I64, vec![Dim::from(l), Dim::from(l)], 1)?;
            let c = self.out.compare(CmpOp::Ge, i, u)?;
            Some(self.out.cast(c, dt)?)
        } else {
            None
        };
        let (mesh, over) = (self.mesh.sizes(), ax);
        let (mut kj, mut vj) = (kr, v.v);
        let mut acc: Option<(Value, Value, Value)> = None; // (max, sum, output)
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
            let kt = self.out.transpose(kj, -2, -1)?;
            let s = self.out.matmul(qr, kt)?;
            let mut s = self.out.scale(s, scale)?;
            if let Some(tri) = tri {
                // visible = before + own·tri; scores += MASKED·(1 − visible)
                let src = move |c: &[usize]| (c[ax] + g - j) % g;
                let before = self.per_rank(dt, &[], |c| vec![if src(c) < c[ax] { 1.0 } else { 0.0 }])?;
                let own = self.per_rank(dt, &[], |c| vec![if src(c) == c[ax] { 1.0 } else { 0.0 }])?;
                let before = self.lift(before, n)?;
                let own = self.lift(own, n)?;
                let seen = self.out.mul(own, tri)?;
                let seen = self.out.add(seen, before)?;
                let one = self.out.scalar_like(1.0, seen)?;
                let hidden = self.out.sub(one, seen)?;
                let bias = self.out.scale(hidden, MASKED)?;
                s = self.out.add(s, bias)?;
            }
            let mj = self.out.reduce(ReduceOp::Max, s, &[-1], true)?;
            let x = self.out.sub(s, mj)?;
            let p = self.out.exp(x)?;
            let lj = self.out.reduce(ReduceOp::Sum, p, &[-1], true)?;
            let oj = self.out.matmul(p, vj)?;
            acc = Some(match acc {
                None => (mj, lj, oj),
                Some((m, lsum, o)) => {
                    let m2 = self.out.maximum(m, mj)?;
                    let da = self.out.sub(m, m2)?;
                    let a = self.out.exp(da)?;
                    let db = self.out.sub(mj, m2)?;
                    let b = self.out.exp(db)?;
                    let oa = self.out.mul(o, a)?;
                    let ob = self.out.mul(oj, b)?;
                    let la = self.out.mul(lsum, a)?;
                    let lb = self.out.mul(lj, b)?;
                    (m2, self.out.add(la, lb)?, self.out.add(oa, ob)?)
                }
            });
        }
        let (_, lsum, o) = acc.expect("at least one round");
        Ok(done(self.out.div(o, lsum)?))
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
