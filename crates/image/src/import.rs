//! Importing `docker save` and OCI image-layout tarballs.
//!
//! The outer tarball is first staged into `tmp/import-*/` as numbered files (never under the
//! names found in the archive, so a hostile tarball cannot write anywhere), hashing each file on
//! the way. Symlinks and hardlinks inside the tarball (legacy `docker save` links duplicate
//! layers) are resolved within the archive's namespace. Each layer's tar stream is checked
//! while its diff id is computed: a layer that could write outside the root when unpacked
//! (`..`, absolute paths, hardlinks out, entries below a symlink) refuses the whole import.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use tar::EntryType;

use crate::digest::HashWriter;
use crate::error::IoContext;
use crate::layer_check::{check_layer, Symlinks};
use crate::oci::{
    self, Descriptor, DockerManifestEntry, ImageConfig, Index, Manifest,
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME,
};
use crate::unpack::open_layer;
use crate::{
    image_name_from_reference, parse_digest, sanitize_image_name, ImageError, ImageStore,
    ImportedImage,
};

/// Largest JSON document read into memory.
const MAX_JSON: u64 = 64 * 1024 * 1024;
/// Deepest chain of nested indexes followed.
const MAX_INDEX_DEPTH: usize = 8;
/// Longest chain of symlinks followed inside the tarball.
const MAX_SYMLINKS: usize = 32;

/// One regular file of the outer tarball, staged on disk.
#[derive(Debug, Clone)]
struct Staged {
    path: PathBuf,
    hex: String,
    size: u64,
}

/// The outer tarball, staged.
struct OuterArchive {
    files: HashMap<String, Staged>,
    symlinks: HashMap<String, String>,
}

/// Lexically normalizes a path inside the archive; `None` if empty or escaping the root.
fn normalize_outer(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

fn bad(msg: impl Into<String>) -> ImageError {
    ImageError::BadTarball(msg.into())
}

impl OuterArchive {
    fn extract(tarball: &Path, staging: &Path) -> Result<Self, ImageError> {
        let file = File::open(tarball).at("open image tarball", tarball)?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let head = reader.fill_buf().at("read image tarball", tarball)?;
        if head.is_empty() {
            return Err(bad(format!("{} is empty", tarball.display())));
        }
        let reader: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(MultiGzDecoder::new(reader))
        } else {
            Box::new(reader)
        };
        let not_tar = |e: io::Error| {
            bad(format!(
                "{} is not a readable tar archive: {e}",
                tarball.display()
            ))
        };
        let mut archive = tar::Archive::new(reader);
        let mut ar = OuterArchive {
            files: HashMap::new(),
            symlinks: HashMap::new(),
        };
        let mut links: Vec<(String, String)> = Vec::new();
        for (i, entry) in archive.entries().map_err(not_tar)?.enumerate() {
            let mut entry = entry.map_err(not_tar)?;
            let raw = entry
                .path()
                .map_err(not_tar)?
                .to_string_lossy()
                .into_owned();
            let Some(name) = normalize_outer(&raw) else {
                continue;
            };
            match entry.header().entry_type() {
                EntryType::Regular | EntryType::Continuous => {
                    let path = staging.join(format!("{i}"));
                    let mut out = File::create(&path).at("create", &path)?;
                    let mut writer = HashWriter::new(&mut out);
                    io::copy(&mut entry, &mut writer)
                        .map_err(|e| bad(format!("reading {name} from the tarball: {e}")))?;
                    let (hex, size) = writer.finish();
                    ar.files.insert(name, Staged { path, hex, size });
                }
                EntryType::Symlink => {
                    let Some(target) = entry.link_name().map_err(not_tar)? else {
                        continue;
                    };
                    let target = target.to_string_lossy();
                    let joined = if target.starts_with('/') {
                        target.into_owned()
                    } else {
                        let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                        format!("{dir}/{target}")
                    };
                    if let Some(resolved) = normalize_outer(&joined) {
                        ar.symlinks.insert(name, resolved);
                    }
                }
                EntryType::Link => {
                    if let Some(target) = entry.link_name().map_err(not_tar)? {
                        if let Some(target) = normalize_outer(&target.to_string_lossy()) {
                            links.push((name, target));
                        }
                    }
                }
                _ => {}
            }
        }
        for (name, target) in links {
            if let Some(staged) = ar.lookup(&target).cloned() {
                ar.files.insert(name, staged);
            }
        }
        Ok(ar)
    }

    /// Finds a regular file by archive path, following symlinks inside the archive.
    fn lookup(&self, name: &str) -> Option<&Staged> {
        let mut cur = normalize_outer(name)?;
        for _ in 0..MAX_SYMLINKS {
            if let Some(staged) = self.files.get(&cur) {
                return Some(staged);
            }
            cur = self.symlinks.get(&cur)?.clone();
        }
        None
    }

    fn get(&self, name: &str) -> Result<&Staged, ImageError> {
        self.lookup(name)
            .ok_or_else(|| ImageError::MissingFile(name.to_string()))
    }

    fn read(name: &str, staged: &Staged) -> Result<Vec<u8>, ImageError> {
        if staged.size > MAX_JSON {
            return Err(bad(format!(
                "{name} is too large ({} bytes) for a JSON document",
                staged.size
            )));
        }
        fs::read(&staged.path).at("read staged", &staged.path)
    }

    fn read_json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T, ImageError> {
        let data = Self::read(name, self.get(name)?)?;
        serde_json::from_slice(&data).map_err(|source| ImageError::Json {
            what: name.to_string(),
            source,
        })
    }

    /// The staged blob a descriptor names, verified against its digest and size.
    fn blob(&self, desc: &Descriptor) -> Result<&Staged, ImageError> {
        let hex = parse_digest(&desc.digest)?;
        let name = format!("blobs/sha256/{hex}");
        let staged = self.get(&name)?;
        verify(&name, hex, staged)?;
        if desc.size != 0 && desc.size != staged.size {
            return Err(bad(format!(
                "{name}: size mismatch: descriptor says {} bytes, file has {}",
                desc.size, staged.size
            )));
        }
        Ok(staged)
    }
}

