//! The `.fir` parser never panics: it returns `Ok` or an `IrError::Parse` on random bytes, on mutated valid
//! files and on pathological inputs (deep nesting, huge lines, huge integers). Deterministic seeds.

use fulgur_ir::{text, IrError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Valid files exercising most of the syntax.
const SAMPLES: [&str; 4] = [
    "graph mlp {
  %0 = input \"x\" : f32[B, 64]
  %1 = param \"w1\" : f32[64, 128]
  %2 = matmul(%0, %1) : f32[B, 128]
  %3 \"blk.act\" = silu(%2) : f32[B, 128]
  %4 = topk[k=2, axis=-1](%3) : (f32[B, 2], i64[B, 2])
  output \"y\" = %4#0
}
",
    "// a hand-written file: comments, gaps in the numbering, no annotations
graph \"odd \\\"name\\\" ☃\" {
  %10 = input \"tokens\" : i64[B, T]   // ids
  %11 = param \"emb\\u{1}\" : bf16[V, D]
  %12 = gather[axis=0](%11, %10)
  %13 = param \"norm.w\" : bf16[D]
  %14 \"n\\t\\\\\" = rms_norm[eps=1e-5](%12, %13) : bf16[B, T, D]
  %15 = reshape[shape=[B*T, D]](%14)
  %16 = slice[axis=0, start=1, end=B*T - 1](%15) : bf16[B*T - 2, D]
  %17 = full[value=-inf, dtype=bf16, shape=[ceildiv(T, 4), 2*D]]()
  %18 = iota[dtype=i32, shape=[T], axis=0]()
  %19 = one_hot[depth=8, dtype=f32](%10)
  %20 = cumsum[axis=-1, exclusive=true, reverse=false](%19)
  %21 = reduce_max[axes=[-1, 0], keepdims=true](%20) : f32[1, T, 1]
  output \"h\" = %16
  output \"mask\" = %17
  output \"cum\" = %21
}
",
    "graph consts {
  %0 = constant[dtype=f32, shape=[2, 3], values=[nan, inf, -inf, 1e-300, -0.0, 2.5]]() : f32[2, 3]
  %1 = constant[dtype=i64, shape=[3], values=[-9223372036854775808, 9223372036854775807, 0]]()
  %2 = constant[dtype=bool, shape=[], values=[true]]()
  %3 = broadcast[shape=[N, 2, 3]](%0)
  %4 = permute[perm=[2, 0, 1]](%3) : f32[3, N, 2]
  %5 = softmax[axis=1](%4)
  %6 = log_softmax[axis=-1](%5)
  %7 = concat[axis=1](%6, %6, %4) : f32[3, 3*N, 2]
  %8 = cast[dtype=f16](%7)
  %9 = input \"idx\" : i32[K]
  %10 = input \"upd\" : f32[3, K, 2]
  %11 = scatter_add[axis=1](%7, %9, %10) : f32[3, 3*N, 2]
  %12 = gt(%11, %7)
  %13 = select(%12, %11, %7)
  %14 = exp(%13)
  output \"out\" = %14
  output \"c\" = %1
  output \"b\" = %2
  output \"h\" = %8
}
",
    "graph g{%0=input \"x\":f32[]%1=neg(%0):f32[]output \"\"=%1}",
];

/// Tokens that steer random text towards the parser's deeper paths.
const TOKENS: [&str; 40] = [
    "graph", "g", "{", "}", "%0", "%1", "%2#1", "#", "=", "input", "param", "\"x\"", "\"", ":", "f32", "i64[", "[",
    "]", "(", ")", ",", "B", "T*B", "ceildiv(", "-", "1", "1e-5", "nan", "-inf", "true", "matmul", "topk", "k=",
    "axis=", "shape=", "output", "//", "\n", "\\u{", "é",
];

/// Parses without letting a panic escape; checks the shape of the result.
fn check(src: &str) {
    let r = catch_unwind(AssertUnwindSafe(|| text::parse(src)));
    let r = match r {
        Ok(r) => r,
        Err(_) => panic!(
            "the parser panicked on {:?}",
            src.chars().take(2000).collect::<String>()
        ),
    };
    match r {
        Ok(g) => {
            // whatever parses prints to a fixed point
            let s = text::print(&g);
            let again = text::parse(&s).unwrap_or_else(|e| panic!("printed text does not parse: {e}\n{s}"));
            assert_eq!(text::print(&again), s);
        }
        Err(IrError::Parse { line, col, message }) => {
            let lines = src.split('\n').count();
            assert!(line >= 1 && line <= lines, "line {line} of {lines}: {message}");
            assert!(col >= 1, "column {col}: {message}");
            assert!(!message.is_empty());
        }
        Err(e) => panic!(
            "not a parse error: {e:?} on {:?}",
            src.chars().take(2000).collect::<String>()
        ),
    }
}

