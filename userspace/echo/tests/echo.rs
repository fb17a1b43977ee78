//! skiff-echo as a process on loopback: every protocol, bad input, and SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

struct Echo {
    child: Child,
    http: u16,
    tcp: u16,
    udp: u16,
}

impl Echo {
    /// Spawns skiff-echo on three free ports and waits until its HTTP and TCP ports accept.
    /// A free port is only free when asked: a test running beside this one may take it before
    /// skiff-echo binds it, and skiff-echo then exits on the bind error. So a start whose
    /// process exits is retried on new ports (a few times), rather than failing the test on
    /// a "connection refused" that has nothing to do with skiff-echo.
    fn start() -> Echo {
        for _attempt in 0..5 {
            let (http, tcp, udp) = (free_port(), free_port(), free_port());
            if http == tcp || tcp == udp || http == udp {
                continue;
            }
            let child = Command::new(env!("CARGO_BIN_EXE_skiff-echo"))
                .args(["--bind", "127.0.0.1", "--http-port", &http.to_string(), "--tcp-port", &tcp.to_string()])
                .env("ECHO_UDP_PORT", udp.to_string())
                .env("POD_IP", "10.1.2.3")
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn skiff-echo");
            let mut e = Echo { child, http, tcp, udp };
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut exited = false;
            while TcpStream::connect(("127.0.0.1", e.http)).is_err()
                || TcpStream::connect(("127.0.0.1", e.tcp)).is_err()
            {
                if e.child.try_wait().expect("try_wait").is_some() {
                    exited = true;
                    break;
                }
                assert!(Instant::now() < deadline, "skiff-echo did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
            // The UDP socket is bound right after the TCP listener; a bind error ends the process.
            std::thread::sleep(Duration::from_millis(50));
            if exited || e.child.try_wait().expect("try_wait").is_some() {
                continue;
            }
            return e;
        }
        panic!("skiff-echo exited on start five times (its ports taken each time?)");
    }

    fn http(&self, request: &[u8]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.http)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s.write_all(request).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn terminate(mut self) -> (i32, Duration) {
        let t = Instant::now();
        // SAFETY: kill on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let code = self.child.wait().expect("wait").code().unwrap_or(-1);
        (code, t.elapsed())
    }
}

fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    format!("{} 10.1.2.3\n", host.trim())
}

#[test]
fn http_answers_identity_healthz_and_404() {
    let e = Echo::start();
    let r = e.http(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.ends_with(&format!("\r\n\r\n{}", identity())), "{r}");
    assert!(e.http(b"GET /healthz?x=1 HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200"));
    assert!(e.http(b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(e.http(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc").starts_with("HTTP/1.1 404"));
    assert!(e.http(b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(e.http(&[0xff, 0xfe, b'\r', b'\n', b'\r', b'\n']).starts_with("HTTP/1.1 400"));
    assert!(e.http(b"GET / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n").starts_with("HTTP/1.1 413"));
    // Keep-alive: two requests, two answers on one connection.
    let r = e.http(b"GET / HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(r.matches("HTTP/1.1 200 OK").count(), 2, "{r}");
    let (code, took) = e.terminate();
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn tcp_lines_and_udp_datagrams() {
    let e = Echo::start();
    let s = TcpStream::connect(("127.0.0.1", e.tcp)).expect("connect");
    let mut w = s.try_clone().expect("clone");
    w.write_all(b"one\ntwo\n").expect("write");
    let mut r = BufReader::new(s);
    for _ in 0..2 {
        let mut line = String::new();
        r.read_line(&mut line).expect("read");
        assert_eq!(line, identity());
    }
    let u = UdpSocket::bind("127.0.0.1:0").expect("udp");
    u.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    u.send_to(b"ping", ("127.0.0.1", e.udp)).expect("send");
    let mut buf = [0u8; 256];
    let (n, _) = u.recv_from(&mut buf).expect("recv");
    assert_eq!(std::str::from_utf8(&buf[..n]).expect("utf8"), identity());
    assert_eq!(e.terminate().0, 0);
}

#[test]
fn pause_exits_zero_on_sigterm_and_sigint() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_skiff-echo")).arg("pause").spawn().expect("spawn");
        std::thread::sleep(Duration::from_millis(200));
        assert!(child.try_wait().expect("try_wait").is_none(), "pause keeps running");
        // SAFETY: kill on our own unreaped child.
        unsafe { libc::kill(child.id() as i32, sig) };
        assert_eq!(child.wait().expect("wait").code(), Some(0));
    }
}

#[test]
fn bad_flags_fail_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff-echo")).args(["--http-port", "notaport"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value"));
}

#[test]
fn whoami_answers_the_clients_address() {
    let e = Echo::start();
    let mut s = TcpStream::connect(("127.0.0.1", e.http)).expect("connect");
    let me = s.local_addr().expect("local addr");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(b"GET /whoami HTTP/1.1\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.ends_with(&format!("\r\n\r\n{me}\n")), "answers {me}: {out}");
    e.terminate();
}

#[test]
fn shutdown_delay_keeps_serving_after_sigterm_with_healthz_failing() {
    let (http, tcp, udp) = (free_port(), free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_skiff-echo"))
        .args(["--bind", "127.0.0.1", "--http-port", &http.to_string(), "--tcp-port", &tcp.to_string(), "--udp-port", &udp.to_string()])
        .env("ECHO_SHUTDOWN_DELAY", "1")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn skiff-echo");
    let get = |path: &str| -> String {
        let mut s = TcpStream::connect(("127.0.0.1", http)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s.write_all(format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes()).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(Instant::now() < deadline, "skiff-echo did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(get("/healthz").starts_with("HTTP/1.1 200"));
    let t = Instant::now();
    // SAFETY: kill on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(200));
    assert!(get("/").starts_with("HTTP/1.1 200"), "still serving after SIGTERM");
    assert!(get("/healthz").starts_with("HTTP/1.1 503"), "but no longer ready");
    let code = child.wait().expect("wait").code();
    assert_eq!(code, Some(0));
    assert!(t.elapsed() >= Duration::from_secs(1), "stayed up for the delay: {:?}", t.elapsed());
}
