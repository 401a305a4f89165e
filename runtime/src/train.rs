//! The training loop's parts: learning-rate schedules, training data (pre-tokenized batches, or plain text by
//! a byte-level tokenizer, packed into fixed-length sequences with a held-out split and a shuffle by seed),
//! and the [`Trainer`], which runs a step executable (`fulgur_passes::optim::train_step`) with the weights and
//! optimizer moments left where the executable keeps them between steps.

use crate::{Executable, RuntimeError};
use fulgur_ir::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};

/// A learning-rate schedule over `total` steps (steps are 1-based).
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// `lr` after a linear warm-up.
    Constant,
    /// Linear warm-up, then a cosine from `lr` down to `min_ratio · lr` at the last step.
    Cosine { min_ratio: f64 },
    /// Warmup-stable-decay (MiniMax-01's schedule): linear warm-up, `lr` held, then a linear decay to
    /// `min_ratio · lr` over the last `decay_fraction` of the steps.
    Wsd { decay_fraction: f64, min_ratio: f64 },
}

/// A schedule with its peak rate, warm-up and length.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    pub warmup: u64,
    pub total: u64,
    pub kind: Schedule,
}

impl LrSchedule {
    /// The learning rate of step `t` (1-based).
    pub fn at(&self, t: u64) -> f64 {
        let lr = self.lr;
        if self.warmup > 0 && t <= self.warmup {
            return lr * t as f64 / self.warmup as f64;
        }
        let total = self.total.max(1);
        match &self.kind {
            Schedule::Constant => lr,
            Schedule::Cosine { min_ratio } => {
                let span = total.saturating_sub(self.warmup).max(1) as f64;
                let x = ((t - self.warmup.min(t)) as f64 / span).min(1.0);
                let min = lr * min_ratio;
                min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos())
            }
            Schedule::Wsd {
                decay_fraction,
                min_ratio,
            } => {
                let decay = ((total as f64) * decay_fraction).round().max(1.0) as u64;
                let start = total.saturating_sub(decay);
                if t <= start {
                    lr
                } else {
                    let x = ((t - start) as f64 / decay as f64).min(1.0);
                    lr * (1.0 - x * (1.0 - min_ratio))
                }
            }
        }
    }
}

/// Where the next batch comes from, saved with a checkpoint so a resumed run sees the same batches.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataCursor {
    /// Batches taken so far.
    pub batches: u64,
}

/// Training data: batches `[B, T]` of i64 token ids.
pub enum Data {
    /// Pre-tokenized batches `[steps, B, T]`, used in order.
    Batches { ids: Tensor },
    /// Text as bytes, packed into sequences of `seq` tokens: `train` and `heldout` hold the sequences' starts.
    Text {
        tokens: Vec<i64>,
        /// The tokenizer's vocabulary size.
        vocab: usize,
        seq: usize,
        batch: usize,
        train: Vec<usize>,
        heldout: Vec<usize>,
        seed: u64,
    },
}

/// A deterministic permutation of `0..n` (Fisher–Yates over SplitMix64).
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

impl Data {
    /// Plain text through the byte-level tokenizer (a token per byte, ids 0–255), packed into sequences of
    /// `seq` tokens; about one sequence in twenty (at least one) is held out. `what` names the source in errors.
    pub fn text(bytes: &[u8], seq: usize, batch: usize, seed: u64, what: &str) -> Result<Data, String> {
        let tokens: Vec<i64> = bytes.iter().map(|&b| b as i64).collect();
        Data::tokens(tokens, 256, "bytes", seq, batch, seed, what)
    }

