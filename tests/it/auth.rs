//! Registry authentication against the real registry: docker token auth with our issuer
//! (anonymous, Basic credentials, identity tokens, token lifetimes), htpasswd Basic auth, and
//! every place credentials come from (flags, docker config.json, containers auth.json,
//! credential helpers). Secrets never reach stderr.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use crate::support::cli::*;
use crate::support::credhelper::CredHelper;
use crate::support::htpasswd::htpasswd_registry;
use crate::support::throttle::ThrottleProxy;
use crate::support::token::*;
use crate::support::*;

const REPO: &str = "team/app";
const USER: &str = "alice";
const PASSWORD: &str = "s3cret-Pa55word";
const IDENTITY_TOKEN: &str = "idtok-9f8e7d6c5b4a";

/// Chunked pulls (1 MiB ranges even on fast loopback).
const CHUNKED: &[&str] = &["--fan-out", "max", "--chunk-size", "1M"];

/// A token-protected registry holding [`big_image`] as `team/app:v1`, and a sandbox to run
/// fastpull in.
struct Setup {
    issuer: TokenIssuer,
    reg: Registry,
    image: Image,
    sb: Sandbox,
    n: std::cell::Cell<u32>,
}

impl Setup {
    fn token(opts: IssuerOptions) -> Setup {
        Setup::token_at(opts, |issuer| issuer.realm())
    }

    /// [`Setup::token`] whose registry sends clients to the realm `realm` gives for its issuer.
    fn token_at(opts: IssuerOptions, realm: impl Fn(&TokenIssuer) -> String) -> Setup {
        let image = big_image(11);
        let issuer = TokenIssuer::start(opts);
        let reg = token_registry_with_realm(
            &issuer,
            seeded(&[(REPO, "v1", &image)]),
            &realm(&issuer),
            "",
        );
        Setup {
            issuer,
            reg,
            image,
            sb: Sandbox::new(),
            n: std::cell::Cell::new(0),
        }
    }

    /// A private registry: `USER`/`PASSWORD` and `IDENTITY_TOKEN` accepted, anonymous refused.
    fn private() -> Setup {
        Setup::token(IssuerOptions::private(USER, PASSWORD).refresh_token(IDENTITY_TOKEN))
    }

    fn addr(&self) -> String {
        self.reg.addr()
    }

    fn image_ref(&self) -> String {
        format!("{}/{REPO}:v1", self.reg.addr())
    }

    /// A fresh destination inside the sandbox.
    fn dest(&self) -> PathBuf {
        self.n.set(self.n.get() + 1);
        self.sb.home().join(format!("out-{}", self.n.get()))
    }

    /// Pulls `team/app:v1`; returns the output and the destination.
    fn pull(&self, args: &[&str], env: &[(&str, &str)]) -> (Output, PathBuf) {
        let dest = self.dest();
        (self.sb.pull(args, env, &self.image_ref(), &dest), dest)
    }

    fn pull_stdin(&self, args: &[&str], env: &[(&str, &str)], stdin: &str) -> (Output, PathBuf) {
        let dest = self.dest();
        let o = self
            .sb
            .pull_stdin(args, env, &self.image_ref(), &dest, Some(stdin.as_bytes()));
        (o, dest)
    }

    fn assert_ok(&self, (o, dest): &(Output, PathBuf)) {
        assert_pulled(dest, &self.image, o);
    }

    /// docker config.json `auths` entry for `key` with `USER`:`password`.
    fn auths(key: &str, password: &str) -> serde_json::Value {
        serde_json::json!({"auths": {key: {"auth": basic_auth_value(USER, password)}}})
    }

    /// Every token request authenticated with `USER`'s right password, and there was one.
    fn assert_basic_user(&self) {
        let reqs = self.issuer.requests();
        assert!(!reqs.is_empty(), "no token request");
        for r in &reqs {
            assert_eq!(
                r.auth,
                TokenAuth::Basic {
                    user: USER.into(),
                    ok: true
                },
                "{}",
                self.issuer.describe()
            );
        }
    }

