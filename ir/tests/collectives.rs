//! Collectives simulated over a leading rank axis: `all_to_all` against a hand loop over ranks (every axis,
//! R = 1..4, random shapes, float and integer data), the asynchronous pair against the blocking op, the
//! exchange as its own inverse, its decomposition on symbolic shapes, typing errors, and the text and JSON
//! round trips.

use fulgur_ir::{json, text, Composite, DType, Dim, Graph, Interpreter, Op, Precision, Tensor, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

fn a2a(axis: i64) -> Op {
    Op::Composite(Composite::AllToAll {
        axis,
        mesh: vec![],
        over: 0,
    })
}

fn start(axis: i64, overlap: Dim) -> Op {
    Op::Composite(Composite::AllToAllStart {
        axis,
        overlap_flops: overlap,
        mesh: vec![],
        over: 0,
    })
}

fn wait() -> Op {
    Op::Composite(Composite::CollectiveWait)
}

fn cd(v: &[usize]) -> Vec<Dim> {
    v.iter().map(|&x| Dim::from(x)).collect()
}

fn run1(g: &Graph, name: &str, x: &Tensor) -> Tensor {
    let ins: HashMap<String, Tensor> = [(name.to_string(), x.clone())].into();
    let out = Interpreter::new(Precision::F64)
        .run(g, &ins)
        .unwrap_or_else(|e| panic!("{e}\n{}", text::print(g)));
    out.into_values().next().expect("one output")
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The all-to-all written as a loop over ranks: rank `r` gets, at chunk `s` of `axis`, rank `s`'s chunk `r`.
fn reference(x: &[f64], shape: &[usize], axis: usize) -> Vec<f64> {
    let ranks = shape[0];
    let c = shape[axis] / ranks;
    let st = strides(shape);
    let mut out = vec![f64::NAN; x.len()];
    let n = x.len();
    for (flat, o) in out.iter_mut().enumerate().take(n) {
        // multi-index of the output element
        let idx: Vec<usize> = (0..shape.len()).map(|d| (flat / st[d]) % shape[d]).collect();
        let (r, s, j) = (idx[0], idx[axis] / c, idx[axis] % c);
        // the element of rank s's buffer that rank r receives: rank s sent its chunk r
        let mut src = idx.clone();
        src[0] = s;
        src[axis] = r * c + j;
        *o = x[src.iter().zip(&st).map(|(i, k)| i * k).sum::<usize>()];
    }
    out
}

/// One-op graph `op(x)` for `x: dtype[dims]`.
fn one_op(op: Op, dtype: DType, dims: Vec<Dim>) -> (Graph, Value) {
    let mut g = Graph::new("c");
    let x = g.input("x", dtype, dims).unwrap();
    let y = g.op1(op, &[x]).unwrap();
    g.add_output("y", y).unwrap();
    (g, y)
}

#[test]
fn all_to_all_matches_a_loop_over_ranks() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut cases = 0;
    for _ in 0..120 {
        let ranks = rng.gen_range(1..=4usize);
        let rank = rng.gen_range(2..=4usize);
        let axis = rng.gen_range(1..rank);
        let mut shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..=3usize)).collect();
        shape[0] = ranks;
        shape[axis] = ranks * rng.gen_range(1..=3usize);
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = (0..n).map(|i| i as f64 + 0.25 * rng.gen_range(0..2) as f64).collect();
        let neg = rng.gen_bool(0.5);
        let ax = if neg { axis as i64 - rank as i64 } else { axis as i64 };
        let want = reference(&vals, &shape, axis);
        // blocking, f32 data
        let (g, _) = one_op(a2a(ax), DType::F32, cd(&shape));
        let got = run1(&g, "x", &Tensor::from_f64(DType::F32, shape.clone(), vals.clone()));
        assert_eq!(got.shape, shape);
        assert_eq!(got.to_f64(), want, "shape {shape:?} axis {ax}");
        // the started form and its wait, integer data
        let mut g = Graph::new("c");
        let x = g.input("x", DType::I64, cd(&shape)).unwrap();
        let h = g.op1(start(ax, Dim::from(123usize)), &[x]).unwrap();
        let y = g.op1(wait(), &[h]).unwrap();
        g.add_output("y", y).unwrap();
        let ints: Vec<i64> = (0..n as i64).collect();
        let got = run1(&g, "x", &Tensor::from_i64(DType::I64, shape.clone(), ints.clone()));
        let want_i = reference(&ints.iter().map(|&i| i as f64).collect::<Vec<_>>(), &shape, axis);
        assert_eq!(got.to_f64(), want_i, "start/wait: shape {shape:?} axis {ax}");
        cases += 1;
    }
    assert_eq!(cases, 120);
}

