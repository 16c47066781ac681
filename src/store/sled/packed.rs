//! Job records packed with zstd against a dictionary of example records.
//!
//! A job's JSON is some 900 bytes, mostly key names and values every job repeats; zstd alone
//! gets it to some 460 bytes, against [`JOBS`] to some 140. With a million jobs in the store
//! that is the difference between sled holding and rewriting 0.9 GB or 0.14 GB.
//!
//! [`JOBS`] is raw content (zstd's term): zstd finds repeats of it as if it preceded every
//! record. Records written with it can only be read with it, byte for byte, so it never
//! changes; a better dictionary would be a new format version beside this one.

use std::cell::RefCell;
use std::sync::LazyLock;

use zstd::bulk::{Compressor, Decompressor};
use zstd::dict::{DecoderDictionary, EncoderDictionary};

use crate::error::{Result, ServiceError};

/// Three jobs as the store writes them: a replicated one made through the API, a failed one,
/// a seeded queued one. Never change it (see the module's comment).
pub const JOBS: &str = concat!(
    r#"{"copy_progress":100,"destination_image_id":"5e0c3b57-9d2a-4f8e-b1c6-0a7d4e9f2b13","#,
    r#""destination_region_id":"ot2","destination_tenant_id":"91b5c7c09cbd45caa3c146fd67ae471e","#,
    r#""job_id":"0fa2817d-4e54-455d-a676-c78e863297e9","#,
    r#""source_image_id":"335eef3f-551d-46e1-8781-173f43209d48","source_image_name":"cirros-0.6.2","#,
    r#""source_region_id":"ot1","source_tenant_id":"236ae314ef6944f4ab98fa7519e54325","#,
    r#""status":"replicated","seq":1048576,"created_at":"2026-12-01T09:14:27Z","#,
    r#""updated_at":"2026-12-01T09:15:03Z","bytes_copied":1073741824,"bytes_total":1073741824,"#,
    r#""error":null,"seeded":false,"enqueued":true,"#,
    r#""created_destination":"5e0c3b57-9d2a-4f8e-b1c6-0a7d4e9f2b13","bytes_verified":1073741824,"#,
    r#""source_bytes_read":1073741824,"resumes":0,"reading":false,"bytes_reused":0,"#,
    r#""bytes_fetched":1073741824,"bytes_on_wire":0,"started_at":"2026-12-01T09:14:28Z","#,
    r#""finished_at":"2026-12-01T09:15:03Z","attempt_started_ms":1764580468120,"#,
    r#""attempt_bytes_from":0,"rate_bytes_per_s":30678337,"retries":0,"retry_of":null,"#,
    r#""retried_by":null,"kept_destination":null}"#,
    r#"{"copy_progress":40,"destination_image_id":null,"destination_region_id":"ot2","#,
    r#""destination_tenant_id":"b4862b21fb97d43588561712e8e5216a","#,
    r#""job_id":"d2523ddf-1189-480c-8ae6-be6a49a98809","#,
    r#""source_image_id":"882ff33e-a05f-4a0c-9c66-cef39a36ebbf","source_image_name":"ubuntu-24.04","#,
    r#""source_region_id":"ot1","source_tenant_id":"5129fb7c6288e1a5cc45782198a6416d","#,
    r#""status":"error","seq":2000000,"created_at":"2026-12-02T02:34:18Z","#,
    r#""updated_at":"2026-12-02T02:34:18Z","bytes_copied":0,"bytes_total":0,"#,
    r#""error":"the source image is gone","seeded":true,"enqueued":false,"#,
    r#""created_destination":null,"bytes_verified":0,"source_bytes_read":0,"resumes":0,"#,
    r#""reading":false,"bytes_reused":0,"bytes_fetched":0,"bytes_on_wire":0,"started_at":null,"#,
    r#""finished_at":null,"attempt_started_ms":null,"attempt_bytes_from":0,"#,
    r#""rate_bytes_per_s":null,"retries":0,"retry_of":null,"retried_by":null,"#,
    r#""kept_destination":null}"#,
    r#"{"copy_progress":0,"destination_image_id":null,"destination_region_id":"edge-3","#,
    r#""destination_tenant_id":"6f2d9c41a8b34e0f9d7c2b1a5e8f4c03","#,
    r#""job_id":"7c1e4b2a-3f5d-4e6a-9b8c-0d1f2e3a4b5c","#,
    r#""source_image_id":"a3b4c5d6-e7f8-4a9b-8c0d-1e2f3a4b5c6d","source_image_name":"centos-stream-9","#,
    r#""source_region_id":"central","source_tenant_id":"0e1f2a3b4c5d4e6f8a9b0c1d2e3f4a5b","#,
    r#""status":"replicate_requested","seq":12,"created_at":"2026-11-30T23:59:59Z","#,
    r#""updated_at":"2026-11-30T23:59:59Z","bytes_copied":0,"bytes_total":0,"error":null,"#,
    r#""seeded":false,"enqueued":true,"created_destination":null,"bytes_verified":0,"#,
    r#""source_bytes_read":0,"resumes":0,"reading":false,"bytes_reused":0,"bytes_fetched":0,"#,
    r#""bytes_on_wire":0,"started_at":null,"finished_at":null,"attempt_started_ms":null,"#,
    r#""attempt_bytes_from":0,"rate_bytes_per_s":null,"retries":0,"retry_of":null,"#,
    r#""retried_by":"9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a","kept_destination":null}"#,
);

