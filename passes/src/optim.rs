//! The training step as one graph: the loss, its gradients ([`crate::autodiff`]), global-norm clipping and an
//! AdamW update of every parameter, so the optimizer fuses the update and every backend runs it.
//!
//! The step graph has no parameters: each parameter `NAME` of the loss graph becomes a data input of the same
//! name and type (the master weight, f32), with its AdamW moments `adam_m.NAME` and `adam_v.NAME` (f32, its
//! shape). Outputs: `loss` (and `aux_loss` where the loss graph has it), `grad_norm` (the global L2 norm of the
//! gradients before clipping, as `torch.nn.utils.clip_grad_norm_` returns it) and, under their input names,
//! the updated weights and moments, so an executable can carry them from one step to the next.
//!
//! The update is PyTorch's single-tensor AdamW (`torch.optim.AdamW`, `foreach=False`), in its order:
//! `p ← p·(1 − lr·wd)` (parameters with weight decay only), `m ← m + (1 − β1)(g − m)`,
//! `v ← β2·v + (1 − β2)·g²`, `p ← p − step_size · m / (√v / √bc2 + eps)`. The step-dependent scalars are
//! inputs the host computes in f64, as PyTorch does: `opt.decay` = 1 − lr·wd, `opt.step_size` =
//! lr / (1 − β1ᵗ) and `opt.bc2_sqrt` = √(1 − β2ᵗ) (see [`AdamW::scalars`]).

use crate::autodiff::{differentiate_report, GradOptions, GradReport, GRAD_PREFIX};
use crate::PassError;
use fulgur_ir::{DType, Graph, Op, TensorType, Value};
use std::collections::HashMap;

/// Prefix of the first-moment inputs and outputs.
pub const ADAM_M: &str = "adam_m.";
/// Prefix of the second-moment inputs and outputs.
pub const ADAM_V: &str = "adam_v.";

/// AdamW's hyperparameters (the learning rate comes per step, from a schedule).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the gradients to this global L2 norm before the update.
    pub clip: Option<f64>,
}

impl Default for AdamW {
    /// The defaults of `fulgur train`: betas 0.9 and 0.95, eps 1e-8, weight decay 0.1, clipping at 1.0.
    fn default() -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: Some(1.0),
        }
    }
}