#[test]
fn hand_sharded_exchange_of_expert_buffers() {
    // 2 ranks × 2 destinations × 3 tokens × 2 features: send[r, s, j, :] = (100r + 10s + j) for both features
    let (ranks, tokens, c) = (2usize, 3usize, 2usize);
    let shape = vec![ranks, ranks, tokens, c];
    let mut vals = Vec::new();
    for r in 0..ranks {
        for s in 0..ranks {
            for j in 0..tokens {
                for _ in 0..c {
                    vals.push((100 * r + 10 * s + j) as f64);
                }
            }
        }
    }
    let (g, _) = one_op(a2a(1), DType::F32, cd(&shape));
    let got = run1(&g, "x", &Tensor::from_f64(DType::F32, shape.clone(), vals)).to_f64();
    // rank r, block s now holds what rank s addressed to r: 100s + 10r + j
    let mut i = 0;
    for r in 0..ranks {
        for s in 0..ranks {
            for j in 0..tokens {
                for _ in 0..c {
                    assert_eq!(got[i], (100 * s + 10 * r + j) as f64, "rank {r} block {s} token {j}");
                    i += 1;
                }
            }
        }
    }
}

#[test]
fn all_to_all_is_its_own_inverse_and_the_identity_on_one_rank() {
    let mut rng = StdRng::seed_from_u64(3);
    for ranks in 1..=4usize {
        let shape = vec![ranks, 2, 3 * ranks];
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = (0..n).map(|_| rng.gen_range(-8..8) as f64 / 4.0).collect();
        let mut g = Graph::new("c");
        let x = g.input("x", DType::F32, cd(&shape)).unwrap();
        let y = g.op1(a2a(2), &[x]).unwrap();
        let z = g.op1(a2a(-1), &[y]).unwrap();
        g.add_output("y", y).unwrap();
        g.add_output("z", z).unwrap();
        let ins: HashMap<String, Tensor> = [(
            "x".to_string(),
            Tensor::from_f64(DType::F32, shape.clone(), vals.clone()),
        )]
        .into();
        let out = Interpreter::new(Precision::F64).run(&g, &ins).unwrap();
        assert_eq!(out["z"].to_f64(), vals, "R = {ranks}");
        if ranks == 1 {
            assert_eq!(out["y"].to_f64(), vals);
        }
    }
}

#[test]
fn decomposition_on_symbolic_shapes_has_the_inferred_type_and_runs() {
    for (dims, axis) in [
        (
            vec![Dim::sym("R"), Dim::sym("R") * Dim::sym("T"), Dim::from(4usize)],
            1i64,
        ),
        (
            vec![Dim::sym("R"), Dim::sym("E"), Dim::sym("R") * Dim::from(3usize)],
            -1,
        ),
        (
            vec![Dim::from(4usize), Dim::sym("T"), Dim::from(8usize), Dim::sym("C")],
            2,
        ),
    ] {
        for op in [a2a(axis), start(axis, Dim::sym("T") * Dim::from(2usize))] {
            let (g, y) = one_op(op.clone(), DType::BF16, dims.clone());
            let mut d = Graph::new("d");
            let x = d.input("x", DType::BF16, dims.clone()).unwrap();
            let Op::Composite(c) = &op else { unreachable!() };
            let outs = c.decompose(&mut d, &[x]).unwrap();
            assert_eq!(d.ty(outs[0]), g.ty(y), "{op:?} on {dims:?}");
        }
    }
    // and runs with the symbols bound (`T` from an input of its own)
    let mut g = Graph::new("c");
    let x = g
        .input("x", DType::F32, vec![Dim::sym("R"), Dim::sym("R") * Dim::sym("T")])
        .unwrap();
    g.input("t", DType::F32, vec![Dim::sym("T")]).unwrap();
    let y = g.op1(a2a(1), &[x]).unwrap();
    g.add_output("y", y).unwrap();
    let vals: Vec<f64> = (0..3 * 6).map(|i| i as f64).collect();
    let ins: HashMap<String, Tensor> = [
        ("x".to_string(), Tensor::from_f64(DType::F32, vec![3, 6], vals.clone())),
        ("t".to_string(), Tensor::from_f64(DType::F32, vec![2], vec![0.0; 2])),
    ]
    .into();
    let got = Interpreter::new(Precision::F64).run(&g, &ins).unwrap();
    assert_eq!(got["y"].to_f64(), reference(&vals, &[3, 6], 1));
}

#[test]
fn typing_errors_say_what_is_wrong() {
    let cases: Vec<(Op, Vec<Dim>, &str)> = vec![
        (a2a(0), cd(&[2]), "leading rank axis and at least one more axis"),
        (a2a(0), cd(&[2, 4]), "is the rank axis"),
        (a2a(-2), cd(&[2, 4]), "is the rank axis"),
        (a2a(2), cd(&[2, 4]), "out of range"),
        (a2a(1), cd(&[3, 4]), "does not divide"),
        (a2a(1), cd(&[0, 4]), "at least one rank"),
        (a2a(1), vec![Dim::sym("R"), Dim::sym("T")], "does not divide"),
        (
            start(1, Dim::from(0usize)),
            cd(&[4, 6]),
            "`all_to_all_start`: axis 1 of f32[4, 6]",
        ),
    ];
    for (op, dims, want) in cases {
        let mut g = Graph::new("c");
        let x = g.input("x", DType::F32, dims.clone()).unwrap();
        let e = g.op1(op.clone(), &[x]).unwrap_err().to_string();
        assert!(e.contains(want), "{op:?} on {dims:?}: `{e}` lacks `{want}`");
    }
    // a symbolic rank count divides its own multiples
    let (g, _) = one_op(
        a2a(1),
        DType::F32,
        vec![Dim::sym("R"), Dim::from(2usize) * Dim::sym("R")],
    );
    g.verify().unwrap();
    // attributes are checked by the parser
    let e =
        text::parse("graph g {\n  %0 = input \"x\" : f32[2, 4]\n  %1 = all_to_all_start[axis=1](%0)\n}\n").unwrap_err();
    assert!(e.to_string().contains("needs attribute `overlap_flops`"), "{e}");
    let e =
        text::parse("graph g {\n  %0 = input \"x\" : f32[2, 4]\n  %1 = collective_wait[axis=1](%0)\n}\n").unwrap_err();
    assert!(e.to_string().contains("has no attribute `axis`"), "{e}");
}

