//! The subcommands of `fulgur`, one module each, and what they share: argument parsing, error reporting,
//! logging ([`files`] holds graph loading and output-path checks).
//!
//! A new subcommand is a new module with an `Args` struct (clap derive) and `run(Args) -> anyhow::Result<()>`,
//! plus one variant in [`Command`] and one arm in [`run`].

pub mod artifact;
pub mod bench;
pub mod check;
pub mod eval;
pub mod files;
pub mod inspect;
pub mod launch;
pub mod model;
pub mod plan;
pub mod ranks;
pub mod show;
pub mod stats;
pub mod train;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Fulgur: a dataflow-graph compiler for GPU clusters.
#[derive(Debug, Parser)]
#[command(name = "fulgur", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse and verify a graph (`.fir` or `.json`) and print a summary.
    Check(check::Args),
    /// Print a graph as `.fir` text, JSON or Graphviz DOT.
    Show(show::Args),
    /// Run a graph on the reference interpreter: safetensors in, safetensors out.
    Eval(eval::Args),
    /// Run a MiniMax-01 checkpoint's forward pass: logits, loss (labels = the tokens), hidden states.
    EvalModel(model::EvalArgs),
    /// Greedy generation from a MiniMax-01 checkpoint, decoding with carried states.
    Generate(model::GenerateArgs),
    /// Parameter counts, FLOPs and memory of a MiniMax-01 config.
    Stats(stats::Args),
    /// Run the optimizer on a model or graph and report what every pass and rule did.
    Inspect(inspect::Args),
    /// Time a MiniMax-01 forward pass at each optimization level: kernels, compile time, forward time,
    /// tokens/s, memory, top kernels.
    Bench(bench::Args),
    /// Compile a model or graph into an artifact directory: kernel program, buffer plan, optimized graph,
    /// LLVM IR per kernel, and a manifest with the hashes of them all.
    Compile(artifact::CompileArgs),
    /// Run a compiled artifact (JIT-compiled at load): weights and inputs in, outputs out.
    Run(artifact::RunArgs),
    /// Start N local ranks of a command with the launcher variables torchrun sets (RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR, MASTER_PORT); fail naming the ranks that failed.
    Launch(launch::Args),
    /// Search the parallelism plan of a MiniMax-01 config on a cluster: degrees, micro-batches, recompute;
    /// step time, tokens/s, MFU and memory per GPU.
    Plan(plan::Args),
    /// Train a MiniMax-01 model with AdamW: from a config (random weights) or a checkpoint, on text or
    /// pre-tokenized batches, writing a JSON-lines log and transformers checkpoints.
    Train(train::Args),
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check(a) => check::run(a),
        Command::Show(a) => show::run(a),
        Command::Eval(a) => eval::run(a),
        Command::EvalModel(a) => model::eval_model(a),
        Command::Generate(a) => model::generate(a),
        Command::Stats(a) => stats::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Compile(a) => artifact::compile(a),
        Command::Run(a) => artifact::run(a),
        Command::Train(a) => train::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Launch(a) => launch::run(a),
    }
}

/// Parses the command line. `--help` and `--version` print and end with success; a usage error prints one
/// line `error: ...` and ends with status 2.
pub fn parse_args() -> Result<Cli, ExitCode> {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            use clap::CommandFactory;
            let names: Vec<String> = Cli::command()
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .collect();
            eprintln!(
                "error: no command given: one of {} (see `fulgur --help`)",
                names.join(", ")
            );
            Err(ExitCode::from(2))
        }
        Err(e) => {
            // clap's first paragraph is the cause (continued on indented lines); usage and tips follow
            let rendered = e.render().to_string();
            let paragraph: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty())
                .collect();
            let cause = paragraph.join(" ");
            let cause = cause.strip_prefix("error:").unwrap_or(&cause).trim();
            eprintln!("error: {cause} (see `fulgur --help`)");
            Err(ExitCode::from(2))
        }
    }
}

/// Prints an error as one line, `error: cause: cause of cause ...`.
pub fn report_error(e: &anyhow::Error) {
    use std::io::Write;
    let msg = format!("{e:#}");
    // one write of the whole line: `eprintln!` writes its pieces apart, and the ranks of a launched job share
    // one stderr, where pieces of two ranks' lines interleaved ("error: error: rank 0: ...")
    let line = format!("error: {}\n", one_line(&msg));
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Collapses line breaks so that a message stays on one line.
pub fn one_line(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Makes a panic (a bug, never a user error) print one `error:` line like every other failure.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error: {}{at} (this is a bug in fulgur)",
            one_line(&msg)
        );
    }));
}

/// Logs through `tracing` to stderr, filtered by `RUST_LOG` (default `warn`).
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
