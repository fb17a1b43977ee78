//! skiff-echo: the server inside skiff's own test image.
//!
//! `skiff-echo [serve]` answers `<hostname> <pod-ip>\n` over HTTP (`GET /`, `/healthz`; `GET /whoami`
//! answers the client's `<ip>:<port>`), TCP (every
//! line) and UDP (every datagram); `skiff-echo pause` sleeps until SIGTERM/SIGINT (a pause
//! container). Modes are subcommands so benchmark servers (RR/CRR/STREAM) can be added beside
//! `serve` without touching it.
//!
//! std threads rather than an async runtime: the binary is built static for a busybox image and
//! should stay small; a thread per connection (capped) is plenty for a test and demo server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "skiff-echo", about = "HTTP/TCP/UDP echo server of skiff's test image")]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Mode {
    /// Serve HTTP, TCP and UDP (the default).
    Serve(ServeArgs),
    /// Sleep until SIGTERM or SIGINT, reaping children (a pod's pause container).
    Pause,
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ECHO_BIND", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// HTTP port (0 disables).
    #[arg(long, env = "ECHO_HTTP_PORT", default_value_t = 8080)]
    http_port: u16,
    /// TCP line-echo port (0 disables).
    #[arg(long, env = "ECHO_TCP_PORT", default_value_t = 9000)]
    tcp_port: u16,
    /// UDP datagram-echo port (0 disables).
    #[arg(long, env = "ECHO_UDP_PORT", default_value_t = 9001)]
    udp_port: u16,
    /// Overrides the address reported as the pod IP.
    #[arg(long, env = "POD_IP")]
    pod_ip: Option<IpAddr>,
    /// Seconds to keep serving after SIGTERM before exiting, with `/healthz` answering 503
    /// meanwhile (a lame duck): requests load balancers still send while the endpoint is being
    /// withdrawn get answers instead of refused connections.
    #[arg(long, env = "ECHO_SHUTDOWN_DELAY", default_value_t = 0)]
    shutdown_delay: u64,
}

/// Set once SIGTERM arrived and the shutdown delay runs.
static DRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Concurrent TCP/HTTP connections served at once; further ones are closed at accept.
const MAX_CONNECTIONS: usize = 512;
/// Bytes of one HTTP request head or one TCP line kept before the rest is cut off.
const MAX_LINE: u64 = 64 * 1024;
const MAX_HEAD_LINES: usize = 100;
const MAX_BODY: u64 = 1024 * 1024;
const MAX_REQUESTS_PER_CONNECTION: usize = 100_000;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

fn main() {
    let cli = Cli::parse();
    // Block the termination signals in every thread (threads inherit the mask) and take them
    // synchronously in one place: a process that is PID 1 in its namespace ignores SIGTERM unless
    // it handles it, and sigwait needs no async-signal-safety care.
    let signals = block_signals();
    let code = match cli.mode {
        Some(Mode::Pause) => {
            wait_for_termination(&signals, true);
            0
        }
        Some(Mode::Serve(args)) => run_serve(args, signals),
        None => run_serve(cli.serve, signals),
    };
    std::process::exit(code);
}

fn run_serve(args: ServeArgs, signals: SigSet) -> i32 {
    let delay = Duration::from_secs(args.shutdown_delay);
    match serve(args) {
        Ok(()) => {
            wait_for_termination(&signals, false);
            if !delay.is_zero() {
                DRAINING.store(true, Ordering::SeqCst);
                eprintln!("skiff-echo: terminating: serving {}s more, /healthz answers 503", delay.as_secs());
                std::thread::sleep(delay);
            }
            0
        }
        Err(e) => {
            eprintln!("skiff-echo: {e:#}");
            1
        }
    }
}

struct SigSet(libc::sigset_t);

fn block_signals() -> SigSet {
    // SAFETY: plain libc calls on a local sigset, before any other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        SigSet(set)
    }
}

/// Returns on SIGTERM or SIGINT. SIGCHLD reaps exited children (as a pause container must when it
/// is PID 1 of a shared PID namespace).
fn wait_for_termination(signals: &SigSet, reap: bool) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait on a set this process blocked; sig is a valid out pointer.
        let rc = unsafe { libc::sigwait(&signals.0, &mut sig) };
        if rc != 0 {
            continue;
        }
        match sig {
            libc::SIGTERM | libc::SIGINT => return,
            libc::SIGCHLD if reap => loop {
                // SAFETY: non-blocking waitpid for any child.
                let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
            },
            _ => {}
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let identity: Arc<str> = identity_line(args.pod_ip).into();
    let conns = Arc::new(AtomicUsize::new(0));
    let mut listening = Vec::new();
    if args.http_port != 0 {
        let l = TcpListener::bind(SocketAddr::new(args.bind, args.http_port))
            .with_context(|| format!("binding HTTP port {}", args.http_port))?;
        listening.push(format!("http :{}", args.http_port));
        spawn_accept(l, identity.clone(), conns.clone(), serve_http);
    }
    if args.tcp_port != 0 {
        let l = TcpListener::bind(SocketAddr::new(args.bind, args.tcp_port))
            .with_context(|| format!("binding TCP port {}", args.tcp_port))?;
        listening.push(format!("tcp :{}", args.tcp_port));
        spawn_accept(l, identity.clone(), conns.clone(), serve_tcp_lines);
    }
    if args.udp_port != 0 {
        let s = UdpSocket::bind(SocketAddr::new(args.bind, args.udp_port))
            .with_context(|| format!("binding UDP port {}", args.udp_port))?;
        listening.push(format!("udp :{}", args.udp_port));
        let id = identity.clone();
        std::thread::spawn(move || serve_udp(s, &id));
    }
    eprintln!("skiff-echo: {} answering {}", listening.join(", "), identity.trim_end());
    Ok(())
}

