//! The store contract: what every backend must do, as one suite of functions over `&dyn Repo`
//! that [`contract_suite!`] runs against each backend (`cargo test contract`). A new backend
//! adds one line at the bottom and passes the same suite.

use std::sync::Arc;

use uuid::Uuid;

use super::{ImageChange, JobQuery, Repo};
use crate::error::ServiceError;
use crate::manifest::{self, Entry, Hash, CHUNK_SIZE};
use crate::model::{
    Image, ImageStatus, Job, JobStatus, JobWire, Region, RegionKind, Tenant, TenantKey, TokenInfo,
    TokenRecord, User,
};

/// A backend under test: a fresh, empty store in `dir`, and the same store opened again there
/// (what was flushed must be there).
pub trait Backend {
    fn open(dir: &std::path::Path) -> Arc<dyn Repo>;
}

pub(super) const A: &str = "236ae314ef6944f4ab98fa7519e54325";
pub(super) const B: &str = "91b5c7c09cbd45caa3c146fd67ae471e";

fn key(id: &str) -> TenantKey {
    TenantKey::parse(id).expect("tenant id")
}

pub(super) fn region(id: &str) -> Region {
    Region {
        id: id.into(),
        kind: RegionKind::Directory {
            dir: format!("/srv/{id}").into(),
        },
        disk_formats: vec!["raw".into()],
        created_at: 1,
        pin: None,
    }
}

fn tenant(id: &str) -> Tenant {
    Tenant {
        id: id.into(),
        region: "ot1".into(),
        name: None,
        created_at: 1,
        quota_bytes: None,
        quota_jobs: None,
    }
}

fn image(owner: &str, status: ImageStatus) -> Image {
    Image {
        id: Uuid::new_v4(),
        name: "cirros".into(),
        owner: owner.into(),
        region: "ot1".into(),
        status,
        disk_format: "raw".into(),
        container_format: "bare".into(),
        size: 10,
        checksum: None,
        os_hash_algo: None,
        os_hash_value: None,
        created_at: 1,
        updated_at: 1,
        meta: Default::default(),
    }
}

fn user(name: &str) -> User {
    User {
        name: name.into(),
        tenants: vec![A.into()],
        admin: false,
        created_at: 1,
    }
}

/// A token record whose lookup key is `lookup` (as `auth` makes them: hex in the record).
fn token(user: &str, lookup: &[u8]) -> TokenRecord {
    TokenRecord {
        info: TokenInfo {
            id: Uuid::new_v4(),
            user: user.into(),
            tenant: A.into(),
            created_at: 1,
            expires_at: None,
            revoked_at: None,
        },
        hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        lookup: crate::model::to_hex(lookup),
    }
}

pub(super) fn job(store: &dyn Repo, source: &str, status: JobStatus) -> (TenantKey, Job) {
    let wire = JobWire {
        copy_progress: 0,
        destination_image_id: None,
        destination_region_id: "ot2".into(),
        destination_tenant_id: B.into(),
        job_id: Uuid::new_v4(),
        source_image_id: Uuid::new_v4(),
        source_image_name: "cirros".into(),
        source_region_id: "ot1".into(),
        source_tenant_id: source.into(),
        status,
    };
    let job = Job::new_queued(wire, store.next_seq().expect("seq"), 1, 10);
    (key(source), job)
}

fn ids(jobs: &[Job]) -> Vec<Uuid> {
    jobs.iter().map(|j| j.wire.job_id).collect()
}

pub fn regions_tenants_and_users_insert_once(s: &dyn Repo) {
    assert!(s.insert_region(&region("ot1")).expect("insert"));
    assert!(!s.insert_region(&region("ot1")).expect("again"));
    assert_eq!(s.region("ot1").expect("get"), Some(region("ot1")));
    assert_eq!(s.regions().expect("list").len(), 1);
    s.remove_region("ot1").expect("remove");
    assert_eq!(s.region("ot1").expect("get"), None);

    assert!(s.insert_tenant(key(A), &tenant(A)).expect("insert"));
    // Another spelling of the same 128 bits is the same tenant.
    let hyphenated = "236ae314-ef69-44f4-ab98-fa7519e54325";
    assert!(!s
        .insert_tenant(key(hyphenated), &tenant(hyphenated))
        .expect("again"));
    assert_eq!(s.tenant(key(hyphenated)).expect("get"), Some(tenant(A)));
    let mut limited = tenant(A);
    limited.quota_jobs = Some(20);
    assert!(s.update_tenant(key(A), &limited).expect("update"));
    assert_eq!(s.tenant(key(A)).expect("get"), Some(limited.clone()));
    assert!(!s
        .update_tenant(key(B), &tenant(B))
        .expect("update of a missing tenant"));
    assert_eq!(
        s.tenant(key(B)).expect("get"),
        None,
        "not created by an update"
    );
    s.remove_tenant(key(A)).expect("remove");
    assert!(s.tenants().expect("list").is_empty());

    let user = User {
        name: "alice".into(),
        tenants: vec![A.into()],
        admin: false,
        created_at: 1,
    };
    assert!(s.insert_user(&user).expect("insert"));
    assert!(!s.insert_user(&user).expect("again"));
    assert_eq!(s.user("alice").expect("get"), Some(user));
    assert_eq!(s.users().expect("list").len(), 1);
}

