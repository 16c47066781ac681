//! The serving end of the peer protocol against a real server: versions, records, manifests,
//! chunks and files of imported images, the scope of tokens, and uploads (begin, chunks,
//! commit, restart, removal).

mod common;

use common::*;
use image_replicator::manifest::{self, Entry, Manifest, CHUNK_SIZE};
use image_replicator::peer::{encode_frame, FrameReader, FRAMES, MAX_CHUNKS};
use reqwest::blocking::Response;
use serde_json::{json, Value};

const CHUNK: usize = CHUNK_SIZE;

/// Bytes of `chunks` chunks and a 1,000-byte tail, different in every chunk, chunks 1 and 4
/// (where there are) all zeros.
fn sample(chunks: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut data = Vec::with_capacity(chunks * CHUNK + 1008);
    while data.len() < chunks * CHUNK + 1000 {
        data.extend_from_slice(&rng.next().to_le_bytes());
    }
    data.truncate(chunks * CHUNK + 1000);
    for hole in [1, 4] {
        if hole < chunks {
            data[hole * CHUNK..(hole + 1) * CHUNK].fill(0);
        }
    }
    // A compressible chunk, so that frames of both data encodings travel.
    data[2 * CHUNK..3 * CHUNK]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 13) as u8);
    data
}

fn manifest_of(data: &[u8]) -> Manifest {
    let chunks = data.chunks(CHUNK).map(Entry::of).collect();
    manifest::complete(data.len() as u64, Some(sha512_hex(data)), chunks)
}

/// The standard lab with its server, alice's (A), bob's (B) and root's (admin) tokens.
struct Peer {
    server: Server,
    lab: Lab,
    alice: String,
    bob: String,
    root: String,
}

fn peer() -> Peer {
    let lab = Lab::new();
    lab.standard();
    let alice = lab.token("alice", TENANT_A);
    let bob = lab.token("bob", TENANT_B);
    let root = lab.token("root", TENANT_A);
    let server = serve(&lab);
    Peer {
        server,
        lab,
        alice,
        bob,
        root,
    }
}

/// `serve --no-worker` with a reserve small enough for a shared machine's disk.
fn serve(lab: &Lab) -> Server {
    lab.serve_with(&["--no-worker", "--min-free", "1M"])
}

/// Imports `data` as an image of tenant A (region ot1); its id.
fn import(lab: &Lab, data: &[u8]) -> String {
    let file = lab.dir.path().join(format!("{}.raw", uuid::Uuid::new_v4()));
    std::fs::write(&file, data).expect("write");
    lab.ok(&import_args(
        file.to_str().expect("path"),
        TENANT_A,
        "disk",
        &[],
    ))
    .trim()
    .to_string()
}

impl Peer {
    fn get(&self, path: &str, token: &str) -> Response {
        self.server.get(path, Some(token))
    }

    fn post(&self, path: &str, token: &str, content_type: &str, body: Vec<u8>) -> Response {
        self.server
            .client
            .post(self.server.url(path))
            .header("X-Auth-Token", token)
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .expect("POST")
    }

    fn ask_chunks(&self, id: &str, token: &str, ranges: Value) -> Response {
        let body = json!({ "ranges": ranges }).to_string().into_bytes();
        let path = format!("/peer/v1/images/{id}/chunks");
        self.post(&path, token, "application/json", body)
    }

    fn put_upload(&self, id: &str, token: &str, owner: &str, data: &[u8]) -> Response {
        use base64::Engine;
        let m = manifest_of(data);
        let body = json!({
            "region": "ot1",
            "image": {
                "name": "pushed", "owner": owner, "disk_format": "raw",
                "container_format": "bare", "size": data.len(), "checksum": null,
                "os_hash_algo": "sha512", "os_hash_value": m.sha512,
            },
            "manifest": base64::engine::general_purpose::STANDARD.encode(m.encode()),
        });
        self.server
            .client
            .put(self.server.url(&format!("/peer/v1/uploads/{id}")))
            .header("X-Auth-Token", token)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .expect("PUT")
    }

