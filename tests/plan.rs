//! The plan search (`fulgur::plan`, `fulgur plan`): cluster files checked with their errors, the search's
//! invariants on the shipped clusters (the chosen plan is the fastest that fits, every rejection exceeds the
//! memory, every refusal names its reason), and the command's text and JSON.

mod common;

use fulgur::models::MiniMaxConfig;
use fulgur::plan::{search, Cluster, Mode};
use std::path::PathBuf;

fn cluster(name: &str) -> Cluster {
    Cluster::from_file(&common::root().join("clusters").join(name)).unwrap()
}

fn config(name: &str) -> MiniMaxConfig {
    MiniMaxConfig::from_file(&common::root().join("models/configs").join(name)).unwrap()
}

#[test]
fn the_shipped_cluster_files_read() {
    let c = cluster("2048xh800.json");
    assert_eq!((c.gpus(), c.gpu.as_str(), c.gpus_per_node), (2048, "H800", 8));
    assert_eq!(cluster("8xh200.json").gpus(), 8);
    assert_eq!(cluster("8x8xh800-ib.json").gpus(), 64);
}

#[test]
fn bad_cluster_files_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let write = |body: &str| -> PathBuf {
        let p = dir.path().join("c.json");
        std::fs::write(&p, body).unwrap();
        p
    };
    let good = std::fs::read_to_string(common::root().join("clusters/8xh200.json")).unwrap();
    let e = Cluster::from_file(&write(&good.replace("\"H200\"", "\"B300\""))).unwrap_err();
    assert!(
        e.ends_with("unknown gpu `B300` (known: H100, H200, H800, H20, A100, CPU)"),
        "{e}"
    );
    let e = Cluster::from_file(&write(&good.replace("\"nodes\": 1", "\"nodes\": 0"))).unwrap_err();
    assert!(e.ends_with("`gpus_per_node` and `nodes` must be at least 1"), "{e}");
    let e = Cluster::from_file(&write(&good.replace("\"latency_us\": 3", "\"latency_us\": -1"))).unwrap_err();
    assert!(
        e.ends_with("`intra_node` needs a positive bandwidth and a latency of at least 0"),
        "{e}"
    );
    let e = Cluster::from_file(&write(&good.replace("\"memory_gib\"", "\"memory\""))).unwrap_err();
    assert!(e.contains("unknown field `memory`"), "{e}");
    let e = Cluster::from_file(&dir.path().join("missing.json")).unwrap_err();
    assert!(e.starts_with("cannot read "), "{e}");
}

/// bench-m training on one node of 8 H200: a plan fits, it is the fastest that does, every rejected candidate
/// needs more than 90% of the memory and every accepted one less, the degrees use every GPU, and degrees that
/// do not divide the heads or experts are refused with that reason.
#[test]
fn the_search_chooses_the_fastest_plan_that_fits() {
    let cfg = config("bench-m.json");
    let c = cluster("8xh200.json");
    let s = search(&cfg, &c, Mode::Train, 2048, 32).unwrap();
    let best = s.best.clone().expect("a plan fits");
    let budget = c.memory_gib * 1024f64.powi(3) * 0.9;
    assert!(s
        .fitting
        .iter()
        .all(|e| e.step_s >= best.step_s && e.memory.total <= budget));
    assert!(s
        .too_big
        .iter()
        .all(|e| e.memory.total > budget && e.rejected.is_some()));
    for e in s.fitting.iter().chain(&s.too_big) {
        let degrees: usize = e
            .parallel
            .split(',')
            .map(|d| d.split_once('=').unwrap())
            .filter(|(name, _)| *name != "etp")
            .map(|(_, n)| n.parse::<usize>().unwrap())
            .product();
        assert_eq!(degrees, 8, "{}", e.parallel);
        let m = &e.memory;
        let parts = m.weights + m.gradients + m.optimizer + m.activations + m.states;
        assert!((parts - m.total).abs() < 1.0, "{}", e.parallel);
        assert!(
            e.step_s > 0.0 && e.mfu > 0.0 && e.mfu < 1.0,
            "{}: MFU {}",
            e.parallel,
            e.mfu
        );
    }
    // bench-m has 4 key-value heads and 8 experts
    assert!(s
        .refused
        .iter()
        .any(|(p, why)| p == "dp=1,ep=1,sp=1,tp=8" && why == "num_key_value_heads (4) is not divisible by tp (8)"));
    assert!(s.candidates >= s.fitting.len() + s.too_big.len());
    // a larger batch with the same degrees takes longer
    let s2 = search(&cfg, &c, Mode::Train, 2048, 64).unwrap();
    let same = s2
        .fitting
        .iter()
        .find(|e| e.parallel == best.parallel && e.recompute == best.recompute);
    if let Some(e) = same {
        assert!(e.step_s > best.step_s);
    }
}

