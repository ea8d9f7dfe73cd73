//! The deployment kit against the code it deploys: the alert rules and the dashboard name only
//! series the service emits (and the dashboard plots all of them), the compose file's MariaDB
//! servers run with the options the test cluster relies on, every settings file and Secret
//! of the kit loads and validates, and every command the kit runs is one the binary has.
//!
//! Nothing here starts a server: these are checks of files. `.ci/run` also runs
//! `promtool check rules` and `promtool test rules` (each alert fires on a fixture and stays
//! silent beside it), checks the dashboard's queries parse as PromQL, validates the Kubernetes
//! manifests against their schemas and lints the YAML.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::Figment;
use orderly::config::{Settings, DEFAULT_TOML};
use orderly_testkit::cluster::{
    DURABLE_MARIADB_OPTIONS, REPLICA_MARIADB_OPTIONS, SERVER_MARIADB_OPTIONS, SHARED_MARIADB_OPTIONS,
};
use serde_yaml_ng::Value;

/// Series emitted by code not described in `src/telemetry.rs`: the process metrics of the
/// `metrics-process` crate, which describes them itself.
const EMITTED_ELSEWHERE: &[&str] = &[
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
    "process_resident_memory_bytes",
    "process_heap_bytes",
    "process_start_time_seconds",
    "process_threads",
];

/// Series Prometheus itself makes for every scrape target.
const PROMETHEUS_SERIES: &[&str] = &["up"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Every YAML document of `path`, with `<<` merge keys applied.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{path}: merge keys: {e}"));
            value
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(path: &str) -> Value {
    let mut docs = yaml_documents(path);
    assert_eq!(docs.len(), 1, "{path} holds one document");
    docs.remove(0)
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v:?}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Series names

/// The series `src/telemetry.rs` describes, with whether each is a histogram.
fn described_series() -> BTreeMap<String, bool> {
    let source = read("src/telemetry.rs");
    let mut series = BTreeMap::new();
    for (macro_name, histogram) in [
        ("describe_counter!(", false),
        ("describe_gauge!(", false),
        ("describe_histogram!(", true),
    ] {
        for (at, _) in source.match_indices(macro_name) {
            let rest = &source[at + macro_name.len()..];
            let open = rest.find('"').expect("a described name");
            let close = rest[open + 1..].find('"').expect("a closed name");
            series.insert(rest[open + 1..open + 1 + close].to_owned(), histogram);
        }
    }
    assert!(
        series.len() > 30,
        "telemetry.rs describes its series: found {series:?}"
    );
    series
}

/// The series a query may name: described, emitted elsewhere, or Prometheus's own.
fn known_series() -> BTreeSet<String> {
    described_series()
        .into_keys()
        .chain(
            EMITTED_ELSEWHERE
                .iter()
                .chain(PROMETHEUS_SERIES)
                .map(|s| (*s).to_owned()),
        )
        .collect()
}

/// The series a query names, with a histogram's `_bucket`, `_sum` and `_count` taken back to
/// the histogram. A small scan of PromQL, enough for the queries of the kit: string
/// literals, label matchers, ranges and the label lists of `by`, `without`, `on`, `ignoring`
/// and `group_*` are skipped; an identifier followed by `(` is a function; keywords,
/// aggregations and numbers are no series.
fn series_in(query: &str) -> BTreeSet<String> {
    // Operators, and the aggregations, which may put their `by (…)` before the parenthesis.
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let histograms: BTreeSet<String> = described_series()
        .into_iter()
        .filter_map(|(name, histogram)| histogram.then_some(name))
        .collect();
    let chars: Vec<char> = query.chars().collect();
    let mut found = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening bracket to its closing one, over string literals.
    let skip_to = |mut i: usize, close: char| -> usize {
        let mut quote = None;
        while i < chars.len() {
            match (quote, chars[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), c) if c == q => quote = None,
                (None, '"' | '\'' | '`') => quote = Some(chars[i]),
                (None, c) if c == close => return i + 1,
                _ => {}
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let call = chars.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) {
                    if call {
                        i = skip_to(next + 1, ')');
                    }
                } else if !call && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                    let series = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| {
                            word.strip_suffix(suffix)
                                .filter(|base| histograms.contains(*base))
                        })
                        .map_or(word.clone(), str::to_owned);
                    found.insert(series);
                }
            }
            _ => i += 1,
        }
    }
    found
}

