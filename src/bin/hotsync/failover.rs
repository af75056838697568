//! `promote` (and `rejoin`): turning a standby into the primary and a former primary into
//! a standby. Through the running `serve` when there is one (it holds the tree and fences
//! its sessions), else on the tree directly.

use crate::args::{CheckArgs, Cli, PromoteArgs, RejoinArgs, RoleArg};
use hotsync::ops::control::{self, Request};
use hotsync::standby::rejoin::RejoinReport;
use hotsync::standby::{Access, PromoteReport, Standby};
use std::time::Duration;

/// How long `promote` and `rejoin` wait for another one holding the tree (Keepalived may
/// run its notify scripts twice at once).
const WAIT: Duration = Duration::from_secs(30);

pub fn promote(cli: &Cli, args: &PromoteArgs) -> anyhow::Result<u8> {
    hotsync::tree::operand::check_dir("--root", &args.root)?;
    let home = hotsync::transport::identity::home_dir(cli.home.as_deref())?;
    let report: PromoteReport = match control::find(&home, "serve", &args.root) {
        Some((socket, _)) => {
            let v =
                control::ask(&socket, &Request::Promote { force: args.force }).map_err(|e| {
                    anyhow::anyhow!("the serve of {} did not answer: {e}", args.root.display())
                })?;
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                anyhow::bail!("{e}");
            }
            serde_json::from_value(v)?
        }
        None => {
            let me = hotsync::transport::identity::load(&home).ok().map(|i| i.id);
            let standby = Standby::open_within(&args.root, Access::Write, WAIT)?;
            standby.promote(args.force, me)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_promotion(&report);
    }
    Ok(0)
}

fn print_promotion(r: &PromoteReport) {
    if r.already {
        println!("{} is already the primary, at epoch {}", r.tree, r.epoch);
        return;
    }
    println!(
        "promoted {} to primary at epoch {} (it followed {} in epoch {})",
        r.tree,
        r.epoch,
        r.previous_primary.as_deref().unwrap_or("a primary"),
        r.previous_epoch
    );
    let age = r
        .newest_change_age_seconds
        .map(|a| format!(", newest replicated change {a:.1} s old"))
        .unwrap_or_default();
    println!(
        "  last durable position {}:{}{age}",
        r.position.epoch, r.position.seq
    );
    match (
        r.primary_last_heard_seconds_ago,
        r.primary_last_lag_seconds,
        r.rpo_seconds,
    ) {
        (Some(ago), Some(lag), Some(rpo)) => println!(
            "  the old primary was last heard {ago:.1} s ago, with a lag of {lag:.3} s and {} \
             pending change(s) then: what it changed in the last {rpo:.1} s before this \
             promotion may be missing here (RPO)",
            r.primary_last_pending.unwrap_or(0)
        ),
        _ => println!("  the old primary was not connected when promoted"),
    }
    match (&r.consistent_point, r.consistent_point_age_seconds) {
        (Some(at), Some(age)) if r.consistent => println!(
            "  opened the consistent point of {} ({age:.1} s before the primary was last \
             heard{}): the tree is the primary's as it stood then",
            clock_of(at),
            if r.rolled_back > 0 {
                format!("; {} later change(s) rolled back", r.rolled_back)
            } else {
                String::new()
            }
        ),
        (Some(at), _) => println!(
            "  NOT at a consistent point: the last one was {}, and changes after it were \
             kept (each file as fresh as it got); an application may need its own recovery",
            clock_of(at)
        ),
        (None, _) => println!(
            "  NOT at a consistent point: the primary never told this standby of one (an \
             older hotsync?); an application may need its own recovery"
        ),
    }
    if r.fenced_sessions > 0 {
        println!(
            "  fenced {} session(s) of the old primary; it must `hotsync rejoin` before it \
             serves as a standby",
            r.fenced_sessions
        );
    }
}

/// The time of day of an RFC 3339 moment, to the millisecond ("14:02:11.381").
fn clock_of(rfc3339: &str) -> &str {
    rfc3339
        .split_once('T')
        .map_or(rfc3339, |(_, t)| t.trim_end_matches('Z'))
}

