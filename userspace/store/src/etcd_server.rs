//! Starting a real, single-member etcd on loopback, for tests and benchmarks (the etcd backend's
//! conformance suite, the apiserver's etcd tests, bench/).
//!
//! The server listens on free loopback ports, keeps its data in a directory the caller owns, and
//! is stopped by the PID this module started (SIGKILL, on drop at the latest).
//!
//! [`EtcdCluster`] starts several members the same way, for fault tests that kill and restart
//! one of them (tests/faults_etcd_cluster.rs, the skiff server's faults_etcd_server.rs).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where etcd is looked for: `$SKIFF_ETCD_BIN`, then `/usr/bin/etcd` (Debian's etcd-server),
/// then `etcd` on `PATH`.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SKIFF_ETCD_BIN") {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let debian = PathBuf::from("/usr/bin/etcd");
    if debian.is_file() {
        return Some(debian);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|path| path.is_file())
    })
}

/// The etcd binary for a test, or `None` (with the reason printed) when the test should be
/// skipped. With `CI=true` a missing etcd panics instead: CI must never skip silently.
pub fn etcd_for_test(test: &str) -> Option<PathBuf> {
    match etcd_binary() {
        Some(path) => Some(path),
        None if std::env::var("CI").is_ok_and(|ci| ci == "true") => panic!(
            "{test}: etcd is not installed (looked at $SKIFF_ETCD_BIN, /usr/bin/etcd, PATH) and \
             CI=true forbids skipping; install it with `apt-get install -y etcd-server`"
        ),
        None => {
            // Straight to stderr, not eprintln!: the test harness captures the macros' output
            // of passing tests, and a skip must be visible.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: etcd is not installed (apt-get install -y etcd-server, or set \
                 SKIFF_ETCD_BIN)"
            );
            None
        }
    }
}

