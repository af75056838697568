//! The session handshake on a new control stream, both sides of it in one place:
//!
//! ```text
//! primary                          standby
//!   greeting, Open        ──▶
//!                         ◀──     greeting
//!                         ◀──     Opened          (or Error: refused, then closed)
//!                         ◀──     Keeps           (version 5 on)
//!   Keep                  ──▶                     (version 5 on)
//! ```
//!
//! What each side decides (whether to admit, which attributes to keep) is passed in; the
//! order and the shape of the exchange live here only, so a transport or a side that
//! speaks it cannot get it subtly different.

use crate::error::{ErrorCode, ProtocolError};
use crate::model::epoch::Position;
use crate::model::xattrs::Policy;
use crate::wire::channel::Channel;
use crate::wire::protocol::{self, Caps, Message, SessionMode};

/// What the primary asks for: its `Open`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) excludes: Vec<String>,
    pub(crate) mode: SessionMode,
    pub(crate) epoch: u64,
}

/// What the standby answers when it admits the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Welcome {
    /// Owner and group are preserved there (it runs as root).
    pub(crate) owners: bool,
    /// The last batch known durable there.
    pub(crate) position: Position,
    /// The attribute namespaces it can store (told from version 5 on).
    pub(crate) can: Policy,
}

/// A standby's reason not to admit a session, told to the primary as an `Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

/// An opened session, as either side sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Agreed<S> {
    /// What the version both speak can do.
    pub(crate) caps: Caps,
    /// The other side's part: the standby's [`Welcome`] for the primary, the primary's
    /// [`Hello`] for the standby.
    pub(crate) said: S,
    /// The attribute namespaces the session keeps (none before version 5).
    pub(crate) xattrs: Policy,
}

/// Why the standby's side did not open a session.
#[derive(Debug)]
pub(crate) enum NotAccepted {
    /// The exchange failed (a transport error, a malformed or unexpected message).
    Protocol(ProtocolError),
    /// The session was refused, and the primary told so.
    Refused(Refusal),
}

impl From<ProtocolError> for NotAccepted {
    fn from(e: ProtocolError) -> Self {
        NotAccepted::Protocol(e)
    }
}

/// The primary's side: opens a session asking `hello`; `keep` chooses the attribute
/// namespaces to mirror from what the standby can store. A refusal arrives as
/// [`ProtocolError::Peer`] with the standby's code.
pub(crate) fn open(
    ch: &mut Channel,
    hello: &Hello,
    keep: impl FnOnce(&Welcome) -> Policy,
) -> Result<Agreed<Welcome>, ProtocolError> {
    let caps = Caps::of(ch.open_session(&Message::Open {
        excludes: hello.excludes.clone(),
        mode: hello.mode,
        epoch: hello.epoch,
    })?);
    let (owners, position) = match ch.recv()? {
        Message::Opened { owners, position } => (owners, position),
        other => return Err(ProtocolError::unexpected(&other, "Opened")),
    };
    let mut welcome = Welcome {
        owners,
        position,
        can: Policy::none(),
    };
    let mut xattrs = Policy::none();
    if caps.xattrs {
        welcome.can = match ch.recv()? {
            Message::Keeps { can } => can,
            other => return Err(ProtocolError::unexpected(&other, "Keeps")),
        };
        xattrs = keep(&welcome).and(welcome.can);
        ch.send(&Message::Keep { policy: xattrs })?;
        ch.flush()?;
    }
    Ok(Agreed {
        caps,
        said: welcome,
        xattrs,
    })
}

