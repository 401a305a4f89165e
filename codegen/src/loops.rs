//! Loop IR: the target-neutral form of one kernel's code, between the kernel program and a backend's emitter.
//!
//! A [`LoopKernel`] is what one kernel code (`Kernel::code`) runs: a sequence of [`Step`]s over numbered
//! argument slots (the kernel's input views, its outputs, and scratch buffers of its own). A step is
//! - a [`Phase`]: a parallel loop over a grid of independent items (`for item in 0..grid`, split across
//!   threads by the runtime), each running a body of statements ([`Stmt`]): sequential loops, conditionals,
//!   stores to arguments and to thread-local arrays, mutable scalars and reductions;
//! - a [`GemmStep`]: a (batched, strided) matrix product `C = A·B`, run by the backend's GEMM;
//! - a [`GroupedGemmStep`]: the per-expert products of `grouped_matmul`, whose row groups are known only at
//!   run time.
//!
//! Expressions live in a hash-consed [`Pool`]: structurally equal expressions share one id, so a fused body
//! that reads a value twice builds it once. Every expression has a compute type ([`Scalar`]): floats compute in
//! f32 (loads convert from the storage dtype, stores round back to it), integers in i64, bools as bools.
//! Dimensions that are not constants are kernel **parameters** ([`LoopKernel::params`]), evaluated by the
//! runtime from the bound symbols once per binding; constants stay literals, so a loop over a head of 64 is a
//! loop of 64 the backend can unroll and vectorise.
//!
//! Errors a kernel finds at run time (an index out of range, an integer division by zero) are reported through
//! [`Expr::Checked`]: the kernel records the check's number and the offending value, and the runtime names the
//! kernel and says what was wrong ([`LoopKernel::checks`]).

use fulgur_ir::{BinaryOp, CmpOp, DType, Dim, UnaryOp};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;

/// An expression's id in its kernel's [`Pool`].
pub type E = u32;

/// Compute types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scalar {
    F32,
    I64,
    Bool,
}

impl Scalar {
    /// The compute type of a storage dtype.
    pub fn of(d: DType) -> Scalar {
        if d.is_float() {
            Scalar::F32
        } else if d.is_int() {
            Scalar::I64
        } else {
            Scalar::Bool
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Scalar::F32 => "f32",
            Scalar::I64 => "i64",
            Scalar::Bool => "bool",
        }
    }
}

/// Logical connectives on bools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Logic {
    And,
    Or,
}

/// An expression.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Expr {
    /// An f32 literal, by its bits.
    F(u32),
    I(i64),
    B(bool),
    /// A loop variable (i64).
    Var(u32),
    /// A kernel parameter (i64): [`LoopKernel::params`]`[p]` evaluated at the bound symbols.
    Param(u32),
    /// Element `index` of argument slot `arg`, stored as `dtype`, converted to its compute type.
    Load {
        arg: u32,
        dtype: DType,
        index: E,
    },
    /// Element `index` of thread-local array `local`.
    LoadLocal {
        local: u32,
        index: E,
    },
    /// Element `index` of constant table `table`.
    LoadConst {
        table: u32,
        index: E,
    },
    /// The current value of mutable variable `var`.
    Get(u32),
    Un(UnaryOp, E),
    /// Integer division truncates; integer division by zero must be excluded by a [`Expr::Checked`] divisor.
    Bin(BinaryOp, E, E),
    /// Integer remainder (the sign of the dividend), for index arithmetic.
    Rem(E, E),
    Cmp(CmpOp, E, E),
    Logic(Logic, E, E),
    Not(E),
    /// Both branches evaluated.
    Select(E, E, E),
    /// Only the branch taken is evaluated (a guarded load).
    Cond(E, E, E),
    /// A conversion of compute types (float → int saturates, NaN → 0; to bool: `!= 0`).
    Cast(Scalar, E),
    /// An f32 rounded to a narrower float dtype and back (`cast` to bf16 or f16 inside a kernel).
    Round(DType, E),
    /// `index` if `0 <= index < bound`; otherwise the kernel records check `check` with the value and yields 0.
    Checked {
        index: E,
        bound: E,
        check: u32,
    },
}

