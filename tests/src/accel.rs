//! The byte-exactness cases of socket acceleration: a server standing where the proxy stands
//! (on the outbound port) and a client standing where the app stands. Each case prints one
//! line that must be the same with acceleration on and off, and the client says whether its
//! data went through TCP/IP (`path=tcp N`, N bytes did) or skipped it (`path=skipped-tcp`),
//! from the kernel's own count of the bytes it sent (TCP_INFO).

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::kit::{pattern, socket::set_opt, take_credentials, Args, ConnectSpec, Identity, Launch};

/// FNV-1a, fed piece by piece (the same sum as `kit::checksum` over the whole).
#[derive(Clone, Copy)]
pub struct Sum {
    pub len: u64,
    h: u64,
}

impl Default for Sum {
    fn default() -> Self {
        Sum {
            len: 0,
            h: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Sum {
    pub fn add(&mut self, b: &[u8]) {
        self.len += b.len() as u64;
        for x in b {
            self.h = (self.h ^ *x as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn of(b: &[u8]) -> Sum {
        let mut s = Sum::default();
        s.add(b);
        s
    }
}

impl std::fmt::Display for Sum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes sum={:016x}", self.len, self.h)
    }
}

/// Reads that returned EAGAIN early (see [`Patient`]).
pub static EARLY_EAGAIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A blocking reader that behaves as an event loop does: a read that fails with EAGAIN before
/// its timeout waits in poll(2) and reads again. A blocking read on a socket in an sk_msg map
/// can fail so: the kernel's tcp_bpf_recvmsg gives up after one wakeup, and write-space
/// wakeups (an ACK of our FIN, say) share its wait queue. Plain TCP keeps waiting. Event-loop
/// users (epoll: Envoy, HAProxy, Go, tokio, Java NIO, Node) never notice; blocking readers do,
/// which is why acceleration leaves the app's sockets out by default.
pub struct Patient<'a>(pub &'a TcpStream);

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        PatientFor(self.0, Duration::from_secs(20)).read(buf)
    }
}

/// [`Patient`] that waits at most the given time in all.
pub struct PatientFor<'a>(pub &'a TcpStream, pub Duration);

impl Read for PatientFor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let deadline = Instant::now() + self.1;
        loop {
            match (&mut &*self.0).read(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    EARLY_EAGAIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut p = libc::pollfd {
                        fd: self.0.as_raw_fd(),
                        events: libc::POLLIN | libc::POLLRDHUP,
                        revents: 0,
                    };
                    // SAFETY: poll on one open fd.
                    unsafe { libc::poll(&mut p, 1, 100) };
                }
                other => return other,
            }
        }
    }
}

/// Read to EOF; the sum of what came.
fn drain(r: &mut impl Read) -> std::io::Result<Sum> {
    drain_on(r, Sum::default())
}

/// Read to EOF; `s` with what came added.
fn drain_on(r: &mut impl Read, mut s: Sum) -> std::io::Result<Sum> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(s),
            Ok(n) => s.add(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `accel-serve`: the cases' server on `addr`, standing where the proxy stands.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct AccelServe {
    pub addr: SocketAddr,
    /// Where cases whose client cannot hear the answer write it.
    #[arg(long)]
    pub log: std::path::PathBuf,
}

impl AccelServe {
    pub fn run(self) -> Result<()> {
        serve(self.addr, self.log)
    }
}

impl Launch for AccelServe {
    const NAME: &'static str = "accel-serve";

    fn args(&self) -> Args {
        Args::new().arg(self.addr).path("--log", &self.log)
    }
}

/// `accel-case`: run one case against `dst`; prints its outcome (and, on stderr, how many
/// blocking reads returned EAGAIN early).
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct AccelCase {
    pub dst: SocketAddr,
    pub case: String,
    #[command(flatten)]
    pub id: Identity,
}

