//! `fulgur compile` and `fulgur run`: artifacts written, run against the reference, and refused when they are
//! from another version, modified, or given the wrong weights.

mod common;
use common::{fails, fulgur, root, tiny_a};
use fulgur::ir::tensor::{read_safetensors, write_safetensors};
use fulgur::ir::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn compile(input: &dyn AsRef<std::ffi::OsStr>, out: &Path, extra: &[&str]) {
    let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"compile", input, &"-o", &out];
    for e in extra {
        a.push(e);
    }
    ok(&fulgur(&a));
}

#[test]
fn an_artifact_holds_its_program_graph_and_code_with_hashes() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("mlp");
    compile(&"examples/mlp.fir", &art, &[]);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format"], "fulgur-artifact");
    assert_eq!(m["fulgur_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(m["target"], "cpu");
    assert_eq!(m["symbols"], serde_json::json!(["B"]));
    assert_eq!(m["inputs"][0]["name"], "x");
    let weights: Vec<&str> = m["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(weights, ["w1", "b1", "w2", "b2"]);
    assert_eq!(m["outputs"][0]["name"], "y");
    let files = m["files"].as_object().unwrap();
    for f in ["program.json", "program.txt", "graph.fir"] {
        assert!(files.contains_key(f), "{f} not in the manifest");
    }
    let codes = m["codes"].as_u64().unwrap() as usize;
    for c in 0..codes {
        assert!(files.contains_key(&format!("kernels/code{c}.loops")));
        #[cfg(feature = "llvm")]
        {
            let ll = std::fs::read_to_string(art.join(format!("kernels/code{c}.ll"))).unwrap();
            assert!(ll.contains(&format!("define void @k{c}_s")), "{ll}");
        }
    }
    // every file listed is there with the hash given
    for (f, h) in files {
        let bytes = std::fs::read(art.join(f)).unwrap();
        use sha2::Digest;
        let got: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(&got, h.as_str().unwrap(), "{f}");
    }
    // the optimized graph parses
    fulgur::ir::text::parse(&std::fs::read_to_string(art.join("graph.fir")).unwrap()).unwrap();
    // compiling again replaces the artifact whole
    compile(&"examples/mlp.fir", &art, &["--opt", "none"]);
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[cfg(feature = "llvm")]
#[test]
fn a_compiled_graph_runs_like_the_interpreter() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("mlp");
    compile(&"examples/mlp.fir", &art, &[]);
    let out = tmp.path().join("y.safetensors");
    let text = ok(&fulgur(&[
        &"run",
        &art,
        &"--inputs",
        &"examples/mlp.inputs.safetensors",
        &"--out",
        &out,
        &"--print",
    ]));
    assert!(text.contains("y: f32[4, 16]") && text.contains("cpu: JIT"), "{text}");
    assert!(text.contains("; memory planned ") && text.contains(", held "), "{text}");
    let reference = tmp.path().join("ref.safetensors");
    ok(&fulgur(&[
        &"eval",
        &"examples/mlp.fir",
        &"--inputs",
        &"examples/mlp.inputs.safetensors",
        &"--out",
        &reference,
        &"--precision",
        &"f64",
    ]));
    let (got, want) = (read_safetensors(&out).unwrap(), read_safetensors(&reference).unwrap());
    let e = got["y"].rel_l2(&want["y"]);
    assert!(e < 1e-6, "relative error {e}");
}

/// tiny-a compiled to an artifact and run with the checkpoint's weights: transformers' logits and loss.
#[cfg(feature = "llvm")]
#[test]
fn tiny_a_artifact_matches_transformers() {
    let dir = tiny_a();
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("tiny-a");
    compile(&dir, &art, &["--loss"]);
    let out = tmp.path().join("o.safetensors");
    ok(&fulgur(&[
        &"run",
        &art,
        &"--weights",
        &dir,
        &"--inputs",
        &dir.join("reference.safetensors"),
        &"--out",
        &out,
    ]));
    let got = read_safetensors(&out).unwrap();
    let want = read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let e = got["logits"].rel_l2(&want["logits"]);
    assert!(e < 1e-4, "logits: {e}");
    assert!((got["loss"].to_f64()[0] - want["loss"].to_f64()[0]).abs() < 1e-5);
}

#[test]
fn modified_or_foreign_artifacts_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("mlp");
    compile(&"examples/mlp.fir", &art, &[]);
    let out = tmp.path().join("y.safetensors");
    let run = |art: &Path| {
        fulgur(&[
            &"run",
            &art,
            &"--inputs",
            &"examples/mlp.inputs.safetensors",
            &"--out",
            &out,
        ])
    };
    // a kernel program changed after it was written
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(d.join("kernels")).unwrap();
        for e in walk(&art) {
            let rel = e.strip_prefix(&art).unwrap();
            std::fs::copy(&e, d.join(rel)).unwrap();
        }
        d
    };
    let tampered = copy("tampered");
    let p = tampered.join("program.json");
    let s = std::fs::read_to_string(&p)
        .unwrap()
        .replacen("\"Transient\"", "\"Weight\"", 1);
    std::fs::write(&p, s).unwrap();
    fails(
        &run(&tampered),
        &["was modified after it was written: program.json does not match its SHA-256"],
    );
    // a missing file
    let incomplete = copy("incomplete");
    std::fs::remove_file(incomplete.join("graph.fir")).unwrap();
    fails(&run(&incomplete), &["is incomplete: graph.fir is missing"]);
    // another version
    let old = copy("old");
    let p = old.join("manifest.json");
    let s = std::fs::read_to_string(&p).unwrap().replace(
        &format!("\"fulgur_version\": \"{}\"", env!("CARGO_PKG_VERSION")),
        "\"fulgur_version\": \"0.0.1\"",
    );
    std::fs::write(&p, s).unwrap();
    fails(
        &run(&old),
        &[&format!(
            "was written by fulgur 0.0.1 (artifact format {v}); this is fulgur {} (format {v})",
            env!("CARGO_PKG_VERSION"),
            v = fulgur::codegen::artifact::FORMAT_VERSION
        )],
    );
    // not an artifact
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(&run(&empty), &["is not a Fulgur artifact: it has no manifest.json"]);
    assert!(!out.exists(), "an output was written");
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn wrong_weights_and_inputs_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("mlp");
    compile(&"examples/mlp.fir", &art, &[]);
    let mut inputs = read_safetensors(&root().join("examples/mlp.inputs.safetensors")).unwrap();
    let w1 = inputs["w1"].clone();
    inputs.insert("w1".into(), Tensor::from_f64(w1.dtype, vec![128, 64], w1.to_f64()));
    let bad = tmp.path().join("bad.safetensors");
    write_safetensors(&bad, &inputs).unwrap();
    let out = tmp.path().join("y.safetensors");
    let o = fulgur(&[&"run", &art, &"--inputs", &bad, &"--out", &out]);
    fails(
        &o,
        &[
            "weight `w1` in",
            "bad.safetensors: the artifact needs f32[64, 128], the file has shape [128, 64]",
        ],
    );
    // a weight absent
    let mut only_x: BTreeMap<String, Tensor> = BTreeMap::new();
    only_x.insert("x".into(), inputs["x"].clone());
    let x = tmp.path().join("x.safetensors");
    write_safetensors(&x, &only_x).unwrap();
    fails(
        &fulgur(&[&"run", &art, &"--inputs", &x, &"--out", &out]),
        &[
            "weight `w1` (f32[64, 128]) is not in",
            "(give the weights with --weights)",
        ],
    );
    // weights from a checkpoint of another model: the tensor, its file and both shapes named
    let bench = tmp.path().join("bench-s");
    compile(&"models/configs/bench-s.json", &bench, &[]);
    let o = fulgur(&[
        &"run",
        &bench,
        &"--weights",
        &tiny_a(),
        &"--inputs",
        &tiny_a().join("reference.safetensors"),
        &"--out",
        &out,
    ]);
    fails(
        &o,
        &[
            "do not fit artifact",
            "tensor `model.embed_tokens.weight` in",
            "model.safetensors`: expected shape [4096, 512], found [512, 128]",
        ],
    );
    assert!(!out.exists(), "an output was written");
}

