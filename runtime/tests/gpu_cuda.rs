//! The CUDA backend on the GPU: tiny-a against transformers (f32: logits and hidden states within 1e-4
//! relative, the loss within 1e-5), greedy decoding with the same tokens, every generated kernel of the small
//! model against the interpreter on the data of a real run, the model against the f64 interpreter at awkward
//! sizes, and the errors of bad input.
//!
//! Without a GPU each test says why and passes; with `FULGUR_REQUIRE_GPU=1` (set by gpu-pack's runner) a
//! missing GPU fails it.
#![cfg(feature = "cuda")]
use fulgur_codegen::compile::{compile, CompileOptions, OptLevel};
use fulgur_codegen::program::lower;
use fulgur_ir::{Graph, Interpreter, Precision, Tensor};
use fulgur_models::checkpoint::Checkpoint;
use fulgur_models::{decode_graph, forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur_passes::testing::random_inputs;
use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
use fulgur_runtime::generate;
use std::collections::HashMap;
use std::path::PathBuf;

mod common;
use common::gpu;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn optimized(g: &Graph, opt: OptLevel) -> Graph {
    compile(
        g,
        &CompileOptions {
            opt,
            target: "H200".into(),
            ..CompileOptions::default()
        },
        None,
    )
    .unwrap()
    .graph
}

#[test]
fn gpu_tiny_a_f32_matches_transformers() {
    if !gpu() {
        return;
    }
    let dir = fulgur_models::fixtures::dir().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let reference = fulgur_ir::tensor::read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            hidden_states: true,
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let weights = ck.load_params(&g).unwrap();
    for opt in [OptLevel::None, OptLevel::Full] {
        let og = optimized(&g, opt);
        let mut gpu = CudaProgram::new(lower(&og).unwrap(), CudaOptions::default()).unwrap();
        gpu.load_weights(&weights).unwrap();
        let out = gpu
            .run(&[("input_ids".to_string(), reference["input_ids"].clone())].into())
            .unwrap();
        let mut worst = 0f64;
        for i in 0..=ck.config.num_hidden_layers {
            let name = format!("hidden_states.{i}");
            let e = out[&name].rel_l2(&reference[&name]);
            worst = worst.max(e);
            assert!(e < 1e-4, "{opt:?} {name}: relative error {e}");
        }
        let e = out["logits"].rel_l2(&reference["logits"]);
        assert!(e < 1e-4, "{opt:?} logits: relative error {e}");
        let (a, b) = (out["loss"].to_f64()[0], reference["loss"].to_f64()[0]);
        println!(
            "{opt:?}: logits rel {e:.3e}, worst hidden state rel {worst:.3e}, loss {a} (transformers {b}), \
             step {:.3} ms",
            gpu.last_step_ms
        );
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{opt:?} loss {a} vs reference {b}"
        );
    }
}

/// tiny-a's training graph (`fulgur_passes::autodiff`) on the GPU in f32, unoptimized and optimized: every
/// parameter's gradient within 1e-4 of transformers' (`grads.safetensors`).
#[test]
fn gpu_tiny_a_gradients_match_transformers() {
    use fulgur_passes::autodiff::{differentiate, GradOptions, GRAD_PREFIX};
    if !gpu() {
        return;
    }
    let dir = fulgur_models::fixtures::dir().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let reference = fulgur_ir::tensor::read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let want = fulgur_ir::tensor::read_safetensors(&dir.join("grads.safetensors")).unwrap();
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let dg = differentiate(&g, "loss", &GradOptions::default()).unwrap();
    // what the training commands run: the optimized forward differentiated (its composites' backward
    // composites: flash_attention_grad, grouped_matmul_wgrad, lightning attention on reversed time), optimized
    let composite_bwd = optimized(
        &differentiate(&optimized(&g, OptLevel::Full), "loss", &GradOptions::default()).unwrap(),
        OptLevel::Full,
    );
    let weights = ck.load_params(&g).unwrap();
    for (opt, og) in [
        (OptLevel::None, optimized(&dg, OptLevel::None)),
        (OptLevel::Full, optimized(&dg, OptLevel::Full)),
        (OptLevel::Full, composite_bwd),
    ] {
        let mut gpu = CudaProgram::new(lower(&og).unwrap(), CudaOptions::default()).unwrap();
        gpu.load_weights(&weights).unwrap();
        let out = gpu
            .run(&[("input_ids".to_string(), reference["input_ids"].clone())].into())
            .unwrap();
        let mut worst = (0.0f64, String::new());
        for (name, w) in &want {
            let e = out[&format!("{GRAD_PREFIX}{name}")].rel_l2(w);
            if e > worst.0 || e.is_nan() {
                worst = (e, name.clone());
            }
        }
        println!(
            "{opt:?}: {} kernels, worst gradient rel {:.3e} ({}), step {:.3} ms",
            gpu.program.step.len(),
            worst.0,
            worst.1,
            gpu.last_step_ms
        );
        assert!(worst.0 < 1e-4, "{opt:?}: `{}` relative error {}", worst.1, worst.0);
    }
}

#[test]
fn gpu_tiny_a_greedy_decode_matches_transformers() {
    if !gpu() {
        return;
    }
    let dir = fulgur_models::fixtures::dir().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let fx = fulgur_ir::tensor::read_safetensors(&dir.join("decode.safetensors")).unwrap();
    let prefill = optimized(
        &forward_graph(
            &ck.config,
            &ForwardOptions {
                states: true,
                ..Default::default()
            },
        )
        .unwrap(),
        OptLevel::Full,
    );
    let decode = optimized(&decode_graph(&ck.config).unwrap(), OptLevel::Full);
    let weights = ck.load_params(&prefill).unwrap();
    let mut p = CudaProgram::new(lower(&prefill).unwrap(), CudaOptions::default()).unwrap();
    let mut d = CudaProgram::new(lower(&decode).unwrap(), CudaOptions::default()).unwrap();
    p.load_weights(&weights).unwrap();
    assert_eq!(
        d.share_weights(&p),
        d.program.params.len(),
        "every decode weight is shared"
    );
    let n = fx["step_logits"].shape[0];
    let out = generate::greedy(&mut p, &mut d, &fx["prompt"], n, |_, _| {}).unwrap();
    assert_eq!((p.prepare_runs(), d.prepare_runs()), (1, 1));
    assert_eq!(out.generated.to_i64(), fx["generated"].to_i64(), "greedy tokens differ");
    let e = out.step_logits.rel_l2(&fx["step_logits"]);
    println!("cuda step_logits: rel {e:.3e}");
    assert!(e < 1e-4, "step_logits relative error {e}");
}

