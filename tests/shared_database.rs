//! Several appliances on one PostgreSQL database (issue 16): each test makes its own database
//! in the throwaway cluster of this test process, and two appliances (two data directories,
//! two servers on loopback) that share it and the region directories.

mod common;

use std::time::{Duration, Instant};

use common::*;
use image_replicator::store::postgres::testing::Cluster;
use serde_json::Value;

/// A fresh, empty database of this process's cluster.
fn database() -> String {
    image_replicator::store::postgres::testing::cluster().new_database()
}

/// Appliance `a`'s lab holds the standard set-up (regions under its data directory, which
/// appliance `b` reaches too: one machine); `b`'s lab only the admin socket. Returns both
/// and alice2's token for tenant A (she may copy A's images into B).
fn two_labs() -> (Lab, Lab, String) {
    let url = database();
    let a = Lab::on_database(&url);
    let token = a.copier();
    (a, Lab::on_database(&url), token)
}

fn serve(lab: &Lab, node: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--node-name", node];
    args.extend_from_slice(extra);
    lab.serve_with(&args)
}

/// `job show --json` through `lab` (its server's socket, or the database).
fn shown(lab: &Lab, id: &str) -> Value {
    lab.ok_json(&["job", "show", id])
}

fn replicated_lines(server: &Server, id: &str) -> usize {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains(id) && l.contains("replicated"))
        .count()
}

fn destination_sha512(lab: &Lab, job: &Value) -> String {
    let image = job["destination_image_id"].as_str().expect("destination");
    file_sha512(lab, "ot2", image)
}

/// The SHA-512 of image `image`'s file in `region` of `lab`.
fn file_sha512(lab: &Lab, region: &str, image: &str) -> String {
    let bytes = std::fs::read(lab.region_dir(region).join(image)).expect("image file");
    sha512_hex(&bytes)
}

#[test]
fn two_appliances_drain_one_queue_and_copy_no_job_twice() {
    let (a, b, token) = two_labs();
    let image = a.image(TENANT_A, "cirros", 1 << 20);
    let sa = serve(&a, "a", &["--max-bandwidth", "4M"]);
    let sb = serve(&b, "b", &["--max-bandwidth", "4M"]);
    let ids: Vec<String> = (0..12)
        .map(|i| {
            let server = if i % 2 == 0 { &sa } else { &sb };
            server.copy_ok(&token, &image, TENANT_B)
        })
        .collect();
    for id in &ids {
        sa.wait_job(&token, id, Duration::from_secs(60), status_is("replicated"));
    }
    let (mut on_a, mut on_b) = (0, 0);
    for id in &ids {
        let (n_a, n_b) = (replicated_lines(&sa, id), replicated_lines(&sb, id));
        assert_eq!(
            n_a + n_b,
            1,
            "job {id} replicated {n_a} time(s) on a, {n_b} on b"
        );
        on_a += n_a;
        on_b += n_b;
        // Either appliance answers for every job, with the same record.
        assert_eq!(sa.job(&token, id), sb.job(&token, id));
    }
    assert!(on_a > 0 && on_b > 0, "a copied {on_a}, b {on_b}");
    let want = file_sha512(&a, "ot1", &image);
    for id in &ids {
        assert_eq!(destination_sha512(&a, &sa.job(&token, id)), want);
    }
}

#[test]
fn a_killed_appliance_s_copy_is_taken_over_and_finished_from_what_it_verified() {
    let (a, b, token) = two_labs();
    let image = a.image(TENANT_A, "big", 8 << 20);
    let mut sa = serve(&a, "a", &["--max-bandwidth", "2M"]);
    let id = sa.copy_ok(&token, &image, TENANT_B);
    sa.wait_job(&token, &id, Duration::from_secs(30), |j| {
        j["copy_progress"].as_u64().is_some_and(|p| p >= 25)
    });
    assert_eq!(shown(&a, &id)["holder"], "a");
    // b starts while a holds the job, so b cannot have it before the kill.
    let sb = serve(&b, "b", &["--max-bandwidth", "2M"]);
    sa.kill_9();
    let killed = Instant::now();
    poll("b takes the job over", Duration::from_secs(30), || {
        (shown(&b, &id)["holder"] == "b").then_some(())
    });
    let takeover = killed.elapsed();
    assert!(
        takeover <= Duration::from_secs(15),
        "taken over after {takeover:?}"
    );
    let job = sb.wait_job(
        &token,
        &id,
        Duration::from_secs(60),
        status_is("replicated"),
    );
    let want = file_sha512(&a, "ot1", &image);
    assert_eq!(destination_sha512(&a, &job), want);
    let record = shown(&b, &id);
    assert!(
        record["resumes"].as_u64() >= Some(1),
        "not resumed from the verified part: {record}"
    );
    assert!(
        record["source_bytes_read"].as_u64() < Some(2 * (8 << 20)),
        "{record}"
    );
    figures(
        "takeover",
        &[("takeover_ms", takeover.as_millis().to_string())],
    );
}

