//! The memory model of `pgfleet serve`: three layers, each a store with its
//! own table and a pool handle from the fleet (so every store of every user
//! shares the one pool per database), and per-user services.
//!
//! * M0 — raw messages of a session;
//! * M1 — episodes: consecutive messages of a session grouped by four;
//! * M2 — facts: short statements about a user (given, or extracted from the
//!   user's own messages starting with "I " or "My ").
//!
//! Search is PostgreSQL full-text search (`simple` configuration) with GIN
//! indexes; results of the three layers are ranked together by `ts_rank`.

use std::sync::Arc;

use pgfleet::{Fleet, PoolConfig, PoolHandle, Target};
use serde::Serialize;

/// Messages per M1 episode.
pub const EPISODE_SIZE: usize = 4;

/// The schema; idempotent, serialised by an advisory lock so that several
/// replicas starting together do not race.
const SCHEMA: &str = "
SELECT pg_advisory_xact_lock(727274);
CREATE TABLE IF NOT EXISTS m0_messages (
    id bigserial PRIMARY KEY,
    user_id text NOT NULL,
    session_id text NOT NULL,
    role text NOT NULL,
    content text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', content)) STORED
);
CREATE INDEX IF NOT EXISTS m0_messages_tsv ON m0_messages USING gin (tsv);
CREATE INDEX IF NOT EXISTS m0_messages_session ON m0_messages (user_id, session_id, id);
CREATE TABLE IF NOT EXISTS m1_episodes (
    id bigserial PRIMARY KEY,
    user_id text NOT NULL,
    session_id text NOT NULL,
    first_message_id bigint NOT NULL,
    last_message_id bigint NOT NULL,
    content text NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', content)) STORED,
    UNIQUE (user_id, session_id, first_message_id)
);
CREATE INDEX IF NOT EXISTS m1_episodes_tsv ON m1_episodes USING gin (tsv);
CREATE TABLE IF NOT EXISTS m2_facts (
    id bigserial PRIMARY KEY,
    user_id text NOT NULL,
    content text NOT NULL,
    source text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', content)) STORED,
    UNIQUE (user_id, content)
);
CREATE INDEX IF NOT EXISTS m2_facts_tsv ON m2_facts USING gin (tsv);
";

/// Creates the tables and indexes if they are missing.
///
/// # Errors
/// The pool's or the server's error.
pub async fn create_schema(pool: &PoolHandle) -> Result<(), String> {
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    let tx = conn.transaction().await.map_err(|e| e.to_string())?;
    tx.batch_execute(SCHEMA).await.map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())
}

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

