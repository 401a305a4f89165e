//! What the CLI tests share: the repository root, the tiny-a fixture, running the `fulgur` binary, and the
//! one-line error check. (Each test crate uses some of these: unused ones are not an error.)
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny-a checkpoint (`../shared/fixtures/tiny-a`, or under `FULGUR_FIXTURES`).
pub fn tiny_a() -> PathBuf {
    let p = fulgur::models::fixtures::dir().join("tiny-a");
    assert!(
        p.join("config.json").exists(),
        "fixture {} is missing (set FULGUR_FIXTURES)",
        p.display()
    );
    p
}

/// Runs the `fulgur` binary in the repository root with `RUST_LOG` unset.
pub fn fulgur(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fulgur"))
        .args(args.iter().map(|a| a.as_ref()))
        .current_dir(root())
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot start the fulgur binary")
}

/// Runs the `fulgur` binary in `dir` with `RUST_LOG` unset and a rank's collectives timing out after 60 s
/// (`FULGUR_RANK_TIMEOUT`): the CLI tests that run ranks.
pub fn fulgur_in(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fulgur"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env("FULGUR_RANK_TIMEOUT", "60")
        .output()
        .expect("cannot start the fulgur binary")
}

/// Asserts a failure with one `error:` line containing every needle.
pub fn fails(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {err}");
    }
}
