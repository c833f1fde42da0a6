//! Line charts for the reports (`tilt bench`, `tilt eval`), drawn by plotters into SVG text.
//! A chart is a title, axes with a light grid, one colour per series (line and dots), and the
//! legend below the plot, one row a series, so that it never covers a line.

use std::ops::Range;

use plotters::coord::ranged1d::{AsRangedCoord, IntoSegmentedCoord, SegmentValue, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Points of one series; `line` joins them in order. Points with a coordinate that is not
/// finite are not drawn.
pub(crate) struct XySeries<X = f64> {
    pub label: String,
    pub points: Vec<(X, f64)>,
    pub line: bool,
}

/// One chart: numeric axes (negative values included), each fitted to its own points.
pub(crate) struct Panel<X = f64> {
    pub title: String,
    pub x_title: String,
    pub y_title: String,
    pub series: Vec<XySeries<X>>,
}

/// Charts stacked in one SVG, each with its own x and y range.
pub(crate) fn xy_panels(panels: &[Panel]) -> String {
    render(panels, |area, panel| {
        let points = || panel.series.iter().flat_map(|s| s.points.iter());
        let x = padded(span(points().map(|p| p.0)));
        draw(area, panel, x, y_range(panel), 10, &|v| tick(*v))
    })
}

/// A chart with the load points `ticks` evenly spaced on x and y from 0: one line per
/// (label, value per tick); a missing value is not drawn, and the line joins the others.
pub(crate) fn categories(
    title: &str,
    x_title: &str,
    y_title: &str,
    ticks: &[String],
    lines: &[(String, Vec<Option<f64>>)],
) -> String {
    let panel = Panel {
        title: title.into(),
        x_title: x_title.into(),
        y_title: y_title.into(),
        series: lines
            .iter()
            .map(|(label, values)| XySeries {
                label: label.clone(),
                points: (0..)
                    .zip(values)
                    .filter_map(|(i, v)| Some((SegmentValue::CenterOf(i), (*v)?)))
                    .collect(),
                line: true,
            })
            .collect(),
    };
    let top = match span(
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1)),
    ) {
        Some((_, hi)) if hi > 0.0 => hi * 1.08,
        _ => 1.0,
    };
    let last = ticks.len().max(1) as i32 - 1;
    render(&[panel], |area, panel| {
        let tick = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => ticks.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        draw(
            area,
            panel,
            (0..last).into_segmented(),
            0.0..top,
            ticks.len(),
            &tick,
        )
    })
}

/// The y range of `panel`'s finite points, with some room above and below.
pub(crate) fn y_range<X>(panel: &Panel<X>) -> Range<f64> {
    padded(span(
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1)),
    ))
}

const WIDTH: u32 = 760;
/// A panel's height above its legend: title, plot and axis labels.
const CHART_H: u32 = 380;
const LEGEND_ROW: u32 = 20;
const FONT: &str = "sans-serif";

const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Drawn = Result<(), DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>>;

/// One SVG with `panels` stacked, each drawn by `chart` into its own area.
fn render<X>(panels: &[Panel<X>], chart: impl Fn(&Area, &Panel<X>) -> Drawn) -> String {
    let height = |p: &Panel<X>| CHART_H + LEGEND_ROW * p.series.len() as u32 + 10;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, panels.iter().map(height).sum()))
            .into_drawing_area();
        let drawn = root.fill(&WHITE).and_then(|()| {
            let mut rest = root.clone();
            for panel in panels {
                let (area, below) = rest.split_vertically(height(panel));
                chart(&area, panel)?;
                rest = below;
            }
            root.present()
        });
        // Text only goes into a String, and without font files text is measured by estimate:
        // nothing here can fail.
        drawn.expect("drawing an SVG into a string");
    }
    svg
}

/// `panel` in `area`: the chart on top, over `x` and `y`, with at most `x_labels` x labels written
/// by `x_label`; the legend below it.
fn draw<X>(
    area: &Area,
    panel: &Panel<X::Value>,
    x: X,
    y: Range<f64>,
    x_labels: usize,
    x_label: &dyn Fn(&X::Value) -> String,
) -> Drawn
where
    X: AsRangedCoord,
    X::CoordDescType: ValueFormatter<X::Value>,
    X::Value: Finite + Clone + 'static,
{
    let (plot, legend) = area.split_vertically(CHART_H);
    let mut chart = ChartBuilder::on(&plot)
        .caption(&panel.title, (FONT, 19))
        .margin_top(8)
        .margin_left(10)
        .margin_right(24)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(&panel.x_title)
        .y_desc(&panel.y_title)
        .x_labels(x_labels)
        .x_label_formatter(x_label)
        .y_label_formatter(&|v| tick(*v))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 15))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
        .draw()?;
    for (n, s) in panel.series.iter().enumerate() {
        let color = COLORS[n % COLORS.len()];
        let finite = || {
            s.points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .cloned()
        };
        if s.line {
            chart.draw_series(LineSeries::new(finite(), color.stroke_width(2)))?;
        }
        let radius = if s.line { 3 } else { 5 };
        chart.draw_series(finite().map(|p| Circle::new(p, radius, color.filled())))?;
        let (ly, lx) = (LEGEND_ROW as i32 * n as i32 + 10, 74);
        // A bar for a line, a square for points: rectangles, so that the circles are the data.
        let swatch = if s.line {
            [(lx, ly - 1), (lx + 24, ly + 2)]
        } else {
            [(lx + 8, ly - 4), (lx + 16, ly + 4)]
        };
        legend.draw(&Rectangle::new(swatch, color.filled()))?;
        let text = TextStyle::from((FONT, 15)).pos(Pos::new(HPos::Left, VPos::Center));
        legend.draw(&Text::new(s.label.as_str(), (lx + 32, ly), text))?;
    }
    Ok(())
}

