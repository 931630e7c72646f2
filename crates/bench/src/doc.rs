//! Writes one benchmark's section of `docs/benchmarks.md`.

use std::path::Path;

const PREAMBLE: &str = "# Benchmarks\n\nMeasured with the developer tool `nimbus-bench` (crate `crates/bench`, not part of the \
product) through the `scripts/bench-*` drivers. Every script runs its baseline and nimbus in the \
same invocation and rewrites only its own section below.\n";

/// Replaces the section starting at the line `heading` (up to the next `## ` heading) with
/// `heading` + `body`, or appends it when missing. Creates the file when it does not exist.
pub fn update_section(path: &Path, heading: &str, body: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| PREAMBLE.to_string());
    let section = format!("{heading}\n\n{}\n", body.trim_end());
    let lines: Vec<&str> = text.lines().collect();
    let out = if let Some(start) = lines.iter().position(|l| l.trim_end() == heading) {
        let end = lines[start + 1..]
            .iter()
            .position(|l| l.starts_with("## "))
            .map_or(lines.len(), |p| start + 1 + p);
        let mut out = lines[..start].join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&section);
        if end < lines.len() {
            out.push('\n');
            out.push_str(&lines[end..].join("\n"));
            out.push('\n');
        }
        out
    } else {
        let mut out = text.trim_end().to_string();
        out.push_str("\n\n");
        out.push_str(&section);
        out
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// A one-line description of this machine plus the noise caveat.
pub fn machine_note() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or_else(
            || "unknown CPU".into(),
            |l| l.trim_start_matches([' ', '\t', ':']).to_string(),
        );
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({model}), {mem_mib} MiB RAM, kernel {}, ext4 on a virtual disk; the machine is \
         shared with other engineers compiling and testing at the same time, so all figures are noisy",
        kernel.trim()
    )
}

/// The commit the binaries were built from, noting uncommitted work in the shared checkout.
pub fn build_note(bin: &std::path::Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .map(|t| {
            chrono::DateTime::<chrono::Utc>::from(t)
                .format("%Y-%m-%d %H:%M UTC")
                .to_string()
        })
        .unwrap_or_default();
    format!(
        "product binary `{}` (release, built {built}); checkout at `{head}`{}",
        bin.display(),
        if dirty {
            " with other engineers' uncommitted work in progress"
        } else {
            ""
        }
    )
}

/// Today's date and time in UTC.
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_its_section() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.md");
        update_section(&p, "## A", "one").unwrap();
        update_section(&p, "## B", "two").unwrap();
        update_section(&p, "## A", "uno\n\n### sub\nx").unwrap();
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.starts_with("# Benchmarks"));
        assert!(
            t.contains("## A\n\nuno\n\n### sub\nx\n\n## B\n\ntwo\n"),
            "{t}"
        );
        assert!(!t.contains("one"));
    }
}
