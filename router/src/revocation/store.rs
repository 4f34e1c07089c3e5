//! With the embedded bus and `--data-dir DIR`: deny-list entries kept in
//! `DIR/denylist.redb` (redb: an embedded, crash-safe key-value store), one per
//! (kind, id), read at start. Entries whose time is up are removed as the file is read.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Entry, Kind};

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("denylist");

pub(crate) struct Store {
    db: Database,
}

fn key(e: &Entry) -> String {
    let kind = match e.kind {
        Kind::Device => "device",
        Kind::Jti => "jti",
    };
    format!("{kind}/{}", e.id)
}

impl Store {
    pub(crate) fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("--data-dir {}: {e}", dir.display()))?;
        let path = dir.join("denylist.redb");
        let db = Database::create(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        Ok(Store { db })
    }

    /// Every entry still in force, the others removed.
    pub(crate) fn load(&self) -> anyhow::Result<Vec<Entry>> {
        let now = crate::auth::unix_now();
        let mut live = Vec::new();
        let mut gone = Vec::new();
        {
            let r = self.db.begin_read()?;
            let t = match r.open_table(ENTRIES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(live),
                Err(e) => return Err(e.into()),
            };
            for item in t.iter()? {
                let (k, v) = item?;
                match serde_json::from_slice::<Entry>(v.value()) {
                    Ok(e) if e.until > now => live.push(e),
                    _ => gone.push(k.value().to_string()),
                }
            }
        }
        if !gone.is_empty() {
            let w = self.db.begin_write()?;
            {
                let mut t = w.open_table(ENTRIES)?;
                for k in &gone {
                    t.remove(k.as_str())?;
                }
            }
            w.commit()?;
        }
        Ok(live)
    }

    /// Keep `e` (a withdrawal removes its key); committed when this returns.
    pub(crate) fn put(&self, e: &Entry) -> anyhow::Result<()> {
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(ENTRIES)?;
            if e.until == 0 {
                t.remove(key(e).as_str())?;
            } else {
                t.insert(key(e).as_str(), serde_json::to_vec(e)?.as_slice())?;
            }
        }
        w.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_outlive_the_store_and_expired_ones_are_dropped() {
        let dir = std::env::temp_dir().join(format!("hive-deny-{}", uuid::Uuid::new_v4()));
        let now = crate::auth::unix_now();
        {
            let s = Store::open(&dir).unwrap();
            for (id, until) in [("a", now + 600), ("b", now - 1), ("c", now + 600)] {
                s.put(&Entry {
                    kind: Kind::Device,
                    id: id.into(),
                    until,
                    at: now,
                })
                .unwrap();
            }
            s.put(&Entry {
                kind: Kind::Device,
                id: "c".into(),
                until: 0,
                at: now,
            })
            .unwrap();
        }
        let s = Store::open(&dir).unwrap();
        let ids: Vec<String> = s.load().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["a"]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
