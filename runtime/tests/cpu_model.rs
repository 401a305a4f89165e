//! The CPU backend on a whole model: the shipped small config, unoptimized and optimized, against the f64
//! interpreter (every output within 1e-4 relative), and kernel by kernel on the data of a real run.
#![cfg(feature = "llvm")]
use fulgur_codegen::compile::{compile, CompileOptions, OptLevel};
use fulgur_codegen::program::lower;
use fulgur_ir::{Graph, Interpreter, Precision, Tensor};
use fulgur_models::{forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur_passes::testing::random_inputs;
use fulgur_runtime::cpu::{CpuOptions, CpuProgram};
use std::collections::HashMap;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn small_model_matches_the_interpreter() {
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
    for opt in [OptLevel::None, OptLevel::Full] {
        let og: Graph = compile(
            &g,
            &CompileOptions {
                opt,
                ..CompileOptions::default()
            },
            None,
        )
        .unwrap()
        .graph;
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
        let t0 = std::time::Instant::now();
        let mut cpu = CpuProgram::new(p.clone(), CpuOptions::default()).unwrap();
        eprintln!(
            "{opt:?}: {} codes compiled in {:.2}s",
            cpu.kernels.len(),
            t0.elapsed().as_secs_f64()
        );
        let weights: HashMap<String, Tensor> = p
            .params
            .iter()
            .map(|io| (io.name.clone(), ins[&io.name].clone()))
            .collect();
        cpu.load_weights(&weights).unwrap();
        let data: HashMap<String, Tensor> = p
            .inputs
            .iter()
            .map(|io| (io.name.clone(), ins[&io.name].clone()))
            .collect();
        let got = cpu.run(&data).unwrap();
        let want = Interpreter::new(Precision::F64).run(&og, &ins).unwrap();
        for (name, w) in &want {
            let r = got[name].rel_l2(w);
            eprintln!("  {name}: rel {r:.2e}");
            assert!(r < 1e-4, "{opt:?} {name}: relative error {r}");
        }
        if opt == OptLevel::Full {
            // the experts' weights are transposed by the prepare program, packed for the grouped GEMMs and the
            // transposed copies freed; a new weight must be prepared and packed again before the next call
            let (planned, held) = cpu.memory().unwrap();
            assert!(
                held < planned + cpu.packed_bytes() as u64,
                "nothing freed: held {held}, planned {planned}"
            );
            let name = p
                .params
                .iter()
                .map(|io| io.name.clone())
                .find(|n| n.ends_with("experts.gate_up_proj"))
                .expect("an expert weight");
            let w = &ins[&name];
            let w2 =
                fulgur_ir::Tensor::from_f64(w.dtype, w.shape.clone(), w.to_f64().iter().map(|x| -1.5 * x).collect());
            cpu.set_weight(&name, &w2).unwrap();
            ins.insert(name.clone(), w2);
            let got = cpu.run(&data).unwrap();
            let want = Interpreter::new(Precision::F64).run(&og, &ins).unwrap();
            for (o, w) in &want {
                let r = got[o].rel_l2(w);
                assert!(r < 1e-4, "after replacing {name}: {o}: relative error {r}");
            }
        }
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

/// Every step kernel of the optimized small model, on the inputs it saw in a real run, against the interpreter
/// running its op on the same inputs.
#[test]
fn every_kernel_of_the_small_model_matches_the_interpreter() {
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
    let og: Graph = compile(
        &g,
        &CompileOptions {
            opt: OptLevel::Full,
            ..CompileOptions::default()
        },
        None,
    )
    .unwrap()
    .graph;
    let p = lower(&og).unwrap();
    let env: HashMap<String, i64> = [("B".to_string(), 2), ("T".to_string(), 7)].into();
    let ins = random_inputs(&og, &env, 3, cfg.vocab_size as i64);
    let mut cpu = CpuProgram::new(p.clone(), CpuOptions::default()).unwrap();
    let weights: HashMap<String, Tensor> = p
        .params
        .iter()
        .map(|io| (io.name.clone(), ins[&io.name].clone()))
        .collect();
    cpu.load_weights(&weights).unwrap();
    let data: HashMap<String, Tensor> = p
        .inputs
        .iter()
        .map(|io| (io.name.clone(), ins[&io.name].clone()))
        .collect();
    let mut bad = 0;
    cpu.run_traced(&data, |k, a, o| {
        let dims: HashMap<String, fulgur_ir::Dim> =
            env.iter().map(|(k, v)| (k.clone(), fulgur_ir::Dim::from(*v))).collect();
        let want = interp_op(&k.op.substitute_dims(&dims), a);
        for (i, (w, g)) in want.iter().zip(o).enumerate() {
            let r = g.rel_l2(w);
            if r.is_nan() || r >= 1e-5 {
                bad += 1;
                eprintln!("k{} {} out {i}: rel {r:.3e}", k.id, k.name);
            }
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(bad, 0);
}

/// tiny-a (a real transformers checkpoint) on the CPU backend, optimized and not, against the transformers
/// reference: hidden states and logits within 1e-4 relative, the loss within 1e-5.
#[test]
fn tiny_a_on_the_cpu_matches_transformers() {
    use fulgur_models::checkpoint::Checkpoint;
    let dir = fulgur_models::fixtures::dir().join("tiny-a");
    assert!(dir.join("config.json").exists(), "fixture {} is missing", dir.display());
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
        let og: Graph = compile(
            &g,
            &CompileOptions {
                opt,
                ..CompileOptions::default()
            },
            None,
        )
        .unwrap()
        .graph;
        let mut cpu = CpuProgram::new(lower(&og).unwrap(), CpuOptions::default()).unwrap();
        cpu.load_weights(&weights).unwrap();
        let out = cpu
            .run(&[("input_ids".to_string(), reference["input_ids"].clone())].into())
            .unwrap();
        for i in 0..=ck.config.num_hidden_layers {
            let name = format!("hidden_states.{i}");
            let e = out[&name].rel_l2(&reference[&name]);
            assert!(e < 1e-4, "{opt:?} {name}: relative error {e}");
        }
        let e = out["logits"].rel_l2(&reference["logits"]);
        assert!(e < 1e-4, "{opt:?} logits: relative error {e}");
        let (a, b) = (out["loss"].to_f64()[0], reference["loss"].to_f64()[0]);
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{opt:?} loss {a} vs reference {b}"
        );
    }
}

/// tiny-a stored in bf16 (`fulgur_passes::precision`) on the CPU backend: logits within 3e-2 of transformers'
/// f32 logits, the greedy tokens of the reference run unchanged.
#[test]
fn tiny_a_bf16_on_the_cpu_is_within_3e_2_of_transformers() {
    use fulgur_models::checkpoint::Checkpoint;
    let dir = fulgur_models::fixtures::dir().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let reference = fulgur_ir::tensor::read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
    // stored as bf16 after the optimizer: its kernels keep their intermediates in f32
    let og = compile(&g, &CompileOptions::default(), None).unwrap().graph;
    let og =
        fulgur_passes::precision::store_as(&og, fulgur_ir::DType::BF16, &fulgur_passes::precision::keep_f32).unwrap();
    let p = lower(&og).unwrap();
    assert!(p.params.iter().all(|io| io.ty.dtype == fulgur_ir::DType::BF16));
    let mut cpu = CpuProgram::new(p, CpuOptions::default()).unwrap();
    cpu.load_weights(&ck.load_params(&og).unwrap()).unwrap();
    let out = cpu
        .run(&[("input_ids".to_string(), reference["input_ids"].clone())].into())
        .unwrap();
    assert_eq!(out["logits"].dtype, fulgur_ir::DType::BF16);
    let e = out["logits"].rel_l2(&reference["logits"]);
    eprintln!("bf16 logits: rel {e:.3e}");
    assert!(e > 1e-4 && e < 3e-2, "bf16 logits relative error {e}");
}

/// tiny-a's training graph (`fulgur_passes::autodiff`) on the CPU backend, unoptimized and optimized: every
/// parameter's gradient within 1e-4 of transformers' (`grads.safetensors`), and the loss.
#[test]
fn tiny_a_gradients_on_the_cpu_match_transformers() {
    use fulgur_models::checkpoint::Checkpoint;
    use fulgur_passes::autodiff::{differentiate, GradOptions, GRAD_PREFIX};
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
    let weights = ck.load_params(&g).unwrap();
    for opt in [OptLevel::None, OptLevel::Full] {
        let og: Graph = compile(
            &dg,
            &CompileOptions {
                opt,
                ..CompileOptions::default()
            },
            None,
        )
        .unwrap()
        .graph;
        let mut cpu = CpuProgram::new(lower(&og).unwrap(), CpuOptions::default()).unwrap();
        cpu.load_weights(&weights).unwrap();
        let out = cpu
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
            "{opt:?}: {} kernels; worst gradient {:.2e} ({})",
            cpu.program.step.len(),
            worst.0,
            worst.1
        );
        assert!(worst.0 < 1e-4, "{opt:?}: `{}` relative error {}", worst.1, worst.0);
        let (a, b) = (out["loss"].to_f64()[0], reference["loss"].to_f64()[0]);
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{opt:?} loss {a} vs reference {b}"
        );
    }
}

/// `tiny-a/train/`'s three AdamW steps through the step graph (`fulgur_passes::optim::train_step`) optimized,
/// on the CPU backend with the weights and moments kept in the program between steps (`Trainer`): each step's
/// loss within 1e-5, every parameter after the third step within 1e-4 of transformers'.
#[test]
fn tiny_a_three_adamw_steps_on_the_cpu_match_transformers() {
    use fulgur_models::checkpoint::Checkpoint;
    use fulgur_passes::optim::{train_step, AdamW, ADAM_M, ADAM_V};
    use fulgur_runtime::train::Trainer;
    let dir = fulgur_models::fixtures::dir().join("tiny-a");
    let ck = Checkpoint::open(&dir).unwrap();
    let data = fulgur_ir::tensor::read_safetensors(&dir.join("train/train.safetensors")).unwrap();
    let want = fulgur_ir::tensor::read_safetensors(&dir.join("train/final.safetensors")).unwrap();
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let hp = AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        clip: Some(1.0),
    };
    let step = compile(&train_step(&g, "loss", &hp).unwrap(), &CompileOptions::default(), None)
        .unwrap()
        .graph;
    let mut state = HashMap::new();
    for (name, t) in ck.load_params(&g).unwrap() {
        let zeros = Tensor::from_f64(fulgur_ir::DType::F32, t.shape.clone(), vec![0.0; t.numel()]);
        state.insert(format!("{ADAM_M}{name}"), zeros.clone());
        state.insert(format!("{ADAM_V}{name}"), zeros);
        state.insert(name, t);
    }
    let mut cpu = CpuProgram::new(lower(&step).unwrap(), CpuOptions::default()).unwrap();
    let mut trainer = Trainer::new(&mut cpu, state);
    let ids = data["input_ids"].to_i64();
    let (b, t) = (data["input_ids"].shape[1], data["input_ids"].shape[2]);
    for s in 0..3 {
        let batch = Tensor::from_i64(
            fulgur_ir::DType::I64,
            vec![b, t],
            ids[s * b * t..(s + 1) * b * t].to_vec(),
        );
        let scalars = hp.scalars(1e-2, s as u64 + 1);
        let out = trainer.step(batch, &scalars).unwrap();
        let wl = data["loss"].to_f64()[s];
        println!(
            "step {}: loss {} (transformers {wl}), grad norm {}",
            s + 1,
            out.loss,
            out.grad_norm
        );
        assert!(
            (out.loss - wl).abs() < 1e-5,
            "step {}: loss {} vs {wl}",
            s + 1,
            out.loss
        );
    }
    let state = trainer.state().unwrap();
    let mut worst = (0.0f64, String::new());
    for (name, w) in &want {
        let e = state[name].rel_l2(w);
        if e > worst.0 || e.is_nan() {
            worst = (e, name.clone());
        }
    }
    println!("after three steps: worst parameter rel {:.2e} ({})", worst.0, worst.1);
    assert!(worst.0 < 1e-4, "`{}` differs by {}", worst.1, worst.0);
    assert_eq!(cpu.carried_runs, 2, "steps 2 and 3 kept the state in the program");
}

/// `CpuOptions::check_finite` names the first kernel whose output holds a NaN (a NaN planted in the
/// embedding row of a token is first seen by the first kernel reading the table); the same run without a NaN
/// passes the check (the causal masks' −inf are not errors).
#[test]
fn check_finite_names_the_first_kernel_with_a_nan() {
    let cfg = MiniMaxConfig::from_file(&root().join("models/configs/minimax-small.json")).unwrap();
    let g = forward_graph(&cfg, &ForwardOptions::default()).unwrap();
    for opt in [OptLevel::None, OptLevel::Full] {
        let og = compile(
            &g,
            &CompileOptions {
                opt,
                ..CompileOptions::default()
            },
            None,
        )
        .unwrap()
        .graph;
        let p = lower(&og).unwrap();
        let env: HashMap<String, i64> = [("B".to_string(), 1), ("T".to_string(), 4)].into();
        let ins = random_inputs(&og, &env, 5, cfg.vocab_size as i64);
        let mut weights: HashMap<String, Tensor> = p
            .params
            .iter()
            .map(|io| (io.name.clone(), ins[&io.name].clone()))
            .collect();
        let toks = Tensor::from_i64(fulgur_ir::DType::I64, vec![1, 4], vec![1, 2, 3, 4]);
        let opts = CpuOptions {
            check_finite: true,
            ..Default::default()
        };
        let mut cpu = CpuProgram::new(p.clone(), opts.clone()).unwrap();
        cpu.load_weights(&weights).unwrap();
        cpu.run(&[("input_ids".to_string(), toks.clone())].into())
            .unwrap_or_else(|e| panic!("{opt:?}: a finite run stopped: {e}"));
        let emb = weights.get_mut("model.embed_tokens.weight").unwrap();
        let c = emb.shape[1];
        if let fulgur_ir::Buffer::F(v) = &mut emb.data {
            v[2 * c] = f64::NAN;
        }
        let mut cpu = CpuProgram::new(p.clone(), opts).unwrap();
        cpu.load_weights(&weights).unwrap();
        let e = cpu
            .run(&[("input_ids".to_string(), toks)].into())
            .unwrap_err()
            .to_string();
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
        assert!(
            e.starts_with(&format!("kernel k{} ({}", first.id, first.name)),
            "{opt:?}: {e}"
        );
        assert!(
            e.contains("produced NaN") && e.contains("the first kernel of the step to produce a NaN"),
            "{e}"
        );
    }
}
