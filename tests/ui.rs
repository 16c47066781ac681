//! The web page (`/ui`) in a real headless Chromium, driven through WebDriver: sign-in by
//! form and by fragment, the token's jobs and nobody else's, live progress to `replicated`,
//! Cancel, a failed job's message, store strings as text, the 401 sentence, a phone's width;
//! and the page's security headers over plain HTTP.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::time::Duration;

use browser::{Browser, Element};
use common::*;
use serde_json::{json, Value};

const MIB: usize = 1024 * 1024;
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";
const WAIT: Duration = Duration::from_secs(20);
const ENTER: &str = "\u{E007}";
const TAB: &str = "\u{E004}";
const XSS: &str = "<img src=x onerror=alert(1)>";

/// A job in the list format, for `job seed`.
fn seeded(id: &str, status: &str, tenant: &str, region: &str, name: &str) -> Value {
    json!({
        "copy_progress": match status { "replicated" => 100, "replicate_requested" => 0, _ => 40 },
        "destination_image_id": if status == "replicated" {
            json!("e3b0c442-98fc-4c14-9afb-f4c8996fb924")
        } else {
            Value::Null
        },
        "destination_region_id": "ot2",
        "destination_tenant_id": TENANT_B,
        "job_id": id,
        "source_image_id": "9b805919-8acb-4880-8904-cd2f9a32c1ad",
        "source_image_name": name,
        "source_region_id": region,
        "source_tenant_id": tenant,
        "status": status,
    })
}

const JOB_A1: &str = "0fa2817d-4e54-455d-a676-c78e863297e9";
const JOB_A2: &str = "adcdc7cc-1f0d-4f97-8ef4-c90fc6977938";
const JOB_B1: &str = "4dc8acbb-7ddd-4ef9-98e6-9c12d5003381";

/// The standard fixture (no worker) with two jobs of tenant A and one of tenant B.
fn fixture_with_jobs() -> Fixture {
    let f = Fixture::new();
    f.lab.seed_jobs(&[
        seeded(JOB_A1, "replicated", TENANT_A, "ot1", "Test-image-Ubuntu"),
        seeded(
            JOB_A2,
            "replicate_requested",
            TENANT_A,
            "ot1",
            "Test-image-CentOS",
        ),
        seeded(JOB_B1, "replicating", TENANT_B, "ot2", "beta-image"),
    ]);
    f
}

/// The job ids the page's table shows, in its order.
fn shown_jobs(browser: &Browser) -> Vec<String> {
    browser.texts_at("#job-rows tr td.id code")
}

/// The table row of a job.
fn row(browser: &Browser, id: &str) -> Element {
    browser.one(&format!("#job-rows tr[data-job-id='{id}']"))
}

fn row_part(browser: &Browser, id: &str, css: &str) -> Element {
    browser.one(&format!("#job-rows tr[data-job-id='{id}'] {css}"))
}

/// The text of part of a job's row, or empty.
fn row_text(browser: &Browser, id: &str, css: &str) -> String {
    browser
        .text_at(&format!("#job-rows tr[data-job-id='{id}'] {css}"))
        .unwrap_or_default()
}

/// Whether part of a job's row is there and shown.
fn row_shows(browser: &Browser, id: &str, css: &str) -> bool {
    browser
        .script(
            "const e = document.querySelector(arguments[0]); return !!e && e.checkVisibility();",
            json!([format!("#job-rows tr[data-job-id='{id}'] {css}")]),
        )
        .as_bool()
        .unwrap_or(false)
}

fn status_of(browser: &Browser, id: &str) -> String {
    row_text(browser, id, ".status")
}

/// The value of a job's `<progress>` element.
fn progress_of(browser: &Browser, id: &str) -> f64 {
    browser
        .script(
            "const p = document.querySelector(`#job-rows tr[data-job-id='${arguments[0]}'] progress`);\
             return p ? p.value : null;",
            json!([id]),
        )
        .as_f64()
        .unwrap_or(-1.0)
}

