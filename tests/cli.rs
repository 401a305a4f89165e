//! The `fulgur` command, run as a process: what it prints, what it writes, and how it fails.
//!
//! Every failure must exit non-zero with exactly one line `error: ...` on stderr, never panic, and leave no
//! file under the output name (nor any temporary file beside it).

use fulgur::ir::tensor::{read_safetensors, write_safetensors};
use fulgur::ir::{json, text, DType, Graph, Interpreter, Precision, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EXAMPLES: [&str; 3] = ["mlp", "attention", "lightning"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn example(file: &str) -> PathBuf {
    root().join("examples").join(file)
}

fn fir(name: &str) -> PathBuf {
    example(&format!("{name}.fir"))
}

fn inputs(name: &str) -> PathBuf {
    example(&format!("{name}.inputs.safetensors"))
}

fn fulgur<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_fulgur"))
        .args(args)
        .current_dir(root())
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot start the fulgur binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("stderr is UTF-8")
}

/// Asserts success with nothing on stderr; returns stdout.
fn ok(o: Output) -> String {
    assert!(o.status.success(), "fulgur failed ({}): {}", o.status, stderr(&o));
    assert_eq!(stderr(&o), "", "unexpected stderr");
    stdout(&o)
}

/// Asserts a failure reported as exactly one `error:` line containing every needle; returns that line.
fn fails(o: Output, needles: &[&str]) -> String {
    let err = stderr(&o);
    assert!(!o.status.success(), "fulgur succeeded; stdout: {}", stdout(&o));
    assert_ne!(o.status.code(), Some(101), "fulgur panicked: {err}");
    assert!(!err.contains("panicked"), "fulgur panicked: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{err}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    for n in needles {
        assert!(line.contains(n), "`{n}` missing from: {line}");
    }
    line.to_string()
}

fn load(name: &str) -> Graph {
    text::parse(&std::fs::read_to_string(fir(name)).expect("example exists")).expect("example parses")
}

fn run_library(g: &Graph, inputs: &BTreeMap<String, Tensor>, p: Precision) -> BTreeMap<String, Tensor> {
    let inputs: HashMap<String, Tensor> = inputs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    Interpreter::new(p).run(g, &inputs).expect("library run")
}

/// Names of the entries of a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("readable folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A scratch folder holding the mlp inputs, optionally changed by `edit`.
fn mlp_inputs_with(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> PathBuf {
    let mut t = read_safetensors(&inputs("mlp")).expect("mlp inputs");
    edit(&mut t);
    let p = dir.join("in.safetensors");
    write_safetensors(&p, &t).expect("write inputs");
    p
}

// ---------------------------------------------------------------------------------------------- check

#[test]
fn check_prints_the_summary_of_each_example() {
    for name in EXAMPLES {
        let out = ok(fulgur(["check".as_ref(), fir(name).as_os_str()]));
        let g = load(name);
        let s = g.summary();
        assert!(out.starts_with(&format!("graph {name}: ok (")), "{out}");
        assert!(out.contains(&format!("\nnodes       {}\n", s.nodes)), "{out}");
        assert!(out.contains(&format!("\ninputs      {}\n", s.inputs)), "{out}");
        assert!(out.contains(&format!("\nparameters  {} (", s.params)), "{out}");
        assert!(out.contains(&format!("\noutputs     {}\n", s.outputs)), "{out}");
        assert!(
            out.contains(&format!("\nsymbols     {}\n", s.symbols.join(", "))),
            "{out}"
        );
        for id in g.inputs() {
            let (iname, ty, _) = g.node(id).op.input_decl().expect("an input");
            let listed = out.lines().any(|l| {
                l.trim_start()
                    .strip_prefix(iname)
                    .is_some_and(|rest| rest.starts_with(' ') && rest.trim() == ty.to_string())
            });
            assert!(listed, "`{iname}: {ty}` not listed:\n{out}");
        }
        for (oname, v) in g.outputs() {
            assert!(
                out.contains(&format!("  {oname}")) && out.contains(&g.ty(*v).to_string()),
                "{out}"
            );
        }
        let ops = out.lines().find(|l| l.starts_with("ops")).expect("an ops line");
        for (op, n) in &s.op_counts {
            assert!(ops.contains(&format!("{op} {n}")), "{ops}");
        }
    }
    let mlp = ok(fulgur(["check", "examples/mlp.fir"]));
    // 64·128 + 128 + 128·16 + 16
    assert!(mlp.contains("parameters  4 (10,384 elements)"), "{mlp}");
    assert!(mlp.contains("symbols     B\n"), "{mlp}");
}

// ---------------------------------------------------------------------------------------------- show

#[test]
fn show_fir_reparses_to_the_same_graph() {
    for name in EXAMPLES {
        let out = ok(fulgur([
            "show".as_ref(),
            fir(name).as_os_str(),
            "--format".as_ref(),
            "fir".as_ref(),
        ]));
        let reparsed = text::parse(&out).unwrap_or_else(|e| panic!("{name}: {e}\n{out}"));
        assert_eq!(reparsed, load(name), "{name}");
        assert_eq!(text::print(&reparsed), out, "{name}: printing is not canonical");
    }
    // fir is the default format
    assert_eq!(
        ok(fulgur(["show", "examples/mlp.fir"])),
        ok(fulgur(["show", "examples/mlp.fir", "--format", "fir"]))
    );
}

#[test]
fn show_json_reads_back_and_is_accepted_as_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in EXAMPLES {
        let out = ok(fulgur([
            "show".as_ref(),
            fir(name).as_os_str(),
            "--format".as_ref(),
            "json".as_ref(),
        ]));
        let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        let g = load(name);
        assert_eq!(v["name"], name);
        assert_eq!(v["nodes"].as_array().map(|a| a.len()), Some(g.node_count()));
        assert_eq!(v["outputs"].as_array().map(|a| a.len()), Some(g.outputs().len()));
        assert_eq!(json::from_json(&out).expect("reads back"), g);
        // a `.json` file is read as JSON by every command
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, &out).expect("write json");
        assert_eq!(
            ok(fulgur(["show".as_ref(), path.as_os_str()])),
            ok(fulgur(["show".as_ref(), fir(name).as_os_str()]))
        );
        let check = ok(fulgur(["check".as_ref(), path.as_os_str()]));
        assert!(check.starts_with(&format!("graph {name}: ok")), "{check}");
    }
}