pub fn tokens_are_found_by_lookup_and_go_with_their_user(s: &dyn Repo) {
    let (look_a, look_b) = ([1u8; 32], [2u8; 32]);
    let (mine, other) = (token("alice", &look_a), token("bob", &look_b));
    s.insert_token(&mine, &look_a).expect("insert");
    s.insert_token(&other, &look_b).expect("insert");
    let found = s.token_candidates(&look_a).expect("candidates");
    assert_eq!(found, vec![mine.clone()]);
    assert!(s.token_candidates(&[9; 32]).expect("none").is_empty());
    let mut revoked = mine.clone();
    revoked.info.revoked_at = Some(5);
    s.update_token(&revoked).expect("update");
    assert_eq!(s.token(mine.info.id).expect("get"), Some(revoked));
    assert_eq!(s.remove_user("alice").expect("remove"), 1);
    assert_eq!(s.token(mine.info.id).expect("get"), None);
    assert!(s.token_candidates(&look_a).expect("candidates").is_empty());
    assert_eq!(s.tokens().expect("list"), vec![other]);
}

pub fn a_token_holder_is_its_token_its_user_and_whether_its_tenant_exists(s: &dyn Repo) {
    let look = [3u8; 32];
    let mine = token("alice", &look);
    s.insert_token(&mine, &look).expect("insert");
    assert!(s.insert_user(&user("alice")).expect("user"));
    let holder = |id| s.token_holder(id).expect("holder");
    let found = holder(mine.info.id).expect("found");
    assert_eq!(found.token, mine);
    assert_eq!(found.user, Some(user("alice")));
    assert!(!found.tenant_exists);
    assert!(s.insert_tenant(key(A), &tenant(A)).expect("tenant"));
    assert!(holder(mine.info.id).expect("found").tenant_exists);
    // The tenant id as a hyphenated UUID, in capitals, names the same tenant.
    let mut spelled = token("alice", &[4u8; 32]);
    spelled.info.tenant = Uuid::parse_str(A)
        .expect("uuid")
        .hyphenated()
        .to_string()
        .to_uppercase();
    s.insert_token(&spelled, &[4u8; 32]).expect("insert");
    assert!(holder(spelled.info.id).expect("found").tenant_exists);
    // A tenant id that is no key, and a user that is not there.
    let mut odd = token("carol", &[5u8; 32]);
    odd.info.tenant = format!("{A}0");
    s.insert_token(&odd, &[5u8; 32]).expect("insert");
    let found = holder(odd.info.id).expect("found");
    assert_eq!((found.user, found.tenant_exists), (None, false));
    s.remove_tenant(key(A)).expect("remove tenant");
    assert!(!holder(mine.info.id).expect("found").tenant_exists);
    assert_eq!(holder(Uuid::new_v4()), None);
    // The same from a task of an async runtime, twice (the second on the kept connection).
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for _ in 0..2 {
        let read = runtime.block_on(s.token_holder_async(mine.info.id));
        assert_eq!(read.expect("async"), holder(mine.info.id));
    }
    assert_eq!(
        runtime
            .block_on(s.token_holder_async(Uuid::new_v4()))
            .expect("async"),
        None
    );
}

pub fn a_legacy_lookup_finds_its_token_by_prefix_until_it_is_migrated(s: &dyn Repo) {
    let full = [7u8; 32];
    let legacy = &full[..crate::model::LEGACY_LOOKUP_LEN];
    let old = token("alice", legacy);
    s.insert_token(&old, legacy).expect("insert");
    let mut twin = full;
    twin[20] = 0;
    // Before the migration any string with the same first bytes finds it (argon2 decides).
    assert_eq!(
        s.token_candidates(&full).expect("by full"),
        vec![old.clone()]
    );
    assert_eq!(s.token_candidates(&twin).expect("by twin").len(), 1);
    s.set_token_lookup(old.info.id, &full).expect("migrate");
    let migrated = s.token(old.info.id).expect("get").expect("token");
    assert_eq!(migrated.lookup, crate::model::to_hex(&full));
    assert_eq!(s.token_candidates(&full).expect("by full"), vec![migrated]);
    assert!(s.token_candidates(&twin).expect("by twin").is_empty());
    // A token that is gone is left alone.
    s.set_token_lookup(Uuid::new_v4(), &full).expect("gone");
    assert_eq!(s.remove_user("alice").expect("remove"), 1);
    assert!(s.token_candidates(&full).expect("after removal").is_empty());
}

pub fn images_are_scoped_by_owner_and_ids_are_unique(s: &dyn Repo) {
    let (a, b) = (image(A, ImageStatus::Active), image(B, ImageStatus::Saving));
    s.insert_image(key(A), &a).expect("insert a");
    s.insert_image(key(B), &b).expect("insert b");
    assert!(matches!(
        s.insert_image(key(A), &a),
        Err(ServiceError::Conflict(_))
    ));
    assert_eq!(s.images(Some(key(A))).expect("of A"), vec![a.clone()]);
    assert_eq!(s.images(None).expect("all").len(), 2);
    let mut renamed = a.clone();
    renamed.name = "ubuntu".into();
    s.update_image(&renamed).expect("update");
    assert_eq!(s.image(a.id).expect("get"), Some(renamed));
    s.remove_image(key(A), a.id).expect("remove");
    assert_eq!(s.image(a.id).expect("get"), None);
    assert!(s.images(Some(key(A))).expect("of A").is_empty());
}

pub fn sequence_numbers_strictly_increase(s: &dyn Repo) {
    let mut last = s.next_seq().expect("seq");
    for _ in 0..100 {
        let next = s.next_seq().expect("seq");
        assert!(next > last, "{next} after {last}");
        last = next;
    }
}