    /// Token requests used the identity token (POST refresh_token grant) and nothing else.
    fn assert_refresh_grant(&self) {
        let reqs = self.issuer.requests();
        assert!(!reqs.is_empty(), "no token request");
        for r in &reqs {
            assert_eq!(r.method, "POST", "{}", self.issuer.describe());
            assert_eq!(r.auth, TokenAuth::RefreshToken { ok: true });
            assert_eq!(r.grant_type.as_deref(), Some("refresh_token"));
            assert_eq!(r.client_id.as_deref(), Some("fastpull"));
            assert_eq!(r.service.as_deref(), Some(SERVICE));
            assert_eq!(r.scopes, vec![format!("repository:{REPO}:pull")]);
        }
    }

    /// Failed with exit 3, saying `unauthorized` and naming registry and repository, after
    /// at most two token requests.
    fn assert_unauthorized(&self, o: &Output) {
        assert_exit(o, 3);
        let err = stderr(o);
        assert!(err.to_lowercase().contains("unauthorized"), "{err}");
        assert!(err.contains(&self.addr()), "registry not named: {err}");
        assert!(err.contains(REPO), "repository not named: {err}");
        let n = self.issuer.count();
        assert!(
            (1..=2).contains(&n),
            "{n} token requests:\n{}",
            self.issuer.describe()
        );
    }
}

#[test]
fn anonymous_token_serves_manifest_every_blob_and_every_chunk() {
    let s = Setup::token(IssuerOptions::default());
    // Our proxy in front shows the ranges and that each carried the token.
    let front = FaultProxy::start(&s.addr());
    let dest = s.dest();
    let o =
        s.sb.pull(CHUNKED, &[], &format!("{}/{REPO}:v1", front.addr()), &dest);
    assert_pulled(&dest, &s.image, &o);
    let reqs = s.issuer.requests();
    assert_eq!(
        reqs.len(),
        1,
        "one token for the whole pull:\n{}",
        s.issuer.describe()
    );
    assert_eq!(reqs[0].auth, TokenAuth::Anonymous);
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].service.as_deref(), Some(SERVICE));
    assert_eq!(reqs[0].scopes, vec![format!("repository:{REPO}:pull")]);

    let big = &s.image.layers[0];
    let ranged: Vec<_> = front
        .blob_requests(&big.digest)
        .into_iter()
        .filter(|r| r.range.is_some())
        .collect();
    assert!(ranged.len() >= 5, "expected 1 MiB ranges: {ranged:?}");
    assert!(ranged.iter().all(|r| r.authorization), "{ranged:?}");
}

#[test]
fn access_token_field_is_understood() {
    let s = Setup::token(IssuerOptions::default().field(TokenField::AccessToken));
    s.assert_ok(&s.pull(CHUNKED, &[]));
    assert_eq!(s.issuer.count(), 1, "{}", s.issuer.describe());
}

#[test]
fn username_and_password_from_stdin() {
    let s = Setup::private();
    s.assert_ok(&s.pull_stdin(
        &["--username", USER, "--password-stdin"],
        &[],
        &format!("{PASSWORD}\n"),
    ));
    s.assert_basic_user();
    assert_eq!(s.issuer.count(), 1, "{}", s.issuer.describe());
}

#[test]
fn no_credentials_for_a_private_registry_is_unauthorized() {
    let s = Setup::private();
    let (o, _) = s.pull(&[], &[]);
    s.assert_unauthorized(&o);
}

#[test]
fn wrong_password_is_unauthorized_without_a_retry_storm() {
    let s = Setup::private();
    let wrong = "Wr0ng-Pa55-qx7";
    let (o, _) = s.pull_stdin(
        &["--username", USER, "--password-stdin"],
        &[],
        &format!("{wrong}\n"),
    );
    s.assert_unauthorized(&o);
    assert!(
        s.issuer.requests().iter().all(|r| r.auth
            == TokenAuth::Basic {
                user: USER.into(),
                ok: false
            }),
        "{}",
        s.issuer.describe()
    );
    assert!(!stderr(&o).contains(wrong), "password in stderr");
}

#[test]
fn docker_config_json_auth() {
    let s = Setup::private();
    s.sb.docker_config(&Setup::auths(&s.addr(), PASSWORD));
    s.assert_ok(&s.pull(&[], &[]));
    s.assert_basic_user();
}

