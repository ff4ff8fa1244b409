//! The `octolog` binary: server and command-line tool. Everything lives in the library.

fn main() -> std::process::ExitCode {
    octolog_broker::cli::main()
}
