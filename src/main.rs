//! `fastpull IMAGE DEST`: parse, run, map errors to exit codes. Everything else is the library.

mod cli;
mod console;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    let long_version: &'static str = Box::leak(
        format!(
            "{}\nsha256: {}",
            env!("CARGO_PKG_VERSION"),
            fastpull::sha256_backend()
        )
        .into_boxed_str(),
    );
    let matches = cli::Args::command()
        .long_version(long_version)
        .get_matches();
    let args = match cli::Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    init_tracing(args.verbose);
    // At least two workers, one per CPU as tokio would otherwise choose: the pull runs as a
    // task (below), and its few blocking steps (creating a blob's file, the fsyncs around
    // a rename, removing a staging directory) must not stop every connection at once on a
    // machine or container with one CPU.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fastpull: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // The pull runs as a task of the runtime, not on this thread: a future polled by
    // `block_on` is woken across threads for every chunk a connection task hands it, and a
    // task woken by a worker runs next on that worker (perf/README "The pull on the
    // runtime's threads").
    let pull = runtime.spawn(cli::run(args));
    let result = match runtime.block_on(pull) {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => {
            eprintln!("fastpull: the pull stopped: {e}");
            return ExitCode::from(fastpull::Category::Internal.exit_code() as u8);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fastpull: {}", console::printable(&cli::describe(&e)));
            ExitCode::from(e.category().exit_code() as u8)
        }
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "off",
        1 => "fastpull=info",
        2 => "fastpull=debug",
        _ => "fastpull=trace,hyper=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FASTPULL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
