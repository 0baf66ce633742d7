//! Result tables (markdown and CSV) and line charts (SVG) for benchmarks, sweeps and plots.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::CliError;
use crate::run_dir::write_atomic;

/// A table of text cells with named columns.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, each with one cell per column.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these columns.
    pub fn new(columns: &[&str]) -> Self {
        Self { columns: columns.iter().map(|c| c.to_string()).collect(), rows: Vec::new() }
    }

    /// Appends a row.
    ///
    /// # Panics
    /// If the row has a different number of cells than the table has columns.
    pub fn push(&mut self, row: Vec<String>) {
        assert_eq!(row.len(), self.columns.len(), "Table::push: one cell per column");
        self.rows.push(row);
    }

    /// The table in GitHub markdown, columns padded to equal width.
    pub fn markdown(&self) -> String {
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .chain([self.columns[c].chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> =
                cells.iter().zip(&widths).map(|(c, &w)| format!("{c:<w$}")).collect();
            format!("| {} |\n", padded.join(" | "))
        };
        let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
        let mut out = line(&self.columns);
        out.push_str(&line(&rule));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }

    /// The table as CSV (RFC 4180 quoting).
    pub fn csv(&self) -> String {
        let quote = |cell: &String| {
            if cell.contains([',', '"', '\n']) {
                format!("\"{}\"", cell.replace('"', "\"\""))
            } else {
                cell.clone()
            }
        };
        let line = |cells: &[String]| cells.iter().map(quote).collect::<Vec<_>>().join(",") + "\n";
        let mut out = line(&self.columns);
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }

    /// Writes `STEM.md` and `STEM.csv` into `dir` (created if missing); returns both paths.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<[PathBuf; 2], CliError> {
        std::fs::create_dir_all(dir).map_err(|e| CliError::io("create", dir, e))?;
        let markdown = dir.join(format!("{stem}.md"));
        let csv = dir.join(format!("{stem}.csv"));
        write_atomic(&markdown, self.markdown().as_bytes())?;
        write_atomic(&csv, self.csv().as_bytes())?;
        Ok([markdown, csv])
    }
}

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// How an axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Linear.
    Linear,
    /// Logarithmic (base 2, for sizes such as context lengths).
    Log2,
    /// Logarithmic (base 10).
    Log10,
}

impl Scale {
    fn axis_value(self, v: f64) -> f64 {
        match self {
            Scale::Linear => v,
            Scale::Log2 => v.log2(),
            Scale::Log10 => v.log10(),
        }
    }

    fn value_at(self, v: f64) -> f64 {
        match self {
            Scale::Linear => v,
            Scale::Log2 => v.exp2(),
            Scale::Log10 => 10f64.powf(v),
        }
    }
}

/// A line chart with a legend.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Caption above the plot.
    pub title: String,
    /// Label of the horizontal axis.
    pub x_label: String,
    /// Label of the vertical axis.
    pub y_label: String,
    /// Horizontal scale.
    pub x_scale: Scale,
    /// Vertical scale.
    pub y_scale: Scale,
    /// The lines.
    pub series: Vec<Series>,
}

/// A number for an axis tick: `1k`, `32k`, `1.5M`, or a short decimal.
pub fn short_number(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(format!("{:.1}", v / 1e6)))
    } else if a >= 1000.0 && (v / 1024.0).fract().abs() < 1e-9 {
        format!("{}k", v / 1024.0)
    } else if a >= 1000.0 {
        format!("{}k", trim(format!("{:.1}", v / 1000.0)))
    } else if a >= 10.0 || a == 0.0 {
        trim(format!("{v:.1}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

/// Line colours: distinct on white and for common colour-vision deficiencies (Tableau 10).
const COLOURS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// Tick count for an axis: one per whole unit of a logarithmic axis (each power of 2 or 10).
fn tick_count(scale: Scale, range: &std::ops::Range<f64>) -> usize {
    match scale {
        Scale::Linear => 10,
        _ => ((range.end - range.start).ceil() as usize + 1).clamp(2, 12),
    }
}

/// Draws `chart` as an SVG file at `path`. Points that a logarithmic axis cannot show (zero,
/// negative, not finite) are left out.
pub fn draw_svg(chart: &Chart, path: &Path) -> Result<(), CliError> {
    let failed = |e: String| CliError::Run(format!("cannot draw `{}`: {e}", path.display()));
    let series: Vec<(String, Vec<(f64, f64)>)> = chart
        .series
        .iter()
        .map(|s| {
            let points = s
                .points
                .iter()
                .map(|&(x, y)| (chart.x_scale.axis_value(x), chart.y_scale.axis_value(y)))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            (s.name.clone(), points)
        })
        .collect();
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if all.is_empty() {
        return Err(failed("no points to draw".into()));
    }
    let range = |values: Vec<f64>| {
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
        (lo - pad)..(hi + pad)
    };
    let x_range = range(all.iter().map(|p| p.0).collect());
    let y_range = range(all.iter().map(|p| p.1).collect());
    let (x_ticks, y_ticks) =
        (tick_count(chart.x_scale, &x_range), tick_count(chart.y_scale, &y_range));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| CliError::io("create", parent, e))?;
    }
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(e.to_string()))?;
    let mut plot = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| failed(e.to_string()))?;
    let (xs, ys) = (chart.x_scale, chart.y_scale);
    let x_format = move |v: &f64| short_number(xs.value_at(*v));
    let y_format = move |v: &f64| short_number(ys.value_at(*v));
    plot.configure_mesh()
        .x_labels(x_ticks)
        .y_labels(y_ticks)
        .light_line_style(WHITE.mix(0.0))
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .x_label_formatter(&x_format)
        .y_label_formatter(&y_format)
        .draw()
        .map_err(|e| failed(e.to_string()))?;
    for (i, (name, points)) in series.into_iter().enumerate() {
        let (r, g, b) = COLOURS[i % COLOURS.len()];
        let color = RGBColor(r, g, b).to_rgba();
        plot.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| failed(e.to_string()))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        plot.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| failed(e.to_string()))?;
    }
    plot.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| failed(e.to_string()))?;
    root.present().map_err(|e| failed(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_csv_keep_every_cell() {
        let mut t = Table::new(&["variant", "note"]);
        t.push(vec!["softmax".into(), "a, \"quoted\" cell".into()]);
        let md = t.markdown();
        assert!(md.starts_with("| variant | note "), "{md}");
        assert_eq!(md.lines().count(), 3);
        assert_eq!(t.csv(), "variant,note\nsoftmax,\"a, \"\"quoted\"\" cell\"\n");
    }

    #[test]
    fn short_numbers_for_axes() {
        assert_eq!(short_number(1024.0), "1k");
        assert_eq!(short_number(32768.0), "32k");
        assert_eq!(short_number(1500.0), "1.5k");
        assert_eq!(short_number(3.25), "3.25");
        assert_eq!(short_number(250.0), "250");
    }

    #[test]
    fn charts_are_written_and_log_axes_drop_zeros() {
        let dir = std::env::temp_dir().join(format!("polysketch-chart-{}", std::process::id()));
        let path = dir.join("chart.svg");
        let chart = Chart {
            title: "t".into(),
            x_label: "context".into(),
            y_label: "µs/token".into(),
            x_scale: Scale::Log2,
            y_scale: Scale::Log10,
            series: vec![Series { name: "a".into(), points: vec![(1024.0, 2.0), (0.0, 1.0)] }],
        };
        draw_svg(&chart, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("context"), "{svg}");
        let empty = Chart { series: vec![], ..chart };
        assert!(draw_svg(&empty, &path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
