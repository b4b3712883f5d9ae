//! The `ssp` binary: everything lives in the library; see `ssp::cli`.

fn main() -> std::process::ExitCode {
    ssp::cli::main()
}
