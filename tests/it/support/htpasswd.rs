//! Basic-auth registries: `auth: htpasswd` with bcrypt hashes made by Debian's `htpasswd`
//! (apache2-utils).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::registry::{Registry, RegistryOptions};
use super::tls::TestPki;

/// The `realm` our htpasswd registries announce.
pub const REALM: &str = "fastpull-test-basic";

/// Writes an htpasswd file of bcrypt hashes (cost 4: fast) for `users` to `path`.
pub fn write_htpasswd(path: &Path, users: &[(&str, &str)]) {
    let mut contents = String::new();
    for (user, password) in users {
        let out = Command::new("htpasswd")
            .args(["-n", "-b", "-B", "-C", "4", user, password])
            .output()
            .expect("htpasswd is required (Debian apache2-utils): run scripts/deps");
        assert!(
            out.status.success(),
            "htpasswd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        contents.push_str(String::from_utf8_lossy(&out.stdout).trim());
        contents.push('\n');
    }
    std::fs::write(path, contents).expect("write htpasswd file");
}

/// The registry's `auth:` section for the htpasswd file at `path`.
pub fn htpasswd_yaml(path: &Path) -> String {
    format!(
        "auth:\n  htpasswd:\n    realm: \"{REALM}\"\n    path: \"{}\"\n",
        path.display()
    )
}

/// A registry demanding Basic auth of `users`, serving what was pushed to `seed`, over HTTPS
/// with `pki`'s server certificate when given.
pub fn htpasswd_registry(
    users: &[(&str, &str)],
    seed: Registry,
    pki: Option<&TestPki>,
) -> Registry {
    // Kept in the seed's temp dir, which lives as long as the new registry.
    let file: PathBuf = seed.dir().join("htpasswd");
    write_htpasswd(&file, users);
    let mut opts = RegistryOptions::new()
        .extra_config(&htpasswd_yaml(&file))
        .serve_storage_of(seed);
    if let Some(pki) = pki {
        opts = opts.tls(&pki.server_cert, &pki.server_key);
    }
    opts.start()
}