fn verify(what: &str, expected_hex: &str, staged: &Staged) -> Result<(), ImageError> {
    if staged.hex == expected_hex {
        Ok(())
    } else {
        Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: format!("sha256:{expected_hex}"),
            actual: format!("sha256:{}", staged.hex),
        })
    }
}

/// The 64-hex digest a tarball path names (`blobs/sha256/<hex>`, `<hex>.json`), if any.
fn hex_in_path(path: &str) -> Option<&str> {
    let last = path.rsplit('/').next()?;
    let stem = last.strip_suffix(".json").unwrap_or(last);
    parse_digest(&format!("sha256:{stem}")).ok()?;
    Some(stem)
}

fn is_amd64(platform: Option<&oci::Platform>) -> bool {
    platform.is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
}

/// Picks the linux/amd64 entry of an index; entries without a platform are taken when no entry
/// names linux/amd64.
fn select<'a>(entries: &'a [Descriptor], what: &str) -> Result<&'a Descriptor, ImageError> {
    let candidates: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| {
            d.media_type.is_empty()
                || oci::is_index_media_type(&d.media_type)
                || oci::is_manifest_media_type(&d.media_type)
        })
        .collect();
    if let Some(d) = candidates.iter().find(|d| is_amd64(d.platform.as_ref())) {
        return Ok(d);
    }
    candidates
        .iter()
        .find(|d| d.platform.is_none())
        .copied()
        .ok_or_else(|| ImageError::NoMatchingPlatform(what.to_string()))
}

/// Names found in the tarball, best first.
#[derive(Default)]
struct NameHints {
    repo_tags: Vec<String>,
    containerd: Vec<String>,
    ref_names: Vec<String>,
}

impl NameHints {
    fn add_annotations(&mut self, annotations: &std::collections::BTreeMap<String, String>) {
        if let Some(n) = annotations.get(ANNOTATION_CONTAINERD_NAME) {
            self.containerd.push(n.clone());
        }
        if let Some(n) = annotations.get(ANNOTATION_REF_NAME) {
            self.ref_names.push(n.clone());
        }
    }

    fn choose(&self, explicit: Option<&str>) -> Result<String, ImageError> {
        if let Some(name) = explicit {
            return sanitize_image_name(name);
        }
        self.repo_tags
            .iter()
            .chain(&self.containerd)
            .chain(&self.ref_names)
            .find_map(|r| image_name_from_reference(r))
            .ok_or(ImageError::NameRequired)
    }
}

/// Everything needed to commit an import.
struct Parts<'a> {
    manifest_bytes: Vec<u8>,
    config: ImageConfig,
    config_staged: &'a Staged,
    layers: Vec<(String, &'a Staged)>,
    name: String,
}