/// Expressions, hash-consed, each with its compute type.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Pool {
    nodes: Vec<(Expr, Scalar)>,
    #[serde(skip)]
    map: HashMap<Expr, E>,
}

impl Pool {
    /// Whether any expression loads from slot `arg`.
    pub fn loads_slot(&self, arg: u32) -> bool {
        self.nodes
            .iter()
            .any(|(x, _)| matches!(x, Expr::Load { arg: a, .. } if *a == arg))
    }
    pub fn get(&self, e: E) -> &Expr {
        &self.nodes[e as usize].0
    }
    pub fn ty(&self, e: E) -> Scalar {
        self.nodes[e as usize].1
    }
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Adds `x` (or finds it), after constant folding and the algebraic identities of index arithmetic.
    pub fn add(&mut self, x: Expr) -> E {
        let x = self.fold(x);
        if let Some(&id) = self.map.get(&x) {
            return id;
        }
        let ty = self.type_of(&x);
        let id = self.nodes.len() as E;
        self.nodes.push((x.clone(), ty));
        self.map.insert(x, id);
        id
    }

    fn type_of(&self, x: &Expr) -> Scalar {
        match x {
            Expr::F(_) => Scalar::F32,
            Expr::I(_) | Expr::Var(_) | Expr::Param(_) | Expr::Rem(..) | Expr::Checked { .. } => Scalar::I64,
            Expr::B(_) | Expr::Cmp(..) | Expr::Logic(..) | Expr::Not(_) => Scalar::Bool,
            Expr::Load { dtype, .. } => Scalar::of(*dtype),
            Expr::LoadLocal { .. } | Expr::LoadConst { .. } | Expr::Get(_) => {
                unreachable!("typed by the kernel: use Pool::add_typed")
            }
            Expr::Un(_, a) | Expr::Bin(_, a, _) => self.ty(*a),
            Expr::Select(_, a, _) | Expr::Cond(_, a, _) => self.ty(*a),
            Expr::Cast(s, _) => *s,
            Expr::Round(..) => Scalar::F32,
        }
    }

    /// Adds an expression whose type the pool cannot see (a local, a constant table, a mutable).
    pub fn add_typed(&mut self, x: Expr, ty: Scalar) -> E {
        if let Some(&id) = self.map.get(&x) {
            return id;
        }
        let id = self.nodes.len() as E;
        self.nodes.push((x.clone(), ty));
        self.map.insert(x, id);
        id
    }

    fn int(&self, e: E) -> Option<i64> {
        match self.get(e) {
            Expr::I(i) => Some(*i),
            _ => None,
        }
    }

    /// `q + r` when it puts back together a value its quotient and remainder by `d` were taken from:
    /// `(x / d) * d + x % d` is `x`, and `(x / d) * (d * s) + (x % d) * s` is `x * s` (a coordinate split
    /// off a flat index, then the index of a contiguous view at it), for every `x` and nonzero `d` (C's
    /// truncating division). The stride `d * s` is recognised as the pool's product of the two (or, all
    /// constants, by value).
    fn recombined(&self, q: E, r: E) -> Option<Expr> {
        let Expr::Bin(BinaryOp::Mul, qd, m) = *self.get(q) else {
            return None;
        };
        let (x, d, s) = match *self.get(r) {
            Expr::Rem(x, d) => (x, d, None),
            Expr::Bin(BinaryOp::Mul, r0, s) => match *self.get(r0) {
                Expr::Rem(x, d) => (x, d, Some(s)),
                _ => return None,
            },
            _ => return None,
        };
        // the quotient's factors in either order (`x / d` is in the pool if it is one of them)
        let div = *self.map.get(&Expr::Bin(BinaryOp::Div, x, d))?;
        let m = if qd == div {
            m
        } else if m == div {
            qd
        } else {
            return None;
        };
        match s {
            None => (m == d).then(|| self.get(x).clone()),
            Some(s) => {
                let product = |a: E, b: E| self.map.get(&Expr::Bin(BinaryOp::Mul, a, b)).copied();
                let same = product(d, s) == Some(m) || product(s, d) == Some(m) || self.product_is(d, s, m);
                same.then_some(Expr::Bin(BinaryOp::Mul, x, s))
            }
        }
    }

