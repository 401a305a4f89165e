//! `fulgur plan CONFIG --cluster CLUSTER.json --mode train|infer --seq N --batch B [--json] [--why]`: the
//! parallelism plan search (`fulgur::plan`, `docs/parallelism.md` §6).

use crate::cli::files::write_stdout;
use anyhow::{anyhow, Result};
use fulgur::plan::{report, search, Cluster, Mode};
use fulgur_models::MiniMaxConfig;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A MiniMax config JSON, or a checkpoint directory (its config.json).
    pub config: PathBuf,
    /// The cluster file: GPUs per node, nodes, GPU kind, memory, intra- and inter-node links (`clusters/`).
    #[arg(long)]
    pub cluster: PathBuf,
    /// What to plan: a training step, or inference (prefill and decode).
    #[arg(long, value_enum, default_value_t = ModeArg::Train)]
    pub mode: ModeArg,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq: usize,
    /// Sequences per step (training) or in flight (inference).
    #[arg(long)]
    pub batch: usize,
    /// Print the search as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also print the fastest alternatives, the smallest candidates rejected for memory and the degrees refused.
    #[arg(long)]
    pub why: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Train,
    Infer,
}

pub fn run(args: Args) -> Result<()> {
    let path = if args.config.is_dir() {
        args.config.join("config.json")
    } else {
        args.config.clone()
    };
    let cfg = MiniMaxConfig::from_file(&path)?;
    let cluster = Cluster::from_file(&args.cluster).map_err(|e| anyhow!(e))?;
    if args.seq == 0 || args.batch == 0 {
        return Err(anyhow!("--seq and --batch must be at least 1"));
    }
    let mode = match args.mode {
        ModeArg::Train => Mode::Train,
        ModeArg::Infer => Mode::Infer,
    };
    let s = search(&cfg, &cluster, mode, args.seq, args.batch).map_err(|e| anyhow!(e))?;
    if args.json {
        let mut text = serde_json::to_string_pretty(&s)?;
        text.push('\n');
        write_stdout(&text)?;
    } else {
        write_stdout(&report(&s, args.why))?;
    }
    if s.best.is_none() {
        let closest = s
            .too_big
            .first()
            .map(|e| {
                format!(
                    "; the smallest ({}) {}",
                    e.parallel,
                    e.rejected.clone().unwrap_or_default()
                )
            })
            .unwrap_or_default();
        return Err(anyhow!(
            "no plan fits {} GPUs of {:.0} GiB ({} candidates{closest})",
            s.gpus,
            cluster.memory_gib,
            s.candidates
        ));
    }
    Ok(())
}
