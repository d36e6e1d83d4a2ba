//! What a statement's text says about the session, read without a round
//! trip: its first keyword, whether it is several statements, and which
//! session state it may leave behind (`SET`, `LISTEN`, session advisory
//! locks, temporary tables, SQL `PREPARE`, `WITH HOLD` cursors).
//!
//! A small lexer, not a parser: it skips string literals (`'…'`, `E'…'`),
//! dollar-quoted bodies and comments, reads quoted identifiers as words,
//! and splits statements at `;`. It errs on the side of "may have session state": a
//! word such as `pg_advisory_lock` outside a literal counts and a `DO` block
//! counts as every kind, which at
//! worst costs one reset round trip. What it cannot see is state left by
//! server-side code (a function that runs `SET` or takes a lock); the
//! server's ParameterStatus messages cover the settings it reports.

/// Session state a statement may leave behind, one bit per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Effects(u8);

impl Effects {
    /// Nothing.
    pub(crate) const NONE: Effects = Effects(0);
    /// A run-time setting or the role changed: `SET`, `RESET`,
    /// `set_config`, or a ParameterStatus from the server.
    pub(crate) const SETTINGS: Effects = Effects(1);
    /// `LISTEN`.
    pub(crate) const LISTEN: Effects = Effects(2);
    /// A session-level advisory lock.
    pub(crate) const ADVISORY: Effects = Effects(4);
    /// A temporary table, view or sequence.
    pub(crate) const TEMP: Effects = Effects(8);
    /// SQL `PREPARE`.
    pub(crate) const PREPARED: Effects = Effects(16);
    /// A `WITH HOLD` cursor.
    pub(crate) const CURSOR: Effects = Effects(32);
    /// `DISCARD ALL` or `DEALLOCATE`: the server dropped prepared
    /// statements, so the statement cache must forget them.
    pub(crate) const DROPPED_STATEMENTS: Effects = Effects(64);
    /// Every kind (text too long to read, or `reset = always`).
    pub(crate) const ALL: Effects = Effects(127);

    pub(crate) fn bits(self) -> u8 {
        self.0
    }

    pub(crate) fn from_bits(bits: u8) -> Effects {
        Effects(bits & Self::ALL.0)
    }

    pub(crate) fn contains(self, other: Effects) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// Session state proper: everything but `DROPPED_STATEMENTS`, which
    /// needs no reset.
    pub(crate) fn needs_reset(self) -> bool {
        self.0 & !Self::DROPPED_STATEMENTS.0 != 0
    }

    /// The kinds present, in words, for warnings.
    pub(crate) fn names(self) -> Vec<&'static str> {
        [
            (Self::SETTINGS, "SET"),
            (Self::LISTEN, "LISTEN"),
            (Self::ADVISORY, "a session advisory lock"),
            (Self::TEMP, "a temporary table"),
            (Self::PREPARED, "SQL PREPARE"),
            (Self::CURSOR, "a WITH HOLD cursor"),
        ]
        .into_iter()
        .filter(|(e, _)| self.contains(*e))
        .map(|(_, name)| name)
        .collect()
    }
}