    fn send_chunks(&self, id: &str, token: &str, data: &[u8], indexes: &[usize]) -> Response {
        let mut body = Vec::new();
        for &i in indexes {
            encode_frame(&mut body, i, chunk(data, i));
        }
        let path = format!("/peer/v1/uploads/{id}/chunks");
        self.post(&path, token, FRAMES, body)
    }

    fn commit(&self, id: &str, token: &str) -> Response {
        let path = format!("/peer/v1/uploads/{id}/commit");
        self.post(&path, token, "application/json", Vec::new())
    }
}

fn chunk(data: &[u8], i: usize) -> &[u8] {
    &data[i * CHUNK..data.len().min((i + 1) * CHUNK)]
}

fn json_of(resp: Response, status: u16) -> Value {
    assert_eq!(resp.status(), status, "{:?}", resp.text());
    resp.json().expect("JSON")
}

/// The non-hole chunk indexes of `data` as `[first, count]` runs.
fn data_runs(data: &[u8]) -> Value {
    let m = manifest_of(data);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, e) in m.chunks.iter().enumerate() {
        if *e == Entry::Hole {
            continue;
        }
        match runs.last_mut() {
            Some((first, count)) if *first + *count == i => *count += 1,
            _ => runs.push((i, 1)),
        }
    }
    json!(runs)
}

fn part_path(lab: &Lab, id: &str) -> std::path::PathBuf {
    lab.region_dir("ot1").join(format!(".{id}.part"))
}

#[test]
fn get_peer_names_version_1_and_other_versions_are_refused_with_a_sentence() {
    let p = peer();
    let resp = p.server.get("/peer", None);
    assert_eq!(
        json_of(resp, 200),
        json!({"protocol": "image-replicator-peer", "versions": [1]})
    );
    for path in ["/peer/v2/images", "/peer/v2/uploads/x/commit"] {
        let sentence = assert_error(p.server.get(path, Some(&p.alice)), 400);
        assert_eq!(
            sentence,
            "This appliance speaks peer protocol version 1; the request is for version 2."
        );
    }
    assert_error(p.server.get("/peer/v1/nothing", Some(&p.alice)), 404);
    assert_401(p.server.get("/peer/v1/images?region=ot1", None));
    let resp = p
        .server
        .client
        .put(p.server.url("/peer/v1/images/x"))
        .send()
        .expect("PUT");
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, DELETE");
}

#[test]
fn an_imported_image_serves_its_record_manifest_chunks_and_file() {
    let p = peer();
    let data = sample(6, 1);
    let id = import(&p.lab, &data);
    let record = json_of(p.get(&format!("/peer/v1/images/{id}"), &p.alice), 200);
    assert_eq!(record["id"], id.as_str());
    assert_eq!(record["status"], "active");
    assert_eq!(record["size"], data.len());
    assert_eq!(record["os_hash_value"], sha512_hex(&data));
    let listed = json_of(p.get("/peer/v1/images?region=ot1", &p.alice), 200);
    assert_eq!(listed["images"][0]["id"], id.as_str());
    assert_error(p.get("/peer/v1/images?region=nowhere", &p.alice), 404);

    let resp = p.get(&format!("/peer/v1/images/{id}/manifest"), &p.alice);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let m = Manifest::decode(&resp.bytes().expect("manifest")).expect("decodes");
    assert_eq!(m, manifest_of(&data));

    // Every chunk, asked in two runs out of order: one frame each, in the order asked.
    let resp = p.ask_chunks(&id, &p.alice, json!([[3, 4], [0, 3]]));
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], FRAMES);
    let body = resp.bytes().expect("frames").to_vec();
    let mut at = 0;
    let mut encodings = Vec::new();
    while at < body.len() {
        let len = u32::from_be_bytes(body[at + 5..at + 9].try_into().unwrap()) as usize;
        encodings.push((
            u32::from_be_bytes(body[at..at + 4].try_into().unwrap()),
            body[at + 4],
        ));
        at += 9 + len;
    }
    assert_eq!(
        encodings,
        vec![(3, 0), (4, 2), (5, 0), (6, 0), (0, 0), (1, 2), (2, 1)],
        "raw data, holes as encoding 2, the compressible chunk as zstd"
    );
    let mut reader = FrameReader::new(&body[..], &m).expect("reader");
    let mut rebuilt = vec![0xffu8; data.len()];
    while let Some(frame) = reader.next_frame().expect("frame") {
        rebuilt[frame.index * CHUNK..][..frame.bytes.len()].copy_from_slice(&frame.bytes);
    }
    assert!(
        rebuilt == data,
        "the frames carry exactly the image's bytes"
    );

    let resp = p.get(&format!("/peer/v1/images/{id}/file"), &p.alice);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(data.len() as u64));
    assert!(resp.bytes().expect("file") == data);
    let resp = p
        .server
        .client
        .get(p.server.url(&format!("/peer/v1/images/{id}/file")))
        .header("X-Auth-Token", &p.alice)
        .header("Range", "bytes=65530-65549")
        .send()
        .expect("GET");
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 65530-65549/{}", data.len()).as_str()
    );
    assert_eq!(resp.bytes().expect("range").to_vec(), data[65530..65550]);
    let resp = p
        .server
        .client
        .get(p.server.url(&format!("/peer/v1/images/{id}/file")))
        .header("X-Auth-Token", &p.alice)
        .header("Range", format!("bytes={}-", data.len()))
        .send()
        .expect("GET");
    assert_error(resp, 416);
}

