//! The `--route` flag of `nimbus lb create|update`: parse it into the API's [`LbRoute`] and
//! print a route back in the same syntax (`lb show`).
//!
//! Syntax: comma-separated `KEY=VALUE` items, each mapping to one field of [`LbRoute`]:
//! `host=H` (host, exact or `*.suffix`), `path=/P` (path prefix), `header=Name=value` (header
//! equality), and exactly one backend selector: `backend-label=K=V`, `backend-group=G` or
//! `backend=NAME[:WEIGHT]` (repeatable within the route). Only the first `=` of an item
//! separates key from value, so `header=X-Env=blue` and `backend-label=app=api` work; values
//! cannot contain `,`. Only the syntax is checked here; what the values mean (a host pattern,
//! at least one matcher, exactly one backend selector, ...) is validated by the API (crate
//! `api`, `lb::validate_spec`), in one place.

use anyhow::{anyhow, bail, Result};
use nimbus_api::lb::{LbBackends, LbInstanceRef, LbRoute};

/// Parse one `--route` value.
pub fn parse(s: &str) -> Result<LbRoute> {
    let mut r = LbRoute {
        host: None,
        path_prefix: None,
        header: None,
        backends: LbBackends::default(),
    };
    for item in s.split(',') {
        let Some((k, v)) = item.split_once('=') else {
            bail!("invalid --route {s:?}: item {item:?} is not KEY=VALUE (keys: host, path, header, backend-label, backend-group, backend)");
        };
        let once = |slot: &mut Option<String>| -> Result<()> {
            if slot.is_some() {
                bail!("invalid --route {s:?}: {k} given twice");
            }
            *slot = Some(v.to_string());
            Ok(())
        };
        match k {
            "host" => once(&mut r.host)?,
            "path" => once(&mut r.path_prefix)?,
            "header" => once(&mut r.header)?,
            "backend-label" => once(&mut r.backends.label)?,
            "backend-group" => once(&mut r.backends.group)?,
            "backend" => r.backends.instances.push(instance(s, v)?),
            _ => bail!("invalid --route {s:?}: unknown key {k:?} (host, path, header, backend-label, backend-group, backend)"),
        }
    }
    Ok(r)
}

fn instance(s: &str, v: &str) -> Result<LbInstanceRef> {
    match v.split_once(':') {
        Some((n, w)) => Ok(LbInstanceRef {
            name: n.to_string(),
            weight: w.parse().map_err(|_| {
                anyhow!("invalid --route {s:?}: backend={v} has a bad weight (use NAME:WEIGHT)")
            })?,
        }),
        None => Ok(LbInstanceRef {
            name: v.to_string(),
            weight: 1,
        }),
    }
}

/// A route in `--route` syntax (what `lb show` prints; [`parse`] reads it back).
pub fn format(r: &LbRoute) -> String {
    let mut items = Vec::new();
    if let Some(h) = &r.host {
        items.push(format!("host={h}"));
    }
    if let Some(p) = &r.path_prefix {
        items.push(format!("path={p}"));
    }
    if let Some(h) = &r.header {
        items.push(format!("header={h}"));
    }
    if let Some(l) = &r.backends.label {
        items.push(format!("backend-label={l}"));
    }
    if let Some(g) = &r.backends.group {
        items.push(format!("backend-group={g}"));
    }
    for i in &r.backends.instances {
        if i.weight == 1 {
            items.push(format!("backend={}", i.name));
        } else {
            items.push(format!("backend={}:{}", i.name, i.weight));
        }
    }
    items.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_field() {
        let r =
            parse("host=api.example.com,path=/v1,header=X-Env=blue,backend-label=app=api").unwrap();
        assert_eq!(r.host.as_deref(), Some("api.example.com"));
        assert_eq!(r.path_prefix.as_deref(), Some("/v1"));
        assert_eq!(r.header.as_deref(), Some("X-Env=blue"));
        assert_eq!(r.backends.label.as_deref(), Some("app=api"));
        assert!(r.backends.group.is_none() && r.backends.instances.is_empty());
        let r = parse("path=/static,backend-group=assets").unwrap();
        assert_eq!(r.backends.group.as_deref(), Some("assets"));
        let r = parse("host=*.example.com,backend=a,backend=b:5").unwrap();
        let names: Vec<_> = r
            .backends
            .instances
            .iter()
            .map(|i| (i.name.as_str(), i.weight))
            .collect();
        assert_eq!(names, [("a", 1), ("b", 5)]);
    }

    #[test]
    fn round_trips_through_format() {
        for s in [
            "host=api.example.com,path=/v1,header=X-Env=blue,backend-label=app=api",
            "path=/static,backend-group=assets",
            "host=*.example.com,backend=a,backend=b:5",
        ] {
            assert_eq!(format(&parse(s).unwrap()), s);
        }
    }

    #[test]
    fn rejects_malformed_values_with_one_line() {
        for (s, want) in [
            ("", "not KEY=VALUE"),
            ("host", "not KEY=VALUE"),
            ("host=a.com,host=b.com,backend-group=g", "host given twice"),
            ("host=a.com,port=80,backend-group=g", "unknown key \"port\""),
            ("host=a.com,backend=x:heavy", "bad weight"),
        ] {
            let e = parse(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
