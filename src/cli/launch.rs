//! `fulgur launch -n N [--port P] [--timeout S] -- COMMAND ARGS...`: starts `N` local ranks of a command, each
//! with the variables torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR=127.0.0.1`,
//! `MASTER_PORT`), waits for all of them, and fails naming the ranks that failed. A rank that fails makes the
//! others fail at their next collective (the transport names it); one that hangs is stopped after `--timeout`.

use anyhow::{anyhow, bail, Result};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Ranks to start.
    #[arg(short = 'n', long = "nproc")]
    pub nproc: usize,
    /// The rendezvous port on 127.0.0.1 (default: a free one).
    #[arg(long)]
    pub port: Option<u16>,
    /// Give each rank its own GPU: `CUDA_VISIBLE_DEVICES` set to its local rank.
    #[arg(long)]
    pub gpu_per_rank: bool,
    /// Seconds the whole job may run before its ranks are stopped.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// The command each rank runs (`fulgur` means this executable), after `--`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    if args.nproc == 0 {
        bail!("-n must be at least 1");
    }
    let port = match args.port {
        Some(p) => p,
        None => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
    };
    let program = if args.command[0] == "fulgur" {
        std::env::current_exe()?
    } else {
        args.command[0].clone().into()
    };
    let mut children: Vec<Child> = Vec::new();
    for r in 0..args.nproc {
        let mut cmd = Command::new(&program);
        if args.gpu_per_rank {
            cmd.env("CUDA_VISIBLE_DEVICES", r.to_string());
        }
        let child = cmd
            .args(&args.command[1..])
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", args.nproc.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .map_err(|e| anyhow!("cannot start rank {r} ({}): {e}", program.display()))?;
        children.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; args.nproc];
    while status.iter().any(Option::is_none) {
        for (r, c) in children.iter_mut().enumerate() {
            if status[r].is_none() {
                status[r] = c.try_wait()?;
            }
        }
        if Instant::now() > deadline {
            for (r, c) in children.iter_mut().enumerate() {
                if status[r].is_none() {
                    let _ = c.kill();
                }
            }
            let hung: Vec<String> = (0..args.nproc)
                .filter(|&r| status[r].is_none())
                .map(|r| r.to_string())
                .collect();
            bail!(
                "rank(s) {} still running after {} s: stopped",
                hung.join(", "),
                args.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let failed: Vec<String> = status
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_some_and(|s| s.success()))
        .map(|(r, s)| match s.and_then(|s| s.code()) {
            Some(c) => format!("{r} (exit status {c})"),
            None => format!("{r} (killed)"),
        })
        .collect();
    if !failed.is_empty() {
        bail!("rank(s) {} of {} failed", failed.join(", "), args.nproc);
    }
    Ok(())
}