#[test]
fn an_image_without_a_manifest_gets_one_made_and_stored_on_the_first_ask() {
    let data = sample(5, 2);
    let lab = Lab::new();
    lab.standard();
    let alice = lab.token("alice", TENANT_A);
    let id = import(&lab, &data);
    let uuid: uuid::Uuid = id.parse().expect("uuid");
    {
        let store = image_replicator::store::open(
            &lab.data_dir(),
            &image_replicator::store::StoreConfig::embedded(),
        )
        .expect("store");
        store.remove_manifest(uuid).expect("remove");
        store.flush().expect("flush");
    }
    let server = serve(&lab);
    let resp = server.get(&format!("/peer/v1/images/{id}/manifest"), Some(&alice));
    assert_eq!(resp.status(), 200);
    let m = Manifest::decode(&resp.bytes().expect("body")).expect("decodes");
    assert_eq!(m, manifest_of(&data));
    assert!(server
        .log_text()
        .contains("making the image's manifest (it has none yet)"));
    drop(server);
    let store = image_replicator::store::open(
        &lab.data_dir(),
        &image_replicator::store::StoreConfig::embedded(),
    )
    .expect("store");
    let kept = store.manifest(uuid).expect("read").expect("stored");
    assert_eq!(Manifest::decode(&kept), Ok(m));
}

#[test]
fn a_token_of_another_tenant_finds_no_image_of_tenant_a_and_cannot_upload_for_it() {
    let p = peer();
    let data = sample(3, 3);
    let id = import(&p.lab, &data);
    let missing = format!("There is no image {id}.");
    for path in ["", "/manifest", "/file"] {
        let resp = p.get(&format!("/peer/v1/images/{id}{path}"), &p.bob);
        assert_eq!(assert_error(resp, 404), missing, "{path}");
    }
    let resp = p.ask_chunks(&id, &p.bob, json!([[0, 1]]));
    assert_eq!(assert_error(resp, 404), missing);
    assert_eq!(
        assert_error(
            p.server
                .delete(&format!("/peer/v1/images/{id}"), Some(&p.bob)),
            404
        ),
        missing
    );
    // The same sentence as for an image that does not exist at all.
    let nobody = uuid::Uuid::new_v4();
    let resp = p.get(&format!("/peer/v1/images/{nobody}"), &p.bob);
    assert_eq!(
        assert_error(resp, 404),
        format!("There is no image {nobody}.")
    );
    let listed = json_of(p.get("/peer/v1/images?region=ot1", &p.bob), 200);
    assert_eq!(listed, json!({"images": []}));
    // The admin sees it.
    let resp = p.get(&format!("/peer/v1/images/{id}"), &p.root);
    assert_eq!(resp.status(), 200);

    let upload = uuid::Uuid::new_v4().to_string();
    let resp = p.put_upload(&upload, &p.bob, TENANT_A, &data);
    assert_error(resp, 403);
    assert!(!part_path(&p.lab, &upload).exists());
    let resp = p.get(&format!("/peer/v1/images/{upload}"), &p.root);
    assert_error(resp, 404);
}

