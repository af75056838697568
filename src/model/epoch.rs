//! Roles and epochs of a tree, as pure rules. Each tree keeps a [`TreeState`] in
//! `.hotsync/state`: whether this node is the tree's primary or a standby, the epoch (one
//! more at every promotion), and the history of epochs with the position last acknowledged
//! in each. From these follow who may write whom (`admit`), what a promotion and a rejoin
//! record, and which files a former primary changed after its standby last confirmed
//! them (`Divergence`).

use crate::error::{Error, ErrorCode, Result};
use serde::{Deserialize, Serialize};

/// A position in the primary's sequence of changes: batch `seq` of `epoch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub seq: u64,
}

/// The role a node has for a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
}

/// One epoch in a tree's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochRecord {
    pub epoch: u64,
    /// The primary of that epoch: its ID, or `None` for an in-process primary (a local DEST)
    /// or one not yet known.
    pub primary: Option<String>,
    /// When this tree entered the epoch (RFC 3339, this node's clock).
    pub started: String,
    /// The last position acknowledged durable in that epoch, as this tree knows it.
    pub last_acked: Option<Position>,
    /// This tree was that epoch's primary and was rejoined: its writes there were set aside
    /// (`.hotsync/diverged`), so another primary of the same epoch may write it (the
    /// operator named this side to discard, ending a split brain).
    #[serde(default)]
    pub discarded: bool,
}

/// How this tree's primary was fenced: a newer epoch took over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fence {
    /// When (RFC 3339, this node's clock).
    pub at: String,
    pub reason: String,
}

/// The durable state of a tree, `.hotsync/state` (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeState {
    /// The file's format; another one is refused rather than misread.
    pub format: u32,
    pub role: Role,
    /// Grows by one at every promotion; a fresh tree is at epoch 1.
    pub epoch: u64,
    /// Every epoch this tree has been in, oldest first; the last is the current one.
    pub history: Vec<EpochRecord>,
    /// A standby: the last position durable here. A primary: the last its standby
    /// acknowledged.
    pub position: Position,
    /// A primary: every change this node saw before this moment (its own clock, Unix
    /// milliseconds) is durable on its standby.
    pub acked_before_ms: Option<u64>,
    /// A primary that a newer epoch took over: it must not write again before `rejoin`.
    pub fenced: Option<Fence>,
    /// A standby: the last consistent point it holds (DESIGN §10), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent: Option<ConsistentPoint>,
    /// When this was written (RFC 3339).
    pub updated: String,
}

/// A consistent point: the standby's tree was the primary's tree as it stood at `at_ms`
/// (the primary's clock, Unix milliseconds), once batch `position` was durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistentPoint {
    pub position: Position,
    pub at_ms: u64,
}

/// What a standby gives after a failover when its primary died between consistent points.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// The last consistent point: every change after it is kept in an undo log on the
    /// standby and rolled back at `promote`. The default: after a failover an operator
    /// needs the application to start (a database that opens, a repository that checks),
    /// even a moment older, more than every file at its freshest and the whole broken.
    #[default]
    Consistent,
    /// Each file as fresh as it got (no undo log); the tree is said to be inconsistent
    /// when changes came after the last consistent point.
    Latest,
}

/// The state file format this build writes and reads.
pub(crate) const STATE_FORMAT: u32 = 1;

impl TreeState {
    /// A tree hotsync has not written yet: epoch 1 in `role`.
    pub(crate) fn fresh(role: Role, primary: Option<String>) -> TreeState {
        let now = crate::model::clock::now_rfc3339();
        TreeState {
            format: STATE_FORMAT,
            role,
            epoch: 1,
            history: vec![EpochRecord {
                epoch: 1,
                primary,
                started: now.clone(),
                last_acked: None,
                discarded: false,
            }],
            position: Position { epoch: 1, seq: 0 },
            acked_before_ms: None,
            fenced: None,
            consistent: None,
            updated: now,
        }
    }

