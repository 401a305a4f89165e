//! Round trips of random valid graphs through the `.fir` text format and JSON.
//!
//! Graphs are generated through the builder API by trying random ops on random existing values and keeping
//! the ones `Graph::add_node` accepts. Properties: `print(parse(print(g))) == print(g)`, and a graph read back
//! from its JSON prints identically.

use fulgur_ir::op::{BinaryOp, CmpOp, Composite, ConstData, FusedBody, ReduceOp, UnaryOp};
use fulgur_ir::{json, text, DType, Dim, Graph, Op, Shape, Value};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;

const SYMS: [&str; 6] = ["B", "T", "N", "D_1", "h", "S"];

/// Pieces of odd names: quotes, escapes, control characters, unicode, text-format punctuation.
const NAME_PIECES: [&str; 22] = [
    "a", "blk", ".", "0", "\"", "\\", "\n", "\t", "\r", "é", "☃", "😀", " ", "%1", "#0", "//", "\u{1}", "\u{7f}", "{",
    "]", "=", "",
];

struct Gen {
    g: Graph,
    pool: Vec<Value>,
    rng: StdRng,
    counter: usize,
}

impl Gen {
    fn dim(&mut self) -> Dim {
        let r = &mut self.rng;
        match r.gen_range(0..10) {
            0..=3 => Dim::from(r.gen_range(1..=6i64)),
            4 => Dim::from(1i64),
            5..=7 => Dim::sym(SYMS[r.gen_range(0..SYMS.len())]),
            8 => {
                let a = Dim::sym(SYMS[r.gen_range(0..3)]);
                let b = Dim::sym(SYMS[r.gen_range(0..SYMS.len())]);
                match r.gen_range(0..4) {
                    0 => a * b,
                    1 => a + Dim::from(r.gen_range(1..4i64)),
                    2 => Dim::from(r.gen_range(2..5i64)) * a,
                    _ => a * b - Dim::from(1i64),
                }
            }
            _ => Dim::sym(SYMS[r.gen_range(0..SYMS.len())]).ceil_div(&Dim::from(r.gen_range(2..9i64))),
        }
    }

    fn dims(&mut self, rank: usize) -> Vec<Dim> {
        (0..rank).map(|_| self.dim()).collect()
    }

    fn dtype(&mut self) -> DType {
        *DType::ALL.choose(&mut self.rng).unwrap_or(&DType::F32)
    }

    fn float_dtype(&mut self) -> DType {
        [DType::F32, DType::BF16, DType::F16][self.rng.gen_range(0..3)]
    }

    fn f64(&mut self) -> f64 {
        let r = &mut self.rng;
        match r.gen_range(0..4) {
            0 => [
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                1e-300,
                -0.0,
                0.0,
                5e-324,
                f64::MAX,
                f64::MIN,
                f64::MIN_POSITIVE,
                0.1,
                1.0,
                -2.5,
                1e16,
                123456789.0,
            ][r.gen_range(0..15)],
            1 => f64::from_bits(r.gen()),
            2 => r.gen_range(-10.0..10.0),
            _ => r.gen_range(-1000i64..1000) as f64,
        }
    }

    fn name(&mut self) -> String {
        let n = self.rng.gen_range(0..4);
        (0..n)
            .map(|_| NAME_PIECES[self.rng.gen_range(0..NAME_PIECES.len())])
            .collect()
    }

    fn unique_name(&mut self) -> String {
        self.counter += 1;
        format!("{}{}", self.name(), self.counter)
    }

    fn axis(&mut self, rank: usize) -> i64 {
        let r = rank.max(1) as i64;
        let a = self.rng.gen_range(0..r);
        if self.rng.gen_bool(0.5) {
            a - r
        } else {
            a
        }
    }

    /// A random existing value satisfying `pred`.
    fn pick(&mut self, pred: impl Fn(&Graph, Value) -> bool) -> Option<Value> {
        let cands: Vec<Value> = self.pool.iter().copied().filter(|&v| pred(&self.g, v)).collect();
        cands.choose(&mut self.rng).copied()
    }

    fn any(&mut self) -> Option<Value> {
        self.pick(|_, _| true)
    }

