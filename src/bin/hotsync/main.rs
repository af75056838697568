//! The `hotsync` command: parses arguments, calls the library, reports, maps errors to the
//! exit codes of the contract (0 ok, 1 some entries failed or differ, 2 fatal).

mod args;
mod bars;
mod configured;
mod failover;
mod flushing;
mod report;
mod signals;
mod status;
mod watching;

use anyhow::bail;
use args::{Cli, Command, Common, Monitoring, ServeArgs, SyncArgs, VerifyArgs, WatchArgs};
use bars::Bars;
use clap::{CommandFactory, FromArgMatches};
use hotsync::ops::control::Control;
use hotsync::primary::replicate::{Watch, WatchOptions};
use hotsync::transport::dest::DestKind;
use hotsync::transport::identity::{self, NodeId};
use hotsync::{Monitor, SyncOptions, Target};
use report::{print_plan, print_report, summary_line};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Err(e) = configured::apply(&mut cli, &matches) {
        eprintln!("hotsync: {e}");
        return ExitCode::from(2);
    }
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
        Command::Status(args) => status::status(cli, args),
        Command::Flush(args) => flushing::flush(cli, args),
        Command::Promote(args) => failover::promote(cli, args),
        Command::Rejoin(args) => failover::rejoin(cli, args),
        Command::Check(args) => failover::check(cli, args),
    }
}

fn parse_ids(ids: &[String]) -> anyhow::Result<Vec<NodeId>> {
    ids.iter()
        .map(|s| NodeId::parse(s).map_err(anyhow::Error::msg))
        .collect()
}

fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<u8> {
    let Some(root) = &args.root else {
        bail!("serve needs --root DIR (or `root` in the [serve] table of a --config file)");
    };
    let allow = parse_ids(&args.allow)?;
    hotsync::standby::server::check(root, &allow)?;
    let home = identity::home_dir(cli.home.as_deref())?;
    let me = identity::load(&home)?;
    let rt = hotsync::transport::quic::runtime()?;
    let server = hotsync::transport::quic::bind(rt.handle(), &args.listen, &me)?;
    let metrics = bind_metrics(&args.monitoring)?;
    let standby = Arc::new(hotsync::standby::Standby::open(
        root,
        hotsync::standby::Access::Write,
    )?);
    standby.set_consistency(args.consistency.into());
    let serving = Arc::new(hotsync::standby::server::Serving::new(
        standby.clone(),
        server.addr,
        me.id,
        alert_config(&args.monitoring)?,
    ));
    let monitor = start_monitoring(
        &home,
        "serve",
        metrics,
        serving.clone(),
        serving.alerts.clone(),
        None,
    )?;
    // Signal handlers before the announcement: a SIGTERM right after it must stop us cleanly.
    let shutdown = {
        let _guard = rt.enter();
        signals::shutdown_signal()?
    };
    if args.json {
        let line = |name: &str, mut v: serde_json::Value| {
            v["event"] = name.into();
            v["ts"] = hotsync::model::clock::now_rfc3339().into();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{v}");
            let _ = out.flush();
        };
        line(
            "listening",
            serde_json::json!({"addr": server.addr.to_string(), "id": me.id.to_string(),
                "tree": hotsync::tree::operand::shown_absolute(root)}),
        );
        standby.on_events(Box::new(line));
    } else {
        println!("listening on {} as {}", server.addr, me.id);
    }
    std::io::stdout().flush()?;
    tracing::info!(
        "serving {} to {} allowed primar{}",
        root.display(),
        allow.len(),
        if allow.len() == 1 { "y" } else { "ies" }
    );
    let opts = hotsync::standby::server::ServeOptions {
        standby,
        allow: allow.into_iter().collect(),
    };
    rt.block_on(hotsync::standby::server::run(
        Arc::new(server),
        opts,
        shutdown,
    ));
    drop(monitor);
    tracing::info!("stopped");
    Ok(0)
}

/// `--alert-*` and `--on-alert` as the library takes them.
fn alert_config(m: &Monitoring) -> anyhow::Result<hotsync::ops::alert::AlertConfig> {
    let hook = m
        .on_alert
        .as_deref()
        .map(hotsync::ops::alert::AlertConfig::parse_hook)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    Ok(hotsync::ops::alert::AlertConfig {
        lag: m.alert_lag,
        free_percent: m.alert_free,
        consistency_window: Some(m.consistency_window).filter(|d| !d.is_zero()),
        hook,
    })
}

