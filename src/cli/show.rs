//! `fulgur show FILE --format fir|json|dot [--out PATH]`: print a graph in another form.

use crate::cli::files::{check_output, load_graph, write_stdout, InputFile};
use anyhow::Result;
use fulgur_ir::{dot, json, tensor::write_atomic, text};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Canonical `.fir` text.
    Fir,
    /// JSON (`fulgur_ir::json`); `fulgur` reads it back from a file named `*.json`.
    Json,
    /// Graphviz DOT.
    Dot,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The graph: `.fir` text, or JSON when the name ends in `.json`.
    pub file: PathBuf,
    /// Output form.
    #[arg(long, short, value_enum, default_value_t = Format::Fir)]
    pub format: Format,
    /// Write here (atomically) instead of to stdout.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(out) = &args.out {
        check_output(out, &[InputFile::new("the graph file", &args.file)])?;
    }
    let g = load_graph(&args.file)?;
    let rendered = match args.format {
        Format::Fir => text::print(&g),
        Format::Json => {
            let mut s = json::to_json(&g);
            if !s.ends_with('\n') {
                s.push('\n');
            }
            s
        }
        Format::Dot => dot::to_dot(&g),
    };
    match &args.out {
        Some(out) => {
            write_atomic(out, rendered.as_bytes())?;
            tracing::info!(path = %out.display(), format = ?args.format, "wrote graph");
            Ok(())
        }
        None => write_stdout(&rendered),
    }
}