    fn new_input(&mut self, dtype: DType, dims: Vec<Dim>) -> Option<Value> {
        let name = self.unique_name();
        let v = if self.rng.gen_bool(0.5) {
            self.g.input(&name, dtype, dims)
        } else {
            self.g.param(&name, dtype, dims)
        };
        let v = v.ok()?;
        self.pool.push(v);
        Some(v)
    }

    /// A shape that broadcasts against `dims`: some leading axes dropped, some dims replaced by 1.
    fn broadcastable(&mut self, dims: &[Dim]) -> Vec<Dim> {
        let drop = self.rng.gen_range(0..=dims.len());
        dims[drop..]
            .iter()
            .map(|d| {
                if self.rng.gen_bool(0.3) {
                    Dim::from(1i64)
                } else {
                    d.clone()
                }
            })
            .collect()
    }

    /// A second operand for an elementwise op with `a`.
    fn partner(&mut self, a: Value) -> Option<Value> {
        let dt = self.g.dtype(a);
        let dims = self.g.dims(a).to_vec();
        match self.rng.gen_range(0..4) {
            0 => Some(a),
            1 => {
                let want = dims.clone();
                self.pick(move |g, v| g.dtype(v) == dt && g.dims(v) == want.as_slice())
            }
            2 => {
                let d = self.broadcastable(&dims);
                self.new_input(dt, d)
            }
            _ => {
                let x = self.f64();
                self.g.scalar(x, dt).ok()
            }
        }
    }

    /// Adds a node (sometimes with an odd name) and puts its outputs in the pool.
    fn add(&mut self, op: Op, inputs: &[Value]) -> bool {
        let name = if self.rng.gen_bool(0.3) {
            Some(self.name())
        } else {
            None
        };
        match self.g.add_node(op, inputs, name) {
            Ok(id) => {
                for i in 0..self.g.node(id).outputs.len() as u32 {
                    self.pool.push(Value::new(id, i));
                }
                true
            }
            Err(_) => false,
        }
    }

    /// A value of dtype `dt` and shape `dims`: an existing one (sometimes) or a new input.
    fn value_of(&mut self, dt: DType, dims: Vec<Dim>) -> Option<Value> {
        if self.rng.gen_bool(0.3) {
            let want = dims.clone();
            if let Some(v) = self.pick(move |g, v| g.dtype(v) == dt && g.dims(v) == want.as_slice()) {
                return Some(v);
            }
        }
        self.new_input(dt, dims)
    }

    /// A collective over a leading rank axis `[R, ..., R·c, ...]`: `all_to_all`, or a started one and its wait;
    /// or a grouped one (`all_reduce`, `all_gather`, `reduce_scatter`), of all ranks or over a `[2, 3]` mesh.
    fn collective(&mut self) {
        if self.rng.gen_bool(0.5) {
            return self.grouped_collective();
        }
        let (r, c) = (self.dim(), self.dim());
        let mut dims = vec![r.clone()];
        let n = self.rng.gen_range(0..2);
        dims.extend(self.dims(n));
        let axis = dims.len() as i64;
        dims.push(r * c);
        let n = self.rng.gen_range(0..2);
        dims.extend(self.dims(n));
        let axis = if self.rng.gen_bool(0.5) {
            axis - dims.len() as i64
        } else {
            axis
        };
        let dt = self.dtype();
        let Some(x) = self.value_of(dt, dims) else { return };
        if self.rng.gen_bool(0.5) {
            self.add(
                Op::Composite(Composite::AllToAll {
                    axis,
                    mesh: vec![],
                    over: 0,
                }),
                &[x],
            );
        } else {
            let overlap_flops = self.dim();
            if self.add(
                Op::Composite(Composite::AllToAllStart {
                    axis,
                    overlap_flops,
                    mesh: vec![],
                    over: 0,
                }),
                &[x],
            ) {
                let h = *self.pool.last().expect("just added");
                self.add(Op::Composite(Composite::CollectiveWait), &[h]);
            }
        }
    }

