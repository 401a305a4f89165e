//! The `fused` composite: its body round-trips through `.fir` and JSON, typing refuses mismatched arguments and
//! malformed bodies with clear messages, and its decomposition is its body.

use fulgur_ir::op::FusedBody;
use fulgur_ir::{json, text, Composite, DType, Dim, Graph, Interpreter, Op, Precision, Tensor};
use std::collections::{BTreeMap, HashMap};

/// A GEMM with a bias-and-SiLU epilogue over a `[B, T, 8]` input: symbols in reshape attributes are bound by
/// `arg0`'s dims.
const BODY: &str = r#"graph k {
  // comments and hand-written spacing are fine; the stored text is canonical
  %0 = input "arg0" : f32[B, T, 8]
  %1 = input "arg1" : f32[8, 4]
  %2 = input "arg2" : f32[4]
  %3 = reshape[shape=[B*T, 8]](%0)
  %4 = matmul(%3, %1)
  %5 = reshape[shape=[B, T, 4]](%4)
  %6 = add(%5, %2)
  %7 "act" = silu(%6)
  %8 = constant[dtype=f32, shape=[], values=[0.5]]()
  %9 = mul(%7, %8)
  output "out" = %9
}"#;

fn body() -> FusedBody {
    FusedBody::parse(BODY).unwrap_or_else(|e| panic!("{e}"))
}

fn fused(body: FusedBody) -> Op {
    Op::Composite(Composite::Fused { body })
}

/// `y = fused(x, transpose(w), b)`.
fn outer() -> Graph {
    let mut g = Graph::new("outer");
    let x = g
        .input("x", DType::F32, vec![Dim::sym("B"), Dim::sym("T"), 8.into()])
        .unwrap();
    let w = g.param("w", DType::F32, vec![4.into(), 8.into()]).unwrap();
    let b = g.param("b", DType::F32, vec![4.into()]).unwrap();
    let wt = g.transpose(w, 0, 1).unwrap();
    let y = g.op1(fused(body()), &[x, wt, b]).unwrap();
    g.add_output("y", y).unwrap();
    g
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_f64(DType::F32, shape.to_vec(), v)
}

fn run(g: &Graph, ins: &[(&str, Tensor)]) -> BTreeMap<String, Tensor> {
    let m: HashMap<String, Tensor> = ins.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
    Interpreter::new(Precision::F64)
        .run(g, &m)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn type_error(op: Op, ins: &[(DType, Vec<Dim>)]) -> String {
    let mut g = Graph::new("t");
    let vs: Vec<_> = ins
        .iter()
        .enumerate()
        .map(|(i, (d, s))| g.input(&format!("i{i}"), *d, s.clone()).unwrap())
        .collect();
    g.op1(op, &vs).unwrap_err().to_string()
}

#[test]
fn body_text_is_canonical_and_identifies_the_body() {
    let b = body();
    assert!(
        b.text()
            .starts_with("graph fused {\n  %0 = input \"arg0\" : f32[B, T, 8]\n"),
        "{}",
        b.text()
    );
    assert!(!b.text().contains("//"));
    assert!(b.text().contains("%7 \"act\" = silu(%6) : f32[B, T, 4]"));
    // the canonical text reads back to itself; equal texts are equal bodies
    let again = FusedBody::parse(b.text()).unwrap();
    assert_eq!(again.text(), b.text());
    assert_eq!(again, b);
    assert_eq!(b.num_args(), 3);
    assert_eq!(b.output_type().to_string(), "f32[B, T, 4]");
    let other = FusedBody::parse(&BODY.replace("0.5", "0.25")).unwrap();
    assert_ne!(other, b);
}

#[test]
fn round_trips_through_fir_and_json() {
    let g = outer();
    let s = text::print(&g);
    // the body is a nested, indented block (as MLIR prints regions), not an escaped string attribute
    assert_eq!(
        s,
        r#"graph outer {
  %0 = input "x" : f32[B, T, 8]
  %1 = param "w" : f32[4, 8]
  %2 = param "b" : f32[4]
  %3 = permute[perm=[1, 0]](%1) : f32[8, 4]
  %4 = fused(%0, %3, %2) : f32[B, T, 4] {
    %0 = input "arg0" : f32[B, T, 8]
    %1 = input "arg1" : f32[8, 4]
    %2 = input "arg2" : f32[4]
    %3 = reshape[shape=[B*T, 8]](%0) : f32[B*T, 8]
    %4 = matmul(%3, %1) : f32[B*T, 4]
    %5 = reshape[shape=[B, T, 4]](%4) : f32[B, T, 4]
    %6 = add(%5, %2) : f32[B, T, 4]
    %7 "act" = silu(%6) : f32[B, T, 4]
    %8 = constant[dtype=f32, shape=[], values=[0.5]]() : f32[]
    %9 = mul(%7, %8) : f32[B, T, 4]
    output "out" = %9
  }
  output "y" = %4
}
"#
    );
    let back = text::parse(&s).unwrap();
    assert_eq!(text::print(&back), s);
    assert_eq!(back, g);
    let j = json::to_json(&g);
    assert!(j.contains("\"kind\": \"fused\""), "{j}");
    let back = json::from_json(&j).unwrap();
    assert_eq!(text::print(&back), s);
    // the op alone, as passes carry it
    let op = &g.node(g.outputs()[0].1.node).op;
    let attrs: Vec<(String, fulgur_ir::AttrValue)> = op.attrs().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_eq!(&Op::from_parts("fused", &attrs).unwrap(), op);
}

