//! The images API (README, "Images API"): Glance's version documents and v2 image calls
//! served by the real server for its directory regions, driven over HTTP.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{assert_error, poll, Lab, Server, TENANT_A, TENANT_B, TENANT_C};
use md5::{Digest, Md5};
use reqwest::blocking::{RequestBuilder, Response};
use serde_json::{json, Value};

const PATCH: &str = "application/openstack-images-v2.1-json-patch";

/// The standard lab (A and C in ot1, B in ot2), its server, and tokens for alice (A), carol
/// (C), bob (B) and root (admin, A).
struct Api {
    server: Server,
    lab: Lab,
    alice: String,
    carol: String,
    bob: String,
    root: String,
}

impl Api {
    fn new() -> Api {
        Self::with(&["--no-worker"], |_| {})
    }

    fn with(args: &[&str], prepare: impl FnOnce(&Lab)) -> Api {
        let lab = Lab::new();
        lab.standard();
        prepare(&lab);
        let alice = lab.token("alice", TENANT_A);
        let carol = lab.token("carol", TENANT_C);
        let bob = lab.token("bob", TENANT_B);
        let root = lab.token("root", TENANT_A);
        let server = lab.serve_with(args);
        Api {
            server,
            lab,
            alice,
            carol,
            bob,
            root,
        }
    }

    fn req(&self, method: reqwest::Method, path: &str, token: &str) -> RequestBuilder {
        self.server
            .client
            .request(method, self.server.url(path))
            .header("X-Auth-Token", token)
    }

    fn get(&self, path: &str, token: &str) -> Response {
        self.req(reqwest::Method::GET, path, token)
            .send()
            .expect("GET")
    }

    fn json(&self, path: &str, token: &str) -> Value {
        let resp = self.get(path, token);
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.json().expect("JSON")
    }

    fn create(&self, token: &str, body: Value) -> Response {
        self.req(reqwest::Method::POST, "/v2/images", token)
            .json(&body)
            .send()
            .expect("POST")
    }

    fn created(&self, token: &str, body: Value) -> Value {
        let resp = self.create(token, body);
        assert_eq!(resp.status(), 201);
        resp.json().expect("JSON")
    }

    fn patch(&self, token: &str, id: &str, ops: Value) -> Response {
        self.req(reqwest::Method::PATCH, &format!("/v2/images/{id}"), token)
            .header("content-type", PATCH)
            .body(ops.to_string())
            .send()
            .expect("PATCH")
    }

    fn upload(&self, token: &str, id: &str, data: Vec<u8>) -> Response {
        self.req(
            reqwest::Method::PUT,
            &format!("/v2/images/{id}/file"),
            token,
        )
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .expect("PUT")
    }

    fn delete(&self, token: &str, id: &str) -> Response {
        self.req(reqwest::Method::DELETE, &format!("/v2/images/{id}"), token)
            .send()
            .expect("DELETE")
    }

    /// Ids of a listing, in order.
    fn ids(&self, query: &str, token: &str) -> Vec<String> {
        ids(&self.json(&format!("/v2/images{query}"), token))
    }
}

