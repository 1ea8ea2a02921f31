//! The offline planner: committed CRDs and golden plans match the code, and
//! bad manifests get errors that name the object and the field.

use std::path::Path;

use civicgrid_operator::plan::{self, Format, PlanError};
use proptest::prelude::*;

const AT: i64 = 1_790_000_000;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn committed_crds_match_the_rust_types() {
    let committed = std::fs::read_to_string(root().join("charts/civicgrid/crds/civicgrid.io.yaml"))
        .expect("committed CRDs");
    let generated = civicgrid_operator::crds_yaml().expect("CRDs render");
    assert!(
        committed == generated,
        "charts/civicgrid/crds/civicgrid.io.yaml is stale: run \
         `cargo run -p civicgrid-operator -- crds > charts/civicgrid/crds/civicgrid.io.yaml`"
    );
}

#[test]
fn sample_city_plan_matches_the_golden_files() {
    for (format, golden) in [(Format::Table, "city.txt"), (Format::Json, "city.json")] {
        let out = plan::run(&root().join("examples/city"), format, AT, true).expect("city plans");
        let expected = std::fs::read_to_string(root().join("operator/tests/golden").join(golden))
            .expect("golden file");
        assert!(
            out == expected,
            "plan output for {golden} changed; if intended, regenerate with \
             `cargo run -p civicgrid-operator -- plan -f examples/city --explain --at-unix {AT} -o ...`\n{out}"
        );
    }
}

/// Without `--explain` the same decisions are made, and what was not chosen
/// is counted per rule instead of named data center by data center.
#[test]
fn without_explain_rejections_are_counted_not_listed() {
    let city = root().join("examples/city");
    let explained: serde_json::Value =
        serde_json::from_str(&plan::run(&city, Format::Json, AT, true).expect("plan"))
            .expect("json");
    let counted: serde_json::Value =
        serde_json::from_str(&plan::run(&city, Format::Json, AT, false).expect("plan"))
            .expect("json");
    let decisions = |v: &serde_json::Value| v["decisions"].as_array().cloned().unwrap_or_default();
    assert_eq!(decisions(&explained).len(), decisions(&counted).len());
    let mut some_rejected = false;
    for (e, c) in decisions(&explained).iter().zip(decisions(&counted)) {
        assert_eq!(e["placement"], c["placement"]);
        assert_eq!(e["rejectedByRule"], c["rejectedByRule"]);
        assert_eq!(c["rejections"], serde_json::json!([]));
        some_rejected |= !e["rejections"].as_array().is_none_or(Vec::is_empty);
    }
    assert!(some_rejected, "the sample city rejects some data centers");
    let table = plan::run(&city, Format::Table, AT, false).expect("plan");
    assert!(
        table.contains("not chosen: ") && table.contains("(--explain names each data center)"),
        "{table}"
    );
}

