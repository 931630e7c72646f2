//! The one error type of this crate.

/// Everything that can go wrong in the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O operation failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The tarball is not an image this store understands, or is missing a file.
    #[error("bad image tarball: {0}")]
    BadTarball(String),
    /// A file the tarball must contain is not there.
    #[error("bad image tarball: missing {0}")]
    MissingFile(String),
    /// A JSON document (index, manifest, config, record) does not parse.
    #[error("invalid JSON in {what}: {source}")]
    Json {
        /// Which document.
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Content does not hash to the digest that names it.
    #[error("digest mismatch for {what}: expected {expected}, actual {actual}")]
    DigestMismatch {
        /// What was verified (a path in the tarball, a blob, a layer diff id).
        what: String,
        /// The digest the source named.
        expected: String,
        /// The digest of the content.
        actual: String,
    },
    /// A digest string is malformed or uses an unsupported algorithm.
    #[error("invalid digest {0:?} (expected \"sha256:\" followed by 64 lowercase hex digits)")]
    InvalidDigest(String),
    /// No name was given and the tarball names none.
    #[error("the image tarball carries no name (no RepoTags or ref.name annotation): pass a name")]
    NameRequired,
    /// The name cannot become a DNS label.
    #[error("invalid image name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The index has no linux/amd64 image.
    #[error("no linux/amd64 image in {0}")]
    NoMatchingPlatform(String),
    /// The layer uses a compression this store cannot read.
    #[error("unsupported layer compression in {digest}: {kind}")]
    UnsupportedCompression {
        /// The layer blob.
        digest: String,
        /// The detected compression.
        kind: &'static str,
    },
    /// A layer entry would be written outside the layer directory.
    #[error("unsafe path in layer {layer}: {path:?}: {reason}")]
    UnsafePath {
        /// The layer blob digest (or a description).
        layer: String,
        /// The entry path as found in the archive.
        path: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A layer archive is corrupt or uses something unsupported.
    #[error("bad layer {layer}: {reason}")]
    BadLayer {
        /// The layer blob digest.
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// No image with this digest is recorded.
    #[error("image {0} not found in the store")]
    ImageNotFound(String),
    /// A blob is not in the store.
    #[error("blob {0} not found in the store")]
    BlobNotFound(String),
    /// Building the busybox image failed.
    #[error("busybox image: {0}")]
    Busybox(String),
}

impl ImageError {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps an I/O error with an action and a path.
    pub(crate) fn io_path(action: &str, path: &std::path::Path, source: std::io::Error) -> Self {
        ImageError::io(format!("{action} {}", path.display()), source)
    }
}

/// Shorthand for attaching a path to an I/O result.
pub(crate) trait IoContext<T> {
    /// Maps an I/O error into [`ImageError::Io`] naming `action` and `path`.
    fn at(self, action: &str, path: &std::path::Path) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for Result<T, std::io::Error> {
    fn at(self, action: &str, path: &std::path::Path) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io_path(action, path, e))
    }
}
