//! `fulgur inspect CKPT_DIR_OR_CONFIG_OR_FIR [--passes] [--json] [--dump DIR] [--disable-rules FAMILY,...]
//! [--target H100|H200|H800|H20|A100|CPU] [--ceilings FILE] [--bind SYM=N,...]`: run the optimizer and report
//! what every pass did.

use crate::cli::files::{check_not_input, checkpoint_files, load_graph, write_stdout, InputFile};
use anyhow::{anyhow, bail, Context, Result};
use fulgur_codegen::compile::{compile, CompileOptions};
use fulgur_ir::Graph;
use fulgur_models::{forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur_passes::eqsat::TemplateReport;
use fulgur_passes::{CostModel, Limits, PassReport};
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A checkpoint directory (its config.json is used), a MiniMax config JSON, or a `.fir` graph.
    pub input: PathBuf,
    /// Show per-iteration e-graph sizes and per-rule matches and applications.
    #[arg(long)]
    pub passes: bool,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the graph after each pass as canonical `.fir` and `.dot` into this folder.
    #[arg(long, value_name = "DIR")]
    pub dump: Option<PathBuf>,
    /// Rule families to leave out (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub disable_rules: Vec<String>,
    /// Cost-model target.
    #[arg(long, default_value = "H100")]
    pub target: String,
    /// JSON file of measured ceilings overriding the target's: `matmul_flops_bf16`, `matmul_flops_tf32`,
    /// `vector_flops` (FLOP/s), `mem_bw`, `link_bw` (bytes/s), `launch_s` (seconds).
    #[arg(long, value_name = "FILE")]
    pub ceilings: Option<PathBuf>,
    /// Symbol values (elements) the cost model evaluates shapes at, e.g. `B=8,T=32768` (default B=1,
    /// T=P=N=4096, any other symbol 1024); only the graph's own symbols.
    #[arg(long, value_name = "SYM=N", value_delimiter = ',')]
    pub bind: Vec<String>,
    /// Let f32 matmuls use TF32 (costed at the TF32 tensor-core peak); by default f32 is IEEE f32
    /// (`docs/numerics.md`).
    #[arg(long)]
    pub tf32: bool,
    /// Most e-nodes in one template's e-graph (saturation stops past it; it also bounds extraction).
    #[arg(long, value_name = "E-NODES", default_value_t = 20_000)]
    pub node_limit: usize,
    /// Most saturation iterations per template.
    #[arg(long, value_name = "ITERATIONS", default_value_t = 12)]
    pub iter_limit: usize,
    /// Wall-clock budget in seconds for the whole optimizer (default: none; with one, the result may depend on
    /// machine speed, and a template it stops is named in a warning).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub time_limit: Option<f64>,
    /// Most nodes of one template: longer runs of a layer (or a graph without layer names) are cut into windows.
    #[arg(long, value_name = "NODES", default_value_t = 512)]
    pub window: usize,
    /// Explain how a kernel of the optimized graph was derived: a node name (`layers.0.lightning_layer`,
    /// `layers.0.matmul.1`) or an op name for its first kernel (`grouped_matmul`); a wrong name lists the valid
    /// ones.
    #[arg(long, value_name = "KERNEL")]
    pub why: Option<String>,
    /// Print the kernel program the optimized graph lowers to: its kernels (kind, op, covered node, views,
    /// code), buffers, and the planned peak memory at the `--bind` values (with `--dump`, also written there as
    /// `kernels.txt` and `kernels.json`).
    #[arg(long)]
    pub kernels: bool,
}

/// The graph an inspect/optimize command works on: a `.fir`/`.json` graph, or MiniMax's forward with loss
/// built from a config or checkpoint; with the warnings its config calls for (see
/// [`crate::cli::files::config_warnings`]).
pub fn input_graph(path: &Path) -> Result<(Graph, Vec<String>)> {
    let cfg_path = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let is_graph = matches!(path.extension().and_then(|e| e.to_str()), Some("fir"))
        || (cfg_path.extension().and_then(|e| e.to_str()) == Some("json") && looks_like_graph(&cfg_path));
    if is_graph {
        return Ok((load_graph(path)?, Vec::new()));
    }
    let cfg = MiniMaxConfig::from_file(&cfg_path)?;
    let g = forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )?;
    Ok((g, crate::cli::files::config_warnings(&cfg_path, &cfg)))
}