#[test]
fn samples_are_valid() {
    for s in SAMPLES {
        let g = text::parse(s).unwrap_or_else(|e| panic!("{e}\n{s}"));
        let p = text::print(&g);
        assert_eq!(text::print(&text::parse(&p).unwrap()), p);
    }
}

#[test]
fn random_bytes() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    for _ in 0..3000 {
        let n = rng.gen_range(0..200);
        let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        check(&String::from_utf8_lossy(&bytes));
        // the same behind a valid prefix, so the statement parser sees it
        let mut v = b"graph g {\n  %0 = ".to_vec();
        v.extend_from_slice(&bytes);
        check(&String::from_utf8_lossy(&v));
    }
}

#[test]
fn random_token_soup() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    for _ in 0..3000 {
        let mut s = String::from("graph g {\n");
        for _ in 0..rng.gen_range(0..60) {
            s.push_str(TOKENS[rng.gen_range(0..TOKENS.len())]);
            if rng.gen_bool(0.3) {
                s.push(' ');
            }
        }
        check(&s);
    }
}

fn mutate(rng: &mut StdRng, src: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = src.to_vec();
    for _ in 0..rng.gen_range(1..5) {
        let len = v.len();
        let at = rng.gen_range(0..=len);
        match rng.gen_range(0..6) {
            0 if len > 0 => {
                // delete a range
                let end = (at + rng.gen_range(1..8)).min(len);
                v.drain(at.min(len)..end);
            }
            1 => {
                // insert random bytes
                let ins: Vec<u8> = (0..rng.gen_range(1..6)).map(|_| rng.gen()).collect();
                v.splice(at..at, ins);
            }
            2 => {
                // insert a token
                let t = TOKENS[rng.gen_range(0..TOKENS.len())].as_bytes();
                v.splice(at..at, t.iter().copied());
            }
            3 if len > 0 => {
                // duplicate a range somewhere
                let s = rng.gen_range(0..len);
                let e = (s + rng.gen_range(1..40)).min(len);
                let seg = v[s..e].to_vec();
                let to = rng.gen_range(0..=len);
                v.splice(to..to, seg);
            }
            4 if !other.is_empty() => {
                // splice in a piece of another sample, replacing a range
                let s = rng.gen_range(0..other.len());
                let e = (s + rng.gen_range(1..80)).min(other.len());
                let end = (at + rng.gen_range(0..40)).min(len);
                v.splice(at..end, other[s..e].iter().copied());
            }
            _ if len > 0 => {
                // flip a byte
                let i = rng.gen_range(0..len);
                v[i] = rng.gen();
            }
            _ => {}
        }
    }
    v
}

#[test]
fn mutated_valid_files() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    let mut samples: Vec<Vec<u8>> = SAMPLES.iter().map(|s| s.as_bytes().to_vec()).collect();
    // the printed forms too
    for s in SAMPLES {
        samples.push(text::print(&text::parse(s).unwrap()).into_bytes());
    }
    let (mut ok, mut err) = (0, 0);
    for _ in 0..6000 {
        let a = &samples[rng.gen_range(0..samples.len())];
        let b = &samples[rng.gen_range(0..samples.len())];
        let m = mutate(&mut rng, a, b);
        let s = String::from_utf8_lossy(&m);
        check(&s);
        if text::parse(&s).is_ok() {
            ok += 1;
        } else {
            err += 1;
        }
    }
    // both outcomes are exercised
    assert!(ok > 50 && err > 1000, "ok {ok}, err {err}");
}

/// A parse error, with the message, for pathological inputs.
fn parse_err(src: &str) -> (usize, usize, String) {
    match catch_unwind(AssertUnwindSafe(|| text::parse(src))) {
        Ok(Err(IrError::Parse { line, col, message })) => (line, col, message),
        Ok(Ok(_)) => panic!("parsed"),
        Ok(Err(e)) => panic!("not a parse error: {e:?}"),
        Err(_) => panic!("the parser panicked"),
    }
}

#[test]
fn deep_nesting() {
    let n = 100_000;
    let (line, col, m) = parse_err(&format!(
        "graph g {{\n  %0 = full[value=1.0, dtype=f32, shape={}]()\n}}",
        "[".repeat(n)
    ));
    assert_eq!((line, col), (2, 41 + 64), "{m}");
    assert!(m.contains("nested"), "{m}");
    let (line, _, m) = parse_err(&format!("graph g {{\n  %0 = input \"x\" : f32[{}B]\n}}", "(".repeat(n)));
    assert_eq!(line, 2);
    assert!(m.contains("nested too deeply"), "{m}");
    let (_, _, m) = parse_err(&format!("graph g {{\n  %0 = input \"x\" : f32[{}B]\n}}", "-".repeat(n)));
    assert!(m.contains("nested too deeply"), "{m}");
    let (_, _, m) = parse_err(&format!(
        "graph g {{\n  %0 = input \"x\" : f32[{}B]\n}}",
        "ceildiv(".repeat(n)
    ));
    assert!(m.contains("nested too deeply"), "{m}");
    // in an attribute's dimension expression, and balanced
    let (_, _, m) = parse_err(&format!(
        "graph g {{ %0 = input \"x\" : f32[B] %1 = slice[axis=0, start=0, end={}B{}](%0) }}",
        "(".repeat(n),
        ")".repeat(n)
    ));
    assert!(m.contains("nested too deeply"), "{m}");
    check(&"[(".repeat(n));
    check(&format!("graph g {{ %0 = f[a={}", "[\"".repeat(n)));
}

