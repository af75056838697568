//! What a reconcile reports beside its operations' outcomes: the entries it does not
//! mirror, the primary's read errors, and what a dry run would have done.

use crate::model::manifest::Skipped;
use crate::model::manifest::{ScanError, Special};
use crate::model::path::RelPath;
use crate::model::plan::Plan;
use crate::model::summary::{EntryError, Summary};
use std::collections::HashSet;
use std::sync::Mutex;

/// Records what the primary holds that is not mirrored (special files, names reserved for
/// hotsync), each with a warning once, and its read errors.
pub(super) fn note_problems(
    summary: &mut Summary,
    specials: &[Special],
    skipped: &[Skipped],
    errors: &[ScanError],
) {
    let not_mirrored = specials
        .iter()
        .map(|s| (&s.path, s.reason()))
        .chain(skipped.iter().map(|s| (&s.path, s.reason())));
    for (path, why) in not_mirrored {
        say_once(path, &format!("{path}: {why}"));
        summary.skipped.push(EntryError::new(path, why));
    }
    for e in errors {
        summary
            .errors
            .push(EntryError::new(&e.path, e.error.clone()));
    }
}

/// Warns of `path` once in this process: a watch reconciles the same unmirrored entry
/// again and again, and says so the first time (status and every `--json` list it).
fn say_once(path: &RelPath, message: &str) {
    static SAID: Mutex<Option<HashSet<RelPath>>> = Mutex::new(None);
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    let said = said.get_or_insert_with(Default::default);
    // Bounded: past this many, each is said again rather than remembered.
    if said.contains(path) {
        return;
    }
    if said.len() < 100_000 {
        said.insert(path.clone());
    }
    tracing::warn!("{message}");
}

/// Adds to `s` what carrying out `part` would add, operation by operation, as the real run's
/// acknowledgements count it (a dry run's summary). Removals are counted by the caller, in
/// standby entries.
pub(super) fn count_planned(s: &mut Summary, part: &Plan) {
    s.files_transferred += part.transfers.len() as u64;
    s.dirs_created += part.mkdirs.len() as u64;
    s.symlinks_written += part.symlinks.len() as u64;
    s.metadata_updated += (part.metas.len() + part.dir_metas.len()) as u64;
    s.hard_links_made += part.links.len() as u64;
}