fn looks_like_graph(p: &Path) -> bool {
    std::fs::read_to_string(p)
        .map(|s| s.contains("\"nodes\"") && s.contains("\"outputs\""))
        .unwrap_or(false)
}

/// `--bind` values (`SYM=N`, or several comma-separated) as pairs.
pub fn parse_bind(bind: &[String]) -> Result<Vec<(String, i64)>> {
    bind.iter()
        .map(|b| {
            let (k, v) = b
                .split_once('=')
                .ok_or_else(|| anyhow!("--bind expects SYM=N, found `{b}`"))?;
            let k = k.trim();
            let v: i64 = v
                .trim()
                .parse()
                .map_err(|_| anyhow!("--bind {k}: `{v}` is not an integer"))?;
            Ok((k.to_string(), v))
        })
        .collect()
}

/// The compile options of `inspect`'s arguments (the ceilings file read here, its path kept for errors).
fn options(args: &Args) -> Result<CompileOptions> {
    let ceilings = match &args.ceilings {
        Some(c) => Some((
            std::fs::read_to_string(c).with_context(|| format!("cannot read {}", c.display()))?,
            c.display().to_string(),
        )),
        None => None,
    };
    Ok(CompileOptions {
        target: args.target.clone(),
        ceilings,
        bind: parse_bind(&args.bind)?,
        tf32: args.tf32,
        limits: Limits::new(args.node_limit, args.iter_limit, args.time_limit, args.window)
            .map_err(|e| anyhow!("{e}"))?,
        disabled: args.disable_rules.clone(),
        ..CompileOptions::default()
    })
}

fn ms(s: f64) -> String {
    format!("{:.3} ms", s * 1e3)
}

fn template_text(o: &mut String, t: &TemplateReport, detail: bool) {
    let inst = if t.instances.len() > 1 {
        format!(
            "x{} ({} .. {})",
            t.instances.len(),
            t.instances[0],
            t.instances[t.instances.len() - 1]
        )
    } else {
        "x1".to_string()
    };
    let _ = writeln!(
        o,
        "  template {} {inst}: {} nodes, {} iterations, stop: {}; kernels {} -> {}, cost {} -> {}; {:.1} ms",
        t.name,
        t.nodes,
        t.iterations.len(),
        t.stop_reason,
        t.kernels_before,
        t.kernels_after,
        ms(t.cost_before_s),
        ms(t.cost_after_s),
        t.wall_ms
    );
    if detail {
        let _ = writeln!(
            o,
            "    {:>4} {:>8} {:>9} {:>9}  applied",
            "iter", "e-nodes", "e-classes", "ms"
        );
        for (i, it) in t.iterations.iter().enumerate() {
            let applied: Vec<String> = it
                .applied
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(
                o,
                "    {:>4} {:>8} {:>9} {:>9.2}  {}",
                i + 1,
                it.enodes,
                it.eclasses,
                it.ms,
                applied.join(" ")
            );
        }
        let _ = writeln!(
            o,
            "    {:<28} {:<12} {:>8} {:>12}",
            "rule", "family", "matches", "applications"
        );
        for (name, r) in &t.rules {
            let _ = writeln!(
                o,
                "    {:<28} {:<12} {:>8} {:>12}",
                name, r.family, r.matches, r.applications
            );
        }
    }
}

/// Human-readable pass reports.
pub fn reports_text(g: &Graph, model: &CostModel, reports: &[PassReport], detail: bool) -> String {
    let mut o = String::new();
    let mut env: Vec<String> = model.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    let _ = writeln!(
        o,
        "graph {}: {} nodes; target {} at {}",
        g.name,
        g.node_count(),
        model.target.name,
        env.join(", ")
    );
    for r in reports {
        let _ = writeln!(
            o,
            "pass {}: {:.1} ms; nodes {} -> {}; kernels {} -> {}; cost {} -> {}",
            r.pass,
            r.wall_ms,
            r.nodes_before,
            r.nodes_after,
            r.kernels_before,
            r.kernels_after,
            ms(r.cost_before_s),
            ms(r.cost_after_s)
        );
        if let Some(e) = &r.eqsat {
            let _ = writeln!(o, "  rule families: {}", e.families.join(", "));
            for t in &e.templates {
                template_text(&mut o, t, detail);
            }
        }
    }
    o
}

