//! The built-in `busybox` image, made from a static busybox binary.

use std::path::Path;
use std::process::Command;

use crate::error::IoContext;
use crate::testutil::{build, layer_tar, FixtureConfig, LayerEntry};
use crate::{ImageError, ImageStore, ImportedImage};

/// The name of the built-in image.
pub const BUSYBOX_IMAGE: &str = "busybox";

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// The applets a busybox binary provides (`busybox --list`), sorted, without odd names.
fn applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let output = Command::new(busybox)
        .arg("--list")
        .output()
        .at("run --list on", busybox)?;
    if !output.status.success() {
        return Err(ImageError::Busybox(format!(
            "{} --list failed with {}: {}",
            busybox.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut names: Vec<String> = stdout
        .lines()
        .map(str::trim)
        .filter(|n| !n.is_empty() && *n != "busybox" && !n.contains('/') && *n != "." && *n != "..")
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(ImageError::Busybox(format!(
            "{} --list printed no applets",
            busybox.display()
        )));
    }
    Ok(names)
}

/// The busybox layer's entries, sorted by path.
fn entries(binary: Vec<u8>, applets: &[String]) -> Vec<LayerEntry> {
    let dir = |path: &str, mode: u32| LayerEntry::Dir {
        path: format!("{path}/"),
        mode,
    };
    let mut entries = vec![
        dir("bin", 0o755),
        dir("dev", 0o755),
        dir("etc", 0o755),
        LayerEntry::file("etc/group", GROUP.as_bytes()),
        LayerEntry::file("etc/hostname", b"busybox\n"),
        LayerEntry::file("etc/passwd", PASSWD.as_bytes()),
        dir("proc", 0o555),
        dir("root", 0o700),
        dir("sys", 0o555),
        dir("tmp", 0o1777),
        dir("var", 0o755),
        dir("var/www", 0o755),
        LayerEntry::File {
            path: "bin/busybox".into(),
            data: binary,
            mode: 0o755,
        },
    ];
    for applet in applets {
        entries.push(LayerEntry::symlink(&format!("bin/{applet}"), "busybox"));
    }
    let key = |e: &LayerEntry| match e {
        LayerEntry::File { path, .. }
        | LayerEntry::Dir { path, .. }
        | LayerEntry::Symlink { path, .. }
        | LayerEntry::Hardlink { path, .. }
        | LayerEntry::CharDevice { path, .. } => path.trim_end_matches('/').to_string(),
    };
    entries.sort_by_key(key);
    entries
}

impl ImageStore {
    /// Builds and records the built-in `busybox` image from a static busybox binary: one
    /// uncompressed layer with `bin/busybox`, a symlink per applet in `bin/`, `etc/passwd`,
    /// `etc/group`, `etc/hostname` and the usual empty directories; command `["sh"]`. The
    /// same binary always gives the same digest.
    pub fn build_busybox(&self, busybox: &Path) -> Result<ImportedImage, ImageError> {
        let binary = std::fs::read(busybox).at("read", busybox)?;
        let applets = applets(busybox)?;
        let layer = layer_tar(&entries(binary, &applets))?;
        let cfg = FixtureConfig {
            name: Some(BUSYBOX_IMAGE.into()),
            entrypoint: Vec::new(),
            cmd: vec!["sh".into()],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            working_dir: "/".into(),
            ..FixtureConfig::default()
        };
        let size_bytes = layer.len() as u64;
        let built = build(&[layer], &cfg)?;
        for blob in &built.layers {
            self.put_blob_bytes(blob)?;
        }
        let config_digest = self.put_blob_bytes(&built.config)?;
        let digest = self.put_blob_bytes(&built.manifest)?;
        let image = ImportedImage {
            name: BUSYBOX_IMAGE.into(),
            digest,
            layers: built.fixture.layers.clone(),
            size_bytes,
            default_command: cfg.cmd.clone(),
            default_env: cfg.env.clone(),
            working_dir: cfg.working_dir.clone(),
        };
        self.write_record(&image, &config_digest)?;
        tracing::info!(digest = %image.digest, applets = applets.len(), "built busybox image");
        Ok(image)
    }
}