#[test]
fn the_query_scan_finds_series_and_nothing_else() {
    let found = series_in(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(orderly_http_request_duration_seconds_bucket{route!="unmatched", x=~"a{b}"}[$__rate_interval])))
           / on (instance) group_left (version) orderly_build_info > 1e3 and orderly_cache_up offset 5m"#,
    );
    let want: BTreeSet<String> = [
        "orderly_http_request_duration_seconds",
        "orderly_build_info",
        "orderly_cache_up",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(found, want);
}

/// Every query of the dashboard (panels, and the variables' queries).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = read("deploy/grafana/orderly.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    fn walk(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                let title = map.get("title").and_then(|t| t.as_str()).unwrap_or(title);
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "definition", serde_json::Value::String(q)) => {
                            // Grafana's `label_values(selector, label)`: the selector is PromQL.
                            let q = match q.strip_prefix("label_values(") {
                                Some(args) => args.rsplit_once(',').map_or(args, |(s, _)| s),
                                None => q,
                            };
                            out.push((title.to_owned(), q.to_owned()))
                        }
                        _ => walk(value, title, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, title, out)),
            _ => {}
        }
    }
    walk(&dashboard, "dashboard", &mut queries);
    assert!(queries.len() > 30, "the dashboard has its queries: {queries:?}");
    queries
}

/// Every alert of the rules file: (name, expression, the rule).
fn alert_rules() -> Vec<(String, String, Value)> {
    let rules = yaml("deploy/prometheus/orderly.rules.yml");
    let mut alerts = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = str_of(&rule["alert"], "an alert's name").to_owned();
            let expr = str_of(&rule["expr"], "an alert's expr").to_owned();
            alerts.push((name, expr, rule.clone()));
        }
    }
    assert!(alerts.len() > 10, "the rules file has its alerts");
    alerts
}

#[test]
fn every_series_the_dashboard_plots_is_emitted_by_the_code() {
    let known = known_series();
    for (panel, query) in dashboard_queries() {
        let series = series_in(&query);
        assert!(!series.is_empty(), "panel {panel:?}: no series found in {query}");
        for s in series {
            assert!(
                known.contains(&s),
                "panel {panel:?} plots {s}, which src/telemetry.rs does not describe: {query}"
            );
        }
    }
}

#[test]
fn the_dashboard_plots_every_described_series() {
    let plotted: BTreeSet<String> = dashboard_queries()
        .iter()
        .flat_map(|(_, q)| series_in(q))
        .collect();
    let missing: Vec<String> = described_series()
        .into_keys()
        .filter(|s| !plotted.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/grafana/orderly.json plots none of {missing:?}: add a panel (or a query to one)"
    );
}

#[test]
fn every_series_the_alert_rules_use_is_emitted_by_the_code() {
    let known = known_series();
    for (alert, expr, _) in alert_rules() {
        let series = series_in(&expr);
        assert!(!series.is_empty(), "alert {alert}: no series found in {expr}");
        for s in series {
            assert!(
                known.contains(&s),
                "alert {alert} uses {s}, which src/telemetry.rs does not describe: {expr}"
            );
        }
    }
}

#[test]
fn every_alert_has_a_severity_a_summary_and_a_unit_test_where_it_fires() {
    let tests = yaml("deploy/prometheus/orderly.rules.test.yml");
    let mut fired = BTreeSet::new();
    for test in tests["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let fires = case["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty());
            if fires {
                fired.insert(str_of(&case["alertname"], "alertname").to_owned());
            }
        }
    }
    for (alert, _, rule) in alert_rules() {
        let severity = str_of(&rule["labels"]["severity"], "severity");
        assert!(
            ["page", "ticket"].contains(&severity),
            "alert {alert}: severity {severity:?} is neither page nor ticket"
        );
        assert!(
            rule["annotations"]["summary"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "alert {alert} has no summary"
        );
        assert!(
            fired.contains(&alert),
            "alert {alert} has no unit test in orderly.rules.test.yml where it fires"
        );
    }
}

