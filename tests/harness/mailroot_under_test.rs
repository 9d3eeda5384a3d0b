//! `mailroot` itself, as a binary of the test package: integration tests get
//! its path from Cargo, so process-level tests (kill -9) run the current code.

fn main() -> std::process::ExitCode {
    mailroot::cli::main(std::env::args_os())
}