#[test]
fn text_and_json_round_trip() {
    let src = "graph ep {
  %0 = input \"x\" : bf16[R, 4, R*T, 8]
  %1 = all_to_all[axis=2](%0)
  %2 = all_to_all_start[axis=-2, overlap_flops=64*T](%1)
  %3 = collective_wait(%2)
  %4 = all_to_all_start[axis=2, overlap_flops=0](%3)
  %5 = collective_wait(%4)
  output \"y\" = %5
}
";
    let g = text::parse(src).unwrap();
    let printed = text::print(&g);
    assert_eq!(text::print(&text::parse(&printed).unwrap()), printed);
    assert!(
        printed.contains("all_to_all_start[axis=-2, overlap_flops=64*T]"),
        "{printed}"
    );
    assert!(printed.contains("collective_wait(%2)"), "{printed}");
    let j = json::to_json(&g);
    let back = json::from_json(&j).unwrap();
    assert_eq!(text::print(&back), printed);
    assert!(j.contains("\"all_to_all_start\""), "{j}");
}

// ------------------------------------------------------------ grouped collectives

/// The group of rank `r` under `mesh`/`over`: its members in order along `over` (an empty mesh: all ranks),
/// and `r`'s place among them.
fn group_of(r: usize, ranks: usize, mesh: &[usize], over: usize) -> (Vec<usize>, usize) {
    if mesh.is_empty() {
        return ((0..ranks).collect(), r);
    }
    let st = strides(mesh);
    let coord: Vec<usize> = (0..mesh.len()).map(|d| (r / st[d]) % mesh[d]).collect();
    let members = (0..mesh[over])
        .map(|i| {
            let mut c = coord.clone();
            c[over] = i;
            c.iter().zip(&st).map(|(a, b)| a * b).sum()
        })
        .collect();
    (members, coord[over])
}

/// `all_reduce`, `all_gather`, `reduce_scatter` or `send_recv` (its `axis` argument the shift, in `0..G`)
/// written as a loop over ranks and their groups.
fn grouped_reference(
    op: &str,
    x: &[f64],
    shape: &[usize],
    axis: usize,
    mesh: &[usize],
    over: usize,
) -> (Vec<f64>, Vec<usize>) {
    let ranks = shape[0];
    let g = if mesh.is_empty() { ranks } else { mesh[over] };
    let mut out_shape = shape.to_vec();
    match op {
        "all_gather" => out_shape[axis] *= g,
        "reduce_scatter" | "shard_slice" => out_shape[axis] /= g,
        _ => {}
    }
    let (st, ost) = (strides(shape), strides(&out_shape));
    let n: usize = out_shape.iter().product();
    let at = |idx: &[usize]| idx.iter().zip(&st).map(|(i, k)| i * k).sum::<usize>();
    let out = (0..n)
        .map(|flat| {
            let idx: Vec<usize> = (0..out_shape.len()).map(|d| (flat / ost[d]) % out_shape[d]).collect();
            let (members, me) = group_of(idx[0], ranks, mesh, over);
            let mut src = idx.clone();
            match op {
                "send_recv" => {
                    src[0] = members[(me + g - axis % g) % g];
                    x[at(&src)]
                }
                "shard_slice" => {
                    src[axis] = me * out_shape[axis] + idx[axis];
                    x[at(&src)]
                }
                "all_to_all" => {
                    // rank r's chunk s of `axis` comes from member s's chunk r
                    let c = shape[axis] / g;
                    src[0] = members[idx[axis] / c];
                    src[axis] = me * c + idx[axis] % c;
                    x[at(&src)]
                }
                "all_reduce" => members
                    .iter()
                    .map(|&s| {
                        src[0] = s;
                        x[at(&src)]
                    })
                    .sum(),
                "all_gather" => {
                    let c = shape[axis];
                    src[0] = members[idx[axis] / c];
                    src[axis] = idx[axis] % c;
                    x[at(&src)]
                }
                _ => {
                    let c = out_shape[axis];
                    src[axis] = me * c + idx[axis];
                    members
                        .iter()
                        .map(|&s| {
                            src[0] = s;
                            x[at(&src)]
                        })
                        .sum()
                }
            }
        })
        .collect();
    (out, out_shape)
}