pub fn copy_inputs_are_the_image_the_tenant_their_regions_and_a_new_sequence_number(s: &dyn Repo) {
    let img = image(A, ImageStatus::Active);
    let mut dst = tenant(B);
    dst.region = "ot2".into();
    let seq = s.next_seq().expect("seq");
    let empty = s.copy_inputs(img.id, key(B)).expect("nothing there");
    assert_eq!(
        (empty.image, empty.tenant, empty.regions),
        (None, None, vec![])
    );
    assert!(empty.seq > seq);
    s.insert_image(key(A), &img).expect("image");
    assert!(s.insert_tenant(key(B), &dst).expect("tenant"));
    assert!(s.insert_region(&region("ot1")).expect("ot1"));
    let one = s.copy_inputs(img.id, key(B)).expect("ot2 missing");
    assert_eq!(one.image.as_ref(), Some(&img));
    assert_eq!(one.tenant.as_ref(), Some(&dst));
    assert_eq!(one.regions, vec![region("ot1")]);
    assert!(one.seq > empty.seq);
    assert!(s.insert_region(&region("ot2")).expect("ot2"));
    assert!(s.insert_region(&region("ot3")).expect("ot3"));
    let mut both = s.copy_inputs(img.id, key(B)).expect("both").regions;
    both.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(both, vec![region("ot1"), region("ot2")]);
    // The image's region named once when the tenant lives there too.
    let home = s.copy_inputs(img.id, key(A)).expect("no tenant A");
    assert_eq!((home.tenant, home.regions), (None, vec![region("ot1")]));
    let mut same = tenant(A);
    same.region = "ot1".into();
    assert!(s.insert_tenant(key(A), &same).expect("tenant A"));
    assert_eq!(
        s.copy_inputs(img.id, key(A)).expect("A").regions,
        vec![region("ot1")]
    );
}

pub fn inserting_jobs_is_all_or_nothing_and_idempotent(s: &dyn Repo) {
    let first = job(s, A, JobStatus::ReplicateRequested);
    assert_eq!(
        s.insert_jobs(std::slice::from_ref(&first)).expect("insert"),
        1
    );
    // The same job again changes nothing.
    assert_eq!(
        s.insert_jobs(std::slice::from_ref(&first)).expect("again"),
        0
    );
    // A batch with a conflicting job writes none of its jobs.
    let new = job(s, A, JobStatus::ReplicateRequested);
    let mut changed = first.clone();
    changed.1.wire.source_image_name = "other".into();
    let batch = [new.clone(), changed];
    assert!(matches!(
        s.insert_jobs(&batch),
        Err(ServiceError::Conflict(_))
    ));
    assert_eq!(s.job(new.1.wire.job_id).expect("get"), None);
    assert_eq!(s.job(first.1.wire.job_id).expect("get"), Some(first.1));
}

pub fn listings_are_in_creation_order_per_tenant_with_paging(s: &dyn Repo) {
    let jobs: Vec<(TenantKey, Job)> = (0..6)
        .map(|i| {
            job(
                s,
                if i % 2 == 0 { A } else { B },
                JobStatus::ReplicateRequested,
            )
        })
        .collect();
    s.insert_jobs(&jobs).expect("insert");
    let all = s.jobs(&JobQuery::all(None), &|_| true).expect("all");
    assert_eq!(
        ids(&all),
        ids(&jobs.iter().map(|j| j.1.clone()).collect::<Vec<_>>())
    );
    let of_a = s
        .jobs(&JobQuery::all(Some(key(A))), &|_| true)
        .expect("of A");
    assert_eq!(of_a.len(), 3);
    assert!(of_a.iter().all(|j| j.wire.source_tenant_id == A));
    let page = JobQuery {
        tenant: None,
        after: Some(all[1].seq),
        limit: 2,
    };
    assert_eq!(
        ids(&s.jobs(&page, &|_| true).expect("page")),
        ids(&all[2..4])
    );
    let wires = s.job_wires(&page, &|_| true).expect("wires");
    assert_eq!(wires, vec![all[2].wire.clone(), all[3].wire.clone()]);
    let kept = s
        .jobs(&JobQuery::all(None), &|j| j.wire.source_tenant_id == B)
        .expect("kept");
    assert_eq!(kept.len(), 3);
    let past_the_end = JobQuery {
        after: Some(u64::MAX),
        ..JobQuery::all(None)
    };
    assert!(s.jobs(&past_the_end, &|_| true).expect("none").is_empty());
}

pub fn an_update_writes_the_job_and_its_image_together_or_nothing(s: &dyn Repo) {
    let (owner, j) = job(s, A, JobStatus::ReplicateRequested);
    let id = j.wire.job_id;
    s.insert_jobs(&[(owner, j)]).expect("insert");
    let dst = image(B, ImageStatus::Saving);
    let updated = s
        .update_job(id, &|job| {
            assert!(job.start(dst.id, 10, 2));
            Ok(ImageChange::Insert(key(B), dst.clone()))
        })
        .expect("update")
        .expect("job");
    assert_eq!(updated.wire.status, JobStatus::Replicating);
    assert_eq!(s.image(dst.id).expect("image"), Some(dst.clone()));
    // A refusal writes nothing.
    let refused = s.update_job(id, &|job| {
        job.wire.copy_progress = 99;
        Err(ServiceError::Conflict("no".into()))
    });
    assert!(matches!(refused, Err(ServiceError::Conflict(_))));
    assert_eq!(
        s.job(id).expect("get").map(|j| j.wire.copy_progress),
        Some(0)
    );
    // The image goes with the job's ending.
    s.update_job(id, &|job| {
        job.begin_ending(None, 3);
        job.end(3);
        Ok(ImageChange::Remove(key(B), dst.id))
    })
    .expect("end");
    assert_eq!(s.image(dst.id).expect("image"), None);
    assert!(s
        .update_job(Uuid::new_v4(), &|_| Ok(ImageChange::None))
        .expect("unknown")
        .is_none());
}

