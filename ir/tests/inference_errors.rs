//! Ill-typed graphs: the builder refuses the node with an [`IrError::Node`] whose message names the node id,
//! its name (scoped builds name nodes `scope.op`), the op and the shapes involved. Graph-level mistakes
//! (outputs, duplicate names) are [`IrError::Graph`] errors.

use fulgur_ir::{BinaryOp, ConstData, DType, Dim, Graph, IrError, NodeId, Op, Result, Value};

fn sym(s: &str) -> Dim {
    Dim::sym(s)
}

fn cd(v: &[usize]) -> Vec<Dim> {
    v.iter().map(|&n| Dim::from(n)).collect()
}

/// Asserts `r` is a node error for node `id` with exactly the message `msg`, and that the graph did not grow.
#[track_caller]
fn node_err<T: std::fmt::Debug>(g: &Graph, r: Result<T>, id: usize, msg: &str) {
    let e = r.expect_err("the builder should refuse this node");
    assert!(matches!(e, IrError::Node { id: i, .. } if i == id), "{e:?}");
    assert_eq!(e.to_string(), msg);
    assert_eq!(g.node_count(), id, "a refused node must not be added");
}

/// A graph with the given f32 inputs `a`, `b`, ... (in order).
fn graph_with(inputs: &[(DType, Vec<Dim>)]) -> (Graph, Vec<Value>) {
    let mut g = Graph::new("t");
    let names = ["a", "b", "c", "d"];
    let vs = inputs
        .iter()
        .zip(names)
        .map(|((dt, dims), n)| g.input(n, *dt, dims.clone()).unwrap())
        .collect();
    (g, vs)
}

#[test]
fn matmul_inner_dim_mismatch() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2, 3])), (DType::F32, cd(&[4, 5]))]);
    let r = g.scope("blk", |g| g.matmul(v[0], v[1]));
    node_err(
        &g,
        r,
        2,
        "node %2 \"blk.matmul\" (matmul): `matmul` inner dimensions differ: f32[2, 3] x f32[4, 5] (`3` vs `4`)",
    );
    // symbolic inner dims
    let (mut g, v) = graph_with(&[
        (DType::BF16, vec![sym("B"), sym("T"), sym("D")]),
        (DType::BF16, vec![sym("E"), Dim::from(8)]),
    ]);
    let r = g.matmul(v[0], v[1]);
    node_err(
        &g,
        r,
        2,
        "node %2 (matmul): `matmul` inner dimensions differ: bf16[B, T, D] x bf16[E, 8] (`D` vs `E`)",
    );
}

#[test]
fn matmul_other_errors() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2, 3, 4])), (DType::F32, cd(&[3, 4, 5]))]);
    let r = g.matmul(v[0], v[1]);
    node_err(
        &g,
        r,
        2,
        "node %2 (matmul): `matmul` batch dimensions: shapes [2] and [3] do not broadcast: dimension `2` against \
         `3` (f32[2, 3, 4] x f32[3, 4, 5])",
    );
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[4])), (DType::F32, cd(&[4, 5]))]);
    let r = g.matmul(v[0], v[1]);
    node_err(
        &g,
        r,
        2,
        "node %2 (matmul): `matmul` needs operands of rank >= 2, got f32[4] x f32[4, 5]",
    );
    let (mut g, v) = graph_with(&[(DType::I32, cd(&[2, 4])), (DType::I32, cd(&[4, 5]))]);
    let r = g.matmul(v[0], v[1]);
    node_err(
        &g,
        r,
        2,
        "node %2 (matmul): `matmul` needs float operands, got i32[2, 4] x i32[4, 5]",
    );
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2, 4])), (DType::BF16, cd(&[4, 5]))]);
    let r = g.matmul(v[0], v[1]);
    node_err(
        &g,
        r,
        2,
        "node %2 (matmul): `matmul` needs operands of one dtype, got f32[2, 4], bf16[4, 5]",
    );
}

