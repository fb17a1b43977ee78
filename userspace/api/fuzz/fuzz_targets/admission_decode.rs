#![no_main]
//! The apiserver's path for a request body: bytes decoded as JSON or YAML, admitted (types,
//! unknown fields, apiVersion/kind) as a Pod, Service or Deployment, defaulted and validated.
//! Nothing here may panic, whatever the bytes; what is admitted must validate to Ok or a
//! Status error, and serialize back.

use libfuzzer_sys::fuzz_target;
use skiff_api::admission::{self, FieldValidation};
use skiff_api::registry;

const RESOURCES: [(&str, &str, &str); 3] = [
    ("", "v1", "pods"),
    ("", "v1", "services"),
    ("apps", "v1", "deployments"),
];

fuzz_target!(|data: &[u8]| {
    // The first byte picks the resource, the decoder and the field validation mode.
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let (group, version, plural) = RESOURCES[usize::from(selector % 3)];
    let Some(info) = registry::find(group, version, plural) else {
        panic!("{plural} is not registered");
    };
    let decoded: Option<serde_json::Value> = if selector & 0x40 == 0 {
        serde_json::from_slice(body).ok()
    } else {
        serde_yaml::from_slice(body).ok()
    };
    let Some(value) = decoded else { return };
    let mode = match (selector >> 4) & 3 {
        0 => FieldValidation::Strict,
        1 => FieldValidation::Warn,
        _ => FieldValidation::Ignore,
    };
    let Ok(admitted) = admission::admit(info, Some("default"), value, mode) else {
        return;
    };
    let mut object = admitted.object;
    let now = chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap_or_default();
    admission::prepare_create(info, &mut object, now);
    if admission::validate(info, &object).is_ok() {
        serde_json::to_vec(&object).expect("an admitted object serializes");
    }
});
