//! Checks on the deployment artifacts under `deploy/`, as an operator would
//! rely on them: every YAML and JSON file parses, the Kubernetes, ECS and
//! Compose files wire keygate the way docs/operating.md describes (probes on
//! the admin port, the Service and load balancer on keygate's port, secrets
//! from the environment, grace periods longer than `shutdown_grace`), the
//! embedded keygate TOML parses, the Dockerfile only copies files that exist,
//! and the image's health-check script answers correctly against a real
//! socket. `systemd-analyze verify` on the unit is in `.ci/check-deploy.sh`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn yaml_docs(text: &str, what: &str) -> Vec<Yaml> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn toml_table(text: &str, what: &str) -> toml::Table {
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{what}: invalid TOML: {e}"))
}

fn toml_str<'a>(t: &'a toml::Table, section: &str, key: &str, what: &str) -> &'a str {
    t.get(section)
        .and_then(|s| s.get(key))
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("{what}: [{section}] {key} missing or not a string"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("not host:port: {addr}"))
}

/// A contract duration ("250ms", "30s", "1m") in milliseconds.
fn millis(d: &str) -> u64 {
    let split = d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len());
    let (n, unit) = d.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("bad duration {d}"));
    match unit {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => panic!("bad duration unit in {d}"),
    }
}

/// Facts every deployed keygate TOML must have; returns the table.
fn check_keygate_toml(text: &str, what: &str) -> toml::Table {
    let t = toml_table(text, what);
    let upstream = toml_str(&t, "upstream", "url", what);
    assert!(
        upstream.starts_with("http://") || upstream.starts_with("https://"),
        "{what}: [upstream] url = {upstream}"
    );
    assert_eq!(
        toml_str(&t, "store", "backend", what),
        "redis",
        "{what}: a deployment uses the Redis store"
    );
    assert_eq!(
        toml_str(&t, "store", "url", what),
        "env:KEYGATE_REDIS_URL",
        "{what}: the Redis URL (which may hold a password) comes from the environment"
    );
    millis(toml_str(&t, "listen", "shutdown_grace", what));
    validate_with_keygate(text, what);
    t
}

/// Validates with keygate's own config loader, as `keygate check` would
/// (every `env:` secret resolved to a local Redis URL).
fn validate_with_keygate(text: &str, what: &str) {
    if let Err(e) =
        keygate::config::Config::from_toml_str(text, &|_| Some("redis://127.0.0.1:6379/0".into()))
    {
        panic!("{what}: keygate rejects this config:\n{e}");
    }
}

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut files = Vec::new();
    files_under(&root().join("deploy"), &mut files);
    let (mut yaml, mut json) = (0, 0);
    for path in &files {
        let what = path
            .strip_prefix(root())
            .unwrap_or(path)
            .display()
            .to_string();
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                let text = std::fs::read_to_string(path).expect("read");
                assert!(!yaml_docs(&text, &what).is_empty(), "{what}: no document");
                yaml += 1;
            }
            Some("json") => {
                let text = std::fs::read_to_string(path).expect("read");
                serde_json::from_str::<Json>(&text)
                    .unwrap_or_else(|e| panic!("{what}: invalid JSON: {e}"));
                json += 1;
            }
            Some("toml") => {
                toml_table(&std::fs::read_to_string(path).expect("read"), &what);
            }
            _ => {}
        }
    }
    // k8s sidecar + secret example + compose; the ECS task definition.
    assert!(
        yaml >= 3,
        "expected at least 3 YAML files under deploy/, found {yaml}"
    );
    assert!(
        json >= 1,
        "expected the ECS task definition under deploy/, found {json} JSON files"
    );
}

fn by_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "deploy/k8s/keygate-sidecar.yaml: expected one {kind}"
    );
    found[0]
}

fn container<'a>(containers: &'a Yaml, name: &str) -> &'a Yaml {
    containers
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no container named {name}"))
}

