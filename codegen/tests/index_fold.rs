//! The index arithmetic the loop kernels fold: a flat index split into a quotient and a remainder and put back
//! together through a contiguous view's strides is the index itself (times the innermost stride), and a
//! dimension's integer factor is kept visible so a symbolic stride (`T*2048`) takes part. Checked by value over
//! random operands, signs and symbolic sizes included, against the unfolded arithmetic.
use fulgur_codegen::loops::{Expr, LoopKernel};
use fulgur_ir::{BinaryOp, Dim};
use rand::{Rng, SeedableRng};

/// The run-time parameters `p0 .. p{n-1}` as expressions of `lk`'s pool.
fn params(lk: &mut LoopKernel, n: u32) -> Vec<fulgur_codegen::loops::E> {
    (0..n).map(|i| lk.pool.add(Expr::Param(i))).collect()
}

/// `(x / d) * m + (x % d) * s` evaluated without folding (C's truncating division, as the kernels use).
fn by_hand(x: i64, d: i64, m: i64, s: i64) -> i64 {
    (x / d) * m + (x % d) * s
}

#[test]
fn a_split_index_put_back_together_folds_to_the_index() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..500 {
        let mut lk = LoopKernel::new("fold");
        // x, d and s as run-time parameters (p0, p1, p2); the stride `d * s` as the pool's product
        let [x, d, s] = params(&mut lk, 3)[..] else {
            unreachable!()
        };
        let q = lk.pool.div(x, d);
        let r = lk.pool.rem(x, d);
        let m = lk.pool.mul(d, s);
        let qm = lk.pool.mul(q, m);
        let rs = lk.pool.mul(r, s);
        let e = lk.pool.addi(qm, rs);
        assert_eq!(*lk.pool.get(e), Expr::Bin(BinaryOp::Mul, x, s), "folded to x * s");
        // the remainder first, the quotient's factors the other way round: the same
        let mq = lk.pool.mul(m, q);
        let e2 = lk.pool.addi(rs, mq);
        assert_eq!(e2, e);
        // stride d: x itself
        let qd = lk.pool.mul(q, d);
        let e3 = lk.pool.addi(qd, r);
        assert_eq!(e3, x);
        let xv = rng.gen_range(-1_000_000i64..1_000_000);
        let dv = loop {
            let v = rng.gen_range(-300i64..300);
            if v != 0 {
                break v;
            }
        };
        let sv = rng.gen_range(-50i64..50);
        let ps = [xv, dv, sv];
        assert_eq!(lk.pool.eval(e, &ps), Some(by_hand(xv, dv, dv * sv, sv)), "{ps:?}");
        assert_eq!(lk.pool.eval(e3, &ps), Some(by_hand(xv, dv, dv, 1)), "{ps:?}");
    }
}

#[test]
fn a_stride_that_is_not_the_product_stays_as_written() {
    let mut lk = LoopKernel::new("fold");
    let [x, d, s, t] = params(&mut lk, 4)[..] else {
        unreachable!()
    };
    let q = lk.pool.div(x, d);
    let r = lk.pool.rem(x, d);
    // (x / d) * t + (x % d) * s, t unrelated to d * s
    let qt = lk.pool.mul(q, t);
    let rs = lk.pool.mul(r, s);
    let e = lk.pool.addi(qt, rs);
    assert_eq!(*lk.pool.get(e), Expr::Bin(BinaryOp::Add, qt, rs));
    // a remainder by another divisor
    let r2 = lk.pool.rem(x, t);
    let qd = lk.pool.mul(q, d);
    let e = lk.pool.addi(qd, r2);
    assert_eq!(*lk.pool.get(e), Expr::Bin(BinaryOp::Add, qd, r2));
    // constants: 4096 is 2048 · 2, 4097 is not
    let k = lk.pool.add(Expr::Var(0));
    let c2048 = lk.pool.i(2048);
    let q = lk.pool.div(k, c2048);
    let r = lk.pool.rem(k, c2048);
    let two = lk.pool.i(2);
    let r2 = lk.pool.mul(r, two);
    for (m, folds) in [(4096, true), (4097, false)] {
        let m = lk.pool.i(m);
        let qm = lk.pool.mul(q, m);
        let e = lk.pool.addi(qm, r2);
        assert_eq!(*lk.pool.get(e) == Expr::Bin(BinaryOp::Mul, k, two), folds);
    }
}

