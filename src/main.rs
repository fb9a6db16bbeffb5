//! hubsync's entry point: everything lives in the library (see `cli`).

fn main() -> std::process::ExitCode {
    hubsync::cli::main()
}
