//! Rows of the results: a table for BENCHMARKS.md and one JSON line each.

use serde_json::{Value, json};

/// One measured row.
#[derive(Debug, Clone)]
pub struct Row {
    /// Scenario id (P6, P4 ...).
    pub id: String,
    /// What ran, e.g. "hoard 384 MiB".
    pub what: String,
    /// The link, e.g. "100 Mbit/s, RTT 40 ms".
    pub link: String,
    /// The figure, human readable.
    pub figure: String,
    /// The ratio the goal is about.
    pub ratio: Option<f64>,
    /// The goal, e.g. "≥ 0.9× link".
    pub goal: String,
    /// Whether the goal was met (None: no goal, information only).
    pub met: Option<bool>,
    /// Everything measured, for the JSON line.
    pub details: Value,
}

impl Row {
    pub fn json(&self, date: &str) -> Value {
        json!({
            "date": date,
            "id": self.id,
            "what": self.what,
            "link": self.link,
            "figure": self.figure,
            "ratio": self.ratio,
            "goal": self.goal,
            "met": self.met,
            "details": self.details,
        })
    }
}

/// The rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| id | scenario | link | result | ratio | goal | met |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.id,
            r.what,
            r.link,
            r.figure,
            r.ratio.map_or("".into(), |x| format!("{x:.2}")),
            r.goal,
            match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            }
        ));
    }
    out
}

/// The P1 section: each kernel's tables (direct, the headline; buffered;
/// host memory) from the rows' details, as `scripts/bench-ublk` printed
/// them.
pub fn p1_tables(rows: &[Row]) -> String {
    let mut kernels = std::collections::BTreeMap::new();
    for r in rows.iter().filter(|r| r.id == "P1") {
        if let (Some(k), Some(t)) = (r.details["kernel"].as_str(), r.details.get("tables")) {
            kernels.entry(k.to_owned()).or_insert_with(|| t.clone());
        }
    }
    if kernels.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "## P1: cached I/O, like for like\n\n\
         Every target in both cache I/O modes over the same kind of file (an ext4 on a block \
         device): direct (isr `--cache-io direct`, rublk's default O_DIRECT, the kernel loop \
         device with `--direct-io=on`) is the headline, as both peers' default and isr's; \
         buffered (`--cache-io buffered`, `rublk --buffered-io`, `--direct-io=off`) holds the \
         whole disk in the host's page cache. After each kernel's two tables, host memory: a \
         1 GiB working set read once whole through isr in each mode.\n\n",
    );
    for tables in kernels.values() {
        for mode in ["direct", "buffered", "memory"] {
            if let Some(lines) = tables[mode].as_array() {
                out.push_str("```\n");
                for l in lines {
                    out.push_str(l.as_str().unwrap_or_default());
                    out.push('\n');
                }
                out.push_str("```\n\n");
            }
        }
    }
    out
}

/// The P3 plot (time to the boot's working set against the link speed),
/// drawn by gnuplot into `png`.
pub fn plot_p3(
    points: &[crate::replay::Point],
    png: &std::path::Path,
    work: &std::path::Path,
) -> Result<(), String> {
    let mut data = String::from("# Mbit/s limit isr_later isr_first nbdkit download\n");
    for p in points {
        data.push_str(&format!(
            "{} {} {} {} {} {}\n",
            p.rate as f64 * 8.0 / 1e6,
            p.limit,
            p.second,
            p.first,
            p.nbdkit,
            p.download
        ));
    }
    let dat = work.join("p3.dat");
    std::fs::write(&dat, data).map_err(|e| format!("{}: {e}", dat.display()))?;
    let script = format!(
        "set terminal pngcairo size 900,560 noenhanced font ',11'\n\
         set output '{png}'\n\
         set title 'P3: a boot working set from a cold cache, RTT 40 ms'\n\
         set xlabel 'link (Mbit/s)'\nset ylabel 'seconds to complete the working set'\n\
         set logscale xy\nset grid\nset key top right\n\
         set xtics ({xtics})\nset xrange [{lo}:{hi}]\n\
         plot '{dat}' using 1:6 with linespoints lw 2 title 'download the whole image first', \
         '' using 1:5 with linespoints lw 2 title 'nbdkit curl + cache filter', \
         '' using 1:4 with linespoints lw 2 title 'isr, first session', \
         '' using 1:3 with linespoints lw 2 title 'isr, later session (trace order)', \
         '' using 1:2 with lines dt 2 lw 2 title 'physical limit'\n",
        png = png.display(),
        dat = dat.display(),
        lo = points.iter().map(|p| p.rate).min().unwrap_or(1) as f64 * 8.0 / 1e6 * 0.7,
        hi = points.iter().map(|p| p.rate).max().unwrap_or(1) as f64 * 8.0 / 1e6 * 1.4,
        xtics = points
            .iter()
            .map(|p| format!("{:.0}", p.rate as f64 * 8.0 / 1e6))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let gp = work.join("p3.gp");
    std::fs::write(&gp, script).map_err(|e| format!("{}: {e}", gp.display()))?;
    let out = std::process::Command::new("gnuplot")
        .arg(&gp)
        .output()
        .map_err(|e| format!("cannot run gnuplot (scripts/setup installs gnuplot-nox): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "gnuplot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

impl Row {
    /// A row printed by another benchmark script (`{"row": {...}}`).
    pub fn from_json(v: &Value) -> Option<Row> {
        let r = v.get("row")?;
        let text = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Some(Row {
            id: text("id"),
            what: text("what"),
            link: text("link"),
            figure: text("figure"),
            ratio: r.get("ratio").and_then(Value::as_f64),
            goal: text("goal"),
            met: r.get("met").and_then(Value::as_bool),
            details: r.get("details").cloned().unwrap_or(Value::Null),
        })
        .filter(|row| !row.id.is_empty())
    }
}

/// Runs `script ARGS` (one of the repository's `scripts/bench-*` with
/// `--json`) and takes the rows it prints, one `{"row": ...}` per line;
/// its other output passes through to stderr.
pub fn script_rows(
    repo: &std::path::Path,
    script: &str,
    args: &[&str],
) -> Result<Vec<Row>, String> {
    let path = repo.join("scripts").join(script);
    let out = std::process::Command::new(&path)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Row> = text
        .lines()
        .filter(|l| l.starts_with("{\"row\""))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Row::from_json(&v))
        .collect();
    for l in text.lines().filter(|l| !l.starts_with("{\"row\"")) {
        eprintln!("{l}");
    }
    if !out.status.success() {
        return Err(format!(
            "{script} {} failed ({})",
            args.join(" "),
            out.status
        ));
    }
    if rows.is_empty() {
        return Err(format!("{script} {} printed no rows", args.join(" ")));
    }
    Ok(rows)
}
