//! One classification of IR ops, shared by the cost model ([`crate::cost`]) and the lowering to a kernel program
//! (`fulgur-codegen`): what is data, what is a view of another value's buffer, what is generated where it is
//! read, and what is a kernel of which kind. The cost model charges exactly the kernels this says there are, so it
//! never promises a fusion the code generators cannot deliver.

use fulgur_ir::op::FusedBody;
use fulgur_ir::{Composite as C, Op};
use serde::{Deserialize, Serialize};

/// What a node is to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum NodeClass {
    /// An input, a parameter or a constant: data, not work.
    Leaf,
    /// A view of its input's buffer: `reshape` (a new shape over the same elements), `broadcast` (stride 0 on
    /// the broadcast axes), `slice` (an offset and the input's strides). Free: a consumer reads it in place.
    View,
    /// Generated from its shape alone (`full`, `iota`): free, filled where it is read.
    Generated,
    /// Orders work on two streams without doing any (`collective_wait`).
    Sync,
    /// A kernel launch of this kind.
    Kernel(KernelKind),
}

/// The kinds of kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum KernelKind {
    /// Elementwise over its output: unary, binary, compare, select, cast, or a fused body of those (with views
    /// and scalar constants).
    Elementwise,
    /// A reduction (`reduce_*`, `cumsum`, `softmax`, `log_softmax`, `rms_norm`), or a fused body holding one
    /// with its elementwise prologue and epilogue.
    Reduction,
    /// A matmul, or a fused body holding one matmul and its elementwise epilogue.
    Gemm,
    /// A layout copy: `permute`, `concat`.
    Copy,
    /// Indexing: `gather`, `scatter_add`, `one_hot`, `topk`.
    Index,
    /// One of the optimizer's composite kernels: `lightning_attention`, `lightning_layer`,
    /// `flash_attention[_rope]`, `moe_router`, `moe_dispatch`, `grouped_matmul`, `moe_combine`, and the backward
    /// composites `flash_attention_grad`, `grouped_matmul_wgrad`.
    Composite,
    /// A collective: `all_to_all`, `all_to_all_start` (on the communication stream).
    Collective,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Elementwise => "elementwise",
            KernelKind::Reduction => "reduction",
            KernelKind::Gemm => "gemm",
            KernelKind::Copy => "copy",
            KernelKind::Index => "index",
            KernelKind::Composite => "composite",
            KernelKind::Collective => "collective",
        }
    }
}

/// The class of `op`.
pub fn classify(op: &Op) -> NodeClass {
    use KernelKind::*;
    NodeClass::Kernel(match op {
        Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } => return NodeClass::Leaf,
        Op::Reshape { .. } | Op::Broadcast { .. } | Op::Slice { .. } => return NodeClass::View,
        Op::Full { .. } | Op::Iota { .. } => return NodeClass::Generated,
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. } => Elementwise,
        Op::MatMul => Gemm,
        Op::Reduce { .. } | Op::CumSum { .. } => Reduction,
        Op::Permute { .. } | Op::Concat { .. } => Copy,
        Op::Gather { .. } | Op::ScatterAdd { .. } | Op::OneHot { .. } | Op::TopK { .. } => Index,
        Op::Composite(c) => match c {
            C::Softmax { .. } | C::LogSoftmax { .. } | C::RmsNorm { .. } => Reduction,
            C::Fused { body } => fused_kind(body),
            C::CollectiveWait => return NodeClass::Sync,
            // the wrapped op, once per slice of the leading axis
            C::PerRank { op } => return classify(op),
            // one rank's part of a collective: communication
            C::OnRank { .. } => Collective,
            // a rank keeping its own chunk: a local copy, no communication
            C::ShardSlice { .. } => Copy,
            C::AllToAll { .. }
            | C::AllToAllStart { .. }
            | C::AllReduce { .. }
            | C::AllGather { .. }
            | C::ReduceScatter { .. }
            | C::SendRecv { .. }
            | C::AllToAllDispatch { .. }
            | C::AllToAllCombine { .. } => Collective,
            C::LightningAttention { .. }
            | C::LightningLayer { .. }
            | C::FlashAttention { .. }
            | C::FlashAttentionLse { .. }
            | C::FlashAttentionRope { .. }
            | C::MoeRouter { .. }
            | C::MoeDispatch { .. }
            | C::GroupedMatmul { .. }
            | C::MoeCombine
            | C::FlashAttentionGrad { .. }
            | C::GroupedMatmulWgrad => Composite,
        },
    })
}

/// The kind of a fused kernel, from its body: a GEMM with its epilogue when it holds a matmul, a reduction
/// with its prologue and epilogue when it holds a reduction-class op, else elementwise.
pub fn fused_kind(body: &FusedBody) -> KernelKind {
    let (mut mm, mut red) = (false, false);
    for (_, n) in body.graph().nodes() {
        match classify(&n.op) {
            NodeClass::Kernel(KernelKind::Gemm) => mm = true,
            NodeClass::Kernel(KernelKind::Reduction) => red = true,
            _ => {}
        }
    }
    if mm {
        KernelKind::Gemm
    } else if red {
        KernelKind::Reduction
    } else {
        KernelKind::Elementwise
    }
}
