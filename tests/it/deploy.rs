//! deploy/: what can be checked here without Docker or a cluster. The
//! systemd unit passes `systemd-analyze verify`; every YAML file parses and
//! says what a single-writer daemon needs; the Dockerfile builds in stages
//! and runs unprivileged with a health check; the shipped config loads.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(deploy().join("baton.service")).unwrap();
    for key in ["NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/baton", "Restart=on-failure"] {
        assert!(unit.lines().any(|l| l == key), "baton.service lacks {key}");
    }
    assert!(unit.lines().any(|l| l.starts_with("User=")), "its own user");
    // verify wants ExecStart to exist: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("baton.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/baton", crate::harness::BIN)).unwrap();
    let out =
        Command::new("systemd-analyze").arg("verify").arg(&copy).output().expect("systemd-analyze (Debian: systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_unit: Vec<&str> = stderr.lines().filter(|l| l.contains("baton.service")).collect();
    assert!(out.status.success() && about_unit.is_empty(), "{stderr}");
}

#[test]
fn every_yaml_manifest_parses_and_runs_one_replica_with_probes_and_a_volume() {
    let mut kinds = Vec::new();
    let mut files = vec![deploy().join("docker-compose.yml")];
    for entry in std::fs::read_dir(deploy().join("kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            files.push(path);
        }
    }
    for file in &files {
        for doc in yaml_documents(file) {
            if let Some(kind) = doc["kind"].as_str() {
                kinds.push(kind.to_string());
                if kind == "Deployment" {
                    assert_eq!(doc["spec"]["replicas"].as_u64(), Some(1), "one writer for the store");
                    assert_eq!(doc["spec"]["strategy"]["type"].as_str(), Some("Recreate"));
                    let c = &doc["spec"]["template"]["spec"]["containers"][0];
                    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
                    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
                    let env = c["env"].as_sequence().unwrap();
                    assert!(env
                        .iter()
                        .all(|e| e["valueFrom"]["secretKeyRef"]["name"].as_str() == Some("baton-secrets")));
                    assert_eq!(
                        doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"].as_bool(),
                        Some(true)
                    );
                }
            }
        }
    }
    kinds.sort();
    assert_eq!(kinds, ["ConfigMap", "ConfigMap", "Deployment", "PersistentVolumeClaim", "Secret", "Service"]);
    let compose = &yaml_documents(&deploy().join("docker-compose.yml"))[0];
    let volumes = compose["services"]["baton"]["volumes"].as_sequence().unwrap();
    assert!(volumes.iter().any(|v| v.as_str().is_some_and(|v| v.starts_with("baton-data:/var/lib/baton"))));
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_unprivileged_with_a_health_check() {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let stages: Vec<&str> = lines.iter().filter(|l| l.starts_with("FROM ")).copied().collect();
    assert_eq!(stages.len(), 3, "build, symbols, runtime: {stages:?}");
    assert!(stages[2].ends_with(" AS runtime"), "the runtime stage is the default target: {stages:?}");
    // What ships is lean; its debug info is a stage of its own.
    assert!(text.contains("&& deploy/split-debug target/release/baton target/release/baton-sandbox-init"));
    assert!(stages[1] == "FROM scratch AS symbols" && text.contains("/src/target/release/baton.debug"));
    assert!(lines.iter().any(|l| l.starts_with("USER ") && !l.ends_with("root")));
    assert!(lines.iter().any(|l| l.starts_with("HEALTHCHECK ")));
    assert!(text.contains("git") && text.contains("ca-certificates"));
}

#[test]
fn the_shipped_configs_load() {
    let out = Command::new(crate::harness::BIN)
        .args(["check", "--config"])
        .arg(deploy().join("baton.toml"))
        .env("BATON_API_TOKEN", "t")
        .env("GITHUB_WEBHOOK_SECRET", "s")
        .output()
        .unwrap();
    // The container's config names its trigger folder relative to itself;
    // here that folder does not exist, which `check` reports but tolerates.
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The ConfigMaps: the config and its triggers, laid out as mounted.
    let maps = yaml_documents(&deploy().join("kubernetes/configmap.yaml"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("baton.toml"), maps[0]["data"]["baton.toml"].as_str().unwrap()).unwrap();
    std::fs::create_dir(dir.path().join("triggers")).unwrap();
    for (name, text) in maps[1]["data"].as_mapping().unwrap() {
        std::fs::write(dir.path().join("triggers").join(name.as_str().unwrap()), text.as_str().unwrap()).unwrap();
    }
    let out = Command::new(crate::harness::BIN)
        .args(["check", "--config", "baton.toml"])
        .current_dir(dir.path())
        .env("BATON_API_TOKEN", "t")
        .env("GITHUB_WEBHOOK_SECRET", "s")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// The multi-replica variant: N replicas rolled one at a time, the database
/// URL from the Secret, workspaces per pod, and a config that is valid and
/// wants exactly that database.
#[test]
fn the_replicas_variant_rolls_several_pods_on_one_database() {
    let dir = deploy().join("kubernetes/replicas");
    let deployment = &yaml_documents(&dir.join("deployment.yaml"))[0];
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    assert_eq!(deployment["spec"]["strategy"]["type"].as_str(), Some("RollingUpdate"));
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let env = c["env"].as_sequence().unwrap();
    let db = env.iter().find(|e| e["name"].as_str() == Some("DATABASE_URL")).expect("DATABASE_URL");
    assert_eq!(db["valueFrom"]["secretKeyRef"]["name"].as_str(), Some("baton-secrets"));
    let secret = &yaml_documents(&dir.join("secret.example.yaml"))[0];
    let key = db["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap();
    assert!(secret["stringData"][key].as_str().is_some_and(|u| u.starts_with("postgres://")));
    // The storage folder is a volume of each pod's own.
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/var/lib/baton"))
        .unwrap();
    let volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert!(volume["emptyDir"].is_mapping(), "{volume:?}");

    // The config is valid; the only thing `check` misses is the database.
    let maps = yaml_documents(&dir.join("configmap.yaml"));
    let work = tempfile::tempdir().unwrap();
    let config = maps[0]["data"]["baton.toml"].as_str().unwrap();
    assert!(config.contains("backend = \"postgres\"") && config.contains("url = \"env:DATABASE_URL\""));
    std::fs::write(work.path().join("baton.toml"), config).unwrap();
    std::fs::create_dir(work.path().join("triggers")).unwrap();
    for (name, text) in maps[1]["data"].as_mapping().unwrap() {
        std::fs::write(work.path().join("triggers").join(name.as_str().unwrap()), text.as_str().unwrap()).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new(crate::harness::BIN)
        .args(["check", "--config", "baton.toml"])
        .current_dir(work.path())
        .env("BATON_API_TOKEN", "t")
        .env("GITHUB_WEBHOOK_SECRET", "s")
        .env("DATABASE_URL", format!("postgres://baton@127.0.0.1:{port}/baton"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = text.lines().filter(|l| !l.starts_with("ok:")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    assert!(errors[0].contains("cannot reach the database"), "{text}");
}

/// `deploy/split-debug`, as the Dockerfile runs it on the release build:
/// the binary keeps its code and symbols and loses its DWARF, which goes to
/// `BINARY.debug`, named by the binary's debug link; the binary still runs.
#[test]
fn split_debug_leaves_a_lean_binary_and_its_symbols_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("baton");
    std::fs::copy(crate::harness::BIN, &bin).unwrap();
    let sections = |path: &Path| {
        let out = Command::new("readelf").args(["-SW"]).arg(path).output().expect("readelf");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(sections(&bin).contains(".debug_line"), "the test binary has line tables to split");
    let before = std::fs::metadata(&bin).unwrap().len();
    let out = Command::new(deploy().join("split-debug")).arg(&bin).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = std::fs::metadata(&bin).unwrap().len();
    let lean = sections(&bin);
    for dwarf in [".debug_info", ".debug_line", ".debug_str", ".debug_ranges", ".debug_loc"] {
        assert!(!lean.contains(dwarf), "{dwarf} left: {lean}");
    }
    assert!(lean.contains(".gnu_debuglink") && lean.contains(".symtab"), "{lean}");
    assert!(after < before, "{before} bytes before, {after} after");
    let symbols = sections(&dir.path().join("baton.debug"));
    assert!(symbols.contains(".debug_line") && symbols.contains(".debug_info"), "{symbols}");
    let version = Command::new(&bin).arg("--version").output().unwrap();
    assert!(version.status.success() && String::from_utf8_lossy(&version.stdout).starts_with("baton "));
}