#[test]
fn chunk_ranges_outside_the_image_or_over_1024_chunks_are_400() {
    let p = peer();
    let data = sample(3, 4);
    let id = import(&p.lab, &data);
    for ranges in [json!([[0, 5]]), json!([[4, 1]]), json!([[0, 0]])] {
        let sentence = assert_error(p.ask_chunks(&id, &p.alice, ranges.clone()), 400);
        assert!(
            sentence.contains("not inside the image's 4 chunks"),
            "{sentence}"
        );
    }
    let many: Vec<Value> = (0..MAX_CHUNKS + 1).map(|_| json!([0, 1])).collect();
    let sentence = assert_error(p.ask_chunks(&id, &p.alice, json!(many)), 400);
    assert!(sentence.contains("at most 1024 per request"), "{sentence}");
    let sentence = assert_error(
        p.post(
            &format!("/peer/v1/images/{id}/chunks"),
            &p.alice,
            "application/json",
            b"[1,2]".to_vec(),
        ),
        400,
    );
    assert!(sentence.contains("\"ranges\""), "{sentence}");
}

#[test]
fn an_upload_becomes_an_active_image_with_the_senders_bytes_and_manifest() {
    let p = peer();
    let data = sample(7, 5);
    let id = uuid::Uuid::new_v4().to_string();
    let begun = json_of(p.put_upload(&id, &p.alice, TENANT_A, &data), 201);
    assert_eq!(begun, json!({"missing": data_runs(&data)}));
    let record = json_of(p.get(&format!("/peer/v1/images/{id}"), &p.alice), 200);
    assert_eq!(record["status"], "uploading");
    assert!(part_path(&p.lab, &id).exists());
    // The manifest is served for active images only.
    assert_error(
        p.get(&format!("/peer/v1/images/{id}/manifest"), &p.alice),
        409,
    );

    let all: Vec<usize> = (0..manifest_of(&data).chunk_count()).collect();
    let resp = p.send_chunks(&id, &p.alice, &data, &all[..4]);
    assert_eq!(json_of(resp, 200), json!({"received": 4}));
    let resp = p.send_chunks(&id, &p.alice, &data, &all[4..]);
    assert_eq!(json_of(resp, 200), json!({"received": all.len() - 4}));
    let again = json_of(p.put_upload(&id, &p.alice, TENANT_A, &data), 200);
    assert_eq!(again, json!({"missing": []}));

    let active = json_of(p.commit(&id, &p.alice), 200);
    assert_eq!(active["status"], "active");
    assert_eq!(active["size"], data.len());
    assert_eq!(active["os_hash_value"], sha512_hex(&data));
    let file = std::fs::read(p.lab.region_dir("ot1").join(&id)).expect("the image's file");
    assert!(file == data, "the file holds the sender's bytes");
    assert!(!part_path(&p.lab, &id).exists());
    let resp = p.get(&format!("/peer/v1/images/{id}/manifest"), &p.alice);
    assert_eq!(resp.status(), 200);
    let kept = Manifest::decode(&resp.bytes().expect("manifest")).expect("decodes");
    assert_eq!(kept, manifest_of(&data));
    assert!(!p
        .server
        .log_text()
        .contains("making the image's manifest (it has none yet)"));
    // A PUT of the same id now is a conflict: the image exists.
    assert_error(p.put_upload(&id, &p.alice, TENANT_A, &data), 409);
    assert_error(p.commit(&id, &p.alice), 409);
}

