//! `hotsync flush`: asks the running watch for a synchronous point and reports it.

use crate::args::{Cli, FlushArgs};
use anyhow::bail;
use hotsync::model::flush::FlushReport;
use hotsync::ops::control::{self, Request};
use std::time::Duration;

pub fn flush(cli: &Cli, args: &FlushArgs) -> anyhow::Result<u8> {
    let home = hotsync::transport::identity::home_dir(cli.home.as_deref())?;
    let socket = match &args.root {
        Some(root) => match control::find(&home, "watch", root) {
            Some((s, _)) => s,
            None => bail!(
                "no hotsync watch runs for {} (with the home {}): nothing to flush",
                root.display(),
                home.display()
            ),
        },
        None => {
            let mut all = control::find_all(&home, "watch");
            match all.len() {
                0 => bail!(
                    "no hotsync watch runs with the home {}: nothing to flush",
                    home.display()
                ),
                1 => all.remove(0).0,
                _ => bail!(
                    "{} watches run ({}): name one with --root",
                    all.len(),
                    all.iter()
                        .map(|(_, i)| i.tree.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    let req = Request::Flush {
        quorum: args.quorum.map(|k| k as usize),
        timeout_ms: args.timeout.as_millis() as u64,
    };
    // The watch answers at its timeout at the latest; a little more for the answer itself.
    let v = control::ask_within(&socket, &req, args.timeout + Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("the watch did not answer the flush: {e}"))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{e}");
    }
    let o: FlushReport = serde_json::from_value(v)?;
    if args.json {
        println!("{}", serde_json::to_string(&o)?);
    } else if !o.waited {
        eprintln!(
            "hotsync: not flushed: semi-synchronous replication is degraded (the quorum of {} \
             was not met within the watch's --sync-timeout); flushes wait again once it is back",
            o.quorum
        );
    } else if o.ok {
        if !cli.quiet {
            println!(
                "flushed: durable on {} of {} standby(s) (quorum {}) in {:.1} ms: {}",
                o.confirmed.len(),
                o.standbys,
                o.quorum,
                o.elapsed_ms,
                o.confirmed.join(", ")
            );
        }
    } else {
        let missing: Vec<String> = o
            .missing
            .iter()
            .map(|m| {
                if m.no_consistent_point {
                    format!(
                        "{} (durable, but no consistent point since: the tree kept changing)",
                        m.standby
                    )
                } else {
                    format!("{} (lag {:.1} s)", m.standby, m.lag_seconds)
                }
            })
            .collect();
        eprintln!(
            "hotsync: flush timed out after {:.1} s: durable on {} of {} standby(s), quorum {}; \
             not confirmed: {}",
            o.elapsed_ms / 1000.0,
            o.confirmed.len(),
            o.standbys,
            o.quorum,
            missing.join(", ")
        );
    }
    Ok(if o.ok { 0 } else { 1 })
}
