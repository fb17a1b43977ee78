//! skiff-cni: the CNI plugin binary. The runtime runs it with CNI_* variables and the network
//! configuration on stdin; the result or a CNI error goes to stdout, logs to stderr
//! (`SKIFF_CNI_LOG`, default `warn`).

use std::io::{Read, Write};

use skiff_cni::{config::Env, error::CniError, error::code, plugin};

/// A network configuration is a few KiB; a bigger stdin is a mistake, not a config.
const MAX_STDIN: u64 = 16 << 20;

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKIFF_CNI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    let env = Env::from_process();
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    let outcome = match read {
        Err(e) => Err(CniError::io(
            "reading the network configuration from stdin",
            e,
        )),
        Ok(_) if stdin.len() as u64 > MAX_STDIN => Err(CniError::new(
            code::DECODE_FAILURE,
            format!("stdin is larger than {MAX_STDIN} bytes: not a network configuration"),
        )),
        Ok(_) => std::panic::catch_unwind(|| plugin::run(&env, &stdin)).unwrap_or_else(|_| {
            Err(CniError::io(
                "skiff-cni failed unexpectedly",
                "a bug: please report it with the input",
            ))
        }),
    };
    let mut out = std::io::stdout().lock();
    let status = match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            tracing::warn!(code = e.code, msg = %e.msg, details = %e.details, "CNI call failed");
            let _ = writeln!(out, "{}", e.to_json(&plugin::error_version(&stdin)));
            1
        }
    };
    let _ = out.flush();
    std::process::exit(status);
}