    /// Parses a state file; `shown` names it in errors.
    ///
    /// # Errors
    /// [`Error::Usage`]: the file is torn, from another hotsync, or not hotsync's; the
    /// message says what to do. Never a silent reset.
    pub(crate) fn parse(bytes: &[u8], shown: &str) -> Result<TreeState> {
        let st: TreeState = serde_json::from_slice(bytes).map_err(|e| {
            Error::Usage(format!(
                "{shown} is damaged ({e}): hotsync will not guess this tree's role and epoch; \
                 check it, or move it away to start this tree afresh at epoch 1"
            ))
        })?;
        if st.format != STATE_FORMAT {
            return Err(Error::Usage(format!(
                "{shown} has format {}, this hotsync reads format {STATE_FORMAT}: \
                 run the hotsync release that wrote it",
                st.format
            )));
        }
        if st.history.last().map(|h| h.epoch) != Some(st.epoch) {
            return Err(Error::Usage(format!(
                "{shown} is inconsistent (epoch {} is not the last of its history): \
                 check it, or move it away to start this tree afresh at epoch 1",
                st.epoch
            )));
        }
        Ok(st)
    }

    /// The primary of the current epoch, when known.
    pub(crate) fn primary(&self) -> Option<&str> {
        self.history.last().and_then(|h| h.primary.as_deref())
    }

    /// Records `pos` as acknowledged (durable on the standby) in the current epoch.
    pub(crate) fn acknowledge(&mut self, pos: Position) {
        if pos.epoch != self.epoch || pos <= self.position {
            return;
        }
        self.position = pos;
        if let Some(h) = self.history.last_mut() {
            h.last_acked = Some(pos);
        }
    }

    /// A standby admitting the primary of a newer epoch: it enters that epoch.
    pub(crate) fn adopt(&mut self, epoch: u64, primary: Option<String>) {
        if epoch <= self.epoch {
            if epoch == self.epoch
                && let Some(h) = self.history.last_mut()
                && h.primary.is_none()
            {
                h.primary = primary;
            }
            return;
        }
        self.epoch = epoch;
        self.history.push(EpochRecord {
            epoch,
            primary,
            started: crate::model::clock::now_rfc3339(),
            last_acked: None,
            discarded: false,
        });
    }

    /// Turns a standby into the primary of a new epoch (one more than now), with `me` (this
    /// node's ID) as its primary. The epoch it leaves keeps its last durable position.
    pub(crate) fn promote(&mut self, me: Option<String>) {
        let pos = self.position;
        if let Some(h) = self.history.last_mut()
            && pos.epoch == h.epoch
            && pos.seq > 0
        {
            h.last_acked = Some(pos);
        }
        self.epoch += 1;
        self.role = Role::Primary;
        self.fenced = None;
        self.acked_before_ms = None;
        self.history.push(EpochRecord {
            epoch: self.epoch,
            primary: me,
            started: crate::model::clock::now_rfc3339(),
            last_acked: None,
            discarded: false,
        });
    }

    /// Whether a primary of `epoch` knocking proves this tree stale: it is a primary of an
    /// older epoch, so a standby was promoted while it was away.
    pub(crate) fn superseded_by(&self, epoch: u64) -> bool {
        self.role == Role::Primary && epoch > self.epoch
    }

    /// Turns a former primary into a standby (of the next primary it admits, even one of
    /// its own epoch: its writes there were set aside).
    pub(crate) fn rejoin(&mut self) {
        self.role = Role::Standby;
        self.fenced = None;
        self.acked_before_ms = None;
        if let Some(h) = self.history.last_mut() {
            h.discarded = true;
        }
    }
}

/// Whether a primary may write a tree, and if not, why (for the coded error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Write it; `adopt` when the primary's epoch is newer (the tree enters it).
    Admit {
        adopt: bool,
    },
    Refuse {
        code: ErrorCode,
        message: String,
    },
}

