//! What the GPU test crates share: whether a GPU is here (each test without one says why and passes; with
//! `FULGUR_REQUIRE_GPU=1`, set by gpu-pack's runner, a missing GPU fails it).
#![cfg(feature = "cuda")]

use fulgur_runtime::cuda::device_info;

/// Whether a GPU is here; panics when one is required and absent.
pub fn gpu() -> bool {
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
