//! sha256 digests: parsing, hashing while writing.

use std::io::{self, Write};

use sha2::{Digest, Sha256};

use crate::ImageError;

/// Checks a `sha256:<64 lowercase hex>` digest and returns its hex part.
pub fn parse_digest(digest: &str) -> Result<&str, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::InvalidDigest(digest.to_string()))?;
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(hex)
    } else {
        Err(ImageError::InvalidDigest(digest.to_string()))
    }
}

/// The `sha256:<hex>` digest of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A writer that hashes and counts what passes through it.
pub(crate) struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Flushes and returns the hex digest and the byte count.
    pub(crate) fn finish(mut self) -> (String, u64) {
        let _ = self.inner.flush();
        (hex::encode(self.hasher.finalize()), self.len)
    }
}

impl<W: Write> Write for HashWriter<W> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_and_rejects_bad_digests() {
        let good = sha256_digest(b"x");
        assert_eq!(parse_digest(&good).unwrap(), &good[7..]);
        for bad in [
            "",
            "sha256:",
            "sha512:00",
            "sha256:../../etc/passwd",
            &good.to_uppercase(),
            &good[..good.len() - 1],
        ] {
            assert!(parse_digest(bad).is_err(), "{bad:?} accepted");
        }
    }
}
