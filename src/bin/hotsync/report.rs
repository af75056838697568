//! Human reports: the sync summary line, the dry-run plan, the verify report.

use hotsync::model::plan::Plan;
pub use hotsync::model::status::human_bytes;
use hotsync::model::summary::Summary;
use std::io::Write;

/// The human verify report: the verdict and totals first, then each category.
pub fn print_report(r: &hotsync::model::compare::Report) {
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
    let details: std::collections::HashMap<&str, &str> = r
        .details
        .iter()
        .map(|d| (d.path.as_str(), d.detail.as_str()))
        .collect();
    let more = |out: &mut std::io::StdoutLock, listed: usize, count: u64| {
        if count > listed as u64 {
            let _ = writeln!(
                out,
                "  ... and {} more (a report lists {} paths per category)",
                count - listed as u64,
                hotsync::model::compare::MAX_LISTED
            );
        }
    };
    for (title, list, count) in [
        ("missing on standby", &r.missing, r.missing_count),
        ("extra on standby", &r.extra, r.extra_count),
        (
            "content differs",
            &r.content_differs,
            r.content_differs_count,
        ),
        (
            "metadata differs",
            &r.metadata_differs,
            r.metadata_differs_count,
        ),
    ] {
        if count > 0 {
            let _ = writeln!(out, "{title} ({count}):");
            for p in list {
                match details.get(p.as_str()) {
                    Some(d) => writeln!(out, "  {p}: {d}"),
                    None => writeln!(out, "  {p}"),
                }
                .ok();
            }
            more(&mut out, list.len(), count);
        }
    }
    if r.errors_count > 0 {
        let _ = writeln!(out, "errors ({}):", r.errors_count);
        for e in &r.errors {
            let _ = writeln!(out, "  {}: {}", e.path, e.error);
        }
        more(&mut out, r.errors.len(), r.errors_count);
    }
    if r.skipped_count > 0 {
        let _ = writeln!(
            out,
            "not mirrored, by design ({}; not counted as differences):",
            r.skipped_count
        );
        for e in &r.skipped {
            let _ = writeln!(out, "  {}: {}", e.path, e.error);
        }
        more(&mut out, r.skipped.len(), r.skipped_count);
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
            hotsync::model::plan::Method::Delta => "delta",
            _ => "whole",
        };
        let _ = writeln!(out, "send      {} ({} bytes, {how})", t.path, t.size);
    }
    for l in &p.symlinks {
        let _ = writeln!(
            out,
            "symlink   {} -> {}",
            l.path,
            hotsync::model::path::escape_bytes(&l.target)
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
    // A directory's attributes are set again once its contents changed (its mtime moved),
    // or when they differ: each is one operation of the real run.
    for m in &p.dir_metas {
        let _ = writeln!(out, "attrs     {}/", m.path);
    }
}
