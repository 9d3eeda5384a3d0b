//! The `mailroot` binary: see [`mailroot::cli`].

fn main() -> std::process::ExitCode {
    mailroot::cli::main(std::env::args_os())
}