    /// `e` as a term times an integer: `(Some(a), c)` for `a · c` or `c · a`, `(None, c)` for the literal `c`,
    /// `(Some(e), 1)` otherwise.
    fn scaled(&self, e: E) -> (Option<E>, i64) {
        match *self.get(e) {
            Expr::I(c) => (None, c),
            Expr::Bin(BinaryOp::Mul, a, b) => match (self.int(a), self.int(b)) {
                (_, Some(c)) => (Some(a), c),
                (Some(c), _) => (Some(b), c),
                _ => (Some(e), 1),
            },
            _ => (Some(e), 1),
        }
    }

    /// Whether `m` is `d · s` by their integer factors, at most one of the two having a term besides its
    /// factor (`(T · 6144)` is `16 · (T · 384)`).
    fn product_is(&self, d: E, s: E, m: E) -> bool {
        let ((bd, cd), (bs, cs), (bm, cm)) = (self.scaled(d), self.scaled(s), self.scaled(m));
        let base = match (bd, bs) {
            (None, b) | (b, None) => b,
            _ => return false,
        };
        base == bm && cd.checked_mul(cs) == Some(cm)
    }

    fn fold(&mut self, x: Expr) -> Expr {
        match x {
            Expr::Bin(op, a, b) if self.ty(a) == Scalar::I64 => match (op, self.int(a), self.int(b)) {
                (_, Some(p), Some(q)) => match op.apply_i(p, q) {
                    Some(v) => Expr::I(v),
                    None => Expr::Bin(op, a, b),
                },
                (BinaryOp::Add, Some(0), _) => self.get(b).clone(),
                (BinaryOp::Add | BinaryOp::Sub, _, Some(0)) => self.get(a).clone(),
                (BinaryOp::Mul, Some(1), _) => self.get(b).clone(),
                (BinaryOp::Mul | BinaryOp::Div, _, Some(1)) => self.get(a).clone(),
                (BinaryOp::Mul, Some(0), _) | (BinaryOp::Mul, _, Some(0)) => Expr::I(0),
                (BinaryOp::Add, _, _) => match self.recombined(a, b).or_else(|| self.recombined(b, a)) {
                    Some(x) => x,
                    None => Expr::Bin(op, a, b),
                },
                _ => Expr::Bin(op, a, b),
            },
            Expr::Rem(a, b) => match (self.int(a), self.int(b)) {
                (Some(p), Some(q)) if q != 0 => Expr::I(p % q),
                (_, Some(1)) => Expr::I(0),
                (Some(0), _) => Expr::I(0),
                _ => Expr::Rem(a, b),
            },
            Expr::Select(_, a, b) | Expr::Cond(_, a, b) if a == b => self.get(a).clone(),
            Expr::Select(c, a, b) | Expr::Cond(c, a, b) => match self.get(c) {
                Expr::B(true) => self.get(a).clone(),
                Expr::B(false) => self.get(b).clone(),
                _ => x,
            },
            Expr::Cast(s, a) if self.ty(a) == s => self.get(a).clone(),
            Expr::Cast(Scalar::F32, a) => match self.int(a) {
                Some(i) => Expr::F((i as f32).to_bits()),
                None => x,
            },
            Expr::Cmp(op, a, b) if self.ty(a) == Scalar::I64 => match (self.int(a), self.int(b)) {
                (Some(p), Some(q)) => Expr::B(op.apply(p, q)),
                _ => x,
            },
            Expr::Logic(l, a, b) => match (l, self.get(a), self.get(b)) {
                (Logic::And, Expr::B(true), _) => self.get(b).clone(),
                (Logic::And, _, Expr::B(true)) => self.get(a).clone(),
                (Logic::And, Expr::B(false), _) | (Logic::And, _, Expr::B(false)) => Expr::B(false),
                (Logic::Or, Expr::B(false), _) => self.get(b).clone(),
                (Logic::Or, _, Expr::B(false)) => self.get(a).clone(),
                (Logic::Or, Expr::B(true), _) | (Logic::Or, _, Expr::B(true)) => Expr::B(true),
                _ => x,
            },
            x => x,
        }
    }