#[test]
fn a_cancel_sent_to_the_appliance_that_is_not_copying_stops_the_copy() {
    let (a, b, token) = two_labs();
    let image = a.image(TENANT_A, "big", 8 << 20);
    let sa = serve(&a, "a", &["--max-bandwidth", "1M"]);
    let id = sa.copy_ok(&token, &image, TENANT_B);
    sa.wait_job(&token, &id, Duration::from_secs(30), |j| {
        j["copy_progress"].as_u64().is_some_and(|p| p >= 5)
    });
    let sb = serve(&b, "b", &["--no-worker"]);
    let asked = Instant::now();
    let resp = sb.delete(&job_path(&id), Some(&token));
    assert_eq!(resp.status(), 204);
    let job = sb.wait_job(&token, &id, Duration::from_secs(10), status_is("canceled"));
    let took = asked.elapsed();
    assert!(took <= Duration::from_secs(3), "canceled after {took:?}");
    assert!(
        job["destination_image_id"].is_null() || {
            let dest = job["destination_image_id"].as_str().expect("id");
            !a.region_dir("ot2").join(dest).exists()
        }
    );
    assert!(
        sa.log_text().contains(&id),
        "a, which copied, ended the job"
    );
    figures("cancel_elsewhere", &[("ms", took.as_millis().to_string())]);
}

#[test]
fn admin_commands_and_the_routes_answer_the_same_on_either_appliance() {
    let (a, b, token) = two_labs();
    let image = a.image(TENANT_A, "cirros", 4096);
    let sa = serve(&a, "a", &["--no-worker"]);
    let sb = serve(&b, "b", &["--no-worker"]);
    // b's list is read (and cached) before a creates a job: b's next list has it.
    assert_eq!(jobs(sb.get(JOBS, Some(&token))).len(), 0);
    let id = sa.copy_ok(&token, &image, TENANT_B);
    assert_eq!(job_ids(&jobs(sb.get(JOBS, Some(&token)))), vec![id.clone()]);
    // A token issued through b's socket works on a at once; revoked through a, not on b.
    let bob = b.token("bob", TENANT_B);
    assert_eq!(sa.get(JOBS, Some(&bob)).status(), 200);
    let tokens = a.ok_json(&["token", "list"]);
    let bob_id = token_id_of(&tokens, "bob");
    a.ok(&["token", "revoke", &bob_id]);
    assert_401(sb.get(JOBS, Some(&bob)));
    // status names each node and the database without its password.
    let status = b.ok_json(&["status"]);
    assert_eq!(status["node"], "b");
    assert!(
        status["database"]
            .as_str()
            .is_some_and(|d| d.starts_with("postgres")),
        "{status}"
    );
    assert_eq!(shown(&b, &id)["holder"], Value::Null);
}

#[test]
fn a_region_pinned_to_a_node_is_copied_only_there() {
    let (a, b, token) = two_labs();
    let edge = a.dir.path().join("edge");
    a.ok(&[
        "region",
        "add",
        "edge",
        "--dir",
        edge.to_str().expect("path"),
        "--pin",
        "a",
    ]);
    let tenant = "6e4c9f3e6d7b8c0f2e1a4b5c6d7e8f90";
    a.ok(&["tenant", "add", tenant, "--region", "edge"]);
    a.ok(&["user", "update", "alice2", "--add-tenant", tenant]);
    let image = a.image(TENANT_A, "cirros", 2 << 20);
    let sb = serve(&b, "b", &["--max-bandwidth", "1M"]);
    let id = sb.copy_ok(&token, &image, tenant);
    // Only b runs: the job waits for a.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sb.job(&token, &id)["status"], "replicate_requested");
    let sa = serve(&a, "a", &["--max-bandwidth", "1M"]);
    poll("a copies the job", Duration::from_secs(20), || {
        (shown(&a, &id)["holder"] == "a").then_some(())
    });
    sa.wait_job(
        &token,
        &id,
        Duration::from_secs(60),
        status_is("replicated"),
    );
    assert_eq!(replicated_lines(&sb, &id), 0);
    assert_eq!(replicated_lines(&sa, &id), 1);
}

