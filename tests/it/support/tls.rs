//! A throw-away certificate authority (rcgen) and a server certificate it signed, written
//! as PEM files for nginx; fastpull trusts the CA through `SSL_CERT_FILE`, which the
//! system-roots loader honours.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// PEM files of a CA and of a server certificate for `hosts`.
pub struct TestPki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestPki {
    /// Writes `ca.pem`, `server.pem` and `server.key` into `dir`.
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

        let pki = TestPki {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        };
        std::fs::write(&pki.ca_cert, ca_cert.pem()).expect("write ca.pem");
        std::fs::write(&pki.server_cert, cert.pem()).expect("write server.pem");
        std::fs::write(&pki.server_key, key.serialize_pem()).expect("write server.key");
        pki
    }
}
