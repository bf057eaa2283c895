//! The plane's state in SQLite: resources (APIs, products, subscriptions, backends, named
//! values, the global policy document) as validated JSON, gateways, their tokens (hashed) and
//! their last heartbeat, and the configuration version.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::{json, Map, Value};

/// Resource kinds, as the admin API names them and as the document's sections are called.
pub(crate) const KINDS: [(&str, &str); 5] = [
    ("apis", "apis"),
    ("products", "products"),
    ("subscriptions", "subscriptions"),
    ("backends", "backends"),
    ("named-values", "named_values"),
];

/// The state.
pub(crate) struct Db(Mutex<Connection>);

/// Unix seconds.
pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn err(e: rusqlite::Error) -> String {
    format!("state database: {e}")
}

/// A refused change: status and problems.
#[derive(Debug)]
pub(crate) struct Refused {
    /// HTTP status.
    pub(crate) status: u16,
    /// Error code.
    pub(crate) code: &'static str,
    /// What is wrong.
    pub(crate) problems: Vec<String>,
}

impl Refused {
    fn new(status: u16, code: &'static str, problem: impl Into<String>) -> Self {
        Self {
            status,
            code,
            problems: vec![problem.into()],
        }
    }
}

impl From<String> for Refused {
    fn from(e: String) -> Self {
        Refused::new(500, "state_error", e)
    }
}

/// How a gateway token checked out.
pub(crate) enum TokenCheck {
    /// Valid, for this gateway, until then.
    Valid(String, u64),
    /// Unknown.
    Invalid,
    /// Revoked.
    Revoked,
    /// Past its expiry.
    Expired,
}

impl Db {
    /// Opens (creating) the database in WAL mode.
    pub(crate) fn open(path: &Path) -> Result<Db, String> {
        // It holds secrets (named values, subscription keys): private from its creation.
        {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
        }
        let c = Connection::open(path).map_err(|e| format!("database {}: {e}", path.display()))?;
        c.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        c.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        c.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS resources (kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (kind, id));
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS gateways (id TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS heartbeats (gateway TEXT NOT NULL, instance TEXT NOT NULL, at INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (gateway, instance));
             CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, gateway TEXT NOT NULL, expires INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
             INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0);",
        )
        .map_err(|e| format!("database {}: {e}", path.display()))?;
        Ok(Db(Mutex::new(c)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration version.
    pub(crate) fn version(&self) -> Result<u64, String> {
        let c = self.lock();
        c.query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|v| v as u64)
        .map_err(err)
    }

    /// Every resource of a kind.
    pub(crate) fn list(&self, kind: &str) -> Result<Vec<Value>, String> {
        let c = self.lock();
        list(&c, kind)
    }

    /// One resource.
    pub(crate) fn get(&self, kind: &str, id: &str) -> Result<Option<Value>, String> {
        let c = self.lock();
        c.query_row(
            "SELECT body FROM resources WHERE kind = ?1 AND id = ?2",
            params![kind, id],
            |r| r.get::<_, String>(0),
        )
        .optional()
        .map_err(err)?
        .map(|b| serde_json::from_str(&b).map_err(|e| e.to_string()))
        .transpose()
    }

    /// Creates or replaces a resource (`None`: deletes it), validating the whole configuration
    /// it would make, in one transaction. Answers the new version.
    pub(crate) fn change(
        &self,
        kind: &str,
        id: &str,
        body: Option<&Value>,
    ) -> Result<u64, Refused> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(err)?;
        let existed: bool = tx
            .query_row(
                "SELECT 1 FROM resources WHERE kind = ?1 AND id = ?2",
                params![kind, id],
                |_| Ok(()),
            )
            .optional()
            .map_err(err)?
            .is_some();
        match body {
            Some(b) => {
                tx.execute(
                    "INSERT OR REPLACE INTO resources (kind, id, body) VALUES (?1, ?2, ?3)",
                    params![kind, id, b.to_string()],
                )
                .map_err(err)?;
            }
            None if !existed => {
                return Err(Refused::new(404, "not_found", format!("no {kind} '{id}'")));
            }
            None => {
                tx.execute(
                    "DELETE FROM resources WHERE kind = ?1 AND id = ?2",
                    params![kind, id],
                )
                .map_err(err)?;
            }
        }
        let doc = document(&tx, None)?;
        if let Err(report) = outpost_config::ApiConfig::parse(&doc.to_string(), "configuration") {
            return Err(Refused {
                status: 400,
                code: "invalid_configuration",
                problems: report
                    .issues
                    .iter()
                    .map(|i| {
                        if i.path.is_empty() {
                            i.message.clone()
                        } else {
                            format!("{}: {}", i.path, i.message)
                        }
                    })
                    .collect(),
            });
        }
        check_shares(&tx)?;
        let version = bump(&tx)?;
        tx.commit().map_err(err)?;
        Ok(version)
    }

