//! `serve --demo`: a working lab in a fresh data directory, built from the reference's examples
//! (its tenants, image ids, sample token and the three jobs of its list example).

use std::io::Write;

use uuid::Uuid;

use crate::error::{Result, ServiceError};
use crate::service::{ImportRequest, Service};

pub const DEMO_TENANT: &str = "236ae314ef6944f4ab98fa7519e54325";
pub const DEMO_TENANT_OT2: &str = "91b5c7c09cbd45caa3c146fd67ae471e";
/// The reference's sample token; a public lab fixture, never a production secret.
pub const DEMO_TOKEN: &str = "f4328bab05ff4502b397b88657baaefd";
const DEMO_USER: &str = "demo";

/// The body of the reference's list example.
pub const REFERENCE_JOBS: &str = r#"[{"copy_progress": 0, "destination_image_id": null, "destination_region_id": "ot1", "destination_tenant_id": "236ae314ef6944f4ab98fa7519e54325", "job_id": "0fa2817d-4e54-455d-a676-c78e863297e9", "source_image_id": "335eef3f-551d-46e1-8781-173f43209d48", "source_image_name": "Test-image-Ubuntu", "source_region_id": "ot1", "source_tenant_id": "236ae314ef6944f4ab98fa7519e54325", "status": "replicate_requested"}, {"copy_progress": 0, "destination_image_id": null, "destination_region_id": "ot1", "destination_tenant_id": "236ae314ef6944f4ab98fa7519e54325", "job_id": "adcdc7cc-1f0d-4f97-8ef4-c90fc6977938", "source_image_id": "335eef3f-551d-46e1-8781-173f43209d48", "source_image_name": "Test-image-Ubuntu", "source_region_id": "ot1", "source_tenant_id": "236ae314ef6944f4ab98fa7519e54325", "status": "cancel_requested"}, {"copy_progress": 0, "destination_image_id": null, "destination_region_id": "ot2", "destination_tenant_id": "91b5c7c09cbd45caa3c146fd67ae471e", "job_id": "4dc8acbb-7ddd-4ef9-98e6-9c12d5003381", "source_image_id": "9b805919-8acb-4880-8904-cd2f9a32c1ad", "source_image_name": "Test-image-CentOS", "source_region_id": "ot1", "source_tenant_id": "236ae314ef6944f4ab98fa7519e54325", "status": "cancel_requested"}]"#;

const IMAGES: [(&str, &str, usize); 2] = [
    (
        "335eef3f-551d-46e1-8781-173f43209d48",
        "Test-image-Ubuntu",
        8 << 20,
    ),
    (
        "9b805919-8acb-4880-8904-cd2f9a32c1ad",
        "Test-image-CentOS",
        4 << 20,
    ),
];

/// Creates the demo lab unless this data directory has it already.
pub fn prepare(svc: &Service) -> Result<()> {
    if svc.store.region("ot1")?.is_none() {
        build(svc)?;
        println!("demo: created regions ot1 and ot2, tenants {DEMO_TENANT} and {DEMO_TENANT_OT2}, user {DEMO_USER}, two images and the reference's three jobs");
    }
    Ok(())
}

/// Ready-to-paste commands for the four routes against the server at `addr`.
pub fn instructions(addr: std::net::SocketAddr, data_dir: &std::path::Path) -> String {
    let (image, _, _) = IMAGES[0];
    let data_dir = data_dir.display();
    format!(
        "demo: token {DEMO_TOKEN} (the reference's sample token) acts for tenant {DEMO_TENANT}
demo: try these:
  export TOKEN={DEMO_TOKEN} API=http://{addr}/v2/extension/image_replicator/jobs
  curl -s $API -H \"X-Auth-Token: $TOKEN\"
  curl -s -X POST $API -H \"X-Auth-Token: $TOKEN\" -H 'Content-Type: application/json' \\
       -d '{{\"image_id\": \"{image}\", \"tenant_id_dst\": \"{DEMO_TENANT_OT2}\"}}'
  curl -s $API/<job_id> -H \"X-Auth-Token: $TOKEN\"
  curl -s -X DELETE $API/<job_id> -H \"X-Auth-Token: $TOKEN\" -w '%{{http_code}}\\n'
  image-replicator --data-dir {data_dir} job watch"
    )
}

fn build(svc: &Service) -> Result<()> {
    svc.region_add("ot1", None, None)?;
    svc.region_add("ot2", None, None)?;
    svc.tenant_add(DEMO_TENANT, "ot1", Some("demo".into()))?;
    svc.tenant_add(DEMO_TENANT_OT2, "ot2", Some("demo-ot2".into()))?;
    svc.user_add(
        DEMO_USER,
        &[DEMO_TENANT.to_string(), DEMO_TENANT_OT2.to_string()],
        false,
    )?;
    svc.token_issue(DEMO_USER, DEMO_TENANT, None, Some(DEMO_TOKEN.to_string()))?;
    for (id, name, size) in IMAGES {
        let file = svc.data_dir.join(format!(".demo-{name}.raw"));
        write_pattern(&file, size)
            .map_err(|e| ServiceError::internal("cannot write the demo image", e))?;
        let imported = svc.image_import(&ImportRequest {
            file: file.clone(),
            tenant: DEMO_TENANT.to_string(),
            name: name.to_string(),
            disk_format: Some("raw".into()),
            container_format: "bare".into(),
            meta: Default::default(),
            id: Uuid::try_parse(id).ok(),
        });
        let _ = std::fs::remove_file(&file);
        imported?;
    }
    let jobs: Vec<serde_json::Value> =
        serde_json::from_str(REFERENCE_JOBS).map_err(|e| ServiceError::internal("demo jobs", e))?;
    svc.job_seed(&jobs, false)?;
    Ok(())
}

/// A file of `size` bytes of a repeating, non-trivial pattern.
fn write_pattern(path: &std::path::Path, size: usize) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let block: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len());
        file.write_all(&block[..n])?;
        left -= n;
    }
    file.sync_all()
}
