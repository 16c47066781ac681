//! How sled keeps jobs: many to a key.
//!
//! sled 0.34 splits a leaf once it holds more than 16 keys and keeps some 400 bytes of
//! bookkeeping in memory for every page, cached or not, and reads all of it at start-up. One key
//! per job in each of three trees made some 320,000 pages of a million jobs: 150 MiB of memory
//! doing nothing and most of the start-up. So jobs are kept in blocks:
//! - `job_blocks`: seq / [`JOBS_PER_BLOCK`] (u64 BE) → the block's jobs, each its sequence
//!   number and its record (as `encode_job` wrote it), in sequence order;
//! - `job_ids`: the bucket of a job id (65,536 of them, see [`id_place`]) → tag ‖ seq of
//!   each job there (12 bytes; the record at seq says whose it is);
//! - `tenant_jobs`: source tenant key ‖ the block's first seq (u64 BE) → the sequence
//!   numbers of that tenant's jobs from there, in order, at most [`SEQS_PER_TENANT_BLOCK`]
//!   (a block's seqs lie between its key and the next block's).
//!
//! A job is a read-modify-write of its blocks (a few kilobytes) in one transaction. These are
//! the functions on the bytes of one block.

use uuid::Uuid;

use crate::error::{Result, ServiceError};

/// Jobs in one value of `job_blocks` (some 2.5 KB of packed records).
pub const JOBS_PER_BLOCK: u64 = 16;
/// Sequence numbers in one value of `tenant_jobs` (512 bytes).
pub const SEQS_PER_TENANT_BLOCK: usize = 64;

pub fn block_key(seq: u64) -> [u8; 8] {
    (seq / JOBS_PER_BLOCK).to_be_bytes()
}

/// A job id's bucket in `job_ids` and its tag there.
pub type IdPlace = ([u8; 2], [u8; 4]);

/// Where `id` is kept in `job_ids`: its bucket and the tag that tells it from the others
/// there, from a mix of all its bits, so that ids that are not random (a seed's, a
/// time-ordered UUID's) spread as well. Two ids of one bucket share a tag once in 2^32.
pub fn id_place(id: &Uuid) -> IdPlace {
    let (hi, lo) = id.as_u64_pair();
    let mut x = hi ^ lo.rotate_left(29);
    // splitmix64's finalizer
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let [a, b, c, d, e, f, ..] = x.to_be_bytes();
    ([a, b], [c, d, e, f])
}

fn corrupt(what: &str) -> ServiceError {
    ServiceError::Internal(format!("corrupt {what}"))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    bytes
        .get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

/// The jobs of a `job_blocks` value: (seq, record), in sequence order. Each is seq (8 bytes) ‖
/// length (4 bytes) ‖ record.
pub fn entries(block: &[u8]) -> Result<Vec<(u64, &[u8])>> {
    let mut out = Vec::with_capacity(JOBS_PER_BLOCK as usize);
    let mut at = 0;
    while at < block.len() {
        let seq = u64_at(block, at).ok_or_else(|| corrupt("job block"))?;
        let len = block
            .get(at + 8..at + 12)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| corrupt("job block"))? as usize;
        let record = block
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| corrupt("job block"))?;
        out.push((seq, record));
        at += 12 + len;
    }
    Ok(out)
}

/// The record of job `seq` in a block.
pub fn find(block: &[u8], seq: u64) -> Result<Option<&[u8]>> {
    Ok(entries(block)?
        .into_iter()
        .find(|(s, _)| *s == seq)
        .map(|(_, record)| record))
}

fn block_bytes(entries: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|(_, r)| 12 + r.len()).sum());
    for (seq, record) in entries {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(record.len() as u32).to_be_bytes());
        out.extend_from_slice(record);
    }
    out
}

/// `block` (none yet: empty) with job `seq`'s record put in or replaced.
pub fn with(block: Option<&[u8]>, seq: u64, record: &[u8]) -> Result<Vec<u8>> {
    let mut all = match block {
        Some(block) => entries(block)?,
        None => Vec::new(),
    };
    match all.binary_search_by_key(&seq, |(s, _)| *s) {
        Ok(i) => all[i].1 = record,
        Err(i) => all.insert(i, (seq, record)),
    }
    Ok(block_bytes(&all))
}

/// `block` without job `seq`; `None` when nothing is left.
pub fn without(block: &[u8], seq: u64) -> Result<Option<Vec<u8>>> {
    let mut all = entries(block)?;
    all.retain(|(s, _)| *s != seq);
    Ok((!all.is_empty()).then(|| block_bytes(&all)))
}

