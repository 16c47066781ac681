//! The images API's rules (README, "Images API"): who sees which image, Glance's list filters
//! and sort orders, create, JSON-patch updates, tags and delete, for the regions whose image
//! records the appliance keeps (directory regions). The HTTP door (`http::images`) parses and
//! shapes; every decision is here.
//!
//! Visibility follows Glance's default policy without a members API: an owner sees its
//! images; every tenant of the region sees `public` ones, and `community` ones by id (listed
//! only when asked for); `shared` is private to others (no members); an admin sees every
//! image of every directory region; only an admin may make an image public.

use std::cmp::Ordering;

use serde_json::Value;
use uuid::Uuid;

use super::super::Service;
use crate::auth::Principal;
use crate::error::{Result, ServiceError};
use crate::model::{
    now, Image, ImageMeta, ImageStatus, Region, RegionKind, Tenant, TenantKey, Visibility,
    CONTAINER_FORMATS, DISK_FORMATS,
};

/// Glance's `api_limit_max`: the largest page.
pub const LIMIT_MAX: usize = 1000;
/// A page without `limit` (Glance's `limit_param_default`).
pub const LIMIT_DEFAULT: usize = 25;
/// Glance's `image_tag_quota` and `image_property_quota`.
pub const TAGS_MAX: usize = 128;
pub const PROPERTIES_MAX: usize = 128;
/// Longest name, tag or property name (Glance's columns).
const TEXT_MAX: usize = 255;
/// Longest property value kept.
const VALUE_MAX: usize = 65_535;

/// Keys a client may not set: Glance answers 403 "Attribute 'x' is read-only."
const READ_ONLY: [&str; 11] = [
    "checksum",
    "created_at",
    "os_hash_algo",
    "os_hash_value",
    "size",
    "status",
    "updated_at",
    "virtual_size",
    "direct_url",
    "stores",
    "owner",
];
/// Keys Glance reserves: 403 "Attribute 'x' is reserved."
const RESERVED: [&str; 6] = ["self", "file", "schema", "location", "locations", "deleted"];

/// A sort key of the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Name,
    Status,
    ContainerFormat,
    DiskFormat,
    Size,
    Id,
    CreatedAt,
    UpdatedAt,
    Visibility,
    Owner,
    MinDisk,
    MinRam,
}

impl SortKey {
    pub fn parse(text: &str) -> Result<SortKey> {
        Ok(match text {
            "name" => SortKey::Name,
            "status" => SortKey::Status,
            "container_format" => SortKey::ContainerFormat,
            "disk_format" => SortKey::DiskFormat,
            "size" => SortKey::Size,
            "id" => SortKey::Id,
            "created_at" => SortKey::CreatedAt,
            "updated_at" => SortKey::UpdatedAt,
            "visibility" => SortKey::Visibility,
            "owner" => SortKey::Owner,
            "min_disk" => SortKey::MinDisk,
            "min_ram" => SortKey::MinRam,
            _ => {
                return Err(ServiceError::BadRequest(format!(
                    "Invalid sort key: {}. It is not supported",
                    crate::text::excerpt(text, 64)
                )))
            }
        })
    }

    fn compare(self, a: &Image, b: &Image) -> Ordering {
        match self {
            SortKey::Name => a.name.cmp(&b.name),
            SortKey::Status => a.status.to_string().cmp(&b.status.to_string()),
            SortKey::ContainerFormat => a.container_format.cmp(&b.container_format),
            SortKey::DiskFormat => a.disk_format.cmp(&b.disk_format),
            SortKey::Size => a.size.cmp(&b.size),
            // A UUID's bytes sort as its lowercase hyphenated text does.
            SortKey::Id => a.id.cmp(&b.id),
            SortKey::CreatedAt => a.created_at.cmp(&b.created_at),
            SortKey::UpdatedAt => a.updated_at.cmp(&b.updated_at),
            SortKey::Visibility => a.meta.visibility.as_str().cmp(b.meta.visibility.as_str()),
            SortKey::Owner => a.owner.cmp(&b.owner),
            SortKey::MinDisk => a.meta.min_disk.cmp(&b.meta.min_disk),
            SortKey::MinRam => a.meta.min_ram.cmp(&b.meta.min_ram),
        }
    }
}

/// A filter on one field: the value, or any of several (`in:a,b`).
#[derive(Debug, Clone, PartialEq)]
pub struct AnyOf(pub Vec<String>);

