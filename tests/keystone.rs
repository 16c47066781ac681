//! Keystone tokens: `serve --keystone-url` accepts the tokens a real Keystone (from PyPI, on
//! loopback, started by tests/openstack/lab.py) issues, besides the registry's own.

mod common;

use std::time::{Duration, Instant};

use common::openstack::OpenStack;
use common::*;
use serde_json::Value;

/// An appliance whose directory region holds Keystone's projects alpha and beta as tenants,
/// with an image of alpha; and the lab that runs Keystone.
struct Cloud {
    os: OpenStack,
    lab: Lab,
    alpha: String,
    beta: String,
    image: String,
}

fn cloud(extra_lab_args: &[&str]) -> Cloud {
    let os = OpenStack::start_with(0, true, extra_lab_args);
    let ks = &os.info["keystone"];
    let id = |p: &str| {
        ks["projects"][p]["id"]
            .as_str()
            .expect("project id")
            .to_string()
    };
    let (alpha, beta) = (id("alpha"), id("beta"));
    let lab = Lab::new();
    lab.ok(&["region", "add", "d"]);
    lab.ok(&["tenant", "add", &alpha, "--region", "d", "--name", "alpha"]);
    lab.ok(&["tenant", "add", &beta, "--region", "d", "--name", "beta"]);
    let image = lab.image(&alpha, "disk", 4096);
    let password = lab.dir.path().join("keystone.password");
    let service_password = ks["service"]["password"].as_str().expect("password");
    std::fs::write(&password, format!("{service_password}\n")).expect("password file");
    Cloud {
        os,
        lab,
        alpha,
        beta,
        image,
    }
}

impl Cloud {
    /// `serve --no-worker` accepting this Keystone's tokens, with more arguments.
    fn serve(&self, extra: &[&str]) -> Server {
        let ks = &self.os.info["keystone"];
        let password = self.lab.dir.path().join("keystone.password");
        let mut args = vec![
            "--no-worker".to_string(),
            "--keystone-url".into(),
            self.os.keystone_url(),
            "--keystone-username".into(),
            ks["service"]["username"].as_str().expect("username").into(),
            "--keystone-project".into(),
            ks["service"]["project"].as_str().expect("project").into(),
            "--keystone-password-file".into(),
            password.to_str().expect("path").into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.lab.serve_with(&args)
    }

    /// A token of gamma-user (member of alpha and beta) scoped to alpha.
    fn gamma_token(&self) -> String {
        let gamma = &self.os.info["keystone"]["gamma"];
        let text = |v: &Value| v.as_str().expect("gamma").to_string();
        self.os
            .token(&text(&gamma["user"]), &text(&gamma["password"]), "alpha")
    }

    /// Revokes a token in Keystone.
    fn revoke(&self, token: &str) {
        let admin = self.os.user_token("admin");
        let resp = self
            .os
            .http
            .delete(format!("{}/auth/tokens", self.os.keystone_url()))
            .header("x-auth-token", admin)
            .header("x-subject-token", token)
            .send()
            .expect("revoke");
        assert_eq!(resp.status(), 204, "{:?}", resp.text());
    }
}

fn jobs_status(server: &Server, token: &str) -> u16 {
    server.get(JOBS, Some(token)).status().as_u16()
}

#[test]
fn a_keystone_token_lists_creates_shows_and_cancels_the_jobs_of_its_project() {
    let c = cloud(&[]);
    let server = c.serve(&[]);
    let token = c.gamma_token();

    let listed = jobs(server.get(JOBS, Some(&token)));
    assert_eq!(listed, Vec::<Value>::new());
    // gamma-user has a role on beta too: beta is a destination it may use.
    let job = server.copy_ok(&token, &c.image, &c.beta);
    let shown = server.job(&token, &job);
    assert_eq!(shown["source_tenant_id"], c.alpha.as_str());
    assert_eq!(shown["destination_tenant_id"], c.beta.as_str());
    assert_eq!(shown["status"], "replicate_requested");
    let listed = jobs(server.get(JOBS, Some(&token)));
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["job_id"], job.as_str());
    let resp = server.delete(&job_path(&job), Some(&token));
    assert_eq!(resp.status(), 204);
    assert_eq!(server.job(&token, &job)["status"], "cancel_requested");

    // alpha-user has a role on alpha only: beta is not its to use.
    let alpha_only = c.os.user_token("alpha");
    assert_401(server.copy(&alpha_only, &c.image, &c.beta));
    // beta's token sees none of alpha's jobs.
    let beta = c.os.user_token("beta");
    assert_eq!(jobs(server.get(JOBS, Some(&beta))), Vec::<Value>::new());
    let resp = server.get(&job_path(&job), Some(&beta));
    assert_eq!(resp.status(), 404);
    // The registry's own tokens still work beside Keystone's.
    c.lab.ok(&["user", "add", "local", "--tenant", &c.alpha]);
    let local = c.lab.token("local", &c.alpha);
    assert_eq!(jobs(server.get(JOBS, Some(&local))).len(), 1);
}

