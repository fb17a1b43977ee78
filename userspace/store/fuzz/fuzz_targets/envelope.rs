#![no_main]
//! A stored value under the Secrets prefix, from arbitrary bytes (what a corrupted disk or
//! someone with write access to etcd could leave): decrypting it never panics, and is either the
//! plaintext pass-through, an error, or (for an envelope this key wrote) the original. Sealing
//! arbitrary plaintext under arbitrary storage keys round-trips and never shows the plaintext.

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use skiff_store::encryption::{ENVELOPE_PREFIX, KEY_FILE, KeySet};

fn keys() -> &'static KeySet {
    static KEYS: OnceLock<(std::path::PathBuf, KeySet)> = OnceLock::new();
    &KEYS
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("skiff-store-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("fuzz key dir");
            let keys = KeySet::load_or_create(&dir.join(KEY_FILE)).expect("key file");
            (dir, keys)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let keys = keys();
    let storage_key = "/registry/core/secrets/default/fuzz";
    match keys.decrypt(storage_key, data) {
        Ok(plain) => {
            // Only a non-envelope passes through as it is; an envelope that opened was sealed
            // by this key (the fuzzer cannot forge a tag).
            if !data.starts_with(b"k8s:enc:") {
                assert_eq!(plain, data);
            }
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
    // Round trip: the input split into a storage key and a plaintext.
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let key = String::from_utf8_lossy(&data[..split]);
    let plaintext = &data[split.saturating_add(1).min(data.len())..];
    let sealed = keys.encrypt(&key, plaintext).expect("sealing never fails");
    assert!(sealed.starts_with(ENVELOPE_PREFIX));
    assert!(keys.is_current(&sealed));
    assert_eq!(keys.decrypt(&key, &sealed).expect("opens"), plaintext);
});
