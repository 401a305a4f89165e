//! Autodiff on MiniMax: tiny-a's gradients against transformers' (`grads.safetensors`), and differentiation
//! commuting with the optimizer.

use fulgur_ir::tensor::read_safetensors;
use fulgur_ir::{Graph, Interpreter, Precision, Tensor};
use fulgur_models::checkpoint::Checkpoint;
use fulgur_models::{forward_graph, ForwardOptions};
use fulgur_passes::autodiff::{differentiate, GradOptions, GRAD_PREFIX};
use fulgur_passes::rules::{families, RuleConfig};
use fulgur_passes::{CostModel, Dce, EqSat, PassContext, Pipeline, Target};
use std::collections::{BTreeMap, HashMap};

fn tiny_a() -> (Checkpoint, Graph, HashMap<String, Tensor>) {
    let dir = fulgur_models::fixtures::tiny_a();
    let ck = Checkpoint::open(&dir).unwrap();
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let reference = read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let mut feed = ck.load_params(&g).unwrap();
    feed.insert("input_ids".into(), reference["input_ids"].clone());
    (ck, g, feed)
}

fn optimize(g: &Graph) -> Graph {
    let p = Pipeline::new()
        .with(Dce)
        .with(EqSat::new(families(&RuleConfig::default(), &[]).unwrap()));
    let cx = PassContext {
        model: CostModel::new(Target::by_name("H100").unwrap()),
    };
    p.run(g, &cx, None).unwrap().0
}

/// Every gradient output against transformers' gradients; returns the worst relative error and its tensor.
fn against_transformers(out: &BTreeMap<String, Tensor>) -> (f64, String) {
    let want = read_safetensors(&fulgur_models::fixtures::tiny_a().join("grads.safetensors")).unwrap();
    let mut worst = (0.0f64, String::new());
    let mut seen = 0;
    for (name, w) in &want {
        let got = out
            .get(&format!("{GRAD_PREFIX}{name}"))
            .unwrap_or_else(|| panic!("no gradient for `{name}`"));
        assert_eq!(got.shape, w.shape, "{name}");
        let e = got.rel_l2(w);
        if e > worst.0 || e.is_nan() {
            worst = (e, name.clone());
        }
        seen += 1;
    }
    assert_eq!(seen, 39, "tiny-a has 39 parameter tensors");
    worst
}

#[test]
fn tiny_a_gradients_match_transformers_on_the_interpreter() {
    let (_, g, feed) = tiny_a();
    let dg = differentiate(&g, "loss", &GradOptions::default()).unwrap();
    let out = Interpreter::new(Precision::F32).run(&dg, &feed).unwrap();
    let (e, name) = against_transformers(&out);
    println!("tiny-a gradients, interpreter f32: worst {e:.2e} ({name})");
    assert!(e < 1e-4, "worst relative error {e} in `{name}`");
    let loss =
        read_safetensors(&fulgur_models::fixtures::tiny_a().join("reference.safetensors")).unwrap()["loss"].to_f64()[0];
    assert!((out["loss"].to_f64()[0] - loss).abs() < 1e-5);
}

/// Optimizing then differentiating and differentiating then optimizing give the definitional gradients.
#[test]
fn differentiation_commutes_with_the_optimizer_on_tiny_a() {
    let (_, g, feed) = tiny_a();
    let interp = Interpreter::new(Precision::F32);
    let def = interp
        .run(&differentiate(&g, "loss", &GradOptions::default()).unwrap(), &feed)
        .unwrap();
    let after = differentiate(&optimize(&g), "loss", &GradOptions::default()).unwrap();
    let before = optimize(&differentiate(&g, "loss", &GradOptions::default()).unwrap());
    // what the training commands do: the backward of the optimizer's composites is their backward composites
    let count = |g: &Graph, op: &str| g.nodes().filter(|(_, n)| n.op.name() == op).count();
    let fwd = optimize(&g);
    let lightning = count(&fwd, "lightning_attention") + count(&fwd, "lightning_layer");
    let softmax = count(&fwd, "flash_attention") + count(&fwd, "flash_attention_rope");
    let moe = count(&fwd, "grouped_matmul") / 2;
    assert!(
        lightning > 0 && softmax > 0 && moe > 0,
        "the optimized tiny-a lacks a composite"
    );
    // per layer: the forward's, then the backward's (dq, dk, dv scans; the swiglu pre-activation stored, as
    // `Recompute::Auto` without a target does, and two input gradients; a weight gradient per grouped GEMM)
    for (op, layers, fwd_n, bwd_n) in [
        ("lightning_attention", lightning, 1, 3),
        ("flash_attention", softmax, 1, 0),
        ("flash_attention_grad", softmax, 0, 1),
        ("grouped_matmul", moe, 2, 2),
        ("grouped_matmul_wgrad", moe, 0, 2),
    ] {
        assert_eq!(
            count(&after, op),
            layers * (fwd_n + bwd_n),
            "`{op}` in the differentiated optimized graph ({layers} layers)"
        );
    }
    let both = optimize(&after);
    for (what, dg) in [
        ("optimize, then differentiate", after),
        ("differentiate, then optimize", before),
        ("optimize, differentiate, optimize", both),
    ] {
        let out = interp.run(&dg, &feed).unwrap();
        let mut worst = (0.0f64, String::new());
        for (name, t) in &def {
            let e = out[name].rel_l2(t);
            if e > worst.0 || e.is_nan() {
                worst = (e, name.clone());
            }
        }
        println!("{what}: worst {:.2e} ({}), {} nodes", worst.0, worst.1, dg.node_count());
        assert!(worst.0 < 1e-5, "{what}: `{}` differs by {}", worst.1, worst.0);
    }
}

