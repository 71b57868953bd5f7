//! A throw-away certificate authority (rcgen) and a server certificate it signed, written
//! as PEM files for nginx; fastpull trusts the CA through `SSL_CERT_FILE`, which the
//! system-roots loader honours. The CA also signs a client certificate (for registries that
//! demand one).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

/// PEM files of a CA, of a server certificate for `hosts` and of a client certificate, both
/// signed by the CA.
pub struct TestPki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client certificate (CN `fastpull test client`, extended key usage clientAuth).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// Writes `ca.pem`, `server.pem`, `server.key`, `client.pem` and `client.key` into `dir`.
    pub fn create(dir: &Path, hosts: &[&str]) -> TestPki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fastpull test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate().expect("server key");
        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let params = CertificateParams::new(names).expect("server params");
        let cert = params.signed_by(&key, &issuer).expect("sign server cert");

        let client_key = KeyPair::generate().expect("client key");
        let mut client_params =
            CertificateParams::new(Vec::<String>::new()).expect("client params");
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fastpull test client");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &issuer)
            .expect("sign client cert");

        let pki = TestPki {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        std::fs::write(&pki.ca_cert, ca_cert.pem()).expect("write ca.pem");
        std::fs::write(&pki.server_cert, cert.pem()).expect("write server.pem");
        std::fs::write(&pki.server_key, key.serialize_pem()).expect("write server.key");
        std::fs::write(&pki.client_cert, client_cert.pem()).expect("write client.pem");
        std::fs::write(&pki.client_key, client_key.serialize_pem()).expect("write client.key");
        pki
    }
}