#[test]
fn a_chunk_that_differs_from_the_manifest_is_422_and_nothing_of_it_is_written() {
    let p = peer();
    let data = sample(3, 6);
    let id = uuid::Uuid::new_v4().to_string();
    json_of(p.put_upload(&id, &p.alice, TENANT_A, &data), 201);
    let mut forged = data.clone();
    forged[2 * CHUNK + 100] ^= 0x55;
    let resp = p.send_chunks(&id, &p.alice, &forged, &[0, 2]);
    assert_eq!(
        assert_error(resp, 422),
        "Chunk 2 does not match the manifest."
    );
    let part = std::fs::read(part_path(&p.lab, &id)).expect("part");
    assert!(part.len() <= 2 * CHUNK, "chunk 2 was not written");
    assert!(part[..CHUNK] == data[..CHUNK], "chunk 0, before it, was");
    // Refused at the first frame of a long body: the answer still arrives whole.
    let big = sample(300, 10);
    let id2 = uuid::Uuid::new_v4().to_string();
    json_of(p.put_upload(&id2, &p.alice, TENANT_A, &big), 201);
    let mut forged = big.clone();
    forged[7] ^= 1;
    let mut body = Vec::new();
    encode_frame(&mut body, 0, chunk(&forged, 0));
    for i in 2..300 {
        encode_frame(&mut body, i, chunk(&big, i));
    }
    let resp = p.post(
        &format!("/peer/v1/uploads/{id2}/chunks"),
        &p.alice,
        FRAMES,
        body,
    );
    assert_eq!(
        assert_error(resp, 422),
        "Chunk 0 does not match the manifest."
    );
    let missing = json_of(p.put_upload(&id2, &p.alice, TENANT_A, &big), 200);
    assert_eq!(
        missing,
        json!({"missing": data_runs(&big)}),
        "nothing was written"
    );
    // A frame that is not a frame is a 400.
    let resp = p.post(
        &format!("/peer/v1/uploads/{id}/chunks"),
        &p.alice,
        FRAMES,
        vec![0, 0, 0, 9, 0, 0, 0, 0, 1, 7],
    );
    assert_error(resp, 400);
    // Frames sent as anything else are a 415.
    let resp = p.post(
        &format!("/peer/v1/uploads/{id}/chunks"),
        &p.alice,
        "application/json",
        Vec::new(),
    );
    assert_error(resp, 415);
}

#[test]
fn a_commit_with_chunks_missing_is_409_naming_them_in_json() {
    let p = peer();
    let data = sample(6, 7);
    let id = uuid::Uuid::new_v4().to_string();
    json_of(p.put_upload(&id, &p.alice, TENANT_A, &data), 201);
    let resp = p.send_chunks(&id, &p.alice, &data, &[0, 3, 6]);
    assert_eq!(json_of(resp, 200), json!({"received": 3}));
    let resp = p.commit(&id, &p.alice);
    assert_eq!(resp.status(), 409);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json; charset=UTF-8"
    );
    let body: Value = resp.json().expect("JSON");
    assert_eq!(body, json!({"missing": [[2, 1], [5, 1]]}));
    let record = json_of(p.get(&format!("/peer/v1/images/{id}"), &p.alice), 200);
    assert_eq!(record["status"], "uploading");
    assert!(!p.lab.region_dir("ot1").join(&id).exists());
}

#[test]
fn an_upload_survives_a_restart_and_then_asks_only_for_the_chunks_not_yet_received() {
    let mut p = peer();
    let data = sample(8, 8);
    let id = uuid::Uuid::new_v4().to_string();
    json_of(p.put_upload(&id, &p.alice, TENANT_A, &data), 201);
    let resp = p.send_chunks(&id, &p.alice, &data, &[0, 2, 3]);
    assert_eq!(json_of(resp, 200), json!({"received": 3}));
    p.server.kill_9();
    p.server = serve(&p.lab);
    assert!(part_path(&p.lab, &id).exists(), "the partial file stays");
    let again = json_of(p.put_upload(&id, &p.alice, TENANT_A, &data), 200);
    assert_eq!(again, json!({"missing": [[5, 4]]}));
    // Another manifest for the same upload is a conflict.
    let mut other = data.clone();
    other[0] ^= 1;
    assert_error(p.put_upload(&id, &p.alice, TENANT_A, &other), 409);
    let resp = p.send_chunks(&id, &p.alice, &data, &[5, 6, 7, 8]);
    assert_eq!(json_of(resp, 200), json!({"received": 4}));
    let active = json_of(p.commit(&id, &p.alice), 200);
    assert_eq!(active["status"], "active");
    let file = std::fs::read(p.lab.region_dir("ot1").join(&id)).expect("file");
    assert!(file == data);
}

