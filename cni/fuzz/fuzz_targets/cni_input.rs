#![no_main]
//! Everything a runtime hands skiff-cni, from arbitrary bytes: CNI_COMMAND, CNI_CONTAINERID,
//! CNI_IFNAME, CNI_NETNS, CNI_ARGS and stdin (NUL-separated in the input). No input panics; what
//! is accepted keeps the promises the plugin relies on before it touches the machine (names that
//! cannot climb out of a directory, an interface name Linux takes, an absolute data directory),
//! and every error serializes to a CNI error object.
#![allow(dead_code)]

#[path = "../../src/error.rs"]
mod error;
#[path = "../../src/config.rs"]
mod config;

use config::{Command, Env, NetConf};
use libfuzzer_sys::fuzz_target;

const COMMANDS: [Command; 6] = [
    Command::Add,
    Command::Del,
    Command::Check,
    Command::Version,
    Command::Status,
    Command::Gc,
];

fn text(part: Option<&&[u8]>) -> Option<String> {
    part.map(|b| String::from_utf8_lossy(b).into_owned())
}

fuzz_target!(|data: &[u8]| {
    let parts: Vec<&[u8]> = data.splitn(6, |b| *b == 0).collect();
    let env = Env {
        command: text(parts.first()),
        container_id: text(parts.get(1)),
        ifname: text(parts.get(2)),
        netns: text(parts.get(3)),
        args: text(parts.get(4)),
        path: Some("/opt/cni/bin".into()),
    };
    let stdin = parts.get(5).copied().unwrap_or(&[]);
    let version = config::peek_version(stdin).unwrap_or_else(|| "1.1.0".into());
    let check_error = |e: error::CniError| {
        let shown = e.to_json(&version);
        assert!(shown["code"].is_u64() && shown["msg"].is_string(), "{shown}");
    };
    if let Err(e) = env.command() {
        check_error(e);
    }
    if let Err(e) = env.cni_args() {
        check_error(e);
    }
    for cmd in COMMANDS {
        match env.container_id(cmd) {
            Ok(id) => assert!(!id.contains('/') && !id.starts_with('.') && !id.is_empty(), "{id:?}"),
            Err(e) => check_error(e),
        }
        match env.ifname(cmd) {
            Ok(name) => {
                assert!(config::valid_ifname(&name), "{name:?}");
                assert!(name.len() <= 15 && !name.contains('/') && name != "..", "{name:?}");
            }
            Err(e) => check_error(e),
        }
        let _ = env.netns(cmd);
        match NetConf::parse(stdin, cmd) {
            Ok(conf) => {
                assert!(config::valid_network_name(&conf.name), "{:?}", conf.name);
                assert!(conf.data_dir.is_absolute(), "{:?}", conf.data_dir);
                assert!((68..=65535).contains(&conf.mtu));
                assert!(conf.pod_cidr.contains(&conf.gateway));
                if let Some(pin) = &conf.pin_dir {
                    assert!(pin.is_absolute(), "{pin:?}");
                }
            }
            Err(e) => check_error(e),
        }
    }
});