/// The standby's side: reads the primary's `Open` (its excludes checked against the
/// protocol's bounds), asks `admit` whether to take the session, and answers. `admit`'s
/// `T` (the standby's hold on the session) is handed back with the agreement; a refusal
/// is sent to the primary before it is returned.
pub(crate) fn accept<T>(
    ch: &mut Channel,
    admit: impl FnOnce(Caps, &Hello) -> Result<(Welcome, T), Refusal>,
) -> Result<(Agreed<Hello>, T), NotAccepted> {
    let caps = Caps::of(ch.accept_session()?);
    let hello = match ch.recv()? {
        Message::Open {
            excludes,
            mode,
            epoch,
        } => Hello {
            excludes,
            mode,
            epoch,
        },
        other => return Err(ProtocolError::unexpected(&other, "Open").into()),
    };
    let admitted = match protocol::check_excludes(&hello.excludes) {
        Err(e) => Err(Refusal {
            code: ErrorCode::Invalid,
            message: e.to_string(),
        }),
        Ok(()) => admit(caps, &hello),
    };
    let (welcome, held) = match admitted {
        Ok(w) => w,
        Err(refusal) => {
            // Best effort: the primary may already be gone, and the refusal stands anyway.
            let _ = ch.send(&Message::Error {
                code: refusal.code,
                message: refusal.message.clone(),
            });
            let _ = ch.flush();
            return Err(NotAccepted::Refused(refusal));
        }
    };
    ch.send(&Message::Opened {
        owners: welcome.owners,
        position: welcome.position,
    })?;
    let mut xattrs = Policy::none();
    if caps.xattrs {
        ch.send(&Message::Keeps { can: welcome.can })?;
        ch.flush()?;
        xattrs = match ch.recv()? {
            Message::Keep { policy } => policy.and(welcome.can),
            other => return Err(ProtocolError::unexpected(&other, "Keep").into()),
        };
    }
    ch.flush()?;
    Ok((
        Agreed {
            caps,
            said: hello,
            xattrs,
        },
        held,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Connection;
    use crate::transport::local;

    fn all() -> Policy {
        Policy {
            user: true,
            trusted: true,
            security: true,
            selinux: true,
            acls: true,
        }
    }

    fn hello() -> Hello {
        Hello {
            excludes: vec!["*.tmp".into()],
            mode: SessionMode::Write,
            epoch: 4,
        }
    }

    type Opened = Result<Agreed<Welcome>, ProtocolError>;
    type Accepted = Result<(Agreed<Hello>, u8), NotAccepted>;

    /// Both sides of the exchange, each on its own thread, over the in-process pair.
    fn run(
        hello: Hello,
        admit: impl FnOnce(Caps, &Hello) -> Result<(Welcome, u8), Refusal> + Send + 'static,
    ) -> (Opened, Accepted) {
        let (primary, standby) = local::pair();
        let accepting = std::thread::spawn(move || {
            let mut ch = Channel::new(standby.accept().unwrap().unwrap());
            accept(&mut ch, admit)
        });
        let mut ch = Channel::open(&primary).unwrap();
        let opened = open(&mut ch, &hello, |_| all());
        (opened, accepting.join().unwrap())
    }

    #[test]
    fn both_sides_agree() {
        let can = Policy {
            user: true,
            ..Policy::none()
        };
        let (opened, accepted) = run(hello(), move |caps, h| {
            assert_eq!(caps.version, protocol::VERSION);
            assert_eq!(h.epoch, 4);
            Ok((
                Welcome {
                    owners: true,
                    position: Position { epoch: 4, seq: 9 },
                    can,
                },
                7,
            ))
        });
        let opened = opened.unwrap();
        let (accepted, held) = accepted.map_err(|_| "refused").unwrap();
        assert_eq!(held, 7);
        assert_eq!(accepted.said, hello());
        assert_eq!(opened.said.position, Position { epoch: 4, seq: 9 });
        assert!(opened.said.owners);
        // What both want and the standby can: the primary's wish cut to `can`.
        assert_eq!(opened.xattrs, all().and(can));
        assert_eq!(accepted.xattrs, opened.xattrs);
        assert_eq!(accepted.caps, opened.caps);
    }

    #[test]
    fn a_refusal_reaches_the_primary_with_its_code() {
        let (opened, accepted) = run(hello(), |_, _| {
            Err(Refusal {
                code: ErrorCode::StaleEpoch,
                message: "epoch 4 is older than 5".into(),
            })
        });
        match opened {
            Err(ProtocolError::Peer { code, message }) => {
                assert_eq!(code, ErrorCode::StaleEpoch);
                assert_eq!(message, "epoch 4 is older than 5");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(accepted, Err(NotAccepted::Refused(r)) if r.code == ErrorCode::StaleEpoch)
        );
    }

    #[test]
    fn oversized_excludes_are_refused_before_admission() {
        let mut h = hello();
        h.excludes = vec!["x".repeat(protocol::MAX_PATTERN + 1)];
        let (opened, accepted) = run(h, |_, _| panic!("admitted a bad Open"));
        assert!(matches!(
            opened,
            Err(ProtocolError::Peer {
                code: ErrorCode::Invalid,
                ..
            })
        ));
        assert!(matches!(accepted, Err(NotAccepted::Refused(_))));
    }
}
