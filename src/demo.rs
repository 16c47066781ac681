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

/// The demo's cap on all copies together, unless `--max-bandwidth` is given: its 8 MiB image
/// then copies for about 32 s, time enough to try a cancel.
pub const DEMO_BANDWIDTH: u64 = 256 << 10;

/// Creates the demo lab unless this data directory has it already, and gives its user and a
/// working token back if they were removed or revoked; returns the token to show.
///
/// A revoked value stays refused for good (its record is kept, and registering a value that
/// any record holds is refused), so a revoked sample token is not registered again: the demo
/// issues a new token instead, printed once, as `token issue` would.
pub fn prepare(svc: &Service) -> Result<String> {
    if svc.store.region("ot1")?.is_none() {
        build(svc)?;
        println!("demo: created regions ot1 and ot2, tenants {DEMO_TENANT} and {DEMO_TENANT_OT2}, user {DEMO_USER}, two images and the reference's three jobs");
        return Ok(DEMO_TOKEN.to_string());
    }
    repair(svc)
}

/// The user and token of a lab made earlier, made good again.
fn repair(svc: &Service) -> Result<String> {
    if svc.store.user(DEMO_USER)?.is_none() {
        let mut tenants = Vec::new();
        for tenant in [DEMO_TENANT, DEMO_TENANT_OT2] {
            if svc
                .store
                .tenant(
                    crate::model::TenantKey::parse(tenant)
                        .ok_or_else(|| ServiceError::internal("demo tenant", "not a tenant id"))?,
                )?
                .is_some()
            {
                tenants.push(tenant.to_string());
            }
        }
        if tenants.first().map(String::as_str) != Some(DEMO_TENANT) {
            return Err(ServiceError::Conflict(format!(
                "the demo's tenant {DEMO_TENANT} was removed; start the demo over in an empty data directory"
            )));
        }
        svc.user_add(DEMO_USER, &tenants, false)?;
        println!("demo: user {DEMO_USER} was removed; added it again");
    }
    let now = crate::model::now();
    let records = svc
        .store
        .token_candidates(&crate::auth::lookup(&crate::auth::digest(DEMO_TOKEN)))?;
    let mut held = None;
    for record in records {
        if argon2::PasswordVerifier::verify_password(
            &argon2::Argon2::default(),
            DEMO_TOKEN.as_bytes(),
            record.hash.as_str(),
        )
        .is_ok()
        {
            held = Some(record);
            break;
        }
    }
    match held {
        Some(record) if record.unusable_at(now).is_none() && record.info.user == DEMO_USER => {
            Ok(DEMO_TOKEN.to_string())
        }
        Some(record) => {
            let why = record.unusable_at(now).unwrap_or("another user's");
            let issued = svc.token_issue(DEMO_USER, DEMO_TENANT, None, None)?;
            println!(
                "demo: the sample token is {why} and stays refused; issued token {} instead",
                issued.info.id
            );
            Ok(issued.token)
        }
        None => {
            svc.token_issue(DEMO_USER, DEMO_TENANT, None, Some(DEMO_TOKEN.to_string()))?;
            println!("demo: the sample token was removed; registered it again");
            Ok(DEMO_TOKEN.to_string())
        }
    }
}

/// How the demo's server is reached, for its printed commands.
pub struct Reach<'a> {
    pub addr: std::net::SocketAddr,
    pub data_dir: &'a std::path::Path,
    /// The certificate of `--tls-cert`, when the server speaks HTTPS.
    pub tls_cert: Option<&'a std::path::Path>,
    /// The token the commands use.
    pub token: &'a str,
    /// The copies' bandwidth cap, if any.
    pub max_bandwidth: Option<u64>,
}