#[test]
fn add_broadcast_mismatch_symbolic() {
    let (mut g, v) = graph_with(&[
        (DType::F32, vec![sym("B"), Dim::from(4)]),
        (DType::F32, vec![sym("T"), Dim::from(4)]),
    ]);
    let r = g.scope("blk", |g| g.add(v[0], v[1]));
    node_err(
        &g,
        r,
        2,
        "node %2 \"blk.add\" (add): shapes [B, 4] and [T, 4] do not broadcast: dimension `B` against `T`",
    );
    // constants other than 1 do not broadcast either, nor against a symbol
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2, 3])), (DType::F32, vec![sym("N")])]);
    let r = g.mul(v[0], v[1]);
    node_err(
        &g,
        r,
        2,
        "node %2 (mul): shapes [2, 3] and [N] do not broadcast: dimension `3` against `N`",
    );
    let (mut g, v) = graph_with(&[(DType::I64, cd(&[2, 3])), (DType::I64, cd(&[2]))]);
    let r = g.compare(fulgur_ir::CmpOp::Lt, v[0], v[1]);
    node_err(
        &g,
        r,
        2,
        "node %2 (lt): shapes [2, 3] and [2] do not broadcast: dimension `3` against `2`",
    );
}

#[test]
fn dtype_mismatch_in_add() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2])), (DType::I32, cd(&[2]))]);
    let r = g.scope("blk", |g| g.add(v[0], v[1]));
    node_err(
        &g,
        r,
        2,
        "node %2 \"blk.add\" (add): `add` needs operands of one dtype, got f32[2], i32[2]",
    );
    let (mut g, v) = graph_with(&[(DType::Bool, cd(&[2])), (DType::Bool, cd(&[2]))]);
    let r = g.add(v[0], v[1]);
    node_err(
        &g,
        r,
        2,
        "node %2 (add): `add` is not defined on bool operands (bool[2], bool[2])",
    );
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2])), (DType::F16, cd(&[2]))]);
    let r = g.compare(fulgur_ir::CmpOp::Eq, v[0], v[1]);
    node_err(
        &g,
        r,
        2,
        "node %2 (eq): `eq` needs operands of one dtype, got f32[2], f16[2]",
    );
}

#[test]
fn unary_on_wrong_dtype() {
    let (mut g, v) = graph_with(&[(DType::I32, vec![sym("N")])]);
    let r = g.exp(v[0]);
    node_err(&g, r, 1, "node %1 (exp): `exp` is not defined on i32[N]");
    let (mut g, v) = graph_with(&[(DType::Bool, cd(&[2]))]);
    let r = g.neg(v[0]);
    node_err(&g, r, 1, "node %1 (neg): `neg` is not defined on bool[2]");
}

#[test]
fn reshape_element_count_mismatch() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2, 3]))]);
    let r = g.scope("blk", |g| g.reshape(v[0], cd(&[4, 2])));
    node_err(
        &g,
        r,
        1,
        "node %1 \"blk.reshape\" (reshape): cannot reshape f32[2, 3] (6 elements) to [4, 2] (8 elements)",
    );
    let (mut g, v) = graph_with(&[(DType::F32, vec![sym("B"), sym("T")])]);
    let r = g.reshape(v[0], vec![sym("B"), sym("T"), Dim::from(2)]);
    node_err(
        &g,
        r,
        1,
        "node %1 (reshape): cannot reshape f32[B, T] (B*T elements) to [B, T, 2] (2*B*T elements)",
    );
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2, 3]))]);
    let r = g.reshape(v[0], vec![Dim::from(-2), Dim::from(-3)]);
    node_err(&g, r, 1, "node %1 (reshape): negative dimension -2 in shape [-2, -3]");
}

#[test]
fn bad_permute() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2, 3]))]);
    let r = g.scope("blk", |g| g.permute(v[0], &[0, 0]));
    node_err(
        &g,
        r,
        1,
        "node %1 \"blk.permute\" (permute): perm [0, 0] is not a permutation of the 2 axes of f32[2, 3]",
    );
    let r = g.permute(v[0], &[1, 0, 2]);
    node_err(
        &g,
        r,
        1,
        "node %1 (permute): perm [1, 0, 2] is not a permutation of the 2 axes of f32[2, 3]",
    );
    let r = g.permute(v[0], &[2, 0]);
    node_err(
        &g,
        r,
        1,
        "node %1 (permute): perm [2, 0] is not a permutation of the 2 axes of f32[2, 3]",
    );
    let r = g.permute(v[0], &[1]);
    node_err(
        &g,
        r,
        1,
        "node %1 (permute): perm [1] is not a permutation of the 2 axes of f32[2, 3]",
    );
}

