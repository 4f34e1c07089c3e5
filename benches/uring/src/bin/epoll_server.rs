//! `epoll_server ADDR`: one thread, raw level-triggered epoll over nonblocking std
//! TcpStreams and ONE shared 64 KiB read buffer lent to whichever connection is readable
//! (the router's shard design, stripped down). Per connection: the stream and a counter.
use bench_uring::*;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

struct Conn {
    stream: std::net::TcpStream,
    lines: u64,
}

const LISTENER: u64 = u64::MAX;

fn ctl(ep: i32, op: i32, fd: i32, token: u64) {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
    let r = unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
    if r != 0 {
        eprintln!("epoll_ctl: {}", std::io::Error::last_os_error());
    }
}

fn main() {
    let addr = parse_addr(std::env::args().nth(1));
    let nofile = raise_nofile();
    spawn_stats_thread("epoll");
    eprintln!("epoll_server on {addr}, one shared 64 KiB buffer, nofile {nofile}");
    let listener = listener(addr).expect("bind");
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1: {}", std::io::Error::last_os_error());
    ctl(ep, libc::EPOLL_CTL_ADD, listener.as_raw_fd(), LISTENER);

    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    loop {
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 1000) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            panic!("epoll_wait: {e}");
        }
        for i in 0..n as usize {
            let token = events[i].u64;
            if token == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(true).expect("nonblocking");
                            let fd = stream.as_raw_fd();
                            let idx = match free.pop() {
                                Some(i) => i,
                                None => {
                                    conns.push(None);
                                    conns.len() - 1
                                }
                            };
                            conns[idx] = Some(Conn { stream, lines: 0 });
                            ctl(ep, libc::EPOLL_CTL_ADD, fd, idx as u64);
                            ACCEPTED.fetch_add(1, Ordering::Relaxed);
                            CONNS.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            eprintln!("accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let idx = token as usize;
            let close = match conns.get_mut(idx).and_then(|c| c.as_mut()) {
                None => false,
                // Level-triggered: one read per readiness; if more is left, epoll reports it again.
                Some(c) => match c.stream.read(&mut buf) {
                    Ok(0) => true,
                    Ok(n) => {
                        let l = count_lines(&buf[..n]);
                        c.lines += l;
                        LINES.fetch_add(l, Ordering::Relaxed);
                        false
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => false,
                    Err(_) => true,
                },
            };
            if close {
                if let Some(c) = conns[idx].take() {
                    ctl(ep, libc::EPOLL_CTL_DEL, c.stream.as_raw_fd(), 0);
                    drop(c);
                    free.push(idx);
                    CONNS.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
}