/// One layer's store: its table and its handle to the shared pool.
pub struct Store {
    layer: Layer,
    pool: PoolHandle,
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

impl Store {
    async fn search(
        &self,
        user: &str,
        tsquery: &str,
        top_k: i64,
    ) -> Result<Vec<Hit>, crate::api::ApiError> {
        let conn = self.pool.get().await?;
        let sql = format!(
            "SELECT id, content, ts_rank(tsv, q) AS score FROM {}, to_tsquery('simple', $2) q \
             WHERE user_id = $1 AND tsv @@ q ORDER BY score DESC, id DESC LIMIT $3",
            self.layer.table()
        );
        // Prepared once per connection: later searches skip the parse and
        // plan, and the round trip that preparing takes.
        let search = conn.prepare_cached(&sql).await?;
        let rows = conn.query(&search, &[&user, &tsquery, &top_k]).await?;
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

/// The services of one user (seed 004: memory, buffer, storage), created once
/// per user by the service cache.
pub struct UserServices {
    user: String,
    m0: Store,
    m1: Store,
    m2: Store,
}

/// The service names `precache_configs` may list.
pub const SERVICE_NAMES: &[&str] = &["memory", "buffer", "storage"];

/// What storing messages did.
#[derive(Debug, Serialize)]
pub struct Stored {
    /// M0 rows written.
    pub messages: usize,
    /// M1 episodes created.
    pub episodes: u64,
    /// M2 facts extracted.
    pub facts: u64,
}

/// A message to store.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `user`, `assistant` or `system`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl UserServices {
    /// The stores of `user`, each with its own handle to the shared pool.
    ///
    /// # Errors
    /// The fleet's error (closed, invalid configuration).
    pub fn new(
        fleet: &Fleet,
        target: &Target,
        config: &PoolConfig,
        user: &str,
    ) -> pgfleet::Result<Self> {
        Ok(UserServices {
            user: user.to_owned(),
            m0: Store {
                layer: Layer::M0,
                pool: fleet.pool(target, config)?,
            },
            m1: Store {
                layer: Layer::M1,
                pool: fleet.pool(target, config)?,
            },
            m2: Store {
                layer: Layer::M2,
                pool: fleet.pool(target, config)?,
            },
        })
    }

    /// Storage service: writes messages to M0; buffer service: groups the
    /// session's pending messages into M1 episodes and extracts M2 facts.
    /// One transaction.
    pub async fn add_messages(
        &self,
        session: &str,
        messages: &[Message],
    ) -> Result<Stored, crate::api::ApiError> {
        let mut conn = self.m0.pool.get().await?;
        // The connection's cached statements (prepared on its first use). All
        // four are taken before the transaction, which borrows the guard:
        // a fresh connection prepares the ones it may not need this time.
        let insert_messages = conn
            .prepare_cached(
                "INSERT INTO m0_messages (user_id, session_id, role, content) \
                 SELECT $1, $2, r, c FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS t(r, c, n) ORDER BY n",
            )
            .await?;
        // Pending messages: after the last episode of the session.
        let select_pending = conn
            .prepare_cached(
                "SELECT id, role, content FROM m0_messages WHERE user_id = $1 AND session_id = $2 AND id > \
                 coalesce((SELECT max(last_message_id) FROM m1_episodes WHERE user_id = $1 AND session_id = $2), 0) \
                 ORDER BY id",
            )
            .await?;
        let insert_episode = conn
            .prepare_cached(
                "INSERT INTO m1_episodes (user_id, session_id, first_message_id, last_message_id, content) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .await?;
        let insert_facts = conn
            .prepare_cached(
                "INSERT INTO m2_facts (user_id, content, source) SELECT $1, f, 'extracted' FROM unnest($2::text[]) f \
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        let tx = conn.transaction().await?;
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        tx.execute(&insert_messages, &[&self.user, &session, &roles, &contents])
            .await?;
        let pending = tx.query(&select_pending, &[&self.user, &session]).await?;
        let mut episodes = 0;
        for group in pending.chunks_exact(EPISODE_SIZE) {
            let text: Vec<String> = group
                .iter()
                .map(|r| format!("{}: {}", r.get::<_, String>(1), r.get::<_, String>(2)))
                .collect();
            episodes += tx
                .execute(
                    &insert_episode,
                    &[
                        &self.user,
                        &session,
                        &group[0].get::<_, i64>(0),
                        &group[EPISODE_SIZE - 1].get::<_, i64>(0),
                        &text.join("\n"),
                    ],
                )
                .await?;
        }
        let facts: Vec<&str> = messages
            .iter()
            .filter(|m| m.role == "user")
            .map(|m| m.content.trim())
            .filter(|c| is_fact(c))
            .collect();
        let extracted = if facts.is_empty() {
            0
        } else {
            tx.execute(&insert_facts, &[&self.user, &facts]).await?
        };
        tx.commit().await?;
        Ok(Stored {
            messages: messages.len(),
            episodes,
            facts: extracted,
        })
    }

    /// Stores facts given by the caller in M2; returns how many were new.
    pub async fn add_facts(&self, facts: &[String]) -> Result<u64, crate::api::ApiError> {
        let conn = self.m2.pool.get().await?;
        let insert_facts = conn
            .prepare_cached(
                "INSERT INTO m2_facts (user_id, content, source) SELECT $1, f, 'given' FROM unnest($2::text[]) f \
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        Ok(conn.execute(&insert_facts, &[&self.user, &facts]).await?)
    }

    /// Memory service: searches the three layers concurrently and ranks the
    /// hits together.
    pub async fn query(
        &self,
        tsquery: &str,
        top_k: usize,
    ) -> Result<Vec<Hit>, crate::api::ApiError> {
        let k = top_k as i64;
        let (m0, m1, m2) = tokio::try_join!(
            self.m0.search(&self.user, tsquery, k),
            self.m1.search(&self.user, tsquery, k),
            self.m2.search(&self.user, tsquery, k),
        )?;
        let mut hits: Vec<Hit> = m0.into_iter().chain(m1).chain(m2).collect();
        hits.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.layer.cmp(&b.layer))
                .then(b.id.cmp(&a.id))
        });
        hits.truncate(top_k);
        Ok(hits)
    }
}

/// A user message that states something about the user.
fn is_fact(text: &str) -> bool {
    let lower = text.to_lowercase();
    (lower.starts_with("i ") || lower.starts_with("my ")) && text.len() <= 300
}

/// The words of a query as an OR `tsquery` (`alpha | beta`), or `None` if it
/// has no searchable word. Only letters and digits reach the tsquery, so no
/// user input can change its syntax.
pub fn tsquery(query: &str) -> Option<String> {
    let words: Vec<String> = query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(32)
        .map(str::to_lowercase)
        .collect();
    (!words.is_empty()).then(|| words.join(" | "))
}

/// Shared state of the service.
pub struct App {
    /// The fleet.
    pub fleet: Fleet,
    /// The database.
    pub target: Target,
    /// Its pool configuration.
    pub config: PoolConfig,
    /// Per-user services.
    pub services: pgfleet::ServiceCache<String, UserServices>,
    /// Warm-up finished.
    pub ready: std::sync::atomic::AtomicBool,
}

impl App {
    /// The services of `user`, created once.
    pub async fn user(
        self: &Arc<Self>,
        user: &str,
    ) -> Result<Arc<UserServices>, crate::api::ApiError> {
        self.services
            .get_or_try_init(&user.to_owned(), || async {
                UserServices::new(&self.fleet, &self.target, &self.config, user)
                    .map_err(crate::api::ApiError::from)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_become_safe_or_tsqueries() {
        assert_eq!(
            tsquery("Where do I live?").as_deref(),
            Some("where | do | i | live")
        );
        assert_eq!(
            tsquery("a'b & c|d (e)").as_deref(),
            Some("a | b | c | d | e")
        );
        assert_eq!(tsquery("  ?!  "), None);
    }

    #[test]
    fn facts_are_first_person_statements() {
        assert!(is_fact("I live in Lisbon"));
        assert!(is_fact("My cat is called Miso"));
        assert!(!is_fact("Impressive"));
        assert!(!is_fact("what is my name"));
    }
}
