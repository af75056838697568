//! `hotsync serve`: accepts primaries through a transport's [`Acceptor`], admits only
//! allowed IDs, and runs one receiver session per connection, each isolated from the
//! others.

use crate::error::Error;
use crate::model::status::{Health, Instance};
use crate::ops::alert::{AlertConfig, Alerts};
use crate::ops::control::Control;
use crate::standby::{Peer, Standby};
use crate::transport::identity::NodeId;
use crate::transport::{Accepted, Acceptor, Admit, Handshake};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub struct ServeOptions {
    /// The tree, held for the life of the server.
    pub standby: Arc<Standby>,
    pub allow: HashSet<NodeId>,
}

/// A running `serve`, as `status` and the metrics see it.
pub struct Serving {
    pub standby: Arc<Standby>,
    pub listen: std::net::SocketAddr,
    pub node_id: NodeId,
    pub alerts: Arc<Alerts>,
    tree: String,
    started: Instant,
    started_at: SystemTime,
}

impl Serving {
    pub fn new(
        standby: Arc<Standby>,
        listen: std::net::SocketAddr,
        node_id: NodeId,
        alerts: AlertConfig,
    ) -> Serving {
        Serving {
            tree: crate::tree::operand::shown_absolute(standby.path()),
            standby,
            listen,
            node_id,
            alerts: Arc::new(Alerts::new(alerts)),
            started: Instant::now(),
            started_at: SystemTime::now(),
        }
    }
}

impl Control for Serving {
    fn promote(&self, force: bool) -> crate::error::Result<serde_json::Value> {
        let r = self.standby.promote(force, Some(self.node_id))?;
        serde_json::to_value(r).map_err(|e| Error::Usage(e.to_string()))
    }

    fn rejoin(
        &self,
        excludes: &[String],
        if_fenced: bool,
    ) -> crate::error::Result<serde_json::Value> {
        let r = self.standby.rejoin(excludes, if_fenced)?;
        serde_json::to_value(r).map_err(|e| Error::Usage(e.to_string()))
    }

    fn status(&self) -> Instance {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let st = self.standby.state();
        let mut i = Instance {
            pid: std::process::id(),
            command: "serve".into(),
            role: st.role,
            tree: self.tree.clone(),
            node_id: Some(self.node_id.to_string()),
            listen: Some(self.listen.to_string()),
            started_at: crate::model::clock::rfc3339(self.started_at),
            uptime_seconds: now.duration_since(self.started).as_secs_f64(),
            protocol: crate::wire::protocol::VERSION,
            epoch: st.epoch,
            health: Health::default(),
            thresholds: self.alerts.thresholds(),
            replicas: vec![],
            primaries: self.standby.primaries(now, wall),
            space: self.standby.space(),
            alerts: self.alerts.statuses(),
            sync: None,
            quorum: None,
            watches: None,
            consistency: Some(self.standby.consistency_status(wall)),
        };
        i.assess();
        i
    }
}

/// Checks what `serve` needs before it binds: a root directory and at least one primary.
pub fn check(root: &Path, allow: &[NodeId]) -> Result<(), Error> {
    crate::tree::operand::check_dir("--root", root)?;
    if allow.is_empty() {
        return Err(Error::Usage(
            "no --allow ID given: name each primary that may connect (run `hotsync id` on it)"
                .into(),
        ));
    }
    Ok(())
}

/// Serves the primaries `acceptor` lets in until `shutdown` completes, then closes every
/// connection and waits (bounded) for sessions to end.
pub async fn run(
    acceptor: Arc<dyn Acceptor>,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let opts = Arc::new(opts);
    let allow = opts.allow.clone();
    let admit: Admit = Arc::new(move |id| {
        (!allow.contains(id)).then(|| {
            format!(
                "primary ID {id} is not allowed on this standby (add `--allow {id}` to its hotsync serve)"
            )
        })
    });
    let mut sessions = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = acceptor.next() => match incoming {
                Some(hs) => {
                    sessions.spawn(session(hs, admit.clone(), opts.clone()));
                }
                None => break,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    tracing::info!("shutting down: closing {} connection(s)", sessions.len());
    acceptor.close("standby shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), acceptor.wait_idle()).await;
}

/// One connection: authenticate, authorise, then run a receiver session on a blocking
/// thread. Logs exactly one line.
async fn session(hs: Box<dyn Handshake>, admit: Admit, opts: Arc<ServeOptions>) {
    let Accepted { conn: qc, id, addr } = match hs.complete(admit).await {
        Ok(a) => a,
        Err(why) => {
            tracing::warn!("{why}");
            return;
        }
    };
    let started = Instant::now();
    let peer = Peer {
        id: Some(id),
        addr: Some(addr),
    };
    let opts2 = opts.clone();
    let result = tokio::task::spawn_blocking(move || {
        let r = crate::standby::receiver::serve(qc.clone(), &opts2.standby, peer);
        if let Err(e) = &r {
            qc.abort(&e.to_string());
        }
        r
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    let (outcome, error) = match &result {
        Ok(Ok(_)) => ("ok", None),
        Ok(Err(e)) => ("failed", Some(e.to_string())),
        Err(e) => ("crashed", Some(e.to_string())),
    };
    let mut ev = serde_json::json!({"primary": id.to_string(), "addr": addr.to_string(),
        "result": outcome, "error": error, "seconds": secs});
    if let Ok(Ok(rep)) = &result {
        ev["files_written"] = rep.files_written.into();
        ev["bytes_written"] = rep.bytes_written.into();
        ev["entries_removed"] = rep.entries_removed.into();
        ev["failed_ops"] = rep.failed_ops.into();
    }
    opts.standby.event("session", ev);
    match result {
        Ok(Ok(rep)) => tracing::info!(
            "primary {id} from {addr}: ok: {} files ({} bytes) written, {} entries removed, {} failed, {secs:.2} s",
            rep.files_written,
            rep.bytes_written,
            rep.entries_removed,
            rep.failed_ops
        ),
        Ok(Err(e)) => tracing::warn!("primary {id} from {addr}: failed after {secs:.2} s: {e}"),
        Err(e) => tracing::error!("primary {id} from {addr}: session crashed: {e}"),
    }
}
