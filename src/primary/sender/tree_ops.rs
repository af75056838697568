//! Tree operations on the control stream: what is in the way out of it, directories,
//! hard links, renames, removals and directory attributes. Each batch is sent with a
//! `Flush` barrier and waited on until durable, since what follows depends on it (files
//! need their directories, links their targets).

use super::acks::Op;
use super::attrs::{send_xattrs, set_meta};
use super::exec::Exec;
use crate::error::Error;
use crate::model::path::RelPath;
use crate::model::plan::Plan;
use crate::wire::channel::Channel;
use crate::wire::protocol::Message;

/// One operation for the control stream, and how its acknowledgement counts.
pub(super) struct ControlOp {
    pub msg: Message,
    pub path: RelPath,
    pub op: Op,
}

impl Exec<'_> {
    /// Step 1 of a plan: what is in the way out of it, then directories, parents first.
    pub(super) fn prepare(&self, plan: &Plan, ch: &mut Channel) -> Result<(), Error> {
        let mut ops = Vec::new();
        for p in &plan.clear {
            let msg = Message::Clear {
                id: self.id(),
                path: p.clone(),
            };
            ops.push(self.removal(msg, p));
        }
        for p in &plan.mkdirs {
            ops.push(ControlOp {
                msg: Message::Mkdir {
                    id: self.id(),
                    path: p.clone(),
                },
                path: p.clone(),
                op: Op::Mkdir,
            });
        }
        self.control_batch(ch, ops, 1)
    }

    /// Steps 3 and 4 of a plan: hard links, now that their targets are durable; then
    /// deletes, and directory attributes last (both deepest first, as planned).
    pub(super) fn link_and_remove(&self, plan: &Plan, ch: &mut Channel) -> Result<(), Error> {
        let links = plan.links.iter().map(|l| ControlOp {
            msg: Message::Link {
                id: self.id(),
                path: l.path.clone(),
                target: l.target.clone(),
            },
            path: l.path.clone(),
            op: Op::Link,
        });
        self.control_batch(ch, links.collect(), 2)?;
        let mut ops = Vec::new();
        for p in &plan.deletes {
            let msg = Message::Delete {
                id: self.id(),
                path: p.clone(),
            };
            ops.push(self.removal(msg, p));
        }
        for m in &plan.dir_metas {
            ops.push(ControlOp {
                msg: set_meta(m, self.id()),
                path: m.path.clone(),
                op: Op::Meta,
            });
        }
        self.control_batch(ch, ops, 3)
    }

    /// The renames `from → to`, as operations to send.
    pub(super) fn renames(&self, renames: &[(RelPath, RelPath)]) -> Vec<ControlOp> {
        let rename = |(from, to): &(RelPath, RelPath)| ControlOp {
            msg: Message::Rename {
                id: self.id(),
                from: from.clone(),
                to: to.clone(),
            },
            path: to.clone(),
            op: Op::Rename,
        };
        renames.iter().map(rename).collect()
    }

    /// A removal to send, accounted as the standby entries it takes away.
    pub(super) fn removal(&self, msg: Message, p: &RelPath) -> ControlOp {
        let entries = self.remote.map_or(1, |r| r.count_under(p));
        ControlOp {
            msg,
            path: p.clone(),
            op: Op::Remove { entries },
        }
    }

    /// Sends operations on the control stream and waits until they are durable.
    pub(super) fn control_batch(
        &self,
        ch: &mut Channel,
        ops: Vec<ControlOp>,
        seq: u64,
    ) -> Result<(), Error> {
        if ops.is_empty() {
            return Ok(());
        }
        let x = self.book().open();
        let Channel { r, w } = ch;
        self.pipelined(r, x, seq, || {
            for ControlOp { msg, path, op } in ops {
                let id = msg.op_id().expect("control operations carry an id");
                if let Message::SetMeta { path, .. } = &msg {
                    // Read now, as the message goes: a directory's attributes are set
                    // after everything inside it.
                    let Some(attrs) = self.xattrs_at(path) else {
                        continue;
                    };
                    send_xattrs(w, attrs)?;
                }
                self.book().expect(x, id, path, op);
                w.send(&msg)?;
            }
            w.send(&Message::Flush { seq })?;
            w.flush()
        })
    }
}