#[test]
fn show_dot_has_a_node_per_node_and_an_edge_per_use() {
    for name in EXAMPLES {
        let out = ok(fulgur([
            "show".as_ref(),
            fir(name).as_os_str(),
            "--format".as_ref(),
            "dot".as_ref(),
        ]));
        let g = load(name);
        assert!(out.starts_with(&format!("digraph \"{name}\" {{")), "{out}");
        assert!(out.ends_with("}\n"), "{out}");
        for i in 0..g.node_count() {
            assert!(out.contains(&format!("  n{i} [")), "node {i} missing:\n{out}");
        }
        let uses: usize = g.nodes().map(|(_, n)| n.inputs.len()).sum::<usize>() + g.outputs().len();
        assert_eq!(out.matches(" -> ").count(), uses, "{out}");
    }
}

#[test]
fn show_out_writes_the_file_and_nothing_to_stdout() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in ["fir", "json", "dot"] {
        let path = dir.path().join(format!("mlp.{format}"));
        let printed = ok(fulgur(["show", "examples/mlp.fir", "--format", format]));
        let o = fulgur([
            "show".as_ref(),
            "examples/mlp.fir".as_ref(),
            "--format".as_ref(),
            format.as_ref(),
            "--out".as_ref(),
            path.as_os_str(),
        ]);
        assert_eq!(ok(o), "");
        assert_eq!(std::fs::read_to_string(&path).expect("written"), printed, "{format}");
    }
    let mut names = listing(dir.path());
    names.sort();
    assert_eq!(names, ["mlp.dot", "mlp.fir", "mlp.json"], "no temporary files left");
}

// ---------------------------------------------------------------------------------------------- eval

