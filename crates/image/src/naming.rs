//! Image names: from references to DNS labels.

use crate::ImageError;

/// Maximum length of a DNS label.
const MAX_LABEL: usize = 63;

/// Turns a name into a DNS label: lowercase; `/`, `_`, `.`, `:` and `-` runs become one `-`;
/// leading and trailing `-` are dropped. Other characters, an empty result or one longer than
/// 63 characters are errors.
pub fn sanitize_image_name(name: &str) -> Result<String, ImageError> {
    let invalid = |reason: &str| ImageError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            'a'..='z' | '0'..='9' => out.push(c),
            'A'..='Z' => out.push(c.to_ascii_lowercase()),
            '-' | '/' | '_' | '.' | ':' => {
                if !out.is_empty() && !out.ends_with('-') {
                    out.push('-');
                }
            }
            _ => return Err(invalid(&format!("character {c:?} is not allowed"))),
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        return Err(invalid("it has no letters or digits"));
    }
    if out.len() > MAX_LABEL {
        return Err(invalid("longer than 63 characters"));
    }
    Ok(out)
}

/// Derives an image name from a reference such as `docker.io/library/busybox:1.36`:
/// drops the registry, `library/`, the tag and the digest, then sanitizes (`busybox`;
/// `ghcr.io/org/app:v1` gives `org-app`). Returns `None` when nothing usable is left.
pub fn image_name_from_reference(reference: &str) -> Option<String> {
    let mut rest = reference.trim();
    if let Some((before, _)) = rest.split_once('@') {
        rest = before;
    }
    // A tag is a ':' after the last '/'.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    if let Some(colon) = rest[last_slash..].find(':') {
        rest = &rest[..last_slash + colon];
    }
    let mut parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    if parts.len() > 1 {
        let first = parts[0];
        if first.contains('.') || first.contains(':') || first == "localhost" {
            parts.remove(0);
        }
    }
    if parts.len() > 1 && parts[0] == "library" {
        parts.remove(0);
    }
    let joined = parts.join("/");
    let name = sanitize_image_name(&joined).ok()?;
    if name.len() > MAX_LABEL {
        return None;
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_become_labels() {
        for (reference, want) in [
            ("busybox", "busybox"),
            ("busybox:latest", "busybox"),
            ("docker.io/library/busybox:1.36", "busybox"),
            ("library/nginx", "nginx"),
            ("ghcr.io/Org/My_App:v1", "org-my-app"),
            ("localhost:5000/app@sha256:abcd", "app"),
            ("registry:5000/team/app:tag", "team-app"),
        ] {
            assert_eq!(
                image_name_from_reference(reference).as_deref(),
                Some(want),
                "{reference}"
            );
        }
        assert_eq!(image_name_from_reference(":latest"), None);
        assert_eq!(image_name_from_reference(""), None);
    }

    #[test]
    fn sanitizing() {
        assert_eq!(sanitize_image_name("My_App/x").unwrap(), "my-app-x");
        assert_eq!(sanitize_image_name("--a--b--").unwrap(), "a-b");
        assert!(sanitize_image_name("a b").is_err());
        assert!(sanitize_image_name("___").is_err());
        assert!(sanitize_image_name(&"a".repeat(64)).is_err());
        assert!(sanitize_image_name("ünï").is_err());
    }
}