    /// The whole document (admins), or a gateway's share of it.
    pub(crate) fn document(&self, gateway: Option<&str>) -> Result<Value, Refused> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(err)?;
        document(&tx, gateway)
    }

    /// Creates or replaces a gateway (the APIs it serves).
    pub(crate) fn put_gateway(&self, id: &str, body: &Value) -> Result<u64, Refused> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(err)?;
        let apis = list(&tx, "apis")?;
        if let Some(assigned) = body.get("apis").and_then(Value::as_array) {
            for a in assigned {
                let Some(a) = a.as_str() else {
                    return Err(Refused::new(
                        400,
                        "invalid_request",
                        "apis must be a list of API ids",
                    ));
                };
                if !apis.iter().any(|x| x["id"] == a) {
                    return Err(Refused::new(
                        400,
                        "invalid_request",
                        format!("no API '{a}'"),
                    ));
                }
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO gateways (id, body) VALUES (?1, ?2)",
            params![id, body.to_string()],
        )
        .map_err(err)?;
        check_shares(&tx)?;
        let version = bump(&tx)?;
        tx.commit().map_err(err)?;
        Ok(version)
    }

    /// A gateway.
    pub(crate) fn gateway(&self, id: &str) -> Result<Option<Value>, String> {
        let c = self.lock();
        gateway(&c, id)
    }

    /// Every gateway with its last heartbeat.
    pub(crate) fn gateways(&self) -> Result<Vec<Value>, String> {
        let c = self.lock();
        let mut stmt = c
            .prepare("SELECT id, body FROM gateways ORDER BY id")
            .map_err(err)?;
        let gateways: Vec<(String, String)> = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let mut beats = c
            .prepare("SELECT instance, at, body FROM heartbeats WHERE gateway = ?1 ORDER BY at DESC, instance")
            .map_err(err)?;
        let mut out = Vec::new();
        for (id, body) in gateways {
            let mut v: Value = serde_json::from_str(&body).unwrap_or(json!({}));
            let instances: Vec<Value> = beats
                .query_map(params![id], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(err)?
                .filter_map(Result::ok)
                .map(|(instance, at, hb)| {
                    json!({
                        "instance_id": instance,
                        "last_heartbeat_at": at,
                        "heartbeat": serde_json::from_str::<Value>(&hb).unwrap_or(Value::Null),
                    })
                })
                .collect();
            v["id"] = json!(id);
            v["last_heartbeat_at"] = instances
                .first()
                .map_or(Value::Null, |i| i["last_heartbeat_at"].clone());
            v["heartbeat"] = instances
                .first()
                .map_or(Value::Null, |i| i["heartbeat"].clone());
            v["instances"] = Value::Array(instances);
            out.push(v);
        }
        Ok(out)
    }

    /// Stores a token (its SHA-256) for a gateway.
    pub(crate) fn add_token(&self, hash: &str, gateway: &str, expires: u64) -> Result<(), String> {
        let c = self.lock();
        c.execute(
            "DELETE FROM tokens WHERE expires < ?1",
            params![now_s() as i64 - 86_400],
        )
        .map_err(err)?;
        c.execute(
            "INSERT INTO tokens (hash, gateway, expires) VALUES (?1, ?2, ?3)",
            params![hash, gateway, expires as i64],
        )
        .map(|_| ())
        .map_err(err)
    }

    /// Revokes every token of a gateway; answers how many.
    pub(crate) fn revoke(&self, gateway: &str) -> Result<usize, String> {
        let c = self.lock();
        c.execute(
            "UPDATE tokens SET revoked = 1 WHERE gateway = ?1 AND revoked = 0",
            params![gateway],
        )
        .map_err(err)
    }

    /// Checks a token by its hash.
    pub(crate) fn check_token(&self, hash: &str) -> Result<TokenCheck, String> {
        let c = self.lock();
        let row = c
            .query_row(
                "SELECT gateway, expires, revoked FROM tokens WHERE hash = ?1",
                params![hash],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(err)?;
        Ok(match row {
            None => TokenCheck::Invalid,
            Some((_, _, revoked)) if revoked != 0 => TokenCheck::Revoked,
            Some((_, expires, _)) if (expires as u64) <= now_s() => TokenCheck::Expired,
            Some((g, expires, _)) => TokenCheck::Valid(g, expires as u64),
        })
    }

    /// Records a heartbeat.
    pub(crate) fn heartbeat(&self, gateway: &str, body: &Value) -> Result<(), String> {
        let c = self.lock();
        let instance = body["instance_id"].as_str().unwrap_or_default();
        // Instances silent for a week are gone (every restart is a new instance).
        c.execute(
            "DELETE FROM heartbeats WHERE gateway = ?1 AND at < ?2",
            params![gateway, now_s() as i64 - 7 * 86_400],
        )
        .map_err(err)?;
        c.execute(
            "INSERT OR REPLACE INTO heartbeats (gateway, instance, at, body) VALUES (?1, ?2, ?3, ?4)",
            params![gateway, instance, now_s() as i64, body.to_string()],
        )
        .map(|_| ())
        .map_err(err)
    }
}

/// Every gateway's share, as it would be sent (named values substituted), must be a valid
/// configuration too: otherwise the change is refused naming the gateway.
fn check_shares(tx: &Transaction<'_>) -> Result<(), Refused> {
    let ids: Vec<String> = {
        let mut stmt = tx
            .prepare("SELECT id FROM gateways ORDER BY id")
            .map_err(err)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)?
    };
    let mut problems = Vec::new();
    for id in ids {
        let share = document(tx, Some(&id))?;
        if let Err(report) = outpost_config::ApiConfig::parse(&share.to_string(), "snapshot") {
            for i in &report.issues {
                problems.push(format!("gateway '{id}': {}: {}", i.path, i.message));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Refused {
            status: 400,
            code: "invalid_configuration",
            problems,
        })
    }
}

fn bump(tx: &Transaction<'_>) -> Result<u64, String> {
    tx.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'version'",
        [],
    )
    .map_err(err)?;
    tx.query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v as u64)
    .map_err(err)
}

