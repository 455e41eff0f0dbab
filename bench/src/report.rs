//! The bench's outputs: the table, the JSON document, the SVG chart, the machine description.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::client::PathId;

/// Round-trip latency of one path and size, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Round trips measured.
    pub samples: u64,
    /// Median.
    pub p50_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Latency {
    /// From a histogram of nanoseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            samples: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p95_us: us(h.value_at_quantile(0.95)),
            p99_us: us(h.value_at_quantile(0.99)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// Streaming throughput of one path and size.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// Requests kept in flight.
    pub window: usize,
    /// Requests completed.
    pub messages: u64,
    /// How long it ran.
    pub seconds: f64,
    /// Payload megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Requests completed per second.
    pub msg_per_s: f64,
}

/// One path at one size.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The path's name.
    pub path: String,
    /// Payload bytes per request.
    pub size: usize,
    /// The bytes went by handle.
    pub by_handle: bool,
    /// The receiver read every payload byte.
    pub receiver_touched_bytes: bool,
    /// One request at a time.
    pub latency: Latency,
    /// Many in flight.
    pub throughput: Throughput,
    /// Throughput divided by raw-tcp's at the same size, when raw-tcp ran.
    pub ratio_vs_raw_tcp: Option<f64>,
}

/// Sets every row's ratio against raw-tcp at the same size.
pub fn fill_ratios(rows: &mut [Row]) {
    let base: Vec<(usize, f64)> = rows
        .iter()
        .filter(|r| r.path == PathId::RawTcp.name())
        .map(|r| (r.size, r.throughput.mb_per_s))
        .collect();
    for r in rows.iter_mut() {
        r.ratio_vs_raw_tcp = base
            .iter()
            .find(|(s, _)| *s == r.size)
            .filter(|(_, b)| *b > 0.0)
            .map(|(_, b)| r.throughput.mb_per_s / b);
    }
}

/// `64 B`, `16 KiB`, `1 MiB`, ...
pub fn size_label(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

fn us_label(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 100.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

/// Prints the table and its notes on stdout.
pub fn print_table(rows: &[Row], failures: &[String], elapsed: Duration, plan: &str) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<15} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7}",
        "path", "size", "p50", "p95", "p99", "max", "MB/s", "msg/s", "x raw"
    );
    let mut last = "";
    for r in rows {
        if !last.is_empty() && last != r.path {
            out.push('\n');
        }
        last = &r.path;
        let ratio = r
            .ratio_vs_raw_tcp
            .map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
        let _ = writeln!(
            out,
            "{:<15} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10.1} {:>10.0} {:>7}",
            r.path,
            size_label(r.size),
            us_label(r.latency.p50_us),
            us_label(r.latency.p95_us),
            us_label(r.latency.p99_us),
            us_label(r.latency.max_us),
            r.throughput.mb_per_s,
            r.throughput.msg_per_s,
            ratio
        );
    }
    let _ = writeln!(out, "\nrows:");
    for p in PathId::ALL {
        if rows.iter().any(|r| r.path == p.name()) {
            let _ = writeln!(out, "  {:<15} {}", p.name(), p.description());
        }
    }
    let _ = writeln!(
        out,
        "latency: one request at a time (SIZE bytes one way, tiny reply); throughput: several \
         in flight on one connection, MB/s = 10^6 payload bytes/s; x raw = MB/s / raw-tcp MB/s \
         at the same size. {plan}; {:.1} s in all.",
        elapsed.as_secs_f64()
    );
    for f in failures {
        let _ = writeln!(out, "FAILED: {f}");
    }
    print!("{out}");
}

/// The machine the figures come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// From /proc/cpuinfo.
    pub cpu_model: String,
    /// Cores available to this process.
    pub cores: usize,
    /// MemTotal of /proc/meminfo, in MiB.
    pub memory_mib: u64,
    /// The kernel release.
    pub kernel: String,
    /// When the run ended, UTC, RFC 3339.
    pub date: String,
    /// The xcp version.
    pub xcp_version: String,
    /// Whether this binary was built with optimisations.
    pub release_build: bool,
}

impl Machine {
    /// Reads what /proc tells.
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_string(), |(_, v)| v.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_string(), |s| s.trim().to_string());
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mib,
            kernel,
            date: utc_now(),
            xcp_version: env!("CARGO_PKG_VERSION").to_string(),
            release_build: !cfg!(debug_assertions),
        }
    }

    fn one_line(&self) -> String {
        format!(
            "{}, {} cores, {} MiB, Linux {}, {}",
            self.cpu_model, self.cores, self.memory_mib, self.kernel, self.date
        )
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    rfc3339_seconds(OffsetDateTime::now_utc())
}

