//! Rows of the results: a table for BENCHMARKS.md and one JSON line each.

use serde_json::{Value, json};

/// One measured row.
#[derive(Debug, Clone)]
pub struct Row {
    /// Scenario id (P6, P4 ...).
    pub id: &'static str,
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