fn ids(list: &Value) -> Vec<String> {
    list["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_string())
        .collect()
}

fn id_of(image: &Value) -> String {
    image["id"].as_str().expect("id").to_string()
}

fn raw(name: &str) -> Value {
    json!({"name": name, "disk_format": "raw", "container_format": "bare"})
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = common::Rng(seed | 1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn md5_hex(bytes: &[u8]) -> String {
    image_replicator::model::to_hex(&Md5::digest(bytes))
}

#[test]
fn version_documents_answer_300_at_the_root_and_200_at_versions_without_a_token() {
    let api = Api::new();
    for (path, status) in [("/", 300), ("/versions", 200)] {
        let resp = api
            .server
            .client
            .get(api.server.url(path))
            .header("host", "images.example:9292")
            .send()
            .expect("GET");
        assert_eq!(resp.status(), status, "{path}");
        let doc: Value = resp.json().expect("JSON");
        let versions = doc["versions"].as_array().expect("versions");
        let current: Vec<&Value> = versions
            .iter()
            .filter(|v| v["status"] == "CURRENT")
            .collect();
        assert_eq!(current.len(), 1, "one current version");
        for v in versions {
            assert!(v["id"].as_str().expect("id").starts_with("v2."));
            assert!(["CURRENT", "SUPPORTED"].contains(&v["status"].as_str().expect("status")));
            assert_eq!(
                v["links"],
                json!([{"rel": "self", "href": "http://images.example:9292/v2/"}])
            );
        }
        assert!(versions.iter().any(|v| v["id"] == "v2.0"));
    }
    // A proxy that terminates TLS says so, and the links follow.
    let doc: Value = api
        .server
        .client
        .get(api.server.url("/versions"))
        .header("x-forwarded-proto", "https")
        .send()
        .expect("GET")
        .json()
        .expect("JSON");
    let href = doc["versions"][0]["links"][0]["href"]
        .as_str()
        .expect("href");
    assert_eq!(href, format!("https://{}/v2/", api.server.addr()));
}

#[test]
fn an_image_is_created_shown_patched_and_deleted_with_glances_fields_and_codes() {
    let api = Api::new();
    let image = api.created(
        &api.alice,
        json!({"name": "cirros", "disk_format": "raw", "container_format": "bare",
               "tags": ["b", "a", "b"], "min_disk": 1, "min_ram": 64, "hw_disk_bus": "scsi",
               "os_distro": "cirros", "visibility": "private"}),
    );
    let id = id_of(&image);
    let mut keys: Vec<&str> = image
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "checksum",
            "container_format",
            "created_at",
            "disk_format",
            "file",
            "hw_disk_bus",
            "id",
            "min_disk",
            "min_ram",
            "name",
            "os_distro",
            "os_hash_algo",
            "os_hash_value",
            "os_hidden",
            "owner",
            "protected",
            "schema",
            "self",
            "size",
            "status",
            "tags",
            "updated_at",
            "virtual_size",
            "visibility"
        ]
    );
    assert_eq!(image["status"], "queued");
    assert_eq!(image["size"], Value::Null);
    assert_eq!(image["owner"], TENANT_A);
    assert_eq!(image["tags"], json!(["a", "b"]));
    assert_eq!(image["visibility"], "private");
    assert_eq!(image["self"], format!("/v2/images/{id}"));
    assert_eq!(image["file"], format!("/v2/images/{id}/file"));
    assert_eq!(image["schema"], "/v2/schemas/image");
    assert_eq!(api.json(&format!("/v2/images/{id}"), &api.alice), image);

    // Glance's default visibility is shared; an id may be chosen, once.
    let chosen = "c1b2a3d4-0000-4000-8000-000000000001";
    let second = api.created(&api.alice, json!({"id": chosen, "name": "two"}));
    assert_eq!(second["visibility"], "shared");
    assert_eq!(second["disk_format"], Value::Null);
    assert_error(api.create(&api.alice, json!({"id": chosen})), 409);
    // Read-only and reserved keys, and non-string properties, as Glance refuses them.
    assert_error(api.create(&api.alice, json!({"status": "active"})), 403);
    assert_error(api.create(&api.alice, json!({"self": "/x"})), 403);
    assert_error(api.create(&api.alice, json!({"hw_disk_bus": 3})), 400);
    assert_error(
        api.create(&api.alice, json!({"disk_format": "floppy"})),
        400,
    );
    assert_error(api.create(&api.alice, json!({"visibility": "public"})), 403);

    let resp = api.patch(
        &api.alice,
        &id,
        json!([
            {"op": "replace", "path": "/name", "value": "cirros-0.6"},
            {"op": "add", "path": "/hw_vif_model", "value": "virtio"},
            {"op": "remove", "path": "/os_distro"},
            {"op": "replace", "path": "/min_ram", "value": 128},
            {"op": "add", "path": "/tags", "value": ["x"]},
            {"op": "replace", "path": "/protected", "value": true},
        ]),
    );
    assert_eq!(resp.status(), 200);
    let patched: Value = resp.json().expect("JSON");
    assert_eq!(patched["name"], "cirros-0.6");
    assert_eq!(patched["hw_vif_model"], "virtio");
    assert_eq!(patched.get("os_distro"), None);
    assert_eq!(patched["min_ram"], 128);
    assert_eq!(patched["tags"], json!(["x"]));
    assert_eq!(patched["protected"], true);
    // The 2.0 media type says the same with its own shape.
    let resp = api
        .req(
            reqwest::Method::PATCH,
            &format!("/v2/images/{id}"),
            &api.alice,
        )
        .header(
            "content-type",
            "application/openstack-images-v2.0-json-patch",
        )
        .body(json!([{"replace": "/hw_vif_model", "value": "e1000"}]).to_string())
        .send()
        .expect("PATCH");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().expect("JSON")["hw_vif_model"], "e1000");
    // Refusals: read-only (403), a property that is not there (409), another media type (415),
    // publicizing without the admin role (403); nothing of a refused patch is kept.
    let refused = [
        (
            json!([{"op": "replace", "path": "/status", "value": "active"}]),
            403,
        ),
        (json!([{"op": "replace", "path": "/size", "value": 1}]), 403),
        (json!([{"op": "remove", "path": "/name"}]), 403),
        (
            json!([{"op": "replace", "path": "/nothing", "value": "x"}]),
            409,
        ),
        (json!([{"op": "remove", "path": "/nothing"}]), 409),
        (
            json!([{"op": "replace", "path": "/name", "value": "kept?"},
                   {"op": "replace", "path": "/visibility", "value": "public"}]),
            403,
        ),
        (json!([{"op": "move", "path": "/name", "from": "/x"}]), 400),
    ];
    for (ops, code) in refused {
        assert_error(api.patch(&api.alice, &id, ops.clone()), code);
    }
    assert_eq!(
        api.json(&format!("/v2/images/{id}"), &api.alice)["name"],
        "cirros-0.6"
    );
    let resp = api
        .req(
            reqwest::Method::PATCH,
            &format!("/v2/images/{id}"),
            &api.alice,
        )
        .header("content-type", "application/json")
        .body("[]")
        .send()
        .expect("PATCH");
    assert_error(resp, 415);

    // Tags one by one.
    let tag = |method, tag: &str| {
        api.req(method, &format!("/v2/images/{id}/tags/{tag}"), &api.alice)
            .send()
            .expect("tag")
    };
    assert_eq!(tag(reqwest::Method::PUT, "new%20tag").status(), 204);
    assert_eq!(
        api.json(&format!("/v2/images/{id}"), &api.alice)["tags"],
        json!(["new tag", "x"])
    );
    assert_eq!(tag(reqwest::Method::DELETE, "x").status(), 204);
    assert_error(tag(reqwest::Method::DELETE, "x"), 404);

    // Protected: no delete (403) until it is not.
    assert_error(api.delete(&api.alice, &id), 403);
    let resp = api.patch(
        &api.alice,
        &id,
        json!([{"op": "replace", "path": "/protected", "value": false}]),
    );
    assert_eq!(resp.status(), 200);
    assert_eq!(api.delete(&api.alice, &id).status(), 204);
    assert_error(api.get(&format!("/v2/images/{id}"), &api.alice), 404);
    assert_error(api.delete(&api.alice, &id), 404);
    assert_error(api.get("/v2/images/not-a-uuid", &api.alice), 404);
}

