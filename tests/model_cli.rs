//! `fulgur eval-model`, `generate` and `stats` run as processes against the tiny-a fixture.

mod common;
use common::{fails, fulgur, root, tiny_a};
use fulgur::ir::tensor::{read_safetensors, write_safetensors};
use fulgur::ir::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn no_file_left(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn eval_model_matches_the_reference() {
    // the default target (the CPU backend where the build has it), then the interpreter
    for target in [None, Some("reference")] {
        eval_model_on(target);
    }
}

fn eval_model_on(target: Option<&str>) {
    let dir = tiny_a();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"eval-model",
        &dir,
        &"--tokens",
        &"PLACEHOLDER",
        &"--out",
        &out,
        &"--hidden-states",
    ];
    let tokens = dir.join("reference.safetensors");
    args[3] = &tokens;
    if let Some(t) = &target {
        args.push(&"--target");
        args.push(t);
    }
    let o = fulgur(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_safetensors(&out).unwrap();
    let want = read_safetensors(&dir.join("reference.safetensors")).unwrap();
    for name in ["logits", "hidden_states.0", "hidden_states.2", "hidden_states.4"] {
        let e = got[name].rel_l2(&want[name]);
        assert!(e < 1e-4, "{name}: {e}");
    }
    assert_eq!(got["logits"].shape, vec![2, 40, 512]);
    assert_eq!(got["loss"].shape, vec![1]);
    assert!((got["loss"].to_f64()[0] - want["loss"].to_f64()[0]).abs() < 1e-5);
}

#[test]
fn generate_matches_the_reference() {
    generate_on("reference", &[]);
    #[cfg(feature = "llvm")]
    generate_on("cpu", &[]);
}

/// `generate --parallel`: the prefill and the decode step sharded and run on simulated ranks give transformers'
/// greedy tokens, tensor parallel and expert-tensor parallel, interpreted and compiled for the CPU, and as two
/// launched processes; degrees the prompt's batch or a decode step cannot take are refused with the reason.
#[test]
fn generate_on_sharded_ranks_matches_the_reference() {
    generate_on("reference", &["--parallel", "tp=2"]);
    #[cfg(feature = "llvm")]
    generate_on("cpu", &["--parallel", "tp=2,etp=2"]);
    let dir = tiny_a();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g.safetensors");
    // two launched processes, one rank each: rank 0 writes transformers' tokens
    let o = launch_generate(&dir, "tp=2", &out, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("generating on 2 launched ranks"), "{err}");
    let want = read_safetensors(&dir.join("decode.safetensors")).unwrap();
    assert_eq!(
        read_safetensors(&out).unwrap()["generated"].to_i64(),
        want["generated"].to_i64()
    );
    std::fs::remove_file(&out).unwrap();
    for (par, msg) in [
        ("ep=2", "--parallel ep=2: the batch (1) is not divisible by dp·ep (2)"),
        (
            "sp=2",
            "--parallel dp=1,ep=1,sp=2,tp=1: generation takes sp=1 (a decode step has one token per sequence to split)",
        ),
    ] {
        let o = fulgur(&[
            &"generate",
            &dir,
            &"--tokens",
            &dir.join("decode.safetensors"),
            &"--max-new-tokens",
            &"2",
            &"--out",
            &out,
            &"--parallel",
            &par,
        ]);
        common::fails(&o, &[msg]);
        assert!(!out.exists());
    }
}

/// `generate --parallel ...,pp=N`: the prefill and the decode step cut into pipeline stages (each stage's layers'
/// states kept from step to step) give transformers' greedy tokens and step logits: two stages interpreted, two
/// stages of two tensor-parallel ranks compiled for the CPU, four stages of one layer each, and two launched
/// processes (each keeping its own stage's states, the last stage's logits shared), rank 0 writing.
#[test]
fn generate_through_pipeline_stages_matches_the_reference() {
    generate_on("reference", &["--parallel", "pp=2"]);
    #[cfg(feature = "llvm")]
    generate_on("cpu", &["--parallel", "pp=2,tp=2"]);
    generate_on("reference", &["--parallel", "pp=4"]);
    let dir = tiny_a();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g.safetensors");
    let o = launch_generate(&dir, "pp=2", &out, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("generating through 2 pipeline stages of 1 launched ranks each (dp=1,ep=1,sp=1,tp=1,pp=2)"),
        "{err}"
    );
    let want = read_safetensors(&dir.join("decode.safetensors")).unwrap();
    let got = read_safetensors(&out).unwrap();
    assert_eq!(got["generated"].to_i64(), want["generated"].to_i64());
    let e = got["step_logits"].rel_l2(&want["step_logits"]);
    assert!(e < 1e-4, "launched pp=2: step logits off by {e}");
    // the last stage's process exiting as it shares the prefill's logits (its job collective #3: #0 and #1 the
    // address exchanges, #2 the logits' shape): rank 0 fails naming it and writes nothing
    std::fs::remove_file(&out).unwrap();
    let o = launch_generate(&dir, "pp=2", &out, Some("1:3"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("sharing `logits` over the job: rank 1 did not reach collective #3 (`all_reduce`)"),
        "{err}"
    );
    assert!(err.contains("1 (exit status 3)"), "{err}");
    assert!(!out.exists(), "a failed job writes nothing");
    // more stages than layers: refused before anything runs
    let o = fulgur(&[
        &"generate",
        &dir,
        &"--tokens",
        &dir.join("decode.safetensors"),
        &"--max-new-tokens",
        &"2",
        &"--out",
        &out,
        &"--parallel",
        &"pp=5",
    ]);
    common::fails(
        &o,
        &["--parallel dp=1,ep=1,sp=1,tp=1,pp=5: a model of 4 layers cuts into 1 to 4 pipeline stages, not 5"],
    );
    assert!(!out.exists());
}

/// `fulgur launch -n 2 -- fulgur generate` of ten greedy tokens of tiny-a's decode prompt at degrees `par` on the
/// interpreter, written to `out`, with `FULGUR_FAULT_EXIT` set to `fault` where given.
fn launch_generate(
    dir: &std::path::Path,
    par: &str,
    out: &std::path::Path,
    fault: Option<&str>,
) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fulgur"));
    c.args(["launch", "-n", "2", "--", "fulgur", "generate"])
        .arg(dir)
        .arg("--tokens")
        .arg(dir.join("decode.safetensors"))
        .args([
            "--max-new-tokens",
            "10",
            "--greedy",
            "--target",
            "reference",
            "--parallel",
            par,
            "--out",
        ])
        .arg(out)
        .env("FULGUR_RANK_TIMEOUT", "60")
        .env_remove("RUST_LOG");
    if let Some(f) = fault {
        c.env("FULGUR_FAULT_EXIT", f);
    }
    c.output().unwrap()
}

/// `generate --target T --print` against transformers' greedy decode: the tokens written and printed.
fn generate_on(target: &str, extra: &[&str]) {
    let dir = tiny_a();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g.safetensors");
    let tokens = dir.join("decode.safetensors");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"generate",
        &"--target",
        &target,
        &"--print",
        &dir,
        &"--tokens",
        &tokens,
        &"--tokens-key",
        &"prompt",
        &"--max-new-tokens",
        &"10",
        &"--greedy",
        &"--out",
        &out,
    ];
    for e in extra {
        args.push(e);
    }
    let o = fulgur(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_safetensors(&out).unwrap();
    let want = read_safetensors(&dir.join("decode.safetensors")).unwrap();
    assert_eq!(got["generated"].dtype, DType::I64);
    assert_eq!(got["generated"].shape, want["generated"].shape);
    assert_eq!(got["generated"].to_i64(), want["generated"].to_i64());
    assert!(got["step_logits"].rel_l2(&want["step_logits"]) < 1e-4);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let g = want["generated"].to_i64();
    let (p, w) = (want["prompt"].shape[1], want["generated"].shape[1]);
    let fmt = |v: &[i64]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ");
    let line = format!("sequence 0: {} | {}", fmt(&g[..p]), fmt(&g[p..w]));
    assert!(text.contains(&line), "{target}: want `{line}` in\n{text}");
    assert!(
        text.contains(&format!("prefill of {} × {p} tokens", want["prompt"].shape[0])),
        "{text}"
    );
}

#[test]
fn stats_of_the_full_model() {
    let o = fulgur(&[&"stats", &"--config", &"models/configs/minimax-text-01.json", &"--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let total = v["total_params"].as_f64().unwrap();
    let active = v["active_params"].as_f64().unwrap();
    assert!((total / 456.09e9 - 1.0).abs() < 1e-3, "{total}");
    assert!((active / 45.94e9 - 1.0).abs() < 1e-3, "{active}");
    let o = fulgur(&[&"stats", &"--config", &"models/configs/minimax-text-01.json"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("456.09B") && text.contains("45.94B"), "{text}");
}

/// A config whose sizes overflow a 64-bit count is an error naming the field, for stats and for the optimizer,
/// never a wrapped count (such a config once printed zero parameters) nor an allocation abort.
#[test]
fn overflowing_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let full = std::fs::read_to_string(root().join("models/configs/minimax-text-01.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&full).unwrap();
    v["hidden_size"] = serde_json::json!(1u64 << 40);
    v["vocab_size"] = serde_json::json!(1u64 << 30);
    let p = tmp.path().join("big.json");
    std::fs::write(&p, v.to_string()).unwrap();
    for cmd in [vec!["stats", "--config"], vec!["inspect"]] {
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = cmd.iter().map(|s| s as &dyn AsRef<std::ffi::OsStr>).collect();
        a.push(&p);
        fails(
            &fulgur(&a),
            &["field `hidden_size`: embed_tokens needs vocab_size 1073741824 × hidden_size 1099511627776 elements"],
        );
    }
    v["hidden_size"] = serde_json::json!(6144);
    v["head_dim"] = serde_json::json!(1u64 << 40);
    v["rotary_dim"] = serde_json::json!(1u64 << 40);
    std::fs::write(&p, v.to_string()).unwrap();
    fails(
        &fulgur(&[&"inspect", &p]),
        &["field `rotary_dim`: the graph would hold 549755813888 rotary frequencies"],
    );
}

#[test]
fn model_errors_are_one_line_and_leave_nothing() {
    let dir = tiny_a();
    let tmp = tempfile::tempdir().unwrap();
    let outdir = tmp.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("o.safetensors");
    // not a checkpoint
    let o = fulgur(&[
        &"eval-model",
        &tmp.path().join("nope"),
        &"--tokens",
        &dir.join("reference.safetensors"),
        &"--out",
        &out,
    ]);
    fails(&o, &["nope", "not a checkpoint directory"]);
    // wrong tensor key
    let o = fulgur(&[
        &"eval-model",
        &dir,
        &"--tokens",
        &dir.join("reference.safetensors"),
        &"--tokens-key",
        &"ids",
        &"--out",
        &out,
    ]);
    fails(&o, &["tensor `ids`", "reference.safetensors", "not found", "input_ids"]);
    // a token outside the vocabulary
    let bad = tmp.path().join("bad.safetensors");
    let mut m = BTreeMap::new();
    m.insert(
        "input_ids".to_string(),
        Tensor::from_i64(DType::I64, vec![1, 3], vec![1, 512, 3]),
    );
    write_safetensors(&bad, &m).unwrap();
    let o = fulgur(&[&"eval-model", &dir, &"--tokens", &bad, &"--out", &out]);
    fails(&o, &["token id 512", "[0, 512)", "bad.safetensors"]);
    // float tokens
    m.insert("input_ids".to_string(), Tensor::from_f32(vec![1, 2], vec![1.0, 2.0]));
    write_safetensors(&bad, &m).unwrap();
    let o = fulgur(&[&"eval-model", &dir, &"--tokens", &bad, &"--out", &out]);
    fails(&o, &["must be i64 or i32"]);
    // a config with a bad field
    let ck = tmp.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"hidden_size\": 128", "\"hidden_size\": \"128\"");
    std::fs::write(ck.join("config.json"), cfg).unwrap();
    std::fs::copy(dir.join("model.safetensors"), ck.join("model.safetensors")).unwrap();
    let o = fulgur(&[
        &"eval-model",
        &ck,
        &"--tokens",
        &dir.join("reference.safetensors"),
        &"--out",
        &out,
    ]);
    fails(
        &o,
        &["config.json", "field `hidden_size`", "expected a non-negative integer"],
    );
    // unwritable output
    let o = fulgur(&[
        &"generate",
        &dir,
        &"--tokens",
        &dir.join("decode.safetensors"),
        &"--max-new-tokens",
        &"2",
        &"--out",
        &"/nonexistent-dir/g.safetensors",
    ]);
    fails(&o, &["/nonexistent-dir/g.safetensors"]);
    // a config that does not exist
    let o = fulgur(&[&"stats", &"--config", &tmp.path().join("missing.json")]);
    fails(&o, &["missing.json"]);
    no_file_left(&outdir);
}

/// Token ids must be `[B, T]`: a rank-1 tensor was silently taken as one sequence.
#[test]
fn tokens_of_the_wrong_rank_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.safetensors");
    let mut m = BTreeMap::new();
    m.insert(
        "input_ids".to_string(),
        Tensor::from_i64(DType::I64, vec![5], vec![1, 2, 3, 4, 5]),
    );
    write_safetensors(&p, &m).unwrap();
    let out = tmp.path().join("o.safetensors");
    let tiny_a = tiny_a();
    for cmd in ["eval-model", "generate"] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &cmd,
            &tiny_a,
            &"--tokens",
            &p,
            &"--tokens-key",
            &"input_ids",
            &"--out",
            &out,
        ];
        if cmd == "generate" {
            args.extend([&"--max-new-tokens" as &dyn AsRef<std::ffi::OsStr>, &"1"]);
        }
        let o = fulgur(&args);
        fails(
            &o,
            &[&format!(
                "tensor `input_ids` in `{}`: token ids must be [B, T] (batch, length), found shape [5]: give a \
                 one-sequence batch the shape [1, 5]",
                p.display()
            )],
        );
        assert!(!out.exists());
    }
}

/// A transformers config without `layer_types` works (transformers' default pattern) and says so.
#[test]
fn a_config_without_layer_types_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_a().join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("layer_types");
    let p = tmp.path().join("c.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let o = fulgur(&[&"stats", &"--config", &p]);
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "warning: {}: no `layer_types`: the 4 layers alternate full and linear attention, starting with full \
             (transformers' default); give `layer_types` if the model's layers differ\n",
            p.display()
        )
    );
}

