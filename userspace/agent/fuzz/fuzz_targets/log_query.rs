#![no_main]
//! `GET /containerLogs/...?<query>` from arbitrary bytes: the query parsed as the endpoint parses
//! it (form-urlencoded pairs, then LogOptions::from_query), and the options applied to a CRI log
//! (the rest of the input) with the decoder and filter the endpoint streams through. No input
//! panics; accepted options keep their promises (limitBytes is honoured).
#![allow(dead_code)]

#[path = "../../src/server/cri_log.rs"]
mod cri_log;

use k8s_openapi::jiff::Timestamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (query, log) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let now = Timestamp::from_second(1_767_225_600).unwrap_or(Timestamp::UNIX_EPOCH);
    let Ok(options) = cri_log::LogOptions::from_query(&pairs, now) else {
        return;
    };
    let out = cri_log::render_all(log, &options);
    if let Some(limit) = options.limit_bytes {
        assert!(out.len() as u64 <= limit, "{} bytes out with limitBytes={limit}", out.len());
    }
    // Fed in two pieces, the decoder finds the same lines as in one.
    let split = log.len() / 2;
    let mut whole = Vec::new();
    let mut one = cri_log::CriDecoder::new();
    one.push(log, &mut whole);
    one.finish(&mut whole);
    let mut pieces = Vec::new();
    let mut two = cri_log::CriDecoder::new();
    two.push(&log[..split], &mut pieces);
    two.push(&log[split..], &mut pieces);
    two.finish(&mut pieces);
    assert_eq!(whole, pieces);
});
