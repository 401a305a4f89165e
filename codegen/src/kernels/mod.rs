//! From the kernel program to loop IR: one [`LoopKernel`] per kernel code.
//!
//! Most kernels go through the generic compiler ([`generic`]): the op as the primitive graph it means,
//! elementwise values computed where they are read, reductions, scans, top-k, scatters and matmuls as steps of
//! their own. The composites whose decomposition is not how they should run get a native form ([`native`]):
//! `grouped_matmul` (its decomposition gathers a weight matrix per row), `lightning_attention` and
//! `lightning_layer` (the block recurrence with the state kept per (batch, head)), `flash_attention[_rope]`
//! (online softmax over key blocks, never the score matrix), `moe_dispatch` (a counting sort).

pub(crate) mod generic;
pub(crate) mod native;

use crate::loops::{LoopKernel, Pool, E};
use crate::program::{is_row_major, row_major, Kernel, KernelProgram, TensorRef};
use crate::CodegenError;
use fulgur_ir::{DType, Dim};

/// A strided view of an argument slot.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct View {
    pub slot: u32,
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub strides: Vec<Dim>,
    pub offset: Dim,
}

impl View {
    pub fn of(slot: u32, t: &TensorRef) -> View {
        View {
            slot,
            dtype: t.dtype,
            shape: t.shape.clone(),
            strides: t.strides.clone(),
            offset: t.offset.clone(),
        }
    }

    pub fn contiguous(slot: u32, dtype: DType, dims: &[Dim]) -> View {
        View {
            slot,
            dtype,
            shape: dims.to_vec(),
            strides: row_major(dims),
            offset: Dim::from(0),
        }
    }

    pub fn is_contiguous(&self) -> bool {
        is_row_major(&self.shape, &self.strides)
    }

    /// The element index of `idx`.
    pub fn index(&self, lk: &mut LoopKernel, idx: &[E]) -> E {
        let st = lk.dims(&self.strides);
        let off = lk.dim(&self.offset);
        lk.pool.linear(idx, &st, off)
    }

    /// The element at `idx`.
    pub fn load(&self, lk: &mut LoopKernel, idx: &[E]) -> E {
        let i = self.index(lk, idx);
        lk.pool.load(self.slot, self.dtype, i)
    }
}

/// `item` split into coordinates of `dims` (row-major; the first coordinate is not reduced modulo its dim).
pub(crate) fn delinearize(p: &mut Pool, item: E, dims: &[E]) -> Vec<E> {
    let n = dims.len();
    let mut out = vec![0; n];
    let mut rest = item;
    for a in (0..n).rev() {
        if a == 0 {
            out[0] = rest;
        } else {
            out[a] = p.rem(rest, dims[a]);
            rest = p.div(rest, dims[a]);
        }
    }
    out
}

/// The backend a loop form is shaped for. The loop IR means the same on both; what differs is how work is cut
/// into items (a reduction with too few outputs to fill a GPU is split into chunks on CUDA, kept whole on the
/// CPU, whose threads the outputs already fill).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Target {
    #[default]
    Cpu,
    Cuda,
}

/// What building a kernel fills in.
pub(crate) struct Built {
    pub lk: LoopKernel,
    pub target: Target,
}

/// The loop form of kernel `k` for the CPU.
pub fn build(k: &Kernel) -> Result<LoopKernel, CodegenError> {
    build_for(k, Target::Cpu)
}

/// The loop form of kernel `k` for `target`.
pub fn build_for(k: &Kernel, target: Target) -> Result<LoopKernel, CodegenError> {
    let mut built = Built {
        lk: LoopKernel::new(crate::program::op_summary(&k.op)),
        target,
    };
    if !native::build(k, &mut built)? {
        generic::build(k, &mut built)?;
    }
    Ok(built.lk)
}

/// The loop form of every code of `p` for the CPU, by code.
pub fn build_program(p: &KernelProgram) -> Result<Vec<LoopKernel>, CodegenError> {
    build_program_for(p, Target::Cpu)
}

/// The loop form of every code of `p` for `target`, by code.
pub fn build_program_for(p: &KernelProgram, target: Target) -> Result<Vec<LoopKernel>, CodegenError> {
    let mut out: Vec<Option<LoopKernel>> = vec![None; p.codes];
    for k in p.prepare.iter().chain(&p.step) {
        if out[k.code].is_none() {
            out[k.code] = Some(build_for(k, target).map_err(|e| match e {
                CodegenError::Options(m) if !m.starts_with("kernel ") => {
                    CodegenError::Options(format!("kernel k{} ({}): {m}", k.id, k.name))
                }
                e => e,
            })?);
        }
    }
    Ok(out.into_iter().map(|k| k.unwrap_or_default()).collect())
}