/// `t` in UTC as RFC 3339 to the second (`YYYY-MM-DDTHH:MM:SSZ`); a year outside 0..=9999,
/// which RFC 3339 cannot write, gives `unknown (...)` with the reason.
fn rfc3339_seconds(t: OffsetDateTime) -> String {
    // Whole seconds: RFC 3339 writes a fraction only when there is one.
    let t = t.to_offset(UtcOffset::UTC);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339)
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

#[derive(Serialize)]
struct Doc<'a> {
    machine: &'a Machine,
    command: &'a str,
    settings: &'a str,
    seconds: f64,
    method: &'a str,
    paths: Vec<PathDoc>,
    not_built: Vec<&'a str>,
    failures: &'a [String],
    rows: &'a [Row],
}

#[derive(Serialize)]
struct PathDoc {
    name: &'static str,
    description: &'static str,
    by_handle: bool,
    receiver_touched_bytes: bool,
}

/// The JSON document: every figure, the settings and the machine.
pub fn json(
    rows: &[Row],
    failures: &[String],
    machine: &Machine,
    command: &str,
    settings: &str,
    elapsed: Duration,
) -> String {
    let doc = Doc {
        machine,
        command,
        settings,
        seconds: elapsed.as_secs_f64(),
        method: "Each server is a separate process. A request carries `size` payload bytes one \
                 way; the reply is tiny. latency: one request at a time on one connection. \
                 throughput: `window` requests in flight on one connection for a fixed time; \
                 mb_per_s = payload bytes / 1e6 / s. ratio_vs_raw_tcp = mb_per_s / raw-tcp's at \
                 the same size.",
        paths: PathId::ALL
            .iter()
            .map(|p| PathDoc {
                name: p.name(),
                description: p.description(),
                by_handle: p.by_handle(),
                receiver_touched_bytes: p.touched(),
            })
            .collect(),
        not_built: vec!["io_uring: XCP has no io_uring transport yet"],
        failures,
        rows,
    };
    serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// The chart's width and height in pixels.
const CHART_SIZE: (u32, u32) = (1000, 470);

/// One colour a path, in [`PathId::ALL`]'s order (raw-tcp black, raw-unix grey-blue).
const COLORS: [RGBColor; PathId::ALL.len()] = [
    RGBColor(0x00, 0x00, 0x00),
    RGBColor(0x52, 0x6d, 0x82),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x98, 0xdf, 0x8a),
    RGBColor(0xff, 0xbb, 0x78),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x39, 0x3b, 0x79),
    RGBColor(0xc4, 0x9c, 0x94),
];

/// The font of every label (an SVG `font-family`: the viewer picks the face, nothing is read
/// here).
const FONT: &str = "sans-serif";

/// The plotters font size that the SVG writes as `px` pixels (plotters divides by 1.24).
fn font_px(px: f64) -> f64 {
    px * 1.24
}

/// The drawing surface of the chart.
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// The colour of path `i` of [`PathId::ALL`].
fn color_of(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// A path's line is dashed when the bytes went by handle and the receiver did not touch them.
fn dashed(p: PathId) -> bool {
    p.by_handle() && !p.touched()
}

/// One log-log panel: x = size, y = `value` of each row.
struct Panel {
    title: &'static str,
    unit: &'static str,
    value: fn(&Row) -> f64,
}

/// The decade exponents that hold `lo..=hi` (at least one decade).
fn decades(lo: f64, hi: f64) -> (i32, i32) {
    let lo = lo.max(1e-9).log10().floor() as i32;
    let hi = (hi.max(1e-9).log10().ceil() as i32).max(lo + 1);
    (lo, hi)
}

/// The smallest and largest of `values` (`None` when there are none).
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// A value worth a point on a log axis.
fn plottable(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// A y axis label: `20`, `5k`, `1.5M`, `0.050`.
fn tick(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else if v >= 1.0 {
        format!("{v}")
    } else {
        format!("{v:.3}")
    }
}

/// The paths that have rows, in the table's order, each with its index in [`PathId::ALL`].
fn paths_shown(rows: &[Row]) -> Vec<(usize, PathId)> {
    PathId::ALL
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, p)| rows.iter().any(|r| r.path == p.name()))
        .collect()
}