pub fn the_queue_holds_exactly_the_enqueued_unfinished_jobs(s: &dyn Repo) {
    let queued = job(s, A, JobStatus::ReplicateRequested);
    let done = job(s, A, JobStatus::Replicated);
    let mut seeded = job(s, A, JobStatus::Replicating);
    seeded.1.enqueued = false;
    s.insert_jobs(&[queued.clone(), done, seeded.clone()])
        .expect("insert");
    assert_eq!(s.queued().expect("queue"), vec![queued.1.wire.job_id]);
    // A cancel enqueues a seeded job; its ending takes it off the queue.
    let id = seeded.1.wire.job_id;
    s.update_job(id, &|job| {
        assert!(job.request_cancel(2));
        Ok(ImageChange::None)
    })
    .expect("cancel");
    assert_eq!(s.queued().expect("queue"), vec![queued.1.wire.job_id, id]);
    s.update_job(id, &|job| {
        job.begin_ending(None, 3);
        job.end(3);
        Ok(ImageChange::None)
    })
    .expect("end");
    assert_eq!(s.queued().expect("queue"), vec![queued.1.wire.job_id]);
}

pub fn a_queued_job_is_claimed_by_one_worker_at_a_time(s: &dyn Repo) {
    let (owner, j) = job(s, A, JobStatus::ReplicateRequested);
    let id = j.wire.job_id;
    s.insert_jobs(&[(owner, j)]).expect("insert");
    let none = std::collections::HashSet::new();
    assert_eq!(s.holder(id).expect("holder"), None);
    assert_eq!(s.claim_next(&none).expect("claim"), Some(id));
    assert_eq!(s.holder(id).expect("holder"), Some(s.node().to_string()));
    assert_eq!(s.claim_next(&none).expect("second claim"), None);
    assert_eq!(s.renew_claims(&[id]).expect("renew"), vec![(id, false)]);
    s.release(id);
    assert_eq!(s.holder(id).expect("holder"), None);
    assert_eq!(s.renew_claims(&[id]).expect("renew"), vec![]);
    assert_eq!(
        s.claim_next(&[id].into_iter().collect()).expect("skipped"),
        None
    );
    assert_eq!(s.claim_next(&none).expect("claim after release"), Some(id));
}

/// Claims go oldest first, and never to a job touching a region pinned to another node.
pub fn claims_go_oldest_first_and_honour_pins(s: &dyn Repo) {
    let mut pinned = region("edge");
    pinned.pin = Some(format!("not-{}", s.node()));
    assert!(s.insert_region(&pinned).expect("region"));
    let mut mine = region("lab");
    mine.pin = Some(s.node().to_string());
    assert!(s.insert_region(&mine).expect("region"));
    let (owner, mut first) = job(s, A, JobStatus::ReplicateRequested);
    first.wire.destination_region_id = "edge".into();
    let (_, mut second) = job(s, A, JobStatus::ReplicateRequested);
    second.wire.source_region_id = "lab".into();
    let (_, third) = job(s, A, JobStatus::ReplicateRequested);
    let ids = [first.wire.job_id, second.wire.job_id, third.wire.job_id];
    s.insert_jobs(&[(owner, first), (owner, second), (owner, third)])
        .expect("insert");
    let none = std::collections::HashSet::new();
    assert_eq!(s.claim_next(&none).expect("claim"), Some(ids[1]));
    assert_eq!(s.claim_next(&none).expect("claim"), Some(ids[2]));
    assert_eq!(s.claim_next(&none).expect("claim"), None);
    // A cancel asked for a claimed job is told to its holder when it renews.
    s.update_job(ids[2], &|job| {
        assert!(job.request_cancel(5));
        Ok(ImageChange::None)
    })
    .expect("cancel");
    let mut renewed = s.renew_claims(&ids).expect("renew");
    renewed.sort();
    let mut want = vec![(ids[1], false), (ids[2], true)];
    want.sort();
    assert_eq!(renewed, want);
}

pub fn the_version_changes_with_every_committed_job_write_only(s: &dyn Repo) {
    let before = s.jobs_version();
    let (owner, j) = job(s, A, JobStatus::ReplicateRequested);
    let id = j.wire.job_id;
    s.insert_jobs(&[(owner, j.clone())]).expect("insert");
    let inserted = s.jobs_version();
    assert_ne!(inserted, before);
    s.insert_jobs(&[(owner, j)]).expect("unchanged");
    assert_eq!(s.jobs_version(), inserted, "nothing was written");
    let _ = s.update_job(id, &|_| Err(ServiceError::Conflict("no".into())));
    assert_eq!(
        s.jobs_version(),
        inserted,
        "a refused update writes nothing"
    );
    s.update_job(id, &|job| {
        job.progress(5, 2);
        Ok(ImageChange::None)
    })
    .expect("update");
    assert_ne!(s.jobs_version(), inserted);
}