    fn grouped_collective(&mut self) {
        let (mesh, over, r) = if self.rng.gen_bool(0.5) {
            (vec![], 0, self.dim())
        } else {
            (vec![2usize, 3], self.rng.gen_range(0..2usize), Dim::from(6))
        };
        let group = if mesh.is_empty() {
            r.clone()
        } else {
            Dim::from(mesh[over])
        };
        if self.rng.gen_bool(0.1) {
            // a rank's view of a collective, in a per-rank program
            let n = self.rng.gen_range(1..3);
            let dims = self.dims(n);
            let dt = self.float_dtype();
            let Some(x) = self.value_of(dt, dims) else { return };
            let over = self.rng.gen_range(0..2usize);
            let rank = self.rng.gen_range(0..6usize);
            let op = Op::Composite(Composite::AllReduce { mesh: vec![2, 3], over });
            self.add(Op::Composite(Composite::OnRank { op: Box::new(op), rank }), &[x]);
            return;
        }
        if self.rng.gen_bool(0.15) {
            // the routed MoE exchange: rows [R, M, ...] and counts [R, E], E a multiple of the group size
            let per = self.rng.gen_range(1..3usize);
            let e = group.clone() * Dim::from(per);
            let mut dims = vec![r.clone(), self.dim()];
            let n = self.rng.gen_range(0..2);
            dims.extend(self.dims(n));
            let dt = self.dtype();
            let Some(x) = self.value_of(dt, dims) else { return };
            let idt = if self.rng.gen_bool(0.5) { DType::I32 } else { DType::I64 };
            let Some(c) = self.value_of(idt, vec![r, e]) else {
                return;
            };
            // the schedule annotation: none (not printed) or a size
            let overlap_flops = if self.rng.gen_bool(0.5) {
                Dim::from(0usize)
            } else {
                self.dim()
            };
            let op = if self.rng.gen_bool(0.5) {
                Composite::AllToAllDispatch {
                    mesh,
                    over,
                    overlap_flops,
                }
            } else {
                Composite::AllToAllCombine {
                    mesh,
                    over,
                    overlap_flops,
                }
            };
            self.add(Op::Composite(op), &[x, c]);
            return;
        }
        if self.rng.gen_bool(0.2) {
            // an op without a batch axis of its own, once per slice of a leading axis
            let mut dims = vec![Dim::from(3)];
            let n = self.rng.gen_range(1..3);
            dims.extend(self.dims(n));
            let dt = self.float_dtype();
            let Some(x) = self.value_of(dt, dims) else { return };
            let inner = if self.rng.gen_bool(0.5) {
                Op::TopK { k: 1, axis: -1 }
            } else {
                Op::Composite(Composite::Softmax { axis: 0 })
            };
            self.add(Op::Composite(Composite::PerRank { op: Box::new(inner) }), &[x]);
            return;
        }
        let kind = self.rng.gen_range(0..4);
        if kind == 3 {
            // send_recv needs a constant group size
            let (mesh, over) = if self.rng.gen_bool(0.5) {
                (vec![6usize], 0usize)
            } else {
                (vec![2, 3], self.rng.gen_range(0..2usize))
            };
            let n = self.rng.gen_range(0..3);
            let mut dims = vec![Dim::from(6)];
            dims.extend(self.dims(n));
            let dt = self.dtype();
            let Some(x) = self.value_of(dt, dims) else { return };
            let shift = self.rng.gen_range(-3..4);
            self.add(Op::Composite(Composite::SendRecv { shift, mesh, over }), &[x]);
            return;
        }
        let mut dims = vec![r];
        let n = self.rng.gen_range(0..2);
        dims.extend(self.dims(n));
        let axis = dims.len() as i64;
        let c = self.dim();
        dims.push(if kind == 2 { group * c } else { c });
        let n = self.rng.gen_range(0..2);
        dims.extend(self.dims(n));
        let axis = if self.rng.gen_bool(0.5) {
            axis - dims.len() as i64
        } else {
            axis
        };
        let dt = self.dtype();
        let Some(x) = self.value_of(dt, dims) else { return };
        let op = match kind {
            0 => Composite::AllReduce { mesh, over },
            1 => Composite::AllGather { axis, mesh, over },
            _ if self.rng.gen_bool(0.5) => Composite::ShardSlice { axis, mesh, over },
            _ => Composite::ReduceScatter { axis, mesh, over },
        };
        self.add(Op::Composite(op), &[x]);
    }