impl AnyOf {
    pub fn parse(text: &str) -> AnyOf {
        match text.strip_prefix("in:") {
            Some(list) => AnyOf(list.split(',').map(|v| v.trim().to_string()).collect()),
            None => AnyOf(vec![text.to_string()]),
        }
    }

    fn matches(&self, value: &str) -> bool {
        self.0.iter().any(|v| v == value)
    }
}

/// `GET /v2/images`' parameters.
#[derive(Debug, Clone, Default)]
pub struct ImageQuery {
    pub limit: Option<usize>,
    pub marker: Option<String>,
    /// Keys with descending (`true`) or ascending order; `created_at` descending if empty.
    pub sort: Vec<(SortKey, bool)>,
    /// `None`: the default listing; `Some(None)`: `visibility=all`.
    pub visibility: Option<Option<Visibility>>,
    pub member_status: Option<String>,
    /// `None`: hidden images are left out (Glance's default).
    pub os_hidden: Option<bool>,
    pub size_min: Option<u64>,
    pub size_max: Option<u64>,
    pub tags: Vec<String>,
    /// Base fields (`name`, `status`, `owner`, `disk_format` …) and properties, by name.
    pub fields: Vec<(String, AnyOf)>,
}

/// A page of images and the marker of the next one.
pub struct ImagePage {
    pub images: Vec<Image>,
    /// The last image's id, when there may be more.
    pub next: Option<Uuid>,
}

/// The fields of `POST /v2/images`.
#[derive(Debug, Clone, Default)]
pub struct NewImage {
    pub id: Option<Uuid>,
    pub name: Option<String>,
    pub disk_format: Option<String>,
    pub container_format: Option<String>,
    pub owner: Option<String>,
    pub meta: ImageMeta,
}

/// One JSON-patch operation, as both patch media types say it.
#[derive(Debug, Clone, PartialEq)]
pub enum PatchOp {
    Add(String, Value),
    Replace(String, Value),
    Remove(String),
}

fn no_image(id: &str) -> ServiceError {
    ServiceError::NotFound(format!(
        "No image found with ID {}",
        crate::text::excerpt(id, 64)
    ))
}

fn bad(why: impl Into<String>) -> ServiceError {
    ServiceError::BadRequest(why.into())
}

fn keeps_records(region: &Region) -> bool {
    matches!(region.kind, RegionKind::Directory { .. })
}

/// Whether `who` owns `image`.
fn owns(who: &Principal, image: &Image) -> bool {
    TenantKey::parse(&image.owner) == Some(who.tenant_key)
}

/// Whether `who` may see `image` by id (Glance's default `get_image` rules without members).
pub(crate) fn may_see(who: &Principal, image: &Image) -> bool {
    who.admin
        || owns(who, image)
        || matches!(
            image.meta.visibility,
            Visibility::Public | Visibility::Community
        )
}

impl Service {
    /// The tenant of `who` and its region, which must keep its records here; a tenant whose
    /// region is a Glance (or another appliance's) is pointed there (409).
    fn api_home(&self, who: &Principal) -> Result<(Tenant, Region)> {
        let tenant = self.store.tenant(who.tenant_key)?.ok_or_else(|| {
            ServiceError::Forbidden(
                "the token's tenant is not a tenant of this appliance, which keeps no images for it"
                    .into(),
            )
        })?;
        let region = self.region(&tenant.region)?;
        if !keeps_records(&region) {
            let (_, at) = region.kind.describe();
            return Err(ServiceError::Conflict(format!(
                "region {} keeps its own image records: use the image service at {at}, which the catalog names for that region; this endpoint serves the images of directory regions",
                region.id
            )));
        }
        Ok((tenant, region))
    }

    /// Every image `who` might see: an admin's, of every directory region; a tenant's, of its
    /// region.
    fn api_candidates(&self, who: &Principal) -> Result<Vec<Image>> {
        let regions: Vec<Region> = if who.admin {
            self.store
                .regions()?
                .into_iter()
                .filter(keeps_records)
                .collect()
        } else {
            vec![self.api_home(who)?.1]
        };
        let mut images = self.store.images(None)?;
        images.retain(|i| {
            i.status != ImageStatus::Deleted && regions.iter().any(|r| r.id == i.region)
        });
        Ok(images)
    }