#[test]
fn the_list_filters_sorts_and_pages_with_glances_next_links() {
    let api = Api::new();
    let mut made = Vec::new();
    for i in 0..7 {
        let mut body = raw(&format!("img-{i}"));
        body["tags"] = json!(if i % 2 == 0 {
            vec!["even"]
        } else {
            vec!["odd"]
        });
        body["hw_disk_bus"] = json!(if i < 3 { "scsi" } else { "virtio" });
        body["min_disk"] = json!(7 - i);
        if i == 6 {
            body["os_hidden"] = json!(true);
        }
        made.push(id_of(&api.created(&api.alice, body)));
        // created_at has seconds precision: ties are broken by id, so order by name below.
    }
    let data = random_bytes(5000, 1);
    assert_eq!(api.upload(&api.alice, &made[1], data).status(), 204);

    let names = |query: &str| -> Vec<String> {
        api.json(&format!("/v2/images{query}"), &api.alice)["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|i| i["name"].as_str().expect("name").to_string())
            .collect()
    };
    // Hidden images are listed only when asked for.
    assert_eq!(names("?sort=name:asc").len(), 6);
    assert_eq!(names("?os_hidden=true"), vec!["img-6"]);
    assert_eq!(
        names("?sort_key=name&sort_dir=asc"),
        vec!["img-0", "img-1", "img-2", "img-3", "img-4", "img-5"]
    );
    assert_eq!(names("?sort_key=name&sort_dir=desc")[0], "img-5");
    assert_eq!(
        names("?sort=min_disk:asc,name&limit=2"),
        vec!["img-5", "img-4"]
    );
    assert_eq!(names("?name=img-3"), vec!["img-3"]);
    assert_eq!(
        names("?name=in:img-3,img-0&sort=name:asc"),
        vec!["img-0", "img-3"]
    );
    assert_eq!(names("?status=active"), vec!["img-1"]);
    assert_eq!(names("?size_min=4000&size_max=6000"), vec!["img-1"]);
    assert_eq!(names("?size_min=6000"), Vec::<String>::new());
    assert_eq!(
        names("?tag=even&sort=name:asc"),
        vec!["img-0", "img-2", "img-4"]
    );
    assert_eq!(names("?tag=even&tag=odd"), Vec::<String>::new());
    assert_eq!(
        names("?hw_disk_bus=scsi&sort=name:asc"),
        vec!["img-0", "img-1", "img-2"]
    );
    assert_eq!(names(&format!("?owner={TENANT_A}")).len(), 6);
    assert_eq!(names(&format!("?owner={TENANT_C}")).len(), 0);
    assert_eq!(names("?visibility=shared").len(), 6);
    assert_eq!(names("?visibility=private").len(), 0);
    assert_eq!(names("?member_status=accepted").len(), 6);
    assert_eq!(names("?disk_format=raw").len(), 6);
    for bad in [
        "?limit=x",
        "?sort_key=colour",
        "?sort_dir=up",
        "?visibility=world",
        "?member_status=maybe",
        "?os_hidden=perhaps",
        "?size_min=-1",
        "?sort=name&sort_key=id",
        "?marker=00000000-0000-0000-0000-000000000000",
        "?created_at=gt:2020-01-01T00:00:00Z",
    ] {
        assert_error(api.get(&format!("/v2/images{bad}"), &api.alice), 400);
    }

    // Paging: pages of 3 along `next`, each full page with a next link, as Glance.
    let mut seen = Vec::new();
    let mut path = "/v2/images?limit=3&sort=name:asc".to_string();
    let mut pages = 0;
    loop {
        let page = api.json(&path, &api.alice);
        pages += 1;
        assert_eq!(page["schema"], "/v2/schemas/images");
        assert_eq!(page["first"], "/v2/images?limit=3&sort=name%3Aasc");
        seen.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => {
                assert!(next.starts_with("/v2/images?limit=3&sort=name%3Aasc&marker="));
                path = next.to_string();
            }
            None => break,
        }
        assert!(pages < 10, "the pages never end");
    }
    assert_eq!(pages, 3, "3 + 3 + 0 images");
    let mut expected = made[..6].to_vec();
    expected.sort_by_key(|id| made.iter().position(|m| m == id));
    assert_eq!(seen, expected);
    // Default page size and order (newest first).
    let all = api.json("/v2/images", &api.alice);
    assert_eq!(all["first"], "/v2/images");
    assert!(all.get("next").is_none());
}