fn grouped_op(op: &str, axis: i64, mesh: &[usize], over: usize) -> Op {
    let mesh = mesh.to_vec();
    Op::Composite(match op {
        "all_reduce" => Composite::AllReduce { mesh, over },
        "all_gather" => Composite::AllGather { axis, mesh, over },
        "send_recv" => Composite::SendRecv {
            shift: axis,
            mesh,
            over,
        },
        "all_to_all" => Composite::AllToAll { axis, mesh, over },
        "shard_slice" => Composite::ShardSlice { axis, mesh, over },
        _ => Composite::ReduceScatter { axis, mesh, over },
    })
}

#[test]
fn grouped_collectives_match_a_loop_over_ranks() {
    let mut rng = StdRng::seed_from_u64(11);
    let meshes: [&[usize]; 6] = [&[], &[2, 3], &[3, 2], &[2, 2, 2], &[4], &[1, 3]];
    let mut cases = 0;
    for _ in 0..150 {
        let mesh = meshes[rng.gen_range(0..meshes.len())];
        let ranks: usize = if mesh.is_empty() {
            rng.gen_range(1..=4)
        } else {
            mesh.iter().product()
        };
        let over = if mesh.is_empty() {
            0
        } else {
            rng.gen_range(0..mesh.len())
        };
        let group = if mesh.is_empty() { ranks } else { mesh[over] };
        let rank = rng.gen_range(2..=4usize);
        let axis = rng.gen_range(1..rank);
        for op in [
            "all_reduce",
            "all_gather",
            "reduce_scatter",
            "all_to_all",
            "shard_slice",
        ] {
            let mut shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..=3usize)).collect();
            shape[0] = ranks;
            if op == "reduce_scatter" || op == "all_to_all" || op == "shard_slice" {
                shape[axis] = group * rng.gen_range(1..=2usize);
            }
            let n: usize = shape.iter().product();
            let vals: Vec<f64> = (0..n).map(|_| rng.gen_range(-4..=4) as f64 * 0.5).collect();
            let ax = if rng.gen_bool(0.5) {
                axis as i64 - rank as i64
            } else {
                axis as i64
            };
            let (want, want_shape) = grouped_reference(op, &vals, &shape, axis, mesh, over);
            let (g, y) = one_op(grouped_op(op, ax, mesh, over), DType::F32, cd(&shape));
            assert_eq!(g.dims(y), cd(&want_shape).as_slice(), "{op} type");
            let got = run1(&g, "x", &Tensor::from_f64(DType::F32, shape.clone(), vals));
            assert_eq!(got.shape, want_shape);
            assert_eq!(
                got.to_f64(),
                want,
                "{op} shape {shape:?} axis {ax} mesh {mesh:?} over {over}"
            );
            cases += 1;
        }
    }
    assert_eq!(cases, 750);
}

/// `reduce_scatter` then `all_gather` over the same groups is `all_reduce`; an `all_gather` then keeping rank
/// `r`'s own chunk is the identity (checked through `reduce_scatter` of a gathered tensor: G times `x`).
#[test]
fn gather_and_scatter_compose_to_the_reduction() {
    let shape = vec![6usize, 4, 6];
    let n: usize = shape.iter().product();
    let vals: Vec<f64> = (0..n).map(|i| (i % 7) as f64 - 3.0).collect();
    for (mesh, over) in [(vec![2usize, 3], 1usize), (vec![2, 3], 0), (vec![], 0)] {
        let mut g = Graph::new("c");
        let x = g.input("x", DType::F32, cd(&shape)).unwrap();
        let rs = g.op1(grouped_op("reduce_scatter", 2, &mesh, over), &[x]).unwrap();
        let ag = g.op1(grouped_op("all_gather", 2, &mesh, over), &[rs]).unwrap();
        let ar = g.op1(grouped_op("all_reduce", 0, &mesh, over), &[x]).unwrap();
        let d = g.sub(ag, ar).unwrap();
        g.add_output("d", d).unwrap();
        let got = run1(&g, "x", &Tensor::from_f64(DType::F32, shape.clone(), vals.clone()));
        assert!(got.to_f64().iter().all(|v| *v == 0.0), "mesh {mesh:?} over {over}");
    }
}

