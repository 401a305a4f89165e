//! The collectives family on hand-sharded expert-parallel MoE graphs (ranks simulated on a leading axis):
//! the graphs against a per-token loop; soundness of the token-chunked overlap (f64, every alternative) over
//! random shapes, R = 2 and 4, both buffer layouts; refusal of segments whose `f` is not row-wise; and the
//! extractor's choice: chunked where communication is comparable to the expert compute (H800, MiniMax-01
//! sizes), unchunked where chunking only adds launches.

use fulgur_ir::{text, DType, Dim, Graph, Interpreter, Op, Precision, Tensor, Value};
use fulgur_passes::lang::{graph_to_egraph, EGraph, ShapeAnalysis};
use fulgur_passes::rules::{algebra, collectives, Family, RuleConfig};
use fulgur_passes::testing::{check_soundness, random_inputs, Soundness};
use fulgur_passes::{standard_pipeline, CostModel, Dce, EqSat, Limits, PassContext, PassReport, Pipeline, Target};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

fn env(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn d(x: usize) -> Dim {
    Dim::from(x)
}

/// An expert-parallel MoE: `ranks` ranks with `local` experts each (`E = ranks·local` in all), `tokens` tokens
/// of width `c` per rank, top-`k` routing, SwiGLU experts of width `i`.
#[derive(Clone, Copy, Debug)]
struct Ep {
    ranks: usize,
    local: usize,
    c: usize,
    i: usize,
    k: usize,
}

/// How the dispatched buffers are laid out.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// `[R (rank), R (destination/source), E_local, T, C]`, exchanged along axis 1: tokens on their own axis.
    Experts,
    /// `[R, R·T, C]` (one expert per rank), exchanged along axis 1: per-destination blocks of `T` rows.
    Blocks,
}

/// Variations that make `f` something the rule must refuse.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Twist {
    #[default]
    None,
    /// The expert output is scaled by a per-token data input (not computed from the dispatch).
    PerTokenInput,
    /// The expert output is scaled by a per-token weight (a parameter of full size on the token axis).
    PerTokenWeight,
    /// `f` reshapes its buffer (merges axes) before the expert matmul.
    Reshaped,
}

/// `[R, T, X]` (token-major per rank) → `[R, R, E_l, T, 1]` (`X = R·E_l` experts split by owning rank).
fn per_expert(g: &mut Graph, v: Value, s: Ep, t: &Dim) -> Value {
    let (r, l) = (d(s.ranks), d(s.local));
    let v = g.reshape(v, vec![r.clone(), t.clone(), r.clone(), l.clone()]).unwrap();
    let v = g.permute(v, &[0, 2, 3, 1]).unwrap();
    g.reshape(v, vec![r.clone(), r, l, t.clone(), d(1)]).unwrap()
}

