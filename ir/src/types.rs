//! Tensor types: dtype plus symbolic shape.

use crate::dim::{Dim, Shape};
use crate::dtype::DType;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The type of a value: element type and shape.
///
/// ```
/// use fulgur_ir::{DType, Dim, TensorType};
/// let t = TensorType::new(DType::F32, vec![Dim::sym("B"), Dim::from(128)]);
/// assert_eq!(t.to_string(), "f32[B, 128]");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, dims: Vec<Dim>) -> TensorType {
        TensorType {
            dtype,
            shape: Shape(dims),
        }
    }
    pub fn scalar(dtype: DType) -> TensorType {
        TensorType {
            dtype,
            shape: Shape::scalar(),
        }
    }
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
    pub fn dims(&self) -> &[Dim] {
        &self.shape.0
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}