#[test]
fn grouped_collectives_refuse_bad_groups_and_axes() {
    let x = |shape: &[usize]| cd(shape);
    for (op, shape, mesh, over, axis, want) in [
        (
            "all_reduce",
            vec![6usize, 2],
            vec![2usize, 2],
            0usize,
            0i64,
            "mesh [2, 2] has 4 ranks but the rank axis of f32[6, 2] has `6`",
        ),
        (
            "all_reduce",
            vec![6, 2],
            vec![2, 3],
            2,
            0,
            "over=2 is not an axis of mesh [2, 3]",
        ),
        (
            "all_reduce",
            vec![6, 2],
            vec![],
            1,
            0,
            "over=1 needs a mesh with axis 1",
        ),
        (
            "all_gather",
            vec![6, 2],
            vec![2, 3],
            0,
            0,
            "axis 0 is the rank axis of f32[6, 2]",
        ),
        (
            "reduce_scatter",
            vec![6, 4],
            vec![2, 3],
            1,
            1,
            "axis 1 of f32[6, 4] has size `4`, which the group size G = `3` does not divide",
        ),
        (
            "all_gather",
            vec![6],
            vec![],
            0,
            1,
            "`all_gather` needs a tensor [R, ...] with a leading rank axis and at least one more axis",
        ),
    ] {
        let mut g = Graph::new("c");
        let v = g.input("x", DType::F32, x(&shape)).unwrap();
        let e = g.op1(grouped_op(op, axis, &mesh, over), &[v]).unwrap_err().to_string();
        assert!(e.contains(want), "{op}: {e}");
    }
}

#[test]
fn grouped_collectives_round_trip_through_text() {
    let src = "graph g {\n  %0 = input \"x\" : f32[6, 4]\n  %1 = all_reduce[mesh=[2, 3], over=1](%0) : f32[6, 4]\n  %2 = all_gather[axis=1](%1) : f32[6, 24]\n  %3 = reduce_scatter[axis=-1, mesh=[6], over=0](%2) : f32[6, 4]\n  %4 = send_recv[shift=-1, mesh=[3, 2], over=0](%3) : f32[6, 4]\n  %5 = all_to_all[axis=1, mesh=[2, 3], over=0](%4) : f32[6, 4]\n  %6 = all_to_all[axis=1, mesh=[3, 2], over=1](%5) : f32[6, 4]\n  %7 = shard_slice[axis=1, mesh=[3, 2], over=1](%6) : f32[6, 2]\n  output \"y\" = %7\n}\n";
    let g = text::parse(src).unwrap();
    assert_eq!(text::print(&g), src);
    assert_eq!(g.dims(g.outputs()[0].1), cd(&[6, 2]).as_slice());
    // one group of all ranks prints (and reads) without the group attributes
    let src = "graph g {\n  %0 = input \"x\" : f32[2, 4]\n  %1 = all_to_all[axis=1](%0) : f32[2, 4]\n  %2 = all_reduce(%1) : f32[2, 4]\n  output \"y\" = %2\n}\n";
    assert_eq!(text::print(&text::parse(src).unwrap()), src);
    let e = text::parse("graph g {\n  %0 = input \"x\" : f32[6, 4]\n  %1 = all_reduce[mesh=[-2], over=0](%0)\n}\n")
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("attribute `mesh` of `all_reduce` must hold non-negative sizes, found -2"),
        "{e}"
    );
}

/// `send_recv[shift=k]` against a loop over ranks and groups: every shift in `−G..2G` (normalised modulo the
/// group size), meshes of one group and of several, and `send_recv[−k]` undoing `send_recv[k]`.
#[test]
fn send_recv_rotates_within_groups() {
    let meshes: [&[usize]; 4] = [&[], &[2, 3], &[3, 2], &[2, 2, 2]];
    for mesh in meshes {
        let ranks: usize = if mesh.is_empty() { 5 } else { mesh.iter().product() };
        for over in 0..mesh.len().max(1) {
            let group = if mesh.is_empty() { ranks } else { mesh[over] } as i64;
            let shape = vec![ranks, 2, 3];
            let n: usize = shape.iter().product();
            let vals: Vec<f64> = (0..n).map(|i| i as f64).collect();
            for shift in -group..2 * group {
                let k = shift.rem_euclid(group) as usize;
                let (want, _) = grouped_reference("send_recv", &vals, &shape, k, mesh, over);
                let (g, _) = one_op(grouped_op("send_recv", shift, mesh, over), DType::F32, cd(&shape));
                let got = run1(&g, "x", &Tensor::from_f64(DType::F32, shape.clone(), vals.clone()));
                assert_eq!(got.to_f64(), want, "mesh {mesh:?} over {over} shift {shift}");
                let mut g = Graph::new("c");
                let x = g.input("x", DType::F32, cd(&shape)).unwrap();
                let y = g.op1(grouped_op("send_recv", shift, mesh, over), &[x]).unwrap();
                let back = g.op1(grouped_op("send_recv", -shift, mesh, over), &[y]).unwrap();
                g.add_output("y", back).unwrap();
                let got = run1(&g, "x", &Tensor::from_f64(DType::F32, shape.clone(), vals.clone()));
                assert_eq!(got.to_f64(), vals, "send_recv[{shift}] then [{}]", -shift);
            }
        }
    }
    // a symbolic group size has no constant split point
    let mut g = Graph::new("c");
    let x = g.input("x", DType::F32, vec![Dim::sym("R"), Dim::from(2)]).unwrap();
    let e = g.op1(grouped_op("send_recv", 1, &[], 0), &[x]).unwrap_err().to_string();
    assert!(e.contains("`send_recv` needs a constant group size, got `R`"), "{e}");
}

// ------------------------------------------------------------ hand-sharded patterns