#[test]
fn typing_checks_the_arguments_against_the_body() {
    let (b, t) = (Dim::sym("B"), Dim::sym("T"));
    let ok = [
        (DType::F32, vec![b.clone(), t.clone(), 8.into()]),
        (DType::F32, vec![8.into(), 4.into()]),
        (DType::F32, vec![4.into()]),
    ];
    // well typed: the body's output type
    let mut g = Graph::new("t");
    let vs: Vec<_> = ok
        .iter()
        .enumerate()
        .map(|(i, (d, s))| g.input(&format!("i{i}"), *d, s.clone()).unwrap())
        .collect();
    let y = g.op1(fused(body()), &vs).unwrap();
    assert_eq!(g.ty(y).to_string(), "f32[B, T, 4]");

    let e = type_error(fused(body()), &ok[..2]);
    assert!(e.contains("expects 3 input(s)") && e.contains("got 2"), "{e}");
    let e = type_error(fused(body()), &[]);
    assert!(e.contains("at least one input"), "{e}");
    let mut wrong = ok.clone();
    wrong[1].1 = vec![8.into(), 5.into()];
    let e = type_error(fused(body()), &wrong);
    assert!(
        e.contains("input 1 is f32[8, 5], the body's `arg1` is f32[8, 4]"),
        "{e}"
    );
    let mut wrong = ok.clone();
    wrong[0].0 = DType::BF16;
    let e = type_error(fused(body()), &wrong);
    assert!(e.contains("input 0 is bf16[B, T, 8]"), "{e}");
    // symbolic dims must be equal as polynomials: `S` is not `T`
    let mut wrong = ok.clone();
    wrong[0].1 = vec![b, Dim::sym("S"), 8.into()];
    let e = type_error(fused(body()), &wrong);
    assert!(e.contains("the body's `arg0` is f32[B, T, 8]"), "{e}");
}