/// The relative L2 error of `got` over the finite elements of `want`; NaN when a non-finite element of
/// `want` (a masked score's −∞) is not matched exactly, or a finite one is not finite in `got`.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    if got.shape != want.shape {
        return f64::NAN;
    }
    let (g, w) = (got.to_f64(), want.to_f64());
    let (mut num, mut den) = (0.0, 0.0);
    for (a, b) in g.iter().zip(&w) {
        if !b.is_finite() {
            if !(a == b || (a.is_nan() && b.is_nan())) {
                return f64::NAN;
            }
        } else {
            if !a.is_finite() {
                return f64::NAN;
            }
            num += (a - b) * (a - b);
            den += b * b;
        }
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Runs `op` on `args` through the interpreter in f64.
fn interp_op(op: &fulgur_ir::Op, args: &[Tensor]) -> Vec<Tensor> {
    use fulgur_ir::{Dim, Value};
    let mut g = Graph::new("k");
    let mut ins = Vec::new();
    let mut feed = HashMap::new();
    for (i, t) in args.iter().enumerate() {
        let name = format!("i{i}");
        ins.push(
            g.input(&name, t.dtype, t.shape.iter().map(|&d| Dim::from(d as i64)).collect())
                .unwrap(),
        );
        feed.insert(name, t.clone());
    }
    let id = g.add_node(op.clone(), &ins, None).unwrap();
    let n = g.node(id).outputs.len();
    for i in 0..n {
        g.add_output(format!("o{i}"), Value::new(id, i as u32)).unwrap();
    }
    let out = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
    (0..n).map(|i| out[&format!("o{i}")].clone()).collect()
}

/// The small model at B 2, T 7 (sizes no tile divides), unoptimized and optimized: every step kernel on the
/// inputs it saw against the interpreter running its op, and every output against the f64 interpreter.
#[test]
fn gpu_every_kernel_of_the_small_model_matches_the_interpreter() {
    if !gpu() {
        return;
    }
    let cfg = MiniMaxConfig::from_file(&root().join("models/configs/minimax-small.json")).unwrap();
    let g = forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            hidden_states: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut bad = Vec::new();
    for opt in [OptLevel::None, OptLevel::Full] {
        let og = optimized(&g, opt);
        let p = lower(&og).unwrap();
        let env: HashMap<String, i64> = [("B".to_string(), 2), ("T".to_string(), 7)].into();
        let mut ins = random_inputs(&og, &env, 3, cfg.vocab_size as i64);
        for (name, t) in ins.iter_mut() {
            if !name.ends_with("norm.weight") && !name.ends_with("layernorm.weight") {
                if let fulgur_ir::Buffer::F(v) = &mut t.data {
                    v.iter_mut()
                        .for_each(|x| *x = fulgur_ir::tensor::round_to(t.dtype, *x * 0.2));
                }
            }
        }
        let mut gpu = CudaProgram::new(p.clone(), CudaOptions::default()).unwrap();
        let weights: HashMap<String, Tensor> = p
            .params
            .iter()
            .map(|io| (io.name.clone(), ins[&io.name].clone()))
            .collect();
        gpu.load_weights(&weights).unwrap();
        let data: HashMap<String, Tensor> = p
            .inputs
            .iter()
            .map(|io| (io.name.clone(), ins[&io.name].clone()))
            .collect();
        let dims: HashMap<String, fulgur_ir::Dim> =
            env.iter().map(|(k, v)| (k.clone(), fulgur_ir::Dim::from(*v))).collect();
        let got = gpu
            .run_traced(&data, |k, a, o| {
                let want = interp_op(&k.op.substitute_dims(&dims), a);
                for (i, (w, g)) in want.iter().zip(o).enumerate() {
                    let r = rel_err(g, w);
                    if r.is_nan() || r >= 1e-5 {
                        bad.push(format!(
                            "{opt:?} k{} {} ({}) out {i}: rel {r:.3e}",
                            k.id,
                            k.name,
                            fulgur_codegen::program::op_summary(&k.op)
                        ));
                    }
                }
                Ok(())
            })
            .unwrap();
        let want = Interpreter::new(Precision::F64).run(&og, &ins).unwrap();
        for (name, w) in &want {
            let r = rel_err(&got[name], w);
            if r.is_nan() || r >= 1e-4 {
                bad.push(format!("{opt:?} output {name}: rel {r:.3e}"));
            }
        }
        // a second plain run gives the same outputs (no state leaks between calls)
        let again = gpu.run(&data).unwrap();
        for (name, t) in &again {
            assert_eq!(t.to_f64(), got[name].to_f64(), "{opt:?} {name} differs between runs");
        }
    }
    assert!(bad.is_empty(), "{} mismatches:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn gpu_a_token_out_of_range_is_an_error_naming_the_kernel() {
    if !gpu() {
        return;
    }
    let cfg = MiniMaxConfig::from_file(&root().join("models/configs/minimax-small.json")).unwrap();
    let g = forward_graph(&cfg, &ForwardOptions::default()).unwrap();
    let og = optimized(&g, OptLevel::Full);
    let p = lower(&og).unwrap();
    let env: HashMap<String, i64> = [("B".to_string(), 1), ("T".to_string(), 4)].into();
    let ins = random_inputs(&og, &env, 5, cfg.vocab_size as i64);
    let mut gpu = CudaProgram::new(p.clone(), CudaOptions::default()).unwrap();
    gpu.load_weights(
        &p.params
            .iter()
            .map(|io| (io.name.clone(), ins[&io.name].clone()))
            .collect(),
    )
    .unwrap();
    let bad = Tensor::from_i64(
        fulgur_ir::DType::I64,
        vec![1, 4],
        vec![1, 2, cfg.vocab_size as i64 + 7, 3],
    );
    let e = gpu
        .run(&[("input_ids".to_string(), bad)].into())
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("kernel k"), "{e}");
    assert!(e.contains(&format!("got {}", cfg.vocab_size + 7)), "{e}");
    // the program still runs good input afterwards
    let good = Tensor::from_i64(fulgur_ir::DType::I64, vec![1, 4], vec![1, 2, 3, 4]);
    gpu.run(&[("input_ids".to_string(), good)].into()).unwrap();
}

#[test]
fn gpu_check_finite_names_the_first_kernel_with_a_nan() {
    if !gpu() {
        return;
    }
    let cfg = MiniMaxConfig::from_file(&root().join("models/configs/minimax-small.json")).unwrap();
    let g = forward_graph(&cfg, &ForwardOptions::default()).unwrap();
    let og = optimized(&g, OptLevel::Full);
    let p = lower(&og).unwrap();
    let env: HashMap<String, i64> = [("B".to_string(), 1), ("T".to_string(), 4)].into();
    let ins = random_inputs(&og, &env, 5, cfg.vocab_size as i64);
    let mut weights: HashMap<String, Tensor> = p
        .params
        .iter()
        .map(|io| (io.name.clone(), ins[&io.name].clone()))
        .collect();
    // a NaN in the embedding row of token 2
    let emb = weights.get_mut("model.embed_tokens.weight").unwrap();
    let c = emb.shape[1];
    if let fulgur_ir::Buffer::F(v) = &mut emb.data {
        v[2 * c] = f64::NAN;
    }
    let mut gpu = CudaProgram::new(
        p.clone(),
        CudaOptions {
            check_finite: true,
            ..Default::default()
        },
    )
    .unwrap();
    gpu.load_weights(&weights).unwrap();
    let toks = Tensor::from_i64(fulgur_ir::DType::I64, vec![1, 4], vec![1, 2, 3, 4]);
    let e = gpu
        .run(&[("input_ids".to_string(), toks)].into())
        .unwrap_err()
        .to_string();
    // the first kernel to see the NaN is the first to read the embedding table
    let table = p
        .params
        .iter()
        .find(|io| io.name == "model.embed_tokens.weight")
        .unwrap()
        .tensor
        .buffer;
    let first = p
        .step
        .iter()
        .find(|k| k.inputs.iter().any(|t| t.buffer == table))
        .expect("a kernel reads the embedding table");
    assert!(e.starts_with(&format!("kernel k{} ({}", first.id, first.name)), "{e}");
    assert!(e.contains("produced NaN"), "{e}");
}

#[test]
fn gpu_tiny_a_bf16_is_within_3e_2_of_transformers() {
    if !gpu() {
        return;
    }
    let dir = fulgur_models::fixtures::dir().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let reference = fulgur_ir::tensor::read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
    // stored as bf16 after the optimizer: its kernels keep their intermediates in f32
    let og = optimized(&g, OptLevel::Full);
    let og =
        fulgur_passes::precision::store_as(&og, fulgur_ir::DType::BF16, &fulgur_passes::precision::keep_f32).unwrap();
    let p = lower(&og).unwrap();
    assert!(p.params.iter().all(|io| io.ty.dtype == fulgur_ir::DType::BF16));
    let mut gpu = CudaProgram::new(p, CudaOptions::default()).unwrap();
    gpu.load_weights(&ck.load_params(&og).unwrap()).unwrap();
    let out = gpu
        .run(&[("input_ids".to_string(), reference["input_ids"].clone())].into())
        .unwrap();
    assert_eq!(out["logits"].dtype, fulgur_ir::DType::BF16);
    let e = out["logits"].rel_l2(&reference["logits"]);
    println!("bf16 logits: rel {e:.3e} against transformers' f32");
    assert!(e < 3e-2, "bf16 logits relative error {e}");
}

/// The decode step captured as a CUDA graph each step (the instantiated graph updated in place) gives the
/// tokens of the eager launches and of transformers.
#[test]
fn gpu_tiny_a_decode_under_cuda_graphs_gives_the_same_tokens() {
    if !gpu() {
        return;
    }
    let dir = fulgur_models::fixtures::dir().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let fx = fulgur_ir::tensor::read_safetensors(&dir.join("decode.safetensors")).unwrap();
    let prefill = optimized(
        &forward_graph(
            &ck.config,
            &ForwardOptions {
                states: true,
                ..Default::default()
            },
        )
        .unwrap(),
        OptLevel::Full,
    );
    let decode = optimized(&decode_graph(&ck.config).unwrap(), OptLevel::Full);
    let weights = ck.load_params(&prefill).unwrap();
    let n = fx["step_logits"].shape[0];
    let mut runs = Vec::new();
    for graphs in [false, true] {
        let mut p = CudaProgram::new(lower(&prefill).unwrap(), CudaOptions::default()).unwrap();
        let mut d = CudaProgram::new(
            lower(&decode).unwrap(),
            CudaOptions {
                graphs,
                ..Default::default()
            },
        )
        .unwrap();
        p.load_weights(&weights).unwrap();
        d.share_weights(&p);
        let out = generate::greedy(&mut p, &mut d, &fx["prompt"], n, |_, _| {}).unwrap();
        assert_eq!(
            d.carried_runs,
            n - 2,
            "decode steps that kept their states on the device"
        );
        if graphs {
            assert_eq!(d.graph_launches, n - 1, "every decode step ran as a graph");
            println!("graph updates in place: {} of {}", d.graph_updates, d.graph_launches);
        }
        assert_eq!(
            out.generated.to_i64(),
            fx["generated"].to_i64(),
            "graphs {graphs}: greedy tokens differ"
        );
        runs.push(out);
    }
    let e = runs[1].step_logits.rel_l2(&runs[0].step_logits);
    println!("step logits, graphs against eager: rel {e:.3e}");
    assert!(e < 1e-5, "graph replay changed the logits by {e}");
}

/// Random data with a fixed seed: values in [-1, 1).
fn random(dtype: fulgur_ir::DType, shape: Vec<usize>, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let v = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_f64(dtype, shape, v)
}

/// One op through the CUDA backend (its program lowered from a one-node graph) against the interpreter in f64.
fn gpu_op_error(op: fulgur_ir::Op, args: Vec<Tensor>) -> f64 {
    use fulgur_ir::{Dim, Value};
    let mut g = Graph::new("op");
    let mut ins = Vec::new();
    let mut feed = HashMap::new();
    for (i, t) in args.iter().enumerate() {
        let name = format!("i{i}");
        ins.push(
            g.input(&name, t.dtype, t.shape.iter().map(|&d| Dim::from(d as i64)).collect())
                .unwrap(),
        );
        feed.insert(name, t.clone());
    }
    let id = g.add_node(op.clone(), &ins, None).unwrap();
    g.add_output("o", Value::new(id, 0)).unwrap();
    let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
    let mut gpu = CudaProgram::new(lower(&g).unwrap(), CudaOptions::default()).unwrap();
    let got = gpu.run(&feed).unwrap();
    rel_err(&got["o"], &want["o"])
}

/// The flash-attention template past one tile of queries and keys (150 rows: two full tiles and a partial
/// one), grouped KV heads by broadcasting, causal with rope, and plain with more keys than queries.
#[test]
fn gpu_flash_attention_matches_the_interpreter_past_one_tile() {
    use fulgur_ir::{Composite, DType, Op};
    if !gpu() {
        return;
    }
    let (b, kvh, grp, t, d) = (2, 2, 3, 150, 32);
    let q = random(DType::F32, vec![b, kvh, grp, t, d], 1);
    let k = random(DType::F32, vec![b, kvh, 1, t, d], 2);
    let v = random(DType::F32, vec![b, kvh, 1, t, 48], 3);
    let r = 16;
    let ang: Vec<f64> = (0..t * r)
        .map(|x| (x / r) as f64 * 0.01 * ((x % r) as f64 + 1.0))
        .collect();
    let cos = Tensor::from_f64(DType::F32, vec![t, r], ang.iter().map(|a| a.cos()).collect());
    let sin = Tensor::from_f64(DType::F32, vec![t, r], ang.iter().map(|a| a.sin()).collect());
    let e = gpu_op_error(
        Op::Composite(Composite::FlashAttentionRope {
            scale: 0.17,
            causal: true,
            rotary: r,
        }),
        vec![q.clone(), k.clone(), v.clone(), cos, sin],
    );
    println!("flash_attention_rope, causal, T 150: rel {e:.3e}");
    assert!(e < 1e-5, "relative error {e}");
    // head dim 128 (bench-m's): the template needs 96 KiB of shared memory, past the default 48 KiB
    let q3 = random(DType::F32, vec![1, 2, 2, 70, 128], 9);
    let k3 = random(DType::F32, vec![1, 2, 1, 70, 128], 10);
    let v3 = random(DType::F32, vec![1, 2, 1, 70, 128], 11);
    let e = gpu_op_error(
        Op::Composite(Composite::FlashAttention {
            scale: 0.09,
            causal: true,
        }),
        vec![q3, k3, v3],
    );
    println!("flash_attention, D 128: rel {e:.3e}");
    assert!(e < 1e-5, "D 128: relative error {e}");
    // more keys than queries (a chunk after a cached prefix): the causal limit shifts by S − T
    let q2 = random(DType::F32, vec![b, kvh, grp, 70, d], 4);
    for causal in [true, false] {
        let e = gpu_op_error(
            Op::Composite(Composite::FlashAttention { scale: 0.2, causal }),
            vec![q2.clone(), k.clone(), v.clone()],
        );
        println!("flash_attention, causal {causal}, T 70, S 150: rel {e:.3e}");
        assert!(e < 1e-5, "causal {causal}: relative error {e}");
    }
}

/// The tensor-core form of the flash-attention template (bf16 q, k and v): head dims 64 and 128, a partial
/// last tile (150 rows), grouped KV heads, causal with rope, more keys than queries, against the interpreter
/// in f64 on the same bf16 inputs. The form rounds the rotated q and k and the probabilities to bf16 before
/// the tensor cores multiply them (`docs/numerics.md`): a few 1e-3 relative, where an error of the tiling or
/// the masking is of order one.
#[test]
fn gpu_bf16_flash_attention_on_tensor_cores_matches_the_interpreter() {
    use fulgur_ir::{Composite, DType, Op};
    if !gpu() {
        return;
    }
    let bf = DType::BF16;
    for (d, r) in [(128, 64), (64, 32)] {
        let (kvh, grp, t) = (2, 2, 150);
        let q = random(bf, vec![1, kvh, grp, t, d], 21);
        let k = random(bf, vec![1, kvh, 1, t, d], 22);
        let v = random(bf, vec![1, kvh, 1, t, d], 23);
        let ang: Vec<f64> = (0..t * r)
            .map(|x| (x / r) as f64 * 0.01 * ((x % r) as f64 + 1.0))
            .collect();
        let cos = Tensor::from_f64(bf, vec![t, r], ang.iter().map(|a| a.cos()).collect());
        let sin = Tensor::from_f64(bf, vec![t, r], ang.iter().map(|a| a.sin()).collect());
        let e = gpu_op_error(
            Op::Composite(Composite::FlashAttentionRope {
                scale: 1.0 / (d as f64).sqrt(),
                causal: true,
                rotary: r,
            }),
            vec![q.clone(), k.clone(), v.clone(), cos, sin],
        );
        println!("bf16 flash_attention_rope, D {d}, causal, T 150: rel {e:.3e}");
        assert!(e < 1e-2, "D {d}: relative error {e}");
        let q2 = random(bf, vec![1, kvh, grp, 70, d], 24);
        for causal in [true, false] {
            let e = gpu_op_error(
                Op::Composite(Composite::FlashAttention { scale: 0.3, causal }),
                vec![q2.clone(), k.clone(), v.clone()],
            );
            println!("bf16 flash_attention, D {d}, causal {causal}, T 70, S 150: rel {e:.3e}");
            assert!(e < 1e-2, "D {d}, causal {causal}: relative error {e}");
        }
    }
}

/// The tensor-core form of `flash_attention_grad` (bf16 `q`, `k`, `v`, `do`): head dims 128 and 64, a partial
/// last tile (150 query rows), grouped KV heads, causal and plain, more keys than queries, and a `q` read
/// through a transposed view (the tile loads' element-by-element path), against the interpreter in f64 on
/// the same bf16 inputs; two runs give the same bits (every gradient written once, no atomics). The form
/// rounds the probabilities and dS to bf16 for the tensor cores (`docs/numerics.md`): a few 1e-3 relative,
/// where an error of the tiling, the masking or the head grouping is of order one.
#[test]
fn gpu_bf16_flash_attention_grad_on_tensor_cores_matches_the_interpreter() {
    use fulgur_ir::{Composite, DType, Dim, Op, Value};
    if !gpu() {
        return;
    }
    let bf = DType::BF16;
    for (d, t, s, causal, transposed) in [
        (128usize, 150usize, 150usize, true, false),
        (64, 70, 150, true, false),
        (64, 150, 70, false, false),
        (128, 100, 130, true, true),
    ] {
        let (kvh, grp) = (2usize, 3usize);
        let dims = |v: &[usize]| v.iter().map(|&x| Dim::from(x as i64)).collect::<Vec<_>>();
        let mut g = Graph::new("flash_grad_bf16");
        let q_shape = if transposed {
            vec![1, kvh, grp, d, t]
        } else {
            vec![1, kvh, grp, t, d]
        };
        let shapes = [
            q_shape,
            vec![1, kvh, 1, s, d],
            vec![1, kvh, 1, s, d],
            vec![1, kvh, grp, t, d],
        ];
        let mut feed = HashMap::new();
        let mut ins = Vec::new();
        for (i, sh) in shapes.iter().enumerate() {
            let name = format!("i{i}");
            ins.push(g.input(&name, bf, dims(sh)).unwrap());
            feed.insert(name, random(bf, sh.clone(), 90 + i as u64));
        }
        if transposed {
            ins[0] = g.transpose(ins[0], -2, -1).unwrap();
        }
        let scale = 1.0 / (d as f64).sqrt();
        let id = g
            .add_node(
                Op::Composite(Composite::FlashAttentionGrad { scale, causal }),
                &ins,
                None,
            )
            .unwrap();
        for (i, n) in ["dq", "dk", "dv"].iter().enumerate() {
            g.add_output(*n, Value::new(id, i as u32)).unwrap();
        }
        let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
        let mut gpu = CudaProgram::new(lower(&g).unwrap(), CudaOptions::default()).unwrap();
        let got = gpu.run(&feed).unwrap();
        let again = gpu.run(&feed).unwrap();
        for n in ["dq", "dk", "dv"] {
            let e = rel_err(&got[n], &want[n]);
            println!("bf16 flash_attention_grad D {d} T {t} S {s} causal {causal} transposed q {transposed}: {n} rel {e:.3e}");
            assert!(e < 1e-2, "D {d} T {t} S {s} causal {causal}: {n} relative error {e}");
            assert_eq!(got[n].to_f64(), again[n].to_f64(), "{n} differs between two runs");
        }
    }
}

/// Lightning attention with bf16 inputs stages its operands in bf16 for the tensor cores (`kernels::native`):
/// `lightning_attention` over three blocks (the last partial) with two decay rates, and `lightning_layer`
/// (silu on q, k and v, the state, RMSNorm over the heads, the sigmoid gate), against the interpreter in f64 on
/// the same bf16 inputs. The decayed operands and the staged state are rounded to bf16 (`docs/numerics.md`):
/// a few 1e-3 relative, where an error of the blocking or the state carried across blocks is of order one.
#[test]
fn gpu_bf16_lightning_on_tensor_cores_matches_the_interpreter() {
    use fulgur_ir::{Composite, DType, Op};
    if !gpu() {
        return;
    }
    let bf = DType::BF16;
    let (h, t, d) = (2usize, 150usize, 64usize);
    let lam = Tensor::from_f64(bf, vec![h, 1, 1], vec![0.05, 0.3]);
    let e = gpu_op_error(
        Op::Composite(Composite::LightningAttention { block: 64 }),
        vec![
            random(bf, vec![1, h, t, d], 31),
            random(bf, vec![1, h, t, d], 32),
            random(bf, vec![1, h, t, d], 33),
            lam.clone(),
        ],
    );
    println!("bf16 lightning_attention, T {t}, D {d}: rel {e:.3e}");
    assert!(e < 1e-2, "lightning_attention: relative error {e}");
    // the tensor-core template's other shapes: a key dim of 128 (two m16 tiles of the state a warp), value
    // dims of 128 (two blocks of columns per sequence-head) and 32, a batch of two, a partial last block
    for (dv, t2) in [(128usize, 200usize), (32, 64)] {
        let lam2 = Tensor::from_f64(bf, vec![h, 1, 1], vec![0.02, 0.7]);
        let e = gpu_op_error(
            Op::Composite(Composite::LightningAttention { block: 64 }),
            vec![
                random(bf, vec![2, h, t2, 128], 41),
                random(bf, vec![2, h, t2, 128], 42),
                random(bf, vec![2, h, t2, dv], 43),
                lam2,
            ],
        );
        println!("bf16 lightning_attention, T {t2}, D 128, Dv {dv}: rel {e:.3e}");
        assert!(e < 1e-2, "lightning_attention (D 128, Dv {dv}): relative error {e}");
    }
    // chunks of 1024 rows in parallel: three chunks (the last partial) with slow decays, so that the state
    // entering the second and third chunk (summed from the first pass's chunk states) carries weight
    let t3 = 2500usize;
    let lam3 = Tensor::from_f64(bf, vec![h, 1, 1], vec![0.001, 0.004]);
    let e = gpu_op_error(
        Op::Composite(Composite::LightningAttention { block: 64 }),
        vec![
            random(bf, vec![1, h, t3, 128], 51),
            random(bf, vec![1, h, t3, 128], 52),
            random(bf, vec![1, h, t3, 64], 53),
            lam3,
        ],
    );
    println!("bf16 lightning_attention, T {t3} (three chunks), D 128, Dv 64: rel {e:.3e}");
    assert!(e < 1e-2, "lightning_attention (three chunks): relative error {e}");
    let e = gpu_op_error(
        Op::Composite(Composite::LightningLayer {
            block: 64,
            heads: h,
            eps: 1e-6,
        }),
        vec![
            random(bf, vec![2, t, 3 * h * d], 34),
            lam,
            random(bf, vec![h * d], 35),
            random(bf, vec![2, t, h * d], 36),
        ],
    );
    println!("bf16 lightning_layer, T {t}, D {d}: rel {e:.3e}");
    assert!(e < 1e-2, "lightning_layer: relative error {e}");
}

/// The `moe_combine` template: channels not a multiple of the block, three slots, rows picked twice; a row
/// index out of range is the loop form's error.
#[test]
fn gpu_moe_combine_matches_the_interpreter() {
    use fulgur_ir::{Composite, DType, Op};
    if !gpu() {
        return;
    }
    let ys = random(DType::F32, vec![21, 300], 5);
    let pos = Tensor::from_i64(DType::I64, vec![7, 3], (0..21).map(|i| (i * 5) % 21 / 2).collect());
    let w = random(DType::F32, vec![7, 3], 6);
    let e = gpu_op_error(Op::Composite(Composite::MoeCombine), vec![ys.clone(), pos, w.clone()]);
    println!("moe_combine: rel {e:.3e}");
    assert!(e < 1e-6, "relative error {e}");
    let mut g = Graph::new("combine");
    let d = |x: i64| fulgur_ir::Dim::from(x);
    let a = g.input("ys", DType::F32, vec![d(21), d(300)]).unwrap();
    let b = g.input("pos", DType::I64, vec![d(7), d(3)]).unwrap();
    let c = g.input("w", DType::F32, vec![d(7), d(3)]).unwrap();
    let id = g
        .add_node(Op::Composite(Composite::MoeCombine), &[a, b, c], None)
        .unwrap();
    g.add_output("o", fulgur_ir::Value::new(id, 0)).unwrap();
    let mut gpu = CudaProgram::new(lower(&g).unwrap(), CudaOptions::default()).unwrap();
    let bad = Tensor::from_i64(
        DType::I64,
        vec![7, 3],
        (0..21).map(|i| if i == 9 { 40 } else { i / 2 }).collect(),
    );
    let e = gpu
        .run(&[("ys".to_string(), ys), ("pos".to_string(), bad), ("w".to_string(), w)].into())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a row index of `moe_combine` is out of range [0, 21): got 40"),
        "{e}"
    );
}

