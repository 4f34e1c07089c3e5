//! `uring_server ADDR [BUF_BYTES]`: tokio-uring TCP server on one thread. Each accepted
//! connection is a task that loops `stream.read(buf).await` with its own owned buffer
//! (4 KiB by default): with tokio-uring the buffer is handed to the kernel for the whole
//! time the read is pending, so every idle connection holds one.
use bench_uring::*;
use std::sync::atomic::Ordering;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = parse_addr(args.next());
    let buf_size: usize = args.next().map(|s| s.parse().expect("BUF_BYTES")).unwrap_or(4096);
    let nofile = raise_nofile();
    // Submission queue entries; completions beyond the CQ size are kept by the kernel
    // (IORING_FEAT_NODROP), so this only bounds one batch of submissions.
    let entries: u32 = std::env::var("URING_ENTRIES").ok().and_then(|s| s.parse().ok()).unwrap_or(4096);
    spawn_stats_thread("uring");
    eprintln!("uring_server on {addr}, buffer {buf_size} B per pending read, sq entries {entries}, nofile {nofile}");
    tokio_uring::builder().entries(entries).start(async move {
        let listener = tokio_uring::net::TcpListener::from_std(listener(addr).expect("bind"));
        loop {
            let (stream, _peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            ACCEPTED.fetch_add(1, Ordering::Relaxed);
            CONNS.fetch_add(1, Ordering::Relaxed);
            tokio_uring::spawn(async move {
                let mut buf = vec![0u8; buf_size];
                let mut lines: u64 = 0;
                loop {
                    let (res, b) = stream.read(buf).await;
                    buf = b;
                    match res {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let c = count_lines(&buf[..n]);
                            lines += c;
                            LINES.fetch_add(c, Ordering::Relaxed);
                        }
                    }
                }
                let _ = lines;
                CONNS.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
}
