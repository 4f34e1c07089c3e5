//! A connection's side of the shard's poller: starting and resuming reads, readiness
//! events, the linger after a close, and the interest the shard registers for it.

use std::io::{self, Read};
use std::sync::atomic::Ordering::Relaxed;

use super::{Conn, Linger, Phase, Reads, READS_PER_WAKE};
use crate::shard::poller::{HUP_ERR, IN, OUT};
use crate::shard::ShardCtx;

impl Conn {
    /// Just adopted: bytes that came with the handshake, and what rustls already holds.
    pub(crate) fn start(&mut self, ctx: &mut ShardCtx, mut leftover: Vec<u8>) {
        if !leftover.is_empty() {
            self.on_bytes(ctx, &mut leftover);
        }
        if self.st.tls.is_some() {
            self.drain_plaintext(ctx);
        }
    }

    /// Backpressure is over: handle the bytes that waited, then what rustls holds.
    pub(crate) fn resume(&mut self, ctx: &mut ShardCtx) {
        if self.is_done() {
            return;
        }
        self.on_bytes(ctx, &mut []);
        if self.st.tls.is_some() {
            self.drain_plaintext(ctx);
        }
    }

    /// Readiness reported by the shard's poller.
    pub(crate) fn on_event(&mut self, ctx: &mut ShardCtx, events: u32) {
        let lingering = matches!(
            self.st.phase,
            Phase::Closing {
                linger: Linger::Started | Linger::WriteShut,
                ..
            }
        );
        if events & (IN | HUP_ERR) != 0 {
            if lingering && !self.reads_while_closing() {
                self.linger_read(ctx);
            } else if !self.is_done() {
                self.on_readable(ctx);
            }
        }
        if events & OUT != 0 {
            self.flush();
        }
    }

    /// While closing: discard what the peer still sends until its FIN.
    fn linger_read(&mut self, ctx: &mut ShardCtx) {
        let mut buf = std::mem::take(&mut ctx.read_buf);
        for _ in 0..READS_PER_WAKE {
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    self.st.phase = Phase::Dead;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.st.phase = Phase::Dead;
                    break;
                }
            }
        }
        ctx.read_buf = buf;
    }

    /// After any change: the events to wait for next, or None when the connection is
    /// finished (the socket is gone, or the peer completed the close) and must be
    /// released. Sets `started_linger` the first time it finds the connection closing,
    /// so the shard starts the linger deadline.
    pub(crate) fn settle(&mut self, started_linger: &mut bool) -> Option<u32> {
        let phase = self.st.phase;
        match phase {
            Phase::Dead => return None,
            Phase::Open => {}
            Phase::Closing { .. } => return self.settle_closing(started_linger),
        }
        Some(if self.has_out() { IN | OUT } else { IN })
    }

    /// A closing connection: the linger starts (the first time), what is queued goes
    /// out, then our write side is shut down and the peer's FIN awaited; or, when the
    /// peer closed first, the connection is finished once its answer is out.
    fn settle_closing(&mut self, started_linger: &mut bool) -> Option<u32> {
        {
            let st = &mut self.st;
            if let Phase::Closing { linger, .. } = &mut st.phase {
                if *linger == Linger::NotStarted {
                    *linger = Linger::Started;
                    *started_linger = true;
                    if let Some(tls) = st.tls.as_mut() {
                        tls.send_close_notify();
                    }
                }
            }
        }
        self.flush();
        let st = &mut self.st;
        let has_out = st.has_out();
        let Phase::Closing { reads, linger } = &mut st.phase else {
            // Flushing found the socket gone.
            return None;
        };
        if has_out {
            return Some(IN | OUT);
        }
        // RFC 6455 §7.1.1: after the close handshake the server closes the TCP
        // connection first. The peer has said its last word; close, and its FIN
        // needs no waiting for.
        if *reads == Reads::PeerClosed {
            return None;
        }
        if *linger != Linger::WriteShut {
            *linger = Linger::WriteShut;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Some(IN)
    }

    /// The registered interest, updated when `want` differs; Some(want) if it changed.
    pub(crate) fn set_interest(&mut self, want: u32) -> Option<u32> {
        let st = &mut self.st;
        (st.interest != want).then(|| {
            st.interest = want;
            want
        })
    }

    fn on_readable(&mut self, ctx: &mut ShardCtx) {
        let mut buf = std::mem::take(&mut ctx.read_buf);
        let tls = self.st.tls.is_some();
        for _ in 0..READS_PER_WAKE {
            if !ctx.may_read() {
                break;
            }
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    self.st.phase = Phase::Dead;
                    break;
                }
                Ok(n) => {
                    ctx.metrics().bytes_in.fetch_add(n as u64, Relaxed);
                    if tls {
                        self.on_ciphertext(ctx, &buf[..n]);
                    } else {
                        self.on_bytes(ctx, &mut buf[..n]);
                    }
                    // A short read emptied the socket: no second read that could only
                    // say WouldBlock (one syscall per pong or ack saved). The poller is
                    // level-triggered, so bytes that arrive meanwhile are reported again.
                    if self.is_done() || n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.st.phase = Phase::Dead;
                    break;
                }
            }
        }
        ctx.read_buf = buf;
        if tls && self.has_out() {
            self.flush();
        }
    }

    /// TLS: feed ciphertext to rustls and handle the plaintext it yields.
    fn on_ciphertext(&mut self, ctx: &mut ShardCtx, mut data: &[u8]) {
        while !data.is_empty() && !self.is_done() {
            let ok = {
                let st = &mut self.st;
                let Some(tls) = st.tls.as_mut() else { return };
                tls.read_tls(&mut data).is_ok() && tls.process_new_packets().is_ok()
            };
            if !ok {
                // A TLS error (bad record, alert): nothing more can be said on this connection.
                self.st.phase = Phase::Dead;
                return;
            }
            self.drain_plaintext(ctx);
        }
    }

    /// Hand every decrypted byte rustls holds to the frame parser.
    fn drain_plaintext(&mut self, ctx: &mut ShardCtx) {
        let mut plain = std::mem::take(&mut ctx.plain_buf);
        if plain.is_empty() {
            plain = vec![0u8; crate::shard::READ_BUF];
        }
        while !self.is_done() {
            let r = match self.st.tls.as_mut() {
                Some(tls) => tls.reader().read(&mut plain),
                None => break,
            };
            match r {
                Ok(0) => {
                    // close_notify: the peer is done.
                    self.st.phase = Phase::Dead;
                    break;
                }
                Ok(n) => self.on_bytes(ctx, &mut plain[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.st.phase = Phase::Dead;
                    break;
                }
            }
        }
        ctx.plain_buf = plain;
    }
}