    /// `GET /v2/images/{id}`: the image, if `who` may see it (404 otherwise, as Glance).
    pub fn api_image(&self, who: &Principal, id: &str) -> Result<Image> {
        // A tenant's home region first: a tenant of a Glance region gets its 409 here.
        let home = (!who.admin).then(|| self.api_home(who)).transpose()?;
        let uuid = Uuid::try_parse(id).map_err(|_| no_image(id))?;
        let image = self.store.image(uuid)?.ok_or_else(|| no_image(id))?;
        let kept = self.store.region(&image.region)?.filter(keeps_records);
        if image.status == ImageStatus::Deleted || kept.is_none() || !may_see(who, &image) {
            return Err(no_image(id));
        }
        if home.is_some_and(|(tenant, _)| tenant.region != image.region) {
            return Err(no_image(id));
        }
        Ok(image)
    }

    /// An image `who` may change: visible to it (404) and its own or `who` an admin (403).
    pub(super) fn api_own(&self, who: &Principal, id: &str) -> Result<Image> {
        let image = self.api_image(who, id)?;
        if !(who.admin || owns(who, &image)) {
            return Err(ServiceError::Forbidden(format!(
                "You are not permitted to modify image {}",
                image.id
            )));
        }
        Ok(image)
    }

    /// `GET /v2/images`: a page of what `who` may list, as `q` filters and sorts it.
    pub fn api_images(&self, who: &Principal, q: &ImageQuery) -> Result<ImagePage> {
        let limit = q.limit.unwrap_or(LIMIT_DEFAULT).min(LIMIT_MAX);
        let mut images = self.api_candidates(who)?;
        images.retain(|i| listed(who, q, i));
        let mut sort = q.sort.clone();
        if sort.is_empty() {
            sort.push((SortKey::CreatedAt, true));
        }
        // Glance breaks ties with created_at and id, in the first key's direction.
        let last_desc = sort[0].1;
        for key in [SortKey::CreatedAt, SortKey::Id] {
            if !sort.iter().any(|(k, _)| *k == key) {
                sort.push((key, last_desc));
            }
        }
        let order = |a: &Image, b: &Image| {
            sort.iter()
                .map(|(key, desc)| {
                    let o = key.compare(a, b);
                    if *desc {
                        o.reverse()
                    } else {
                        o
                    }
                })
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        };
        images.sort_by(order);
        let start = match &q.marker {
            None => 0,
            Some(marker) => {
                let at = Uuid::try_parse(marker)
                    .ok()
                    .and_then(|m| images.iter().position(|i| i.id == m))
                    .ok_or_else(|| {
                        bad(format!(
                            "marker {} not found",
                            crate::text::excerpt(marker, 64)
                        ))
                    })?;
                at + 1
            }
        };
        let page: Vec<Image> = images.into_iter().skip(start).take(limit).collect();
        // As Glance: a full page has a next one (which may be empty).
        let next = page.last().filter(|_| page.len() == limit).map(|i| i.id);
        Ok(ImagePage { images: page, next })
    }

    /// `POST /v2/images`: a `queued` image with no data, in the region of its owner.
    pub fn api_create(&self, who: &Principal, new: NewImage) -> Result<Image> {
        let other_owner = new
            .owner
            .as_deref()
            .filter(|o| TenantKey::parse(o) != Some(who.tenant_key));
        let (key, tenant, region) = match other_owner {
            Some(owner) if !who.admin => {
                return Err(ServiceError::Forbidden(format!(
                    "You are not permitted to create images owned by '{}'",
                    crate::text::excerpt(owner, 64)
                )))
            }
            Some(owner) => {
                let (key, tenant) = self.tenant(owner)?;
                let region = self.region(&tenant.region)?;
                if !keeps_records(&region) {
                    return Err(ServiceError::Conflict(format!(
                        "region {} keeps its own image records: create the image with its own image service",
                        region.id
                    )));
                }
                (key, tenant, region)
            }
            None => {
                let (tenant, region) = self.api_home(who)?;
                (who.tenant_key, tenant, region)
            }
        };
        check_meta(who, &new.meta, None)?;
        if let Some(name) = &new.name {
            check_text("name", name)?;
        }
        if let Some(f) = &new.disk_format {
            check_enum("disk_format", f, &DISK_FORMATS)?;
            super::super::check_accepts(&region, f)?;
        }
        if let Some(f) = &new.container_format {
            check_enum("container_format", f, &CONTAINER_FORMATS)?;
        }
        let image = Image {
            name: new.name.unwrap_or_default(),
            disk_format: new.disk_format.unwrap_or_default(),
            container_format: new.container_format.unwrap_or_default(),
            meta: new.meta,
            ..Image::queued(
                new.id.unwrap_or_else(Uuid::new_v4),
                &tenant.id,
                &region.id,
                now(),
            )
        };
        if self.store.image(image.id)?.is_some() {
            return Err(ServiceError::Conflict(format!(
                "Image with identifier {} already exists!",
                image.id
            )));
        }
        self.store.insert_image(key, &image)?;
        self.flush()?;
        Ok(image)
    }

