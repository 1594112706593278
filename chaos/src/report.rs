//! What a run leaves behind: a one-screen summary, `report.json`, `history.json`, the smallest
//! failing window (`violation.json`) when linearizability failed, and `timeline.png`: every
//! call's latency over time, with the fault windows shaded.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use serde::Serialize;

use crate::checks::CheckResult;
use crate::error::{Error, Result};
use crate::scenario::{FaultRecord, RunResult};
use crate::workload::{Outcome, Record, Window};

#[derive(Debug, Serialize)]
struct FaultReport<'a> {
    #[serde(flatten)]
    fault: &'a FaultRecord,
    /// The calls started while the fault was in force.
    during: Window,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    scenario: &'a str,
    verdict: &'static str,
    options: &'a crate::scenario::RunOptions,
    reproduce: String,
    all: Window,
    faults: Vec<FaultReport<'a>>,
    checks: &'a [CheckResult],
    heal_ms: &'a std::collections::BTreeMap<u64, u64>,
}

/// The command that runs the same scenario with the same seed.
pub fn reproduce_command(result: &RunResult) -> String {
    let o = &result.options;
    format!(
        "runtimeai-chaos run --scenario {} --duration {} --seed {} --nodes {} --clients {}",
        o.scenario,
        humantime::format_duration(o.duration),
        o.seed,
        o.nodes,
        o.clients
    )
}

/// Writes the files of a run into `dir` and returns the summary to print.
pub fn write(result: &RunResult, dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let faults: Vec<FaultReport> = result
        .faults
        .iter()
        .map(|fault| FaultReport {
            fault,
            during: Window::of(
                result.records.iter().filter(|r| r.invoke_us >= fault.start_us && r.invoke_us <= fault.end_us),
            ),
        })
        .collect();
    let report = Report {
        scenario: &result.options.scenario,
        verdict: if result.passed { "pass" } else { "fail" },
        options: &result.options,
        reproduce: reproduce_command(result),
        all: Window::of(result.records.iter()),
        faults,
        checks: &result.checks,
        heal_ms: &result.heal_ms,
    };
    let write_json = |name: &str, value: &dyn erased::Json| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, value.to_json()?).map_err(Error::io(format!("write {}", path.display())))
    };
    write_json("report.json", &report)?;
    write_json("history.json", &result.records)?;
    if let Some(violation) = &result.violation {
        write_json("violation.json", violation)?;
    }
    let timeline = dir.join("timeline.png");
    let plotted = plot_timeline(result, &timeline);

    let mut text = String::new();
    let o = &result.options;
    text.push_str(&format!(
        "scenario {} · seed {} · {} nodes · {} clients · {}\n",
        o.scenario,
        o.seed,
        o.nodes,
        o.clients,
        humantime::format_duration(o.duration)
    ));
    let all = &report.all;
    text.push_str(&format!(
        "calls: {} ok, {} failed, {} indeterminate · availability {:.1} % · p50 {:.1} ms · p99 {:.1} ms\n",
        all.ok, all.failed, all.indeterminate, all.availability, all.p50_ms, all.p99_ms
    ));
    text.push_str("faults:\n");
    for fault in &report.faults {
        text.push_str(&format!(
            "  {:>6.1}s – {:>6.1}s  {:<58} availability {:>5.1} %  p99 {:>7.1} ms\n",
            fault.fault.start_us as f64 / 1e6,
            fault.fault.end_us as f64 / 1e6,
            fault.fault.fault,
            fault.during.availability,
            fault.during.p99_ms
        ));
    }
    text.push_str("checks:\n");
    for check in &result.checks {
        text.push_str(&format!(
            "  {} {:<28} {}\n",
            if check.passed { "PASS" } else { "FAIL" },
            check.name,
            check.detail
        ));
    }
    text.push_str(&format!("verdict: {}\n", if result.passed { "PASS" } else { "FAIL" }));
    text.push_str(&format!("files: {}/{{report.json,history.json,timeline.png,node-*.log}}", dir.display()));
    if result.violation.is_some() {
        text.push_str(" and violation.json (the smallest failing window)");
    }
    text.push('\n');
    if let Err(e) = plotted {
        text.push_str(&format!("(no timeline: {e})\n"));
    }
    if !result.passed {
        text.push_str(&format!("reproduce: {}\n", reproduce_command(result)));
    }
    Ok(text)
}

