//! The linger watcher: a pool whose last handle is dropped stays open for
//! its `linger` time, then closes and leaves the registry.

use std::sync::Weak;
use std::time::{Duration, Instant};

use super::registry::Entry;

/// Retires a pool once it has had no handle for its `linger` time. Looks at
/// the handle count on a tick of a quarter of `linger` (10ms..1s); a handle
/// taken between two looks restarts the wait. Ends when the pool closes or
/// leaves the fleet.
pub(crate) async fn watch_linger(entry: Weak<Entry>) {
    let linger = match entry.upgrade() {
        Some(entry) => entry.pool.config().linger,
        None => return,
    };
    let tick = (linger / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when the pool has had no handle, and the fingerprint then.
    let mut unused: Option<(Instant, u64)> = None;
    loop {
        interval.tick().await;
        let Some(entry) = entry.upgrade() else {
            return;
        };
        if entry.pool.is_closed() {
            return;
        }
        let (live, taken) = entry.refs.look();
        unused = match unused {
            _ if live > 0 => None,
            Some((since, seen)) if seen == taken => {
                if since.elapsed() >= linger && entry.retire(taken) {
                    return;
                }
                Some((since, seen))
            }
            _ => Some((Instant::now(), taken)),
        };
    }
}