#[test]
fn an_unregistered_project_a_bogus_and_an_expired_token_get_the_reference_401() {
    let c = cloud(&["--token-expiration", "6"]);
    let server = c.serve(&[]);
    // The service project is a real Keystone project, but not a registered tenant.
    let unregistered = c.os.user_token("service");
    assert_401(server.get(JOBS, Some(&unregistered)));
    let bogus = format!("gAAAAAB{}", "x".repeat(170));
    assert_401(server.get(JOBS, Some(&bogus)));

    let token = c.os.user_token("alpha");
    assert_eq!(jobs_status(&server, &token), 200);
    std::thread::sleep(Duration::from_secs(7));
    // Kept only until the token's own expiry, then Keystone says it is gone.
    assert_401(server.get(JOBS, Some(&token)));
}

#[test]
fn a_keystone_tokens_401_logs_its_cause_never_the_token() {
    let c = cloud(&[]);
    let server = c.serve(&[]);
    let unregistered = c.os.user_token("service");
    let bogus = format!("gAAAAAB{}", "y".repeat(170));
    let alpha_only = c.os.user_token("alpha");
    let body = serde_json::json!({"image_id": c.image, "tenant_id_dst": c.beta}).to_string();
    for (resp, token, cause) in [
        (
            server.get(JOBS, Some(&unregistered)),
            &unregistered,
            "project is not a tenant of this appliance",
        ),
        (
            server.get(JOBS, Some(&bogus)),
            &bogus,
            "Keystone does not accept it",
        ),
        (
            server.post(Some(&alpha_only), &body),
            &alpha_only,
            "not a member of the destination tenant",
        ),
    ] {
        assert_401_logged(&server, resp, cause, token);
    }
}

#[test]
fn fifty_requests_with_one_token_make_one_keystone_validation() {
    let c = cloud(&[]);
    let server = c.serve(&[]);
    let token = c.os.user_token("alpha");
    let before = c.os.keystone_validations();
    for _ in 0..50 {
        assert_eq!(jobs_status(&server, &token), 200);
    }
    assert_eq!(
        c.os.keystone_validations() - before,
        1,
        "Keystone's log counts the validations"
    );
    let metrics = server.get("/metrics", None).text().expect("metrics");
    assert!(
        metrics.contains("image_replicator_keystone_validations_total 1\n"),
        "{metrics}"
    );
    assert!(
        !server.log_text().contains(&token),
        "the token is in the server's log"
    );
}

#[test]
fn a_revoked_token_fails_within_the_ttl_and_at_once_with_ttl_0() {
    let c = cloud(&[]);
    {
        let server = c.serve(&["--keystone-cache-ttl", "2s"]);
        let token = c.os.user_token("alpha");
        assert_eq!(jobs_status(&server, &token), 200);
        c.revoke(&token);
        let revoked = Instant::now();
        while jobs_status(&server, &token) == 200 {
            assert!(
                revoked.elapsed() < Duration::from_secs(3),
                "still accepted {:?} after the revocation",
                revoked.elapsed()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_401(server.get(JOBS, Some(&token)));
    }
    let server = c.serve(&["--keystone-cache-ttl", "0s"]);
    let token = c.os.user_token("alpha");
    assert_eq!(jobs_status(&server, &token), 200);
    c.revoke(&token);
    assert_401(server.get(JOBS, Some(&token)));
}

#[test]
fn with_keystone_stopped_a_kept_token_works_and_a_new_one_gets_503() {
    let mut c = cloud(&[]);
    let server = c.serve(&[]);
    let known = c.os.user_token("alpha");
    let unseen = c.os.user_token("beta");
    assert_eq!(jobs_status(&server, &known), 200);
    c.os.command("stop keystone");
    assert_eq!(jobs_status(&server, &known), 200);
    let resp = server.get(JOBS, Some(&unseen));
    let sentence = assert_error(resp, 503);
    assert!(sentence.contains("Identity is unavailable"), "{sentence}");
    // The registry's tokens do not need Keystone: a good one works, a revoked one is a 401
    // (not a 503), after a restart too (no cache remembers it).
    c.lab.ok(&["user", "add", "local", "--tenant", &c.alpha]);
    let local = c.lab.token("local", &c.alpha);
    let revoked = c.lab.token("local", &c.alpha);
    assert_eq!(jobs_status(&server, &local), 200);
    let listed: Value =
        serde_json::from_str(&c.lab.ok(&["--json", "token", "list"])).expect("token list");
    let newest = listed
        .as_array()
        .and_then(|t| {
            t.iter()
                .max_by_key(|t| t["created_at"].as_str().map(String::from))
        })
        .expect("a token");
    let newest_id = newest["id"].as_str().expect("token id");
    c.lab.ok(&["token", "revoke", newest_id]);
    let unusable: Vec<&str> = [local.as_str(), revoked.as_str()]
        .into_iter()
        .filter(|t| jobs_status(&server, t) != 200)
        .collect();
    assert_eq!(unusable.len(), 1, "exactly the revoked token fails");
    assert_401(server.get(JOBS, Some(unusable[0])));
    drop(server);
    let server = c.serve(&[]);
    assert_401(server.get(JOBS, Some(unusable[0])));
    c.os.command("start keystone");
    assert_eq!(jobs_status(&server, &unseen), 200);
}