fn spawn_accept(
    listener: TcpListener,
    identity: Arc<str>,
    conns: Arc<AtomicUsize>,
    handler: fn(TcpStream, &str),
) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if conns.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                conns.fetch_sub(1, Ordering::SeqCst);
                continue; // dropping closes it
            }
            let id = identity.clone();
            let guard = ConnGuard(conns.clone());
            // If the thread cannot be spawned the closure is dropped, and the guard with it.
            let _ = std::thread::Builder::new().spawn(move || {
                let _guard = guard;
                let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
                let _ = stream.set_nodelay(true);
                handler(stream, &id);
            });
        }
    });
}

/// Counts a served connection until dropped.
struct ConnGuard(Arc<AtomicUsize>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `<hostname> <pod-ip>\n`.
fn identity_line(pod_ip: Option<IpAddr>) -> String {
    let ip = pod_ip.map(|ip| ip.to_string()).unwrap_or_else(|| {
        first_non_loopback_ipv4().map(|ip| ip.to_string()).unwrap_or_else(|| "0.0.0.0".into())
    });
    format!("{} {}\n", hostname(), ip)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn first_non_loopback_ipv4() -> Option<Ipv4Addr> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below with freeifaddrs; we only read sockaddr_in
    // when the family says AF_INET.
    unsafe {
        if libc::getifaddrs(&mut addrs) != 0 {
            return None;
        }
        let mut found = None;
        let mut cur = addrs;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() && i32::from((*sa).sa_family) == libc::AF_INET {
                let sin = &*(sa as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() {
                    found = Some(ip);
                    break;
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(addrs);
        found
    }
}

fn serve_udp(socket: UdpSocket, identity: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = socket.send_to(identity.as_bytes(), peer);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Answers every line (or every MAX_LINE bytes of an overlong one) with the identity.
fn serve_tcp_lines(stream: TcpStream, identity: &str) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if writer.write_all(identity.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

struct Request {
    method: String,
    path: String,
    keep_alive: bool,
    content_length: u64,
}

/// Reads one request head. `Ok(None)` is a clean EOF before any byte; `Err` a malformed request.
fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>, &'static str> {
    let mut line = Vec::new();
    let mut lines = 0;
    let mut request: Option<Request> = None;
    loop {
        line.clear();
        let n = reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line).map_err(|_| "read error")?;
        if n == 0 {
            return if request.is_none() && lines == 0 { Ok(None) } else { Err("truncated request") };
        }
        if line.last() != Some(&b'\n') {
            return Err("header line too long");
        }
        lines += 1;
        if lines > MAX_HEAD_LINES {
            return Err("too many header lines");
        }
        let text = std::str::from_utf8(&line).map_err(|_| "request is not UTF-8")?;
        let text = text.trim_end_matches(['\r', '\n']);
        match request.as_mut() {
            None => {
                if text.is_empty() {
                    continue; // tolerate blank lines between keep-alive requests
                }
                let mut parts = text.split(' ');
                let (Some(method), Some(target), Some(version), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err("malformed request line");
                };
                if !version.starts_with("HTTP/1.") {
                    return Err("unsupported HTTP version");
                }
                let path = target.split('?').next().unwrap_or(target).to_string();
                request = Some(Request {
                    method: method.to_string(),
                    path,
                    keep_alive: version != "HTTP/1.0",
                    content_length: 0,
                });
            }
            Some(req) => {
                if text.is_empty() {
                    return Ok(request);
                }
                let Some((name, value)) = text.split_once(':') else {
                    return Err("malformed header");
                };
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    req.content_length = value.parse().map_err(|_| "bad content-length")?;
                } else if name.eq_ignore_ascii_case("connection") {
                    if value.eq_ignore_ascii_case("close") {
                        req.keep_alive = false;
                    } else if value.eq_ignore_ascii_case("keep-alive") {
                        req.keep_alive = true;
                    }
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err("transfer-encoding is not supported");
                }
            }
        }
    }
}

fn respond(w: &mut TcpStream, status: &str, body: &str, head_only: bool, keep_alive: bool) -> bool {
    let conn = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    w.write_all(out.as_bytes()).is_ok()
}

fn serve_http(stream: TcpStream, identity: &str) {
    // `GET /whoami` answers the client's address as this server sees it (`<ip>:<port>\n`), so a
    // test can tell whether a load balancer kept the source address (externalTrafficPolicy=Local)
    // or replaced it (SNAT).
    let whoami = stream.peer_addr().map(|a| format!("{a}\n")).unwrap_or_else(|_| "unknown\n".into());
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let req = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(why) => {
                respond(&mut writer, "400 Bad Request", &format!("{why}\n"), false, false);
                return;
            }
        };
        if req.content_length > MAX_BODY {
            respond(&mut writer, "413 Payload Too Large", "body too large\n", false, false);
            return;
        }
        // Discard a body so the next request on the connection starts at its own first byte.
        let copied = std::io::copy(&mut reader.by_ref().take(req.content_length), &mut std::io::sink());
        if copied.map(|n| n != req.content_length).unwrap_or(true) {
            return;
        }
        let head_only = req.method == "HEAD";
        let get = req.method == "GET" || head_only;
        let (status, body) = match (get, req.path.as_str()) {
            (true, "/") => ("200 OK", identity),
            (true, "/healthz") if DRAINING.load(Ordering::SeqCst) => ("503 Service Unavailable", "draining\n"),
            (true, "/healthz") => ("200 OK", "ok\n"),
            (true, "/whoami") => ("200 OK", whoami.as_str()),
            _ => ("404 Not Found", "not found\n"),
        };
        if !respond(&mut writer, status, body, head_only, req.keep_alive) || !req.keep_alive {
            return;
        }
    }
}
