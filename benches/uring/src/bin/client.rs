//! `client ADDR N SECS RATE_PER_CONN`: opens N connections (at most 512 connects in
//! flight), prints `connected N ...`, then every connection sends 64-byte lines for SECS:
//! RATE_PER_CONN lines/s each, `0` = idle (just hold the sockets), `max` = as fast as
//! possible (64 KiB writes of 1,024 lines). Prints `sent LINES ...` at the end.
//! Plain tokio (epoll), one thread.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const LINE: usize = 64;
static SENT: AtomicU64 = AtomicU64::new(0);

fn line_chunk(lines: usize) -> Arc<[u8]> {
    let mut v = Vec::with_capacity(lines * LINE);
    for _ in 0..lines {
        let mut l = [b'x'; LINE];
        l[..10].copy_from_slice(b"{\"t\":\"ev\",");
        l[LINE - 2] = b'}';
        l[LINE - 1] = b'\n';
        v.extend_from_slice(&l);
    }
    v.into()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: client ADDR N SECS RATE_PER_CONN|max");
        std::process::exit(2);
    }
    let addr: std::net::SocketAddr = args[1].parse().expect("ADDR");
    let n: usize = args[2].parse().expect("N");
    let secs: f64 = args[3].parse().expect("SECS");
    let rate: Option<f64> = if args[4] == "max" { None } else { Some(args[4].parse().expect("RATE")) };
    let nofile = bench_uring::raise_nofile();
    if (n as u64) + 64 > nofile {
        eprintln!("warning: N={n} close to RLIMIT_NOFILE {nofile}");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let t0 = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(512));
        let mut handles = Vec::with_capacity(n);
        for _ in 0..n {
            let permit = sem.clone().acquire_owned().await.unwrap();
            handles.push(tokio::spawn(async move {
                let mut tries = 0;
                loop {
                    match TcpStream::connect(addr).await {
                        Ok(s) => {
                            drop(permit);
                            let _ = s.set_nodelay(true);
                            return Some(s);
                        }
                        Err(e) => {
                            tries += 1;
                            if tries > 20 {
                                eprintln!("connect: {e}");
                                return None;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        let mut streams = Vec::with_capacity(n);
        for h in handles {
            if let Some(s) = h.await.unwrap() {
                streams.push(s);
            }
        }
        println!("connected {} of {} in {:.2} s", streams.len(), n, t0.elapsed().as_secs_f64());
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        let start = Instant::now();
        match rate {
            Some(r) if r <= 0.0 => {
                tokio::time::sleep_until(deadline).await;
            }
            Some(r) => {
                let one = line_chunk(1);
                let mut tasks = Vec::new();
                for mut s in streams.drain(..) {
                    let one = one.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut iv = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
                        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            tokio::select! {
                                _ = tokio::time::sleep_until(deadline) => break,
                                _ = iv.tick() => {
                                    if s.write_all(&one).await.is_err() { break; }
                                    SENT.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        s
                    }));
                }
                for t in tasks {
                    streams.push(t.await.unwrap());
                }
            }
            None => {
                let chunk = line_chunk(1024);
                let mut tasks = Vec::new();
                for mut s in streams.drain(..) {
                    let chunk = chunk.clone();
                    tasks.push(tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                _ = tokio::time::sleep_until(deadline) => break,
                                r = s.write_all(&chunk) => {
                                    if r.is_err() { break; }
                                    SENT.fetch_add(1024, Ordering::Relaxed);
                                }
                            }
                        }
                        s
                    }));
                }
                for t in tasks {
                    streams.push(t.await.unwrap());
                }
            }
        }
        let el = start.elapsed().as_secs_f64();
        let sent = SENT.load(Ordering::Relaxed);
        println!("sent {} lines in {:.3} s = {:.0} lines/s", sent, el, sent as f64 / el);
        drop(streams);
    });
}
