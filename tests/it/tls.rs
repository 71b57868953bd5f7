//! TLS registries on 127.0.0.1 (HTTPS is tried first, so their certificates must verify):
//! trust from `--ca-file`, `SSL_CERT_FILE` and docker's certs.d layout (`--cert-dir`),
//! client certificates, and `--insecure` for one registry only.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::cli::*;
use crate::support::htpasswd::htpasswd_registry;
use crate::support::registry::RegistryOptions;
use crate::support::*;

const REPO: &str = "secure/app";

struct Tls {
    reg: Registry,
    pki: TestPki,
    image: Image,
    sb: Sandbox,
    _pki_dir: tempfile::TempDir,
    n: std::cell::Cell<u32>,
}

impl Tls {
    /// A TLS registry (certificate for 127.0.0.1 and localhost) holding `secure/app:v1`;
    /// demanding a client certificate of the same CA when `client_certs`.
    fn start(client_certs: bool) -> Tls {
        let pki_dir = tempfile::tempdir().expect("pki dir");
        let pki = TestPki::create(pki_dir.path(), &["127.0.0.1", "localhost"]);
        let image = big_image(21);
        let mut opts = RegistryOptions::new()
            .tls(&pki.server_cert, &pki.server_key)
            .serve_storage_of(seeded(&[(REPO, "v1", &image)]));
        if client_certs {
            opts = opts.client_ca(&pki.ca_cert, &pki.client_cert, &pki.client_key);
        }
        Tls {
            reg: opts.start(),
            pki,
            image,
            sb: Sandbox::new(),
            _pki_dir: pki_dir,
            n: std::cell::Cell::new(0),
        }
    }

    fn pull(&self, args: &[&str], env: &[(&str, &str)]) -> (Output, PathBuf) {
        self.n.set(self.n.get() + 1);
        let dest = self.sb.home().join(format!("out-{}", self.n.get()));
        let image = format!("{}/{REPO}:v1", self.reg.addr());
        (self.sb.pull(args, env, &image, &dest), dest)
    }

    fn assert_ok(&self, (o, dest): &(Output, PathBuf)) {
        assert_pulled(dest, &self.image, o);
    }

    /// `HOME/certs.d/<host:port>/` with the CA as `ca.crt`; returns `HOME/certs.d`.
    fn cert_dir(&self, host_port: &str, with_client_cert: bool) -> PathBuf {
        let root = self.sb.home().join("certs.d");
        let dir = root.join(host_port);
        std::fs::create_dir_all(&dir).expect("mkdir certs.d/<host>");
        copy(&self.pki.ca_cert, &dir.join("ca.crt"));
        if with_client_cert {
            copy(&self.pki.client_cert, &dir.join("client.cert"));
            copy(&self.pki.client_key, &dir.join("client.key"));
        }
        root
    }

