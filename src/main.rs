#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    envelope_proxy::cli::main()
}