impl AdamW {
    /// The step's scalar inputs for learning rate `lr` at step `t` (1-based): `opt.decay`, `opt.step_size`,
    /// `opt.bc2_sqrt`, computed in f64.
    pub fn scalars(&self, lr: f64, t: u64) -> [(&'static str, f64); 3] {
        let bc1 = 1.0 - self.beta1.powf(t as f64);
        let bc2 = 1.0 - self.beta2.powf(t as f64);
        [
            ("opt.decay", 1.0 - lr * self.weight_decay),
            ("opt.step_size", lr / bc1),
            ("opt.bc2_sqrt", bc2.sqrt()),
        ]
    }
}

/// Whether a parameter takes weight decay: those of two or more dimensions (matrices and expert stacks), not
/// norms or other vectors — the rule of MiniMax's and transformers' recipes.
pub fn decays(ty: &TensorType) -> bool {
    ty.rank() >= 2
}

/// Prefix of the gradient accumulators of a step over micro-batches ([`train_step_accumulating`]).
pub const GRAD_ACC: &str = "grad_acc.";

/// The training step of `g` (a graph with the scalar output `loss`): see the module docs.
pub fn train_step(g: &Graph, loss: &str, hp: &AdamW) -> Result<Graph, PassError> {
    train_step_accumulating(g, loss, hp, 1)
}

/// The training step over `micro_batches` micro-batches of equal token counts (gradient accumulation). With
/// more than one, the graph also carries `grad_acc.NAME` (f32, the parameter's shape: the sum so far of the
/// micro-batches' gradients, each divided by `micro_batches`) and takes the scalar input `opt.apply`. Each call
/// adds its micro-batch's gradient; where `opt.apply` is 1 (the last micro-batch) the accumulated gradient is
/// clipped and applied and the accumulators reset to zero, elsewhere the weights and moments pass through
/// unchanged. `grad_norm` is the norm of the accumulated gradient. The mean of the micro-batches' `loss` is the
/// whole batch's loss.
pub fn train_step_accumulating(g: &Graph, loss: &str, hp: &AdamW, micro_batches: usize) -> Result<Graph, PassError> {
    Ok(train_step_with(g, loss, hp, micro_batches, &GradOptions::default())?.0)
}

/// [`train_step_accumulating`] differentiating with `grad` (its store-or-recompute policy; `grad.inputs` must
/// be empty), and the decisions autodiff made.
pub fn train_step_with(
    g: &Graph,
    loss: &str,
    hp: &AdamW,
    micro_batches: usize,
    grad: &GradOptions,
) -> Result<(Graph, GradReport), PassError> {
    if !grad.inputs.is_empty() {
        return Err(PassError::Options(
            "a training step differentiates the parameters only".into(),
        ));
    }
    if micro_batches == 0 {
        return Err(PassError::Options("a step needs at least one micro-batch".into()));
    }
    if !(0.0..1.0).contains(&hp.beta1) || !(0.0..1.0).contains(&hp.beta2) || hp.eps <= 0.0 {
        return Err(PassError::Options(format!(
            "AdamW needs betas in [0, 1) and eps > 0, got beta1 {}, beta2 {}, eps {}",
            hp.beta1, hp.beta2, hp.eps
        )));
    }
    if let Some(c) = hp.clip {
        if c.is_nan() || c <= 0.0 {
            return Err(PassError::Options(format!(
                "the clipping norm must be positive, got {c}"
            )));
        }
    }
    let (dg, mut report) = differentiate_report(g, loss, grad)?;
    let (mut s, map) = with_params_as_inputs(&dg, format!("{}_train_step", g.name))?;
    // the MoE chains' backward, in the step's nodes (the copy keeps every node)
    report.moe_chains = report.moe_chains.iter().filter_map(|c| c.mapped(&map)).collect();
    let params: Vec<(String, TensorType, Value)> = dg
        .nodes()
        .filter_map(|(id, node)| match &node.op {
            Op::Param { name, ty } if ty.dtype.is_float() => Some((name.clone(), ty.clone(), map[&Value::new(id, 0)])),
            _ => None,
        })
        .collect();
    let out = |n: &str| dg.outputs().iter().find(|(o, _)| o == n).map(|(_, v)| map[v]);
    for keep in [loss, "aux_loss"] {
        if let Some(v) = out(keep) {
            s.add_output(keep, v)?;
        }
    }
    let mut grads = Vec::new();
    for (name, _, _) in &params {
        grads.push(out(&format!("{GRAD_PREFIX}{name}")).ok_or_else(|| PassError::Invalid {
            pass: "train_step".into(),
            message: format!("no gradient output for `{name}`"),
        })?);
    }
    append_update(&mut s, &params, grads, hp, micro_batches, None)?;
    s.verify().map_err(|e| PassError::Invalid {
        pass: "train_step".into(),
        message: e.to_string(),
    })?;
    Ok((s, report))
}

/// The optimizer's update alone, for gradients computed elsewhere (the stages of a pipeline): inputs every
/// parameter of `params` by its name (f32 master weights), its gradient `grad.NAME`, its moments `adam_m.NAME`
/// and `adam_v.NAME`, and the scalars [`AdamW::scalars`] gives; outputs the new weights and moments under the
/// same names and `grad_norm`, exactly as [`train_step`] computes them (clipping by the global norm over every
/// gradient given).
pub fn update_step(params: &[(String, TensorType)], hp: &AdamW) -> Result<Graph, PassError> {
    update_graph(params, hp, false)
}

/// The scalar input of [`update_step_given_norm`]: the squared global norm of every gradient of the model.
pub const GRAD_SQ: &str = "opt.grad_sq";

/// The update of [`update_step`] for a part of a model (a pipeline stage's parameters): the same inputs and
/// outputs, but the clipping's norm (and the `grad_norm` output) is the square root of the scalar input
/// [`GRAD_SQ`], the squared norm over the whole model's gradients summed where they are, instead of the norm of
/// `params`' gradients alone.
pub fn update_step_given_norm(params: &[(String, TensorType)], hp: &AdamW) -> Result<Graph, PassError> {
    update_graph(params, hp, true)
}

fn update_graph(params: &[(String, TensorType)], hp: &AdamW, given_norm: bool) -> Result<Graph, PassError> {
    let mut s = Graph::new("adamw_update");
    let mut ps = Vec::new();
    let mut grads = Vec::new();
    for (name, ty) in params {
        let p = s.input(name, ty.dtype, ty.dims().to_vec())?;
        ps.push((name.clone(), ty.clone(), p));
        grads.push(s.input(&format!("{GRAD_PREFIX}{name}"), ty.dtype, ty.dims().to_vec())?);
    }
    let norm_sq = if given_norm {
        Some(s.input(GRAD_SQ, DType::F32, vec![])?)
    } else {
        None
    };
    append_update(&mut s, &ps, grads, hp, 1, norm_sq)?;
    s.verify().map_err(|e| PassError::Invalid {
        pass: "update_step".into(),
        message: e.to_string(),
    })?;
    Ok(s)
}

/// Appends to `s` the clipping and AdamW update of the parameters `params` (name, type, value) by `grads`
/// (accumulated over `micro_batches` when more than one), with their outputs; clipped by the norm of `grads`, or
/// by the square root of `norm_sq` where given.
fn append_update(
    s: &mut Graph,
    params: &[(String, TensorType, Value)],
    mut grads: Vec<Value>,
    hp: &AdamW,
    micro_batches: usize,
    norm_sq: Option<Value>,
) -> Result<(), PassError> {
    s.push_scope("optimizer");
    let f = DType::F32;
    // over micro-batches: the gradient so far, and whether this call applies it
    let apply = if micro_batches > 1 {
        let a = s.input("opt.apply", f, vec![])?;
        let half = s.scalar(0.5, f)?;
        let on = s.compare(fulgur_ir::CmpOp::Gt, a, half)?;
        let mut acc = Vec::new();
        for ((name, ty, _), gv) in params.iter().zip(grads.iter_mut()) {
            let a_in = s.input(&format!("{GRAD_ACC}{name}"), f, ty.dims().to_vec())?;
            let gf = if s.dtype(*gv) != f { s.cast(*gv, f)? } else { *gv };
            let part = s.scale(gf, 1.0 / micro_batches as f64)?;
            let total = s.add(a_in, part)?;
            let zero = s.scalar(0.0, f)?;
            let next = s.select(on, zero, total)?;
            acc.push((format!("{GRAD_ACC}{name}"), next));
            *gv = total;
        }
        for (n, v) in acc {
            s.add_output(n, v)?;
        }
        Some(on)
    } else {
        None
    };
    // the global norm, in f32 as the gradients are
    let mut total: Option<Value> = norm_sq;
    for &gv in grads.iter().filter(|_| norm_sq.is_none()) {
        let gv = if s.dtype(gv) != f { s.cast(gv, f)? } else { gv };
        let sq = s.mul(gv, gv)?;
        let all: Vec<i64> = (0..s.rank(sq) as i64).collect();
        let part = s.sum(sq, &all, false)?;
        total = Some(match total {
            Some(t) => s.add(t, part)?,
            None => part,
        });
    }
    let total = match total {
        Some(t) => t,
        None => s.scalar(0.0, f)?,
    };
    let norm = s.sqrt(total)?;
    let norm1 = s.reshape(norm, vec![fulgur_ir::Dim::from(1)])?;
    s.add_output("grad_norm", norm1)?;
    // clip_grad_norm_: coef = min(1, max_norm / (norm + 1e-6))
    let coef = match hp.clip {
        Some(c) => {
            let d = s.add_scalar(norm, 1e-6)?;
            let mx = s.scalar(c, f)?;
            let q = s.div(mx, d)?;
            let one = s.scalar(1.0, f)?;
            Some(s.binary(fulgur_ir::BinaryOp::Min, q, one)?)
        }
        None => None,
    };
    let scalar_in = |s: &mut Graph, n: &str| s.input(n, f, vec![]);
    let decay = scalar_in(s, "opt.decay")?;
    let step_size = scalar_in(s, "opt.step_size")?;
    let bc2_sqrt = scalar_in(s, "opt.bc2_sqrt")?;
    for ((name, ty, p), gv) in params.iter().zip(grads) {
        if ty.dtype != f {
            return Err(PassError::Options(format!(
                "training needs f32 master weights: parameter `{name}` is {ty}"
            )));
        }
        s.push_scope(name.clone());
        let gv = match coef {
            Some(c) => s.mul(gv, c)?,
            None => gv,
        };
        let m = s.input(&format!("{ADAM_M}{name}"), f, ty.dims().to_vec())?;
        let v = s.input(&format!("{ADAM_V}{name}"), f, ty.dims().to_vec())?;
        let p1 = if decays(ty) && hp.weight_decay != 0.0 {
            s.mul(*p, decay)?
        } else {
            *p
        };
        // m.lerp_(g, 1 − β1)
        let d = s.sub(gv, m)?;
        let d = s.scale(d, 1.0 - hp.beta1)?;
        let m1 = s.add(m, d)?;
        // v.mul_(β2).addcmul_(g, g, value = 1 − β2)
        let vb = s.scale(v, hp.beta2)?;
        let gg = s.mul(gv, gv)?;
        let gg = s.scale(gg, 1.0 - hp.beta2)?;
        let v1 = s.add(vb, gg)?;
        // denom = √v / √bc2 + eps; p.addcdiv_(m, denom, value = −step_size)
        let r = s.sqrt(v1)?;
        let r = s.div(r, bc2_sqrt)?;
        let den = s.add_scalar(r, hp.eps)?;
        let q = s.div(m1, den)?;
        let q = s.mul(q, step_size)?;
        let p2 = s.sub(p1, q)?;
        // between micro-batches, the state passes through
        let (p2, m1, v1) = match apply {
            Some(on) => (s.select(on, p2, *p)?, s.select(on, m1, m)?, s.select(on, v1, v)?),
            None => (p2, m1, v1),
        };
        s.pop_scope();
        s.add_output(name.clone(), p2)?;
        s.add_output(format!("{ADAM_M}{name}"), m1)?;
        s.add_output(format!("{ADAM_V}{name}"), v1)?;
    }
    s.pop_scope();
    Ok(())
}

/// `g` with every parameter turned into a data input of the same name and type (a graph whose weights change
/// between calls, such as the held-out loss during training).
pub fn params_to_inputs(g: &Graph) -> Result<Graph, PassError> {
    let (mut s, map) = with_params_as_inputs(g, g.name.clone())?;
    for (n, v) in g.outputs() {
        s.add_output(n.clone(), map[v])?;
    }
    Ok(s)
}

/// `g`'s nodes copied into a graph `name` (no outputs yet), parameters turned into data inputs of the same
/// names and types; with the map from `g`'s values to the copy's.
fn with_params_as_inputs(g: &Graph, name: String) -> Result<(Graph, HashMap<Value, Value>), PassError> {
    let mut s = Graph::new(name);
    let mut map: HashMap<Value, Value> = HashMap::new();
    for (id, node) in g.nodes() {
        let ins: Vec<Value> = node.inputs.iter().map(|v| map[v]).collect();
        let op = match &node.op {
            Op::Param { name, ty } => Op::Input {
                name: name.clone(),
                ty: ty.clone(),
            },
            op => op.clone(),
        };
        let nid = s.add_node(op, &ins, node.name.clone())?;
        for k in 0..node.outputs.len() as u32 {
            map.insert(Value::new(id, k), Value::new(nid, k));
        }
    }
    Ok((s, map))
}
