//! The way to the registry: redirects of a token-protected registry to a CDN that refuses
//! `Authorization`, forward proxies from the environment (tinyproxy: CONNECT for HTTPS,
//! absolute-form for HTTP, `NO_PROXY`; microsocks: SOCKS5 with and without a password), and
//! mirrors (`--mirror`) with fallback to the origin.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::cli::*;
use crate::support::microsocks::Microsocks;
use crate::support::registry::RegistryOptions;
use crate::support::tinyproxy::Tinyproxy;
use crate::support::token::*;
use crate::support::*;

const REPO: &str = "net/app";
const CHUNKED: &[&str] = &["--fan-out", "max", "--chunk-size", "1M"];

/// A fresh destination in `sb`.
fn out(sb: &Sandbox, name: &str) -> PathBuf {
    sb.home().join(name)
}

// ---- CDN ----

#[test]
fn token_registry_redirecting_blobs_to_a_cdn() {
    let image = big_image(31);
    let issuer = TokenIssuer::start(IssuerOptions::default());
    let (reg, cdn) = token_registry_with_cdn(&issuer, seeded(&[(REPO, "v1", &image)]));
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    let o = sb.pull(CHUNKED, &[], &format!("{}/{REPO}:v1", reg.addr()), &dest);
    assert_pulled(&dest, &image, &o);

    let log = cdn.access_log();
    let lines: Vec<&str> = log.lines().collect();
    for b in image.blobs() {
        assert!(
            lines.iter().any(|l| l.contains(hex(&b.digest))),
            "CDN did not serve {}:\n{log}",
            b.digest
        );
    }
    // nginx answers 403 to any request carrying Authorization.
    assert!(
        lines.iter().all(|l| !l.contains("\" 403 ")),
        "Authorization sent to the CDN:\n{log}"
    );
    assert_eq!(issuer.count(), 1, "{}", issuer.describe());
}

// ---- proxies ----

fn tls_registry(image: &Image) -> (Registry, TestPki, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path(), &["127.0.0.1", "localhost"]);
    let reg = RegistryOptions::new()
        .tls(&pki.server_cert, &pki.server_key)
        .serve_storage_of(seeded(&[(REPO, "v1", image)]))
        .start();
    (reg, pki, dir)
}

fn through_proxy_to_tls(var: &str) {
    let image = big_image(32);
    let (reg, pki, _d) = tls_registry(&image);
    let proxy = Tinyproxy::start();
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    let o = sb.pull(
        &["--ca-file", pki.ca_cert.to_str().unwrap()],
        &[(var, &proxy.url())],
        &format!("{}/{REPO}:v1", reg.addr()),
        &dest,
    );
    assert_pulled(&dest, &image, &o);
    let reqs = proxy.requests();
    let connect = format!("CONNECT {} HTTP/1.1", reg.addr());
    assert!(
        reqs.contains(&connect),
        "no {connect:?} in tinyproxy's log:\n{}",
        proxy.log()
    );
    assert!(
        reqs.iter().all(|r| r.starts_with("CONNECT ")),
        "HTTPS sent as plain requests to the proxy: {reqs:?}"
    );
}

#[test]
fn https_proxy_tunnels_to_a_tls_registry() {
    through_proxy_to_tls("HTTPS_PROXY");
}

#[test]
fn lowercase_https_proxy_is_honoured() {
    through_proxy_to_tls("https_proxy");
}

#[test]
fn all_proxy_is_used_for_https() {
    through_proxy_to_tls("ALL_PROXY");
}

/// `GET http://ADDR/v2/REPO/…` lines in tinyproxy's log.
fn proxied_gets(proxy: &Tinyproxy, addr: &str, what: &str) -> Vec<String> {
    let prefix = format!("GET http://{addr}/v2/{REPO}/{what}");
    proxy
        .requests()
        .into_iter()
        .filter(|r| r.starts_with(&prefix))
        .collect()
}

#[test]
fn http_proxy_forwards_requests_to_a_plain_registry() {
    let image = big_image(33);
    let reg = seeded(&[(REPO, "v1", &image)]);
    let proxy = Tinyproxy::start();
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    let o = sb.pull(
        CHUNKED,
        &[("HTTP_PROXY", &proxy.url())],
        &format!("{}/{REPO}:v1", reg.addr()),
        &dest,
    );
    assert_pulled(&dest, &image, &o);
    assert!(
        !proxied_gets(&proxy, &reg.addr(), "manifests/v1").is_empty(),
        "manifest not fetched through the proxy:\n{}",
        proxy.log()
    );
    for b in image.blobs() {
        assert!(
            !proxied_gets(&proxy, &reg.addr(), &format!("blobs/{}", b.digest)).is_empty(),
            "blob {} not fetched through the proxy:\n{}",
            b.digest,
            proxy.log()
        );
    }
}