#[test]
fn axis_out_of_range() {
    let (mut g, v) = graph_with(&[(DType::F32, vec![sym("B"), Dim::from(3)])]);
    let x = v[0];
    let r = g.scope("blk", |g| g.sum(x, &[2], false));
    node_err(
        &g,
        r,
        1,
        "node %1 \"blk.reduce_sum\" (reduce_sum): axis 2 is out of range for f32[B, 3] (rank 2)",
    );
    let r = g.max(x, &[-3], true);
    node_err(
        &g,
        r,
        1,
        "node %1 (reduce_max): axis -3 is out of range for f32[B, 3] (rank 2)",
    );
    let r = g.sum(x, &[1, -1], true);
    node_err(
        &g,
        r,
        1,
        "node %1 (reduce_sum): axis 1 listed twice in `axes` [1, -1] of f32[B, 3]",
    );
    let r = g.softmax(x, 2);
    node_err(
        &g,
        r,
        1,
        "node %1 (softmax): axis 2 is out of range for f32[B, 3] (rank 2)",
    );
    let r = g.log_softmax(x, -3);
    node_err(
        &g,
        r,
        1,
        "node %1 (log_softmax): axis -3 is out of range for f32[B, 3] (rank 2)",
    );
    let r = g.cumsum(x, 5, false, false);
    node_err(
        &g,
        r,
        1,
        "node %1 (cumsum): axis 5 is out of range for f32[B, 3] (rank 2)",
    );
    let r = g.topk(x, 1, 2);
    node_err(
        &g,
        r,
        1,
        "node %1 (topk): axis 2 is out of range for f32[B, 3] (rank 2)",
    );
    let r = g.slice(x, -3, 0, 1);
    node_err(
        &g,
        r,
        1,
        "node %1 (slice): axis -3 is out of range for f32[B, 3] (rank 2)",
    );
    let r = g.concat(&[x, x], 2);
    node_err(
        &g,
        r,
        1,
        "node %1 (concat): axis 2 is out of range for f32[B, 3] (rank 2)",
    );
    let r = g.iota(DType::I64, vec![sym("B"), Dim::from(3)], 2);
    node_err(
        &g,
        r,
        1,
        "node %1 (iota): axis 2 is out of range for shape [B, 3] (rank 2)",
    );
    let r = g.iota(DType::I64, vec![], 0);
    node_err(&g, r, 1, "node %1 (iota): axis 0 is out of range for shape [] (rank 0)");
    let i = g.input("i", DType::I64, cd(&[2])).unwrap();
    let r = g.gather(x, i, 2);
    node_err(
        &g,
        r,
        2,
        "node %2 (gather): axis 2 is out of range for f32[B, 3] (rank 2)",
    );
    let u = g.input("u", DType::F32, vec![sym("B"), Dim::from(2)]).unwrap();
    let r = g.scatter_add(x, i, u, -3);
    node_err(
        &g,
        r,
        3,
        "node %3 (scatter_add): axis -3 is out of range for f32[B, 3] (rank 2)",
    );
    // scalars have no axes
    let s = g.scalar(1.0, DType::F32).unwrap();
    let r = g.sum(s, &[0], false);
    node_err(
        &g,
        r,
        4,
        "node %4 (reduce_sum): axis 0 is out of range for f32[] (rank 0)",
    );
}