/// A tick label: `v` with at most 6 decimals and no trailing zeros.
fn tick(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    match s {
        "-0" => "0".into(),
        s => s.into(),
    }
}

/// A coordinate that can be drawn.
trait Finite {
    fn is_finite(&self) -> bool;
}

impl Finite for f64 {
    fn is_finite(&self) -> bool {
        f64::is_finite(*self)
    }
}

impl Finite for SegmentValue<i32> {
    fn is_finite(&self) -> bool {
        true
    }
}

/// The least and greatest of the finite `values`.
fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// `lo..hi` with 6 % room either side; around a single value, half its size (or 0.5).
fn padded(span: Option<(f64, f64)>) -> Range<f64> {
    match span {
        None => 0.0..1.0,
        Some((lo, hi)) if hi - lo > 1e-12 * hi.abs().max(1.0) => {
            let room = 0.06 * (hi - lo);
            lo - room..hi + room
        }
        Some((v, _)) => {
            let room = 0.5 * v.abs().max(1.0);
            v - room..v + room
        }
    }
}

/// The contents of an SVG's text elements, trimmed.
#[cfg(test)]
pub(crate) fn texts(svg: &str) -> Vec<&str> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim()))
        .collect()
}

/// Checks that `svg` is one SVG element with each of `wanted` among its texts.
#[cfg(test)]
pub(crate) fn assert_svg_with(svg: &str, wanted: &[&str]) {
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let texts = texts(svg);
    for text in wanted {
        assert!(texts.contains(text), "{text} not in {texts:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_stack_with_titles_escaped_labels_and_only_finite_points() {
        let panel = |line| Panel {
            title: "t<1>".into(),
            x_title: "x".into(),
            y_title: "y".into(),
            series: vec![XySeries {
                label: "s<1>".into(),
                points: vec![
                    (-1.0, -3.0),
                    (0.5, 2.0),
                    (4.0, f64::NAN),
                    (f64::INFINITY, 1.0),
                ],
                line,
            }],
        };
        let svg = xy_panels(&[panel(true), panel(false)]);
        assert_svg_with(&svg, &[]);
        let texts = texts(&svg);
        assert_eq!(texts.iter().filter(|t| **t == "t&lt;1&gt;").count(), 2);
        assert_eq!(texts.iter().filter(|t| **t == "s&lt;1&gt;").count(), 2);
        // Two finite points a panel; the line's two points only in the first.
        assert_eq!(svg.matches("<circle").count(), 4);
        assert_eq!(svg.matches("stroke-width=\"2\"").count(), 1);
    }

    #[test]
    fn categories_label_each_tick_once_and_skip_missing_values() {
        let ticks = vec!["1 client".to_string(), "4 clients".to_string()];
        let lines = vec![
            (
                "{\"decoder\":\"sample\"}".to_string(),
                vec![Some(10.0), Some(30.0)],
            ),
            ("a&b".to_string(), vec![None, Some(5.0)]),
        ];
        let svg = categories("Median TTFT", "clients", "ms", &ticks, &lines);
        assert_svg_with(&svg, &[]);
        let texts = texts(&svg);
        for label in [
            "Median TTFT",
            "clients",
            "ms",
            "{&quot;decoder&quot;:&quot;sample&quot;}",
            "a&amp;b",
            "1 client",
            "4 clients",
        ] {
            assert_eq!(texts.iter().filter(|t| **t == label).count(), 1, "{label}");
        }
        // Three values, each series a line (the second through its one point).
        assert_eq!(svg.matches("<circle").count(), 3);
        assert_eq!(svg.matches("stroke-width=\"2\"").count(), 2);
    }

    #[test]
    fn ranges_fit_the_points_and_ticks_are_short() {
        let r = padded(span([-3.0, 2.0, f64::NAN].into_iter()));
        assert!(r.start < -3.0 && r.start > -3.5 && r.end > 2.0 && r.end < 2.5);
        let r = padded(span([5.0].into_iter()));
        assert!(r.start < 5.0 && r.end > 5.0);
        assert_eq!(padded(None), 0.0..1.0);
        assert_eq!(tick(-20.0), "-20");
        assert_eq!(tick(0.1 + 0.2), "0.3");
        assert_eq!(tick(-1e-12), "0");
        assert_eq!(tick(2600.0), "2600");
    }
}
