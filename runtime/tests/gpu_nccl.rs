//! The NCCL transport on the GPU, as far as one GPU allows: a job of one rank whose every collective
//! (`all_reduce`, `all_gather`, `reduce_scatter`, `all_to_all`, `send_recv`, on meshes of one and two axes)
//! goes through a real NCCL communicator and equals the simulated transport's result. The run on two GPUs is
//! issue 12's.
//!
//! Without a GPU each test says why and passes; with `FULGUR_REQUIRE_GPU=1` (set by gpu-pack's runner) a
//! missing GPU fails it.
#![cfg(feature = "cuda")]
use fulgur_ir::{Composite, DType, Op, Precision, Tensor, Transport};
use fulgur_runtime::cuda::device_info;
use fulgur_runtime::nccl::NcclTransport;
use fulgur_runtime::ranks::SimTransport;
use std::time::Duration;

fn gpu() -> bool {
    match device_info() {
        Ok(d) => {
            eprintln!("GPU: {} ({}, {} SMs)", d.name, d.arch(), d.multiprocessors);
            true
        }
        Err(why) => {
            assert!(
                !std::env::var("FULGUR_REQUIRE_GPU").is_ok_and(|v| v == "1"),
                "FULGUR_REQUIRE_GPU=1 but no GPU: {why}"
            );
            eprintln!("skipped: no GPU ({why})");
            false
        }
    }
}

#[test]
fn gpu_nccl_single_rank_collectives_equal_the_simulated_transport() {
    if !gpu() {
        return;
    }
    let x = Tensor::from_f64(
        DType::F32,
        vec![2, 4, 3],
        (0..24).map(|i| (i as f64 * 0.37).sin()).collect(),
    );
    for mesh in [vec![1usize], vec![1, 1]] {
        let nccl = NcclTransport::single(&mesh, 0).unwrap();
        let sim = SimTransport::new(1, Precision::F64, Duration::from_secs(10));
        let over = mesh.len() - 1;
        let ops = [
            Composite::AllReduce {
                mesh: mesh.clone(),
                over,
            },
            Composite::AllGather {
                axis: 2,
                mesh: mesh.clone(),
                over,
            },
            Composite::ReduceScatter {
                axis: -1,
                mesh: mesh.clone(),
                over,
            },
            Composite::AllToAll {
                axis: 1,
                mesh: mesh.clone(),
                over,
            },
            Composite::SendRecv {
                shift: 1,
                mesh: mesh.clone(),
                over,
            },
        ];
        for c in ops {
            let op = Op::Composite(c);
            let got = nccl.collective(&op, 0, &[&x]).unwrap();
            let want = sim.collective(&op, 0, &[&x]).unwrap();
            assert_eq!(got[0].shape, want[0].shape, "{} on {mesh:?}", op.name());
            assert_eq!(got[0].to_f64(), want[0].to_f64(), "{} on {mesh:?}", op.name());
            println!("{} on {mesh:?}: equal", op.name());
        }
        let e = nccl.collective(
            &Op::Composite(Composite::AllReduce {
                mesh: vec![1, 1, 1],
                over: 0,
            }),
            0,
            &[&x],
        );
        assert!(
            e.unwrap_err().contains("is not this transport's"),
            "a mesh of another shape is refused"
        );
    }
    let e = NcclTransport::single(&[2], 0).err().unwrap();
    assert_eq!(e, "a single-rank transport on the mesh [2] of more ranks");
}
