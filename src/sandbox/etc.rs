//! `/etc` as an allowlist: the sandbox sees what tools need from the host's
//! `/etc` and nothing else, because a daemon's host may keep keys there
//! that its agents' uid can read. `passwd` and `group` are generated: the
//! agent's own account, root and nobody, no one else.
//!
//! Each entry is shown read-only when it exists on the host; the line of
//! why beside it is the bar a new entry has to pass.

/// What the sandbox shows of the host's `/etc`.
pub const ALLOWED: &[(&str, &str)] = &[
    ("/etc/hosts", "name resolution of localhost and the host's fixed names"),
    ("/etc/resolv.conf", "DNS servers (the proxy resolves, but tools read it to decide they have a resolver)"),
    ("/etc/nsswitch.conf", "how libc looks names up"),
    ("/etc/host.conf", "libc's resolver options"),
    ("/etc/gai.conf", "address sorting of getaddrinfo"),
    ("/etc/services", "port names (getaddrinfo, Perl, Python)"),
    ("/etc/protocols", "protocol names (getprotobyname)"),
    ("/etc/ssl", "CA certificates; `private/` inside is unreadable to agents, and masked"),
    ("/etc/ca-certificates", "the CA bundle's sources, which some tools read"),
    ("/etc/ca-certificates.conf", "which CAs are enabled"),
    ("/etc/pki", "CA bundles on Fedora-style systems"),
    ("/etc/ld.so.cache", "the dynamic loader's library index: without it programs fail to start"),
    ("/etc/ld.so.conf", "the dynamic loader's search path"),
    ("/etc/ld.so.conf.d", "as ld.so.conf"),
    ("/etc/localtime", "the host's time zone"),
    ("/etc/timezone", "the time zone's name (Debian)"),
    ("/etc/alternatives", "Debian's links behind /usr/bin/java, editor, python and more"),
    ("/etc/mime.types", "file types (Python's mimetypes, curl)"),
    ("/etc/magic", "file(1)'s local rules"),
    ("/etc/os-release", "which distribution this is (package managers, Python's platform)"),
    ("/etc/debian_version", "as os-release"),
    ("/etc/environment", "read by PAM-less tools for defaults; holds no secrets by convention"),
    ("/etc/gitconfig", "the host's git defaults (agents run git)"),
    ("/etc/gitattributes", "as gitconfig"),
    ("/etc/inputrc", "readline's key bindings"),
    ("/etc/terminfo", "terminal descriptions"),
    ("/etc/profile", "login shells' defaults"),
    ("/etc/profile.d", "as profile"),
    ("/etc/bash.bashrc", "bash's defaults"),
    ("/etc/python3", "Debian's Python configuration"),
    ("/etc/perl", "Debian's Perl configuration"),
    ("/etc/java-17-openjdk", "the JVM's configuration, which its /usr/lib/jvm tree links to"),
    ("/etc/java-21-openjdk", "as java-17-openjdk"),
    ("/etc/xdg", "default settings of desktop-style tools (fontconfig, mime)"),
    ("/etc/fonts", "fontconfig, for headless browsers"),
    ("/etc/chromium", "Chromium's defaults, for headless browser tests"),
    ("/etc/chromium.d", "as chromium"),
];

/// The generated `/etc/passwd` for an agent running as `uid`/`gid`, whose
/// home is `home`.
pub fn passwd(uid: u32, gid: u32, home: &str) -> String {
    let mut out = String::from("root:x:0:0:root:/root:/usr/sbin/nologin\n");
    if uid != 65534 {
        out.push_str("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n");
    }
    out.push_str(&format!("agent:x:{uid}:{gid}:baton agent:{home}:/bin/sh\n"));
    out
}

/// The generated `/etc/group`.
pub fn group(gid: u32) -> String {
    let mut out = String::from("root:x:0:\n");
    if gid != 65534 {
        out.push_str("nogroup:x:65534:\n");
    }
    out.push_str(&format!("agent:x:{gid}:\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowlist_names_no_secret_and_every_entry_says_why() {
        for (path, why) in ALLOWED {
            assert!(path.starts_with("/etc/"), "{path}");
            assert!(!why.is_empty(), "{path}");
            // npmrc and pip.conf often hold a registry's credentials.
            for secret in ["shadow", "sudoers", "ssh", "opasswd", "security", "krb5.keytab", "npmrc", "pip.conf"] {
                assert!(!path.contains(secret), "{path}");
            }
        }
    }

    #[test]
    fn the_agent_is_the_only_account_besides_root_and_nobody() {
        let text = passwd(65534, 65534, "/home/agent");
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("agent:x:65534:65534:baton agent:/home/agent:/bin/sh"));
        assert_eq!(passwd(1000, 1000, "/h").lines().count(), 3);
        assert!(group(1000).contains("agent:x:1000:"));
    }
}
