//! Stale connected UDP sockets (cilium #12859): the socket layer translates a connected UDP
//! socket once, at connect(); its later send()s never pass a hook, so when its backend is removed
//! the socket keeps sending to an address that is gone (a DNS client black-holed until it
//! reconnects by itself, which many never do). Purging conntrack cannot help: there is none.
//!
//! What skiff does (as Cilium does, there with a BPF socket iterator): after backends go, the
//! agent sweeps each network namespace it serves with `sock_diag` and destroys
//! (`SOCK_DESTROY`, CONFIG_INET_DIAG_DESTROY) every connected UDP socket that the socket layer
//! translated (its cookie and peer are in SOCK_REVNAT) to a backend that no longer exists for
//! that service. The application sees ECONNABORTED on its next call and reconnects; the new
//! connect() picks a live backend. Sockets the socket layer did not translate (a client talking
//! to a pod IP on purpose) are never touched, and terminating backends keep their sockets
//! (graceful termination).
//!
//! Hand-written netlink rather than a crate: the dump request, its answers and the destroy
//! request are three fixed-layout structs, and no netlink crate is in the dependency tree.

use std::{
    collections::BTreeSet,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use skiff_ebpf_common::{Addr, SockRevKey};

use crate::{Datapath, DatapathError};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const TCPF_ESTABLISHED: u32 = 1 << 1; // a connected UDP socket reports TCP_ESTABLISHED
const NLMSG_HDR_LEN: usize = 16;
const SOCKID_LEN: usize = 48;
const REQ_LEN: usize = 8 + SOCKID_LEN; // inet_diag_req_v2
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20; // inet_diag_msg

/// One connected UDP socket as `sock_diag` reports it (the raw `inet_diag_sockid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocketId {
    pub local: Ipv4Addr,
    pub local_port: u16,
    pub peer: Ipv4Addr,
    pub peer_port: u16,
    pub cookie: u64,
    raw: [u8; SOCKID_LEN],
}

impl UdpSocketId {
    /// Parses an `inet_diag_sockid` (ports and addresses in network byte order, cookie in host).
    fn parse(raw: &[u8]) -> Option<UdpSocketId> {
        let raw: [u8; SOCKID_LEN] = raw.get(..SOCKID_LEN)?.try_into().ok()?;
        let ip = |o: usize| Ipv4Addr::new(raw[o], raw[o + 1], raw[o + 2], raw[o + 3]);
        let lo = u32::from_ne_bytes([raw[40], raw[41], raw[42], raw[43]]) as u64;
        let hi = u32::from_ne_bytes([raw[44], raw[45], raw[46], raw[47]]) as u64;
        Some(UdpSocketId {
            local_port: u16::from_be_bytes([raw[0], raw[1]]),
            peer_port: u16::from_be_bytes([raw[2], raw[3]]),
            local: ip(4),
            peer: ip(20),
            cookie: lo | (hi << 32),
            raw,
        })
    }
}