#[test]
fn concat_mismatch() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2, 3])), (DType::F32, cd(&[3, 3]))]);
    let r = g.scope("blk", |g| g.concat(&[v[0], v[1]], 1));
    node_err(
        &g,
        r,
        2,
        "node %2 \"blk.concat\" (concat): `concat` along axis 1 needs equal other dimensions, got f32[2, 3], \
         f32[3, 3]",
    );
    let (mut g, v) = graph_with(&[(DType::F32, vec![sym("B"), Dim::from(3)]), (DType::F32, cd(&[3]))]);
    let r = g.concat(&[v[0], v[1]], -1);
    node_err(
        &g,
        r,
        2,
        "node %2 (concat): `concat` along axis 1 needs equal other dimensions, got f32[B, 3], f32[3]",
    );
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2, 3])), (DType::BF16, cd(&[2, 3]))]);
    let r = g.concat(&[v[0], v[1]], 0);
    node_err(
        &g,
        r,
        2,
        "node %2 (concat): `concat` needs operands of one dtype, got f32[2, 3], bf16[2, 3]",
    );
}

#[test]
fn topk_k_too_large() {
    let (mut g, v) = graph_with(&[(DType::F32, vec![sym("B"), Dim::from(3)])]);
    let r = g.scope("router", |g| g.topk(v[0], 4, -1));
    node_err(
        &g,
        r,
        1,
        "node %1 \"router.topk\" (topk): `topk` k=4 exceeds dimension 3 of f32[B, 3]",
    );
    let (mut g, v) = graph_with(&[(DType::Bool, cd(&[3]))]);
    let r = g.topk(v[0], 1, 0);
    node_err(&g, r, 1, "node %1 (topk): `topk` is not defined on bool[3]");
}

#[test]
fn gather_with_float_indices() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[4, 2])), (DType::F32, cd(&[3]))]);
    let r = g.scope("emb", |g| g.gather(v[0], v[1], 0));
    node_err(
        &g,
        r,
        2,
        "node %2 \"emb.gather\" (gather): `gather` indices must be i32 or i64, got f32[3]",
    );
}

#[test]
fn scatter_add_errors() {
    let (mut g, v) = graph_with(&[
        (DType::F32, cd(&[4, 2])),
        (DType::I64, cd(&[3])),
        (DType::F32, cd(&[2, 2])),
    ]);
    let r = g.scatter_add(v[0], v[1], v[2], 0);
    node_err(
        &g,
        r,
        3,
        "node %3 (scatter_add): `scatter_add` updates must have shape [3, 2] (data f32[4, 2], indices i64[3]), \
         got f32[2, 2]",
    );
    let (mut g, v) = graph_with(&[
        (DType::F32, cd(&[4, 2])),
        (DType::BF16, cd(&[3])),
        (DType::F32, cd(&[3, 2])),
    ]);
    let r = g.scatter_add(v[0], v[1], v[2], 0);
    node_err(
        &g,
        r,
        3,
        "node %3 (scatter_add): `scatter_add` indices must be i32 or i64, got bf16[3]",
    );
    let (mut g, v) = graph_with(&[
        (DType::F32, cd(&[4, 2])),
        (DType::I32, cd(&[3])),
        (DType::BF16, cd(&[3, 2])),
    ]);
    let r = g.scatter_add(v[0], v[1], v[2], 0);
    node_err(
        &g,
        r,
        3,
        "node %3 (scatter_add): `scatter_add` needs numeric data and updates of one dtype, got f32[4, 2] and \
         bf16[3, 2]",
    );
}

#[test]
fn select_with_non_bool_condition() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2])), (DType::F32, cd(&[2])), (DType::F32, cd(&[2]))]);
    let r = g.scope("blk", |g| g.select(v[0], v[1], v[2]));
    node_err(
        &g,
        r,
        3,
        "node %3 \"blk.select\" (select): `select` needs a bool condition, got f32[2]",
    );
    let (mut g, v) = graph_with(&[(DType::Bool, cd(&[2])), (DType::F32, cd(&[2])), (DType::I32, cd(&[2]))]);
    let r = g.select(v[0], v[1], v[2]);
    node_err(
        &g,
        r,
        3,
        "node %3 (select): `select` needs operands of one dtype, got f32[2], i32[2]",
    );
    let (mut g, v) = graph_with(&[(DType::Bool, cd(&[3])), (DType::F32, cd(&[2])), (DType::F32, cd(&[2]))]);
    let r = g.select(v[0], v[1], v[2]);
    node_err(
        &g,
        r,
        3,
        "node %3 (select): shapes [3] and [2] do not broadcast: dimension `3` against `2`",
    );
}

