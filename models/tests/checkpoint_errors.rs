//! Checkpoint loading: broken checkpoints are refused with errors naming the tensor and the file; sharded,
//! reduced-precision and transformers-5-named checkpoints load to the same parameters as the fixture.
//!
//! Every case copies `tiny-a/config.json` into a temporary directory and writes a modified
//! `model.safetensors` (with the `safetensors` crate) built from the fixture's tensors.

use fulgur_ir::{Graph, Tensor};
use fulgur_models::checkpoint::Checkpoint;
use fulgur_models::{forward_graph, ForwardOptions, ModelError};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn fixtures() -> PathBuf {
    fulgur_models::fixtures::dir()
}

fn tiny_a() -> PathBuf {
    let p = fixtures().join("tiny-a");
    assert!(
        p.join("model.safetensors").exists(),
        "fixture {} is missing (set FULGUR_FIXTURES)",
        p.display()
    );
    p
}

/// A stored tensor: dtype, shape, little-endian bytes.
#[derive(Clone)]
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Raw {
    fn f32(shape: Vec<usize>, v: &[f32]) -> Raw {
        Raw {
            dtype: Dtype::F32,
            shape,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    fn values(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32);
        self.bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

type Tensors = BTreeMap<String, Raw>;

fn fixture_tensors() -> Tensors {
    let bytes = std::fs::read(tiny_a().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                Raw {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                },
            )
        })
        .collect()
}

fn serialize(t: &Tensors) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = t
        .iter()
        .map(|(n, r)| (n.clone(), TensorView::new(r.dtype, r.shape.clone(), &r.bytes).unwrap()))
        .collect();
    safetensors::tensor::serialize(views, &None).unwrap()
}

/// A checkpoint directory with tiny-a's config and `files` (name → bytes).
fn checkpoint_dir(files: &[(&str, Vec<u8>)]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_a().join("config.json"), dir.path().join("config.json")).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    dir
}

fn single(t: &Tensors) -> TempDir {
    checkpoint_dir(&[("model.safetensors", serialize(t))])
}

fn graph(ck: &Checkpoint) -> Graph {
    forward_graph(&ck.config, &ForwardOptions::default()).unwrap()
}

fn load(dir: &Path) -> Result<HashMap<String, Tensor>, ModelError> {
    let ck = Checkpoint::open(dir)?;
    ck.load_params(&graph(&ck))
}

fn baseline() -> HashMap<String, Tensor> {
    load(&tiny_a()).unwrap()
}

/// Asserts a `Tensor` error for `tensor` whose file ends with `file`; returns the message.
fn tensor_error(r: Result<HashMap<String, Tensor>, ModelError>, tensor: &str, file: &Path) -> String {
    let e = r.expect_err("the checkpoint should be refused");
    let s = e.to_string();
    match &e {
        ModelError::Tensor { tensor: t, file: f, .. } => {
            assert_eq!(t, tensor, "{s}");
            assert_eq!(Path::new(f), file, "{s}");
        }
        other => panic!("expected a Tensor error, got {other:?}"),
    }
    assert!(s.contains(tensor) && s.contains(&file.display().to_string()), "{s}");
    s
}

fn assert_same_params(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    let mut ka: Vec<&String> = a.keys().collect();
    let mut kb: Vec<&String> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb);
    for (k, t) in a {
        assert_eq!(t, &b[k], "{k} differs");
    }
}

const QKV: &str = "model.layers.0.self_attn.qkv_proj.weight";

#[test]
fn fixture_loads_and_ignores_derived_buffers() {
    let ck = Checkpoint::open(&tiny_a()).unwrap();
    let p = ck.load_params(&graph(&ck)).unwrap();
    assert!(ck.tensor_names().iter().any(|n| n.ends_with("slope_rate")));
    assert!(p.keys().all(|k| !k.contains("decay") && !k.contains("slope_rate")));
    assert_eq!(p["model.layers.0.mlp.experts.gate_up_proj"].shape, vec![4, 256, 128]);
    assert_eq!(p["model.layers.0.mlp.experts.down_proj"].shape, vec![4, 128, 128]);
    let n: usize = p.values().map(|t| t.numel()).sum();
    assert_eq!(n, 1_216_000);
    // a rewrite of the same tensors loads identically; an extra unknown tensor is only warned about
    let mut t = fixture_tensors();
    t.insert("model.extra.weight".into(), Raw::f32(vec![2], &[1.0, 2.0]));
    assert_same_params(&load(single(&t).path()).unwrap(), &p);
}

