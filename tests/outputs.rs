//! The output-path rule (docs/cli.md, "Output files"), for every command that writes: an output that is one of
//! the command's inputs (the same file, also through a symbolic or hard link) is refused before any work and
//! the input is left as it was; a symbolic link is followed (its target written, the link kept); a device or
//! FIFO is written through, never replaced; a directory is refused.

mod common;
use common::{fulgur, root};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Asserts one `error:` line equal to `want`.
fn refused(o: Output, want: &str) {
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim_end(), want);
}

fn ok(o: Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A scratch copy of the mlp example (graph and inputs) in `dir`.
fn mlp(dir: &Path) -> (PathBuf, PathBuf) {
    let g = dir.join("mlp.fir");
    let i = dir.join("mlp.inputs.safetensors");
    std::fs::copy(root().join("examples/mlp.fir"), &g).unwrap();
    std::fs::copy(root().join("examples/mlp.inputs.safetensors"), &i).unwrap();
    (g, i)
}

/// A scratch checkpoint: tiny-a's config and weights, and its token file.
fn checkpoint(dir: &Path) -> (PathBuf, PathBuf) {
    let src = fulgur::models::fixtures::dir().join("tiny-a");
    let ck = dir.join("ckpt");
    std::fs::create_dir(&ck).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), ck.join(f)).unwrap();
    }
    let tokens = dir.join("tokens.safetensors");
    std::fs::copy(src.join("decode.safetensors"), &tokens).unwrap();
    (ck, tokens)
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn eval_refuses_to_write_over_its_inputs() {
    let d = tempfile::tempdir().unwrap();
    let (g, i) = mlp(d.path());
    let (g0, i0) = (bytes(&g), bytes(&i));
    let msg = |out: &Path, what: &str| {
        format!(
            "error: refusing to write {}: it is {what}, which this command reads; choose another output path",
            out.display()
        )
    };
    refused(
        fulgur(&[&"eval", &g, &"--inputs", &i, &"--out", &i]),
        &msg(&i, "the inputs file"),
    );
    refused(
        fulgur(&[&"eval", &g, &"--inputs", &i, &"--out", &g]),
        &msg(&g, "the graph file"),
    );
    // through a symbolic link and a hard link
    let link = d.path().join("link.safetensors");
    std::os::unix::fs::symlink(&i, &link).unwrap();
    refused(
        fulgur(&[&"eval", &g, &"--inputs", &i, &"--out", &link]),
        &format!(
            "error: refusing to write {}: it is the inputs file {}, which this command reads; choose another \
             output path",
            link.display(),
            i.display()
        ),
    );
    let hard = d.path().join("hard.safetensors");
    std::fs::hard_link(&i, &hard).unwrap();
    refused(
        fulgur(&[&"eval", &g, &"--inputs", &i, &"--out", &hard]),
        &format!(
            "error: refusing to write {}: it is the inputs file {}, which this command reads; choose another \
             output path",
            hard.display(),
            i.display()
        ),
    );
    assert_eq!(bytes(&g), g0);
    assert_eq!(bytes(&i), i0);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
}

#[test]
fn show_refuses_its_graph_and_follows_links() {
    let d = tempfile::tempdir().unwrap();
    let (g, _) = mlp(d.path());
    let g0 = bytes(&g);
    refused(
        fulgur(&[&"show", &g, &"--format", &"json", &"--out", &g]),
        &format!(
            "error: refusing to write {}: it is the graph file, which this command reads; choose another output \
             path",
            g.display()
        ),
    );
    assert_eq!(bytes(&g), g0);
    // a link to a new file: the target is written, the link stays a link
    let target = d.path().join("target.json");
    let link = d.path().join("out.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    ok(fulgur(&[&"show", &g, &"--format", &"json", &"--out", &link]));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(String::from_utf8(bytes(&target)).unwrap().contains("\"nodes\""));
    // a directory is refused
    refused(
        fulgur(&[&"show", &g, &"--out", &d.path()]),
        &format!("error: cannot write {}: it is a directory", d.path().display()),
    );
}

#[test]
fn special_files_are_written_through_never_replaced() {
    let d = tempfile::tempdir().unwrap();
    let (g, i) = mlp(d.path());
    // a FIFO with a reader: the output arrives through it
    let fifo = d.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(&fifo).unwrap())
    };
    ok(fulgur(&[&"eval", &g, &"--inputs", &i, &"--out", &fifo]));
    let got = reader.join().unwrap();
    assert!(got.len() > 8, "{} bytes through the FIFO", got.len());
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    // a character device of our own (where this user may make one): written through, still a device
    let null = d.path().join("null");
    let made = Command::new("mknod")
        .arg(&null)
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    if made {
        ok(fulgur(&[&"show", &g, &"--out", &null]));
        assert!(std::fs::symlink_metadata(&null).unwrap().file_type().is_char_device());
    } else {
        eprintln!("skipping the character-device case: mknod is not permitted here");
    }
}

#[test]
fn model_commands_refuse_their_checkpoint_and_tokens() {
    let d = tempfile::tempdir().unwrap();
    let (ck, tokens) = checkpoint(d.path());
    let t0 = bytes(&tokens);
    let w = ck.join("model.safetensors");
    let w0 = bytes(&w);
    let msg = |out: &Path, what: &str| {
        format!(
            "error: refusing to write {}: it is {what}, which this command reads; choose another output path",
            out.display()
        )
    };
    refused(
        fulgur(&[
            &"eval-model",
            &ck,
            &"--tokens",
            &tokens,
            &"--tokens-key",
            &"prompt",
            &"--out",
            &tokens,
        ]),
        &msg(&tokens, "the tokens file"),
    );
    refused(
        fulgur(&[
            &"eval-model",
            &ck,
            &"--tokens",
            &tokens,
            &"--tokens-key",
            &"prompt",
            &"--out",
            &w,
        ]),
        &msg(&w, "a checkpoint file"),
    );
    refused(
        fulgur(&[
            &"generate",
            &ck,
            &"--tokens",
            &tokens,
            &"--max-new-tokens",
            &"2",
            &"--out",
            &ck.join("config.json"),
        ]),
        &msg(&ck.join("config.json"), "the checkpoint's config"),
    );
    assert_eq!(bytes(&tokens), t0);
    assert_eq!(bytes(&w), w0);
}

#[test]
fn inspect_refuses_a_dump_over_its_input() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("00-input.fir");
    std::fs::copy(root().join("examples/mlp.fir"), &input).unwrap();
    let before = bytes(&input);
    refused(
        fulgur(&[&"inspect", &input, &"--dump", &d.path()]),
        &format!(
            "error: refusing to write {}: it is the input file, which this command reads; choose another output \
             path",
            input.display()
        ),
    );
    assert_eq!(bytes(&input), before);
    // a dump path that is a file
    refused(
        fulgur(&[&"inspect", &input, &"--dump", &input]),
        &format!("error: --dump {}: not a directory", input.display()),
    );
}