pub fn many_jobs_list_in_order_page_by_page_also_after_removals(s: &dyn Repo) {
    // Enough of A's for several blocks of every kind, B's between them; one job of A seeded
    // with a sequence number older than all (a restore's), in batches like a seed's.
    let old = {
        let (t, mut j) = job(s, A, JobStatus::Replicated);
        j.seq = 0;
        (t, j)
    };
    let all: Vec<(TenantKey, Job)> = (0..400)
        .map(|i| job(s, if i % 4 == 3 { B } else { A }, JobStatus::Replicated))
        .collect();
    for batch in all.chunks(37) {
        s.insert_jobs(batch).expect("insert");
    }
    s.insert_jobs(std::slice::from_ref(&old))
        .expect("insert the old one");
    let of_a = |jobs: &[(TenantKey, Job)]| -> Vec<Uuid> {
        let mut a: Vec<&Job> = jobs
            .iter()
            .filter(|(t, _)| *t == key(A))
            .map(|(_, j)| j)
            .collect();
        a.sort_by_key(|j| j.seq);
        a.iter().map(|j| j.wire.job_id).collect()
    };
    let paged = |tenant: Option<TenantKey>| -> Vec<Uuid> {
        let mut out: Vec<Job> = Vec::new();
        loop {
            let query = JobQuery {
                tenant,
                after: out.last().map(|j| j.seq),
                limit: 23,
            };
            let page = s.jobs(&query, &|_| true).expect("page");
            let done = page.len() < 23;
            out.extend(page);
            if done {
                return ids(&out);
            }
        }
    };
    let mut expected: Vec<(TenantKey, Job)> = all.clone();
    expected.push(old.clone());
    assert_eq!(paged(Some(key(A))), of_a(&expected));
    assert_eq!(paged(None).len(), 401);
    assert_eq!(
        paged(None)[0],
        old.1.wire.job_id,
        "the oldest sequence number first"
    );
    // Every fifth goes; the rest still list in order, page by page.
    let gone: Vec<Uuid> = expected
        .iter()
        .step_by(5)
        .map(|(_, j)| j.wire.job_id)
        .collect();
    assert_eq!(
        s.remove_jobs(&gone, &|_| true).expect("remove").len(),
        gone.len()
    );
    expected.retain(|(_, j)| !gone.contains(&j.wire.job_id));
    assert_eq!(paged(Some(key(A))), of_a(&expected));
    assert_eq!(paged(None).len(), expected.len());
    for (_, j) in &expected {
        assert_eq!(s.job(j.wire.job_id).expect("job").as_ref(), Some(j));
    }
    for id in &gone {
        assert_eq!(s.job(*id).expect("job"), None);
    }
}

pub fn counts_and_tenant_references_follow_the_jobs(s: &dyn Repo) {
    let jobs = [
        job(s, A, JobStatus::ReplicateRequested),
        job(s, A, JobStatus::Error),
        job(s, A, JobStatus::Error),
    ];
    s.insert_jobs(&jobs).expect("insert");
    let counts = s.job_status_counts().expect("counts");
    assert_eq!(counts.get(&JobStatus::Error), Some(&2));
    assert_eq!(counts.get(&JobStatus::ReplicateRequested), Some(&1));
    assert_eq!(counts.values().sum::<u64>(), 3);
    // A change of status moves the job from one count to the other.
    s.update_job(jobs[0].1.wire.job_id, &|j| {
        j.wire.status = JobStatus::Replicating;
        Ok(ImageChange::None)
    })
    .expect("update");
    let counts = s.job_status_counts().expect("counts");
    assert_eq!(counts.get(&JobStatus::ReplicateRequested), None);
    assert_eq!(counts.get(&JobStatus::Replicating), Some(&1));
    assert_eq!(counts.values().sum::<u64>(), 3);
    // A is a source, B a destination (named by its id as stored), C neither.
    assert!(s.tenant_has_jobs(key(A), A).expect("A").is_some());
    assert!(s.tenant_has_jobs(key(B), B).expect("B").is_some());
    let c = "5d9a3f0e-2b7c-4c1e-9f3a-7e6b1d2c4a5f";
    assert!(s.tenant_has_jobs(key(c), c).expect("C").is_none());
}