    /// `PATCH /v2/images/{id}`: the operations in order, all or none.
    pub fn api_patch(&self, who: &Principal, id: &str, ops: &[PatchOp]) -> Result<Image> {
        let before = self.api_own(who, id)?;
        let mut image = before.clone();
        for op in ops {
            apply(&mut image, op)?;
        }
        check_meta(who, &image.meta, Some(&before.meta))?;
        if image != before {
            image.updated_at = now();
            self.store.update_image(&image)?;
            self.flush()?;
        }
        Ok(image)
    }

    /// `PUT /v2/images/{id}/tags/{tag}`.
    pub fn api_add_tag(&self, who: &Principal, id: &str, tag: &str) -> Result<()> {
        let mut image = self.api_own(who, id)?;
        check_text("tag", tag)?;
        if !image.meta.tags.iter().any(|t| t == tag) {
            image.meta.tags.push(tag.to_string());
            image.meta.tags.sort();
            if image.meta.tags.len() > TAGS_MAX {
                return Err(ServiceError::OverQuota(format!(
                    "Maximum number of tags exceeded: an image has at most {TAGS_MAX}"
                )));
            }
            image.updated_at = now();
            self.store.update_image(&image)?;
            self.flush()?;
        }
        Ok(())
    }

    /// `DELETE /v2/images/{id}/tags/{tag}`.
    pub fn api_remove_tag(&self, who: &Principal, id: &str, tag: &str) -> Result<()> {
        let mut image = self.api_own(who, id)?;
        let before = image.meta.tags.len();
        image.meta.tags.retain(|t| t != tag);
        if image.meta.tags.len() == before {
            return Err(ServiceError::NotFound(format!(
                "Tag {} not found",
                crate::text::excerpt(tag, 64)
            )));
        }
        image.updated_at = now();
        self.store.update_image(&image)?;
        self.flush()
    }

    /// `DELETE /v2/images/{id}`: refused for a protected image (403) and while a job reads
    /// or writes it (409); the record is marked deleted, the bytes go.
    pub fn api_delete(&self, who: &Principal, id: &str) -> Result<()> {
        let image = self.api_own(who, id)?;
        if image.meta.protected {
            return Err(ServiceError::Forbidden(format!(
                "Image {} is protected and cannot be deleted",
                image.id
            )));
        }
        self.image_delete(&image.id.to_string()).map(drop)
    }
}

/// Whether `image` is in the listing `q` asks `who` for.
fn listed(who: &Principal, q: &ImageQuery, image: &Image) -> bool {
    let own = owns(who, image);
    let v = image.meta.visibility;
    let visible = match q.visibility {
        None if who.admin => true,
        None => own || v == Visibility::Public,
        Some(None) => may_see(who, image),
        Some(Some(want)) => {
            v == want
                && (who.admin || own || matches!(v, Visibility::Public | Visibility::Community))
        }
    };
    if !visible {
        return false;
    }
    if image.meta.os_hidden != q.os_hidden.unwrap_or(false) {
        return false;
    }
    if q.size_min.is_some_and(|min| image.size < min)
        || q.size_max.is_some_and(|max| image.size > max)
    {
        return false;
    }
    if !q.tags.iter().all(|t| image.meta.tags.contains(t)) {
        return false;
    }
    q.fields.iter().all(|(key, want)| match field(image, key) {
        Some(value) => want.matches(&value),
        None => false,
    })
}