    /// One of the optimizer's attention and MoE composites, on inputs that mostly type-check.
    fn model_composite(&mut self, a: Value) {
        let f = self.float_dtype();
        let idt = if self.rng.gen_bool(0.5) { DType::I32 } else { DType::I64 };
        if self.rng.gen_bool(0.15) {
            return self.collective();
        }
        match self.rng.gen_range(0..7) {
            6 => {
                // a fused kernel: `exp(arg0) · arg1` on `a`'s type, a body node with an odd name (escapes in a
                // string inside a string)
                let t = self.g.ty(a).clone();
                if !t.dtype.is_float() {
                    return;
                }
                let Some(b) = self.value_of(t.dtype, t.dims().to_vec()) else {
                    return;
                };
                let mut body = Graph::new("fused");
                let x = body.input("arg0", t.dtype, t.dims().to_vec()).expect("arg0");
                let y = body.input("arg1", t.dtype, t.dims().to_vec()).expect("arg1");
                let name = self.name();
                let e = body.named(&name, Op::Unary(UnaryOp::Exp), &[x]).expect("exp");
                let m = body.mul(e, y).expect("mul");
                body.add_output("out", m).expect("output");
                let body = FusedBody::from_graph(&body).expect("a valid body");
                self.add(Op::Composite(Composite::Fused { body }), &[a, b]);
            }
            0 => {
                let nb = self.rng.gen_range(0..3);
                let batch = self.dims(nb);
                let (t, d, dv) = (self.dim(), self.dim(), self.dim());
                let qd: Vec<Dim> = batch.iter().cloned().chain([t.clone(), d]).collect();
                let vd: Vec<Dim> = batch.iter().cloned().chain([t, dv]).collect();
                let mut ld = batch.clone();
                ld.extend([Dim::from(1i64), Dim::from(1i64)]);
                let ld = self.broadcastable(&ld);
                let (Some(q), Some(k), Some(v), Some(lam)) = (
                    self.value_of(f, qd.clone()),
                    self.value_of(f, qd),
                    self.value_of(f, vd),
                    self.value_of(f, ld),
                ) else {
                    return;
                };
                let block = [1, 2, 16, 256][self.rng.gen_range(0..4)];
                self.add(Op::Composite(Composite::LightningAttention { block }), &[q, k, v, lam]);
                // the whole lightning block, prologue and epilogue included
                let (heads, d) = (self.rng.gen_range(1..3usize), self.rng.gen_range(1..4usize));
                let (b, t) = (self.dim(), self.dim());
                let hd = Dim::from(heads * d);
                let (Some(qkv), Some(lam), Some(w), Some(gate)) = (
                    self.value_of(f, vec![b.clone(), t.clone(), Dim::from(3 * heads * d)]),
                    self.value_of(f, vec![Dim::from(heads), Dim::from(1i64), Dim::from(1i64)]),
                    self.value_of(f, vec![hd.clone()]),
                    self.value_of(f, vec![b, t, hd]),
                ) else {
                    return;
                };
                let eps = 1e-6;
                self.add(
                    Op::Composite(Composite::LightningLayer { block, heads, eps }),
                    &[qkv, lam, w, gate],
                );
            }
            1 => {
                let nb = self.rng.gen_range(0..3);
                let batch = self.dims(nb);
                let (t, s, d, dv) = (self.dim(), self.dim(), self.dim(), self.dim());
                let qd: Vec<Dim> = batch.iter().cloned().chain([t, d.clone()]).collect();
                let kb = self.broadcastable(&batch);
                let kd: Vec<Dim> = kb.iter().cloned().chain([s.clone(), d]).collect();
                let vd: Vec<Dim> = kb.iter().cloned().chain([s, dv]).collect();
                let (Some(q), Some(k), Some(v)) = (self.value_of(f, qd), self.value_of(f, kd), self.value_of(f, vd))
                else {
                    return;
                };
                let scale = self.f64();
                let causal = self.rng.gen_bool(0.5);
                if self.rng.gen_bool(0.25) {
                    self.add(
                        Op::Composite(Composite::FlashAttentionLse { scale, causal }),
                        &[q, k, v],
                    );
                    return;
                }
                if self.add(Op::Composite(Composite::FlashAttention { scale, causal }), &[q, k, v]) {
                    // its backward, given a gradient of the output's type
                    let o = *self.pool.last().expect("the node just added");
                    let od = self.g.dims(o).to_vec();
                    if let Some(d_out) = self.value_of(f, od) {
                        self.add(
                            Op::Composite(Composite::FlashAttentionGrad { scale, causal }),
                            &[q, k, v, d_out],
                        );
                    }
                }
                // with rotary embeddings in the prologue: q and k at the same positions, constant head dim
                let (t, hd) = (self.dim(), self.rng.gen_range(1..4usize) * 2);
                let rotary = 2 * self.rng.gen_range(1..=hd / 2);
                let qd: Vec<Dim> = batch.iter().cloned().chain([t.clone(), Dim::from(hd)]).collect();
                let kd: Vec<Dim> = kb.iter().cloned().chain([t.clone(), Dim::from(hd)]).collect();
                let (Some(q), Some(k), Some(v), Some(c), Some(sn)) = (
                    self.value_of(f, qd),
                    self.value_of(f, kd.clone()),
                    self.value_of(f, kd),
                    self.value_of(f, vec![t.clone(), Dim::from(rotary)]),
                    self.value_of(f, vec![t, Dim::from(rotary)]),
                ) else {
                    return;
                };
                self.add(
                    Op::Composite(Composite::FlashAttentionRope { scale, causal, rotary }),
                    &[q, k, v, c, sn],
                );
            }
            2 => {
                let logits = if self.g.dtype(a).is_float() && self.g.rank(a) >= 1 {
                    a
                } else {
                    let d = self.dims(2);
                    let Some(l) = self.new_input(f, d) else { return };
                    l
                };
                let k = self.rng.gen_range(0..5);
                self.add(Op::Composite(Composite::MoeRouter { k }), &[logits]);
            }
            3 => {
                let ids = match self.pick(|g, v| g.dtype(v).is_int() && g.rank(v) == 2) {
                    Some(i) if self.rng.gen_bool(0.7) => i,
                    _ => {
                        let d = self.dims(2);
                        let Some(i) = self.new_input(idt, d) else { return };
                        i
                    }
                };
                let n = self.g.dims(ids)[0].clone();
                let c = self.dim();
                let Some(x) = self.value_of(f, vec![n, c]) else { return };
                let experts = self.rng.gen_range(0..7);
                self.add(Op::Composite(Composite::MoeDispatch { experts }), &[x, ids]);
            }
            4 => {
                let (m, c, e) = (self.dim(), self.dim(), self.dim());
                let swiglu = self.rng.gen_bool(0.5);
                let o = if swiglu && self.rng.gen_bool(0.8) {
                    Dim::from(2i64) * self.dim()
                } else {
                    self.dim()
                };
                let (Some(xs), Some(counts), Some(w)) = (
                    self.value_of(f, vec![m.clone(), c.clone()]),
                    self.value_of(idt, vec![e.clone()]),
                    self.value_of(f, vec![e, c, o]),
                ) else {
                    return;
                };
                self.add(Op::Composite(Composite::GroupedMatmul { swiglu }), &[xs, counts, w]);
                // the weight gradient over the same groups
                let o2 = self.dim();
                if let Some(dy) = self.value_of(f, vec![m, o2]) {
                    self.add(Op::Composite(Composite::GroupedMatmulWgrad), &[xs, counts, dy]);
                }
            }
            _ => {
                let pos = match self.pick(|g, v| g.dtype(v).is_int() && g.rank(v) == 2) {
                    Some(p) if self.rng.gen_bool(0.7) => p,
                    _ => {
                        let d = self.dims(2);
                        let Some(p) = self.new_input(idt, d) else { return };
                        p
                    }
                };
                let pd = self.g.dims(pos).to_vec();
                let (m, c) = (self.dim(), self.dim());
                let (Some(ys), Some(w)) = (self.value_of(f, vec![m, c]), self.value_of(f, pd)) else {
                    return;
                };
                self.add(Op::Composite(Composite::MoeCombine), &[ys, pos, w]);
            }
        }
    }