pub fn removed_jobs_leave_the_listings_the_queue_the_counts_and_their_tenants(s: &dyn Repo) {
    let done = job(s, A, JobStatus::Replicated);
    let failed = job(s, A, JobStatus::Error);
    let queued = job(s, A, JobStatus::ReplicateRequested);
    s.insert_jobs(&[done.clone(), failed.clone(), queued.clone()])
        .expect("insert");
    let before = s.jobs_version();
    let jid = [
        done.1.wire.job_id,
        failed.1.wire.job_id,
        queued.1.wire.job_id,
    ];
    // Only the jobs that pass the check go; an unknown id is left out.
    let terminal = |j: &Job| j.wire.status.is_terminal();
    let removed = s
        .remove_jobs(&[jid[0], jid[2], Uuid::new_v4()], &terminal)
        .expect("remove");
    assert_eq!(removed, vec![jid[0]]);
    assert_ne!(
        s.jobs_version(),
        before,
        "what is derived from jobs is stale"
    );
    assert_eq!(s.job(jid[0]).expect("get"), None);
    let all = s.jobs(&JobQuery::all(None), &|_| true).expect("all");
    assert_eq!(ids(&all), vec![jid[1], jid[2]]);
    let of_a = s
        .jobs(&JobQuery::all(Some(key(A))), &|_| true)
        .expect("of A");
    assert_eq!(ids(&of_a), vec![jid[1], jid[2]]);
    assert_eq!(s.queued().expect("queue"), vec![jid[2]]);
    let counts = s.job_status_counts().expect("counts");
    assert_eq!(counts.get(&JobStatus::Replicated), None);
    assert_eq!(counts.values().sum::<u64>(), 2);
    // Nothing passes: nothing changes.
    let version = s.jobs_version();
    assert!(s.remove_jobs(&jid, &|_| false).expect("none").is_empty());
    assert_eq!(s.jobs_version(), version);
    // The last jobs naming tenants A and B go: neither is named by a job any more.
    let removed = s.remove_jobs(&jid, &|_| true).expect("rest");
    assert_eq!(removed, vec![jid[1], jid[2]]);
    assert!(s.tenant_has_jobs(key(A), A).expect("A").is_none());
    assert!(s.tenant_has_jobs(key(B), B).expect("B").is_none());
    assert!(s.queued().expect("queue").is_empty());
    // A new job gets listed as before.
    let later = job(s, A, JobStatus::ReplicateRequested);
    s.insert_jobs(std::slice::from_ref(&later)).expect("insert");
    let all = s.jobs(&JobQuery::all(None), &|_| true).expect("all");
    assert_eq!(ids(&all), vec![later.1.wire.job_id]);
}

pub fn users_are_updated_in_place_and_never_created_by_an_update(s: &dyn Repo) {
    let mut user = User {
        name: "alice".into(),
        tenants: vec![A.into()],
        admin: false,
        created_at: 1,
    };
    assert!(!s.update_user(&user).expect("update of a missing user"));
    assert_eq!(s.user("alice").expect("get"), None);
    assert!(s.insert_user(&user).expect("insert"));
    user.tenants = vec![B.into()];
    user.admin = true;
    assert!(s.update_user(&user).expect("update"));
    assert_eq!(s.user("alice").expect("get"), Some(user));
    assert_eq!(s.users().expect("list").len(), 1);
}

pub fn orphans_are_remembered_until_removed(s: &dyn Repo) {
    let (one, two) = (Uuid::new_v4(), Uuid::new_v4());
    s.add_orphan(one, "g1").expect("add");
    s.add_orphan(two, "g2").expect("add");
    let mut orphans = s.orphans().expect("list");
    orphans.sort();
    let mut expected = vec![(one, "g1".to_string()), (two, "g2".to_string())];
    expected.sort();
    assert_eq!(orphans, expected);
    s.remove_orphan(one).expect("remove");
    assert_eq!(s.orphans().expect("list"), vec![(two, "g2".to_string())]);
}

pub fn manifests_are_kept_per_image_and_go_with_it(s: &dyn Repo) {
    let (a, b) = (image(A, ImageStatus::Active), image(B, ImageStatus::Saving));
    s.insert_image(key(A), &a).expect("insert a");
    s.insert_image(key(B), &b).expect("insert b");
    assert_eq!(s.manifest(a.id).expect("none yet"), None);
    s.put_manifest(a.id, b"first").expect("put");
    s.put_manifest(a.id, b"second").expect("replace");
    s.put_manifest(b.id, b"partial").expect("put b");
    assert_eq!(s.manifest(a.id).expect("get"), Some(b"second".to_vec()));
    s.remove_manifest(a.id).expect("remove");
    assert_eq!(s.manifest(a.id).expect("gone"), None);
    s.put_manifest(a.id, b"again").expect("put");
    s.remove_image(key(A), a.id).expect("remove image");
    assert_eq!(s.manifest(a.id).expect("with its image"), None);
    // A job's ending that removes its destination removes the destination's manifest too.
    let (owner, j) = job(s, A, JobStatus::Replicating);
    let id = j.wire.job_id;
    s.insert_jobs(&[(owner, j)]).expect("insert job");
    s.update_job(id, &|job| {
        job.begin_ending(None, 3);
        job.end(3);
        Ok(ImageChange::Remove(key(B), b.id))
    })
    .expect("end");
    assert_eq!(s.manifest(b.id).expect("with the ending"), None);
}

/// The encoded complete manifest of an image made of `entries` (whole chunks).
fn complete_manifest(entries: &[Entry]) -> Vec<u8> {
    let size = (entries.len() * CHUNK_SIZE) as u64;
    manifest::complete(size, Some("ab".repeat(64)), entries.to_vec()).encode()
}

/// A data chunk entry with hash `n` ‖ zeros (the store does not hash chunks).
fn data(n: u8) -> Entry {
    let mut hash = [0u8; 32];
    hash[0] = n;
    Entry::Data(hash)
}

fn hash(n: u8) -> Hash {
    match data(n) {
        Entry::Data(h) => h,
        Entry::Hole => unreachable!(),
    }
}

fn holders(s: &dyn Repo, owner: &str, n: u8) -> Vec<(Uuid, u32)> {
    let mut found = s.chunk_holders(key(owner), &hash(n), 100).expect("holders");
    found.sort();
    found
}

