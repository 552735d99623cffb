//! Renders the peers table into `docs/peers.png` and prints it as Markdown.
//!
//! Run after `cargo bench --bench peers`:
//!
//! ```sh
//! cargo bench --bench chart
//! ```
//!
//! It reads criterion's results for the `peers_*` groups (the median of
//! each function, `new/estimates.json`) from `$CRITERION_HOME`, else
//! `$CARGO_TARGET_DIR/criterion`, else `target/criterion`, and draws one bar
//! per store and workload: its throughput relative to shmdict's in the same
//! group (shmdict = 1), on a log scale so that the Redis round trips and the
//! in-process maps fit on one chart. `SHMDICT_CHART_OUT` overrides the
//! output path. The font is DejaVu Sans, compiled in from the `dejavu`
//! crate, so no system font is needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor;
use plotters::style::FontStyle;

/// Workloads in the order drawn: (criterion group, label on the chart).
const GROUPS: [(&str, &str); 6] = [
    ("peers_get/64B", "get 64 B"),
    ("peers_insert/64B", "insert 64 B"),
    ("peers_remove_insert/64B", "remove+insert 64 B"),
    ("peers_get/1KiB", "get 1 KiB"),
    ("peers_insert/1KiB", "insert 1 KiB"),
    ("peers_remove_insert/1KiB", "remove+insert 1 KiB"),
];

/// Stores in the order drawn, with their colours (`shmdict_reader`,
/// `shmdict_ref` and `lmdb_txn` are zero-copy reads: `get` groups only).
const STORES: [(&str, RGBColor); 10] = [
    ("shmdict", RGBColor(31, 119, 180)),
    ("shmdict_reader", RGBColor(23, 190, 207)),
    ("shmdict_ref", RGBColor(158, 218, 229)),
    ("seqlock_floor", RGBColor(148, 103, 189)),
    ("rwlock_hashmap", RGBColor(255, 127, 14)),
    ("dashmap", RGBColor(44, 160, 44)),
    ("lmdb", RGBColor(140, 86, 75)),
    ("lmdb_txn", RGBColor(196, 156, 148)),
    ("redis_pipe100", RGBColor(214, 39, 40)),
    ("redis", RGBColor(227, 119, 194)),
];

type Medians = BTreeMap<(String, String), f64>;

fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => Path::new(&t).join("criterion"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion"),
    }
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Median ns per iteration of every function of every `peers_*` group.
fn medians(dir: &Path) -> Medians {
    let mut out = Medians::new();
    let Ok(groups) = std::fs::read_dir(dir) else {
        return out;
    };
    for group in groups.flatten() {
        if !group.file_name().to_string_lossy().starts_with("peers_") {
            continue;
        }
        let Ok(functions) = std::fs::read_dir(group.path()) else {
            continue;
        };
        for f in functions.flatten() {
            let new = f.path().join("new");
            let (Some(id), Some(est)) = (
                read_json(&new.join("benchmark.json")),
                read_json(&new.join("estimates.json")),
            ) else {
                continue;
            };
            let (Some(g), Some(func), Some(median)) = (
                id["group_id"].as_str(),
                id["function_id"].as_str(),
                est["median"]["point_estimate"].as_f64(),
            ) else {
                continue;
            };
            out.insert((g.to_string(), func.to_string()), median);
        }
    }
    out
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 10_000.0 {
        format!("{:.1} µs", ns / 1000.0)
    } else {
        format!("{ns:.0}")
    }
}

/// Prints the Markdown table: median ns and throughput relative to shmdict.
fn print_table(m: &Medians) {
    println!("| workload | store | median ns | throughput vs shmdict |");
    println!("|---|---|---|---|");
    for (group, label) in GROUPS {
        let Some(&shm) = m.get(&(group.to_string(), "shmdict".to_string())) else {
            continue;
        };
        for (store, _) in STORES {
            if let Some(&ns) = m.get(&(group.to_string(), store.to_string())) {
                println!(
                    "| {label} | `{store}` | {} | {:.3}x |",
                    fmt_ns(ns),
                    shm / ns
                );
            }
        }
    }
}