/// The text of `image`'s field or property `key`, as a filter compares it.
fn field(image: &Image, key: &str) -> Option<String> {
    Some(match key {
        "id" => image.id.to_string(),
        "name" => image.name.clone(),
        "status" => image.status.to_string(),
        "owner" => image.owner.clone(),
        "disk_format" => image.disk_format.clone(),
        "container_format" => image.container_format.clone(),
        "checksum" => image.checksum.clone()?,
        "os_hash_value" => image.os_hash_value.clone()?,
        "protected" => image.meta.protected.to_string(),
        "min_disk" => image.meta.min_disk.to_string(),
        "min_ram" => image.meta.min_ram.to_string(),
        _ => image.meta.properties.get(key)?.clone(),
    })
}

fn check_text(what: &str, text: &str) -> Result<()> {
    if text.chars().count() > TEXT_MAX {
        return Err(bad(format!(
            "the {what} is longer than {TEXT_MAX} characters"
        )));
    }
    Ok(())
}

fn check_enum(what: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(bad(format!(
            "Invalid value '{}' for {what}; expected one of {}",
            crate::text::excerpt(value, 64),
            allowed.join(", ")
        )))
    }
}

/// The rules every change of an image's fields keeps: tag and property counts and lengths,
/// and who may publicize (Glance's default `publicize_image` rule: admins).
fn check_meta(who: &Principal, meta: &ImageMeta, before: Option<&ImageMeta>) -> Result<()> {
    let was_public = before.is_some_and(|b| b.visibility == Visibility::Public);
    if meta.visibility == Visibility::Public && !was_public && !who.admin {
        return Err(ServiceError::Forbidden(
            "You are not authorized to complete publicize_image action".into(),
        ));
    }
    if meta.tags.len() > TAGS_MAX {
        return Err(ServiceError::OverQuota(format!(
            "Maximum number of tags exceeded: an image has at most {TAGS_MAX}"
        )));
    }
    for tag in &meta.tags {
        check_text("tag", tag)?;
    }
    if meta.properties.len() > PROPERTIES_MAX {
        return Err(ServiceError::OverQuota(format!(
            "Maximum number of properties exceeded: an image has at most {PROPERTIES_MAX}"
        )));
    }
    for (key, value) in &meta.properties {
        check_text("property name", key)?;
        if key.is_empty() {
            return Err(bad("a property name may not be empty"));
        }
        if value.len() > VALUE_MAX {
            return Err(bad(format!(
                "the value of property {} is longer than {VALUE_MAX} bytes",
                crate::text::excerpt(key, 64)
            )));
        }
    }
    Ok(())
}

/// Why a client may not set `key` at all (403), if it may not.
pub fn refuse_key(key: &str) -> Option<ServiceError> {
    if READ_ONLY.contains(&key) || key == "id" || key == "created_at" {
        Some(ServiceError::Forbidden(format!(
            "Attribute '{}' is read-only",
            crate::text::excerpt(key, 64)
        )))
    } else if RESERVED.contains(&key) || key.starts_with("os_glance_") {
        Some(ServiceError::Forbidden(format!(
            "Attribute '{}' is reserved",
            crate::text::excerpt(key, 64)
        )))
    } else {
        None
    }
}

/// Sets the field `key` of `image` to `value` as a create or a patch gives it.
pub fn set_field(image: &mut Image, key: &str, value: &Value) -> Result<()> {
    let type_error = |kind: &str| {
        bad(format!(
            "Provided object does not match schema 'image': {} is not of type '{kind}' for {}",
            crate::text::excerpt(&value.to_string(), 64),
            crate::text::excerpt(key, 64)
        ))
    };
    let as_bool = || value.as_bool().ok_or_else(|| type_error("boolean"));
    let as_count = || {
        value
            .as_u64()
            .filter(|n| i32::try_from(*n).is_ok())
            .ok_or_else(|| type_error("integer"))
    };
    match key {
        "name" => {
            let name = match value {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                _ => return Err(type_error("string")),
            };
            check_text("name", &name)?;
            image.name = name;
        }
        "visibility" => {
            let text = value.as_str().ok_or_else(|| type_error("string"))?;
            image.meta.visibility = text.parse().map_err(ServiceError::BadRequest)?;
        }
        "protected" => image.meta.protected = as_bool()?,
        "os_hidden" => image.meta.os_hidden = as_bool()?,
        "min_disk" => image.meta.min_disk = as_count()?,
        "min_ram" => image.meta.min_ram = as_count()?,
        "tags" => {
            let list = value.as_array().ok_or_else(|| type_error("array"))?;
            let mut tags = list
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| type_error("string"))
                })
                .collect::<Result<Vec<_>>>()?;
            tags.sort();
            tags.dedup();
            image.meta.tags = tags;
        }
        "disk_format" | "container_format" => {
            if image.status != ImageStatus::Queued {
                return Err(ServiceError::Forbidden(format!(
                    "Attribute {key} can be only replaced for a queued image"
                )));
            }
            let text = match value {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                _ => return Err(type_error("string")),
            };
            if key == "disk_format" {
                if !text.is_empty() {
                    check_enum(key, &text, &DISK_FORMATS)?;
                }
                image.disk_format = text;
            } else {
                if !text.is_empty() {
                    check_enum(key, &text, &CONTAINER_FORMATS)?;
                }
                image.container_format = text;
            }
        }
        _ => {
            if let Some(refusal) = refuse_key(key) {
                return Err(refusal);
            }
            let text = value.as_str().ok_or_else(|| type_error("string"))?;
            image
                .meta
                .properties
                .insert(key.to_string(), text.to_string());
        }
    }
    Ok(())
}