/// A ring of `G − 1` `send_recv[1]` steps, each rank adding what it received, is the group's `all_reduce` (the
/// communication pattern of ring attention and of a ring all-reduce), within each group of a mesh.
#[test]
fn a_ring_of_send_recv_steps_is_the_all_reduce() {
    for (mesh, over) in [(vec![4usize], 0usize), (vec![2, 3], 1), (vec![3, 2], 0)] {
        let ranks: usize = mesh.iter().product();
        let shape = vec![ranks, 2, 3];
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = (0..n).map(|i| ((i * 7) % 11) as f64 - 5.0).collect();
        let mut g = Graph::new("ring");
        let x = g.input("x", DType::F32, cd(&shape)).unwrap();
        let (mut acc, mut v) = (x, x);
        for _ in 1..mesh[over] {
            v = g.op1(grouped_op("send_recv", 1, &mesh, over), &[v]).unwrap();
            acc = g.add(acc, v).unwrap();
        }
        let ar = g.op1(grouped_op("all_reduce", 0, &mesh, over), &[x]).unwrap();
        let d = g.sub(acc, ar).unwrap();
        g.add_output("d", d).unwrap();
        let got = run1(&g, "x", &Tensor::from_f64(DType::F32, shape.clone(), vals));
        assert!(got.to_f64().iter().all(|v| *v == 0.0), "mesh {mesh:?} over {over}");
    }
}

/// Tensor parallelism by hand on a `[dp = 2, tp = 2]` mesh: the batch split over `dp`, the first weight's columns
/// and the second weight's rows split over `tp`; each rank's partial product summed by `all_reduce` over `tp`
/// gives every rank its batch shard of the single-device `silu(x W1) W2` (the pattern the sharding pass will
/// produce for an MLP or an attention block's projections).
#[test]
fn a_tensor_parallel_mlp_by_hand_equals_the_single_device_mlp() {
    let (dp, tp, b, c, h) = (2usize, 2usize, 3usize, 4usize, 6usize);
    let vals =
        |n: usize, seed: usize| -> Vec<f64> { (0..n).map(|i| (((i + seed) * 37) % 17) as f64 / 8.0 - 1.0).collect() };
    let (x, w1, w2) = (vals(dp * b * c, 1), vals(c * h, 2), vals(h * c, 3));
    // single device
    let mut g = Graph::new("mlp");
    let xv = g.input("x", DType::F32, cd(&[dp * b, c])).unwrap();
    let w1v = g.input("w1", DType::F32, cd(&[c, h])).unwrap();
    let w2v = g.input("w2", DType::F32, cd(&[h, c])).unwrap();
    let a = g.matmul(xv, w1v).unwrap();
    let a = g.silu(a).unwrap();
    let y = g.matmul(a, w2v).unwrap();
    g.add_output("y", y).unwrap();
    let feed: HashMap<String, Tensor> = [
        (
            "x".to_string(),
            Tensor::from_f64(DType::F32, vec![dp * b, c], x.clone()),
        ),
        ("w1".to_string(), Tensor::from_f64(DType::F32, vec![c, h], w1.clone())),
        ("w2".to_string(), Tensor::from_f64(DType::F32, vec![h, c], w2.clone())),
    ]
    .into();
    let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap()["y"].to_f64();
    // the shards of rank (d, t) = rank d·tp + t
    let (hs, ranks) = (h / tp, dp * tp);
    let mut xs = Vec::new();
    let mut w1s = Vec::new();
    let mut w2s = Vec::new();
    for r in 0..ranks {
        let (d, t) = (r / tp, r % tp);
        xs.extend_from_slice(&x[d * b * c..(d + 1) * b * c]);
        for i in 0..c {
            w1s.extend_from_slice(&w1[i * h + t * hs..i * h + (t + 1) * hs]);
        }
        w2s.extend_from_slice(&w2[t * hs * c..(t + 1) * hs * c]);
    }
    let mut g = Graph::new("mlp_tp");
    let xv = g.input("x", DType::F32, cd(&[ranks, b, c])).unwrap();
    let w1v = g.input("w1", DType::F32, cd(&[ranks, c, hs])).unwrap();
    let w2v = g.input("w2", DType::F32, cd(&[ranks, hs, c])).unwrap();
    let a = g.matmul(xv, w1v).unwrap();
    let a = g.silu(a).unwrap();
    let partial = g.matmul(a, w2v).unwrap();
    let y = g.op1(grouped_op("all_reduce", 0, &[dp, tp], 1), &[partial]).unwrap();
    g.add_output("y", y).unwrap();
    let feed: HashMap<String, Tensor> = [
        ("x".to_string(), Tensor::from_f64(DType::F32, vec![ranks, b, c], xs)),
        ("w1".to_string(), Tensor::from_f64(DType::F32, vec![ranks, c, hs], w1s)),
        ("w2".to_string(), Tensor::from_f64(DType::F32, vec![ranks, hs, c], w2s)),
    ]
    .into();
    let got = Interpreter::new(Precision::F64).run(&g, &feed).unwrap()["y"].to_f64();
    for r in 0..ranks {
        let d = r / tp;
        let mine = &got[r * b * c..(r + 1) * b * c];
        let theirs = &want[d * b * c..(d + 1) * b * c];
        for (u, v) in mine.iter().zip(theirs) {
            assert!((u - v).abs() < 1e-12, "rank {r}: {u} against {v}");
        }
    }
}

