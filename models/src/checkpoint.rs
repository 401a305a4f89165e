//! Loading HF-format MiniMax checkpoints.
//!
//! A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped; only the tensors a graph asks for are read, and
//! only their bytes are touched. Names: the graph's parameters use transformers 5's in-memory names; on-disk
//! per-expert names (`block_sparse_moe.experts.{e}.w1/w2/w3.weight`, `block_sparse_moe.gate.weight`) are
//! stacked onto them. Derived buffers (`slope_rate`, `query_decay`, `key_decay`, `diagonal_decay`,
//! `rotary_emb.inv_freq`) are ignored. Tensors may be f32, bf16 or f16; they are converted to the parameter's
//! dtype.

use crate::config::MiniMaxConfig;
use crate::error::ModelError;
use fulgur_ir::tensor::tensor_from_view;
use fulgur_ir::{Buffer, Graph, Op, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened checkpoint: its config and an index of every tensor in its files.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: MiniMaxConfig,
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

const DERIVED: [&str; 5] = [
    "slope_rate",
    "query_decay",
    "key_decay",
    "diagonal_decay",
    "rotary_emb.inv_freq",
];

fn io(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

impl Checkpoint {
    /// Opens `dir`: parses `config.json`, memory-maps the safetensors files and indexes their headers.
    pub fn open(dir: &Path) -> Result<Checkpoint, ModelError> {
        if !dir.is_dir() {
            return Err(io(
                dir,
                "not a checkpoint directory (expected config.json and model.safetensors)",
            ));
        }
        let config = MiniMaxConfig::from_file(&dir.join("config.json"))?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| io(&index, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| io(&index, "no `weight_map` object"))?;
            let mut files: Vec<String> = Vec::new();
            for (k, v) in map {
                let f = v
                    .as_str()
                    .ok_or_else(|| io(&index, format!("weight_map entry `{k}` is not a file name")))?;
                if f.contains('/') || f.contains("..") {
                    return Err(io(
                        &index,
                        format!("weight_map entry `{k}` names `{f}` outside the directory"),
                    ));
                }
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
            }
            files.sort();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(io(
                dir,
                "neither model.safetensors nor model.safetensors.index.json found",
            ));
        };
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in names.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
            // SAFETY: the file is opened read-only and not modified while mapped (a checkpoint is immutable
            // input; a concurrent writer would be a user error, as for any memory-mapped loader).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io(&path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                io(
                    &path,
                    format!(
                        "not a valid safetensors file: {}",
                        fulgur_ir::tensor::describe_safetensors_error(&e)
                    ),
                )
            })?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if base + e > map.len() || s > e {
                    return Err(ModelError::Tensor {
                        tensor: name.clone(),
                        file: path.display().to_string(),
                        message: format!(
                            "data [{s}, {e}) lies beyond the end of the file ({} bytes): the file is truncated",
                            map.len().saturating_sub(base)
                        ),
                    });
                }
                entries.insert(
                    name.clone(),
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            files.push((path, map));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            files,
            entries,
        })
    }

    /// The dtype parameter `name` (a graph's name, mapped to the checkpoint's as loading maps it) is stored
    /// in: `None` when it is not in the checkpoint or stored in a dtype no parameter has.
    pub fn stored_dtype(&self, name: &str) -> Option<fulgur_ir::DType> {
        let stored = |n: &str| {
            self.entries.get(n).and_then(|e| match e.dtype {
                StDtype::F32 => Some(fulgur_ir::DType::F32),
                StDtype::BF16 => Some(fulgur_ir::DType::BF16),
                StDtype::F16 => Some(fulgur_ir::DType::F16),
                _ => None,
            })
        };
        if self.entries.contains_key(name) {
            return stored(name);
        }
        if let Some(p) = name.strip_suffix(".mlp.gate.weight") {
            return stored(&format!("{p}.block_sparse_moe.gate.weight"));
        }
        if let Some(p) = name.strip_suffix(".mlp.experts.gate_up_proj") {
            return stored(&format!("{p}.block_sparse_moe.experts.0.w1.weight"));
        }
        if let Some(p) = name.strip_suffix(".mlp.experts.down_proj") {
            return stored(&format!("{p}.block_sparse_moe.experts.0.w2.weight"));
        }
        None
    }

    /// Names of every tensor stored in the checkpoint.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    fn file_of(&self, name: &str) -> String {
        match self.entries.get(name) {
            Some(e) => self.files[e.file].0.display().to_string(),
            None => self.dir.display().to_string(),
        }
    }

    /// Reads one stored tensor (converted to f32 storage), checking dtype and shape.
    fn read(&self, name: &str, want: &[usize]) -> Result<Tensor, ModelError> {
        let e = self.entries.get(name).ok_or_else(|| ModelError::Tensor {
            tensor: name.to_string(),
            file: self.dir.display().to_string(),
            message: "missing from the checkpoint".into(),
        })?;
        let file = self.files[e.file].0.display().to_string();
        let err = |m: String| ModelError::Tensor {
            tensor: name.to_string(),
            file: file.clone(),
            message: m,
        };
        if !matches!(e.dtype, StDtype::F32 | StDtype::BF16 | StDtype::F16) {
            return Err(err(format!(
                "unexpected dtype {:?} (expected F32, BF16 or F16)",
                e.dtype
            )));
        }
        if e.shape != want {
            return Err(err(format!("expected shape {want:?}, found {:?}", e.shape)));
        }
        let bytes = &self.files[e.file].1[e.start..e.end];
        let view = TensorView::new(e.dtype, e.shape.clone(), bytes)
            .map_err(|x| err(fulgur_ir::tensor::describe_safetensors_error(&x)))?;
        let t = tensor_from_view(&view, name).map_err(|x| err(x.to_string()))?;
        if t.has_non_finite() {
            return Err(err("contains NaN or infinite values".into()));
        }
        Ok(t.cast(fulgur_ir::DType::F32))
    }

    /// Loads every parameter of `g` (by name, with on-disk name mapping), checking shapes.
    pub fn load_params(&self, g: &Graph) -> Result<HashMap<String, Tensor>, ModelError> {
        let mut out = HashMap::new();
        let mut used: HashSet<String> = HashSet::new();
        for id in g.params() {
            let Op::Param { name, ty } = &g.node(id).op else {
                continue;
            };
            let want = ty.shape.as_consts().ok_or_else(|| ModelError::Tensor {
                tensor: name.clone(),
                file: self.dir.display().to_string(),
                message: format!("parameter has a symbolic shape {}", ty.shape),
            })?;
            let t = self.load_one(name, &want, &mut used)?;
            out.insert(name.clone(), t.cast(ty.dtype));
        }
        for n in self.entries.keys() {
            if !used.contains(n) && !DERIVED.iter().any(|d| n.ends_with(d)) {
                tracing::warn!(
                    "checkpoint tensor `{n}` in `{}` is not used by the graph",
                    self.file_of(n)
                );
            }
        }
        Ok(out)
    }

    /// Loads one parameter by its graph name (with the on-disk name mapping), checking its shape, in the
    /// parameter's dtype: for loading weights one at a time into a backend, never holding them all on the host.
    pub fn load_param(&self, name: &str, ty: &fulgur_ir::TensorType) -> Result<Tensor, ModelError> {
        let want = ty.shape.as_consts().ok_or_else(|| ModelError::Tensor {
            tensor: name.to_string(),
            file: self.dir.display().to_string(),
            message: format!("parameter has a symbolic shape {}", ty.shape),
        })?;
        Ok(self.load_one(name, &want, &mut HashSet::new())?.cast(ty.dtype))
    }

    fn load_one(&self, name: &str, want: &[usize], used: &mut HashSet<String>) -> Result<Tensor, ModelError> {
        if self.entries.contains_key(name) {
            used.insert(name.to_string());
            return self.read(name, want);
        }
        let moe = |suffix: &str| name.strip_suffix(suffix);
        if let Some(p) = moe(".mlp.gate.weight") {
            let alt = format!("{p}.block_sparse_moe.gate.weight");
            if self.entries.contains_key(&alt) {
                used.insert(alt.clone());
                return self.read(&alt, want);
            }
        }
        if let Some(p) = moe(".mlp.experts.gate_up_proj") {
            // [E, 2I, C]: for expert e, rows [0, I) are w1, rows [I, 2I) are w3
            let (e, i2, c) = (want[0], want[1], want[2]);
            let mut data = Vec::with_capacity(e * i2 * c);
            for x in 0..e {
                for w in ["w1", "w3"] {
                    let n = format!("{p}.block_sparse_moe.experts.{x}.{w}.weight");
                    data.extend(self.read_expert(&n, &[i2 / 2, c], name, used)?);
                }
            }
            return Ok(Tensor {
                dtype: fulgur_ir::DType::F32,
                shape: want.to_vec(),
                data: Buffer::F(data),
            });
        }
        if let Some(p) = moe(".mlp.experts.down_proj") {
            let (e, c, i) = (want[0], want[1], want[2]);
            let mut data = Vec::with_capacity(e * c * i);
            for x in 0..e {
                let n = format!("{p}.block_sparse_moe.experts.{x}.w2.weight");
                data.extend(self.read_expert(&n, &[c, i], name, used)?);
            }
            return Ok(Tensor {
                dtype: fulgur_ir::DType::F32,
                shape: want.to_vec(),
                data: Buffer::F(data),
            });
        }
        // name it as the checkpoint's files name it: a checkpoint with per-expert names calls the router
        // `block_sparse_moe.gate.weight`
        let per_expert = self.entries.keys().any(|k| k.contains(".block_sparse_moe."));
        let (tensor, message) = match moe(".mlp.gate.weight") {
            Some(p) if per_expert => (
                format!("{p}.block_sparse_moe.gate.weight"),
                format!("missing from the checkpoint (the graph's `{name}`)"),
            ),
            _ => (name.to_string(), "missing from the checkpoint".to_string()),
        };
        // a layer taken as the wrong kind by the default pattern misses its attention weights
        let message = match layer_of(name) {
            Some(l) if self.config.layer_types_defaulted && name.contains(".self_attn.") => format!(
                "{message}; config.json has no `layer_types`, so layer {l} was taken as {} attention by \
                 transformers' default pattern: give `layer_types` to match the checkpoint",
                match self.config.layer_types.get(l) {
                    Some(crate::LayerType::Linear) => "linear",
                    _ => "full",
                }
            ),
            _ => message,
        };
        Err(ModelError::Tensor {
            tensor,
            file: self.dir.display().to_string(),
            message,
        })
    }

    fn read_expert(
        &self,
        n: &str,
        want: &[usize],
        fused: &str,
        used: &mut HashSet<String>,
    ) -> Result<Vec<f64>, ModelError> {
        if !self.entries.contains_key(n) {
            return Err(ModelError::Tensor {
                tensor: n.to_string(),
                file: self.dir.display().to_string(),
                message: format!(
                    "missing from the checkpoint (neither `{fused}` nor the per-expert tensors are stored)"
                ),
            });
        }
        used.insert(n.to_string());
        let t = self.read(n, want)?;
        Ok(t.to_f64())
    }
}