#[test]
fn tenants_see_their_own_images_public_ones_and_community_ones_by_id() {
    let api = Api::new();
    let private = id_of(&api.created(&api.alice, json!({"name": "p", "visibility": "private"})));
    let shared = id_of(&api.created(&api.alice, json!({"name": "s"})));
    let community =
        id_of(&api.created(&api.alice, json!({"name": "c", "visibility": "community"})));
    // Only an admin may publicize (Glance's default policy); it may make images for others.
    let public = id_of(&api.created(&api.root, json!({"name": "pub", "visibility": "public"})));
    let for_carol = api.created(&api.root, json!({"name": "for carol", "owner": TENANT_C}));
    assert_eq!(for_carol["owner"], TENANT_C);
    assert_error(
        api.create(&api.alice, json!({"name": "x", "owner": TENANT_C})),
        403,
    );

    // Carol (tenant C, same region ot1): the public image, the community one by id only.
    let carol_sees = api.ids("", &api.carol);
    assert!(carol_sees.contains(&public));
    assert!(carol_sees.contains(&id_of(&for_carol)));
    for hidden in [&private, &shared, &community] {
        assert!(!carol_sees.contains(hidden));
    }
    assert_eq!(
        api.ids("?visibility=community", &api.carol),
        vec![community.clone()]
    );
    assert!(api.ids("?visibility=all", &api.carol).contains(&community));
    assert_eq!(
        api.ids("?visibility=private", &api.carol),
        Vec::<String>::new()
    );
    for id in [&private, &shared] {
        assert_error(api.get(&format!("/v2/images/{id}"), &api.carol), 404);
        assert_error(api.delete(&api.carol, id), 404);
        assert_error(
            api.patch(
                &api.carol,
                id,
                json!([{"op": "replace", "path": "/name", "value": "mine"}]),
            ),
            404,
        );
        assert_error(api.upload(&api.carol, id, vec![1, 2, 3]), 404);
    }
    assert_eq!(
        api.get(&format!("/v2/images/{community}"), &api.carol)
            .status(),
        200
    );
    assert_eq!(
        api.get(&format!("/v2/images/{public}"), &api.carol)
            .status(),
        200
    );
    // Seen is not owned: no change by another tenant.
    assert_error(
        api.patch(
            &api.carol,
            &public,
            json!([{"op": "replace", "path": "/name", "value": "mine"}]),
        ),
        403,
    );
    assert_error(api.delete(&api.carol, &community), 403);

    // Bob's tenant lives in ot2: region ot1's images, public ones too, are not his.
    assert_eq!(api.ids("", &api.bob), Vec::<String>::new());
    assert_error(api.get(&format!("/v2/images/{public}"), &api.bob), 404);

    // The admin sees every image of every directory region.
    let bobs = id_of(&api.created(&api.bob, raw("bob's")));
    let everything = api.ids("", &api.root);
    for id in [&private, &shared, &community, &public, &bobs] {
        assert!(everything.contains(id), "admin listing lacks {id}");
    }
    // Without a token: 401, as every route but the version documents and schemas.
    common::assert_401(
        api.server
            .client
            .get(api.server.url("/v2/images"))
            .send()
            .expect("GET"),
    );
}