#[test]
fn migrate_copies_a_sled_store_and_a_second_run_adds_nothing() {
    let lab = Lab::new();
    let token = lab.copier();
    let image = lab.image(TENANT_A, "cirros", 4096);
    let id = {
        let server = lab.serve();
        server.copy_ok(&token, &image, TENANT_B)
    };
    let url = database();
    let out = lab.ok(&["migrate", "--to", &url]);
    assert!(
        out.starts_with("migrated 3 region(s)") || out.contains("migrated"),
        "{out}"
    );
    assert!(!out.contains("password"), "{out}");
    let again = lab.ok(&["migrate", "--to", &url]);
    assert!(again.contains("(0 record(s) added now)"), "{again}");
    // The same data directory served from the database: the token, the image, the job.
    let served = Lab {
        dir: tempfile::tempdir().expect("temp dir"),
        env: vec![("IMAGE_REPLICATOR_DATABASE_URL".into(), url.clone())],
    };
    let server = serve(&served, "c", &["--no-worker"]);
    assert_eq!(job_ids(&jobs(server.get(JOBS, Some(&token)))), vec![id]);
    // A database that holds other records is refused, naming both counts.
    let other = Lab::new();
    other.ok(&["region", "add", "elsewhere"]);
    let refused = other.fails(&["migrate", "--to", &url]);
    assert!(
        refused.contains("migrate into an empty database"),
        "{refused}"
    );
}