    fn ca(&self) -> &str {
        s(&self.pki.ca_cert)
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Exit 3 with a message about the certificate.
fn assert_cert_error(o: &Output) {
    assert_exit(o, 3);
    let err = stderr(o).to_lowercase();
    assert!(
        err.contains("certificate"),
        "no certificate error:\n{}",
        text(o)
    );
}

#[test]
fn untrusted_certificate_fails_with_a_certificate_error() {
    let t = Tls::start(false);
    let (o, _) = t.pull(&["--retries", "0"], &[]);
    assert_cert_error(&o);
}

#[test]
fn ca_file_flag_trusts_the_registry() {
    let t = Tls::start(false);
    t.assert_ok(&t.pull(&["--ca-file", t.ca()], &[]));
}

#[test]
fn ca_file_of_another_ca_does_not_help() {
    let t = Tls::start(false);
    let other_dir = tempfile::tempdir().unwrap();
    let other = TestPki::create(other_dir.path(), &["127.0.0.1"]);
    let (o, _) = t.pull(&["--retries", "0", "--ca-file", s(&other.ca_cert)], &[]);
    assert_cert_error(&o);
}

#[test]
fn ssl_cert_file_is_honoured() {
    let t = Tls::start(false);
    t.assert_ok(&t.pull(&[], &[("SSL_CERT_FILE", t.ca())]));
}

#[test]
fn cert_dir_ca_crt_trusts_that_registry() {
    let t = Tls::start(false);
    let root = t.cert_dir(&t.reg.addr(), false);
    t.assert_ok(&t.pull(&["--cert-dir", s(&root)], &[]));
}

#[test]
fn cert_dir_of_another_host_does_not_help() {
    let t = Tls::start(false);
    let root = t.cert_dir(&format!("127.0.0.1:{}", free_port()), false);
    let (o, _) = t.pull(&["--retries", "0", "--cert-dir", s(&root)], &[]);
    assert_cert_error(&o);
}

#[test]
fn client_certificate_required_fails_without_one() {
    let t = Tls::start(true);
    let (o, _) = t.pull(&["--retries", "0", "--ca-file", t.ca()], &[]);
    assert_exit(&o, 3);
}

#[test]
fn client_certificate_from_cert_dir() {
    let t = Tls::start(true);
    let root = t.cert_dir(&t.reg.addr(), true);
    t.assert_ok(&t.pull(&["--cert-dir", s(&root)], &[]));
}

#[test]
fn insecure_skips_verification_for_that_registry() {
    let t = Tls::start(false);
    t.assert_ok(&t.pull(&["--insecure", &t.reg.addr()], &[]));
}

#[test]
fn insecure_for_another_registry_does_not_help() {
    let t = Tls::start(false);
    let other = format!("127.0.0.1:{}", free_port());
    let (o, _) = t.pull(&["--retries", "0", "--insecure", &other], &[]);
    assert_cert_error(&o);
}

#[test]
fn basic_auth_over_tls() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(pki_dir.path(), &["127.0.0.1", "localhost"]);
    let image = big_image(22);
    let reg = htpasswd_registry(
        &[("carol", "tls-Pa55word")],
        seeded(&[(REPO, "v1", &image)]),
        Some(&pki),
    );
    let sb = Sandbox::new();
    let (_d, dest) = dest();
    let o = sb.pull_stdin(
        &[
            "--ca-file",
            s(&pki.ca_cert),
            "--username",
            "carol",
            "--password-stdin",
        ],
        &[],
        &format!("{}/{REPO}:v1", reg.addr()),
        &dest,
        Some(b"tls-Pa55word\n"),
    );
    assert_pulled(&dest, &image, &o);
    assert!(!stderr(&o).contains("tls-Pa55word"));
}

/// `--insecure` names the registry only: the CDN it redirects blobs to is still verified.
#[test]
fn insecure_registry_does_not_extend_to_its_cdn() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(pki_dir.path(), &["127.0.0.1", "127.0.0.2"]);
    let image = big_image(23);
    let (reg, cdn) = crate::support::cdn::seeded_registry_with_cdn(
        seeded(&[(REPO, "v1", &image)]),
        Some(&pki),
        |seed, redirect| {
            RegistryOptions::new()
                .tls(&pki.server_cert, &pki.server_key)
                .serve_storage_of(seed)
                .extra_config(redirect)
                .start()
        },
    );
    let sb = Sandbox::new();
    let image_ref = format!("{}/{REPO}:v1", reg.addr());

    // The bare host covers every port of 127.0.0.1, and nothing of 127.0.0.2.
    let (_d1, refused) = dest();
    let o = sb.pull(
        &["--retries", "0", "--insecure", "127.0.0.1"],
        &[],
        &image_ref,
        &refused,
    );
    assert_cert_error(&o);
    assert!(
        stderr(&o).contains("127.0.0.2"),
        "not the CDN's certificate that failed:\n{}",
        text(&o)
    );

    // With the CA trusted, the same pull goes through the CDN.
    let (_d2, pulled) = dest();
    let o = sb.pull(
        &["--insecure", "127.0.0.1", "--ca-file", s(&pki.ca_cert)],
        &[],
        &image_ref,
        &pulled,
    );
    assert_pulled(&pulled, &image, &o);
    let log = cdn.access_log();
    assert!(log.contains(hex(&image.layers[0].digest)), "{log}");
}

/// A certs.d entry that cannot be used (a client certificate without its key) is reported
/// as such, not retried, and never answered by falling back to plain HTTP.
#[test]
fn unusable_cert_dir_files_are_reported_not_bypassed() {
    let t = Tls::start(false);
    let root = t.cert_dir(&t.reg.addr(), false);
    copy(
        &t.pki.client_cert,
        &root.join(t.reg.addr()).join("client.cert"),
    );
    let (o, _) = t.pull(&["--cert-dir", s(&root)], &[]);
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(err.contains("client.key"), "{}", text(&o));
    assert!(!err.contains("retr"), "retried:\n{}", text(&o));
    assert!(
        !err.contains("http://"),
        "fell back to plain HTTP:\n{}",
        text(&o)
    );
}