    /// A stream of token ids from a tokenizer of `vocab` ids (`unit` names what a token is, for errors),
    /// packed and split as [`Data::text`] does.
    pub fn tokens(
        tokens: Vec<i64>,
        vocab: usize,
        unit: &str,
        seq: usize,
        batch: usize,
        seed: u64,
        what: &str,
    ) -> Result<Data, String> {
        if seq < 2 || batch == 0 {
            return Err(format!(
                "training needs --seq of at least 2 and --batch of at least 1, got {seq} and {batch}"
            ));
        }
        let n = tokens.len() / seq;
        if n < 2 {
            return Err(format!(
                "{what} has {} {unit}: too small for two sequences of {seq} tokens (one to train on, one held out)",
                tokens.len()
            ));
        }
        let held = (n / 20).max(1);
        let order = permutation(n, seed ^ 0x5EED_DA7A);
        let heldout: Vec<usize> = order[..held].iter().map(|i| i * seq).collect();
        let train: Vec<usize> = order[held..].iter().map(|i| i * seq).collect();
        if train.len() < batch {
            return Err(format!(
                "{what} packs into {} training sequences of {seq} tokens, fewer than one batch of {batch}",
                train.len()
            ));
        }
        Ok(Data::Text {
            tokens,
            vocab,
            seq,
            batch,
            train,
            heldout,
            seed,
        })
    }

    /// Pre-tokenized batches `input_ids: [steps, B, T]`.
    pub fn batches(ids: Tensor, what: &str) -> Result<Data, String> {
        if ids.shape.len() != 3 || !ids.dtype.is_int() || ids.shape[2] < 2 || ids.shape[1] == 0 {
            return Err(format!(
                "{what}: `input_ids` must be integer [steps, B, T] with B ≥ 1 and T ≥ 2, got {} {:?}",
                ids.dtype, ids.shape
            ));
        }
        if let Some((at, x)) = ids.to_i64().into_iter().enumerate().find(|(_, x)| *x < 0) {
            let (b, t) = (ids.shape[1], ids.shape[2]);
            return Err(format!(
                "{what}: `input_ids` holds the negative id {x} at [{}, {}, {}]",
                at / (b * t),
                at / t % b,
                at % t
            ));
        }
        Ok(Data::Batches { ids })
    }

    /// The vocabulary the data's ids need (one more than the largest id).
    pub fn vocab_needed(&self) -> usize {
        match self {
            Data::Batches { ids } => ids.to_i64().into_iter().max().unwrap_or(0).max(0) as usize + 1,
            Data::Text { vocab, .. } => *vocab,
        }
    }

    /// `(B, T)` of every batch.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Data::Batches { ids } => (ids.shape[1], ids.shape[2]),
            Data::Text { seq, batch, .. } => (*batch, *seq),
        }
    }

    /// How many steps the data can feed (`None`: any number, by epochs).
    pub fn steps_available(&self) -> Option<u64> {
        match self {
            Data::Batches { ids } => Some(ids.shape[0] as u64),
            Data::Text { .. } => None,
        }
    }

    /// The next batch, advancing `cursor`.
    pub fn next(&self, cursor: &mut DataCursor) -> Result<Tensor, String> {
        let k = cursor.batches as usize;
        let t = match self {
            Data::Batches { ids } => {
                let (s, b, t) = (ids.shape[0], ids.shape[1], ids.shape[2]);
                if k >= s {
                    return Err(format!("the data holds {s} batches; step {} has none", k + 1));
                }
                let at = k * b * t;
                let v: Vec<i64> = match &ids.data {
                    fulgur_ir::Buffer::I(all) => all[at..at + b * t].to_vec(),
                    _ => ids.to_i64()[at..at + b * t].to_vec(),
                };
                Tensor::from_i64(DType::I64, vec![b, t], v)
            }
            Data::Text {
                tokens,
                seq,
                batch,
                train,
                seed,
                ..
            } => {
                // epochs of the training sequences, each in its own order
                let per_epoch = train.len() / batch;
                let (epoch, i) = (k / per_epoch, k % per_epoch);
                let order = permutation(train.len(), seed.wrapping_add(epoch as u64));
                let mut v = Vec::with_capacity(batch * seq);
                for j in 0..*batch {
                    let start = train[order[i * batch + j]];
                    v.extend_from_slice(&tokens[start..start + seq]);
                }
                Tensor::from_i64(DType::I64, vec![*batch, *seq], v)
            }
        };
        cursor.batches += 1;
        Ok(t)
    }

    /// The held-out sequences (text data only) in batches of up to `batch` (at most `max` batches).
    pub fn heldout(&self, batch: usize, max: usize) -> Vec<Tensor> {
        match self {
            Data::Batches { .. } => Vec::new(),
            Data::Text {
                tokens, seq, heldout, ..
            } => {
                let b = batch.max(1).min(heldout.len());
                heldout
                    .chunks(b)
                    .filter(|c| c.len() == b)
                    .take(max)
                    .map(|c| {
                        let v: Vec<i64> = c.iter().flat_map(|&s| tokens[s..s + seq].iter().copied()).collect();
                        Tensor::from_i64(DType::I64, vec![b, *seq], v)
                    })
                    .collect()
            }
        }
    }

    /// The entropy (nats per token) of the training tokens' unigram distribution: the loss of a model that
    /// knows only the token frequencies.
    pub fn unigram_entropy(&self) -> f64 {
        let toks: Vec<i64> = match self {
            Data::Batches { ids } => ids.to_i64(),
            Data::Text { tokens, seq, train, .. } => {
                train.iter().flat_map(|&s| tokens[s..s + seq].iter().copied()).collect()
            }
        };
        let mut counts: HashMap<i64, f64> = HashMap::new();
        for t in &toks {
            *counts.entry(*t).or_default() += 1.0;
        }
        let n = toks.len().max(1) as f64;
        -counts.values().map(|c| (c / n) * (c / n).ln()).sum::<f64>()
    }
}

