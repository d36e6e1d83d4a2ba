//! One memory layer's store: its table and its own handle to the shared
//! pool, and full-text search over it.

use pgfleet::PoolHandle;
use serde::Serialize;

use crate::error::MemoryError;

/// A memory layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Layer {
    /// Raw messages.
    M0,
    /// Episodes.
    M1,
    /// Facts.
    M2,
}

impl Layer {
    fn table(self) -> &'static str {
        match self {
            Layer::M0 => "m0_messages",
            Layer::M1 => "m1_episodes",
            Layer::M2 => "m2_facts",
        }
    }
}

/// One search hit.
#[derive(Debug, Clone, Serialize)]
pub struct Hit {
    /// The layer it came from.
    pub layer: Layer,
    /// Row id in the layer's table.
    pub id: i64,
    /// The text.
    pub content: String,
    /// `ts_rank` score.
    pub score: f32,
}

/// One layer's store: its table and its handle to the shared pool.
pub struct Store {
    layer: Layer,
    pool: PoolHandle,
    /// The search of this layer's table (built once).
    search: String,
}

impl Store {
    /// The store of `layer`, on `pool`.
    pub fn new(layer: Layer, pool: PoolHandle) -> Store {
        let search = format!(
            "SELECT id, content, ts_rank(tsv, q) AS score FROM {}, to_tsquery('simple', $2) q \
             WHERE user_id = $1 AND tsv @@ q ORDER BY score DESC, id DESC LIMIT $3",
            layer.table()
        );
        Store {
            layer,
            pool,
            search,
        }
    }

    /// The store's handle to the pool.
    pub fn pool(&self) -> &PoolHandle {
        &self.pool
    }

    /// The `top_k` best matches of `tsquery` among `user`'s rows.
    ///
    /// # Errors
    /// The pool's or the server's error.
    pub async fn search(
        &self,
        user: &str,
        tsquery: &str,
        top_k: i64,
    ) -> Result<Vec<Hit>, MemoryError> {
        // One statement in autocommit: the pool's statement methods pipeline
        // it with the other users' searches on a few shared connections,
        // prepared once per connection.
        let rows = self
            .pool
            .query(&self.search, &[&user, &tsquery, &top_k])
            .await?;
        Ok(rows
            .iter()
            .map(|r| Hit {
                layer: self.layer,
                id: r.get(0),
                content: r.get(1),
                score: r.get(2),
            })
            .collect())
    }
}
