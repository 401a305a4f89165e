//! # fulgur-ir
//!
//! The Fulgur intermediate representation: everything later stages agree on, and nothing else.
//!
//! - [`DType`], symbolic [`Dim`]s and [`Shape`]s, [`TensorType`];
//! - the op set ([`Op`]: primitives, and [`Composite`]s with a decomposition into primitives);
//! - [`Graph`] on `petgraph`, with a builder API, shape/dtype inference ([`infer`]) and a verifier;
//! - the `.fir` text format ([`text`]), JSON through `serde` ([`json`]) and DOT export ([`dot`]);
//! - the reference [`Interpreter`], which defines what every op means, on host [`Tensor`]s.
//!
//! This crate knows nothing of passes, code generation, devices or particular models.

pub mod composite;
pub mod dim;
pub mod dot;
pub mod dtype;
pub mod error;
pub mod graph;
pub mod infer;
pub mod interp;
pub mod json;
pub mod op;
pub mod tensor;
pub mod text;
pub mod types;

pub use dim::{Dim, Shape};
pub use dtype::DType;
pub use error::{IrError, Result};
pub use graph::{Graph, GraphSummary, Node, NodeId, Value};
pub use interp::{Interpreter, Precision, Transport};
pub use op::{AttrValue, BinaryOp, CmpOp, Composite, ConstData, Op, ReduceOp, UnaryOp};
pub use tensor::{Buffer, Tensor};
pub use types::TensorType;
