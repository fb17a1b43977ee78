//! `skiff image import|pull|list|rm|gc`: the node's local image store (skiff-runtime's ImageStore).

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use skiff_runtime::{ImageStore, PullOptions, RegistryCredentials};

#[derive(Args)]
pub struct ImageArgs {
    /// The image store directory (the agent's --image-dir).
    #[arg(long, env = "SKIFF_IMAGE_DIR", default_value = skiff_runtime::images::DEFAULT_IMAGE_DIR)]
    image_dir: PathBuf,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Import an OCI image layout archive or a `docker save` archive (plain or gzipped).
    Import { archives: Vec<PathBuf> },
    /// Pull an image from an OCI registry (`127.0.0.1:5000/skiff/echo:1.0`, `repo@sha256:...`).
    Pull {
        reference: String,
        /// A registry (HOST:PORT) spoken to over plain HTTP (repeatable; also read from
        /// `<image-dir>/registries.json`: {"insecure": ["HOST:PORT"]}).
        #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
        insecure_registries: Vec<String>,
        /// Log in as this user; the password is read from stdin (`--password-stdin`).
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// Credentials from a docker config.json (or a dockerconfigjson Secret's payload).
        #[arg(long, value_name = "FILE", conflicts_with = "username")]
        docker_config: Option<PathBuf>,
    },
    /// List stored images.
    #[command(alias = "ls")]
    List,
    /// Remove an image by reference (`skiff/echo:1.0`) or manifest digest (`sha256:...`).
    #[command(alias = "remove")]
    Rm { references: Vec<String> },
    /// Delete blobs and unpacked root filesystems no stored image uses.
    Gc,
}

pub fn run(args: ImageArgs) -> Result<()> {
    let store = ImageStore::open(&args.image_dir)
        .with_context(|| format!("opening the image store {}", args.image_dir.display()))?;
    match args.command {
        ImageCommand::Import { archives } => {
            anyhow::ensure!(!archives.is_empty(), "name at least one archive to import");
            for a in archives {
                let imported = store.import(&a).with_context(|| format!("importing {}", a.display()))?;
                for img in imported {
                    let names = if img.references.is_empty() { "<none>".to_string() } else { img.references.join(", ") };
                    println!("imported {names} ({})", img.manifest_digest);
                }
            }
        }
        ImageCommand::Pull { reference, insecure_registries, username, password_stdin, docker_config } => {
            let auth = match (username, docker_config) {
                (Some(username), _) if password_stdin => {
                    let mut password = String::new();
                    std::io::stdin().read_line(&mut password).context("reading the password from stdin")?;
                    let password = password.trim_end_matches(['\n', '\r']).to_string();
                    Some(RegistryCredentials::Basic { username, password })
                }
                (_, Some(file)) => {
                    let json = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                    skiff_runtime::pull::credentials_from_docker_config(&json, &reference)
                        .with_context(|| format!("reading credentials from {}", file.display()))?
                }
                _ => None,
            };
            let opts = PullOptions { auth, insecure_registries, ..Default::default() };
            let pulled = store.pull(&reference, &opts).with_context(|| format!("pulling {reference}"))?;
            let how = if pulled.fetched { "pulled" } else { "already present:" };
            println!("{how} {} ({})", pulled.reference, pulled.manifest_digest);
        }
        ImageCommand::List => {
            let images = store.list()?;
            println!("{:<48} {:<19} {:>10}", "IMAGE", "DIGEST", "SIZE");
            for img in images {
                let short = img.manifest_digest.get(..19).unwrap_or(&img.manifest_digest).to_string();
                let size = format!("{:.1}MB", img.size as f64 / 1e6);
                if img.references.is_empty() {
                    println!("{:<48} {short:<19} {size:>10}", "<none>");
                }
                for r in img.references {
                    println!("{r:<48} {short:<19} {size:>10}");
                }
            }
        }
        ImageCommand::Rm { references } => {
            anyhow::ensure!(!references.is_empty(), "name at least one image to remove");
            for r in references {
                store.remove(&r).with_context(|| format!("removing {r}"))?;
                println!("removed {r}");
            }
        }
        ImageCommand::Gc => {
            // Containers' root filesystems are overlays on the image rootfs; a node agent runs gc
            // with its containers' images as in_use. From the CLI: only what no image references.
            let report = store.gc(&HashSet::new())?;
            println!(
                "removed {} blobs ({:.1}MB) and {} unpacked root filesystems",
                report.blobs_removed,
                report.bytes_freed as f64 / 1e6,
                report.rootfs_removed
            );
        }
    }
    Ok(())
}