#[test]
fn kubernetes_sidecar_wires_probes_service_config_and_secret() {
    let what = "deploy/k8s/keygate-sidecar.yaml";
    let docs = yaml_docs(&read(what), what);

    let cm = by_kind(&docs, "ConfigMap");
    let toml_text = cm["data"]["keygate.toml"]
        .as_str()
        .expect("ConfigMap data keygate.toml");
    let cfg = check_keygate_toml(toml_text, "ConfigMap keygate.toml");
    assert_eq!(
        toml_str(&cfg, "upstream", "url", what),
        "http://127.0.0.1:8080",
        "the app is reached on the pod's loopback"
    );
    let listen_port = port_of(toml_str(&cfg, "listen", "addr", what));
    let admin_addr = toml_str(&cfg, "admin", "addr", what);
    let admin_port = port_of(admin_addr);
    assert!(
        admin_addr.starts_with("0.0.0.0:"),
        "kubelet httpGet probes connect to the pod IP, so admin must not be loopback-only"
    );
    let grace_ms = millis(toml_str(&cfg, "listen", "shutdown_grace", what));

    let deploy = by_kind(&docs, "Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    let containers = &pod["containers"];
    let keygate = container(containers, "keygate");
    let app = container(containers, "app");

    // Probes on the admin listener.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &keygate[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert_eq!(
            get["port"].as_u64(),
            Some(u64::from(admin_port)),
            "{probe} port"
        );
    }
    assert_eq!(admin_port, 9090);

    // Grace period longer than keygate's drain (plus its preStop pause).
    let term_s = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        term_s * 1000 > grace_ms + 5_000,
        "terminationGracePeriodSeconds {term_s}s must exceed shutdown_grace + preStop"
    );

    // Hardening and resources.
    let sc = &keygate["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    let drops: Vec<&str> = sc["capabilities"]["drop"]
        .as_sequence()
        .expect("capabilities.drop")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(drops, ["ALL"]);
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                !keygate["resources"][kind][res].is_null(),
                "keygate resources.{kind}.{res} missing"
            );
        }
    }

    // The Service targets keygate's port; the app exposes none.
    assert!(
        app["ports"].is_null(),
        "the app container must not declare ports: only keygate is served"
    );
    let svc = by_kind(&docs, "Service");
    let svc_ports = svc["spec"]["ports"].as_sequence().expect("Service ports");
    assert_eq!(
        svc_ports.len(),
        1,
        "the Service exposes keygate's port only"
    );
    let target = &svc_ports[0]["targetPort"];
    let kg_ports = keygate["ports"].as_sequence().expect("keygate ports");
    let resolved = kg_ports
        .iter()
        .find(|p| match target {
            Yaml::String(name) => p["name"].as_str() == Some(name),
            other => p["containerPort"].as_u64() == other.as_u64(),
        })
        .unwrap_or_else(|| panic!("Service targetPort {target:?} is not a keygate port"));
    assert_eq!(
        resolved["containerPort"].as_u64(),
        Some(u64::from(listen_port)),
        "Service must reach keygate's [listen] addr port"
    );
    let pod_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let selector = svc["spec"]["selector"]
        .as_mapping()
        .expect("Service selector");
    for (k, v) in selector {
        assert_eq!(
            &pod_labels[k.as_str().expect("label key")],
            v,
            "Service selector {k:?}"
        );
    }

    // Config from the ConfigMap, mounted where the command reads it.
    let args: Vec<&str> = keygate["args"]
        .as_sequence()
        .expect("keygate args")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(args, ["serve", "--config", "/etc/keygate/keygate.toml"]);
    let mount = keygate["volumeMounts"]
        .as_sequence()
        .and_then(|ms| {
            ms.iter()
                .find(|m| m["mountPath"].as_str() == Some("/etc/keygate"))
        })
        .expect("keygate mounts /etc/keygate");
    let volume = pod["volumes"]
        .as_sequence()
        .and_then(|vs| vs.iter().find(|v| v["name"] == mount["name"]))
        .expect("the mounted volume is declared");
    assert_eq!(volume["configMap"]["name"], cm["metadata"]["name"]);

    // KEYGATE_REDIS_URL from the Secret that secret.example.yaml defines.
    let secret_what = "deploy/k8s/secret.example.yaml";
    let secret_docs = yaml_docs(&read(secret_what), secret_what);
    let secret = &secret_docs[0];
    assert_eq!(secret["kind"].as_str(), Some("Secret"));
    let env = keygate["env"]
        .as_sequence()
        .and_then(|es| {
            es.iter()
                .find(|e| e["name"].as_str() == Some("KEYGATE_REDIS_URL"))
        })
        .expect("keygate env KEYGATE_REDIS_URL");
    let key_ref = &env["valueFrom"]["secretKeyRef"];
    assert_eq!(key_ref["name"], secret["metadata"]["name"]);
    let key = key_ref["key"].as_str().expect("secretKeyRef key");
    let url = secret["stringData"][key]
        .as_str()
        .expect("the example Secret has the referenced key");
    assert!(url.starts_with("redis://") || url.starts_with("rediss://"));
}

