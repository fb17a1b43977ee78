// Shared by the patch targets: the input is two JSON documents back to back (the original object,
// then the patch), so the fuzzer can grow both. Inputs that are not two JSON documents are
// skipped: the decoders in front of the engines reject them before any patch runs.
pub fn two_documents(data: &[u8]) -> Option<(serde_json::Value, serde_json::Value)> {
    let mut docs = serde_json::Deserializer::from_slice(data).into_iter::<serde_json::Value>();
    let original = docs.next()?.ok()?;
    let patch = docs.next()?.ok()?;
    Some((original, patch))
}
