//! SIGINT and SIGTERM as a shutdown request, installed before anything is announced.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A future that completes on SIGINT or SIGTERM; the handlers are installed at once.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Sets `flag` on SIGINT or SIGTERM; the handlers are in place when this returns.
pub fn on_signal(flag: Arc<AtomicBool>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signals = {
        let _guard = rt.enter();
        shutdown_signal()?
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(signals);
            flag.store(true, Ordering::Relaxed);
        })?;
    Ok(())
}