/// A symbol no input binds (an `iota` of length `S`) is named when the graph is compiled: such a program
/// could never run.
#[test]
fn an_unbound_symbol_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("unbound.fir");
    std::fs::write(
        &g,
        "graph unbound {\n  %0 = input \"x\" : f32[N]\n  %1 = iota[dtype=i64, shape=[S], axis=0]()\n  output \"y\" = %1\n  output \"z\" = %0\n}\n",
    )
    .unwrap();
    let art = tmp.path().join("a");
    fails(
        &fulgur(&[&"compile", &g, &"-o", &art]),
        &["its size depends on symbol `S`, which no input of graph `unbound` has as a dimension (inputs bind `N`)"],
    );
    assert!(!art.exists());
    // a symbol inside a compound dimension binds nothing: the runtime binds whole dimensions only
    std::fs::write(
        &g,
        "graph unbound {\n  %0 = input \"x\" : f32[2*N]\n  %1 = iota[dtype=i64, shape=[N], axis=0]()\n  output \"y\" = %1\n  output \"z\" = %0\n}\n",
    )
    .unwrap();
    fails(
        &fulgur(&[&"compile", &g, &"-o", &art]),
        &["its size depends on symbol `N`, which no input of graph `unbound` has as a dimension (inputs bind no symbol)"],
    );
    assert!(!art.exists());
}

