//! The daemon's store: one SQLite database (`<state-dir>/rustvisor.db`, WAL journal,
//! `synchronous=FULL`) holding VM definitions and policies, their runtime (VMM pid, socket,
//! state), their snapshots and the event and audit log.
//!
//! Every mutation is one transaction that also appends its event, so a daemon killed at any
//! moment leaves either the whole change or none of it. The schema is versioned
//! (`schema_version`) and brought up to date by [`MIGRATIONS`] when the store is opened.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::types::{
    Event, FirewallSpec, NetworkSpec, NicSpec, Policy, Resources, RestartPolicy, SnapshotInfo, VmConfig, VmState,
};

/// The schema, one step per version: `MIGRATIONS[i]` takes version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: definitions, runtime, events.
    "CREATE TABLE vms (
         name       TEXT PRIMARY KEY NOT NULL,
         spec       TEXT NOT NULL,               -- api::types::VmConfig as JSON
         restart    TEXT NOT NULL,               -- no | on-failure | always
         desired    TEXT NOT NULL,               -- running | stopped
         created_ms INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE runtime (
         name       TEXT PRIMARY KEY NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
         state      TEXT NOT NULL,               -- stopped | starting | running | paused | crashed
         pid        INTEGER,
         socket     TEXT,
         started_ms INTEGER,
         accel      TEXT,
         reason     TEXT,
         restarts   INTEGER NOT NULL DEFAULT 0
     ) STRICT;
     CREATE TABLE events (
         id         INTEGER PRIMARY KEY AUTOINCREMENT,
         time_ms    INTEGER NOT NULL,
         vm         TEXT,
         kind       TEXT NOT NULL,
         detail     TEXT NOT NULL,
         peer_uid   INTEGER,
         peer_pid   INTEGER
     ) STRICT;
     CREATE INDEX events_by_vm ON events(vm, id);",
    // 2: start-up policy, snapshots, the TCP client's address in the audit log.
    "ALTER TABLE vms ADD COLUMN autostart INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE vms ADD COLUMN start_order INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE vms ADD COLUMN start_delay_s INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE events ADD COLUMN peer_addr TEXT;
     CREATE TABLE snapshots (
         vm         TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
         name       TEXT NOT NULL,
         created_ms INTEGER NOT NULL,
         size_bytes INTEGER NOT NULL,             -- allocated on the host
         memory     INTEGER NOT NULL,             -- 1: the VMM's state and RAM are in it
         vm_state   TEXT NOT NULL,                -- the VM's state when it was taken
         spec       TEXT NOT NULL,                -- the VM's configuration then (JSON)
         disks      TEXT NOT NULL,                -- JSON: [[disk path, file in the snapshot]]
         PRIMARY KEY (vm, name)
     ) STRICT;",
    // 3: virtual networks, firewall groups, the VMs' NICs on them.
    "CREATE TABLE networks (
         name       TEXT PRIMARY KEY NOT NULL,
         spec       TEXT NOT NULL,                -- hostnet::NetworkSpec as JSON
         created_ms INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE firewalls (
         name       TEXT PRIMARY KEY NOT NULL,
         spec       TEXT NOT NULL,                -- hostnet::FirewallSpec as JSON
         created_ms INTEGER NOT NULL
     ) STRICT;
     ALTER TABLE vms ADD COLUMN nics TEXT NOT NULL DEFAULT '[]';  -- JSON [NicSpec]",
    // 4: storage pools, templates, backups.
    "CREATE TABLE pools (
         name       TEXT PRIMARY KEY NOT NULL,
         path       TEXT NOT NULL UNIQUE,
         created_ms INTEGER NOT NULL
     ) STRICT;
     ALTER TABLE vms ADD COLUMN template INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE backups (
         id         TEXT PRIMARY KEY NOT NULL,
         vm         TEXT NOT NULL,                -- the VM's name when it was made (may be gone)
         path       TEXT NOT NULL,
         created_ms INTEGER NOT NULL,
         bytes      INTEGER NOT NULL,
         sha256     TEXT NOT NULL                 -- the checksum a restore checks
     ) STRICT;",
    // 5: each VM's share of the host (CPU weight/limit/set, pinning, memory limit, OOM
    // priority, balloon floor).
    "ALTER TABLE vms ADD COLUMN resources TEXT NOT NULL DEFAULT '{}';  -- JSON Resources",
];

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value does not decode (the database was edited or is from a newer daemon).
    #[error("store: VM {vm}: bad stored {what}: {msg}")]
    Corrupt {
        /// The VM.
        vm: String,
        /// The column.
        what: &'static str,
        /// The decoding error.
        msg: String,
    },
    /// The database's schema is newer than this daemon knows.
    #[error("store: schema version {found} is newer than this rustvisor's {known}")]
    TooNew {
        /// The version in the file.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// A VM of that name is already defined.
    #[error("a VM named '{0}' already exists")]
    Duplicate(String),
    /// No VM of that name.
    #[error("no VM named '{0}'")]
    NotFound(String),
}

