//! The server and client programs every path is measured with (netperf's workloads).
//!
//! Server: for each port, a pool of threads blocking in accept() on one TCP listener (a pool, not
//! a thread per connection, so TCP_CRR measures connections and not thread creation) and one
//! thread echoing on a UDP socket. A TCP connection whose first byte is `S` is a TCP_STREAM sink:
//! the server counts bytes to EOF and answers the count (8 bytes, little endian); any other
//! connection is echoed byte for byte (TCP_RR, TCP_CRR).
//!
//! Client workloads, each bounded by its duration (and by per-operation timeouts):
//! - `crr`: connect, write 1 byte, read 1 byte, close; `parallel` threads; rate and latency of the
//!   whole exchange.
//! - `rr`: one connection, 1 byte each way, back to back; rate, p50/p99.
//! - `stream`: one connection, 128 KiB writes; Gbit/s as the server counted them.
//! - `udp_rr`: one connected UDP socket, 1 byte each way; rate, p50/p99; a reply that does not
//!   come within 200 ms counts as an error.
//!
//! Targets are used round-robin (each thread starts at its own offset), so connections spread
//! over every probe Service (or every real endpoint, for the direct path).

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Crr,
    Rr,
    Stream,
    UdpRr,
}

/// One workload to run: a kind and its parallelism.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub kind: Kind,
    pub parallel: usize,
}

impl Workload {
    /// The name used in records and tables: `crr`, `crr_x4`, `rr`, `stream`, `udp_rr`.
    pub fn name(&self) -> String {
        let base = match self.kind {
            Kind::Crr => "crr",
            Kind::Rr => "rr",
            Kind::Stream => "stream",
            Kind::UdpRr => "udp_rr",
        };
        if self.parallel > 1 {
            format!("{base}_x{}", self.parallel)
        } else {
            base.to_string()
        }
    }

    /// Parses `crr`, `crr_x4`, `rr`, `stream`, `udp_rr` (and `_xN` on any of them).
    pub fn parse(s: &str) -> Result<Workload, String> {
        let (base, parallel) = match s.rsplit_once("_x") {
            Some((b, n)) => (
                b,
                n.parse::<usize>()
                    .map_err(|_| format!("bad parallelism in workload {s:?}"))?,
            ),
            None => (s, 1),
        };
        if parallel == 0 || parallel > 64 {
            return Err(format!("workload {s:?}: parallelism must be 1..=64"));
        }
        let kind = match base {
            "crr" => Kind::Crr,
            "rr" => Kind::Rr,
            "stream" => Kind::Stream,
            "udp_rr" => Kind::UdpRr,
            _ => {
                return Err(format!(
                    "unknown workload {s:?} (crr, rr, stream, udp_rr, optionally _xN)"
                ));
            }
        };
        Ok(Workload { kind, parallel })
    }
}

/// What one workload measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Measurement {
    pub workload: String,
    /// Completed transactions (connections for crr, round trips for rr/udp_rr).
    pub transactions: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Transactions per second.
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// TCP_STREAM only: payload bits per second as the server received them, in Gbit/s.
    pub gbit_s: f64,
    /// The first error seen, if any (for the report).
    pub first_error: Option<String>,
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);
const UDP_TIMEOUT: Duration = Duration::from_millis(200);
const STREAM_CHUNK: usize = 128 * 1024;

// ---------------------------------------------------------------- server

/// Serves `ports` on `ip` with `workers` accept threads per TCP port, until `stop` is set (the
/// threads are daemons of a process that exits when told to; `stop` bounds the UDP loops).
pub fn serve(
    ip: std::net::Ipv4Addr,
    ports: &[u16],
    workers: usize,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    for &port in ports {
        let l = Arc::new(TcpListener::bind(SocketAddrV4::new(ip, port))?);
        for _ in 0..workers {
            let l = l.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((s, _)) = l.accept() {
                        serve_tcp(s);
                    }
                }
            });
        }
        let u = UdpSocket::bind(SocketAddrV4::new(ip, port))?;
        u.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(&buf[..n], from);
                }
            }
        });
    }
    Ok(())
}

