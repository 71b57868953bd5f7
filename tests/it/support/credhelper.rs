//! Fake docker credential helpers: a `docker-credential-<name>` shell script written into a
//! directory that the test puts first on `PATH` (see [`super::cli::Sandbox::bin_dir`]).
//!
//! `get` reads the server from stdin, appends it to a log, and prints the JSON configured for
//! that exact server with [`CredHelper::set`]; for any other server it prints
//! `credentials not found in native keychain` and exits 1, as the real helpers do.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// One installed helper.
pub struct CredHelper {
    name: String,
    data: PathBuf,
}

impl CredHelper {
    /// Writes `bin_dir/docker-credential-<name>`; its data goes to `bin_dir/.<name>-data/`.
    pub fn install(bin_dir: &Path, name: &str) -> CredHelper {
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "helper name {name:?}"
        );
        let data = bin_dir.join(format!(".{name}-data"));
        std::fs::create_dir_all(data.join("secrets")).expect("helper data dir");
        let script = format!(
            r#"#!/bin/sh
# Fake docker credential helper for fastpull's tests.
data='{data}'
server=$(cat)
printf '%s %s\n' "$1" "$server" >> "$data/calls.log"
if [ "$1" != get ]; then
  echo "unsupported action $1" >&2
  exit 1
fi
key=$(printf '%s' "$server" | tr -c 'A-Za-z0-9._-' '_')
if [ -f "$data/secrets/$key.json" ]; then
  cat "$data/secrets/$key.json"
  exit 0
fi
echo "credentials not found in native keychain"
exit 1
"#,
            data = data.display()
        );
        let path = bin_dir.join(format!("docker-credential-{name}"));
        std::fs::write(&path, script).expect("write credential helper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod credential helper");
        CredHelper {
            name: name.to_string(),
            data,
        }
    }

    /// The helper's name (`credsStore` / `credHelpers` value).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Answer `get` for `server` (exactly as fastpull writes it to stdin) with these
    /// credentials; `username` `<token>` makes `secret` an identity token.
    pub fn set(&self, server: &str, username: &str, secret: &str) {
        let key: String = server
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let json = serde_json::json!({
            "ServerURL": server,
            "Username": username,
            "Secret": secret,
        });
        std::fs::write(
            self.data.join("secrets").join(format!("{key}.json")),
            json.to_string(),
        )
        .expect("write helper secret");
    }

    /// Every call so far: `(action, stdin)`.
    pub fn calls(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.data.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let (a, s) = l.split_once(' ').unwrap_or((l, ""));
                (a.to_string(), s.to_string())
            })
            .collect()
    }
}