impl AccelCase {
    /// Case `case` against `dst`, as `id`.
    pub fn new(dst: SocketAddr, case: &str, id: Identity) -> AccelCase {
        AccelCase {
            dst,
            case: case.into(),
            id,
        }
    }

    pub fn run(self) -> Result<()> {
        let spec = ConnectSpec {
            timeout: Duration::from_secs(20),
            ..ConnectSpec::to(self.dst, self.id)
        };
        println!("{}", client(&spec, &self.case)?);
        let early = EARLY_EAGAIN.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "{}: blocking reads that returned EAGAIN early: {early}",
            self.case
        );
        Ok(())
    }
}

impl Launch for AccelCase {
    const NAME: &'static str = "accel-case";

    fn args(&self) -> Args {
        Args::new().arg(self.dst).arg(&self.case).id(self.id)
    }
}

/// Serve the cases on `addr` until killed; prints "ready" once bound. Each connection names
/// its case on a first line. Cases whose client cannot hear the answer append it to `log`.
pub fn serve(addr: SocketAddr, log: std::path::PathBuf) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let log = std::sync::Arc::new(log);
    for conn in listener.incoming().flatten() {
        let log = log.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve_one(conn, &log) {
                let _ = append(&log, &format!("error: {e:#}"));
            }
        });
    }
    Ok(())
}

fn append(log: &std::path::Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    Ok(())
}

fn serve_one(conn: TcpStream, log: &std::path::Path) -> Result<()> {
    let mut r = BufReader::new(Patient(&conn));
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut w = &conn;
    let mut words = line.split_whitespace();
    let case = words.next().unwrap_or_default().to_string();
    let n: usize = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    match case.as_str() {
        // Everything back, until the client half-closes.
        "echo" => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let got = r.read(&mut buf)?;
                if got == 0 {
                    break;
                }
                w.write_all(&buf[..got])?;
            }
            w.shutdown(Shutdown::Write)?;
        }
        // Read to EOF, say what came.
        "sink" => {
            let s = drain(&mut r)?;
            writeln!(w, "got {s}")?;
        }
        // Read to EOF; the client has gone: the log says what came.
        "sink-log" => {
            let s = drain(&mut r)?;
            append(log, &format!("close-in-flight: got {s}"))?;
        }
        // Stop reading for a second (the client's writes back up), then read to EOF.
        "stall" => {
            std::thread::sleep(Duration::from_secs(1));
            let s = drain(&mut r)?;
            writeln!(w, "got {s}")?;
        }
        // Stop reading for a second, read n bytes, say so, then read to EOF.
        "stall-ack" => {
            std::thread::sleep(Duration::from_secs(1));
            let mut first = vec![0u8; n];
            r.read_exact(&mut first)?;
            writeln!(w, "read {n}")?;
            let s = drain_on(&mut r, Sum::of(&first))?;
            writeln!(w, "got {s}")?;
        }
        // Read to EOF by splice(2) through a pipe.
        "splice" => {
            // What the line reader took past the first line counts first.
            let mut s = Sum::of(r.buffer());
            let taken = r.buffer().len();
            r.consume(taken);
            splice_drain(r.get_ref().0, &mut s)?;
            writeln!(w, "got {s}")?;
        }
        // n pattern bytes, then close.
        "source" => {
            w.write_all(&pattern(n))?;
        }
        // n pattern bytes, half-close; the log says what the client sent after.
        "half" => {
            w.write_all(&pattern(n))?;
            w.shutdown(Shutdown::Write)?;
            let s = drain(&mut r)?;
            append(log, &format!("after the server's half-close: got {s}"))?;
        }
        // Abort: an RST instead of a FIN.
        "rst" => {
            let l = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            set_opt(
                w.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &l,
                "SO_LINGER",
            )?;
            drop(r);
            drop(conn);
        }
        other => bail!("unknown case {other:?}"),
    }
    Ok(())
}

