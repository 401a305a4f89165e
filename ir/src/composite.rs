//! Decompositions of composite ops into primitives.
//!
//! A composite's meaning is its decomposition: the interpreter runs it, and rewrite rules that introduce a
//! composite are tested against it.

use crate::error::Result;
use crate::graph::{Graph, Value};
use crate::op::Composite;

impl Composite {
    /// Appends the primitive decomposition of `self` applied to `inputs` to `g`; returns the outputs.
    pub fn decompose(&self, g: &mut Graph, inputs: &[Value]) -> Result<Vec<Value>> {
        match self {
            Composite::Softmax { axis } => {
                let x = inputs[0];
                let m = g.max(x, &[*axis], true)?;
                let z = g.sub(x, m)?;
                let e = g.exp(z)?;
                let s = g.sum(e, &[*axis], true)?;
                Ok(vec![g.div(e, s)?])
            }
            Composite::LogSoftmax { axis } => {
                let x = inputs[0];
                let m = g.max(x, &[*axis], true)?;
                let z = g.sub(x, m)?;
                let e = g.exp(z)?;
                let s = g.sum(e, &[*axis], true)?;
                let l = g.log(s)?;
                Ok(vec![g.sub(z, l)?])
            }
            Composite::RmsNorm { eps } => {
                let (x, w) = (inputs[0], inputs[1]);
                let sq = g.mul(x, x)?;
                let ms = g.mean(sq, &[-1], true)?;
                let ms = g.add_scalar(ms, *eps)?;
                let r = g.rsqrt(ms)?;
                let y = g.mul(x, r)?;
                Ok(vec![g.mul(y, w)?])
            }
        }
    }
}
