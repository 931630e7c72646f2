//! Builders for small image tarballs, so tests and benchmarks can import images offline.
//!
//! ```no_run
//! use nimbus_image::{testutil, ImageStore};
//! # fn main() -> Result<(), nimbus_image::ImageError> {
//! let rootfs = std::path::Path::new("/tmp/rootfs"); // a directory with the image's files
//! let cfg = testutil::FixtureConfig { name: Some("hello".into()), ..Default::default() };
//! testutil::write_oci_layout_tarball(rootfs, "/tmp/hello.tar".as_ref(), &cfg)?;
//! let store = ImageStore::open("/tmp/store".as_ref())?;
//! let image = store.import_tarball("/tmp/hello.tar".as_ref(), None)?;
//! assert_eq!(image.name, "hello");
//! # Ok(()) }
//! ```
//! All output is deterministic: fixed mtimes, uid/gid 0, sorted directory walks.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use flate2::write::GzEncoder;
use tar::{EntryType, Header};

use crate::error::IoContext;
use crate::oci::{
    self, Descriptor, ImageConfig, Index, Platform, RootFs, RunConfig, ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
};
use crate::{sha256_digest, ImageError};

/// One entry of a hand-made layer. Paths are written verbatim (up to 100 bytes), so tests can
/// craft hostile archives (`../x`, `/etc/x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerEntry {
    /// A regular file.
    File {
        /// Path in the archive.
        path: String,
        /// Contents.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
    },
    /// A directory.
    Dir {
        /// Path in the archive.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Path in the archive.
        path: String,
        /// Link target, verbatim.
        target: String,
    },
    /// A hard link to an earlier entry.
    Hardlink {
        /// Path in the archive.
        path: String,
        /// Archive path of the linked entry.
        target: String,
    },
    /// A character device.
    CharDevice {
        /// Path in the archive.
        path: String,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

impl LayerEntry {
    /// A regular file with mode 0644.
    pub fn file(path: &str, data: &[u8]) -> Self {
        LayerEntry::File {
            path: path.into(),
            data: data.to_vec(),
            mode: 0o644,
        }
    }

    /// A directory with mode 0755.
    pub fn dir(path: &str) -> Self {
        LayerEntry::Dir {
            path: path.into(),
            mode: 0o755,
        }
    }

    /// A symlink.
    pub fn symlink(path: &str, target: &str) -> Self {
        LayerEntry::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }

    /// A hard link.
    pub fn hardlink(path: &str, target: &str) -> Self {
        LayerEntry::Hardlink {
            path: path.into(),
            target: target.into(),
        }
    }
}

fn write_name(field: &mut [u8], name: &str) -> Result<(), ImageError> {
    let bytes = name.as_bytes();
    if bytes.len() > field.len() {
        return Err(ImageError::BadTarball(format!(
            "fixture path {name:?} is longer than {} bytes",
            field.len()
        )));
    }
    field.fill(0);
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// Builds an uncompressed layer tar from entries, in the given order (uid/gid 0, mtime 0).
pub fn layer_tar(entries: &[LayerEntry]) -> Result<Vec<u8>, ImageError> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(0);
        let (path, data): (&str, &[u8]) = match entry {
            LayerEntry::File { path, data, mode } => {
                header.set_entry_type(EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                (path, data)
            }
            LayerEntry::Dir { path, mode } => {
                header.set_entry_type(EntryType::Directory);
                header.set_mode(*mode);
                (path, &[])
            }
            LayerEntry::Symlink { path, target } | LayerEntry::Hardlink { path, target } => {
                let kind = if matches!(entry, LayerEntry::Symlink { .. }) {
                    EntryType::Symlink
                } else {
                    EntryType::Link
                };
                header.set_entry_type(kind);
                header.set_mode(0o777);
                write_name(&mut header.as_old_mut().linkname, target)?;
                (path, &[])
            }
            LayerEntry::CharDevice { path, major, minor } => {
                header.set_entry_type(EntryType::Char);
                header.set_mode(0o666);
                header
                    .set_device_major(*major)
                    .map_err(|e| ImageError::io("tar header", e))?;
                header
                    .set_device_minor(*minor)
                    .map_err(|e| ImageError::io("tar header", e))?;
                (path, &[])
            }
        };
        write_name(&mut header.as_old_mut().name, path)?;
        header.set_cksum();
        builder
            .append(&header, data)
            .map_err(|e| ImageError::io("build fixture tar", e))?;
    }
    builder
        .into_inner()
        .map_err(|e| ImageError::io("build fixture tar", e))
}

/// Builds an uncompressed layer tar from a directory tree: sorted, uid/gid 0, mtime 0, modes
/// kept, symlinks kept, hard links (same inode) written as tar hard links. Files named
/// `.wh.NAME` / `.wh..wh..opq` are ordinary files here and act as whiteouts on import.
pub fn layer_from_dir(dir: &Path) -> Result<Vec<u8>, ImageError> {
    let mut entries = Vec::new();
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    walk(dir, "", &mut entries, &mut inodes)?;
    layer_tar(&entries)
}

fn walk(
    dir: &Path,
    prefix: &str,
    out: &mut Vec<LayerEntry>,
    inodes: &mut HashMap<(u64, u64), String>,
) -> Result<(), ImageError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .at("read directory", dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .at("read directory", dir)?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = format!("{prefix}{}", name.to_string_lossy());
        let meta = fs::symlink_metadata(&path).at("stat", &path)?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).at("read link", &path)?;
            out.push(LayerEntry::symlink(&rel, &target.to_string_lossy()));
        } else if meta.is_dir() {
            out.push(LayerEntry::Dir {
                path: format!("{rel}/"),
                mode,
            });
            walk(&path, &format!("{rel}/"), out, inodes)?;
        } else if meta.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = inodes.get(&(meta.dev(), meta.ino())) {
                    out.push(LayerEntry::hardlink(&rel, first));
                    continue;
                }
                inodes.insert((meta.dev(), meta.ino()), rel.clone());
            }
            let data = fs::read(&path).at("read", &path)?;
            out.push(LayerEntry::File {
                path: rel,
                data,
                mode,
            });
        }
    }
    Ok(())
}

