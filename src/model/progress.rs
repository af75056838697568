//! Progress reporting as a trait, so the library never draws: the CLI plugs in indicatif
//! bars on a terminal, tests and pipes plug in nothing.

/// Receives progress from a running sync. Calls come from several threads.
pub trait Monitor: Sync {
    /// Entries found so far by the local scan.
    fn scanned(&self, _entries: u64) {}
    /// The plan is made: this many files and bytes will be sent.
    fn planned(&self, _files: u64, _bytes: u64) {}
    /// One file is durable on the standby.
    fn file_done(&self, _bytes: u64) {}
    /// The sync is over (successfully or not).
    fn finished(&self) {}
    /// Part of a dry run's plan, in the order it would run (deletions and directory
    /// attributes last). True when the monitor has shown it, so it need not be kept for the
    /// outcome: a dry run of a million changes then holds a part, not the whole plan.
    fn dry_run_part(&self, _part: &crate::model::plan::Plan) -> bool {
        false
    }
}

/// A monitor that ignores everything.
pub struct Silent;

impl Monitor for Silent {}
