//! Shared bits of the io_uring vs epoll comparison: counters, the stats thread,
//! listener setup, line counting and RLIMIT_NOFILE.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lines received by the server, all connections together.
pub static LINES: AtomicU64 = AtomicU64::new(0);
/// Connections currently open on the server.
pub static CONNS: AtomicU64 = AtomicU64::new(0);
/// Connections accepted since start.
pub static ACCEPTED: AtomicU64 = AtomicU64::new(0);

/// Counts newline bytes (one line per '\n'); the same code in both servers.
#[inline]
pub fn count_lines(buf: &[u8]) -> u64 {
    buf.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Prints `stats t=SECS conns=N accepted=N lines=N` every second from its own thread,
/// so both servers report the same way (the script parses these lines).
pub fn spawn_stats_thread(name: &'static str) {
    let start = Instant::now();
    std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            println!(
                "stats server={} t={:.3} conns={} accepted={} lines={}",
                name,
                start.elapsed().as_secs_f64(),
                CONNS.load(Ordering::Relaxed),
                ACCEPTED.load(Ordering::Relaxed),
                LINES.load(Ordering::Relaxed)
            );
        })
        .expect("spawn stats thread");
}

/// A nonblocking std listener with SO_REUSEADDR and a 4096 backlog (same for both servers).
pub fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Raises the RLIMIT_NOFILE soft limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur as u64
    }
}

pub fn parse_addr(arg: Option<String>) -> SocketAddr {
    arg.unwrap_or_else(|| "127.0.0.1:9100".into())
        .parse()
        .expect("ADDR must be ip:port")
}