/// The web page's address, and ready-to-paste commands for the four routes, the images API and
/// the CLI against the server: the same
/// `$API` as the README's, and the CLI by the path of this very binary when its directory is
/// not on `PATH` (after `cargo run`, it is `target/release`).
pub fn instructions(reach: &Reach) -> String {
    let (image, _, _) = IMAGES[0];
    let data_dir = shell_word(&reach.data_dir.display().to_string());
    let token = reach.token;
    let (scheme, cacert) = match reach.tls_cert {
        // curl trusts a self-signed certificate only when told to.
        Some(cert) if self_signed(cert) => (
            "https",
            format!(" --cacert {}", shell_word(&cert.display().to_string())),
        ),
        Some(_) => ("https", String::new()),
        None => ("http", String::new()),
    };
    let addr = reach.addr;
    let path = match binary_dir() {
        Some(dir) => format!("PATH={}:$PATH ", shell_word(&dir)),
        None => String::new(),
    };
    let who = if token == DEMO_TOKEN {
        format!(
            "demo: token {DEMO_TOKEN} (the reference's sample token) acts for tenant {DEMO_TENANT}"
        )
    } else {
        format!(
            "demo: token {token} (new: the sample token is refused) acts for tenant {DEMO_TENANT}"
        )
    };
    let cap = match reach.max_bandwidth {
        Some(rate) => format!(
            "\ndemo: copies are capped at {}/s (serve --max-bandwidth), so the cancel below finds the copy running",
            crate::model::size_text(rate)
        ),
        None => String::new(),
    };
    format!(
        "{who}{cap}
demo: the web page: {scheme}://{addr}/ui#token={token}
demo: try these:
  export {path}TOKEN={token} API={scheme}://{addr}/v2/extension/image_replicator
  curl -s{cacert} $API/jobs -H \"X-Auth-Token: $TOKEN\" -w '\\n'
  JOB=$(curl -s{cacert} -X POST $API/jobs -H \"X-Auth-Token: $TOKEN\" -H 'Content-Type: application/json' \\
       -d '{{\"image_id\": \"{image}\", \"tenant_id_dst\": \"{DEMO_TENANT_OT2}\"}}' | sed -E 's/.*\"job_id\": *\"([^\"]+)\".*/\\1/'); echo $JOB
  curl -s{cacert} $API/jobs/$JOB -H \"X-Auth-Token: $TOKEN\" -w '\\n'
  curl -s{cacert} -X DELETE $API/jobs/$JOB -H \"X-Auth-Token: $TOKEN\" -w '%{{http_code}}\\n'
  curl -s{cacert} {scheme}://{addr}/v2/images -H \"X-Auth-Token: $TOKEN\" -w '\\n'
  image-replicator --data-dir {data_dir} job watch"
    )
}

/// The directory of this binary, unless `image-replicator` on `PATH` is this binary already.
fn binary_dir() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|p| {
            std::fs::canonicalize(p.join("image-replicator"))
                .ok()
                .as_deref()
                == std::fs::canonicalize(&exe).ok().as_deref()
        })
    });
    (!on_path).then(|| dir.display().to_string())
}

/// `text` as one shell word: as it is when it holds only safe characters, else single-quoted.
fn shell_word(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+:=@%,".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Whether the PEM file holds one certificate that issued itself (its issuer is its
/// subject): curl needs `--cacert` for that one. Anything unreadable counts as not.
fn self_signed(cert: &std::path::Path) -> bool {
    use rustls_pki_types::pem::PemObject;
    let Ok(certs) = rustls_pki_types::CertificateDer::pem_file_iter(cert) else {
        return false;
    };
    let certs: Vec<_> = certs.filter_map(|c| c.ok()).collect();
    match certs.as_slice() {
        [only] => issuer_and_subject(only).is_some_and(|(issuer, subject)| issuer == subject),
        _ => false,
    }
}

/// The DER of a certificate's issuer and subject names (RFC 5280: Certificate, then
/// tbsCertificate: [0] version, serialNumber, signature, issuer, validity, subject).
fn issuer_and_subject(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (_, certificate, _) = der_item(der)?;
    let (_, tbs, _) = der_item(certificate)?;
    let (tag, _, mut rest) = der_item(tbs)?;
    if tag == 0xa0 {
        // The version was the first item; the serial number follows.
        rest = der_item(rest)?.2;
    }
    let rest = der_item(rest)?.2; // signature algorithm
    let issuer_len = rest.len() - der_item(rest)?.2.len();
    let (issuer, rest) = rest.split_at(issuer_len);
    let rest = der_item(rest)?.2; // validity
    let subject_len = rest.len() - der_item(rest)?.2.len();
    Some((issuer, &rest[..subject_len]))
}

/// One DER item: its tag, its content and what follows it.
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let (content, rest) = rest.split_at(len);
    Some((tag, content, rest))
}

fn build(svc: &Service) -> Result<()> {
    svc.region_add("ot1", None, None, None)?;
    svc.region_add("ot2", None, None, None)?;
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
    svc.job_seed(&mut REFERENCE_JOBS.as_bytes(), "the demo jobs", false)?;
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
