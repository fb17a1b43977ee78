//! Host-local IPAM from the node's podCIDR: one file per allocated address under `dataDir`
//! (named by the address, holding `containerId` and `ifname`), changed only under an exclusive
//! flock on `dataDir/lock`, so concurrent plugin processes never hand out one address twice.
//! Written by hand rather than by exec'ing the reference host-local plugin: the state is three
//! small files and the plugin then needs nothing else installed.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;

use crate::error::{CniError, CniResult, code};

const LOCK_FILE: &str = "lock";
const LAST_RESERVED: &str = "last_reserved_ip";

/// One allocation: which attachment holds which address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
}

/// The IPAM store in a directory; [`Ipam::lock`] gives the handle that reads and changes it.
pub struct Ipam {
    dir: PathBuf,
}

/// The store with its lock held (released on drop, when the file closes).
pub struct Locked {
    dir: PathBuf,
    _lock: File,
}

impl Ipam {
    pub fn new(dir: &Path) -> Ipam {
        Ipam {
            dir: dir.to_path_buf(),
        }
    }

    /// Takes the exclusive lock, waiting at most `timeout` (another ADD/DEL holds it for the
    /// length of one call; waiting longer means something hangs: answer "try again later").
    pub fn lock(&self, timeout: Duration) -> CniResult<Locked> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| CniError::io(format!("creating dataDir {}", self.dir.display()), e))?;
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CniError::io(format!("opening {}", path.display()), e))?;
        let deadline = Instant::now() + timeout;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(CniError::new(
                        code::TRY_AGAIN_LATER,
                        format!(
                            "the IPAM lock {} stayed held for {}s by another skiff-cni call",
                            path.display(),
                            timeout.as_secs()
                        ),
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(CniError::io(format!("locking {}", path.display()), e));
                }
            }
        }
        Ok(Locked {
            dir: self.dir.clone(),
            _lock: file,
        })
    }
}

fn parse_record(ip: Ipv4Addr, text: &str) -> Option<Allocation> {
    let mut lines = text.lines().map(str::trim);
    let container_id = lines.next()?.to_string();
    let ifname = lines.next()?.to_string();
    if container_id.is_empty() || ifname.is_empty() {
        return None;
    }
    Some(Allocation {
        ip,
        container_id,
        ifname,
    })
}

impl Locked {
    /// Every allocation in the store (files that are not addresses are skipped).
    pub fn list(&self) -> CniResult<Vec<Allocation>> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| CniError::io(format!("reading {}", self.dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| CniError::io(format!("reading {}", self.dir.display()), e))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let text = std::fs::read_to_string(entry.path())
                .map_err(|e| CniError::io(format!("reading {}", entry.path().display()), e))?;
            match parse_record(ip, &text) {
                Some(a) => out.push(a),
                None => {
                    tracing::warn!(file = %entry.path().display(), "ignoring unreadable IPAM record")
                }
            }
        }
        out.sort_by_key(|a| a.ip);
        Ok(out)
    }

    pub fn find(&self, container_id: &str, ifname: &str) -> CniResult<Option<Allocation>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname))
    }

    /// The address of `container_id`/`ifname`: the one it already holds (ADD is idempotent), or
    /// a free one from `net` (never the network, gateway or broadcast address), searched
    /// round-robin after the last one handed out so a freed address is not reused at once.
    /// Returns the allocation and whether it is new.
    pub fn allocate(
        &self,
        net: Ipv4Net,
        container_id: &str,
        ifname: &str,
    ) -> CniResult<(Allocation, bool)> {
        let existing = self.list()?;
        if let Some(a) = existing
            .iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
        {
            if net.contains(&a.ip) && a.ip != crate::config::first_host(net) {
                return Ok((a.clone(), false));
            }
            // The node's podCIDR changed under this attachment: give it an address of the new one.
            self.release_ip(a.ip)?;
        }
        let taken: std::collections::BTreeSet<Ipv4Addr> = existing.iter().map(|a| a.ip).collect();
        let first = u32::from(net.network()) + 2; // network, then the gateway
        let last = u32::from(net.broadcast()) - 1;
        if first > last {
            return Err(CniError::invalid_config(format!(
                "podCIDR {net} has no room for pods"
            )));
        }
        let size = last - first + 1;
        let start = std::fs::read_to_string(self.dir.join(LAST_RESERVED))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|v| (first..=last).contains(v))
            .map(|v| v - first + 1)
            .unwrap_or(0);
        for i in 0..size {
            let ip = Ipv4Addr::from(first + (start + i) % size);
            if taken.contains(&ip) {
                continue;
            }
            let alloc = Allocation {
                ip,
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            };
            self.write_record(&alloc)?;
            write_atomic(&self.dir.join(LAST_RESERVED), format!("{ip}\n").as_bytes())?;
            return Ok((alloc, true));
        }
        Err(CniError::new(
            code::IPAM_EXHAUSTED,
            format!(
                "no free address left in podCIDR {net}: all {size} pod addresses are allocated (see {})",
                self.dir.display()
            ),
        ))
    }

    fn write_record(&self, a: &Allocation) -> CniResult<()> {
        write_atomic(
            &self.dir.join(a.ip.to_string()),
            format!("{}\n{}\n", a.container_id, a.ifname).as_bytes(),
        )
    }

    /// Frees what `container_id`/`ifname` holds; returns it (None when it held nothing).
    pub fn release(&self, container_id: &str, ifname: &str) -> CniResult<Option<Allocation>> {
        let Some(a) = self.find(container_id, ifname)? else {
            return Ok(None);
        };
        self.release_ip(a.ip)?;
        Ok(Some(a))
    }

    pub fn release_ip(&self, ip: Ipv4Addr) -> CniResult<()> {
        let path = self.dir.join(ip.to_string());
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CniError::io(format!("removing {}", path.display()), e)),
        }
    }
}

