//! sha256 content digests (`sha256:<64 lowercase hex>`), the only algorithm the store accepts.

use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

use crate::ImageError;

/// Checks that `d` is `sha256:` followed by 64 lowercase hex digits and returns the hex part.
pub fn validate(d: &str) -> Result<&str, ImageError> {
    let hex = d
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::Unsupported(format!("digest {d:?}: only sha256 is supported")))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(ImageError::Malformed(format!("digest {d:?} is not sha256:<64 hex digits>")));
    }
    Ok(hex)
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

pub fn of_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), len: 0 }
    }
    /// (`sha256:<hex>`, bytes written, the inner writer).
    pub fn finish(self) -> (String, u64, W) {
        (format!("sha256:{}", hex(&self.hasher.finalize())), self.len, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 and length of everything `r` yields.
pub fn of_reader(mut r: impl Read) -> io::Result<(String, u64)> {
    let mut w = HashingWriter::new(io::sink());
    io::copy(&mut r, &mut w)?;
    let (d, n, _) = w.finish();
    Ok((d, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_empty_and_validation() {
        let d = of_bytes(b"");
        assert_eq!(d, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert!(validate(&d).is_ok());
        assert!(validate("sha512:abc").is_err());
        assert!(validate(&d.to_uppercase().replace("SHA256", "sha256")).is_err());
        assert!(validate("sha256:../../etc").is_err());
    }
}