fn splice_drain(s: &impl AsRawFd, sum: &mut Sum) -> Result<()> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2, owned here.
    let (rd, wr): (std::fs::File, std::fs::File) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let mut rd = rd;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: splice between two open fds, no offsets.
        let n = unsafe {
            libc::splice(
                s.as_raw_fd(),
                std::ptr::null_mut(),
                wr.as_raw_fd(),
                std::ptr::null_mut(),
                64 * 1024,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            bail!("splice: {e}");
        }
        if n == 0 {
            return Ok(());
        }
        let mut left = n as usize;
        while left > 0 {
            let got = rd.read(&mut buf[..left.min(64 * 1024)])?;
            sum.add(&buf[..got]);
            left -= got;
        }
    }
}

/// Payload bytes this socket sent through TCP/IP (TCP_INFO `tcpi_bytes_sent`; redirected
/// data never counts there).
fn tcp_bytes_sent(s: &TcpStream) -> Result<u64> {
    tcp_info_u64(s, 200)
}

/// Payload bytes this socket received through TCP/IP (TCP_INFO `tcpi_bytes_received`).
fn tcp_bytes_received(s: &TcpStream) -> Result<u64> {
    tcp_info_u64(s, 128)
}

/// The u64 of `struct tcp_info` at byte `at`.
fn tcp_info_u64(s: &TcpStream, at: usize) -> Result<u64> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < at + 8 {
        bail!("TCP_INFO: {}", std::io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(
        info[at..at + 8].try_into().expect("8 bytes"),
    ))
}

