//! `candle-rlhf plot RUN_DIR`: every numeric metric of metrics.jsonl against
//! the step, one SVG per metric family in `RUN_DIR/plots/`.
//!
//! A family is the part of a name before its first `/` (TRL's `objective/kl`,
//! `objective/entropy` share a plot), else the name without an `eval_` prefix
//! (so `loss` and `eval_loss` share one).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::metrics::{read_metrics, METRICS_FILE};
use crate::{Error, IoContext, Result};

/// Metric family → metric name → (step, value) points.
type Families = BTreeMap<String, BTreeMap<String, Vec<(f64, f64)>>>;

pub fn family_of(name: &str) -> String {
    let base = name.strip_prefix("eval_").unwrap_or(name);
    base.split_once('/').map_or(base, |(f, _)| f).to_string()
}

fn collect(run_dir: &Path) -> Result<Families> {
    let mut families = Families::new();
    for record in read_metrics(&run_dir.join(METRICS_FILE))? {
        for (name, value) in record.values {
            if name == "timestamp" || !value.is_finite() {
                continue;
            }
            families
                .entry(family_of(&name))
                .or_default()
                .entry(name)
                .or_default()
                .push((record.step as f64, value));
        }
    }
    Ok(families)
}

/// Draws the plots and returns the files written.
pub fn plot_run(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let families = collect(run_dir)?;
    let out_dir = run_dir.join("plots");
    std::fs::create_dir_all(&out_dir).with_path(&out_dir)?;
    let mut written = vec![];
    for (family, series) in &families {
        let file: String = family
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = out_dir.join(format!("{file}.svg"));
        draw(&path, family, series)
            .map_err(|e| Error::Msg(format!("{}: cannot draw: {e}", path.display())))?;
        written.push(path);
    }
    Ok(written)
}

fn padded_range(lo: f64, hi: f64) -> std::ops::Range<f64> {
    if (hi - lo).abs() < 1e-12 {
        let pad = if lo.abs() > 1e-12 {
            lo.abs() * 0.1
        } else {
            1.0
        };
        (lo - pad)..(hi + pad)
    } else {
        let pad = (hi - lo) * 0.05;
        (lo - pad)..(hi + pad)
    }
}

fn draw(
    path: &Path,
    family: &str,
    series: &BTreeMap<String, Vec<(f64, f64)>>,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let points = series.values().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(family, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(padded_range(x0, x1), padded_range(y0, y1))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if pts.len() < 30 {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_group_eval_and_slash_names() {
        assert_eq!(family_of("loss"), "loss");
        assert_eq!(family_of("eval_loss"), "loss");
        assert_eq!(family_of("objective/kl"), "objective");
        assert_eq!(family_of("eval_objective/kl"), "objective");
        assert_eq!(family_of("learning_rate"), "learning_rate");
    }
}