#[test]
fn huge_lines() {
    let mb10 = 10 * 1024 * 1024;
    // a valid 10 MB line: a constant with about two million values
    let n = mb10 / 5;
    let vals = vec!["0.5"; n].join(", ");
    let src = format!("graph g {{ %0 = constant[dtype=f32, shape=[{n}], values=[{vals}]]() output \"c\" = %0 }}");
    assert!(src.len() > mb10);
    let g = text::parse(&src).expect("a long valid line");
    assert_eq!(g.node_count(), 1);
    // a 10 MB op name, string, comment, whitespace run, dimension expression and number
    let big = "a".repeat(mb10);
    let (_, col, m) = parse_err(&format!("graph g {{ %0 = {big}() }}"));
    assert_eq!(col, 16);
    assert!(m.len() < 1000 || m.starts_with("unknown op"), "{}", &m[..100]);
    let g = text::parse(&format!("graph g {{ %0 = input \"{big}\" : f32[] }}")).expect("long name");
    assert_eq!(g.node_count(), 1);
    let (_, col, _) = parse_err(&format!("graph g {{ %0 = input \"{big} : f32[] }}"));
    assert_eq!(col, 22);
    assert!(text::parse(&format!("graph g {{ // {big}\n}}")).is_ok());
    assert!(text::parse(&format!("graph g {{{}}}", " \t".repeat(mb10 / 2))).is_ok());
    let (_, _, m) = parse_err(&format!(
        "graph g {{ %0 = input \"x\" : f32[{}] }}",
        "B*".repeat(mb10 / 2)
    ));
    assert!(m.starts_with("expected a dimension"), "{m}");
    check(&format!(
        "graph g {{ %0 = input \"x\" : f32[{}] }}",
        "B+".repeat(mb10 / 20) + "B"
    ));
    check(&format!("graph g {{ %0 = input \"x\" : f32[{}] }}", "9".repeat(mb10)));
    check(&big);
    check(&"%".repeat(mb10));
    check(&"\"".repeat(mb10));
    check(&format!("graph {big}"));
}

#[test]
fn huge_integers() {
    let d = "9".repeat(1000);
    let cases = [
        format!("graph g {{ %{d} = input \"x\" : f32[] }}"),
        format!("graph g {{ %0 = input \"x\" : f32[] %1 = exp(%0#{d}) }}"),
        format!("graph g {{ %0 = input \"x\" : f32[{d}] }}"),
        format!("graph g {{ %0 = input \"x\" : f32[-{d}] }}"),
        format!("graph g {{ %0 = input \"x\" : f32[B] %1 = softmax[axis={d}](%0) }}"),
        format!("graph g {{ %0 = input \"x\" : f32[B] %1 = softmax[axis=-{d}](%0) }}"),
        format!("graph g {{ %0 = input \"x\" : f32[B] %1 = slice[axis=0, start=0, end={d}*B](%0) }}"),
        format!("graph g {{ %0 = input \"x\" : f32[B] %1 = rms_norm[eps={d}.5](%0, %0) }}"),
        format!("graph g {{ %0 = input \"x\" : f32[B] %1 = rms_norm[eps=1e{d}](%0, %0) }}"),
        format!("graph g {{ %0 = input \"x\" : f32[B] %1 = rms_norm[eps=1e-{d}](%0, %0) }}"),
        format!("graph \"\\u{{{d}}}\" {{}}"),
    ];
    for c in &cases {
        check(c);
    }
    // too-large integers are errors that say so
    for c in &cases[..7] {
        let (_, _, m) = parse_err(c);
        assert!(m.contains("too large"), "{m}");
    }
    // products that overflow i64 are errors, not panics
    for c in [
        "graph g { %0 = input \"x\" : f32[9223372036854775807 * 2] }",
        "graph g { %0 = input \"x\" : f32[4294967296*B, 4294967296*B] %1 = reshape[shape=[4294967296*B*4294967296*B]](%0) }",
        "graph g { %0 = constant[dtype=i64, shape=[4294967296, 4294967296, 2], values=[]]() }",
        "graph g { %0 = input \"x\" : f32[-9223372036854775807 - 2] }",
    ] {
        parse_err(c);
    }
}