/// The hand-sharded EP MoE over tokens `x: [R, T, C]`; output `y: [R, T, C]`. Every rank routes its tokens
/// (router replicated), sends each token to every expert (masked to zero where the token did not pick it:
/// static shapes, dropless), the dispatch all-to-all brings each rank its experts' buffers, the local experts
/// run SwiGLU, the combine all-to-all brings the results back, and each rank sums them with its routing
/// weights.
fn ep_moe(s: Ep, layout: Layout, tokens: Dim, twist: Twist) -> Graph {
    let Ep { ranks, local, c, i, k } = s;
    let e = ranks * local;
    let t = tokens;
    let r = d(ranks);
    let mut g = Graph::new("ep_moe");
    let x = g.input("x", DType::F32, vec![r.clone(), t.clone(), d(c)]).unwrap();
    if !t.is_const() {
        // binds the symbol of `t` (which occurs only as a multiple)
        let sym = t.symbols()[0].clone();
        g.input("n", DType::F32, vec![Dim::sym(&sym)]).unwrap();
    }
    let wg = g.param("wg", DType::F32, vec![d(e), d(c)]).unwrap();
    let w13 = g
        .param("w13", DType::F32, vec![r.clone(), d(local), d(2 * i), d(c)])
        .unwrap();
    let w2 = g
        .param("w2", DType::F32, vec![r.clone(), d(local), d(c), d(i)])
        .unwrap();
    // routing, on every rank
    let logits = g.linear(x, wg).unwrap(); // [R, T, E]
    let p = g.softmax(logits, -1).unwrap();
    let (wk, idx) = g.topk(p, k, -1).unwrap();
    let ws = g.sum(wk, &[-1], true).unwrap();
    let wk = g.div(wk, ws).unwrap();
    let oh = g.one_hot(idx, e, DType::F32).unwrap(); // [R, T, k, E]
    let mask = g.sum(oh, &[2], false).unwrap(); // [R, T, E]: 1 where picked
    let w3 = g.reshape(wk, vec![r.clone(), t.clone(), d(k), d(1)]).unwrap();
    let cw = g.mul(oh, w3).unwrap();
    let cw = g.sum(cw, &[2], false).unwrap(); // [R, T, E]: routing weight, 0 where not picked
    let w13t = g.transpose(w13, -2, -1).unwrap(); // [R, E_l, C, 2I]
    let w2t = g.transpose(w2, -2, -1).unwrap(); // [R, E_l, I, C]
    let swiglu = |g: &mut Graph, h: Value| -> Value {
        let gate = g.slice(h, -1, 0, i).unwrap();
        let up = g.slice(h, -1, i, 2 * i).unwrap();
        let a = g.silu(gate).unwrap();
        g.mul(a, up).unwrap()
    };
    let out = match layout {
        Layout::Experts => {
            let m5 = per_expert(&mut g, mask, s, &t);
            let x5 = g.reshape(x, vec![r.clone(), d(1), d(1), t.clone(), d(c)]).unwrap();
            let send = g.mul(x5, m5).unwrap(); // [R, R, E_l, T, C]
            let recv = g
                .named(
                    "dispatch",
                    Op::Composite(fulgur_ir::Composite::AllToAll {
                        axis: 1,
                        mesh: vec![],
                        over: 0,
                    }),
                    &[send],
                )
                .unwrap();
            let mut h_in = recv;
            if twist == Twist::Reshaped {
                let flat = g
                    .reshape(recv, vec![r.clone(), r.clone() * d(local) * t.clone(), d(c)])
                    .unwrap();
                h_in = g
                    .reshape(flat, vec![r.clone(), r.clone(), d(local), t.clone(), d(c)])
                    .unwrap();
            }
            let w13r = g
                .reshape(w13t, vec![r.clone(), d(1), d(local), d(c), d(2 * i)])
                .unwrap();
            let w2r = g.reshape(w2t, vec![r.clone(), d(1), d(local), d(i), d(c)]).unwrap();
            let h = g.matmul(h_in, w13r).unwrap(); // [R, R, E_l, T, 2I]
            let a = swiglu(&mut g, h);
            let mut y = g.matmul(a, w2r).unwrap(); // [R, R, E_l, T, C]
            match twist {
                Twist::PerTokenInput => {
                    let sc = g
                        .input("scale", DType::F32, vec![r.clone(), d(1), d(1), t.clone(), d(1)])
                        .unwrap();
                    y = g.mul(y, sc).unwrap();
                }
                Twist::PerTokenWeight => {
                    let sc = g
                        .param("scale", DType::F32, vec![d(1), d(1), d(1), t.clone(), d(1)])
                        .unwrap();
                    y = g.mul(y, sc).unwrap();
                }
                _ => {}
            }
            let back = g
                .named(
                    "combine",
                    Op::Composite(fulgur_ir::Composite::AllToAll {
                        axis: 1,
                        mesh: vec![],
                        over: 0,
                    }),
                    &[y],
                )
                .unwrap();
            let c5 = per_expert(&mut g, cw, s, &t);
            let yw = g.mul(back, c5).unwrap();
            g.sum(yw, &[1, 2], false).unwrap()
        }
        Layout::Blocks => {
            assert_eq!(local, 1, "the block layout has one expert per rank");
            let copies = vec![x; ranks];
            let xs = g.concat(&copies, 1).unwrap(); // [R, R·T, C]: block s for rank s
            let m = g.permute(mask, &[0, 2, 1]).unwrap(); // [R, R, T]
            let m = g.reshape(m, vec![r.clone(), r.clone() * t.clone(), d(1)]).unwrap();
            let send = g.mul(xs, m).unwrap();
            let recv = g
                .named(
                    "dispatch",
                    Op::Composite(fulgur_ir::Composite::AllToAll {
                        axis: 1,
                        mesh: vec![],
                        over: 0,
                    }),
                    &[send],
                )
                .unwrap();
            let w13r = g.reshape(w13t, vec![r.clone(), d(c), d(2 * i)]).unwrap();
            let w2r = g.reshape(w2t, vec![r.clone(), d(i), d(c)]).unwrap();
            let h = g.matmul(recv, w13r).unwrap(); // [R, R·T, 2I]
            let a = swiglu(&mut g, h);
            let y = g.matmul(a, w2r).unwrap(); // [R, R·T, C]
            let back = g
                .named(
                    "combine",
                    Op::Composite(fulgur_ir::Composite::AllToAll {
                        axis: 1,
                        mesh: vec![],
                        over: 0,
                    }),
                    &[y],
                )
                .unwrap();
            let back = g.reshape(back, vec![r.clone(), r.clone(), t.clone(), d(c)]).unwrap();
            let cwt = g.permute(cw, &[0, 2, 1]).unwrap();
            let cwt = g.reshape(cwt, vec![r.clone(), r.clone(), t.clone(), d(1)]).unwrap();
            let yw = g.mul(back, cwt).unwrap();
            g.sum(yw, &[1], false).unwrap()
        }
    };
    g.add_output("y", out).unwrap();
    g
}