pub fn chunk_holders_are_the_owners_images_with_their_first_index(s: &dyn Repo) {
    let (a, b) = (image(A, ImageStatus::Active), image(B, ImageStatus::Active));
    s.insert_image(key(A), &a).expect("insert a");
    s.insert_image(key(B), &b).expect("insert b");
    s.put_manifest(
        a.id,
        &complete_manifest(&[data(9), data(1), Entry::Hole, data(1)]),
    )
    .expect("put a");
    s.put_manifest(b.id, &complete_manifest(&[data(1), data(2)]))
        .expect("put b");
    // The first chunk that has the hash; owner B never sees A's image, nor A B's.
    assert_eq!(holders(s, A, 1), vec![(a.id, 1)]);
    assert_eq!(holders(s, B, 1), vec![(b.id, 0)]);
    assert_eq!(holders(s, A, 9), vec![(a.id, 0)]);
    assert!(holders(s, B, 9).is_empty(), "A's chunk is not B's");
    assert!(holders(s, A, 2).is_empty(), "B's chunk is not A's");
    assert!(holders(s, A, 7).is_empty(), "nobody has it");
    // A hole is no chunk: not under the hash of zeros, nor under an all-zero hash.
    let zeros = *blake3::hash(&[0u8; CHUNK_SIZE]).as_bytes();
    assert!(s
        .chunk_holders(key(A), &zeros, 10)
        .expect("zeros")
        .is_empty());
    assert!(s
        .chunk_holders(key(A), &[0; 32], 10)
        .expect("nil")
        .is_empty());
    // The hyphenated spelling of A's id is the same owner.
    let hyphenated = key("236ae314-ef69-44f4-ab98-fa7519e54325");
    assert_eq!(
        s.chunk_holders(hyphenated, &hash(1), 10).expect("holders"),
        vec![(a.id, 1)]
    );
}

pub fn partial_manifests_are_not_indexed(s: &dyn Repo) {
    let a = image(A, ImageStatus::Saving);
    s.insert_image(key(A), &a).expect("insert");
    // What a streamed copy records every second: fewer entries, no SHA-512.
    let mut partial = manifest::Manifest::new(4 * CHUNK_SIZE as u64);
    partial.chunks = vec![data(1), data(2)];
    s.put_manifest(a.id, &partial.encode()).expect("partial");
    assert!(holders(s, A, 1).is_empty());
    // Every entry but no SHA-512 yet is partial too.
    partial.chunks = vec![data(1), data(2), data(3), data(4)];
    s.put_manifest(a.id, &partial.encode())
        .expect("all entries");
    assert!(holders(s, A, 4).is_empty());
    // Bytes that are no manifest are stored and not indexed.
    s.put_manifest(a.id, b"not a manifest").expect("junk");
    assert_eq!(
        s.manifest(a.id).expect("get"),
        Some(b"not a manifest".to_vec())
    );
    assert!(holders(s, A, 1).is_empty());
    s.put_manifest(
        a.id,
        &complete_manifest(&[data(1), data(2), data(3), data(4)]),
    )
    .expect("complete");
    assert_eq!(holders(s, A, 4), vec![(a.id, 3)]);
    // A partial one that replaces a complete one takes its entries with it.
    s.put_manifest(a.id, &partial.encode())
        .expect("partial again");
    assert!(holders(s, A, 1).is_empty());
    assert!(holders(s, A, 4).is_empty());
}

pub fn replaced_and_removed_manifests_and_images_leave_the_index(s: &dyn Repo) {
    let a = image(A, ImageStatus::Active);
    s.insert_image(key(A), &a).expect("insert");
    s.put_manifest(a.id, &complete_manifest(&[data(1), data(2)]))
        .expect("first");
    s.put_manifest(a.id, &complete_manifest(&[data(2), data(3)]))
        .expect("replace");
    assert!(holders(s, A, 1).is_empty(), "the replaced manifest's entry");
    assert_eq!(holders(s, A, 2), vec![(a.id, 0)]);
    assert_eq!(holders(s, A, 3), vec![(a.id, 1)]);
    // An image's delete: its record stays (deleted), its manifest goes.
    s.remove_manifest(a.id).expect("remove manifest");
    assert!(holders(s, A, 2).is_empty());
    assert!(holders(s, A, 3).is_empty());
    s.put_manifest(a.id, &complete_manifest(&[data(4)]))
        .expect("again");
    assert_eq!(holders(s, A, 4), vec![(a.id, 0)]);
    s.remove_image(key(A), a.id).expect("remove image");
    assert!(holders(s, A, 4).is_empty());
    // A job's ending that removes its destination takes the destination's entries.
    let b = image(B, ImageStatus::Saving);
    let (owner, j) = job(s, A, JobStatus::Replicating);
    let id = j.wire.job_id;
    s.insert_jobs(&[(owner, j)]).expect("insert job");
    s.update_job(id, &|_| Ok(ImageChange::Insert(key(B), b.clone())))
        .expect("insert destination");
    s.put_manifest(b.id, &complete_manifest(&[data(5)]))
        .expect("destination's");
    assert_eq!(holders(s, B, 5), vec![(b.id, 0)]);
    s.update_job(id, &|job| {
        job.begin_ending(None, 3);
        job.end(3);
        Ok(ImageChange::Remove(key(B), b.id))
    })
    .expect("end");
    assert!(holders(s, B, 5).is_empty());
    assert_eq!(s.manifest(b.id).expect("gone"), None);
}