fn list(c: &Connection, kind: &str) -> Result<Vec<Value>, String> {
    let mut stmt = c
        .prepare_cached("SELECT body FROM resources WHERE kind = ?1 ORDER BY id")
        .map_err(err)?;
    let rows = stmt
        .query_map(params![kind], |r| r.get::<_, String>(0))
        .map_err(err)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(serde_json::from_str(&r.map_err(err)?).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn gateway(c: &Connection, id: &str) -> Result<Option<Value>, String> {
    c.query_row(
        "SELECT body FROM gateways WHERE id = ?1",
        params![id],
        |r| r.get::<_, String>(0),
    )
    .optional()
    .map_err(err)?
    .map(|b| serde_json::from_str(&b).map_err(|e| e.to_string()))
    .transpose()
}

/// Replaces `{{name}}` in every string of `v` with the named value.
fn substitute(v: &mut Value, named: &Map<String, Value>) {
    match v {
        Value::String(s) if s.contains("{{") => {
            for (k, val) in named {
                let pat = format!("{{{{{k}}}}}");
                if s.contains(&pat) {
                    *s = s.replace(&pat, val.as_str().unwrap_or_default());
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| substitute(x, named)),
        Value::Object(o) => o.values_mut().for_each(|x| substitute(x, named)),
        _ => {}
    }
}

/// The configuration document: everything (admins, validation), or a gateway's share with
/// named values substituted for `{{id}}` in every string of it.
fn document(tx: &Connection, gateway_id: Option<&str>) -> Result<Value, Refused> {
    let version = tx
        .query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(err)?;
    let mut doc = Map::new();
    for (kind, section) in KINDS {
        doc.insert(section.into(), Value::Array(list(tx, kind)?));
    }
    if let Some(g) = list(tx, "policies")?
        .into_iter()
        .find(|p| p["id"] == "global")
    {
        let mut g = g;
        if let Some(o) = g.as_object_mut() {
            o.remove("id");
        }
        doc.insert("policies".into(), g);
    }
    let Some(gw) = gateway_id else {
        doc.insert("version".into(), json!(version.to_string()));
        return Ok(Value::Object(doc));
    };
    let assigned: Vec<String> = match gateway(tx, gw)? {
        Some(g) => g["apis"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        None => {
            return Err(Refused::new(
                404,
                "unknown_gateway",
                format!("no gateway '{gw}'"),
            ))
        }
    };
    let keep = |id: &Value| id.as_str().is_some_and(|i| assigned.iter().any(|a| a == i));
    let apis: Vec<Value> = doc["apis"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| keep(&a["id"]))
        .collect();
    let backends_used: Vec<&Value> = apis.iter().map(|a| &a["backend"]).collect();
    let backends: Vec<Value> = doc["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|b| backends_used.contains(&&b["id"]))
        .collect();
    let mut products: Vec<Value> = doc["products"].as_array().cloned().unwrap_or_default();
    for p in &mut products {
        if let Some(list) = p.get_mut("apis").and_then(Value::as_array_mut) {
            list.retain(keep);
        }
    }
    let subscriptions: Vec<Value> = doc["subscriptions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s["scope"]["type"] != "api" || keep(&s["scope"]["id"]))
        .collect();
    let named: Map<String, Value> = doc["named_values"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| Some((n["id"].as_str()?.to_owned(), n["value"].clone())))
        .collect();
    let mut out = Map::new();
    out.insert("version".into(), json!(version.to_string()));
    out.insert("backends".into(), Value::Array(backends));
    out.insert("apis".into(), Value::Array(apis));
    out.insert("products".into(), Value::Array(products));
    out.insert("subscriptions".into(), Value::Array(subscriptions));
    if let Some(p) = doc.get("policies") {
        out.insert("policies".into(), p.clone());
    }
    let mut out = Value::Object(out);
    substitute(&mut out, &named);
    Ok(out)
}
