//! Native loop forms of the composites whose decomposition is not how they should run.

use super::{delinearize, Built, View};
use crate::loops::{Acc, GemmStep, GroupedGemmStep, LoopKernel, Operand, Phase, Scalar, Slot, Step, Stmt, E};
use crate::program::Kernel;
use crate::CodegenError;
use fulgur_ir::{BinaryOp, CmpOp, Composite, Dim, Op, UnaryOp};

/// Builds `k` natively when its op has a native form; `Ok(false)` when it does not (the generic compiler then
/// runs its decomposition).
pub(crate) fn build(k: &Kernel, b: &mut Built) -> Result<bool, CodegenError> {
    match &k.op {
        Op::Composite(Composite::GroupedMatmul { swiglu }) => grouped_matmul(k, b, *swiglu).map(|_| true),
        Op::Composite(Composite::FlashAttention { scale, causal }) => flash_attention(k, b, *scale, *causal, None),
        Op::Composite(Composite::FlashAttentionRope { scale, causal, rotary }) => {
            flash_attention(k, b, *scale, *causal, Some(*rotary))
        }
        Op::Composite(Composite::LightningAttention { block }) => lightning(k, b, *block, None),
        Op::Composite(Composite::LightningLayer { block, heads, eps }) => lightning(k, b, *block, Some((*heads, *eps))),
        Op::Composite(Composite::MoeDispatch { experts }) => moe_dispatch(k, b, *experts),
        Op::Composite(Composite::MoeCombine) => moe_combine(k, b),
        Op::Composite(Composite::GroupedMatmulWgrad) => grouped_wgrad(k, b).map(|_| true),
        Op::Composite(Composite::OnRank { .. }) => {
            // the transport reads the inputs and writes the outputs: bind every one to a slot
            for i in 0..k.inputs.len() {
                b.lk.slot(Slot::Input(i));
            }
            for i in 0..k.outputs.len() {
                b.lk.slot(Slot::Output(i));
            }
            b.lk.steps.push(Step::Collective(k.op.clone()));
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// `grouped_matmul`: a grouped GEMM over the row groups, then (with `swiglu`) `silu(first half) ⊙ second half`.
fn grouped_matmul(k: &Kernel, b: &mut Built, swiglu: bool) -> Result<(), CodegenError> {
    let lk = &mut b.lk;
    let xs = View::of(lk.slot(Slot::Input(0)), &k.inputs[0]);
    let counts = View::of(lk.slot(Slot::Input(1)), &k.inputs[1]);
    let w = View::of(lk.slot(Slot::Input(2)), &k.inputs[2]);
    let out = View::of(lk.slot(Slot::Output(0)), &k.outputs[0]);
    let o = w.shape[2].clone();
    let y = if swiglu {
        let rows = xs.shape[0].clone();
        let slot = lk.scratch(out.dtype, rows.clone() * o.clone());
        View::contiguous(slot, out.dtype, &[rows, o.clone()])
    } else {
        out.clone()
    };
    let operand = |lk: &mut crate::loops::LoopKernel, v: &View, r0: usize| Operand {
        arg: v.slot,
        dtype: v.dtype,
        offset: lk.dim(&v.offset),
        rs: lk.dim(&v.strides[r0]),
        cs: lk.dim(&v.strides[r0 + 1]),
    };
    let step = GroupedGemmStep {
        depth: false,
        m: lk.dim(&xs.shape[0]),
        n: lk.dim(&o),
        k: lk.dim(&xs.shape[1]),
        experts: lk.dim(&w.shape[0]),
        x: operand(lk, &xs, 0),
        w: operand(lk, &w, 1),
        expert_stride: lk.dim(&w.strides[0]),
        out: operand(lk, &y, 0),
        counts_arg: counts.slot,
        counts_dtype: counts.dtype,
        counts_offset: lk.dim(&counts.offset),
        counts_stride: lk.dim(&counts.strides[0]),
    };
    lk.steps.push(Step::GroupedGemm(step));
    if swiglu {
        let half = o.div_exact(&fulgur_ir::Dim::from(2)).ok_or_else(|| {
            CodegenError::Options(format!("`grouped_matmul[swiglu=true]` needs an even width, got `{o}`"))
        })?;
        let h = lk.dim(&half);
        let (item_var, row) = lk.loop_var();
        let (jv, j) = lk.loop_var();
        let g = y.load(lk, &[row, j]);
        let jh = lk.pool.addi(j, h);
        let u = y.load(lk, &[row, jh]);
        let act = lk.pool.un(UnaryOp::Silu, g);
        let val = lk.pool.bin(BinaryOp::Mul, act, u);
        let index = out.index(lk, &[row, j]);
        let zero = lk.pool.i(0);
        let grid = lk.dim(&xs.shape[0]);
        lk.steps.push(Step::Phase(Phase {
            name: "swiglu".into(),
            grid,
            item: item_var,
            body: vec![Stmt::For {
                var: jv,
                lo: zero,
                hi: h,
                body: vec![Stmt::Store {
                    arg: out.slot,
                    dtype: out.dtype,
                    index,
                    value: val,
                }],
            }],
            item_cost: h,
        }));
    }
    Ok(())
}

/// `grouped_matmul_wgrad`: `out` zeroed (for the empty groups), then a grouped GEMM over the depth:
/// `out[e] = xs_eᵀ · dy_e` for the rows of each group.
fn grouped_wgrad(k: &Kernel, b: &mut Built) -> Result<(), CodegenError> {
    let lk = &mut b.lk;
    let xs = View::of(lk.slot(Slot::Input(0)), &k.inputs[0]);
    let counts = View::of(lk.slot(Slot::Input(1)), &k.inputs[1]);
    let dy = View::of(lk.slot(Slot::Input(2)), &k.inputs[2]);
    let out = View::of(lk.slot(Slot::Output(0)), &k.outputs[0]);
    let (e, c, o) = (out.shape[0].clone(), out.shape[1].clone(), out.shape[2].clone());
    // zero: an item per row (e, i) of out, a loop over its columns
    let (item_var, item) = lk.loop_var();
    let cd = lk.dim(&c);
    let ex = lk.pool.div(item, cd);
    let i = lk.pool.rem(item, cd);
    let (jv, j) = lk.loop_var();
    let index = out.index(lk, &[ex, i, j]);
    let zero = lk.pool.i(0);
    let zf = lk.pool.f(0.0);
    let hi = lk.dim(&o);
    let grid = lk.dim(&(e.clone() * c.clone()));
    lk.steps.push(Step::Phase(Phase {
        name: "zero".into(),
        grid,
        item: item_var,
        body: vec![Stmt::For {
            var: jv,
            lo: zero,
            hi,
            body: vec![Stmt::Store {
                arg: out.slot,
                dtype: out.dtype,
                index,
                value: zf,
            }],
        }],
        item_cost: hi,
    }));
    let operand = |lk: &mut crate::loops::LoopKernel, v: &View, rs: usize, cs: usize| Operand {
        arg: v.slot,
        dtype: v.dtype,
        offset: lk.dim(&v.offset),
        rs: lk.dim(&v.strides[rs]),
        cs: lk.dim(&v.strides[cs]),
    };
    let step = GroupedGemmStep {
        depth: true,
        m: lk.dim(&c),
        n: lk.dim(&o),
        k: lk.dim(&xs.shape[0]),
        experts: lk.dim(&e),
        // A [C, M] = xsᵀ
        x: operand(lk, &xs, 1, 0),
        w: operand(lk, &dy, 0, 1),
        expert_stride: lk.dim(&out.strides[0]),
        out: operand(lk, &out, 1, 2),
        counts_arg: counts.slot,
        counts_dtype: counts.dtype,
        counts_offset: lk.dim(&counts.offset),
        counts_stride: lk.dim(&counts.strides[0]),
    };
    lk.steps.push(Step::GroupedGemm(step));
    Ok(())
}

/// `for v in lo..hi { body(v) }`.
fn for_(lk: &mut LoopKernel, lo: E, hi: E, body: impl FnOnce(&mut LoopKernel, E) -> Vec<Stmt>) -> Stmt {
    let (var, v) = lk.loop_var();
    let body = body(lk, v);
    Stmt::For { var, lo, hi, body }
}

fn st_local(local: u32, index: E, value: E) -> Stmt {
    Stmt::StoreLocal { local, index, value }
}

/// `a * n + b` for index arithmetic.
fn mad(lk: &mut LoopKernel, a: E, n: E, b: E) -> E {
    let m = lk.pool.mul(a, n);
    lk.pool.addi(m, b)
}

/// A constant dimension, or `None`.
fn konst(d: &Dim) -> Option<usize> {
    d.as_const().and_then(|c| usize::try_from(c).ok())
}

/// The index of an operand with batch dims `dims` (right-aligned, size 1 broadcast) for output batch
/// coordinates `ob`.
fn bcast(lk: &mut LoopKernel, ob: &[E], dims: &[Dim]) -> Vec<E> {
    let off = ob.len() - dims.len();
    dims.iter()
        .enumerate()
        .map(|(i, d)| if d.is_one() { lk.pool.i(0) } else { ob[off + i] })
        .collect()
}

fn product(ds: &[Dim]) -> Dim {
    ds.iter().fold(Dim::from(1), |a, d| a * d.clone())
}

fn store(view: &View, lk: &mut LoopKernel, idx: &[E], value: E) -> Stmt {
    let index = view.index(lk, idx);
    Stmt::Store {
        arg: view.slot,
        dtype: view.dtype,
        index,
        value,
    }
}

/// Query rows per item and keys per block of the flash-attention kernel.
const BQ: i64 = 64;
const BK: i64 = 64;

/// `flash_attention[_rope]`: per item a block of `BQ` query rows of one batch index; the keys in blocks of
/// `BK` with an online softmax (running max and sum per row), so the score matrix is never stored. Queries
/// and keys are rotated as they are loaded for the rope form.
fn flash_attention(
    k: &Kernel,
    b: &mut Built,
    scale: f64,
    causal: bool,
    rotary: Option<usize>,
) -> Result<bool, CodegenError> {
    let (qt, kt, vt) = (&k.inputs[0], &k.inputs[1], &k.inputs[2]);
    let (rq, rk, rv) = (qt.shape.len(), kt.shape.len(), vt.shape.len());
    let (Some(d), Some(dv)) = (konst(&qt.shape[rq - 1]), konst(&vt.shape[rv - 1])) else {
        return Ok(false);
    };
    if !qt.dtype.is_float() {
        return Ok(false);
    }
    let lk = &mut b.lk;
    let q = View::of(lk.slot(Slot::Input(0)), qt);
    let kv = View::of(lk.slot(Slot::Input(1)), kt);
    let v = View::of(lk.slot(Slot::Input(2)), vt);
    let tables = rotary.map(|_| {
        (
            View::of(lk.slot(Slot::Input(3)), &k.inputs[3]),
            View::of(lk.slot(Slot::Input(4)), &k.inputs[4]),
        )
    });
    let out = View::of(lk.slot(Slot::Output(0)), &k.outputs[0]);
    let ro = out.shape.len();
    let obatch: Vec<Dim> = out.shape[..ro - 2].to_vec();
    let t = lk.dim(&q.shape[rq - 2].clone());
    let s = lk.dim(&kv.shape[rk - 2].clone());
    let p = &mut lk.pool;
    let (bq, bk) = (p.i(BQ), p.i(BK));
    let bq1 = p.i(BQ - 1);
    let tq = p.addi(t, bq1);
    let nqb = p.div(tq, bq);
    let shift = p.sub(s, t);
    let nbatch_e = lk.dim(&product(&obatch));
    let grid = lk.pool.mul(nbatch_e, nqb);
    let (item_var, item) = lk.loop_var();
    let qb = lk.pool.rem(item, nqb);
    let bi = lk.pool.div(item, nqb);
    let obd = lk.dims(&obatch);
    let ob = delinearize(&mut lk.pool, bi, &obd);
    let qbi = bcast(lk, &ob, &q.shape[..rq - 2]);
    let kbi = bcast(lk, &ob, &kv.shape[..rk - 2]);
    let vbi = bcast(lk, &ob, &v.shape[..rv - 2]);
    let qtl = lk.local(Scalar::F32, BQ as usize * d);
    let ktl = lk.local(Scalar::F32, d * BK as usize);
    let vbl = lk.local(Scalar::F32, BK as usize * dv);
    let scl = lk.local(Scalar::F32, (BQ * BK) as usize);
    let ml = lk.local(Scalar::F32, BQ as usize);
    let ll = lk.local(Scalar::F32, BQ as usize);
    let accl = lk.local(Scalar::F32, BQ as usize * dv);
    let de = lk.pool.i(d as i64);
    let dve = lk.pool.i(dv as i64);
    let zero = lk.pool.i(0);
    let fzero = lk.pool.f(0.0);
    let ninf = lk.pool.f(f32::NEG_INFINITY);
    let t0 = lk.pool.mul(qb, bq);
    let rest = lk.pool.sub(t, t0);
    let rows = lk.pool.min(bq, rest);
    // element `dd` of row `pos` of q or k, rotated when the kernel has tables
    let rotated = |lk: &mut LoopKernel, view: &View, bidx: &[E], pos: E, dd: E| -> E {
        let mut idx = bidx.to_vec();
        idx.push(pos);
        idx.push(dd);
        let raw = view.load(lk, &idx);
        let (Some(r), Some((cos, sin))) = (rotary, tables.as_ref()) else {
            return raw;
        };
        let h = (r / 2) as i64;
        let p = &mut lk.pool;
        let he = p.i(h);
        let re = p.i(r as i64);
        let r1 = p.i(r as i64 - 1);
        let first = p.cmp(CmpOp::Lt, dd, he);
        let up = p.addi(dd, he);
        let down = p.sub(dd, he);
        let pidx = p.select(first, up, down);
        let inside = p.cmp(CmpOp::Lt, dd, re);
        // keep every load in bounds: past the rotary dims the pair index is clamped (and not used)
        let pidx = p.min(pidx, r1);
        let tidx = p.min(dd, r1);
        let mut pi = bidx.to_vec();
        pi.push(pos);
        pi.push(pidx);
        let pair = view.load(lk, &pi);
        let c = cos.load(lk, &[pos, tidx]);
        let sn = sin.load(lk, &[pos, tidx]);
        let p = &mut lk.pool;
        let npair = p.un(UnaryOp::Neg, pair);
        let rot = p.select(first, npair, pair);
        let a = p.bin(BinaryOp::Mul, raw, c);
        let bb = p.bin(BinaryOp::Mul, rot, sn);
        let y = p.bin(BinaryOp::Add, a, bb);
        p.select(inside, y, raw)
    };
    let mut body = Vec::new();
    // the block's queries
    body.push(for_(lk, zero, rows, |lk, i| {
        vec![for_(lk, zero, de, |lk, dd| {
            let pos = lk.pool.addi(t0, i);
            let x = rotated(lk, &q, &qbi, pos, dd);
            let at = mad(lk, i, de, dd);
            vec![st_local(qtl, at, x)]
        })]
    }));
    body.push(for_(lk, zero, bq, |lk, i| {
        let clear = for_(lk, zero, dve, |lk, c| {
            let at = mad(lk, i, dve, c);
            vec![st_local(accl, at, fzero)]
        });
        vec![st_local(ml, i, ninf), st_local(ll, i, fzero), clear]
    }));
    // the keys needed: u < S, and with the causal mask u <= t + (S - T) for the block's last row
    let kend = if causal {
        let p = &mut lk.pool;
        let last = p.addi(t0, rows);
        let e = p.addi(last, shift);
        let e = p.min(e, s);
        p.max(e, zero)
    } else {
        s
    };
    let nkb = {
        let p = &mut lk.pool;
        let bk1 = p.i(BK - 1);
        let x = p.addi(kend, bk1);
        p.div(x, bk)
    };
    let scale_e = lk.pool.f(scale as f32);
    body.push(for_(lk, zero, nkb, |lk, kb| {
        let p = &mut lk.pool;
        let u0 = p.mul(kb, bk);
        let left = p.sub(kend, u0);
        let cols = p.min(bk, left);
        let mut steps = Vec::new();
        // the block's keys (transposed) and values
        steps.push(for_(lk, zero, cols, |lk, j| {
            let pos = lk.pool.addi(u0, j);
            let kd = for_(lk, zero, de, |lk, dd| {
                let x = rotated(lk, &kv, &kbi, pos, dd);
                let at = mad(lk, dd, bk, j);
                vec![st_local(ktl, at, x)]
            });
            let vc = for_(lk, zero, dve, |lk, c| {
                let mut idx = vbi.clone();
                idx.push(pos);
                idx.push(c);
                let x = v.load(lk, &idx);
                let at = mad(lk, j, dve, c);
                vec![st_local(vbl, at, x)]
            });
            vec![kd, vc]
        }));
        steps.push(for_(lk, zero, rows, |lk, i| {
            let mut row = Vec::new();
            row.push(for_(lk, zero, cols, |lk, j| {
                let at = mad(lk, i, bk, j);
                vec![st_local(scl, at, fzero)]
            }));
            row.push(for_(lk, zero, de, |lk, dd| {
                let qa = mad(lk, i, de, dd);
                let qd = lk.load_local(qtl, qa);
                vec![for_(lk, zero, cols, |lk, j| {
                    let at = mad(lk, i, bk, j);
                    let cur = lk.load_local(scl, at);
                    let ka = mad(lk, dd, bk, j);
                    let kx = lk.load_local(ktl, ka);
                    let prod = lk.pool.bin(BinaryOp::Mul, qd, kx);
                    let sum = lk.pool.bin(BinaryOp::Add, cur, prod);
                    vec![st_local(scl, at, sum)]
                })]
            }));
            // scale, mask, and the row's maximum
            let (mx_var, mx) = lk.mutable(Scalar::F32);
            row.push(Stmt::Set {
                var: mx_var,
                value: ninf,
            });
            let pos_t = lk.pool.addi(t0, i);
            let lim = lk.pool.addi(pos_t, shift);
            row.push(for_(lk, zero, cols, |lk, j| {
                let at = mad(lk, i, bk, j);
                let raw = lk.load_local(scl, at);
                let p = &mut lk.pool;
                let sc = p.bin(BinaryOp::Mul, raw, scale_e);
                let val = if causal {
                    let u = p.addi(u0, j);
                    let vis = p.cmp(CmpOp::Le, u, lim);
                    p.select(vis, sc, ninf)
                } else {
                    sc
                };
                // the value is read again after the store: through a variable, not the expression
                let (tv, tmp) = lk.mutable(Scalar::F32);
                vec![
                    Stmt::Set { var: tv, value: val },
                    st_local(scl, at, tmp),
                    Stmt::Accumulate {
                        var: mx_var,
                        op: Acc::Max,
                        value: tmp,
                    },
                ]
            }));
            // the online softmax: new running max, correction of what was summed before
            let mold = lk.load_local(ml, i);
            let p = &mut lk.pool;
            let mnew = p.bin(BinaryOp::Max, mold, mx);
            let dead = p.cmp(CmpOp::Eq, mnew, ninf);
            let fone = p.f(1.0);
            let dm = p.bin(BinaryOp::Sub, mold, mnew);
            let em = p.un(UnaryOp::Exp, dm);
            let corr = p.select(dead, fone, em);
            let (m_var, mcur) = lk.mutable(Scalar::F32);
            let (c_var, ccur) = lk.mutable(Scalar::F32);
            row.push(Stmt::Set {
                var: m_var,
                value: mnew,
            });
            row.push(Stmt::Set {
                var: c_var,
                value: corr,
            });
            let (sum_var, sum) = lk.mutable(Scalar::F32);
            row.push(Stmt::Set {
                var: sum_var,
                value: fzero,
            });
            row.push(for_(lk, zero, cols, |lk, j| {
                let at = mad(lk, i, bk, j);
                let x = lk.load_local(scl, at);
                let p = &mut lk.pool;
                let dead = p.cmp(CmpOp::Eq, mcur, ninf);
                let z = p.bin(BinaryOp::Sub, x, mcur);
                let e = p.un(UnaryOp::Exp, z);
                let pr = p.select(dead, fzero, e);
                let (tv, tmp) = lk.mutable(Scalar::F32);
                vec![
                    Stmt::Set { var: tv, value: pr },
                    st_local(scl, at, tmp),
                    Stmt::Accumulate {
                        var: sum_var,
                        op: Acc::Add,
                        value: tmp,
                    },
                ]
            }));
            let lold = lk.load_local(ll, i);
            let lsc = lk.pool.bin(BinaryOp::Mul, lold, ccur);
            let lnew = lk.pool.bin(BinaryOp::Add, lsc, sum);
            row.push(st_local(ll, i, lnew));
            row.push(st_local(ml, i, mcur));
            row.push(for_(lk, zero, dve, |lk, c| {
                let at = mad(lk, i, dve, c);
                let a = lk.load_local(accl, at);
                let x = lk.pool.bin(BinaryOp::Mul, a, ccur);
                vec![st_local(accl, at, x)]
            }));
            row.push(for_(lk, zero, cols, |lk, j| {
                let pa = mad(lk, i, bk, j);
                let pr = lk.load_local(scl, pa);
                vec![for_(lk, zero, dve, |lk, c| {
                    let at = mad(lk, i, dve, c);
                    let a = lk.load_local(accl, at);
                    let va = mad(lk, j, dve, c);
                    let vx = lk.load_local(vbl, va);
                    let prod = lk.pool.bin(BinaryOp::Mul, pr, vx);
                    let sum = lk.pool.bin(BinaryOp::Add, a, prod);
                    vec![st_local(accl, at, sum)]
                })]
            }));
            row
        }));
        steps
    }));
    // normalise and write the block's rows
    body.push(for_(lk, zero, rows, |lk, i| {
        let l = lk.load_local(ll, i);
        vec![for_(lk, zero, dve, |lk, c| {
            let at = mad(lk, i, dve, c);
            let a = lk.load_local(accl, at);
            let y = lk.pool.bin(BinaryOp::Div, a, l);
            let pos = lk.pool.addi(t0, i);
            let mut idx = ob.clone();
            idx.push(pos);
            idx.push(c);
            vec![store(&out, lk, &idx, y)]
        })]
    }));
    let cost = {
        let p = &mut lk.pool;
        let w = p.i(BQ * (d + dv) as i64 * 2);
        p.mul(w, s)
    };
    lk.steps.push(Step::Phase(Phase {
        name: "flash_attention".into(),
        grid,
        item: item_var,
        body,
        item_cost: cost,
    }));
    Ok(true)
}

/// A loader of element `(t, d)` of a q, k or v row for the current item.
type RowLoad = Box<dyn Fn(&mut LoopKernel, E, E) -> E>;
/// The stores of one element `x` of row `j` (sequence position `tt`) of block `n` (block index `blk`), given as
/// `(n, j, tt, x, blk)`.
type RowBody<'a> = dyn Fn(&mut LoopKernel, E, E, E, E, E) -> Vec<Stmt> + 'a;
/// A writer of element `(t, c)` of the output rows.
type RowWrite = Box<dyn Fn(&mut LoopKernel, E, E, E) -> Stmt>;

/// `lightning_attention` and `lightning_layer` in block form: per block `O = ((Q Kᵀ) ⊙ M) V + (Q ⊙ q_decay) P`
/// with the state `P [D, Dv]` carried across blocks, `P ← exp(−λ b) P + (K ⊙ k_decay)ᵀ V`: three batched GEMMs
/// over every (batch·head, block), phases whose items are rows (staging, the decay mask, the output) and a
/// scan whose items are the state's elements, each through the blocks in order. The layer form applies SiLU
/// to the fused projection as it loads it, and a last phase applies the RMSNorm over all heads and the sigmoid
/// gate, row by row.
fn lightning(k: &Kernel, b: &mut Built, block: usize, layer: Option<(usize, f64)>) -> Result<bool, CodegenError> {
    let blk = block as i64;
    let lk = &mut b.lk;
    let out = View::of(lk.slot(Slot::Output(0)), &k.outputs[0]);
    let (item_var, item) = lk.loop_var();
    let zero = lk.pool.i(0);
    let (d, dv, t_dim, grid_dim, ld_q, ld_k, ld_v, lam, write): (
        usize,
        usize,
        Dim,
        Dim,
        RowLoad,
        RowLoad,
        RowLoad,
        E,
        Option<RowWrite>,
    ) = match layer {
        Some((heads, _)) => {
            let qkv_t = &k.inputs[0];
            let Some(hd) = konst(&k.inputs[2].shape[0]) else {
                return Ok(false);
            };
            if heads == 0 || hd % heads != 0 || !qkv_t.dtype.is_float() {
                return Ok(false);
            }
            let d = hd / heads;
            let (bd, td) = (qkv_t.shape[0].clone(), qkv_t.shape[1].clone());
            let qkv = View::of(lk.slot(Slot::Input(0)), qkv_t);
            let lamv = View::of(lk.slot(Slot::Input(1)), &k.inputs[1]);
            let he = lk.pool.i(heads as i64);
            let bi = lk.pool.div(item, he);
            let h = lk.pool.rem(item, he);
            let li: Vec<E> = if lamv.shape[0].is_one() {
                vec![zero; lamv.shape.len()]
            } else {
                let mut v = vec![h];
                v.extend(std::iter::repeat_n(zero, lamv.shape.len().saturating_sub(1)));
                v
            };
            let lam = lamv.load(lk, &li);
            let d3 = lk.pool.i(3 * d as i64);
            let base = lk.pool.mul(h, d3);
            let mk = |off: i64| -> RowLoad {
                let qkv = qkv.clone();
                Box::new(move |lk: &mut LoopKernel, tt: E, dd: E| {
                    let o = lk.pool.i(off);
                    let c0 = lk.pool.addi(base, o);
                    let c = lk.pool.addi(c0, dd);
                    let x = qkv.load(lk, &[bi, tt, c]);
                    lk.pool.un(UnaryOp::Silu, x)
                })
            };
            (
                d,
                d,
                td,
                bd * Dim::from(heads as i64),
                mk(0),
                mk(d as i64),
                mk(2 * d as i64),
                lam,
                None,
            )
        }
        None => {
            let (qt, vt) = (&k.inputs[0], &k.inputs[2]);
            let r = qt.shape.len();
            let (Some(d), Some(dv)) = (konst(&qt.shape[r - 1]), konst(&vt.shape[r - 1])) else {
                return Ok(false);
            };
            if !qt.dtype.is_float() {
                return Ok(false);
            }
            let q = View::of(lk.slot(Slot::Input(0)), qt);
            let kk = View::of(lk.slot(Slot::Input(1)), &k.inputs[1]);
            let v = View::of(lk.slot(Slot::Input(2)), vt);
            let lamv = View::of(lk.slot(Slot::Input(3)), &k.inputs[3]);
            let ro = out.shape.len();
            let obd = lk.dims(&out.shape[..ro - 2]);
            let ob = delinearize(&mut lk.pool, item, &obd);
            let mut full = ob.clone();
            full.push(zero);
            full.push(zero);
            let li = bcast(lk, &full, &lamv.shape);
            let lam = lamv.load(lk, &li);
            let mk = |view: View| -> RowLoad {
                let bdims = view.shape[..view.shape.len() - 2].to_vec();
                let ob = ob.clone();
                Box::new(move |lk: &mut LoopKernel, tt: E, dd: E| {
                    let mut idx = bcast(lk, &ob, &bdims);
                    idx.push(tt);
                    idx.push(dd);
                    view.load(lk, &idx)
                })
            };
            let out2 = out.clone();
            let ob2 = ob.clone();
            let write: RowWrite = Box::new(move |lk: &mut LoopKernel, tt: E, c: E, val: E| {
                let mut idx = ob2.clone();
                idx.push(tt);
                idx.push(c);
                store(&out2, lk, &idx, val)
            });
            (
                d,
                dv,
                qt.shape[r - 2].clone(),
                product(&out.shape[..ro - 2]),
                mk(q),
                mk(kk),
                mk(v),
                lam,
                Some(write),
            )
        }
    };
    // Block form as batched GEMMs over every (batch·head, block) `n` (N of them), the sequential part (the
    // state carried across blocks) reduced to an elementwise scan:
    //   stage:  QS = q, KS = kᵀ, KD = k ⊙ k_decay, A2[:, b..] = q ⊙ q_decay, B2[..b] = v (rows past T zero;
    //           kᵀ stored so that G1's B is row-major; G2 reads KDᵀ by strides, which its A packing copies fast)
    //   G1:     A2[:, ..b] = QS · KS                    (scores)
    //   G2:     KV = KDᵀ · B2[..b]                      (each block's contribution to the state)
    //   scan:   A2[:, ..b] ⊙= decay mask (causal);  B2[b..] of block i = P_i = e^{-λb} P_{i-1} + KV_{i-1}
    //   G3:     O = A2 · B2 = ((Q Kᵀ) ⊙ M) V + (Q ⊙ q_decay) P
    // then the output (the layer form: RMSNorm over the heads and the sigmoid gate) from O.
    let f32d = fulgur_ir::DType::F32;
    // on CUDA, bf16 inputs stage their operands in bf16: the three batched GEMMs run on the tensor cores (bf16
    // operands, f32 accumulators and outputs) and the staging reads and writes half the bytes. The scores go
    // to an f32 scratch that the mask rounds into the bf16 operand once; the state is carried in f32 by the
    // scan and rounded only where it is staged (docs/numerics.md)
    let narrow = b.target == super::Target::Cuda && k.inputs[0].dtype == fulgur_ir::DType::BF16;
    let nd = if narrow { fulgur_ir::DType::BF16 } else { f32d };
    let t = lk.dim(&t_dim);
    let grid = lk.dim(&grid_dim);
    let nb_dim = t_dim.ceil_div(&Dim::from(blk));
    let nb = lk.dim(&nb_dim);
    let n_dim = grid_dim.clone() * nb_dim.clone();
    let n_all = lk.dim(&n_dim);
    let w2 = block + d;
    let sz = |x: usize| n_dim.clone() * Dim::from(x as i64);
    let qs = lk.scratch(nd, sz(block * d));
    let ks = lk.scratch(nd, sz(block * d));
    let kd = lk.scratch(nd, sz(block * d));
    let a2 = lk.scratch(nd, sz(block * w2));
    let b2 = lk.scratch(nd, sz(w2 * dv));
    let kv = lk.scratch(f32d, sz(d * dv));
    let o = lk.scratch(f32d, sz(block * dv));
    // the scores in f32 where the operands are narrow: (slot, row pitch); else G1 writes them into A2
    let scores = if narrow {
        (lk.scratch(f32d, sz(block * block)), block)
    } else {
        (a2, w2)
    };
    let one = lk.pool.i(1);
    let be = lk.pool.i(blk);
    let de = lk.pool.i(d as i64);
    let dve = lk.pool.i(dv as i64);
    let fzero = lk.pool.f(0.0);
    // a store into a staged operand (bf16 where narrow) or an f32 scratch
    let st = |arg: u32, index: E, value: E| Stmt::Store {
        arg,
        dtype: if [qs, ks, kd, a2, b2].contains(&arg) { nd } else { f32d },
        index,
        value,
    };
    // Σ e·c over the terms
    let ix = |lk: &mut LoopKernel, terms: &[(E, i64)]| -> E {
        let mut acc = lk.pool.i(0);
        for &(e, c) in terms {
            let ce = lk.pool.i(c);
            let m = lk.pool.mul(e, ce);
            acc = lk.pool.addi(acc, m);
        }
        acc
    };
    // decay tables: exp(−λ(j+1)), exp(−λ(b−1−j)), exp(−λ j)
    let decay = |lk: &mut LoopKernel, n: E| -> E {
        let p = &mut lk.pool;
        let nf = p.cast(Scalar::F32, n);
        let x = p.bin(BinaryOp::Mul, lam, nf);
        let nx = p.un(UnaryOp::Neg, x);
        p.un(UnaryOp::Exp, nx)
    };
    // Every phase's item is a row (or a state element), not a whole sequence-head: the sequence-head `bh`
    // (the builder's `item`, which the loaders read) and the row are bound from the phase's own item by loops
    // of one iteration, so that the GPU has B·H·T items to spread, not B·H.
    let bind = |var: u32, at: E, body: Vec<Stmt>, lk: &mut LoopKernel| -> Stmt {
        let hi = lk.pool.addi(at, one);
        Stmt::For { var, lo: at, hi, body }
    };
    // stage: item (bh, block, j), one loop of stores per phase (q and k, then v), rows past the end of the
    // sequence zero: each phase a loop of independent stores, which the GPU spreads a thread per element
    let rows_all = lk.pool.mul(nb, be);
    let row_phase = |lk: &mut LoopKernel, name: &str, width: E, cost: usize, make: &RowBody| -> Step {
        let (var, phase_item) = lk.loop_var();
        let bh = lk.pool.div(phase_item, rows_all);
        let rest = lk.pool.rem(phase_item, rows_all);
        let blk_at = lk.pool.div(rest, be);
        let j_at = lk.pool.rem(rest, be);
        let (blk_var, blkv) = lk.loop_var();
        let (j_var, j) = lk.loop_var();
        let t0 = lk.pool.mul(blkv, be);
        let nbase = lk.pool.mul(item, nb);
        let n = lk.pool.addi(nbase, blkv);
        let tt = lk.pool.addi(t0, j);
        let row = vec![for_(lk, zero, width, |lk, x| make(lk, n, j, tt, x, blkv))];
        let inner = bind(j_var, j_at, row, lk);
        let inner = bind(blk_var, blk_at, vec![inner], lk);
        let body = vec![bind(item_var, bh, vec![inner], lk)];
        let grid = lk.pool.mul(n_all, be);
        let item_cost = lk.pool.i(cost as i64);
        Step::Phase(Phase {
            name: name.into(),
            grid,
            item: var,
            body,
            item_cost,
        })
    };
    let stage_qk = row_phase(lk, "lightning.stage_qk", de, 4 * d, &|lk, n, j, tt, dd, _| {
        let inside = lk.pool.cmp(CmpOp::Lt, tt, t);
        let b1 = lk.pool.i(blk - 1);
        let back = lk.pool.sub(b1, j);
        let kdec = decay(lk, back);
        let j1 = lk.pool.addi(j, one);
        let qdec = decay(lk, j1);
        // guarded: rows past the end are not loaded
        let qx = ld_q(lk, tt, dd);
        let qx = lk.pool.cond(inside, qx, fzero);
        let kx = ld_k(lk, tt, dd);
        let kx = lk.pool.cond(inside, kx, fzero);
        let at = ix(lk, &[(n, (block * d) as i64), (j, d as i64), (dd, 1)]);
        let at_t = ix(lk, &[(n, (block * d) as i64), (dd, block as i64), (j, 1)]);
        let kdx = lk.pool.bin(BinaryOp::Mul, kx, kdec);
        let qdx = lk.pool.bin(BinaryOp::Mul, qx, qdec);
        let bo = lk.pool.i(block as i64);
        let col = lk.pool.addi(bo, dd);
        let at2 = ix(lk, &[(n, (block * w2) as i64), (j, w2 as i64), (col, 1)]);
        vec![st(qs, at, qx), st(ks, at_t, kx), st(kd, at, kdx), st(a2, at2, qdx)]
    });
    lk.steps.push(stage_qk);
    let stage_v = row_phase(lk, "lightning.stage_v", dve, dv, &|lk, n, j, tt, c, _| {
        let inside = lk.pool.cmp(CmpOp::Lt, tt, t);
        let vx = ld_v(lk, tt, c);
        let vx = lk.pool.cond(inside, vx, fzero);
        let at = ix(lk, &[(n, (w2 * dv) as i64), (j, dv as i64), (c, 1)]);
        vec![st(b2, at, vx)]
    });
    lk.steps.push(stage_v);
    let i = |lk: &mut LoopKernel, x: usize| lk.pool.i(x as i64);
    let opnd = |arg: u32, rs: E, cs: E, zero: E| Operand {
        arg,
        dtype: if [qs, ks, kd, a2, b2].contains(&arg) { nd } else { f32d },
        offset: zero,
        rs,
        cs,
    };
    // G1: scores
    let (bb, dd_, ww, dvv, bd_, bw, wdv, ddv, bdv) = (
        i(lk, block),
        i(lk, d),
        i(lk, w2),
        i(lk, dv),
        i(lk, block * d),
        i(lk, block * w2),
        i(lk, w2 * dv),
        i(lk, d * dv),
        i(lk, block * dv),
    );
    let sc_stride = i(lk, block * scores.1);
    let sc_pitch = i(lk, scores.1);
    lk.steps.push(Step::Gemm(GemmStep {
        m: bb,
        n: bb,
        k: dd_,
        batch: vec![[n_all, bd_, bd_, sc_stride]],
        a: opnd(qs, dd_, one, zero),
        b: opnd(ks, bb, one, zero),
        c: opnd(scores.0, sc_pitch, one, zero),
    }));
    // G2: each block's state contribution
    lk.steps.push(Step::Gemm(GemmStep {
        m: dd_,
        n: dvv,
        k: bb,
        batch: vec![[n_all, bd_, wdv, ddv]],
        a: opnd(kd, one, dd_, zero),
        b: opnd(b2, dvv, one, zero),
        c: opnd(kv, dvv, one, zero),
    }));
    // mask: item (bh, block, j): row j of the block's scores times the causal decay mask, zero past the
    // diagonal (each element read and written by its own iteration)
    let mask = row_phase(lk, "lightning.mask", be, block, &|lk, n, j, _, u, _| {
        let at = ix(lk, &[(n, (block * w2) as i64), (j, w2 as i64), (u, 1)]);
        let s_at = ix(lk, &[(n, (block * scores.1) as i64), (j, scores.1 as i64), (u, 1)]);
        let x = lk.pool.load(scores.0, f32d, s_at);
        let keep = lk.pool.cmp(CmpOp::Le, u, j);
        // the distance clamped at zero past the diagonal, where the value is not used
        let dist = lk.pool.sub(j, u);
        let dist = lk.pool.max(dist, zero);
        let m = decay(lk, dist);
        let y = lk.pool.bin(BinaryOp::Mul, x, m);
        let y = lk.pool.select(keep, y, fzero);
        vec![st(a2, at, y)]
    });
    lk.steps.push(mask);
    // scan: item (bh, x), x an element of the state: the blocks in order, the state before block i in B2's
    // rows b..b+D: P_0 = 0, P_i = e^{-λb} P_{i-1} + KV_{i-1}
    let (scan_var, scan_item) = lk.loop_var();
    let pn = lk.pool.i((d * dv) as i64);
    let bh = lk.pool.div(scan_item, pn);
    let x_at = lk.pool.rem(scan_item, pn);
    let (x_var, x) = lk.loop_var();
    let bdecay = decay(lk, be);
    // the state P, carried in f32 across the blocks: stored for block i, then P ← e^{-λb} P + KV_i
    let (run_var, run) = lk.mutable(Scalar::F32);
    let mut scan_body = vec![Stmt::Set {
        var: run_var,
        value: fzero,
    }];
    scan_body.push(for_(lk, zero, nb, |lk, blkv| {
        let nbase = lk.pool.mul(item, nb);
        let n = lk.pool.addi(nbase, blkv);
        let bo = lk.pool.i((block * dv) as i64);
        let at = ix(lk, &[(n, (w2 * dv) as i64), (x, 1)]);
        let at = lk.pool.addi(at, bo);
        let kv_at = ix(lk, &[(n, (d * dv) as i64), (x, 1)]);
        let kvx = lk.pool.load(kv, f32d, kv_at);
        let dec = lk.pool.bin(BinaryOp::Mul, run, bdecay);
        let v = lk.pool.bin(BinaryOp::Add, dec, kvx);
        vec![st(b2, at, run), Stmt::Set { var: run_var, value: v }]
    }));
    let inner = bind(x_var, x_at, scan_body, lk);
    let body = vec![bind(item_var, bh, vec![inner], lk)];
    let scan_grid = lk.pool.mul(grid, pn);
    lk.steps.push(Step::Phase(Phase {
        name: "lightning.scan".into(),
        grid: scan_grid,
        item: scan_var,
        body,
        item_cost: nb,
    }));
    // G3: the block outputs
    lk.steps.push(Step::Gemm(GemmStep {
        m: bb,
        n: dvv,
        k: ww,
        batch: vec![[n_all, bw, wdv, bdv]],
        a: opnd(a2, ww, one, zero),
        b: opnd(b2, dvv, one, zero),
        c: opnd(o, dvv, one, zero),
    }));
    // O's element (row tt of sequence-head `bh`, column c)
    let o_at = |lk: &mut LoopKernel, bh: E, tt: E, c: E| -> E {
        let blkv = lk.pool.div(tt, be);
        let j = lk.pool.rem(tt, be);
        let nbase = lk.pool.mul(bh, nb);
        let n = lk.pool.addi(nbase, blkv);
        let at = ix(lk, &[(n, (block * dv) as i64), (j, dv as i64), (c, 1)]);
        lk.pool.load(o, f32d, at)
    };
    match (write, layer) {
        (Some(write), _) => {
            // item (bh, tt): one output row
            let (out_var, out_item) = lk.loop_var();
            let bh = lk.pool.div(out_item, t);
            let tt_at = lk.pool.rem(out_item, t);
            let (tt_var, tt) = lk.loop_var();
            let row = vec![for_(lk, zero, dve, |lk, c| {
                let v = o_at(lk, item, tt, c);
                vec![write(lk, tt, c, v)]
            })];
            let inner = bind(tt_var, tt_at, row, lk);
            let body = vec![bind(item_var, bh, vec![inner], lk)];
            let out_grid = lk.pool.mul(grid, t);
            lk.steps.push(Step::Phase(Phase {
                name: "lightning.out".into(),
                grid: out_grid,
                item: out_var,
                body,
                item_cost: dve,
            }));
        }
        (None, None) => return Ok(false),
        (None, Some((heads, eps))) => {
            // per row: sigmoid(gate) ⊙ ((o · rsqrt(mean(o²) + eps)) · w), o the heads' outputs side by side
            let norm_w = View::of(lk.slot(Slot::Input(2)), &k.inputs[2]);
            let gate = View::of(lk.slot(Slot::Input(3)), &k.inputs[3]);
            let he = lk.pool.i(heads as i64);
            let (row_var, row) = lk.loop_var();
            let bi = lk.pool.div(row, t);
            let ti = lk.pool.rem(row, t);
            let bh0 = lk.pool.mul(bi, he);
            let (acc_var, acc) = lk.mutable(Scalar::F32);
            let mut body = vec![Stmt::Set {
                var: acc_var,
                value: fzero,
            }];
            body.push(for_(lk, zero, he, |lk, h| {
                let bh = lk.pool.addi(bh0, h);
                vec![for_(lk, zero, dve, |lk, c| {
                    let x = o_at(lk, bh, ti, c);
                    let sq = lk.pool.bin(BinaryOp::Mul, x, x);
                    vec![Stmt::Accumulate {
                        var: acc_var,
                        op: Acc::Add,
                        value: sq,
                    }]
                })]
            }));
            let p = &mut lk.pool;
            let n = p.f((heads * dv) as f32);
            let ms = p.bin(BinaryOp::Div, acc, n);
            let epse = p.f(eps as f32);
            let ms = p.bin(BinaryOp::Add, ms, epse);
            let r = p.un(UnaryOp::Rsqrt, ms);
            let (r_var, rv) = lk.mutable(Scalar::F32);
            body.push(Stmt::Set { var: r_var, value: r });
            body.push(for_(lk, zero, he, |lk, h| {
                let bh = lk.pool.addi(bh0, h);
                let col0 = lk.pool.mul(h, dve);
                vec![for_(lk, zero, dve, |lk, c| {
                    let x = o_at(lk, bh, ti, c);
                    let col = lk.pool.addi(col0, c);
                    let w = norm_w.load(lk, &[col]);
                    let g = gate.load(lk, &[bi, ti, col]);
                    let p = &mut lk.pool;
                    let y = p.bin(BinaryOp::Mul, x, rv);
                    let y = p.bin(BinaryOp::Mul, y, w);
                    let s = p.un(UnaryOp::Sigmoid, g);
                    let val = p.bin(BinaryOp::Mul, s, y);
                    vec![store(&out, lk, &[bi, ti, col], val)]
                })]
            }));
            let rows_dim = lk.dim(&(out.shape[0].clone() * out.shape[1].clone()));
            let hd = lk.pool.i((heads * dv) as i64);
            lk.steps.push(Step::Phase(Phase {
                name: "norm_gate".into(),
                grid: rows_dim,
                item: row_var,
                body,
                item_cost: hd,
            }));
        }
    }
    Ok(true)
}

/// Rows per chunk of `moe_dispatch`'s parallel counting sort.
const DISPATCH_CHUNK: i64 = 64;

/// `moe_dispatch`: a counting sort of the (token, slot) rows by expert, stable, in parallel phases over chunks
/// of rows (count, offsets per expert, place: `pos`, `counts`); a last parallel phase copies the rows.
fn moe_dispatch(k: &Kernel, b: &mut Built, experts: usize) -> Result<bool, CodegenError> {
    let Some(kk) = konst(&k.inputs[1].shape[1]) else {
        return Ok(false);
    };
    let lk = &mut b.lk;
    let x = View::of(lk.slot(Slot::Input(0)), &k.inputs[0]);
    let ids = View::of(lk.slot(Slot::Input(1)), &k.inputs[1]);
    let xs = View::of(lk.slot(Slot::Output(0)), &k.outputs[0]);
    let pos = View::of(lk.slot(Slot::Output(1)), &k.outputs[1]);
    let counts = View::of(lk.slot(Slot::Output(2)), &k.outputs[2]);
    let n = lk.dim(&ids.shape[0].clone());
    let ke = lk.pool.i(kk as i64);
    let rows = lk.pool.mul(n, ke);
    let ee = lk.pool.i(experts as i64);
    let zero = lk.pool.i(0);
    let one = lk.pool.i(1);
    let what = format!("an expert id of `moe_dispatch` is out of range [0, {experts})");
    let expert_of = |lk: &mut LoopKernel, r: E| -> E {
        let tok = lk.pool.div(r, ke);
        let slot = lk.pool.rem(r, ke);
        let raw = ids.load(lk, &[tok, slot]);
        let raw = lk.pool.cast(Scalar::I64, raw);
        lk.checked(raw, ee, what.clone())
    };
    // A stable counting sort in parallel phases over chunks of DISPATCH_CHUNK rows: count each chunk's rows
    // per expert; per expert, its rows in all (`counts`); per expert, its rows' first place in each chunk
    // (the rows of lower experts, then of the chunks before); place each chunk's rows in order. A chunk's
    // counts and places live in a thread's local array while it walks the chunk's rows (an increment there
    // waits on no memory round trip), and an expert's start is the sum of the lower experts' totals.
    let ch = lk.pool.i(DISPATCH_CHUNK);
    let ch1 = lk.pool.i(DISPATCH_CHUNK - 1);
    let rows_up = lk.pool.addi(rows, ch1);
    let chunks = lk.pool.div(rows_up, ch);
    let chunks_dim = (ids.shape[0].clone() * Dim::from(kk as i64)).ceil_div(&Dim::from(DISPATCH_CHUNK));
    let cnt = lk.scratch(fulgur_ir::DType::I64, chunks_dim.clone() * Dim::from(experts as i64));
    let offs = lk.scratch(fulgur_ir::DType::I64, chunks_dim * Dim::from(experts as i64));
    let i64d = fulgur_ir::DType::I64;
    let at = |lk: &mut LoopKernel, c: E, e: E| -> E { mad(lk, c, ee, e) };
    let chunk_rows = |lk: &mut LoopKernel, c: E| -> (E, E) {
        let lo = lk.pool.mul(c, ch);
        let hi = lk.pool.addi(lo, ch);
        let hi = lk.pool.min(hi, rows);
        (lo, hi)
    };
    // count
    let local = lk.local(Scalar::I64, experts);
    let (count_var, c) = lk.loop_var();
    let (lo, hi) = chunk_rows(lk, c);
    let mut body = vec![for_(lk, zero, ee, |_, e| {
        vec![Stmt::StoreLocal {
            local,
            index: e,
            value: zero,
        }]
    })];
    body.push(for_(lk, lo, hi, |lk, r| {
        let e = expert_of(lk, r);
        let cur = lk.load_local(local, e);
        let next = lk.pool.addi(cur, one);
        vec![Stmt::StoreLocal {
            local,
            index: e,
            value: next,
        }]
    }));
    body.push(for_(lk, zero, ee, |lk, e| {
        let i = at(lk, c, e);
        let v = lk.load_local(local, e);
        vec![Stmt::Store {
            arg: cnt,
            dtype: i64d,
            index: i,
            value: v,
        }]
    }));
    lk.steps.push(Step::Phase(Phase {
        name: "moe_dispatch.count".into(),
        grid: chunks,
        item: count_var,
        body,
        item_cost: ch,
    }));
    // totals: per expert, its rows over the chunks
    let (total_var, e) = lk.loop_var();
    let (sum_var, sum) = lk.mutable(Scalar::I64);
    let mut body = vec![Stmt::Set {
        var: sum_var,
        value: zero,
    }];
    body.push(for_(lk, zero, chunks, |lk, c| {
        let i = at(lk, c, e);
        let x = lk.pool.load(cnt, i64d, i);
        vec![Stmt::Accumulate {
            var: sum_var,
            op: Acc::Add,
            value: x,
        }]
    }));
    body.push(store(&counts, lk, &[e], sum));
    lk.steps.push(Step::Phase(Phase {
        name: "moe_dispatch.totals".into(),
        grid: ee,
        item: total_var,
        body,
        item_cost: chunks,
    }));
    // offsets: per expert, from the lower experts' totals
    let (off_var, e) = lk.loop_var();
    let (run_var, run) = lk.mutable(Scalar::I64);
    let mut body = vec![Stmt::Set {
        var: run_var,
        value: zero,
    }];
    body.push(for_(lk, zero, e, |lk, e2| {
        let x = counts.load(lk, &[e2]);
        vec![Stmt::Accumulate {
            var: run_var,
            op: Acc::Add,
            value: x,
        }]
    }));
    body.push(for_(lk, zero, chunks, |lk, c| {
        let i = at(lk, c, e);
        let x = lk.pool.load(cnt, i64d, i);
        vec![
            Stmt::Store {
                arg: offs,
                dtype: i64d,
                index: i,
                value: run,
            },
            Stmt::Accumulate {
                var: run_var,
                op: Acc::Add,
                value: x,
            },
        ]
    }));
    lk.steps.push(Step::Phase(Phase {
        name: "moe_dispatch.offsets".into(),
        grid: ee,
        item: off_var,
        body,
        item_cost: chunks,
    }));
    // place: per chunk, its rows in order, from the chunk's first places in a local array
    let (place_var, c) = lk.loop_var();
    let (lo, hi) = chunk_rows(lk, c);
    let mut body = vec![for_(lk, zero, ee, |lk, e| {
        let i = at(lk, c, e);
        let v = lk.pool.load(offs, i64d, i);
        vec![Stmt::StoreLocal {
            local,
            index: e,
            value: v,
        }]
    })];
    body.push(for_(lk, lo, hi, |lk, r| {
        let e = expert_of(lk, r);
        let p = lk.load_local(local, e);
        let tok = lk.pool.div(r, ke);
        let slot = lk.pool.rem(r, ke);
        // the place is read before the store that moves it on: through a variable
        let (pv, pcur) = lk.mutable(Scalar::I64);
        let p1 = lk.pool.addi(pcur, one);
        vec![
            Stmt::Set { var: pv, value: p },
            store(&pos, lk, &[tok, slot], pcur),
            Stmt::StoreLocal {
                local,
                index: e,
                value: p1,
            },
        ]
    }));
    lk.steps.push(Step::Phase(Phase {
        name: "moe_dispatch.place".into(),
        grid: chunks,
        item: place_var,
        body,
        item_cost: ch,
    }));
    // the rows: xs[pos[r]] = x[r / k]
    let (row_var, r) = lk.loop_var();
    let c_dim = lk.dim(&x.shape[1].clone());
    let tok = lk.pool.div(r, ke);
    let slot = lk.pool.rem(r, ke);
    let p = pos.load(lk, &[tok, slot]);
    let copy = for_(lk, zero, c_dim, |lk, c| {
        let v = x.load(lk, &[tok, c]);
        vec![store(&xs, lk, &[p, c], v)]
    });
    lk.steps.push(Step::Phase(Phase {
        name: "moe_dispatch.copy".into(),
        grid: rows,
        item: row_var,
        body: vec![copy],
        item_cost: c_dim,
    }));
    Ok(true)
}

/// `moe_combine`: per token, `out[n] = Σ_slot weights[n, slot] · ys[pos[n, slot]]`, the slots in order into a
/// row accumulator (so the loop over channels vectorises), each `pos` checked against the rows of `ys`.
fn moe_combine(k: &Kernel, b: &mut Built) -> Result<bool, CodegenError> {
    let (Some(kk), Some(c)) = (konst(&k.inputs[1].shape[1]), konst(&k.inputs[0].shape[1])) else {
        return Ok(false);
    };
    if !k.inputs[0].dtype.is_float() {
        return Ok(false);
    }
    let lk = &mut b.lk;
    let ys = View::of(lk.slot(Slot::Input(0)), &k.inputs[0]);
    let pos = View::of(lk.slot(Slot::Input(1)), &k.inputs[1]);
    let w = View::of(lk.slot(Slot::Input(2)), &k.inputs[2]);
    let out = View::of(lk.slot(Slot::Output(0)), &k.outputs[0]);
    let rows = lk.dim(&ys.shape[0].clone());
    let n = lk.dim(&pos.shape[0].clone());
    let acc = lk.local(Scalar::F32, c);
    let zero = lk.pool.i(0);
    let fzero = lk.pool.f(0.0);
    let ce = lk.pool.i(c as i64);
    let ke = lk.pool.i(kk as i64);
    let (row_var, t) = lk.loop_var();
    let what = format!(
        "a row index of `moe_combine` is out of range [0, {})",
        k.inputs[0].shape[0]
    );
    let mut body = vec![for_(lk, zero, ce, |_, x| vec![st_local(acc, x, fzero)])];
    body.push(for_(lk, zero, ke, |lk, sl| {
        let raw = pos.load(lk, &[t, sl]);
        let raw = lk.pool.cast(Scalar::I64, raw);
        let p = lk.checked(raw, rows, what.clone());
        let wt = w.load(lk, &[t, sl]);
        let wt = lk.pool.cast(Scalar::F32, wt);
        vec![for_(lk, zero, ce, |lk, x| {
            let y = ys.load(lk, &[p, x]);
            let y = lk.pool.cast(Scalar::F32, y);
            let cur = lk.load_local(acc, x);
            let pr = lk.pool.bin(BinaryOp::Mul, wt, y);
            let sm = lk.pool.bin(BinaryOp::Add, cur, pr);
            vec![st_local(acc, x, sm)]
        })]
    }));
    body.push(for_(lk, zero, ce, |lk, x| {
        let v = lk.load_local(acc, x);
        vec![store(&out, lk, &[t, x], v)]
    }));
    lk.steps.push(Step::Phase(Phase {
        name: "moe_combine".into(),
        grid: n,
        item: row_var,
        body,
        item_cost: lk.pool.i((kk * c) as i64),
    }));
    Ok(true)
}