/// One training step's scalars.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    pub loss: f64,
    pub grad_norm: f64,
}

/// Runs a training-step executable: its weights and moments (`carried`, inputs and outputs of the same names)
/// start from the host and then stay where the executable keeps them (`Executable::run_carried`); executables
/// that cannot carry get them back from the host every step.
pub struct Trainer<'a> {
    exe: &'a mut dyn Executable,
    carried: Vec<String>,
    /// The state on the host: before the first step, and after every step of an executable that cannot carry.
    host: Option<HashMap<String, Tensor>>,
    /// A carried step failed part-way: the executable's outputs are neither the old state nor the new one.
    broken: bool,
}

impl<'a> Trainer<'a> {
    /// `state` holds every carried input: the weights and `adam_m.*`/`adam_v.*`.
    pub fn new(exe: &'a mut dyn Executable, state: HashMap<String, Tensor>) -> Trainer<'a> {
        let mut carried: Vec<String> = state.keys().cloned().collect();
        carried.sort();
        Trainer {
            exe,
            carried,
            host: Some(state),
            broken: false,
        }
    }

    /// One step on `ids` with the optimizer's scalar inputs.
    pub fn step(&mut self, ids: Tensor, scalars: &[(&str, f64)]) -> Result<StepOutput, RuntimeError> {
        if self.broken {
            return Err(RuntimeError::Other(
                "an earlier step failed part-way: the state is lost (resume from the last checkpoint)".into(),
            ));
        }
        let mut inputs: HashMap<String, Tensor> = HashMap::new();
        inputs.insert("input_ids".into(), ids);
        for (n, v) in scalars {
            inputs.insert(n.to_string(), Tensor::from_f64(DType::F32, vec![], vec![*v]));
        }
        let carried = match &self.host {
            Some(_) => None,
            None => self.exe.run_carried(&inputs, &self.carried),
        };
        let out: BTreeMap<String, Tensor> = match carried {
            Some(Ok(o)) => o,
            Some(Err(e)) => {
                // a step that failed part-way left its outputs half written: no state to carry or read
                self.broken = true;
                return Err(e);
            }
            None => {
                let host = self.host.take().ok_or_else(|| {
                    RuntimeError::Other("the executable stopped carrying its state between steps".into())
                })?;
                let mut all = inputs;
                all.extend(host);
                // the new state stays in the executable when it can hold it (never downloaded)
                let (run, kept) = match self.exe.run_keeping(&all, &self.carried) {
                    Some(r) => (r, true),
                    None => (self.exe.run(&all), false),
                };
                let mut out = match run {
                    Ok(o) => o,
                    Err(e) => {
                        // the state stays what it was before the step
                        self.host = Some(
                            self.carried
                                .iter()
                                .filter_map(|n| all.remove(n).map(|t| (n.clone(), t)))
                                .collect(),
                        );
                        return Err(e);
                    }
                };
                // keep the new state on the host when the executable cannot hold it
                if !kept {
                    let mut host = HashMap::new();
                    for n in &self.carried {
                        if let Some(t) = out.remove(n) {
                            host.insert(n.clone(), t);
                        }
                    }
                    if self.exe.last_outputs(&[]).is_none() {
                        self.host = Some(host);
                    }
                }
                out
            }
        };
        let scalar = |n: &str| -> Result<f64, RuntimeError> {
            out.get(n)
                .map(|t| t.to_f64()[0])
                .ok_or_else(|| RuntimeError::Other(format!("the step graph has no `{n}` output")))
        };
        Ok(StepOutput {
            loss: scalar("loss")?,
            grad_norm: scalar("grad_norm")?,
        })
    }

    /// Where the last step's time went, when the executable measures it.
    pub fn timing(&self) -> Option<crate::CallTiming> {
        self.exe.last_timing()
    }

    /// The current weights and moments.
    pub fn state(&mut self) -> Result<HashMap<String, Tensor>, RuntimeError> {
        let names = self.carried.clone();
        self.state_of(&names)
    }

    /// The named parts of the current state (read from the executable only for those names).
    pub fn state_of(&mut self, names: &[String]) -> Result<HashMap<String, Tensor>, RuntimeError> {
        if self.broken {
            return Err(RuntimeError::Other(
                "a step failed part-way: the state is lost (resume from the last checkpoint)".into(),
            ));
        }
        if let Some(h) = &self.host {
            return Ok(names
                .iter()
                .filter_map(|n| h.get(n).map(|t| (n.clone(), t.clone())))
                .collect());
        }
        match self.exe.last_outputs(names) {
            Some(r) => Ok(r?.into_iter().collect()),
            None => Err(RuntimeError::Other("the executable keeps no state to read".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_hold_and_decay() {
        let s = |kind| LrSchedule {
            lr: 1.0,
            warmup: 10,
            total: 100,
            kind,
        };
        let c = s(Schedule::Constant);
        assert_eq!((c.at(1), c.at(5), c.at(10), c.at(100)), (0.1, 0.5, 1.0, 1.0));
        let cos = s(Schedule::Cosine { min_ratio: 0.1 });
        assert!((cos.at(10) - 1.0).abs() < 1e-12);
        assert!((cos.at(55) - 0.55).abs() < 1e-12, "{}", cos.at(55));
        assert!((cos.at(100) - 0.1).abs() < 1e-12);
        let w = s(Schedule::Wsd {
            decay_fraction: 0.2,
            min_ratio: 0.0,
        });
        assert_eq!((w.at(50), w.at(80)), (1.0, 1.0));
        assert!((w.at(90) - 0.5).abs() < 1e-12 && w.at(100).abs() < 1e-12);
    }

    #[test]
    fn text_is_packed_split_and_shuffled_by_seed() {
        let text: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let d = Data::text(&text, 10, 4, 7, "t").unwrap();
        let Data::Text { train, heldout, .. } = &d else {
            panic!()
        };
        assert_eq!((train.len(), heldout.len()), (95, 5));
        assert!(
            heldout.iter().all(|h| !train.contains(h)),
            "held-out sequences are not trained on"
        );
        let (mut a, mut b) = (DataCursor::default(), DataCursor::default());
        let x: Vec<Tensor> = (0..30).map(|_| d.next(&mut a).unwrap()).collect();
        let y: Vec<Tensor> = (0..30).map(|_| d.next(&mut b).unwrap()).collect();
        assert_eq!(x, y, "the same seed gives the same batches");
        assert_eq!(x[0].shape, vec![4, 10]);
        // an epoch is 23 batches: every training sequence once
        let mut seen: Vec<i64> = x[..23]
            .iter()
            .flat_map(|t| t.to_i64().chunks(10).map(|c| c[0]).collect::<Vec<_>>())
            .collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 23 * 4, "23 batches of 4: every sequence once, none twice");
        let other = Data::text(&text, 10, 4, 8, "t").unwrap();
        assert_ne!(
            other.next(&mut DataCursor::default()).unwrap(),
            x[0],
            "another seed shuffles otherwise"
        );
        assert_eq!(
            Data::text(&text[..15], 10, 1, 0, "`small.txt`").err().unwrap(),
            "`small.txt` has 15 bytes: too small for two sequences of 10 tokens (one to train on, one held out)"
        );
    }
}
