//! The hoist (on by default, `FULGUR_HOIST=0` off): a warp's row loop computes the integer divisions that do not
//! change from one of its iterations to the next before it. In a binary of its own, since the variable is read
//! at emission and set here for the whole process.
mod common;
use common::source_of;
use fulgur_ir::{DType, Dim, Graph};

/// A head-major `[B, 16, T, 128]` read token-major: the row (a token) divides by the run-time `T` (a parameter)
/// for its batch and position. With the hoist (the default), those divisions come before the lanes' loop and none
/// is left in it; the divisions by the literal head dim, which move with the lane's column, stay in the loop.
/// Turned off, the loop divides by `T`.
#[test]
fn a_row_loop_divides_by_a_run_time_size_once_before_it() {
    let mut g = Graph::new("heads");
    let x = g
        .input(
            "x",
            DType::F32,
            vec![Dim::sym("B"), Dim::from(16), Dim::sym("T"), Dim::from(128)],
        )
        .unwrap();
    let y = g.exp(x).unwrap();
    let p = g.permute(y, &[0, 2, 1, 3]).unwrap();
    let r = g
        .reshape(p, vec![Dim::sym("B"), Dim::sym("T"), Dim::from(2048)])
        .unwrap();
    g.add_output("o", r).unwrap();
    let run_time = |text: &str| {
        text.lines()
            .filter(|l| l.contains(" / p") || l.contains(" % p"))
            .count()
    };
    let lane = "+ fulgur_lane;";
    let src = source_of(&g, "reshape");
    let (before, inside) = src.split_at(src.find(lane).expect("a lanes' loop"));
    assert!(
        run_time(before) >= 2,
        "the row's batch and position before the loop: {src}"
    );
    assert_eq!(run_time(inside), 0, "no division by T in the loop: {src}");
    assert!(inside.contains("/ 128LL") || inside.contains("% 128LL"), "{src}");
    std::env::set_var("FULGUR_HOIST", "0");
    let plain = source_of(&g, "reshape");
    let body = &plain[plain.find(lane).expect("a lanes' loop")..];
    assert!(run_time(body) > 0, "without the hoist the loop divides by T: {plain}");
}
