//! The `hotsync` command: parses arguments, calls the library, reports, maps errors to the
//! exit codes of the contract (0 ok, 1 some entries failed or differ, 2 fatal).

mod cli;

use anyhow::bail;
use clap::Parser;
use cli::{Cli, Command, Common, ServeArgs, SyncArgs, VerifyArgs, WatchArgs};
use hotsync::Target;
use hotsync::identity::{self, NodeId};
use hotsync::plan::Plan;
use hotsync::summary::Summary;
use hotsync::watch::WatchOptions;
use hotsync::{Monitor, SyncOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line: the outermost context and its causes.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("hotsync: {msg}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(cli: &Cli) {
    // A server's one line per connection is its main output.
    let base = if matches!(cli.command, Command::Serve(_) | Command::Watch(_)) {
        1
    } else {
        0
    };
    let level = if cli.quiet {
        "error"
    } else {
        match cli.verbose + base {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .init();
}

fn run(cli: &Cli) -> anyhow::Result<u8> {
    match &cli.command {
        Command::Sync(args) => sync(cli, args),
        Command::Keygen => {
            let home = identity::home_dir(cli.home.as_deref())?;
            let (me, created) = identity::keygen(&home)?;
            if !cli.quiet {
                if created {
                    eprintln!("created a new identity in {}", home.display());
                } else {
                    eprintln!("an identity already exists in {}", home.display());
                }
            }
            println!("{}", me.id);
            Ok(0)
        }
        Command::Id => {
            let home = identity::home_dir(cli.home.as_deref())?;
            println!("{}", identity::load(&home)?.id);
            Ok(0)
        }
        Command::Serve(args) => serve(cli, args),
        Command::Watch(args) => watch(cli, args),
        Command::Verify(args) => verify(cli, args),
    }
}

fn parse_ids(ids: &[String]) -> anyhow::Result<Vec<NodeId>> {
    ids.iter()
        .map(|s| NodeId::parse(s).map_err(anyhow::Error::msg))
        .collect()
}

fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<u8> {
    let allow = parse_ids(&args.allow)?;
    hotsync::server::check(&args.root, &allow)?;
    let home = identity::home_dir(cli.home.as_deref())?;
    let me = identity::load(&home)?;
    let rt = hotsync::transport::quic::runtime()?;
    let server = hotsync::transport::quic::bind(rt.handle(), &args.listen, &me)?;
    let standby = hotsync::standby::Standby::open(&args.root, hotsync::standby::Access::Write)?;
    // Signal handlers before the announcement: a SIGTERM right after it must stop us cleanly.
    let shutdown = {
        let _guard = rt.enter();
        shutdown_signal()?
    };
    println!("listening on {} as {}", server.addr, me.id);
    std::io::stdout().flush()?;
    tracing::info!(
        "serving {} to {} allowed primar{}",
        args.root.display(),
        allow.len(),
        if allow.len() == 1 { "y" } else { "ies" }
    );
    let opts = hotsync::server::ServeOptions {
        standby: Arc::new(standby),
        allow: allow.into_iter().collect(),
    };
    rt.block_on(hotsync::server::run(server, opts, shutdown));
    tracing::info!("stopped");
    Ok(0)
}

/// A future that completes on SIGINT or SIGTERM; the handlers are installed at once.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

fn sync_options(c: &Common, dry_run: bool) -> SyncOptions {
    SyncOptions {
        checksum: c.checksum,
        delete: !c.no_delete,
        force: c.force,
        dry_run,
        excludes: c.exclude.clone(),
        max_delete_percent: c.max_delete,
        ..SyncOptions::default()
    }
}

/// The standby a DEST argument names: a local directory, or a quic:// standby with its
/// pinned ID and our identity.
fn target(cli: &Cli, dest: &str, server_id: Option<&str>) -> anyhow::Result<Target> {
    if !Target::is_remote(dest) {
        return Ok(Target::Local(dest.into()));
    }
    let Some(server) = server_id else {
        bail!("a quic:// DEST needs --server-id ID (the standby's ID: run `hotsync id` there)");
    };
    let server = NodeId::parse(server).map_err(anyhow::Error::msg)?;
    let home = identity::home_dir(cli.home.as_deref())?;
    Ok(Target::Remote {
        dest: dest.to_string(),
        server,
        me: identity::load(&home)?,
    })
}

fn sync(cli: &Cli, args: &SyncArgs) -> anyhow::Result<u8> {
    let c = &args.common;
    let opts = sync_options(c, args.dry_run);
    let target = target(cli, &args.dest, c.server_id.as_deref())?;
    let bars = Bars::new(cli, c.json || args.dry_run);
    let outcome = hotsync::sync(&args.src, &target, &opts, &bars);
    bars.finished();
    let outcome = outcome?;
    let s = &outcome.summary;
    if args.dry_run && !c.json {
        print_plan(&outcome.plan);
    }
    if c.json {
        println!("{}", serde_json::to_string(s)?);
    } else {
        for e in &s.errors {
            eprintln!("hotsync: {}: {}", e.path, e.error);
        }
        if !cli.quiet {
            println!("{}", summary_line(s));
        }
    }
    Ok(s.exit_code() as u8)
}

fn watch(cli: &Cli, args: &WatchArgs) -> anyhow::Result<u8> {
    let c = &args.common;
    let target = target(cli, &args.dest, c.server_id.as_deref())?;
    let opts = WatchOptions {
        sync: sync_options(c, false),
        batcher: hotsync::watch::batcher::Config {
            max_delay: args.max_delay,
            ..Default::default()
        },
        fallback_rescan: args.rescan_every,
        verify_every: args.verify_every,
        verify_rate: args.verify_rate.max(1) << 20,
    };
    let shutdown = Arc::new(AtomicBool::new(false));
    on_signal(shutdown.clone())?;
    let status = WatchStatus::new(cli, c.json);
    let result = hotsync::watch::watch(&args.src, &target, &opts, &shutdown, &status);
    status.finish();
    result?;
    tracing::info!("stopped");
    Ok(0)
}

/// Sets `flag` on SIGINT or SIGTERM; the handlers are in place when this returns.
fn on_signal(flag: Arc<AtomicBool>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signals = {
        let _guard = rt.enter();
        shutdown_signal()?
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(signals);
            flag.store(true, Ordering::Relaxed);
        })?;
    Ok(())
}

/// What `watch` shows: a status line on a terminal, log lines otherwise, JSON lines with
/// `--json`.
struct WatchStatus {
    bar: Option<ProgressBar>,
    json: bool,
    connected_to: std::sync::Mutex<String>,
    last: std::sync::Mutex<Option<(std::time::Instant, std::time::Duration)>>,
}

impl WatchStatus {
    fn new(cli: &Cli, json: bool) -> WatchStatus {
        let bar = (!cli.quiet && !json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
            b.set_style(ProgressStyle::with_template("{spinner} {msg}").unwrap());
            b.enable_steady_tick(std::time::Duration::from_millis(250));
            b
        });
        WatchStatus {
            bar,
            json,
            connected_to: Default::default(),
            last: Default::default(),
        }
    }

    fn event(&self, value: serde_json::Value) {
        if self.json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{value}");
            let _ = out.flush();
        }
    }

    fn line(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => tracing::info!("{msg}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl hotsync::watch::Observer for WatchStatus {
    fn connected(&self, to: &str) {
        *self.connected_to.lock().unwrap() = to.to_string();
        self.event(serde_json::json!({"event": "connected", "standby": to}));
        self.line(&format!("connected to {to}"));
    }

    fn disconnected(&self, why: &str, retry_in: std::time::Duration) {
        self.connected_to.lock().unwrap().clear();
        self.event(serde_json::json!({"event": "disconnected", "error": why, "retry_in_ms": retry_in.as_millis() as u64}));
        let msg = format!(
            "standby unavailable: {why}; retrying in {:.1} s",
            retry_in.as_secs_f64()
        );
        match &self.bar {
            Some(b) => b.println(&msg),
            None => tracing::warn!("{msg}"),
        }
    }

    fn replicated(&self, s: &Summary, changes: usize, lag: std::time::Duration) {
        *self.last.lock().unwrap() = Some((std::time::Instant::now(), lag));
        if self.json {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["event"] = "replicated".into();
            v["changes"] = changes.into();
            v["lag_ms"] = (lag.as_secs_f64() * 1000.0).into();
            self.event(v);
        }
        let what = if changes == 0 {
            "reconciled".to_string()
        } else {
            format!("{changes} change(s)")
        };
        let msg = format!(
            "{what}: {} files sent ({}), {} removed, {} renamed, {} errors, {} ms (lag {:.1} ms)",
            s.files_transferred,
            human_bytes(s.bytes_literal),
            s.files_deleted,
            s.renamed,
            s.errors.len(),
            s.elapsed_ms,
            lag.as_secs_f64() * 1000.0
        );
        for e in &s.errors {
            tracing::warn!("{}: {}", e.path, e.error);
        }
        if self.bar.is_none() && (changes > 0 || s.files_transferred > 0 || s.files_deleted > 0) {
            tracing::info!("{msg}");
        }
    }

    fn queued(&self, changes: usize, oldest: Option<std::time::Duration>) {
        let Some(b) = &self.bar else { return };
        let to = self.connected_to.lock().unwrap().clone();
        let state = if to.is_empty() {
            "disconnected".to_string()
        } else {
            format!("connected to {to}")
        };
        let last = match *self.last.lock().unwrap() {
            Some((at, lag)) => format!(
                "last replicated {:.0} s ago in {:.1} ms",
                at.elapsed().as_secs_f64(),
                lag.as_secs_f64() * 1000.0
            ),
            None => "nothing replicated yet".into(),
        };
        let lag = oldest
            .map(|d| format!(" | lag {:.0} ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_default();
        b.set_message(format!("{state} | {changes} queued | {last}{lag}"));
    }

    fn verified(&self, r: &hotsync::verify::Report, repaired: usize) {
        if self.json {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["event"] = "verified".into();
            v["repaired"] = repaired.into();
            self.event(v);
        }
        let secs = r.elapsed_ms as f64 / 1000.0;
        if r.identical {
            self.line(&format!(
                "verify: identical ({} entries, {} hashed in {secs:.1} s)",
                r.files_checked,
                human_bytes(r.bytes_hashed)
            ));
            return;
        }
        let msg = format!(
            "verify: {} missing, {} extra, {} content differs, {} metadata differs, {} errors; {repaired} repaired",
            r.missing.len(),
            r.extra.len(),
            r.content_differs.len(),
            r.metadata_differs.len(),
            r.errors.len()
        );
        match &self.bar {
            Some(b) => b.println(&msg),
            None => tracing::warn!("{msg}"),
        }
        for d in &r.details {
            tracing::warn!("verify: {}: {}", d.path, d.detail);
        }
        for p in r.missing.iter().chain(&r.extra) {
            tracing::warn!("verify: {p}: missing or extra on the standby");
        }
        for e in &r.errors {
            tracing::warn!("verify: {}: {}", e.path, e.error);
        }
    }

    fn verify_failed(&self, why: &str) {
        self.event(serde_json::json!({"event": "verify_failed", "error": why}));
        tracing::warn!("background verify failed: {why}");
    }

    fn paused(&self, why: &str) {
        self.event(serde_json::json!({"event": "paused", "reason": why}));
        match &self.bar {
            Some(b) => b.println(format!("PAUSED: {why}")),
            None => tracing::error!("paused: {why}"),
        }
    }
}

fn verify(cli: &Cli, args: &VerifyArgs) -> anyhow::Result<u8> {
    let target = target(cli, &args.dest, args.server_id.as_deref())?;
    let check = || hotsync::verify(&args.src, &target, &args.exclude);
    let before = check()?;
    if !args.repair || before.identical {
        if args.json {
            println!("{}", serde_json::to_string(&before)?);
        } else if !cli.quiet || !before.identical {
            print_report(&before);
        }
        return Ok(before.exit_code() as u8);
    }
    // Repair through the normal sync path, comparing content, then prove the result.
    let opts = SyncOptions {
        checksum: true,
        excludes: args.exclude.clone(),
        ..SyncOptions::default()
    };
    let repaired = hotsync::sync(&args.src, &target, &opts, &hotsync::progress::Silent)?;
    let after = check()?;
    if args.json {
        let mut v = serde_json::to_value(&after)?;
        v["before"] = serde_json::to_value(&before)?;
        v["repair"] = serde_json::to_value(&repaired.summary)?;
        println!("{v}");
    } else {
        println!("before repair:");
        print_report(&before);
        println!("repair: {}", summary_line(&repaired.summary));
        println!("after repair:");
        print_report(&after);
    }
    Ok(after.exit_code() as u8)
}

/// The human verify report: the verdict and totals first, then each category.
fn print_report(r: &hotsync::verify::Report) {
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

fn summary_line(s: &Summary) -> String {
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

fn print_plan(p: &Plan) {
    let mut out = std::io::stdout().lock();
    for c in &p.clear {
        let _ = writeln!(out, "replace   {c}");
    }
    for d in &p.mkdirs {
        let _ = writeln!(out, "mkdir     {d}");
    }
    for t in &p.transfers {
        let how = if t.basis.is_some_and(|b| b > 0) && t.size > hotsync::protocol::SMALL_FILE {
            "delta"
        } else {
            "whole"
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

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// indicatif progress on a terminal (or with -v), nothing otherwise.
struct Bars {
    bar: Option<ProgressBar>,
}

impl Bars {
    fn new(cli: &Cli, suppress: bool) -> Bars {
        let show = !cli.quiet && !suppress && (std::io::stderr().is_terminal() || cli.verbose > 0);
        if !show {
            return Bars { bar: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(10));
        bar.set_style(ProgressStyle::with_template("{spinner} scanning: {pos} entries").unwrap());
        Bars { bar: Some(bar) }
    }
}

impl Monitor for Bars {
    fn scanned(&self, entries: u64) {
        if let Some(b) = &self.bar {
            b.set_position(entries);
        }
    }
    fn planned(&self, files: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}  {msg}",
                )
                .unwrap(),
            );
            b.set_length(bytes);
            b.set_position(0);
            b.set_message(format!("0/{files} files"));
            b.reset_eta();
        }
    }
    fn file_done(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
    fn finished(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