#[test]
fn docker_config_keys_with_scheme_and_path_match() {
    let s = Setup::private();
    for key in [
        format!("http://{}", s.addr()),
        format!("https://{}", s.addr()),
        format!("https://{}/v1/", s.addr()),
    ] {
        s.sb.docker_config(&Setup::auths(&key, PASSWORD));
        let r = s.pull(&[], &[]);
        assert!(r.0.status.success(), "key {key}:\n{}", text(&r.0));
        s.assert_ok(&r);
    }
    s.assert_basic_user();
}

#[test]
fn docker_config_entry_of_another_registry_is_not_used() {
    let s = Setup::private();
    let other = format!("127.0.0.1:{}", free_port());
    s.sb.docker_config(&Setup::auths(&other, PASSWORD));
    let (o, _) = s.pull(&[], &[]);
    s.assert_unauthorized(&o);
}

#[test]
fn identity_token_uses_the_refresh_token_grant() {
    let s = Setup::private();
    s.sb.docker_config(&serde_json::json!({
        "auths": {s.addr(): {"identitytoken": IDENTITY_TOKEN}}
    }));
    s.assert_ok(&s.pull(CHUNKED, &[]));
    s.assert_refresh_grant();
    assert_eq!(s.issuer.count(), 1, "{}", s.issuer.describe());
}

// ---- a token realm that redirects ----

#[test]
fn anonymous_token_request_follows_realm_redirects() {
    for status in [307, 302] {
        let s = Setup::token_at(IssuerOptions::default(), |i| {
            i.redirecting_realm(status, false)
        });
        s.assert_ok(&s.pull(CHUNKED, &[]));
        assert!(
            s.issuer.redirects() >= 1,
            "HTTP {status}: no redirect answered"
        );
        assert_eq!(
            s.issuer.count(),
            1,
            "HTTP {status}: {}",
            s.issuer.describe()
        );
    }
}

#[test]
fn credentials_follow_a_realm_redirect_on_the_same_origin() {
    let s = Setup::token_at(IssuerOptions::private(USER, PASSWORD), |i| {
        i.redirecting_realm(302, false)
    });
    s.assert_ok(&s.pull_stdin(
        &["--username", USER, "--password-stdin"],
        &[],
        &format!("{PASSWORD}\n"),
    ));
    assert!(s.issuer.redirects() >= 1);
    s.assert_basic_user();
}

/// `127.0.0.1:PORT` redirecting to `localhost:PORT`: the same server, another origin, so the
/// password does not go along, and the anonymous request is refused.
#[test]
fn credentials_do_not_follow_a_realm_redirect_to_another_origin() {
    let s = Setup::token_at(IssuerOptions::private(USER, PASSWORD), |i| {
        i.redirecting_realm(307, true)
    });
    let (o, _) = s.pull_stdin(
        &["--username", USER, "--password-stdin"],
        &[],
        &format!("{PASSWORD}\n"),
    );
    s.assert_unauthorized(&o);
    assert!(s.issuer.redirects() >= 1);
    let reqs = s.issuer.requests();
    assert!(!reqs.is_empty(), "the redirect was not followed");
    assert!(
        reqs.iter().all(|r| r.auth == TokenAuth::Anonymous),
        "credentials went to another origin:\n{}",
        s.issuer.describe()
    );
}

#[test]
fn identity_token_post_follows_a_307_and_is_not_sent_to_another_origin() {
    let config = |s: &Setup| {
        s.sb.docker_config(&serde_json::json!({
            "auths": {s.addr(): {"identitytoken": IDENTITY_TOKEN}}
        }));
    };
    let opts = || IssuerOptions::private(USER, PASSWORD).refresh_token(IDENTITY_TOKEN);
    // Same origin: the POST (with its refresh token) is sent again where 307 says.
    let s = Setup::token_at(opts(), |i| i.redirecting_realm(307, false));
    config(&s);
    s.assert_ok(&s.pull(CHUNKED, &[]));
    s.assert_refresh_grant();
    // Another origin: refused before the refresh token leaves.
    let s = Setup::token_at(opts(), |i| i.redirecting_realm(307, true));
    config(&s);
    let (o, _) = s.pull(&[], &[]);
    assert_exit(&o, 3);
    assert!(
        stderr(&o).contains("redirected a request carrying credentials to another host"),
        "{}",
        stderr(&o)
    );
    assert!(
        s.issuer.requests().iter().all(|r| r.method != "POST"),
        "{}",
        s.issuer.describe()
    );
}

