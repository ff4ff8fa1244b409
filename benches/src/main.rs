//! `octolog-bench`: parses the flags and hands over to the library (`octolog_bench::run`).
//! Exit status: 0 on success, 1 when the run fails (`error: ...` on stderr), 2 for bad flags.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use octolog_bench::args::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = match args.plan() {
        Ok(plan) => plan,
        Err(message) => Args::command()
            .error(ErrorKind::ValueValidation, message)
            .exit(),
    };
    if args.broker.is_some() && args.fsync.is_some() {
        eprintln!(
            "warning: --fsync is ignored with --broker: the broker's own flush policy applies"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(octolog_bench::run::run(&plan)) {
        Ok(report) => {
            if plan.json {
                println!("{}", report.to_json());
            } else {
                println!("{}", report.to_text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