fn connect(spec: &ConnectSpec) -> Result<TcpStream> {
    let dst = spec.dst.context("no destination")?;
    let s =
        TcpStream::connect_timeout(&dst, spec.timeout).with_context(|| format!("connect {dst}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

/// Run `case` against the server at `spec.dst` (credentials taken first); one line.
pub fn client(spec: &ConnectSpec, case: &str) -> Result<String> {
    take_credentials(spec)?;
    if case == "many" {
        return many(spec);
    }
    let mut s = connect(spec)?;
    let outcome = match case {
        // One 8 MiB write (the kernel takes it in parts), then the server's count.
        "big-write" => {
            let data = pattern(8 << 20);
            s.write_all(b"sink\n")?;
            s.write_all(&data)?;
            s.shutdown(Shutdown::Write)?;
            format!("sent {} / {}", Sum::of(&data), reply(&mut s)?)
        }
        // 100,000 writes of 1 to 64 bytes, each its own send.
        "small-writes" => {
            s.set_nodelay(true)?;
            s.write_all(b"sink\n")?;
            let data = pattern(64);
            let mut sent = Sum::default();
            for i in 0..100_000 {
                let piece = &data[..1 + i % 64];
                s.write_all(piece)?;
                sent.add(piece);
            }
            s.shutdown(Shutdown::Write)?;
            format!("sent {sent} / {}", reply(&mut s)?)
        }
        // 4 MiB in 64 KiB writes while the echo comes back on another thread.
        "echo-both-ways" => {
            s.write_all(b"echo\n")?;
            let rd = s.try_clone()?;
            let reader = std::thread::spawn(move || drain(&mut Patient(&rd)));
            let data = pattern(4 << 20);
            for chunk in data.chunks(64 * 1024) {
                s.write_all(chunk)?;
            }
            s.shutdown(Shutdown::Write)?;
            let back = reader
                .join()
                .map_err(|_| anyhow::anyhow!("reader panicked"))?
                .context("reading the echo")?;
            format!("sent {} / echoed {back}", Sum::of(&data))
        }
        // 8 MiB from the server, then its close.
        "download" => {
            s.write_all(format!("source {}\n", 8 << 20).as_bytes())?;
            format!("received {}", drain(&mut Patient(&s))?)
        }
        // The download, and how much of it came through TCP/IP (not one of the compared cases:
        // that differs by design).
        "download-path" => {
            s.write_all(format!("source {}\n", 1 << 20).as_bytes())?;
            let got = drain(&mut Patient(&s))?;
            format!("received {got}, {} by TCP", tcp_bytes_received(&s)?)
        }
        // What FIONREAD says is waiting once 1,000 bytes have arrived (the server sends them and
        // closes; we wait until poll says readable, and a moment more).
        "fionread" => {
            s.write_all(b"source 1000\n")?;
            let mut p = libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one open fd; ioctl into a c_int.
            let waiting = unsafe {
                libc::poll(&mut p, 1, 5000);
                std::thread::sleep(Duration::from_millis(100));
                let mut n: libc::c_int = -1;
                libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n);
                n
            };
            format!(
                "FIONREAD said {waiting}; received {}",
                drain(&mut Patient(&s))?
            )
        }
        // The server stops reading: 16 MiB of writes wait, then all arrive.
        "back-pressure" => {
            // The data is made before the server is told to stall: made after, on a loaded
            // machine, it could take most of the server's second, and the writes not wait.
            let data = pattern(16 << 20);
            s.write_all(b"stall\n")?;
            let t = Instant::now();
            s.write_all(&data)?;
            let waited = t.elapsed() >= Duration::from_millis(500);
            s.shutdown(Shutdown::Write)?;
            format!(
                "sent {} (writes waited: {waited}) / {}",
                Sum::of(&data),
                reply(&mut s)?
            )
        }
        // The server stops reading while 4 MiB are written (they outrun it); once it says it
        // has read them all, 1 MiB more.
        "resume" => {
            let (first, then) = (pattern(4 << 20), pattern(1 << 20));
            s.write_all(format!("stall-ack {}\n", first.len()).as_bytes())?;
            s.write_all(&first)?;
            let mut ack = [0u8; 13];
            Patient(&s).read_exact(&mut ack)?;
            if ack != *format!("read {}\n", first.len()).as_bytes() {
                bail!("the server said {:?}", String::from_utf8_lossy(&ack));
            }
            s.write_all(&then)?;
            s.shutdown(Shutdown::Write)?;
            let mut sent = Sum::of(&first);
            sent.add(&then);
            format!("sent {sent} / {}", reply(&mut s)?)
        }
        // The client half-closes first; the server answers after it.
        "client-half-close" => {
            s.write_all(b"sink\n")?;
            s.write_all(&pattern(100_000))?;
            s.shutdown(Shutdown::Write)?;
            format!("after our FIN: {}", reply(&mut s)?)
        }
        // The server half-closes first; the client still sends after it.
        "server-half-close" => {
            s.write_all(b"half 100000\n")?;
            let mut got = vec![0u8; 100_000];
            Patient(&s).read_exact(&mut got)?;
            let mut rest = [0u8; 16];
            let eof = Patient(&s).read(&mut rest)? == 0;
            // The connection still carries data the other way.
            s.write_all(b"still open this way")?;
            s.shutdown(Shutdown::Write)?;
            format!("received {} then eof={eof}; wrote after it", Sum::of(&got))
        }
        // The server aborts: what does a read see?
        "rst" => {
            s.write_all(b"rst\n")?;
            let mut buf = [0u8; 16];
            let seen = match Patient(&s).read(&mut buf) {
                Ok(0) => "eof".to_string(),
                Ok(n) => format!("{n} bytes"),
                Err(e) => format!("{:?}", e.kind()),
            };
            format!("read after the server's abort: {seen}")
        }
        // sendfile(2) from a file, then the server's count.
        "sendfile" => {
            let data = pattern(4 << 20);
            let path = std::env::temp_dir().join(format!("smk-sendfile-{}", std::process::id()));
            std::fs::write(&path, &data)?;
            let f = std::fs::File::open(&path)?;
            let _ = std::fs::remove_file(&path);
            s.write_all(b"sink\n")?;
            let mut off: libc::off_t = 0;
            while (off as usize) < data.len() {
                // SAFETY: sendfile between open fds with an offset we own.
                let n = unsafe {
                    libc::sendfile(
                        s.as_raw_fd(),
                        f.as_raw_fd(),
                        &mut off,
                        data.len() - off as usize,
                    )
                };
                if n < 0 {
                    bail!("sendfile: {}", std::io::Error::last_os_error());
                }
            }
            s.shutdown(Shutdown::Write)?;
            format!("sent {} / {}", Sum::of(&data), reply(&mut s)?)
        }
        // The server reads with splice(2).
        "splice" => {
            let data = pattern(4 << 20);
            s.write_all(b"splice\n")?;
            s.write_all(&data)?;
            s.shutdown(Shutdown::Write)?;
            // A reader that cannot see redirected data may never answer: say so, not fail.
            let answer = reply_within(&s, Duration::from_secs(10));
            format!("sent {} / {answer}", Sum::of(&data))
        }
        // 1 MiB written, and the socket closed at once (no shutdown, no read).
        "close-in-flight" => {
            let data = pattern(1 << 20);
            s.write_all(b"sink-log\n")?;
            s.write_all(&data)?;
            let path = path_name(tcp_bytes_sent(&s)?);
            // What arrived, the server logs.
            drop(s);
            return Ok(format!("sent {} and closed path={path}", Sum::of(&data)));
        }
        other => bail!("unknown case {other:?}"),
    };
    Ok(format!("{outcome} path={}", path_name(tcp_bytes_sent(&s)?)))
}

/// `skipped-tcp` when none of the bytes went through TCP/IP, else `tcp N` (N bytes did).
fn path_name(tcp_bytes: u64) -> String {
    if tcp_bytes == 0 {
        "skipped-tcp".to_string()
    } else {
        format!("tcp {tcp_bytes}")
    }
}

/// The server's one-line answer, to EOF.
fn reply(s: &mut TcpStream) -> Result<String> {
    let mut text = String::new();
    Patient(s)
        .read_to_string(&mut text)
        .context("reading the answer")?;
    Ok(text.trim().to_string())
}

/// The server's answer, or what kept it from coming within `wait`.
fn reply_within(s: &TcpStream, wait: Duration) -> String {
    let mut text = String::new();
    match PatientFor(s, wait).read_to_string(&mut text) {
        Ok(_) => text.trim().to_string(),
        Err(e) => format!("no answer within {} s ({e})", wait.as_secs()),
    }
}

/// 2,000 connections open at once, each echoing 10 KB; how many came back whole, and how
/// many of them skipped TCP/IP. Each connection's first write (`echo`) goes right after its
/// connect returns, which can be before the server's side is in the map: those few bytes go by
/// TCP (the head start), so such a connection counts apart, as long as nothing else did.
fn many(spec: &ConnectSpec) -> Result<String> {
    crate::api::raise_nofile()?;
    const N: usize = 2000;
    const FIRST: &[u8] = b"echo\n";
    let data = pattern(10_000);
    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        let mut s = connect(spec)?;
        s.write_all(FIRST)?;
        conns.push(s);
    }
    let mut whole = 0;
    let (mut skipped, mut head_start) = (0, 0);
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(&data)
            .with_context(|| format!("connection {i}: writing"))?;
        s.shutdown(Shutdown::Write)?;
        let back =
            drain(&mut Patient(s)).with_context(|| format!("connection {i}: reading the echo"))?;
        if back.to_string() == Sum::of(&data).to_string() {
            whole += 1;
        }
        match tcp_bytes_sent(s)? {
            0 => skipped += 1,
            n if n == FIRST.len() as u64 => head_start += 1,
            _ => {}
        }
    }
    let path = match (skipped, head_start) {
        (0, 0) => "tcp".to_string(),
        (n, 0) if n == N => "skipped-tcp".to_string(),
        (n, h) if n + h == N => format!("skipped-tcp but {h} first writes"),
        (n, h) => format!("mixed ({n} of {N} skipped tcp, {h} but their first write)"),
    };
    Ok(format!(
        "{whole} of {N} connections echoed 10000 bytes whole path={path}"
    ))
}
