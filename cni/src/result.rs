//! The ADD result (CNI spec "Success" result), owned here rather than taken from the cni-plugin
//! crate, which stops at spec 1.0 and cannot express 1.1's interface `mtu` or route `scope`.

use std::net::Ipv4Addr;

use serde_json::{Map, Value, json};

use crate::config::version_tuple;

/// What ADD made, everything the result reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub host_if: String,
    pub host_mac: [u8; 6],
    pub pod_if: String,
    pub pod_mac: [u8; 6],
    /// CNI_NETNS as the runtime gave it.
    pub sandbox: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// RT_SCOPE_LINK, as CNI 1.1 routes carry scopes (numbers, as in rtnetlink).
pub const SCOPE_LINK: u8 = 253;

/// The result of ADD in the caller's `cni_version`, appended to `prev` (the previous plugin's
/// result when chained: its interfaces, ips, routes and dns are kept, ours follow, and our ip's
/// `interface` index counts theirs).
pub fn add_result(cni_version: &str, a: &Attachment, prev: Option<&Value>) -> Value {
    let v = version_tuple(cni_version).unwrap_or((1, 1, 0));
    let v11 = v >= (1, 1, 0);
    let pre10 = v < (1, 0, 0);

    let mut out: Map<String, Value> = prev
        .and_then(|p| p.as_object().cloned())
        .unwrap_or_default();
    let mut interfaces: Vec<Value> = out
        .remove("interfaces")
        .and_then(|i| match i {
            Value::Array(a) => Some(a),
            _ => None,
        })
        .unwrap_or_default();
    let offset = interfaces.len();
    let mut host = json!({"name": a.host_if, "mac": mac_string(&a.host_mac)});
    let mut pod = json!({"name": a.pod_if, "mac": mac_string(&a.pod_mac), "sandbox": a.sandbox});
    if v11 {
        host["mtu"] = json!(a.mtu);
        pod["mtu"] = json!(a.mtu);
    }
    interfaces.push(host);
    interfaces.push(pod);

    let mut ips: Vec<Value> = match out.remove("ips") {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    };
    for ip in ips.iter_mut() {
        convert_ip_entry(ip, pre10);
    }
    let mut ours = json!({
        "address": format!("{}/32", a.ip),
        "gateway": a.gateway.to_string(),
        "interface": offset + 1,
    });
    if pre10 {
        ours["version"] = json!("4");
    }
    ips.push(ours);

    let mut routes: Vec<Value> = match out.remove("routes") {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    };
    if v11 {
        // 1.1 can say what the pod's table really holds: the gateway on the link, then default.
        routes.push(json!({"dst": format!("{}/32", a.gateway), "scope": SCOPE_LINK}));
    }
    routes.push(json!({"dst": "0.0.0.0/0", "gw": a.gateway.to_string()}));

    let dns = out.remove("dns").unwrap_or_else(|| json!({}));
    out.insert("cniVersion".into(), json!(cni_version));
    out.insert("interfaces".into(), Value::Array(interfaces));
    out.insert("ips".into(), Value::Array(ips));
    out.insert("routes".into(), Value::Array(routes));
    out.insert("dns".into(), dns);
    Value::Object(out)
}

/// 0.3.x/0.4.0 ips carry `"version": "4"|"6"`; 1.x dropped it.
fn convert_ip_entry(ip: &mut Value, pre10: bool) {
    let Some(obj) = ip.as_object_mut() else {
        return;
    };
    if pre10 {
        if !obj.contains_key("version") {
            let is_v6 = obj
                .get("address")
                .and_then(Value::as_str)
                .is_some_and(|a| a.contains(':'));
            obj.insert("version".into(), json!(if is_v6 { "6" } else { "4" }));
        }
    } else {
        obj.remove("version");
    }
}

/// The address a (previous) result gives `ifname`, for CHECK against prevResult.
pub fn address_for(result: &Value, ifname: &str, sandbox: &str) -> Option<String> {
    let interfaces = result.get("interfaces")?.as_array()?;
    let idx = interfaces.iter().position(|i| {
        i.get("name").and_then(Value::as_str) == Some(ifname)
            && i.get("sandbox").and_then(Value::as_str) == Some(sandbox)
    })?;
    result.get("ips")?.as_array()?.iter().find_map(|ip| {
        (ip.get("interface").and_then(Value::as_u64) == Some(idx as u64))
            .then(|| {
                ip.get("address")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att() -> Attachment {
        Attachment {
            host_if: "skf01234567".into(),
            host_mac: [2, 0, 0, 0, 0, 1],
            pod_if: "eth0".into(),
            pod_mac: [2, 0, 0, 0, 0, 2],
            sandbox: "/run/netns/p".into(),
            ip: Ipv4Addr::new(10, 244, 1, 2),
            gateway: Ipv4Addr::new(10, 244, 1, 1),
            mtu: 1500,
        }
    }

    #[test]
    fn shapes_per_version() {
        let r10 = add_result("1.0.0", &att(), None);
        assert_eq!(r10["ips"][0]["address"], "10.244.1.2/32");
        assert_eq!(r10["ips"][0]["interface"], 1);
        assert!(r10["ips"][0].get("version").is_none());
        assert!(r10["interfaces"][0].get("mtu").is_none());
        assert_eq!(r10["routes"].as_array().map(Vec::len), Some(1));
        let r11 = add_result("1.1.0", &att(), None);
        assert_eq!(r11["interfaces"][1]["mtu"], 1500);
        assert_eq!(r11["routes"][0]["scope"], 253);
        let r04 = add_result("0.4.0", &att(), None);
        assert_eq!(r04["ips"][0]["version"], "4");
        assert_eq!(
            address_for(&r11, "eth0", "/run/netns/p").as_deref(),
            Some("10.244.1.2/32")
        );
    }

    #[test]
    fn chains_after_a_previous_result() {
        let prev = json!({"cniVersion":"0.4.0","interfaces":[{"name":"x"}],
            "ips":[{"version":"4","address":"192.168.0.2/24","interface":0}],
            "routes":[{"dst":"192.168.0.0/16"}],"dns":{"nameservers":["10.96.0.10"]},"extra":1});
        let r = add_result("1.0.0", &att(), Some(&prev));
        assert_eq!(r["interfaces"].as_array().map(Vec::len), Some(3));
        assert_eq!(r["ips"][1]["interface"], 2);
        assert!(r["ips"][0].get("version").is_none(), "converted to 1.0");
        assert_eq!(r["routes"].as_array().map(Vec::len), Some(2));
        assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
        assert_eq!(r["extra"], 1);
        assert_eq!(r["cniVersion"], "1.0.0");
    }
}