/// Checks `--dump DIR` before any work: a folder (or a path where one can be made) none of whose dump files
/// is a file the command reads.
fn check_dump_dir(dir: &Path, args: &Args, pipeline: &fulgur_passes::Pipeline) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--dump {}: not a directory", dir.display());
    }
    let mut inputs = if args.input.is_dir() {
        checkpoint_files(&args.input)
    } else {
        vec![InputFile::new("the input file", &args.input)]
    };
    if let Some(c) = &args.ceilings {
        inputs.push(InputFile::new("the ceilings file", c));
    }
    let mut stems = vec!["00-input".to_string()];
    stems.extend(
        pipeline
            .passes
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{:02}-{}", i + 1, p.name())),
    );
    for stem in stems {
        for ext in ["fir", "dot"] {
            check_not_input(&dir.join(format!("{stem}.{ext}")), &inputs)?;
        }
    }
    for f in ["kernels.txt", "kernels.json"] {
        check_not_input(&dir.join(f), &inputs)?;
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let (g, config_warnings) = input_graph(&args.input)?;
    let opts = options(&args)?;
    if let Some(dir) = &args.dump {
        check_dump_dir(dir, &args, &opts.pipeline()?)?;
    }
    let compiled = compile(&g, &opts, args.dump.as_deref())?;
    for w in compiled.warnings.iter().chain(&config_warnings) {
        eprintln!("warning: {w}");
    }
    let (optimized, reports, model) = (compiled.graph, compiled.reports, compiled.model);
    if let Some(kernel) = &args.why {
        let eq = opts.eqsat()?;
        let report = fulgur_passes::why::explain(&g.dead_code_eliminated(), &optimized, &eq, &model, kernel)?;
        if args.json {
            let mut s = serde_json::to_string_pretty(&report)?;
            s.push('\n');
            return write_stdout(&s);
        }
        let mut o = String::new();
        let _ = writeln!(
            o,
            "kernel {} = {} (template {})",
            report.kernel, report.op, report.template
        );
        if !report.rewritten {
            let _ = writeln!(o, "  not rewritten: the input graph's own node");
        } else if let Some(w) = &report.within {
            let _ = writeln!(o, "  part of the term that replaces the input graph's {w}:");
        }
        for (i, st) in report.steps.iter().enumerate() {
            let what = match &st.rule {
                None => format!("input term, rooted at {}", st.at),
                Some(r) => format!("rule {r} -> {}", st.at),
            };
            let _ = writeln!(o, "  {i:>2}. {what}; {} kernels, {}", st.kernels, ms(st.cost_s));
        }
        return write_stdout(&o);
    }
    if args.kernels {
        let program = fulgur_codegen::program::lower(&optimized)?;
        let env = binding_env(&program, &model);
        let layout = program.layout(&env)?;
        let mut text = program.text();
        text.push_str(&memory_text(&env, &layout));
        if let Some(dir) = &args.dump {
            let json = serde_json::to_string_pretty(&program)?;
            fulgur_ir::tensor::write_atomic(&dir.join("kernels.txt"), text.as_bytes())?;
            fulgur_ir::tensor::write_atomic(&dir.join("kernels.json"), json.as_bytes())?;
        }
        if args.json {
            let mut s = serde_json::to_string_pretty(&serde_json::json!({ "program": program, "layout": layout }))?;
            s.push('\n');
            return write_stdout(&s);
        }
        return write_stdout(&text);
    }
    if args.json {
        let mut s = serde_json::to_string_pretty(&reports)?;
        s.push('\n');
        write_stdout(&s)
    } else {
        write_stdout(&reports_text(&g, &model, &reports, args.passes))
    }
}

/// The symbol values a program's memory is planned at: the cost model's (`--bind`, default B=1, T=4096, ...),
/// any other symbol of the program 1024.
fn binding_env(
    p: &fulgur_codegen::program::KernelProgram,
    model: &CostModel,
) -> std::collections::HashMap<String, i64> {
    p.symbols
        .iter()
        .map(|s| (s.clone(), model.env.get(s).copied().unwrap_or(1024)))
        .collect()
}

/// The memory report of a layout.
fn memory_text(env: &std::collections::HashMap<String, i64>, l: &fulgur_codegen::program::Layout) -> String {
    let mut e: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    e.sort();
    let b = fulgur_ir::interp::fmt_bytes;
    format!(
        "memory at {}: planned peak {} (persistent {}, arena {}); every buffer apart would take {}\n",
        if e.is_empty() {
            "no symbols".to_string()
        } else {
            e.join(", ")
        },
        b(l.planned_peak()),
        b(l.persistent_bytes),
        b(l.arena_bytes),
        b(l.persistent_bytes.saturating_add(l.transient_total_bytes))
    )
}
