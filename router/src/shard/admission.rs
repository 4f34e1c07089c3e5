//! Admission control: whether a shard takes a new connection, decided before the
//! upgrade (draining, the connection cap, the per-IP connect rate).

use std::collections::HashMap;
use std::net::IpAddr;

/// Why a connection was refused; answered with an HTTP error before the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The router is draining.
    Draining,
    /// `--max-connections` open already.
    MaxConnections,
    /// Over `--ip-connect-rate` from this address in the current second.
    IpRate,
    /// Over `--max-unauthenticated`: no credentials on the upgrade request in time.
    Unauthenticated,
    /// This address holds `--max-unauthenticated-per-ip` unauthenticated connections.
    UnauthenticatedIp,
}

impl Refusal {
    /// The HTTP status line the client gets.
    pub(crate) fn status(self) -> &'static str {
        match self {
            Refusal::Draining | Refusal::MaxConnections | Refusal::Unauthenticated => {
                "503 Service Unavailable"
            }
            Refusal::IpRate | Refusal::UnauthenticatedIp => "429 Too Many Requests",
        }
    }

    /// The body the client gets: why, and what to do.
    pub(crate) fn message(self) -> &'static str {
        match self {
            Refusal::Draining => "router draining; reconnect elsewhere",
            Refusal::MaxConnections => "connection limit reached; retry later",
            Refusal::IpRate => "too many connections from this address; slow down",
            Refusal::Unauthenticated => {
                "too many unauthenticated connections; send the token on the upgrade request or retry later"
            }
            Refusal::UnauthenticatedIp => {
                "too many unauthenticated connections from this address; send the token on the upgrade request or retry later"
            }
        }
    }
}

/// A shard's admission state: connects per source IP in the current second.
pub(crate) struct Admission {
    /// Connects allowed per IP per second; 0: no limit.
    ip_rate: u32,
    max_connections: i64,
    /// IP -> (second, connects in it). Only with a rate.
    per_ip: HashMap<IpAddr, (u32, u32)>,
}

impl Admission {
    pub(crate) fn new(ip_rate: u32, max_connections: usize) -> Self {
        Admission {
            ip_rate,
            max_connections: i64::try_from(max_connections).unwrap_or(i64::MAX),
            per_ip: HashMap::new(),
        }
    }

    /// Draining and the connection cap (`open`: connections open in the process):
    /// decided at accept, before a byte is read.
    pub(crate) fn connection(&self, draining: bool, open: i64) -> Result<(), Refusal> {
        if draining {
            return Err(Refusal::Draining);
        }
        if open >= self.max_connections {
            return Err(Refusal::MaxConnections);
        }
        Ok(())
    }

    /// The per-IP connect rate, for a connect from `ip` at `now` (whole seconds).
    pub(crate) fn ip(&mut self, ip: IpAddr, now: u32) -> Result<(), Refusal> {
        if self.ip_rate == 0 {
            return Ok(());
        }
        let e = self.per_ip.entry(ip).or_insert((now, 0));
        if e.0 != now {
            *e = (now, 0);
        }
        e.1 += 1;
        if e.1 > self.ip_rate {
            return Err(Refusal::IpRate);
        }
        Ok(())
    }

    /// Forget the addresses not seen in second `now`.
    pub(crate) fn sweep(&mut self, now: u32) {
        self.per_ip.retain(|_, (sec, _)| *sec == now);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::{Admission, Refusal};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_rate_is_per_address_and_per_second() {
        let mut a = Admission::new(2, 100);
        let (x, y) = (ip("10.0.0.1"), ip("2001:db8::1"));
        assert_eq!(a.ip(x, 7), Ok(()));
        assert_eq!(a.ip(x, 7), Ok(()));
        assert_eq!(a.ip(x, 7), Err(Refusal::IpRate));
        // Refused connects count: still refused in the same second.
        assert_eq!(a.ip(x, 7), Err(Refusal::IpRate));
        assert_eq!(a.ip(y, 7), Ok(()), "another address has its own budget");
        // The next second starts afresh.
        assert_eq!(a.ip(x, 8), Ok(()));
        assert_eq!(a.ip(x, 8), Ok(()));
        assert_eq!(a.ip(x, 8), Err(Refusal::IpRate));
    }

    #[test]
    fn no_rate_no_limit_and_no_memory() {
        let mut a = Admission::new(0, 100);
        for i in 0..1_000u32 {
            assert_eq!(a.ip(ip("10.0.0.1"), i / 100), Ok(()));
        }
        assert!(a.per_ip.is_empty());
    }

    #[test]
    fn the_sweep_forgets_addresses_of_past_seconds() {
        let mut a = Admission::new(1, 100);
        assert_eq!(a.ip(ip("10.0.0.1"), 1), Ok(()));
        assert_eq!(a.ip(ip("10.0.0.2"), 2), Ok(()));
        a.sweep(2);
        assert_eq!(a.per_ip.len(), 1);
        assert_eq!(a.ip(ip("10.0.0.2"), 2), Err(Refusal::IpRate));
        a.sweep(3);
        assert!(a.per_ip.is_empty());
    }

    #[test]
    fn draining_first_then_the_connection_cap() {
        let a = Admission::new(0, 3);
        assert_eq!(a.connection(false, 2), Ok(()));
        assert_eq!(a.connection(false, 3), Err(Refusal::MaxConnections));
        assert_eq!(a.connection(true, 0), Err(Refusal::Draining));
        assert_eq!(a.connection(true, 5), Err(Refusal::Draining));
    }

    /// What clients see, as before (router/tests assert the statuses).
    #[test]
    fn statuses_and_messages() {
        assert_eq!(
            (Refusal::Draining.status(), Refusal::Draining.message()),
            (
                "503 Service Unavailable",
                "router draining; reconnect elsewhere"
            )
        );
        assert_eq!(
            (
                Refusal::MaxConnections.status(),
                Refusal::MaxConnections.message()
            ),
            (
                "503 Service Unavailable",
                "connection limit reached; retry later"
            )
        );
        assert_eq!(
            (Refusal::IpRate.status(), Refusal::IpRate.message()),
            (
                "429 Too Many Requests",
                "too many connections from this address; slow down"
            )
        );
    }
}