/// zstd's level: 3 packs a record in a few microseconds; higher saves a byte or two.
const LEVEL: i32 = 3;
/// The largest unpacked record read (a job's JSON is about a kilobyte).
const MAX_UNPACKED: u64 = 16 << 20;

static ENCODER: LazyLock<EncoderDictionary<'static>> =
    LazyLock::new(|| EncoderDictionary::copy(JOBS.as_bytes(), LEVEL));
static DECODER: LazyLock<DecoderDictionary<'static>> =
    LazyLock::new(|| DecoderDictionary::copy(JOBS.as_bytes()));

thread_local! {
    // Each thread keeps its contexts: making one costs more than packing a record.
    static PACKER: RefCell<Option<Compressor<'static>>> = const { RefCell::new(None) };
    static UNPACKER: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

fn failed(what: &str, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(format!("cannot {what} a job record: {e}"))
}

/// Appends `json` packed to `out`.
pub fn pack(json: &[u8], out: &mut Vec<u8>) -> Result<()> {
    PACKER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let packer = match cell.as_mut() {
            Some(packer) => packer,
            None => cell.insert(
                Compressor::with_prepared_dictionary(&ENCODER).map_err(|e| failed("pack", e))?,
            ),
        };
        let packed = packer.compress(json).map_err(|e| failed("pack", e))?;
        out.extend_from_slice(&packed);
        Ok(())
    })
}

/// The JSON of a packed record.
pub fn unpack(packed: &[u8]) -> Result<Vec<u8>> {
    let size = match zstd::zstd_safe::get_frame_content_size(packed) {
        Ok(Some(size)) if size <= MAX_UNPACKED => size as usize,
        Ok(Some(size)) => return Err(failed("unpack", format!("it claims {size} bytes"))),
        Ok(None) | Err(_) => return Err(failed("unpack", "it is not a zstd frame with a size")),
    };
    UNPACKER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let unpacker = match cell.as_mut() {
            Some(unpacker) => unpacker,
            None => cell.insert(
                Decompressor::with_prepared_dictionary(&DECODER)
                    .map_err(|e| failed("unpack", e))?,
            ),
        };
        unpacker
            .decompress(packed, size)
            .map_err(|e| failed("unpack", e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_byte_for_byte_and_smaller() {
        for record in [JOBS.as_bytes(), b"{}", "{\"error\":\"\u{e9}\"}".as_bytes()] {
            let mut packed = Vec::new();
            pack(record, &mut packed).expect("pack");
            assert_eq!(unpack(&packed).expect("unpack"), record);
        }
        let job = br#"{"copy_progress":40,"destination_image_id":null,"destination_region_id":"ot2","destination_tenant_id":"0c7be2e2a3e54b8e8e2a1c60e8a4f3d1","job_id":"5b1f0f0e-6a34-4d59-8f71-1d1c2bb7e0a9","source_image_id":"e2c1f4a7-31b5-4c0b-9d4a-92a3fb0f6c11","source_image_name":"cirros-0.6.2","source_region_id":"ot1","source_tenant_id":"8f1b2c3d4e5f40718293a4b5c6d7e8f9","status":"canceled","seq":77,"created_at":"2026-12-02T02:34:18Z","updated_at":"2026-12-02T02:35:18Z","bytes_copied":0,"bytes_total":0,"error":null,"seeded":true,"enqueued":false,"created_destination":null,"bytes_verified":0,"source_bytes_read":0,"resumes":0,"reading":false,"bytes_reused":0,"bytes_fetched":0,"bytes_on_wire":0,"started_at":null,"finished_at":null,"attempt_started_ms":null,"attempt_bytes_from":0,"rate_bytes_per_s":null,"retries":0,"retry_of":null,"retried_by":null,"kept_destination":null}"#;
        let mut packed = Vec::new();
        pack(job, &mut packed).expect("pack");
        assert!(
            packed.len() * 4 < job.len(),
            "{} of {}",
            packed.len(),
            job.len()
        );
    }

    #[test]
    fn what_is_not_a_packed_record_is_an_error() {
        assert!(unpack(b"").is_err());
        assert!(unpack(b"{\"json\":1}").is_err());
        let mut packed = Vec::new();
        pack(JOBS.as_bytes(), &mut packed).expect("pack");
        packed.truncate(packed.len() / 2);
        assert!(unpack(&packed).is_err());
    }
}
