//! Keeps `docs/benchmarks.md` and `docs/bench-history/` current.
//!
//! `docs/benchmarks.md` opens with one headline table (metric | target | latest result | ratio
//! to baseline | verdict | date) between the markers [`TABLE_START`] and [`TABLE_END`]; each
//! benchmark then has one `## ` section: what it measures (hand-written, kept) and its latest
//! run (the [`LATEST`] subsection, rewritten). A run's full log also goes to the top of
//! `docs/bench-history/<script>.md` (newest first). A benchmark run replaces only its own rows
//! (matched by the metric cell) and its own latest run. Smoke runs write nothing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Marks the start of the headline table.
pub const TABLE_START: &str =
    "<!-- headline table: rows are rewritten by the benchmark scripts -->";
/// Marks its end.
pub const TABLE_END: &str = "<!-- end of headline table -->";
const TABLE_HEAD: &str = "| metric | target | latest result | ratio to baseline | verdict | date |\n|---|---|---|---|---|---|";

const PREAMBLE: &str = "# Benchmarks\n\nMeasured with the developer tool `nimbus-bench` (crate `crates/bench`, not part of the \
product) through the `scripts/bench-*` drivers. Every script runs its baseline and nimbus in the \
same invocation and rewrites only its own rows of the table and its own section below.\n";

/// One row of the headline table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// What is measured (the row's key).
    pub metric: String,
    /// The target, e.g. `<= 1.5x bare runc`.
    pub target: String,
    /// The latest result with its unit.
    pub result: String,
    /// The ratio to the baseline measured in the same run (empty when there is none).
    pub ratio: String,
    /// `met`, `missed` or a short note.
    pub verdict: String,
    /// Date of the run (YYYY-MM-DD).
    pub date: String,
}

impl Row {
    /// Parses `metric|target|result|ratio|verdict` (the command-line form; date = today).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let f: Vec<&str> = s.split('|').map(str::trim).collect();
        let [metric, target, result, ratio, verdict] = f.as_slice() else {
            anyhow::bail!("a row is metric|target|result|ratio|verdict, got {s:?}");
        };
        if metric.is_empty() {
            anyhow::bail!("a row needs a metric: {s:?}");
        }
        Ok(Self {
            metric: (*metric).into(),
            target: (*target).into(),
            result: (*result).into(),
            ratio: (*ratio).into(),
            verdict: (*verdict).into(),
            date: today(),
        })
    }

    fn line(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} |",
            self.metric, self.target, self.result, self.ratio, self.verdict, self.date
        )
    }

    fn metric_of(line: &str) -> Option<&str> {
        line.strip_prefix('|')?.split('|').next().map(str::trim)
    }
}

/// `met` or `missed` in bold, for the verdict column.
pub fn verdict(met: bool) -> String {
    if met { "**met**" } else { "**missed**" }.to_string()
}

