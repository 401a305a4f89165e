//! `fulgur train` as a process: tiny-a's three AdamW steps against transformers, a resumed run equal bit for bit
//! to an uninterrupted one, a checkpoint `eval-model` loads, and the refusals that leave earlier runs whole.

mod common;
use common::{fails, fulgur, tiny_a};
use fulgur::ir::tensor::read_safetensors;
use fulgur::models::checkpoint::Checkpoint;
use fulgur::models::{forward_graph, ForwardOptions};
use std::path::Path;

fn train(dir: &Path, steps: &str, extra: &[&str]) -> std::process::Output {
    let ck = tiny_a();
    let data = ck.join("train/train.safetensors");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"train", &ck, &"--data", &data, &"--steps", &steps, &"--out", &dir];
    if !extra.contains(&"--lr") {
        args.extend([&"--lr" as &dyn AsRef<std::ffi::OsStr>, &"0.01"]);
    }
    for e in extra {
        args.push(e);
    }
    fulgur(&args)
}

fn log_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn three_steps_of_tiny_a_match_transformers_and_the_checkpoint_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = train(&run, "3", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = read_safetensors(&tiny_a().join("train/train.safetensors")).unwrap();
    let want = meta["loss"].to_f64();
    let got = log_losses(&run);
    assert_eq!(got.len(), 3);
    for (s, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-5, "step {}: loss {a} vs transformers {b}", s + 1);
    }
    // the checkpoint: transformers' layout, the parameters after three steps
    let ck = Checkpoint::open(&run.join("checkpoint")).unwrap();
    let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
    let params = ck.load_params(&g).unwrap();
    let fin = read_safetensors(&tiny_a().join("train/final.safetensors")).unwrap();
    let mut worst = (0.0f64, String::new());
    for (name, w) in &fin {
        let e = params[name].rel_l2(w);
        if e > worst.0 || e.is_nan() {
            worst = (e, name.clone());
        }
    }
    println!("worst parameter after three steps: {:.2e} ({})", worst.0, worst.1);
    assert!(worst.0 < 1e-4, "`{}` differs by {}", worst.1, worst.0);
    let out = tmp.path().join("e.safetensors");
    let tokens = tiny_a().join("reference.safetensors");
    let o = fulgur(&[
        &"eval-model",
        &run.join("checkpoint"),
        &"--tokens",
        &tokens,
        &"--out",
        &out,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Two micro-batches of one sequence each accumulate the gradient of the batch of two: the same losses and
/// parameters as transformers' steps on the whole batch.
#[test]
fn micro_batches_accumulate_the_whole_batch_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = train(&run, "3", &["--micro-batch", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = read_safetensors(&tiny_a().join("train/train.safetensors")).unwrap();
    for (s, (a, b)) in log_losses(&run).iter().zip(meta["loss"].to_f64()).enumerate() {
        assert!((a - b).abs() < 1e-5, "step {}: loss {a} vs transformers {b}", s + 1);
    }
    let ck = Checkpoint::open(&run.join("checkpoint")).unwrap();
    let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
    let params = ck.load_params(&g).unwrap();
    let fin = read_safetensors(&tiny_a().join("train/final.safetensors")).unwrap();
    for (name, w) in &fin {
        let e = params[name].rel_l2(w);
        assert!(e < 1e-4, "`{name}` differs by {e}");
    }
    fails(
        &train(&tmp.path().join("x"), "1", &["--micro-batch", "3"]),
        &["--micro-batch 3 does not divide the batch of 2 sequences"],
    );
}

/// bf16 storage with f32 master weights follows the f32 steps: losses within 1e-3 relative of transformers'
/// f32 losses. (Parameters are not compared: Adam's first steps are nearly sign steps, and a router gradient
/// small enough for bf16 rounding to flip its sign moves a weight by ±lr the other way; the worst tensor is
/// printed.) Then 40 steps on text from random weights, f32 and bf16: the loss curves agree within 2%.
#[test]
fn bf16_training_follows_the_f32_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = train(&run, "3", &["--dtype", "bf16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = read_safetensors(&tiny_a().join("train/train.safetensors")).unwrap();
    for (s, (a, b)) in log_losses(&run).iter().zip(meta["loss"].to_f64()).enumerate() {
        println!("step {}: bf16 loss {a}, transformers f32 {b}", s + 1);
        assert!((a - b).abs() < 1e-3 * b, "step {}: loss {a} vs transformers {b}", s + 1);
    }
    let ck = Checkpoint::open(&run.join("checkpoint")).unwrap();
    let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
    let params = ck.load_params(&g).unwrap();
    let fin = read_safetensors(&tiny_a().join("train/final.safetensors")).unwrap();
    let mut worst = (0.0f64, String::new());
    for (name, w) in &fin {
        let e = params[name].rel_l2(w);
        if e > worst.0 || e.is_nan() {
            worst = (e, name.clone());
        }
    }
    println!("bf16: worst parameter after three steps {:.2e} ({})", worst.0, worst.1);
    let text = fulgur::models::fixtures::dir().join("../data/tinyshakespeare.txt");
    let curve = |dtype: &str| {
        let out = tmp.path().join(dtype);
        let o = fulgur(&[
            &"train",
            &"models/configs/minimax-tiny-hf.json",
            &"--data",
            &text,
            &"--steps",
            &"40",
            &"--batch",
            &"8",
            &"--seq",
            &"64",
            &"--lr",
            &"3e-3",
            &"--eval-every",
            &"0",
            &"--dtype",
            &dtype,
            &"--out",
            &out,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        log_losses(&out)
    };
    let (f, h) = (curve("f32"), curve("bf16"));
    for (s, (a, b)) in f.iter().zip(&h).enumerate() {
        assert!((a - b).abs() < 0.02 * a, "step {}: f32 loss {a}, bf16 {b}", s + 1);
    }
    println!(
        "40 steps on text: f32 {:.4} → {:.4}, bf16 {:.4} → {:.4}",
        f[0], f[39], h[0], h[39]
    );
    assert!(h[39] < h[0] - 1.0, "bf16 learned: {} → {}", h[0], h[39]);
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = train(&a, "3", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train(&b, "2", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // a step logged after the last checkpoint (a run killed before its next save) is dropped on resume
    let mut log = std::fs::read_to_string(b.join("log.jsonl")).unwrap();
    log.push_str("{\"step\":3,\"loss\":99.0}\n");
    std::fs::write(b.join("log.jsonl"), log).unwrap();
    let bs = b.display().to_string();
    let o = train(&b, "3", &["--resume", &bs]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(log_losses(&a), log_losses(&b));
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (x, y) = (
            std::fs::read(a.join("checkpoint").join(f)).unwrap(),
            std::fs::read(b.join("checkpoint").join(f)).unwrap(),
        );
        assert!(x == y, "{f} differs between the resumed and the uninterrupted run");
    }
}

#[test]
fn bad_runs_are_refused_and_leave_earlier_ones_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = train(&run, "1", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let model = run.join("checkpoint/model.safetensors");
    let before = std::fs::read(&model).unwrap();
    // a directory holding a run, not resumed
    fails(&train(&run, "2", &[]), &["already holds a training run", "--resume"]);
    // resumed with another config
    let rs = run.display().to_string();
    let data = fulgur::models::fixtures::dir().join("../data/tinyshakespeare.txt");
    let o = fulgur(&[
        &"train",
        &"models/configs/minimax-tiny-hf.json",
        &"--data",
        &data,
        &"--steps",
        &"2",
        &"--out",
        &run,
        &"--resume",
        &rs,
    ]);
    fails(&o, &["its checkpoint was trained with another config"]);
    // resumed with another seed: the data position would mean other batches
    fails(
        &train(&run, "2", &["--resume", &rs, "--seed", "5"]),
        &["the run was trained with --seed 0, this command gives 5"],
    );
    // a truncated optimizer state
    let opt = run.join("checkpoint/optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    fails(&train(&run, "2", &["--resume", &rs]), &["optimizer.safetensors"]);
    assert_eq!(
        std::fs::read(&model).unwrap(),
        before,
        "the checkpoint was left as it was"
    );
    // more steps than the batches
    fails(
        &train(&tmp.path().join("x"), "4", &[]),
        &["--steps 4", "holds 3 batches"],
    );
    // text too small for two sequences
    let small = tmp.path().join("small.txt");
    std::fs::write(&small, "too short").unwrap();
    let o = fulgur(&[
        &"train",
        &tiny_a(),
        &"--data",
        &small,
        &"--steps",
        &"1",
        &"--seq",
        &"8",
        &"--out",
        &tmp.path().join("y"),
    ]);
    fails(&o, &["small.txt", "9 bytes", "too small for two sequences of 8 tokens"]);
    // a vocabulary too small for the byte tokenizer
    let cfgtext = std::fs::read_to_string(tiny_a().join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfgtext).unwrap();
    cfg["vocab_size"] = serde_json::json!(100);
    let cfgpath = tmp.path().join("small-vocab.json");
    std::fs::write(&cfgpath, cfg.to_string()).unwrap();
    let shake = fulgur::models::fixtures::dir().join("../data/tinyshakespeare.txt");
    let o = fulgur(&[
        &"train",
        &cfgpath,
        &"--data",
        &shake,
        &"--steps",
        &"1",
        &"--out",
        &tmp.path().join("z"),
    ]);
    fails(&o, &["the model's vocabulary has 100 ids"]);
    // a loss that becomes NaN stops the run, naming the step
    let o = train(&tmp.path().join("nan"), "3", &["--lr", "1e30", "--clip", "0"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: step 2: the gradient norm is NaN")
            && last.ends_with(
                "stopped. No checkpoint was written; rerun with --check-finite to name the first kernel that \
                 produces a NaN"
            ),
        "{err}"
    );
    // --check-finite names the kernel: nothing in step 1 (masks and all) trips it, step 2 does
    let o = train(
        &tmp.path().join("nan2"),
        "3",
        &["--lr", "1e30", "--clip", "0", "--check-finite"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: training step 2: kernel k")
            && last.contains("the first kernel of the step to produce a NaN"),
        "{err}"
    );
    assert!(!tmp.path().join("nan/checkpoint").exists());
}

/// A checkpoint's own `tokenizer.json` tokenizes text data (through the tokenizers crate): the data's unigram
/// entropy is that of its words, not its bytes; `--tokenizer` names one explicitly; a file that is not a
/// tokenizer is refused by name.
#[test]
fn a_checkpoints_tokenizer_tokenizes_text() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_a().join(f), ck.join(f)).unwrap();
    }
    let tok = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"[UNK]":0,"to":1,"be":2,"or":3,"not":4},"unk_token":"[UNK]"}}"#;
    std::fs::write(ck.join("tokenizer.json"), tok).unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "to be or not to be ".repeat(40)).unwrap();
    let out = tmp.path().join("run");
    let o = fulgur(&[
        &"train", &ck, &"--data", &text, &"--steps", &"2", &"--batch", &"2", &"--seq", &"12", &"--out", &out,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("240 tokens by"), "{err}");
    // to and be are a third each, or and not a sixth: −(2·⅓·ln ⅓ + 2·⅙·ln ⅙) = 1.3297 nats
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("unigram entropy of the data 1.3"), "{said}");
    // the same tokenizer named explicitly, from a config
    let o = fulgur(&[
        &"train",
        &tiny_a().join("config.json"),
        &"--data",
        &text,
        &"--tokenizer",
        &ck.join("tokenizer.json"),
        &"--steps",
        &"1",
        &"--batch",
        &"2",
        &"--seq",
        &"12",
        &"--out",
        &tmp.path().join("run2"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = fulgur(&[
        &"train",
        &ck,
        &"--data",
        &text,
        &"--tokenizer",
        &text,
        &"--steps",
        &"1",
        &"--out",
        &tmp.path().join("run3"),
    ]);
    fails(&o, &["t.txt", "not a tokenizer the tokenizers crate reads"]);
}

/// The training step sharded (`--parallel`) and run on simulated ranks, each rank's program compiled for the
/// CPU: tiny-a's three AdamW steps give transformers' losses and parameters at data, tensor, expert and
/// expert-tensor (routed: the rows exchanged forward and backward) and sequence parallel plans, with the
/// moments sharded over the data-parallel ranks, and through two pipeline stages (two micro-batches by 1F1B,
/// then the update); degrees that do not divide the batch are refused before anything is written.
#[test]
#[cfg(feature = "llvm")]
fn three_steps_of_tiny_a_on_sharded_ranks_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = read_safetensors(&tiny_a().join("train/train.safetensors")).unwrap();
    let fin = read_safetensors(&tiny_a().join("train/final.safetensors")).unwrap();
    for (par, says) in [
        ("dp=2,tp=2", "training step sharded over 4 simulated ranks"),
        ("ep=2", "8 all_to_all_combine, 8 all_to_all_dispatch"),
        ("ep=2,tp=2,etp=2", "8 all_to_all_combine, 8 all_to_all_dispatch"),
        ("sp=2", "training step sharded over 2 simulated ranks"),
        (
            "pp=2,tp=2",
            "training step in 2 pipeline stages of 2 simulated ranks each (dp=1,ep=1,sp=1,tp=2,pp=2), 2 micro-batches \
             by 1F1B",
        ),
    ] {
        let run = tmp.path().join(par.replace([',', '='], "_"));
        let o = train(&run, "3", &["--parallel", par, "--target", "cpu"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{par}: {err}");
        assert!(err.contains(says), "{err}");
        for (s, (a, b)) in log_losses(&run).iter().zip(meta["loss"].to_f64()).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "{par}, step {}: loss {a} vs transformers {b}",
                s + 1
            );
        }
        let ck = Checkpoint::open(&run.join("checkpoint")).unwrap();
        let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
        let params = ck.load_params(&g).unwrap();
        let mut worst = (0.0f64, String::new());
        for (name, w) in &fin {
            let e = params[name].rel_l2(w);
            if e > worst.0 || e.is_nan() {
                worst = (e, name.clone());
            }
        }
        println!("{par}: worst parameter after three steps {:.2e} ({})", worst.0, worst.1);
        assert!(worst.0 < 1e-4, "{par}: `{}` differs by {}", worst.1, worst.0);
    }
    let bad = tmp.path().join("bad");
    fails(
        &train(&bad, "1", &["--parallel", "dp=4"]),
        &["--parallel dp=4: the batch (2) is not divisible by dp·ep (4)"],
    );
    assert!(!bad.exists(), "a refused run writes nothing");
}

/// `fulgur launch -n 4 -- fulgur train` of tiny-a's fixture steps (`steps` of them) on the CPU at degrees `par`
/// into `run`, with the arguments `extra` and the variables `env`.
#[cfg(feature = "llvm")]
fn launch_train(par: &str, steps: &str, run: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let ck = tiny_a();
    std::process::Command::new(env!("CARGO_BIN_EXE_fulgur"))
        .args(["launch", "-n", "4", "--timeout", "300", "--", "fulgur", "train"])
        .arg(&ck)
        .arg("--data")
        .arg(ck.join("train/train.safetensors"))
        .args([
            "--steps",
            steps,
            "--lr",
            "0.01",
            "--target",
            "cpu",
            "--parallel",
            par,
            "--out",
        ])
        .arg(run)
        .args(extra)
        .env_remove("RUST_LOG")
        .env("FULGUR_RANK_TIMEOUT", "60")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `fulgur launch -n 4 -- fulgur train ... --parallel dp=2,tp=2`: one rank per process, collectives over the
/// TCP rendezvous, rank 0 alone writing the run: transformers' losses. A stop one rank asks for (its Ctrl-C)
/// stops every rank after the same step, with rank 0's checkpoint of it. A rank that exits at a collective fails
/// the job naming it, and no checkpoint is written.
#[test]
#[cfg(feature = "llvm")]
fn launched_ranks_train_and_a_dead_rank_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let launch = |run: &Path, fault: Option<&str>| {
        let env: Vec<(&str, &str)> = fault.map(|f| ("FULGUR_FAULT_EXIT", f)).into_iter().collect();
        launch_train("dp=2,tp=2", "3", run, &[], &env)
    };
    let run = tmp.path().join("run");
    let o = launch(&run, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("training step sharded over 4 launched ranks (dp=2,ep=1,sp=1,tp=2)"),
        "{err}"
    );
    let meta = read_safetensors(&tiny_a().join("train/train.safetensors")).unwrap();
    let losses = log_losses(&run);
    assert_eq!(losses.len(), 3, "rank 0 alone writes the log");
    for (s, (a, b)) in losses.iter().zip(meta["loss"].to_f64()).enumerate() {
        assert!((a - b).abs() < 1e-5, "step {}: loss {a} vs transformers {b}", s + 1);
    }
    assert!(run.join("checkpoint/trainer.json").is_file());
    // rank 3 asks to stop after step 1 (as its Ctrl-C would): every rank stops there and rank 0 writes the
    // checkpoint of step 1
    let stopped = tmp.path().join("stopped");
    let o = launch_train("dp=2,tp=2", "3", &stopped, &[], &[("FULGUR_STOP_AFTER", "3:1")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("interrupted: stopped after step 1"), "{err}");
    assert_eq!(log_losses(&stopped).len(), 1);
    let ts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stopped.join("checkpoint/trainer.json")).unwrap()).unwrap();
    assert_eq!(ts["step"], 1);
    let dead = tmp.path().join("dead");
    let o = launch(&dead, Some("2:3"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("rank 2 did not reach collective #3 (`"), "{err}");
    assert!(!dead.join("checkpoint").exists(), "a failed job writes no checkpoint");
}

/// `fulgur launch -n 4 -- fulgur train ... --parallel pp=2,tp=2`: two pipeline stages of two ranks, a process
/// each, each stage holding and updating its own parameters (the losses and the gradients' squared norm shared by
/// one sum over the job), the whole state gathered for rank 0's checkpoint: transformers' losses and final
/// parameters; resumed after two steps, the third gives the same parameters bit for bit. A rank of the second stage that exits in the second step
/// fails the job naming it, and no checkpoint is written.
#[test]
#[cfg(feature = "llvm")]
fn launched_pipeline_stages_train_like_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tiny_a();
    let data = ck.join("train/train.safetensors");
    let launch = |run: &Path, fault: Option<&str>| {
        let env: Vec<(&str, &str)> = fault.map(|f| ("FULGUR_FAULT_EXIT", f)).into_iter().collect();
        launch_train("pp=2,tp=2", "3", run, &[], &env)
    };
    let run = tmp.path().join("run");
    let o = launch(&run, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(
            "training step in 2 pipeline stages of 2 launched ranks each (dp=1,ep=1,sp=1,tp=2,pp=2), 2 micro-batches \
             by 1F1B; each stage holds and updates the parameters it reads (stage 0: 19 of 39, 0 tied)"
        ),
        "{err}"
    );
    let meta = read_safetensors(&data).unwrap();
    let losses = log_losses(&run);
    assert_eq!(losses.len(), 3, "rank 0 alone writes the log");
    for (s, (a, b)) in losses.iter().zip(meta["loss"].to_f64()).enumerate() {
        assert!((a - b).abs() < 1e-5, "step {}: loss {a} vs transformers {b}", s + 1);
    }
    let fin = read_safetensors(&ck.join("train/final.safetensors")).unwrap();
    let saved = Checkpoint::open(&run.join("checkpoint")).unwrap();
    let g = forward_graph(&saved.config, &ForwardOptions::default()).unwrap();
    let params = saved.load_params(&g).unwrap();
    let worst =
        fin.iter()
            .map(|(name, w)| (params[name].rel_l2(w), name.clone()))
            .fold(
                (0.0f64, String::new()),
                |a, b| if b.0 > a.0 || b.0.is_nan() { b } else { a },
            );
    println!(
        "launched pp=2,tp=2: worst parameter after three steps {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(worst.0 < 1e-4, "`{}` differs by {}", worst.1, worst.0);
    // two steps, then the third resumed from their checkpoint: the same parameters, bit for bit
    let first = tmp.path().join("first");
    let o = launch_train("pp=2,tp=2", "2", &first, &[], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let resumed = tmp.path().join("resumed");
    let from = first.to_str().unwrap();
    let o = launch_train("pp=2,tp=2", "3", &resumed, &["--resume", from], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = Checkpoint::open(&resumed.join("checkpoint"))
        .unwrap()
        .load_params(&g)
        .unwrap();
    for (name, w) in &params {
        assert_eq!(again[name].to_f64(), w.to_f64(), "`{name}` after resuming differs");
    }
    // global rank 3 (rank 1 of stage 1; only the job's transport numbers a rank 3) exits at the job's
    // collective #8: #0 and #1 exchange the addresses of the step's and the held-out loss's pipelines, #2 sums
    // step 1's gradients, #3 to #7 agree not to stop (one sum per axis of pp, dp, ep, sp, tp), #8 sums step 2's
    let dead = tmp.path().join("dead");
    let o = launch(&dead, Some("3:8"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("summing the step's gradients over the job: rank 3 did not reach collective #8 (`all_reduce`)"),
        "{err}"
    );
    assert!(err.contains("(exit status 3)"), "{err}");
    assert!(!dead.join("checkpoint").exists(), "a failed job writes no checkpoint");
}

/// A tied model (tiny-a's config with `tie_word_embeddings`, random weights) in two launched pipeline stages: the
/// first and the last stage both hold the embedding, update it alike by the gradient summed over them, and the
/// first gives it to the checkpoint: the losses and the final parameters of the same run with its stages on
/// simulated ranks in one process (one update of every parameter).
#[test]
#[cfg(feature = "llvm")]
fn launched_pipeline_stages_update_a_tied_embedding_as_one_process_does() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tiny_a();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = serde_json::Value::Bool(true);
    let config = tmp.path().join("tied.json");
    std::fs::write(&config, cfg.to_string()).unwrap();
    let train = |launched: bool, run: &Path| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fulgur"));
        if launched {
            c.args(["launch", "-n", "2", "--timeout", "300", "--", "fulgur"]);
        }
        c.arg("train")
            .arg(&config)
            .arg("--data")
            .arg(ck.join("train/train.safetensors"))
            .args([
                "--steps",
                "3",
                "--lr",
                "0.01",
                "--target",
                "cpu",
                "--parallel",
                "pp=2",
                "--out",
            ])
            .arg(run)
            .env_remove("RUST_LOG")
            .env("FULGUR_RANK_TIMEOUT", "60")
            .output()
            .unwrap()
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let o = train(false, &one);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train(true, &two);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("each stage holds and updates the parameters it reads (stage 0: 19 of 38, 1 tied)"),
        "{err}"
    );
    let (a, b) = (log_losses(&one), log_losses(&two));
    assert_eq!(a.len(), 3);
    for (s, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() < 1e-5,
            "step {}: loss {y} launched, {x} in one process",
            s + 1
        );
    }
    let load = |run: &Path| {
        let saved = Checkpoint::open(&run.join("checkpoint")).unwrap();
        let g = forward_graph(&saved.config, &ForwardOptions::default()).unwrap();
        saved.load_params(&g).unwrap()
    };
    let (pa, pb) = (load(&one), load(&two));
    assert_eq!(pa.len(), 38);
    assert!(!pb.contains_key("lm_head.weight"));
    let worst = pa
        .iter()
        .map(|(n, w)| (pb[n].rel_l2(w), n.clone()))
        .fold(
            (0.0f64, String::new()),
            |x, y| if y.0 > x.0 || y.0.is_nan() { y } else { x },
        );
    println!(
        "tied, launched pp=2: worst parameter after three steps {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(worst.0 < 1e-5, "`{}` differs by {}", worst.1, worst.0);
}

/// Through pipeline stages the held-out loss is the stages' forwards with the step's weights: on text, with the
/// same micro-batches, a run at `pp=2` logs the losses and held-out losses of a run on one device.
#[test]
#[cfg(feature = "llvm")]
fn pipeline_stages_log_the_held_out_loss_of_one_device() {
    let tmp = tempfile::tempdir().unwrap();
    let text = fulgur::models::fixtures::dir().join("../data/tinyshakespeare.txt");
    let ck = tiny_a();
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"train",
            &ck,
            &"--data",
            &text,
            &"--steps",
            &"2",
            &"--batch",
            &"2",
            &"--seq",
            &"16",
            &"--micro-batch",
            &"1",
            &"--eval-every",
            &"1",
            &"--eval-batches",
            &"2",
            &"--target",
            &"cpu",
            &"--out",
            &out,
        ];
        for e in extra {
            args.push(e);
        }
        let o = fulgur(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out.join("log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["loss"].as_f64().unwrap(), v["heldout_loss"].as_f64().unwrap())
            })
            .collect::<Vec<_>>()
    };
    let one = run("one", &[]);
    let staged = run("staged", &["--parallel", "pp=2"]);
    assert_eq!(one.len(), 2);
    for ((a, ha), (b, hb)) in one.iter().zip(&staged) {
        assert!((a - b).abs() < 1e-5, "loss {b} against one device's {a}");
        assert!((ha - hb).abs() < 1e-5, "held-out loss {hb} against one device's {ha}");
    }
}