/// The layer index of a parameter name `model.layers.N. ...`.
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// Reads a token file: the i64/i32 tensor `key` of a safetensors file, of rank 2 (`[B, T]`), as i64.
pub fn read_tokens(path: &Path, key: &str) -> Result<Tensor, ModelError> {
    let all = fulgur_ir::tensor::read_safetensors(path).map_err(|e| io(path, e))?;
    let t = all.get(key).ok_or_else(|| ModelError::Tensor {
        tensor: key.to_string(),
        file: path.display().to_string(),
        message: format!(
            "not found (the file holds: {})",
            all.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    })?;
    let err = |m: String| ModelError::Tensor {
        tensor: key.to_string(),
        file: path.display().to_string(),
        message: m,
    };
    if !t.dtype.is_int() {
        return Err(err(format!("token ids must be i64 or i32, found {}", t.dtype)));
    }
    let t = match t.shape.len() {
        2 => t.cast(fulgur_ir::DType::I64),
        1 => {
            return Err(err(format!(
            "token ids must be [B, T] (batch, length), found shape {:?}: give a one-sequence batch the shape [1, {}]",
            t.shape, t.shape[0]
        )))
        }
        _ => {
            return Err(err(format!(
                "token ids must be [B, T] (batch, length), found shape {:?}",
                t.shape
            )))
        }
    };
    if t.numel() == 0 {
        return Err(err("holds no tokens".into()));
    }
    Ok(t)
}

/// Checks token ids against the vocabulary; `key` and `file` name the tensor in errors.
pub fn check_tokens(t: &Tensor, vocab: usize, key: &str, file: &Path) -> Result<(), ModelError> {
    for &x in t.to_i64().iter() {
        if x < 0 || x as usize >= vocab {
            return Err(ModelError::Tensor {
                tensor: key.to_string(),
                file: file.display().to_string(),
                message: format!("token id {x} is outside the vocabulary [0, {vocab})"),
            });
        }
    }
    Ok(())
}

/// The tensors of a checkpoint in the on-disk layout `Checkpoint::open` reads and transformers'
/// `MiniMaxForCausalLM.from_pretrained` loads: the stacked expert tensors of the in-memory names split per
/// expert (`block_sparse_moe.experts.{e}.w1/w2/w3.weight`, the router as `block_sparse_moe.gate.weight`), every
/// other tensor under its own name.
pub fn to_disk_layout(
    weights: &HashMap<String, Tensor>,
) -> Result<std::collections::BTreeMap<String, Tensor>, ModelError> {
    let mut out = std::collections::BTreeMap::new();
    let bad = |name: &str, m: String| ModelError::Tensor {
        tensor: name.to_string(),
        file: "(the weights to save)".into(),
        message: m,
    };
    for (name, t) in weights {
        if let Some(p) = name.strip_suffix(".mlp.gate.weight") {
            out.insert(format!("{p}.block_sparse_moe.gate.weight"), t.clone());
        } else if let Some(p) = name.strip_suffix(".mlp.experts.gate_up_proj") {
            let [e, i2, c] = t.shape[..] else {
                return Err(bad(name, format!("expected [E, 2I, C], got {:?}", t.shape)));
            };
            let v = t.to_f64();
            let i = i2 / 2;
            for x in 0..e {
                for (k, w) in ["w1", "w3"].iter().enumerate() {
                    let at = (x * i2 + k * i) * c;
                    out.insert(
                        format!("{p}.block_sparse_moe.experts.{x}.{w}.weight"),
                        Tensor::from_f64(t.dtype, vec![i, c], v[at..at + i * c].to_vec()),
                    );
                }
            }
        } else if let Some(p) = name.strip_suffix(".mlp.experts.down_proj") {
            let [e, c, i] = t.shape[..] else {
                return Err(bad(name, format!("expected [E, C, I], got {:?}", t.shape)));
            };
            let v = t.to_f64();
            for x in 0..e {
                out.insert(
                    format!("{p}.block_sparse_moe.experts.{x}.w2.weight"),
                    Tensor::from_f64(t.dtype, vec![c, i], v[x * c * i..(x + 1) * c * i].to_vec()),
                );
            }
        } else {
            out.insert(name.clone(), t.clone());
        }
    }
    Ok(out)
}

/// Writes a checkpoint directory `dir` atomically: `config.json` (the given text), `model.safetensors` (the
/// weights in the on-disk layout, [`to_disk_layout`]) and any `extra` files, into a temporary directory beside
/// `dir` that then replaces it. A failure leaves `dir` as it was.
pub fn save_checkpoint(
    dir: &Path,
    config_json: &str,
    weights: &HashMap<String, Tensor>,
    extra: &[(&str, Vec<u8>)],
) -> Result<(), ModelError> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = dir
        .file_name()
        .ok_or_else(|| io(dir, "not a directory path"))?
        .to_string_lossy()
        .to_string();
    if dir.exists() && !dir.is_dir() {
        return Err(io(dir, "exists and is not a directory: not replaced by a checkpoint"));
    }
    // a save interrupted between its two renames left the last checkpoint aside: put it back first
    recover_checkpoint(dir)?;
    let tmp = parent.join(format!(".{base}.{}.tmp", std::process::id()));
    let old = parent.join(format!(".{base}.{}.old", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&old);
    let write = || -> Result<(), ModelError> {
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        std::fs::write(tmp.join("config.json"), config_json).map_err(|e| io(&tmp.join("config.json"), e))?;
        fulgur_ir::tensor::write_safetensors(&tmp.join("model.safetensors"), &to_disk_layout(weights)?)?;
        for (name, bytes) in extra {
            fulgur_ir::tensor::write_atomic(&tmp.join(name), bytes)?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // swap: the old directory aside, the new one in, the old one removed
    let had = dir.exists();
    if had {
        if let Err(e) = std::fs::rename(dir, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io(dir, format!("cannot replace it: {e}")));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had {
            let _ = std::fs::rename(&old, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io(dir, format!("cannot move the new checkpoint into place: {e}")));
    }
    if had {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// The hidden directories a checkpoint save uses beside `dir`: `(temporary, set aside)` of any process.
fn save_leftovers(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(base) = dir.file_name().map(|b| b.to_string_lossy().to_string()) else {
        return (Vec::new(), Vec::new());
    };
    let (mut tmp, mut old) = (Vec::new(), Vec::new());
    if let Ok(rd) = std::fs::read_dir(parent) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some(rest) = n.strip_prefix(&format!(".{base}.")) {
                if rest.ends_with(".tmp") {
                    tmp.push(e.path());
                } else if rest.ends_with(".old") {
                    old.push(e.path());
                }
            }
        }
    }
    (tmp, old)
}

/// Puts back a checkpoint a save set aside before it was interrupted (`dir` missing, its previous contents in a
/// hidden `.NAME.PID.old` beside it), and removes the temporary directories of interrupted saves. Nothing to
/// do (`Ok`) when `dir` exists or no save was interrupted.
pub fn recover_checkpoint(dir: &Path) -> Result<(), ModelError> {
    let (tmp, old) = save_leftovers(dir);
    for t in tmp {
        let _ = std::fs::remove_dir_all(t);
    }
    if dir.exists() {
        for o in old {
            let _ = std::fs::remove_dir_all(o);
        }
        return Ok(());
    }
    if let Some(o) = old.first() {
        std::fs::rename(o, dir).map_err(|e| io(dir, format!("cannot restore it from {}: {e}", o.display())))?;
    }
    Ok(())
}