/// Replaces the rows of `rows` (matched by metric) in the headline table of `text`, appending
/// new ones; creates the table after the first paragraph when missing.
pub fn with_rows(text: &str, rows: &[Row]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let start = lines.iter().position(|l| l == TABLE_START);
    let end = lines.iter().position(|l| l == TABLE_END);
    let (start, end) = if let (Some(s), Some(e)) = (start, end) {
        (s, e)
    } else {
        // After the title and its first paragraph.
        let at = lines
            .iter()
            .enumerate()
            .skip(2)
            .find(|(_, l)| l.is_empty())
            .map_or(lines.len(), |(i, _)| i);
        let mut table = vec![String::new(), TABLE_START.to_string()];
        table.extend(TABLE_HEAD.lines().map(str::to_string));
        table.push(TABLE_END.to_string());
        let end = at + table.len() - 1;
        lines.splice(at..at, table);
        (at + 1, end)
    };
    let mut body: Vec<String> = lines[start + 1..end]
        .iter()
        .filter(|l| l.starts_with('|'))
        .cloned()
        .collect();
    if body.len() < 2 {
        body = TABLE_HEAD.lines().map(str::to_string).collect();
    }
    for r in rows {
        match body
            .iter()
            .skip(2)
            .position(|l| Row::metric_of(l) == Some(r.metric.as_str()))
        {
            Some(i) => body[i + 2] = r.line(),
            None => body.push(r.line()),
        }
    }
    lines.splice(start + 1..end, body);
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// Replaces the section starting at the line `heading` (up to the next `## ` heading) with
/// `heading` + `body` in `text`, or appends it when missing.
pub fn with_section(text: &str, heading: &str, body: &str) -> String {
    let section = format!("{heading}\n\n{}\n", body.trim_end());
    let lines: Vec<&str> = text.lines().collect();
    if let Some(start) = lines.iter().position(|l| l.trim_end() == heading) {
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
    }
}

/// The subsection of a benchmark's section that a run rewrites; what comes before it (what the
/// benchmark measures, how to read it) is kept.
pub const LATEST: &str = "### Latest run";

/// Replaces the [`LATEST`] subsection of section `heading` in `text` with `body` (up to the next
/// `## ` heading), keeping the rest of the section; appends the subsection, or the section, when
/// missing.
pub fn with_latest(text: &str, heading: &str, body: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines.iter().position(|l| l.trim_end() == heading) else {
        return with_section(text, heading, &format!("{LATEST}\n\n{}", body.trim_end()));
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |p| start + 1 + p);
    let at = lines[start + 1..end]
        .iter()
        .position(|l| l.trim_end() == LATEST)
        .map_or(end, |p| start + 1 + p);
    let mut kept: Vec<&str> = lines[..at].to_vec();
    while kept.last().is_some_and(|l| l.trim().is_empty()) {
        kept.pop();
    }
    let mut out = kept.join("\n");
    let _ = write!(out, "\n\n{LATEST}\n\n{}\n", body.trim_end());
    if end < lines.len() {
        out.push('\n');
        out.push_str(&lines[end..].join("\n"));
        out.push('\n');
    }
    out
}

/// Puts `entry` at the top of a history file's runs (below its title).
pub fn with_history_entry(text: &str, script: &str, entry: &str) -> String {
    let title = format!("# Run history: `scripts/{script}`");
    let intro = "Newest first. Each entry is one full run as the script recorded it; the \
                 latest also appears in [benchmarks.md](../benchmarks.md).";
    let rest = text.strip_prefix(&title).map_or(text.trim_start(), |t| {
        let t = t.trim_start();
        t.strip_prefix(intro).unwrap_or(t).trim_start()
    });
    let mut out = format!("{title}\n\n{intro}\n\n{}\n", entry.trim_end());
    if !rest.is_empty() {
        out.push('\n');
        out.push_str(rest.trim_end());
        out.push('\n');
    }
    out
}

/// One benchmark run to record.
pub struct Record<'a> {
    /// `docs/benchmarks.md`.
    pub doc: &'a Path,
    /// The script's name, e.g. `bench-launch` (names the history file).
    pub script: &'a str,
    /// The benchmark's section heading in `benchmarks.md`, e.g. `## Launch latency`.
    pub heading: &'a str,
    /// The command line that produced the run.
    pub command: &'a str,
    /// The run's results (markdown).
    pub body: &'a str,
    /// Its headline rows.
    pub rows: &'a [Row],
}

/// The history file of `script` next to `doc`.
pub fn history_path(doc: &Path, script: &str) -> PathBuf {
    doc.parent()
        .unwrap_or(Path::new("."))
        .join("bench-history")
        .join(format!("{script}.md"))
}

/// Writes a run: its rows into the headline table, its body as the [`LATEST`] subsection of the
/// benchmark's section (with a link to the history), and a history entry.
pub fn record(r: &Record<'_>) -> anyhow::Result<()> {
    let hist = history_path(r.doc, r.script);
    let mut entry = String::new();
    let _ = writeln!(entry, "## {} (`{}`)\n", now(), r.command);
    entry.push_str(r.body.trim_end());
    entry.push('\n');
    let old_hist = std::fs::read_to_string(&hist).unwrap_or_default();
    if let Some(dir) = hist.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&hist, with_history_entry(&old_hist, r.script, &entry))?;

    let mut section = String::new();
    let _ = writeln!(
        section,
        "Latest run: {} (`{}`); earlier runs: [bench-history/{}.md](bench-history/{}.md).\n",
        now(),
        r.command,
        r.script,
        r.script
    );
    section.push_str(r.body.trim_end());
    let text = std::fs::read_to_string(r.doc).unwrap_or_else(|_| PREAMBLE.to_string());
    let text = with_rows(&with_latest(&text, r.heading, &section), r.rows);
    std::fs::write(r.doc, text)?;
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
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{cores} cores ({model}), {mem_mib} MiB RAM, kernel {}, ext4 on a virtual disk, load \
         average {load} at the end; the machine is shared with other engineers compiling and \
         testing at the same time, so all figures are noisy",
        kernel.trim()
    )
}

/// The commit the binaries were built from, noting uncommitted work in the checkout.
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
        "product binary `{}` (built {built}); checkout at `{head}`{}",
        bin.display(),
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        }
    )
}

/// Today's date and time in UTC.
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string()
}