/// The `rms_norm` template: channels not a multiple of the block, several leading axes.
#[test]
fn gpu_rms_norm_matches_the_interpreter() {
    use fulgur_ir::{Composite, DType, Op};
    if !gpu() {
        return;
    }
    for c in [7, 300, 2048] {
        let x = random(DType::F32, vec![3, 5, c], 7);
        let w = random(DType::F32, vec![c], 8);
        let e = gpu_op_error(Op::Composite(Composite::RmsNorm { eps: 1e-5 }), vec![x, w]);
        println!("rms_norm, C {c}: rel {e:.3e}");
        assert!(e < 1e-6, "C {c}: relative error {e}");
    }
}

/// Reductions with few outputs over long ranges, run in levels of partials (`kernels::generic`): a sum in two
/// levels, the middle axis of three, a maximum; and the column reductions CUDA splits (columns too few to fill
/// the device: a norm weight's gradient, a ragged count of columns and rows, two leading axes, a minimum, a few
/// columns over a range the few-outputs rule leaves alone).
#[test]
fn gpu_long_reductions_match_the_interpreter() {
    use fulgur_ir::{Op, ReduceOp};
    if !gpu() {
        return;
    }
    for (shape, axes, op) in [
        (vec![600_001usize], vec![0i64], ReduceOp::Sum),
        (vec![3, 40_001, 2], vec![1], ReduceOp::Mean),
        (vec![8192, 2048], vec![0], ReduceOp::Sum),
        (vec![600_001], vec![0], ReduceOp::Max),
        (vec![9001, 300], vec![0], ReduceOp::Sum),
        (vec![3, 2500, 700], vec![0, 1], ReduceOp::Mean),
        (vec![5000, 129], vec![0], ReduceOp::Min),
        (vec![8192, 32], vec![0], ReduceOp::Sum),
    ] {
        let x = random(fulgur_ir::DType::F32, shape.clone(), 80);
        let e = gpu_op_error(
            Op::Reduce {
                op,
                axes: axes.clone(),
                keepdims: false,
            },
            vec![x],
        );
        println!("{} over {shape:?} axes {axes:?}: rel {e:.3e}", op.name());
        assert!(
            e < 1e-5,
            "{} over {shape:?} axes {axes:?}: relative error {e}",
            op.name()
        );
    }
}

