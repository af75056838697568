//! Command-line arguments (parsing and validation only; the work is in the library).

use clap::{Args, Parser, Subcommand};
use hotsync::ops::config::{parse_duration, parse_percent};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "hotsync",
    version,
    about = "Keep a standby copy of a directory tree identical to the primary's",
    after_help = "DEST is a local directory, or quic://HOST:PORT with --server-id ID\n\
                  (a local directory with a colon in its first name: ./NAME).\n\
                  Exit codes: 0 success, 1 some entries failed or differ, 2 fatal."
)]
pub struct Cli {
    /// Identity and state directory (default: $HOTSYNC_HOME, $XDG_CONFIG_HOME/hotsync, ~/.config/hotsync)
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Read settings from this TOML file (see examples/hotsync.toml); the command line
    /// overrides it
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Only print errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More output (-v: progress on a pipe and info logs, -vv: debug logs)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create this node's identity (key and self-signed certificate) in the home directory
    Keygen,
    /// Print this node's ID (its certificate fingerprint)
    Id,
    /// Run the standby receiver
    Serve(ServeArgs),
    /// Mirror SRC to DEST once, then exit
    Sync(SyncArgs),
    /// Mirror SRC to DEST, then keep replicating every change
    Watch(WatchArgs),
    /// Compare SRC and DEST and report every difference
    Verify(VerifyArgs),
    /// Show the health of the watch and serve processes running on this node
    Status(StatusArgs),
    /// Wait until every change made on the primary before now is durable on the standbys
    Flush(FlushArgs),
    /// Turn this standby into the primary: a new epoch, the old primary fenced
    Promote(PromoteArgs),
    /// Turn a former primary into a standby, keeping what it wrote since its last
    /// acknowledged position under .hotsync/diverged
    Rejoin(RejoinArgs),
    /// Exit 0 when this node is healthy in a role (for Keepalived's vrrp_script)
    Check(CheckArgs),
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleArg {
    /// Healthy as the primary, replicating within the lag limit
    Primary,
    /// Healthy as a standby: current, or fit to be promoted
    Standby,
    /// Fit for the role the tree records now, as Keepalived needs it (a primary's
    /// standbys do not count)
    Auto,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The role to check this node for
    #[arg(long, value_enum)]
    pub role: RoleArg,
    /// The tree (the watch's SRC, or the serve's --root)
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// The largest lag that is still healthy
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub max_lag: std::time::Duration,
}

#[derive(Args, Debug)]
pub struct RejoinArgs {
    /// The former primary's tree (it then runs `serve --root DIR`)
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Leave entries matching GLOB where they are (the new primary's --exclude patterns)
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Only if the tree is fenced (it met a newer epoch); a primary that is not is left as
    /// it is. For Keepalived's notify_backup, which also runs on the rightful primary
    #[arg(long)]
    pub if_fenced: bool,
    /// Print one JSON object on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// The standby tree (the --root of its serve)
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Promote even while the primary still heartbeats (it is fenced at once)
    #[arg(long)]
    pub force: bool,
    /// Print one JSON object on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FlushArgs {
    /// The watch's SRC (needed only when several watches run with this home)
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Give up after DURATION, naming the standbys that did not confirm (exit 1)
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
    /// How many standbys must have the changes (default: all of the watch's)
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub quorum: Option<u64>,
    /// Print one JSON object on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print one JSON object on stdout
    #[arg(long)]
    pub json: bool,
}

/// Monitoring and alerting, for `watch` and `serve`.
#[derive(Args, Debug, Clone)]
pub struct Monitoring {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9478)
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// Alert when the replication lag exceeds DURATION (e.g. 30s)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub alert_lag: Option<std::time::Duration>,
    /// Alert when the standby's free space (bytes or inodes) falls below PERCENT
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub alert_free: Option<f64>,
    /// Alert when a standby's last consistent point is older than DURATION while the tree
    /// has changed since (what a consistent failover would lose); 0 turns it off
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub consistency_window: std::time::Duration,
    /// Run this program when an alert fires and when it clears (no shell: the program and
    /// its arguments, split on spaces; HOTSYNC_ALERT, HOTSYNC_STATE, HOTSYNC_VALUE and
    /// HOTSYNC_STANDBY in its environment)
    #[arg(long, value_name = "CMD")]
    pub on_alert: Option<String>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The standby tree (or `root` in the config file's [serve])
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Address to listen on
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:7878")]
    pub listen: String,
    /// A primary ID allowed to connect (repeatable)
    #[arg(long, value_name = "ID")]
    pub allow: Vec<String>,
    /// Print one JSON object per event on stdout (the first says where it listens)
    #[arg(long)]
    pub json: bool,
    /// What a promotion gives back when the primary died between consistent points:
    /// `consistent`, the last consistent point (later changes are kept in an undo log and
    /// rolled back), or `latest`, each file as fresh as it got (no undo log)
    #[arg(long, value_enum, default_value = "consistent")]
    pub consistency: ConsistencyArg,
    #[command(flatten)]
    pub monitoring: Monitoring,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsistencyArg {
    /// The last consistent point: the tree as the primary's stood at one instant
    Consistent,
    /// Each file as fresh as it got, the tree said to be inconsistent
    Latest,
}

impl From<ConsistencyArg> for hotsync::model::epoch::Consistency {
    fn from(c: ConsistencyArg) -> Self {
        match c {
            ConsistencyArg::Consistent => hotsync::model::epoch::Consistency::Consistent,
            ConsistencyArg::Latest => hotsync::model::epoch::Consistency::Latest,
        }
    }
}

/// SRC and DEST, from the command line or the config file.
pub fn tree_and_standbys<'a>(
    command: &str,
    src: &'a Option<PathBuf>,
    dest: &[String],
) -> anyhow::Result<&'a Path> {
    let Some(src) = src else {
        anyhow::bail!(
            "{command} needs SRC and a DEST: give them, or `source` and [[standby]] in a --config file"
        );
    };
    if dest.is_empty() {
        anyhow::bail!(
            "{command} needs at least one DEST after SRC (or [[standby]] in a --config file)"
        );
    }
    Ok(src)
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Leave out paths matching GLOB (repeatable; rsync-style: no '/' matches a name anywhere)
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Keep entries on the standby that the primary does not have
    #[arg(long)]
    pub no_delete: bool,
    /// Compare file content by blake3 instead of size and modification time
    #[arg(long)]
    pub checksum: bool,
    /// Override the safety guards (empty source, mass deletion)
    #[arg(long)]
    pub force: bool,
    /// Print JSON on stdout: a summary (sync), one object per event (watch)
    #[arg(long)]
    pub json: bool,
    /// The standby's pinned ID (required for a quic:// DEST; with several, one per quic://
    /// DEST, in the same order)
    #[arg(long, value_name = "ID")]
    pub server_id: Vec<String>,
    /// The standbys' names from the config file (their label in reports, status and
    /// metrics).
    #[arg(skip)]
    pub names: Vec<Option<String>>,
    /// Refuse to remove more than this percentage of the standby's entries (unless --force)
    #[arg(long, value_name = "PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_delete: u32,
    #[command(flatten)]
    pub fidelity: Fidelity,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The primary's tree (or `source` in the config file)
    pub src: Option<PathBuf>,
    /// The standbys: local directories, or quic://HOST:PORT (each with its --server-id; or
    /// the config file's [[standby]] tables)
    #[arg(num_args = 0..)]
    pub dest: Vec<String>,
    #[command(flatten)]
    pub common: Common,
    /// Print what would be done, change nothing
    #[arg(short = 'n', long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The primary's tree (or `source` in the config file)
    pub src: Option<PathBuf>,
    /// The standbys: local directories, or quic://HOST:PORT (each with its --server-id; or
    /// the config file's [[standby]] tables)
    #[arg(num_args = 0..)]
    pub dest: Vec<String>,
    #[command(flatten)]
    pub common: Common,
    /// Longest a file that keeps changing waits before it is replicated (e.g. 500ms, 2s)
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub max_delay: std::time::Duration,
    /// How often to re-scan the whole tree when the inotify watch limit leaves parts of it
    /// unwatched
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub rescan_every: std::time::Duration,
    /// Verify the whole standby this often (e.g. 1h), in the background, and repair what
    /// it finds
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub verify_every: Option<std::time::Duration>,
    /// How fast the background verify may read, on each side, in MiB/s
    #[arg(long, value_name = "MIB_S", default_value_t = 64)]
    pub verify_rate: u64,
    /// How many standbys `hotsync flush` waits for by default (default: all)
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub quorum: Option<u64>,
    /// Semi-synchronous: a flush waits at most DURATION for the quorum; past that the watch
    /// is degraded (alert `sync`) and flushes do not wait until the quorum is back
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub sync_timeout: Option<std::time::Duration>,
    /// What a promotion of a local DEST gives back, as `serve --consistency` for a remote
    /// one: the last consistent point, or each file as fresh as it got
    #[arg(long, value_enum, default_value = "consistent")]
    pub consistency: ConsistencyArg,
    #[command(flatten)]
    pub monitoring: Monitoring,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The primary's tree (or `source` in the config file)
    pub src: Option<PathBuf>,
    /// The standbys: local directories, or quic://HOST:PORT (each with its --server-id; or
    /// the config file's [[standby]] tables)
    #[arg(num_args = 0..)]
    pub dest: Vec<String>,
    /// Fix every difference from the primary, then verify again
    #[arg(long)]
    pub repair: bool,
    /// Print a JSON report on stdout
    #[arg(long)]
    pub json: bool,
    /// The standby's pinned ID (required for a quic:// DEST; with several, one per quic://
    /// DEST, in the same order)
    #[arg(long, value_name = "ID")]
    pub server_id: Vec<String>,
    /// The standbys' names from the config file.
    #[arg(skip)]
    pub names: Vec<Option<String>>,
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    #[command(flatten)]
    pub fidelity: Fidelity,
}

/// What metadata beyond mode, owner and times the mirror carries.
#[derive(Args, Debug, Clone, Copy)]
pub struct Fidelity {
    /// Leave extended attributes alone (user.*, trusted.*, security.*: file capabilities,
    /// SELinux labels), as rsync does without -X
    #[arg(long)]
    pub no_xattrs: bool,
    /// Leave POSIX ACLs alone, as rsync does without -A
    #[arg(long)]
    pub no_acls: bool,
}