#[test]
fn the_database_restarted_under_load_loses_nothing_acknowledged() {
    use image_replicator::store::postgres::testing::Cluster;
    let cluster = Cluster::start().expect("a cluster of its own");
    let lab = Lab::on_database(&cluster.new_database());
    let token = lab.copier();
    let small = lab.image(TENANT_A, "small", 4096);
    let big = lab.image(TENANT_A, "big", 6 << 20);
    let server = serve(&lab, "a", &["--max-bandwidth", "1M"]);
    let copy = server.copy_ok(&token, &big, TENANT_B);
    server.wait_job(&token, &copy, Duration::from_secs(30), |j| {
        j["copy_progress"].as_u64().is_some_and(|p| p >= 10)
    });
    // Creates go on throughout; every 202's job must be there at the end.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (base, client_token, image) = (server.base.clone(), token.clone(), small.clone());
    let load = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            let (mut accepted, mut refused) = (Vec::new(), Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let resp = client
                    .post(format!("{base}{JOBS}"))
                    .header("X-Auth-Token", &client_token)
                    .json(&serde_json::json!({"image_id": image, "tenant_id_dst": TENANT_B}))
                    .send()
                    .expect("the server answers");
                let status = resp.status().as_u16();
                let body: Value = resp.json().unwrap_or(Value::Null);
                match status {
                    202 => accepted.push(body["job_id"].as_str().expect("id").to_string()),
                    _ => refused.push((status, body)),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (accepted, refused)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    cluster.stop().expect("stop PostgreSQL");
    std::thread::sleep(Duration::from_millis(500));
    let health = server.get("/healthz", None);
    assert_eq!(health.status(), 503);
    let said = health.text().expect("body");
    assert!(said.contains("database"), "{said}");
    let refused = server.get(JOBS, Some(&token));
    assert_eq!(refused.status(), 503);
    std::thread::sleep(Duration::from_secs(2));
    cluster.start_again().expect("start PostgreSQL again");
    poll("healthy again", Duration::from_secs(20), || {
        (server.get("/healthz", None).status() == 200).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (accepted, refused) = load.join().expect("load thread");
    assert!(accepted.len() > 10, "{} accepted", accepted.len());
    assert!(
        refused.iter().all(|(status, _)| *status == 503),
        "{refused:?}"
    );
    assert!(
        !refused.is_empty(),
        "no create was refused while the database was down"
    );
    let listed = job_ids(&all_jobs(&server, &token));
    for id in &accepted {
        assert!(listed.contains(id), "acknowledged job {id} lost");
    }
    let job = server.wait_job(
        &token,
        &copy,
        Duration::from_secs(90),
        status_is("replicated"),
    );
    let want = file_sha512(&lab, "ot1", &big);
    assert_eq!(destination_sha512(&lab, &job), want);
    let log = server.log_text();
    assert!(
        !log.contains("password"),
        "no URL with a password in the log"
    );
}

/// A cluster of its own with TLS on a loopback port, its certificate (self-signed, for
/// `localhost`) as PEM: the CA file that verifies it.
fn tls_cluster() -> (Cluster, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let pem = cert.cert.pem();
    let cluster = Cluster::start_tls(&pem, &cert.signing_key.serialize_pem()).expect("cluster");
    (cluster, pem)
}

#[test]
fn an_appliance_reaches_its_database_over_verified_tls() {
    let (cluster, ca_pem) = tls_cluster();
    let db = cluster.new_database();
    let url = cluster.tcp_url(&db, "localhost").expect("a port") + "?sslmode=require";
    let mut lab = Lab::on_database(&url);
    let ca = lab.dir.path().join("database-ca.pem");
    std::fs::write(&ca, &ca_pem).expect("ca file");
    // The server's certificate is no system root's: refused, saying what to give.
    let refused = lab.fails(&["region", "add", "spare"]);
    assert!(
        refused.contains("UnknownIssuer") && refused.contains("--database-ca-file"),
        "{refused}"
    );
    let ca_arg = ca.display().to_string();
    let by_flag = lab.fails(&[
        "--database-ca-file",
        "/nonexistent/ca.pem",
        "region",
        "add",
        "spare",
    ]);
    assert!(by_flag.contains("cannot read the CA file"), "{by_flag}");
    lab.ok(&["--database-ca-file", &ca_arg, "region", "add", "spare"]);
    lab.env
        .push(("IMAGE_REPLICATOR_DATABASE_CA_FILE".into(), ca_arg.clone()));
    // Everything through TLS: the set-up, a server, a copy.
    let token = lab.copier();
    let image = lab.image(TENANT_A, "cirros", 64 * 1024);
    let server = serve(&lab, "tls", &[]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    let job = server.wait_job(
        &token,
        &id,
        Duration::from_secs(60),
        status_is("replicated"),
    );
    assert_eq!(
        destination_sha512(&lab, &job),
        file_sha512(&lab, "ot1", &image)
    );
    let plain = cluster.psql(
        &db,
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'image-replicator' AND NOT s.ssl",
    );
    assert_eq!(plain.trim(), "0", "no plain connection of the appliance");
    // The flag needs a database.
    let alone = Lab::new().fails(&["--database-ca-file", &ca_arg, "region", "list"]);
    assert!(alone.contains("--database-url"), "{alone}");
}

#[test]
fn a_password_comes_from_pgpassword_or_a_private_password_file() {
    use image_replicator::store::postgres::testing::PASSWORD_ROLE;
    use std::os::unix::fs::PermissionsExt;
    let (cluster, ca_pem) = tls_cluster();
    let db = cluster.new_database();
    let name = Cluster::database_name(&db).expect("name");
    cluster.psql(
        &db,
        &format!(
            "CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 's3:cr\\et'; \
             ALTER DATABASE {name} OWNER TO {PASSWORD_ROLE}"
        ),
    );
    let url = cluster
        .tcp_url_as(&db, "localhost", PASSWORD_ROLE)
        .expect("a port");
    let mut lab = Lab::on_database(&url);
    let ca = lab.dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).expect("ca");
    lab.env.push((
        "IMAGE_REPLICATOR_DATABASE_CA_FILE".into(),
        ca.display().to_string(),
    ));
    let home = lab.dir.path().join("home");
    std::fs::create_dir(&home).expect("home");
    lab.env.push(("HOME".into(), home.display().to_string()));
    // No password anywhere: PostgreSQL asks for one and the command says so.
    let asked = lab.fails(&["region", "add", "one"]);
    assert!(
        asked.contains("password missing (give it in PGPASSWORD"),
        "{asked}"
    );
    assert!(!asked.contains("s3:cr"), "{asked}");
    // ~/.pgpass, private: used (its line escapes the colon and the backslash).
    let port = cluster.port().expect("port");
    let line = format!("localhost:{port}:{name}:{PASSWORD_ROLE}:s3\\:cr\\\\et\n");
    let pgpass = home.join(".pgpass");
    std::fs::write(&pgpass, format!("*:*:other:*:wrong\n{line}")).expect("pgpass");
    let private = std::fs::Permissions::from_mode(0o600);
    std::fs::set_permissions(&pgpass, private).expect("chmod");
    lab.ok(&["region", "add", "one"]);
    // Readable by others: ignored, with a warning.
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let ignored = lab.fails(&["region", "add", "two"]);
    assert!(ignored.contains("may be read by others"), "{ignored}");
    // PGPASSWORD comes first; then a server runs on it.
    lab.env.push(("PGPASSWORD".into(), "s3:cr\\et".into()));
    lab.ok(&["region", "add", "two"]);
    let token = lab.copier();
    let server = serve(&lab, "pw", &["--no-worker"]);
    assert_eq!(server.get(JOBS, Some(&token)).status(), 200);
}

/// A quota holds across appliances: creates racing on two of them are checked one at a time
/// under the database's lock, so together they accept exactly the quota.
#[test]
fn two_appliances_accepting_at_once_stay_within_a_quota() {
    let (a, b, token) = two_labs();
    let image = a.image(TENANT_A, "cirros", 4096);
    a.ok(&["tenant", "update", TENANT_A, "--quota-jobs", "5"]);
    let servers = [
        serve(&a, "a", &["--no-worker"]),
        serve(&b, "b", &["--no-worker"]),
    ];
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..60)
            .map(|i| {
                let (server, token, image) = (&servers[i % 2], &token, &image);
                scope.spawn(move || server.copy(token, image, TENANT_B).status().as_u16())
            })
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().expect("a request"))
            .collect()
    });
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    let over = statuses.iter().filter(|s| **s == 413).count();
    assert_eq!((accepted, over), (5, 55), "{statuses:?}");
    assert_eq!(jobs(servers[1].get(JOBS, Some(&token))).len(), 5);
}

