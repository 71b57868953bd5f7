//! Image references, parsed and normalised the way docker does.
//!
//! `alpine` is `docker.io/library/alpine:latest`; `ns/repo:tag`, `host:port/a/b/c:tag`,
//! `repo@sha256:…` and `repo:tag@sha256:…` (the digest wins) follow the grammar of
//! distribution's `reference` package.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// The registry name docker uses for Docker Hub.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
const NAME_MAX: usize = 255;
const TAG_MAX: usize = 128;

/// A parsed, normalised image reference.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why a string is not a valid image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Nothing to parse.
    #[error("image reference is empty")]
    Empty,
    /// A tag or digest with no repository before it.
    #[error("invalid reference {0:?}: no repository name")]
    MissingName(String),
    /// A repository named by 64 hex digits, which docker refuses (it reads as an image id).
    #[error("invalid reference {0:?}: a repository name cannot be a 64-digit hexadecimal string")]
    HexName(String),
    /// Upper case in the repository path.
    #[error("invalid reference {0:?}: repository name must be lowercase")]
    Uppercase(String),
    /// A path component breaks the grammar.
    #[error("invalid reference {reference:?}: bad repository path component {component:?} (lowercase letters, digits and single separators . _ __ -)")]
    BadPath {
        /// The whole reference.
        reference: String,
        /// The offending component.
        component: String,
    },
    /// The registry host or port is malformed.
    #[error("invalid reference {reference:?}: bad registry host {host:?}")]
    BadHost {
        /// The whole reference.
        reference: String,
        /// The offending host.
        host: String,
    },
    /// The tag breaks `[\w][\w.-]{0,127}`.
    #[error("invalid reference {reference:?}: bad tag {tag:?} (letters, digits, _ . -, at most 128, not starting with . or -)")]
    BadTag {
        /// The whole reference.
        reference: String,
        /// The offending tag.
        tag: String,
    },
    /// The digest is malformed or not sha256.
    #[error("invalid reference {reference:?}: {source}")]
    BadDigest {
        /// The whole reference.
        reference: String,
        /// What is wrong with the digest.
        source: DigestError,
    },
    /// The repository name is longer than 255 characters.
    #[error("invalid reference {0:?}: repository name longer than 255 characters")]
    NameTooLong(String),
}

impl Reference {
    /// The registry as named (`docker.io`, `ghcr.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host\[:port\] that serves the registry API (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The repository path (`library/alpine`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if one was given (or `latest` when neither tag nor digest was).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The pinned manifest digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The repository as docker shows it in `Pulling from …` (`library/alpine`).
    pub fn familiar_repository(&self) -> &str {
        &self.repository
    }

    /// The name as docker shows it (`FamiliarName`): `alpine` for
    /// `docker.io/library/alpine`, `ns/repo` for Docker Hub's other repositories,
    /// `registry/repository` elsewhere. What `docker save` writes in `RepoTags`.
    pub fn familiar_name(&self) -> String {
        if self.registry != DOCKER_HUB {
            return self.name();
        }
        match self.repository.strip_prefix("library/") {
            Some(official) if !official.contains('/') => official.to_string(),
            _ => self.repository.clone(),
        }
    }

    /// The same repository under `tag`, without a digest. `None` if `tag` is not a valid
    /// tag (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`).
    pub fn with_tag(&self, tag: &str) -> Option<Reference> {
        valid_tag(tag).then(|| Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse(input)
    }
}

fn parse(input: &str) -> Result<Reference, ReferenceError> {
    if input.is_empty() {
        return Err(ReferenceError::Empty);
    }
    let whole = || input.to_string();

    let (rest, digest) = match input.rsplit_once('@') {
        Some((rest, d)) => {
            let digest = d
                .parse::<Digest>()
                .map_err(|source| ReferenceError::BadDigest {
                    reference: whole(),
                    source,
                })?;
            (rest, Some(digest))
        }
        None => (input, None),
    };

    // A tag follows the last ':' only when no '/' comes after it (else it is a port).
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag {
        if !valid_tag(tag) {
            return Err(ReferenceError::BadTag {
                reference: whole(),
                tag: tag.to_string(),
            });
        }
    }
    if name.is_empty() {
        return Err(ReferenceError::MissingName(whole()));
    }

    let (registry, path) = split_domain(name);
    if let Some(host) = registry {
        if !valid_domain(host) {
            return Err(ReferenceError::BadHost {
                reference: whole(),
                host: host.to_string(),
            });
        }
    }
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ReferenceError::Uppercase(whole()));
    }
    for component in path.split('/') {
        if !valid_path_component(component) {
            return Err(ReferenceError::BadPath {
                reference: whole(),
                component: component.to_string(),
            });
        }
    }
    if name.len() > NAME_MAX {
        return Err(ReferenceError::NameTooLong(whole()));
    }
    if path.len() == 64 && path.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ReferenceError::HexName(whole()));
    }

    let registry = match registry {
        None | Some("index.docker.io") => DOCKER_HUB.to_string(),
        Some(r) => r.to_string(),
    };
    let repository = if registry == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    let tag = match (tag, &digest) {
        (Some(t), _) => Some(t.to_string()),
        (None, None) => Some("latest".to_string()),
        (None, Some(_)) => None,
    };
    Ok(Reference {
        registry,
        repository,
        tag,
        digest,
    })
}