#[test]
fn the_operations_doc_names_only_emitted_series() {
    let known = known_series();
    let doc = read("docs/operations.md");
    // The metrics table and the alerts: from "## Metrics" to the next section after "## Alerts".
    let start = doc.find("## Metrics").expect("a Metrics section");
    let alerts = doc.find("## Alerts").expect("an Alerts section");
    let end = doc[alerts + 1..]
        .find("\n## ")
        .map_or(doc.len(), |e| alerts + 1 + e);
    let section = &doc[start..end];
    let mut named = 0;
    for part in section.split('`').skip(1).step_by(2) {
        let name = part.split('{').next().unwrap_or(part);
        if name.starts_with("orderly_") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            named += 1;
            assert!(
                known.contains(name),
                "docs/operations.md names {name}, which no code emits"
            );
        }
    }
    assert!(named > 30, "the metrics section names its series");
}

// ---------------------------------------------------------------------------------------------
// MariaDB

/// Options of the test cluster's servers that a deployment does differently, by name, and why.
const TEST_CLUSTER_ONLY: &[(&str, &str)] = &[
    (
        "innodb_flush_log_at_trx_commit",
        "throwaway tmpfs servers; a deployment is durable",
    ),
    (
        "innodb_doublewrite",
        "throwaway tmpfs servers; a deployment is durable",
    ),
    ("sync_binlog", "throwaway tmpfs servers; a deployment is durable"),
    ("innodb_buffer_pool_size", "sized to the machine"),
    ("innodb_log_file_size", "sized to the machine"),
    (
        "performance_schema",
        "the tests save its memory; a deployment keeps the default",
    ),
    ("host_cache_size", "fault tests abort handshakes on purpose"),
    (
        "innodb_buffer_pool_dump_at_shutdown",
        "a deployment warms its buffer pool",
    ),
    (
        "innodb_buffer_pool_load_at_startup",
        "a deployment warms its buffer pool",
    ),
];

/// `--some-option=value` as (`some_option`, `value`); a bare flag has the value `1`.
fn option(arg: &str) -> (String, String) {
    let arg = arg.trim_start_matches("--");
    let (name, value) = arg.split_once('=').unwrap_or((arg, "1"));
    (name.replace('-', "_"), value.trim().to_owned())
}

/// The `[mariadbd]` options of an option file.
fn option_file(path: &str) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    let mut in_server = false;
    for line in read(path).lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            in_server = matches!(line, "[mariadbd]" | "[mysqld]" | "[server]" | "[mariadb]");
            continue;
        }
        if in_server {
            let (name, value) = line.split_once('=').unwrap_or((line, "1"));
            options.insert(name.trim().replace('-', "_"), value.trim().to_owned());
        }
    }
    options
}

