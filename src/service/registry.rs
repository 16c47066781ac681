//! Regions, tenants, users and tokens: who and where.

use std::collections::HashSet;

use uuid::Uuid;

use super::{check_format, check_name, parse_tenant, Service};
use crate::auth;
use crate::error::{Result, ServiceError};
use crate::model::{
    now, now_ceil, ImageStatus, Limit, Region, RegionKind, Tenant, TenantKey, TokenInfo,
    TokenRecord, User, DISK_FORMATS,
};

/// Longest token lifetime `--expires-in` takes (100 years).
const MAX_LIFETIME_SECS: u64 = 100 * 365 * 24 * 3600;

/// A new token, shown once.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub info: TokenInfo,
}

impl Service {
    /// Adds a region: a directory (`dir`, by default under the data directory) or a Glance.
    pub fn region_add(
        &self,
        id: &str,
        kind: Option<RegionKind>,
        disk_formats: Option<Vec<String>>,
        pin: Option<String>,
    ) -> Result<Region> {
        check_name("region id", id)?;
        let kind = kind.unwrap_or_else(|| RegionKind::Directory {
            dir: self.data_dir.join("regions").join(id),
        });
        let mut formats: Vec<String> = Vec::new();
        for f in disk_formats.unwrap_or_else(|| DISK_FORMATS.map(String::from).to_vec()) {
            check_format("disk format", &f, &DISK_FORMATS)?;
            if !formats.contains(&f) {
                formats.push(f);
            }
        }
        if formats.is_empty() {
            return Err(ServiceError::BadRequest(
                "a region must accept at least one disk format".into(),
            ));
        }
        let region = Region {
            id: id.to_string(),
            kind,
            disk_formats: formats,
            created_at: now(),
            pin,
        };
        let images = self
            .stores
            .get(&region)
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        if self.store.region(id)?.is_some() {
            return Err(ServiceError::Conflict(format!(
                "region {id} already exists"
            )));
        }
        images.prepare()?;
        if !self.store.insert_region(&region)? {
            return Err(ServiceError::Conflict(format!(
                "region {id} already exists"
            )));
        }
        self.flush()?;
        Ok(region)
    }

    pub fn region_list(&self) -> Result<Vec<Region>> {
        self.store.regions()
    }

