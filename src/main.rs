//! The `fulgur` command: a thin dispatcher over the subcommands in `src/cli/`.
//!
//! Every failure ends the process with a non-zero status and one line `error: <cause>` on stderr; logs go
//! through `tracing` to stderr, filtered by `RUST_LOG` (default `warn`).

mod cli;

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;

/// The system allocator, except that an allocation the system refuses ends the process with one line,
/// `error: out of memory: ...`, and status 1, instead of Rust's abort with a backtrace. (Commands check their
/// large allocations against a memory budget first; this is the last guard.)
struct OneLineOnOom;

/// Prints the out-of-memory line without allocating, then exits.
fn out_of_memory(size: usize) -> ! {
    use std::io::Write;
    let mut buf = [0u8; 160];
    let len = {
        let mut cur = std::io::Cursor::new(&mut buf[..]);
        let gib = size as f64 / (1u64 << 30) as f64;
        let _ = writeln!(
            cur,
            "error: out of memory: an allocation of {size} bytes ({gib:.2} GiB) failed"
        );
        cur.position() as usize
    };
    let _ = std::io::stderr().write_all(&buf[..len]);
    std::process::exit(1)
}

// SAFETY: every method forwards to `System` with the same arguments; a null result (the only change) never
// returns to the caller.
unsafe impl GlobalAlloc for OneLineOnOom {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            out_of_memory(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: OneLineOnOom = OneLineOnOom;

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
