//! The services of one user (seed 004: memory, buffer, storage) over the
//! three layers' stores.
//!
//! * M0 — raw messages of a session;
//! * M1 — episodes: consecutive messages of a session grouped by four;
//! * M2 — facts: short statements about a user (given, or extracted from the
//!   user's own messages starting with "I " or "My ").

use pgfleet::{Fleet, PoolConfig, Target};
use serde::Serialize;

use crate::error::MemoryError;
use crate::store::{Hit, Layer, Store};

/// Messages per M1 episode.
pub const EPISODE_SIZE: usize = 4;

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

/// The services of one user, created once per user by the service cache.
pub struct UserServices {
    user: String,
    m0: Store,
    m1: Store,
    m2: Store,
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
    ) -> Result<Self, MemoryError> {
        let store = |layer| Ok::<_, MemoryError>(Store::new(layer, fleet.pool(target, config)?));
        Ok(UserServices {
            user: user.to_owned(),
            m0: store(Layer::M0)?,
            m1: store(Layer::M1)?,
            m2: store(Layer::M2)?,
        })
    }

    /// Storage service: writes messages to M0; buffer service: groups the
    /// session's pending messages into M1 episodes and extracts M2 facts.
    /// One transaction.
    ///
    /// # Errors
    /// The pool's or the server's error; nothing is stored then.
    pub async fn add_messages(
        &self,
        session: &str,
        messages: &[Message],
    ) -> Result<Stored, MemoryError> {
        let mut conn = self.m0.pool().get().await?;
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
    ///
    /// # Errors
    /// The pool's or the server's error.
    pub async fn add_facts(&self, facts: &[String]) -> Result<u64, MemoryError> {
        // One statement in autocommit: the statement methods pipeline it.
        let insert_facts = "INSERT INTO m2_facts (user_id, content, source) \
             SELECT $1, f, 'given' FROM unnest($2::text[]) f ON CONFLICT DO NOTHING";
        Ok(self
            .m2
            .pool()
            .execute(insert_facts, &[&self.user, &facts])
            .await?)
    }

    /// Memory service: searches the three layers concurrently and ranks the
    /// hits together.
    ///
    /// # Errors
    /// The first error of the three searches.
    pub async fn query(&self, tsquery: &str, top_k: usize) -> Result<Vec<Hit>, MemoryError> {
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