/// The sequence numbers in a `job_ids` bucket (tag 4 bytes ‖ seq 8 bytes each) of the jobs
/// tagged `tag`: the one asked for is among them, if it is kept.
pub fn bucket_find(bucket: &[u8], tag: [u8; 4]) -> Vec<u64> {
    bucket
        .chunks_exact(12)
        .filter(|e| e[..4] == tag)
        .filter_map(|e| u64_at(e, 4))
        .collect()
}

fn bucket_entries<'a>(bucket: &'a [u8], but: &'a [u8; 12]) -> impl Iterator<Item = &'a u8> {
    bucket.chunks_exact(12).filter(move |e| *e != but).flatten()
}

fn entry(tag: [u8; 4], seq: u64) -> [u8; 12] {
    let mut e = [0; 12];
    e[..4].copy_from_slice(&tag);
    e[4..].copy_from_slice(&seq.to_be_bytes());
    e
}

/// `bucket` (none yet: empty) with the job tagged `tag` at `seq`.
pub fn bucket_with(bucket: Option<&[u8]>, tag: [u8; 4], seq: u64) -> Vec<u8> {
    let new = entry(tag, seq);
    let mut out: Vec<u8> = bucket_entries(bucket.unwrap_or_default(), &new)
        .copied()
        .collect();
    out.extend_from_slice(&new);
    out
}

/// `bucket` without the job tagged `tag` at `seq`; `None` when nothing is left.
pub fn bucket_without(bucket: &[u8], tag: [u8; 4], seq: u64) -> Option<Vec<u8>> {
    let out: Vec<u8> = bucket_entries(bucket, &entry(tag, seq)).copied().collect();
    (!out.is_empty()).then_some(out)
}

/// The sequence numbers of a `tenant_jobs` value.
pub fn seqs(block: &[u8]) -> Result<Vec<u64>> {
    if !block.len().is_multiple_of(8) {
        return Err(corrupt("tenant job block"));
    }
    Ok(block.chunks_exact(8).filter_map(|s| u64_at(s, 0)).collect())
}

pub fn seqs_bytes(seqs: &[u64]) -> Vec<u8> {
    seqs.iter().flat_map(|s| s.to_be_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_keeps_its_jobs_in_order_and_each_record_whole() {
        let block = with(None, 7, b"seven").expect("put");
        let block = with(Some(&block), 3, b"three").expect("put");
        let block = with(Some(&block), 9, b"").expect("put");
        let block = with(Some(&block), 7, b"seven again").expect("replace");
        let all = entries(&block).expect("entries");
        assert_eq!(
            all,
            vec![(3, &b"three"[..]), (7, &b"seven again"[..]), (9, &b""[..])]
        );
        assert_eq!(find(&block, 9).expect("find"), Some(&b""[..]));
        assert_eq!(find(&block, 8).expect("find"), None);
        let block = without(&block, 7).expect("remove").expect("left");
        assert_eq!(entries(&block).expect("entries").len(), 2);
        let block = without(&block, 3).expect("remove").expect("left");
        assert_eq!(without(&block, 9).expect("remove"), None);
        // Cut short: an error, not a panic.
        let block = with(None, 1, b"record").expect("put");
        assert!(entries(&block[..block.len() - 1]).is_err());
        assert!(entries(&block[..5]).is_err());
    }

    #[test]
    fn a_bucket_finds_each_job_by_its_tag() {
        let (a, b) = ([1, 2, 3, 4], [9, 9, 9, 9]);
        let bucket = bucket_with(None, a, 1);
        let bucket = bucket_with(Some(&bucket), b, 2);
        let bucket = bucket_with(Some(&bucket), a, 3);
        let bucket = bucket_with(Some(&bucket), a, 3);
        assert_eq!(bucket.len(), 36);
        assert_eq!(bucket_find(&bucket, a), vec![1, 3]);
        assert_eq!(bucket_find(&bucket, b), vec![2]);
        assert_eq!(bucket_find(&bucket, [0; 4]), Vec::<u64>::new());
        let bucket = bucket_without(&bucket, a, 1).expect("left");
        assert_eq!(bucket_find(&bucket, a), vec![3]);
        let bucket = bucket_without(&bucket, a, 3).expect("b left");
        assert_eq!(bucket_without(&bucket, b, 2), None);
    }

    #[test]
    fn ids_that_differ_in_one_place_spread_over_the_buckets() {
        let mut places = std::collections::HashSet::new();
        for i in 0..1000u128 {
            places.insert(id_place(&Uuid::from_u128(i)).0);
            places.insert(id_place(&Uuid::from_u128(i << 100)).0);
        }
        assert!(places.len() > 1900, "{} buckets", places.len());
    }

    #[test]
    fn tenant_blocks_are_sequence_numbers() {
        let bytes = seqs_bytes(&[1, 5, u64::MAX]);
        assert_eq!(seqs(&bytes).expect("seqs"), vec![1, 5, u64::MAX]);
        assert!(seqs(&bytes[..7]).is_err());
    }
}