/// Gzip-compresses bytes deterministically.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder
        .write_all(data)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

/// Which `docker save` layout to write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DockerSaveFormat {
    /// Docker before 25: `<id>/layer.tar`, `<config-hex>.json`, `manifest.json`, `repositories`.
    #[default]
    Legacy,
    /// Docker 25 and later: an OCI image layout plus `manifest.json`.
    OciCompatible,
}

/// What to put in a fixture image.
#[derive(Debug, Clone)]
pub struct FixtureConfig {
    /// Reference written into the tarball (`RepoTags`, annotations); `None` writes no name.
    pub name: Option<String>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Cmd.
    pub cmd: Vec<String>,
    /// Environment.
    pub env: Vec<String>,
    /// Working directory.
    pub working_dir: String,
    /// Gzip the layers.
    pub gzip_layers: bool,
    /// OCI layout only: make index.json point to a nested index with an arm64 decoy entry
    /// (whose blobs are absent) before the linux/amd64 manifest.
    pub nested_index: bool,
    /// `docker save` only: which layout.
    pub docker_format: DockerSaveFormat,
}

impl Default for FixtureConfig {
    fn default() -> Self {
        FixtureConfig {
            name: Some("fixture:latest".into()),
            entrypoint: Vec::new(),
            cmd: vec!["sh".into()],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            working_dir: "/".into(),
            gzip_layers: false,
            nested_index: false,
            docker_format: DockerSaveFormat::Legacy,
        }
    }
}

/// What a fixture writer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixture {
    /// The digest the store will give the image on import.
    pub digest: String,
    /// Layer blob digests, bottom first.
    pub layers: Vec<String>,
    /// The config blob digest.
    pub config_digest: String,
}

/// Blobs of one image, ready to be laid out.
pub(crate) struct Built {
    pub(crate) config: Vec<u8>,
    pub(crate) manifest: Vec<u8>,
    pub(crate) layers: Vec<Vec<u8>>,
    pub(crate) fixture: Fixture,
}

