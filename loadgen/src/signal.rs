//! What a worker tells all its devices at once (stop, storms, the event interval), and
//! which devices a storm drops.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// What the worker tells all its devices at once (through `Signal`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Control {
    /// The run is over: connected devices send a close frame and end, the others end.
    pub stop: bool,
    /// Storms so far: at each bump, the devices `storm_hits` picks drop their connection
    /// at once (no close handshake, as if the network went away) and reconnect without
    /// backoff.
    pub storm: u64,
    /// The share of the fleet the latest storm drops (1: every device).
    pub fraction: f64,
    /// Seconds between a device's periodic events; None: no events.
    pub event_interval: Option<Duration>,
}

/// How the worker tells its devices of a new `Control`. A device does not hold a
/// channel receiver of its own (a watch receiver's `changed()` future is 120 bytes in
/// every device's task, two of them per device): it notes the generation it has seen,
/// and leaves its waker in its slot here while it waits.
pub struct Signal {
    control: Cell<Control>,
    generation: Cell<u64>,
    wakers: RefCell<Vec<Option<Waker>>>,
}

impl Signal {
    /// For a worker of `devices` devices (slots 0..devices).
    pub fn new(devices: usize, control: Control) -> Self {
        Signal {
            control: Cell::new(control),
            generation: Cell::new(0),
            wakers: RefCell::new(vec![None; devices]),
        }
    }
    pub fn get(&self) -> Control {
        self.control.get()
    }
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }
    pub fn stopped(&self) -> bool {
        self.control.get().stop
    }
    /// Change the control and wake every device waiting on it.
    pub fn update(&self, change: impl FnOnce(&mut Control)) {
        let mut c = self.control.get();
        change(&mut c);
        self.control.set(c);
        self.generation.set(self.generation.get() + 1);
        let woken: Vec<Waker> = self
            .wakers
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        woken.into_iter().for_each(Waker::wake);
    }
    /// Ready once the generation differs from `seen`; otherwise the waker of the device
    /// in `slot` is kept until the next `update`.
    pub fn poll_changed(&self, slot: u32, seen: u64, cx: &mut Context<'_>) -> Poll<()> {
        if self.generation.get() != seen {
            return Poll::Ready(());
        }
        let mut wakers = self.wakers.borrow_mut();
        match &mut wakers[slot as usize] {
            Some(w) if w.will_wake(cx.waker()) => {}
            other => *other = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
    /// Sleep for `pause` unless the fleet stops first (false then).
    pub async fn pause(&self, slot: u32, pause: Duration) -> bool {
        // Boxed: a backoff is rare, and a timer inline would size every device's task.
        let mut sleep = Box::pin(tokio::time::sleep(pause));
        std::future::poll_fn(|cx| {
            if self.stopped() {
                return Poll::Ready(false);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(true);
            }
            let _ = self.poll_changed(slot, self.generation(), cx);
            Poll::Pending
        })
        .await
    }
}

/// Whether storm number `generation` of `fraction` drops the device in `slot`: every
/// device at 1, else a spread of that share of the slots (golden-ratio hashing keeps
/// it within a device or two of the fraction), a different one at each storm.
pub fn storm_hits(slot: u32, generation: u64, fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let h = (u64::from(slot) ^ (generation << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}
