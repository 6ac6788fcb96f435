//! The plot of an evaluation: one labelled point per configuration, score against decode
//! time per token, with the score's 95% interval as a vertical bar. Drawn with `plotters` as
//! SVG and PNG; text is laid out (and, in the PNG, drawn) with a TrueType font found on the
//! system, or `$FIRSTRT_FONT`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

/// One configuration on the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotPoint {
    /// The configuration's label, written beside the point.
    pub label: String,
    /// Decode time per token, in ms (x).
    pub x: f64,
    /// The score's mean (y).
    pub y: f64,
    /// The lower end of its 95% interval.
    pub low: f64,
    /// The upper end of its 95% interval.
    pub high: f64,
}

impl PlotPoint {
    /// The point of `summary` for metric `metric` times `scale` (100 for a ROUGE F in %), at its
    /// decode ms/token; None when the summary has no such metric.
    pub fn of(summary: &super::report::ConfigSummary, metric: &str, scale: f64) -> Option<PlotPoint> {
        let m = summary.metric(metric)?;
        Some(PlotPoint {
            label: summary.label.clone(),
            x: summary.decode_ms_per_token,
            y: scale * m.mean,
            low: scale * m.ci_low,
            high: scale * m.ci_high,
        })
    }
}

/// A plot that could not be drawn or written; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No point has finite coordinates.
    #[error("{}: nothing to plot (no configuration has a finite score and decode time)", path.display())]
    Empty {
        /// The file that was to be written.
        path: PathBuf,
    },
    /// No TrueType font to lay out and draw the text.
    #[error("{}: no TrueType font found for the plot's text (tried {tried}); set FIRSTRT_FONT to a .ttf file", path.display())]
    NoFont {
        /// The file that was to be written.
        path: PathBuf,
        /// The paths looked at.
        tried: String,
    },
    /// plotters failed (drawing or writing the file).
    #[error("{}: {message}", path.display())]
    Draw {
        /// The file that was to be written.
        path: PathBuf,
        /// What plotters said.
        message: String,
    },
}

/// Where a sans-serif TrueType font usually is (Debian/Ubuntu, Fedora, Arch, macOS, Windows).
const FONT_CANDIDATES: [&str; 7] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Register a font for the bitmap backend once per process: `$FIRSTRT_FONT`, else the first
/// of [`FONT_CANDIDATES`] that parses. Returns the paths tried when none did.
fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let paths: Vec<PathBuf> = match std::env::var_os("FIRSTRT_FONT") {
                Some(p) => vec![PathBuf::from(p)],
                None => FONT_CANDIDATES.iter().map(PathBuf::from).collect(),
            };
            for path in &paths {
                if let Ok(bytes) = std::fs::read(path) {
                    // plotters keeps fonts for the life of the process.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                        return Ok(());
                    }
                }
            }
            Err(paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
        })
        .clone()
}

/// Axis range around `values` with 8% padding (and a unit span when all are equal).
fn padded(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    (lo - 0.08 * span)..(hi + 0.08 * span)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, points: &[PlotPoint], title: &str, y_label: &str) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let x_range = padded(points.iter().map(|p| p.x));
    let y_range = padded(points.iter().flat_map(|p| [p.low, p.high, p.y]).filter(|v| v.is_finite()));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x_range, y_range)
        .map_err(err)?;
    chart.configure_mesh().x_desc("decode ms/token").y_desc(y_label).draw().map_err(err)?;
    let bars = points.iter().filter(|p| p.low.is_finite() && p.high.is_finite());
    chart.draw_series(bars.map(|p| ErrorBar::new_vertical(p.x, p.low, p.y, p.high, BLUE.mix(0.6).filled(), 8))).map_err(err)?;
    chart
        .draw_series(points.iter().map(|p| {
            EmptyElement::at((p.x, p.y)) + Circle::new((0, 0), 4, BLUE.filled()) + Text::new(p.label.clone(), (7, -16), ("sans-serif", 14))
        }))
        .map_err(err)?;
    root.present().map_err(err)
}

/// Write the plot of `points` (those with finite x and y) as an SVG file at `svg` and a PNG
/// file at `png`, 900 x 600 pixels, titled `title`, the y axis named `y_label`.
///
/// Errors: [`PlotError::Empty`] when no point is finite, [`PlotError::NoFont`] when no font
/// is found (both backends lay out text with it), [`PlotError::Draw`] when
/// plotters cannot draw or write a file.
pub fn write_plot(points: &[PlotPoint], title: &str, y_label: &str, svg: &Path, png: &Path) -> Result<(), PlotError> {
    let points: Vec<PlotPoint> = points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()).cloned().collect();
    if points.is_empty() {
        return Err(PlotError::Empty { path: svg.to_path_buf() });
    }
    let size = (900, 600);
    // Both backends measure text with the registered font to lay out labels.
    register_font().map_err(|tried| PlotError::NoFont { path: svg.to_path_buf(), tried })?;
    draw(SVGBackend::new(svg, size).into_drawing_area(), &points, title, y_label)
        .map_err(|message| PlotError::Draw { path: svg.to_path_buf(), message })?;
    draw(BitMapBackend::new(png, size).into_drawing_area(), &points, title, y_label)
        .map_err(|message| PlotError::Draw { path: png.to_path_buf(), message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_svg_and_png() {
        let dir = crate::testdata::TempDir::new("plot");
        let (svg, png) = (dir.join("p.svg"), dir.join("p.png"));
        let points = [
            PlotPoint { label: "full".into(), x: 55.0, y: 0.31, low: 0.28, high: 0.34 },
            PlotPoint { label: "static 6".into(), x: 45.0, y: 0.22, low: 0.19, high: 0.25 },
            PlotPoint { label: "no time".into(), x: f64::NAN, y: 0.1, low: 0.0, high: 0.2 },
        ];
        write_plot(&points, "E2E", "ROUGE-Lsum", &svg, &png).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("static 6") && text.contains("decode ms/token") && !text.contains("no time"), "{text}");
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let err = write_plot(&points[2..], "E2E", "ROUGE-Lsum", &svg, &png).unwrap_err();
        assert!(err.to_string().contains("nothing to plot"), "{err}");
    }
}
