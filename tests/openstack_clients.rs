//! The clients OpenStack users script with (python-openstackclient's `openstack image …`,
//! openstacksdk's `conn.image.…`, from the test venv) against the appliance's images API: found
//! through a real Keystone's catalog, where the test registers the appliance with the README's
//! `openstack service create` / `region create` / `endpoint create` lines, and with a registry
//! token through keystoneauth's `admin_token` plugin. The same scenarios first pass against the
//! lab's real Glance, so a failure against the appliance is the appliance's.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::openstack::clients::{Auth, Clients};
use common::openstack::OpenStack;
use common::*;
use md5::{Digest, Md5};
use serde_json::Value;

/// The appliance's directory regions, each also a region of the Keystone catalog whose `image`
/// endpoint is the appliance.
const REGION_A: &str = "ra";
const REGION_B: &str = "rb";

/// A real Keystone (and `glances` Glances, in its catalog as regions glanceI); when `appliance`,
/// an appliance accepting that Keystone's tokens (worker on), with project alpha a tenant of its
/// directory region ra and beta one of rb, registered in the catalog as the README says.
struct Cloud {
    os: OpenStack,
    lab: Lab,
    server: Option<Server>,
    clients: Clients,
    alpha: String,
    beta: String,
}

fn cloud(glances: usize, appliance: bool) -> Cloud {
    let os = OpenStack::start_with(glances, true, &[]);
    let ks = &os.info["keystone"];
    let id = |p: &str| {
        ks["projects"][p]["id"]
            .as_str()
            .expect("project id")
            .to_string()
    };
    let (alpha, beta) = (id("alpha"), id("beta"));
    let mut cloud = Cloud {
        lab: Lab::new(),
        server: None,
        clients: Clients::new(),
        alpha,
        beta,
        os,
    };
    if appliance {
        cloud.start_appliance();
    }
    cloud
}

impl Cloud {
    fn start_appliance(&mut self) {
        let lab = &self.lab;
        lab.ok(&["region", "add", REGION_A]);
        lab.ok(&["region", "add", REGION_B]);
        lab.ok(&[
            "tenant",
            "add",
            &self.alpha,
            "--region",
            REGION_A,
            "--name",
            "alpha",
        ]);
        lab.ok(&[
            "tenant", "add", &self.beta, "--region", REGION_B, "--name", "beta",
        ]);
        let ks = &self.os.info["keystone"];
        let text = |v: &Value| v.as_str().expect("lab credentials").to_string();
        let password = lab.dir.path().join("keystone.password");
        std::fs::write(&password, format!("{}\n", text(&ks["service"]["password"])))
            .expect("password file");
        let server = lab.serve_with(&[
            "--keystone-url",
            &self.os.keystone_url(),
            "--keystone-username",
            &text(&ks["service"]["username"]),
            "--keystone-project",
            &text(&ks["service"]["project"]),
            "--keystone-password-file",
            password.to_str().expect("path"),
        ]);
        // The README's lines, as the cloud's admin.
        let admin = self.admin();
        let c = &self.clients;
        c.ok(
            &admin,
            &[
                "service",
                "create",
                "--name",
                "image-replicator",
                "--description",
                "Image replicator",
                "image",
            ],
        );
        for region in [REGION_A, REGION_B] {
            c.ok(&admin, &["region", "create", region]);
            c.ok(
                &admin,
                &[
                    "endpoint",
                    "create",
                    "--region",
                    region,
                    "image-replicator",
                    "public",
                    &server.base,
                ],
            );
        }
        self.server = Some(server);
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("the appliance")
    }

    fn admin(&self) -> Auth {
        let a = &self.os.info["keystone"]["admin"];
        let text = |v: &Value| v.as_str().expect("admin credentials").to_string();
        Auth::Keystone {
            auth_url: self.os.keystone_url(),
            user: text(&a["username"]),
            password: text(&a["password"]),
            project: text(&a["project"]),
            region: "RegionOne".into(),
        }
    }

