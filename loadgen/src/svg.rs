//! Line charts as inline SVG for the HTML report: axes with round ticks, one polyline
//! per series (broken where a value is missing), a dot with a tooltip per point when
//! there are few, a legend, and labelled vertical markers (the phases).

use std::fmt::Write;

/// One line of a chart; None where nothing was measured (the line breaks there).
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, Option<f64>)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Ticks of the x axis as (value, label); empty: round numbers.
    pub x_ticks: Vec<(f64, String)>,
    /// Vertical lines with a label (x, label).
    pub markers: Vec<(f64, String)>,
    /// The x axis' span; None: the points' own.
    pub x_range: Option<(f64, f64)>,
}

const W: f64 = 1100.0;
const H: f64 = 300.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 44.0;
/// Above this many points a series is drawn as a line only, without dots.
const MAX_DOTS: usize = 150;

/// Colours the report's series take in turn.
pub const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Linear map from data to pixels.
struct Scale {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Scale {
    fn x(&self, v: f64) -> f64 {
        LEFT + (v - self.x0) / (self.x1 - self.x0).max(1e-12) * (W - LEFT - RIGHT)
    }
    fn y(&self, v: f64) -> f64 {
        H - BOTTOM - (v - self.y0) / (self.y1 - self.y0).max(1e-12) * (H - TOP - BOTTOM)
    }
}

/// A round step (1, 2 or 5 times a power of ten) giving about `n` ticks over `span`.
pub fn nice_step(span: f64, n: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / n;
    let pow = 10f64.powf(raw.log10().floor());
    let m = raw / pow;
    let f = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    f * pow
}

/// A tick label: k/M/G for large values, few decimals for small ones.
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    let short = |x: f64, unit: &str| {
        let s = format!("{x:.1}");
        format!("{}{unit}", s.trim_end_matches(".0"))
    };
    if a >= 1e9 {
        short(v / 1e9, "G")
    } else if a >= 1e6 {
        short(v / 1e6, "M")
    } else if a >= 1e4 {
        short(v / 1e3, "k")
    } else if a == 0.0 || a >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn bounds(series: &[Series], x_range: Option<(f64, f64)>) -> Option<Scale> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|&(x, y)| Some((x, y?))))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if pts.is_empty() {
        return None;
    }
    let fold = |f: fn(f64, f64) -> f64, init: f64, pick: fn(&(f64, f64)) -> f64| {
        pts.iter().map(pick).fold(init, f)
    };
    let (x0, x1) = x_range.unwrap_or((
        fold(f64::min, f64::MAX, |p| p.0),
        fold(f64::max, f64::MIN, |p| p.0),
    ));
    let y_max = fold(f64::max, f64::MIN, |p| p.1);
    let y_min = fold(f64::min, f64::MAX, |p| p.1).min(0.0);
    let step = nice_step(y_max - y_min, 5.0);
    let y1 = ((y_max / step).ceil() * step).max(y_min + step);
    Some(Scale {
        x0,
        x1: if x1 > x0 { x1 } else { x0 + 1.0 },
        y0: y_min,
        y1,
    })
}

/// The chart as an `<svg>` element (a `<figure>` with its title).
pub fn line_chart(c: &Chart) -> String {
    let mut o = format!(
        "<figure class=\"chart\"><figcaption>{}</figcaption>\n<svg viewBox=\"0 0 {W} {H}\" \
         role=\"img\" aria-label=\"{}\">\n",
        esc(&c.title),
        esc(&c.title)
    );
    match bounds(&c.series, c.x_range) {
        None => {
            let _ = writeln!(
                o,
                "<text x=\"{}\" y=\"{}\" class=\"empty\">no data</text>",
                W / 2.0,
                H / 2.0
            );
        }
        Some(sc) => {
            axes(&mut o, c, &sc);
            for (x, label) in &c.markers {
                marker(&mut o, &sc, *x, label);
            }
            for s in &c.series {
                series(&mut o, &sc, s);
            }
            legend(&mut o, &c.series);
        }
    }
    o.push_str("</svg></figure>\n");
    o
}

fn axes(o: &mut String, c: &Chart, sc: &Scale) {
    let (bottom, right) = (H - BOTTOM, W - RIGHT);
    let _ = writeln!(o, "<g class=\"axes\">");
    let step = nice_step(sc.y1 - sc.y0, 5.0);
    let mut v = (sc.y0 / step).ceil() * step;
    while v <= sc.y1 + step * 1e-9 {
        let y = sc.y(v);
        let _ = writeln!(
            o,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{right}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"ytick\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            LEFT - 6.0,
            y + 4.0,
            tick_label(v)
        );
        v += step;
    }
    let ticks = if c.x_ticks.is_empty() {
        round_ticks(sc.x0, sc.x1)
    } else {
        c.x_ticks.clone()
    };
    for (v, label) in ticks.iter().filter(|(v, _)| *v >= sc.x0 && *v <= sc.x1) {
        let x = sc.x(*v);
        let _ = writeln!(
            o,
            "<line class=\"tick\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{bottom}\" y2=\"{:.1}\"/>\
             <text class=\"xtick\" x=\"{x:.1}\" y=\"{:.1}\">{}</text>",
            bottom + 5.0,
            bottom + 18.0,
            esc(label)
        );
    }
    let _ = writeln!(
        o,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{right}\" y1=\"{bottom}\" y2=\"{bottom}\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{bottom}\"/>\
         <text class=\"xlabel\" x=\"{:.1}\" y=\"{:.1}\">{}</text>\
         <text class=\"ylabel\" x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\">{}</text>\n</g>",
        (LEFT + right) / 2.0,
        H - 6.0,
        esc(&c.x_label),
        (TOP + bottom) / 2.0,
        (TOP + bottom) / 2.0,
        esc(&c.y_label)
    );
}

