//! # fulgur
//!
//! Fulgur compiles a model written in its dataflow-graph IR into an executable for one GPU, a GPU cluster or
//! the host CPU, and runs it. This crate is a thin facade over the workspace's member crates, plus the
//! `fulgur` command (`src/main.rs`, not part of the library):
//!
//! | re-export | crate | owns |
//! |---|---|---|
//! | [`ir`] | `fulgur-ir` | tensor types with symbolic dims, the op set, [`ir::Graph`], inference and verification, the `.fir` text format, JSON, DOT, the reference [`ir::Interpreter`] |
//! | [`passes`] | `fulgur-passes` | pass manager, equality saturation, cost model, autodiff, sharding |
//! | [`codegen`] | `fulgur-codegen` | kernel grouping, schedule, memory plan, CUDA C++ and LLVM IR emission |
//! | [`runtime`] | `fulgur-runtime` | devices, memory, launches, NCCL, weight loading, training and generation |
//! | [`models`] | `fulgur-models` | MiniMax-01 configs, graph builders and checkpoint name mapping |
//!
//! Implemented: the IR and interpreter, the MiniMax-01 models, the optimizer, the kernel program, the CPU
//! backend (cargo feature `llvm`, on by default), the CUDA backend (feature `cuda`), training, and the sharding
//! pass with MiniMax-01's data, expert and tensor parallel plans ([`parallel`]); per-rank execution comes next
//! (see `docs/architecture.md` and `docs/parallelism.md`).
//!
//! ```
//! use fulgur::ir::{text, DType, Dim, Graph, Interpreter, Tensor};
//!
//! let mut g = Graph::new("double");
//! let x = g.input("x", DType::F32, vec![Dim::sym("N")]).unwrap();
//! let y = g.add(x, x).unwrap();
//! g.add_output("y", y).unwrap();
//! let inputs = [("x".to_string(), Tensor::from_f32(vec![2], vec![1.0, 2.5]))].into();
//! let out = Interpreter::default().run(&g, &inputs).unwrap();
//! assert_eq!(out["y"].to_f64(), vec![2.0, 5.0]);
//! assert!(text::print(&g).starts_with("graph double {"));
//! ```

pub use fulgur_codegen as codegen;
pub use fulgur_ir as ir;
pub use fulgur_models as models;
pub use fulgur_passes as passes;
pub use fulgur_runtime as runtime;

pub mod parallel;
pub mod pipeline;
pub mod plan;