/// A symbolic size with an integer factor is that factor times a parameter, so the stride of a contiguous
/// `[B, T, 2048]` view's first axis, `T*2048`, is the pool's `T · 2048`; a size without one stays a parameter.
#[test]
fn a_dimension_keeps_its_integer_factor_visible() {
    let mut lk = LoopKernel::new("dims");
    let t = Dim::sym("T");
    let pt = lk.dim(&t);
    let c = lk.pool.i(2048);
    let want = lk.pool.mul(pt, c);
    assert_eq!(lk.dim(&(t.clone() * Dim::from(2048))), want);
    assert_eq!(lk.params, vec![t.clone()]);
    // 2*B*T + 4 = 2 · (B*T + 2)
    let b = Dim::sym("B");
    let d = b.clone() * t.clone() * Dim::from(2) + Dim::from(4);
    let e = lk.dim(&d);
    let inner = b * t + Dim::from(2);
    assert_eq!(lk.params.last(), Some(&inner));
    let (x, y) = match lk.pool.get(e) {
        Expr::Bin(BinaryOp::Mul, x, y) => (*x, *y),
        other => panic!("{other:?}"),
    };
    assert_eq!(lk.pool.get(y), &Expr::I(2));
    assert_eq!(lk.pool.eval(x, &[5, 7 * 3 + 2]), Some(23));
    assert_eq!(Dim::from(0).content(), 0);
    assert_eq!((Dim::sym("T") * Dim::from(-6) + Dim::from(9)).content(), 3);
}

/// Strides that are one factor times another through their integer parts: `(x / 16) * (T · 6144) + (x % 16) *
/// (T · 384)` is `x * (T · 384)`, then `(y / T) * (T · 384) + (y % T) * 384` is `y * 384` (a `[B, T, 16, 384]`
/// view's index from a flat head-major one), checked by value.
#[test]
fn strides_with_integer_factors_fold_through_them() {
    let mut lk = LoopKernel::new("fold");
    let [y, t] = params(&mut lk, 2)[..] else { unreachable!() };
    let (c16, c384, c6144) = (lk.pool.i(16), lk.pool.i(384), lk.pool.i(6144));
    let x = lk.pool.div(y, t);
    let t384 = lk.pool.mul(t, c384);
    let t6144 = lk.pool.mul(t, c6144);
    let q = lk.pool.div(x, c16);
    let r = lk.pool.rem(x, c16);
    let a = lk.pool.mul(q, t6144);
    let b = lk.pool.mul(r, t384);
    let inner = lk.pool.addi(a, b);
    assert_eq!(*lk.pool.get(inner), Expr::Bin(BinaryOp::Mul, x, t384));
    let yr = lk.pool.rem(y, t);
    let c = lk.pool.mul(yr, c384);
    let whole = lk.pool.addi(inner, c);
    assert_eq!(*lk.pool.get(whole), Expr::Bin(BinaryOp::Mul, y, c384));
    for (yv, tv) in [(12345, 7), (999_999, 2048), (5, 1)] {
        let xv = yv / tv;
        let want = (xv / 16) * (tv * 6144) + (xv % 16) * (tv * 384) + (yv % tv) * 384;
        assert_eq!(lk.pool.eval(whole, &[yv, tv]), Some(want));
    }
    // 16 · (T · 384) is not T · 6145
    let t6145 = {
        let c = lk.pool.i(6145);
        lk.pool.mul(t, c)
    };
    let a = lk.pool.mul(q, t6145);
    let e = lk.pool.addi(a, b);
    assert_eq!(*lk.pool.get(e), Expr::Bin(BinaryOp::Add, a, b));
}