#[test]
fn eval_writes_what_the_library_computes() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in EXAMPLES {
        let g = load(name);
        let ins = read_safetensors(&inputs(name)).expect("inputs");
        for (flag, precision) in [("f32", Precision::F32), ("f64", Precision::F64)] {
            let out = dir.path().join(format!("{name}.{flag}.out.safetensors"));
            let o = fulgur([
                "eval".as_ref(),
                fir(name).as_os_str(),
                "--inputs".as_ref(),
                inputs(name).as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
                "--precision".as_ref(),
                flag.as_ref(),
            ]);
            assert_eq!(ok(o), "", "nothing on stdout without --print");
            let got = read_safetensors(&out).expect("outputs written");
            // the file stores each output in its dtype: compare with the library's values stored the same way
            let want: BTreeMap<String, Tensor> = run_library(&g, &ins, precision)
                .into_iter()
                .map(|(k, t)| {
                    let d = t.dtype;
                    (k, t.cast(d))
                })
                .collect();
            assert_eq!(got, want, "{name} --precision {flag}");
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                g.outputs().iter().map(|(n, _)| n).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn eval_print_describes_each_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("y.safetensors");
    let printed = ok(fulgur([
        "eval".as_ref(),
        "examples/mlp.fir".as_ref(),
        "--inputs".as_ref(),
        "examples/mlp.inputs.safetensors".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--print".as_ref(),
    ]));
    let y = &read_safetensors(&out).expect("written")["y"];
    let v = y.to_f64();
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines[0], "y: f32[4, 16]", "{printed}");
    assert!(
        lines[1].starts_with("  values  [") && lines[1].contains("(64 values)"),
        "{printed}"
    );
    let first: f64 = lines[1]["  values  [".len()..]
        .split(',')
        .next()
        .and_then(|x| x.trim().parse().ok())
        .expect("a number");
    assert!(
        (first - v[0]).abs() <= 1e-5 * v[0].abs().max(1.0),
        "{first} vs {}",
        v[0]
    );
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let stat = |key: &str| -> f64 {
        let rest = &lines[2][lines[2].find(key).expect(key) + key.len()..];
        rest.split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .expect("a number")
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-3);
    assert!(
        close(stat("min "), v.iter().copied().fold(f64::INFINITY, f64::min)),
        "{printed}"
    );
    assert!(
        close(stat("max "), v.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
        "{printed}"
    );
    assert!(close(stat("mean "), mean), "{printed}");
}

#[test]
fn eval_with_nan_input_runs_and_warns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ins = mlp_inputs_with(dir.path(), |t| {
        let x = t.get_mut("x").expect("x");
        if let fulgur::ir::Buffer::F(v) = &mut x.data {
            v[0] = f64::NAN;
        }
    });
    let out = dir.path().join("out.safetensors");
    let o = fulgur([
        "eval".as_ref(),
        "examples/mlp.fir".as_ref(),
        "--inputs".as_ref(),
        ins.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.lines()
            .any(|l| l.starts_with("warning: ") && l.contains("input `x`") && l.contains("1 NaN")),
        "{err}"
    );
    assert!(!err.contains("error"), "{err}");
    // NaN in row 0 of x reaches every value of row 0 of y, and nothing else
    let y = read_safetensors(&out).expect("written")["y"].to_f64();
    assert!(y[..16].iter().all(|v| v.is_nan()), "{y:?}");
    assert!(y[16..].iter().all(|v| v.is_finite()), "{y:?}");
}

// ---------------------------------------------------------------------------------------------- failures

#[test]
fn missing_graph_file_is_named() {
    let line = fails(
        fulgur(["check", "examples/does-not-exist.fir"]),
        &["examples/does-not-exist.fir"],
    );
    assert_eq!(
        line,
        "error: cannot read examples/does-not-exist.fir: No such file or directory (os error 2)"
    );
    fails(
        fulgur(["show", "examples/does-not-exist.fir"]),
        &["examples/does-not-exist.fir"],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.safetensors");
    fails(
        fulgur([
            "eval".as_ref(),
            "examples/does-not-exist.fir".as_ref(),
            "--inputs".as_ref(),
            "examples/mlp.inputs.safetensors".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ]),
        &["examples/does-not-exist.fir"],
    );
    fails(
        fulgur([
            "eval".as_ref(),
            "examples/mlp.fir".as_ref(),
            "--inputs".as_ref(),
            "examples/none.safetensors".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ]),
        &["examples/none.safetensors", "No such file"],
    );
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
}

#[test]
fn malformed_fir_is_reported_at_file_line_col() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        // a syntax error on line 3
        (
            "syntax.fir",
            "graph g {\n  %0 = input \"x\" : f32[B]\n  %1 = sqrt(%0,) : f32[B]\n}\n",
            3,
        ),
        // well-formed but ill-typed (matmul of mismatched inner dims) on line 4
        (
            "types.fir",
            "graph g {\n  %0 = input \"x\" : f32[B, 8]\n  %1 = param \"w\" : f32[9, 4]\n  %2 = matmul(%0, %1)\n}\n",
            4,
        ),
        // an unknown op on line 2 (after a comment line)
        ("op.fir", "graph g { // comment\n  %0 = frobnicate()\n}\n", 2),
    ];
    for (file, src, line) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, src).expect("write");
        let prefix = format!("error: {}:{line}:", path.display());
        for cmd in ["check", "show"] {
            let msg = fails(fulgur([cmd.as_ref(), path.as_os_str()]), &[]);
            assert!(
                msg.starts_with(&prefix),
                "{file}: expected `{prefix}COL: ...`, got: {msg}"
            );
            let col = msg[prefix.len()..].split(':').next().expect("a column");
            assert!(
                col.parse::<usize>().is_ok_and(|c| c >= 1),
                "{file}: column `{col}` in: {msg}"
            );
        }
    }
}

