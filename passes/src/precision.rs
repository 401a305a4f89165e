//! Storage precision: an f32 graph rewritten to store its weights and activations in bf16 (or f16), the
//! numerics contract's low-precision mode (`docs/numerics.md`): values stored in the narrow dtype, arithmetic
//! inside each kernel in f32.
//!
//! [`store_as`] rebuilds the graph node by node:
//! - f32 parameters and data inputs become `dtype`, except those `keep` names (the lightning states carried
//!   between decode steps stay f32: they are cast to `dtype` where they are read);
//! - values the graph generates (`iota`, `full`, constants, `one_hot`, casts from integers) stay f32, so that
//!   positions, rotary angles and masks are computed exactly as before; where such a value meets a `dtype`
//!   value in one op it is cast to `dtype` there (as transformers casts `cos`/`sin` to the query's dtype);
//! - every other op takes its inputs' dtype (inference decides), so activations are `dtype`;
//! - `log_softmax` (the loss) reads its input cast to f32, as transformers' loss upcasts the logits, so the
//!   cross-entropy and its mean are computed and stored in f32;
//! - outputs `keep` names are cast back to f32 (the loss, the states); the others keep the dtype they have.

use crate::PassError;
use fulgur_ir::op::FusedBody;
use fulgur_ir::{Composite, DType, Graph, Op, Value};
use std::collections::HashMap;

/// The names [`store_as`] keeps in f32 by default: the lightning states and the losses.
pub fn keep_f32(name: &str) -> bool {
    name.starts_with("state.") || name == "loss" || name == "aux_loss"
}

/// `g` storing its f32 weights and activations as `dtype` (see the module's text); `keep` names the inputs and
/// outputs that stay f32. Fused kernels' bodies are rewritten the same way (their inputs take the dtypes of
/// the values they are given; inside a body, values stay f32 until stored), so the pass can run after the
/// optimizer, on the kernels it chose.
pub fn store_as(g: &Graph, dtype: DType, keep: &dyn Fn(&str) -> bool) -> Result<Graph, PassError> {
    if !dtype.is_float() {
        return Err(PassError::Options(format!("cannot store a graph's floats as {dtype}")));
    }
    let retype = |_: usize, name: &str, ty: &fulgur_ir::TensorType| -> Option<DType> {
        (ty.dtype == DType::F32 && dtype != DType::F32 && !keep(name)).then_some(dtype)
    };
    convert(g, dtype, keep, &retype, true)
}