#[test]
fn the_kit_mariadb_servers_run_with_the_options_the_test_cluster_relies_on() {
    let file = option_file("deploy/mariadb/orderly.cnf");
    let test_only: BTreeSet<&str> = TEST_CLUSTER_ONLY.iter().map(|(name, _)| *name).collect();
    let mut wanted: BTreeMap<String, String> = SHARED_MARIADB_OPTIONS
        .iter()
        .chain(SERVER_MARIADB_OPTIONS)
        .map(|o| option(o))
        .filter(|(name, _)| !test_only.contains(name.as_str()))
        .collect();
    // What the test cluster's durable servers (the bench's) add is what a deployment runs.
    wanted.extend(DURABLE_MARIADB_OPTIONS.iter().map(|o| option(o)));
    for (name, value) in &wanted {
        assert_eq!(
            file.get(name).map(|v| v.to_ascii_lowercase()),
            Some(value.to_ascii_lowercase()),
            "deploy/mariadb/orderly.cnf must set {name} = {value}, as the test cluster does \
             (or add it to TEST_CLUSTER_ONLY with why a deployment differs)"
        );
    }
    assert!(wanted.contains_key("gtid_strict_mode") && wanted.contains_key("binlog_format"));

    // Both servers of the compose file read that file, each has its own server id, the
    // replica is read-only, and both are MariaDB 10.11.
    let compose = yaml("deploy/compose.yaml");
    let mut server_ids = BTreeSet::new();
    for (service, replica) in [("mariadb", false), ("mariadb-replica", true)] {
        let s = &compose["services"][service];
        assert_eq!(str_of(&s["image"], "image"), "mariadb:10.11", "{service}");
        assert!(
            strings(&s["volumes"])
                .iter()
                .any(|v| v.starts_with("./mariadb/orderly.cnf:/etc/mysql/conf.d/")),
            "{service} reads deploy/mariadb/orderly.cnf"
        );
        let args: BTreeMap<String, String> = strings(&s["command"]).iter().map(|a| option(a)).collect();
        assert!(
            server_ids.insert(args["server_id"].clone()),
            "{service}: its own server id"
        );
        if replica {
            for (name, value) in REPLICA_MARIADB_OPTIONS.iter().map(|o| option(o)) {
                assert_eq!(
                    args.get(&name),
                    Some(&value),
                    "{service} runs with --{name}={value}"
                );
            }
            assert_eq!(
                str_of(&s["environment"]["MARIADB_MASTER_HOST"], "master"),
                "mariadb"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settings of the kit

/// The settings a process gets from the defaults, `file` and ORDERLY_* variables `env`, as
/// `Settings::load` builds them (figment's Env provider parses each value the same way).
fn settings(file: &str, env: &BTreeMap<String, String>) -> Result<Settings, String> {
    let mut fig = Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(file));
    for (name, value) in env {
        let Some(key) = name.strip_prefix("ORDERLY_") else {
            continue;
        };
        let path = key
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
            .join(".");
        let value: figment::value::Value = value.parse().expect("parsing a value is infallible");
        fig = fig.merge((path, value));
    }
    let settings: Settings = fig.extract().map_err(|e| e.to_string())?;
    settings.validate().map_err(|e| e.to_string())?;
    Ok(settings)
}

/// A string map of YAML (an `environment` or `stringData` map).
fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let value = match v {
                        Value::String(s) => s.clone(),
                        Value::Bool(b) => b.to_string(),
                        Value::Number(n) => n.to_string(),
                        other => panic!("not a string value: {other:?}"),
                    };
                    (str_of(k, "a key").to_owned(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Compose's `${NAME:-default}` and `${NAME:?error}` with nothing set: the default, or
/// `required(NAME)`.
fn interpolate(text: &str, required: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let end = rest[at..].find('}').expect("a closed ${") + at;
        let inner = &rest[at + 2..end];
        match inner.split_once(":-") {
            Some((_, default)) => out.push_str(default),
            None => out.push_str(&required(inner.split(":?").next().unwrap_or(inner))),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

const A_SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn the_compose_services_load_valid_settings_against_the_compose_servers() {
    let compose = yaml("deploy/compose.yaml");
    let file = read("deploy/compose/orderly.toml");
    let services = &compose["services"];
    for name in ["migrate", "serve", "relay"] {
        let env: BTreeMap<String, String> = string_map(&services[name]["environment"])
            .into_iter()
            .map(|(k, v)| {
                let v = interpolate(&v, |var| match var {
                    "JWT_SECRET" => A_SECRET.to_owned(),
                    other => panic!("{name}: ${{{other}}} has no default"),
                });
                (k, v)
            })
            .collect();
        let s = settings(&file, &env).unwrap_or_else(|e| panic!("compose service {name}: {e}"));
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080", "{name}");
        assert_eq!(s.shards.databases.len(), 1, "{name}");
        assert!(s.shards.databases[0].primary.contains("@mariadb:3306/"), "{name}");
        assert!(
            s.shards.databases[0].replicas[0].contains("@mariadb-replica:3306/"),
            "{name}"
        );
        assert!(
            s.commerce.replicas[0].contains("@mariadb-replica:3306/"),
            "{name}"
        );
        assert_eq!(s.redis.url, "redis://redis:6379");
        assert_eq!(s.events.nats_url, "nats://nats:4222");
        // The relay service publishes the outboxes; serve does not compete with it.
        assert_eq!(s.events.relay, name != "serve", "{name}: events.relay");
        // The search index lives on the serve service's volume.
        if name == "serve" {
            let volumes = strings(&services[name]["volumes"]);
            let dir = s.search.data_dir.to_string_lossy().into_owned();
            assert!(
                volumes.iter().any(|v| v.ends_with(&format!(":{dir}"))),
                "serve keeps {dir} on a volume: {volumes:?}"
            );
        }
        let command = strings(&services[name]["command"]);
        assert_eq!(
            command.last().map(String::as_str),
            Some(name),
            "{name} runs `orderly {name}`"
        );
        let grace =
            humantime::parse_duration(str_of(&services[name]["stop_grace_period"], "stop_grace_period"))
                .expect("a duration");
        assert!(
            grace.as_millis() > u128::from(s.server.shutdown_delay_ms + s.server.shutdown_grace_ms),
            "{name}: compose waits {grace:?} after SIGTERM, less than server.shutdown_delay_ms + shutdown_grace_ms"
        );
    }
    assert_eq!(
        str_of(
            &services["serve"]["depends_on"]["migrate"]["condition"],
            "condition"
        ),
        "service_completed_successfully"
    );
    assert_eq!(str_of(&services["migrate"]["restart"], "restart"), "no");
    // JetStream on; Redis evicting in a way the cache's markers survive (src/redis/cache/aside.rs).
    assert!(strings(&services["nats"]["command"])
        .iter()
        .any(|a| a == "--jetstream" || a == "-js"));
    let redis = strings(&services["redis"]["command"]);
    let policy = redis
        .iter()
        .position(|a| a == "--maxmemory-policy")
        .map(|i| redis[i + 1].as_str());
    assert!(
        matches!(policy, None | Some("allkeys-lru" | "allkeys-lfu" | "noeviction")),
        "redis maxmemory-policy {policy:?}"
    );
    assert!(str_of(&services["redis"]["image"], "image").starts_with("redis:7"));
}

/// Every document of every manifest of `deploy/k8s/` (the kustomization aside).
fn k8s_objects() -> Vec<Value> {
    let kustomization = yaml("deploy/k8s/kustomization.yaml");
    let objects: Vec<Value> = strings(&kustomization["resources"])
        .iter()
        .flat_map(|file| yaml_documents(&format!("deploy/k8s/{file}")))
        .collect();
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    for entry in std::fs::read_dir(repo("deploy/k8s")).expect("deploy/k8s") {
        let file = entry
            .expect("an entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        assert!(
            file == "kustomization.yaml" || listed.contains(&file),
            "deploy/k8s/{file} is not listed in kustomization.yaml"
        );
    }
    objects
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("deploy/k8s has no {kind} {name}"))
}

/// The pod template of a workload (a CronJob's job's).
fn pod_spec(workload: &Value) -> &Value {
    match workload["kind"].as_str() {
        Some("CronJob") => &workload["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &workload["spec"]["template"]["spec"],
    }
}

fn container(workload: &Value) -> &Value {
    let containers = pod_spec(workload)["containers"]
        .as_sequence()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The settings the one container of `workload` gets: the ConfigMap's file, then its env.
fn k8s_settings(objects: &[Value], workload: &Value, jwt_secret: Option<&str>) -> Result<Settings, String> {
    let c = container(workload);
    let mut env = BTreeMap::new();
    for source in c["envFrom"].as_sequence().into_iter().flatten() {
        let name = str_of(&source["secretRef"]["name"], "secretRef");
        env.extend(string_map(&object(objects, "Secret", name)["stringData"]));
    }
    for var in c["env"].as_sequence().into_iter().flatten() {
        env.insert(
            str_of(&var["name"], "name").to_owned(),
            str_of(&var["value"], "value").to_owned(),
        );
    }
    if let Some(secret) = jwt_secret {
        env.insert("ORDERLY_AUTH__JWT_SECRET".into(), secret.into());
    }
    // `--config PATH`: PATH is the ConfigMap's key mounted where the pod reads it.
    let args = strings(&c["args"]);
    let config = args
        .iter()
        .position(|a| a == "--config")
        .map(|i| PathBuf::from(&args[i + 1]))
        .expect("--config");
    let mount = c["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|m| config.starts_with(str_of(&m["mountPath"], "mountPath")))
        .expect("the settings file is mounted");
    let volume = pod_spec(workload)["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let map = object(
        objects,
        "ConfigMap",
        str_of(&volume["configMap"]["name"], "configMap"),
    );
    let key = config.file_name().expect("a file name").to_string_lossy();
    settings(str_of(&map["data"][key.as_ref()], "the settings file"), &env)
}

#[test]
fn the_kubernetes_workloads_load_valid_settings_and_fit_the_shutdown_grace() {
    let objects = k8s_objects();
    let workloads = [
        ("Deployment", "orderly", "serve"),
        ("StatefulSet", "orderly-search", "serve"),
        ("Job", "orderly-migrate", "migrate"),
        ("CronJob", "orderly-archive", "archive"),
    ];
    for (kind, name, command) in workloads {
        let w = object(&objects, kind, name);
        // The Secret ships a placeholder JWT secret that orderly refuses: nobody runs with it.
        let refused = k8s_settings(&objects, w, None).expect_err("the placeholder secret is refused");
        assert!(refused.contains("jwt_secret"), "{kind} {name}: {refused}");
        let s = k8s_settings(&objects, w, Some(A_SECRET)).unwrap_or_else(|e| panic!("{kind} {name}: {e}"));
        let args = strings(&container(w)["args"]);
        assert!(
            args.iter().any(|a| a == command),
            "{kind} {name} runs `orderly {command}`: {args:?}"
        );
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080");
        assert!(!s.archive.run_in_serve, "the CronJob archives, not serve");
        // No service links: the Services named orderly… would set ORDERLY_SERVICE_HOST & co.
        assert_eq!(
            pod_spec(w)["enableServiceLinks"].as_bool(),
            Some(false),
            "{kind} {name}: enableServiceLinks"
        );
        // SIGTERM: server.shutdown_delay_ms (unready, still serving), then
        // server.shutdown_grace_ms, within the pod's grace.
        if command == "serve" {
            let grace_secs = pod_spec(w)["terminationGracePeriodSeconds"]
                .as_u64()
                .expect("a grace");
            assert!(
                s.server.shutdown_delay_ms + s.server.shutdown_grace_ms < grace_secs * 1000,
                "{kind} {name}: shutdown_delay_ms + shutdown_grace_ms must end within {grace_secs} s"
            );
            assert!(
                s.server.shutdown_delay_ms > 0,
                "{kind} {name}: no unready phase on SIGTERM"
            );
            let probe = |p: &str| str_of(&container(w)[p]["httpGet"]["path"], p).to_owned();
            assert_eq!(probe("readinessProbe"), "/readyz", "{kind} {name}");
            assert_eq!(probe("livenessProbe"), "/livez", "{kind} {name}");
            // The probes reach the admin listener: their port is the one it binds.
            let admin = s.server.admin_listen.expect("an admin listener").port();
            let port_of = |name: &str| {
                container(w)["ports"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"].as_str() == Some(name))
                    .and_then(|p| p["containerPort"].as_u64())
            };
            for p in ["readinessProbe", "livenessProbe"] {
                let name = str_of(&container(w)[p]["httpGet"]["port"], p);
                assert_eq!(port_of(name), Some(u64::from(admin)), "{kind} {name}: {p} port");
            }
        }
        // One search writer: the StatefulSet, with its index on its volume claim.
        let writer = kind == "StatefulSet";
        assert_eq!(s.search.enabled, writer, "{kind} {name}: search.enabled");
        if writer {
            assert_eq!(w["spec"]["replicas"].as_u64(), Some(1));
            let claim = str_of(&w["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "claim");
            let dir = s.search.data_dir.to_string_lossy().into_owned();
            assert!(
                container(w)["volumeMounts"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|m| m["name"].as_str() == Some(claim) && m["mountPath"].as_str() == Some(&dir)),
                "the search writer keeps {dir} on its claim {claim}"
            );
        }
    }
    let archive = strings(&container(object(&objects, "CronJob", "orderly-archive"))["args"]);
    assert!(
        archive.ends_with(&["archive".into(), "--once".into()]),
        "{archive:?}"
    );
}

#[test]
fn the_kubernetes_services_and_budget_select_the_pods_of_a_workload() {
    let objects = k8s_objects();
    let pod_labels: Vec<BTreeMap<String, String>> = objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
        .map(|w| string_map(&w["spec"]["template"]["metadata"]["labels"]))
        .collect();
    let selects = |selector: &BTreeMap<String, String>| {
        pod_labels
            .iter()
            .filter(|labels| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .count()
    };
    for o in &objects {
        let (kind, name) = (
            o["kind"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap_or(""),
        );
        let selector = match kind {
            "Service" => string_map(&o["spec"]["selector"]),
            "PodDisruptionBudget" => string_map(&o["spec"]["selector"]["matchLabels"]),
            "Deployment" | "StatefulSet" => {
                let selector = string_map(&o["spec"]["selector"]["matchLabels"]);
                let labels = string_map(&o["spec"]["template"]["metadata"]["labels"]);
                assert!(
                    selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
                    "{kind} {name}"
                );
                selector
            }
            _ => continue,
        };
        assert_eq!(
            selects(&selector),
            1,
            "{kind} {name} selects the pods of exactly one workload"
        );
    }
    let deployment = object(&objects, "Deployment", "orderly");
    assert!(
        deployment["spec"]["replicas"].as_u64().unwrap_or(0) > 1,
        "several API pods"
    );
    object(&objects, "PodDisruptionBudget", "orderly");
    object(&objects, "Service", "orderly");
    object(&objects, "Service", "orderly-search");
}

// ---------------------------------------------------------------------------------------------
// Commands

/// Runs the binary with the kit's arguments and `--help`: clap rejects an unknown command or
/// flag before it prints the help.
fn assert_is_a_command(args: &[String], whence: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_orderly"))
        .args(args)
        .arg("--help")
        .output()
        .expect("running orderly");
    assert!(
        out.status.success(),
        "{whence}: `orderly {}` is not a command of the binary: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_command_the_kit_runs_is_a_command_of_the_binary() {
    let compose = yaml("deploy/compose.yaml");
    let mut checked = 0;
    for (name, service) in compose["services"].as_mapping().expect("services") {
        let name = str_of(name, "service");
        if service["build"].is_mapping() {
            assert_is_a_command(&strings(&service["command"]), &format!("compose service {name}"));
            checked += 1;
        }
    }
    for o in k8s_objects() {
        if matches!(
            o["kind"].as_str(),
            Some("Deployment" | "StatefulSet" | "Job" | "CronJob")
        ) {
            let c = container(&o);
            assert_eq!(
                str_of(&c["image"], "image"),
                "orderly",
                "the kustomization sets the image"
            );
            assert_is_a_command(&strings(&c["args"]), &format!("{:?}", o["metadata"]["name"]));
            checked += 1;
        }
    }
    assert_eq!(
        checked, 7,
        "3 compose services and 4 Kubernetes workloads run orderly"
    );
    // The image runs the binary as its entrypoint and stops it with SIGTERM.
    let dockerfile = read("Dockerfile");
    for line in [
        "ENTRYPOINT [\"orderly\"]",
        "STOPSIGNAL SIGTERM",
        "USER 10001:10001",
    ] {
        assert!(
            dockerfile.lines().any(|l| l == line),
            "the Dockerfile has `{line}`"
        );
    }
    assert!(dockerfile.contains("cargo build --release --locked"));
}