fn plan_text(yaml: &str) -> Result<String, Box<PlanError>> {
    let dir = std::env::temp_dir().join(format!(
        "civicgrid-plan-{}-{}",
        std::process::id(),
        std::thread::current()
            .name()
            .unwrap_or("t")
            .replace("::", "-")
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let file = dir.join("input.yaml");
    std::fs::write(&file, yaml).expect("write");
    let result = plan::run(&file, Format::Table, AT, true).map_err(Box::new);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

const DC: &str = "apiVersion: civicgrid.io/v1alpha1
kind: DataCenter
metadata: {name: core}
spec:
  tier: municipal
  region: city
  capacity: {cpu: \"16\", memory: 64Gi}
";

fn err(yaml: &str) -> String {
    match plan_text(yaml) {
        Ok(out) => panic!("expected an error, got a plan:\n{out}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_tier_names_the_object_and_field() {
    let e = err(&DC.replace("tier: municipal", "tier: core"));
    assert!(
        e.contains("DataCenter `core`")
            && e.contains("spec.tier")
            && e.contains("unknown variant `core`"),
        "{e}"
    );
}

#[test]
fn unparsable_and_negative_quantities_name_the_field() {
    let e = err(&DC.replace("cpu: \"16\"", "cpu: lots"));
    assert!(
        e.contains("spec.capacity.cpu") && e.contains("`lots` is not a Kubernetes quantity"),
        "{e}"
    );
    let workload = format!(
        "{DC}---
apiVersion: civicgrid.io/v1alpha1
kind: ComputeWorkload
metadata: {{name: etl, namespace: data}}
spec:
  kind: Job
  replicas: 1
  template: {{}}
  resources: {{cpu: \"-2\", memory: 1Gi}}
"
    );
    let e = err(&workload);
    assert!(
        e.contains("ComputeWorkload `data/etl`")
            && e.contains("spec.resources.cpu")
            && e.contains("negative"),
        "{e}"
    );
}

#[test]
fn impossible_constraints_are_rejected_with_the_field() {
    let workload = format!(
        "{DC}---
apiVersion: civicgrid.io/v1alpha1
kind: ComputeWorkload
metadata: {{name: web}}
spec:
  kind: Deployment
  replicas: 2
  template: {{}}
  resources: {{cpu: 1, memory: 1Gi}}
  placement:
    spread: {{minDomains: 3, maxDomains: 2}}
"
    );
    let e = err(&workload);
    assert!(
        e.contains("spec.placement.spread.minDomains") && e.contains("exceeds"),
        "{e}"
    );
}

/// The sample data center and a one-replica Deployment `video/detector`
/// with `containers`, `resources` and any further `spec` lines.
fn detector(containers: &str, resources: &str, more_spec: &str) -> String {
    format!(
        "{DC}---
apiVersion: civicgrid.io/v1alpha1
kind: ComputeWorkload
metadata: {{name: detector, namespace: video}}
spec:
  kind: Deployment
  replicas: 1
  template: {{spec: {{containers: [{containers}]}}}}
  resources: {{{resources}}}
{more_spec}"
    )
}

/// The member's scheduler places by the pod template and the pool accounts
/// by `spec.resources`: a template stating other requests is refused,
/// naming the container's field, rather than let the two disagree.
#[test]
fn template_requests_that_disagree_with_the_resources_are_refused() {
    let workload = |containers: &str, gpu: &str| {
        detector(containers, &format!("cpu: 2, memory: 1Gi{gpu}"), "")
    };
    let e = err(&workload(
        "{name: a, image: x, resources: {requests: {cpu: 1}}}, \
         {name: b, image: x, resources: {requests: {cpu: 1500m}}}",
        "",
    ));
    assert!(
        e.contains("ComputeWorkload `video/detector`")
            && e.contains("spec.template.spec.containers[0].resources.requests.cpu")
            && e.contains("add up to 2500 but spec.resources.cpu says 2000"),
        "{e}"
    );
    let e = err(&workload(
        "{name: a, image: x, resources: {limits: {nvidia.com/gpu: 2}}}",
        ", gpu: {count: 1}",
    ));
    assert!(
        e.contains("spec.template.spec.containers[0].resources.limits.nvidia.com/gpu")
            && e.contains("spec.resources.gpu.count says 1"),
        "{e}"
    );
    let e = err(&workload(
        "{name: a, image: x, resources: {requests: {nvidia.com/gpu: 1}}}",
        "",
    ));
    assert!(
        e.contains("requests.nvidia.com/gpu") && e.contains("says 0"),
        "{e}"
    );
    let e = err(
        &(workload("{name: a, image: x}", ", gpu: {count: 1, model: l4}").replace(
            "{spec: {containers",
            "{spec: {nodeSelector: {nvidia.com/gpu.product: a100}, containers",
        )),
    );
    assert!(
        e.contains("spec.template.spec.nodeSelector.nvidia.com/gpu.product")
            && e.contains("selects a100 but spec.resources.gpu.model is l4"),
        "{e}"
    );
    // Requests that add up, split over containers, are accepted.
    plan_text(&workload(
        "{name: a, image: x, resources: {requests: {cpu: 500m}}}, \
         {name: b, image: x, resources: {requests: {cpu: 1500m, memory: 1Gi}}}",
        "",
    ))
    .expect("requests that add up plan");
}

#[test]
fn overrides_that_cannot_apply_are_refused_with_the_field() {
    let workload = |overrides: &str| {
        detector(
            "{name: a, image: x}",
            "cpu: 1, memory: 1Gi",
            &format!("  overrides: {overrides}\n"),
        )
    };
    let e = err(&workload(
        "[{tiers: [edge], imageRegistry: \"https://mirror.example\"}]",
    ));
    assert!(
        e.contains("spec.overrides[0].imageRegistry") && e.contains("is not a registry host"),
        "{e}"
    );
    let e = err(&workload(
        "[{}, {env: [{name: A, value: b}, {name: \" \", value: c}]}]",
    ));
    assert!(
        e.contains("spec.overrides[1].env[1].name") && e.contains("must not be empty"),
        "{e}"
    );
    plan_text(&workload(
        "[{imageRegistry: mirror.example:5000, env: [{name: A, value: b}]}]",
    ))
    .expect("a valid override plans");
}

#[test]
fn duplicate_names_point_at_both_definitions() {
    let e = err(&format!("{DC}---\n{DC}"));
    assert!(
        e.contains("DataCenter `core` is defined twice")
            && e.contains("document 1")
            && e.contains("document 2"),
        "{e}"
    );
}

#[test]
fn foreign_yaml_is_not_mistaken_for_a_civicgrid_resource() {
    let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n");
    assert!(
        e.contains("apiVersion `v1`, kind `Service` is not a CivicGrid resource"),
        "{e}"
    );
    let e = err("{ not yaml: [");
    assert!(e.contains("not valid YAML"), "{e}");
}

proptest! {
    #[test]
    fn plan_never_panics_on_arbitrary_input(text in "(?s).{0,300}") {
        let _ = plan_text(&text);
    }

    #[test]
    fn plan_never_panics_on_mutated_manifests(cut in 0usize..200, insert in ".{0,12}") {
        let mut text = DC.to_owned();
        let at = cut.min(text.len());
        if text.is_char_boundary(at) {
            text.insert_str(at, &insert);
        }
        let _ = plan_text(&text);
    }
}