/// The same MoE, token by token in f64: `y[r, j] = Σ_{e picked} w_e · W2_e (silu(W1_e x) ⊙ W3_e x)`, expert
/// `e` living on rank `e / E_l` as its local expert `e % E_l`.
fn moe_loop(s: Ep, t: usize, ins: &HashMap<String, Tensor>) -> Vec<f64> {
    let Ep { ranks, local, c, i, k } = s;
    let e_all = ranks * local;
    let (x, wg, w13, w2) = (
        ins["x"].to_f64(),
        ins["wg"].to_f64(),
        ins["w13"].to_f64(),
        ins["w2"].to_f64(),
    );
    let mut out = vec![0.0; ranks * t * c];
    for r in 0..ranks {
        for j in 0..t {
            let xt = &x[(r * t + j) * c..(r * t + j + 1) * c];
            let logits: Vec<f64> = (0..e_all)
                .map(|e| (0..c).map(|q| xt[q] * wg[e * c + q]).sum())
                .collect();
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
            let z: f64 = ex.iter().sum();
            let mut order: Vec<usize> = (0..e_all).collect();
            order.sort_by(|&a, &b| ex[b].partial_cmp(&ex[a]).unwrap().then(a.cmp(&b)));
            let picked = &order[..k];
            let wsum: f64 = picked.iter().map(|&e| ex[e] / z).sum();
            for &e in picked {
                let (owner, l) = (e / local, e % local);
                let base13 = (owner * local + l) * 2 * i * c;
                let base2 = (owner * local + l) * c * i;
                let act: Vec<f64> = (0..i)
                    .map(|q| {
                        let gate: f64 = (0..c).map(|p| w13[base13 + q * c + p] * xt[p]).sum();
                        let up: f64 = (0..c).map(|p| w13[base13 + (i + q) * c + p] * xt[p]).sum();
                        gate / (1.0 + (-gate).exp()) * up
                    })
                    .collect();
                for o in 0..c {
                    let v: f64 = (0..i).map(|q| w2[base2 + o * i + q] * act[q]).sum();
                    out[(r * t + j) * c + o] += ex[e] / z / wsum * v;
                }
            }
        }
    }
    out
}