// ------------------------------------------------------------ the routed MoE exchange

/// `all_to_all_dispatch` written as a loop over ranks: rows `[R, M, F]`, counts `[R, E]` → `[R, G·M, F]` and
/// `[R, E/G]`.
fn dispatch_reference(
    x: &[f64],
    counts: &[i64],
    (ranks, m, f, e): (usize, usize, usize, usize),
    mesh: &[usize],
    over: usize,
) -> (Vec<f64>, Vec<i64>) {
    let (members, _) = group_of(0, ranks, mesh, over);
    let gs = members.len();
    let el = e / gs;
    let mut y = vec![0.0; ranks * gs * m * f];
    let mut got = vec![0i64; ranks * el];
    for r in 0..ranks {
        let (members, me) = group_of(r, ranks, mesh, over);
        let mut q = 0;
        for j in 0..el {
            let ex = me * el + j;
            for &s in &members {
                let start: i64 = counts[s * e..s * e + ex].iter().sum();
                let n = counts[s * e + ex];
                for i in 0..n as usize {
                    let src = (s * m + start as usize + i) * f;
                    let dst = (r * gs * m + q) * f;
                    y[dst..dst + f].copy_from_slice(&x[src..src + f]);
                    q += 1;
                }
                got[r * el + j] += n;
            }
        }
    }
    (y, got)
}

fn exchange_graph(op: Composite, x: (DType, Vec<usize>), counts: &[usize]) -> Graph {
    let mut g = Graph::new("exchange");
    let xv = g.input("x", x.0, cd(&x.1)).unwrap();
    let cv = g.input("counts", DType::I64, cd(counts)).unwrap();
    let outs = g.op(Op::Composite(op), &[xv, cv]).unwrap();
    for (i, v) in outs.into_iter().enumerate() {
        g.add_output(format!("y{i}"), v).unwrap();
    }
    g
}

/// Random counts `[R, E]` whose rows sum to at most `m` (some to fewer: padding at the end of a rank's rows).
fn random_counts(rng: &mut StdRng, ranks: usize, e: usize, m: usize) -> Vec<i64> {
    let mut c = vec![0i64; ranks * e];
    for r in 0..ranks {
        let total = rng.gen_range(0..=m);
        for _ in 0..total {
            c[r * e + rng.gen_range(0..e)] += 1;
        }
    }
    c
}

#[test]
fn routed_exchange_matches_a_loop_over_ranks_and_combine_is_its_transpose() {
    let mut rng = StdRng::seed_from_u64(11);
    let cases: [(&[usize], usize, usize); 6] = [
        (&[], 0, 2),
        (&[], 0, 3),
        (&[2, 3], 1, 6),
        (&[2, 3], 0, 6),
        (&[2, 2, 2], 1, 8),
        (&[1, 4], 1, 4),
    ];
    for (mesh, over, ranks) in cases {
        let gs = if mesh.is_empty() { ranks } else { mesh[over] };
        for _ in 0..3 {
            let (m, f, e) = (rng.gen_range(1..6), rng.gen_range(1..4), gs * rng.gen_range(1..4));
            let x: Vec<f64> = (0..ranks * m * f)
                .map(|_| f64::from(rng.gen_range(-1.0f32..1.0)))
                .collect();
            let counts = random_counts(&mut rng, ranks, e, m);
            let feed: HashMap<String, Tensor> = [
                (
                    "x".to_string(),
                    Tensor::from_f64(DType::F32, vec![ranks, m, f], x.clone()),
                ),
                (
                    "counts".to_string(),
                    Tensor::from_i64(DType::I64, vec![ranks, e], counts.clone()),
                ),
            ]
            .into();
            let d = exchange_graph(
                Composite::dispatch(mesh.to_vec(), over),
                (DType::F32, vec![ranks, m, f]),
                &[ranks, e],
            );
            let out = Interpreter::new(Precision::F64).run(&d, &feed).unwrap();
            let (want_y, want_got) = dispatch_reference(&x, &counts, (ranks, m, f, e), mesh, over);
            let what = format!("mesh {mesh:?} over {over}, m {m}, f {f}, e {e}, counts {counts:?}");
            assert_eq!(out["y0"].shape, vec![ranks, gs * m, f], "{what}");
            assert_eq!(out["y0"].to_f64(), want_y, "{what}");
            assert_eq!(out["y1"].shape, vec![ranks, e / gs], "{what}");
            assert_eq!(
                out["y1"].to_f64(),
                want_got.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                "{what}"
            );
            // combine is the transpose: <dispatch(x), y> = <x, combine(y)> for a random y
            let y: Vec<f64> = (0..ranks * gs * m * f)
                .map(|_| f64::from(rng.gen_range(-1.0f32..1.0)))
                .collect();
            let c = exchange_graph(
                Composite::combine(mesh.to_vec(), over),
                (DType::F32, vec![ranks, gs * m, f]),
                &[ranks, e],
            );
            let feed_c: HashMap<String, Tensor> = [
                (
                    "x".to_string(),
                    Tensor::from_f64(DType::F32, vec![ranks, gs * m, f], y.clone()),
                ),
                (
                    "counts".to_string(),
                    Tensor::from_i64(DType::I64, vec![ranks, e], counts.clone()),
                ),
            ]
            .into();
            let back = Interpreter::new(Precision::F64).run(&c, &feed_c).unwrap()["y0"].to_f64();
            assert_eq!(back.len(), x.len(), "{what}");
            let lhs: f64 = want_y.iter().zip(&y).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
            assert!((lhs - rhs).abs() < 1e-12, "{what}: {lhs} vs {rhs}");
            // and its left inverse on the rows a rank sends: combine(dispatch(x)) keeps them, zeroes the rest
            let feed_rt: HashMap<String, Tensor> = [
                (
                    "x".to_string(),
                    Tensor::from_f64(DType::F32, vec![ranks, gs * m, f], want_y.clone()),
                ),
                (
                    "counts".to_string(),
                    Tensor::from_i64(DType::I64, vec![ranks, e], counts.clone()),
                ),
            ]
            .into();
            let rt = Interpreter::new(Precision::F64).run(&c, &feed_rt).unwrap()["y0"].to_f64();
            for r in 0..ranks {
                let sent: i64 = counts[r * e..(r + 1) * e].iter().sum();
                for i in 0..m * f {
                    let want = if (i / f) < sent as usize { x[r * m * f + i] } else { 0.0 };
                    assert_eq!(rt[r * m * f + i], want, "{what}: rank {r}, element {i}");
                }
            }
        }
    }
}

