//! Writing checkpoints: tiny-a saved and reopened gives back every parameter exactly, under the fixture's own
//! on-disk names; a failed save leaves the previous checkpoint.

use fulgur_models::checkpoint::{save_checkpoint, Checkpoint};
use fulgur_models::{forward_graph, ForwardOptions};

#[test]
fn a_saved_checkpoint_reopens_with_the_same_weights_and_names() {
    let dir = fulgur_models::fixtures::tiny_a();
    let ck = Checkpoint::open(&dir).unwrap();
    let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
    let weights = ck.load_params(&g).unwrap();
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ck");
    save_checkpoint(&out, &config, &weights, &[("note.txt", b"hi".to_vec())]).unwrap();
    // saving again replaces it
    save_checkpoint(&out, &config, &weights, &[]).unwrap();
    assert!(!out.join("note.txt").exists());
    let back = Checkpoint::open(&out).unwrap();
    let again = back.load_params(&g).unwrap();
    assert_eq!(again.len(), weights.len());
    for (name, t) in &weights {
        assert_eq!(&again[name], t, "{name}");
    }
    // the names are the fixture's, less the derived buffers transformers recomputes
    let derived = ["slope_rate", "query_decay", "key_decay", "diagonal_decay"];
    let mut want: Vec<String> = ck
        .tensor_names()
        .into_iter()
        .filter(|n| !derived.iter().any(|d| n.ends_with(d)))
        .collect();
    want.sort();
    let mut got = back.tensor_names();
    got.sort();
    assert_eq!(got, want);
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("ck")],
        "no temporary directory left"
    );
}

#[test]
fn a_failed_save_leaves_the_previous_checkpoint() {
    let dir = fulgur_models::fixtures::tiny_a();
    let ck = Checkpoint::open(&dir).unwrap();
    let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
    let weights = ck.load_params(&g).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ck");
    save_checkpoint(&out, "{}", &weights, &[]).unwrap();
    let mut bad = weights.clone();
    let name = "model.layers.0.mlp.experts.down_proj".to_string();
    let t = bad[&name].clone();
    bad.insert(name, fulgur_ir::Tensor::from_f64(t.dtype, vec![t.numel()], t.to_f64()));
    let e = save_checkpoint(&out, "{\"changed\": 1}", &bad, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.0.mlp.experts.down_proj") && e.contains("expected [E, C, I]"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "{}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("ck")]);
}

/// A save interrupted between its two renames (the old checkpoint set aside, the new one not yet in place) is
/// put right by the next save or by `recover_checkpoint`; a path that is a file is never replaced.
#[test]
fn an_interrupted_save_is_recovered() {
    use fulgur_models::checkpoint::recover_checkpoint;
    let dir = fulgur_models::fixtures::tiny_a();
    let ck = Checkpoint::open(&dir).unwrap();
    let g = forward_graph(&ck.config, &ForwardOptions::default()).unwrap();
    let weights = ck.load_params(&g).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ck");
    save_checkpoint(&out, "{\"v\": 1}", &weights, &[]).unwrap();
    std::fs::rename(&out, tmp.path().join(".ck.4242.old")).unwrap();
    std::fs::create_dir(tmp.path().join(".ck.4242.tmp")).unwrap();
    recover_checkpoint(&out).unwrap();
    assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "{\"v\": 1}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("ck")]);
    let file = tmp.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let e = save_checkpoint(&file, "{}", &weights, &[]).unwrap_err().to_string();
    assert!(e.contains("exists and is not a directory"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}