/// Splits `host[:port]/path` the way docker does: the first component is a registry when it
/// has a `.` or `:`, is `localhost`, or has upper case (repositories never do).
fn split_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn valid_domain(domain: &str) -> bool {
    // IPv6 literal in brackets, optional port.
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        // distribution's grammar: hex digits and colons only (no embedded IPv4).
        if !v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
            || v6.parse::<std::net::Ipv6Addr>().is_err()
        {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        }
    };
    if let Some(port) = port {
        // Digits only (distribution's grammar): Rust's parse also takes a leading `+`.
        if port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err()
        {
            return false;
        }
    }
    if host.is_empty() {
        return domain.starts_with('[');
    }
    host.split('.').all(|c| {
        !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !c.starts_with('-')
            && !c.ends_with('-')
    })
}

/// `[a-z0-9]+ ( ( [_.] | __ | -+ ) [a-z0-9]+ )*`
fn valid_path_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= TAG_MAX
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn p(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn official_image_is_normalised() {
        let r = p("alpine");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository(), "library/alpine");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(r.manifest_reference(), "latest");
    }

    #[test]
    fn namespaced_hub_repo_with_tag() {
        let r = p("bitnami/redis:7.2");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "bitnami/redis");
        assert_eq!(r.tag(), Some("7.2"));
        assert_eq!(p("docker.io/ubuntu").repository(), "library/ubuntu");
        assert_eq!(
            p("index.docker.io/ubuntu:22.04").to_string(),
            "docker.io/library/ubuntu:22.04"
        );
    }

    #[test]
    fn host_port_and_deep_paths() {
        let r = p("localhost:5000/a/b/c:v1.0-rc_1");
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.api_host(), "localhost:5000");
        assert_eq!(r.repository(), "a/b/c");
        assert_eq!(r.tag(), Some("v1.0-rc_1"));
        let r = p("127.0.0.1:39999/ns/repo");
        assert_eq!(r.registry(), "127.0.0.1:39999");
        assert_eq!(r.tag(), Some("latest"));
        let r = p("ghcr.io/owner/img");
        assert_eq!(r.registry(), "ghcr.io");
        assert_eq!(r.repository(), "owner/img");
        assert_eq!(p("localhost/foo").registry(), "localhost");
        assert_eq!(p("[::1]:5000/foo:t").registry(), "[::1]:5000");
        // A first component without '.', ':' or "localhost" is a Hub namespace.
        assert_eq!(p("myhost/foo").registry(), "docker.io");
        assert_eq!(p("myhost/foo").repository(), "myhost/foo");
    }

    #[test]
    fn digests_pin_the_manifest() {
        let r = p(&format!("repo@{D}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().to_string(), D);
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/repo@{D}"));

        let r = p(&format!("host:5000/ns/repo:tag@{D}"));
        assert_eq!(r.tag(), Some("tag"));
        assert_eq!(r.manifest_reference(), D, "the digest wins over the tag");
        assert_eq!(r.registry(), "host:5000");
    }

    #[test]
    fn separators_follow_the_grammar() {
        for ok in ["a.b", "a_b", "a__b", "a-b", "a---b", "a0/b-1/c_2.d"] {
            p(ok);
        }
        for bad in [
            "a..b", "a___b", "a._b", "-a", "a-", "_a", "a/", "/a", "a//b", "a.-b",
        ] {
            assert!(
                matches!(
                    bad.parse::<Reference>(),
                    Err(ReferenceError::BadPath { .. })
                ),
                "{bad} should be a bad path, got {:?}",
                bad.parse::<Reference>()
            );
        }
    }

    #[test]
    fn invalid_references_name_the_problem() {
        assert_eq!("".parse::<Reference>(), Err(ReferenceError::Empty));
        assert!(matches!(
            "Alpine".parse::<Reference>(),
            Err(ReferenceError::Uppercase(_))
        ));
        assert!(matches!(
            "docker.io/Library/alpine".parse::<Reference>(),
            Err(ReferenceError::Uppercase(_))
        ));
        assert!(matches!(
            "alpine:".parse::<Reference>(),
            Err(ReferenceError::BadTag { .. })
        ));
        assert!(matches!(
            "alpine:-x".parse::<Reference>(),
            Err(ReferenceError::BadTag { .. })
        ));
        // "alpine:a" before a '/' reads as host:port, and "a" is no port.
        assert!(matches!(
            "alpine:a/b".parse::<Reference>(),
            Err(ReferenceError::BadHost { .. })
        ));
        let long_tag = format!("alpine:{}", "a".repeat(129));
        assert!(matches!(
            long_tag.parse::<Reference>(),
            Err(ReferenceError::BadTag { .. })
        ));
        p(&format!("alpine:{}", "a".repeat(128)));
        assert!(matches!(
            "alpine@sha256:abc".parse::<Reference>(),
            Err(ReferenceError::BadDigest { .. })
        ));
        assert!(matches!(
            "alpine@md5:abc".parse::<Reference>(),
            Err(ReferenceError::BadDigest { .. })
        ));
        assert!(matches!(
            "bad_host.io:port/x".parse::<Reference>(),
            Err(ReferenceError::BadHost { .. })
        ));
        assert!(matches!(
            ":tag".parse::<Reference>(),
            Err(ReferenceError::MissingName(_))
        ));
        assert!(matches!(
            format!("@{D}").parse::<Reference>(),
            Err(ReferenceError::MissingName(_))
        ));
        assert!(matches!(
            "a".repeat(64).parse::<Reference>(),
            Err(ReferenceError::HexName(_))
        ));
        p(&format!("ns/{}", "a".repeat(64)));
        assert!(matches!(
            "host:99999/x".parse::<Reference>(),
            Err(ReferenceError::BadHost { .. })
        ));
        // Digits only: Rust's integer parse takes a sign (red without the check).
        assert!(matches!(
            "host:+5000/x".parse::<Reference>(),
            Err(ReferenceError::BadHost { .. })
        ));
        assert!(matches!(
            "[::ffff:1.2.3.4]/r".parse::<Reference>(),
            Err(ReferenceError::BadHost { .. })
        ));
        let long = format!("{}/x", "a".repeat(256));
        assert!(matches!(
            long.parse::<Reference>(),
            Err(ReferenceError::NameTooLong(_))
        ));
        let msg = "Alpine".parse::<Reference>().unwrap_err().to_string();
        assert!(msg.contains("lowercase"), "{msg}");
    }

    #[test]
    fn familiar_names_as_docker_writes_them() {
        assert_eq!(p("alpine").familiar_name(), "alpine");
        assert_eq!(p("docker.io/library/alpine:3").familiar_name(), "alpine");
        assert_eq!(p("ns/repo").familiar_name(), "ns/repo");
        assert_eq!(
            p("127.0.0.1:5000/a/b:c").familiar_name(),
            "127.0.0.1:5000/a/b"
        );
        let r = p("127.0.0.1:5000/a/b");
        assert_eq!(
            r.with_tag("v2").unwrap().to_string(),
            "127.0.0.1:5000/a/b:v2"
        );
        assert!(r.with_tag("bad tag").is_none());
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "docker.io/library/alpine:latest",
            "127.0.0.1:5000/a/b:t",
            &format!("ghcr.io/o/r:t@{D}"),
        ] {
            assert_eq!(p(s).to_string(), s);
            assert_eq!(p(&p(s).to_string()), p(s));
        }
    }
}
