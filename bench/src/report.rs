//! The bench's outputs: the table, the JSON document, the SVG chart, the machine description.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

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
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (the era-based algorithm of H. Hinnant).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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

const COLORS: [&str; 10] = [
    "#000000", "#d62728", "#ff7f0e", "#1f77b4", "#17becf", "#9467bd", "#2ca02c", "#98df8a",
    "#8c564b", "#e377c2",
];

/// A log-log panel: x = size, y = a value; one polyline per path.
struct Panel<'a> {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
    title: &'a str,
    unit: &'a str,
}

fn decades(lo: f64, hi: f64) -> (f64, f64) {
    let lo = lo.max(1e-9).log10().floor();
    let mut hi = hi.max(1e-9).log10().ceil();
    if hi <= lo {
        hi = lo + 1.0;
    }
    (lo, hi)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Panel<'_> {
    fn draw(&self, svg: &mut String, rows: &[Row], value: impl Fn(&Row) -> f64) {
        let sizes: Vec<f64> = rows.iter().map(|r| r.size as f64).collect();
        let vals: Vec<f64> = rows.iter().map(&value).filter(|v| *v > 0.0).collect();
        if sizes.is_empty() || vals.is_empty() {
            return;
        }
        let (xl, xh) = decades(
            sizes.iter().copied().fold(f64::MAX, f64::min),
            sizes.iter().copied().fold(0.0, f64::max),
        );
        let (yl, yh) = decades(
            vals.iter().copied().fold(f64::MAX, f64::min),
            vals.iter().copied().fold(0.0, f64::max),
        );
        let px = |x: f64| self.x0 + (x.log10() - xl) / (xh - xl) * self.w;
        let py = |y: f64| self.y0 + self.h - (y.log10() - yl) / (yh - yl) * self.h;
        let _ = writeln!(
            svg,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            self.x0, self.y0, self.w, self.h
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="14" text-anchor="middle">{}</text>"#,
            self.x0 + self.w / 2.0,
            self.y0 - 10.0,
            esc(self.title)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="middle" transform="rotate(-90 {} {})">{}</text>"#,
            self.x0 - 48.0,
            self.y0 + self.h / 2.0,
            self.x0 - 48.0,
            self.y0 + self.h / 2.0,
            esc(self.unit)
        );
        let mut e = yl;
        while e <= yh + 1e-9 {
            let y = py(10f64.powf(e));
            let _ = writeln!(
                svg,
                r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
                self.x0,
                self.x0 + self.w,
                self.x0 - 4.0,
                y + 3.0,
                tick(10f64.powf(e))
            );
            e += 1.0;
        }
        let mut sizes_seen: Vec<usize> = rows.iter().map(|r| r.size).collect();
        sizes_seen.sort_unstable();
        sizes_seen.dedup();
        for s in sizes_seen {
            let x = px(s as f64);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" font-size="10" text-anchor="middle">{}</text>"##,
                self.y0,
                self.y0 + self.h,
                self.y0 + self.h + 14.0,
                size_label(s)
            );
        }
        for (i, p) in PathId::ALL.iter().enumerate() {
            let pts: Vec<String> = rows
                .iter()
                .filter(|r| r.path == p.name() && value(r) > 0.0)
                .map(|r| format!("{:.1},{:.1}", px(r.size as f64), py(value(r))))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let dash = if p.by_handle() && !p.touched() {
                r#" stroke-dasharray="5,3""#
            } else {
                ""
            };
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                pts.join(" "),
                COLORS[i % COLORS.len()]
            );
            for pt in &pts {
                let (x, y) = pt.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{}"/>"#,
                    COLORS[i % COLORS.len()]
                );
            }
        }
    }
}

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

/// The chart: p50 latency and throughput by size (log-log), one line per path, a legend.
pub fn svg(rows: &[Row], machine: &Machine) -> String {
    let (w, h) = (1000.0, 470.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let lat = Panel {
        x0: 70.0,
        y0: 40.0,
        w: 340.0,
        h: 330.0,
        title: "p50 round-trip latency by size",
        unit: "µs (log)",
    };
    lat.draw(&mut s, rows, |r| r.latency.p50_us);
    let thr = Panel {
        x0: 500.0,
        y0: 40.0,
        w: 340.0,
        h: 330.0,
        title: "throughput by size (many in flight)",
        unit: "MB/s (log)",
    };
    thr.draw(&mut s, rows, |r| r.throughput.mb_per_s);
    let mut y = 50.0;
    for (i, p) in PathId::ALL.iter().enumerate() {
        if !rows.iter().any(|r| r.path == p.name()) {
            continue;
        }
        let dash = if p.by_handle() && !p.touched() {
            r#" stroke-dasharray="5,3""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<line x1="860" y1="{y}" x2="885" y2="{y}" stroke="{}" stroke-width="2"{dash}/><text x="890" y="{}" font-size="11">{}</text>"#,
            COLORS[i % COLORS.len()],
            y + 4.0,
            p.name()
        );
        y += 18.0;
    }
    let _ = writeln!(
        s,
        r#"<text x="20" y="{}" font-size="10">xcp bench: SIZE bytes one way, tiny reply; dashed = handle, receiver did not touch the bytes. {}</text>"#,
        h - 40.0,
        esc(&machine.one_line())
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{}" font-size="10">XCP rows over epoll unless --io says otherwise; xcp bench --io-compare puts epoll and io_uring side by side.</text>"#,
        h - 24.0
    );
    s.push_str("</svg>\n");
    s
}