/// Who asked for a change: the Unix client's credentials (`SO_PEERCRED`), the TCP client's
/// address, or nobody for the daemon's own actions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    /// The client's user ID.
    pub uid: Option<u32>,
    /// The client's process ID.
    pub pid: Option<i32>,
    /// The TCP client's address (`--listen`).
    pub addr: Option<std::net::SocketAddr>,
}

/// An event to append with a change.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The VM concerned.
    pub vm: Option<String>,
    /// What happened (see [`Event::kind`]).
    pub kind: &'static str,
    /// For a person.
    pub detail: String,
    /// Who asked.
    pub peer: Peer,
}

impl NewEvent {
    /// An event about `vm`.
    pub fn vm(vm: &str, kind: &'static str, detail: impl Into<String>, peer: Peer) -> NewEvent {
        NewEvent { vm: Some(vm.to_string()), kind, detail: detail.into(), peer }
    }
}

/// A VM's runtime row: what runs for it now.
#[derive(Debug, Clone, PartialEq)]
pub struct Runtime {
    /// Its state.
    pub state: VmState,
    /// The VMM's pid while one exists.
    pub pid: Option<u32>,
    /// The VMM's API socket while one exists.
    pub socket: Option<String>,
    /// When the VMM was started (Unix ms).
    pub started_ms: Option<i64>,
    /// The accelerator in use.
    pub accel: Option<String>,
    /// Why it stopped or crashed.
    pub reason: Option<String>,
    /// Restarts by the policy since the last start asked through the API.
    pub restarts: u32,
}

impl Runtime {
    /// A VM with no VMM, in `state` for `reason`, keeping the restart count.
    pub fn down(state: VmState, reason: Option<String>, restarts: u32) -> Runtime {
        Runtime { state, pid: None, socket: None, started_ms: None, accel: None, reason, restarts }
    }
}

/// Everything stored about one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    /// Its name.
    pub name: String,
    /// Its configuration.
    pub config: VmConfig,
    /// Its restart and start-up policy.
    pub policy: Policy,
    /// Its NICs on the daemon's networks (MACs filled in at create).
    pub nics: Vec<NicSpec>,
    /// Its share of the host.
    pub resources: Resources,
    /// Whether it is a template (read-only disks; it is cloned, never started).
    pub template: bool,
    /// Whether it should be running (the user started it and did not stop it).
    pub desired_running: bool,
    /// When it was defined (Unix ms).
    pub created_ms: i64,
    /// What runs for it now.
    pub runtime: Runtime,
}

/// A snapshot as stored: what `GET .../snapshots` shows, and what a revert needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    /// Name, time, size, kind.
    pub info: SnapshotInfo,
    /// The VM's configuration when it was taken.
    pub config: VmConfig,
    /// Each copied disk: (the disk's path, the copy's file name in the snapshot folder).
    pub disks: Vec<(String, String)>,
}

