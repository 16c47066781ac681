//! Peer regions: two real appliances on loopback, a counting TCP relay between them, jobs
//! through the four routes in both directions.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use serde_json::Value;

const CHUNK: usize = 64 * 1024;

/// The central site: region ot1 with tenant A (user root, admin) and tenant C (user carol).
struct Central {
    server: Server,
    lab: Lab,
    admin: String,
}

fn central() -> Central {
    central_with(&["--no-worker"])
}

/// [`central`] served with `args`.
fn central_with(args: &[&str]) -> Central {
    let lab = Lab::new();
    lab.ok(&["region", "add", "ot1"]);
    lab.ok(&["tenant", "add", TENANT_A, "--region", "ot1"]);
    lab.ok(&["tenant", "add", TENANT_C, "--region", "ot1"]);
    lab.ok(&["user", "add", "root", "--tenant", TENANT_A, "--admin"]);
    lab.ok(&["user", "add", "carol", "--tenant", TENANT_C]);
    let admin = lab.token("root", TENANT_A);
    let server = lab.serve_with(args);
    Central { server, lab, admin }
}

/// The edge site: its own region `edge` with tenant B, and the central's ot1 as peer region
/// `central` (tenant A lives there); alice2 is a member of A and B. Her token for A, and for B.
struct Edge {
    server: Server,
    lab: Lab,
    for_a: String,
    for_b: String,
}

fn edge(peer_url: &str, peer_token: &str, serve: &[&str]) -> Edge {
    edge_with(peer_url, peer_token, &[], serve)
}

/// [`edge`] with more options for its peer region.
fn edge_with(peer_url: &str, peer_token: &str, region: &[&str], serve: &[&str]) -> Edge {
    edge_in(None, peer_url, peer_token, region, serve)
}

/// [`edge_with`], its own region in `dir` if given.
fn edge_in(
    dir: Option<&std::path::Path>,
    peer_url: &str,
    peer_token: &str,
    region: &[&str],
    serve: &[&str],
) -> Edge {
    let lab = Lab::new();
    let token_file = lab.data_dir().with_file_name("central.token");
    std::fs::write(&token_file, format!("{peer_token}\n")).expect("token file");
    match dir {
        Some(dir) => lab.ok(&[
            "region",
            "add",
            "edge",
            "--dir",
            dir.to_str().expect("path"),
        ]),
        None => lab.ok(&["region", "add", "edge"]),
    };
    let mut add = vec![
        "region",
        "add",
        "central",
        "--peer-url",
        peer_url,
        "--peer-token-file",
        token_file.to_str().expect("path"),
        "--peer-region",
        "ot1",
    ];
    add.extend_from_slice(region);
    lab.ok(&add);
    lab.ok(&["tenant", "add", TENANT_A, "--region", "central"]);
    lab.ok(&["tenant", "add", TENANT_B, "--region", "edge"]);
    lab.ok(&[
        "user", "add", "alice2", "--tenant", TENANT_A, "--tenant", TENANT_B,
    ]);
    let for_a = lab.token("alice2", TENANT_A);
    let for_b = lab.token("alice2", TENANT_B);
    let server = lab.serve_with(serve);
    Edge {
        server,
        lab,
        for_a,
        for_b,
    }
}

/// An image's bytes: `chunks` chunks of 64 KiB, every fifth one zeros (a hole), the others
/// pseudo-random bytes of half entropy (they compress about 2:1), each from `(seed, index)`.
fn image_bytes(seed: u64, chunks: usize) -> Vec<u8> {
    let mut out = vec![0u8; chunks * CHUNK];
    for (k, chunk) in out.chunks_mut(CHUNK).enumerate() {
        if k % 5 == 2 {
            continue;
        }
        fill(chunk, seed, k);
    }
    out
}

fn fill(chunk: &mut [u8], seed: u64, k: usize) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (k as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd);
    for b in chunk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x as u8) & 0x0f;
    }
}

fn data_bytes(bytes: &[u8]) -> u64 {
    bytes
        .chunks(CHUNK)
        .filter(|c| c.iter().any(|&b| b != 0))
        .map(|c| c.len() as u64)
        .sum()
}