#[test]
fn an_upload_round_trips_with_its_checksums_content_md5_and_ranges() {
    let api = Api::new();
    let id = id_of(&api.created(&api.alice, raw("data")));
    let file = |range: Option<&str>| {
        let mut req = api.req(
            reqwest::Method::GET,
            &format!("/v2/images/{id}/file"),
            &api.alice,
        );
        if let Some(r) = range {
            req = req.header("range", r);
        }
        req.send().expect("GET file")
    };
    assert_eq!(file(None).status(), 204, "no data yet");
    let data = random_bytes(3 * 1024 * 1024 + 12_345, 7);
    let resp = api.upload(&api.alice, &id, data.clone());
    assert_eq!(resp.status(), 204);
    let image = api.json(&format!("/v2/images/{id}"), &api.alice);
    assert_eq!(image["status"], "active");
    assert_eq!(image["size"], data.len());
    assert_eq!(image["virtual_size"], data.len());
    assert_eq!(image["checksum"], md5_hex(&data));
    assert_eq!(image["os_hash_algo"], "sha512");
    assert_eq!(image["os_hash_value"], common::sha512_hex(&data));

    let resp = file(None);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-md5"], md5_hex(&data).as_str());
    assert_eq!(
        resp.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert!(resp.bytes().expect("body") == data, "the download differs");

    let resp = file(Some("bytes=10-19"));
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 10-19/{}", data.len()).as_str()
    );
    assert_eq!(resp.bytes().expect("body").as_ref(), &data[10..20]);
    let resp = file(Some(&format!("bytes={}-", data.len() - 5)));
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.bytes().expect("body").as_ref(),
        &data[data.len() - 5..]
    );
    let resp = file(Some(&format!("bytes={}-{}", data.len(), data.len() + 10)));
    assert_eq!(resp.status(), 416);

    // Once active, no second upload (Glance's 409).
    assert_error(api.upload(&api.alice, &id, vec![0; 10]), 409);
    // Data is needed before data: disk and container formats.
    let bare = id_of(&api.created(&api.alice, json!({"name": "no formats"})));
    assert_error(api.upload(&api.alice, &bare, vec![0; 10]), 400);
    // The copy engine's manifest was made on the way: the image can be copied at once, and
    // a tenant of the same region that sees it (public) can download it.
    let resp = api.patch(
        &api.root,
        &id,
        json!([{"op": "replace", "path": "/visibility", "value": "public"}]),
    );
    assert_eq!(resp.status(), 200);
    let resp = api
        .req(
            reqwest::Method::GET,
            &format!("/v2/images/{id}/file"),
            &api.carol,
        )
        .send()
        .expect("GET");
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().expect("body") == data);
}

#[test]
fn bytes_that_contradict_the_disk_format_are_415_and_the_image_stays_queued() {
    let api = Api::new();
    let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
    qcow2.extend_from_slice(&[0u8; 16]);
    qcow2.extend_from_slice(&(10u64 << 20).to_be_bytes());
    qcow2.resize(64 * 1024, 0);
    let cases = [
        ("qcow2", random_bytes(100_000, 3), false),
        ("raw", qcow2.clone(), false),
        ("vmdk", random_bytes(50_000, 4), false),
        ("qcow2", qcow2.clone(), true),
    ];
    for (format, data, accepted) in cases {
        let id = id_of(&api.created(
            &api.alice,
            json!({"name": format, "disk_format": format, "container_format": "bare"}),
        ));
        let resp = api.upload(&api.alice, &id, data);
        let image = api.json(&format!("/v2/images/{id}"), &api.alice);
        if accepted {
            assert_eq!(resp.status(), 204);
            assert_eq!(image["status"], "active");
            assert_eq!(image["virtual_size"], 10u64 << 20);
            continue;
        }
        let sentence = assert_error(resp, 415);
        assert!(
            sentence.starts_with(&format!(
                "Image disk_format {format} does not match stream data"
            )),
            "{sentence}"
        );
        assert_eq!(image["status"], "queued");
        assert_eq!(image["size"], Value::Null);
        assert_eq!(image["checksum"], Value::Null);
        assert!(
            !api.lab.files_in("ot1").iter().any(|f| f.contains(&id)),
            "a refused upload left a file"
        );
    }
}

#[test]
fn an_interrupted_upload_leaves_the_image_queued_without_a_file() {
    let api = Api::new();
    let id = id_of(&api.created(&api.alice, raw("cut")));
    let mut socket = std::net::TcpStream::connect(api.server.addr()).expect("connect");
    write!(
        socket,
        "PUT /v2/images/{id}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        api.alice,
        64 << 20
    )
    .expect("headers");
    let piece = random_bytes(1 << 20, 9);
    for _ in 0..3 {
        socket.write_all(&piece).expect("body");
    }
    poll("the upload to start", Duration::from_secs(10), || {
        (api.json(&format!("/v2/images/{id}"), &api.alice)["status"] == "saving").then_some(())
    });
    drop(socket);
    poll(
        "the image to be queued again",
        Duration::from_secs(10),
        || (api.json(&format!("/v2/images/{id}"), &api.alice)["status"] == "queued").then_some(()),
    );
    assert!(
        !api.lab.files_in("ot1").iter().any(|f| f.contains(&id)),
        "an interrupted upload left a file: {:?}",
        api.lab.files_in("ot1")
    );
    // A chunked body that stops (the connection closes without its last chunk) too.
    let mut socket = std::net::TcpStream::connect(api.server.addr()).expect("connect");
    write!(
        socket,
        "PUT /v2/images/{id}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        api.alice,
        piece.len()
    )
    .expect("headers");
    socket.write_all(&piece).expect("body");
    socket.write_all(b"\r\n").expect("chunk end");
    std::thread::sleep(Duration::from_millis(300));
    drop(socket);
    poll("the image to stay queued", Duration::from_secs(10), || {
        (api.json(&format!("/v2/images/{id}"), &api.alice)["status"] == "queued").then_some(())
    });
    // And then a whole upload is accepted.
    let data = random_bytes(1 << 20, 10);
    assert_eq!(api.upload(&api.alice, &id, data.clone()).status(), 204);
    let mut body = Vec::new();
    api.get(&format!("/v2/images/{id}/file"), &api.alice)
        .read_to_end(&mut body)
        .expect("download");
    assert!(body == data);
}

