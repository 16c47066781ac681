//! How replies are shown to a person. Every value shown as text goes through `escape`
//! (names, ids and errors may come from a tenant or a remote service and hold control
//! characters); `--json` prints values as they are.

use crate::admin::Reply;
use crate::model::{rfc3339, size_text, Image, Job};
use crate::text::escape;

/// Columns; each cell escaped.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.iter().map(|cell| escape(cell).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

fn or_dash(value: Option<String>) -> String {
    value.unwrap_or_else(|| "-".into())
}

/// `key: value` lines; each value escaped.
fn fields(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", escape(v)))
        .collect()
}

fn image_fields(i: &Image) -> String {
    let pairs = [
        ("id", i.id.to_string()),
        ("name", i.name.clone()),
        ("owner", i.owner.clone()),
        ("region", i.region.clone()),
        ("status", i.status.to_string()),
        ("disk_format", i.disk_format.clone()),
        ("container_format", i.container_format.clone()),
        ("size", i.size.to_string()),
        ("checksum", or_dash(i.checksum.clone())),
        ("os_hash_algo", or_dash(i.os_hash_algo.clone())),
        ("os_hash_value", or_dash(i.os_hash_value.clone())),
        ("created_at", rfc3339(i.created_at)),
        ("updated_at", rfc3339(i.updated_at)),
    ];
    fields(&pairs)
}

fn job_fields(j: &Job) -> String {
    let w = &j.wire;
    let pairs = [
        ("job_id", w.job_id.to_string()),
        ("status", w.status.to_string()),
        ("copy_progress", w.copy_progress.to_string()),
        ("source_image_id", w.source_image_id.to_string()),
        ("source_image_name", w.source_image_name.clone()),
        ("source_region_id", w.source_region_id.clone()),
        ("source_tenant_id", w.source_tenant_id.clone()),
        (
            "destination_image_id",
            or_dash(w.destination_image_id.map(|i| i.to_string())),
        ),
        ("destination_region_id", w.destination_region_id.clone()),
        ("destination_tenant_id", w.destination_tenant_id.clone()),
        ("bytes", format!("{} of {}", j.bytes_copied, j.bytes_total)),
        ("bytes_verified", j.bytes_verified.to_string()),
        ("source_bytes_read", j.source_bytes_read.to_string()),
        ("resumes", j.resumes.to_string()),
        ("bytes_reused", j.bytes_reused.to_string()),
        ("bytes_fetched", j.bytes_fetched.to_string()),
        ("bytes_on_wire", j.bytes_on_wire.to_string()),
        ("error", or_dash(j.error.clone())),
        ("seeded", j.seeded.to_string()),
        ("created_at", rfc3339(j.created_at)),
        ("updated_at", rfc3339(j.updated_at)),
        ("started_at", or_dash(j.story.started_at.map(rfc3339))),
        ("finished_at", or_dash(j.story.finished_at.map(rfc3339))),
        ("retries", j.story.retries.to_string()),
        ("retry_of", or_dash(j.story.retry_of.map(|i| i.to_string()))),
        (
            "retried_by",
            or_dash(j.story.retried_by.map(|i| i.to_string())),
        ),
        (
            "kept_destination",
            or_dash(j.story.kept_destination.map(|i| i.to_string())),
        ),
    ];
    fields(&pairs)
}

/// `token list`: oldest first (a stable sort: tokens of one second keep the store's order);
/// without `all`, only the tokens that still work (neither revoked nor expired).
pub(super) fn tokens_shown(tokens: &mut Vec<crate::model::TokenInfo>, all: bool) {
    let now = crate::model::now();
    if !all {
        tokens.retain(|t| t.revoked_at.is_none() && t.expires_at.is_none_or(|at| at > now));
    }
    tokens.sort_by_key(|t| t.created_at);
}

/// Adds each region's `kind` (`directory`, `glance`, `peer`) to its JSON, which names the kind
/// only by its settings' key.
pub(super) fn name_region_kinds(reply: &Reply, json: Option<&mut serde_json::Value>) {
    let regions: Vec<&crate::model::Region> = match reply {
        Reply::Region(r) => vec![r],
        Reply::Regions(list) => list.iter().collect(),
        _ => return,
    };
    let objects: Vec<&mut serde_json::Value> = match json {
        Some(serde_json::Value::Array(items)) => items.iter_mut().collect(),
        Some(object) => vec![object],
        None => return,
    };
    for (region, object) in regions.into_iter().zip(objects) {
        if let Some(map) = object.as_object_mut() {
            let kind = match region.kind.describe().0 {
                "glance+keystone" => "glance",
                kind => kind,
            };
            map.insert("kind".into(), kind.into());
        }
    }
}