/// Token services without the OAuth2 endpoint refuse the POST in their own ways (GCR 404,
/// Artifactory 401, ACR 400, others 405); the docker GET is asked then, as containerd does.
#[test]
fn refused_oauth_post_falls_back_to_get() {
    for status in [400, 401, 404, 405] {
        let s = Setup::token(
            IssuerOptions::default()
                .refresh_token(IDENTITY_TOKEN)
                .no_oauth_post(status),
        );
        s.sb.docker_config(&serde_json::json!({
            "auths": {s.addr(): {"identitytoken": IDENTITY_TOKEN}}
        }));
        s.assert_ok(&s.pull(&[], &[]));
        let reqs = s.issuer.requests();
        let seen: Vec<(String, u16)> = reqs.iter().map(|r| (r.method.clone(), r.status)).collect();
        assert_eq!(
            seen,
            vec![("POST".to_string(), status), ("GET".to_string(), 200)],
            "{}",
            s.issuer.describe()
        );
    }
}

#[test]
fn creds_store_helper() {
    let s = Setup::private();
    let helper = CredHelper::install(&s.sb.bin_dir(), "fake");
    helper.set(&s.addr(), USER, PASSWORD);
    s.sb.docker_config(&serde_json::json!({"credsStore": "fake"}));
    s.assert_ok(&s.pull(&[], &[]));
    s.assert_basic_user();
    let calls = helper.calls();
    assert!(!calls.is_empty(), "helper not called");
    assert!(
        calls
            .iter()
            .all(|(a, server)| a == "get" && *server == s.addr()),
        "{calls:?}"
    );
}

#[test]
fn creds_store_helper_identity_token() {
    let s = Setup::private();
    let helper = CredHelper::install(&s.sb.bin_dir(), "fake");
    helper.set(&s.addr(), "<token>", IDENTITY_TOKEN);
    s.sb.docker_config(&serde_json::json!({"credsStore": "fake"}));
    s.assert_ok(&s.pull(&[], &[]));
    s.assert_refresh_grant();
}

#[test]
fn cred_helpers_entry_wins_over_creds_store() {
    let s = Setup::private();
    let store = CredHelper::install(&s.sb.bin_dir(), "store");
    store.set(&s.addr(), USER, "not-the-password");
    let right = CredHelper::install(&s.sb.bin_dir(), "right");
    right.set(&s.addr(), USER, PASSWORD);
    s.sb.docker_config(&serde_json::json!({
        "credsStore": "store",
        "credHelpers": {s.addr(): "right"},
    }));
    s.assert_ok(&s.pull(&[], &[]));
    s.assert_basic_user();
    assert!(!right.calls().is_empty(), "credHelpers helper not called");
    assert!(
        store.calls().is_empty(),
        "credsStore used: {:?}",
        store.calls()
    );
}

#[test]
fn registry_auth_file_comes_before_docker_config() {
    let s = Setup::private();
    s.sb.docker_config(&Setup::auths(&s.addr(), "not-the-password"));
    let file = s.sb.write(
        "elsewhere/auth.json",
        &Setup::auths(&s.addr(), PASSWORD).to_string(),
    );
    s.assert_ok(&s.pull(&[], &[("REGISTRY_AUTH_FILE", file.to_str().unwrap())]));
    s.assert_basic_user();
}

#[test]
fn docker_config_env_replaces_home_docker() {
    let s = Setup::private();
    s.sb.docker_config(&Setup::auths(&s.addr(), "not-the-password"));
    s.sb.write(
        "dockercfg/config.json",
        &Setup::auths(&s.addr(), PASSWORD).to_string(),
    );
    let dir = s.sb.home().join("dockercfg");
    s.assert_ok(&s.pull(&[], &[("DOCKER_CONFIG", dir.to_str().unwrap())]));
    s.assert_basic_user();
}

#[test]
fn xdg_runtime_dir_containers_auth_json() {
    let s = Setup::private();
    s.sb.write(
        "run/containers/auth.json",
        &Setup::auths(&s.addr(), PASSWORD).to_string(),
    );
    let run = s.sb.home().join("run");
    s.assert_ok(&s.pull(&[], &[("XDG_RUNTIME_DIR", run.to_str().unwrap())]));
    s.assert_basic_user();
}