#[test]
fn http_proxy_also_carries_token_requests() {
    let image = big_image(34);
    let issuer = TokenIssuer::start(IssuerOptions::default());
    let reg = token_registry(&issuer, seeded(&[(REPO, "v1", &image)]), "");
    let proxy = Tinyproxy::start();
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    let o = sb.pull(
        &[],
        &[("http_proxy", &proxy.url())],
        &format!("{}/{REPO}:v1", reg.addr()),
        &dest,
    );
    assert_pulled(&dest, &image, &o);
    let token_line = format!("GET {}?", issuer.realm());
    assert!(
        proxy.requests().iter().any(|r| r.starts_with(&token_line)),
        "token request not proxied:\n{}",
        proxy.log()
    );
    assert_eq!(issuer.count(), 1);
}

/// Pulls a fresh image (seed `seed`) from a plain registry with the proxy variables named in
/// `proxy_vars` pointing at a closed port, plus `env`.
fn pull_past_dead_proxy(
    seed: u64,
    proxy_vars: [&str; 2],
    env: &[(&str, &str)],
    args: &[&str],
) -> (Image, PathBuf, Output, Sandbox) {
    let image = big_image(seed);
    let reg = seeded(&[(REPO, "v1", &image)]);
    let closed = ClosedPort::new();
    let dead = format!("http://{}", closed.addr());
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    let mut all: Vec<(&str, &str)> = proxy_vars.iter().map(|v| (*v, dead.as_str())).collect();
    all.extend_from_slice(env);
    let o = sb.pull(args, &all, &format!("{}/{REPO}:v1", reg.addr()), &dest);
    (image, dest, o, sb)
}

#[test]
fn no_proxy_bypasses_a_dead_proxy() {
    let (image, dest, o, _sb) = pull_past_dead_proxy(
        35,
        ["HTTPS_PROXY", "HTTP_PROXY"],
        &[("NO_PROXY", "localhost,127.0.0.1")],
        &[],
    );
    assert_pulled(&dest, &image, &o);
}

/// curl semantics: lowercase variables, a comma-separated `no_proxy` list of host names
/// (curl ignores `host:port` entries, so none is used here).
#[test]
fn lowercase_no_proxy_list_bypasses_a_dead_proxy() {
    let (image, dest, o, _sb) = pull_past_dead_proxy(
        36,
        ["https_proxy", "http_proxy"],
        &[("no_proxy", "registry.example, 127.0.0.1")],
        &[],
    );
    assert_pulled(&dest, &image, &o);
}

#[test]
fn dead_proxy_without_no_proxy_fails() {
    let (_, _, o, _sb) =
        pull_past_dead_proxy(37, ["HTTPS_PROXY", "HTTP_PROXY"], &[], &["--retries", "0"]);
    assert_exit(&o, 3);
}

// ---- SOCKS ----

#[test]
fn socks5h_proxy_carries_a_chunked_pull() {
    let image = big_image(41);
    let reg = seeded(&[(REPO, "v1", &image)]);
    let socks = Microsocks::start(None);
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    let proxy = format!("socks5h://{}", socks.addr());
    let o = sb.pull(
        CHUNKED,
        &[("ALL_PROXY", &proxy)],
        &format!("{}/{REPO}:v1", reg.addr()),
        &dest,
    );
    assert_pulled(&dest, &image, &o);
    // Ranges over several connections, each one a tunnel through the proxy.
    let tunnels = socks.tunnels_to(&reg.addr());
    assert!(
        tunnels >= 2,
        "{tunnels} tunnel(s) to {} in microsocks' log:\n{}",
        reg.addr(),
        socks.log()
    );
}

#[test]
fn socks5_with_a_password_tunnels_to_a_tls_registry() {
    let image = big_image(42);
    let (reg, pki, _d) = tls_registry(&image);
    let socks = Microsocks::start(Some(("sockuser", "S0cks-pass-41")));
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    let proxy = format!("socks5://sockuser:S0cks-pass-41@{}", socks.addr());
    let o = sb.pull(
        &["--ca-file", pki.ca_cert.to_str().unwrap()],
        &[("HTTPS_PROXY", &proxy)],
        &format!("{}/{REPO}:v1", reg.addr()),
        &dest,
    );
    assert_pulled(&dest, &image, &o);
    assert!(
        socks.tunnels_to(&reg.addr()) >= 1,
        "no tunnel to {} in microsocks' log:\n{}",
        reg.addr(),
        socks.log()
    );
}

