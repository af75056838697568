//! Human reports: the sync summary line, the dry-run plan, the verify report.

use hotsync::plan::Plan;
pub use hotsync::status::human_bytes;
use hotsync::summary::Summary;
use std::io::Write;

/// The human verify report: the verdict and totals first, then each category.
pub fn print_report(r: &hotsync::verify::Report) {
    let mut out = std::io::stdout().lock();
    let secs = r.elapsed_ms as f64 / 1000.0;
    let verdict = if r.identical {
        "IDENTICAL"
    } else {
        "DIFFERENT"
    };
    let _ = writeln!(
        out,
        "verify: {verdict}: {} entries checked, {} hashed in {secs:.2} s ({}/s)",
        r.files_checked,
        human_bytes(r.bytes_hashed),
        human_bytes((r.bytes_hashed as f64 / secs.max(0.001)) as u64)
    );
    let detail = |p: &str| {
        r.details
            .iter()
            .find(|d| d.path == p)
            .map(|d| format!(": {}", d.detail))
            .unwrap_or_default()
    };
    for (title, list) in [
        ("missing on standby", &r.missing),
        ("extra on standby", &r.extra),
        ("content differs", &r.content_differs),
        ("metadata differs", &r.metadata_differs),
    ] {
        if !list.is_empty() {
            let _ = writeln!(out, "{title} ({}):", list.len());
            for p in list {
                let _ = writeln!(out, "  {p}{}", detail(p));
            }
        }
    }
    if !r.errors.is_empty() {
        let _ = writeln!(out, "errors ({}):", r.errors.len());
        for e in &r.errors {
            let _ = writeln!(out, "  {}: {}", e.path, e.error);
        }
    }
}

pub fn summary_line(s: &Summary) -> String {
    let what = if s.dry_run { "dry run" } else { "synced" };
    format!(
        "{what}: {} entries scanned, {} files sent ({} literal, {} matched), {} removed, {} errors, {} on the wire, {:.2} s",
        s.files_scanned,
        s.files_transferred,
        human_bytes(s.bytes_literal),
        human_bytes(s.bytes_matched),
        s.files_deleted,
        s.errors.len(),
        human_bytes(s.bytes_on_wire),
        s.elapsed_ms as f64 / 1000.0
    )
}

pub fn print_plan(p: &Plan) {
    let mut out = std::io::stdout().lock();
    for c in &p.clear {
        let _ = writeln!(out, "replace   {c}");
    }
    for d in &p.mkdirs {
        let _ = writeln!(out, "mkdir     {d}");
    }
    for t in &p.transfers {
        let how = match t.method() {
            hotsync::plan::Method::Delta => "delta",
            _ => "whole",
        };
        let _ = writeln!(out, "send      {} ({} bytes, {how})", t.path, t.size);
    }
    for l in &p.symlinks {
        let _ = writeln!(
            out,
            "symlink   {} -> {}",
            l.path,
            hotsync::path::escape_bytes(&l.target)
        );
    }
    for m in &p.metas {
        let _ = writeln!(out, "attrs     {}", m.path);
    }
    for l in &p.links {
        let _ = writeln!(out, "hardlink  {} => {}", l.path, l.target);
    }
    for d in &p.deletes {
        let _ = writeln!(out, "delete    {d}");
    }
}