/// Decides whether the primary `who` (its ID, `None` for an in-process one) at `epoch`
/// may write the tree in state `tree`, shown as `shown`.
pub(crate) fn admit(tree: &TreeState, epoch: u64, who: Option<&str>, shown: &str) -> Decision {
    let who_shown = who.unwrap_or("the local primary");
    let current = tree
        .primary()
        .map(|p| format!(" (primary {p})"))
        .unwrap_or_default();
    if epoch < tree.epoch {
        return Decision::Refuse {
            code: ErrorCode::StaleEpoch,
            message: format!(
                "{who_shown} is at epoch {epoch}, but {shown} is at epoch {}{current}: this \
                 primary has been fenced (a standby was promoted); stop it, and make its tree a \
                 standby with `hotsync rejoin`",
                tree.epoch
            ),
        };
    }
    match tree.role {
        Role::Primary if epoch == tree.epoch => Decision::Refuse {
            code: ErrorCode::SplitBrain,
            message: format!(
                "split brain: {shown} is itself the primary of epoch {epoch}{current}, and \
                 {who_shown} claims the same epoch; on the node whose writes must go, run \
                 `hotsync rejoin` (what it wrote since is kept under .hotsync/diverged)"
            ),
        },
        Role::Primary => Decision::Refuse {
            code: ErrorCode::Refused,
            message: format!(
                "{shown} is a former primary (epoch {}); before it serves as a standby of epoch \
                 {epoch}, run `hotsync rejoin` there so what it wrote after its last \
                 acknowledged position is kept",
                tree.epoch
            ),
        },
        Role::Standby if epoch > tree.epoch => Decision::Admit { adopt: true },
        Role::Standby if tree.history.last().is_some_and(|h| h.discarded) => {
            Decision::Admit { adopt: false }
        }
        Role::Standby => match (tree.primary(), who) {
            (Some(known), Some(who)) if known != who => Decision::Refuse {
                code: ErrorCode::SplitBrain,
                message: format!(
                    "split brain: {shown} follows primary {known} in epoch {epoch}, and \
                     primary {who} claims the same epoch; on the node whose writes must go, \
                     run `hotsync rejoin` (what it wrote since is kept under .hotsync/diverged)"
                ),
            },
            _ => Decision::Admit { adopt: false },
        },
    }
}

/// Which entries of a former primary may hold writes its standby never confirmed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Divergence {
    /// Everything this node saw before then (its own clock, Unix ms) is on the standby.
    pub acked_before_ms: u64,
    /// How late an event may be seen after the change it reports (and the state file's
    /// once-a-second lag): changes this close to the watermark count as unconfirmed.
    pub margin_ms: u64,
}

impl Divergence {
    /// The margin used by `rejoin`: generous (events arrive within milliseconds of their
    /// change), because a false alarm only costs a file moved aside and sent again, and a
    /// miss costs a write.
    pub(crate) const MARGIN_MS: u64 = 2_000;