pub(super) fn human(reply: &Reply, verb: &str) -> String {
    match reply {
        Reply::Region(r) => format!(
            "region {} {verb} ({})\n",
            escape(&r.id),
            escape(&r.kind.to_string())
        ),
        Reply::Regions(list) => table(
            &["ID", "KIND", "WHERE", "DISK FORMATS"],
            list.iter()
                .map(|r| {
                    let (kind, place) = r.kind.describe();
                    vec![r.id.clone(), kind.into(), place, r.disk_formats.join(",")]
                })
                .collect(),
        ),
        Reply::Tenant(t) => format!("tenant {} {verb}\n", escape(&t.id)),
        Reply::Tenants(list) => table(
            &["ID", "REGION", "NAME", "QUOTA-BYTES", "QUOTA-JOBS"],
            list.iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.region.clone(),
                        or_dash(t.name.clone()),
                        or_dash(t.quota_bytes.map(size_text)),
                        or_dash(t.quota_jobs.map(|n| n.to_string())),
                    ]
                })
                .collect(),
        ),
        Reply::User(u) => format!("user {} {verb}\n", escape(&u.name)),
        Reply::Users(list) => table(
            &["NAME", "ADMIN", "TENANTS"],
            list.iter()
                .map(|u| vec![u.name.clone(), u.admin.to_string(), u.tenants.join(",")])
                .collect(),
        ),
        Reply::UserRemoved {
            user,
            tokens_removed,
        } => format!(
            "user {} removed with {tokens_removed} token(s)\n",
            escape(&user.name)
        ),
        Reply::IssuedToken(issued) => format!("{}\n", escape(&issued.token)),
        Reply::Token(t) => format!("token {} {verb}\n", t.id),
        Reply::Tokens(list) => table(
            &["ID", "USER", "TENANT", "CREATED", "EXPIRES", "REVOKED"],
            list.iter()
                .map(|t| {
                    vec![
                        t.id.to_string(),
                        t.user.clone(),
                        t.tenant.clone(),
                        rfc3339(t.created_at),
                        or_dash(t.expires_at.map(rfc3339)),
                        or_dash(t.revoked_at.map(rfc3339)),
                    ]
                })
                .collect(),
        ),
        Reply::Image(i) if verb == "imported" => format!("{}\n", i.id),
        Reply::Image(i) if !verb.is_empty() => format!("image {} {verb}\n", i.id),
        Reply::Image(i) => image_fields(i),
        Reply::Images(list) => table(
            &["ID", "NAME", "OWNER", "REGION", "STATUS", "DISK", "SIZE"],
            list.iter()
                .map(|i| {
                    vec![
                        i.id.to_string(),
                        i.name.clone(),
                        i.owner.clone(),
                        i.region.clone(),
                        i.status.to_string(),
                        i.disk_format.clone(),
                        i.size.to_string(),
                    ]
                })
                .collect(),
        ),
        Reply::Seeded(s) => format!(
            "{} job(s) seeded, {} already present\n",
            s.inserted, s.unchanged
        ),
        Reply::Job(j) if verb == "retry" => format!("{}\n", j.wire.job_id),
        Reply::Job(j) if !verb.is_empty() => format!("job {} {verb}\n", j.wire.job_id),
        Reply::Job(j) => job_fields(j),
        Reply::JobShown(shown) => {
            let holder = or_dash(shown.holder.clone());
            format!("{}{}", job_fields(&shown.job), fields(&[("holder", holder)]))
        }
        Reply::Jobs(list) => table(
            &["JOB ID", "STATUS", "PROGRESS", "SOURCE IMAGE", "FROM", "TO", "DESTINATION TENANT"],
            list.iter()
                .map(|j| {
                    let w = &j.wire;
                    vec![
                        w.job_id.to_string(),
                        w.status.to_string(),
                        format!("{}%", w.copy_progress),
                        w.source_image_name.clone(),
                        w.source_region_id.clone(),
                        w.destination_region_id.clone(),
                        w.destination_tenant_id.clone(),
                    ]
                })
                .collect(),
        ),
        Reply::Purged { purged } => format!("{purged} job(s) purged\n"),
        Reply::UserUpdated {
            user,
            tokens_revoked,
        } => format!(
            "user {} updated (tenants {}; admin {}); {tokens_revoked} token(s) for removed tenants revoked\n",
            escape(&user.name),
            escape(&user.tenants.join(",")),
            user.admin
        ),
        Reply::Backup(b) => format!("backup of {}\n", b.summary()),
        Reply::Status(s) => format!(
            "server running, pid {}\nnode: {}\nlisten: {}\ndata dir: {}\ndatabase: {}\nactive copies: {}\nargon2 verifications: {}\ntoken cache: {} hits, {} misses, {} tokens\n",
            s.pid,
            escape(&s.node),
            escape(&s.listen),
            escape(&s.data_dir.display().to_string()),
            escape(&s.database),
            s.active_copies,
            s.auth.argon2_verifications,
            s.auth.cache_hits,
            s.auth.cache_misses,
            s.auth.cached_tokens
        ),
    }
}