#[test]
fn xdg_config_home_containers_auth_json() {
    let s = Setup::private();
    s.sb.write(
        "cfg/containers/auth.json",
        &Setup::auths(&s.addr(), PASSWORD).to_string(),
    );
    let cfg = s.sb.home().join("cfg");
    s.assert_ok(&s.pull(&[], &[("XDG_CONFIG_HOME", cfg.to_str().unwrap())]));
    s.assert_basic_user();
}

#[test]
fn home_config_containers_auth_json() {
    let s = Setup::private();
    s.sb.write(
        ".config/containers/auth.json",
        &Setup::auths(&s.addr(), PASSWORD).to_string(),
    );
    s.assert_ok(&s.pull(&[], &[]));
    s.assert_basic_user();
}

#[test]
fn authfile_flag_is_used() {
    let s = Setup::private();
    let wrong = s.sb.write(
        "wrong.json",
        &Setup::auths(&s.addr(), "not-the-password").to_string(),
    );
    let file = s.sb.write(
        "my-auth.json",
        &Setup::auths(&s.addr(), PASSWORD).to_string(),
    );
    s.assert_ok(&s.pull(
        &["--authfile", file.to_str().unwrap()],
        &[("REGISTRY_AUTH_FILE", wrong.to_str().unwrap())],
    ));
    s.assert_basic_user();
}

#[test]
fn authfile_flag_is_the_only_source() {
    let s = Setup::private();
    // Right credentials in the default place; the authfile has none for this registry.
    s.sb.docker_config(&Setup::auths(&s.addr(), PASSWORD));
    let other = format!("127.0.0.1:{}", free_port());
    let file =
        s.sb.write("my-auth.json", &Setup::auths(&other, PASSWORD).to_string());
    let (o, _) = s.pull(&["--authfile", file.to_str().unwrap()], &[]);
    s.assert_unauthorized(&o);
}

/// A pull of [`big_image`] (5.3 MiB) throttled to 1 MiB/s on one connection through
/// [`ThrottleProxy`]: at least 5 s however fast the machine, so that 2 s tokens run out
/// during it.
fn slow_pull(s: &Setup) -> (ThrottleProxy, Output, PathBuf) {
    let slow = ThrottleProxy::start(&s.addr(), 1 << 20);
    let dest = s.dest();
    let mut args = CHUNKED.to_vec();
    args.extend(["-j", "1", "--stall-timeout", "10"]);
    let o =
        s.sb.pull(&args, &[], &format!("{}/{REPO}:v1", slow.addr()), &dest);
    (slow, o, dest)
}

/// Reported `expires_in` 2 s (`opts` may say how): the ≥ 5 s pull must ask for more than one
/// token. The registry accepts each for 30 s, so that no request is refused however long the
/// client takes between taking a token and the registry checking it (a 3 s lifetime left
/// 1.2 s for that, which a loaded machine can spend); a client that ignores `expires_in`
/// asks once (red: `expires_in` parsed as absent gives 1 token request).
fn refreshed_before_expires_in_runs_out(opts: IssuerOptions) {
    let s = Setup::token(opts.expiry(Some(2), Duration::from_secs(30)));
    let (slow, o, dest) = slow_pull(&s);
    assert_pulled(&dest, &s.image, &o);
    let n = s.issuer.count();
    assert!(
        n >= 2,
        "a pull of at least 5 s with 2 s tokens asked for {n}:\n{}",
        s.issuer.describe()
    );
    assert_eq!(
        slow.bearer_rejections(),
        0,
        "a token was refused (older than 30 s?):\n{}\n--- tokens ---\n{}",
        slow.describe(),
        s.issuer.describe()
    );
}

#[test]
fn token_is_refreshed_before_an_honest_expires_in_runs_out() {
    refreshed_before_expires_in_runs_out(IssuerOptions::default());
}

/// `"expires_in": "2"`: a number in a string is read as one.
#[test]
fn expires_in_given_as_a_string_is_honoured() {
    refreshed_before_expires_in_runs_out(IssuerOptions::default().expires_in_as_string());
}