fn serve_tcp(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = vec![0u8; STREAM_CHUNK];
    let n = match s.read(&mut buf) {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    if buf[0] == b'S' {
        let mut total = (n - 1) as u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(_) => return,
            }
        }
        let _ = s.write_all(&total.to_le_bytes());
        return;
    }
    if s.write_all(&buf[..n]).is_err() {
        return;
    }
    loop {
        match s.read(&mut buf[..64]) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------- client

fn histogram() -> Histogram<u64> {
    // 1 us .. 60 s in nanoseconds, 3 significant digits.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("static histogram bounds")
}

struct ThreadResult {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    bytes: u64,
}

impl ThreadResult {
    fn new() -> Self {
        ThreadResult {
            hist: histogram(),
            ok: 0,
            errors: 0,
            first_error: None,
            bytes: 0,
        }
    }
    fn record(&mut self, started: Instant) {
        let ns = started.elapsed().as_nanos() as u64;
        let _ = self.hist.record(ns.clamp(1_000, 60_000_000_000));
        self.ok += 1;
    }
    fn error(&mut self, what: &str, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {e}"));
        }
    }
}

/// Too many errors in a row means the path does not work: stop early rather than spin.
const MAX_ERRORS: u64 = 2_000;

fn crr_thread(targets: &[SocketAddrV4], offset: usize, deadline: Instant) -> ThreadResult {
    let mut r = ThreadResult::new();
    let mut i = offset;
    let mut byte = [b'c'; 1];
    while Instant::now() < deadline && r.errors < MAX_ERRORS {
        let dst = SocketAddr::V4(targets[i % targets.len()]);
        i += 1;
        let t = Instant::now();
        let mut s = match TcpStream::connect_timeout(&dst, IO_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                r.error("connect", e);
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        let res = s.write_all(&byte).and_then(|_| s.read_exact(&mut byte));
        drop(s);
        match res {
            Ok(()) => r.record(t),
            Err(e) => r.error("crr exchange", e),
        }
    }
    r
}

fn rr_thread(targets: &[SocketAddrV4], offset: usize, deadline: Instant) -> ThreadResult {
    let mut r = ThreadResult::new();
    let dst = SocketAddr::V4(targets[offset % targets.len()]);
    let mut s = match TcpStream::connect_timeout(&dst, IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            r.error("connect", e);
            return r;
        }
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let mut byte = [b'r'; 1];
    while Instant::now() < deadline {
        let t = Instant::now();
        match s.write_all(&byte).and_then(|_| s.read_exact(&mut byte)) {
            Ok(()) => r.record(t),
            Err(e) => {
                r.error("rr exchange", e);
                break;
            }
        }
    }
    r
}

fn stream_thread(targets: &[SocketAddrV4], offset: usize, deadline: Instant) -> ThreadResult {
    let mut r = ThreadResult::new();
    let dst = SocketAddr::V4(targets[offset % targets.len()]);
    let mut s = match TcpStream::connect_timeout(&dst, IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            r.error("connect", e);
            return r;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let mut buf = vec![0x5au8; STREAM_CHUNK];
    buf[0] = b'S';
    if let Err(e) = s.write_all(&buf) {
        r.error("stream write", e);
        return r;
    }
    buf[0] = 0x5a;
    while Instant::now() < deadline {
        if let Err(e) = s.write_all(&buf) {
            r.error("stream write", e);
            return r;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut count = [0u8; 8];
    match s.read_exact(&mut count) {
        Ok(()) => {
            r.bytes = u64::from_le_bytes(count);
            r.ok = 1;
        }
        Err(e) => r.error("stream count", e),
    }
    r
}

fn udp_thread(targets: &[SocketAddrV4], offset: usize, deadline: Instant) -> ThreadResult {
    let mut r = ThreadResult::new();
    let dst = targets[offset % targets.len()];
    let u = match UdpSocket::bind("0.0.0.0:0").and_then(|u| {
        u.connect(dst)?;
        u.set_read_timeout(Some(UDP_TIMEOUT))?;
        Ok(u)
    }) {
        Ok(u) => u,
        Err(e) => {
            r.error("udp socket", e);
            return r;
        }
    };
    let mut seq: u8 = 0;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline && r.errors < MAX_ERRORS {
        seq = seq.wrapping_add(1);
        let t = Instant::now();
        if let Err(e) = u.send(&[seq]) {
            r.error("udp send", e);
            continue;
        }
        // Late replies to an earlier (timed-out) request are skipped by their sequence byte.
        loop {
            match u.recv(&mut buf) {
                Ok(1) if buf[0] == seq => {
                    r.record(t);
                    break;
                }
                Ok(_) => continue,
                Err(e) => {
                    r.error("udp reply", e);
                    break;
                }
            }
        }
    }
    r
}

/// Runs one workload against `targets` for `duration` and summarizes it.
pub fn run(w: Workload, targets: &[SocketAddrV4], duration: Duration) -> Measurement {
    if targets.is_empty() {
        return Measurement {
            workload: w.name(),
            errors: 1,
            first_error: Some("no targets".into()),
            ..Default::default()
        };
    }
    let started = Instant::now();
    let deadline = started + duration;
    let results: Vec<ThreadResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..w.parallel)
            .map(|t| {
                // Spread thread offsets over the targets.
                let offset = t * targets.len().max(1) / w.parallel.max(1) + t;
                s.spawn(move || match w.kind {
                    Kind::Crr => crr_thread(targets, offset, deadline),
                    Kind::Rr => rr_thread(targets, offset, deadline),
                    Kind::Stream => stream_thread(targets, offset, deadline),
                    Kind::UdpRr => udp_thread(targets, offset, deadline),
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    let mut r = ThreadResult::new();
                    r.error("client thread", "panicked");
                    r
                })
            })
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut hist = histogram();
    let (mut ok, mut errors, mut bytes, mut first_error) = (0, 0, 0, None);
    for r in results {
        let _ = hist.add(&r.hist);
        ok += r.ok;
        errors += r.errors;
        bytes += r.bytes;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let pct = |q: f64| {
        if hist.is_empty() {
            0.0
        } else {
            hist.value_at_quantile(q) as f64 / 1000.0
        }
    };
    Measurement {
        workload: w.name(),
        transactions: ok,
        errors,
        seconds,
        rate: if w.kind == Kind::Stream {
            0.0
        } else {
            ok as f64 / seconds
        },
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        gbit_s: bytes as f64 * 8.0 / seconds / 1e9,
        first_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_round_trip() {
        for s in ["crr", "crr_x4", "rr", "stream", "udp_rr", "rr_x2"] {
            assert_eq!(Workload::parse(s).expect(s).name(), s);
        }
        assert!(Workload::parse("tcp").is_err());
        assert!(Workload::parse("crr_x0").is_err());
        assert!(Workload::parse("crr_xy").is_err());
    }

    /// The programs against each other on loopback (no lab needed): every workload answers.
    #[test]
    fn client_and_server_on_loopback() {
        let stop = Arc::new(AtomicBool::new(false));
        let ip = std::net::Ipv4Addr::LOCALHOST;
        // Ports picked from the ephemeral range's far end; bind failure means a collision.
        let port = 47_000 + (std::process::id() % 2000) as u16;
        serve(ip, &[port], 4, stop.clone()).expect("serve");
        let targets = [SocketAddrV4::new(ip, port)];
        let d = Duration::from_millis(300);
        for w in ["crr_x2", "rr", "stream", "udp_rr"] {
            let m = run(Workload::parse(w).expect("w"), &targets, d);
            assert_eq!(m.errors, 0, "{w}: {:?}", m.first_error);
            assert!(m.transactions > 0, "{w}");
            if w == "stream" {
                assert!(m.gbit_s > 0.01, "{m:?}");
            } else {
                assert!(m.p99_us >= m.p50_us && m.p50_us > 0.0, "{m:?}");
            }
        }
        stop.store(true, Ordering::Relaxed);
    }
}