#[test]
fn hand_sharded_ep_moe_is_the_moe() {
    for (s, layout, t) in [
        (
            Ep {
                ranks: 2,
                local: 2,
                c: 3,
                i: 2,
                k: 2,
            },
            Layout::Experts,
            5,
        ),
        (
            Ep {
                ranks: 4,
                local: 1,
                c: 2,
                i: 3,
                k: 2,
            },
            Layout::Experts,
            3,
        ),
        (
            Ep {
                ranks: 2,
                local: 1,
                c: 3,
                i: 2,
                k: 1,
            },
            Layout::Blocks,
            4,
        ),
        (
            Ep {
                ranks: 4,
                local: 1,
                c: 2,
                i: 2,
                k: 3,
            },
            Layout::Blocks,
            6,
        ),
    ] {
        let g = ep_moe(s, layout, d(t), Twist::None);
        let ins = random_inputs(&g, &env(&[]), 11, 2);
        let got = Interpreter::new(Precision::F64).run(&g, &ins).unwrap();
        let want = moe_loop(s, t, &ins);
        let y = got["y"].to_f64();
        let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "{s:?} {layout:?} T={t}: max error {err}");
    }
}

fn saturate(g: &Graph, fams: Vec<Family>) -> EGraph {
    let mut eg = EGraph::new(ShapeAnalysis::default());
    graph_to_egraph(g, &mut eg);
    let rules: Vec<_> = fams.into_iter().flat_map(|f| f.rules).collect();
    let eg = Limits::default().runner(eg, None).run(&rules).egraph;
    assert!(eg.classes().all(|c| c.data.conflict.is_none()), "type conflict");
    eg
}

/// How many `all_to_all_start` e-nodes the e-graph holds.
fn starts_in(eg: &EGraph) -> usize {
    eg.classes()
        .flat_map(|c| c.nodes.iter())
        .filter(|n| n.ir_op().is_some_and(|o| o.name() == "all_to_all_start"))
        .count()
}

fn cfg() -> RuleConfig {
    RuleConfig::default()
}

/// Saturates with the collectives family (alone, then with algebra), checks every alternative in f64, and
/// returns (the report of the first check, starts added).
fn soundness(s: Ep, layout: Layout, t: usize, symbolic: bool, seed: u64) -> (Soundness, usize) {
    let tokens = if symbolic {
        assert_eq!(t % 4, 0);
        d(4) * Dim::sym("N")
    } else {
        d(t)
    };
    let g = ep_moe(s, layout, tokens, Twist::None);
    let eg = saturate(&g, vec![collectives::family(&cfg())]);
    let starts = starts_in(&eg);
    let ins = random_inputs(&g, &env(&[("N", t as i64 / 4)]), seed, 2);
    let what = format!("{s:?} {layout:?} T={t} symbolic={symbolic}");
    let n =
        check_soundness(&g, vec![collectives::family(&cfg())], &ins, 1e-9).unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("{what}: {n}");
    check_soundness(
        &g,
        vec![collectives::family(&cfg()), algebra::family(&cfg())],
        &ins,
        1e-9,
    )
    .unwrap_or_else(|e| panic!("{what} with algebra: {e}"));
    (n, starts)
}