#[test]
fn malformed_bodies_are_refused_with_a_reason() {
    let cases: [(&str, &str); 6] = [
        (
            "graph f {\n %0 = param \"arg0\" : f32[N]\n %1 = exp(%0)\n output \"o\" = %1\n}",
            "no parameters",
        ),
        (
            "graph f {\n %0 = input \"x\" : f32[N]\n %1 = exp(%0)\n output \"o\" = %1\n}",
            "input 0 is `x`",
        ),
        (
            "graph f {\n %0 = input \"arg1\" : f32[N]\n %1 = input \"arg0\" : f32[N]\n %2 = add(%0, %1)\n output \"o\" = %2\n}",
            "input 0 is `arg1`",
        ),
        (
            "graph f {\n %0 = input \"arg0\" : f32[N]\n %1 = exp(%0)\n}",
            "at least one output",
        ),
        (
            "graph f {\n %0 = input \"arg0\" : f32[B*T]\n %1 = reshape[shape=[B, T]](%0)\n output \"o\" = %1\n}",
            "symbol `B` in the attributes of node %1 (reshape) is not a dimension of any argument",
        ),
        ("graph f {\n %0 = input \"arg0\" : f32[N]\n %1 = exp(%0\n}", "4:1:"),
    ];
    for (src, want) in cases {
        let e = FusedBody::parse(src).unwrap_err();
        assert!(e.contains(want), "{src}\n=> {e}");
        // through the text format, the error names the attribute and the line of the node
        let outer = format!(
            "graph g {{\n  %0 = input \"x\" : f32[N]\n  %1 = fused[body={}](%0)\n}}",
            fulgur_ir::op::quote(src)
        );
        let e = text::parse(&outer).unwrap_err().to_string();
        assert!(e.starts_with("3:") && e.contains("attribute `body` of `fused`"), "{e}");
    }
    let empty = "graph f {\n %0 = full[value=1.0, dtype=f32, shape=[]]()\n output \"o\" = %0\n}";
    assert!(FusedBody::parse(empty).unwrap_err().contains("at least one input"));
    // no nesting
    let inner =
        FusedBody::parse("graph f {\n %0 = input \"arg0\" : f32[N]\n %1 = exp(%0)\n output \"o\" = %1\n}").unwrap();
    let mut g = Graph::new("f");
    let x = g.input("arg0", DType::F32, vec![Dim::sym("N")]).unwrap();
    let y = g.op1(fused(inner), &[x]).unwrap();
    g.add_output("o", y).unwrap();
    assert!(FusedBody::from_graph(&g).unwrap_err().contains("is itself `fused`"));
    // JSON with a bad body is refused on reading
    let j = json::to_json(&outer()).replace("silu(%6)", "silu(%6, %6)");
    assert!(json::from_json(&j).is_err());
}

#[test]
fn decomposition_is_the_body() {
    // inlined onto arguments of the body's own (symbolic) types, the decomposition prints as the body
    let b = body();
    let mut g = Graph::new("fused");
    let args: Vec<_> = b
        .arg_types()
        .iter()
        .enumerate()
        .map(|(i, t)| g.input(&format!("arg{i}"), t.dtype, t.dims().to_vec()).unwrap())
        .collect();
    let outs = Composite::Fused { body: b.clone() }.decompose(&mut g, &args).unwrap();
    assert_eq!(outs.len(), 1);
    g.add_output("out", outs[0]).unwrap();
    assert_eq!(text::print(&g), b.text());
    // wrong argument count
    let mut g2 = Graph::new("x");
    let x = g2.input("x", DType::F32, vec![Dim::sym("N")]).unwrap();
    let e = Composite::Fused { body: b }
        .decompose(&mut g2, &[x])
        .unwrap_err()
        .to_string();
    assert!(e.contains("expects 3 input(s)"), "{e}");
}

#[test]
fn interpreter_runs_the_body_at_concrete_shapes() {
    // the fused graph against the body run as a graph of its own, and against the unfused graph
    let g = outer();
    let w = random(&[4, 8], 2);
    let bias = random(&[4], 3);
    for (bs, t) in [(1usize, 1usize), (2, 3), (3, 5)] {
        let x = random(&[bs, t, 8], (bs * 10 + t) as u64);
        let got = run(&g, &[("x", x.clone()), ("w", w.clone()), ("b", bias.clone())]);
        let wt = run(
            &{
                let mut h = Graph::new("t");
                let w = h.input("w", DType::F32, vec![4.into(), 8.into()]).unwrap();
                let y = h.transpose(w, 0, 1).unwrap();
                h.add_output("y", y).unwrap();
                h
            },
            &[("w", w.clone())],
        )
        .remove("y")
        .unwrap();
        let direct = run(
            body().graph(),
            &[("arg0", x.clone()), ("arg1", wt), ("arg2", bias.clone())],
        );
        assert_eq!(got["y"].to_f64(), direct["out"].to_f64());
        // the same computation written out
        let mut u = Graph::new("u");
        let xv = u
            .input("x", DType::F32, vec![Dim::sym("B"), Dim::sym("T"), 8.into()])
            .unwrap();
        let wv = u.input("w", DType::F32, vec![4.into(), 8.into()]).unwrap();
        let bv = u.input("b", DType::F32, vec![4.into()]).unwrap();
        let y = u.linear(xv, wv).unwrap();
        let y = u.add(y, bv).unwrap();
        let y = u.silu(y).unwrap();
        let y = u.scale(y, 0.5).unwrap();
        u.add_output("y", y).unwrap();
        let want = run(&u, &[("x", x), ("w", w.clone()), ("b", bias.clone())]);
        let (a, b) = (got["y"].to_f64(), want["y"].to_f64());
        assert_eq!(a.len(), bs * t * 4);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-12, "{p} vs {q}");
        }
    }
}