/// Writes a file by rename, so a crash leaves the old content or the new, never half of it.
fn write_atomic(path: &Path, data: &[u8]) -> CniResult<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CniError::io(format!("writing {}", path.display()), e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Ipv4Net {
        "10.9.0.0/29".parse().expect("net")
    }

    #[test]
    fn allocates_skips_reserved_is_idempotent_and_exhausts() {
        let dir = tempfile::tempdir().expect("tmp");
        let ipam = Ipam::new(dir.path());
        let l = ipam.lock(Duration::from_secs(1)).expect("lock");
        // /29: .0 network, .1 gateway, .7 broadcast -> .2 ..= .6
        let mut got = Vec::new();
        for i in 0..5 {
            let (a, new) = l.allocate(net(), &format!("c{i}"), "eth0").expect("alloc");
            assert!(new);
            got.push(a.ip);
        }
        let want: Vec<Ipv4Addr> = (2..=6).map(|o| Ipv4Addr::new(10, 9, 0, o)).collect();
        assert_eq!(got, want);
        let (again, new) = l.allocate(net(), "c3", "eth0").expect("same");
        assert!(!new);
        assert_eq!(again.ip, Ipv4Addr::new(10, 9, 0, 5));
        let err = l.allocate(net(), "c9", "eth0").expect_err("full");
        assert_eq!(err.code, code::IPAM_EXHAUSTED);
        assert_eq!(
            l.list().expect("list").len(),
            5,
            "a failed allocation writes nothing"
        );
        // Freed addresses are reused only after the others (round robin).
        assert_eq!(
            l.release("c1", "eth0").expect("rel").map(|a| a.ip),
            Some(want[1])
        );
        assert_eq!(l.release("c1", "eth0").expect("rel twice"), None);
        let (a, _) = l.allocate(net(), "c10", "eth0").expect("realloc");
        assert_eq!(a.ip, want[1]);
    }

    #[test]
    fn lock_times_out_with_try_again_later() {
        let dir = tempfile::tempdir().expect("tmp");
        let ipam = Ipam::new(dir.path());
        let _held = ipam.lock(Duration::from_secs(1)).expect("lock");
        // A second open file description conflicts with the first flock, even in one process.
        let err = ipam
            .lock(Duration::from_millis(100))
            .err()
            .expect("second lock waits");
        assert_eq!(err.code, code::TRY_AGAIN_LATER);
    }
}