impl std::ops::BitOr for Effects {
    type Output = Effects;
    fn bitor(self, rhs: Effects) -> Effects {
        Effects(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Effects {
    fn bitor_assign(&mut self, rhs: Effects) {
        self.0 |= rhs.0;
    }
}

/// The words of `sql`, statement by statement: `f(statement_index, word)`
/// for each identifier or keyword outside literals and comments, in
/// order. Returns the number of statements that have at least one word.
fn words(sql: &[u8], f: impl FnMut(usize, &[u8])) -> usize {
    lex(sql, f, |_| {})
}

/// [`words`], and `param(n)` for each parameter `$n`.
fn lex(sql: &[u8], mut f: impl FnMut(usize, &[u8]), mut param: impl FnMut(usize)) -> usize {
    let mut statement = 0;
    let mut statement_has_words = false;
    let mut count = 0;
    let mut i = 0;
    let n = sql.len();
    while i < n {
        let c = sql[i];
        match c {
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                while i < n && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                let mut depth = 1;
                i += 2;
                while i < n && depth > 0 {
                    if sql[i] == b'/' && sql.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if sql[i] == b'*' && sql.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => i = skip_quoted(sql, i, b'\'', false),
            b'"' => {
                // A quoted identifier is a word too (`"pg_advisory_lock"(1)`).
                let end = skip_quoted(sql, i, b'"', false);
                let inner = &sql[i + 1..end.saturating_sub(1).max(i + 1)];
                if !inner.is_empty() {
                    if !statement_has_words {
                        statement_has_words = true;
                        count += 1;
                    }
                    f(statement, inner);
                }
                i = end;
            }
            b'$' => {
                // `$tag$ … $tag$` (tag possibly empty); `$1` is a parameter.
                let tag_end = sql[i + 1..]
                    .iter()
                    .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(end)
                        if sql[end] == b'$' && !sql.get(i + 1).is_some_and(u8::is_ascii_digit) =>
                    {
                        let tag = &sql[i..=end];
                        let body = end + 1;
                        i = find(&sql[body..], tag).map_or(n, |p| body + p + tag.len());
                    }
                    _ => {
                        i += 1;
                        let start = i;
                        while i < n && sql[i].is_ascii_digit() {
                            i += 1;
                        }
                        if let Ok(index) = std::str::from_utf8(&sql[start..i])
                            .unwrap_or("")
                            .parse::<usize>()
                        {
                            param(index);
                        }
                    }
                }
            }
            b';' => {
                if statement_has_words {
                    statement += 1;
                    statement_has_words = false;
                }
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < n && (sql[i].is_ascii_alphanumeric() || sql[i] == b'_' || sql[i] >= 0x80)
                {
                    i += 1;
                }
                // E'…' strings take backslash escapes.
                if i - start == 1 && (c == b'e' || c == b'E') && sql.get(i) == Some(&b'\'') {
                    i = skip_quoted(sql, i, b'\'', true);
                    continue;
                }
                if !statement_has_words {
                    statement_has_words = true;
                    count += 1;
                }
                f(statement, &sql[start..i]);
            }
            _ => i += 1,
        }
    }
    count
}

/// The index after the literal that starts at `start` with `quote`
/// (doubled quotes inside; backslash escapes when `backslashes`).
fn skip_quoted(sql: &[u8], start: usize, quote: u8, backslashes: bool) -> usize {
    let mut i = start + 1;
    while i < sql.len() {
        if backslashes && sql[i] == b'\\' {
            i += 2;
        } else if sql[i] == quote {
            if sql.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    sql.len()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The first keyword of `sql`, upper-cased (`SELECT`, `COPY`, …), if any.
pub(crate) fn first_keyword(sql: &str) -> Option<String> {
    let mut first = None;
    words(sql.as_bytes(), |statement, word| {
        if statement == 0 && first.is_none() {
            first = Some(String::from_utf8_lossy(word).to_ascii_uppercase());
        }
    });
    first
}

/// The highest parameter number (`$n`) in `sql`: how many parameters it
/// takes; 0 for none.
pub(crate) fn param_count(sql: &str) -> usize {
    let mut max = 0;
    lex(sql.as_bytes(), |_, _| {}, |n| max = max.max(n));
    max
}

/// How many statements `sql` holds (empty ones not counted).
pub(crate) fn statement_count(sql: &str) -> usize {
    words(sql.as_bytes(), |_, _| {})
}

/// Why a text may not be pipelined with other callers' statements on one
/// connection (the statement methods on the pool run it on a connection of
/// its own instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exclusive {
    /// Several statements in one text: a failure would skip the rest, and
    /// they share one implicit transaction.
    Several,
    /// `COPY ... FROM STDIN` / `TO STDOUT`: a stream, which one call cannot
    /// carry.
    CopyStream,
    /// `COPY` to or from a file or program: it holds the connection for its
    /// whole transfer.
    Copy,
    /// `BEGIN`, `COMMIT`, `SAVEPOINT` and the like: the other callers'
    /// statements would run inside the transaction.
    Transaction,
    /// Cursors, `LOCK`, SQL `EXECUTE`, `LOAD`, `DISCARD`: they belong to one
    /// session (or one transaction block).
    Session,
    /// Statements that run outside any transaction block (`VACUUM`,
    /// `... CONCURRENTLY`, `CREATE DATABASE`, `ALTER SYSTEM`, `REINDEX`,
    /// `CLUSTER`) or may commit as they go (`CALL`): long, and a cancel does
    /// not undo what they did so far, so
    /// they are never pipelined (where a stray cancel is answered by running
    /// the statement again).
    Outside,
    /// Session state the text may leave behind (`SET`, `LISTEN`, advisory
    /// locks, temporary tables, `PREPARE`, `DEALLOCATE`).
    State(Effects),
}

/// Whether `sql` may be pipelined with other callers' statements: `None`
/// when it is one statement in autocommit that leaves nothing behind.
pub(crate) fn exclusive(sql: &str) -> Option<Exclusive> {
    let mut head = [0u8; 12];
    let mut head_len = usize::MAX;
    let mut stream = false;
    let mut outside = false;
    let mut position = 0;
    let count = words(sql.as_bytes(), |statement, word| {
        if statement != 0 {
            return;
        }
        let eq = |what: &[u8]| word.eq_ignore_ascii_case(what);
        if head_len == usize::MAX {
            head_len = if word.len() > head.len() {
                0
            } else {
                word.len()
            };
            head[..head_len].copy_from_slice(&word[..head_len]);
            head[..head_len].make_ascii_uppercase();
        } else if &head[..head_len] == b"COPY" && (eq(b"STDIN") || eq(b"STDOUT")) {
            stream = true;
        }
        let definition = matches!(&head[..head_len], b"CREATE" | b"DROP" | b"ALTER");
        let global = eq(b"DATABASE") || eq(b"TABLESPACE") || eq(b"SUBSCRIPTION") || eq(b"SYSTEM");
        if eq(b"CONCURRENTLY") || (position == 1 && definition && global) {
            outside = true;
        }
        position += 1;
    });
    if count > 1 {
        return Some(Exclusive::Several);
    }
    match head.get(..head_len).unwrap_or_default() {
        b"COPY" if stream => return Some(Exclusive::CopyStream),
        b"COPY" => return Some(Exclusive::Copy),
        b"BEGIN" | b"START" | b"COMMIT" | b"END" | b"ROLLBACK" | b"ABORT" | b"SAVEPOINT"
        | b"RELEASE" => return Some(Exclusive::Transaction),
        b"DECLARE" | b"FETCH" | b"MOVE" | b"CLOSE" | b"LOCK" | b"EXECUTE" | b"LOAD"
        | b"DISCARD" => return Some(Exclusive::Session),
        // A procedure may COMMIT part of its work.
        b"VACUUM" | b"REINDEX" | b"CLUSTER" | b"CALL" => return Some(Exclusive::Outside),
        _ if outside => return Some(Exclusive::Outside),
        _ => {}
    }
    let effects = effects(sql.as_bytes());
    (effects != Effects::NONE).then_some(Exclusive::State(effects))
}

/// The session state `sql` may leave behind.
pub(crate) fn effects(sql: &[u8]) -> Effects {
    let mut out = Effects::NONE;
    // Per statement: its first word (up to 12 bytes, upper-cased), the
    // position of the current word, and for a `SET`, whether it is only
    // for the transaction (`SET LOCAL`, `SET TRANSACTION`).
    let mut current = usize::MAX;
    let mut head = [0u8; 12];
    let mut head_len = 0;
    let mut position = 0;
    let mut set_local: Option<bool> = None;
    let mut temp_may_follow = false;
    let mut saw_update = false;
    let eq = |word: &[u8], what: &str| word.eq_ignore_ascii_case(what.as_bytes());
    let finish = |set_local: Option<bool>, out: &mut Effects| {
        if set_local == Some(false) {
            *out |= Effects::SETTINGS;
        }
    };
    words(sql, |statement, word| {
        if statement != current {
            finish(set_local.take(), &mut out);
            current = statement;
            position = 0;
            saw_update = false;
            head_len = if word.len() > head.len() {
                0
            } else {
                word.len()
            };
            head[..head_len].copy_from_slice(&word[..head_len]);
            head[..head_len].make_ascii_uppercase();
        }
        match (position, &head[..head_len]) {
            (0, b"SET") => set_local = Some(false),
            // An anonymous code block may do anything: every kind.
            (0, b"DO") => out |= Effects::ALL,
            (0, b"LISTEN") => out |= Effects::LISTEN,
            (0, b"PREPARE") => out |= Effects::PREPARED,
            (0, b"RESET") => out |= Effects::SETTINGS,
            (0, b"DEALLOCATE") => out |= Effects::DROPPED_STATEMENTS,
            (1, b"SET") if eq(word, "LOCAL") || eq(word, "TRANSACTION") => {
                set_local = Some(true);
            }
            // DISCARD ALL also resets the settings the pool gave the
            // session (behind a session pooler, the after_connect hook's).
            (1, b"DISCARD") if eq(word, "ALL") => {
                out |= Effects::DROPPED_STATEMENTS | Effects::SETTINGS;
            }
            // CREATE [OR REPLACE] [GLOBAL | LOCAL] TEMP[ORARY] ... and
            // SELECT ... INTO [GLOBAL | LOCAL] TEMP ..., wherever they stand
            // (EXPLAIN ANALYZE CREATE TEMP ...); a column named `temp` is
            // not one.
            _ if temp_may_follow && (eq(word, "TEMP") || eq(word, "TEMPORARY")) => {
                out |= Effects::TEMP;
            }
            (_, b"DECLARE") if eq(word, "HOLD") => out |= Effects::CURSOR,
            _ => {}
        }
        if word.len() >= 7 && word[..7].eq_ignore_ascii_case(b"pg_temp") {
            // pg_temp, pg_temp_3: the session's temporary schema.
            out |= Effects::TEMP;
        } else if eq(word, "set_config") || (eq(word, "pg_settings") && saw_update) {
            // `UPDATE pg_settings SET setting = ...` is a SET; reading
            // pg_settings is not.
            out |= Effects::SETTINGS;
        } else if word.len() >= 16 && word[..3].eq_ignore_ascii_case(b"pg_") {
            let lower = word.to_ascii_lowercase();
            if matches!(
                lower.as_slice(),
                b"pg_advisory_lock"
                    | b"pg_advisory_lock_shared"
                    | b"pg_try_advisory_lock"
                    | b"pg_try_advisory_lock_shared"
            ) {
                out |= Effects::ADVISORY;
            }
        }
        temp_may_follow = ["CREATE", "REPLACE", "LOCAL", "GLOBAL", "INTO"]
            .iter()
            .any(|w| eq(word, w));
        saw_update |= eq(word, "UPDATE");
        position += 1;
    });
    finish(set_local, &mut out);
    out
}

/// `name` as a quoted identifier, any `"` in it doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The start of a statement, for messages.
pub(crate) fn excerpt(sql: &str) -> String {
    let flat: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_statements_without_state_are_pipelined() {
        for sql in [
            "SELECT 1",
            "select $1::int + 1",
            "INSERT INTO t VALUES ($1) RETURNING id",
            "UPDATE t SET x = 1 WHERE id = $1",
            "SELECT 'BEGIN; SET x = 1' AS text",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT count(*) FROM d",
            "NOTIFY ch, 'x'",
            "SELECT temp, temporary FROM readings",
            "SELECT name, setting FROM pg_settings WHERE name = $1",
            "CREATE INDEX i ON t (a)",
            "SELECT 1;",
            "",
        ] {
            assert_eq!(exclusive(sql), None, "{sql}");
        }
        let cases = [
            ("SELECT 1; SELECT 2", Exclusive::Several),
            ("BEGIN", Exclusive::Transaction),
            ("commit", Exclusive::Transaction),
            ("SAVEPOINT a", Exclusive::Transaction),
            ("COPY t FROM STDIN", Exclusive::CopyStream),
            ("copy (select 1) to stdout", Exclusive::CopyStream),
            ("COPY t TO '/tmp/t.csv'", Exclusive::Copy),
            ("DECLARE c CURSOR FOR SELECT 1", Exclusive::Session),
            ("LOCK TABLE t", Exclusive::Session),
            ("DISCARD PLANS", Exclusive::Session),
            ("SET search_path = x", Exclusive::State(Effects::SETTINGS)),
            (
                "SELECT set_config('a.b', '1', false)",
                Exclusive::State(Effects::SETTINGS),
            ),
            ("LISTEN ch", Exclusive::State(Effects::LISTEN)),
            (
                "CREATE TEMP TABLE x (a int)",
                Exclusive::State(Effects::TEMP),
            ),
            (
                "SELECT pg_advisory_lock(1)",
                Exclusive::State(Effects::ADVISORY),
            ),
            (
                "DEALLOCATE ALL",
                Exclusive::State(Effects::DROPPED_STATEMENTS),
            ),
            ("SELECT 1 INTO TEMP t", Exclusive::State(Effects::TEMP)),
            (
                "SELECT 1 INTO LOCAL TEMP t",
                Exclusive::State(Effects::TEMP),
            ),
            (
                "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
                Exclusive::State(Effects::TEMP),
            ),
            ("SELECT * FROM pg_temp_3.t", Exclusive::State(Effects::TEMP)),
            ("CALL do_work()", Exclusive::Outside),
            (
                "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
                Exclusive::State(Effects::TEMP),
            ),
            ("VACUUM t", Exclusive::Outside),
            ("CREATE INDEX CONCURRENTLY i ON t (a)", Exclusive::Outside),
            ("DROP DATABASE x", Exclusive::Outside),
            ("ALTER SYSTEM SET work_mem = '8MB'", Exclusive::Outside),
        ];
        for (sql, why) in cases {
            assert_eq!(exclusive(sql), Some(why), "{sql}");
        }
    }

    fn of(sql: &str) -> Effects {
        effects(sql.as_bytes())
    }

    #[test]
    fn session_statements_are_seen() {
        assert_eq!(of("SET search_path = app"), Effects::SETTINGS);
        assert_eq!(of("set session work_mem = '64MB'"), Effects::SETTINGS);
        assert_eq!(of("SET ROLE app"), Effects::SETTINGS);
        assert_eq!(of("SET \"search_path\" = 'a'"), Effects::SETTINGS);
        assert_eq!(of("RESET ALL"), Effects::SETTINGS);
        assert_eq!(
            of("SELECT set_config('a.b', '1', false)"),
            Effects::SETTINGS
        );
        assert_eq!(of("LISTEN jobs"), Effects::LISTEN);
        assert_eq!(of("SELECT pg_advisory_lock(42)"), Effects::ADVISORY);
        assert_eq!(
            of("select PG_TRY_ADVISORY_LOCK_SHARED(1)"),
            Effects::ADVISORY
        );
        assert_eq!(of("CREATE TEMP TABLE t (x int)"), Effects::TEMP);
        assert_eq!(of("create temporary view v as select 1"), Effects::TEMP);
        assert_eq!(of("CREATE TABLE pg_temp.t (x int)"), Effects::TEMP);
        assert_eq!(of("SELECT 1 INTO TEMP t"), Effects::TEMP);
        assert_eq!(of("PREPARE p AS SELECT 1"), Effects::PREPARED);
        assert_eq!(
            of("DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
            Effects::CURSOR
        );
        assert_eq!(
            of("DISCARD ALL"),
            Effects::DROPPED_STATEMENTS | Effects::SETTINGS
        );
        assert_eq!(
            of("DO $$BEGIN PERFORM pg_advisory_lock(1); END$$"),
            Effects::ALL
        );
        assert_eq!(
            of("UPDATE pg_settings SET setting = '1MB' WHERE name = 'work_mem'"),
            Effects::SETTINGS
        );
        assert_eq!(of("SELECT \"pg_advisory_lock\"(1)"), Effects::ADVISORY);
        assert_eq!(of("DEALLOCATE ALL"), Effects::DROPPED_STATEMENTS);
    }

    #[test]
    fn ordinary_statements_leave_nothing() {
        for sql in [
            "SELECT 1",
            "UPDATE t SET x = 1",
            "SET LOCAL statement_timeout = 5",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT pg_advisory_unlock_all()",
            "DECLARE c CURSOR FOR SELECT 1",
            "INSERT INTO t VALUES ('SET x = 1; LISTEN y')",
            "SELECT $1::int -- LISTEN jobs",
            "SELECT /* SET a = 1; /* nested */ LISTEN */ 1",
            "SELECT $$ LISTEN x $$, $tag$ SET y $tag$",
            "SELECT E'it\\'s; LISTEN x'",
            "SELECT \"LISTEN\" FROM t",
            "UNLISTEN *",
            "DISCARD TEMP",
        ] {
            assert_eq!(of(sql), Effects::NONE, "{sql}");
        }
    }

    #[test]
    fn every_statement_of_a_script_counts() {
        assert_eq!(
            of("SELECT 1; SET a.b = 1; SELECT pg_advisory_lock(1)"),
            Effects::SETTINGS | Effects::ADVISORY
        );
        assert_eq!(of("BEGIN; UPDATE t SET x = 1; COMMIT"), Effects::NONE);
    }

    #[test]
    fn statements_and_first_keywords() {
        assert_eq!(statement_count("SELECT 1"), 1);
        assert_eq!(statement_count("SELECT 1;"), 1);
        assert_eq!(statement_count("SELECT ';'; SELECT 2"), 2);
        assert_eq!(statement_count(" ; -- nothing\n"), 0);
        assert_eq!(
            first_keyword("  /* c */ copy t from stdin").as_deref(),
            Some("COPY")
        );
        assert_eq!(first_keyword("-- x\nSELECT 1").as_deref(), Some("SELECT"));
        assert_eq!(first_keyword(""), None);
        assert_eq!(param_count("SELECT $1::int + $12, '$13', $$ $14 $$"), 12);
        assert_eq!(param_count("SELECT 1"), 0);
    }
}