fn ecs_container<'a>(td: &'a Json, name: &str) -> &'a Json {
    td["containerDefinitions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("ECS: no container {name}"))
}

#[test]
fn ecs_task_definition_runs_keygate_in_front_of_the_app() {
    let what = "deploy/ecs/task-definition.json";
    let td: Json = serde_json::from_str(&read(what)).expect("valid JSON");
    assert_eq!(
        td["networkMode"], "awsvpc",
        "the app is reached on the task's loopback"
    );

    let keygate = ecs_container(&td, "keygate");
    let app = ecs_container(&td, "app");
    let writer = ecs_container(&td, "keygate-config");
    assert_eq!(keygate["essential"], true);
    assert_eq!(app["essential"], true);
    assert_eq!(
        writer["essential"], false,
        "the config writer exits after writing"
    );
    assert!(app.get("portMappings").is_none(), "only keygate is served");

    let deps: BTreeMap<&str, &str> = keygate["dependsOn"]
        .as_array()
        .expect("keygate dependsOn")
        .iter()
        .map(|d| {
            (
                d["containerName"].as_str().expect("containerName"),
                d["condition"].as_str().expect("condition"),
            )
        })
        .collect();
    assert!(deps.contains_key("app"), "keygate dependsOn app");
    assert_eq!(deps.get("keygate-config"), Some(&"SUCCESS"));

    let ports: Vec<u64> = keygate["portMappings"]
        .as_array()
        .expect("portMappings")
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert!(ports.contains(&8443), "keygate serves 8443: {ports:?}");

    let hc: Vec<&str> = keygate["healthCheck"]["command"]
        .as_array()
        .expect("healthCheck.command")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(hc, ["CMD", "/usr/local/bin/keygate-healthcheck"]);

    let secret = keygate["secrets"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "KEYGATE_REDIS_URL"))
        .expect("KEYGATE_REDIS_URL from secrets");
    assert!(
        secret["valueFrom"].as_str().is_some_and(
            |a| a.starts_with("arn:aws:secretsmanager:") || a.starts_with("arn:aws:ssm:")
        )
    );
    assert!(
        !keygate["environment"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["name"] == "KEYGATE_REDIS_URL")),
        "the Redis URL must not be a plain environment value"
    );

    // The config the writer puts where keygate reads it.
    let toml_text = writer["environment"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "KEYGATE_CONFIG_TOML"))
        .and_then(|e| e["value"].as_str())
        .expect("KEYGATE_CONFIG_TOML");
    let cfg = check_keygate_toml(toml_text, "ECS KEYGATE_CONFIG_TOML");
    assert_eq!(
        toml_str(&cfg, "upstream", "url", what),
        "http://127.0.0.1:8080"
    );
    assert_eq!(port_of(toml_str(&cfg, "listen", "addr", what)), 8443);
    let grace_ms = millis(toml_str(&cfg, "listen", "shutdown_grace", what));
    let stop = keygate["stopTimeout"]
        .as_u64()
        .expect("keygate stopTimeout");
    assert!(
        stop * 1000 > grace_ms,
        "stopTimeout {stop}s must exceed shutdown_grace"
    );
    let cmd: Vec<&str> = keygate["command"]
        .as_array()
        .expect("keygate command")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(cmd, ["serve", "--config", "/etc/keygate/keygate.toml"]);
    let mount_of = |c: &Json| {
        c["mountPoints"][0]["sourceVolume"]
            .as_str()
            .map(str::to_owned)
            .zip(
                c["mountPoints"][0]["containerPath"]
                    .as_str()
                    .map(str::to_owned),
            )
    };
    assert_eq!(mount_of(keygate), mount_of(writer));
    assert_eq!(
        mount_of(keygate).map(|(_, p)| p).as_deref(),
        Some("/etc/keygate")
    );
    assert_eq!(keygate["readonlyRootFilesystem"], true);
    assert_ne!(keygate["user"], "0");
}