/// tiny-a with `max_position_embeddings` set to `n`, in a scratch folder.
fn tiny_a_with_max_positions(dir: &Path, n: usize) -> PathBuf {
    let ck = dir.join("ckpt");
    std::fs::create_dir(&ck).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_a().join("config.json")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = serde_json::json!(n);
    std::fs::write(ck.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(tiny_a().join("model.safetensors"), ck.join("model.safetensors")).unwrap();
    ck
}

/// `generate` checks the whole length against the model's `max_position_embeddings` before any work: refused,
/// or with `--allow-longer` a warning; `eval-model` warns past it.
#[test]
fn lengths_past_the_models_positions_are_refused_or_warned() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tiny_a_with_max_positions(tmp.path(), 14);
    let decode = tiny_a().join("decode.safetensors");
    let out = tmp.path().join("g.safetensors");
    let o = fulgur(&[
        &"generate",
        &ck,
        &"--tokens",
        &decode,
        &"--max-new-tokens",
        &"5",
        &"--out",
        &out,
    ]);
    fails(
        &o,
        &[&format!(
            "the prompt (12 tokens) and --max-new-tokens 5 make 17 positions, more than the model's \
             max_position_embeddings 14 ({}); pass --allow-longer to generate past it",
            ck.join("config.json").display()
        )],
    );
    assert!(!out.exists());
    let o = fulgur(&[
        &"generate",
        &ck,
        &"--tokens",
        &decode,
        &"--max-new-tokens",
        &"5",
        &"--allow-longer",
        &"--out",
        &out,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).starts_with(
        "warning: the prompt (12 tokens) and --max-new-tokens 5 make 17 positions, more than the model's \
         max_position_embeddings 14"
    ));
    // within the limit: silent
    let o = fulgur(&[
        &"generate",
        &ck,
        &"--tokens",
        &decode,
        &"--max-new-tokens",
        &"2",
        &"--out",
        &out,
    ]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr), "");
    // eval-model on 40 tokens
    let o = fulgur(&[
        &"eval-model",
        &ck,
        &"--tokens",
        &tiny_a().join("reference.safetensors"),
        &"--out",
        &out,
    ]);
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "warning: the sequences have 40 tokens, more than the model's max_position_embeddings 14 ({}): \
             positions past 14 are outside what the model was trained for\n",
            ck.join("config.json").display()
        )
    );
}