    /// Whether an entry whose inode last changed at `ctime_ms` (this node's clock: the
    /// ctime, which no user can set back) may hold unconfirmed writes.
    pub(crate) fn diverged(&self, ctime_ms: u64) -> bool {
        ctime_ms.saturating_add(self.margin_ms) >= self.acked_before_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(epoch: u64, primary: Option<&str>) -> TreeState {
        let mut t = TreeState::fresh(Role::Standby, None);
        t.history[0].primary = primary.map(String::from);
        for e in 2..=epoch {
            t.adopt(e, primary.map(String::from));
        }
        t
    }

    #[test]
    fn admission_follows_epochs_roles_and_primaries() {
        let a = Some("A");
        let b = Some("B");
        let mut primary2 = standby(1, a);
        primary2.promote(Some("B".into()));
        let mut rejoined = primary2.clone();
        rejoined.rejoin();
        type Case<'a> = (
            &'a str,
            TreeState,
            u64,
            Option<&'a str>,
            Result<bool, ErrorCode>,
        );
        let table: Vec<Case> = vec![
            ("same epoch, same primary", standby(1, a), 1, a, Ok(false)),
            (
                "same epoch, primary not yet known",
                standby(1, None),
                1,
                b,
                Ok(false),
            ),
            ("a local primary", standby(1, a), 1, None, Ok(false)),
            ("a newer primary is adopted", standby(1, a), 2, b, Ok(true)),
            (
                "an older primary is fenced",
                standby(3, b),
                2,
                a,
                Err(ErrorCode::StaleEpoch),
            ),
            (
                "two primaries in one epoch",
                standby(2, a),
                2,
                b,
                Err(ErrorCode::SplitBrain),
            ),
            (
                "a primary tree meets its twin",
                primary2.clone(),
                2,
                a,
                Err(ErrorCode::SplitBrain),
            ),
            (
                "a primary tree meets its past",
                primary2.clone(),
                1,
                a,
                Err(ErrorCode::StaleEpoch),
            ),
            (
                "a primary tree must rejoin first",
                primary2,
                3,
                a,
                Err(ErrorCode::Refused),
            ),
        ];
        for (what, tree, epoch, who, want) in table {
            let got = match admit(&tree, epoch, who, "/srv/t") {
                Decision::Admit { adopt } => Ok(adopt),
                Decision::Refuse { code, message } => {
                    assert!(message.contains("/srv/t"), "{what}: {message}");
                    if code != ErrorCode::Refused {
                        assert!(message.contains("rejoin"), "{what}: {message}");
                    }
                    Err(code)
                }
            };
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn only_a_newer_primary_proves_a_primary_tree_stale() {
        let mut t = TreeState::fresh(Role::Standby, None);
        t.promote(Some("A".into()));
        assert!(t.superseded_by(t.epoch + 1));
        assert!(
            !t.superseded_by(t.epoch),
            "the same epoch is a split brain, not proof"
        );
        assert!(!t.superseded_by(t.epoch - 1));
        assert!(
            !standby(1, None).superseded_by(5),
            "a standby just adopts it"
        );
    }

    #[test]
    fn a_stale_primary_is_told_both_epochs_and_the_new_primary() {
        let t = standby(3, Some("NEWPRIMARY"));
        let Decision::Refuse { message, .. } = admit(&t, 2, Some("OLD"), "DEST x") else {
            panic!()
        };
        assert!(
            message.contains("epoch 2")
                && message.contains("epoch 3")
                && message.contains("NEWPRIMARY"),
            "{message}"
        );
    }

    #[test]
    fn history_records_epochs_and_their_last_positions() {
        let mut t = standby(1, Some("A"));
        t.acknowledge(Position { epoch: 1, seq: 40 });
        t.acknowledge(Position { epoch: 1, seq: 39 });
        t.acknowledge(Position { epoch: 0, seq: 99 });
        assert_eq!(t.position.seq, 40);
        t.promote(Some("B".into()));
        assert_eq!((t.role, t.epoch), (Role::Primary, 2));
        assert_eq!(
            t.history[0].last_acked,
            Some(Position { epoch: 1, seq: 40 })
        );
        assert_eq!(t.history[1].primary.as_deref(), Some("B"));
        t.acknowledge(Position { epoch: 2, seq: 3 });
        assert_eq!(t.history[1].last_acked, Some(Position { epoch: 2, seq: 3 }));
        t.fenced = Some(Fence {
            at: "now".into(),
            reason: "epoch 3".into(),
        });
        t.rejoin();
        assert_eq!(
            (t.role, t.epoch, t.fenced.is_none()),
            (Role::Standby, 2, true)
        );
        t.adopt(3, Some("A".into()));
        assert_eq!(t.history.len(), 3);
        assert_eq!(t.primary(), Some("A"));
        // Round trip, and damage is an error.
        let json = serde_json::to_vec(&t).unwrap();
        assert_eq!(TreeState::parse(&json, "s").unwrap(), t);
        assert!(TreeState::parse(&json[..json.len() / 2], "s").is_err());
        let mut odd = t.clone();
        odd.epoch = 9;
        let e = TreeState::parse(&serde_json::to_vec(&odd).unwrap(), "s").unwrap_err();
        assert!(e.to_string().contains("inconsistent"), "{e}");
    }

    #[test]
    fn divergence_is_judged_on_the_former_primary_s_own_clock_with_a_margin() {
        let d = Divergence {
            acked_before_ms: 1_000_000,
            margin_ms: 5_000,
        };
        assert!(!d.diverged(994_999), "confirmed well before the watermark");
        assert!(
            d.diverged(995_000),
            "within the margin: an event may have come late"
        );
        assert!(d.diverged(2_000_000), "after the watermark");
    }
}