/// A program whose views leave their buffers (an artifact edited with its hash updated) is refused when it
/// is bound, naming the kernel, never run out of bounds.
#[cfg(feature = "llvm")]
#[test]
fn views_outside_their_buffers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("mlp");
    compile(&"examples/mlp.fir", &art, &[]);
    let p = art.join("program.json");
    let mut prog: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    // the first step kernel's first operand, moved past its buffer's end
    let off = &mut prog["step"][0]["inputs"][0]["offset"];
    let shifted =
        serde_json::from_str::<serde_json::Value>(&serde_json::to_string(&fulgur::ir::Dim::from(1_000_000)).unwrap())
            .unwrap();
    *off = shifted;
    let bytes = serde_json::to_vec_pretty(&prog).unwrap();
    std::fs::write(&p, &bytes).unwrap();
    let m = art.join("manifest.json");
    let mut man: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
    use sha2::Digest;
    let h: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    man["files"]["program.json"] = serde_json::Value::String(h);
    std::fs::write(&m, serde_json::to_vec_pretty(&man).unwrap()).unwrap();
    let out = tmp.path().join("y.safetensors");
    fails(
        &fulgur(&[
            &"run",
            &art,
            &"--inputs",
            &"examples/mlp.inputs.safetensors",
            &"--out",
            &out,
        ]),
        &["kernel k0", "operand 0: its view of buffer", "outside the buffer's"],
    );
    assert!(!out.exists());
}

#[test]
fn an_artifact_holding_other_files_is_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("mlp");
    compile(&"examples/mlp.fir", &art, &[]);
    std::fs::write(art.join("notes.txt"), "mine").unwrap();
    fails(
        &fulgur(&[&"compile", &"examples/mlp.fir", &"-o", &art]),
        &[
            "refusing to replace the artifact",
            "it holds notes.txt, which is not part of the artifact",
        ],
    );
    assert_eq!(std::fs::read_to_string(art.join("notes.txt")).unwrap(), "mine");
}

#[test]
fn a_directory_that_is_not_an_artifact_is_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = tmp.path().join("notes");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("mine.txt"), "keep me").unwrap();
    let o = fulgur(&[&"compile", &"examples/mlp.fir", &"-o", &keep]);
    fails(&o, &["refusing to write the artifact into", "holds no Fulgur artifact"]);
    assert_eq!(std::fs::read_to_string(keep.join("mine.txt")).unwrap(), "keep me");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

/// A bf16 artifact refuses an f32 checkpoint before loading anything, naming the weight and both dtypes;
/// with --convert-weights it converts them and runs.
#[cfg(feature = "llvm")]
#[test]
fn weights_of_another_dtype_are_refused_unless_converted() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("tiny-a.bf16");
    let ta = tiny_a();
    compile(&ta, &art, &["--loss", "--dtype", "bf16"]);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    assert!(
        m["weights"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["ty"].to_string().contains("bf16")),
        "{m}"
    );
    let out = tmp.path().join("o.safetensors");
    let inputs = ta.join("reference.safetensors");
    let o = fulgur(&[&"run", &art, &"--weights", &ta, &"--inputs", &inputs, &"--out", &out]);
    fails(
        &o,
        &[
            "weight `model.embed_tokens.weight`",
            "is stored as f32 but artifact",
            "takes bf16",
            "--convert-weights",
        ],
    );
    assert!(!out.exists(), "nothing is written");
    ok(&fulgur(&[
        &"run",
        &art,
        &"--weights",
        &ta,
        &"--inputs",
        &inputs,
        &"--out",
        &out,
        &"--convert-weights",
    ]));
    let got = read_safetensors(&out).unwrap();
    let want = read_safetensors(&inputs).unwrap();
    let e = got["logits"].rel_l2(&want["logits"]);
    assert!(e < 3e-2, "bf16 logits relative error {e}");
}