/// A running etcd started by this process.
pub struct EtcdServer {
    binary: PathBuf,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd with its data in `data_dir` (created if missing) and waits until it answers.
    pub async fn start(binary: &Path, data_dir: &Path) -> std::io::Result<EtcdServer> {
        let mut last_error = None;
        // Free ports can be taken by someone else between choosing and binding: try a few.
        for _ in 0..3 {
            let mut server = EtcdServer {
                binary: binary.to_path_buf(),
                data_dir: data_dir.to_path_buf(),
                client_port: free_port()?,
                peer_port: free_port()?,
                child: None,
            };
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("etcd did not start")))
    }

    /// The client URL, as `EtcdStore::connect` wants it.
    pub fn endpoints(&self) -> Vec<String> {
        vec![format!("http://127.0.0.1:{}", self.client_port)]
    }

    /// The PID of the running server, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where etcd writes its log (useful when a test fails).
    pub fn log_path(&self) -> PathBuf {
        let mut name = self.data_dir.as_os_str().to_owned();
        name.push(".log");
        PathBuf::from(name)
    }

    /// SIGKILLs the server (by the PID we started) and reaps it: a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data directory and ports.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.spawn_and_wait().await
    }

    async fn spawn_and_wait(&mut self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.binary)
            .arg("--name=skiff-test")
            .arg(format!("--data-dir={}", self.data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=skiff-test={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(std::io::Error::other(format!(
                    "etcd exited with {status} while starting; see {}",
                    self.log_path().display()
                )));
            }
            if self.answers().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(std::io::Error::other(format!(
                    "etcd did not answer within 15s; see {}",
                    self.log_path().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn answers(&self) -> bool {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(1));
        match etcd_client::Client::connect(self.endpoints(), Some(options)).await {
            Ok(mut client) => client.status().await.is_ok(),
            Err(_) => false,
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A three-member (or any size) etcd cluster on loopback, for fault tests: members are started,
/// SIGKILLed and restarted one by one by the PIDs this module started (all SIGKILLed on drop).
pub struct EtcdCluster {
    binary: PathBuf,
    members: Vec<ClusterMember>,
    initial_cluster: String,
    token: String,
}

struct ClusterMember {
    name: String,
    data_dir: PathBuf,
    client_url: String,
    peer_url: String,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `size` members with their data under `dir` (one subdirectory per member, under one
    /// per attempt) and waits until every member answers and they agree on a leader.
    pub async fn start(binary: &Path, dir: &Path, size: usize) -> std::io::Result<EtcdCluster> {
        let mut last_error = None;
        // Free ports can be taken by someone else between choosing and binding: try a few
        // times, each with fresh ports and fresh data directories.
        for attempt in 0..3 {
            match Self::start_once(binary, &dir.join(format!("try{attempt}")), size).await {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("etcd cluster did not start")))
    }

    async fn start_once(binary: &Path, dir: &Path, size: usize) -> std::io::Result<EtcdCluster> {
        // The PID in the names keeps the members of parallel test processes apart in logs.
        let tag = format!("skiff-{}", std::process::id());
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            members.push(ClusterMember {
                name: format!("{tag}-m{i}"),
                data_dir: dir.join(format!("m{i}")),
                client_url: format!("http://127.0.0.1:{}", free_port()?),
                peer_url: format!("http://127.0.0.1:{}", free_port()?),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            binary: binary.to_path_buf(),
            members,
            initial_cluster,
            token: tag,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        // On failure the cluster is dropped here, which SIGKILLs the members that did start.
        cluster.wait_healthy(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Every member's client URL: what a client configured with the whole cluster gets.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// One member's client URL.
    pub fn endpoint(&self, member: usize) -> &str {
        &self.members[member].client_url
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    pub fn is_running(&self, member: usize) -> bool {
        self.members[member].child.is_some()
    }

    /// Where member `member` writes its log.
    pub fn log_path(&self, member: usize) -> PathBuf {
        self.members[member].data_dir.with_extension("log")
    }

    /// Starts member `member` (again) on its data directory. On a restart etcd reads the
    /// membership from its WAL and ignores the initial-cluster flags, as in production.
    pub fn spawn(&mut self, member: usize) -> std::io::Result<()> {
        let log_path = self.log_path(member);
        let m = &mut self.members[member];
        std::fs::create_dir_all(&m.data_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path)?;
        let child = Command::new(&self.binary)
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", m.data_dir.display()))
            .arg(format!("--listen-client-urls={}", m.client_url))
            .arg(format!("--advertise-client-urls={}", m.client_url))
            .arg(format!("--listen-peer-urls={}", m.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", m.peer_url))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        m.child = Some(child);
        Ok(())
    }

    /// SIGKILLs member `member` by the PID we started, and reaps it: a crash, not a shutdown.
    pub fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Status of one member, through a client that talks to it alone; `None` if it does not
    /// answer.
    pub async fn status(&self, member: usize) -> Option<etcd_client::StatusResponse> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(2));
        let mut client =
            etcd_client::Client::connect([self.members[member].client_url.clone()], Some(options))
                .await
                .ok()?;
        client.status().await.ok()
    }

    /// The running member that reports itself leader, waiting up to `timeout` for one.
    pub async fn leader(&self, timeout: Duration) -> std::io::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            for i in 0..self.members.len() {
                if !self.is_running(i) {
                    continue;
                }
                if let Some(status) = self.status(i).await {
                    let me = status.header().map(|h| h.member_id()).unwrap_or(0);
                    if status.leader() != 0 && status.leader() == me {
                        return Ok(i);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "no etcd member reported itself leader within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running member answers and all agree on one leader.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = std::collections::BTreeSet::new();
            let (mut running, mut answered) = (0, 0);
            for i in 0..self.members.len() {
                let log = self.log_path(i);
                if let Some(child) = self.members[i].child.as_mut() {
                    running += 1;
                    if let Some(status) = child.try_wait()? {
                        self.members[i].child = None;
                        return Err(std::io::Error::other(format!(
                            "etcd member {i} exited with {status}; see {}",
                            log.display()
                        )));
                    }
                }
                if let Some(status) = self.status(i).await {
                    answered += 1;
                    leaders.insert(status.leader());
                }
            }
            if answered == running && leaders.len() == 1 && !leaders.contains(&0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "etcd cluster not healthy within {timeout:?}: {answered} of {running} \
                     answered, leaders {leaders:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
