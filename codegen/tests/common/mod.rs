//! What the CUDA emission tests share.
use fulgur_codegen::cuda::emit_program;
use fulgur_codegen::kernels::{build_program_for, Target};
use fulgur_codegen::program::lower;

/// The CUDA source of the first step kernel of `g` (lowered unoptimized) whose op summary starts with `op`.
pub fn source_of(g: &fulgur_ir::Graph, op: &str) -> String {
    source_in(&lower(g).unwrap(), op)
}

/// The CUDA source of the first step kernel of `p` whose op summary starts with `op`.
pub fn source_in(p: &fulgur_codegen::program::KernelProgram, op: &str) -> String {
    let mut kernels = build_program_for(p, Target::Cuda).unwrap();
    let cuda = emit_program(p, &mut kernels).unwrap();
    let k = p
        .step
        .iter()
        .find(|k| fulgur_codegen::program::op_summary(&k.op).starts_with(op))
        .unwrap_or_else(|| panic!("no {op} kernel"));
    cuda[k.code].source.clone()
}