/// The member a patch path names: `/name`, `/hw_disk_bus` (JSON pointer escapes undone).
fn member(path: &str) -> Result<String> {
    let rest = path
        .strip_prefix('/')
        .filter(|r| !r.is_empty() && !r.contains('/'))
        .ok_or_else(|| {
            bad(format!(
                "Invalid JSON pointer for this resource: '{}'",
                crate::text::excerpt(path, 64)
            ))
        })?;
    Ok(rest.replace("~1", "/").replace("~0", "~"))
}

/// Keys that a patch may set but never remove (Glance: 403).
const BASE_SETTABLE: [&str; 9] = [
    "name",
    "visibility",
    "protected",
    "os_hidden",
    "min_disk",
    "min_ram",
    "tags",
    "disk_format",
    "container_format",
];

fn apply(image: &mut Image, op: &PatchOp) -> Result<()> {
    match op {
        PatchOp::Add(path, value) => {
            let key = member(path)?;
            set_field(image, &key, value)
        }
        PatchOp::Replace(path, value) => {
            let key = member(path)?;
            let base = BASE_SETTABLE.contains(&key.as_str());
            if !base && refuse_key(&key).is_none() && !image.meta.properties.contains_key(&key) {
                return Err(ServiceError::Conflict(format!(
                    "Property {} does not exist",
                    crate::text::excerpt(&key, 64)
                )));
            }
            set_field(image, &key, value)
        }
        PatchOp::Remove(path) => {
            let key = member(path)?;
            if let Some(refusal) = refuse_key(&key) {
                return Err(refusal);
            }
            if BASE_SETTABLE.contains(&key.as_str()) {
                return Err(ServiceError::Forbidden(format!(
                    "Properties {key} must not be removed"
                )));
            }
            if image.meta.properties.remove(&key).is_none() {
                return Err(ServiceError::Conflict(format!(
                    "Property {} does not exist",
                    crate::text::excerpt(&key, 64)
                )));
            }
            Ok(())
        }
    }
}

impl NewImage {
    /// A create's body, field by field as Glance takes it: the base fields, and any other
    /// key with a string value as a property; read-only and reserved keys refused (403).
    pub fn parse(body: &serde_json::Map<String, Value>) -> Result<NewImage> {
        let mut new = NewImage::default();
        let mut scratch = Image::queued(Uuid::nil(), "", "", 0);
        let text = |key: &str, value: &Value| -> Result<Option<String>> {
            match value {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                _ => Err(bad(format!(
                    "Provided object does not match schema 'image': {} is not of type 'string' for {key}",
                    crate::text::excerpt(&value.to_string(), 64)
                ))),
            }
        };
        for (key, value) in body {
            match key.as_str() {
                "id" => {
                    let id = text(key, value)?.unwrap_or_default();
                    new.id = Some(Uuid::try_parse(&id).map_err(|_| {
                        bad(format!(
                            "Provided object does not match schema 'image': '{}' does not match the id pattern",
                            crate::text::excerpt(&id, 64)
                        ))
                    })?);
                }
                "owner" => new.owner = text(key, value)?,
                "name" => new.name = text(key, value)?,
                "disk_format" => new.disk_format = text(key, value)?,
                "container_format" => new.container_format = text(key, value)?,
                _ => set_field(&mut scratch, key, value)?,
            }
        }
        new.meta = scratch.meta;
        Ok(new)
    }
}