impl ImageStore {
    /// Imports a `docker save` or OCI image-layout tarball (optionally gzip-compressed) and
    /// records it. `name` overrides the name found in the tarball; it is sanitized into a DNS
    /// label. Importing the same image again is harmless (the record is rewritten).
    pub fn import_tarball(
        &self,
        path: &Path,
        name: Option<&str>,
    ) -> Result<ImportedImage, ImageError> {
        let started = std::time::Instant::now();
        let tmp_root = self.tmp_dir();
        let staging = tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(&tmp_root)
            .at("create temporary directory in", &tmp_root)?;
        let ar = OuterArchive::extract(path, staging.path())?;
        let docker: Option<Vec<DockerManifestEntry>> = if ar.lookup("manifest.json").is_some() {
            Some(ar.read_json("manifest.json")?)
        } else {
            None
        };
        let mut hints = NameHints::default();
        if let Some(first) = docker.as_ref().and_then(|d| d.first()) {
            hints.repo_tags = first.repo_tags.clone().unwrap_or_default();
        }
        let parts = if ar.lookup("index.json").is_some() {
            if ar.lookup("oci-layout").is_none() {
                tracing::warn!(tarball = %path.display(), "index.json without oci-layout; reading it as an OCI layout anyway");
            }
            Self::oci_parts(&ar, hints, name)?
        } else if let Some(entries) = docker {
            Self::docker_parts(&ar, &entries, &hints, name)?
        } else {
            return Err(ImageError::MissingFile(
                "index.json (OCI image layout) or manifest.json (docker save)".into(),
            ));
        };
        let image = self.commit(parts)?;
        tracing::info!(name = %image.name, digest = %image.digest, layers = image.layers.len(),
            elapsed_ms = started.elapsed().as_millis() as u64, "imported image");
        Ok(image)
    }