/// Waits until the table shows exactly `want` (in any order).
fn wait_for_jobs(browser: &Browser, want: &[&str]) -> Vec<String> {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    browser.wait(&format!("the jobs {want:?}"), WAIT, |b| {
        let mut shown = shown_jobs(b);
        shown.sort();
        (shown == want).then_some(shown)
    })
}

/// Signs in by the form, with the keyboard only: type the token, Tab to the button (its focus
/// must be visible), Enter.
fn sign_in_by_keyboard(browser: &Browser, server: &Server, token: &str) {
    browser.goto(&server.url("/ui"));
    let input = browser.wait("the sign-in form", WAIT, |b| {
        let input = b.one("#token");
        b.script(
            "return !document.getElementById('sign-in').hidden;",
            json!([]),
        )
        .as_bool()
        .unwrap_or(false)
        .then_some(input)
    });
    browser.type_into(&input, token);
    browser.press(TAB);
    let focused = browser.script(
        "const e = document.activeElement; const s = getComputedStyle(e);\
         return [e.tagName, e.type, e.textContent, s.outlineStyle, s.outlineWidth];",
        json!([]),
    );
    assert_eq!(focused[0], "BUTTON", "{focused}");
    assert_eq!(focused[1], "submit");
    assert_eq!(focused[2], "Sign in");
    assert_eq!(
        focused[3], "solid",
        "the focused button shows its focus: {focused}"
    );
    assert_ne!(focused[4], "0px");
    browser.press(ENTER);
}

/// The sentence under the sign-in form, once there is one.
fn sign_in_error(browser: &Browser) -> String {
    browser.wait("a sentence under the sign-in form", WAIT, |b| {
        b.text_at("#sign-in-error").filter(|text| !text.is_empty())
    })
}

fn browser() -> Browser {
    Browser::start()
}

// ----- the headers, over plain HTTP -----