/// Today's date in UTC.
pub fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

/// `nimbus-bench record`: records a run of a shell-script benchmark.
#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// `docs/benchmarks.md`.
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub doc: PathBuf,
    /// The script's name, e.g. `bench-lb`.
    #[arg(long)]
    pub script: String,
    /// The section heading, e.g. `## Load balancer`.
    #[arg(long)]
    pub heading: String,
    /// The command line that produced the run.
    #[arg(long)]
    pub command: String,
    /// A markdown file with the run's results.
    #[arg(long)]
    pub body: PathBuf,
    /// A headline row `metric|target|result|ratio|verdict` (repeatable).
    #[arg(long = "row")]
    pub rows: Vec<String>,
}

/// Runs `nimbus-bench record`.
pub fn run_record(a: &RecordArgs) -> anyhow::Result<()> {
    let rows = a
        .rows
        .iter()
        .map(|r| Row::parse(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !a.heading.starts_with("## ") {
        anyhow::bail!("--heading must start with \"## \"");
    }
    let body = std::fs::read_to_string(&a.body)?;
    record(&Record {
        doc: &a.doc,
        script: &a.script,
        heading: &a.heading,
        command: &a.command,
        body: &body,
        rows: &rows,
    })?;
    println!(
        "recorded in {} and {}",
        a.doc.display(),
        history_path(&a.doc, &a.script).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(metric: &str, result: &str) -> Row {
        Row {
            metric: metric.into(),
            target: "t".into(),
            result: result.into(),
            ratio: "1.00x".into(),
            verdict: "met".into(),
            date: "2026-01-01".into(),
        }
    }

    #[test]
    fn replaces_only_its_section() {
        let t = with_section(PREAMBLE, "## A", "one");
        let t = with_section(&t, "## B", "two");
        let t = with_section(&t, "## A", "uno\n\n### sub\nx");
        assert!(t.starts_with("# Benchmarks"));
        assert!(
            t.contains("## A\n\nuno\n\n### sub\nx\n\n## B\n\ntwo\n"),
            "{t}"
        );
        assert!(!t.contains("one"));
    }

    #[test]
    fn rows_are_created_replaced_by_metric_and_kept_in_order() {
        let t = with_rows(PREAMBLE, &[row("a", "1"), row("b", "2")]);
        assert!(t.starts_with("# Benchmarks\n\nMeasured"), "{t}");
        let t = with_section(&t, "## A", "body");
        let t = with_rows(&t, &[row("a", "3"), row("c", "4")]);
        let table: Vec<&str> = t.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(table.len(), 4, "{t}");
        assert!(table[1].starts_with("| a | t | 3 |"), "{t}");
        assert!(table[2].starts_with("| b | t | 2 |"), "{t}");
        assert!(table[3].starts_with("| c | t | 4 |"), "{t}");
        let start = t.find(TABLE_START).unwrap();
        assert!(start < t.find("## A").unwrap());
    }

    #[test]
    fn latest_run_replaces_only_its_subsection() {
        let t = with_latest(PREAMBLE, "## A", "run 1");
        assert!(t.contains("## A\n\n### Latest run\n\nrun 1\n"), "{t}");
        let t = with_section(&t, "## B", "about b");
        let t = t.replace("## A\n\n", "## A\n\nabout a\n\n");
        let t = with_latest(&t, "## A", "run 2");
        assert!(
            t.contains("## A\n\nabout a\n\n### Latest run\n\nrun 2\n\n## B\n\nabout b\n"),
            "{t}"
        );
        let t = with_latest(&t, "## B", "run 3");
        assert!(
            t.ends_with("## B\n\nabout b\n\n### Latest run\n\nrun 3\n"),
            "{t}"
        );
        assert!(!t.contains("run 1"));
    }

    #[test]
    fn history_is_newest_first() {
        let h = with_history_entry("", "bench-x", "## run 1\n\nx");
        let h = with_history_entry(&h, "bench-x", "## run 2\n\ny");
        assert!(h.starts_with("# Run history: `scripts/bench-x`"));
        assert!(h.find("run 2").unwrap() < h.find("run 1").unwrap(), "{h}");
        assert_eq!(h.matches("# Run history").count(), 1);
        assert_eq!(h.matches("Newest first").count(), 1);
    }

    #[test]
    fn row_parsing() {
        let r = Row::parse("m | <= 1x | 3 ms | 1.2x | **missed**").unwrap();
        assert_eq!(r.metric, "m");
        assert_eq!(r.verdict, "**missed**");
        assert!(Row::parse("a|b").is_err());
        assert!(Row::parse("|b|c|d|e").is_err());
    }
}
