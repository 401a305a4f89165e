//! Where the project's reference fixtures are (checkpoints and outputs made with Hugging Face transformers):
//! the folder named by `FULGUR_FIXTURES`, else `shared/fixtures` beside the repository. Tests, benches and
//! examples use this so that every one of them honours the same override.

use std::path::PathBuf;

/// The fixtures folder.
pub fn dir() -> PathBuf {
    match std::env::var_os("FULGUR_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures")),
    }
}

/// The `tiny-a` checkpoint (config, weights, reference outputs).
pub fn tiny_a() -> PathBuf {
    dir().join("tiny-a")
}