/// A backup as the store records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupRow {
    /// Its id (`<vm>-<time>`).
    pub id: String,
    /// The VM it was made of.
    pub vm: String,
    /// Its directory.
    pub path: String,
    /// When (Unix ms).
    pub created_ms: i64,
    /// Size of its files, in bytes.
    pub bytes: i64,
    /// Its checksum (SHA-256 of its manifest), checked by a restore.
    pub sha256: String,
}

/// Called after each committed change that appended events.
pub type EventHook = Box<dyn Fn() + Send>;

/// The store (one connection; the daemon serialises access to it).
pub struct Store {
    conn: Connection,
    on_event: Option<EventHook>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("conn", &self.conn).finish_non_exhaustive()
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if absent) the database at `path` and migrates it to the current
    /// schema.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Store { conn, on_event: None })
    }

    /// Calls `hook` after every committed change that appended events (the daemon wakes
    /// `GET /events?follow=1` streams with it).
    pub fn set_event_hook(&mut self, hook: EventHook) {
        self.on_event = Some(hook);
    }

    fn notify(&self) {
        if let Some(h) = &self.on_event {
            h();
        }
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0))?)
    }

    /// Defines a VM (state `stopped`) and logs `event`, in one transaction.
    pub fn create_vm(
        &mut self,
        name: &str,
        config: &VmConfig,
        policy: &Policy,
        nics: &[NicSpec],
        resources: &Resources,
        event: &NewEvent,
    ) -> Result<(), StoreError> {
        let spec = encode_spec(name, config)?;
        let nics = serde_json::to_string(nics).map_err(|e| corrupt(name, "nics", e))?;
        let resources = serde_json::to_string(resources).map_err(|e| corrupt(name, "resources", e))?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row("SELECT EXISTS(SELECT 1 FROM vms WHERE name = ?1)", [name], |r| r.get(0))?;
        if exists {
            return Err(StoreError::Duplicate(name.into()));
        }
        tx.execute(
            "INSERT INTO vms (name, spec, restart, desired, created_ms, autostart, start_order, start_delay_s, nics,
                              resources)
             VALUES (?1, ?2, ?3, 'stopped', ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                name,
                spec,
                policy.restart.as_str(),
                now_ms(),
                policy.autostart,
                policy.start_order,
                policy.start_delay_s,
                nics,
                resources
            ],
        )?;
        tx.execute("INSERT INTO runtime (name, state, restarts) VALUES (?1, 'stopped', 0)", [name])?;
        insert_event(&tx, event)?;
        tx.commit()?;
        self.notify();
        Ok(())
    }

    /// Replaces a VM's configuration, policy, NICs and resources and logs `event`, in one
    /// transaction.
    pub fn update_vm(
        &mut self,
        name: &str,
        config: &VmConfig,
        policy: &Policy,
        nics: &[NicSpec],
        resources: &Resources,
        event: &NewEvent,
    ) -> Result<(), StoreError> {
        let spec = encode_spec(name, config)?;
        let nics = serde_json::to_string(nics).map_err(|e| corrupt(name, "nics", e))?;
        let resources = serde_json::to_string(resources).map_err(|e| corrupt(name, "resources", e))?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE vms SET spec = ?2, restart = ?3, autostart = ?4, start_order = ?5, start_delay_s = ?6, nics = ?7,
                            resources = ?8
             WHERE name = ?1",
            params![
                name,
                spec,
                policy.restart.as_str(),
                policy.autostart,
                policy.start_order,
                policy.start_delay_s,
                nics,
                resources
            ],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.into()));
        }
        insert_event(&tx, event)?;
        tx.commit()?;
        self.notify();
        Ok(())
    }

    /// One VM.
    pub fn get(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!("{SELECT_VM} WHERE v.name = ?1"))?;
        let row = stmt.query_row([name], raw_row).optional()?;
        row.map(decode).transpose()
    }

    /// VM `name`'s number: its row id, fixed for the definition's life (the jail's uid is
    /// derived from it); `None` for an unknown VM.
    pub fn vm_number(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT rowid FROM vms WHERE name = ?1")?;
        Ok(stmt.query_row([name], |r| r.get(0)).optional()?)
    }

    /// Every VM, by name.
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!("{SELECT_VM} ORDER BY v.name"))?;
        let rows = stmt.query_map([], raw_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(decode).collect()
    }

    /// Replaces a VM's runtime row, optionally its desired state, and logs `events`, in one
    /// transaction.
    pub fn set_runtime(
        &mut self,
        name: &str,
        rt: &Runtime,
        desired_running: Option<bool>,
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE runtime SET state = ?2, pid = ?3, socket = ?4, started_ms = ?5, accel = ?6, reason = ?7,
                 restarts = ?8 WHERE name = ?1",
            params![name, rt.state.as_str(), rt.pid, rt.socket, rt.started_ms, rt.accel, rt.reason, rt.restarts],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.into()));
        }
        if let Some(d) = desired_running {
            tx.execute(
                "UPDATE vms SET desired = ?2 WHERE name = ?1",
                params![name, if d { "running" } else { "stopped" }],
            )?;
        }
        for e in events {
            insert_event(&tx, e)?;
        }
        tx.commit()?;
        if !events.is_empty() {
            self.notify();
        }
        Ok(())
    }

    /// Forgets a VM (its runtime row goes with it) and logs `event`, in one transaction.
    pub fn delete_vm(&mut self, name: &str, event: &NewEvent) -> Result<(), StoreError> {
        self.change_one("DELETE FROM vms WHERE name = ?1", [name], name, event)
    }

    /// Runs `sql` (an UPDATE or DELETE of one row) and logs `event`, in one transaction.
    ///
    /// Errors: [`StoreError::NotFound`] naming `what` when no row matched (nothing changes).
    fn change_one(
        &mut self,
        sql: &str,
        params: impl rusqlite::Params,
        what: &str,
        event: &NewEvent,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if tx.execute(sql, params)? == 0 {
            return Err(StoreError::NotFound(what.into()));
        }
        insert_event(&tx, event)?;
        tx.commit()?;
        self.notify();
        Ok(())
    }

    /// Appends an event on its own.
    pub fn log(&mut self, event: &NewEvent) -> Result<(), StoreError> {
        insert_event(&self.conn, event)?;
        self.notify();
        Ok(())
    }

    /// Records snapshot `s` of `vm` and logs `event`, in one transaction.
    pub fn add_snapshot(&mut self, vm: &str, s: &SnapshotRecord, event: &NewEvent) -> Result<(), StoreError> {
        let spec = encode_spec(vm, &s.config)?;
        let disks = serde_json::to_string(&s.disks).map_err(|e| corrupt(vm, "snapshot disks", e))?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO snapshots (vm, name, created_ms, size_bytes, memory, vm_state, spec, disks)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                vm,
                s.info.name,
                s.info.created_ms,
                i64::try_from(s.info.size_bytes).unwrap_or(i64::MAX),
                s.info.memory,
                s.info.vm_state.as_str(),
                spec,
                disks
            ],
        )?;
        insert_event(&tx, event)?;
        tx.commit()?;
        self.notify();
        Ok(())
    }

    /// The snapshots of `vm`, oldest first.
    pub fn snapshots(&self, vm: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, created_ms, size_bytes, memory, vm_state, spec, disks FROM snapshots
             WHERE vm = ?1 ORDER BY created_ms, name",
        )?;
        let rows = stmt
            .query_map([vm], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, bool>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(name, created_ms, size, memory, state, spec, disks)| {
                Ok(SnapshotRecord {
                    info: SnapshotInfo {
                        name,
                        created_ms,
                        size_bytes: u64::try_from(size).unwrap_or(0),
                        memory,
                        vm_state: state.parse().map_err(|e: String| corrupt(vm, "snapshot state", e))?,
                    },
                    config: serde_json::from_str(&spec).map_err(|e| corrupt(vm, "snapshot spec", e))?,
                    disks: serde_json::from_str(&disks).map_err(|e| corrupt(vm, "snapshot disks", e))?,
                })
            })
            .collect()
    }

    /// The networks, by name.
    pub fn networks(&self) -> Result<Vec<NetworkSpec>, StoreError> {
        self.named_specs("networks")
    }

    /// The firewall groups, by name.
    pub fn firewalls(&self) -> Result<Vec<FirewallSpec>, StoreError> {
        self.named_specs("firewalls")
    }

    fn named_specs<T: serde::de::DeserializeOwned>(&self, table: &'static str) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!("SELECT name, spec FROM {table} ORDER BY name"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|(name, spec)| serde_json::from_str(&spec).map_err(|e| corrupt(&name, table, e))).collect()
    }

    /// Stores network `spec` (a new one, or a replacement when `replace`) and logs `event`.
    ///
    /// Errors: [`StoreError::Duplicate`] for a new one whose name is taken,
    /// [`StoreError::NotFound`] for a replacement of none.
    pub fn put_network(&mut self, spec: &NetworkSpec, replace: bool, event: &NewEvent) -> Result<(), StoreError> {
        let json = serde_json::to_string(spec).map_err(|e| corrupt(&spec.name, "networks", e))?;
        self.put_named("networks", &spec.name, &json, replace, event)
    }

    /// Stores firewall group `spec` (a new one, or a replacement when `replace`) and logs
    /// `event`.
    ///
    /// Errors: as [`Store::put_network`].
    pub fn put_firewall(&mut self, spec: &FirewallSpec, replace: bool, event: &NewEvent) -> Result<(), StoreError> {
        let json = serde_json::to_string(spec).map_err(|e| corrupt(&spec.name, "firewalls", e))?;
        self.put_named("firewalls", &spec.name, &json, replace, event)
    }

    fn put_named(
        &mut self,
        table: &'static str,
        name: &str,
        spec: &str,
        replace: bool,
        event: &NewEvent,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool =
            tx.query_row(&format!("SELECT EXISTS(SELECT 1 FROM {table} WHERE name = ?1)"), [name], |r| r.get(0))?;
        match (exists, replace) {
            (true, false) => return Err(StoreError::Duplicate(name.into())),
            (false, true) => return Err(StoreError::NotFound(name.into())),
            (true, true) => {
                tx.execute(&format!("UPDATE {table} SET spec = ?2 WHERE name = ?1"), params![name, spec])?;
            }
            (false, false) => {
                tx.execute(
                    &format!("INSERT INTO {table} (name, spec, created_ms) VALUES (?1, ?2, ?3)"),
                    params![name, spec, now_ms()],
                )?;
            }
        }
        insert_event(&tx, event)?;
        tx.commit()?;
        self.notify();
        Ok(())
    }

    /// Forgets network `name` and logs `event`.
    pub fn delete_network(&mut self, name: &str, event: &NewEvent) -> Result<(), StoreError> {
        self.delete_named("networks", name, event)
    }

    /// Forgets firewall group `name` and logs `event`.
    pub fn delete_firewall(&mut self, name: &str, event: &NewEvent) -> Result<(), StoreError> {
        self.delete_named("firewalls", name, event)
    }

    fn delete_named(&mut self, table: &'static str, name: &str, event: &NewEvent) -> Result<(), StoreError> {
        self.change_one(&format!("DELETE FROM {table} WHERE name = ?1"), [name], name, event)
    }

    /// Marks VM `name` a template (or not) and logs `event`.
    pub fn set_template(&mut self, name: &str, template: bool, event: &NewEvent) -> Result<(), StoreError> {
        self.change_one("UPDATE vms SET template = ?2 WHERE name = ?1", params![name, template], name, event)
    }

    /// The pools: (name, path), by name.
    pub fn pools(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT name, path FROM pools ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Records pool `name` at `path` and logs `event`.
    ///
    /// Errors: [`StoreError::Duplicate`] when the name or the path is taken.
    pub fn add_pool(&mut self, name: &str, path: &str, event: &NewEvent) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM pools WHERE name = ?1 OR path = ?2)",
            params![name, path],
            |r| r.get(0),
        )?;
        if taken {
            return Err(StoreError::Duplicate(name.into()));
        }
        tx.execute("INSERT INTO pools (name, path, created_ms) VALUES (?1, ?2, ?3)", params![name, path, now_ms()])?;
        insert_event(&tx, event)?;
        tx.commit()?;
        self.notify();
        Ok(())
    }

    /// Forgets pool `name` and logs `event`.
    pub fn delete_pool(&mut self, name: &str, event: &NewEvent) -> Result<(), StoreError> {
        self.delete_named("pools", name, event)
    }

    /// The backups, oldest first: (id, vm, path, created_ms, bytes, sha256).
    pub fn backups(&self) -> Result<Vec<BackupRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, vm, path, created_ms, bytes, sha256 FROM backups ORDER BY created_ms, id")?;
        let rows = stmt.query_map([], |r| {
            Ok(BackupRow {
                id: r.get(0)?,
                vm: r.get(1)?,
                path: r.get(2)?,
                created_ms: r.get(3)?,
                bytes: r.get(4)?,
                sha256: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Records backup `b` and logs `event`.
    pub fn add_backup(&mut self, b: &BackupRow, event: &NewEvent) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO backups (id, vm, path, created_ms, bytes, sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![b.id, b.vm, b.path, b.created_ms, b.bytes, b.sha256],
        )?;
        insert_event(&tx, event)?;
        tx.commit()?;
        self.notify();
        Ok(())
    }

    /// Forgets backup `id` and logs `event`.
    pub fn delete_backup(&mut self, id: &str, event: &NewEvent) -> Result<(), StoreError> {
        self.change_one("DELETE FROM backups WHERE id = ?1", [id], id, event)
    }

    /// Forgets snapshot `name` of `vm` and logs `event`, in one transaction.
    pub fn delete_snapshot(&mut self, vm: &str, name: &str, event: &NewEvent) -> Result<(), StoreError> {
        self.change_one("DELETE FROM snapshots WHERE vm = ?1 AND name = ?2", [vm, name], &format!("{vm}/{name}"), event)
    }

    /// Events after id `after`, of `vm` if given, oldest first, at most `limit`.
    pub fn events(&self, vm: Option<&str>, after: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, time_ms, vm, kind, detail, peer_uid, peer_pid, peer_addr FROM events
             WHERE id > ?1 AND (?2 IS NULL OR vm = ?2) ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after, vm, limit], |r| {
            Ok(Event {
                id: r.get(0)?,
                time_ms: r.get(1)?,
                vm: r.get(2)?,
                kind: r.get(3)?,
                detail: r.get(4)?,
                peer_uid: r.get(5)?,
                peer_pid: r.get(6)?,
                peer_addr: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

const SELECT_VM: &str = "SELECT v.name, v.spec, v.restart, v.desired, v.created_ms, r.state, r.pid, r.socket,
     r.started_ms, r.accel, r.reason, r.restarts, v.autostart, v.start_order, v.start_delay_s, v.nics, v.template,
     v.resources
     FROM vms v JOIN runtime r ON r.name = v.name";

/// A row of [`SELECT_VM`] before decoding.
type RawRow = (
    String,
    String,
    String,
    String,
    i64,
    String,
    Option<u32>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
    u32,
    bool,
    u32,
    u32,
    String,
    bool,
    String,
);

fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
        r.get(14)?,
        r.get(15)?,
        r.get(16)?,
        r.get(17)?,
    ))
}

fn decode(row: RawRow) -> Result<VmRecord, StoreError> {
    let (
        name,
        spec,
        restart,
        desired,
        created_ms,
        state,
        pid,
        socket,
        started_ms,
        accel,
        reason,
        restarts,
        autostart,
        start_order,
        start_delay_s,
        nics,
        template,
        resources,
    ) = row;
    let corrupt = |what, msg: String| StoreError::Corrupt { vm: name.clone(), what, msg };
    let config: VmConfig = serde_json::from_str(&spec).map_err(|e| corrupt("spec", e.to_string()))?;
    let restart: RestartPolicy = restart.parse().map_err(|e| corrupt("restart", e))?;
    let state: VmState = state.parse().map_err(|e| corrupt("state", e))?;
    let nics: Vec<NicSpec> = serde_json::from_str(&nics).map_err(|e| corrupt("nics", e.to_string()))?;
    let resources: Resources = serde_json::from_str(&resources).map_err(|e| corrupt("resources", e.to_string()))?;
    Ok(VmRecord {
        nics,
        resources,
        template,
        config,
        policy: Policy { restart, autostart, start_order, start_delay_s },
        desired_running: desired == "running",
        created_ms,
        runtime: Runtime { state, pid, socket, started_ms, accel, reason, restarts },
        name,
    })
}

fn insert_event(conn: &Connection, e: &NewEvent) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO events (time_ms, vm, kind, detail, peer_uid, peer_pid, peer_addr)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![now_ms(), e.vm, e.kind, e.detail, e.peer.uid, e.peer.pid, e.peer.addr.map(|a| a.to_string())],
    )?;
    Ok(())
}

fn corrupt(vm: &str, what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { vm: vm.into(), what, msg: e.to_string() }
}

fn encode_spec(vm: &str, config: &VmConfig) -> Result<String, StoreError> {
    serde_json::to_string(config).map_err(|e| corrupt(vm, "spec", e))
}

/// Brings the schema to `MIGRATIONS.len()`, each step in one transaction with its version.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let found: Option<i64> = tx.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).optional()?;
    let mut version = match found {
        Some(v) => v,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", [])?;
            0
        }
    };
    if version > known {
        return Err(StoreError::TooNew { found: version, known });
    }
    while version < known {
        let step = usize::try_from(version).unwrap_or(usize::MAX);
        tx.execute_batch(MIGRATIONS[step])?;
        version += 1;
        tx.execute("UPDATE schema_version SET version = ?1", [version])?;
        tracing::info!("store: migrated to schema version {version}");
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap()
    }

    fn temp_db(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rv-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("rustvisor.db")
    }

    #[test]
    fn create_update_delete_with_events() {
        let path = temp_db("cud");
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let peer = Peer { uid: Some(1000), pid: Some(42), addr: None };
        let on_failure = Policy { restart: RestartPolicy::OnFailure, ..Policy::default() };
        s.create_vm("a", &cfg(), &on_failure, &[], &Resources::default(), &NewEvent::vm("a", "defined", "", peer))
            .unwrap();
        assert!(matches!(
            s.create_vm(
                "a",
                &cfg(),
                &Policy::default(),
                &[],
                &Resources::default(),
                &NewEvent::vm("a", "defined", "", peer)
            ),
            Err(StoreError::Duplicate(_))
        ));
        let rt = Runtime {
            state: VmState::Running,
            pid: Some(7),
            socket: Some("/s".into()),
            started_ms: Some(1),
            accel: Some("emu".into()),
            reason: None,
            restarts: 2,
        };
        s.set_runtime("a", &rt, Some(true), &[NewEvent::vm("a", "started", "pid 7", Peer::default())]).unwrap();
        drop(s);
        // Reopening finds everything (and does not migrate again).
        let mut s = Store::open(&path).unwrap();
        let rec = s.get("a").unwrap().unwrap();
        assert_eq!(rec.runtime, rt);
        assert!(rec.desired_running);
        assert_eq!(rec.policy, on_failure);
        let ev = s.events(None, 0, 100).unwrap();
        assert_eq!(ev.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["defined", "started"]);
        assert_eq!((ev[0].peer_uid, ev[0].peer_pid), (Some(1000), Some(42)));
        assert_eq!(s.events(Some("b"), 0, 100).unwrap(), vec![]);
        s.delete_vm("a", &NewEvent::vm("a", "deleted", "", peer)).unwrap();
        assert!(s.get("a").unwrap().is_none());
        assert!(matches!(s.set_runtime("a", &rt, None, &[]), Err(StoreError::NotFound(_))));
        assert_eq!(s.events(Some("a"), 0, 100).unwrap().len(), 3, "events outlive the VM");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_version_1_store_migrates_and_keeps_its_vms() {
        let path = temp_db("v1");
        {
            let mut c = Connection::open(&path).unwrap();
            let tx = c.transaction().unwrap();
            tx.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);",
            )
            .unwrap();
            tx.execute_batch(MIGRATIONS[0]).unwrap();
            tx.execute(
                "INSERT INTO vms (name, spec, restart, desired, created_ms) VALUES ('old', ?1, 'always', 'stopped', 5)",
                [serde_json::to_string(&cfg()).unwrap()],
            )
            .unwrap();
            tx.execute("INSERT INTO runtime (name, state, restarts) VALUES ('old', 'stopped', 0)", []).unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let rec = s.get("old").unwrap().unwrap();
        assert_eq!(rec.policy, Policy { restart: RestartPolicy::Always, ..Policy::default() });
        assert!(s.snapshots("old").unwrap().is_empty());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn policy_updates_snapshots_and_the_event_hook() {
        let path = temp_db("snap");
        let mut s = Store::open(&path).unwrap();
        let events = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = events.clone();
        s.set_event_hook(Box::new(move || {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let ev = |kind| NewEvent::vm("a", kind, "", Peer::default());
        s.create_vm("a", &cfg(), &Policy::default(), &[], &Resources::default(), &ev("defined")).unwrap();
        let p = Policy { restart: RestartPolicy::OnFailure, autostart: true, start_order: 7, start_delay_s: 3 };
        let mut c2 = cfg();
        c2.memory_mib = 1024;
        s.update_vm("a", &c2, &p, &[], &Resources::default(), &ev("updated")).unwrap();
        let rec = s.get("a").unwrap().unwrap();
        assert_eq!((rec.policy, rec.config.memory_mib), (p, 1024));
        assert!(matches!(
            s.update_vm("b", &c2, &p, &[], &Resources::default(), &ev("updated")),
            Err(StoreError::NotFound(_))
        ));

        let snap = |name: &str, t| SnapshotRecord {
            info: SnapshotInfo {
                name: name.into(),
                created_ms: t,
                size_bytes: 4096,
                memory: true,
                vm_state: VmState::Running,
            },
            config: cfg(),
            disks: vec![("/d.raw".into(), "disk0.img".into())],
        };
        s.add_snapshot("a", &snap("s2", 20), &ev("snapshot-created")).unwrap();
        s.add_snapshot("a", &snap("s1", 10), &ev("snapshot-created")).unwrap();
        assert!(s.add_snapshot("a", &snap("s1", 30), &ev("snapshot-created")).is_err(), "names are unique per VM");
        let list = s.snapshots("a").unwrap();
        assert_eq!(list.iter().map(|x| x.info.name.as_str()).collect::<Vec<_>>(), ["s1", "s2"], "oldest first");
        assert_eq!(list[0], snap("s1", 10));
        s.delete_snapshot("a", "s1", &ev("snapshot-deleted")).unwrap();
        assert!(matches!(s.delete_snapshot("a", "s1", &ev("snapshot-deleted")), Err(StoreError::NotFound(_))));
        s.delete_vm("a", &ev("deleted")).unwrap();
        assert!(s.snapshots("a").unwrap().is_empty(), "a VM's snapshots go with it");
        // defined, updated, 2 snapshots, 1 delete, deleted: each committed change told the hook.
        assert_eq!(events.load(std::sync::atomic::Ordering::SeqCst), 6);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let path = temp_db("newer");
        drop(Store::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.execute("UPDATE schema_version SET version = 99", []).unwrap();
        drop(c);
        assert!(matches!(Store::open(&path), Err(StoreError::TooNew { found: 99, .. })));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