/// MiniMax-Text-01 on one node of 8 H200: its bf16 weights alone (912 GB) need more than the node holds for
/// training, so nothing fits, and the error says how much the smallest candidate needs.
#[test]
fn minimax_text_01_training_does_not_fit_one_node() {
    let cfg = config("minimax-text-01.json");
    let s = search(&cfg, &cluster("8xh200.json"), Mode::Train, 4096, 8).unwrap();
    assert!(s.best.is_none());
    assert!(s.too_big[0].memory.weights > 100.0 * 1024f64.powi(3));
}

#[test]
fn fulgur_plan_prints_text_and_json() {
    let o = common::fulgur(&[
        &"plan",
        &"models/configs/bench-m.json",
        &"--cluster",
        &"clusters/8xh200.json",
        &"--mode",
        &"train",
        &"--seq",
        &"2048",
        &"--batch",
        &"32",
        &"--why",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.starts_with("8x H200 in one node (8 GPUs), training of 32 × 2048 tokens: "),
        "{out}"
    );
    for part in [
        "\nchosen: dp=",
        "\nnext fastest:\n",
        "\nrejected for memory (least first):\n",
        "\nrefused degrees:\n",
    ] {
        assert!(out.contains(part), "{part} in {out}");
    }
    let o = common::fulgur(&[
        &"plan",
        &"models/configs/bench-m.json",
        &"--cluster",
        &"clusters/8xh200.json",
        &"--mode",
        &"infer",
        &"--seq",
        &"8192",
        &"--batch",
        &"4",
        &"--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["mode"], "infer");
    assert!(j["best"]["decode_token_s"].as_f64().unwrap() > 0.0);
    let o = common::fulgur(&[
        &"plan",
        &"models/configs/minimax-text-01.json",
        &"--cluster",
        &"clusters/8xh200.json",
        &"--seq",
        &"4096",
        &"--batch",
        &"8",
    ]);
    common::fails(
        &o,
        &[
            "no plan fits 8 GPUs of 141 GiB",
            "the smallest (",
            "GiB per GPU, more than 90% of 141 GiB",
        ],
    );
}

/// MiniMax-Text-01 training at 512 × 8k tokens on 2,048 H800: a plan fits only where the expert weights are cut
/// further than their 32-way split: stored sharded over the data-parallel ranks (ZeRO-3 for the experts), split
/// by width (expert-tensor parallelism) or cut into pipeline stages; their 435B parameters outgrow 80 GiB GPUs
/// otherwise, and the search says so. Plans of each kind fit; the pipelines' bubble is priced.
#[test]
fn minimax_text_01_training_on_2048_gpus_needs_the_experts_sharded() {
    let cfg = config("minimax-text-01.json");
    let s = search(&cfg, &cluster("2048xh800.json"), Mode::Train, 8192, 512).unwrap();
    let best = s.best.clone().expect("a plan fits");
    let etp = |p: &str| p.contains(",etp=");
    let pp = |p: &str| p.contains(",pp=");
    let cut = |e: &fulgur::plan::Estimate| e.experts_sharded || etp(&e.parallel) || pp(&e.parallel);
    assert!(cut(&best), "{}", best.parallel);
    assert!(s.fitting.iter().all(cut));
    assert!(s.too_big.iter().any(|e| !cut(e)));
    for kind in [
        |e: &fulgur::plan::Estimate| e.experts_sharded && !e.parallel.contains(",etp=") && !e.parallel.contains(",pp="),
        |e: &fulgur::plan::Estimate| !e.experts_sharded && e.parallel.contains(",etp=") && !e.parallel.contains(",pp="),
        |e: &fulgur::plan::Estimate| !e.experts_sharded && e.parallel.contains(",pp="),
    ] {
        assert!(s.fitting.iter().any(kind), "a kind of plan has no fitting candidate");
    }
    // a pipeline pays its bubble; a plan without stages pays none
    for e in &s.fitting {
        assert_eq!(e.bubble_s > 0.0, pp(&e.parallel), "{}", e.parallel);
    }
}
