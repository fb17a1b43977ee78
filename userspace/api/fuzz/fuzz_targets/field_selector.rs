#![no_main]
//! No string makes the field selector parser panic, and what it accepts prints back to a string
//! that parses to the same selector.

use libfuzzer_sys::fuzz_target;
use skiff_api::selector::FieldSelector;

fuzz_target!(|s: &str| {
    if let Ok(sel) = FieldSelector::parse(s) {
        let shown = sel.to_string();
        assert_eq!(
            FieldSelector::parse(&shown).ok(),
            Some(sel),
            "{s:?} -> {shown:?}"
        );
        let _ =
            FieldSelector::parse(&shown).map(|f| f.matches(&serde_json::json!({"a": {"b": s}})));
    }
});
