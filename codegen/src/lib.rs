//! # fulgur-codegen
//!
//! Turns an optimized graph into an executable: grouping into kernels, schedule and streams, memory plan;
//! CUDA C++ emission compiled by NVRTC (with an on-disk cache keyed by source hash and architecture); LLVM IR
//! emission through `inkwell` for the CPU backend (cargo feature `llvm`); the parallelism-plan and executable
//! artifacts. Depends on `fulgur-ir` and `fulgur-passes`.
//!
//! Status: not yet built. The CPU and CUDA backend issues fill this crate; until then the runtime executes
//! graphs on the reference interpreter.
