//! # fulgur-models
//!
//! MiniMax-01 for Fulgur: config parsing ([`config`]: transformers' `MiniMaxConfig` and MiniMax's original
//! format), graph builders in the definitional form ([`minimax`]: forward, loss, decode step), checkpoint
//! loading with name mapping ([`checkpoint`]), and model statistics ([`stats`]). The full-size and small
//! configs ship in `models/configs/`.
//!
//! This crate builds IR graphs; it knows nothing of passes or devices.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fixtures;
pub mod minimax;
pub mod random;
pub mod stats;

pub use config::{Flavor, LayerType, MiniMaxConfig};
pub use error::ModelError;
pub use minimax::{
    decode_graph, decode_graph_with, decode_stage_graph, forward_graph, stage_graph, ForwardOptions, STAGE_HIDDEN_IN,
    STAGE_HIDDEN_OUT,
};
pub use random::{random_tokens, random_weights};
