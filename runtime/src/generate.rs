//! Greedy generation: one prefill, then decode steps carrying states.
//!
//! The prefill graph maps `input_ids` `[B, P]` to `logits` `[B, P, V]` plus state outputs; the decode graph
//! takes `input_ids` `[B, 1]`, `position` (i64 scalar) and, for each of its other data inputs, the output of
//! the same name from the previous step (prefill or decode). Nothing is recomputed over the prefix. Both are
//! [`Executable`]s: loaded once with their weights resident, so a step passes only tokens and states; from the
//! second decode step on, an executable that can ([`Executable::run_carried`]) keeps the states where its
//! previous step left them, and only the tokens and the logits cross to and from the host.

use crate::{Executable, RuntimeError};
use fulgur_ir::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};

/// What [`greedy`] returns.
#[derive(Clone, Debug)]
pub struct Generation {
    /// `[B, P + N]` i64: the prompt followed by the generated tokens.
    pub generated: Tensor,
    /// `[N·B, V]` f32: row `s·B + b` holds the logits that chose token `s` of sequence `b`.
    pub step_logits: Tensor,
}

/// Index of the first maximum of each row of `[rows, v]` values.
fn argmax_rows(vals: &[f64], v: usize) -> Vec<i64> {
    vals.chunks(v)
        .map(|row| {
            let mut best = 0;
            for (j, &x) in row.iter().enumerate() {
                if x > row[best] || (x.is_nan() && !row[best].is_nan()) {
                    best = j;
                }
            }
            best as i64
        })
        .collect()
}

/// Generates `max_new` tokens greedily with the loaded `prefill` and `decode` executables; `progress` is
/// called after every token with (tokens done, total).
pub fn greedy(
    prefill: &mut dyn Executable,
    decode: &mut dyn Executable,
    prompt: &Tensor,
    max_new: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Generation, RuntimeError> {
    if prompt.shape.len() != 2 || prompt.dtype != DType::I64 {
        return Err(RuntimeError::Other(format!(
            "the prompt must be i64 [B, P], got {} {:?}",
            prompt.dtype, prompt.shape
        )));
    }
    let (b, p) = (prompt.shape[0], prompt.shape[1]);
    if p == 0 {
        return Err(RuntimeError::Other("the prompt is empty".into()));
    }
    let inputs: HashMap<String, Tensor> = [("input_ids".to_string(), prompt.clone())].into();
    let mut prev: BTreeMap<String, Tensor> = prefill.run(&inputs)?;
    let mut tokens: Vec<Vec<i64>> = (0..b).map(|i| prompt.to_i64()[i * p..(i + 1) * p].to_vec()).collect();
    let mut step_logits: Vec<f64> = Vec::new();
    let mut vocab = 0;
    let carried: Vec<String> = decode
        .input_names()
        .into_iter()
        .filter(|name| name != "input_ids" && name != "position")
        .collect();
    for step in 0..max_new {
        let logits = prev
            .get("logits")
            .ok_or_else(|| RuntimeError::Other("the graph has no `logits` output".into()))?;
        let (lb, lt, v) = match logits.shape.as_slice() {
            [lb, lt, v] => (*lb, *lt, *v),
            s => return Err(RuntimeError::Other(format!("`logits` must be [B, T, V], got {s:?}"))),
        };
        vocab = v;
        let all = logits.to_f64();
        let mut last = Vec::with_capacity(lb * v);
        for i in 0..lb {
            let row = ((i * lt) + lt - 1) * v;
            last.extend_from_slice(&all[row..row + v]);
        }
        let next = argmax_rows(&last, v);
        step_logits.extend_from_slice(&last);
        for (i, t) in next.iter().enumerate() {
            tokens[i].push(*t);
        }
        progress(step + 1, max_new);
        if step + 1 == max_new {
            break;
        }
        let mut inputs = HashMap::new();
        inputs.insert("input_ids".into(), Tensor::from_i64(DType::I64, vec![b, 1], next));
        inputs.insert(
            "position".into(),
            Tensor::from_i64(DType::I64, vec![], vec![(p + step) as i64]),
        );
        // after the first decode step the states stay where the decode left them
        if step > 0 {
            if let Some(r) = decode.run_carried(&inputs, &carried) {
                prev = r?;
                continue;
            }
        }
        for name in &carried {
            let t = prev.remove(name).ok_or_else(|| {
                RuntimeError::Other(format!(
                    "decode input `{name}` has no output of the same name in the previous step"
                ))
            })?;
            inputs.insert(name.clone(), t);
        }
        prev = decode.run(&inputs)?;
    }
    let n = max_new;
    Ok(Generation {
        generated: Tensor::from_i64(DType::I64, vec![b, p + n], tokens.into_iter().flatten().collect()),
        step_logits: Tensor::from_f64(DType::F32, vec![n * b, vocab], step_logits),
    })
}