fn draw(m: &Medians, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // Only the workloads that were run (e.g. `scripts/peers.sh` runs the get
    // and insert groups only).
    let groups: Vec<(&str, &str)> = GROUPS
        .iter()
        .copied()
        .filter(|(g, _)| m.contains_key(&(g.to_string(), "shmdict".to_string())))
        .collect();
    let root = BitMapBackend::new(out, (1600, 840)).into_drawing_area();
    root.fill(&WHITE)?;
    // Room above 10x for the legend.
    let (y_lo, y_hi) = (0.001f64, 200.0f64);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "shmdict and its peers: throughput relative to shmdict (log scale; above 1 = faster than shmdict)",
            ("sans-serif", 24),
        )
        .margin(20)
        .x_label_area_size(64)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..groups.len().max(1) as f64, (y_lo..y_hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_desc("throughput / shmdict throughput")
        .y_label_formatter(&|y| format!("{y}"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;

    let slot = 1.0 / (STORES.len() as f64 + 1.0);
    for (s, (store, color)) in STORES.iter().enumerate() {
        let mut bars = Vec::new();
        let mut labels = Vec::new();
        for (g, (group, _)) in groups.iter().enumerate() {
            let key = |f: &str| (group.to_string(), f.to_string());
            let (Some(&shm), Some(&ns)) = (m.get(&key("shmdict")), m.get(&key(store))) else {
                continue;
            };
            let ratio = shm / ns;
            let x0 = g as f64 + slot * (s as f64 + 0.5);
            bars.push(Rectangle::new(
                [(x0, y_lo), (x0 + slot * 0.9, ratio)],
                color.filled(),
            ));
            let text = if ratio >= 0.1 {
                format!("{ratio:.2}")
            } else {
                format!("{ratio:.3}")
            };
            labels.push(Text::new(
                text,
                (x0 + slot * 0.45, ratio * 1.08),
                ("sans-serif", 13)
                    .into_font()
                    .into_text_style(&root)
                    .pos(text_anchor::Pos::new(
                        text_anchor::HPos::Center,
                        text_anchor::VPos::Bottom,
                    )),
            ));
        }
        if bars.is_empty() {
            continue; // Not run (e.g. Redis absent): no legend entry either.
        }
        let color = *color;
        chart
            .draw_series(bars)?
            .label(if *store == "seqlock_floor" {
                "seqlock_floor (64 B only)"
            } else {
                store
            })
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart.draw_series(labels)?;
    }
    // shmdict's level, and the workload names under each group of bars.
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, 1.0), (groups.len() as f64, 1.0)],
        BLACK.stroke_width(1),
    )))?;
    for (g, (group, label)) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, y_lo));
        let shm = m.get(&(group.to_string(), "shmdict".to_string()));
        let under = [
            (label.to_string(), 18, 10),
            (
                shm.map_or(String::new(), |ns| format!("shmdict: {ns:.0} ns")),
                15,
                34,
            ),
        ];
        for (text, size, dy) in under {
            root.draw(&Text::new(
                text,
                (x, y + dy),
                ("sans-serif", size)
                    .into_font()
                    .into_text_style(&root)
                    .pos(text_anchor::Pos::new(
                        text_anchor::HPos::Center,
                        text_anchor::VPos::Top,
                    )),
            ))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "the embedded DejaVu Sans font")
        .unwrap();
    let dir = criterion_dir();
    let m = medians(&dir);
    if m.is_empty() {
        println!(
            "chart: no peers results under {}; run `cargo bench --bench peers` first",
            dir.display()
        );
        return;
    }
    print_table(&m);
    let out = std::env::var_os("SHMDICT_CHART_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/peers.png"));
    draw(&m, &out).expect("render the chart");
    println!("\nchart: wrote {}", out.display());
}