pub fn rejoin(cli: &Cli, args: &RejoinArgs) -> anyhow::Result<u8> {
    hotsync::tree::operand::check_dir("--root", &args.root)?;
    let home = hotsync::transport::identity::home_dir(cli.home.as_deref())?;
    let report: RejoinReport = match control::find(&home, "serve", &args.root) {
        Some((socket, _)) => {
            let req = Request::Rejoin {
                excludes: args.exclude.clone(),
                if_fenced: args.if_fenced,
            };
            let v = control::ask(&socket, &req).map_err(|e| {
                anyhow::anyhow!("the serve of {} did not answer: {e}", args.root.display())
            })?;
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                anyhow::bail!("{e}");
            }
            serde_json::from_value(v)?
        }
        None => Standby::open_within(&args.root, Access::Write, WAIT)?
            .rejoin(&args.exclude, args.if_fenced)?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(0);
    }
    if report.still_primary {
        println!(
            "{} is the primary of epoch {} and not fenced: left as it is (--if-fenced)",
            report.tree, report.epoch
        );
        return Ok(0);
    }
    if report.already {
        println!(
            "{} is already a standby (epoch {})",
            report.tree, report.epoch
        );
        return Ok(0);
    }
    println!(
        "{} is a standby now (it was the primary of epoch {}); run `hotsync serve --root {}` for \
         the new primary",
        report.tree,
        report.epoch,
        args.root.display()
    );
    if report.no_record {
        println!(
            "  it had no record of what its standby confirmed: every entry was kept aside, and \
             the new primary sends the whole tree"
        );
    }
    if report.diverged.is_empty() {
        println!("  nothing it wrote after its last acknowledged position was left unconfirmed");
    } else {
        println!(
            "  {} entr{} written after its last acknowledged position, kept in {}:",
            report.diverged.len(),
            if report.diverged.len() == 1 {
                "y"
            } else {
                "ies"
            },
            report.kept_in
        );
        for d in &report.diverged {
            println!(
                "    {} ({}, {} bytes, modified {})",
                d.path, d.kind, d.size, d.modified
            );
        }
    }
    for d in &report.changed_dirs {
        println!(
            "  directory {d} changed after that too: an entry deleted or renamed there comes back \
             from the new primary"
        );
    }
    Ok(0)
}

/// `check`: one line, exit 0 healthy or 1 not.
pub fn check(cli: &Cli, args: &CheckArgs) -> anyhow::Result<u8> {
    let home = hotsync::transport::identity::home_dir(cli.home.as_deref())?;
    let root = hotsync::tree::fsroot::Root::open(&args.root);
    let state = root.as_ref().ok().and_then(|r| {
        let area = hotsync::tree::reserved::Area::open_existing(r, &args.root).ok()??;
        area.read_state().map_err(|e| e.to_string()).transpose()
    });
    let state = match state {
        Some(Err(e)) => {
            println!("unhealthy: {e}");
            return Ok(1);
        }
        Some(Ok(st)) => Some(st),
        None => None,
    };
    let shown = args.root.display();
    let role = match (args.role, &state) {
        (RoleArg::Auto, Some(st)) if st.role == hotsync::model::epoch::Role::Primary => {
            RoleArg::Primary
        }
        (RoleArg::Auto, _) => RoleArg::Standby,
        (r, _) => r,
    };
    let usable = match (&root, role) {
        (Err(e), _) => Err(format!("cannot open {shown}: {e}")),
        (Ok(r), RoleArg::Primary) => match r.is_empty() {
            Ok(false) => Ok(()),
            Ok(true) => Err(format!("{shown} is empty (is a disk not mounted?)")),
            Err(e) => Err(format!("cannot list {shown}: {e}")),
        },
        (Ok(r), _) => rustix::fs::accessat(
            r.fd(),
            c".",
            rustix::fs::Access::WRITE_OK,
            rustix::fs::AtFlags::EACCESS,
        )
        .map_err(|e| format!("{shown} is not writable: {e}")),
    };
    let command = match role {
        RoleArg::Primary => "watch",
        _ => "serve",
    };
    let instance = control::find(&home, command, &args.root).map(|(_, i)| i);
    let facts = hotsync::ops::health::Facts {
        state: state.as_ref(),
        instance: instance.as_deref(),
        usable,
        max_lag: args.max_lag.as_secs_f64(),
    };
    let verdict = match args.role {
        RoleArg::Primary => hotsync::ops::health::primary(&facts),
        RoleArg::Standby => hotsync::ops::health::standby(&facts),
        RoleArg::Auto => hotsync::ops::health::current(&facts),
    };
    match verdict {
        Ok(why) => {
            println!("healthy: {why}");
            Ok(0)
        }
        Err(why) => {
            println!("unhealthy: {why}");
            Ok(1)
        }
    }
}
