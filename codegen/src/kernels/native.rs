//! Native loop forms of the composites whose decomposition is not how they should run.

use super::{Built, View};
use crate::loops::{GroupedGemmStep, Operand, Phase, Slot, Step, Stmt};
use crate::program::Kernel;
use crate::CodegenError;
use fulgur_ir::{BinaryOp, Composite, Op, UnaryOp};

/// Builds `k` natively when its op has a native form; `Ok(false)` when it does not.
pub(crate) fn build(k: &Kernel, b: &mut Built) -> Result<bool, CodegenError> {
    match &k.op {
        Op::Composite(Composite::GroupedMatmul { swiglu }) => grouped_matmul(k, b, *swiglu).map(|_| true),
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