#[test]
fn missing_tensor() {
    let mut t = fixture_tensors();
    let name = "model.layers.2.self_attn.out_proj.weight";
    t.remove(name);
    let dir = single(&t);
    let s = tensor_error(load(dir.path()), name, dir.path());
    assert!(s.ends_with("missing from the checkpoint"), "{s}");
}

/// A missing weight is named as the checkpoint's files name it: the router of a checkpoint with per-expert
/// names is `block_sparse_moe.gate.weight`, not the graph's `mlp.gate.weight`.
#[test]
fn missing_router_is_named_as_the_file_names_it() {
    let mut t = fixture_tensors();
    let name = "model.layers.0.block_sparse_moe.gate.weight";
    assert!(t.remove(name).is_some());
    let dir = single(&t);
    let s = tensor_error(load(dir.path()), name, dir.path());
    assert_eq!(
        s,
        format!(
            "tensor `{name}` in `{}`: missing from the checkpoint (the graph's `model.layers.0.mlp.gate.weight`)",
            dir.path().display()
        )
    );
}

/// tiny-a's weights with a config that lacks `layer_types`: the default pattern makes layer 0 a softmax layer,
/// whose weights are not there; the error says why.
#[test]
fn a_config_without_layer_types_is_named_in_the_missing_weight_error() {
    let src = fulgur_models::fixtures::dir().join("tiny-a");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("layer_types");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let s = tensor_error(load(dir.path()), name, dir.path());
    assert_eq!(
        s,
        format!(
            "tensor `{name}` in `{}`: missing from the checkpoint; config.json has no `layer_types`, so layer 0 was \
             taken as full attention by transformers' default pattern: give `layer_types` to match the checkpoint",
            dir.path().display()
        )
    );
}

#[test]
fn missing_expert_tensor() {
    let mut t = fixture_tensors();
    let name = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
    t.remove(name);
    let dir = single(&t);
    let s = tensor_error(load(dir.path()), name, dir.path());
    assert!(
        s.contains("neither `model.layers.1.mlp.experts.gate_up_proj` nor the per-expert tensors are stored"),
        "{s}"
    );
}

#[test]
fn wrong_shape() {
    let mut t = fixture_tensors();
    t.get_mut(QKV).unwrap().shape = vec![128, 384];
    let dir = single(&t);
    let file = dir.path().join("model.safetensors");
    let s = tensor_error(load(dir.path()), QKV, &file);
    assert_eq!(
        s,
        format!(
            "tensor `{QKV}` in `{}`: expected shape [384, 128], found [128, 384]",
            file.display()
        )
    );
    // a per-expert tensor of the wrong shape is named by its own name
    let mut t = fixture_tensors();
    let name = "model.layers.3.block_sparse_moe.experts.0.w2.weight";
    let r = t.get_mut(name).unwrap();
    r.shape = vec![64, 256];
    let dir = single(&t);
    let s = tensor_error(load(dir.path()), name, &dir.path().join("model.safetensors"));
    assert!(s.ends_with("expected shape [128, 128], found [64, 256]"), "{s}");
}

#[test]
fn unexpected_dtype() {
    let mut t = fixture_tensors();
    let name = "model.norm.weight";
    let v: Vec<u8> = (0..128i64).flat_map(|x| x.to_le_bytes()).collect();
    t.insert(
        name.into(),
        Raw {
            dtype: Dtype::I64,
            shape: vec![128],
            bytes: v,
        },
    );
    let dir = single(&t);
    let s = tensor_error(load(dir.path()), name, &dir.path().join("model.safetensors"));
    assert!(s.ends_with("unexpected dtype I64 (expected F32, BF16 or F16)"), "{s}");
}

#[test]
fn truncated_file() {
    let mut bytes = serialize(&fixture_tensors());
    bytes.truncate(bytes.len() - 1000);
    let dir = checkpoint_dir(&[("model.safetensors", bytes.clone())]);
    let file = dir.path().join("model.safetensors");
    let e = load(dir.path()).expect_err("a truncated file should be refused");
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "`{}`: not a valid safetensors file: the tensors' data does not match the rest of the file \
             (truncated, or bytes added at the end)",
            file.display()
        )
    );
    // cut inside the header
    bytes.truncate(100);
    let dir = checkpoint_dir(&[("model.safetensors", bytes)]);
    let e = load(dir.path()).expect_err("a truncated header should be refused");
    assert_eq!(
        e.to_string(),
        format!(
            "`{}`: not a valid safetensors file: the header length in its first 8 bytes runs past the end of the \
             file (truncated, or not a safetensors file)",
            dir.path().join("model.safetensors").display()
        )
    );
}

