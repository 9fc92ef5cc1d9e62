//! Backups from the client side: one backup to a file ([`Client::backup`]), backups on a
//! schedule into a directory with retention ([`run_schedule`]), and what a backup file holds
//! ([`describe`]). The file format is `raftpg_proto::backup`; a new cluster is seeded from a
//! file with `raftpg-node --restore-from`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use raftpg_proto::backup::BackupHeader;

use crate::Client;

/// Prefix and suffix of the files [`run_schedule`] writes and prunes.
const SCHEDULED_PREFIX: &str = "raftpg-";
const SCHEDULED_SUFFIX: &str = ".backup";

/// `YYYYMMDDTHHMMSSZ` of a time (UTC).
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A duration written as a number and a unit: `90s`, `30m`, `6h`, `1d`.
pub fn parse_every(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?}: give a unit (s, m, h or d), e.g. 6h"))?;
    let n: u64 = s[..split]
        .parse()
        .map_err(|_| format!("{s:?}: expected a number then s, m, h or d"))?;
    let unit = match &s[split..] {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("{s:?}: unknown unit {other:?} (s, m, h or d)")),
    };
    if n == 0 {
        return Err("the interval must be positive".into());
    }
    Ok(Duration::from_secs(n.saturating_mul(unit)))
}

/// Reads the whole backup at `path` and checks it (header, size, SHA-256).
pub fn verify(path: &Path) -> Result<BackupHeader, raftpg_proto::backup::BackupError> {
    raftpg_proto::backup::verify(path, None)
}

/// One line saying what a backup holds.
pub fn describe(h: &BackupHeader) -> String {
    let created = SystemTime::UNIX_EPOCH + Duration::from_millis(h.created_unix_ms);
    format!(
        "log index {} (term {}), {} bytes, taken from node {} at {}, PostgreSQL {}, voters {:?}, sha256 {}",
        h.log_index,
        h.log_term,
        h.bytes,
        h.node_id,
        utc_stamp(created),
        match h.postgres_version_num {
            0 => "unknown".to_string(),
            n => raftpg_proto::pg_version_words(n),
        },
        h.voters,
        h.sha256
    )
}

/// The scheduled backups in `dir`, oldest first (their names sort by time).
pub fn scheduled_backups(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(SCHEDULED_PREFIX) && n.ends_with(SCHEDULED_SUFFIX))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Deletes the oldest scheduled backups in `dir` beyond the newest `keep`; returns them.
pub fn prune(dir: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let files = scheduled_backups(dir)?;
    let excess = files.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for f in files.into_iter().take(excess) {
        std::fs::remove_file(&f)?;
        removed.push(f);
    }
    Ok(removed)
}

/// Takes a backup into `dir` now and every `every` after, keeping the newest `keep`, until
/// the process is stopped (or, with `rounds`, after that many). A failed backup is reported
/// and retried at the next round; older backups are deleted only after a new one succeeded.
pub async fn run_schedule(
    client: &Client,
    dir: &Path,
    every: Duration,
    keep: usize,
    from: Option<u64>,
    prepare: Duration,
    rounds: Option<u64>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // What a stopped scheduler left half-written.
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(SCHEDULED_PREFIX) && name.ends_with(".backup.partial") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let keep = keep.max(1);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut done = 0u64;
    loop {
        ticks.tick().await;
        // Milliseconds in the name: two backups never share one, and names sort by time.
        let now = SystemTime::now();
        let millis = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_millis())
            .unwrap_or(0);
        let stamp = utc_stamp(now);
        let path = dir.join(format!(
            "{SCHEDULED_PREFIX}{}.{millis:03}Z{SCHEDULED_SUFFIX}",
            stamp.trim_end_matches('Z')
        ));
        match client.backup(&path, from, prepare).await {
            Ok(h) => {
                println!("{}: {}", path.display(), describe(&h));
                match prune(dir, keep) {
                    Ok(removed) => {
                        for old in removed {
                            println!("removed {} (keeping {keep})", old.display());
                        }
                    }
                    Err(e) => eprintln!("error: removing old backups in {}: {e}", dir.display()),
                }
            }
            Err(e) => eprintln!("error: backup to {} failed: {e}", path.display()),
        }
        done += 1;
        if rounds.is_some_and(|r| done >= r) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_intervals_and_versions_read_as_written() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_796_601_600 + 3 * 3600 + 61);
        assert_eq!(utc_stamp(t), "20261207T030101Z");
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "20000229T000000Z"
        );
        assert_eq!(parse_every("6h"), Ok(Duration::from_secs(21_600)));
        assert_eq!(parse_every("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_every("6").is_err());
        assert!(parse_every("0m").is_err());
        assert!(parse_every("1w").is_err());
        assert_eq!(raftpg_proto::pg_version_words(150_018), "15.18");
        assert_eq!(raftpg_proto::pg_version_words(90_624), "9.6.24");
    }

    #[test]
    fn pruning_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("raftpg-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for stamp in ["20261201T000000Z", "20261203T000000Z", "20261202T000000Z"] {
            std::fs::write(dir.join(format!("raftpg-{stamp}.backup")), b"x").unwrap();
        }
        std::fs::write(dir.join("other.backup"), b"x").unwrap();
        let removed = prune(&dir, 2).unwrap();
        assert_eq!(removed, vec![dir.join("raftpg-20261201T000000Z.backup")]);
        assert_eq!(scheduled_backups(&dir).unwrap().len(), 2);
        assert!(dir.join("other.backup").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
