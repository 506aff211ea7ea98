//! sockmesh-proxy: the Rust sidecar (issue #5). Not written yet.

fn main() -> std::process::ExitCode {
    eprintln!("sockmesh-proxy is not implemented yet (issue #5)");
    std::process::ExitCode::FAILURE
}