#[test]
fn routed_exchange_refuses_bad_operands_and_round_trips() {
    let mut g = Graph::new("bad");
    let x = g.input("x", DType::F32, cd(&[4, 3, 2])).unwrap();
    let c = g.input("c", DType::I64, cd(&[4, 6])).unwrap();
    let cf = g.input("cf", DType::F32, cd(&[4, 4])).unwrap();
    let op = |mesh: Vec<usize>, over| Op::Composite(Composite::dispatch(mesh, over));
    let e = g.op(op(vec![], 0), &[x, c]).unwrap_err().to_string();
    assert!(
        e.contains("`all_to_all_dispatch`: 6 experts cannot be shared by a group of 4 ranks"),
        "{e}"
    );
    let e = g.op(op(vec![2, 2], 1), &[x, cf]).unwrap_err().to_string();
    assert!(
        e.contains("`all_to_all_dispatch` needs integer counts [R, E], got f32[4, 4]"),
        "{e}"
    );
    let comb = Op::Composite(Composite::combine(vec![4], 0));
    let c8 = g.input("c8", DType::I64, cd(&[4, 8])).unwrap();
    let e = g.op(comb.clone(), &[x, c8]).unwrap_err().to_string();
    assert!(e.contains("the group size must divide axis 1"), "{e}");
    let (y, got) = {
        let v = g.op(op(vec![2, 2], 1), &[x, c]).unwrap();
        (v[0], v[1])
    };
    assert_eq!(g.dims(y), cd(&[4, 6, 2]).as_slice());
    assert_eq!(g.dims(got), cd(&[4, 3]).as_slice());
    let back = g
        .op(
            Op::Composite(Composite::AllToAllCombine {
                mesh: vec![2, 2],
                over: 1,
                overlap_flops: Dim::from(4096usize),
            }),
            &[y, c],
        )
        .unwrap()[0];
    assert_eq!(g.dims(back), cd(&[4, 3, 2]).as_slice());
    g.add_output("back", back).unwrap();
    g.add_output("got", got).unwrap();
    let t = text::print(&g);
    assert!(t.contains("all_to_all_dispatch[mesh=[2, 2], over=1]"), "{t}");
    // a schedule annotation is printed where it is not 0, and parses back
    assert!(
        t.contains("all_to_all_combine[mesh=[2, 2], over=1, overlap_flops=4096]"),
        "{t}"
    );
    let again = text::parse(&t).unwrap();
    assert_eq!(text::print(&again), t);
    let j = json::to_json(&g);
    assert_eq!(text::print(&json::from_json(&j).unwrap()), t);
    // JSON leaves out an annotation of 0, and a graph written before it existed loads with 0
    assert_eq!(j.matches("overlap_flops").count(), 1, "{j}");
    let mut lines: Vec<String> = j.lines().map(str::to_string).collect();
    let at = lines.iter().position(|l| l.contains("overlap_flops")).unwrap();
    lines.remove(at);
    lines[at - 1] = lines[at - 1].trim_end_matches(',').to_string();
    let old = lines.join("\n");
    assert!(!old.contains("overlap_flops"), "{old}");
    let t0 = text::print(&json::from_json(&old).unwrap());
    assert!(t0.contains("all_to_all_combine[mesh=[2, 2], over=1]("), "{t0}");
}
