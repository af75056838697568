//! The configuration file (`--config FILE`, TOML): the tree, its standbys, and a key for
//! every command-line option, spelled as the option is (`max-delay = "2s"`). Values are
//! checked here, and a bad one is an error naming the file, the line and the key; an
//! unknown key is one too. The command line overrides the file.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// One standby, as `[[standby]]` gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct StandbyConfig {
    /// What `status`, metrics and events call it (default: its address).
    pub name: Option<String>,
    /// A local directory, or `quic://HOST:PORT`.
    pub address: String,
    pub server_id: Option<String>,
}

/// Monitoring options, on the top level (for `watch`) or in `[serve]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MonitorConfig {
    pub metrics: Option<String>,
    pub alert_lag: Option<Duration>,
    pub alert_free: Option<f64>,
    pub consistency_window: Option<Duration>,
    pub on_alert: Option<String>,
}

/// `[serve]`: the standby side of this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServeConfig {
    pub root: Option<PathBuf>,
    pub listen: Option<String>,
    pub allow: Vec<String>,
    /// What a promotion gives back (`consistency = "consistent"` or `"latest"`).
    pub consistency: Option<crate::model::epoch::Consistency>,
    pub monitor: MonitorConfig,
}

/// A configuration file, checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileConfig {
    pub home: Option<PathBuf>,
    /// The primary's tree (SRC of `watch`, `sync`, `verify`; `--root` of `flush`).
    pub source: Option<PathBuf>,
    pub standbys: Vec<StandbyConfig>,
    pub exclude: Option<Vec<String>>,
    pub no_delete: Option<bool>,
    pub checksum: Option<bool>,
    pub no_xattrs: Option<bool>,
    pub no_acls: Option<bool>,
    pub max_delete: Option<u32>,
    pub max_delay: Option<Duration>,
    pub rescan_every: Option<Duration>,
    pub verify_every: Option<Duration>,
    pub verify_rate: Option<u64>,
    pub quorum: Option<u64>,
    pub sync_timeout: Option<Duration>,
    pub monitor: MonitorConfig,
    pub serve: Option<ServeConfig>,
}

/// The monitoring keys, as the top level and `[serve]` both have them (serde's flatten
/// would lose the spans that name a bad value's line).
struct RawMonitor {
    metrics: Option<Spanned<String>>,
    alert_lag: Option<Spanned<String>>,
    alert_free: Option<Spanned<f64>>,
    consistency_window: Option<Spanned<String>>,
    on_alert: Option<Spanned<String>>,
}

macro_rules! monitor_of {
    ($r:expr) => {
        RawMonitor {
            metrics: $r.metrics,
            alert_lag: $r.alert_lag,
            alert_free: $r.alert_free,
            consistency_window: $r.consistency_window,
            on_alert: $r.on_alert,
        }
    };
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    home: Option<String>,
    source: Option<String>,
    #[serde(default)]
    standby: Vec<RawStandby>,
    exclude: Option<Vec<String>>,
    no_delete: Option<bool>,
    checksum: Option<bool>,
    no_xattrs: Option<bool>,
    no_acls: Option<bool>,
    max_delete: Option<Spanned<i64>>,
    max_delay: Option<Spanned<String>>,
    rescan_every: Option<Spanned<String>>,
    verify_every: Option<Spanned<String>>,
    verify_rate: Option<Spanned<i64>>,
    quorum: Option<Spanned<i64>>,
    sync_timeout: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    alert_lag: Option<Spanned<String>>,
    alert_free: Option<Spanned<f64>>,
    consistency_window: Option<Spanned<String>>,
    on_alert: Option<Spanned<String>>,
    serve: Option<RawServe>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawStandby {
    name: Option<String>,
    address: Spanned<String>,
    server_id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawServe {
    root: Option<String>,
    listen: Option<String>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    consistency: Option<crate::model::epoch::Consistency>,
    metrics: Option<Spanned<String>>,
    alert_lag: Option<Spanned<String>>,
    alert_free: Option<Spanned<f64>>,
    consistency_window: Option<Spanned<String>>,
    on_alert: Option<Spanned<String>>,
}

/// Parses `250ms`, `2s`, `5m`, `1h` (a bare number is seconds).
///
/// # Errors
/// What is wrong with it, in words.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("bad duration {s:?}: expected a number and a unit, like 500ms or 2s")
    })?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "bad duration {s:?}: the unit must be ms, s, m or h"
            ));
        }
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a percentage, 0 to 100 (a trailing `%` is allowed).
///
/// # Errors
/// What is wrong with it, in words.
pub fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("bad percentage {s:?}: expected a number from 0 to 100"))?;
    check_percent(v)
}