#[test]
fn chunked_overlap_is_sound_on_random_shapes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xa2a);
    for case in 0..24u64 {
        let ranks = if case % 2 == 0 { 2 } else { 4 };
        let layout = if case % 3 == 2 { Layout::Blocks } else { Layout::Experts };
        let local = if layout == Layout::Blocks {
            1
        } else {
            rng.gen_range(1..=2usize)
        };
        let e = ranks * local;
        let s = Ep {
            ranks,
            local,
            c: rng.gen_range(1..=4usize),
            i: rng.gen_range(1..=3usize),
            k: rng.gen_range(1..=e.min(3)),
        };
        let t = [2, 4, 6, 8, 12][rng.gen_range(0..5)];
        let (n, starts) = soundness(s, layout, t, false, case);
        // chunk counts that divide T: 2 always, 4 when 4 | T; two starts per chunk
        let want = 2 * (2 + if t % 4 == 0 { 4 } else { 0 });
        assert_eq!(starts, want, "{s:?} {layout:?} T={t}: {starts} starts");
        assert!(n.checked >= 20, "{s:?}: {n}");
    }
}

#[test]
fn symbolic_and_edge_shapes_are_sound() {
    // symbolic tokens `4*N`: chunks of 2*N and N
    for (s, layout) in [
        (
            Ep {
                ranks: 2,
                local: 2,
                c: 2,
                i: 2,
                k: 2,
            },
            Layout::Experts,
        ),
        (
            Ep {
                ranks: 4,
                local: 1,
                c: 3,
                i: 1,
                k: 1,
            },
            Layout::Blocks,
        ),
    ] {
        let (_, starts) = soundness(s, layout, 8, true, 3);
        assert_eq!(starts, 12, "{s:?} {layout:?}");
    }
    // T = 2: chunks of one token; k = E: every token everywhere; one expert on each of two ranks
    let (_, starts) = soundness(
        Ep {
            ranks: 2,
            local: 1,
            c: 2,
            i: 1,
            k: 2,
        },
        Layout::Experts,
        2,
        false,
        4,
    );
    assert_eq!(starts, 4);
    let (_, starts) = soundness(
        Ep {
            ranks: 2,
            local: 1,
            c: 1,
            i: 1,
            k: 2,
        },
        Layout::Blocks,
        2,
        false,
        5,
    );
    assert_eq!(starts, 4);
    // T = 3 and T = 1: no chunk count divides the tokens, nothing is offered, still sound
    for t in [1, 3] {
        let (_, starts) = soundness(
            Ep {
                ranks: 2,
                local: 2,
                c: 2,
                i: 2,
                k: 1,
            },
            Layout::Experts,
            t,
            false,
            6,
        );
        assert_eq!(starts, 0, "T={t}");
    }
}

#[test]
fn segments_whose_f_is_not_row_wise_are_refused() {
    let s = Ep {
        ranks: 2,
        local: 2,
        c: 3,
        i: 2,
        k: 2,
    };
    for twist in [Twist::PerTokenInput, Twist::PerTokenWeight, Twist::Reshaped] {
        let g = ep_moe(s, Layout::Experts, d(4), twist);
        let eg = saturate(&g, vec![collectives::family(&cfg())]);
        assert_eq!(starts_in(&eg), 0, "{twist:?}: the rule fired");
        let ins = random_inputs(&g, &env(&[]), 9, 2);
        check_soundness(&g, vec![collectives::family(&cfg())], &ins, 1e-9).unwrap_or_else(|e| panic!("{twist:?}: {e}"));
    }
    // with the algebra family, `reshape(reshape(x))` to the same shape folds away and `f` is row-wise again
    let g = ep_moe(s, Layout::Experts, d(4), Twist::Reshaped);
    let eg = saturate(&g, vec![collectives::family(&cfg()), algebra::family(&cfg())]);
    assert_eq!(starts_in(&eg), 12, "after reshape folding");
}

// ------------------------------------------------------------------ extraction and cost