impl Panel {
    /// Draws the panel into `area`: log axes (x ticks at the sizes measured, y at decades), one
    /// line with its points a path.
    fn draw(&self, area: &Area<'_>, rows: &[Row]) -> Result<(), String> {
        let mut sizes: Vec<usize> = rows.iter().map(|r| r.size).filter(|&s| s > 0).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let (xl, xh) =
            bounds(sizes.iter().map(|&s| s as f64)).map_or((0, 1), |(lo, hi)| decades(lo, hi));
        let (yl, yh) = bounds(rows.iter().map(self.value).filter(|&v| plottable(v)))
            .map_or((0, 1), |(lo, hi)| decades(lo, hi));
        let x = (10f64.powi(xl)..10f64.powi(xh))
            .log_scale()
            .with_key_points(sizes.iter().map(|&s| s as f64).collect());
        let y = (10f64.powi(yl)..10f64.powi(yh))
            .log_scale()
            .with_key_points((yl..=yh).map(|e| 10f64.powi(e)).collect());
        let mut chart = ChartBuilder::on(area)
            .caption(self.title, (FONT, font_px(14.0)))
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(58)
            .build_cartesian_2d(x, y)
            .map_err(|e| format!("the panel \"{}\": {e}", self.title))?;
        chart
            .configure_mesh()
            .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
            .light_line_style(TRANSPARENT)
            .label_style((FONT, font_px(10.0)))
            .axis_desc_style((FONT, font_px(11.0)))
            .x_desc("payload size (log)")
            .y_desc(self.unit)
            .x_label_formatter(&|v| size_label(v.round() as usize))
            .y_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(|e| format!("the axes of \"{}\": {e}", self.title))?;
        for (i, p) in paths_shown(rows) {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.path == p.name() && r.size > 0)
                .map(|r| (r.size as f64, (self.value)(r)))
                .filter(|&(_, v)| plottable(v))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            if points.is_empty() {
                continue;
            }
            let color = color_of(i);
            let line = color.stroke_width(2);
            let failed = |e: DrawingAreaErrorKind<_>| {
                format!("the line of {} in \"{}\": {e}", p.name(), self.title)
            };
            if dashed(p) {
                chart
                    .draw_series(DashedLineSeries::new(points.clone(), 5, 3, line))
                    .map_err(failed)?;
            } else {
                chart
                    .draw_series(LineSeries::new(points.clone(), line))
                    .map_err(failed)?;
            }
            chart
                .draw_series(points.iter().map(|&pt| Circle::new(pt, 3, color.filled())))
                .map_err(failed)?;
        }
        Ok(())
    }
}

/// The legend: a line sample and the name of each path that has rows.
fn draw_legend(area: &Area<'_>, rows: &[Row]) -> Result<(), String> {
    let label =
        TextStyle::from((FONT, font_px(11.0)).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let mut y = 40;
    for (i, p) in paths_shown(rows) {
        let line = color_of(i).stroke_width(2);
        let sample = [(0, y), (25, y)];
        let drawn = if dashed(p) {
            area.draw(&DashedPathElement::new(sample, 5, 3, line))
        } else {
            area.draw(&PathElement::new(sample, line))
        };
        drawn
            .and_then(|_| area.draw(&Text::new(p.name(), (30, y), label.clone())))
            .map_err(|e| format!("the legend of {}: {e}", p.name()))?;
        y += 18;
    }
    Ok(())
}

/// The whole chart into `out` (an SVG document).
fn draw_chart(out: &mut String, rows: &[Row], machine: &Machine) -> Result<(), String> {
    let root = SVGBackend::with_string(out, CHART_SIZE).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| format!("the background: {e}"))?;
    let body = root
        .titled(
            &format!("xcp bench: {}", machine.one_line()),
            (FONT, font_px(12.0)),
        )
        .map_err(|e| format!("the title: {e}"))?;
    let (_, height) = body.dim_in_pixel();
    let (charts, notes) = body.split_vertically(height.saturating_sub(40));
    let columns = charts.split_by_breakpoints([430, 860], [0; 0]);
    let [latency, throughput, legend] = columns.as_slice() else {
        return Err(format!("{} chart columns, not 3", columns.len()));
    };
    let panels = [
        (
            latency,
            Panel {
                title: "p50 round-trip latency by size",
                unit: "µs (log)",
                value: |r| r.latency.p50_us,
            },
        ),
        (
            throughput,
            Panel {
                title: "throughput by size (many in flight)",
                unit: "MB/s (log)",
                value: |r| r.throughput.mb_per_s,
            },
        ),
    ];
    for (area, panel) in &panels {
        panel.draw(area, rows)?;
    }
    draw_legend(legend, rows)?;
    let note = TextStyle::from((FONT, font_px(10.0)).into_font());
    for (i, line) in [
        "SIZE bytes one way, tiny reply; dashed = handle, receiver did not touch the bytes.",
        "XCP rows over epoll unless --io says otherwise; xcp bench --io-compare puts epoll and \
         io_uring side by side.",
    ]
    .into_iter()
    .enumerate()
    {
        notes
            .draw(&Text::new(line, (20, 6 + 16 * i as i32), note.clone()))
            .map_err(|e| format!("the notes: {e}"))?;
    }
    root.present().map_err(|e| format!("writing the SVG: {e}"))
}