#[test]
fn deleting_an_upload_removes_its_record_and_partial_file() {
    let p = peer();
    let data = sample(3, 9);
    let id = uuid::Uuid::new_v4().to_string();
    json_of(p.put_upload(&id, &p.alice, TENANT_A, &data), 201);
    p.send_chunks(&id, &p.alice, &data, &[0]);
    assert!(part_path(&p.lab, &id).exists());
    let path = format!("/peer/v1/uploads/{id}");
    assert_error(p.server.delete(&path, Some(&p.bob)), 404);
    let resp = p.server.delete(&path, Some(&p.alice));
    assert_eq!(resp.status(), 204);
    assert!(!part_path(&p.lab, &id).exists());
    assert_error(p.get(&format!("/peer/v1/images/{id}"), &p.alice), 404);
    assert_error(p.server.delete(&path, Some(&p.alice)), 404);
    // The id is free again.
    json_of(p.put_upload(&id, &p.alice, TENANT_A, &data), 201);
}

#[test]
fn delete_of_an_image_is_204_for_its_owner_and_409_while_a_job_reads_it() {
    let p = peer();
    let data = sample(3, 11);
    let (busy, free) = (import(&p.lab, &data), import(&p.lab, &data));
    p.lab.ok(&[
        "user", "add", "alice2", "--tenant", TENANT_A, "--tenant", TENANT_B,
    ]);
    let copier = p.lab.token("alice2", TENANT_A);
    // No worker runs: the job stays queued, reading its image.
    p.server.copy_ok(&copier, &busy, TENANT_B);
    let resp = p
        .server
        .delete(&format!("/peer/v1/images/{busy}"), Some(&p.alice));
    let sentence = assert_error(resp, 409);
    assert!(sentence.contains("in use by job"), "{sentence}");
    let resp = p
        .server
        .delete(&format!("/peer/v1/images/{free}"), Some(&p.alice));
    assert_eq!(resp.status(), 204);
    assert_error(p.get(&format!("/peer/v1/images/{free}"), &p.alice), 404);
    assert!(!p.lab.region_dir("ot1").join(&free).exists());
    // An upload in progress has no bytes to serve yet.
    let id = uuid::Uuid::new_v4().to_string();
    json_of(p.put_upload(&id, &p.alice, TENANT_A, &data), 201);
    for resp in [
        p.get(&format!("/peer/v1/images/{id}/file"), &p.alice),
        p.ask_chunks(&id, &p.alice, json!([[0, 1]])),
    ] {
        let sentence = assert_error(resp, 409);
        assert_eq!(sentence, format!("Image {id} is uploading, not active."));
    }
}

#[test]
fn a_long_chunk_answer_keeps_the_order_asked_and_a_dropped_one_leaves_the_server_serving() {
    let p = peer();
    let data = sample(99, 12);
    let id = import(&p.lab, &data);
    let m = manifest_of(&data);
    let order: Vec<usize> = (60..100).chain(0..60).collect();
    let resp = p.ask_chunks(&id, &p.alice, json!([[60, 40], [0, 60]]));
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().expect("frames").to_vec();
    let mut reader = FrameReader::new(&body[..], &m).expect("reader");
    for &i in &order {
        let frame = reader.next_frame().expect("frame").expect("one per chunk");
        assert_eq!(frame.index, i);
        assert!(frame.bytes == chunk(&data, i), "chunk {i}");
    }
    assert!(reader.next_frame().expect("end").is_none());
    // A client that reads a few bytes and hangs up, ten times over.
    for _ in 0..10 {
        let mut resp = p.ask_chunks(&id, &p.alice, json!([[0, 100]]));
        let mut head = [0u8; 9];
        std::io::Read::read_exact(&mut resp, &mut head).expect("the first header");
        drop(resp);
    }
    let resp = p.get(&format!("/peer/v1/images/{id}/file"), &p.alice);
    assert!(resp.bytes().expect("file") == data);
    assert_eq!(log_panics(&p.server.log_text()), Vec::<String>::new());
}