#[test]
fn ui_page_and_assets_carry_the_security_headers() {
    let lab = Lab::new();
    let server = lab.serve();
    for (path, content_type) in [
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/ui.css", "text/css; charset=utf-8"),
        ("/ui/ui.js", "text/javascript; charset=utf-8"),
        ("/ui/icon.svg", "image/svg+xml"),
    ] {
        let resp = server.get(path, None);
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers().clone();
        assert_eq!(h["content-type"], content_type, "{path}");
        assert_eq!(h["content-security-policy"], CSP, "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(h["cache-control"], "no-cache", "{path}");
        assert!(h.get("set-cookie").is_none(), "{path}");
        let etag = h["etag"].to_str().expect("etag").to_string();
        let again = server
            .client
            .get(server.url(path))
            .header("If-None-Match", &etag)
            .send()
            .expect("GET");
        assert_eq!(again.status(), 304, "{path}");
        assert_eq!(again.headers()["etag"], etag.as_str());
        assert_eq!(again.headers()["content-security-policy"], CSP);
        assert!(!resp.text().expect("body").is_empty());
    }
    let policy = CSP.to_lowercase();
    assert!(!policy.contains("unsafe") && !policy.contains("http") && !policy.contains('*'));
    // Only the page's own files exist under /ui/.
    assert_error(server.get("/ui/other.js", None), 404);
    assert_error(server.get("/ui/", None), 404);
    // The page's HTML holds no tenant data and needs no token.
    let page = server.get("/ui", None).text().expect("page");
    assert!(page.contains("<script src=\"/ui/ui.js\" defer></script>"));
    assert!(!page.contains(TENANT_A));
}

// ----- sign-in and scoping -----

#[test]
fn a_tenant_signs_in_by_keyboard_and_sees_only_its_own_jobs() {
    let f = fixture_with_jobs();
    let browser = browser();
    sign_in_by_keyboard(&browser, &f.server, &f.alice);
    let shown = wait_for_jobs(&browser, &[JOB_A1, JOB_A2]);
    assert!(!shown.contains(&JOB_B1.to_string()));
    // Full ids, the reference's statuses, progress as <progress>.
    assert_eq!(status_of(&browser, JOB_A1), "replicated");
    assert_eq!(status_of(&browser, JOB_A2), "replicate_requested");
    assert_eq!(progress_of(&browser, JOB_A1), 100.0);
    assert_eq!(progress_of(&browser, JOB_A2), 0.0);
    assert!(browser
        .text(&row(&browser, JOB_A2))
        .contains("Test-image-CentOS"));
    // Cancel only where the API allows it, and it is a button.
    assert!(row_shows(&browser, JOB_A2, "button.cancel"));
    assert_eq!(row_text(&browser, JOB_A2, "button.cancel"), "Cancel");
    assert!(
        !row_shows(&browser, JOB_A1, "button.cancel"),
        "a replicated job has no Cancel"
    );
    // The token is in sessionStorage only: no cookie, nothing in the address.
    let kept = browser.script(
        "return [sessionStorage.getItem('token'), document.cookie, location.href];",
        json!([]),
    );
    assert_eq!(kept[0], f.alice.as_str());
    assert_eq!(kept[1], "");
    assert_eq!(kept[2], f.server.url("/ui"));
}

#[test]
fn an_admin_signs_in_by_fragment_sees_every_tenants_jobs_and_the_fragment_goes() {
    let f = fixture_with_jobs();
    let browser = browser();
    browser.goto(&f.server.url(&format!("/ui#token={}", f.root)));
    wait_for_jobs(&browser, &[JOB_A1, JOB_A2, JOB_B1]);
    let href = browser.script("return [location.href, history.length];", json!([]));
    assert_eq!(
        href[0],
        f.server.url("/ui"),
        "the token left the address bar"
    );
    assert!(!href[0].as_str().unwrap().contains(&f.root));
    assert_eq!(status_of(&browser, JOB_B1), "replicating");
    // Every bar has its value, 0 % included: none is an indeterminate (animated) bar.
    let bars = browser.script(
        "return [...document.querySelectorAll('#job-rows progress')]\
         .map((p) => p.matches(':indeterminate') ? null : p.value);",
        json!([]),
    );
    assert_eq!(bars, json!([40, 0, 100]), "{bars}");
    // A reload keeps the session (sessionStorage), a sign-out ends it.
    browser.goto(&f.server.url("/ui"));
    wait_for_jobs(&browser, &[JOB_A1, JOB_A2, JOB_B1]);
    browser.click(&browser.one("#sign-out"));
    browser.wait("the sign-in form", WAIT, |b| {
        b.script(
            "return !document.getElementById('sign-in').hidden && \
             sessionStorage.getItem('token') === null && \
             document.querySelectorAll('#job-rows tr').length === 0;",
            json!([]),
        )
        .as_bool()
        .filter(|shown| *shown)
    });
    // bob's token, after the admin's, sees only B's job.
    browser.goto(&f.server.url(&format!("/ui#token={}", f.bob)));
    wait_for_jobs(&browser, &[JOB_B1]);
}

#[test]
fn a_wrong_token_shows_the_reference_401_sentence() {
    let f = fixture_with_jobs();
    let browser = browser();
    sign_in_by_keyboard(&browser, &f.server, "not-a-token");
    assert_eq!(sign_in_error(&browser), "Authentication required.");
    assert!(shown_jobs(&browser).is_empty());
    assert!(browser
        .script("return sessionStorage.getItem('token');", json!([]))
        .is_null());
    // By fragment too.
    browser.goto(&f.server.url("/ui#token=wrong"));
    browser.goto(&f.server.url("/ui#token=also-wrong"));
    assert_eq!(sign_in_error(&browser), "Authentication required.");
    let href = browser.script("return location.href;", json!([]));
    assert_eq!(href, f.server.url("/ui").as_str());
}

#[test]
fn the_status_filter_shows_only_jobs_of_that_status() {
    let f = fixture_with_jobs();
    let browser = browser();
    browser.goto(&f.server.url(&format!("/ui#token={}", f.root)));
    wait_for_jobs(&browser, &[JOB_A1, JOB_A2, JOB_B1]);
    browser.click(&browser.one("#filter"));
    browser.click(&browser.one("#filter option[value='replicating']"));
    wait_for_jobs(&browser, &[JOB_B1]);
    browser.click(&browser.one("#filter option[value='replicated']"));
    wait_for_jobs(&browser, &[JOB_A1]);
    browser.click(&browser.one("#filter option[value='']"));
    wait_for_jobs(&browser, &[JOB_A1, JOB_A2, JOB_B1]);
}

// ----- live progress, cancel, failure -----

#[test]
fn a_copys_progress_bar_moves_to_100_and_its_status_becomes_replicated() {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "slow-image", 6 * MIB);
    // 6 MiB at 1 MiB/s: about six seconds of progress for the page to show.
    let server = lab.serve_with(&["--max-bandwidth", "1M"]);
    let browser = browser();
    browser.goto(&server.url(&format!("/ui#token={token}")));
    browser.wait("the empty list", WAIT, |b| {
        b.script(
            "return !document.getElementById('no-jobs').hidden;",
            json!([]),
        )
        .as_bool()
        .filter(|shown| *shown)
    });
    let id = server.copy_ok(&token, &image, TENANT_B);
    let mut seen = Vec::new();
    let mut rates = Vec::new();
    browser.wait(
        "the copy to be replicated on the page",
        Duration::from_secs(60),
        |b| {
            let value = progress_of(b, &id);
            if value >= 0.0 && seen.last() != Some(&value) {
                seen.push(value);
            }
            if b.all(&format!("#job-rows tr[data-job-id='{id}']"))
                .is_empty()
            {
                return None;
            }
            let rate = row_text(b, &id, "td[data-label='Rate']");
            if rate.ends_with("/s") {
                rates.push(rate);
            }
            (status_of(b, &id) == "replicated" && value == 100.0).then_some(())
        },
    );
    let between: Vec<&f64> = seen.iter().filter(|v| **v > 0.0 && **v < 100.0).collect();
    assert!(
        between.len() >= 2,
        "the bar showed values between 0 and 100 as the copy went: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(!rates.is_empty(), "a rate was shown while it copied");
    assert!(
        !row_shows(&browser, &id, "button.cancel"),
        "no Cancel once replicated"
    );
    assert_eq!(server.job(&token, &id)["status"], "replicated");
}

#[test]
fn the_cancel_button_cancels_a_copy_and_the_page_shows_canceled() {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "long-image", 16 * MIB);
    // 16 MiB at 512 KiB/s: half a minute, far longer than the cancel takes.
    let server = lab.serve_with(&["--max-bandwidth", "512K"]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    server.wait_job(&token, &id, WAIT, status_is("replicating"));
    let browser = browser();
    browser.goto(&server.url(&format!("/ui#token={token}")));
    wait_for_jobs(&browser, &[&id]);
    let cancel = browser.wait("the Cancel button", WAIT, |b| {
        let button = row_part(b, &id, "button.cancel");
        (b.text(&button) == "Cancel").then_some(button)
    });
    browser.click(&cancel);
    browser.wait("the status canceled", Duration::from_secs(30), |b| {
        (status_of(b, &id) == "canceled").then_some(())
    });
    assert_eq!(server.job(&token, &id)["status"], "canceled");
    assert!(
        !row_shows(&browser, &id, "button.cancel"),
        "no Cancel once canceled"
    );
    assert!(browser.alert_text().is_none());
}

#[test]
fn a_failed_jobs_message_and_times_are_shown() {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, "doomed-image", MIB);
    std::fs::remove_file(lab.region_dir("ot1").join(&image)).expect("remove source");
    let server = lab.serve_with(&[]);
    let id = server.copy_ok(&token, &image, TENANT_B);
    server.wait_job(&token, &id, WAIT, terminal);
    let reason = lab.ok_json(&["job", "show", &id])["error"]
        .as_str()
        .expect("reason")
        .to_string();
    assert!(reason.contains("is missing"), "{reason}");
    let browser = browser();
    browser.goto(&server.url(&format!("/ui#token={token}")));
    wait_for_jobs(&browser, &[&id]);
    assert_eq!(status_of(&browser, &id), "error");
    // The message in the list …
    let in_row = browser.wait("the message in the row", WAIT, |b| {
        let text = row_text(b, &id, ".job-error");
        (!text.is_empty()).then_some(text)
    });
    // The tenant's page names what failed, not where the appliance keeps its files.
    let (what, _) = reason
        .split_once(" (/")
        .expect("a path in the operator's reason");
    let shown = format!("{what} (<path on the appliance>)");
    assert_eq!(in_row, shown);
    // … and in the job's detail, with its times.
    browser.click(&row_part(&browser, &id, "button.details"));
    let detail = browser.wait("the detail", WAIT, |b| {
        let text = b.text(&b.one("#detail"));
        text.contains("Finished").then_some(text)
    });
    assert_eq!(browser.text(&browser.one("#detail-id")), id);
    assert_eq!(browser.text(&browser.one("#detail-message")), shown);
    for label in ["Created", "Started", "Finished", "Retries"] {
        assert!(detail.contains(label), "{label} in {detail}");
    }
    let times = browser.script(
        "return Array.from(document.querySelectorAll('#detail-list dt'))\
           .filter(dt => ['Created', 'Started', 'Finished'].includes(dt.textContent))\
           .map(dt => dt.nextElementSibling.textContent);",
        json!([]),
    );
    let times: Vec<&str> = times
        .as_array()
        .expect("times")
        .iter()
        .map(|t| t.as_str().expect("text"))
        .collect();
    assert_eq!(times.len(), 3, "{detail}");
    for time in times {
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time} is RFC 3339");
    }
}