pub(crate) fn build(layers: &[Vec<u8>], cfg: &FixtureConfig) -> Result<Built, ImageError> {
    let mut blobs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut descriptors = Vec::new();
    for layer in layers {
        diff_ids.push(sha256_digest(layer));
        let blob = if cfg.gzip_layers {
            gzip(layer)
        } else {
            layer.clone()
        };
        descriptors.push(Descriptor {
            media_type: if cfg.gzip_layers {
                oci::MEDIA_LAYER_GZIP
            } else {
                oci::MEDIA_LAYER_TAR
            }
            .into(),
            digest: sha256_digest(&blob),
            size: blob.len() as u64,
            ..Descriptor::default()
        });
        blobs.push(blob);
    }
    let config = ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        config: Some(RunConfig {
            env: Some(cfg.env.clone()),
            entrypoint: (!cfg.entrypoint.is_empty()).then(|| cfg.entrypoint.clone()),
            cmd: Some(cfg.cmd.clone()),
            working_dir: Some(cfg.working_dir.clone()),
        }),
        rootfs: Some(RootFs {
            kind: "layers".into(),
            diff_ids,
        }),
    };
    let config = to_json(&config)?;
    let config_desc = Descriptor {
        media_type: oci::MEDIA_CONFIG.into(),
        digest: sha256_digest(&config),
        size: config.len() as u64,
        ..Descriptor::default()
    };
    let manifest = oci::manifest_bytes(config_desc.clone(), descriptors.clone())?;
    Ok(Built {
        fixture: Fixture {
            digest: sha256_digest(&manifest),
            layers: descriptors.into_iter().map(|d| d.digest).collect(),
            config_digest: config_desc.digest,
        },
        config,
        manifest,
        layers: blobs,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec(value).map_err(|source| ImageError::Json {
        what: "fixture".into(),
        source,
    })
}

fn blob_name(digest: &str) -> String {
    format!("blobs/sha256/{}", &digest["sha256:".len()..])
}

/// Writes an outer tarball of (path, contents) files and (path, target) symlinks.
fn write_outer(
    out: &Path,
    files: &[(String, Vec<u8>)],
    symlinks: &[(String, String)],
) -> Result<(), ImageError> {
    let file = fs::File::create(out).at("create", out)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    let err = |e| ImageError::io_path("write", out, e);
    for (path, data) in files {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, path, data.as_slice())
            .map_err(err)?;
    }
    for (path, target) in symlinks {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Symlink);
        header.set_mode(0o777);
        header.set_mtime(0);
        header.set_size(0);
        builder
            .append_link(&mut header, path, target)
            .map_err(err)?;
    }
    builder.into_inner().map_err(err)?.flush().map_err(err)
}

fn oci_files(built: &Built, cfg: &FixtureConfig) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let mut files = vec![(
        "oci-layout".to_string(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    )];
    let mut annotations = std::collections::BTreeMap::new();
    if let Some(name) = &cfg.name {
        annotations.insert(ANNOTATION_CONTAINERD_NAME.to_string(), name.clone());
        let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
        annotations.insert(ANNOTATION_REF_NAME.to_string(), tag.to_string());
    }
    let manifest_desc = Descriptor {
        media_type: oci::MEDIA_MANIFEST.into(),
        digest: built.fixture.digest.clone(),
        size: built.manifest.len() as u64,
        platform: Some(Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        }),
        ..Descriptor::default()
    };
    let top = if cfg.nested_index {
        let decoy_manifest = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#.to_vec();
        let decoy = Descriptor {
            media_type: oci::MEDIA_MANIFEST.into(),
            digest: sha256_digest(&decoy_manifest),
            size: decoy_manifest.len() as u64,
            platform: Some(Platform {
                architecture: "arm64".into(),
                os: "linux".into(),
                variant: Some("v8".into()),
            }),
            ..Descriptor::default()
        };
        let nested = to_json(&Index {
            schema_version: 2,
            media_type: oci::MEDIA_INDEX.into(),
            manifests: vec![decoy.clone(), manifest_desc],
            annotations: std::collections::BTreeMap::default(),
        })?;
        files.push((blob_name(&decoy.digest), decoy_manifest));
        let desc = Descriptor {
            media_type: oci::MEDIA_INDEX.into(),
            digest: sha256_digest(&nested),
            size: nested.len() as u64,
            annotations,
            ..Descriptor::default()
        };
        files.push((blob_name(&desc.digest), nested));
        desc
    } else {
        Descriptor {
            annotations,
            ..manifest_desc
        }
    };
    files.push((
        "index.json".into(),
        to_json(&Index {
            schema_version: 2,
            media_type: oci::MEDIA_INDEX.into(),
            manifests: vec![top],
            annotations: std::collections::BTreeMap::default(),
        })?,
    ));
    files.push((blob_name(&built.fixture.digest), built.manifest.clone()));
    files.push((
        blob_name(&built.fixture.config_digest),
        built.config.clone(),
    ));
    for (digest, blob) in built.fixture.layers.iter().zip(&built.layers) {
        files.push((blob_name(digest), blob.clone()));
    }
    Ok(files)
}