fn nl_socket() -> Result<OwnedFd, DatapathError> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(DatapathError::Io {
            what: "opening a sock_diag netlink socket".into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn request(kind: u16, flags: u16, seq: u32, id: Option<&[u8; SOCKID_LEN]>) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    m.push(libc::AF_INET as u8); // sdiag_family
    m.push(libc::IPPROTO_UDP as u8); // sdiag_protocol
    m.push(0); // idiag_ext
    m.push(0); // pad
    m.extend_from_slice(&TCPF_ESTABLISHED.to_ne_bytes());
    match id {
        Some(id) => m.extend_from_slice(id),
        None => m.extend_from_slice(&[0u8; SOCKID_LEN]),
    }
    m
}

fn send(fd: &OwnedFd, msg: &[u8]) -> Result<(), DatapathError> {
    // SAFETY: msg is a valid buffer; an unconnected netlink socket sends to the kernel.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(DatapathError::Io {
            what: "sending a sock_diag request".into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Reads netlink answers until DONE (dump) or the ACK/error (single request). Calls `each` for
/// every payload of type `want`. Returns the errno of an NLMSG_ERROR (0 = ACK).
fn receive(fd: &OwnedFd, want: u16, mut each: impl FnMut(&[u8])) -> Result<i32, DatapathError> {
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded: a namespace has finitely many sockets; the cap stops a confused kernel answer.
    for _ in 0..100_000 {
        // SAFETY: buf is a valid, writable buffer of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(DatapathError::Io {
                what: "reading sock_diag answers".into(),
                source: io::Error::last_os_error(),
            });
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDR_LEN {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < NLMSG_HDR_LEN || len > rest.len() {
                return Ok(0);
            }
            let payload = &rest[NLMSG_HDR_LEN..len];
            match kind {
                NLMSG_DONE => return Ok(0),
                NLMSG_ERROR => {
                    let err = payload
                        .get(..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    return Ok(-err);
                }
                k if k == want => each(payload),
                _ => {}
            }
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }
    Ok(0)
}

/// Lists the connected IPv4 UDP sockets of the calling thread's network namespace.
pub fn connected_udp_sockets() -> Result<Vec<UdpSocketId>, DatapathError> {
    let fd = nl_socket()?;
    send(
        &fd,
        &request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, None),
    )?;
    let mut out = Vec::new();
    let errno = receive(&fd, SOCK_DIAG_BY_FAMILY, |p| {
        if p.len() >= DIAG_MSG_LEN
            && let Some(id) = UdpSocketId::parse(&p[4..4 + SOCKID_LEN])
        {
            out.push(id);
        }
    })?;
    if errno != 0 {
        return Err(DatapathError::Io {
            what: "listing udp sockets with sock_diag".into(),
            source: io::Error::from_raw_os_error(errno),
        });
    }
    Ok(out)
}

/// Destroys one UDP socket (it sees ECONNABORTED). A socket already gone is not an error.
pub fn destroy_udp_socket(id: &UdpSocketId) -> Result<(), DatapathError> {
    let fd = nl_socket()?;
    send(
        &fd,
        &request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 2, Some(&id.raw)),
    )?;
    match receive(&fd, SOCK_DESTROY, |_| {})? {
        0 => Ok(()),
        e if e == libc::ENOENT => Ok(()),
        e if e == libc::EOPNOTSUPP => Err(DatapathError::Io {
            what: "destroying a stale udp socket (the kernel lacks CONFIG_INET_DIAG_DESTROY)"
                .into(),
            source: io::Error::from_raw_os_error(e),
        }),
        e => Err(DatapathError::Io {
            what: format!(
                "destroying the stale udp socket {}:{} -> {}:{}",
                id.local, id.local_port, id.peer, id.peer_port
            ),
            source: io::Error::from_raw_os_error(e),
        }),
    }
}

impl Datapath {
    /// Destroys, in the calling thread's network namespace, every connected UDP socket that the
    /// socket layer translated to a backend its service no longer has (see the module docs).
    /// Idempotent and level-triggered: call it in each pod's namespace (and the node's) after
    /// service updates remove backends. Returns how many sockets were destroyed.
    pub fn destroy_stale_udp_sockets(&self) -> Result<usize, DatapathError> {
        let sockets = connected_udp_sockets()?;
        if sockets.is_empty() {
            return Ok(0);
        }
        // (service id, backend address, backend port) of every backend that exists now.
        let live: BTreeSet<(u32, Addr, u16)> = self
            .state
            .backends
            .values()
            .map(|b| (b.service_id, b.addr, b.port))
            .collect();
        let mut destroyed = 0;
        for s in &sockets {
            let key = SockRevKey {
                cookie: s.cookie,
                backend_addr: Addr::v4(s.peer.octets()),
                backend_port: skiff_ebpf_common::port_to_raw(s.peer_port),
                _pad: [0; 6],
            };
            let Ok(rev) = self.sock_revnat.get(&key, 0) else {
                continue; // not translated by the socket layer: leave it alone
            };
            if live.contains(&(rev.service_id, key.backend_addr, key.backend_port)) {
                continue;
            }
            destroy_udp_socket(s)?;
            destroyed += 1;
        }
        Ok(destroyed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockid_parses_ports_addresses_and_cookie() {
        let mut raw = [0u8; SOCKID_LEN];
        raw[0..2].copy_from_slice(&5353u16.to_be_bytes());
        raw[2..4].copy_from_slice(&53u16.to_be_bytes());
        raw[4..8].copy_from_slice(&[10, 244, 0, 2]);
        raw[20..24].copy_from_slice(&[10, 244, 0, 3]);
        raw[40..44].copy_from_slice(&0x1234_5678u32.to_ne_bytes());
        raw[44..48].copy_from_slice(&0x9u32.to_ne_bytes());
        let id = UdpSocketId::parse(&raw).expect("parse");
        assert_eq!(id.local_port, 5353);
        assert_eq!(id.peer_port, 53);
        assert_eq!(id.local, Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(id.peer, Ipv4Addr::new(10, 244, 0, 3));
        assert_eq!(id.cookie, 0x9_1234_5678);
        assert!(UdpSocketId::parse(&raw[..10]).is_none());
    }

    #[test]
    fn requests_have_the_kernel_layout() {
        let m = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            Some(&[1u8; SOCKID_LEN]),
        );
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 72);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), SOCK_DESTROY);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], libc::IPPROTO_UDP as u8);
        assert_eq!(&m[24..], &[1u8; SOCKID_LEN]);
    }
}