    // builders
    pub fn f(&mut self, x: f32) -> E {
        self.add(Expr::F(x.to_bits()))
    }
    pub fn i(&mut self, x: i64) -> E {
        self.add(Expr::I(x))
    }
    pub fn b(&mut self, x: bool) -> E {
        self.add(Expr::B(x))
    }
    pub fn var(&mut self, v: u32) -> E {
        self.add(Expr::Var(v))
    }
    pub fn bin(&mut self, op: BinaryOp, a: E, b: E) -> E {
        self.add(Expr::Bin(op, a, b))
    }
    pub fn addi(&mut self, a: E, b: E) -> E {
        self.bin(BinaryOp::Add, a, b)
    }
    pub fn sub(&mut self, a: E, b: E) -> E {
        self.bin(BinaryOp::Sub, a, b)
    }
    pub fn mul(&mut self, a: E, b: E) -> E {
        self.bin(BinaryOp::Mul, a, b)
    }
    pub fn div(&mut self, a: E, b: E) -> E {
        self.bin(BinaryOp::Div, a, b)
    }
    pub fn rem(&mut self, a: E, b: E) -> E {
        self.add(Expr::Rem(a, b))
    }
    pub fn max(&mut self, a: E, b: E) -> E {
        self.bin(BinaryOp::Max, a, b)
    }
    pub fn min(&mut self, a: E, b: E) -> E {
        self.bin(BinaryOp::Min, a, b)
    }
    pub fn un(&mut self, op: UnaryOp, a: E) -> E {
        self.add(Expr::Un(op, a))
    }
    pub fn cmp(&mut self, op: CmpOp, a: E, b: E) -> E {
        self.add(Expr::Cmp(op, a, b))
    }
    pub fn and(&mut self, a: E, b: E) -> E {
        self.add(Expr::Logic(Logic::And, a, b))
    }
    pub fn or(&mut self, a: E, b: E) -> E {
        self.add(Expr::Logic(Logic::Or, a, b))
    }
    pub fn not(&mut self, a: E) -> E {
        self.add(Expr::Not(a))
    }
    pub fn select(&mut self, c: E, a: E, b: E) -> E {
        self.add(Expr::Select(c, a, b))
    }
    pub fn cond(&mut self, c: E, a: E, b: E) -> E {
        self.add(Expr::Cond(c, a, b))
    }
    pub fn cast(&mut self, s: Scalar, a: E) -> E {
        self.add(Expr::Cast(s, a))
    }
    pub fn load(&mut self, arg: u32, dtype: DType, index: E) -> E {
        self.add(Expr::Load { arg, dtype, index })
    }
    /// `x` is NaN.
    pub fn is_nan(&mut self, x: E) -> E {
        self.cmp(CmpOp::Ne, x, x)
    }
    /// `Σ idx[i] · strides[i] + offset`.
    pub fn linear(&mut self, idx: &[E], strides: &[E], offset: E) -> E {
        let mut acc = offset;
        for (&i, &s) in idx.iter().zip(strides) {
            let t = self.mul(i, s);
            acc = self.addi(acc, t);
        }
        acc
    }
}

/// How a mutable variable is updated by [`Stmt::Accumulate`] (reassociable: a backend may reorder the
/// updates of one loop, as every parallel reduction does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Acc {
    Add,
    Max,
    Min,
}