    fn step(&mut self) {
        let Some(a) = self.any() else {
            let d = self.dtype();
            let r = self.rng.gen_range(0..4);
            let dims = self.dims(r);
            self.new_input(d, dims);
            return;
        };
        let dt = self.g.dtype(a);
        let dims = self.g.dims(a).to_vec();
        let rank = dims.len();
        match self.rng.gen_range(0..26) {
            0 => {
                let d = self.dtype();
                let r = self.rng.gen_range(0..4);
                let dims = self.dims(r);
                self.new_input(d, dims);
            }
            1 => {
                let u = *UnaryOp::ALL.choose(&mut self.rng).unwrap_or(&UnaryOp::Exp);
                self.add(Op::Unary(u), &[a]);
            }
            2 | 3 => {
                let Some(b) = self.partner(a) else { return };
                let op = if self.rng.gen_bool(0.7) {
                    Op::Binary(*BinaryOp::ALL.choose(&mut self.rng).unwrap_or(&BinaryOp::Add))
                } else {
                    Op::Compare(*CmpOp::ALL.choose(&mut self.rng).unwrap_or(&CmpOp::Lt))
                };
                let ins = if self.rng.gen_bool(0.5) { [a, b] } else { [b, a] };
                self.add(op, &ins);
            }
            4 => {
                let Some(b) = self.partner(a) else { return };
                let cond = match self.pick(|g, v| g.dtype(v) == DType::Bool) {
                    Some(c) if self.rng.gen_bool(0.5) => c,
                    _ => {
                        let Some(c) = self.partner(a) else { return };
                        let Ok(c) = self.g.compare(CmpOp::Gt, a, c) else { return };
                        c
                    }
                };
                self.add(Op::Select, &[cond, a, b]);
            }
            5 => {
                let d = self.dtype();
                self.add(Op::Cast { dtype: d }, &[a]);
            }
            6 => {
                if rank < 2 || !dt.is_float() {
                    let f = self.float_dtype();
                    let r = self.rng.gen_range(2..4);
                    let d = self.dims(r);
                    self.new_input(f, d);
                    return;
                }
                let b = if self.rng.gen_bool(0.3) {
                    let mut perm: Vec<usize> = (0..rank).collect();
                    perm.swap(rank - 2, rank - 1);
                    match self.g.permute(a, &perm) {
                        Ok(b) => b,
                        Err(_) => return,
                    }
                } else {
                    let batch = self.broadcastable(&dims[..rank - 2]);
                    let mut d = batch;
                    d.push(dims[rank - 1].clone());
                    let n = self.dim();
                    d.push(n);
                    let Some(b) = self.new_input(dt, d) else { return };
                    b
                };
                self.add(Op::MatMul, &[a, b]);
            }
            7 => {
                let op = *ReduceOp::ALL.choose(&mut self.rng).unwrap_or(&ReduceOp::Sum);
                let mut axes: Vec<i64> = (0..rank as i64).filter(|_| self.rng.gen_bool(0.5)).collect();
                axes.shuffle(&mut self.rng);
                for ax in &mut axes {
                    if self.rng.gen_bool(0.5) {
                        *ax -= rank as i64;
                    }
                }
                let keepdims = self.rng.gen_bool(0.5);
                self.add(Op::Reduce { op, axes, keepdims }, &[a]);
            }
            8 => {
                let shape = match self.rng.gen_range(0..4) {
                    0 => vec![Shape(dims.clone()).numel()],
                    1 if rank >= 2 => {
                        let i = self.rng.gen_range(0..rank - 1);
                        let mut d = dims.clone();
                        let m = d[i].clone() * d[i + 1].clone();
                        d.splice(i..i + 2, [m]);
                        d
                    }
                    2 => {
                        let mut d = dims.clone();
                        let i = self.rng.gen_range(0..=rank);
                        d.insert(i, Dim::from(1i64));
                        d
                    }
                    _ => {
                        // split a dim divisible by 2
                        let mut d = dims.clone();
                        if let Some(i) = (0..rank).find(|&i| d[i].div_exact(&Dim::from(2i64)).is_some()) {
                            let half = d[i].div_exact(&Dim::from(2i64)).unwrap_or_else(|| Dim::from(1i64));
                            d.splice(i..i + 1, [Dim::from(2i64), half]);
                        }
                        d
                    }
                };
                self.add(Op::Reshape { shape: Shape(shape) }, &[a]);
            }
            9 => {
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.shuffle(&mut self.rng);
                self.add(Op::Permute { perm }, &[a]);
            }
            10 => {
                let lead = self.rng.gen_range(0..3);
                let mut shape = self.dims(lead);
                for d in &dims {
                    if d.is_one() && self.rng.gen_bool(0.5) {
                        let n = self.dim();
                        shape.push(n);
                    } else {
                        shape.push(d.clone());
                    }
                }
                self.add(Op::Broadcast { shape: Shape(shape) }, &[a]);
            }
            11 => {
                if rank == 0 {
                    return;
                }
                let axis = self.axis(rank);
                let ax = axis.rem_euclid(rank as i64) as usize;
                let full = dims[ax].clone();
                let (start, end) = match full.as_const() {
                    Some(c) => {
                        let s = self.rng.gen_range(0..=c);
                        (Dim::from(s), Dim::from(self.rng.gen_range(s..=c)))
                    }
                    None => match self.rng.gen_range(0..3) {
                        0 => (Dim::from(0i64), full.clone()),
                        1 => (Dim::from(1i64), full.clone() - Dim::from(1i64)),
                        _ => {
                            let s = Dim::sym("S");
                            (s.clone(), s + Dim::from(2i64))
                        }
                    },
                };
                self.add(Op::Slice { axis, start, end }, &[a]);
            }
            12 => {
                if rank == 0 {
                    return;
                }
                let axis = self.axis(rank);
                let mut ins = vec![a];
                for _ in 0..self.rng.gen_range(0..3) {
                    let ax = axis.rem_euclid(rank as i64) as usize;
                    let want = dims.clone();
                    let other = self.pick(move |g, v| {
                        g.dtype(v) == dt
                            && g.rank(v) == want.len()
                            && g.dims(v)
                                .iter()
                                .zip(&want)
                                .enumerate()
                                .all(|(i, (x, y))| i == ax || x == y)
                    });
                    ins.push(other.unwrap_or(a));
                }
                self.add(Op::Concat { axis }, &ins);
            }
            13 | 14 => {
                if rank == 0 {
                    return;
                }
                let axis = self.axis(rank);
                let idt = if self.rng.gen_bool(0.5) { DType::I32 } else { DType::I64 };
                let idx = match self.pick(|g, v| g.dtype(v).is_int() && g.rank(v) <= 2) {
                    Some(i) if self.rng.gen_bool(0.5) => i,
                    _ => {
                        let r = self.rng.gen_range(0..3);
                        let d = self.dims(r);
                        let Some(i) = self.new_input(idt, d) else { return };
                        i
                    }
                };
                if self.rng.gen_bool(0.5) {
                    self.add(Op::Gather { axis }, &[a, idx]);
                } else {
                    let ax = axis.rem_euclid(rank as i64) as usize;
                    let mut want = dims[..ax].to_vec();
                    want.extend_from_slice(self.g.dims(idx));
                    want.extend_from_slice(&dims[ax + 1..]);
                    let Some(upd) = self.new_input(dt, want) else { return };
                    self.add(Op::ScatterAdd { axis }, &[a, idx, upd]);
                }
            }
            15 => {
                if rank == 0 {
                    return;
                }
                let axis = self.axis(rank);
                let ax = axis.rem_euclid(rank as i64) as usize;
                let k = match dims[ax].as_const() {
                    Some(c) => self.rng.gen_range(0..=c.max(0)) as usize,
                    None => self.rng.gen_range(1..5),
                };
                self.add(Op::TopK { k, axis }, &[a]);
            }
            16 => {
                let idx = match self.pick(|g, v| g.dtype(v).is_int()) {
                    Some(i) => i,
                    None => {
                        let r = self.rng.gen_range(0..3);
                        let d = self.dims(r);
                        let Some(i) = self.new_input(DType::I64, d) else { return };
                        i
                    }
                };
                let depth = self.rng.gen_range(0..6);
                let dtype = self.dtype();
                self.add(Op::OneHot { depth, dtype }, &[idx]);
            }
            17 => {
                let axis = self.axis(rank);
                let exclusive = self.rng.gen_bool(0.5);
                let reverse = self.rng.gen_bool(0.5);
                self.add(
                    Op::CumSum {
                        axis,
                        exclusive,
                        reverse,
                    },
                    &[a],
                );
            }
            18 => {
                let dtype = self.dtype();
                let r = self.rng.gen_range(0..3);
                let shape: Vec<usize> = (0..r).map(|_| self.rng.gen_range(0..4)).collect();
                let n: usize = shape.iter().product();
                let data = if dtype.is_float() {
                    ConstData::Float((0..n).map(|_| self.f64()).collect())
                } else if dtype.is_int() {
                    ConstData::Int(
                        (0..n)
                            .map(|_| match self.rng.gen_range(0..3) {
                                0 => self.rng.gen(),
                                1 => [i64::MIN, i64::MAX, 0, -1][self.rng.gen_range(0..4)],
                                _ => self.rng.gen_range(-100..100),
                            })
                            .collect(),
                    )
                } else {
                    ConstData::Bool((0..n).map(|_| self.rng.gen()).collect())
                };
                self.add(Op::Constant { dtype, shape, data }, &[]);
            }
            19 => {
                let value = self.f64();
                let dtype = self.dtype();
                let r = self.rng.gen_range(0..4);
                let shape = Shape(self.dims(r));
                self.add(Op::Full { value, dtype, shape }, &[]);
            }
            20 => {
                let dtype = self.dtype();
                let r = self.rng.gen_range(1..4);
                let shape = Shape(self.dims(r));
                let axis = self.axis(r);
                self.add(Op::Iota { dtype, shape, axis }, &[]);
            }
            24 | 25 => self.model_composite(a),
            21 | 22 => {
                let axis = self.axis(rank);
                let c = if self.rng.gen_bool(0.5) {
                    Composite::Softmax { axis }
                } else {
                    Composite::LogSoftmax { axis }
                };
                self.add(Op::Composite(c), &[a]);
            }
            _ => {
                if rank == 0 || !dt.is_float() {
                    return;
                }
                let Some(w) = self.new_input(dt, vec![dims[rank - 1].clone()]) else {
                    return;
                };
                let eps = self.f64();
                self.add(Op::Composite(Composite::RmsNorm { eps }), &[a, w]);
            }
        }
    }
}