// ----- images and the copy form -----

#[test]
fn the_tenants_images_are_listed_and_the_copy_form_starts_a_copy() {
    let (lab, token) = Lab::standard_with_copier();
    let mine = lab.image(TENANT_A, "alpha-image", 3000);
    let theirs = lab.image(TENANT_B, "beta-image", 2000);
    let server = lab.serve();
    let browser = browser();
    browser.goto(&server.url(&format!("/ui#token={token}")));
    let images = browser.wait("the image list", WAIT, |b| {
        let ids = b.texts_at("#image-rows tr td.id code");
        (!ids.is_empty()).then_some(ids)
    });
    assert_eq!(
        images,
        vec![mine.clone()],
        "the tenant's image, not another's"
    );
    let name = browser.text_at(&format!("#image-rows tr[data-image-id='{mine}'] td.name"));
    assert_eq!(name.as_deref(), Some("alpha-image"));
    // "Copy…" chooses the image and moves the focus to the tenant field.
    browser.click(&browser.one(&format!("#image-rows tr[data-image-id='{mine}'] button")));
    let focus = browser.script(
        "return [document.activeElement.id, document.getElementById('copy-image').value];",
        json!([]),
    );
    assert_eq!(focus, json!(["copy-tenant", mine]));
    browser.type_into(&browser.one("#copy-tenant"), &format!("{TENANT_B}{ENTER}"));
    let said = browser.wait("the copy's answer", WAIT, |b| {
        b.text_at("#copy-result")
            .filter(|t| t.starts_with("Copy started"))
    });
    let listed = job_ids(&jobs(server.get(JOBS, Some(&token))));
    assert_eq!(listed.len(), 1);
    assert_eq!(said, format!("Copy started: job {}.", listed[0]));
    wait_for_jobs(&browser, &[&listed[0]]);
    assert_eq!(status_of(&browser, &listed[0]), "replicate_requested");
    let job = server.job(&token, &listed[0]);
    assert_eq!(job["source_image_id"], mine.as_str());
    assert_eq!(job["destination_tenant_id"], TENANT_B);
    // A refused copy says the server's sentence.
    browser.type_into(&browser.one("#copy-tenant"), "\u{E009}a\u{E000}\u{E003}");
    browser.type_into(
        &browser.one("#copy-tenant"),
        &format!("not-a-tenant{ENTER}"),
    );
    let refused = browser.wait("the refusal", WAIT, |b| {
        b.text_at("#copy-result")
            .filter(|t| !t.is_empty() && !t.starts_with("Copy started") && !t.starts_with("Asking"))
    });
    let direct = assert_error(server.copy(&token, &mine, "not-a-tenant"), 400);
    assert_eq!(refused, direct);
    assert!(!images.contains(&theirs));
}