fn round_ticks(x0: f64, x1: f64) -> Vec<(f64, String)> {
    let step = nice_step(x1 - x0, 10.0);
    let mut out = Vec::new();
    let mut v = (x0 / step).ceil() * step;
    while v <= x1 + step * 1e-9 {
        out.push((v, tick_label(v)));
        v += step;
    }
    out
}

fn marker(o: &mut String, sc: &Scale, x: f64, label: &str) {
    if x < sc.x0 || x > sc.x1 {
        return;
    }
    let px = sc.x(x);
    let _ = writeln!(
        o,
        "<line class=\"marker\" x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{TOP}\" y2=\"{}\"/>\
         <text class=\"mlabel\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
        H - BOTTOM,
        px + 3.0,
        TOP + 10.0,
        esc(label)
    );
}

fn series(o: &mut String, sc: &Scale, s: &Series) {
    // One polyline per run of measured points.
    for run in s
        .points
        .split(|(_, y)| y.is_none())
        .filter(|r| !r.is_empty())
    {
        let pts: Vec<String> = run
            .iter()
            .filter_map(|&(x, y)| Some(format!("{:.1},{:.1}", sc.x(x), sc.y(y?))))
            .collect();
        let _ = writeln!(
            o,
            "<polyline class=\"line\" stroke=\"{}\" points=\"{}\"/>",
            s.color,
            pts.join(" ")
        );
    }
    let measured: Vec<(f64, f64)> = s
        .points
        .iter()
        .filter_map(|&(x, y)| Some((x, y?)))
        .collect();
    if measured.len() > MAX_DOTS {
        return;
    }
    for (x, y) in measured {
        let _ = writeln!(
            o,
            "<circle class=\"dot\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{}\"><title>{}: {}, {}</title></circle>",
            sc.x(x),
            sc.y(y),
            s.color,
            esc(&s.name),
            tick_label(x),
            tick_label(y)
        );
    }
}

fn legend(o: &mut String, series: &[Series]) {
    let mut x = LEFT + 10.0;
    for s in series {
        let _ = writeln!(
            o,
            "<rect x=\"{x:.1}\" y=\"10\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text class=\"legend\" x=\"{:.1}\" y=\"20\">{}</text>",
            s.color,
            x + 16.0,
            esc(&s.name)
        );
        x += 30.0 + 7.5 * s.name.chars().count() as f64;
    }
}

/// Text for HTML and SVG: markup characters escaped, and `:` as a character reference,
/// so that no URL given as a parameter reads as a link in the file (the page refers to
/// nothing outside itself).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            ':' => o.push_str("&#58;"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_steps_and_labels() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(0.9, 5.0), 0.2);
        assert_eq!(nice_step(7000.0, 10.0), 1000.0);
        assert_eq!(tick_label(2_500_000.0), "2.5M");
        assert_eq!(tick_label(25_000.0), "25k");
        assert_eq!(tick_label(1500.0), "1500");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(
            esc("<a href=\"x:y\">"),
            "&lt;a href=&quot;x&#58;y&quot;&gt;"
        );
    }

    #[test]
    fn a_chart_has_its_lines_dots_and_gaps() {
        let c = Chart {
            title: "t".into(),
            x_label: "s".into(),
            y_label: "ms".into(),
            series: vec![Series {
                name: "p99".into(),
                color: COLORS[0],
                points: vec![
                    (0.0, Some(1.0)),
                    (1.0, Some(3.0)),
                    (2.0, None),
                    (3.0, Some(2.0)),
                ],
            }],
            x_ticks: Vec::new(),
            markers: vec![(1.0, "steady".into())],
            x_range: Some((0.0, 10.0)),
        };
        let svg = line_chart(&c);
        // The gap splits the line in two; each measured point has a dot.
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("class=\"marker\"") && svg.contains(">steady<"));
        // The axis spans the range asked for, beyond the last point.
        assert!(svg.contains(">10</text>"), "{svg}");
        let empty = line_chart(&Chart {
            series: Vec::new(),
            ..c
        });
        assert!(empty.contains("no data") && !empty.contains("<polyline"));
    }
}
