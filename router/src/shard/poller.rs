//! The shard's own readiness poller for authenticated connections: one epoll instance
//! per shard, itself registered in the shard's tokio runtime.
//!
//! Why not a tokio task and a tokio `TcpStream` per connection: each costs an
//! allocation that tokio aligns to 128 bytes (the task cell, and the `ScheduledIo`
//! behind every registered socket), about 380 bytes each once the allocator has
//! rounded them, i.e. more than half of what an idle device cost. Here an idle
//! connection is its compact `Conn` plus one slab slot; the kernel's epoll item is
//! not process memory. Level-triggered: a connection that still has bytes after its
//! reads-per-wake budget is simply reported again, so one busy device cannot starve
//! the others.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

pub(crate) const IN: u32 = libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
pub(crate) const OUT: u32 = libc::EPOLLOUT as u32;
/// Hang-up and error: always reported, whatever the interest.
pub(crate) const HUP_ERR: u32 = libc::EPOLLHUP as u32 | libc::EPOLLERR as u32;

/// Events taken from the kernel per `epoll_wait`.
pub(crate) const BATCH: usize = 256;

pub(crate) struct Poller {
    ep: AsyncFd<OwnedFd>,
}

impl Poller {
    /// Must be called inside the shard's runtime (registers the epoll fd with it).
    pub(crate) fn new() -> io::Result<Poller> {
        // SAFETY: epoll_create1 has no preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `owned` is an open epoll descriptor that the AsyncFd owns for its
        // whole life; nothing else closes or replaces it.
        let ep = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Poller { ep })
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: key };
        // SAFETY: valid epoll fd, a valid event struct for the duration of the call.
        let r = unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub(crate) fn add(&self, fd: RawFd, key: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, key)
    }

    pub(crate) fn modify(&self, fd: RawFd, key: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, key)
    }

    /// Wait until the kernel has events for us, then take up to [`BATCH`] of them
    /// into `out` as (key, events).
    pub(crate) async fn wait(&self, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        loop {
            let mut guard = self.ep.readable().await?;
            if self.take(out)? > 0 {
                return Ok(());
            }
            // Only an empty wait may clear the readiness. The items are level-triggered:
            // one that still has bytes after its read budget goes back on the ready list
            // without a new wakeup of the outer (tokio) epoll, so clearing after a
            // non-empty wait would leave it stranded until some other event came.
            guard.clear_ready();
        }
    }

    fn take(&self, out: &mut Vec<(u64, u32)>) -> io::Result<usize> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        // SAFETY: the buffer holds BATCH events; timeout 0 never blocks.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), evs.as_mut_ptr(), BATCH as i32, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        out.clear();
        out.extend(evs[..n as usize].iter().map(|e| (e.u64, e.events)));
        Ok(n as usize)
    }
}
