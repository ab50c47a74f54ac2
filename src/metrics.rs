//! Metrics: one JSON object per logging step appended to
//! `RUN_DIR/metrics.jsonl`, and a progress bar on a terminal.

use std::collections::BTreeMap;
use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::{Error, IoContext, Result};

pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of metrics.jsonl.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub step: u64,
    pub values: BTreeMap<String, f64>,
}

/// Appends records to `RUN_DIR/metrics.jsonl`, flushing each (on rank 0
/// of a data-parallel job; the other ranks' logs write nothing).
pub struct MetricsLog {
    path: PathBuf,
    file: Option<fs::File>,
}

impl MetricsLog {
    /// Opens the log for appending. With `keep_through = Some(step)` (a
    /// resumed run) lines for later steps are first removed.
    pub fn open(run_dir: &Path, keep_through: Option<u64>) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        if !crate::dist::world().is_main() {
            return Ok(Self { path, file: None });
        }
        if let (Some(limit), true) = (keep_through, path.exists()) {
            let text = fs::read_to_string(&path).with_path(&path)?;
            let kept: String = text
                .lines()
                .filter(|line| step_of(line).is_some_and(|s| s <= limit))
                .map(|line| format!("{line}\n"))
                .collect();
            crate::io::atomic_write(&path, kept.as_bytes())?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_path(&path)?;
        Ok(Self {
            path,
            file: Some(file),
        })
    }

    /// Appends `{"step": step, "timestamp": unix seconds, name: value, ...}`.
    /// Non-finite values are written as null (JSON has no NaN).
    pub fn log<K: AsRef<str>>(&mut self, step: u64, values: &[(K, f64)]) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        obj.insert("timestamp".into(), serde_json::json!(now));
        for (k, v) in values {
            obj.insert(
                k.as_ref().to_string(),
                serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into),
            );
        }
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(file, "{line}").with_path(&self.path)?;
        file.flush().with_path(&self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn step_of(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("step")?
        .as_u64()
}

/// Reads metrics.jsonl; keeps numeric fields (null values are skipped).
/// A line that is not a JSON object with a step is an error naming the line.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let text = fs::read_to_string(path).with_path(path)?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| Error::Parse {
            path: path.to_path_buf(),
            message: format!("line {}: {why}", i + 1),
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let obj = value.as_object().ok_or_else(|| bad("not a JSON object"))?;
        let step = obj
            .get("step")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| bad("no integer `step`"))?;
        let values = obj
            .iter()
            .filter(|(k, _)| *k != "step")
            .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
            .collect();
        out.push(Record { step, values });
    }
    Ok(out)
}

/// A progress bar with ETA and the key figures, drawn only on a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(total: u64, label: &str) -> Self {
        if !std::io::stderr().is_terminal() || !crate::dist::world().is_main() {
            return Self { bar: None };
        }
        let bar = ProgressBar::new(total);
        let style =
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        Self { bar: Some(bar) }
    }

    /// Moves to `position` and shows `figures` as `name=value`.
    pub fn update(&self, position: u64, figures: &[(&str, f64)]) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            let msg: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
            bar.set_message(msg.join(" "));
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_append_read_and_truncate_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), None).unwrap();
        for step in 1..=5 {
            log.log(step, &[("loss", 1.0 / step as f64), ("bad", f64::NAN)])
                .unwrap();
        }
        let records = read_metrics(log.path()).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[1].values["loss"], 0.5);
        assert!(
            !records[1].values.contains_key("bad"),
            "NaN is written as null and skipped"
        );
        // A resume from step 3 drops the lines of steps 4 and 5.
        let mut log = MetricsLog::open(dir.path(), Some(3)).unwrap();
        log.log(4, &[("loss", 9.0)]).unwrap();
        let steps: Vec<u64> = read_metrics(log.path())
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
    }

    #[test]
    fn malformed_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        fs::write(&path, "{\"step\": 1, \"loss\": 2}\nnot json\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(
            err.contains("metrics.jsonl") && err.contains("line 2"),
            "{err}"
        );
    }
}
