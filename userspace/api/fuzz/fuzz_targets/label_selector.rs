#![no_main]
//! No string makes the label selector parser panic, and what it accepts prints back to a string
//! that parses to the same selector.

use libfuzzer_sys::fuzz_target;
use skiff_api::selector::LabelSelector;

fuzz_target!(|s: &str| {
    if let Ok(sel) = LabelSelector::parse(s) {
        let shown = sel.to_string();
        assert_eq!(
            LabelSelector::parse(&shown).ok(),
            Some(sel),
            "{s:?} -> {shown:?}"
        );
    }
});