/// The backward composites autodiff emits: `flash_attention_grad` (grouped-query heads, causal, more keys than
/// queries) and `grouped_matmul_wgrad` (cuBLAS per group; its device form under CUDA graphs), with an empty
/// group and rows past the groups.
#[test]
fn gpu_backward_composites_match_the_interpreter() {
    use fulgur_ir::{Composite, DType, Dim, Op, Value};
    if !gpu() {
        return;
    }
    for (t, s, causal) in [(70usize, 70usize, true), (33, 150, false), (20, 90, true)] {
        let shapes = [
            vec![2usize, 2, 3, t, 16],
            vec![2, 2, 1, s, 16],
            vec![2, 2, 1, s, 24],
            vec![2, 2, 3, t, 24],
        ];
        let mut g = Graph::new("flash_grad");
        let mut feed = HashMap::new();
        let mut ins = Vec::new();
        for (i, sh) in shapes.iter().enumerate() {
            let name = format!("i{i}");
            ins.push(
                g.input(&name, DType::F32, sh.iter().map(|&d| Dim::from(d as i64)).collect())
                    .unwrap(),
            );
            feed.insert(name, random(DType::F32, sh.clone(), 50 + i as u64));
        }
        let id = g
            .add_node(
                Op::Composite(Composite::FlashAttentionGrad { scale: 0.25, causal }),
                &ins,
                None,
            )
            .unwrap();
        for (i, n) in ["dq", "dk", "dv"].iter().enumerate() {
            g.add_output(*n, Value::new(id, i as u32)).unwrap();
        }
        let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
        let got = CudaProgram::new(lower(&g).unwrap(), CudaOptions::default())
            .unwrap()
            .run(&feed)
            .unwrap();
        for n in ["dq", "dk", "dv"] {
            let e = rel_err(&got[n], &want[n]);
            println!("flash_attention_grad t{t} s{s} causal {causal}: {n} rel {e:.3e}");
            assert!(
                e < 1e-5,
                "flash_attention_grad t{t} s{s} causal {causal}: {n} relative error {e}"
            );
        }
    }
    let (m, c, o) = (30usize, 70usize, 100usize);
    let mut g = Graph::new("wgrad");
    let xs = g
        .input("xs", DType::F32, vec![Dim::from(m as i64), Dim::from(c as i64)])
        .unwrap();
    let counts = g.input("counts", DType::I64, vec![Dim::from(5)]).unwrap();
    let dy = g
        .input("dy", DType::F32, vec![Dim::from(m as i64), Dim::from(o as i64)])
        .unwrap();
    let w = g.grouped_matmul_wgrad(xs, counts, dy).unwrap();
    g.add_output("o", w).unwrap();
    for graphs in [false, true] {
        let mut gpu = CudaProgram::new(
            lower(&g).unwrap(),
            CudaOptions {
                graphs,
                ..Default::default()
            },
        )
        .unwrap();
        for (step, sizes) in [[3i64, 0, 11, 16, 0], [0, 17, 1, 4, 5]].iter().enumerate() {
            let feed: HashMap<String, Tensor> = [
                ("xs".to_string(), random(DType::F32, vec![m, c], 60 + step as u64)),
                (
                    "counts".to_string(),
                    Tensor::from_i64(DType::I64, vec![5], sizes.to_vec()),
                ),
                ("dy".to_string(), random(DType::F32, vec![m, o], 70 + step as u64)),
            ]
            .into();
            let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
            let got = gpu.run(&feed).unwrap();
            let e = rel_err(&got["o"], &want["o"]);
            println!("grouped_matmul_wgrad (graphs {graphs}), counts {sizes:?}: rel {e:.3e}");
            assert!(e < 1e-6, "graphs {graphs}, counts {sizes:?}: relative error {e}");
        }
        if graphs {
            assert!(
                gpu.graph_launches >= 2,
                "the steps ran as CUDA graphs: {}",
                gpu.graph_launches
            );
        }
    }
}