#[test]
fn rms_norm_weight_shape() {
    let (mut g, v) = graph_with(&[(DType::F32, vec![sym("B"), Dim::from(4)]), (DType::F32, cd(&[3]))]);
    let r = g.scope("blk", |g| g.rms_norm(v[0], v[1], 1e-6));
    node_err(
        &g,
        r,
        2,
        "node %2 \"blk.rms_norm\" (rms_norm): `rms_norm` weight must be [last dim of x], got x f32[B, 4] and \
         weight f32[3]",
    );
    let (mut g, v) = graph_with(&[(DType::F32, vec![sym("B"), Dim::from(4)]), (DType::F32, cd(&[1, 4]))]);
    let r = g.rms_norm(v[0], v[1], 1e-6);
    node_err(
        &g,
        r,
        2,
        "node %2 (rms_norm): `rms_norm` weight must be [last dim of x], got x f32[B, 4] and weight f32[1, 4]",
    );
    let (mut g, v) = graph_with(&[(DType::BF16, cd(&[2, 4])), (DType::F32, cd(&[4]))]);
    let r = g.rms_norm(v[0], v[1], 1e-6);
    node_err(
        &g,
        r,
        2,
        "node %2 (rms_norm): `rms_norm` needs float x and weight of one dtype, got bf16[2, 4] and f32[4]",
    );
}

#[test]
fn input_count_wrong() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2])), (DType::F32, cd(&[2]))]);
    let r = g.scope("blk", |g| g.op1(Op::Binary(BinaryOp::Add), &[v[0]]));
    node_err(&g, r, 2, "node %2 \"blk.add\" (add): `add` expects 2 input(s), got 1");
    let r = g.op1(Op::Select, &[v[0], v[1]]);
    node_err(&g, r, 2, "node %2 (select): `select` expects 3 input(s), got 2");
    let r = g.op1(Op::MatMul, &[v[0], v[1], v[0]]);
    node_err(&g, r, 2, "node %2 (matmul): `matmul` expects 2 input(s), got 3");
    let r = g.concat(&[], 0);
    node_err(&g, r, 2, "node %2 (concat): `concat` expects at least one input");
    let r = g.op1(
        Op::Full {
            value: 0.0,
            dtype: DType::F32,
            shape: cd(&[1]).into(),
        },
        &[v[0]],
    );
    node_err(&g, r, 2, "node %2 (full): `full` expects 0 input(s), got 1");
    let r = g.op1(Op::Composite(fulgur_ir::Composite::RmsNorm { eps: 1e-6 }), &[v[0]]);
    node_err(&g, r, 2, "node %2 (rms_norm): `rms_norm` expects 2 input(s), got 1");
}

#[test]
fn inputs_that_do_not_exist() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2]))]);
    let r = g.add(v[0], Value::new(NodeId::new(7), 0));
    node_err(&g, r, 1, "node %1 (add): input %7 does not exist");
    let (t, _) = g.topk(v[0], 1, 0).unwrap();
    let r = g.neg(Value::new(t.node, 2));
    node_err(
        &g,
        r,
        2,
        "node %2 (neg): input %1#2 does not exist: that node has 2 output(s)",
    );
}

