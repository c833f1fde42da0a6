//! The deployment files name real things: the Dockerfile and the Kubernetes manifests use flags
//! `tilt serve` has, ports it listens on and routes it answers; the config file's settings are
//! flags; the autoscaler's and the dashboard's metrics are ones the server exports. No cluster
//! and no container runtime needed.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;
use tilt::api::metrics as m;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn serve_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(["serve", "--help"])
        .output()
        .expect("tilt runs");
    String::from_utf8(out.stdout).unwrap()
}

/// The long flags `tilt serve --help` documents (the global ones included).
fn serve_flags() -> BTreeSet<String> {
    let help = serve_help();
    let flag = regex::Regex::new(r"(?m)^\s+(?:-\w, )?--([a-z][a-z0-9-]*)").unwrap();
    flag.captures_iter(&help)
        .map(|c| c[1].to_string())
        .collect()
}

fn routes() -> BTreeSet<String> {
    let spec: Value = serde_yaml_ng::from_str(&read("openapi.yaml")).unwrap();
    let paths = spec["paths"].as_mapping().unwrap();
    paths
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

/// Every manifest under deploy/kubernetes, by kind.
fn manifests() -> Vec<Value> {
    let kustomization: Value =
        serde_yaml_ng::from_str(&read("deploy/kubernetes/kustomization.yaml")).unwrap();
    let mut docs = Vec::new();
    for file in kustomization["resources"].as_sequence().unwrap() {
        let text = read(&format!("deploy/kubernetes/{}", file.as_str().unwrap()));
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            docs.push(Value::deserialize(doc).unwrap());
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn assert_flags(args: &[&str], flags: &BTreeSet<String>, whose: &str) {
    for arg in args.iter().filter_map(|a| a.strip_prefix("--")) {
        let name = arg.split('=').next().unwrap();
        assert!(
            flags.contains(name),
            "{whose} passes --{name}, which tilt serve lacks"
        );
    }
}

/// The settings of a config file, each a flag of `tilt serve`.
fn settings(toml_text: &str, flags: &BTreeSet<String>) -> toml::Table {
    let table: toml::Table = toml_text.parse().expect("the config file is TOML");
    for key in table.keys() {
        assert!(
            flags.contains(&key.replace('_', "-")),
            "the setting {key} is not a flag of tilt serve"
        );
    }
    table
}

#[test]
fn kubernetes_manifests_name_real_flags_ports_routes_and_metrics() {
    let (docs, flags, routes) = (manifests(), serve_flags(), routes());
    assert!(
        flags.contains("config") && flags.contains("max-queue"),
        "{flags:?}"
    );

    let configs = of_kind(&docs, "ConfigMap");
    let config = (configs.iter())
        .find(|c| c["data"]["tilt.toml"].is_string())
        .expect("a ConfigMap with tilt.toml");
    let settings = settings(config["data"]["tilt.toml"].as_str().unwrap(), &flags);
    let port = settings["port"].as_integer().unwrap();
    assert_eq!(settings["host"].as_str(), Some("0.0.0.0"));

    let [deployment] = of_kind(&docs, "Deployment")[..] else {
        panic!("one Deployment")
    };
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = (container["args"].as_sequence().unwrap().iter())
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "serve");
    assert_flags(&args, &flags, "the Deployment");
    // --config points into the volume that holds the ConfigMap.
    let file = args[args.iter().position(|&a| a == "--config").unwrap() + 1];
    let mount = &container["volumeMounts"][0];
    assert!(file.starts_with(mount["mountPath"].as_str().unwrap()));
    let volume = (pod["volumes"].as_sequence().unwrap().iter())
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], config["metadata"]["name"]);
    for var in container["env"].as_sequence().into_iter().flatten() {
        assert!(
            var["name"].as_str().unwrap().starts_with("TILT_"),
            "{var:?}"
        );
    }

    let ports = container["ports"].as_sequence().unwrap();
    assert_eq!(ports[0]["containerPort"].as_i64(), Some(port));
    let port_name = ports[0]["name"].as_str().unwrap();
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let get = &container[probe]["httpGet"];
        let path = get["path"].as_str().unwrap();
        assert!(
            routes.contains(path),
            "{probe} asks for {path}, not a route"
        );
        assert_eq!(get["port"].as_str(), Some(port_name), "{probe}");
    }
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["requests"]["memory"].is_string());
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert!(routes.contains(annotations["prometheus.io/path"].as_str().unwrap()));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(port.to_string().as_str())
    );
    // Open requests get their grace period before the pod is killed.
    let grace = settings["shutdown-grace"].as_integer().unwrap();
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > grace);

    let [service] = of_kind(&docs, "Service")[..] else {
        panic!("one Service")
    };
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some(port_name)
    );
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    // The autoscaler's metric is the queue gauge, renamed by the adapter's rule.
    let [hpa] = of_kind(&docs, "HorizontalPodAutoscaler")[..] else {
        panic!("one HorizontalPodAutoscaler")
    };
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        .as_str()
        .unwrap();
    assert_eq!(metric, m::NUM_REQUESTS_WAITING.replace(':', "_"));
    let adapter = (configs.iter())
        .find_map(|c| c["data"]["config.yaml"].as_str())
        .expect("the prometheus-adapter rule");
    let adapter: Value = serde_yaml_ng::from_str(adapter).unwrap();
    let rule = &adapter["rules"][0];
    assert!(rule["seriesQuery"]
        .as_str()
        .unwrap()
        .starts_with(m::NUM_REQUESTS_WAITING));
    let renamed = regex::Regex::new(rule["name"]["matches"].as_str().unwrap())
        .unwrap()
        .replace(
            m::NUM_REQUESTS_WAITING,
            rule["name"]["as"].as_str().unwrap().replace("${1}", "$1"),
        );
    assert_eq!(renamed, metric);
}