/// The cuBLAS form of `grouped_matmul` spreads its experts over side streams (`FULGUR_GROUPED_STREAMS`, four
/// by default): five experts with rows (more than the streams, so a stream runs two), against the interpreter,
/// and two runs alike to the bit (the program's stream waits for every side stream before the next kernel).
#[test]
fn gpu_grouped_matmul_on_side_streams_matches_the_interpreter() {
    use fulgur_ir::{Composite, DType, Dim, Op, Value};
    if !gpu() {
        return;
    }
    let (m, k, o) = (300usize, 70usize, 130usize);
    let mut g = Graph::new("grouped");
    let xs = g
        .input("xs", DType::F32, vec![Dim::from(m as i64), Dim::from(k as i64)])
        .unwrap();
    let counts = g.input("counts", DType::I64, vec![Dim::from(6)]).unwrap();
    let w = g
        .input(
            "w",
            DType::F32,
            vec![Dim::from(6), Dim::from(k as i64), Dim::from(o as i64)],
        )
        .unwrap();
    let id = g
        .add_node(
            Op::Composite(Composite::GroupedMatmul { swiglu: false }),
            &[xs, counts, w],
            None,
        )
        .unwrap();
    // a consumer after it: reads what every side stream wrote
    let y = g.mul(Value::new(id, 0), Value::new(id, 0)).unwrap();
    g.add_output("o", Value::new(id, 0)).unwrap();
    g.add_output("sq", y).unwrap();
    let feed: HashMap<String, Tensor> = [
        ("xs".to_string(), random(DType::F32, vec![m, k], 61)),
        (
            "counts".to_string(),
            Tensor::from_i64(DType::I64, vec![6], vec![30, 40, 0, 70, 90, 70]),
        ),
        ("w".to_string(), random(DType::F32, vec![6, k, o], 62)),
    ]
    .into();
    let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
    let mut gpu = CudaProgram::new(lower(&g).unwrap(), CudaOptions::default()).unwrap();
    let got = gpu.run(&feed).unwrap();
    let again = gpu.run(&feed).unwrap();
    for n in ["o", "sq"] {
        let e = rel_err(&got[n], &want[n]);
        println!("grouped_matmul on side streams, {n}: rel {e:.3e}");
        assert!(e < 1e-5, "{n}: relative error {e}");
        assert_eq!(got[n].to_f64(), again[n].to_f64(), "{n} differs between two runs");
    }
    // other group sizes in the same program: the experts' products reuse the algorithms chosen for the sizes'
    // buckets (cuBLASLt) or choose again, and rows past every group are zeros
    for sizes in [[31i64, 38, 0, 71, 88, 72], [1, 2, 3, 200, 4, 5], [0, 0, 0, 0, 0, 250]] {
        let mut feed = feed.clone();
        feed.insert("counts".into(), Tensor::from_i64(DType::I64, vec![6], sizes.to_vec()));
        let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
        let got = gpu.run(&feed).unwrap();
        let e = rel_err(&got["o"], &want["o"]);
        println!("grouped_matmul on side streams, counts {sizes:?}: rel {e:.3e}");
        assert!(e < 1e-5, "counts {sizes:?}: relative error {e}");
    }
    let t = fulgur_runtime::Executable::last_timing(&gpu).unwrap();
    assert_eq!(t.expert_gemms, 1, "the last call's experts' products: {t:?}");
}