#[test]
fn other_typing_errors() {
    let (mut g, v) = graph_with(&[(DType::I32, cd(&[2, 3])), (DType::F32, vec![sym("N")])]);
    let (i, x) = (v[0], v[1]);
    let r = g.mean(i, &[0], false);
    node_err(
        &g,
        r,
        2,
        "node %2 (reduce_mean): `reduce_mean` is not defined on i32[2, 3]",
    );
    let r = g.broadcast(x, vec![sym("M")]);
    node_err(
        &g,
        r,
        2,
        "node %2 (broadcast): cannot broadcast f32[N] to [M]: dimension `N` against `M`",
    );
    let r = g.broadcast(i, cd(&[3]));
    node_err(
        &g,
        r,
        2,
        "node %2 (broadcast): cannot broadcast i32[2, 3] to lower rank [3]",
    );
    let r = g.slice(x, 0, 2, 1);
    node_err(&g, r, 2, "node %2 (slice): slice [2, 1) of f32[N] has negative length");
    let r = g.slice(i, 1, 0, 4);
    node_err(
        &g,
        r,
        2,
        "node %2 (slice): slice end `4` exceeds dimension `3` of i32[2, 3]",
    );
    let r = g.slice(i, 1, -1, 2);
    node_err(&g, r, 2, "node %2 (slice): slice start -1 of i32[2, 3] is negative");
    let r = g.one_hot(x, 3, DType::F32);
    node_err(
        &g,
        r,
        2,
        "node %2 (one_hot): `one_hot` indices must be i32 or i64, got f32[N]",
    );
    let b = g.cast(i, DType::Bool).unwrap();
    let r = g.cumsum(b, 0, false, false);
    node_err(&g, r, 3, "node %3 (cumsum): `cumsum` is not defined on bool[2, 3]");
    let r = g.softmax(i, -1);
    node_err(
        &g,
        r,
        3,
        "node %3 (softmax): `softmax` needs a float tensor, got i32[2, 3]",
    );
    let r = g.constant(DType::F32, vec![2, 2], ConstData::Float(vec![1.0, 2.0, 3.0]));
    node_err(
        &g,
        r,
        3,
        "node %3 (constant): constant of shape [2, 2] needs 4 values, got 3",
    );
    let r = g.constant(DType::I32, vec![1], ConstData::Float(vec![1.0]));
    node_err(&g, r, 3, "node %3 (constant): constant values do not match dtype i32");
    let r = g.iota(DType::Bool, cd(&[3]), 0);
    node_err(&g, r, 3, "node %3 (iota): iota needs a numeric dtype, got bool");
    let r = g.full(0.0, DType::F32, vec![Dim::from(-1)]);
    node_err(&g, r, 3, "node %3 (full): negative dimension -1 in shape [-1]");
    let r = g.input("neg", DType::F32, vec![Dim::from(-4)]);
    node_err(&g, r, 3, "node %3 (input): negative dimension -4 in shape [-4]");
}

#[test]
fn refused_node_does_not_use_up_an_id() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2])), (DType::I32, cd(&[2]))]);
    assert!(g.add(v[0], v[1]).is_err());
    let y = g.add(v[0], v[0]).unwrap();
    assert_eq!(y.node.index(), 2);
    g.verify().unwrap();
}

#[test]
fn add_output_on_a_missing_value() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2]))]);
    let e = g.add_output("y", Value::new(NodeId::new(5), 0)).unwrap_err();
    assert!(matches!(e, IrError::Graph(_)), "{e:?}");
    assert_eq!(e.to_string(), "output `y` refers to %5#0, which does not exist");
    let e = g.add_output("y", Value::new(v[0].node, 1)).unwrap_err();
    assert_eq!(e.to_string(), "output `y` refers to %0#1, which does not exist");
    assert!(g.outputs().is_empty());
}

#[test]
fn duplicate_output_name() {
    let (mut g, v) = graph_with(&[(DType::F32, cd(&[2])), (DType::F32, cd(&[2]))]);
    g.add_output("y", v[0]).unwrap();
    let e = g.add_output("y", v[1]).unwrap_err();
    assert!(matches!(e, IrError::Graph(_)), "{e:?}");
    assert_eq!(e.to_string(), "output `y` is declared twice");
    assert_eq!(g.outputs().len(), 1);
    // one value under two names is fine
    g.add_output("z", v[0]).unwrap();
}

#[test]
fn duplicate_input_names() {
    let mut g = Graph::new("t");
    g.input("x", DType::F32, cd(&[2])).unwrap();
    let e = g.input("x", DType::F32, cd(&[2])).unwrap_err();
    assert!(matches!(e, IrError::Node { id: 1, .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "node %1 (input): an input or parameter named `x` already exists"
    );
    // parameters share the namespace
    let e = g.param("x", DType::BF16, cd(&[3])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node %1 (param): an input or parameter named `x` already exists"
    );
    g.param("w", DType::F32, cd(&[2])).unwrap();
    let e = g.input("w", DType::F32, cd(&[2])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node %2 (input): an input or parameter named `w` already exists"
    );
    assert_eq!(g.node_count(), 2);
}