/// Writes an OCI image-layout tarball with one layer made from `dir`.
pub fn write_oci_layout_tarball(
    dir: &Path,
    out: &Path,
    cfg: &FixtureConfig,
) -> Result<Fixture, ImageError> {
    write_oci_layout_tarball_layers(&[layer_from_dir(dir)?], out, cfg)
}

/// Writes an OCI image-layout tarball from uncompressed layer tars (bottom first).
pub fn write_oci_layout_tarball_layers(
    layers: &[Vec<u8>],
    out: &Path,
    cfg: &FixtureConfig,
) -> Result<Fixture, ImageError> {
    let built = build(layers, cfg)?;
    write_outer(out, &oci_files(&built, cfg)?, &[])?;
    Ok(built.fixture)
}

/// Writes a `docker save` tarball with one layer made from `dir`.
pub fn write_docker_save_tarball(
    dir: &Path,
    out: &Path,
    cfg: &FixtureConfig,
) -> Result<Fixture, ImageError> {
    write_docker_save_tarball_layers(&[layer_from_dir(dir)?], out, cfg)
}

/// Writes a `docker save` tarball from uncompressed layer tars (bottom first). In the legacy
/// format a layer identical to an earlier one is written as a symlink to it, as docker does.
pub fn write_docker_save_tarball_layers(
    layers: &[Vec<u8>],
    out: &Path,
    cfg: &FixtureConfig,
) -> Result<Fixture, ImageError> {
    let built = build(layers, cfg)?;
    let repo_tags: Vec<String> = cfg.name.iter().cloned().collect();
    let mut symlinks = Vec::new();
    let (mut files, config_path, layer_paths) = match cfg.docker_format {
        DockerSaveFormat::OciCompatible => {
            let files = oci_files(&built, cfg)?;
            let layer_paths = built.fixture.layers.iter().map(|d| blob_name(d)).collect();
            (files, blob_name(&built.fixture.config_digest), layer_paths)
        }
        DockerSaveFormat::Legacy => {
            let config_path = format!("{}.json", &built.fixture.config_digest[7..]);
            let mut files = vec![(config_path.clone(), built.config.clone())];
            let mut layer_paths = Vec::new();
            let mut first_by_digest: HashMap<&str, String> = HashMap::new();
            for (i, (digest, blob)) in built.fixture.layers.iter().zip(&built.layers).enumerate() {
                let id = &sha256_digest(format!("{digest}/{i}").as_bytes())[7..];
                let path = format!("{id}/layer.tar");
                if let Some(first) = first_by_digest.get(digest.as_str()) {
                    symlinks.push((path.clone(), format!("../{first}")));
                } else {
                    files.push((path.clone(), blob.clone()));
                    first_by_digest.insert(digest, path.clone());
                }
                files.push((format!("{id}/VERSION"), b"1.0".to_vec()));
                layer_paths.push(path);
            }
            (files, config_path, layer_paths)
        }
    };
    let manifest = serde_json::json!([{
        "Config": config_path,
        "RepoTags": repo_tags,
        "Layers": layer_paths,
    }]);
    files.push(("manifest.json".into(), to_json(&manifest)?));
    write_outer(out, &files, &symlinks)?;
    Ok(built.fixture)
}
