//! SVG plots of evaluation results (feature `report`), with plotters' SVG backend: loss
//! against context length and loss by position in the window. No font is loaded:
//! plotters estimates text extents itself and the SVG names a generic `sans-serif`
//! family for the viewer. `unit` names what a position is (`byte` for the tiny model,
//! `token` for a real one) in the axis labels.

use std::path::Path;

use plotters::coord::combinators::{BindKeyPoints, IntoLogRange};
use plotters::prelude::*;

/// One line of a plot.
#[derive(Debug, Clone)]
pub struct Line {
    /// Legend text.
    pub label: String,
    /// `(x, y)` points.
    pub points: Vec<(f64, f64)>,
    /// Colour.
    pub color: RGBColor,
    /// Dashed (log-n variants) or solid.
    pub dashed: bool,
}

/// Tableau-10, then four darker colours for the Self-Extend, DCA and StreamingLLM
/// families: distinct on screen and in print.
pub const PALETTE: [RGBColor; 14] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(0, 90, 90),
    RGBColor(210, 160, 0),
    RGBColor(110, 0, 110),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> String + '_ {
    move |e| format!("cannot draw {}: {e}", path.display())
}

fn y_range(lines: &[Line], cap: Option<f64>) -> (f64, f64) {
    let ys = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let (lo, hi) = ys
        .filter(|y| y.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let hi = cap.map_or(hi, |c| hi.min(c));
    let pad = ((hi - lo) * 0.05).max(0.01);
    (lo - pad, hi + pad)
}

fn style(line: &Line, width: u32) -> ShapeStyle {
    ShapeStyle::from(&line.color).stroke_width(width)
}

/// The legend, one entry per line, in the given area.
fn legend(area: &Area<'_>, lines: &[Line], path: &Path) -> Result<(), String> {
    let font = ("sans-serif", 13).into_font().color(&BLACK);
    for (i, line) in lines.iter().enumerate() {
        let y = 40 + 22 * i as i32;
        if line.dashed {
            for s in 0..3 {
                let x0 = 8 + 10 * s;
                area.draw(&PathElement::new(
                    vec![(x0, y), (x0 + 6, y)],
                    style(line, 2),
                ))
                .map_err(err(path))?;
            }
        } else {
            area.draw(&PathElement::new(vec![(8, y), (34, y)], style(line, 2)))
                .map_err(err(path))?;
        }
        area.draw(&Circle::new((21, y), 3, style(line, 1).filled()))
            .map_err(err(path))?;
        area.draw(&Text::new(line.label.clone(), (42, y - 7), font.clone()))
            .map_err(err(path))?;
    }
    Ok(())
}

fn draw_line<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    line: &Line,
    markers: bool,
    path: &Path,
) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate<From = (f64, f64)>,
{
    let pts: Vec<(f64, f64)> = line
        .points
        .iter()
        .copied()
        .filter(|p| p.1.is_finite())
        .collect();
    if line.dashed {
        chart
            .draw_series(DashedLineSeries::new(pts.clone(), 7, 4, style(line, 2)))
            .map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
    } else {
        chart
            .draw_series(LineSeries::new(pts.clone(), style(line, 2)))
            .map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
    }
    if markers {
        chart
            .draw_series(
                pts.iter()
                    .map(|&p| Circle::new(p, 3, style(line, 1).filled())),
            )
            .map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Loss against context length (log-2 x axis) for every scheme.
pub fn loss_vs_length(
    path: &Path,
    title: &str,
    unit: &str,
    lengths: &[usize],
    train_len: usize,
    lines: &[Line],
) -> Result<(), String> {
    let root = SVGBackend::new(path, (1120, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let (left, right) = root.split_horizontally(800);
    let (lo, hi) = (
        *lengths.first().ok_or("no lengths")? as f64,
        *lengths.last().ok_or("no lengths")? as f64,
    );
    let (lo, hi) = if lo == hi {
        (lo / 1.5, hi * 1.5)
    } else {
        (lo / 1.15, hi * 1.15)
    };
    let (y0, y1) = y_range(lines, None);
    let keys: Vec<f64> = lengths.iter().map(|&l| l as f64).collect();
    let mut chart = ChartBuilder::on(&left)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale().with_key_points(keys), y0..y1)
        .map_err(err(path))?;
    chart
        .configure_mesh()
        .x_desc(format!("context length in {unit}s (log scale)"))
        .y_desc(format!(
            "loss on the last {unit}s of each window (nats/{unit})"
        ))
        .x_label_formatter(&|v| {
            let x = v.round() as usize;
            if x.is_multiple_of(train_len) {
                format!("{x} ({}x)", x / train_len)
            } else {
                format!("{x}")
            }
        })
        .y_label_formatter(&|v| format!("{v:.2}"))
        .label_style(("sans-serif", 13))
        .max_light_lines(1)
        .light_line_style(RGBColor(245, 245, 245))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(err(path))?;
    for line in lines {
        draw_line(&mut chart, line, true, path)?;
    }
    legend(&right, lines, path)?;
    root.present().map_err(err(path))?;
    Ok(())
}

/// Loss against position within the window (linear axes), with the training length
/// marked.
pub fn per_position(
    path: &Path,
    title: &str,
    unit: &str,
    len: usize,
    train_len: usize,
    lines: &[Line],
) -> Result<(), String> {
    let root = SVGBackend::new(path, (1120, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let (left, right) = root.split_horizontally(800);
    // Cap the y axis so that the first positions (almost no context) do not flatten the rest.
    let tail: Vec<Line> = lines
        .iter()
        .map(|l| Line {
            points: l.points.iter().copied().filter(|p| p.0 >= 32.0).collect(),
            ..l.clone()
        })
        .collect();
    let (y0, y1) = y_range(&tail, None);
    let mut chart = ChartBuilder::on(&left)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..len as f64, y0..y1)
        .map_err(err(path))?;
    chart
        .configure_mesh()
        .x_desc(format!("position in the window ({unit}s)"))
        .y_desc(format!("loss (nats/{unit}, mean over windows and buckets)"))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 13))
        .max_light_lines(1)
        .light_line_style(RGBColor(245, 245, 245))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(err(path))?;
    let mark = train_len as f64;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(mark, y0), (mark, y1)],
            5,
            5,
            ShapeStyle::from(&BLACK).stroke_width(1),
        ))
        .map_err(err(path))?;
    chart
        .draw_series(std::iter::once(Text::new(
            format!("training length {train_len}"),
            (mark, y1),
            ("sans-serif", 12).into_font().color(&BLACK),
        )))
        .map_err(err(path))?;
    for line in &tail {
        draw_line(&mut chart, line, false, path)?;
    }
    legend(&right, lines, path)?;
    root.present().map_err(err(path))?;
    Ok(())
}