/// What keeps a running instance observable: its control socket, its metrics endpoint,
/// and the alert evaluator. Dropping it stops them.
struct Observability {
    _socket: hotsync::ops::control::ControlSocket,
    _metrics: Option<hotsync::ops::metrics::MetricsServer>,
    _alerts: hotsync::ops::alert::Evaluator,
}

/// Binds `--metrics` (first, so a taken port is refused before anything starts).
fn bind_metrics(m: &Monitoring) -> anyhow::Result<Option<hotsync::ops::metrics::Bound>> {
    Ok(m.metrics
        .as_deref()
        .map(hotsync::ops::metrics::bind)
        .transpose()?)
}

fn start_monitoring(
    home: &std::path::Path,
    command: &str,
    metrics: Option<hotsync::ops::metrics::Bound>,
    control: Arc<dyn hotsync::ops::control::Control>,
    alerts: Arc<hotsync::ops::alert::Alerts>,
    view: Option<Arc<watching::WatchView>>,
) -> anyhow::Result<Observability> {
    let socket = hotsync::ops::control::listen(home, command, control.clone())?;
    tracing::debug!("control socket {}", socket.path().display());
    let metrics = match metrics {
        Some(bound) => {
            let s = bound.serve(control.clone())?;
            tracing::info!("metrics at http://{}/metrics", s.addr);
            Some(s)
        }
        None => None,
    };
    let on_fired = Box::new(move |f: &hotsync::ops::alert::Fired| match &view {
        Some(v) => v.alert(f),
        None => watching::log_alert(f),
    });
    let evaluator = hotsync::ops::alert::Evaluator::start(control, alerts, on_fired);
    Ok(Observability {
        _socket: socket,
        _metrics: metrics,
        _alerts: evaluator,
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
        xattrs: hotsync::model::xattrs::Policy::wanted(c.fidelity.no_xattrs, c.fidelity.no_acls),
        ..SyncOptions::default()
    }
}

/// The standby a DEST argument names: a local directory, or a quic:// standby with its
/// pinned ID and our identity.
fn target(cli: &Cli, dest: &str, server_id: Option<&str>) -> anyhow::Result<Target> {
    if dest_kind(dest)? == DestKind::Local {
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

/// What the DEST argument `dest` names; a form hotsync does not reach (rsync's
/// `HOST:PATH`, another scheme, a `quic://` without its port) is an error saying what to
/// write instead, before anything is made.
fn dest_kind(dest: &str) -> anyhow::Result<DestKind> {
    DestKind::of(dest).map_err(|e| anyhow::anyhow!("DEST {e}"))
}

/// What each standby is called in reports: its config file name, else its address.
fn labels(names: &[Option<String>], targets: &[Target]) -> Vec<String> {
    targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            names
                .get(i)
                .cloned()
                .flatten()
                .unwrap_or_else(|| t.describe())
        })
        .collect()
}

/// The standbys DEST arguments name, each quic:// one with the next `--server-id`.
fn targets(cli: &Cli, dests: &[String], server_ids: &[String]) -> anyhow::Result<Vec<Target>> {
    let mut remote = 0;
    for d in dests {
        if dest_kind(d)? == DestKind::Quic {
            remote += 1;
        }
    }
    if remote > 0 && server_ids.len() != remote {
        bail!(
            "{remote} quic:// DEST(s) but {} --server-id: give one --server-id per quic:// DEST, \
             in the same order (run `hotsync id` on each standby)",
            server_ids.len()
        );
    }
    if remote == 0 && !server_ids.is_empty() {
        bail!("--server-id is only for a quic:// DEST, and no DEST is one");
    }
    let mut ids = server_ids.iter();
    let mut out: Vec<Target> = Vec::new();
    for d in dests {
        let id = if dest_kind(d)? == DestKind::Quic {
            ids.next().map(String::as_str)
        } else {
            None
        };
        let t = target(cli, d, id)?;
        if out.iter().any(|o| o.describe() == t.describe()) {
            bail!("the standby {} is given twice", t.describe());
        }
        out.push(t);
    }
    Ok(out)
}

fn sync(cli: &Cli, args: &SyncArgs) -> anyhow::Result<u8> {
    let c = &args.common;
    let opts = sync_options(c, args.dry_run);
    let src = args::tree_and_standbys("sync", &args.src, &args.dest)?;
    let targets = targets(cli, &args.dest, &c.server_id)?;
    if targets.len() > 1 {
        return sync_several(cli, args, src, &targets, &opts);
    }
    let target = &targets[0];
    let mut bars = Bars::new(cli, c.json || args.dry_run);
    if args.dry_run {
        bars = bars.streaming_plan(!c.json);
    }
    let outcome = hotsync::sync(src, target, &opts, &bars);
    bars.finished();
    let outcome = outcome?;
    let s = &outcome.summary;
    if args.dry_run && !c.json {
        // What a partial reconcile (a version 2 standby) planned whole; nothing otherwise.
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
    // A guard's refusal is fatal, and said on stderr whatever the output format.
    if let Some(why) = &s.refused {
        eprintln!("hotsync: {why}");
    }
    Ok(s.exit_code() as u8)
}

/// `sync SRC DEST1 DEST2 ...`: every standby at once, each on its own session, reported
/// one by one (a standby that fails does not stop the others). Exit: the worst of them.
fn sync_several(
    cli: &Cli,
    args: &SyncArgs,
    src: &std::path::Path,
    targets: &[Target],
    opts: &SyncOptions,
) -> anyhow::Result<u8> {
    let names = labels(&args.common.names, targets);
    let results: Vec<(String, hotsync::Result<hotsync::primary::sender::Outcome>)> =
        std::thread::scope(|s| {
            let handles: Vec<_> = targets
                .iter()
                .zip(names)
                .map(|(t, name)| {
                    s.spawn(move || {
                        let r = hotsync::sync(src, t, opts, &hotsync::model::progress::Silent);
                        (name, r)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("sync thread panicked"))
                .collect()
        });
    let mut code = 0u8;
    let mut out = Vec::new();
    for (name, r) in results {
        match r {
            Ok(o) => {
                let s = &o.summary;
                code = code.max(s.exit_code() as u8);
                if args.common.json {
                    let mut v = serde_json::to_value(s)?;
                    v["standby"] = name.clone().into();
                    out.push(v);
                } else {
                    if args.dry_run {
                        println!("{name}:");
                        print_plan(&o.plan);
                    }
                    for e in &s.errors {
                        eprintln!("hotsync: {name}: {}: {}", e.path, e.error);
                    }
                    if !cli.quiet {
                        println!("{name}: {}", summary_line(s));
                    }
                }
                if let Some(why) = &s.refused {
                    eprintln!("hotsync: {name}: {why}");
                }
            }
            Err(e) => {
                code = 2;
                if args.common.json {
                    out.push(serde_json::json!({"standby": name, "error": e.to_string()}));
                }
                eprintln!("hotsync: {name}: {e}");
            }
        }
    }
    if args.common.json {
        println!("{}", serde_json::json!({ "standbys": out }));
    }
    Ok(code)
}

fn watch(cli: &Cli, args: &WatchArgs) -> anyhow::Result<u8> {
    let c = &args.common;
    let src = args::tree_and_standbys("watch", &args.src, &args.dest)?;
    let targets = targets(cli, &args.dest, &c.server_id)?;
    let names = labels(&c.names, &targets);
    let opts = WatchOptions {
        sync: sync_options(c, false),
        batcher: hotsync::primary::replicate::batcher::Config {
            max_delay: args.max_delay,
            ..Default::default()
        },
        fallback_rescan: args.rescan_every,
        verify_every: args.verify_every,
        verify_rate: args.verify_rate.max(1) << 20,
        alerts: alert_config(&args.monitoring)?,
        quorum: args.quorum.map(|k| k as usize),
        sync_timeout: args.sync_timeout,
        names: names.clone(),
        consistency: args.consistency.into(),
    };
    let metrics = bind_metrics(&args.monitoring)?;
    let w = Arc::new(Watch::new(src, targets, opts)?);
    let shutdown = Arc::new(AtomicBool::new(false));
    signals::on_signal(shutdown.clone())?;
    let view = Arc::new(watching::WatchView::new(cli, c.json, names.len() > 1));
    let home = identity::home_dir(cli.home.as_deref())?;
    let monitor = start_monitoring(
        &home,
        "watch",
        metrics,
        w.clone(),
        w.alerts(),
        Some(view.clone()),
    )?;
    let result = std::thread::scope(|s| {
        if view.has_status_line() {
            s.spawn(|| {
                while !shutdown.load(Ordering::Relaxed) {
                    view.show(&w.status());
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
            });
        }
        let r = w.run(&shutdown, &*view);
        shutdown.store(true, Ordering::Relaxed);
        r
    });
    drop(monitor);
    view.finish();
    if let Err(hotsync::Error::Fenced(why)) = &result {
        // The last word before exit 2: the hook is told, and waited for.
        let f = hotsync::ops::alert::Fired {
            alert: "fenced",
            standby: names.join(" "),
            firing: true,
            value: "fenced".into(),
            message: why.clone(),
        };
        view.alert(&f);
        w.alerts().run_hook_and_wait(&f);
    }
    result?;
    tracing::info!("stopped");
    Ok(0)
}

fn verify(cli: &Cli, args: &VerifyArgs) -> anyhow::Result<u8> {
    args::tree_and_standbys("verify", &args.src, &args.dest)?;
    let targets = targets(cli, &args.dest, &args.server_id)?;
    if targets.len() == 1 {
        let (code, v) = verify_one(cli, args, &targets[0], false)?;
        if let Some(v) = v {
            println!("{v}");
        }
        return Ok(code);
    }
    // Several standbys: one after the other (each reads the whole source), each reported
    // under its name; a standby that cannot be reached does not stop the others.
    let mut code = 0u8;
    let mut out = Vec::new();
    for (t, name) in targets.iter().zip(labels(&args.names, &targets)) {
        if !args.json {
            println!("{name}:");
        }
        match verify_one(cli, args, t, true) {
            Ok((c, v)) => {
                code = code.max(c);
                if let Some(mut v) = v {
                    v["standby"] = name.into();
                    out.push(v);
                }
            }
            Err(e) => {
                code = 2;
                eprintln!("hotsync: {name}: {e:#}");
                out.push(serde_json::json!({"standby": name, "error": format!("{e:#}")}));
            }
        }
    }
    if args.json {
        println!("{}", serde_json::json!({ "standbys": out }));
    }
    Ok(code)
}

/// Verifies (and with `--repair`, repairs) one standby; its exit code, and its JSON when
/// `--json` (printed by the caller). `always` prints the report even when quiet.
fn verify_one(
    cli: &Cli,
    args: &VerifyArgs,
    target: &Target,
    always: bool,
) -> anyhow::Result<(u8, Option<serde_json::Value>)> {
    let src = args::tree_and_standbys("verify", &args.src, &args.dest)?;
    let xattrs =
        hotsync::model::xattrs::Policy::wanted(args.fidelity.no_xattrs, args.fidelity.no_acls);
    let check = || hotsync::verify(src, target, &args.exclude, xattrs);
    let before = check()?;
    if !args.repair || before.identical {
        if args.json {
            return Ok((
                before.exit_code() as u8,
                Some(serde_json::to_value(&before)?),
            ));
        } else if always || !cli.quiet || !before.identical {
            print_report(&before);
        }
        return Ok((before.exit_code() as u8, None));
    }
    // Repair through the normal sync path, comparing content, then prove the result.
    let opts = SyncOptions {
        checksum: true,
        excludes: args.exclude.clone(),
        xattrs,
        ..SyncOptions::default()
    };
    let repaired = hotsync::sync(src, target, &opts, &hotsync::model::progress::Silent)?;
    let after = check()?;
    // A repair whose deletions the guard refused is a refusal (exit 2), said on stderr.
    let code = match &repaired.summary.refused {
        Some(why) => {
            eprintln!("hotsync: {why}");
            2
        }
        None => after.exit_code() as u8,
    };
    if args.json {
        let mut v = serde_json::to_value(&after)?;
        v["before"] = serde_json::to_value(&before)?;
        v["repair"] = serde_json::to_value(&repaired.summary)?;
        return Ok((code, Some(v)));
    }
    println!("before repair:");
    print_report(&before);
    println!("repair: {}", summary_line(&repaired.summary));
    println!("after repair:");
    print_report(&after);
    Ok((code, None))
}