#[test]
fn token_rejected_mid_pull_is_refreshed() {
    // Says 3600 s, but the registry stops accepting each token after 2 s.
    let s = Setup::token(IssuerOptions::default().expiry(Some(3600), Duration::from_secs(2)));
    let (slow, o, dest) = slow_pull(&s);
    assert_pulled(&dest, &s.image, &o);
    let rejected = slow.bearer_rejections();
    // The scenario happened: the registry did refuse an expired token mid-pull.
    assert!(rejected >= 1, "no 401 mid-pull:\n{}", slow.describe());
    let n = s.issuer.count();
    assert!(
        n >= 2 && n <= 1 + rejected,
        "{n} token requests for {rejected} rejections:\n{}\n--- tokens ---\n{}",
        slow.describe(),
        s.issuer.describe()
    );
}

// ---- htpasswd (Basic) ----

fn basic_setup() -> (Registry, FaultProxy, Image, Sandbox) {
    let image = big_image(12);
    let reg = htpasswd_registry(&[(USER, PASSWORD)], seeded(&[(REPO, "v1", &image)]), None);
    let front = FaultProxy::start(&reg.addr());
    (reg, front, image, Sandbox::new())
}

#[test]
fn htpasswd_with_right_credentials() {
    let (_reg, front, image, sb) = basic_setup();
    let (_d, dest) = dest();
    let o = sb.pull_stdin(
        &["--username", USER, "--password-stdin"],
        &[],
        &format!("{}/{REPO}:v1", front.addr()),
        &dest,
        Some(format!("{PASSWORD}\n").as_bytes()),
    );
    assert_pulled(&dest, &image, &o);
    let blob_gets: Vec<_> = front
        .seen()
        .into_iter()
        .filter(|r| r.path.contains("/blobs/"))
        .collect();
    assert!(!blob_gets.is_empty());
    assert!(blob_gets.iter().all(|r| r.authorization), "{blob_gets:?}");
}

#[test]
fn htpasswd_credentials_from_docker_config() {
    let (_reg, front, image, sb) = basic_setup();
    sb.docker_config(&Setup::auths(front.addr(), PASSWORD));
    let (_d, dest) = dest();
    let o = sb.pull(&[], &[], &format!("{}/{REPO}:v1", front.addr()), &dest);
    assert_pulled(&dest, &image, &o);
}

#[test]
fn htpasswd_without_credentials_is_unauthorized() {
    let (_reg, front, _image, sb) = basic_setup();
    let (_d, dest) = dest();
    let o = sb.pull(&[], &[], &format!("{}/{REPO}:v1", front.addr()), &dest);
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(err.to_lowercase().contains("unauthorized"), "{err}");
    assert!(err.contains(front.addr()) && err.contains(REPO), "{err}");
}

#[test]
fn htpasswd_wrong_password_is_unauthorized_after_few_attempts() {
    let (_reg, front, _image, sb) = basic_setup();
    let (_d, dest) = dest();
    let wrong = "Wr0ng-Pa55-basic";
    let o = sb.pull_stdin(
        &["--username", USER, "--password-stdin"],
        &[],
        &format!("{}/{REPO}:v1", front.addr()),
        &dest,
        Some(format!("{wrong}\n").as_bytes()),
    );
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(err.to_lowercase().contains("unauthorized"), "{err}");
    assert!(err.contains(front.addr()) && err.contains(REPO), "{err}");
    assert!(!err.contains(wrong), "password in stderr");
    let attempts = front.seen().iter().filter(|r| r.authorization).count();
    assert!(
        (1..=2).contains(&attempts),
        "{attempts} requests with credentials: {:?}",
        front.seen()
    );
}

// ---- secrets ----

/// Everything secret a run could leak.
fn assert_no_secrets(o: &Output, secrets: &[String]) {
    let err = stderr(o);
    let out = String::from_utf8_lossy(&o.stdout);
    for s in secrets {
        assert!(!s.is_empty());
        assert!(
            !err.contains(s.as_str()) && !out.contains(s.as_str()),
            "secret {s:?} printed:\n{}",
            text(o)
        );
    }
}