#[test]
fn body_symbols_bound_by_one_argument_instantiate_others() {
    // `arg1 : [B*T, 4]` has no lone symbol, but `arg0` binds B and T; inconsistent concrete shapes are refused
    let src = "graph f {\n %0 = input \"arg0\" : f32[B, T]\n %1 = input \"arg1\" : f32[B*T, 4]\n %2 = reshape[shape=[B, T, 1]](%0)\n %3 = reshape[shape=[B, T, 4]](%1)\n %4 = mul(%2, %3)\n output \"o\" = %4\n}";
    let b = FusedBody::parse(src).unwrap();
    let mut g = Graph::new("g");
    let x = g.input("x", DType::F32, vec![Dim::sym("B"), Dim::sym("T")]).unwrap();
    let y = g
        .input("y", DType::F32, vec![Dim::sym("B") * Dim::sym("T"), 4.into()])
        .unwrap();
    let z = g.op1(fused(b.clone()), &[x, y]).unwrap();
    g.add_output("z", z).unwrap();
    let out = run(&g, &[("x", random(&[2, 3], 1)), ("y", random(&[6, 4], 2))]);
    assert_eq!(out["z"].shape, vec![2, 3, 4]);
    let mut h = Graph::new("h");
    let x = h.input("x", DType::F32, vec![2.into(), 3.into()]).unwrap();
    let y = h.input("y", DType::F32, vec![5.into(), 4.into()]).unwrap();
    let e = fulgur_ir::composite::fused::inline(&mut h, &b, &[x, y])
        .unwrap_err()
        .to_string();
    assert!(e.contains("input 1 is f32[5, 4]"), "{e}");
}

/// The block is what the printer writes; the attribute form of earlier files still reads (to the same graph);
/// mistakes in the block are errors at their line and column.
#[test]
fn fused_blocks_parse_and_report_errors_where_they_are() {
    let g = outer();
    let block = text::print(&g);
    let attr = format!(
        "graph outer {{\n  %0 = input \"x\" : f32[B, T, 8]\n  %1 = param \"w\" : f32[4, 8]\n  %2 = param \"b\" : \
         f32[4]\n  %3 = permute[perm=[1, 0]](%1)\n  %4 = fused[body={}](%0, %3, %2)\n  output \"y\" = %4\n}}\n",
        fulgur_ir::op::quote(body().text())
    );
    assert_eq!(text::parse(&attr).unwrap(), g);
    assert_eq!(text::print(&text::parse(&attr).unwrap()), block);
    // hand-written: no type annotations, comments, other spacing, value numbers of its own
    let hand = "graph outer {\n  %10 = input \"x\" : f32[B, T, 8]\n  %11 = param \"w\" : f32[4, 8]\n  %12 = param \
                \"b\" : f32[4]\n  %13 = permute[perm=[1, 0]](%11)\n  %14 = fused(%10, %13, %12) {  // the kernel\n \
                %7 = input \"arg0\" : f32[B, T, 8]\n %8 = input \"arg1\" : f32[8, 4]\n %9 = input \"arg2\" : f32[4]\n \
                %3 = reshape[shape=[B*T, 8]](%7)\n %4 = matmul(%3, %8)\n %5 = reshape[shape=[B, T, 4]](%4)\n %6 = \
                add(%5, %9)\n %1 \"act\" = silu(%6)\n %2 = constant[dtype=f32, shape=[], values=[0.5]]()\n %0 = \
                mul(%1, %2)\n output \"out\" = %0 }\n  output \"y\" = %14\n}\n";
    assert_eq!(text::print(&text::parse(hand).unwrap_or_else(|e| panic!("{e}"))), block);
    let err = |src: &str| text::parse(src).unwrap_err().to_string();
    let head = "graph g {\n  %0 = input \"x\" : f32[4]\n";
    assert_eq!(
        err(&format!("{head}  %1 = fused(%0) : f32[4]\n  output \"y\" = %1\n}}\n")),
        "4:3: expected `{` and the body of `fused` after its inputs and type, found `output`"
    );
    assert_eq!(
        err(&format!("{head}  %1 = fused(%0) {{\n    %0 = input \"arg0\" : f32[4]\n    %1 = exp(%9)\n    output \"out\" = %1\n  }}\n  output \"y\" = %1\n}}\n")),
        "5:14: value %9 is not defined (before this use)"
    );
    assert_eq!(
        err(&format!("{head}  %1 = fused(%0) {{\n    %0 = input \"arg0\" : f32[4]\n    %1 = exp(%0)\n  }}\n  output \"y\" = %1\n}}\n")),
        "3:18: the body of `fused`: a fused body has at least one output, this one has 0"
    );
    assert_eq!(
        err(&format!(
            "{head}  %1 = fused[k=1](%0) {{\n    %0 = input \"arg0\" : f32[4]\n    output \"out\" = %0\n  }}\n}}\n"
        )),
        "3:8: `fused` has no attribute `k`: its body is the block after its type"
    );
    assert_eq!(
        err(&format!(
            "{head}  %1 = fused[body={}](%0) {{\n  }}\n}}\n",
            fulgur_ir::op::quote("graph k {\n  %0 = input \"arg0\" : f32[4]\n  output \"out\" = %0\n}")
        )),
        "3:94: `fused` has its body either as a block or as the `body` attribute, not both"
    );
    assert_eq!(
        err(&format!(
            "{head}  %1 = fused(%0) {{\n    %0 = input \"arg0\" : f32[4]\n    output \"out\" = %0\n"
        )),
        "6:1: expected `}` at the end of the body of `fused`, found end of input"
    );
}

