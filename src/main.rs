//! The `ssp` binary: everything lives in the library; see `ssp::cli`.

// Allocator trials only (`--features mimalloc` / `jemalloc`, benches/RESULTS.md): the shipped build uses the
// system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    ssp::cli::main()
}