/// A statement. Expressions are evaluated where their statement runs: an expression reading a local array,
/// a mutable variable or an argument the phase stores to sees the value at that statement, so a value needed
/// after a store that changes its inputs must be kept in a mutable variable first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Stmt {
    /// `for var in lo..hi { body }` (i64, step 1, sequential).
    For {
        var: u32,
        lo: E,
        hi: E,
        body: Vec<Stmt>,
    },
    If {
        cond: E,
        then: Vec<Stmt>,
        els: Vec<Stmt>,
    },
    /// Element `index` of argument `arg` (stored as `dtype`) = `value`, rounded to the dtype. Consecutive
    /// stores are simultaneous: every one's place and value is computed before any of them stores (a kernel of
    /// merged siblings stores in place what a sibling reads, `program::merge_siblings`).
    Store {
        arg: u32,
        dtype: DType,
        index: E,
        value: E,
    },
    StoreLocal {
        local: u32,
        index: E,
        value: E,
    },
    /// Mutable variable `var` = `value`.
    Set {
        var: u32,
        value: E,
    },
    /// `var = var ⊕ value`.
    Accumulate {
        var: u32,
        op: Acc,
        value: E,
    },
}

/// A parallel loop: `for item in 0..grid { body }`, the items independent of one another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    /// The number of items (a kernel expression of constants and parameters).
    pub grid: E,
    /// The loop variable holding the item.
    pub item: u32,
    pub body: Vec<Stmt>,
    /// A rough count of operations per item, for the runtime's choice of how to split the grid.
    pub item_cost: E,
}

/// One operand of a [`GemmStep`]: a strided matrix in an argument slot (strides in elements).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Operand {
    pub arg: u32,
    pub dtype: DType,
    pub offset: E,
    /// Stride between rows and between columns.
    pub rs: E,
    pub cs: E,
}

/// `C[b] = A[b] · B[b]` for every batch index `b`: `A [m, k]`, `B [k, n]`, `C [m, n]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GemmStep {
    pub m: E,
    pub n: E,
    pub k: E,
    /// Batch axes: extent and the stride of each of A, B, C along it (0 where broadcast).
    pub batch: Vec<[E; 4]>,
    pub a: Operand,
    pub b: Operand,
    pub c: Operand,
}

/// `grouped_matmul`: rows of `x [m, k]` in consecutive groups of `counts[e]` rows, group `e` multiplied by
/// `w[e] [k, n]` into `out [m, n]`.
///
/// With `depth` (`grouped_matmul_wgrad`), the groups split the depth instead: `x` is `A [m, k]`, `w` is
/// `B [k, n]`, and group `e`, columns `start..start + counts[e]` of `A` and the same rows of `B`, gives
/// `out[e] = A_e · B_e` (`[m, n]`, `e · expert_stride` past `out`'s offset). An empty group's `out[e]` is not
/// written (the kernel zeroes `out` first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupedGemmStep {
    #[serde(default)]
    pub depth: bool,
    pub m: E,
    pub n: E,
    pub k: E,
    pub experts: E,
    pub x: Operand,
    /// `w[e]` starts `e · expert_stride` past the operand's offset.
    pub w: Operand,
    /// Between consecutive experts' `w[e]` (or, with `depth`, `out[e]`).
    pub expert_stride: E,
    pub out: Operand,
    pub counts_arg: u32,
    pub counts_dtype: DType,
    pub counts_offset: E,
    pub counts_stride: E,
}

/// One step of a kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Step {
    Phase(Phase),
    Gemm(GemmStep),
    GroupedGemm(GroupedGemmStep),
    /// A rank's part of a collective (`on_rank`), run by the program's collective transport on the host: its
    /// inputs are the kernel's inputs, its outputs the kernel's outputs (contiguous). No generated code.
    Collective(fulgur_ir::Op),
}

/// What an argument slot is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slot {
    /// The kernel's input `i` (its buffer's base; the view's offset and strides are in the code).
    Input(usize),
    Output(usize),
    /// The kernel's scratch buffer `i`.
    Scratch(usize),
}

/// A constant table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Table {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A variable: a loop variable, or a mutable scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VarDecl {
    pub ty: Scalar,
    pub mutable: bool,
}

/// A thread-local array (its length a constant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Local {
    pub ty: Scalar,
    pub len: usize,
}