    fn oci_parts<'a>(
        ar: &'a OuterArchive,
        mut hints: NameHints,
        explicit: Option<&str>,
    ) -> Result<Parts<'a>, ImageError> {
        let index: Index = ar.read_json("index.json")?;
        hints.add_annotations(&index.annotations);
        let mut desc = select(&index.manifests, "index.json")?.clone();
        let mut what = "index.json".to_string();
        for _ in 0..MAX_INDEX_DEPTH {
            hints.add_annotations(&desc.annotations);
            let staged = ar.blob(&desc)?;
            let bytes = OuterArchive::read(&desc.digest, staged)?;
            let value: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|source| ImageError::Json {
                    what: format!("{} (referenced by {what})", desc.digest),
                    source,
                })?;
            let json_err = |source| ImageError::Json {
                what: desc.digest.clone(),
                source,
            };
            if oci::is_index_media_type(&desc.media_type)
                || (value.get("manifests").is_some() && value.get("layers").is_none())
            {
                let nested: Index = serde_json::from_value(value).map_err(json_err)?;
                what.clone_from(&desc.digest);
                desc = select(&nested.manifests, &what)?.clone();
                continue;
            }
            let manifest: Manifest = serde_json::from_value(value).map_err(json_err)?;
            let name = hints.choose(explicit)?;
            let config_staged = ar.blob(&manifest.config)?;
            let config_bytes = OuterArchive::read(&manifest.config.digest, config_staged)?;
            let config: ImageConfig =
                serde_json::from_slice(&config_bytes).map_err(|source| ImageError::Json {
                    what: format!("config {}", manifest.config.digest),
                    source,
                })?;
            let mut layers = Vec::with_capacity(manifest.layers.len());
            for layer in &manifest.layers {
                layers.push((layer.digest.clone(), ar.blob(layer)?));
            }
            return Ok(Parts {
                manifest_bytes: bytes,
                config,
                config_staged,
                layers,
                name,
            });
        }
        Err(bad(format!(
            "image indexes nested deeper than {MAX_INDEX_DEPTH}"
        )))
    }

    fn docker_parts<'a>(
        ar: &'a OuterArchive,
        entries: &[DockerManifestEntry],
        hints: &NameHints,
        explicit: Option<&str>,
    ) -> Result<Parts<'a>, ImageError> {
        let entry = entries
            .first()
            .ok_or_else(|| bad("manifest.json lists no images"))?;
        if entries.len() > 1 {
            tracing::warn!(
                count = entries.len(),
                "docker save tarball holds several images; importing the first"
            );
        }
        let name = hints.choose(explicit)?;
        let config_staged = ar.get(&entry.config)?;
        if let Some(hex) = hex_in_path(&entry.config) {
            verify(&entry.config, hex, config_staged)?;
        }
        let config_bytes = OuterArchive::read(&entry.config, config_staged)?;
        let config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|source| ImageError::Json {
                what: entry.config.clone(),
                source,
            })?;
        let mut layers = Vec::with_capacity(entry.layers.len());
        let mut descriptors = Vec::with_capacity(entry.layers.len());
        for path in &entry.layers {
            let staged = ar.get(path)?;
            if let Some(hex) = hex_in_path(path) {
                verify(path, hex, staged)?;
            }
            let digest = format!("sha256:{}", staged.hex);
            descriptors.push(Descriptor {
                media_type: if is_gzip(&staged.path)? {
                    oci::MEDIA_LAYER_GZIP
                } else {
                    oci::MEDIA_LAYER_TAR
                }
                .to_string(),
                digest: digest.clone(),
                size: staged.size,
                ..Descriptor::default()
            });
            layers.push((digest, staged));
        }
        let config_desc = Descriptor {
            media_type: oci::MEDIA_CONFIG.to_string(),
            digest: format!("sha256:{}", config_staged.hex),
            size: config_staged.size,
            ..Descriptor::default()
        };
        let manifest_bytes = oci::manifest_bytes(config_desc, descriptors)?;
        Ok(Parts {
            manifest_bytes,
            config,
            config_staged,
            layers,
            name,
        })
    }

    /// Verifies diff ids, moves blobs into the store and writes the record.
    fn commit(&self, parts: Parts<'_>) -> Result<ImportedImage, ImageError> {
        let config = &parts.config;
        let platform_ok = (config.os.is_empty() || config.os == "linux")
            && (config.architecture.is_empty() || config.architecture == "amd64");
        if !platform_ok {
            return Err(ImageError::NoMatchingPlatform(format!(
                "the image config (it is {}/{})",
                config.os, config.architecture
            )));
        }
        let diff_ids = config
            .rootfs
            .as_ref()
            .map(|r| r.diff_ids.clone())
            .unwrap_or_default();
        if !diff_ids.is_empty() && diff_ids.len() != parts.layers.len() {
            return Err(bad(format!(
                "the config lists {} layer diff ids but the manifest has {} layers",
                diff_ids.len(),
                parts.layers.len()
            )));
        }
        let mut size_bytes = 0;
        let mut links = Symlinks::default();
        for (i, (digest, staged)) in parts.layers.iter().enumerate() {
            // Refused here, not only when an instance unpacks it.
            let (hex, size) = check_layer(open_layer(&staged.path, digest)?, digest, &mut links)?;
            size_bytes += size;
            if let Some(expected) = diff_ids.get(i) {
                if *expected != format!("sha256:{hex}") {
                    return Err(ImageError::DigestMismatch {
                        what: format!("uncompressed layer {digest} (rootfs.diff_ids[{i}])"),
                        expected: expected.clone(),
                        actual: format!("sha256:{hex}"),
                    });
                }
            }
        }
        self.adopt_verified_file(&parts.config_staged.path, &parts.config_staged.hex)?;
        for (_, staged) in &parts.layers {
            self.adopt_verified_file(&staged.path, &staged.hex)?;
        }
        let digest = self.put_blob_bytes(&parts.manifest_bytes)?;
        let run = config.config.clone().unwrap_or_default();
        let mut default_command = run.entrypoint.unwrap_or_default();
        default_command.extend(run.cmd.unwrap_or_default());
        let working_dir = run
            .working_dir
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());
        let image = ImportedImage {
            name: parts.name,
            digest,
            layers: parts.layers.iter().map(|(d, _)| d.clone()).collect(),
            size_bytes,
            default_command,
            default_env: run.env.unwrap_or_default(),
            working_dir,
        };
        self.write_record(&image, &format!("sha256:{}", parts.config_staged.hex))?;
        Ok(image)
    }
}

fn is_gzip(path: &Path) -> Result<bool, ImageError> {
    let mut head = [0u8; 2];
    let mut file = File::open(path).at("open", path)?;
    let n = file.read(&mut head).at("read", path)?;
    Ok(n == 2 && head == [0x1f, 0x8b])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_paths_normalize() {
        assert_eq!(normalize_outer("./a/b").as_deref(), Some("a/b"));
        assert_eq!(normalize_outer("a/../b").as_deref(), Some("b"));
        assert_eq!(normalize_outer("../b"), None);
        assert_eq!(normalize_outer("./"), None);
    }

    #[test]
    fn hex_in_paths() {
        let hex = "a".repeat(64);
        assert_eq!(
            hex_in_path(&format!("blobs/sha256/{hex}")),
            Some(hex.as_str())
        );
        assert_eq!(hex_in_path(&format!("{hex}.json")), Some(hex.as_str()));
        assert_eq!(hex_in_path("abc/layer.tar"), None);
    }
}