/// Serializing trait objects of different types through one closure.
mod erased {
    pub trait Json {
        fn to_json(&self) -> crate::error::Result<String>;
    }
    impl<T: serde::Serialize + ?Sized> Json for T {
        fn to_json(&self) -> crate::error::Result<String> {
            Ok(serde_json::to_string_pretty(self)?)
        }
    }
}

/// Fonts plotters can draw text with: Debian's DejaVu (package fonts-dejavu-core).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Makes the DejaVu font plotters' `sans-serif` (once per process).
pub(crate) fn register_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = FONT_PATHS.iter().find_map(|p| std::fs::read(p).ok()).ok_or_else(|| {
                format!("no DejaVu font found ({}); install fonts-dejavu-core", FONT_PATHS.join(", "))
            })?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| "invalid font".to_string())
        })
        .clone()
}

fn plot_timeline(result: &RunResult, path: &Path) -> std::result::Result<(), String> {
    register_font()?;
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let end_s = result.records.iter().map(|r| r.complete_us).max().unwrap_or(1_000_000) as f64 / 1e6;
        let latency_ms = |r: &Record| ((r.complete_us - r.invoke_us) as f64 / 1000.0).max(0.1);
        let max_ms = result.records.iter().map(latency_ms).fold(10.0, f64::max) * 1.5;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "{} (seed {}): request latency, fault windows shaded — {}",
                    result.options.scenario,
                    result.options.seed,
                    if result.passed { "PASS" } else { "FAIL" }
                ),
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..end_s, (0.1f64..max_ms).log_scale())?;
        chart.configure_mesh().x_desc("seconds since the run started").y_desc("latency (ms, log)").draw()?;
        let shade = RGBColor(255, 120, 120).mix(0.18);
        for fault in &result.faults {
            let (start, end) =
                (fault.start_us as f64 / 1e6, (fault.end_us as f64 / 1e6).max(fault.start_us as f64 / 1e6 + 0.05));
            chart.draw_series(std::iter::once(Rectangle::new([(start, 0.1), (end, max_ms)], shade.filled())))?;
            chart.draw_series(std::iter::once(Text::new(
                fault.fault.clone(),
                (start, max_ms / 1.6),
                ("sans-serif", 13).into_font().color(&RGBColor(150, 0, 0)),
            )))?;
        }
        let series = [
            (Outcome::Ok, RGBColor(30, 130, 60), "ok"),
            (Outcome::Fail, RGBColor(230, 140, 0), "failed (definite)"),
            (Outcome::Unknown, RGBColor(200, 0, 0), "indeterminate (timeout, reset)"),
        ];
        for (outcome, color, label) in series {
            chart
                .draw_series(
                    result
                        .records
                        .iter()
                        .filter(|r| r.outcome == outcome)
                        .map(|r| Circle::new((r.invoke_us as f64 / 1e6, latency_ms(r)), 2, color.filled())),
                )?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("drawing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Call;

    #[test]
    fn windows_count_outcomes_and_latency() {
        let record = |outcome, invoke_us, complete_us| Record {
            client: 0,
            node: 1,
            call: Call::ReadRuntime,
            runtime: None,
            invoke_us,
            complete_us,
            outcome,
            status: None,
            detail: String::new(),
        };
        let refused = Record { status: Some(412), ..record(Outcome::Fail, 0, 1) };
        let records = [
            record(Outcome::Ok, 0, 2_000),
            record(Outcome::Ok, 0, 4_000),
            record(Outcome::Fail, 0, 1),
            record(Outcome::Unknown, 0, 1),
            refused,
        ];
        let window = Window::of(records.iter());
        assert_eq!((window.ok, window.failed, window.indeterminate), (2, 2, 1));
        assert_eq!(window.availability, 60.0, "a 412 is an answer; no answer and a failed connection are not");
        assert_eq!(window.p99_ms, 4.0);
    }
}
