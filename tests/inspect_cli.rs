//! `fulgur inspect` and `eval-model --opt`, run as processes.

mod common;
use common::{fulgur, root, tiny_a};
use std::path::PathBuf;
use std::process::Output;

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn one_error(o: Output, needle: &str) {
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with("error: ") && e.contains(needle), "{e}");
}

#[test]
fn inspect_reports_the_lightning_block_form_and_falling_kernel_count() {
    let out = ok(fulgur(&[&"inspect", &tiny_a(), &"--passes"]));
    assert!(out.contains("template layers.0 x3 (layers.0 .. layers.2)"), "{out}");
    assert!(out.contains("lightning-block-form"), "{out}");
    // the eqsat line: kernels a -> b with b < a
    let line = out.lines().find(|l| l.starts_with("pass eqsat")).unwrap();
    let k = line.split("kernels ").nth(1).unwrap();
    let (a, b) = k.split_once(" -> ").unwrap();
    let b: usize = b.split(';').next().unwrap().trim().parse().unwrap();
    let a: usize = a.trim().parse().unwrap();
    assert!(b < a, "{line}");
    // dump: the optimized graph holds the lightning kernels
    let dir = tempfile::tempdir().unwrap();
    ok(fulgur(&[&"inspect", &tiny_a(), &"--dump", &dir.path()]));
    let fir = std::fs::read_to_string(dir.path().join("02-eqsat.fir")).unwrap();
    // the lightning kernel with its prologue and epilogue, once per lightning layer, and the grouped MoE
    assert_eq!(fir.matches("lightning_layer[block=").count(), 3, "{fir}");
    assert_eq!(fir.matches("grouped_matmul[swiglu=true]").count(), 4, "{fir}");
    // softmax attention with RoPE in the flash kernel's prologue
    assert_eq!(fir.matches("flash_attention_rope[").count(), 1, "{fir}");
    assert!(dir.path().join("00-input.dot").exists());
    // the dump re-parses
    fulgur::ir::text::parse(&fir).unwrap();
}