/// Rebuilds `g`: input `i` (named, typed) takes the dtype `retype` gives; `keep`'s inputs stay f32 and are
/// cast to `dtype` where read (at the top level only, `cast_kept`); mixed float inputs of an op are cast to
/// `dtype`.
fn convert(
    g: &Graph,
    dtype: DType,
    keep: &dyn Fn(&str) -> bool,
    retype: &dyn Fn(usize, &str, &fulgur_ir::TensorType) -> Option<DType>,
    top: bool,
) -> Result<Graph, PassError> {
    let mut out = Graph::new(g.name.clone());
    let mut map: HashMap<Value, Value> = HashMap::new();
    let mut input_index = 0usize;
    for (id, n) in g.nodes() {
        let ins: Vec<Value> = n.inputs.iter().map(|v| map[v]).collect();
        let new_vals: Vec<Value> = match &n.op {
            Op::Input { name, ty } | Op::Param { name, ty } => {
                let i = input_index;
                input_index += 1;
                let to = retype(i, name, ty);
                let is_input = matches!(n.op, Op::Input { .. });
                match to {
                    Some(d) if d != ty.dtype => {
                        let mut ty = ty.clone();
                        ty.dtype = d;
                        let op = if is_input {
                            Op::Input { name: name.clone(), ty }
                        } else {
                            Op::Param { name: name.clone(), ty }
                        };
                        vec![Value::new(out.add_node(op, &[], n.name.clone())?, 0)]
                    }
                    _ if top && ty.dtype == DType::F32 && dtype != DType::F32 && keep(name) => {
                        let nid = out.add_node(n.op.clone(), &[], n.name.clone())?;
                        let cast = out.add_node(Op::Cast { dtype }, &[Value::new(nid, 0)], None)?;
                        vec![Value::new(cast, 0)]
                    }
                    _ => vec![Value::new(out.add_node(n.op.clone(), &[], n.name.clone())?, 0)],
                }
            }
            op => {
                // float inputs of different dtypes: the f32 ones (generated values) are cast to `dtype`
                let float_dtypes: Vec<DType> = ins.iter().map(|v| out.ty(*v).dtype).filter(|d| d.is_float()).collect();
                let mixed = float_dtypes.contains(&dtype) && float_dtypes.iter().any(|d| *d != dtype);
                let mut ins2 = ins.clone();
                if mixed {
                    for v in ins2.iter_mut() {
                        let d = out.ty(*v).dtype;
                        if d.is_float() && d != dtype {
                            let c = out.add_node(Op::Cast { dtype }, &[*v], None)?;
                            *v = Value::new(c, 0);
                        }
                    }
                }
                // the loss reads the logits in f32, as transformers' loss upcasts them (`logits.float()`): the
                // log-softmax and the cross-entropy's reductions are not rounded to `dtype`
                if matches!(op, Op::Composite(Composite::LogSoftmax { .. })) && top {
                    let d = out.ty(ins2[0]).dtype;
                    if d.is_float() && d != DType::F32 {
                        let c = out.add_node(Op::Cast { dtype: DType::F32 }, &[ins2[0]], None)?;
                        ins2[0] = Value::new(c, 0);
                    }
                }
                let op = match op {
                    Op::Composite(Composite::Fused { body }) => {
                        let given: Vec<DType> = ins2.iter().map(|v| out.ty(*v).dtype).collect();
                        let retype_body =
                            |i: usize, _: &str, _: &fulgur_ir::TensorType| -> Option<DType> { given.get(i).copied() };
                        let nb = convert(body.graph(), dtype, &|_| false, &retype_body, false)?;
                        Op::Composite(Composite::Fused {
                            body: FusedBody::from_graph(&nb).map_err(PassError::Options)?,
                        })
                    }
                    op => op.clone(),
                };
                let nid = out.add_node(op, &ins2, n.name.clone())?;
                (0..n.outputs.len()).map(|i| Value::new(nid, i as u32)).collect()
            }
        };
        for (i, v) in new_vals.into_iter().enumerate() {
            map.insert(Value::new(id, i as u32), v);
        }
    }
    for (name, v) in g.outputs() {
        let mut nv = map[v];
        if top && keep(name) && out.ty(nv).dtype.is_float() && out.ty(nv).dtype != DType::F32 {
            let c = out.add_node(Op::Cast { dtype: DType::F32 }, &[nv], None)?;
            nv = Value::new(c, 0);
        }
        out.add_output(name.clone(), nv)?;
    }
    Ok(out)
}

