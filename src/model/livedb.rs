//! Live databases in a watched tree, told by the names of the files their engines write
//! all the time (DESIGN §10): watching files cannot keep a database's write order, so the
//! operator is told once per database, with what to do about it.
//!
//! Names only, no I/O: a caller confirms the database's other file before it warns.

use crate::model::path::RelPath;
use std::collections::HashSet;

/// A database engine whose files watching cannot keep in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    /// A SQLite database beside its write-ahead log (`-wal`) or rollback journal
    /// (`-journal`).
    Sqlite,
    /// A PostgreSQL data directory (its `pg_wal`, once `pg_xlog`).
    Postgres,
    /// A MySQL or MariaDB data directory (InnoDB's redo log).
    Innodb,
}

impl Engine {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "SQLite database",
            Engine::Postgres => "PostgreSQL data directory",
            Engine::Innodb => "InnoDB (MySQL, MariaDB) data directory",
        }
    }
}

/// A database a changed path belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LiveDb {
    pub(crate) engine: Engine,
    /// The database: the SQLite file, or the data directory (empty: the tree's root).
    pub(crate) at: RelPath,
    /// What must exist for it to be one: the SQLite file itself, the data directory's
    /// `PG_VERSION`; `None` when the name says enough.
    pub(crate) confirm: Option<RelPath>,
}

/// The database that the change of `path` says is being written, if its name is one a
/// database engine writes all the time.
pub(crate) fn classify(path: &RelPath) -> Option<LiveDb> {
    let bytes = path.as_bytes();
    let parts: Vec<&[u8]> = bytes.split(|b| *b == b'/').collect();
    let name = *parts.last()?;
    let prefix = |n: usize| RelPath::new(parts[..n].join(&b'/')).ok();
    for (i, part) in parts.iter().enumerate().take(parts.len() - 1) {
        if *part == b"pg_wal" || *part == b"pg_xlog" {
            let at = prefix(i)?;
            let confirm = at.join(b"PG_VERSION").ok();
            return Some(LiveDb {
                engine: Engine::Postgres,
                at,
                confirm,
            });
        }
        if *part == b"#innodb_redo" {
            return Some(LiveDb {
                engine: Engine::Innodb,
                at: prefix(i)?,
                confirm: None,
            });
        }
    }
    if name.starts_with(b"ib_logfile") {
        return Some(LiveDb {
            engine: Engine::Innodb,
            at: prefix(parts.len() - 1)?,
            confirm: None,
        });
    }
    for suffix in [&b"-wal"[..], b"-journal"] {
        if let Some(db) = name.strip_suffix(suffix)
            && !db.is_empty()
        {
            let at = prefix(parts.len() - 1)?.join(db).ok()?;
            return Some(LiveDb {
                engine: Engine::Sqlite,
                confirm: Some(at.clone()),
                at,
            });
        }
    }
    None
}

/// The databases already named, so that each is named once.
#[derive(Debug, Default)]
pub(crate) struct Named(HashSet<RelPath>);

impl Named {
    /// Whether `db` was named already.
    pub(crate) fn has(&self, db: &LiveDb) -> bool {
        self.0.contains(&db.at)
    }

    /// Whether `db` is still to be named; from now on it is not.
    pub(crate) fn first(&mut self, db: &LiveDb) -> bool {
        self.0.insert(db.at.clone())
    }
}

/// The one-line warning for `db` (shown as `shown`, the path as the operator knows it).
pub(crate) fn warning(db: &LiveDb, shown: &str) -> String {
    format!(
        "{shown} is a live {}: watching files cannot keep the order of its writes, so on the \
         standby it is whole only at the tree's consistent points, and none comes while it \
         and another file are written at once (a failover then goes back to the last one, \
         under --consistency consistent, or finds it damaged, under latest); for a database \
         that must fail over with every committed write, stop it or use hotsync's \
         synchronous mode (`hotsync mount`, DESIGN §11) when it ships",
        db.engine.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn the_files_engines_write_all_the_time_name_their_database() {
        let sqlite = classify(&p("app/data.db-wal")).unwrap();
        assert_eq!(sqlite.engine, Engine::Sqlite);
        assert_eq!(sqlite.at, p("app/data.db"));
        assert_eq!(sqlite.confirm, Some(p("app/data.db")));
        assert_eq!(
            classify(&p("shop.sqlite-journal")).unwrap().at,
            p("shop.sqlite")
        );
        let pg = classify(&p("pg/15/main/pg_wal/000000010000000000000001")).unwrap();
        assert_eq!(pg.engine, Engine::Postgres);
        assert_eq!(pg.at, p("pg/15/main"));
        assert_eq!(pg.confirm, Some(p("pg/15/main/PG_VERSION")));
        let old = classify(&p("pg_xlog/000000010000000000000001")).unwrap();
        assert_eq!(old.at, RelPath::root());
        assert_eq!(
            classify(&p("mysql/#innodb_redo/#ib_redo9")).unwrap().at,
            p("mysql")
        );
        assert_eq!(
            classify(&p("mysql/ib_logfile0")).unwrap().engine,
            Engine::Innodb
        );
        // Names that only look alike.
        assert_eq!(classify(&p("notes/-wal")), None);
        assert_eq!(classify(&p("pg_wal")), None);
        assert_eq!(classify(&p("src/journal.rs")), None);
    }

    #[test]
    fn each_database_is_named_once() {
        let mut named = Named::default();
        let a = classify(&p("a.db-wal")).unwrap();
        assert!(named.first(&a));
        assert!(!named.first(&classify(&p("a.db-journal")).unwrap()));
        assert!(named.first(&classify(&p("b.db-wal")).unwrap()));
        assert!(warning(&a, "/srv/a.db").starts_with("/srv/a.db is a live SQLite database"));
    }
}