/// The expert-parallel segment alone, on capacity buffers (what a dispatch kernel writes): `x: [R, R, E_l,
/// cap, C]` exchanged along axis 1, the local experts' SwiGLU (or, with `swiglu = false`, an elementwise `f`
/// with no matmul), exchanged back.
fn ep_segment(ranks: usize, local: usize, cap: usize, c: usize, i: usize, dt: DType, swiglu: bool) -> Graph {
    let r = d(ranks);
    let mut g = Graph::new("ep");
    let x = g
        .input("x", dt, vec![r.clone(), r.clone(), d(local), d(cap), d(c)])
        .unwrap();
    let recv = g
        .op1(
            Op::Composite(fulgur_ir::Composite::AllToAll {
                axis: 1,
                mesh: vec![],
                over: 0,
            }),
            &[x],
        )
        .unwrap();
    let y = if swiglu {
        let w13 = g
            .param("w13", dt, vec![r.clone(), d(1), d(local), d(c), d(2 * i)])
            .unwrap();
        let w2 = g.param("w2", dt, vec![r.clone(), d(1), d(local), d(i), d(c)]).unwrap();
        let h = g.matmul(recv, w13).unwrap();
        let gate = g.slice(h, -1, 0, i).unwrap();
        let up = g.slice(h, -1, i, 2 * i).unwrap();
        let a = g.silu(gate).unwrap();
        let a = g.mul(a, up).unwrap();
        g.matmul(a, w2).unwrap()
    } else {
        let b = g.param("b", dt, vec![r.clone(), d(1), d(local), d(1), d(c)]).unwrap();
        let v = g.add(recv, b).unwrap();
        g.silu(v).unwrap()
    };
    let back = g
        .op1(
            Op::Composite(fulgur_ir::Composite::AllToAll {
                axis: 1,
                mesh: vec![],
                over: 0,
            }),
            &[y],
        )
        .unwrap();
    g.add_output("y", back).unwrap();
    g
}

fn optimize(g: &Graph, target: Target, fams: Vec<Family>) -> (Graph, PassReport) {
    let cx = PassContext {
        model: CostModel::new(target),
    };
    let (out, mut reports) = Pipeline::new()
        .with(Dce)
        .with(EqSat::new(fams))
        .run(g, &cx, None)
        .unwrap();
    (out, reports.pop().unwrap())
}

fn count(g: &Graph, name: &str) -> usize {
    g.nodes().filter(|(_, n)| n.op.name() == name).count()
}

fn fams() -> Vec<Family> {
    vec![collectives::family(&cfg()), algebra::family(&cfg())]
}