pub fn a_manifest_stored_before_its_record_is_indexed_by_the_insert(s: &dyn Repo) {
    let a = image(A, ImageStatus::Active);
    s.put_manifest(a.id, &complete_manifest(&[data(1)]))
        .expect("put");
    assert!(holders(s, A, 1).is_empty(), "no record, no owner");
    s.insert_image(key(A), &a).expect("insert");
    assert_eq!(holders(s, A, 1), vec![(a.id, 0)]);
    // The same through a job's insert of its destination.
    let b = image(B, ImageStatus::Saving);
    s.put_manifest(b.id, &complete_manifest(&[data(2), data(2)]))
        .expect("put b");
    let (owner, j) = job(s, A, JobStatus::Replicating);
    let id = j.wire.job_id;
    s.insert_jobs(&[(owner, j)]).expect("insert job");
    s.update_job(id, &|_| Ok(ImageChange::Insert(key(B), b.clone())))
        .expect("insert destination");
    assert_eq!(holders(s, B, 2), vec![(b.id, 0)]);
    // Rewriting a record changes nothing in the index.
    let mut renamed = a.clone();
    renamed.name = "ubuntu".into();
    s.update_image(&renamed).expect("update");
    assert_eq!(holders(s, A, 1), vec![(a.id, 0)]);
}

pub fn chunk_holders_honour_the_limit(s: &dyn Repo) {
    let mut all = Vec::new();
    for _ in 0..5 {
        let a = image(A, ImageStatus::Active);
        s.insert_image(key(A), &a).expect("insert");
        s.put_manifest(a.id, &complete_manifest(&[data(2), data(1)]))
            .expect("put");
        all.push((a.id, 1));
    }
    all.sort();
    assert_eq!(holders(s, A, 1), all);
    let three = s.chunk_holders(key(A), &hash(1), 3).expect("three");
    assert_eq!(three.len(), 3);
    assert!(three.iter().all(|h| all.contains(h)));
    assert!(s
        .chunk_holders(key(A), &hash(1), 0)
        .expect("none")
        .is_empty());
}

/// Runs every contract function against one backend, each on a fresh store, plus the check
/// that what was flushed is there after the store is opened again.
macro_rules! contract_suite {
    ($name:ident, $backend:ty) => {
        mod $name {
            use super::*;

            fn fresh() -> (tempfile::TempDir, Arc<dyn Repo>) {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = <$backend as Backend>::open(dir.path());
                (dir, store)
            }

            contract_suite!(@each
                regions_tenants_and_users_insert_once,
                tokens_are_found_by_lookup_and_go_with_their_user,
                a_token_holder_is_its_token_its_user_and_whether_its_tenant_exists,
                a_legacy_lookup_finds_its_token_by_prefix_until_it_is_migrated,
                images_are_scoped_by_owner_and_ids_are_unique,
                sequence_numbers_strictly_increase,
                copy_inputs_are_the_image_the_tenant_their_regions_and_a_new_sequence_number,
                inserting_jobs_is_all_or_nothing_and_idempotent,
                listings_are_in_creation_order_per_tenant_with_paging,
                an_update_writes_the_job_and_its_image_together_or_nothing,
                the_queue_holds_exactly_the_enqueued_unfinished_jobs,
                a_queued_job_is_claimed_by_one_worker_at_a_time,
                claims_go_oldest_first_and_honour_pins,
                the_version_changes_with_every_committed_job_write_only,
                counts_and_tenant_references_follow_the_jobs,
                many_jobs_list_in_order_page_by_page_also_after_removals,
                removed_jobs_leave_the_listings_the_queue_the_counts_and_their_tenants,
                users_are_updated_in_place_and_never_created_by_an_update,
                orphans_are_remembered_until_removed,
                manifests_are_kept_per_image_and_go_with_it,
                chunk_holders_are_the_owners_images_with_their_first_index,
                partial_manifests_are_not_indexed,
                replaced_and_removed_manifests_and_images_leave_the_index,
                a_manifest_stored_before_its_record_is_indexed_by_the_insert,
                chunk_holders_honour_the_limit
            );

            #[test]
            fn what_was_flushed_is_there_after_a_reopen() {
                let (dir, store) = fresh();
                let (owner, j) = job(&*store, A, JobStatus::ReplicateRequested);
                store.insert_jobs(&[(owner, j.clone())]).expect("insert");
                assert!(store.insert_region(&region("ot1")).expect("region"));
                store.flush().expect("flush");
                drop(store);
                let again = <$backend as Backend>::open(dir.path());
                assert_eq!(again.job(j.wire.job_id).expect("job"), Some(j));
                assert_eq!(again.region("ot1").expect("region"), Some(region("ot1")));
                assert!(again.next_seq().expect("seq") > 0);
            }
        }
    };
    (@each $($test:ident),*) => {
        $(
            #[test]
            fn $test() {
                let (_dir, store) = fresh();
                super::$test(&*store);
            }
        )*
    };
}

struct Sled;

impl Backend for Sled {
    /// Waits for a store just dropped to let go of sled's lock, as a restart does.
    fn open(dir: &std::path::Path) -> Arc<dyn Repo> {
        Arc::new(super::sled::tests::reopen(dir))
    }
}

contract_suite!(sled, Sled);

struct Postgres;

impl Backend for Postgres {
    /// A new database of the test process's cluster for a new `dir`, and the same database
    /// again for the same `dir` (its URL is kept in the directory).
    fn open(dir: &std::path::Path) -> Arc<dyn Repo> {
        let file = dir.join("database-url");
        let url = match std::fs::read_to_string(&file) {
            Ok(url) => url,
            Err(_) => {
                let url = super::postgres::testing::cluster().new_database();
                std::fs::write(&file, &url).expect("keep the URL");
                url
            }
        };
        Arc::new(super::postgres::PgStore::connect(&url, 4, "test-node", None).expect("connect"))
    }
}

contract_suite!(postgres, Postgres);