#[test]
fn garbage_bytes() {
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for (bytes, cause) in [
        (
            garbage,
            "its first 8 bytes announce a header larger than 100 MB (is it a safetensors file?)",
        ),
        (
            b"not a safetensors file".to_vec(),
            "its first 8 bytes announce a header larger than 100 MB (is it a safetensors file?)",
        ),
        (
            Vec::new(),
            "it is shorter than the 8 bytes that give the header's length (empty or truncated)",
        ),
        (
            [&11u64.to_le_bytes()[..], b"{\"a\": nope}"].concat(),
            "its header is not valid JSON",
        ),
    ] {
        let dir = checkpoint_dir(&[("model.safetensors", bytes)]);
        let e = load(dir.path()).expect_err("garbage should be refused");
        assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
        let s = e.to_string();
        let file = dir.path().join("model.safetensors");
        assert!(
            s.starts_with(&format!("`{}`: not a valid safetensors file: {cause}", file.display())),
            "{s}"
        );
    }
}

#[test]
fn nan_inside_a_weight() {
    for (name, value) in [
        ("model.layers.1.self_attn.output_gate.weight", f32::NAN),
        ("model.embed_tokens.weight", f32::INFINITY),
        ("model.layers.0.block_sparse_moe.experts.3.w2.weight", f32::NAN),
        ("model.layers.2.block_sparse_moe.gate.weight", f32::NEG_INFINITY),
    ] {
        let mut t = fixture_tensors();
        let r = &t[name];
        let mut v = r.values();
        let i = v.len() / 3;
        v[i] = value;
        t.insert(name.into(), Raw::f32(r.shape.clone(), &v));
        let dir = single(&t);
        let s = tensor_error(load(dir.path()), name, &dir.path().join("model.safetensors"));
        assert!(s.ends_with("contains NaN or infinite values"), "{s}");
    }
}

/// Splits the tensors over three shards listed in `model.safetensors.index.json`.
fn sharded(t: &Tensors) -> Vec<(String, Vec<u8>)> {
    let mut shards: Vec<Tensors> = vec![BTreeMap::new(); 3];
    let mut map = serde_json::Map::new();
    for (i, (n, r)) in t.iter().enumerate() {
        let s = i % 3;
        shards[s].insert(n.clone(), r.clone());
        map.insert(n.clone(), format!("model-{:05}-of-00003.safetensors", s + 1).into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    let mut files: Vec<(String, Vec<u8>)> = shards
        .iter()
        .enumerate()
        .map(|(s, sh)| (format!("model-{:05}-of-00003.safetensors", s + 1), serialize(sh)))
        .collect();
    files.push(("model.safetensors.index.json".into(), index.to_string().into_bytes()));
    files
}

fn dir_of(files: &[(String, Vec<u8>)]) -> TempDir {
    let v: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    checkpoint_dir(&v)
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let dir = dir_of(&sharded(&fixture_tensors()));
    assert!(!dir.path().join("model.safetensors").exists());
    assert_same_params(&load(dir.path()).unwrap(), &baseline());

    // an error inside a shard names that shard
    let mut t = fixture_tensors();
    t.get_mut(QKV).unwrap().shape = vec![128, 384];
    let files = sharded(&t);
    let shard = files
        .iter()
        .find(|(n, b)| {
            n.ends_with(".safetensors") && SafeTensors::deserialize(b).unwrap().names().contains(&&QKV.to_string())
        })
        .map(|(n, _)| n.clone())
        .unwrap();
    let dir = dir_of(&files);
    tensor_error(load(dir.path()), QKV, &dir.path().join(&shard));

    // a shard the index names but that is absent
    let files: Vec<(String, Vec<u8>)> = sharded(&fixture_tensors())
        .into_iter()
        .filter(|(n, _)| n != "model-00002-of-00003.safetensors")
        .collect();
    let dir = dir_of(&files);
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("model-00002-of-00003.safetensors"), "{e}");

    // an index pointing outside the directory
    let mut files = sharded(&fixture_tensors());
    let idx = files.last_mut().unwrap();
    idx.1 = serde_json::json!({"weight_map": {QKV: "../model.safetensors"}})
        .to_string()
        .into_bytes();
    let dir = dir_of(&files);
    let e = load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("outside the directory"), "{e}");
}

fn convert(t: &Tensors, dtype: Dtype) -> Tensors {
    t.iter()
        .map(|(n, r)| {
            let bytes: Vec<u8> = r
                .values()
                .iter()
                .flat_map(|&x| match dtype {
                    Dtype::BF16 => bf16::from_f32(x).to_le_bytes(),
                    Dtype::F16 => f16::from_f32(x).to_le_bytes(),
                    _ => unreachable!(),
                })
                .collect();
            (
                n.clone(),
                Raw {
                    dtype,
                    shape: r.shape.clone(),
                    bytes,
                },
            )
        })
        .collect()
}