#[test]
fn socks5_refusing_the_password_fails_clearly() {
    let image = big_image(43);
    let reg = seeded(&[(REPO, "v1", &image)]);
    let socks = Microsocks::start(Some(("sockuser", "right-pass")));
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    let secret = "Wr0ng-socks-pass";
    let proxy = format!("socks5://sockuser:{secret}@{}", socks.addr());
    let o = sb.pull(
        &["-vvv", "--retries", "0"],
        &[("ALL_PROXY", &proxy)],
        &format!("{}/{REPO}:v1", reg.addr()),
        &dest,
    );
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(
        err.contains(&format!("via proxy socks5://{}", socks.addr()))
            && err.contains("credentials not accepted"),
        "the refusal does not name the proxy and the reason:\n{err}"
    );
    assert!(!err.contains(secret), "SOCKS password printed:\n{err}");
    assert_eq!(socks.tunnels_to(&reg.addr()), 0, "{}", socks.log());
    assert!(!dest.join("index.json").exists());
}

#[test]
fn dead_socks_proxy_names_the_proxy_and_the_cause() {
    let image = big_image(44);
    let reg = seeded(&[(REPO, "v1", &image)]);
    let closed = ClosedPort::new();
    let dead = closed.addr();
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    let o = sb.pull(
        &["--retries", "0"],
        &[("ALL_PROXY", &format!("socks5h://{dead}"))],
        &format!("{}/{REPO}:v1", reg.addr()),
        &dest,
    );
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(
        err.contains(&format!("via proxy socks5h://{dead}")) && err.contains("refused"),
        "the failure does not name the proxy and the cause:\n{err}"
    );
}

/// `socks5` resolves the registry's name here and sends the proxy an address; `socks5h`
/// (here written in upper case, which curl accepts) sends the name.
#[test]
fn socks5_resolves_names_here_and_socks5h_at_the_proxy() {
    let image = big_image(45);
    let reg = seeded(&[(REPO, "v1", &image)]);
    let port = reg.addr().rsplit(':').next().unwrap().to_string();
    let by_name = format!("localhost:{port}");
    let by_address = format!("127.0.0.1:{port}");
    let sb = Sandbox::new();
    for (scheme, asked) in [("SOCKS5H", &by_name), ("socks5", &by_address)] {
        let socks = Microsocks::start(None);
        let dest = out(&sb, scheme);
        let o = sb.pull(
            &[],
            &[("ALL_PROXY", &format!("{scheme}://{}", socks.addr()))],
            &format!("{by_name}/{REPO}:v1"),
            &dest,
        );
        assert_pulled(&dest, &image, &o);
        assert!(
            socks.tunnels_to(asked) >= 1,
            "{scheme}: no tunnel to {asked}:\n{}",
            socks.log()
        );
        let other = if asked == &by_name {
            &by_address
        } else {
            &by_name
        };
        assert_eq!(socks.tunnels_to(other), 0, "{scheme}:\n{}", socks.log());
    }
}

/// Proxy settings hyper-util's matcher would skip without a word (so the pull would go
/// around the proxy) are refused before anything is sent, naming the variable, not the
/// secret.
#[test]
fn unusable_proxy_settings_are_refused_up_front() {
    let image = big_image(46);
    let reg = seeded(&[(REPO, "v1", &image)]);
    let sb = Sandbox::new();
    let closed = ClosedPort::new();
    let dead = closed.addr();
    let cases = [
        (
            "ALL_PROXY",
            format!("socks4://{dead}"),
            "socks4:// proxies are not supported",
        ),
        (
            "https_proxy",
            format!("SOCKS4A://{dead}"),
            "socks4a:// proxies are not supported",
        ),
        (
            "ALL_PROXY",
            format!("ftp://{dead}"),
            "unsupported proxy scheme ftp://",
        ),
        (
            "HTTPS_PROXY",
            format!("https://{dead}"),
            "https:// proxies (TLS to the proxy itself) are not supported",
        ),
        (
            "HTTP_PROXY",
            format!("http://u:p#ss-1@{dead}"),
            "must be %-encoded",
        ),
        (
            "ALL_PROXY",
            format!("socks5h://u:p@ss-2@{dead}"),
            "write it as %40",
        ),
    ];
    for (i, (var, value, why)) in cases.iter().enumerate() {
        let dest = out(&sb, &format!("out-{i}"));
        let o = sb.pull(
            &[],
            &[(var, value.as_str())],
            &format!("{}/{REPO}:v1", reg.addr()),
            &dest,
        );
        assert_exit(&o, 2);
        let err = stderr(&o);
        assert!(
            err.contains(&format!("{var}: ")) && err.contains(why),
            "{value}: {err}"
        );
        assert!(
            !err.contains("ss-1") && !err.contains("ss-2"),
            "secret printed: {err}"
        );
        assert!(!dest.exists(), "{} created", dest.display());
    }
}