#[test]
fn wrong_or_missing_inputs_are_named_and_leave_no_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    type Edit = fn(&mut BTreeMap<String, Tensor>);
    let cases: [(&str, Edit, &[&str]); 4] = [
        (
            "wrong shape",
            |t| {
                t.insert("w1".into(), Tensor::from_f32(vec![64, 127], vec![0.0; 64 * 127]));
            },
            &["`w1`", "f32[64, 128]", "127"],
        ),
        (
            "wrong constant dimension",
            |t| {
                t.insert("x".into(), Tensor::from_f32(vec![4, 65], vec![0.0; 4 * 65]));
            },
            &["`x`"],
        ),
        (
            "wrong dtype",
            |t| {
                t.insert("b2".into(), Tensor::from_i64(DType::I64, vec![16], vec![0; 16]));
            },
            &["`b2`", "i64"],
        ),
        (
            "missing tensor",
            |t| {
                t.remove("w2");
            },
            &["`w2`", "no tensor given"],
        ),
    ];
    for (what, edit, needles) in cases {
        let ins = mlp_inputs_with(dir.path(), edit);
        let out = work.join("out.safetensors");
        let msg = fails(
            fulgur([
                "eval".as_ref(),
                "examples/mlp.fir".as_ref(),
                "--inputs".as_ref(),
                ins.as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
            ]),
            needles,
        );
        assert!(!out.exists(), "{what}: {msg}");
        assert!(listing(&work).is_empty(), "{what}: left {:?}", listing(&work));
    }
}

#[test]
fn failed_eval_keeps_an_existing_output_file_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.safetensors");
    std::fs::write(&out, b"previous").expect("write");
    let ins = mlp_inputs_with(dir.path(), |t| {
        t.remove("x");
    });
    fails(
        fulgur([
            "eval".as_ref(),
            "examples/mlp.fir".as_ref(),
            "--inputs".as_ref(),
            ins.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]),
        &["`x`"],
    );
    assert_eq!(std::fs::read(&out).expect("still there"), b"previous");
    assert_eq!(listing(dir.path()), ["in.safetensors", "out.safetensors"]);
}