#[test]
fn secrets_stay_out_of_verbose_logs() {
    let s = Setup::private();
    let mut secrets = vec![
        PASSWORD.to_string(),
        basic_auth_value(USER, PASSWORD),
        IDENTITY_TOKEN.to_string(),
    ];

    // Password from stdin.
    let r = s.pull_stdin(
        &["-vvv", "--username", USER, "--password-stdin"],
        &[],
        &format!("{PASSWORD}\n"),
    );
    s.assert_ok(&r);
    assert!(!stderr(&r.0).is_empty(), "-vvv logged nothing");
    let tokens = s.issuer.issued_tokens();
    assert!(!tokens.is_empty());
    secrets.extend(tokens);
    assert_no_secrets(&r.0, &secrets);

    // Identity token from a credential helper.
    let helper = CredHelper::install(&s.sb.bin_dir(), "fake");
    helper.set(&s.addr(), "<token>", IDENTITY_TOKEN);
    s.sb.docker_config(&serde_json::json!({"credsStore": "fake"}));
    let r = s.pull(&["-vvv"], &[]);
    s.assert_ok(&r);
    secrets.extend(s.issuer.issued_tokens());
    assert_no_secrets(&r.0, &secrets);

    // Basic credentials from config.json.
    s.sb.docker_config(&Setup::auths(&s.addr(), PASSWORD));
    let r = s.pull(&["-vvv"], &[]);
    s.assert_ok(&r);
    secrets.extend(s.issuer.issued_tokens());
    assert_no_secrets(&r.0, &secrets);
}

#[test]
fn username_without_password_stdin_is_a_usage_error() {
    let s = Setup::private();
    let (o, _) = s.pull(&["--username", USER], &[]);
    assert_exit(&o, 2);
    assert_eq!(s.issuer.count(), 0, "{}", s.issuer.describe());
}

// ---- token lifetimes and the shared token cache ----

#[test]
fn zero_or_huge_expires_in_neither_hammers_the_issuer_nor_crashes() {
    // `expires_in: 0` is no lifetime at all: treated as the spec's default, not as "renew
    // before every request".
    let s = Setup::token(IssuerOptions::default().expiry(Some(0), Duration::from_secs(300)));
    s.assert_ok(&s.pull(CHUNKED, &[]));
    assert_eq!(s.issuer.count(), 1, "{}", s.issuer.describe());
    // An absurd lifetime must not overflow the renewal time.
    s.issuer.set_options(
        IssuerOptions::default().expiry(Some(i64::MAX as u64), Duration::from_secs(300)),
    );
    s.assert_ok(&s.pull(CHUNKED, &[]));
    assert_eq!(s.issuer.count(), 2, "{}", s.issuer.describe());
}

#[test]
fn reused_client_replaces_a_cached_token_the_registry_no_longer_takes() {
    // Tokens claim 3600 s, but the registry takes each for 2 s only.
    let s = Setup::token(IssuerOptions::default().expiry(Some(3600), Duration::from_secs(2)));
    let client = fastpull::Client::builder()
        .credentials(fastpull::credentials::CredentialStore::none())
        .proxy_from_env(false)
        .retries(1, Duration::from_millis(10))
        .build()
        .expect("client");
    let reference: fastpull::Reference = s.image_ref().parse().expect("reference");
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let first = s.dest();
    rt.block_on(client.pull(&reference, &first))
        .expect("first pull");
    // However long the first pull took (on a slow machine its token may have run out and
    // been replaced), its last token is in the client's cache. Wait until the registry
    // refuses that one, and hand out long-lived tokens from now on: the second pull then
    // needs exactly one new token, at any speed.
    let before = s.issuer.count();
    let cached = s
        .issuer
        .issued_tokens()
        .pop()
        .expect("the first pull's token");
    s.issuer
        .set_options(IssuerOptions::default().expiry(Some(3600), Duration::from_secs(300)));
    wait_until_refused(&s, &cached);
    // The second pull finds that token in the client's cache; the registry refuses it, and a
    // new one must be fetched rather than the pull failing.
    let second = s.dest();
    let r = rt.block_on(client.pull(&reference, &second));
    assert!(r.is_ok(), "{:?}\n{}", r.err(), s.issuer.describe());
    assert_eq!(s.issuer.count(), before + 1, "{}", s.issuer.describe());
}

/// Polls the registry with `token` until it answers 401 (at most 30 s).
fn wait_until_refused(s: &Setup, token: &str) {
    let url = format!("{}/v2/{REPO}/manifests/v1", s.reg.url());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = http_agent()
            .get(&url)
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .expect("GET manifest")
            .status()
            .as_u16();
        if status == 401 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the registry still takes the token after 30 s ({status})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