/// A random valid graph: `steps` random construction attempts from `seed`, then a few named outputs.
fn random_graph(seed: u64, steps: usize) -> Graph {
    let mut rng = StdRng::seed_from_u64(seed);
    let name = match rng.gen_range(0..3) {
        0 => "g".to_string(),
        1 => "model.v2_x".to_string(),
        _ => "odd \"graph\" ☃".to_string(),
    };
    let mut gen = Gen {
        g: Graph::new(name),
        pool: Vec::new(),
        rng,
        counter: 0,
    };
    for _ in 0..steps {
        gen.step();
    }
    let n_out = gen.rng.gen_range(1..4);
    for _ in 0..n_out {
        if let Some(v) = gen.any() {
            let name = gen.unique_name();
            gen.g.add_output(name, v).expect("fresh output name");
        }
    }
    gen.g
}

fn check_text_round_trip(g: &Graph) -> Result<(), TestCaseError> {
    let s = text::print(g);
    let back = text::parse(&s).map_err(|e| TestCaseError::fail(format!("{e}\n{s}")))?;
    prop_assert_eq!(text::print(&back), s);
    Ok(())
}

fn check_json_round_trip(g: &Graph) -> Result<(), TestCaseError> {
    let s = text::print(g);
    let j = json::to_json(g);
    let back = json::from_json(&j).map_err(|e| TestCaseError::fail(format!("{e}\n{j}")))?;
    prop_assert_eq!(text::print(&back), s);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_graphs_round_trip_through_text(seed in any::<u64>(), steps in 1usize..60) {
        check_text_round_trip(&random_graph(seed, steps))?;
    }

    /// Needs serde_json's `float_roundtrip` feature: without it, serde_json parses some f64 literals one ULP
    /// off (e.g. `-4.9882971271641806e150` reads back as `-4.98829712716418e150`).
    #[test]
    fn random_graphs_round_trip_through_json(seed in any::<u64>(), steps in 1usize..60) {
        check_json_round_trip(&random_graph(seed, steps))?;
    }
}

/// The generator reaches every op and makes non-trivial graphs; otherwise the property above proves little.
#[test]
fn generator_covers_every_op() {
    let mut seen = BTreeSet::new();
    let mut nodes = 0;
    let mut multi_output_refs = 0;
    for seed in 0..300 {
        let g = random_graph(seed, 60);
        nodes += g.node_count();
        for (_, n) in g.nodes() {
            seen.insert(n.op.name());
            multi_output_refs += n.inputs.iter().filter(|v| v.index > 0).count();
        }
        check_text_round_trip(&g).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    let missing: Vec<&str> = Op::all_names().into_iter().filter(|n| !seen.contains(n)).collect();
    assert!(missing.is_empty(), "ops never generated: {missing:?}");
    assert!(nodes > 300 * 20, "graphs too small: {nodes} nodes in 300 graphs");
    assert!(multi_output_refs > 0, "no use of a second output");
}