    /// Project `project`'s user, finding the image service of `region` in the catalog.
    fn user(&self, project: &str, region: &str) -> Auth {
        let p = &self.os.info["keystone"]["projects"][project];
        let text = |v: &Value| v.as_str().expect("user credentials").to_string();
        Auth::Keystone {
            auth_url: self.os.keystone_url(),
            user: text(&p["user"]),
            password: text(&p["password"]),
            project: project.into(),
            region: region.into(),
        }
    }

    /// gamma-user's Keystone token scoped to alpha (gamma is a member of alpha and beta, so it
    /// may copy alpha's images into beta).
    fn gamma_token(&self) -> String {
        let g = &self.os.info["keystone"]["gamma"];
        let text = |v: &Value| v.as_str().expect("gamma").to_string();
        self.os
            .token(&text(&g["user"]), &text(&g["password"]), "alpha")
    }
}

/// `len` pseudo-random bytes (an LCG seeded by `seed`), written to `dir/name`.
fn random_file(dir: &Path, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(7);
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let path = dir.join(name);
    std::fs::write(&path, &data).expect("write the image file");
    (path, data)
}

fn md5_hex(data: &[u8]) -> String {
    Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("a string, not {v}"))
}

/// `image create --file` of a raw and a qcow2 image with properties, `image list`, `image show`
/// (by id and by name), `image set --property`, `image save --file`, `image delete`, each
/// checked; `tag` keeps the names of one run apart.
fn cli_round_trip(c: &Clients, auth: &Auth, tag: &str) {
    let dir = c.dir();
    let (raw_path, raw) = random_file(dir, &format!("{tag}.raw"), (3 << 20) + 12345, 1);
    let qcow = common::openstack::qcow2(dir, 2, 2);
    let qcow_path = dir.join(format!("{tag}.qcow2"));
    std::fs::write(&qcow_path, &qcow).expect("write qcow2");
    let raw_name = format!("{tag}-raw");
    let qcow_name = format!("{tag}-qcow2");

    let created = c.json(
        auth,
        &[
            "image",
            "create",
            "--file",
            raw_path.to_str().expect("path"),
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--property",
            "hw_disk_bus=scsi",
            "--property",
            "os_distro=debian",
            &raw_name,
        ],
    );
    let raw_id = text(&created["id"]).to_string();
    assert_eq!(created["status"], "active", "{created}");
    assert_eq!(created["size"], raw.len() as u64, "{created}");
    assert_eq!(created["checksum"], md5_hex(&raw).as_str(), "{created}");
    assert_eq!(created["disk_format"], "raw");
    assert_eq!(created["properties"]["hw_disk_bus"], "scsi", "{created}");
    assert_eq!(
        created["properties"]["os_hash_value"],
        sha512_hex(&raw).as_str()
    );

    let created = c.json(
        auth,
        &[
            "image",
            "create",
            "--file",
            qcow_path.to_str().expect("path"),
            "--disk-format",
            "qcow2",
            "--container-format",
            "bare",
            &qcow_name,
        ],
    );
    let qcow_id = text(&created["id"]).to_string();
    assert_eq!(created["status"], "active", "{created}");
    assert_eq!(created["disk_format"], "qcow2");
    assert_eq!(created["size"], qcow.len() as u64);

    let listed = c.json(auth, &["image", "list"]);
    let rows = listed.as_array().expect("a list");
    for (id, name) in [(&raw_id, &raw_name), (&qcow_id, &qcow_name)] {
        let row = rows
            .iter()
            .find(|r| r["ID"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} is not in the list {listed}"));
        assert_eq!(row["Name"], name.as_str());
        assert_eq!(row["Status"], "active");
    }

    let shown = c.json(auth, &["image", "show", &raw_id]);
    assert_eq!(shown["name"], raw_name.as_str());
    assert_eq!(shown["properties"]["os_distro"], "debian", "{shown}");
    // By name: the client asks for /v2/images/NAME (a 404), then ?name=NAME.
    let by_name = c.json(auth, &["image", "show", &raw_name]);
    assert_eq!(by_name["id"], raw_id.as_str());

    c.ok(
        auth,
        &[
            "image",
            "set",
            "--property",
            "hw_disk_bus=virtio",
            "--property",
            "hw_qemu_guest_agent=yes",
            &raw_id,
        ],
    );
    let shown = c.json(auth, &["image", "show", &raw_id]);
    assert_eq!(shown["properties"]["hw_disk_bus"], "virtio", "{shown}");
    assert_eq!(shown["properties"]["hw_qemu_guest_agent"], "yes");
    assert_eq!(shown["properties"]["os_distro"], "debian");

    let saved = dir.join(format!("{tag}.saved"));
    c.ok(
        auth,
        &[
            "image",
            "save",
            "--file",
            saved.to_str().expect("path"),
            &raw_id,
        ],
    );
    assert!(
        std::fs::read(&saved).expect("saved file") == raw,
        "image save gave other bytes"
    );
    let saved_qcow = dir.join(format!("{tag}.saved.qcow2"));
    c.ok(
        auth,
        &[
            "image",
            "save",
            "--file",
            saved_qcow.to_str().expect("path"),
            &qcow_id,
        ],
    );
    assert!(std::fs::read(&saved_qcow).expect("saved file") == qcow);

    c.ok(auth, &["image", "delete", &raw_id, &qcow_id]);
    let listed = c.json(auth, &["image", "list"]);
    assert!(
        !listed.to_string().contains(&raw_id) && !listed.to_string().contains(&qcow_id),
        "deleted images are still listed: {listed}"
    );
    let err = c.fails(auth, &["image", "show", &raw_id]);
    assert!(err.contains("No Image found"), "{err}");
}

/// openstacksdk: `conn.image.create_image(... filename=F, wait=True)`, `conn.image.images()`,
/// `conn.image.download_image(image, output=F)`, `conn.image.delete_image`.
fn sdk_round_trip(c: &Clients, auth: &Auth, tag: &str) {
    let dir = c.dir();
    let (path, data) = random_file(dir, &format!("{tag}.sdk.raw"), (2 << 20) + 777, 3);
    let out = dir.join(format!("{tag}.sdk.out"));
    let got = c.sdk(
        auth,
        r#"
img = conn.image.create_image(
    name=args["name"], filename=args["file"], disk_format="raw", container_format="bare",
    hw_rng_model="virtio", app_build="2026.12", wait=True)
listed = [(i.id, i.name, i.status) for i in conn.image.images()]
conn.image.download_image(img, output=args["out"])
shown = conn.image.get_image(img.id)
conn.image.delete_image(img, ignore_missing=False)
after = [i.id for i in conn.image.images()]
print(json.dumps({"id": img.id, "listed": listed, "checksum": shown.checksum,
                  "size": shown.size, "status": shown.status,
                  "hw_rng_model": shown.hw_rng_model,
                  "app_build": shown.properties.get("app_build"), "after": after}))
"#,
        &serde_json::json!({"name": format!("{tag}-sdk"), "file": path, "out": out}),
    );
    let id = text(&got["id"]);
    assert!(
        got["listed"]
            .as_array()
            .expect("listed")
            .iter()
            .any(|r| r[0] == id && r[1] == format!("{tag}-sdk").as_str() && r[2] == "active"),
        "{got}"
    );
    assert_eq!(got["status"], "active");
    assert_eq!(got["size"], data.len() as u64);
    assert_eq!(got["checksum"], md5_hex(&data).as_str());
    assert_eq!(got["hw_rng_model"], "virtio", "{got}");
    assert_eq!(got["app_build"], "2026.12", "{got}");
    assert!(std::fs::read(&out).expect("downloaded") == data);
    assert!(
        !got["after"].to_string().contains(id),
        "deleted image still listed: {got}"
    );
}

#[test]
fn the_cli_and_the_sdk_round_trips_pass_against_real_glance_through_keystone_and_admin_token() {
    // The reference: the same scenarios against Glance 33 through the same Keystone, so that
    // the harness (clean environment, catalog, admin_token endpoint with /v2) is proven.
    let cloud = cloud(1, false);
    let c = &cloud.clients;
    let alpha = cloud.user("alpha", "glance0");
    cli_round_trip(c, &alpha, "glance-ks");
    sdk_round_trip(c, &alpha, "glance-ks");
    let token = cloud.os.user_token("alpha");
    let direct = Auth::AdminToken {
        endpoint: format!("{}/v2", cloud.os.glance_url(0)),
        token,
    };
    cli_round_trip(c, &direct, "glance-at");
    sdk_round_trip(c, &direct, "glance-at");
}

#[test]
fn openstack_image_create_list_show_set_save_delete_work_through_the_keystone_catalog() {
    let cloud = cloud(0, true);
    cli_round_trip(&cloud.clients, &cloud.user("alpha", REGION_A), "ks");
}

#[test]
fn openstack_image_commands_work_with_a_registry_token_through_admin_token() {
    let cloud = cloud(0, true);
    cloud
        .lab
        .ok(&["user", "add", "local", "--tenant", &cloud.alpha]);
    let token = cloud.lab.token("local", &cloud.alpha);
    let auth = Auth::AdminToken {
        endpoint: format!("{}/v2", cloud.server().base),
        token,
    };
    cli_round_trip(&cloud.clients, &auth, "at");
}

#[test]
fn openstacksdk_creates_lists_downloads_and_deletes_images_by_catalog_and_by_admin_token() {
    let cloud = cloud(0, true);
    sdk_round_trip(&cloud.clients, &cloud.user("alpha", REGION_A), "ks");
    cloud
        .lab
        .ok(&["user", "add", "local", "--tenant", &cloud.alpha]);
    let auth = Auth::AdminToken {
        endpoint: format!("{}/v2", cloud.server().base),
        token: cloud.lab.token("local", &cloud.alpha),
    };
    sdk_round_trip(&cloud.clients, &auth, "at");
}

#[test]
fn an_image_uploaded_with_the_cli_and_copied_by_a_job_is_saved_by_the_other_tenant_with_its_bytes_and_properties(
) {
    let cloud = cloud(0, true);
    let c = &cloud.clients;
    let alpha = cloud.user("alpha", REGION_A);
    let beta = cloud.user("beta", REGION_B);
    let (path, data) = random_file(c.dir(), "e2e.raw", (5 << 20) + 4321, 9);
    let created = c.json(
        &alpha,
        &[
            "image",
            "create",
            "--file",
            path.to_str().expect("path"),
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--property",
            "hw_disk_bus=scsi",
            "--property",
            "hw_firmware_type=uefi",
            "--property",
            "os_distro=ubuntu",
            "--property",
            "os_type=linux",
            "--property",
            "trait:CUSTOM_X=required",
            "--property",
            "build=2026.12",
            "e2e-source",
        ],
    );
    let source = text(&created["id"]).to_string();
    assert_eq!(created["status"], "active", "{created}");
    // Beta sees nothing of alpha's (a private image of another tenant is a 404).
    let err = c.fails(&beta, &["image", "show", &source]);
    assert!(err.contains("No Image found"), "{err}");

    // The copy, with a POST to the reference's route.
    let server = cloud.server();
    let token = cloud.gamma_token();
    let job = server.copy_ok(&token, &source, &cloud.beta);
    let done = server.wait_job(
        &token,
        &job,
        Duration::from_secs(60),
        status_is("replicated"),
    );
    assert_eq!(done["source_image_name"], "e2e-source", "{done}");
    assert_eq!(done["destination_region_id"], REGION_B);
    let copy = text(&done["destination_image_id"]).to_string();

    let listed = c.json(&beta, &["image", "list"]);
    assert!(listed.to_string().contains(&copy), "{listed}");
    let shown = c.json(&beta, &["image", "show", &copy]);
    assert_eq!(shown["owner"], cloud.beta.as_str(), "{shown}");
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["checksum"], md5_hex(&data).as_str());
    for (key, value) in [
        ("hw_disk_bus", "scsi"),
        ("hw_firmware_type", "uefi"),
        ("os_distro", "ubuntu"),
        ("os_type", "linux"),
        ("trait:CUSTOM_X", "required"),
        ("build", "2026.12"),
    ] {
        assert_eq!(
            shown["properties"][key], value,
            "{key} not carried: {shown}"
        );
    }
    let saved = c.dir().join("e2e.saved");
    c.ok(
        &beta,
        &[
            "image",
            "save",
            "--file",
            saved.to_str().expect("path"),
            &copy,
        ],
    );
    assert!(
        std::fs::read(&saved).expect("saved") == data,
        "the copy's bytes differ"
    );
}