#[test]
fn the_dockerfile_runs_tilt_serve_as_a_user_on_its_port() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().filter(|l| !l.starts_with('#')).collect();
    let last = |word: &str| {
        (lines.iter().rev())
            .find_map(|l| l.strip_prefix(word))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {word}"))
    };
    let cmd: Vec<String> = serde_json::from_str(last("CMD ")).expect("CMD as a JSON list");
    let entry: Vec<String> = serde_json::from_str(last("ENTRYPOINT ")).unwrap();
    assert_eq!(entry, ["tilt"]);
    assert_eq!(cmd[0], "serve");
    let flags = serve_flags();
    assert_flags(
        &cmd.iter().map(String::as_str).collect::<Vec<_>>(),
        &flags,
        "CMD",
    );
    assert!(!["root", "0"].contains(&last("USER ")), "runs as root");
    // The TILT_ variables it sets are the flags' own, and the port is the one exposed.
    let env = dockerfile
        .split("ENV TILT_MODELS_DIR")
        .nth(1)
        .expect("ENV TILT_…");
    let port = regex::Regex::new(r"TILT_PORT=(\d+)")
        .unwrap()
        .captures(env)
        .unwrap()[1]
        .to_string();
    assert_eq!(last("EXPOSE "), port);
    let help = serve_help();
    for var in regex::Regex::new(r"(TILT_[A-Z_]+)=")
        .unwrap()
        .captures_iter(env)
    {
        let var = &var[1];
        assert!(
            var == "TILT_MODELS_DIR" || help.contains(&format!("[env: {var}=")),
            "{var} is not a variable of tilt serve"
        );
    }
}

#[test]
fn the_dashboard_plots_metrics_the_server_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/tilt-dashboard.json")).unwrap();
    let exported = [
        m::TIME_TO_FIRST_TOKEN,
        m::INTER_TOKEN_LATENCY,
        m::E2E_REQUEST_LATENCY,
        m::REQUEST_QUEUE_TIME,
        m::NUM_REQUESTS_RUNNING,
        m::NUM_REQUESTS_WAITING,
        m::PROMPT_TOKENS,
        m::GENERATION_TOKENS,
        m::REQUEST_SUCCESS,
        m::REQUEST_REJECTED,
        m::HTTP_REQUESTS,
    ];
    let name = regex::Regex::new(r"tilt:[a-z0-9_]+").unwrap();
    let mut plotted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            for metric in name.find_iter(target["expr"].as_str().unwrap()) {
                let base = metric.as_str().trim_end_matches("_bucket");
                assert!(exported.contains(&base), "{} plots {base}", panel["title"]);
                plotted.insert(base.to_string());
            }
        }
    }
    assert_eq!(plotted.len(), exported.len(), "every metric has a panel");
}
