//! `skiff rotate-encryption-key`: a new write key for Secrets at rest, the old ones kept for
//! reading; then every Secret rewritten with it (now, when the SQLite store is free; otherwise by
//! the server when it next starts, which rewrites whatever is not under the write key).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use skiff_store::encryption::{EncryptedStore, KEY_FILE, KeySet, SECRETS_PREFIX};

#[derive(Args)]
pub struct RotateArgs {
    /// The server's data directory (holds the key file and, with SQLite, the store).
    #[arg(long, default_value = "/var/lib/skiff")]
    data_dir: PathBuf,
}

pub fn run(args: RotateArgs) -> Result<()> {
    let path = args.data_dir.join(KEY_FILE);
    if !path.exists() {
        anyhow::bail!(
            "{} does not exist: start the server once with --data-dir {} to make the first key",
            path.display(),
            args.data_dir.display()
        );
    }
    let name = KeySet::rotate_file(&path)?;
    println!("new write key {name:?} in {}", path.display());
    let db = args.data_dir.join("store.db");
    if !db.exists() {
        println!("no SQLite store here (etcd?): restart every server with this key file; each rewrites the Secrets on start");
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        match skiff_store::sqlite::SqliteStore::open(&db).await {
            Ok(store) => {
                let keys = KeySet::load(&path)?;
                let store = EncryptedStore::new(std::sync::Arc::new(store), SECRETS_PREFIX, keys);
                let report = store.rewrite_stale().await?;
                println!("rewrote {} Secrets with {name:?}", report.rewritten);
                for reason in &report.unreadable {
                    eprintln!("could not read (left as it is): {reason}");
                }
                Ok(())
            }
            Err(error) => {
                println!("the store is in use ({error}): restart the server; it rewrites every Secret with {name:?} on start");
                Ok(())
            }
        }
    })
}