/// Bodies do not nest, and a deeply nested text is refused at once, not by recursing.
#[test]
fn nested_fused_blocks_are_refused() {
    let mut src = String::from("graph g {\n  %0 = input \"x\" : f32[4]\n");
    for _ in 0..100_000 {
        src.push_str("  %1 = fused(%0) {\n    %0 = input \"arg0\" : f32[4]\n");
    }
    let e = text::parse(&src).unwrap_err().to_string();
    assert_eq!(e, "5:18: a fused body cannot contain `fused`");
}

/// A body of several outputs (the kernel program's merged sibling kernels): typed as each output, its
/// outputs the body's in order on the interpreter, through `.fir` and JSON unchanged.
#[test]
fn a_body_of_several_outputs_gives_each() {
    let b = FusedBody::parse(
        "graph k {\n  %0 = input \"arg0\" : f32[N]\n  %1 = input \"arg1\" : f32[N]\n  %2 = mul(%0, %1) : f32[N]\n  \
         %3 = exp(%2) : f32[N]\n  %4 = cast[dtype=bf16](%2) : bf16[N]\n  output \"a\" = %3\n  output \"b\" = %4\n}",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.num_outputs(), 2);
    let mut g = Graph::new("outer");
    let x = g.input("x", DType::F32, vec![Dim::sym("N")]).unwrap();
    let y = g.input("y", DType::F32, vec![Dim::sym("N")]).unwrap();
    let outs = g.op(fused(b), &[x, y]).unwrap();
    assert_eq!(g.ty(outs[0]).to_string(), "f32[N]");
    assert_eq!(g.ty(outs[1]).to_string(), "bf16[N]");
    g.add_output("a", outs[0]).unwrap();
    g.add_output("b", outs[1]).unwrap();
    let back = text::parse(&text::print(&g)).unwrap();
    assert_eq!(text::print(&back), text::print(&g));
    assert_eq!(json::from_json(&json::to_json(&g)).unwrap(), g);
    let (xv, yv) = (random(&[5], 1), random(&[5], 2));
    let out = run(&g, &[("x", xv.clone()), ("y", yv.clone())]);
    let prod: Vec<f64> = xv.to_f64().iter().zip(yv.to_f64()).map(|(a, b)| a * b).collect();
    let want_a: Vec<f64> = prod.iter().map(|p| p.exp()).collect();
    for (got, want) in out["a"].to_f64().iter().zip(&want_a) {
        assert!((got - want).abs() < 1e-6 * want.abs().max(1.0), "{got} vs {want}");
    }
    assert_eq!(out["b"].dtype, DType::BF16);
    let want_b = Tensor::from_f64(DType::F32, vec![5], prod).cast(DType::BF16);
    assert_eq!(out["b"].to_f64(), want_b.to_f64());
}
