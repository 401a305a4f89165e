//! `fulgur stats --config CONFIG.json [--seq-len N] [--json]`: model statistics from a config alone.

use crate::cli::files::write_stdout;
use anyhow::Result;
use fulgur_models::stats::stats;
use fulgur_models::MiniMaxConfig;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A MiniMax config (transformers' `MiniMaxConfig` JSON or MiniMax's original format).
    #[arg(long)]
    pub config: PathBuf,
    /// Sequence length in tokens for the FLOPs per token.
    #[arg(long, value_name = "TOKENS", default_value_t = 4096)]
    pub seq_len: usize,
    /// Print JSON (keys `total_params` and `active_params` at the top level).
    #[arg(long)]
    pub json: bool,
}

fn billions(x: u64) -> String {
    format!("{:.2}B", x as f64 / 1e9)
}

pub(crate) fn bytes(x: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = x as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", units[u])
}

pub fn run(args: Args) -> Result<()> {
    let cfg = MiniMaxConfig::from_file(&args.config)?;
    let s = stats(&cfg, args.seq_len).map_err(|o| anyhow::anyhow!("{}: {}", args.config.display(), o.message))?;
    if args.json {
        let mut text = serde_json::to_string_pretty(&s)?;
        text.push('\n');
        write_stdout(&text)?;
        for w in crate::cli::files::config_warnings(&args.config, &cfg) {
            eprintln!("warning: {w}");
        }
        return Ok(());
    }
    let mut o = String::new();
    let _ = writeln!(o, "config: {}", args.config.display());
    let _ = writeln!(
        o,
        "layers: {} ({} lightning, {} softmax), hidden {}, heads {}x{} (KV heads {}), experts {} top-{} width {}",
        cfg.num_hidden_layers,
        s.num_lightning_layers,
        s.num_softmax_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.head_dim,
        cfg.num_key_value_heads,
        cfg.num_local_experts,
        cfg.num_experts_per_tok,
        cfg.intermediate_size
    );
    let _ = writeln!(
        o,
        "total parameters:   {:>16} ({})",
        s.total_params,
        billions(s.total_params)
    );
    let _ = writeln!(
        o,
        "active parameters:  {:>16} ({}) per token, embeddings and lm_head excluded ({} with them)",
        s.active_params,
        billions(s.active_params),
        billions(s.active_params_with_embeddings)
    );
    let _ = writeln!(o, "{:<22} {:>16} {:>16}", "component", "params", "active");
    for c in &s.components {
        let _ = writeln!(o, "  {:<20} {:>16} {:>16}", c.name, c.params, c.active);
    }
    let _ = writeln!(
        o,
        "forward FLOPs/token at length {}: {:.4e} ({:.2} GFLOP)",
        s.seq_len,
        s.forward_flops_per_token,
        s.forward_flops_per_token / 1e9
    );
    let _ = writeln!(o, "bf16 weights: {}", bytes(s.bf16_weight_bytes));
    let _ = writeln!(
        o,
        "lightning state per sequence (f32): {}",
        bytes(s.lightning_state_bytes_per_seq)
    );
    let _ = writeln!(o, "KV cache per token (bf16): {}", bytes(s.kv_cache_bytes_per_token));
    write_stdout(&o)?;
    for w in crate::cli::files::config_warnings(&args.config, &cfg) {
        eprintln!("warning: {w}");
    }
    Ok(())
}
