//! Benchmark charts: throughput and p99 latency against the number of clients, one line per
//! system measured in the run (raftpg, and each peer: PostgreSQL streaming replication, a
//! standalone PostgreSQL, …), drawn as an SVG with plotters (`raftpg bench --chart`).
//!
//! Points come from a run ([`crate::bench::run`]) or from its JSON lines (`--out`), read back
//! with [`read_points`]. Only systems measured at two or more client counts are drawn (reads
//! and the catch-up figure are single points).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::bench::Point;

/// Reads the JSON lines `raftpg bench --out` writes.
pub fn read_points(path: &Path) -> anyhow::Result<Vec<Point>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
        let num = |k: &str| v[k].as_f64().unwrap_or(0.0);
        out.push(Point {
            system: v["system"].as_str().unwrap_or_default().to_string(),
            clients: num("clients") as usize,
            ops_per_sec: num("ops_per_sec"),
            p50_ms: num("p50_ms"),
            p99_ms: num("p99_ms"),
            p999_ms: num("p999_ms"),
            errors: num("errors") as u64,
            rss_mb: num("rss_mb"),
            cpu: num("cpu"),
            cpu_us: v["cpu_us"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, us)| (k.clone(), us.as_f64().unwrap_or(0.0)))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

/// What a system's name in the points stands for, in the legend.
fn legend(system: &str) -> String {
    match system {
        "raftpg" => "raftpg (gRPC)".into(),
        "raftpg-wire" => "raftpg (PostgreSQL protocol)".into(),
        "raftpg-insecure" => "raftpg --insecure".into(),
        "sr" => "PostgreSQL + synchronous streaming replica".into(),
        "solo" => "PostgreSQL alone".into(),
        other => other.into(),
    }
}

/// The series to draw: system → points ordered by clients.
fn series(points: &[Point]) -> BTreeMap<String, Vec<&Point>> {
    let mut by: BTreeMap<String, Vec<&Point>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.clients > 0) {
        by.entry(p.system.clone()).or_default().push(p);
    }
    by.retain(|_, v| v.len() >= 2);
    for v in by.values_mut() {
        v.sort_by_key(|p| p.clients);
    }
    by
}

/// One panel: where it is drawn, its caption, the top of its y axis, the value it plots.
type Panel<'a, 'b> = (
    &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    &'static str,
    f64,
    fn(&Point) -> f64,
);

/// Draws `points` into the SVG file `path` (two panels: ops/s and p99 ms against clients,
/// clients on a log scale). `title` heads the chart.
pub fn write_svg(points: &[Point], path: &Path, title: &str) -> anyhow::Result<()> {
    let by = series(points);
    anyhow::ensure!(
        !by.is_empty(),
        "no system was measured at two or more client counts"
    );
    let clients_max = by.values().flatten().map(|p| p.clients).max().unwrap_or(1) as f64;
    let ops_max = by
        .values()
        .flatten()
        .map(|p| p.ops_per_sec)
        .fold(1.0, f64::max);
    let p99_max = by.values().flatten().map(|p| p.p99_ms).fold(0.1, f64::max);
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(600);
    let panels: [Panel<'_, '_>; 2] = [
        (&left, "writes/s (higher is better)", ops_max * 1.1, |p| {
            p.ops_per_sec
        }),
        (
            &right,
            "p99 latency, ms (lower is better)",
            p99_max * 1.1,
            |p| p.p99_ms,
        ),
    ];
    for (area, caption, y_max, value) in panels {
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d((1.0..clients_max * 1.2).log_scale(), 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("clients")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if y_max > 100.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.1}")
                }
            })
            .draw()?;
        for (i, (system, pts)) in by.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let line: Vec<(f64, f64)> = pts.iter().map(|p| (p.clients as f64, value(p))).collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(legend(system))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart.draw_series(
                line.into_iter()
                    .map(|xy| Circle::new(xy, 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(system: &str, clients: usize, ops: f64, p99: f64) -> Point {
        Point {
            system: system.into(),
            clients,
            ops_per_sec: ops,
            p99_ms: p99,
            ..Default::default()
        }
    }

    #[test]
    fn a_chart_has_a_line_per_system_measured_at_several_client_counts() {
        let points = vec![
            point("sr", 1, 2500.0, 0.6),
            point("sr", 32, 14000.0, 4.5),
            point("raftpg", 1, 530.0, 2.6),
            point("raftpg", 32, 5300.0, 14.0),
            point("raftpg-read-local", 32, 4900.0, 12.0),
        ];
        let path = std::env::temp_dir().join(format!("raftpg-chart-{}.svg", std::process::id()));
        write_svg(&points, &path, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        let labels: Vec<&str> = svg.lines().map(str::trim).collect();
        assert!(labels.contains(&"raftpg (gRPC)"), "{labels:?}");
        assert!(labels.contains(&"PostgreSQL + synchronous streaming replica"));
        assert!(!svg.contains("raftpg-read-local"));
        let _ = std::fs::remove_file(&path);
        assert!(write_svg(&points[4..], &path, "none").is_err());
    }
}
