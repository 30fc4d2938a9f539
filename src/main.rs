#![forbid(unsafe_code)]

// mimalloc: the proxy allocates and frees small buffers on every request (headers, bodies,
// contexts); glibc's malloc spent ~12 % of an encrypting request's CPU there (perf, load run).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    envelope_proxy::cli::main()
}
