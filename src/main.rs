//! The `fulgur` command: a thin dispatcher over the subcommands in `src/cli/`.
//!
//! Every failure ends the process with a non-zero status and one line `error: <cause>` on stderr; logs go
//! through `tracing` to stderr, filtered by `RUST_LOG` (default `warn`).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::install_panic_hook();
    cli::init_logging();
    let args = match cli::parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::report_error(&e);
            ExitCode::FAILURE
        }
    }
}