#[test]
fn unwritable_output_paths_fail_before_any_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let regular = dir.path().join("a-file");
    std::fs::write(&regular, b"not a folder").expect("write");
    let under_file = regular.join("out.safetensors");
    let missing_dir = PathBuf::from("/nonexistent-dir/out.safetensors");
    let cases: [(&Path, &str); 3] = [
        (&missing_dir, "does not exist"),
        (&under_file, "is not a directory"),
        (dir.path(), "is a directory"),
    ];
    for (out, why) in cases {
        let shown = out.display().to_string();
        let msg = fails(
            fulgur([
                "eval".as_ref(),
                "examples/mlp.fir".as_ref(),
                "--inputs".as_ref(),
                "examples/mlp.inputs.safetensors".as_ref(),
                "--out".as_ref(),
                out.as_os_str(),
            ]),
            &[&shown, why],
        );
        assert!(msg.starts_with(&format!("error: cannot write {shown}")), "{msg}");
        // checked before the graph is even read: a missing graph file is not what is reported
        fails(
            fulgur([
                "eval".as_ref(),
                "examples/does-not-exist.fir".as_ref(),
                "--inputs".as_ref(),
                "examples/mlp.inputs.safetensors".as_ref(),
                "--out".as_ref(),
                out.as_os_str(),
            ]),
            &[&shown, why],
        );
        fails(
            fulgur([
                "show".as_ref(),
                "examples/mlp.fir".as_ref(),
                "--out".as_ref(),
                out.as_os_str(),
            ]),
            &[&shown, why],
        );
    }
    assert!(!Path::new("/nonexistent-dir").exists());
    assert_eq!(listing(dir.path()), ["a-file"]);
    assert_eq!(std::fs::read(&regular).expect("unchanged"), b"not a folder");
}

#[test]
fn usage_errors_are_one_line() {
    let msg = fails(fulgur(["show", "examples/mlp.fir", "--format", "xml"]), &["xml"]);
    assert!(msg.contains("--format"), "{msg}");
    fails(fulgur(["eval", "examples/mlp.fir"]), &["--inputs"]);
    fails(fulgur(["frobnicate"]), &["frobnicate"]);
    fails(fulgur::<[&str; 0], &str>([]), &["check", "show", "eval"]);
    assert!(fulgur(["--help"]).status.success());
    assert!(fulgur(["eval", "--help"]).status.success());
}

#[test]
fn values_too_large_or_of_unbound_size_are_refused_before_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ins = dir.path().join("in.safetensors");
    let t: BTreeMap<String, Tensor> = [("x".to_string(), Tensor::from_f32(vec![2], vec![1.0, 2.0]))].into();
    write_safetensors(&ins, &t).expect("write");
    let cases = [
        (
            "huge.fir",
            // 10^16 elements: an allocation that would abort the process
            "graph huge {\n  %0 = input \"x\" : f32[N]\n  %1 \"big\" = full[value=1.0, dtype=f32, shape=[100000000, N*50000000]]()\n  output \"y\" = %1\n}\n",
            &[
                "node %1 \"big\" (full): out of memory: its output f32[100000000, 50000000*N] = [100000000, \
                 100000000] and their temporaries need 213.2 PiB while 0 B are held, more than the memory available",
            ][..],
        ),
        (
            "unbound.fir",
            "graph unbound {\n  %0 = input \"x\" : f32[N]\n  %1 = iota[dtype=i64, shape=[S], axis=0]()\n  output \"y\" = %1\n}\n",
            &["node %1 (iota)", "`S`"][..],
        ),
    ];
    for (file, src, needles) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, src).expect("write");
        let out = dir.path().join("out.safetensors");
        fails(
            fulgur([
                "eval".as_ref(),
                path.as_os_str(),
                "--inputs".as_ref(),
                ins.as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
            ]),
            needles,
        );
        assert!(!out.exists());
    }
}

#[test]
fn a_misspelt_input_is_named_with_the_unused_tensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ins = mlp_inputs_with(dir.path(), |t| {
        let w = t.remove("w1").expect("w1");
        t.insert("W1".into(), w);
    });
    let out = dir.path().join("out.safetensors");
    fails(
        fulgur([
            "eval".as_ref(),
            "examples/mlp.fir".as_ref(),
            "--inputs".as_ref(),
            ins.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]),
        &["input `w1`: no tensor given", "does not declare: W1"],
    );
    assert!(!out.exists());
}