#[test]
fn an_admin_uploads_for_any_tenant_of_the_region_and_an_empty_image_commits_at_once() {
    let p = peer();
    let id = uuid::Uuid::new_v4().to_string();
    let begun = json_of(p.put_upload(&id, &p.root, TENANT_C, &[]), 201);
    assert_eq!(begun, json!({"missing": []}));
    let active = json_of(p.commit(&id, &p.root), 200);
    assert_eq!(active["status"], "active");
    assert_eq!(active["owner"], TENANT_C);
    assert_eq!(active["size"], 0);
    let file = std::fs::read(p.lab.region_dir("ot1").join(&id)).expect("file");
    assert!(file.is_empty());
    // Tenant B lives in region ot2: not a tenant of ot1.
    let other = uuid::Uuid::new_v4().to_string();
    let sentence = assert_error(p.put_upload(&other, &p.root, TENANT_B, &[1, 2, 3]), 404);
    assert_eq!(
        sentence,
        format!("There is no tenant {TENANT_B} in region ot1.")
    );
    let sentence = assert_error(p.put_upload("not-a-uuid", &p.alice, TENANT_A, &[]), 400);
    assert_eq!(sentence, "The upload's id 'not-a-uuid' is not a UUID.");
}

#[test]
fn a_slow_upload_body_is_taken_while_it_keeps_arriving_and_a_stalled_one_is_408() {
    use base64::Engine;
    use common::raw;
    use std::io::Write;
    use std::time::{Duration, Instant};
    let p = peer();
    let data = sample(3, 13);
    let m = manifest_of(&data);
    let body = json!({
        "region": "ot1",
        "image": {
            "name": "slow", "owner": TENANT_A, "disk_format": "raw", "container_format": "bare",
            "size": data.len(), "checksum": null, "os_hash_algo": "sha512",
            "os_hash_value": m.sha512,
        },
        "manifest": base64::engine::general_purpose::STANDARD.encode(m.encode()),
    })
    .to_string();
    let request = |id: &str| {
        format!(
            "PUT /peer/v1/uploads/{id} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            p.alice,
            body.len()
        )
    };
    let addr = p.server.addr();
    // Stalled after a few bytes: a 408 once ten seconds pass without more.
    let stalled = {
        let head = request(&uuid::Uuid::new_v4().to_string());
        let addr = addr.clone();
        let first = body[..10].to_string();
        std::thread::spawn(move || {
            let mut stream = raw::send(&addr, format!("{head}{first}").as_bytes());
            let started = Instant::now();
            let answer = raw::read_answer(&mut stream, Duration::from_secs(20));
            (answer, started.elapsed())
        })
    };
    // Four pieces 3.5 s apart: longer than ten seconds in all, never ten without a byte.
    let id = uuid::Uuid::new_v4().to_string();
    let mut stream = raw::send(&addr, request(&id).as_bytes());
    let step = body.len().div_ceil(4);
    for piece in body.as_bytes().chunks(step) {
        std::thread::sleep(Duration::from_millis(3500));
        stream.write_all(piece).expect("a piece");
    }
    let answer = raw::read_answer(&mut stream, Duration::from_secs(10));
    assert_eq!(answer.status(), Some(201), "{}", answer.text());
    let (answer, took) = stalled.join().expect("the stalled request");
    assert_eq!(answer.status(), Some(408), "{}", answer.text());
    assert!(
        answer.text().contains("stopped arriving for 10 seconds"),
        "{}",
        answer.text()
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
}