/// The chart: p50 latency and throughput by size (log-log), one line per path, a legend, the
/// machine in the title. An SVG document, drawn with plotters' SVG backend (its text as
/// `<text>` elements: the viewer picks the font).
pub fn svg(rows: &[Row], machine: &Machine) -> String {
    let mut out = String::new();
    if let Err(e) = draw_chart(&mut out, rows, machine) {
        eprintln!("warning: the --svg chart could not be drawn: {e}");
        // A document that says so, rather than a half-written one.
        out.clear();
        let root = SVGBackend::with_string(&mut out, CHART_SIZE).into_drawing_area();
        let message = format!("xcp bench: the chart could not be drawn: {e}");
        let _ = root
            .fill(&WHITE)
            .and_then(|_| root.draw(&Text::new(message, (20, 20), (FONT, font_px(13.0)))))
            .and_then(|_| root.present());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(cpu: &str) -> Machine {
        Machine {
            cpu_model: cpu.to_string(),
            cores: 2,
            memory_mib: 24_000,
            kernel: "6.1.0-test".into(),
            date: "2000-02-29T12:34:56Z".into(),
            xcp_version: "0.1.0".into(),
            release_build: true,
        }
    }

    fn row(path: PathId, size: usize, p50_us: f64, mb_per_s: f64) -> Row {
        Row {
            path: path.name().to_string(),
            size,
            by_handle: path.by_handle(),
            receiver_touched_bytes: path.touched(),
            latency: Latency {
                samples: 10,
                p50_us,
                p95_us: p50_us * 1.5,
                p99_us: p50_us * 2.0,
                max_us: p50_us * 3.0,
                mean_us: p50_us,
            },
            throughput: Throughput {
                window: 8,
                messages: 100,
                seconds: 1.0,
                mb_per_s,
                msg_per_s: 100.0,
            },
            ratio_vs_raw_tcp: None,
        }
    }

    /// Checks that `svg` nests its tags properly (every opened tag closed in order, nothing
    /// left open) and returns the names of its elements, in document order.
    fn elements(svg: &str) -> Vec<String> {
        let mut open: Vec<String> = Vec::new();
        let mut names = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("an unterminated tag") + start;
            let tag = &rest[start + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    open.pop().as_deref(),
                    Some(name.trim()),
                    "a stray </{name}>"
                );
            } else if !tag.starts_with('?') && !tag.starts_with('!') {
                let name = tag
                    .split(|c: char| c.is_whitespace() || c == '/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                assert!(!name.is_empty(), "a tag with no name: <{tag}>");
                if !tag.ends_with('/') {
                    open.push(name.clone());
                }
                names.push(name);
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "left open: {open:?}");
        names
    }

    /// The contents of the `<text>` elements, trimmed, entities decoded.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..t.find("</text>")?];
                Some(
                    body.trim()
                        .replace("&lt;", "<")
                        .replace("&gt;", ">")
                        .replace("&quot;", "\"")
                        .replace("&apos;", "'")
                        .replace("&amp;", "&"),
                )
            })
            .collect()
    }

    /// The `<name ...>` elements whose attributes include every one of `attrs`.
    fn count(svg: &str, name: &str, attrs: &[&str]) -> usize {
        svg.split(&format!("<{name} "))
            .skip(1)
            .filter(|e| {
                let e = &e[..e.find('>').unwrap_or(e.len())];
                attrs.iter().all(|a| e.contains(a))
            })
            .count()
    }

    /// `color` as plotters writes it in an SVG attribute.
    fn hex(color: RGBColor) -> String {
        format!("\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2)
    }

    #[test]
    fn chart_is_well_formed_with_one_line_a_path_and_a_legend() {
        let shown = [PathId::RawTcp, PathId::Tcp, PathId::Shm];
        let mut rows = Vec::new();
        for (k, p) in shown.into_iter().enumerate() {
            for (j, size) in [64usize, 16 << 10, 1 << 20].into_iter().enumerate() {
                let f = (k + 1) as f64;
                rows.push(row(
                    p,
                    size,
                    20.0 * f * (j + 1) as f64,
                    50.0 * f * 10f64.powi(j as i32),
                ));
            }
        }
        let svg = svg(&rows, &machine("Test CPU <8 cores> & more"));
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        let names = elements(&svg);
        assert_eq!(names.iter().filter(|n| *n == "svg").count(), 1);

        // A path's line is a 2-pixel polyline in its colour (the axes are 1 pixel): one in each
        // panel and one in the legend, or many dashes where it is dashed (shm: by handle,
        // untouched); its three points are circles in each panel. A path without rows draws
        // nothing.
        for (i, c) in COLORS.iter().enumerate() {
            assert!(!COLORS[i + 1..].contains(c), "one colour a path");
        }
        for (i, &p) in PathId::ALL.iter().enumerate() {
            let (stroke, fill) = (
                format!("stroke={}", hex(color_of(i))),
                format!("fill={}", hex(color_of(i))),
            );
            let lines = count(&svg, "polyline", &[&stroke, "stroke-width=\"2\""]);
            let points = count(&svg, "circle", &[&fill]);
            if p == PathId::Shm {
                assert!(dashed(p));
                assert!(lines > 10, "{}: {lines} dashes", p.name());
                assert_eq!(points, 6, "{}", p.name());
            } else if shown.contains(&p) {
                assert_eq!((lines, points), (3, 6), "{}", p.name());
            } else {
                assert_eq!((lines, points), (0, 0), "{} has no rows", p.name());
            }
        }

        let texts = texts(&svg);
        for p in PathId::ALL {
            let in_legend = texts.iter().any(|t| t == p.name());
            assert_eq!(in_legend, shown.contains(&p), "{} in the legend", p.name());
        }
        let title = texts
            .iter()
            .find(|t| t.starts_with("xcp bench:"))
            .expect("a title");
        assert!(title.contains("Test CPU <8 cores> & more") && title.contains("2000-02-29"));
        for want in [
            "p50 round-trip latency by size",
            "throughput by size (many in flight)",
            "µs (log)",
            "MB/s (log)",
            // The sizes measured on the x axes; decades on the y axes.
            "64 B",
            "16 KiB",
            "1 MiB",
            "10",
            "100",
            "1k",
            "100k",
        ] {
            assert!(texts.iter().any(|t| t == want), "no {want:?} in {texts:?}");
        }
    }

    #[test]
    fn chart_without_rows_or_values_is_still_a_document() {
        let mut zero = row(PathId::Tcp, 4096, 0.0, f64::NAN);
        zero.latency.p50_us = 0.0;
        for rows in [vec![], vec![zero]] {
            let svg = svg(&rows, &machine("cpu"));
            assert!(svg.starts_with("<svg"));
            elements(&svg);
            assert!(texts(&svg).iter().any(|t| t.starts_with("xcp bench: cpu")));
        }
    }

    #[test]
    fn dates_are_rfc3339_to_the_second() {
        let at = |s: i64| OffsetDateTime::from_unix_timestamp(s).unwrap();
        assert_eq!(rfc3339_seconds(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_seconds(at(951_827_696)), "2000-02-29T12:34:56Z");
        assert_eq!(rfc3339_seconds(at(1_700_000_000)), "2023-11-14T22:13:20Z");
        // The fraction is dropped, not rounded; an offset is turned into UTC.
        let t = at(1_700_000_000).replace_nanosecond(999_999_999).unwrap();
        assert_eq!(rfc3339_seconds(t), "2023-11-14T22:13:20Z");
        let plus2 = UtcOffset::from_hms(2, 0, 0).unwrap();
        assert_eq!(
            rfc3339_seconds(at(0).to_offset(plus2)),
            "1970-01-01T00:00:00Z"
        );
        // Out of RFC 3339's range: said so, not a wrong date.
        let far = OffsetDateTime::from_unix_timestamp(-100_000_000_000).unwrap();
        assert!(rfc3339_seconds(far).starts_with("unknown ("));
        let now = utc_now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T', "{now}");
    }

    #[test]
    fn size_labels() {
        assert_eq!(size_label(64), "64 B");
        assert_eq!(size_label(1000), "1000 B");
        assert_eq!(size_label(16 << 10), "16 KiB");
        assert_eq!(size_label(1 << 20), "1 MiB");
        assert_eq!(size_label(3 << 19), "1536 KiB");
        assert_eq!(decades(20.0, 900.0), (1, 3));
        assert_eq!(decades(100.0, 100.0), (2, 3));
    }
}