#[test]
fn minimax_sizes_on_h800_extract_the_overlapped_chunks() {
    // MiniMax-Text-01 on 8-way expert parallelism: 32 experts → 4 per rank, hidden 6144, expert width 9216,
    // 4096 tokens per rank × top-2 / 32 experts = 256 rows per (source rank, expert), bf16
    let g = ep_segment(8, 4, 256, 6144, 9216, DType::BF16, true);
    let (out, rep) = optimize(&g, Target::by_name("H800").unwrap(), fams());
    let fir = text::print(&out);
    let starts = count(&out, "all_to_all_start");
    assert_eq!(starts, 8, "four chunks, a dispatch and a combine each:\n{fir}");
    assert_eq!(count(&out, "collective_wait"), 8, "{fir}");
    assert_eq!(count(&out, "all_to_all"), 0, "{fir}");
    assert!(fir.contains("all_to_all_start[axis=1, overlap_flops=0]"), "{fir}");
    let eq = rep.eqsat.as_ref().unwrap();
    assert!(eq.families.contains(&"collectives".to_string()));
    let applied: usize = eq
        .templates
        .iter()
        .map(|t| t.rules["a2a-overlap-chunks"].applications)
        .sum();
    assert!(applied >= 1, "the rule never applied");
    assert!(
        rep.cost_after_s < 0.85 * rep.cost_before_s,
        "H800: {:.3} ms → {:.3} ms",
        rep.cost_before_s * 1e3,
        rep.cost_after_s * 1e3
    );
    eprintln!(
        "H800, MiniMax EP8 segment (summed over 8 ranks): {:.3} ms → {:.3} ms, kernels {} → {}",
        rep.cost_before_s * 1e3,
        rep.cost_after_s * 1e3,
        rep.kernels_before,
        rep.kernels_after
    );
    // the same on H100 (faster links): still worth it, by less
    let (out, rep100) = optimize(&g, Target::by_name("H100").unwrap(), fams());
    assert!(count(&out, "all_to_all_start") > 0);
    let saved = |r: &PassReport| r.cost_before_s - r.cost_after_s;
    assert!(
        saved(&rep100) < saved(&rep),
        "H100 saves {} s, H800 {} s",
        saved(&rep100),
        saved(&rep)
    );
    eprintln!(
        "H100: {:.3} ms → {:.3} ms",
        rep100.cost_before_s * 1e3,
        rep100.cost_after_s * 1e3
    );
    // links four times slower than H800's (communication now as long as the expert compute): chunked, and
    // it saves more
    let slow = Target::by_name("H800")
        .unwrap()
        .with_overrides(r#"{"link_bw": 50e9}"#)
        .unwrap();
    let (out, rep_slow) = optimize(&g, slow, fams());
    assert!(count(&out, "all_to_all_start") > 0);
    assert!(saved(&rep_slow) > saved(&rep));
    eprintln!(
        "H800 with 50 GB/s links: {:.3} ms → {:.3} ms ({} starts)",
        rep_slow.cost_before_s * 1e3,
        rep_slow.cost_after_s * 1e3,
        count(&out, "all_to_all_start")
    );
}

#[test]
fn chunking_is_refused_by_cost_where_it_only_adds_launches() {
    // tiny buffers: communication and compute are far below a launch
    let g = ep_segment(2, 2, 8, 16, 16, DType::BF16, true);
    let (out, rep) = optimize(&g, Target::by_name("H800").unwrap(), fams());
    assert_eq!(count(&out, "all_to_all_start"), 0, "{}", text::print(&out));
    assert_eq!(count(&out, "all_to_all"), 2);
    let applied: usize = rep
        .eqsat
        .as_ref()
        .unwrap()
        .templates
        .iter()
        .map(|t| t.rules["a2a-overlap-chunks"].applications)
        .sum();
    assert!(applied >= 1, "the chunked form was offered");
    // MiniMax sizes, but links so fast that nothing is left to hide
    let fast = Target::by_name("H800")
        .unwrap()
        .with_overrides(r#"{"link_bw": 1e16}"#)
        .unwrap();
    let g = ep_segment(8, 4, 256, 6144, 9216, DType::BF16, true);
    let (out, _) = optimize(&g, fast, fams());
    assert_eq!(count(&out, "all_to_all_start"), 0, "{}", text::print(&out));
    // an `f` without matmuls hides nothing (its overlap_flops is 0), however large the transfer
    let g = ep_segment(8, 4, 256, 6144, 9216, DType::BF16, false);
    let (out, _) = optimize(&g, Target::by_name("H800").unwrap(), fams());
    assert_eq!(count(&out, "all_to_all_start"), 0, "{}", text::print(&out));
}

#[test]
fn the_standard_pipeline_overlaps_the_ep_moe() {
    // the whole hand-sharded MoE at MiniMax widths, every family on
    let s = Ep {
        ranks: 8,
        local: 4,
        c: 6144,
        i: 9216,
        k: 2,
    };
    let g = ep_moe(s, Layout::Experts, d(256), Twist::None);
    let cx = PassContext {
        model: CostModel::new(Target::by_name("H800").unwrap()),
    };
    let p = standard_pipeline(&cfg(), &[], Limits::default()).unwrap();
    let (out, reps) = p.run(&g, &cx, None).unwrap();
    let fir = text::print(&out);
    assert!(count(&out, "all_to_all_start") >= 4, "{fir}");
    assert!(count(&out, "collective_wait") >= 4, "{fir}");
    let last = reps.last().unwrap();
    eprintln!(
        "standard pipeline, H800, EP8 MoE: {:.3} ms → {:.3} ms",
        last.cost_before_s * 1e3,
        last.cost_after_s * 1e3
    );
}