// ----- untrusted text -----

#[test]
fn store_strings_are_shown_as_text_not_markup() {
    let (lab, token) = Lab::standard_with_copier();
    let image = lab.image(TENANT_A, XSS, 4096);
    let server = lab.serve();
    let id = server.copy_ok(&token, &image, TENANT_B);
    let browser = browser();
    browser.goto(&server.url(&format!("/ui#token={token}")));
    wait_for_jobs(&browser, &[&id]);
    assert_eq!(row_text(&browser, &id, "td.name"), XSS);
    let image_name = browser.wait("the image list", WAIT, |b| {
        b.text_at(&format!("#image-rows tr[data-image-id='{image}'] td.name"))
    });
    assert_eq!(image_name, XSS);
    let page = browser.script(
        "return [document.querySelectorAll('img').length, \
                 document.querySelector('td.name').childElementCount];",
        json!([]),
    );
    assert_eq!(page, json!([0, 0]), "no element was made from the name");
    browser.click(&row_part(&browser, &id, "button.details"));
    browser.wait("the detail", WAIT, |b| {
        b.text(&b.one("#detail")).contains(XSS).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(browser.alert_text().is_none(), "no alert ran");
    assert_eq!(
        browser.script("return document.querySelectorAll('img').length;", json!([])),
        0
    );
}

// ----- layout -----

#[test]
fn the_page_fits_a_phone_and_a_wide_screen() {
    // What an operator would see: a copy under way, a failed one, finished ones, images.
    let (lab, token) = Lab::standard_with_copier();
    let root = lab.token("root", TENANT_A);
    let running = lab.image(TENANT_A, "ubuntu-24.04-server", 48 * MIB);
    let doomed = lab.image(TENANT_A, "centos-stream-9", MIB);
    lab.image(TENANT_A, "debian-12-genericcloud", 2 * MIB);
    std::fs::remove_file(lab.region_dir("ot1").join(&doomed)).expect("remove source");
    lab.seed_jobs(&[
        seeded(JOB_A1, "replicated", TENANT_A, "ot1", "Test-image-Ubuntu"),
        seeded(JOB_B1, "canceled", TENANT_B, "ot2", "beta-image"),
    ]);
    let server = lab.serve_with(&["--max-bandwidth", "2M"]);
    let failed = server.copy_ok(&token, &doomed, TENANT_B);
    server.wait_job(&token, &failed, WAIT, terminal);
    let copying = server.copy_ok(&token, &running, TENANT_B);
    let browser = browser();
    browser.goto(&server.url(&format!("/ui#token={root}")));
    let ids = [JOB_A1, JOB_B1, failed.as_str(), copying.as_str()];
    wait_for_jobs(&browser, &ids);
    browser.wait("the copy's rate and the failure's message", WAIT, |b| {
        let rate = row_text(b, &copying, "td[data-label='Rate']");
        let message = row_text(b, &failed, ".job-error");
        let images = b.texts_at("#image-rows tr").len();
        (rate.ends_with("/s") && !message.is_empty() && images >= 3).then_some(())
    });
    for (width, name) in [(1280, "ui-1280.png"), (390, "ui-phone.png")] {
        browser.resize(width, 900);
        let fits = browser.wait(&format!("the layout at {width} px"), WAIT, |b| {
            let v = b.script(
                "let wide = document.documentElement.scrollWidth;\
                 for (const s of document.querySelectorAll('.scroll')) {\
                   if (s.checkVisibility())\
                     wide = Math.max(wide, window.innerWidth - s.clientWidth + s.scrollWidth);\
                 }\
                 return [wide, window.innerWidth];",
                json!([]),
            );
            let (scroll, inner) = (v[0].as_u64()?, v[1].as_u64()?);
            (inner > 0 && inner <= width as u64).then_some((scroll, inner))
        });
        let png = browser.screenshot();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        if let Some(dir) = std::env::var_os("UI_SCREENSHOT_DIR") {
            std::fs::write(std::path::Path::new(&dir).join(name), &png).expect("screenshot");
        }
        assert!(
            fits.0 <= fits.1,
            "no sideways scrolling at {width} px: {fits:?}"
        );
        // Each full job id is on the page, whole.
        for id in ids {
            assert_eq!(row_text(&browser, id, "td.id code"), id);
        }
    }
}

/// The route the page waits on between rounds: it answers at once without `after`, as soon as
/// the caller's own job list changes, and at its timeout with the same tag otherwise (another
/// tenant's copy does not wake it); what it does not take is a 400, no token the 401.
#[test]
fn the_changes_route_answers_when_the_callers_job_list_changes() {
    const CHANGES: &str = "/v2/extension/image_replicator/changes";
    let (lab, alice) = Lab::standard_with_copier();
    let bob = lab.token("bob", TENANT_B);
    let image = lab.image(TENANT_A, "changing", MIB);
    let server = lab.serve();
    let tag_of = |resp: reqwest::blocking::Response| -> String {
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().expect("JSON");
        body["tag"].as_str().expect("a tag").to_string()
    };
    let wait = |token: &str, after: &str, timeout: u64| {
        let started = std::time::Instant::now();
        let path = format!("{CHANGES}?after={after}&timeout={timeout}");
        (tag_of(server.get(&path, Some(token))), started.elapsed())
    };
    let started = std::time::Instant::now();
    let a0 = tag_of(server.get(CHANGES, Some(&alice)));
    let b0 = tag_of(server.get(CHANGES, Some(&bob)));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a0.len(), 16, "{a0}");
    let (same, took) = wait(&alice, &a0, 1);
    assert_eq!(same, a0);
    assert!(took >= Duration::from_secs(1), "{took:?}");

    let (a, b, id) = std::thread::scope(|s| {
        let a = s.spawn(|| wait(&alice, &a0, 20));
        // Longer than the 10 s a keep-alive connection may idle between requests: a waiting
        // request is not idle.
        let b = s.spawn(|| wait(&bob, &b0, 12));
        std::thread::sleep(Duration::from_millis(500));
        let id = server.copy_ok(&alice, &image, TENANT_B);
        (a.join().expect("A"), b.join().expect("B"), id)
    });
    assert_ne!(a.0, a0, "A's list changed");
    assert!(a.1 < Duration::from_secs(10), "A waited {:?}", a.1);
    assert_eq!(b.0, b0, "B's list did not change");
    assert!(b.1 >= Duration::from_secs(12), "B waited {:?}", b.1);
    assert_eq!(server.job(&alice, &id)["status"], "replicate_requested");

    for (query, says) in [
        ("?after=xyz", "16 hex digits"),
        ("?timeout=61", "0 to 60"),
        ("?timeout=-1", "0 to 60"),
        ("?since=1", "Unknown query parameter"),
        ("?timeout=1&timeout=2", "given twice"),
    ] {
        let sentence = assert_error(server.get(&format!("{CHANGES}{query}"), Some(&alice)), 400);
        assert!(sentence.contains(says), "{query}: {sentence}");
    }
    assert_401(server.get(CHANGES, None));
}
