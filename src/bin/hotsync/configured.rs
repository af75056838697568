//! `--config FILE`: the file's settings, under what the command line gives. An option
//! given on the command line wins; one left at its default takes the file's value.

use crate::args::{Cli, Command, Common, Fidelity, Monitoring};
use clap::ArgMatches;
use clap::parser::ValueSource;
use hotsync::ops::config::{FileConfig, MonitorConfig};

/// Fills `cli` from its `--config` file, if it names one.
pub fn apply(cli: &mut Cli, matches: &ArgMatches) -> anyhow::Result<()> {
    let Some(path) = &cli.config else {
        return Ok(());
    };
    let cfg = hotsync::ops::config::load(path)?;
    if cli.home.is_none() {
        cli.home = cfg.home.clone();
    }
    let Some((_, m)) = matches.subcommand() else {
        return Ok(());
    };
    // Whether the command line itself gave `id`.
    let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    match &mut cli.command {
        Command::Watch(a) => {
            mirror(&cfg, &mut a.src, &mut a.dest, &mut a.common, &given);
            set(&mut a.max_delay, cfg.max_delay, given("max_delay"));
            set(&mut a.rescan_every, cfg.rescan_every, given("rescan_every"));
            set_opt(&mut a.verify_every, cfg.verify_every, given("verify_every"));
            set(&mut a.verify_rate, cfg.verify_rate, given("verify_rate"));
            set_opt(&mut a.quorum, cfg.quorum, given("quorum"));
            set_opt(&mut a.sync_timeout, cfg.sync_timeout, given("sync_timeout"));
            monitoring(&cfg.monitor, &mut a.monitoring, &given);
        }
        Command::Sync(a) => mirror(&cfg, &mut a.src, &mut a.dest, &mut a.common, &given),
        Command::Verify(a) => {
            a.names = standbys(&cfg, &mut a.src, &mut a.dest, &mut a.server_id, &given);
            if !given("exclude")
                && let Some(x) = &cfg.exclude
            {
                a.exclude = x.clone();
            }
            fidelity(&cfg, &mut a.fidelity, &given);
        }
        Command::Flush(a) if a.root.is_none() => a.root = cfg.source.clone(),
        // A former primary keeps what its watch excluded where it is.
        Command::Rejoin(a) if !given("exclude") => {
            if let Some(x) = &cfg.exclude {
                a.exclude = x.clone();
            }
        }
        Command::Serve(a) => {
            let Some(s) = &cfg.serve else {
                return Ok(());
            };
            if !given("root")
                && let Some(r) = &s.root
            {
                a.root = Some(r.clone());
            }
            if !given("listen")
                && let Some(l) = &s.listen
            {
                a.listen = l.clone();
            }
            if !given("allow") && !s.allow.is_empty() {
                a.allow = s.allow.clone();
            }
            if !given("consistency")
                && let Some(c) = s.consistency
            {
                a.consistency = match c {
                    hotsync::model::epoch::Consistency::Consistent => {
                        crate::args::ConsistencyArg::Consistent
                    }
                    hotsync::model::epoch::Consistency::Latest => {
                        crate::args::ConsistencyArg::Latest
                    }
                };
            }
            monitoring(&s.monitor, &mut a.monitoring, &given);
        }
        _ => {}
    }
    Ok(())
}

/// SRC, and the DESTs with their server IDs, when the command line gives none; the names
/// of the DESTs that came from the file.
fn standbys(
    cfg: &FileConfig,
    src: &mut Option<std::path::PathBuf>,
    dest: &mut Vec<String>,
    server_id: &mut Vec<String>,
    given: &dyn Fn(&str) -> bool,
) -> Vec<Option<String>> {
    if src.is_none() {
        *src = cfg.source.clone();
    }
    if !dest.is_empty() || given("dest") {
        return Vec::new();
    }
    *dest = cfg.standbys.iter().map(|s| s.address.clone()).collect();
    if !given("server_id") {
        *server_id = cfg
            .standbys
            .iter()
            .filter_map(|s| s.server_id.clone())
            .collect();
    }
    cfg.standbys.iter().map(|s| s.name.clone()).collect()
}

/// What `sync` and `watch` share: the tree, its standbys (and their names), and the
/// options of [`Common`].
fn mirror(
    cfg: &FileConfig,
    src: &mut Option<std::path::PathBuf>,
    dest: &mut Vec<String>,
    c: &mut Common,
    given: &dyn Fn(&str) -> bool,
) {
    c.names = standbys(cfg, src, dest, &mut c.server_id, given);
    common(cfg, c, given);
}

fn common(cfg: &FileConfig, c: &mut Common, given: &dyn Fn(&str) -> bool) {
    if !given("exclude")
        && let Some(x) = &cfg.exclude
    {
        c.exclude = x.clone();
    }
    set(&mut c.no_delete, cfg.no_delete, given("no_delete"));
    set(&mut c.checksum, cfg.checksum, given("checksum"));
    set(&mut c.max_delete, cfg.max_delete, given("max_delete"));
    fidelity(cfg, &mut c.fidelity, given);
}

fn fidelity(cfg: &FileConfig, f: &mut Fidelity, given: &dyn Fn(&str) -> bool) {
    set(&mut f.no_xattrs, cfg.no_xattrs, given("no_xattrs"));
    set(&mut f.no_acls, cfg.no_acls, given("no_acls"));
}

fn monitoring(cfg: &MonitorConfig, m: &mut Monitoring, given: &dyn Fn(&str) -> bool) {
    set_opt(&mut m.metrics, cfg.metrics.clone(), given("metrics"));
    set_opt(&mut m.alert_lag, cfg.alert_lag, given("alert_lag"));
    set_opt(&mut m.alert_free, cfg.alert_free, given("alert_free"));
    set(
        &mut m.consistency_window,
        cfg.consistency_window,
        given("consistency_window"),
    );
    set_opt(&mut m.on_alert, cfg.on_alert.clone(), given("on_alert"));
}

fn set<T>(slot: &mut T, from_file: Option<T>, given: bool) {
    if let (Some(v), false) = (from_file, given) {
        *slot = v;
    }
}

fn set_opt<T>(slot: &mut Option<T>, from_file: Option<T>, given: bool) {
    if let (Some(v), false) = (from_file, given) {
        *slot = Some(v);
    }
}