#[test]
fn an_upload_over_the_tenants_quota_is_413_and_the_image_stays_queued() {
    let api = Api::with(&["--no-worker"], |lab| {
        lab.ok(&["tenant", "update", TENANT_A, "--quota-bytes", "1000000"]);
    });
    let id = id_of(&api.created(&api.alice, raw("big")));
    assert_error(api.upload(&api.alice, &id, random_bytes(1_500_000, 5)), 413);
    let image = api.json(&format!("/v2/images/{id}"), &api.alice);
    assert_eq!(image["status"], "queued");
    // Without a declared length (chunked), the refusal comes when the bytes pass the quota.
    let body = reqwest::blocking::Body::new(std::io::Cursor::new(random_bytes(1_500_000, 6)));
    let resp = api
        .req(
            reqwest::Method::PUT,
            &format!("/v2/images/{id}/file"),
            &api.alice,
        )
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .expect("PUT");
    assert_error(resp, 413);
    assert_eq!(
        api.json(&format!("/v2/images/{id}"), &api.alice)["status"],
        "queued"
    );
    assert_eq!(
        api.upload(&api.alice, &id, random_bytes(900_000, 7))
            .status(),
        204
    );
}

#[test]
fn an_image_a_job_copies_cannot_be_deleted_until_the_job_ends() {
    let api = Api::with(&["--no-worker"], |lab| {
        lab.ok(&[
            "user", "add", "alice2", "--tenant", TENANT_A, "--tenant", TENANT_B,
        ]);
    });
    let alice2 = api.lab.token("alice2", TENANT_A);
    let id = id_of(&api.created(&api.alice, raw("busy")));
    assert_eq!(
        api.upload(&api.alice, &id, random_bytes(4096, 2)).status(),
        204
    );
    let job = api.server.copy_ok(&alice2, &id, TENANT_B);
    let sentence = assert_error(api.delete(&api.alice, &id), 409);
    assert!(sentence.contains(&job), "{sentence}");
    assert_eq!(
        api.server
            .delete(&common::job_path(&job), Some(&alice2))
            .status(),
        204
    );
}

#[test]
fn a_copy_carries_properties_tags_and_boot_sizes_to_the_destination_tenant() {
    let api = Api::with(&[], |lab| {
        lab.ok(&[
            "user", "add", "alice2", "--tenant", TENANT_A, "--tenant", TENANT_B,
        ]);
    });
    let alice2 = api.lab.token("alice2", TENANT_A);
    let source = api.created(
        &api.alice,
        json!({"name": "carried", "disk_format": "raw", "container_format": "bare",
               "hw_disk_bus": "scsi", "os_distro": "debian", "owner_specified.openstack.md5": "x",
               "tags": ["golden"], "min_disk": 2, "min_ram": 512, "protected": true,
               "visibility": "community"}),
    );
    let id = id_of(&source);
    let data = random_bytes(2 << 20, 11);
    assert_eq!(api.upload(&api.alice, &id, data.clone()).status(), 204);
    let job = api.server.copy_ok(&alice2, &id, TENANT_B);
    let done = api
        .server
        .wait_job(&alice2, &job, Duration::from_secs(60), common::terminal);
    assert_eq!(done["status"], "replicated", "{done}");
    assert_eq!(done["source_image_name"], "carried");
    let copy_id = done["destination_image_id"].as_str().expect("destination");
    let copy = api.json(&format!("/v2/images/{copy_id}"), &api.bob);
    for key in [
        "hw_disk_bus",
        "os_distro",
        "owner_specified.openstack.md5",
        "tags",
        "min_disk",
        "min_ram",
        "checksum",
        "os_hash_value",
        "size",
        "disk_format",
    ] {
        assert_eq!(copy[key], source_now(&api, &id)[key], "{key}");
    }
    assert_eq!(copy["owner"], TENANT_B);
    assert_eq!(copy["status"], "active");
    // The destination decides who sees its copy, and the job can always remove what it made.
    assert_eq!(copy["visibility"], "shared");
    assert_eq!(copy["protected"], false);
    let mut body = Vec::new();
    api.get(&format!("/v2/images/{copy_id}/file"), &api.bob)
        .read_to_end(&mut body)
        .expect("download");
    assert!(body == data);
    assert!(api.ids("", &api.bob).contains(&copy_id.to_string()));
}

fn source_now(api: &Api, id: &str) -> Value {
    api.json(&format!("/v2/images/{id}"), &api.alice)
}