/// `g` with every float parameter not stored in f32 turned into an f32 parameter of the same name (the master
/// weight) cast to its dtype where it is read: a graph stored in bf16 by [`store_as`], made trainable with f32
/// master weights. Autodiff then returns f32 gradients (a cast passes its gradient straight through), while
/// activations and their gradients are stored in the narrow dtype.
pub fn master_weights(g: &Graph) -> Result<Graph, PassError> {
    let mut out = Graph::new(g.name.clone());
    let mut map: HashMap<Value, Value> = HashMap::new();
    for (id, n) in g.nodes() {
        let ins: Vec<Value> = n.inputs.iter().map(|v| map[v]).collect();
        let vals: Vec<Value> = match &n.op {
            Op::Param { name, ty } if ty.dtype.is_float() && ty.dtype != DType::F32 => {
                let mut t32 = ty.clone();
                t32.dtype = DType::F32;
                let p = out.add_node(
                    Op::Param {
                        name: name.clone(),
                        ty: t32,
                    },
                    &[],
                    n.name.clone(),
                )?;
                let c = out.add_node(Op::Cast { dtype: ty.dtype }, &[Value::new(p, 0)], None)?;
                vec![Value::new(c, 0)]
            }
            op => {
                let nid = out.add_node(op.clone(), &ins, n.name.clone())?;
                (0..n.outputs.len() as u32).map(|k| Value::new(nid, k)).collect()
            }
        };
        for (k, v) in vals.into_iter().enumerate() {
            map.insert(Value::new(id, k as u32), v);
        }
    }
    for (name, v) in g.outputs() {
        out.add_output(name.clone(), map[v])?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulgur_ir::{Dim, Interpreter, Precision, Tensor};

    #[test]
    fn weights_and_activations_become_bf16_and_generated_values_stay_f32() {
        let mut g = Graph::new("g");
        let x = g.input("x", DType::F32, vec![Dim::from(2), Dim::from(3)]).unwrap();
        let w = g.param("w", DType::F32, vec![Dim::from(3), Dim::from(3)]).unwrap();
        let s = g
            .input("state.0", DType::F32, vec![Dim::from(2), Dim::from(3)])
            .unwrap();
        let pos = g.iota(DType::F32, vec![Dim::from(2), Dim::from(3)], 0).unwrap();
        let y = g.matmul(x, w).unwrap();
        let y = g.add(y, pos).unwrap();
        let z = g.add(y, s).unwrap();
        g.add_output("y", y).unwrap();
        g.add_output("state.0", z).unwrap();
        let b = store_as(&g, DType::BF16, &keep_f32).unwrap();
        let ty = |name: &str| {
            let (_, v) = b.outputs().iter().find(|(n, _)| n == name).unwrap();
            b.ty(*v).dtype
        };
        assert_eq!(ty("y"), DType::BF16);
        assert_eq!(ty("state.0"), DType::F32, "kept outputs are cast back");
        let decl = |name: &str| {
            b.nodes()
                .find_map(|(_, n)| match &n.op {
                    Op::Input { name: m, ty } | Op::Param { name: m, ty } if m == name => Some(ty.dtype),
                    _ => None,
                })
                .unwrap()
        };
        assert_eq!(
            (decl("x"), decl("w"), decl("state.0")),
            (DType::BF16, DType::BF16, DType::F32)
        );
        // the iota is still f32 and is cast where it meets a bf16 value
        assert!(b
            .nodes()
            .any(|(_, n)| matches!(n.op, Op::Iota { dtype: DType::F32, .. })));
        // the values: within bf16 rounding of the f32 graph's
        let feed: HashMap<String, Tensor> = [
            (
                "x".to_string(),
                Tensor::from_f64(DType::F32, vec![2, 3], vec![0.1, -0.7, 1.3, 2.2, 0.01, -3.0]),
            ),
            (
                "w".to_string(),
                Tensor::from_f64(DType::F32, vec![3, 3], (0..9).map(|i| i as f64 * 0.37 - 1.0).collect()),
            ),
            (
                "state.0".to_string(),
                Tensor::from_f64(DType::F32, vec![2, 3], vec![0.5; 6]),
            ),
        ]
        .into();
        let want = Interpreter::new(Precision::F32).run(&g, &feed).unwrap();
        let mut feed_b = feed.clone();
        for n in ["x", "w"] {
            let t = &feed[n];
            feed_b.insert(n.into(), t.cast(DType::BF16));
        }
        let got = Interpreter::new(Precision::F32).run(&b, &feed_b).unwrap();
        for n in ["y", "state.0"] {
            let e = got[n].rel_l2(&want[n]);
            assert!(e > 0.0 && e < 2e-2, "{n}: relative error {e}");
        }
    }

    #[test]
    fn an_integer_dtype_is_refused() {
        let g = Graph::new("g");
        let e = store_as(&g, DType::I32, &keep_f32).unwrap_err().to_string();
        assert_eq!(e, "cannot store a graph's floats as i32");
    }
}