/// The three AdamW steps of `tiny-a/train/` (lr 1e-2, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on tensors of
/// two or more dimensions, clipping at 1.0) through the step graph on the interpreter: each step's loss and
/// gradient norm, and every parameter after the third step.
#[test]
fn tiny_a_three_adamw_steps_match_transformers_on_the_interpreter() {
    use fulgur_passes::optim::{train_step, AdamW, ADAM_M, ADAM_V};
    let (_, g, feed) = tiny_a();
    let dir = fulgur_models::fixtures::tiny_a().join("train");
    let data = read_safetensors(&dir.join("train.safetensors")).unwrap();
    let want = read_safetensors(&dir.join("final.safetensors")).unwrap();
    let hp = AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        clip: Some(1.0),
    };
    let step = train_step(&g, "loss", &hp).unwrap();
    let mut state: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in feed.iter().filter(|(n, _)| *n != "input_ids") {
        let zeros = Tensor::from_f64(fulgur_ir::DType::F32, t.shape.clone(), vec![0.0; t.numel()]);
        state.insert(format!("{ADAM_M}{name}"), zeros.clone());
        state.insert(format!("{ADAM_V}{name}"), zeros);
        state.insert(name.clone(), t.clone());
    }
    let ids = data["input_ids"].to_i64();
    let (b, t) = (data["input_ids"].shape[1], data["input_ids"].shape[2]);
    let interp = Interpreter::new(Precision::F32);
    for s in 0..3 {
        let mut inputs = state.clone();
        inputs.insert(
            "input_ids".into(),
            Tensor::from_i64(
                fulgur_ir::DType::I64,
                vec![b, t],
                ids[s * b * t..(s + 1) * b * t].to_vec(),
            ),
        );
        for (n, v) in hp.scalars(1e-2, s as u64 + 1) {
            inputs.insert(n.into(), Tensor::from_f64(fulgur_ir::DType::F32, vec![], vec![v]));
        }
        let out = interp.run(&step, &inputs).unwrap();
        let (l, wl) = (out["loss"].to_f64()[0], data["loss"].to_f64()[s]);
        let (n, wn) = (out["grad_norm"].to_f64()[0], data["grad_norm"].to_f64()[s]);
        println!(
            "step {}: loss {l} (transformers {wl}), grad norm {n} (transformers {wn})",
            s + 1
        );
        assert!((l - wl).abs() < 1e-5, "step {}: loss {l} vs {wl}", s + 1);
        assert!((n - wn).abs() < 1e-4 * wn, "step {}: grad norm {n} vs {wn}", s + 1);
        for name in state.keys().cloned().collect::<Vec<_>>() {
            state.insert(name.clone(), out[&name].clone());
        }
    }
    let mut worst = (0.0f64, String::new());
    for (name, w) in &want {
        let e = state[name].rel_l2(w);
        if e > worst.0 || e.is_nan() {
            worst = (e, name.clone());
        }
    }
    println!("after three steps: worst parameter rel {:.2e} ({})", worst.0, worst.1);
    assert!(worst.0 < 1e-4, "`{}` differs by {}", worst.1, worst.0);
}