/// One `job seed` at a time on a database: while another session holds the seed lock, a seed
/// waits and is then refused with a sentence, leaving nothing; once it goes, the seed runs.
#[test]
fn a_seed_waits_for_another_appliances_seed_and_is_refused_after_a_while() {
    use image_replicator::store::postgres::testing::{cluster, SEED_LOCK_KEY};
    use std::io::Write;
    let (a, _b, _token) = two_labs();
    let url = a.env[0].1.clone();
    let job = serde_json::json!({
        "copy_progress": 100, "destination_image_id": null, "destination_region_id": "ot2",
        "destination_tenant_id": TENANT_B, "job_id": "3f2b8d4e-1c6a-4e9b-8f7d-2a5c6e8b9d01",
        "source_image_id": "5b1e0c9a-3d7f-4a2b-9c8e-1f6d4b2a7e30",
        "source_image_name": "seeded", "source_region_id": "ot1",
        "source_tenant_id": TENANT_A, "status": "replicated",
    });
    let file = a.dir.path().join("seed.json");
    std::fs::write(&file, serde_json::Value::Array(vec![job]).to_string()).expect("seed file");
    let file = file.display().to_string();
    // Another appliance's seed, as far as the database can tell: a session holding the lock.
    let mut psql = cluster()
        .psql_command(&url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    let mut input = psql.stdin.take().expect("psql's stdin");
    writeln!(input, "SELECT pg_advisory_lock({SEED_LOCK_KEY});").expect("to psql");
    let locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted";
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster().psql(&url, locks).trim() != "1" {
        assert!(Instant::now() < deadline, "psql never took the lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = a.fails(&["job", "seed", &file]);
    assert!(
        refused.contains("another appliance of this database has been seeding jobs"),
        "{refused}"
    );
    assert_eq!(
        cluster().psql(&url, "SELECT count(*) FROM jobs").trim(),
        "0"
    );
    drop(input);
    psql.wait().expect("psql ends");
    assert_eq!(
        a.ok(&["job", "seed", &file]),
        "1 job(s) seeded, 0 already present\n"
    );
}
