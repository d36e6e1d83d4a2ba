//! Streaming replication of a `TempCluster`: a standby made by a base
//! backup, its promotion, and a former primary back as a standby of the new
//! one.

use std::fs;
use std::path::Path;

use super::{cluster_dir, launch, TempCluster};
use crate::error::{Error, Result};
use crate::system::{as_postgres, chown_to_postgres, run};

/// What a cluster that takes part in replication needs: full page writes
/// and hint bits in the WAL (so that `pg_rewind` can turn a former primary
/// into a standby), and WAL kept for a standby that falls behind.
pub(super) const REPLICATION_SETTINGS: [(&str, &str); 4] = [
    ("full_page_writes", "on"),
    ("wal_log_hints", "on"),
    ("wal_keep_size", "64MB"),
    ("hot_standby_feedback", "on"),
];

impl TempCluster {
    /// Starts a streaming hot standby of this cluster (which must be
    /// running, best built with [`ClusterBuilder::replication`](crate::ClusterBuilder::replication)): a base
    /// backup (`pg_basebackup`) in a new directory, on its own free port,
    /// following this server. Returns when it accepts connections.
    ///
    /// # Errors
    /// If the backup or the start fails (with the end of the log).
    pub fn start_standby(&self) -> Result<TempCluster> {
        let dir = cluster_dir();
        fs::create_dir_all(&dir).map_err(|e| Error::io("create the standby directory", e))?;
        chown_to_postgres(&dir)?;
        let backup = self.base_backup(&dir.join("data"));
        if let Err(e) = backup {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        let settings = self.standby_settings(&dir);
        launch(self.bin.clone(), dir, settings, self.tls)
    }

    /// Makes this standby a primary (`pg_ctl promote`). Returns when it
    /// accepts writes.
    ///
    /// # Errors
    /// If pg_ctl fails or it is not a standby.
    pub fn promote(&self) -> Result<()> {
        self.pg_ctl(&["promote", "-w", "-t", "60"], "promote the standby")?;
        let _ = fs::remove_file(self.data.join("standby.signal"));
        Ok(())
    }

    /// Turns this stopped former primary into a standby of `primary` (the
    /// standby promoted in its place) and starts it: `pg_rewind` undoes
    /// what it wrote after the standby left it, or, if that cannot work, a
    /// fresh base backup replaces its data. Same port as before.
    ///
    /// # Errors
    /// If it is running, or neither way works.
    pub fn rejoin_as_standby_of(&self, primary: &TempCluster) -> Result<()> {
        if self.is_running() {
            return Err(Error::Io {
                what: "rejoin a running server as a standby (stop or kill it first)".into(),
                source: std::io::Error::other("the server is running"),
            });
        }
        let source = format!(
            "host={} port={} user=postgres dbname=postgres",
            primary.dir.display(),
            primary.port
        );
        // pg_rewind reads the new timeline from the source's control
        // file, which a promotion updates at its next checkpoint.
        run(
            as_postgres(&self.bin.join("psql"))
                .arg("-h")
                .arg(&primary.dir)
                .arg("-p")
                .arg(primary.port.to_string())
                .args([
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-qAt",
                    "-c",
                    "CHECKPOINT",
                ]),
            "checkpoint the new primary",
        )?;
        let mut rewind = as_postgres(&self.bin.join("pg_rewind"));
        rewind
            .arg("-D")
            .arg(&self.data)
            .arg(format!("--source-server={source}"))
            .arg("--no-sync");
        if run(&mut rewind, "rewind the former primary").is_err() {
            let _ = fs::remove_dir_all(&self.data);
            primary.base_backup(&self.data)?;
        }
        fs::write(self.data.join("standby.signal"), "")
            .map_err(|e| Error::io("write standby.signal", e))?;
        chown_to_postgres(&self.data)?;
        let settings = primary.standby_settings(&self.dir);
        self.write_settings(&settings)?;
        self.pg_ctl_start()
    }

    /// Whether the server is a standby (in recovery) now.
    ///
    /// # Errors
    /// If the admin query fails.
    pub async fn is_in_recovery(&self) -> Result<bool> {
        let client = self.admin().await?;
        let row = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| Error::query("pg_is_in_recovery()", e))?;
        Ok(row.get(0))
    }

    /// A base backup of this server into `data` (which must not exist),
    /// over its Unix socket.
    fn base_backup(&self, data: &Path) -> Result<()> {
        run(
            as_postgres(&self.bin.join("pg_basebackup"))
                .arg("-h")
                .arg(&self.dir)
                .arg("-p")
                .arg(self.port.to_string())
                .args([
                    "-U",
                    "postgres",
                    "-X",
                    "stream",
                    "--no-sync",
                    "-c",
                    "fast",
                    "-R",
                ])
                .arg("-D")
                .arg(data),
            "take a base backup",
        )
    }

    /// The settings of a standby of this server living in `dir`: this
    /// server's own (replication ones included), and where to stream from.
    fn standby_settings(&self, dir: &Path) -> Vec<(String, String)> {
        let mut settings = self.settings.clone();
        for (name, value) in REPLICATION_SETTINGS {
            settings.push((name.to_owned(), value.to_owned()));
        }
        settings.push((
            "primary_conninfo".to_owned(),
            format!(
                "host={} port={} user=postgres application_name={}",
                self.dir.display(),
                self.port,
                dir.file_name()
                    .map_or("standby".into(), |n| n.to_string_lossy().replace('-', "_"))
            ),
        ));
        settings
    }
}
