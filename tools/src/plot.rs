//! scaling.svg: throughput (with the ideal linear line and each point's min-max spread) and
//! parallel efficiency against threads (with MPI ranks: against cores = ranks x threads, one
//! series per ranks value), with the thread counts where a new socket or the SMT
//! siblings come in marked by vertical dashed lines.

use crate::report::Row;
use crate::sweep::Boundary;
use anyhow::{Result, anyhow};
use plotters::prelude::*;
use std::path::Path;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 720;
/// Height of the throughput panel; the efficiency panel takes the rest.
const TOP_PANEL: u32 = 400;
const MAX_X_LABELS: usize = 12;
/// The measured series' colours, one per ranks value (matplotlib's "tab10" order).
const SERIES: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];
const IDEAL: RGBColor = RGBColor(150, 150, 150);
const MARK: RGBColor = RGBColor(214, 39, 40);

/// Writes the plot of `rows` (ascending thread counts; with MPI ranks, one run of them per
/// ranks value) to `path`.
pub fn write_svg(path: &Path, title: &str, rows: &[Row], boundaries: &[Boundary]) -> Result<()> {
    anyhow::ensure!(!rows.is_empty(), "nothing to plot");
    draw(path, title, rows, boundaries).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;
type Chart<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// What both panels share: the core axis (threads; with MPI ranks, ranks x threads), the
/// boundary marks on it, and the measured series.
struct CoreAxis<'r, 'b> {
    min_t: f64,
    max_t: f64,
    /// The measured core counts and half a core either side, nothing more.
    range: std::ops::Range<f64>,
    labels: usize,
    desc: &'static str,
    marks: Vec<&'b Boundary>,
    /// Per ranks value: its legend label and its rows.
    series: Vec<(String, Vec<&'r Row>)>,
}

impl<'r, 'b> CoreAxis<'r, 'b> {
    fn new(rows: &'r [Row], boundaries: &'b [Boundary]) -> Self {
        let min_t = rows.iter().map(Row::cores).min().unwrap_or(1) as f64;
        let max_t = rows.iter().map(Row::cores).max().unwrap_or(1) as f64;
        let series = series(rows);
        let desc = if series.len() == 1 && rows[0].ranks == 1 {
            "threads"
        } else {
            "cores (ranks x threads)"
        };
        CoreAxis {
            min_t,
            max_t,
            range: min_t - 0.5..max_t + 0.5,
            // Whole core counts only: one label per core on small machines, ~12 on big ones.
            labels: ((max_t - min_t) as usize + 2).min(MAX_X_LABELS),
            desc,
            marks: boundaries
                .iter()
                .filter(|b| (min_t..=max_t).contains(&(b.threads as f64)))
                .collect(),
            series,
        }
    }
}

/// The rows of each ranks value, in the order the values first appear, with its legend label.
fn series(rows: &[Row]) -> Vec<(String, Vec<&Row>)> {
    let mut ranks: Vec<usize> = rows.iter().map(|r| r.ranks).collect();
    ranks.dedup();
    if ranks == [1] && rows.iter().all(|r| r.comm_fraction.is_none()) {
        return vec![(
            "measured (median; bars: min - max)".into(),
            rows.iter().collect(),
        )];
    }
    ranks.sort_unstable();
    ranks.dedup();
    (ranks.iter())
        .map(|&n| {
            let label = format!("{n} rank{} x threads", if n == 1 { "" } else { "s" });
            (label, rows.iter().filter(|r| r.ranks == n).collect())
        })
        .collect()
}

/// One series: the line through `value` of each row against its cores, a dot per point and,
/// with `spread`, each point's min - max bar.
fn draw_series<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    rows: &[&Row],
    colour: RGBColor,
    value: impl Fn(&Row) -> f64,
    spread: bool,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let xy = |r: &Row| (r.cores() as f64, value(r));
    chart.draw_series(LineSeries::new(
        rows.iter().map(|r| xy(r)),
        colour.stroke_width(2),
    ))?;
    chart.draw_series(rows.iter().map(|r| Circle::new(xy(r), 4, colour.filled())))?;
    if spread {
        chart.draw_series(rows.iter().map(|r| {
            let x = r.cores() as f64;
            PathElement::new(
                [(x, r.samples_per_sec_min), (x, r.samples_per_sec_max)],
                colour.stroke_width(1),
            )
        }))?;
    }
    Ok(())
}

fn draw(path: &Path, title: &str, rows: &[Row], boundaries: &[Boundary]) -> DrawResult {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (upper, lower) = root.split_vertically(TOP_PANEL);
    let axis = CoreAxis::new(rows, boundaries);
    draw_throughput(&upper, &axis, rows)?;
    draw_efficiency(&lower, &axis, rows)?;
    root.present()?;
    Ok(())
}

/// The upper panel: samples/s against cores, with the ideal line and min-max bars.
fn draw_throughput(area: &Area, axis: &CoreAxis, rows: &[Row]) -> DrawResult {
    let base = rows.iter().min_by_key(|r| r.cores()).expect("rows");
    let per_core = base.samples_per_sec / base.cores() as f64;
    let ideal = |t: f64| per_core * t;
    let top = rows
        .iter()
        .map(|r| r.samples_per_sec_max.max(ideal(r.cores() as f64)))
        .fold(0.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(axis.range.clone(), 0.0..top.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc(axis.desc)
        .y_desc("samples/s")
        .x_labels(axis.labels)
        .x_label_formatter(&whole_threads)
        .y_label_formatter(&|v| thousands(*v))
        .light_line_style(WHITE)
        .draw()?;
    chart
        .draw_series(DashedLineSeries::new(
            [base.cores() as f64, axis.max_t].map(|t| (t, ideal(t))),
            6,
            4,
            IDEAL.stroke_width(2),
        ))?
        .label("ideal (linear from the first point)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], IDEAL.stroke_width(2)));
    for (i, (label, points)) in axis.series.iter().enumerate() {
        let colour = SERIES[i % SERIES.len()];
        draw_series(&mut chart, points, colour, |r| r.samples_per_sec, true)?;
        // A legend entry of its own: an empty series carries it.
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    draw_marks(&mut chart, &axis.marks, top)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The lower panel: parallel efficiency (%) against cores, with the 100% line.
fn draw_efficiency(area: &Area, axis: &CoreAxis, rows: &[Row]) -> DrawResult {
    let eff_top = rows
        .iter()
        .map(|r| 100.0 * r.efficiency)
        .fold(110.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(axis.range.clone(), 0.0..eff_top)?;
    chart
        .configure_mesh()
        .x_desc(axis.desc)
        .y_desc("parallel efficiency (%)")
        .x_labels(axis.labels)
        .x_label_formatter(&whole_threads)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    chart.draw_series(DashedLineSeries::new(
        [(axis.min_t - 0.5, 100.0), (axis.max_t + 0.5, 100.0)],
        6,
        4,
        IDEAL.stroke_width(2),
    ))?;
    for (i, (_, points)) in axis.series.iter().enumerate() {
        let colour = SERIES[i % SERIES.len()];
        draw_series(&mut chart, points, colour, |r| 100.0 * r.efficiency, false)?;
    }
    draw_marks(&mut chart, &axis.marks, eff_top)?;
    Ok(())
}

/// A thread-count label: whole numbers only (a mesh line between two counts gets none).
fn whole_threads(v: &f64) -> String {
    if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        String::new()
    }
}

/// `v` rounded to a whole number, its digits grouped by threes with commas (1,234,567).
pub fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if v.round() < 0.0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A dashed vertical line half a thread before each boundary, labelled at the top.
fn draw_marks<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    marks: &[&Boundary],
    top: f64,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    for b in marks {
        let x = b.threads as f64 - 0.5;
        chart.draw_series(DashedLineSeries::new(
            [(x, 0.0), (x, top)],
            4,
            4,
            MARK.stroke_width(1),
        ))?;
        chart.draw_series(std::iter::once(Text::new(
            b.what.clone(),
            (x, top * 0.97),
            ("sans-serif", 14).into_font().color(&MARK),
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits_by_three() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-12_345.0), "-12,345");
        assert_eq!(whole_threads(&4.0), "4");
        assert_eq!(whole_threads(&4.5), "");
    }
    use crate::measure::Measurement;
    use crate::report::{Point, rows};

    #[test]
    fn marks_the_socket_boundaries_within_the_sweep() {
        let points: Vec<Point> = [1usize, 2, 4, 8, 12, 16]
            .iter()
            .map(|&t| Point {
                ranks: 1,
                threads: t,
                sockets: 1 + (t > 8) as usize,
                cpus: crate::topology::format_cpulist(0..t),
                measurement: Measurement {
                    samples_per_step: 2048,
                    rates: vec![1000.0 * t as f64 * 0.9, 1000.0 * t as f64],
                    phases_per_step: None,
                    threads: t,
                    seconds: 1.0,
                    sched: None,
                },
                flops_per_sample: None,
                comm_fraction: None,
            })
            .collect();
        let marks = [
            Boundary {
                threads: 9,
                what: "socket 1".into(),
            },
            Boundary {
                threads: 17,
                what: "SMT".into(),
            },
        ];
        let path = std::env::temp_dir().join(format!("dlrm-plot-{}.svg", std::process::id()));
        write_svg(&path, "a 2-socket study", &rows(&points), &marks).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.contains("a 2-socket study"));
        assert!(
            svg.contains("socket 1"),
            "the boundary at 9 threads is drawn"
        );
        assert!(!svg.contains("SMT"), "17 threads is past the sweep");
        assert!(write_svg(&path, "empty", &[], &marks).is_err());
    }
}