/// The device form of `grouped_matmul` (the one CUDA graphs capture, with the group sizes read on the device):
/// an empty expert, an expert past one chunk of rows, outputs not a multiple of the 32-column tile, with and
/// without SwiGLU, captured and then replayed after an update; group sizes that leave rows without an expert
/// are the loop form's error.
#[test]
fn gpu_grouped_matmul_under_cuda_graphs_matches_the_interpreter() {
    use fulgur_ir::{Composite, DType, Dim, Op, Value};
    if !gpu() {
        return;
    }
    let (m, k) = (30usize, 70usize);
    for (swiglu, o) in [(false, 100usize), (true, 2 * 50)] {
        let mut g = Graph::new("grouped");
        let xs = g
            .input("xs", DType::F32, vec![Dim::from(m as i64), Dim::from(k as i64)])
            .unwrap();
        let counts = g.input("counts", DType::I64, vec![Dim::from(5)]).unwrap();
        let w = g
            .input(
                "w",
                DType::F32,
                vec![Dim::from(5), Dim::from(k as i64), Dim::from(o as i64)],
            )
            .unwrap();
        let id = g
            .add_node(
                Op::Composite(Composite::GroupedMatmul { swiglu }),
                &[xs, counts, w],
                None,
            )
            .unwrap();
        g.add_output("o", Value::new(id, 0)).unwrap();
        let mut gpu = CudaProgram::new(
            lower(&g).unwrap(),
            CudaOptions {
                graphs: true,
                ..Default::default()
            },
        )
        .unwrap();
        for (step, sizes) in [[3i64, 0, 11, 16, 0], [0, 17, 1, 4, 8]].iter().enumerate() {
            let feed: HashMap<String, Tensor> = [
                ("xs".to_string(), random(DType::F32, vec![m, k], 20 + step as u64)),
                (
                    "counts".to_string(),
                    Tensor::from_i64(DType::I64, vec![5], sizes.to_vec()),
                ),
                ("w".to_string(), random(DType::F32, vec![5, k, o], 30 + step as u64)),
            ]
            .into();
            let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
            let got = gpu.run(&feed).unwrap();
            let e = rel_err(&got["o"], &want["o"]);
            println!("grouped_matmul (swiglu {swiglu}) under a CUDA graph, counts {sizes:?}: rel {e:.3e}");
            assert!(e < 1e-6, "swiglu {swiglu}, counts {sizes:?}: relative error {e}");
        }
        assert!(
            gpu.graph_launches >= 2,
            "the steps ran as CUDA graphs: {}",
            gpu.graph_launches
        );
        let feed: HashMap<String, Tensor> = [
            ("xs".to_string(), random(DType::F32, vec![m, k], 1)),
            (
                "counts".to_string(),
                Tensor::from_i64(DType::I64, vec![5], vec![3, 0, 11, 14, 0]),
            ),
            ("w".to_string(), random(DType::F32, vec![5, k, o], 2)),
        ]
        .into();
        // counts summing to fewer rows than there are (a routed exchange's padding): those rows are zeros
        let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
        let got = gpu.run(&feed).unwrap();
        let e = rel_err(&got["o"], &want["o"]);
        assert!(e < 1e-6, "counts short of the rows: relative error {e}");
        let width = got["o"].shape[1];
        assert!(
            got["o"].to_f64()[28 * width..].iter().all(|&v| v == 0.0),
            "the rows past the groups are zeros"
        );
    }
}

