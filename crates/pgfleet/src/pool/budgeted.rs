//! What a pool does for the server budgets it counts in: close an idle
//! connection for another pool (reclaim), say what it asks of a server
//! (demand), and open the coordinator's connection of `replicas: auto`.

use std::sync::{Arc, Weak};

use super::inner::{Conn, PoolInner};
use crate::budget::replicas::Connector;
use crate::budget::{Asked, Reclaim};
use crate::conn;
use crate::error::Error;
use crate::stats::CloseReason;

impl Reclaim for PoolInner {
    fn reclaim_idle(&self, server: &str, below_floor: bool) -> bool {
        let victim = {
            let mut st = self.lock();
            if !below_floor && st.size - st.connecting() <= self.min_size() {
                return false;
            }
            // The longest idle on that server.
            let on_server = |c: &Conn| self.hosts.entry(c.host).server == server;
            st.idle
                .iter()
                .position(on_server)
                .and_then(|i| st.idle.remove(i))
        };
        match victim {
            Some(conn) => {
                conn.close(CloseReason::Reclaimed);
                true
            }
            None => false,
        }
    }

    fn demand(&self, server: &str) -> Asked {
        if !self.hosts.entries().iter().any(|h| h.server == server) {
            return Asked::default();
        }
        let st = self.lock();
        let busy = st.size - st.idle.len() as u32;
        Asked {
            demand: busy.saturating_add(st.waiting).min(self.max_size()),
            floor: self.min_size(),
            open: st.size,
        }
    }
}

/// Opens the coordinator's connection on `host` of the pool, with the
/// pool's credentials, TLS and socket settings and the `application_name`
/// given; outside the pool and its budget (the coordinator holds a token of
/// its own). Fails once the pool is gone.
pub(super) fn coordinator_connector(pool: &Arc<PoolInner>, host: usize) -> Connector {
    let pool: Weak<PoolInner> = Arc::downgrade(pool);
    Arc::new(move |application_name: String| {
        let pool = pool.clone();
        Box::pin(async move {
            let pool = pool
                .upgrade()
                .ok_or_else(|| Error::closed("the pool that opened the coordinator closed"))?;
            let entry = pool.hosts.entry(host);
            let deadline = pool.config.connect_timeout;
            let connect = async {
                let mut pg = pool.credentials.for_connect(&pool.label).await?;
                pg.application_name(&application_name);
                let options = conn::SocketOptions::of(&pool.config);
                conn::connect(&entry.target, &pg, &options, &entry.tls, 0, None).await
            };
            tokio::time::timeout(deadline, connect).await.map_err(|_| {
                Error::connect_timed_out(
                    deadline,
                    format!("opening the replicas' coordinator on {}", entry.server),
                )
            })?
        })
    })
}