#[test]
fn inspect_why_explains_the_lightning_kernel() {
    let out = ok(fulgur(&[&"inspect", &tiny_a(), &"--why", &"lightning_layer"]));
    assert!(
        out.starts_with("kernel layers.0.lightning_layer = lightning_layer[block="),
        "{out}"
    );
    assert!(out.contains("rule lightning-layer-kernel"), "{out}");
    let json = ok(fulgur(&[
        &"inspect",
        &tiny_a(),
        &"--why",
        &"layers.3.flash_attention_rope",
        &"--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let steps = v["steps"].as_array().unwrap();
    let rules: Vec<&str> = steps.iter().filter_map(|s| s["rule"].as_str()).collect();
    // RoPE moved into the flash kernel's prologue, ending at the kernel itself
    assert!(rules.contains(&"flash-rope-prologue"), "{json}");
    assert!(
        steps.last().unwrap()["at"]
            .as_str()
            .unwrap()
            .starts_with("flash_attention_rope["),
        "{json}"
    );
}

#[test]
fn inspect_json_and_errors() {
    let json = ok(fulgur(&[&"inspect", &"models/configs/minimax-small.json", &"--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[1]["pass"], "eqsat");
    assert!(v[1]["eqsat"]["templates"].as_array().unwrap().len() >= 2);
    one_error(
        fulgur(&[&"inspect", &tiny_a(), &"--disable-rules", &"bogus"]),
        "unknown rule family `bogus`",
    );
    one_error(
        fulgur(&[&"inspect", &tiny_a(), &"--target", &"X100"]),
        "unknown target `X100`",
    );
    one_error(fulgur(&[&"inspect", &tiny_a(), &"--bind", &"T=0"]), "must be positive");
    one_error(
        fulgur(&[&"inspect", &tiny_a(), &"--why", &"nothing"]),
        "no kernel named `nothing`",
    );
    // disabling the attention family leaves no lightning kernel
    let dir = tempfile::tempdir().unwrap();
    ok(fulgur(&[
        &"inspect",
        &tiny_a(),
        &"--disable-rules",
        &"lightning",
        &"--dump",
        &dir.path(),
    ]));
    let fir = std::fs::read_to_string(dir.path().join("02-eqsat.fir")).unwrap();
    assert!(!fir.contains("lightning_attention") && !fir.contains("lightning_layer"));
}

#[test]
fn eval_model_opt_levels_agree_with_the_reference() {
    let dir = tiny_a();
    let tmp = tempfile::tempdir().unwrap();
    for opt in ["none", "full"] {
        let out = tmp.path().join(format!("{opt}.safetensors"));
        ok(fulgur(&[
            &"eval-model",
            &dir,
            &"--tokens",
            &dir.join("reference.safetensors"),
            &"--out",
            &out,
            &"--opt",
            &opt,
            &"--hidden-states",
        ]));
        let got = fulgur::ir::tensor::read_safetensors(&out).unwrap();
        let want = fulgur::ir::tensor::read_safetensors(&dir.join("reference.safetensors")).unwrap();
        for name in ["logits", "hidden_states.1", "hidden_states.4"] {
            let e = got[name].rel_l2(&want[name]);
            assert!(e < 1e-4, "--opt {opt} {name}: {e}");
        }
        assert!((got["loss"].to_f64()[0] - want["loss"].to_f64()[0]).abs() < 1e-5);
    }
}

#[test]
fn nonsensical_limits_are_refused_with_their_cause() {
    for (args, msg) in [
        (
            vec!["--time-limit", "nan"],
            "error: the time limit must be a positive number of seconds, found NaN",
        ),
        (
            vec!["--time-limit", "-1"],
            "error: the time limit must be a positive number of seconds, found -1.0",
        ),
        (
            vec!["--time-limit", "inf"],
            "error: the time limit must be a finite number of seconds, found infinity (leave it out for no limit)",
        ),
        (
            vec!["--node-limit", "0"],
            "error: the node limit must be at least 1 e-node",
        ),
        (vec!["--window", "0"], "error: the window must be at least 1 node"),
    ] {
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"inspect", &"examples/mlp.fir"];
        a.extend(args.iter().map(|s| s as &dyn AsRef<std::ffi::OsStr>));
        let o = fulgur(&a);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&o.stderr).trim_end(), msg, "{args:?}");
    }
}

#[test]
fn a_time_limit_that_cuts_work_short_is_a_warning_naming_the_templates() {
    // a chain long enough for several windows, and a budget too small for any of them
    let mut src = String::from("graph chain {\n  %0 = input \"x\" : f32[B, 8]\n");
    for i in 1..=600 {
        let op = ["tanh", "sin", "sigmoid"][i % 3];
        src.push_str(&format!("  %{i} = {op}(%{}) : f32[B, 8]\n", i - 1));
    }
    src.push_str("  output \"y\" = %600\n}\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.fir");
    std::fs::write(&path, src).unwrap();
    let o = fulgur(&[&"inspect", &path, &"--window", &"100", &"--time-limit", &"0.000001"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines().any(|l| l.starts_with("warning: ")
            && l.contains("templates not optimized (main@")
            && l.ends_with("the result depends on machine speed")),
        "{err}"
    );
    // without a time limit: no warning
    let o = fulgur(&[&"inspect", &path, &"--window", &"100"]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr), "");
}

/// `--bind` names only the graph's symbols, each once; ceilings are positive numbers.
#[test]
fn bindings_and_ceilings_the_spec_does_not_allow_are_refused() {
    let exact = |o: Output, want: &str| {
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&o.stderr).trim_end(), want);
    };
    exact(
        fulgur(&[&"inspect", &tiny_a(), &"--bind", &"P=8"]),
        "error: --bind P: the graph has no symbol `P` (its symbols: B, T)",
    );
    exact(
        fulgur(&[&"inspect", &tiny_a(), &"--bind", &"T=8,T=16"]),
        "error: --bind T is given twice (8 and 16)",
    );
    exact(
        fulgur(&[&"inspect", &"examples/mlp.fir", &"--bind", &"T=8"]),
        "error: --bind T: the graph has no symbol `T` (its symbols: B)",
    );
    // sizes that overflow at the bound values are an error, not a cost of zero
    exact(
        fulgur(&[&"inspect", &"examples/mlp.fir", &"--bind", &"B=4611686018427387904"]),
        "error: the shape f32[B, 64] of node %0 overflows 64 bits at B=4611686018427387904, N=4096, P=4096, \
         T=4096 (--bind)",
    );
    let dir = tempfile::tempdir().unwrap();
    for (json, want) in [
        (
            r#"{"mem_bw": -1}"#,
            "ceiling `mem_bw` must be a positive number, found -1",
        ),
        (
            r#"{"matmul_flops_bf16": 0}"#,
            "ceiling `matmul_flops_bf16` must be a positive number, found 0",
        ),
        (
            r#"{"launch_s": -3e-6}"#,
            "ceiling `launch_s` must be a number of seconds ≥ 0, found -3e-6",
        ),
    ] {
        let p = dir.path().join("c.json");
        std::fs::write(&p, json).unwrap();
        exact(
            fulgur(&[&"inspect", &"examples/mlp.fir", &"--ceilings", &p]),
            &format!("error: {}: {want}", p.display()),
        );
    }
    // zero launch time is a measurement, not an error
    let p = dir.path().join("ok.json");
    std::fs::write(&p, r#"{"launch_s": 0}"#).unwrap();
    ok(fulgur(&[&"inspect", &"examples/mlp.fir", &"--ceilings", &p]));
}

/// The examples in `inspect --help` for `--why` work on every shipped model, and a wrong name lists the valid
/// ones.
#[test]
fn the_help_examples_of_why_work_on_the_shipped_models() {
    let help = ok(fulgur(&[&"inspect", &"--help"]));
    let text: String = help
        .split("--why")
        .nth(1)
        .expect("--why in the help")
        .lines()
        .enumerate()
        // the --why line and its continuation lines, up to the next option
        .take_while(|(i, l)| *i == 0 || !l.trim_start().starts_with('-'))
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join(" ");
    let examples: Vec<&str> = text.split('`').skip(1).step_by(2).collect();
    assert!(examples.len() >= 3, "{text}");
    let models: Vec<PathBuf> = vec![
        tiny_a(),
        root().join("models/configs/minimax-small.json"),
        root().join("models/configs/minimax-tiny-hf.json"),
        root().join("models/configs/minimax-text-01.json"),
    ];
    for m in &models {
        for ex in &examples {
            let out = ok(fulgur(&[&"inspect", m, &"--why", ex]));
            assert!(out.starts_with("kernel "), "{} --why {ex}: {out}", m.display());
        }
    }
    let o = fulgur(&[&"inspect", &tiny_a(), &"--why", &"layers.0.lightning_attention"]);
    one_error(
        o,
        "no kernel named `layers.0.lightning_attention` in the optimized graph: give a kernel's name (",
    );
}

/// `inspect --kernels` prints the kernel program and its planned memory; with `--dump` it writes it too.
#[test]
fn inspect_prints_and_dumps_the_kernel_program() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(fulgur(&[&"inspect", &tiny_a(), &"--kernels", &"--dump", &dir.path()]));
    let first = out.lines().next().unwrap();
    assert!(first.starts_with("kernel program minimax_forward: "), "{first}");
    assert!(
        first.contains("distinct codes") && first.ends_with("symbols: B, T"),
        "{first}"
    );
    assert!(out.contains("\nprepare:\n") && out.contains("\nstep:\n"), "{out}");
    assert!(out.contains(" composite lightning_layer[block="), "{out}");
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("memory at B=1, T=4096: planned peak "), "{last}");
    assert_eq!(std::fs::read_to_string(dir.path().join("kernels.txt")).unwrap(), out);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("kernels.json")).unwrap()).unwrap();
    assert!(v["step"].as_array().unwrap().len() > 10);
    let json = ok(fulgur(&[
        &"inspect",
        &tiny_a(),
        &"--kernels",
        &"--json",
        &"--bind",
        &"T=16",
    ]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["layout"]["arena_bytes"].as_u64().unwrap() > 0);
}