/// `compile --target cuda` writes every code's CUDA C++ naming the IR nodes it runs (and, where NVRTC can be
/// opened, its sm_90 cubin), all listed with hashes in the manifest.
#[test]
fn a_cuda_artifact_holds_every_codes_source() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("tiny-a.cuda");
    compile(&tiny_a(), &art, &["--target", "cuda", "--loss"]);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["target"], "cuda");
    let files = m["files"].as_object().unwrap();
    let codes = m["codes"].as_u64().unwrap() as usize;
    assert!(codes > 10, "{codes}");
    for c in 0..codes {
        let src = std::fs::read_to_string(art.join(format!("kernels/code{c}.cu"))).unwrap();
        assert!(src.starts_with(&format!("// Fulgur kernel code {c}: ")), "{src}");
        assert!(src.contains("// IR nodes run by this code"), "{src}");
        assert!(files.contains_key(&format!("kernels/code{c}.cu")));
    }
    let cubins = files.keys().filter(|f| f.ends_with(".sm_90.cubin")).count();
    let codegen = m["codegen"].as_str().unwrap();
    if cubins > 0 {
        assert_eq!(cubins, codes);
        assert!(codegen.starts_with("CUDA C++ compiled for sm_90 by NVRTC"), "{codegen}");
    } else {
        assert!(codegen.starts_with("CUDA C++ (not compiled: "), "{codegen}");
        assert!(
            !std::env::var("FULGUR_REQUIRE_NVRTC").is_ok_and(|v| v == "1"),
            "NVRTC is required here but the artifact has no cubin: {codegen}"
        );
    }
}

/// `compile --graph train`: the training step as an artifact (weights and AdamW moments as inputs and outputs);
/// `run` on tiny-a/train's first batch gives transformers' loss and gradient norm, and the summary line counts
/// the interface instead of listing it.
#[test]
fn a_training_step_artifact_runs() {
    use fulgur::models::checkpoint::Checkpoint;
    use fulgur::models::{forward_graph, ForwardOptions};
    use fulgur::passes::optim::{AdamW, ADAM_M, ADAM_V};
    let dir = tiny_a();
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("train");
    let summary = ok(&fulgur(&[&"compile", &dir, &"--graph", &"train", &"-o", &art]));
    assert!(
        summary.contains("… (121 in all)") && summary.contains("… (119 in all)"),
        "{summary}"
    );
    let ck = Checkpoint::open(&dir).unwrap();
    let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
    let mut inputs: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in ck.load_params(&g).unwrap() {
        let z = Tensor::from_f64(t.dtype, t.shape.clone(), vec![0.0; t.numel()]);
        inputs.insert(format!("{ADAM_M}{name}"), z.clone());
        inputs.insert(format!("{ADAM_V}{name}"), z);
        inputs.insert(name, t);
    }
    let data = read_safetensors(&dir.join("train/train.safetensors")).unwrap();
    let (b, t) = (data["input_ids"].shape[1], data["input_ids"].shape[2]);
    inputs.insert(
        "input_ids".into(),
        Tensor::from_i64(
            fulgur::ir::DType::I64,
            vec![b, t],
            data["input_ids"].to_i64()[..b * t].to_vec(),
        ),
    );
    for (n, v) in AdamW::default().scalars(0.01, 1) {
        inputs.insert(n.into(), Tensor::from_f64(fulgur::ir::DType::F32, vec![], vec![v]));
    }
    let inp = tmp.path().join("in.safetensors");
    write_safetensors(&inp, &inputs).unwrap();
    let out = tmp.path().join("out.safetensors");
    ok(&fulgur(&[&"run", &art, &"--inputs", &inp, &"--out", &out]));
    let got = read_safetensors(&out).unwrap();
    let (l, wl) = (got["loss"].to_f64()[0], data["loss"].to_f64()[0]);
    let (n, wn) = (got["grad_norm"].to_f64()[0], data["grad_norm"].to_f64()[0]);
    assert!((l - wl).abs() < 1e-5, "loss {l} vs {wl}");
    assert!((n - wn).abs() < 1e-4 * wn, "grad norm {n} vs {wn}");
}

/// `compile --graph train --dtype bf16` is the step `fulgur train --dtype bf16` runs: weights and AdamW moments
/// stay f32 inputs and outputs (master weights), the forward and backward compute in bf16; the moments were
/// converted to bf16 with the rest of the graph before.
#[test]
fn a_bf16_training_step_artifact_keeps_f32_master_weights_and_moments() {
    let dir = tiny_a();
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("train16");
    ok(&fulgur(&[
        &"compile", &dir, &"--graph", &"train", &"--dtype", &"bf16", &"-o", &art,
    ]));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    let dtype_of = |list: &str, name: &str| -> String {
        m[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|io| io["name"] == name)
            .unwrap_or_else(|| panic!("no {list} {name}"))["ty"]["dtype"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for name in [
        "model.embed_tokens.weight",
        "adam_m.model.embed_tokens.weight",
        "adam_v.lm_head.weight",
    ] {
        assert_eq!(dtype_of("inputs", name), "f32", "input {name}");
        assert_eq!(dtype_of("outputs", name), "f32", "output {name}");
    }
    let graph = std::fs::read_to_string(art.join("graph.fir")).unwrap();
    assert!(graph.contains("bf16"), "the step computes in bf16");
}
