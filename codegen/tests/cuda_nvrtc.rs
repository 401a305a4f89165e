//! Every CUDA kernel Fulgur generates compiles with NVRTC for `sm_90`: the forward graph (with loss) of every
//! config in `models/configs/`, unoptimized and optimized (and stored in bf16), its optimized decode step, and
//! the training steps of the small configs in f32 and bf16. Needs only
//! `libnvrtc` (no GPU): CI installs it from PyPI. Without it the test says why and passes, unless
//! `FULGUR_REQUIRE_NVRTC=1` or `FULGUR_REQUIRE_GPU=1` is set.
#![cfg(feature = "cuda")]
use fulgur_codegen::compile::{compile, CompileOptions, OptLevel};
use fulgur_codegen::cuda::emit_program;
use fulgur_codegen::kernels::{build_program_for, Target};
use fulgur_codegen::nvrtc;
use fulgur_codegen::program::lower;
use fulgur_models::{decode_graph, forward_graph, ForwardOptions, MiniMaxConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn nvrtc_or_skip() -> bool {
    match nvrtc::available() {
        Ok(v) => {
            eprintln!("NVRTC {}.{}", v.0, v.1);
            true
        }
        Err(why) => {
            let required = ["FULGUR_REQUIRE_NVRTC", "FULGUR_REQUIRE_GPU"]
                .iter()
                .any(|v| std::env::var(v).is_ok_and(|x| x == "1"));
            assert!(!required, "NVRTC is required here: {why}");
            eprintln!("skipped: {why}");
            false
        }
    }
}

#[test]
fn every_kernel_of_every_config_compiles_for_sm_90() {
    if !nvrtc_or_skip() {
        return;
    }
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut configs: Vec<PathBuf> = std::fs::read_dir(root.join("models/configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    configs.sort();
    assert!(configs.len() >= 4, "configs: {configs:?}");
    // every distinct source, with where it came from
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    let mut programs = 0;
    for path in &configs {
        let cfg = MiniMaxConfig::from_file(path).unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let fwd = forward_graph(
            &cfg,
            &ForwardOptions {
                loss: true,
                ..Default::default()
            },
        )
        .unwrap();
        let dec = decode_graph(&cfg).unwrap();
        let full = |g: &fulgur_ir::Graph| {
            let opts = CompileOptions {
                opt: OptLevel::Full,
                ..CompileOptions::default()
            };
            compile(g, &opts, None).unwrap().graph
        };
        // the training step as `fulgur train` builds it (its backward composites' kernels), for the small
        // configs (the full model's kernels are the same codes at other sizes)
        let train = (!name.contains("text-01")).then(|| {
            let hp = fulgur_passes::optim::AdamW::default();
            fulgur_passes::optim::train_step(&full(&fwd), "loss", &hp).unwrap()
        });
        let mut graphs = vec![
            ("forward, unoptimized", &fwd, OptLevel::None),
            ("forward", &fwd, OptLevel::Full),
            ("decode", &dec, OptLevel::Full),
        ];
        if let Some(t) = &train {
            graphs.push(("training step", t, OptLevel::Full));
        }
        // bf16 storage (`--dtype bf16`: the optimized graph stored in bf16, which takes the templates' bf16
        // forms such as the tensor-core flash attention), for the small configs
        let bf16 = (!name.contains("text-01")).then(|| {
            use fulgur_passes::precision::{keep_f32, store_as};
            store_as(&full(&fwd), fulgur_ir::DType::BF16, &keep_f32).unwrap()
        });
        if let Some(b) = &bf16 {
            graphs.push(("forward, bf16", b, OptLevel::None));
        }
        // the bf16 training step (f32 master weights), as `fulgur train --dtype bf16` builds it: its backward
        // takes the tensor-core `flash_attention_grad`
        let train_bf16 = (!name.contains("text-01")).then(|| {
            use fulgur_passes::precision::{keep_f32, master_weights, store_as};
            let stored = master_weights(&store_as(&full(&fwd), fulgur_ir::DType::BF16, &keep_f32).unwrap()).unwrap();
            fulgur_passes::optim::train_step(&stored, "loss", &fulgur_passes::optim::AdamW::default()).unwrap()
        });
        if let Some(t) = &train_bf16 {
            graphs.push(("training step, bf16", t, OptLevel::Full));
        }
        for (what, g, opt) in graphs {
            let og = compile(
                g,
                &CompileOptions {
                    opt,
                    ..CompileOptions::default()
                },
                None,
            )
            .unwrap()
            .graph;
            let p = lower(&og).unwrap();
            let mut kernels = build_program_for(&p, Target::Cuda).unwrap();
            let cuda = emit_program(&p, &mut kernels).unwrap();
            assert_eq!(cuda.len(), p.codes);
            programs += 1;
            for c in cuda {
                // the header names the IR nodes the code runs
                assert!(c.source.contains("// IR nodes run by this code"), "{}", c.source);
                sources
                    .entry(c.source)
                    .or_insert_with(|| format!("{name} ({what}) {}", c.file));
            }
        }
    }
    let work: Vec<(&String, &String)> = sources.iter().map(|(s, w)| (w, s)).collect();
    let t = std::time::Instant::now();
    let failures: Vec<String> = std::thread::scope(|sc| {
        let chunks: Vec<_> = work.chunks(work.len().div_ceil(2).max(1)).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                sc.spawn(move || {
                    chunk
                        .iter()
                        .filter_map(|(what, src)| nvrtc::compile(what, src, "sm_90", None).err().map(|e| e.to_string()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    eprintln!(
        "{} programs, {} distinct kernel sources compiled for sm_90 in {:.1}s",
        programs,
        work.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        work.len(),
        failures.join("\n\n")
    );
}

#[test]
fn a_kernel_that_does_not_compile_is_named_with_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let e = nvrtc::compile(
        "code7.cu",
        "extern \"C\" __global__ void f() { undeclared = 1; }",
        "sm_90",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("NVRTC could not compile code7.cu for sm_90"), "{e}");
    assert!(e.contains("undeclared"), "{e}");
}

#[test]
fn compiled_kernels_are_cached_by_source_and_architecture() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = "extern \"C\" __global__ void f(float* x) { x[threadIdx.x] *= 2.0f; }";
    let a = nvrtc::compile("a.cu", src, "sm_90", Some(dir.path())).unwrap();
    assert!(!a.cached && !a.cubin.is_empty());
    let b = nvrtc::compile("a.cu", src, "sm_90", Some(dir.path())).unwrap();
    assert!(b.cached);
    assert_eq!(a.cubin, b.cubin);
    let c = nvrtc::compile("a.cu", src, "sm_80", Some(dir.path())).unwrap();
    assert!(!c.cached, "another architecture is another entry");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}
