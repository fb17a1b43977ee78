//! `exec` over a websocket in Kubernetes' channel protocol (`v5.channel.k8s.io`, `v4.channel.k8s.io`):
//! every binary message starts with a channel byte (0 stdin, 1 stdout, 2 stderr, 3 status,
//! 4 resize); in v5 the message `[255, ch]` closes the client's stream `ch` (stdin's EOF).
//! The framing is pure (tested below); [`run_session`] wires it to a process.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Child;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::debug;

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const STATUS: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5: `[CLOSE, ch]` says the peer will send no more on `ch`.
pub const CLOSE: u8 = 255;

/// After the process exits, how long its output may still drain (a grandchild holding the
/// pipe open must not hold the session forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    V5,
    V4,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V5 => "v5.channel.k8s.io",
            Protocol::V4 => "v4.channel.k8s.io",
        }
    }
}

/// The best protocol of a `Sec-WebSocket-Protocol` offer (comma-separated, possibly in
/// several headers). Older ones (v1-v3, base64) are not spoken: kubectl 1.30+ offers v5.
pub fn negotiate<'a>(offers: impl IntoIterator<Item = &'a str>) -> Option<Protocol> {
    let offered: Vec<String> = offers.into_iter().flat_map(|h| h.split(',')).map(|p| p.trim().to_string()).collect();
    [Protocol::V5, Protocol::V4].into_iter().find(|p| offered.iter().any(|o| o == p.name()))
}

pub fn frame(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    v
}

/// What a message from the client means.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Stdin(Vec<u8>),
    Resize { width: u16, height: u16 },
    CloseStdin,
    /// Anything else (an unknown channel, a malformed resize, an empty message): ignored.
    Ignored,
}

pub fn parse_inbound(protocol: Protocol, msg: &[u8]) -> Inbound {
    let Some((&ch, data)) = msg.split_first() else { return Inbound::Ignored };
    match ch {
        STDIN => Inbound::Stdin(data.to_vec()),
        RESIZE => {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "PascalCase")]
            struct Size {
                width: u16,
                height: u16,
            }
            match serde_json::from_slice::<Size>(data) {
                Ok(s) => Inbound::Resize { width: s.width, height: s.height },
                Err(_) => Inbound::Ignored,
            }
        }
        CLOSE if protocol == Protocol::V5 && data.first() == Some(&STDIN) => Inbound::CloseStdin,
        _ => Inbound::Ignored,
    }
}

/// The status message ending a session (what kubectl turns into its own exit code).
pub fn status(argv: &[String], exit: Result<i32, String>) -> Value {
    match exit {
        Ok(0) => json!({"metadata": {}, "status": "Success"}),
        Ok(code) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {argv:?}, exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Err(message) => json!({"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError"}),
    }
}

/// An exit status as a shell reports it (128 + signal when killed).
pub fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().or_else(|| st.signal().map(|s| 128 + s)).unwrap_or(1)
}

/// Which streams the client asked for (exec's query).
#[derive(Clone, Copy, Debug, Default)]
pub struct Streams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// Sets a pty's window size (the pty master is the process's stdin in tty mode).
fn resize(fd: &OwnedFd, width: u16, height: u16) {
    let ws = libc::winsize { ws_row: height, ws_col: width, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; fd is open (owned here). On a
    // non-terminal it fails with ENOTTY, which is harmless.
    unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws);
    }
}

/// Copies a blocking reader into the websocket as `channel` messages, on its own thread: the
/// runtime hands plain pipes or a pty master, both blocking fds. Output nobody asked for is
/// still read (and dropped) so the process never blocks on a full pipe.
fn pump(mut r: impl Read + Send + 'static, channel: u8, forward: bool, tx: mpsc::Sender<Message>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if forward && tx.blocking_send(Message::Binary(frame(channel, &buf[..n]).into())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A pty master reads EIO once the last slave fd closes: that is its EOF.
                Err(_) => return,
            }
        }
    })
}

