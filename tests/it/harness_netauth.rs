//! Self-tests of the auth / TLS / proxy harness (token issuer, htpasswd and TLS registries,
//! tinyproxy, fake credential helpers, throttling proxy), using plain HTTP clients (ureq,
//! curl) rather than fastpull, so a harness bug is told apart from a product bug.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::cli::seeded;
use crate::support::credhelper::CredHelper;
use crate::support::htpasswd::{htpasswd_registry, REALM};
use crate::support::registry::RegistryOptions;
use crate::support::throttle::ThrottleProxy;
use crate::support::tinyproxy::Tinyproxy;
use crate::support::token::*;
use crate::support::*;

const REPO: &str = "team/app";

fn small_image(seed: u64) -> Image {
    ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(seed, 2, 4096))
        .build()
}

/// GET `url` with optional `Authorization`; returns (status, WWW-Authenticate, body).
fn get(url: &str, auth: Option<&str>) -> (u16, Option<String>, Vec<u8>) {
    let mut req = http_agent()
        .get(url)
        .header("Accept", "application/vnd.oci.image.manifest.v1+json");
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let mut resp = req.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("WWW-Authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.body_mut().read_to_vec().unwrap_or_default();
    (status, challenge, body)
}

/// Asks the issuer's endpoint like a client would; returns (status, JSON reply).
fn token_get(
    issuer: &TokenIssuer,
    query: &str,
    basic: Option<(&str, &str)>,
) -> (u16, serde_json::Value) {
    let url = format!("{}?{query}", issuer.realm());
    let mut req = http_agent().get(&url);
    if let Some((u, p)) = basic {
        req = req.header("Authorization", format!("Basic {}", basic_auth_value(u, p)));
    }
    let mut resp = req.call().expect("token GET");
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_vec().unwrap_or_default();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn pull_scope(repo: &str) -> String {
    format!("service={SERVICE}&scope=repository:{repo}:pull")
}

#[test]
fn token_registry_accepts_issuer_tokens_and_challenges_without() {
    let image = small_image(1);
    let issuer = TokenIssuer::start(IssuerOptions::default());
    let reg = token_registry(&issuer, seeded(&[(REPO, "v1", &image)]), "");
    let url = format!("{}/v2/{REPO}/manifests/v1", reg.url());

    let (status, challenge, _) = get(&url, None);
    assert_eq!(status, 401, "{}", reg.log());
    let challenge = challenge.expect("WWW-Authenticate on 401");
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    let params = challenge_params(&challenge);
    assert_eq!(params.get("realm"), Some(&issuer.realm()), "{challenge}");
    assert_eq!(params.get("service").map(String::as_str), Some(SERVICE));
    assert_eq!(
        params.get("scope").map(String::as_str),
        Some(format!("repository:{REPO}:pull").as_str())
    );

    let (status, reply) = token_get(&issuer, &pull_scope(REPO), None);
    assert_eq!(status, 200, "{reply}");
    let token = reply["token"].as_str().expect("token field").to_string();
    assert_eq!(reply["expires_in"], 300);
    assert!(reply["issued_at"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    let (status, _, body) = get(&url, Some(&format!("Bearer {token}")));
    assert_eq!(status, 200, "registry refused our token:\n{}", reg.log());
    assert_eq!(body, image.manifest);

    let reqs = issuer.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].auth, TokenAuth::Anonymous);
    assert_eq!(reqs[0].scopes, vec![format!("repository:{REPO}:pull")]);
    assert_eq!(reqs[0].service.as_deref(), Some(SERVICE));

    // A token for another repository, or signed by another issuer's key, is refused.
    let other = issuer.mint("x", &[("other/repo", &["pull"])], Duration::from_secs(60));
    assert_eq!(get(&url, Some(&format!("Bearer {other}"))).0, 401);
    let stranger = TokenIssuer::start(IssuerOptions::default());
    let forged = stranger.mint("x", &[(REPO, &["pull"])], Duration::from_secs(60));
    assert_eq!(get(&url, Some(&format!("Bearer {forged}"))).0, 401);
}

/// The registry takes a token for the lifetime asked for and refuses it after (the issuer
/// compensates the registry's 60 s leeway; `exp` has whole seconds, so "after" is within
/// 3 s). Each check holds at any speed: a refusal *received* before 2 s is early for sure,
/// an acceptance of a request *sent* after 3 s is late for sure; the registry is polled
/// until it refuses. Red with the leeway compensation removed (taken 3 s after).
#[test]
fn token_lifetime_is_enforced_by_the_registry() {
    let image = small_image(2);
    let issuer = TokenIssuer::start(IssuerOptions::default());
    let reg = token_registry(&issuer, seeded(&[(REPO, "v1", &image)]), "");
    let url = format!("{}/v2/{REPO}/blobs/{}", reg.url(), image.config.digest);
    let long = issuer.mint("x", &[(REPO, &["pull"])], Duration::from_secs(60));
    assert_eq!(
        get(&url, Some(&format!("Bearer {long}"))).0,
        200,
        "{}",
        reg.log()
    );

    let before = Instant::now();
    let token = issuer.mint("x", &[(REPO, &["pull"])], Duration::from_secs(2));
    let minted = Instant::now();
    let auth = format!("Bearer {token}");
    let challenge = loop {
        let sent = Instant::now();
        let (status, challenge, _) = get(&url, Some(&auth));
        match status {
            200 => assert!(
                sent < minted + Duration::from_secs(3),
                "a 2 s token taken {:?} after it was made",
                sent - minted
            ),
            401 => {
                assert!(
                    before.elapsed() >= Duration::from_secs(2),
                    "a 2 s token refused after {:?}",
                    before.elapsed()
                );
                break challenge.unwrap_or_default();
            }
            other => panic!("{other}\n{}", reg.log()),
        }
        assert!(
            minted.elapsed() < Duration::from_secs(30),
            "a 2 s token still taken after 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(challenge.contains("invalid_token"), "{challenge}");
}

#[test]
fn issuer_checks_credentials_and_shapes_replies() {
    let issuer = TokenIssuer::start(
        IssuerOptions::private("alice", "s3cret")
            .refresh_token("idtok-123")
            .field(TokenField::AccessToken)
            .expiry(None, Duration::from_secs(60)),
    );
    // Anonymous and wrong passwords are refused.
    assert_eq!(token_get(&issuer, &pull_scope(REPO), None).0, 401);
    assert_eq!(
        token_get(&issuer, &pull_scope(REPO), Some(("alice", "wrong"))).0,
        401
    );
    let (status, reply) = token_get(&issuer, &pull_scope(REPO), Some(("alice", "s3cret")));
    assert_eq!(status, 200);
    assert!(reply["access_token"].is_string() && reply.get("token").is_none());
    assert!(reply.get("expires_in").is_none(), "{reply}");

    // Identity tokens: POST refresh_token grant.
    let post = |refresh: &str| {
        let url = issuer.realm();
        let mut resp = http_agent()
            .post(&url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .send(format!(
                "grant_type=refresh_token&refresh_token={refresh}&service={SERVICE}&scope=repository%3A{}%3Apull&client_id=fastpull",
                REPO.replace('/', "%2F")
            ))
            .expect("token POST");
        let status = resp.status().as_u16();
        let _ = resp.body_mut().read_to_vec();
        status
    };
    assert_eq!(post("idtok-123"), 200);
    assert_eq!(post("idtok-wrong"), 401);
    let reqs = issuer.requests();
    let last = reqs.last().unwrap();
    assert_eq!(last.auth, TokenAuth::RefreshToken { ok: false });
    assert_eq!(last.grant_type.as_deref(), Some("refresh_token"));
    assert_eq!(last.client_id.as_deref(), Some("fastpull"));
    assert_eq!(last.scopes, vec![format!("repository:{REPO}:pull")]);
    assert_eq!(issuer.issued_tokens().len(), 2);
}

#[test]
fn empty_access_tokens_are_refused_by_the_registry() {
    let image = small_image(3);
    let issuer = TokenIssuer::start(IssuerOptions {
        anonymous: Anonymous::EmptyAccess,
        ..IssuerOptions::default()
    });
    let reg = token_registry(&issuer, seeded(&[(REPO, "v1", &image)]), "");
    let (status, reply) = token_get(&issuer, &pull_scope(REPO), None);
    assert_eq!(status, 200);
    let token = reply["token"].as_str().unwrap();
    let url = format!("{}/v2/{REPO}/manifests/v1", reg.url());
    let (status, challenge, _) = get(&url, Some(&format!("Bearer {token}")));
    assert_eq!(status, 401);
    assert!(challenge.unwrap_or_default().contains("insufficient_scope"));
}

#[test]
fn htpasswd_registry_checks_basic_auth_over_http_and_https() {
    let image = small_image(4);
    let reg = htpasswd_registry(&[("bob", "hunter2")], seeded(&[(REPO, "v1", &image)]), None);
    let url = format!("{}/v2/{REPO}/manifests/v1", reg.url());
    let (status, challenge, _) = get(&url, None);
    assert_eq!(status, 401, "{}", reg.log());
    let challenge = challenge.expect("challenge");
    assert!(
        challenge.starts_with("Basic ") && challenge.contains(REALM),
        "{challenge}"
    );
    let ok = format!("Basic {}", basic_auth_value("bob", "hunter2"));
    let bad = format!("Basic {}", basic_auth_value("bob", "nope"));
    assert_eq!(get(&url, Some(&ok)).0, 200, "{}", reg.log());
    assert_eq!(get(&url, Some(&bad)).0, 401);

    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path(), &["127.0.0.1", "localhost"]);
    let reg = htpasswd_registry(
        &[("bob", "hunter2")],
        seeded(&[(REPO, "v1", &image)]),
        Some(&pki),
    );
    assert!(reg.url().starts_with("https://"));
    let url = format!("{}/v2/{REPO}/manifests/v1", reg.url());
    let out = curl(&["--cacert", path(&pki.ca_cert), "-u", "bob:hunter2", &url]);
    assert_eq!(out.0, "200", "{out:?}\n{}", reg.log());
    let out = curl(&["--cacert", path(&pki.ca_cert), "-u", "bob:nope", &url]);
    assert_eq!(out.0, "401", "{out:?}");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `curl -s -o /dev/null -w %{http_code} ARGS…` accepting OCI manifests: (status code
/// text, stderr).
fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "30",
        ])
        .args(["-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .expect("curl is required (scripts/deps installs it)");
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tls_registry_serves_with_the_ca_and_demands_client_certs_when_told() {
    let image = small_image(5);
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path(), &["127.0.0.1", "localhost"]);
    let reg = RegistryOptions::new()
        .tls(&pki.server_cert, &pki.server_key)
        .serve_storage_of(seeded(&[(REPO, "v1", &image)]))
        .start();
    let url = format!("{}/v2/{REPO}/manifests/v1", reg.url());
    assert!(url.starts_with("https://127.0.0.1:"));
    assert_eq!(curl(&["--cacert", path(&pki.ca_cert), &url]).0, "200");
    // Not trusted without the CA.
    let (code, err) = curl(&[&url]);
    assert_eq!(code, "000", "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    let reg = RegistryOptions::new()
        .tls(&pki.server_cert, &pki.server_key)
        .client_ca(&pki.ca_cert, &pki.client_cert, &pki.client_key)
        .serve_storage_of(seeded(&[(REPO, "v1", &image)]))
        .start();
    let url = format!("{}/v2/{REPO}/manifests/v1", reg.url());
    let with_cert = curl(&[
        "--cacert",
        path(&pki.ca_cert),
        "--cert",
        path(&pki.client_cert),
        "--key",
        path(&pki.client_key),
        &url,
    ]);
    assert_eq!(with_cert.0, "200", "{with_cert:?}\n{}", reg.log());
    let without = curl(&["--cacert", path(&pki.ca_cert), &url]);
    assert_ne!(
        without.0, "200",
        "client certificate not demanded: {without:?}"
    );
    // A client certificate of another CA is refused too.
    let other_dir = tempfile::tempdir().unwrap();
    let other = TestPki::create(other_dir.path(), &["127.0.0.1"]);
    let wrong = curl(&[
        "--cacert",
        path(&pki.ca_cert),
        "--cert",
        path(&other.client_cert),
        "--key",
        path(&other.client_key),
        &url,
    ]);
    assert_ne!(
        wrong.0, "200",
        "foreign client certificate accepted: {wrong:?}"
    );
}

#[test]
fn tinyproxy_forwards_and_logs_http_and_connect() {
    let image = small_image(6);
    let plain = seeded(&[(REPO, "v1", &image)]);
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path(), &["127.0.0.1"]);
    let tls = RegistryOptions::new()
        .tls(&pki.server_cert, &pki.server_key)
        .serve_storage_of(seeded(&[(REPO, "v1", &image)]))
        .start();
    let proxy = Tinyproxy::start();

    let plain_url = format!("{}/v2/{REPO}/manifests/v1", plain.url());
    let out = curl(&["-x", &proxy.url(), &plain_url]);
    assert_eq!(out.0, "200", "{out:?}\n{}", proxy.log());
    let tls_url = format!("{}/v2/{REPO}/manifests/v1", tls.url());
    let out = curl(&["--cacert", path(&pki.ca_cert), "-x", &proxy.url(), &tls_url]);
    assert_eq!(out.0, "200", "{out:?}\n{}", proxy.log());

    let reqs = proxy.requests();
    assert!(
        reqs.contains(&format!("GET {plain_url} HTTP/1.1")),
        "{reqs:?}"
    );
    assert!(
        reqs.contains(&format!("CONNECT {} HTTP/1.1", tls.addr())),
        "{reqs:?}"
    );
    assert_eq!(reqs.len(), 2, "{reqs:?}");
}

#[test]
fn credential_helper_answers_get_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let helper = CredHelper::install(dir.path(), "fake");
    helper.set("127.0.0.1:5000", "alice", "s3cret");
    let bin = dir.path().join("docker-credential-fake");
    let run = |server: &str| {
        let mut child = Command::new(&bin)
            .arg("get")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(server.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run("127.0.0.1:5000\n");
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["Username"], "alice");
    assert_eq!(json["Secret"], "s3cret");
    assert_eq!(json["ServerURL"], "127.0.0.1:5000");
    let out = run("127.0.0.1:5001");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("credentials not found"));
    assert_eq!(
        helper.calls(),
        vec![
            ("get".to_string(), "127.0.0.1:5000".to_string()),
            ("get".to_string(), "127.0.0.1:5001".to_string())
        ]
    );
}

#[test]
fn throttle_proxy_paces_bodies_and_logs_statuses() {
    let blob = Blob::new("", vec![7u8; 1 << 20]);
    let image = ImageBuilder::new(Flavor::Oci)
        .raw_layer(blob.clone(), blob.digest.clone())
        .build();
    let issuer = TokenIssuer::start(IssuerOptions::default());
    let reg = token_registry(&issuer, seeded(&[(REPO, "v1", &image)]), "");
    let proxy = ThrottleProxy::start(&reg.addr(), 2 << 20);
    let url = format!("http://{}/v2/{REPO}/blobs/{}", proxy.addr(), blob.digest);
    assert_eq!(get(&url, None).0, 401);
    let token = issuer.mint("x", &[(REPO, &["pull"])], Duration::from_secs(60));
    let started = Instant::now();
    let (status, _, body) = get(&url, Some(&format!("Bearer {token}")));
    assert_eq!(status, 200);
    assert!(body == blob.bytes);
    // 1 MiB at 2 MiB/s: the pacing cannot let it through much faster than 0.5 s.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not throttled: {:?}",
        started.elapsed()
    );
    let ex = proxy.exchanges();
    assert_eq!(ex.len(), 2, "{}", proxy.describe());
    assert_eq!((ex[0].status, ex[0].auth_scheme.as_deref()), (401, None));
    assert_eq!(
        (ex[1].status, ex[1].auth_scheme.as_deref()),
        (200, Some("Bearer"))
    );
    assert_eq!(proxy.bearer_rejections(), 0);
}

#[test]
fn token_registry_redirects_blobs_to_the_cdn() {
    let image = small_image(7);
    let issuer = TokenIssuer::start(IssuerOptions::default());
    let (reg, cdn) = token_registry_with_cdn(&issuer, seeded(&[(REPO, "v1", &image)]));
    let token = issuer.mint("x", &[(REPO, &["pull"])], Duration::from_secs(60));
    let url = format!("{}/v2/{REPO}/blobs/{}", reg.url(), image.config.digest);
    let resp = http_agent()
        .get(&url)
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 307, "{}", reg.log());
    let location = resp.headers()["Location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&format!("http://{}/", cdn.addr())),
        "{location}"
    );
    assert_eq!(get(&location, None).0, 200);
    assert_eq!(get(&location, Some("Bearer x")).0, 403);
}
