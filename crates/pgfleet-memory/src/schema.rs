//! The tables of the three memory layers, created at start-up.

use std::time::Duration;

use pgfleet::PoolHandle;

use crate::error::MemoryError;

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

/// Creates the tables and indexes if they are missing, waiting at most
/// `limit` for a connection.
///
/// # Errors
/// The pool's or the server's error.
pub async fn create_schema(pool: &PoolHandle, limit: Duration) -> Result<(), MemoryError> {
    let mut conn = pool.get_timeout(limit).await?;
    let tx = conn.transaction().await?;
    tx.batch_execute(SCHEMA).await?;
    Ok(tx.commit().await?)
}