#[test]
fn compose_stack_connects_keygate_redis_and_upstream() {
    let what = "deploy/compose/docker-compose.yml";
    let docs = yaml_docs(&read(what), what);
    let services = &docs[0]["services"];
    for s in ["keygate", "redis", "upstream"] {
        assert!(!services[s].is_null(), "{what}: service {s} missing");
    }
    let kg = &services["keygate"];

    let cfg = check_keygate_toml(
        &read("deploy/compose/keygate.toml"),
        "deploy/compose/keygate.toml",
    );
    let upstream = toml_str(&cfg, "upstream", "url", what);
    assert_eq!(
        upstream, "http://upstream:8080",
        "keygate reaches the sample app by service name"
    );
    let redis_url = kg["environment"]["KEYGATE_REDIS_URL"]
        .as_str()
        .expect("KEYGATE_REDIS_URL in keygate's environment");
    assert!(redis_url.starts_with("redis://redis:"), "{redis_url}");
    let extra: Vec<&str> = cfg["tenant"]["extra_hosts"]
        .as_array()
        .expect("extra_hosts")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        extra.contains(&"localhost"),
        "curl http://localhost:8443 must be a served host"
    );

    // Build context and Dockerfile resolve from the compose file's directory.
    let compose_dir = root().join("deploy/compose");
    let context = compose_dir.join(kg["build"]["context"].as_str().expect("build.context"));
    let dockerfile = context.join(
        kg["build"]["dockerfile"]
            .as_str()
            .expect("build.dockerfile"),
    );
    assert!(dockerfile.is_file(), "{}", dockerfile.display());
    assert_eq!(
        context.canonicalize().expect("context"),
        root().canonicalize().expect("root")
    );
    let volumes: Vec<&str> = kg["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(volumes.contains(&"./keygate.toml:/etc/keygate/keygate.toml:ro"));
    let ports: Vec<&str> = kg["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(ports.contains(&"8443:8443"), "{ports:?}");
    assert!(
        ports
            .iter()
            .filter(|p| p.ends_with(":9090"))
            .all(|p| p.starts_with("127.0.0.1:")),
        "the admin port is published on the host's loopback only: {ports:?}"
    );
    let grace_ms = millis(toml_str(&cfg, "listen", "shutdown_grace", what));
    let stop = kg["stop_grace_period"].as_str().expect("stop_grace_period");
    assert!(millis(stop) > grace_ms);
    assert!(
        services["upstream"]["image"]
            .as_str()
            .is_some_and(|i| !i.ends_with(":latest") && i.contains(':')),
        "the sample upstream image is pinned"
    );
}

#[test]
fn dockerfile_builds_locked_and_runs_keygate_as_non_root() {
    let text = read("deploy/Dockerfile");
    // Join continuation lines into instructions.
    let mut instructions: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') && current.is_empty() || trimmed.is_empty() {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            instructions.push(std::mem::take(&mut current));
        }
    }
    let find = |word: &str| -> Vec<&String> {
        instructions
            .iter()
            .filter(|i| i.split_whitespace().next() == Some(word))
            .collect()
    };

    let froms = find("FROM");
    assert_eq!(froms.len(), 2, "multi-stage: a builder and a runtime");
    assert!(froms[0].contains("rust:") && froms[0].contains("bookworm"));
    assert!(
        froms[1].starts_with("FROM debian:bookworm-slim"),
        "{}",
        froms[1]
    );
    let runs = find("RUN");
    let builds: Vec<_> = runs.iter().filter(|r| r.contains("cargo build")).collect();
    assert_eq!(builds.len(), 2, "a dependency layer and the real build");
    assert!(builds
        .iter()
        .all(|b| b.contains("--release") && b.contains("--locked")));

    assert_eq!(
        find("ENTRYPOINT"),
        [&r#"ENTRYPOINT ["keygate"]"#.to_string()]
    );
    assert_eq!(
        find("CMD"),
        [&r#"CMD ["serve", "--config", "/etc/keygate/keygate.toml"]"#.to_string()]
    );
    let expose: Vec<&str> = find("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace().skip(1))
        .collect();
    assert_eq!(expose, ["8443", "9090"]);
    let hc = find("HEALTHCHECK");
    assert_eq!(hc.len(), 1);
    assert!(hc[0].contains("/usr/local/bin/keygate-healthcheck"));
    let user = find("USER");
    let user = user
        .last()
        .expect("USER")
        .split_whitespace()
        .nth(1)
        .expect("user");
    let uid = user.split(':').next().unwrap_or(user);
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER must be a numeric non-root uid (Kubernetes runAsNonRoot): {user}"
    );

    // The image ships the man page and the completions the binary generates.
    for (generate, installed) in [
        (
            "keygate man > /out/keygate.1",
            "/usr/local/share/man/man1/keygate.1",
        ),
        (
            "keygate completions bash > /out/keygate.bash",
            "/usr/share/bash-completion/completions/keygate",
        ),
        (
            "keygate completions zsh > /out/_keygate",
            "/usr/local/share/zsh/site-functions/_keygate",
        ),
        (
            "keygate completions fish > /out/keygate.fish",
            "/usr/share/fish/vendor_completions.d/keygate.fish",
        ),
    ] {
        assert!(
            runs.iter().any(|r| r.contains(generate)),
            "the build does not run `{generate}`"
        );
        let src = generate.rsplit(' ').next().unwrap();
        assert!(
            find("COPY")
                .iter()
                .any(|c| c.contains("--from=builder") && c.contains(src) && c.ends_with(installed)),
            "the runtime image does not install {src} as {installed}"
        );
    }

    // Every COPY from the build context names a file that exists and that
    // Dockerfile.dockerignore does not exclude.
    let ignore = read("deploy/Dockerfile.dockerignore");
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let copies = find("COPY");
    assert!(copies.len() >= 4);
    let mut copied: Vec<PathBuf> = Vec::new();
    for copy in copies {
        let words: Vec<&str> = copy.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        let srcs: Vec<&str> = words
            .iter()
            .filter(|w| !w.starts_with("--"))
            .copied()
            .collect();
        for src in &srcs[..srcs.len() - 1] {
            assert!(
                root().join(src).exists(),
                "COPY source {src} does not exist"
            );
            for pat in &ignored {
                let pat = pat.trim_start_matches("**/");
                assert!(
                    !(src.starts_with(pat) || src.split('/').any(|c| c == pat)),
                    "COPY source {src} is excluded by Dockerfile.dockerignore ({pat})"
                );
            }
        }
        copied.extend(srcs[..srcs.len() - 1].iter().map(|s| root().join(s)));
    }

    // Files that src/ pulls in at compile time must be in the image's build.
    let mut sources = Vec::new();
    files_under(&root().join("src"), &mut sources);
    for file in sources
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "rs"))
    {
        let text = std::fs::read_to_string(file).expect("read source");
        for macro_name in ["include_str!(\"", "include_bytes!(\""] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = &text[at + macro_name.len()..];
                let rel = &rest[..rest.find('"').expect("closing quote")];
                let included = file.parent().expect("dir").join(rel);
                let included = included.canonicalize().unwrap_or(included);
                assert!(
                    copied
                        .iter()
                        .any(|c| c.canonicalize().is_ok_and(|c| included.starts_with(c))),
                    "{} includes {rel}, which deploy/Dockerfile does not copy into the build",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn systemd_unit_runs_keygate_with_reload_secrets_and_enough_stop_time() {
    let text = read("deploy/systemd/keygate.service");
    let mut values: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            values.entry(k).or_default().push(v);
        }
    }
    let one = |k: &str| -> &str {
        match values.get(k).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("keygate.service: {k} = {other:?}"),
        }
    };
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/keygate serve --config /etc/keygate/keygate.toml"
    );
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("EnvironmentFile"), "-/etc/keygate/keygate.env");
    assert_eq!(one("Type"), "exec");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(
        one("RestartPreventExitStatus"),
        "2",
        "config errors are not retried"
    );
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    let stop = one("TimeoutStopSec");
    // Longer than the default shutdown_grace of the shipped configs (30s).
    let grace = millis(toml_str(
        &toml_table(&read("deploy/compose/keygate.toml"), "compose toml"),
        "listen",
        "shutdown_grace",
        "compose toml",
    ));
    assert!(millis(stop) > grace, "TimeoutStopSec {stop}");
}