/// `scatter_add` with repeated indices (the embedding's gradient: a token id appears many times) adds every
/// update: the loop over the indices runs in order in one thread per item.
#[test]
fn gpu_scatter_add_with_repeated_indices_matches_the_interpreter() {
    use fulgur_ir::{DType, Op};
    if !gpu() {
        return;
    }
    // a few rows; and an embedding's gradient shape (few columns over a long axis: the axis cut into ranges, a
    // thread per column and range)
    for (rows, n) in [(7i64, 50i64), (3000, 500)] {
        let data = random(DType::F32, vec![rows as usize, 33], 11);
        let idx = Tensor::from_i64(
            DType::I64,
            vec![n as usize],
            (0..n).map(|i| (i * i + 3 * i) % rows).collect(),
        );
        let upd = random(DType::F32, vec![n as usize, 33], 12);
        let e = gpu_op_error(Op::ScatterAdd { axis: 0 }, vec![data, idx, upd]);
        println!("scatter_add, {n} updates into {rows} rows: rel {e:.3e}");
        assert!(e < 1e-6, "{rows} rows: relative error {e}");
    }
}

/// Permutes lowered as views (`program::lower`): cuBLAS reads a transposed operand with its transpose flag, an
/// operand with no unit stride (its last axis moved into the batch) is copied inside the GEMM's kernel, an
/// elementwise kernel and an output are read through the strides; in f32 and bf16.
#[test]
fn gpu_permuted_views_match_the_interpreter() {
    use fulgur_ir::{DType, Dim};
    if !gpu() {
        return;
    }
    for dt in [DType::F32, DType::BF16] {
        let mut g = Graph::new("permutes");
        let d = |v: &[i64]| v.iter().map(|&x| Dim::from(x)).collect::<Vec<_>>();
        let xi = g.input("x", dt, d(&[40, 24, 56])).unwrap();
        let wi = g.input("w", dt, d(&[72, 56])).unwrap();
        let yi = g.input("y", dt, d(&[56, 40, 72])).unwrap();
        let a = g.permute(xi, &[2, 1, 0]).unwrap(); // [56, 24, 40]: no unit stride in the matrix axes
        let r1 = g.matmul(a, yi).unwrap();
        let wt = g.permute(wi, &[1, 0]).unwrap(); // [56, 72], column-major
        let r2 = g.matmul(xi, wt).unwrap();
        let xt = g.permute(xi, &[0, 2, 1]).unwrap();
        let r3 = g.exp(xt).unwrap();
        let r4 = g.permute(xi, &[1, 0, 2]).unwrap();
        for (i, v) in [r1, r2, r3, r4].into_iter().enumerate() {
            g.add_output(format!("o{i}"), v).unwrap();
        }
        let feed: HashMap<String, Tensor> = [
            ("x", random(dt, vec![40, 24, 56], 91)),
            ("w", random(dt, vec![72, 56], 92)),
            ("y", random(dt, vec![56, 40, 72], 93)),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
        let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
        let p = lower(&g).unwrap();
        assert!(
            p.step
                .iter()
                .all(|k| k.kind != fulgur_passes::classify::KernelKind::Copy),
            "a permute was lowered to a copy kernel"
        );
        let mut gpu = CudaProgram::new(p, CudaOptions::default()).unwrap();
        let got = gpu.run(&feed).unwrap();
        let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
        for (name, w) in &want {
            let e = rel_err(&got[name], w);
            println!("{dt} {name}: rel {e:.3e}");
            assert!(e < tol, "{dt} {name}: relative error {e}");
        }
    }
}

/// Reductions along a row's contiguous axis, run a warp per output (the lanes split the row and combine with
/// shuffles): rows not a multiple of 32, sums, means, maxima and minima in f32 and bf16, and a log-softmax
/// over rows of 32000 (a max, a sum of exponentials and a store per element, one warp per row).
#[test]
fn gpu_row_reductions_by_warps_match_the_interpreter() {
    use fulgur_ir::{DType, Op, ReduceOp};
    if !gpu() {
        return;
    }
    for dt in [DType::F32, DType::BF16] {
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
            let x = random(dt, vec![37, 5001], 95);
            let e = gpu_op_error(
                Op::Reduce {
                    op,
                    axes: vec![1],
                    keepdims: true,
                },
                vec![x],
            );
            println!("{dt} {} over rows of 5001: rel {e:.3e}", op.name());
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(e < tol, "{dt} {}: relative error {e}", op.name());
        }
        let x = random(dt, vec![9, 32000], 96);
        let e = gpu_op_error(Op::Composite(fulgur_ir::Composite::LogSoftmax { axis: -1 }), vec![x]);
        println!("{dt} log_softmax over rows of 32000: rel {e:.3e}");
        assert!(
            e < if dt == DType::F32 { 1e-5 } else { 1e-2 },
            "{dt} log_softmax: relative error {e}"
        );
    }
}