#[test]
fn eval_model_on_the_cpu_refuses_a_plan_over_max_memory() {
    let dir = tiny_a();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let o = fulgur(&[
        &"eval-model",
        &dir,
        &"--tokens",
        &dir.join("reference.safetensors"),
        &"--out",
        &out,
        &"--target",
        &"cpu",
        &"--max-memory",
        &"1MiB",
    ]);
    fails(
        &o,
        &[
            "at B=2, T=40 the program needs",
            "planned peak",
            "more than the limit of 1.0 MiB",
        ],
    );
    assert!(!out.exists(), "no output file after a refused run");
}

/// `fulgur bench` on the CPU target: the forward of both levels, greedy decoding and training steps report
/// their times in JSON; decoding is refused on the interpreter.
#[cfg(feature = "llvm")]
#[test]
fn bench_reports_the_forward_and_decoding_on_the_cpu() {
    let cfg = "models/configs/minimax-tiny-hf.json";
    let common = ["--target", "cpu", "--compare", "none,full", "--batch", "2", "--json"];
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"bench", &cfg, &"--seq", &"16", &"--repeats", &"2"];
    args.extend(common.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    let o = fulgur(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let levels = v["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2, "{v}");
    for (l, name) in levels.iter().zip(["none", "full"]) {
        assert_eq!(l["level"], name);
        assert_eq!(l["forward_ms_all"].as_array().unwrap().len(), 2, "{l}");
        assert!(l["forward_ms"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["tokens_per_s"].as_f64().unwrap() > 0.0, "{l}");
    }
    assert!(
        levels[1]["kernels"].as_u64().unwrap() < levels[0]["kernels"].as_u64().unwrap(),
        "the optimized graph runs fewer kernels: {v}"
    );

    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"bench", &cfg, &"--seq", &"8", &"--decode", &"4"];
    args.extend(common.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    let o = fulgur(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["batch"].as_u64(), v["prompt"].as_u64(), v["new_tokens"].as_u64()),
        (Some(2), Some(8), Some(4))
    );
    for l in v["levels"].as_array().unwrap() {
        let step = l["median_step_ms"].as_f64().unwrap();
        assert!(step > 0.0 && l["prefill_ms"].as_f64().unwrap() > 0.0, "{l}");
        let rate = l["tokens_per_s"].as_f64().unwrap();
        assert!((rate - 2.0 / (step / 1e3)).abs() < 1e-6 * rate, "{l}");
    }

    let o = fulgur(&[
        &"bench",
        &cfg,
        &"--target",
        &"reference",
        &"--decode",
        &"2",
        &"--seq",
        &"4",
    ]);
    fails(&o, &["--decode runs on the cpu or cuda target"]);

    // training steps: both levels report a step time and the planned state and transient memory
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"bench", &cfg, &"--seq", &"16", &"--train", &"--repeats", &"2"];
    args.extend(common.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    let o = fulgur(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["train"], true);
    for l in v["levels"].as_array().unwrap() {
        assert_eq!(l["step_ms_all"].as_array().unwrap().len(), 2, "{l}");
        assert!(l["step_ms"].as_f64().unwrap() > 0.0, "{l}");
        assert!(
            l["state_bytes"].as_u64().unwrap() > 0 && l["transient_bytes"].as_u64().unwrap() > 0,
            "{l}"
        );
    }
}

/// `eval-model --grads`: every parameter's gradient under transformers' names, within 1e-4 of
/// `grads.safetensors`, on the default target and the interpreter; the --out file keeps the forward outputs only.
#[test]
fn eval_model_writes_the_gradients() {
    let dir = tiny_a();
    let want = read_safetensors(&dir.join("grads.safetensors")).unwrap();
    let tokens = dir.join("reference.safetensors");
    for target in [None, Some("reference")] {
        let tmp = tempfile::tempdir().unwrap();
        let (out, grads) = (tmp.path().join("o.safetensors"), tmp.path().join("g.safetensors"));
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"eval-model",
            &dir,
            &"--tokens",
            &tokens,
            &"--out",
            &out,
            &"--grads",
            &grads,
        ];
        if let Some(t) = &target {
            args.push(&"--target");
            args.push(t);
        }
        let o = fulgur(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = read_safetensors(&grads).unwrap();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{target:?}: the gradient names"
        );
        for (name, w) in &want {
            let e = got[name].rel_l2(w);
            assert!(e < 1e-4, "{target:?} {name}: {e}");
        }
        let fwd = read_safetensors(&out).unwrap();
        assert_eq!(fwd.keys().collect::<Vec<_>>(), vec!["logits", "loss"], "{target:?}");
    }
    // the gradients file may not be the --out file or an input
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let o = fulgur(&[
        &"eval-model",
        &dir,
        &"--tokens",
        &tokens,
        &"--out",
        &out,
        &"--grads",
        &out,
    ]);
    fails(&o, &["refusing to write", "it is the --out file too"]);
    let o = fulgur(&[
        &"eval-model",
        &dir,
        &"--tokens",
        &tokens,
        &"--out",
        &out,
        &"--grads",
        &tokens,
    ]);
    fails(&o, &["refusing to write", "which this command reads"]);
    no_file_left(tmp.path());
}