/// Runs one exec session: relays stdin/stdout/stderr between `ws` and `child`, then sends the
/// exit status on channel 3 and closes.
pub async fn run_session<S>(ws: WebSocketStream<S>, protocol: Protocol, mut child: Child, argv: Vec<String>, streams: Streams)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(64);

    // In tty mode stdin is the pty master: keep a handle for resizes.
    let pty: Option<OwnedFd> = match (&child.stdin, streams.tty) {
        (Some(stdin), true) => stdin.as_fd_dup(),
        _ => None,
    };
    let stdin = if streams.stdin { child.stdin.take() } else { None };
    // Not asked for: closed now, so the process sees EOF.
    drop(child.stdin.take());
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(pump(out, STDOUT, streams.stdout, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(pump(err, STDERR, streams.stderr, tx.clone()));
    }

    // stdin: a thread that writes what the reader task hands it; dropping the sender is EOF.
    let (stdin_tx, stdin_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let stdin_thread = stdin.map(|mut w| {
        std::thread::spawn(move || {
            while let Ok(data) = stdin_rx.recv() {
                if w.write_all(&data).and_then(|_| w.flush()).is_err() {
                    return;
                }
            }
        })
    });
    let mut stdin_tx = Some(stdin_tx);

    // The writer: everything to the client goes through one task, so the status is last.
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let last = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() {
                return;
            }
            if last {
                return;
            }
        }
        let _ = sink.close().await;
    });

    // The reader: client messages until it closes (or the session ends).
    let reader = tokio::spawn(async move {
        while let Some(msg) = source.next().await {
            let data = match msg {
                Ok(Message::Binary(b)) => b.to_vec(),
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            match parse_inbound(protocol, &data) {
                Inbound::Stdin(d) => {
                    if let Some(t) = &stdin_tx {
                        let _ = t.send(d);
                    }
                }
                Inbound::CloseStdin => stdin_tx = None,
                Inbound::Resize { width, height } => {
                    if let Some(fd) = &pty {
                        resize(fd, width, height);
                    }
                }
                Inbound::Ignored => {}
            }
        }
        // The client went: its stdin ends (the process itself is left to finish, as kubelet does).
        drop(stdin_tx);
    });

    let exit = tokio::task::spawn_blocking(move || child.wait().map(exit_code).map_err(|e| format!("waiting for the process: {e}")))
        .await
        .unwrap_or_else(|e| Err(format!("waiting for the process: {e}")));
    let drained = tokio::task::spawn_blocking(move || {
        for p in pumps {
            let _ = p.join();
        }
    });
    if tokio::time::timeout(DRAIN_AFTER_EXIT, drained).await.is_err() {
        debug!("exec output still open {DRAIN_AFTER_EXIT:?} after the process exited; ending the session");
    }
    let st = status(&argv, exit);
    let _ = tx.send(Message::Binary(frame(STATUS, st.to_string().as_bytes()).into())).await;
    let _ = tx.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))).await;
    drop(tx);
    let _ = writer.await;
    reader.abort();
    if let Some(t) = stdin_thread {
        // Ends once its channel closes (reader gone) or the pipe breaks; never joined on a
        // blocked write.
        drop(t);
    }
}

trait FdDup {
    fn as_fd_dup(&self) -> Option<OwnedFd>;
}

impl FdDup for std::process::ChildStdin {
    fn as_fd_dup(&self) -> Option<OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_prefers_v5_and_refuses_unknown() {
        assert_eq!(negotiate(["v4.channel.k8s.io, v5.channel.k8s.io"]), Some(Protocol::V5));
        assert_eq!(negotiate(["v4.channel.k8s.io", "channel.k8s.io"]), Some(Protocol::V4));
        assert_eq!(negotiate(["base64.channel.k8s.io"]), None);
        assert_eq!(negotiate([""]), None);
    }

    #[test]
    fn frames_carry_the_channel_first() {
        assert_eq!(frame(STDOUT, b"hi"), vec![1, b'h', b'i']);
        assert_eq!(frame(STATUS, b""), vec![3]);
    }

    #[test]
    fn inbound_messages() {
        assert_eq!(parse_inbound(Protocol::V5, &[0, b'a']), Inbound::Stdin(b"a".to_vec()));
        assert_eq!(parse_inbound(Protocol::V5, &[255, 0]), Inbound::CloseStdin);
        // v4 has no close signal.
        assert_eq!(parse_inbound(Protocol::V4, &[255, 0]), Inbound::Ignored);
        assert_eq!(parse_inbound(Protocol::V5, &[255, 1]), Inbound::Ignored);
        assert_eq!(parse_inbound(Protocol::V5, b"\x04{\"Width\":80,\"Height\":24}"), Inbound::Resize { width: 80, height: 24 });
        assert_eq!(parse_inbound(Protocol::V5, b"\x04{not json"), Inbound::Ignored);
        assert_eq!(parse_inbound(Protocol::V5, &[]), Inbound::Ignored);
        assert_eq!(parse_inbound(Protocol::V5, &[9, 1, 2]), Inbound::Ignored);
    }

    #[test]
    fn status_says_success_or_the_exit_code() {
        let argv = vec!["sh".to_string(), "-c".to_string(), "exit 3".to_string()];
        assert_eq!(status(&argv, Ok(0))["status"], "Success");
        let f = status(&argv, Ok(3));
        assert_eq!(f["status"], "Failure");
        assert_eq!(f["reason"], "NonZeroExitCode");
        assert_eq!(f["details"]["causes"][0], json!({"reason": "ExitCode", "message": "3"}));
        assert_eq!(status(&argv, Err("boom".into()))["reason"], "InternalError");
    }

    #[test]
    fn signals_map_to_128_plus() {
        let st = std::process::Command::new("sh").args(["-c", "kill -9 $$"]).status().expect("sh");
        assert_eq!(exit_code(st), 137);
        let st = std::process::Command::new("sh").args(["-c", "exit 7"]).status().expect("sh");
        assert_eq!(exit_code(st), 7);
    }
}