/// Imports `bytes` into `lab` as an image of `tenant`; its id.
fn import(lab: &Lab, tenant: &str, name: &str, bytes: &[u8]) -> String {
    let path = lab.data_dir().with_file_name(format!("{name}.raw"));
    std::fs::write(&path, bytes).expect("image file");
    lab.ok(&import_args(
        path.to_str().expect("path"),
        tenant,
        name,
        &[],
    ))
    .trim()
    .to_string()
}

fn job_json(lab: &Lab, id: &str) -> Value {
    lab.ok_json(&["job", "show", id])
}

fn field(job: &Value, key: &str) -> u64 {
    job[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {job}"))
}

/// Copies and waits for the job's end; the job as `job show --json` gives it.
fn copy_and_wait(edge: &Edge, token: &str, image: &str, tenant: &str) -> Value {
    let id = edge.server.copy_ok(token, image, tenant);
    let job = wait_terminal(&edge.lab, &id, Duration::from_secs(60));
    assert_eq!(
        job["status"],
        "replicated",
        "{job}\n{}",
        edge.server.log_text()
    );
    job
}

fn image_file(lab: &Lab, region: &str, id: &str) -> PathBuf {
    lab.region_dir(region).join(id)
}

/// Kills the peer, keeps the link down for 1.5 s, starts the peer again on another port, which
/// the relay follows, and waits for `job` to be `replicated`.
fn restart_the_peer_mid_copy(
    central: &mut Central,
    proxy: &Proxy,
    edge: &Edge,
    job: &str,
) -> Value {
    central.server.kill_9();
    proxy.cut();
    std::thread::sleep(Duration::from_millis(1500));
    central.server = central.lab.serve();
    proxy.retarget(&central.server.addr());
    proxy.restore();
    let done = wait_terminal(&edge.lab, job, Duration::from_secs(90));
    assert_eq!(done["status"], "replicated", "{}", edge.server.log_text());
    done
}

/// An XFS file system in a file, loop-mounted for one test and unmounted when dropped.
struct Xfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Xfs {
    /// `None` (said on stderr) where this process may not mount: not root.
    fn mount() -> Option<Xfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not run: mounting an XFS image for the reflink test needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("xfs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(512 << 20))
            .expect("file system image");
        let run = |program: &str, args: &[&str]| {
            let out = std::process::Command::new(program)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("{program}: {e} (scripts/test.sh installs xfsprogs)"));
            assert!(
                out.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (image, mount_point) = (image.to_str().expect("path"), mnt.to_str().expect("path"));
        run("mkfs.xfs", &["-q", "-m", "reflink=1", image]);
        run("mount", &["-o", "loop", image, mount_point]);
        Some(Xfs { mnt, _dir: dir })
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// Extents of `path` that share their blocks with another file, as FIEMAP reports them.
fn shared_extents(path: &std::path::Path) -> usize {
    let out = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .expect("filefrag");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("shared"))
        .count()
}

#[test]
fn a_copy_from_a_peer_fetches_only_the_chunks_the_destination_tenant_lacks() {
    let central = central();
    let v1 = image_bytes(1, 48);
    let mut v2 = v1.clone();
    // v2: two chunks changed, one hole filled.
    fill(&mut v2[3 * CHUNK..4 * CHUNK], 2, 3);
    fill(&mut v2[30 * CHUNK..31 * CHUNK], 2, 30);
    fill(&mut v2[7 * CHUNK..8 * CHUNK], 2, 7);
    let v1_id = import(&central.lab, TENANT_A, "v1", &v1);
    let v2_id = import(&central.lab, TENANT_A, "v2", &v2);
    let proxy = Proxy::start(&central.server.addr());
    let edge = edge(&proxy.url(), &central.admin, &[]);

    // v1 with nothing of it at the edge: every data chunk crosses, compressed; holes do not.
    let shown = copy_and_wait(&edge, &edge.for_a, &v1_id, TENANT_B);
    let dst = shown["destination_image_id"].as_str().expect("destination");
    let file = image_file(&edge.lab, "edge", dst);
    assert_eq!(std::fs::read(&file).expect("copy"), v1);
    assert_eq!(field(&shown, "bytes_fetched"), data_bytes(&v1));
    assert_eq!(field(&shown, "bytes_reused"), 0);
    // Raw or compressed as the link keeps up: at most the chunks, their frames and the manifest.
    let wire = field(&shown, "bytes_on_wire");
    assert!(
        wire <= data_bytes(&v1) + 48 * 9 + 4096,
        "{wire} on the wire"
    );
    let (_, down) = proxy.bytes();
    assert!(
        down >= wire && down < wire + 64 * 1024,
        "the relay saw {down}, the job {wire}"
    );
    let allocated = std::fs::metadata(&file).expect("stat").blocks() * 512;
    assert!(
        allocated <= data_bytes(&v1) + 64 * 1024,
        "holes stay holes: {allocated} allocated"
    );

    // v2 after v1: only the three chunks v1 lacks cross.
    let before = proxy.bytes().1;
    let shown = copy_and_wait(&edge, &edge.for_a, &v2_id, TENANT_B);
    let dst = shown["destination_image_id"].as_str().expect("destination");
    assert_eq!(
        std::fs::read(image_file(&edge.lab, "edge", dst)).expect("copy"),
        v2
    );
    assert_eq!(field(&shown, "bytes_fetched"), 3 * CHUNK as u64);
    assert_eq!(
        field(&shown, "bytes_reused"),
        data_bytes(&v2) - 3 * CHUNK as u64
    );
    let crossed = proxy.bytes().1 - before;
    assert!(
        crossed < v2.len() as u64 / 10,
        "v2 after v1 moved {crossed} bytes"
    );

    // The same image again: its manifest, and no chunk.
    let before = proxy.bytes().1;
    let shown = copy_and_wait(&edge, &edge.for_a, &v2_id, TENANT_B);
    assert_eq!(field(&shown, "bytes_fetched"), 0);
    assert_eq!(field(&shown, "bytes_reused"), data_bytes(&v2));
    let crossed = proxy.bytes().1 - before;
    assert!(
        crossed < v2.len() as u64 / 100,
        "a second copy moved {crossed} bytes"
    );

    let metrics = edge.server.get("/metrics", None).text().expect("metrics");
    for name in [
        "image_replicator_peer_reused_bytes_total",
        "image_replicator_peer_fetched_bytes_total",
        "image_replicator_peer_wire_bytes_total",
    ] {
        assert!(metrics.contains(name), "{name} in /metrics");
    }
    let regions = edge.lab.ok_json(&["region", "list"]);
    let kinds: Vec<&str> = regions
        .as_array()
        .expect("regions")
        .iter()
        .map(|r| r["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds.len(), 2);
    assert!(
        kinds.contains(&"directory") && kinds.contains(&"peer"),
        "{kinds:?}"
    );
}

#[test]
fn on_xfs_a_pull_shares_the_blocks_of_the_chunks_it_takes_from_local_images() {
    let Some(xfs) = Xfs::mount() else {
        return;
    };
    let central = central();
    let v1 = image_bytes(41, 64);
    let mut v2 = v1.clone();
    fill(&mut v2[5 * CHUNK..6 * CHUNK], 42, 5);
    let v1_id = import(&central.lab, TENANT_A, "v1", &v1);
    let v2_id = import(&central.lab, TENANT_A, "v2", &v2);
    let region = xfs.mnt.join("edge");
    let edge = edge_in(
        Some(&region),
        &central.server.base,
        &central.admin,
        &[],
        &[],
    );
    let first = copy_and_wait(&edge, &edge.for_a, &v1_id, TENANT_B);
    let first_file = region.join(first["destination_image_id"].as_str().expect("id"));
    assert_eq!(shared_extents(&first_file), 0, "nothing to share yet");
    let second = copy_and_wait(&edge, &edge.for_a, &v2_id, TENANT_B);
    let second_file = region.join(second["destination_image_id"].as_str().expect("id"));
    assert_eq!(std::fs::read(&second_file).expect("copy"), v2);
    assert_eq!(field(&second, "bytes_fetched"), CHUNK as u64);
    assert!(
        shared_extents(&second_file) > 0,
        "no extent of the second copy is shared"
    );
    assert!(
        shared_extents(&first_file) > 0,
        "no extent of the first copy is shared"
    );
    assert_eq!(std::fs::read(&first_file).expect("first copy"), v1);
    drop(edge);
}

#[test]
fn on_a_slow_link_chunks_travel_compressed_both_ways() {
    let central = central();
    let image = image_bytes(51, 160);
    let pull = import(&central.lab, TENANT_A, "pull", &image);
    // 3 MB/s each way: slower than zstd, so compressing pays.
    let proxy = Proxy::start(&central.server.addr());
    proxy.limit(3_000_000);
    let edge = edge(&proxy.url(), &central.admin, &[]);
    let push = import(&edge.lab, TENANT_B, "push", &image_bytes(52, 160));
    for (token, id, tenant) in [
        (&edge.for_a, &pull, TENANT_B),
        (&edge.for_b, &push, TENANT_A),
    ] {
        let done = copy_and_wait(&edge, token, id, tenant);
        let (fetched, wire) = (field(&done, "bytes_fetched"), field(&done, "bytes_on_wire"));
        assert_eq!(fetched, data_bytes(&image));
        // The chunks are half entropy: zstd halves them.
        assert!(wire < fetched * 7 / 10, "{wire} on the wire for {fetched}");
    }
}

#[test]
fn a_copy_into_a_peer_sends_only_the_chunks_the_peer_lacks() {
    let central = central();
    let proxy = Proxy::start(&central.server.addr());
    let edge = edge(&proxy.url(), &central.admin, &[]);
    let v1 = image_bytes(5, 40);
    let mut v2 = v1.clone();
    fill(&mut v2[11 * CHUNK..12 * CHUNK], 6, 11);
    let v1_id = import(&edge.lab, TENANT_B, "v1", &v1);
    let v2_id = import(&edge.lab, TENANT_B, "v2", &v2);

    let shown = copy_and_wait(&edge, &edge.for_b, &v1_id, TENANT_A);
    let dst = shown["destination_image_id"].as_str().expect("destination");
    assert_eq!(
        std::fs::read(image_file(&central.lab, "ot1", dst)).expect("the peer's copy"),
        v1
    );
    let record = central.lab.ok_json(&["image", "show", dst]);
    assert_eq!(record["status"], "active");
    assert_eq!(record["owner"], TENANT_A);
    assert_eq!(field(&shown, "bytes_fetched"), data_bytes(&v1));

    let before = proxy.bytes().0;
    let shown = copy_and_wait(&edge, &edge.for_b, &v2_id, TENANT_A);
    let dst = shown["destination_image_id"].as_str().expect("destination");
    assert_eq!(
        std::fs::read(image_file(&central.lab, "ot1", dst)).expect("the peer's copy"),
        v2
    );
    assert_eq!(field(&shown, "bytes_fetched"), CHUNK as u64);
    let sent = proxy.bytes().0 - before;
    assert!(sent < v2.len() as u64 / 10, "v2 after v1 sent {sent} bytes");
}

#[test]
fn a_copy_from_a_peer_that_restarts_mid_copy_goes_on_without_fetching_a_verified_chunk_again() {
    let mut central = central();
    let image = image_bytes(9, 800);
    let id = import(&central.lab, TENANT_A, "big", &image);
    let proxy = Proxy::start(&central.server.addr());
    // 2 MiB/s on the wire: the copy takes a few seconds.
    let edge = edge(&proxy.url(), &central.admin, &["--max-bandwidth", "2M"]);
    let job = edge.server.copy_ok(&edge.for_a, &id, TENANT_B);
    edge.server
        .wait_job_progress(&edge.for_a, &job, Duration::from_secs(30), |j| {
            j["copy_progress"].as_u64().unwrap_or(0) >= 20
        });
    let done = restart_the_peer_mid_copy(&mut central, &proxy, &edge, &job);
    let dst = done["destination_image_id"].as_str().expect("destination");
    assert_eq!(
        std::fs::read(image_file(&edge.lab, "edge", dst)).expect("copy"),
        image
    );
    let shown = job_json(&edge.lab, &job);
    assert_eq!(
        field(&shown, "bytes_fetched"),
        data_bytes(&image),
        "each chunk was fetched once"
    );
    assert!(edge.server.log_text().contains("asking again"));
}

#[test]
fn a_retry_of_a_pull_that_gave_up_on_a_cut_link_goes_on_from_its_verified_part() {
    let central = central();
    let image = image_bytes(13, 320);
    let id = import(&central.lab, TENANT_A, "big", &image);
    let proxy = Proxy::start(&central.server.addr());
    // A thin link (1 MiB/s each way): the copy takes several seconds.
    proxy.limit(1 << 20);
    let mut edge = edge(&proxy.url(), &central.admin, &[]);
    let job = edge.server.copy_ok(&edge.for_a, &id, TENANT_B);
    edge.server
        .wait_job(&edge.for_a, &job, Duration::from_secs(30), |j| {
            j["copy_progress"].as_u64().unwrap_or(0) >= 20
        });
    // The link stays down until every attempt has failed: the job ends in error, and keeps
    // the part of the image its destination verified.
    proxy.cut();
    let cut = std::time::Instant::now();
    let failed = wait_terminal(&edge.lab, &job, Duration::from_secs(120));
    let gave_up = cut.elapsed();
    assert_eq!(failed["status"], "error", "{failed}");
    let reason = failed["error"].as_str().expect("reason");
    assert!(reason.contains("gave up after 4 attempts"), "{reason}");
    let kept = failed["kept_destination"]
        .as_str()
        .expect("a kept partial image")
        .to_string();
    proxy.restore();
    // A restart keeps the partial image too (the start-up sweep leaves it alone).
    assert!(edge.server.stop());
    edge.server = edge.lab.serve_with(&[]);
    assert_eq!(
        edge.lab.ok_json(&["image", "show", &kept])["status"],
        "saving"
    );
    let resp = edge
        .server
        .client
        .post(edge.server.url(&format!("{JOBS}/{job}/retry")))
        .header("X-Auth-Token", &edge.for_a)
        .send()
        .expect("retry");
    assert_eq!(resp.status(), 202);
    let new: Value = resp.json().expect("the new job");
    let new_id = new["job_id"].as_str().expect("id");
    let done = wait_terminal(&edge.lab, new_id, Duration::from_secs(90));
    assert_eq!(done["status"], "replicated", "{}", edge.server.log_text());
    assert_eq!(done["destination_image_id"], kept.as_str());
    assert_eq!((field(&done, "retries"), field(&done, "resumes")), (1, 1));
    assert_eq!(
        std::fs::read(image_file(&edge.lab, "edge", &kept)).expect("copy"),
        image
    );
    let fetched = field(&done, "bytes_fetched");
    assert!(
        fetched < data_bytes(&image) * 3 / 4,
        "the retry fetched {fetched} of {} bytes of data",
        data_bytes(&image)
    );
    figures(
        "a_retry_of_a_pull_that_gave_up_on_a_cut_link_goes_on_from_its_verified_part",
        &[
            ("data_bytes", data_bytes(&image).to_string()),
            ("fetched_by_the_retry", fetched.to_string()),
            (
                "seconds_from_cut_to_error",
                format!("{:.1}", gave_up.as_secs_f64()),
            ),
        ],
    );
}

#[test]
fn a_copy_into_a_peer_that_restarts_mid_upload_goes_on_and_sends_little_twice() {
    let mut central = central();
    let image = image_bytes(21, 800);
    let proxy = Proxy::start(&central.server.addr());
    let edge = edge(&proxy.url(), &central.admin, &["--max-bandwidth", "2M"]);
    let id = import(&edge.lab, TENANT_B, "big", &image);
    let job = edge.server.copy_ok(&edge.for_b, &id, TENANT_A);
    edge.server
        .wait_job_progress(&edge.for_b, &job, Duration::from_secs(30), |j| {
            j["copy_progress"].as_u64().unwrap_or(0) >= 20
        });
    let done = restart_the_peer_mid_copy(&mut central, &proxy, &edge, &job);
    let dst = done["destination_image_id"].as_str().expect("destination");
    assert_eq!(
        std::fs::read(image_file(&central.lab, "ot1", dst)).expect("the peer's copy"),
        image
    );
    // At most the request the restart broke off is sent again.
    let sent = proxy.bytes().0;
    let wire = field(&done, "bytes_on_wire");
    assert!(
        sent <= wire + (4 << 20) + (256 << 10),
        "sent {sent} for {wire} on the wire"
    );
}

#[test]
fn a_pull_killed_at_the_destination_resumes_and_fetches_only_what_it_had_not_verified() {
    let central = central();
    let image = image_bytes(23, 800);
    let id = import(&central.lab, TENANT_A, "big", &image);
    let proxy = Proxy::start(&central.server.addr());
    let mut edge = edge(&proxy.url(), &central.admin, &["--max-bandwidth", "2M"]);
    let job = edge.server.copy_ok(&edge.for_a, &id, TENANT_B);
    edge.server
        .wait_job_progress(&edge.for_a, &job, Duration::from_secs(30), |j| {
            j["copy_progress"].as_u64().unwrap_or(0) >= 40
        });
    edge.server.kill_9();
    let before = proxy.bytes().1;
    edge.server = edge.lab.serve_with(&[]);
    let done = wait_terminal(&edge.lab, &job, Duration::from_secs(90));
    assert_eq!(done["status"], "replicated", "{}", edge.server.log_text());
    let dst = done["destination_image_id"].as_str().expect("destination");
    assert_eq!(
        std::fs::read(image_file(&edge.lab, "edge", dst)).expect("copy"),
        image
    );
    assert_eq!(field(&done, "resumes"), 1);
    let metrics = edge.server.get("/metrics", None).text().expect("metrics");
    let resumed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("image_replicator_resumed_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("resumed bytes");
    assert!(
        resumed >= image.len() as u64 / 4,
        "resumed after {resumed} bytes"
    );
    // The second attempt fetched at most the data after what it found verified (raw; the
    // wire carries less), its manifest and the requests.
    let after: u64 = data_bytes(&image[resumed as usize..]);
    let crossed = proxy.bytes().1 - before;
    assert!(
        crossed <= after + (64 << 10),
        "{crossed} crossed for {after} bytes of data left"
    );
}

#[test]
fn a_peer_served_over_tls_is_copied_from_with_its_ca() {
    let lab = Lab::new();
    let generated =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("certificate");
    let cert = lab.data_dir().with_file_name("cert.pem");
    let key = lab.data_dir().with_file_name("key.pem");
    std::fs::write(&cert, generated.cert.pem()).expect("cert");
    std::fs::write(&key, generated.signing_key.serialize_pem()).expect("key");
    let (cert, key) = (cert.to_str().expect("path"), key.to_str().expect("path"));
    let central = central_with(&["--no-worker", "--tls-cert", cert, "--tls-key", key]);
    assert!(central.server.base.starts_with("https://"));
    let image = image_bytes(31, 24);
    let id = import(&central.lab, TENANT_A, "img", &image);
    let edge = edge_with(
        &central.server.base,
        &central.admin,
        &["--peer-ca-file", cert],
        &[],
    );
    let done = copy_and_wait(&edge, &edge.for_a, &id, TENANT_B);
    let dst = done["destination_image_id"].as_str().expect("destination");
    assert_eq!(
        std::fs::read(image_file(&edge.lab, "edge", dst)).expect("copy"),
        image
    );
    // Without the CA the peer's certificate is not trusted: the copy is refused, not made.
    let untrusting = edge_with(&central.server.base, &central.admin, &[], &[]);
    let resp = untrusting.server.copy(&untrusting.for_a, &id, TENANT_B);
    assert_eq!(resp.status().as_u16(), 409);
}

#[test]
fn a_chunk_damaged_on_the_link_is_fetched_again_and_one_damaged_at_the_peer_fails_the_job() {
    let central = central();
    let image = image_bytes(3, 32);
    let id = import(&central.lab, TENANT_A, "img", &image);
    let proxy = Proxy::start(&central.server.addr());
    let edge = edge(&proxy.url(), &central.admin, &[]);

    // One byte flipped well inside the chunks' answer: detected, asked for again, copied.
    proxy.flip_once_after(300 * 1024);
    let job = copy_and_wait(&edge, &edge.for_a, &id, TENANT_B);
    let dst = job["destination_image_id"].as_str().expect("destination");
    assert_eq!(
        std::fs::read(image_file(&edge.lab, "edge", dst)).expect("copy"),
        image
    );
    assert!(
        edge.server.log_text().contains("asking again"),
        "{}",
        edge.server.log_text()
    );

    // The peer's own file differs from its manifest at chunk 6: asked again, then `error`
    // (an image the edge holds nothing of, or chunk 6 would be taken from the first copy).
    let id = import(&central.lab, TENANT_A, "other", &image_bytes(13, 32));
    let path = image_file(&central.lab, "ot1", &id);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("the peer's image");
    file.seek(SeekFrom::Start(6 * CHUNK as u64 + 100))
        .expect("seek");
    file.write_all(b"damage").expect("damage");
    drop(file);
    let job = edge.server.copy_ok(&edge.for_a, &id, TENANT_B);
    let done = wait_terminal(&edge.lab, &job, Duration::from_secs(60));
    assert_eq!(done["status"], "error");
    let reason = job_json(&edge.lab, &job)["error"]
        .as_str()
        .expect("reason")
        .to_string();
    assert!(
        reason.contains("chunk 6") && reason.contains("4 times"),
        "{reason}"
    );
    let leftovers: Vec<String> = edge
        .lab
        .files_in("edge")
        .into_iter()
        .filter(|f| f.ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_peer_token_of_one_tenant_reaches_no_image_of_another() {
    let central = central();
    let c_image = import(&central.lab, TENANT_C, "c", &image_bytes(4, 4));
    let carol = central.lab.token("carol", TENANT_C);
    // The edge's peer region acts as tenant C there; tenant A's image is not to be found.
    let a_image = import(&central.lab, TENANT_A, "a", &image_bytes(4, 4));
    let edge = edge(&central.server.base, &carol, &[]);
    let resp = edge.server.copy(&edge.for_a, &a_image, TENANT_B);
    assert_eq!(
        resp.status().as_u16(),
        404,
        "{}",
        resp.text().unwrap_or_default()
    );
    // C's image is C's at the edge too: alice2 (tenant A there) cannot name it.
    let resp = edge.server.copy(&edge.for_a, &c_image, TENANT_B);
    assert_eq!(resp.status().as_u16(), 404);
}

#[test]
fn canceled_copies_leave_nothing_at_the_destination_in_either_direction() {
    let central = central();
    let image = image_bytes(8, 160);
    let pull = import(&central.lab, TENANT_A, "pull", &image);
    let edge = edge(
        &central.server.base,
        &central.admin,
        &["--max-bandwidth", "1M"],
    );
    let push = import(&edge.lab, TENANT_B, "push", &image_bytes(18, 160));

    for (token, image_id, tenant) in [
        (&edge.for_a, &pull, TENANT_B),
        (&edge.for_b, &push, TENANT_A),
    ] {
        let job = edge.server.copy_ok(token, image_id, tenant);
        edge.server
            .wait_job_progress(token, &job, Duration::from_secs(30), |j| {
                j["copy_progress"].as_u64().unwrap_or(0) >= 10
            });
        let resp = edge.server.delete(&job_path(&job), Some(token));
        assert!(resp.status().is_success(), "{:?}", resp.status());
        let done = wait_terminal(&edge.lab, &job, Duration::from_secs(30));
        assert_eq!(done["status"], "canceled");
    }
    // Nothing but the pushed source at the edge, nothing but the pulled source at the peer.
    assert_eq!(edge.lab.files_in("edge"), vec![push.clone()]);
    assert_eq!(central.lab.files_in("ot1"), vec![pull.clone()]);
    let list = central.lab.ok_json(&["image", "list"]);
    let ids: Vec<&str> = list
        .as_array()
        .expect("images")
        .iter()
        .filter(|i| i["status"] != "deleted" && i["status"] != "killed")
        .map(|i| i["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, vec![pull.as_str()]);
}

#[test]
fn a_peer_that_speaks_a_newer_protocol_is_refused_with_a_clear_error() {
    // A stand-in for an appliance of a later release: it speaks peer protocol 2 only.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let n = stream.read(&mut request).unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..n]);
            let (status, body) = if head.starts_with("GET /peer ") {
                (
                    "200 OK",
                    r#"{"protocol":"image-replicator-peer","versions":[2]}"#,
                )
            } else {
                (
                    "400 Bad Request",
                    "This appliance speaks peer protocol version 2; the request is for version 1.",
                )
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let edge = edge(&url, "some-token", &[]);
    let resp = edge.server.copy(
        &edge.for_a,
        "0b6b3c1e-5f0a-4d8e-9c39-1f6a2b7c8d90",
        TENANT_B,
    );
    assert_eq!(resp.status().as_u16(), 409);
    let health = edge.server.get("/healthz", None);
    assert_eq!(health.status().as_u16(), 503);
    let log = edge.server.log_text();
    assert!(
        log.contains("speaks peer protocol version 2 and this appliance speaks version 1"),
        "{log}"
    );
}
