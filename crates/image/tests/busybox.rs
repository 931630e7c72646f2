//! The built-in busybox image (needs Debian's busybox-static at /bin/busybox; in CI a missing
//! binary fails the test).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nimbus_image::{ImageError, ImageStore};

fn busybox() -> Option<PathBuf> {
    let path = Path::new("/bin/busybox");
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "/bin/busybox is missing: install busybox-static (apt-get install -y busybox-static)"
    );
    eprintln!("skipping: /bin/busybox is missing (install busybox-static)");
    None
}

#[test]
fn busybox_image_is_deterministic_and_complete() {
    let Some(busybox) = busybox() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = ImageStore::open(&dir.path().join("a")).unwrap();
    let b = ImageStore::open(&dir.path().join("b")).unwrap();
    let image = a.build_busybox(&busybox).unwrap();
    let again = b.build_busybox(&busybox).unwrap();
    assert_eq!(image, again, "same binary, different image");
    assert_eq!(a.build_busybox(&busybox).unwrap(), image);
    assert_eq!(image.name, "busybox");
    assert_eq!(image.layers.len(), 1);
    assert_eq!(image.default_command, vec!["sh"]);
    assert_eq!(
        image.default_env,
        vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    );
    assert!(image.size_bytes > 1_000_000);
    assert_eq!(a.read_image(&image.digest).unwrap(), image);

    let root = a.unpacked_layer(&image.layers[0]).unwrap();
    let mode = |p: &str| {
        fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bin/busybox"), 0o755);
    assert_eq!(mode("tmp"), 0o1777);
    for d in ["proc", "sys", "dev", "root", "var/www", "etc"] {
        assert!(root.join(d).is_dir(), "{d} missing");
    }
    for applet in ["sh", "ls", "cat", "httpd", "wget"] {
        assert_eq!(
            fs::read_link(root.join("bin").join(applet)).unwrap(),
            Path::new("busybox"),
            "{applet}"
        );
    }
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.starts_with("root:x:0:0:") && passwd.contains("\nnobody:x:65534:65534:"));
    assert!(fs::read_to_string(root.join("etc/group"))
        .unwrap()
        .contains("root:x:0:"));
    assert_eq!(
        fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "busybox\n"
    );
    let out = std::process::Command::new(root.join("bin/sh"))
        .args(["-c", "echo works"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "works\n");

    let flat = dir.path().join("flat");
    a.flatten_to_dir(&image.layers, &flat).unwrap();
    assert!(flat.join("bin/busybox").is_file());
}

#[test]
fn busybox_build_errors_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let err = store
        .build_busybox(Path::new("/nonexistent/busybox"))
        .unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
    let not_busybox = dir.path().join("false");
    fs::write(&not_busybox, "#!/bin/sh\nexit 1\n").unwrap();
    fs::set_permissions(&not_busybox, fs::Permissions::from_mode(0o755)).unwrap();
    let err = store.build_busybox(&not_busybox).unwrap_err();
    assert!(matches!(err, ImageError::Busybox(_)), "{err}");
}
