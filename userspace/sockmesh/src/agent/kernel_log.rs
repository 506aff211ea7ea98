//! The kernel programs' log records (aya-log), forwarded to the agent's log with target
//! "kernel".

use tracing::warn;

/// aya-log records of the kernel programs, as tracing events with target "kernel".
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(target: "kernel", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "kernel", "{msg}"),
            log::Level::Info => tracing::info!(target: "kernel", "{msg}"),
            log::Level::Debug | log::Level::Trace => tracing::debug!(target: "kernel", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Read the programs' log ring buffer in a thread and forward each record to tracing. Only this
/// load's programs write to it: after a restart the previous agent's records are not read.
pub fn forward_kernel_logs(ebpf: &mut aya::Ebpf) {
    let mut logger = match aya_log::EbpfLogger::init_with_logger(ebpf, KernelLog) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "kernel-side logs are not forwarded");
            return;
        }
    };
    std::thread::spawn(move || loop {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: logger.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        // A record aya-log cannot decode must not end forwarding.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_err() {
            warn!("a kernel log record could not be decoded");
        }
    });
}