    pub fn region_remove(&self, id: &str) -> Result<Region> {
        let region = self.region(id)?;
        let tenants: Vec<String> = self
            .store
            .tenants()?
            .into_iter()
            .filter(|t| t.region == id)
            .map(|t| t.id)
            .collect();
        if !tenants.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "region {id} is still the region of tenant(s) {}; remove them first",
                tenants.join(", ")
            )));
        }
        if let Some(image) = self
            .store
            .images(None)?
            .into_iter()
            .find(|i| i.region == id && i.status != ImageStatus::Deleted)
        {
            return Err(ServiceError::Conflict(format!(
                "region {id} still holds image {}; delete it first",
                image.id
            )));
        }
        self.store.remove_region(id)?;
        self.flush()?;
        Ok(region)
    }

    // ----- tenants -----

    pub fn tenant_add(&self, id: &str, region: &str, name: Option<String>) -> Result<Tenant> {
        self.tenant_add_with_quotas(id, region, name, None, None)
    }

    /// Adds a tenant with quotas of stored bytes and of active jobs (`None`: no limit).
    pub fn tenant_add_with_quotas(
        &self,
        id: &str,
        region: &str,
        name: Option<String>,
        quota_bytes: Option<u64>,
        quota_jobs: Option<u64>,
    ) -> Result<Tenant> {
        let key = parse_tenant(id)?;
        self.region(region)?;
        let tenant = Tenant {
            id: id.to_string(),
            region: region.to_string(),
            name,
            created_at: now(),
            quota_bytes,
            quota_jobs,
        };
        if !self.store.insert_tenant(key, &tenant)? {
            return Err(ServiceError::Conflict(format!(
                "tenant {id} already exists"
            )));
        }
        self.flush()?;
        Ok(tenant)
    }

    pub fn tenant_list(&self) -> Result<Vec<Tenant>> {
        self.store.tenants()
    }

    /// Sets or clears a tenant's quotas (`None`: left as they are). They apply to the next
    /// request; nothing accepted already is undone.
    pub fn tenant_update(
        &self,
        id: &str,
        quota_bytes: Option<Limit>,
        quota_jobs: Option<Limit>,
    ) -> Result<Tenant> {
        if quota_bytes.is_none() && quota_jobs.is_none() {
            return Err(ServiceError::BadRequest(
                "tenant update needs --quota-bytes or --quota-jobs".into(),
            ));
        }
        let (key, mut tenant) = self.tenant(id)?;
        if let Some(limit) = quota_bytes {
            tenant.quota_bytes = limit.value();
        }
        if let Some(limit) = quota_jobs {
            tenant.quota_jobs = limit.value();
        }
        if !self.store.update_tenant(key, &tenant)? {
            return Err(ServiceError::NotFound(format!("no tenant {id}")));
        }
        self.flush()?;
        Ok(tenant)
    }

    pub fn tenant_remove(&self, id: &str) -> Result<Tenant> {
        let (key, tenant) = self.tenant(id)?;
        let members: Vec<String> = self
            .store
            .users()?
            .into_iter()
            .filter(|u| u.tenants.iter().any(|t| TenantKey::parse(t) == Some(key)))
            .map(|u| u.name)
            .collect();
        if !members.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "tenant {id} still has member(s) {}; remove them first",
                members.join(", ")
            )));
        }
        let images = self.store.images(Some(key))?;
        if let Some(image) = images.iter().find(|i| i.status != ImageStatus::Deleted) {
            return Err(ServiceError::Conflict(format!(
                "tenant {id} still owns image {}; delete it first",
                image.id
            )));
        }
        if let Some(job) = self.store.tenant_has_jobs(key, &tenant.id)? {
            return Err(ServiceError::Conflict(format!(
                "tenant {id} is still named by job {job}"
            )));
        }
        self.store.remove_tenant(key)?;
        self.flush()?;
        Ok(tenant)
    }

    // ----- users -----

    pub fn user_add(&self, name: &str, tenants: &[String], admin: bool) -> Result<User> {
        check_name("user name", name)?;
        if tenants.is_empty() {
            return Err(ServiceError::BadRequest(
                "a user needs at least one --tenant".into(),
            ));
        }
        let mut stored: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for t in tenants {
            let (key, tenant) = self.tenant(t)?;
            if seen.insert(key) {
                stored.push(tenant.id);
            }
        }
        let user = User {
            name: name.to_string(),
            tenants: stored,
            admin,
            created_at: now(),
        };
        if !self.store.insert_user(&user)? {
            return Err(ServiceError::Conflict(format!(
                "user {name} already exists"
            )));
        }
        self.flush()?;
        Ok(user)
    }

    /// Adds and removes tenant memberships and sets or clears the admin flag. The user's
    /// tokens for the tenants it keeps stay valid; its tokens for a removed tenant are
    /// revoked (a request with one is refused from the next one on, and adding the tenant
    /// back does not revive them). The user and how many tokens were revoked.
    pub fn user_update(
        &self,
        name: &str,
        add: &[String],
        remove: &[String],
        admin: Option<bool>,
    ) -> Result<(User, usize)> {
        if add.is_empty() && remove.is_empty() && admin.is_none() {
            return Err(ServiceError::BadRequest(
                "nothing to change: give --add-tenant, --remove-tenant, --admin or --no-admin"
                    .into(),
            ));
        }
        let mut user = self
            .store
            .user(name)?
            .ok_or_else(|| ServiceError::NotFound(format!("no user {name}")))?;
        let mut removed = HashSet::new();
        for t in remove {
            let key = parse_tenant(t)?;
            let before = user.tenants.len();
            user.tenants.retain(|m| TenantKey::parse(m) != Some(key));
            if user.tenants.len() == before {
                return Err(ServiceError::BadRequest(format!(
                    "user {name} is not a member of tenant {t}"
                )));
            }
            removed.insert(key);
        }
        for t in add {
            let (key, tenant) = self.tenant(t)?;
            if removed.contains(&key) {
                return Err(ServiceError::BadRequest(format!(
                    "tenant {t} is both added and removed"
                )));
            }
            if !user
                .tenants
                .iter()
                .any(|m| TenantKey::parse(m) == Some(key))
            {
                user.tenants.push(tenant.id);
            }
        }
        if user.tenants.is_empty() {
            return Err(ServiceError::BadRequest(format!(
                "user {name} would be left without a tenant; add another one, or remove the user"
            )));
        }
        if let Some(admin) = admin {
            user.admin = admin;
        }
        if !self.store.update_user(&user)? {
            return Err(ServiceError::NotFound(format!("no user {name}")));
        }
        let at = now();
        let mut revoked = 0;
        for mut record in self.store.tokens()? {
            let gone = TenantKey::parse(&record.info.tenant).is_some_and(|k| removed.contains(&k));
            if record.info.user != name || !gone {
                continue;
            }
            if self.revoke(&mut record, at)? {
                revoked += 1;
            }
        }
        self.flush()?;
        Ok((user, revoked))
    }

    pub fn user_list(&self) -> Result<Vec<User>> {
        self.store.users()
    }

    /// Removes a user and its tokens; returns the user and how many tokens went with it.
    pub fn user_remove(&self, name: &str) -> Result<(User, usize)> {
        let user = self
            .store
            .user(name)?
            .ok_or_else(|| ServiceError::NotFound(format!("no user {name}")))?;
        let ids: Vec<Uuid> = self
            .store
            .tokens()?
            .into_iter()
            .filter(|t| t.info.user == name)
            .map(|t| t.info.id)
            .collect();
        let removed = self.store.remove_user(name)?;
        self.flush()?;
        for id in ids {
            self.auth.forget_token(id);
        }
        Ok((user, removed))
    }

    // ----- tokens -----

    pub fn token_issue(
        &self,
        user: &str,
        tenant: &str,
        expires_in_secs: Option<u64>,
        value: Option<String>,
    ) -> Result<IssuedToken> {
        let user = self
            .store
            .user(user)?
            .ok_or_else(|| ServiceError::NotFound(format!("no user {user}")))?;
        let (key, tenant) = self.tenant(tenant)?;
        if !user
            .tenants
            .iter()
            .any(|t| TenantKey::parse(t) == Some(key))
        {
            return Err(ServiceError::Conflict(format!(
                "user {} is not a member of tenant {}",
                user.name, tenant.id
            )));
        }
        if expires_in_secs == Some(0) {
            return Err(ServiceError::BadRequest(
                "--expires-in must be longer than zero".into(),
            ));
        }
        if expires_in_secs.is_some_and(|s| s > MAX_LIFETIME_SECS) {
            return Err(ServiceError::BadRequest(
                "--expires-in can be at most 100 years; leave it out for a token that never expires"
                    .into(),
            ));
        }
        let token = match value {
            Some(v) => {
                auth::check_imported(&v)?;
                if self.auth.exists(&*self.store, &v)? {
                    return Err(ServiceError::Conflict(
                        "that token value is already registered".into(),
                    ));
                }
                v
            }
            None => auth::generate()?,
        };
        let created_at = now();
        let lookup = auth::lookup(&auth::digest(&token));
        let record = TokenRecord {
            info: TokenInfo {
                id: Uuid::new_v4(),
                user: user.name,
                tenant: tenant.id,
                created_at,
                // Rounded up: a token lives at least as long as asked, never shorter.
                expires_at: expires_in_secs.map(|s| now_ceil().saturating_add(s)),
                revoked_at: None,
            },
            hash: auth::hash(&token)?,
            lookup: crate::model::to_hex(&lookup),
        };
        self.store.insert_token(&record, &lookup)?;
        self.flush()?;
        self.auth.token_added();
        Ok(IssuedToken {
            token,
            info: record.info,
        })
    }

    pub fn token_list(&self) -> Result<Vec<TokenInfo>> {
        Ok(self.store.tokens()?.into_iter().map(|t| t.info).collect())
    }

    pub fn token_revoke(&self, id: &str) -> Result<TokenInfo> {
        let missing = || ServiceError::NotFound(format!("no token with id {id}"));
        let uuid = Uuid::try_parse(id).map_err(|_| missing())?;
        let mut record = self.store.token(uuid)?.ok_or_else(missing)?;
        if self.revoke(&mut record, now())? {
            self.flush()?;
        }
        Ok(record.info)
    }

    /// Marks `record` revoked at `at` unless it is already, and takes it out of the token
    /// cache: it fails from the very next request. Whether it changed.
    fn revoke(&self, record: &mut TokenRecord, at: u64) -> Result<bool> {
        let changed = record.info.revoked_at.is_none();
        if changed {
            record.info.revoked_at = Some(at);
            self.store.update_token(record)?;
        }
        self.auth.forget_token(record.info.id);
        Ok(changed)
    }
}