/// The code of one kernel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoopKernel {
    /// What the code computes (the kernel's op, for reports).
    pub name: String,
    pub slots: Vec<Slot>,
    /// Scratch buffers: dtype and elements (a symbolic count).
    pub scratch: Vec<(DType, Dim)>,
    /// Dimensions evaluated at the bound symbols, read by [`Expr::Param`].
    pub params: Vec<Dim>,
    pub vars: Vec<VarDecl>,
    pub locals: Vec<Local>,
    pub tables: Vec<Table>,
    pub checks: Vec<String>,
    pub pool: Pool,
    pub steps: Vec<Step>,
}

impl LoopKernel {
    pub fn new(name: impl Into<String>) -> LoopKernel {
        LoopKernel {
            name: name.into(),
            ..Default::default()
        }
    }

    /// The slot of `s`, added if new.
    pub fn slot(&mut self, s: Slot) -> u32 {
        match self.slots.iter().position(|x| *x == s) {
            Some(i) => i as u32,
            None => {
                self.slots.push(s);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// A new scratch buffer and its slot.
    pub fn scratch(&mut self, dtype: DType, elements: Dim) -> u32 {
        self.scratch.push((dtype, elements));
        self.slot(Slot::Scratch(self.scratch.len() - 1))
    }

    /// `d` as an expression: a literal when constant, else a parameter.
    pub fn dim(&mut self, d: &Dim) -> E {
        if let Some(c) = d.as_const() {
            return self.pool.i(c);
        }
        // an integer factor stays visible (`T*2048` is the parameter `T` times 2048), so index arithmetic
        // over a contiguous view folds (`Pool::fold`: `(x / T) * (T * 2048) + (x % T) * 2048` is `x * 2048`)
        let c = d.content();
        if c > 1 {
            if let Some(q) = d.div_exact(&Dim::from(c)) {
                let q = self.dim(&q);
                let c = self.pool.i(c);
                return self.pool.mul(q, c);
            }
        }
        let p = match self.params.iter().position(|x| x == d) {
            Some(p) => p,
            None => {
                self.params.push(d.clone());
                self.params.len() - 1
            }
        };
        self.pool.add(Expr::Param(p as u32))
    }

    pub fn dims(&mut self, ds: &[Dim]) -> Vec<E> {
        ds.iter().map(|d| self.dim(d)).collect()
    }

    /// A new loop variable and its expression.
    pub fn loop_var(&mut self) -> (u32, E) {
        self.vars.push(VarDecl {
            ty: Scalar::I64,
            mutable: false,
        });
        let v = (self.vars.len() - 1) as u32;
        (v, self.pool.var(v))
    }

    /// A new mutable variable and the expression reading it.
    pub fn mutable(&mut self, ty: Scalar) -> (u32, E) {
        self.vars.push(VarDecl { ty, mutable: true });
        let v = (self.vars.len() - 1) as u32;
        (v, self.pool.add_typed(Expr::Get(v), ty))
    }

    /// A new thread-local array.
    pub fn local(&mut self, ty: Scalar, len: usize) -> u32 {
        self.locals.push(Local { ty, len: len.max(1) });
        (self.locals.len() - 1) as u32
    }

    pub fn load_local(&mut self, local: u32, index: E) -> E {
        let ty = self.locals[local as usize].ty;
        self.pool.add_typed(Expr::LoadLocal { local, index }, ty)
    }

    /// A constant table and the expression reading element `index` of it.
    pub fn table(&mut self, t: Table, index: E) -> E {
        let ty = match t {
            Table::F32(_) => Scalar::F32,
            Table::I64(_) => Scalar::I64,
        };
        let id = match self.tables.iter().position(|x| *x == t) {
            Some(i) => i,
            None => {
                self.tables.push(t);
                self.tables.len() - 1
            }
        };
        self.pool.add_typed(
            Expr::LoadConst {
                table: id as u32,
                index,
            },
            ty,
        )
    }

    /// `index` checked against `[0, bound)`; `what` says what the index is, for the error.
    pub fn checked(&mut self, index: E, bound: E, what: String) -> E {
        let check = match self.checks.iter().position(|c| *c == what) {
            Some(i) => i,
            None => {
                self.checks.push(what);
                self.checks.len() - 1
            }
        };
        self.pool.add(Expr::Checked {
            index,
            bound,
            check: check as u32,
        })
    }

    /// The kernel as text, for dumps and artifacts.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "kernel {}", self.name);
        for (i, slot) in self.slots.iter().enumerate() {
            let _ = writeln!(s, "  slot {i}: {slot:?}");
        }
        for (i, (d, n)) in self.scratch.iter().enumerate() {
            let _ = writeln!(s, "  scratch {i}: {d}[{n}]");
        }
        for (i, p) in self.params.iter().enumerate() {
            let _ = writeln!(s, "  p{i} = {p}");
        }
        for (i, l) in self.locals.iter().enumerate() {
            let _ = writeln!(s, "  local l{i}: {}[{}]", l.ty.name(), l.len);
        }
        for (i, c) in self.checks.iter().enumerate() {
            let _ = writeln!(s, "  check {i}: {c}");
        }
        for step in &self.steps {
            match step {
                Step::Phase(p) => {
                    let _ = writeln!(
                        s,
                        "  phase {}: for v{} in 0..{} (parallel)",
                        p.name,
                        p.item,
                        self.expr(p.grid)
                    );
                    self.stmts(&mut s, &p.body, 2);
                }
                Step::Gemm(g) => {
                    let _ = writeln!(
                        s,
                        "  gemm m={} n={} k={} batch={} a=slot{}+{} b=slot{}+{} c=slot{}+{}",
                        self.expr(g.m),
                        self.expr(g.n),
                        self.expr(g.k),
                        g.batch.len(),
                        g.a.arg,
                        self.expr(g.a.offset),
                        g.b.arg,
                        self.expr(g.b.offset),
                        g.c.arg,
                        self.expr(g.c.offset)
                    );
                }
                Step::Collective(op) => {
                    let _ = writeln!(s, "  collective {} (host transport)", op.name());
                }
                Step::GroupedGemm(g) => {
                    let _ = writeln!(
                        s,
                        "  grouped gemm m={} n={} k={} experts={} counts=slot{}",
                        self.expr(g.m),
                        self.expr(g.n),
                        self.expr(g.k),
                        self.expr(g.experts),
                        g.counts_arg
                    );
                }
            }
        }
        s
    }

    fn stmts(&self, s: &mut String, body: &[Stmt], depth: usize) {
        let pad = "  ".repeat(depth);
        for st in body {
            match st {
                Stmt::For { var, lo, hi, body } => {
                    let _ = writeln!(s, "{pad}for v{var} in {}..{}", self.expr(*lo), self.expr(*hi));
                    self.stmts(s, body, depth + 1);
                }
                Stmt::If { cond, then, els } => {
                    let _ = writeln!(s, "{pad}if {}", self.expr(*cond));
                    self.stmts(s, then, depth + 1);
                    if !els.is_empty() {
                        let _ = writeln!(s, "{pad}else");
                        self.stmts(s, els, depth + 1);
                    }
                }
                Stmt::Store {
                    arg,
                    dtype,
                    index,
                    value,
                } => {
                    let _ = writeln!(
                        s,
                        "{pad}slot{arg}:{dtype}[{}] = {}",
                        self.expr(*index),
                        self.expr(*value)
                    );
                }
                Stmt::StoreLocal { local, index, value } => {
                    let _ = writeln!(s, "{pad}l{local}[{}] = {}", self.expr(*index), self.expr(*value));
                }
                Stmt::Set { var, value } => {
                    let _ = writeln!(s, "{pad}m{var} = {}", self.expr(*value));
                }
                Stmt::Accumulate { var, op, value } => {
                    let _ = writeln!(s, "{pad}m{var} {op:?}= {}", self.expr(*value));
                }
            }
        }
    }

    /// An expression as text (deep expressions are elided).
    pub fn expr(&self, e: E) -> String {
        let mut s = String::new();
        self.expr_into(&mut s, e, 0);
        s
    }

    fn expr_into(&self, s: &mut String, e: E, depth: usize) {
        if depth > 12 {
            s.push('…');
            return;
        }
        let sub = |s: &mut String, x: E| self.expr_into(s, x, depth + 1);
        match self.pool.get(e) {
            Expr::F(b) => {
                let _ = write!(s, "{:?}", f32::from_bits(*b));
            }
            Expr::I(i) => {
                let _ = write!(s, "{i}");
            }
            Expr::B(b) => {
                let _ = write!(s, "{b}");
            }
            Expr::Var(v) => {
                let _ = write!(s, "v{v}");
            }
            Expr::Param(p) => {
                let _ = write!(s, "p{p}");
            }
            Expr::Get(v) => {
                let _ = write!(s, "m{v}");
            }
            Expr::Load { arg, dtype, index } => {
                let _ = write!(s, "slot{arg}:{dtype}[");
                sub(s, *index);
                s.push(']');
            }
            Expr::LoadLocal { local, index } => {
                let _ = write!(s, "l{local}[");
                sub(s, *index);
                s.push(']');
            }
            Expr::LoadConst { table, index } => {
                let _ = write!(s, "t{table}[");
                sub(s, *index);
                s.push(']');
            }
            Expr::Un(op, a) => {
                let _ = write!(s, "{}(", op.name());
                sub(s, *a);
                s.push(')');
            }
            Expr::Bin(op, a, b) => {
                let sym = match op {
                    BinaryOp::Add => Some("+"),
                    BinaryOp::Sub => Some("-"),
                    BinaryOp::Mul => Some("*"),
                    BinaryOp::Div => Some("/"),
                    _ => None,
                };
                match sym {
                    Some(o) => {
                        s.push('(');
                        sub(s, *a);
                        let _ = write!(s, " {o} ");
                        sub(s, *b);
                        s.push(')');
                    }
                    None => {
                        let _ = write!(s, "{}(", op.name());
                        sub(s, *a);
                        s.push_str(", ");
                        sub(s, *b);
                        s.push(')');
                    }
                }
            }
            Expr::Rem(a, b) => {
                s.push('(');
                sub(s, *a);
                s.push_str(" % ");
                sub(s, *b);
                s.push(')');
            }
            Expr::Cmp(op, a, b) => {
                let _ = write!(s, "{}(", op.name());
                sub(s, *a);
                s.push_str(", ");
                sub(s, *b);
                s.push(')');
            }
            Expr::Logic(l, a, b) => {
                s.push('(');
                sub(s, *a);
                s.push_str(if *l == Logic::And { " && " } else { " || " });
                sub(s, *b);
                s.push(')');
            }
            Expr::Not(a) => {
                s.push('!');
                sub(s, *a);
            }
            Expr::Select(c, a, b) | Expr::Cond(c, a, b) => {
                s.push_str(if matches!(self.pool.get(e), Expr::Select(..)) {
                    "select("
                } else {
                    "cond("
                });
                sub(s, *c);
                s.push_str(", ");
                sub(s, *a);
                s.push_str(", ");
                sub(s, *b);
                s.push(')');
            }
            Expr::Cast(t, a) => {
                let _ = write!(s, "{}(", t.name());
                sub(s, *a);
                s.push(')');
            }
            Expr::Round(d, a) => {
                let _ = write!(s, "round_{d}(");
                sub(s, *a);
                s.push(')');
            }
            Expr::Checked { index, bound, check } => {
                let _ = write!(s, "checked{check}(");
                sub(s, *index);
                s.push_str(" < ");
                sub(s, *bound);
                s.push(')');
            }
        }
    }
}

impl Pool {
    /// The value of an expression of literals and parameters (grid sizes, strides, GEMM shapes), on the host;
    /// `None` when it reads anything else.
    pub fn eval(&self, e: E, params: &[i64]) -> Option<i64> {
        Some(match self.get(e) {
            Expr::I(i) => *i,
            Expr::Param(p) => *params.get(*p as usize)?,
            Expr::Bin(op, a, b) => {
                let (x, y) = (self.eval(*a, params)?, self.eval(*b, params)?);
                op.apply_i(x, y)?
            }
            Expr::Rem(a, b) => {
                let (x, y) = (self.eval(*a, params)?, self.eval(*b, params)?);
                x.checked_rem(y)?
            }
            _ => return None,
        })
    }
}