/// A one-connection HTTP server on 127.0.0.1:0 that answers `response`
/// (or nothing, holding the connection open, when `None`) and reports the
/// request line it read.
fn one_shot_server(response: Option<&'static str>) -> (u16, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut request_line = String::new();
        reader.read_line(&mut request_line).expect("request line");
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
        }
        match response {
            Some(r) => stream.write_all(r.as_bytes()).expect("write"),
            // Hold the connection open until the client gives up.
            None => {
                let mut rest = String::new();
                let _ = reader.read_line(&mut rest);
            }
        }
        request_line
    });
    (port, handle)
}

fn run_healthcheck(port: u16) -> (bool, String, Duration) {
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(root().join("deploy/docker/healthcheck.sh"))
        .arg(format!("127.0.0.1:{port}"))
        .env("KEYGATE_HEALTHCHECK_TIMEOUT", "1")
        .output()
        .expect("run bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn healthcheck_script_passes_only_on_200_from_healthz() {
    let (port, server) = one_shot_server(Some(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}",
    ));
    let (ok, stderr, _) = run_healthcheck(port);
    assert!(ok, "200 must pass: {stderr}");
    assert_eq!(server.join().expect("server"), "GET /healthz HTTP/1.1\r\n");

    let (port, server) = one_shot_server(Some(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
    ));
    let (ok, stderr, _) = run_healthcheck(port);
    assert!(!ok, "503 must fail");
    assert!(stderr.contains("503"), "says what it got: {stderr}");
    server.join().expect("server");

    // Nothing listening: a port that was just free.
    let free = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let (ok, stderr, _) = run_healthcheck(free);
    assert!(!ok, "a closed port must fail");
    assert!(stderr.contains("cannot connect"), "{stderr}");

    // A listener that never answers: fails after the read timeout, not never.
    let (port, server) = one_shot_server(None);
    let (ok, stderr, took) = run_healthcheck(port);
    assert!(!ok, "no answer must fail");
    assert!(stderr.contains("no answer"), "{stderr}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    drop(server);
}

/// A child process killed when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn healthcheck(addr: &str, path: &str) -> bool {
    Command::new("bash")
        .arg(root().join("deploy/docker/healthcheck.sh"))
        .arg(addr)
        .env("KEYGATE_HEALTHCHECK_PATH", path)
        .env("KEYGATE_HEALTHCHECK_TIMEOUT", "2")
        .output()
        .expect("run bash")
        .status
        .success()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The keygate binary, run with the Kubernetes ConfigMap's TOML (addresses
/// moved to free loopback ports) against a real redis-server: the image's
/// health check passes on /healthz, /readyz follows the store, and SIGTERM
/// ends keygate with exit 0 — what the probes and stop timeouts rely on.
#[test]
fn shipped_k8s_config_serves_and_probes_behave_with_the_real_binary() {
    let what = "deploy/k8s/keygate-sidecar.yaml";
    let docs = yaml_docs(&read(what), what);
    let toml_text = by_kind(&docs, "ConfigMap")["data"]["keygate.toml"]
        .as_str()
        .expect("keygate.toml")
        .to_owned();
    let (listen, admin, redis_port) = (free_port(), free_port(), free_port());
    let admin_addr = format!("127.0.0.1:{admin}");
    assert!(toml_text.contains("\"0.0.0.0:8443\"") && toml_text.contains("\"0.0.0.0:9090\""));
    let toml_text = toml_text
        .replace("\"0.0.0.0:8443\"", &format!("\"127.0.0.1:{listen}\""))
        .replace("\"0.0.0.0:9090\"", &format!("\"{admin_addr}\""));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("keygate.toml");
    std::fs::write(&config, toml_text).expect("write config");

    let redis = Child(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed"),
    );
    wait_until("redis-server", || {
        std::net::TcpStream::connect(("127.0.0.1", redis_port)).is_ok()
    });

    let mut keygate = Child(
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["serve", "--config"])
            .arg(&config)
            .env(
                "KEYGATE_REDIS_URL",
                format!("redis://127.0.0.1:{redis_port}/0"),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn keygate"),
    );
    wait_until("keygate /healthz", || healthcheck(&admin_addr, "/healthz"));
    wait_until("keygate /readyz", || healthcheck(&admin_addr, "/readyz"));

    // Store gone: not ready, still alive (the liveness probe must not restart it).
    drop(redis);
    wait_until("/readyz to fail without redis", || {
        !healthcheck(&admin_addr, "/readyz")
    });
    assert!(healthcheck(&admin_addr, "/healthz"));

    // SIGTERM: drain and exit 0, well within the stop timeouts.
    let status = Command::new("kill")
        .args(["-TERM", &keygate.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = keygate.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "keygate did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "keygate exit after SIGTERM: {exit:?}");
}