#[test]
fn the_schemas_describe_glances_image_fields() {
    let api = Api::new();
    let image: Value = api
        .server
        .client
        .get(api.server.url("/v2/schemas/image"))
        .send()
        .expect("GET")
        .json()
        .expect("JSON");
    assert_eq!(image["name"], "image");
    assert_eq!(image["additionalProperties"], json!({"type": "string"}));
    let fields = image["properties"].as_object().expect("properties");
    for key in [
        "id",
        "name",
        "status",
        "visibility",
        "tags",
        "min_disk",
        "os_hash_value",
        "self",
        "file",
        "schema",
    ] {
        assert!(fields.contains_key(key), "{key}");
    }
    assert_eq!(fields["status"]["readOnly"], true);
    assert!(fields["disk_format"]["enum"]
        .as_array()
        .expect("enum")
        .contains(&json!("qcow2")));
    let images: Value = api
        .server
        .client
        .get(api.server.url("/v2/schemas/images"))
        .send()
        .expect("GET")
        .json()
        .expect("JSON");
    assert_eq!(images["properties"]["images"]["items"], image);
    assert_eq!(images["links"][1], json!({"rel": "next", "href": "{next}"}));
}

#[test]
fn import_records_the_format_its_bytes_show_and_refuses_one_they_contradict() {
    let lab = Lab::new();
    lab.standard();
    let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
    qcow2.resize(8192, 0);
    let file = lab.dir.path().join("disk.img");
    std::fs::write(&file, &qcow2).expect("write");
    let path = file.to_str().expect("path");
    let args = common::import_args(path, TENANT_A, "detected", &[]);
    let id = lab.ok(&args).trim().to_string();
    let shown = lab.ok_json(&["image", "show", &id]);
    assert_eq!(shown["disk_format"], "qcow2");
    let refusal = lab.fails(&common::import_args(
        path,
        TENANT_A,
        "said raw",
        &["--disk-format", "raw"],
    ));
    assert!(refusal.contains("holds qcow2 data, not raw"), "{refusal}");
    let iso = lab.dir.path().join("cd.iso");
    let mut bytes = vec![0u8; 0x9000];
    bytes[0x8001..0x8006].copy_from_slice(b"CD001");
    std::fs::write(&iso, &bytes).expect("write");
    let id = lab
        .ok(&common::import_args(
            iso.to_str().expect("path"),
            TENANT_A,
            "cd",
            &[],
        ))
        .trim()
        .to_string();
    assert_eq!(lab.ok_json(&["image", "show", &id])["disk_format"], "iso");
    // The images API's fields can be given at import.
    let id = lab
        .ok(&common::import_args(
            iso.to_str().expect("path"),
            TENANT_A,
            "with fields",
            &[
                "--property",
                "hw_disk_bus=scsi",
                "--property",
                "os_distro=debian",
                "--visibility",
                "public",
                "--protected",
            ],
        ))
        .trim()
        .to_string();
    let shown = lab.ok_json(&["image", "show", &id]);
    assert_eq!(
        shown["properties"],
        json!({"hw_disk_bus": "scsi", "os_distro": "debian"})
    );
    assert_eq!(shown["visibility"], "public");
    assert_eq!(shown["protected"], true);
    let refusal = lab.fails(&common::import_args(
        iso.to_str().expect("path"),
        TENANT_A,
        "bad",
        &["--property", "status=active"],
    ));
    assert!(refusal.contains("not a property"), "{refusal}");
}

#[test]
fn a_tenant_of_a_glance_region_is_sent_to_its_own_glance() {
    const TENANT_G: &str = "0e6f3a1d2c4b4a59b8e7d6c5b4a39281";
    let api = Api::with(&["--no-worker"], |lab| {
        lab.ok(&["region", "add", "g1", "--glance-url", "http://127.0.0.1:9"]);
        lab.ok(&["tenant", "add", TENANT_G, "--region", "g1"]);
        lab.ok(&["user", "add", "gina", "--tenant", TENANT_G]);
    });
    let gina = api.lab.token("gina", TENANT_G);
    for resp in [
        api.get("/v2/images", &gina),
        api.create(&gina, raw("x")),
        api.get("/v2/images/00000000-0000-4000-8000-000000000000", &gina),
    ] {
        let sentence = assert_error(resp, 409);
        assert!(
            sentence.contains("g1 keeps its own image records")
                && sentence.contains("http://127.0.0.1:9"),
            "{sentence}"
        );
    }
    // The version documents answer everyone.
    assert_eq!(
        api.server
            .client
            .get(api.server.url("/"))
            .send()
            .expect("GET")
            .status(),
        300
    );
}