fn check_percent(v: f64) -> std::result::Result<f64, String> {
    if !(0.0..=100.0).contains(&v) {
        return Err(format!(
            "bad percentage {v}: expected a number from 0 to 100"
        ));
    }
    Ok(v)
}

/// Reads and checks the configuration file at `path`.
///
/// # Errors
/// [`Error::Usage`]: the file cannot be read, is not TOML, has an unknown key, or a bad
/// value; the message names the file, the line and the key.
pub fn load(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Usage(format!(
            "cannot read the config file {}: {e}",
            path.display()
        ))
    })?;
    parse(&text, path)
}

/// Checks the configuration `text`, read from `path` (relative paths in it are taken
/// from the file's directory).
///
/// # Errors
/// As [`load`].
pub(crate) fn parse(text: &str, path: &Path) -> Result<FileConfig> {
    let shown = path.display().to_string();
    let at = |span: Option<Range<usize>>, msg: &str| {
        let line = span.map_or(0, |s| line_of(text, s.start));
        Error::Usage(format!("{shown}:{line}: {msg}"))
    };
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let first = e
            .message()
            .lines()
            .next()
            .unwrap_or("not valid TOML")
            .to_string();
        at(e.span(), &first)
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { dir.join(p) }
    };
    let duration = |key: &str, v: Option<Spanned<String>>| -> Result<Option<Duration>> {
        v.map(|v| {
            parse_duration(v.get_ref()).map_err(|e| at(Some(v.span()), &format!("{key}: {e}")))
        })
        .transpose()
    };
    let ranged = |key: &str, v: Option<Spanned<i64>>, lo: i64, hi: i64| -> Result<Option<u64>> {
        v.map(|v| {
            let n = *v.get_ref();
            if (lo..=hi).contains(&n) {
                Ok(n as u64)
            } else {
                Err(at(
                    Some(v.span()),
                    &format!("{key}: {n} is out of range: give {lo} to {hi}"),
                ))
            }
        })
        .transpose()
    };
    let monitor = |m: RawMonitor| -> Result<MonitorConfig> {
        Ok(MonitorConfig {
            metrics: m.metrics.map(Spanned::into_inner),
            alert_lag: duration("alert-lag", m.alert_lag)?,
            consistency_window: duration("consistency-window", m.consistency_window)?,
            alert_free: m
                .alert_free
                .map(|v| {
                    check_percent(*v.get_ref())
                        .map_err(|e| at(Some(v.span()), &format!("alert-free: {e}")))
                })
                .transpose()?,
            on_alert: m
                .on_alert
                .map(|v| {
                    crate::ops::alert::AlertConfig::parse_hook(v.get_ref())
                        .map(|_| v.get_ref().clone())
                        .map_err(|e| at(Some(v.span()), &format!("on-alert: {e}")))
                })
                .transpose()?,
        })
    };
    let mut standbys = Vec::new();
    for s in raw.standby {
        let remote = crate::transport::dest::DestKind::of(s.address.get_ref())
            .map_err(|e| at(Some(s.address.span()), &format!("address: {e}")))?
            == crate::transport::dest::DestKind::Quic;
        if let Some(id) = &s.server_id {
            crate::transport::identity::NodeId::parse(id.get_ref())
                .map_err(|e| at(Some(id.span()), &format!("server-id: {e}")))?;
            if !remote {
                return Err(at(
                    Some(id.span()),
                    "server-id: only a quic:// address has one",
                ));
            }
        } else if remote {
            return Err(at(
                Some(s.address.span()),
                "address: a quic:// standby needs its server-id (run `hotsync id` there)",
            ));
        }
        let address = if remote {
            s.address.into_inner()
        } else {
            resolve(s.address.into_inner()).display().to_string()
        };
        standbys.push(StandbyConfig {
            name: s.name,
            address,
            server_id: s.server_id.map(Spanned::into_inner),
        });
    }
    let top = monitor(monitor_of!(raw))?;
    let serve = raw
        .serve
        .map(|s| -> Result<ServeConfig> {
            for a in &s.allow {
                crate::transport::identity::NodeId::parse(a.get_ref())
                    .map_err(|e| at(Some(a.span()), &format!("allow: {e}")))?;
            }
            Ok(ServeConfig {
                root: s.root.map(resolve),
                listen: s.listen,
                consistency: s.consistency,
                monitor: monitor(monitor_of!(s))?,
                allow: s.allow.into_iter().map(Spanned::into_inner).collect(),
            })
        })
        .transpose()?;
    Ok(FileConfig {
        home: raw.home.map(resolve),
        source: raw.source.map(resolve),
        standbys,
        exclude: raw.exclude,
        no_delete: raw.no_delete,
        checksum: raw.checksum,
        no_xattrs: raw.no_xattrs,
        no_acls: raw.no_acls,
        max_delete: ranged("max-delete", raw.max_delete, 0, 100)?.map(|v| v as u32),
        max_delay: duration("max-delay", raw.max_delay)?,
        rescan_every: duration("rescan-every", raw.rescan_every)?,
        verify_every: duration("verify-every", raw.verify_every)?,
        verify_rate: ranged("verify-rate", raw.verify_rate, 1, 1 << 20)?,
        quorum: ranged("quorum", raw.quorum, 1, 1 << 16)?,
        sync_timeout: duration("sync-timeout", raw.sync_timeout)?,
        monitor: top,
        serve,
    })
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "QGK73UYEF6JVL-YSIVEEXAKMGSM-NAWE52QEODSQD-QEBPRAEN5WAQQ";

    fn parse_at(text: &str) -> Result<FileConfig> {
        parse(text, Path::new("/etc/hotsync/hotsync.toml"))
    }

    fn err(text: &str) -> String {
        parse_at(text).unwrap_err().to_string()
    }

    #[test]
    fn a_full_file_is_read_into_typed_values() {
        let text = format!(
            "home = \"/etc/hotsync\"\n\
             source = \"data\"\n\
             exclude = [\"*.tmp\", \"cache/\"]\n\
             max-delay = \"100ms\"\n\
             verify-every = \"1h\"\n\
             quorum = 1\n\
             no-acls = true\n\
             sync-timeout = \"2s\"\n\
             metrics = \"127.0.0.1:9478\"\n\
             alert-lag = \"30s\"\n\
             alert-free = 10\n\
             consistency-window = \"5s\"\n\
             on-alert = \"/usr/local/bin/page me\"\n\
             \n\
             [[standby]]\n\
             name = \"rack\"\n\
             address = \"quic://10.0.0.2:7878\"\n\
             server-id = \"{ID}\"\n\
             \n\
             [[standby]]\n\
             address = \"/backup/data\"\n\
             \n\
             [serve]\n\
             root = \"/srv/standby\"\n\
             consistency = \"consistent\"\n\
             allow = [\"{ID}\"]\n"
        );
        let c = parse_at(&text).unwrap();
        assert_eq!(c.source, Some(PathBuf::from("/etc/hotsync/data")));
        assert_eq!(c.max_delay, Some(Duration::from_millis(100)));
        assert_eq!(c.verify_every, Some(Duration::from_secs(3600)));
        assert_eq!(
            (c.quorum, c.sync_timeout),
            (Some(1), Some(Duration::from_secs(2)))
        );
        assert_eq!(c.monitor.alert_free, Some(10.0));
        assert_eq!(c.monitor.consistency_window, Some(Duration::from_secs(5)));
        assert_eq!((c.no_xattrs, c.no_acls), (None, Some(true)));
        assert_eq!(c.standbys.len(), 2);
        assert_eq!(c.standbys[0].name.as_deref(), Some("rack"));
        assert_eq!(c.standbys[1].address, "/backup/data");
        let s = c.serve.unwrap();
        assert_eq!(s.root, Some(PathBuf::from("/srv/standby")));
        assert_eq!(s.allow, vec![ID.to_string()]);
        assert_eq!(
            s.consistency,
            Some(crate::model::epoch::Consistency::Consistent)
        );
    }

    #[test]
    fn a_bad_value_names_the_file_the_line_and_the_key() {
        assert_eq!(
            err("source = \"/d\"\n\nmax-delay = \"5x\"\n"),
            "bad arguments: /etc/hotsync/hotsync.toml:3: max-delay: bad duration \"5x\": the \
             unit must be ms, s, m or h"
                .replace("bad arguments: ", &usage_prefix())
        );
        let e = err("quorum = 0\n");
        assert!(
            e.contains("hotsync.toml:1: quorum: 0 is out of range"),
            "{e}"
        );
        let e = err("alert-free = 150.0\n");
        assert!(e.contains(":1: alert-free: bad percentage 150"), "{e}");
        let e = err("[[standby]]\naddress = \"quic://h:1\"\n");
        assert!(
            e.contains(":2: address: a quic:// standby needs its server-id"),
            "{e}"
        );
        let e = err("[[standby]]\naddress = \"quic://h:1\"\nserver-id = \"nope\"\n");
        assert!(e.contains(":3: server-id: "), "{e}");
        let e = err("[serve]\nallow = [\"nope\"]\n");
        assert!(e.contains(":2: allow: "), "{e}");
        // A standby address hotsync does not reach is refused, not taken for a directory.
        let e = err("[[standby]]\nname = \"s\"\naddress = \"standby:copy\"\n");
        assert!(
            e.contains(":3: address: standby:copy looks like rsync's HOST:PATH")
                && e.contains("./standby:copy"),
            "{e}"
        );
        let e = err("[[standby]]\naddress = \"tcp://standby:7878\"\n");
        assert!(
            e.contains(":2: address: tcp://standby:7878: the tcp://"),
            "{e}"
        );
        let e = err("[[standby]]\naddress = \"quic://standby\"\nserver-id = \"x\"\n");
        assert!(e.contains(":2: address: quic://standby has no port"), "{e}");
        let c = parse_at("[[standby]]\naddress = \"./standby:copy\"\n").unwrap();
        assert_eq!(c.standbys[0].address, "/etc/hotsync/./standby:copy");
    }

    #[test]
    fn an_unknown_key_or_a_wrong_type_is_an_error_with_its_line() {
        let e = err("source = \"/d\"\nmax-dleay = \"1s\"\n");
        assert!(
            e.contains("hotsync.toml:2: unknown field `max-dleay`"),
            "{e}"
        );
        let e = err("[serve]\nroot = \"/x\"\nport = 1\n");
        assert!(e.contains(":3: unknown field `port`"), "{e}");
        let e = err("checksum = \"yes\"\n");
        assert!(e.contains(":1: "), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        let e = err("source = \n");
        assert!(e.contains(":1: "), "{e}");
    }

    #[test]
    fn the_shipped_example_is_valid_once_its_ids_are_filled_in() {
        let text = include_str!("../../examples/hotsync.toml");
        let text = ["RACK-STANDBY", "DR-STANDBY", "PRIMARY"]
            .iter()
            .fold(text.to_string(), |t, who| {
                t.replace(&format!("REPLACE-WITH-THE-{who}-ID"), ID)
            });
        let c = parse_at(&text).unwrap();
        assert_eq!(c.standbys.len(), 2);
        assert_eq!(c.standbys[1].name.as_deref(), Some("dr-site"));
        assert_eq!(c.quorum, Some(1));
        assert_eq!(c.monitor.metrics.as_deref(), Some("127.0.0.1:9478"));
        assert!(c.serve.is_some());
    }

    fn usage_prefix() -> String {
        Error::Usage(String::new()).to_string()
    }
}