#[test]
fn bf16_and_f16_checkpoints_load_rounded() {
    let base = baseline();
    type Round = fn(f64) -> f64;
    let rounders: [(Dtype, Round); 2] = [
        // the stored values are f32, rounded from f32 (half 2.7's `bf16::from_f64` is not correctly rounded
        // for some values just above a midpoint, so the expectation goes through f32 too)
        (Dtype::BF16, |x| bf16::from_f32(x as f32).to_f64()),
        (Dtype::F16, |x| f16::from_f32(x as f32).to_f64()),
    ];
    for (dtype, round) in rounders {
        let dir = single(&convert(&fixture_tensors(), dtype));
        let p = load(dir.path()).unwrap();
        assert_eq!(p.len(), base.len());
        let mut changed = 0usize;
        for (k, t) in &p {
            let b = &base[k];
            assert_eq!((t.dtype, &t.shape), (b.dtype, &b.shape), "{k}");
            let want: Vec<f64> = b.to_f64().into_iter().map(round).collect();
            let got = t.to_f64();
            if let Some(j) = (0..got.len()).find(|&j| got[j] != want[j]) {
                panic!(
                    "{dtype:?}: {k}[{j}]: loaded {}, expected {} (the f32 value {} rounded)",
                    got[j],
                    want[j],
                    b.to_f64()[j]
                );
            }
            changed += want.iter().zip(b.to_f64()).filter(|(a, b)| *a != b).count();
        }
        assert!(changed > 1_000_000, "{dtype:?}: only {changed} values were rounded");
    }
}

#[test]
fn transformers5_fused_names_load_identically() {
    let t = fixture_tensors();
    let (e, i, c) = (4, 128, 128);
    let mut fused: Tensors = BTreeMap::new();
    for (n, r) in &t {
        if !n.contains(".block_sparse_moe.") {
            fused.insert(n.clone(), r.clone());
        }
    }
    for l in 0..4 {
        let p = format!("model.layers.{l}");
        let gate = t[&format!("{p}.block_sparse_moe.gate.weight")].clone();
        fused.insert(format!("{p}.mlp.gate.weight"), gate);
        let mut gate_up = Vec::with_capacity(e * 2 * i * c);
        let mut down = Vec::with_capacity(e * c * i);
        for x in 0..e {
            for w in ["w1", "w3"] {
                gate_up.extend(t[&format!("{p}.block_sparse_moe.experts.{x}.{w}.weight")].values());
            }
            down.extend(t[&format!("{p}.block_sparse_moe.experts.{x}.w2.weight")].values());
        }
        fused.insert(
            format!("{p}.mlp.experts.gate_up_proj"),
            Raw::f32(vec![e, 2 * i, c], &gate_up),
        );
        fused.insert(format!("{p}.mlp.experts.down_proj"), Raw::f32(vec![e, c, i], &down));
    }
    assert!(fused.keys().all(|k| !k.contains("block_sparse_moe")));
    let dir = single(&fused);
    assert_same_params(&load(dir.path()).unwrap(), &baseline());

    // a fused tensor of the wrong shape is named as stored
    let name = "model.layers.2.mlp.experts.down_proj";
    fused.get_mut(name).unwrap().shape = vec![2 * e, c / 2, i];
    let dir = single(&fused);
    let s = tensor_error(load(dir.path()), name, &dir.path().join("model.safetensors"));
    assert!(s.ends_with("expected shape [4, 128, 128], found [8, 64, 128]"), "{s}");
}

#[test]
fn not_a_checkpoint_directory() {
    let e = Checkpoint::open(Path::new("/nonexistent/checkpoint")).err().unwrap();
    assert_eq!(
        e.to_string(),
        "`/nonexistent/checkpoint`: not a checkpoint directory (expected config.json and model.safetensors)"
    );
    let dir = checkpoint_dir(&[]);
    let e = Checkpoint::open(dir.path()).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "`{}`: neither model.safetensors nor model.safetensors.index.json found",
            dir.path().display()
        )
    );
    // a config error names config.json
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"minimax\"}").unwrap();
    let e = Checkpoint::open(dir.path()).err().unwrap();
    assert!(matches!(e, ModelError::Config { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(&format!(
            "{}: field `hidden_size`",
            dir.path().join("config.json").display()
        )),
        "{e}"
    );
}