// ---- mirrors ----

/// Pulls `ORIGIN/net/app:v1` with `--mirror ORIGIN=MIRROR` for each mirror.
fn pull_with_mirrors(origin: &str, mirrors: &[&str], extra: &[&str], dest: &Path) -> Output {
    let sb = Sandbox::new();
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for m in mirrors {
        args.push("--mirror".into());
        args.push(format!("{origin}={m}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sb.pull(&args, &[], &format!("{origin}/{REPO}:v1"), dest)
}

#[test]
fn mirror_serves_when_the_origin_is_down() {
    let image = big_image(41);
    let mirror = seeded(&[(REPO, "v1", &image)]);
    let (_d, dest) = dest();
    let o = pull_with_mirrors(&ClosedPort::new().addr(), &[&mirror.addr()], CHUNKED, &dest);
    assert_pulled(&dest, &image, &o);
}

#[test]
fn mirror_without_the_image_falls_back_to_the_origin() {
    let image = big_image(42);
    let origin = seeded(&[(REPO, "v1", &image)]);
    let origin_front = FaultProxy::start(&origin.addr());
    let mirror = Registry::start();
    let mirror_front = FaultProxy::start(&mirror.addr());
    let (_d, dest) = dest();
    let o = pull_with_mirrors(origin_front.addr(), &[mirror_front.addr()], &[], &dest);
    assert_pulled(&dest, &image, &o);
    assert!(
        mirror_front
            .seen()
            .iter()
            .any(|r| r.path.contains(&format!("/v2/{REPO}/manifests/"))),
        "mirror not asked first: {:?}",
        mirror_front.seen()
    );
    for b in image.blobs() {
        assert!(
            !origin_front.blob_requests(&b.digest).is_empty(),
            "origin did not serve {}",
            b.digest
        );
    }
}

/// A mirror that serves a blob with a flipped byte: the blob fails its digest, the pull
/// moves to the next source (here the origin) at once instead of repairing from the same
/// mirror, says so (`endpoint_failed`, naming the digest mismatch), and completes with
/// the origin's bytes.
#[test]
fn mirror_serving_a_corrupt_blob_hands_the_pull_to_the_origin() {
    let image = big_image(44);
    let origin = seeded(&[(REPO, "v1", &image)]);
    let origin_front = FaultProxy::start(&origin.addr());
    let mirror = seeded(&[(REPO, "v1", &image)]);
    let mirror_front = FaultProxy::start(&mirror.addr());
    let big = &image.layers[0];
    mirror_front.add(
        Rule::new(
            &format!("/blobs/{}", big.digest),
            Fault::Corrupt { at: 4242 },
        )
        .range_start(0),
    );
    let (_d, dest) = dest();
    let o = pull_with_mirrors(
        origin_front.addr(),
        &[mirror_front.addr()],
        &["--json"],
        &dest,
    );
    assert_pulled(&dest, &image, &o);
    let out = String::from_utf8_lossy(&o.stdout);
    let failed: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("\"event\":\"endpoint_failed\""))
        .collect();
    assert_eq!(failed.len(), 1, "one endpoint_failed event:\n{out}");
    assert!(
        failed[0].contains(&hex(&big.digest)[..12]) || failed[0].contains("digest"),
        "the event names the mismatch: {}",
        failed[0]
    );
    // One fetch from the mirror (each fetch asks for byte 0 once): not repaired there.
    let from_zero = mirror_front
        .blob_requests(&big.digest)
        .iter()
        .filter(|s| s.range_start().unwrap_or(0) == 0)
        .count();
    assert_eq!(from_zero, 1, "fetches of the blob from the mirror");
    assert!(
        !origin_front.blob_requests(&big.digest).is_empty(),
        "the origin did not serve the blob after the mirror's failed"
    );
}

#[test]
fn mirror_down_falls_back_to_the_origin() {
    let image = big_image(43);
    let origin = seeded(&[(REPO, "v1", &image)]);
    let (_d, dest) = dest();
    let o = pull_with_mirrors(
        &origin.addr(),
        &[&ClosedPort::new().addr()],
        &["--retries", "1"],
        &dest,
    );
    assert_pulled(&dest, &image, &o);
}

#[test]
fn second_mirror_is_tried_after_the_first() {
    let image = big_image(44);
    let empty = Registry::start();
    let good = seeded(&[(REPO, "v1", &image)]);
    let good_front = FaultProxy::start(&good.addr());
    let (_d, dest) = dest();
    let o = pull_with_mirrors(
        &ClosedPort::new().addr(),
        &[&empty.addr(), good_front.addr()],
        &[],
        &dest,
    );
    assert_pulled(&dest, &image, &o);
    assert!(!good_front.blob_requests(&image.layers[0].digest).is_empty());
}

#[test]
fn mirror_failing_mid_pull_is_abandoned_for_the_origin() {
    let image = big_image(45);
    let mirror = seeded(&[(REPO, "v1", &image)]);
    let mirror_front = FaultProxy::start(&mirror.addr());
    // Every blob body from the mirror is cut off after 1000 bytes.
    mirror_front.add(Rule::new("/blobs/", Fault::Reset { after: 1000 }));
    let origin = seeded(&[(REPO, "v1", &image)]);
    let origin_front = FaultProxy::start(&origin.addr());
    let (_d, dest) = dest();
    let o = pull_with_mirrors(
        origin_front.addr(),
        &[mirror_front.addr()],
        &["--retries", "1"],
        &dest,
    );
    assert_pulled(&dest, &image, &o);
    assert!(
        mirror_front.seen().iter().any(|r| r.fault.is_some()),
        "mirror was not used first: {:?}",
        mirror_front.seen()
    );
    assert!(
        !origin_front
            .blob_requests(&image.layers[0].digest)
            .is_empty(),
        "origin did not serve the big layer: {:?}",
        origin_front.seen()
    );
}

#[test]
fn docker_hub_mirror_by_default() {
    let image = big_image(46);
    let mirror = seeded(&[(REPO, "v1", &image)]);
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    // Safety net: should anything try Docker Hub itself, it meets a dead loopback proxy
    // rather than the internet.
    let closed = ClosedPort::new();
    let dead = format!("http://{}", closed.addr());
    let o = sb.pull(
        &["--mirror", &mirror.addr()],
        &[
            ("HTTPS_PROXY", &dead),
            ("HTTP_PROXY", &dead),
            ("NO_PROXY", "127.0.0.1"),
        ],
        &format!("{REPO}:v1"),
        &dest,
    );
    assert_pulled(&dest, &image, &o);
}

#[test]
fn proxy_credentials_stay_out_of_errors_and_logs() {
    let image = big_image(38);
    let reg = seeded(&[(REPO, "v1", &image)]);
    let closed = ClosedPort::new();
    let addr = closed.addr();
    let secret = "Pr0xy-s3cret-77";
    let proxy = format!("http://puser:{secret}@{addr}");
    let sb = Sandbox::new();
    let dest = out(&sb, "out");
    let o = sb.pull(
        &["-vvv", "--retries", "0"],
        &[("HTTPS_PROXY", &proxy), ("HTTP_PROXY", &proxy)],
        &format!("{}/{REPO}:v1", reg.addr()),
        &dest,
    );
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(err.contains(&addr), "the proxy is not named:\n{err}");
    for leak in [secret.to_string(), basic_auth_value("puser", secret)] {
        assert!(
            !err.contains(&leak),
            "proxy secret {leak:?} printed:\n{err}"
        );
    }
}

#[test]
fn failing_mirror_is_left_at_its_first_failure() {
    let image = big_image(47);
    let origin = seeded(&[(REPO, "v1", &image)]);
    let mirror = Registry::start();
    let mirror_front = FaultProxy::start(&mirror.addr());
    mirror_front.add(Rule::new(
        "/v2/",
        Fault::Status {
            code: 503,
            retry_after: None,
        },
    ));
    let (_d, dest) = dest();
    // Default retries: the origin gets them, the mirror does not.
    let o = pull_with_mirrors(&origin.addr(), &[mirror_front.addr()], &[], &dest);
    assert_pulled(&dest, &image, &o);
    let seen = mirror_front.seen();
    assert_eq!(seen.len(), 1, "the mirror was retried: {seen:?}");
}
