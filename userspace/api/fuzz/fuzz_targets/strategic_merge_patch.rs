#![no_main]
//! No input makes `skiff_api::patch::strategic_merge_patch` panic, and a failed patch leaves the original as it was.

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Some((original, patch)) = common::two_documents(data) {
        let before = original.clone();
        let _ = skiff_api::patch::strategic_merge_patch(&original, &patch);
        assert_eq!(original, before);
    }
});
