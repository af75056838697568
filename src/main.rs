//! The `hotsync` command: parses arguments, calls the library, reports, maps errors to the
//! exit codes of the contract (0 ok, 1 some entries failed or differ, 2 fatal).

mod cli;

use anyhow::bail;
use clap::Parser;
use cli::{Cli, Command, ServeArgs, SyncArgs};
use hotsync::identity::{self, NodeId};
use hotsync::plan::Plan;
use hotsync::summary::Summary;
use hotsync::{Monitor, SyncOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

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
    let base = if matches!(cli.command, Command::Serve(_)) {
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
        Command::Watch(_) | Command::Verify(_) => {
            bail!("this command is not available in this build yet")
        }
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
        root: args.root.clone(),
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

fn sync(cli: &Cli, args: &SyncArgs) -> anyhow::Result<u8> {
    let c = &args.common;
    let opts = SyncOptions {
        checksum: c.checksum,
        delete: !c.no_delete,
        force: c.force,
        dry_run: args.dry_run,
        excludes: c.exclude.clone(),
        max_delete_percent: c.max_delete,

        ..SyncOptions::default()
    };
    let bars = Bars::new(cli, c.json || args.dry_run);
    let outcome = if args.dest.starts_with("quic://") {
        let Some(server) = &c.server_id else {
            bail!("a quic:// DEST needs --server-id ID (the standby's ID: run `hotsync id` there)");
        };
        let server = NodeId::parse(server).map_err(anyhow::Error::msg)?;
        let home = identity::home_dir(cli.home.as_deref())?;
        let me = identity::load(&home)?;
        hotsync::sync_remote(&args.src, &args.dest, server, &me, &opts, &bars)
    } else {
        hotsync::sync_local(&args.src, args.dest.as_ref(), &opts, &bars)
    };
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