/// The keys of a JSON object, sorted.
fn key_set(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn records_lists_and_version_documents_have_the_keys_of_real_glance() {
    let os = common::openstack::OpenStack::start(1, false);
    let glance = os.glance_url(0);
    let api = Api::new();
    let body = json!({"name": "k", "disk_format": "raw", "container_format": "bare",
                      "hw_disk_bus": "scsi", "tags": ["t"]});
    let theirs: Value = os
        .http
        .post(format!("{glance}/v2/images"))
        .json(&body)
        .send()
        .expect("Glance POST")
        .json()
        .expect("JSON");
    let ours = api.created(&api.alice, body);
    assert_eq!(key_set(&ours), key_set(&theirs), "a queued image");
    for (key, value) in theirs.as_object().expect("object") {
        if !["id", "owner", "created_at", "updated_at", "self", "file"].contains(&key.as_str()) {
            assert_eq!(&ours[key], value, "{key}");
        }
    }
    let data = random_bytes(100_000, 12);
    let resp = os
        .http
        .put(format!("{glance}/v2/images/{}/file", id_of(&theirs)))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .expect("Glance PUT");
    assert_eq!(resp.status(), 204);
    assert_eq!(api.upload(&api.alice, &id_of(&ours), data).status(), 204);
    let theirs: Value = os
        .http
        .get(format!("{glance}/v2/images/{}", id_of(&theirs)))
        .send()
        .expect("GET")
        .json()
        .expect("JSON");
    let ours = api.json(&format!("/v2/images/{}", id_of(&ours)), &api.alice);
    // Glance names its store (`stores`) even with one; the appliance has no stores to name.
    let mut their_keys = key_set(&theirs);
    their_keys.retain(|k| k != "stores");
    assert_eq!(key_set(&ours), their_keys, "an active image");
    for key in [
        "size",
        "virtual_size",
        "checksum",
        "os_hash_algo",
        "os_hash_value",
        "status",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    let list = |url: String, token: Option<&str>| -> Value {
        let mut req = os.http.get(url);
        if let Some(t) = token {
            req = req.header("X-Auth-Token", t);
        }
        req.send().expect("GET").json().expect("JSON")
    };
    let their_page = list(format!("{glance}/v2/images?limit=1"), None);
    let our_page = list(api.server.url("/v2/images?limit=1"), Some(&api.alice));
    assert_eq!(key_set(&our_page), key_set(&their_page), "a page");
    assert_eq!(our_page["first"], their_page["first"]);
    let their_doc = list(format!("{glance}/versions"), None);
    let our_doc = list(api.server.url("/versions"), None);
    let shape = |doc: &Value, base: &str| doc.to_string().replace(base, "BASE");
    assert_eq!(
        shape(&our_doc, &api.server.base),
        shape(&their_doc, &glance)
    );
}

#[test]
fn properties_travel_from_a_glance_region_into_a_directory_region_and_back() {
    const TENANT_DIR: &str = "3c4d5e6f708192a3b4c5d6e7f8091a2b";
    let os = common::openstack::OpenStack::start(1, false);
    let glance = os.glance_url(0);
    let lab = Lab::new();
    lab.ok(&["region", "add", "g0", "--glance-url", &glance]);
    lab.ok(&["region", "add", "d"]);
    lab.ok(&["tenant", "add", TENANT_A, "--region", "g0"]);
    lab.ok(&["tenant", "add", TENANT_DIR, "--region", "d"]);
    lab.ok(&[
        "user", "add", "alice", "--tenant", TENANT_A, "--tenant", TENANT_DIR,
    ]);
    let token_a = lab.token("alice", TENANT_A);
    let token_dir = lab.token("alice", TENANT_DIR);
    let server = lab.serve_with(&[]);
    let fields =
        json!({"hw_disk_bus": "scsi", "os_distro": "cirros", "trait:CUSTOM_X": "required"});
    let mut body = json!({"name": "from glance", "disk_format": "raw", "container_format": "bare",
                          "owner": TENANT_A, "tags": ["t1"], "min_ram": 256, "min_disk": 1});
    for (k, v) in fields.as_object().expect("object") {
        body[k] = v.clone();
    }
    let created: Value = os
        .http
        .post(format!("{glance}/v2/images"))
        .json(&body)
        .send()
        .expect("Glance POST")
        .json()
        .expect("JSON");
    let source = id_of(&created);
    let data = random_bytes(1 << 20, 13);
    let resp = os
        .http
        .put(format!("{glance}/v2/images/{source}/file"))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .expect("Glance PUT");
    assert_eq!(resp.status(), 204);

    let carried = |record: &Value| {
        for (k, v) in fields.as_object().expect("object") {
            assert_eq!(&record[k], v, "{k} in {record}");
        }
        assert_eq!(record["tags"], json!(["t1"]));
        assert_eq!(record["min_ram"], 256);
        assert_eq!(record["min_disk"], 1);
    };
    let job = server.copy_ok(&token_a, &source, TENANT_DIR);
    let done = server.wait_job(&token_a, &job, Duration::from_secs(60), common::terminal);
    assert_eq!(done["status"], "replicated", "{done}");
    assert_eq!(done["source_image_name"], "from glance");
    let copy = done["destination_image_id"]
        .as_str()
        .expect("destination")
        .to_string();
    let resp = server.get(&format!("/v2/images/{copy}"), Some(&token_dir));
    assert_eq!(resp.status(), 200);
    let record: Value = resp.json().expect("JSON");
    carried(&record);
    assert_eq!(record["owner"], TENANT_DIR);

    // And back into Glance: the create carries them.
    let job = server.copy_ok(&token_dir, &copy, TENANT_A);
    let done = server.wait_job(&token_dir, &job, Duration::from_secs(60), common::terminal);
    assert_eq!(done["status"], "replicated", "{done}");
    let back = done["destination_image_id"].as_str().expect("destination");
    let record = os.image(0, None, back).expect("the copy in Glance");
    carried(&record);
    assert_eq!(record["status"], "active");
}