/// A tensor stored as F64 is refused, even under `--precision f64` (it was read as f32 without a word); an
/// integer tensor where the graph wants a float is refused as a dtype mismatch.
#[test]
fn inputs_of_a_dtype_the_graph_does_not_declare_are_refused() {
    use safetensors::tensor::{serialize, Dtype, TensorView};
    let dir = tempfile::tempdir().expect("tempdir");
    let t = read_safetensors(&inputs("mlp")).expect("mlp inputs");
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, x) in &t {
        let bytes: Vec<u8> = x.to_f64().iter().flat_map(|v| v.to_le_bytes()).collect();
        bufs.push((name.clone(), Dtype::F64, x.shape.clone(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    let p = dir.path().join("f64.safetensors");
    std::fs::write(&p, serialize(views, &None).expect("serialize")).expect("write");
    let out = dir.path().join("o.safetensors");
    for precision in ["f32", "f64"] {
        let o = fulgur([
            "eval".as_ref(),
            fir("mlp").as_os_str(),
            "--inputs".as_ref(),
            p.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--precision".as_ref(),
            precision.as_ref(),
        ]);
        fails(
            o,
            &[
                &format!("in `{}`", p.display()),
                "holds F64 values; Fulgur's float dtypes are f32, bf16 and f16 (f64 is only the interpreter's \
                 arithmetic): store the tensor as F32",
            ],
        );
        assert!(!out.exists());
    }
}

/// The interpreter's memory budget: a node that would need more than `--memory-limit` (default: the memory
/// available) is refused before it allocates, naming the node and the sizes; an allocation the system refuses
/// anyway ends the process with one line, not an abort with a backtrace.
#[test]
fn running_out_of_memory_is_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ins = dir.path().join("in.safetensors");
    let t: BTreeMap<String, Tensor> = [("x".to_string(), Tensor::from_f32(vec![2], vec![1.0, 2.0]))].into();
    write_safetensors(&ins, &t).expect("write");
    let g = dir.path().join("g.fir");
    std::fs::write(
        &g,
        "graph g {\n  %0 = input \"x\" : f32[N]\n  %1 \"big\" = full[value=1.0, dtype=f32, shape=[3000, 3000]]()\n  %2 = exp(%1)\n  output \"y\" = %2\n}\n",
    )
    .expect("write");
    let out = dir.path().join("out.safetensors");
    let run = |extra: &[&str]| {
        let mut a: Vec<std::ffi::OsString> = vec![
            "eval".into(),
            g.clone().into(),
            "--inputs".into(),
            ins.clone().into(),
            "--out".into(),
            out.clone().into(),
        ];
        a.extend(extra.iter().map(|s| s.into()));
        fulgur(a)
    };
    let line = fails(run(&["--memory-limit", "100MiB"]), &[]);
    assert_eq!(
        line,
        format!(
            "error: evaluating graph `g` ({}): node %1 \"big\" (full): out of memory: its output f32[3000, 3000] = \
             [3000, 3000] and their temporaries need 206.0 MiB while 0 B are held, more than the --memory-limit \
             (100.0 MiB)",
            g.display()
        )
    );
    assert!(!out.exists());
    // enough for the values: runs
    ok(run(&["--memory-limit", "1GiB"]));
    fails(
        run(&["--memory-limit", "lots"]),
        &["`lots` is not a size (write e.g. 512MiB, 8GiB or a number of bytes)"],
    );
    // an allocation the system refuses (address space capped below what the budget allows)
    std::fs::write(
        &g,
        "graph g {\n  %0 = input \"x\" : f32[N]\n  %1 = full[value=1.0, dtype=f32, shape=[30000, 30000]]()\n  output \"y\" = %1\n}\n",
    )
    .expect("write");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 1000000 && exec \"{}\" eval \"{}\" --inputs \"{}\" --out \"{}\" --memory-limit 100GiB",
            env!("CARGO_BIN_EXE_fulgur"),
            g.display(),
            ins.display(),
            dir.path().join("o2.safetensors").display()
        ))
        .output()
        .expect("sh");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: out of memory: an allocation of "), "{err}");
}
