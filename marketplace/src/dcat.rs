//! The public catalog as DCAT-AP 3 JSON-LD: a `dcat:Catalog` whose
//! `dcat:dataset`s are the published products, each with the mandatory
//! properties (title, description) and the recommended ones we hold
//! (publisher, keywords, licence, frequency, spatial coverage, issue and
//! modification dates, the registration number as an `adms:identifier`), and
//! one `dcat:Distribution` describing access by authorized operation — the
//! data itself is never downloadable.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::registry::Product;

const FREQUENCY: &str = "http://publications.europa.eu/resource/authority/frequency/";

fn frequency(update_frequency: &str) -> Option<String> {
    let code = match update_frequency.to_ascii_lowercase().as_str() {
        "realtime" | "continuous" => "UPDATE_CONT",
        "hourly" => "HOURLY",
        "daily" => "DAILY",
        "weekly" => "WEEKLY",
        "monthly" => "MONTHLY",
        "quarterly" => "QUARTERLY",
        "annual" | "yearly" => "ANNUAL",
        "irregular" => "IRREG",
        _ => return None,
    };
    Some(format!("{FREQUENCY}{code}"))
}

fn licence(licence: &str) -> String {
    if licence.starts_with("http://") || licence.starts_with("https://") {
        licence.to_owned()
    } else {
        format!("https://spdx.org/licenses/{licence}")
    }
}

/// `YYYY-MM-DDThh:mm:ssZ` for a Unix time in milliseconds.
#[must_use]
pub fn iso_datetime(unix_ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The catalog document. `providers` maps organization ids to display names.
#[must_use]
pub fn catalog(
    base_uri: &str,
    platform_name: &str,
    products: &[Product],
    providers: &HashMap<String, String>,
    open_reports: &crate::feedback::OpenByProduct,
) -> Value {
    let base = base_uri.trim_end_matches('/');
    let datasets: Vec<Value> = products
        .iter()
        .map(|product| {
            let spec = &product.spec;
            let provider = &product.provider_organization_id;
            let mut dataset = json!({
                "@id": format!("{base}/datasets/{}", product.id),
                "@type": "dcat:Dataset",
                "dct:identifier": product.id,
                "dct:title": spec.title,
                "dct:description": spec.description,
                "dcat:keyword": spec.keywords,
                "dct:publisher": {
                    "@id": format!("{base}/organizations/{provider}"),
                    "@type": "foaf:Agent",
                    "foaf:name": providers.get(provider).cloned().unwrap_or_else(|| provider.clone()),
                },
                "dct:spatial": spec.region,
                "dct:issued": {"@value": iso_datetime(product.registered_at_unix_ms), "@type": "xsd:dateTime"},
                "dct:modified": {"@value": iso_datetime(product.updated_at_unix_ms), "@type": "xsd:dateTime"},
                "dcat:version": product.version.to_string(),
                "adms:identifier": {
                    "@type": "adms:Identifier",
                    "skos:notation": product.registration_number,
                    "dct:creator": platform_name,
                },
                "dcat:distribution": [{
                    "@id": format!("{base}/datasets/{}/authorized-operation", product.id),
                    "@type": "dcat:Distribution",
                    "dct:title": "Authorized operation: queries run next to the data under a contract",
                    "dcat:accessURL": {"@id": format!("{base}/datasets/{}", product.id)},
                    "dct:license": {"@id": licence(&spec.licence)},
                    "dct:accessRights": {"@id": "http://publications.europa.eu/resource/authority/access-right/RESTRICTED"},
                }],
            });
            if let Some(frequency) = frequency(&spec.update_frequency) {
                dataset["dct:accrualPeriodicity"] = json!({"@id": frequency});
            }
            dataset["dqv:hasQualityMeasurement"] =
                quality_measurements(base, product, open_reports.get(&product.id).copied());
            dataset
        })
        .collect();
    json!({
        "@context": {
            "dcat": "http://www.w3.org/ns/dcat#",
            "dct": "http://purl.org/dc/terms/",
            "foaf": "http://xmlns.com/foaf/0.1/",
            "adms": "http://www.w3.org/ns/adms#",
            "skos": "http://www.w3.org/2004/02/skos/core#",
            "xsd": "http://www.w3.org/2001/XMLSchema#",
            "dqv": "http://www.w3.org/ns/dqv#",
        },
        "@id": format!("{base}/catalog"),
        "@type": "dcat:Catalog",
        "dct:title": "CivicGrid public data products",
        "dct:description": "Registered public-data products available by authorized operation: computations run next to the data; only policy-checked results leave.",
        "dct:publisher": {"@type": "foaf:Agent", "foaf:name": platform_name},
        "dcat:dataset": datasets,
    })
}

/// The product's measured quality and its consumers' open reports, as
/// W3C Data Quality Vocabulary measurements; each metric has a URI under
/// `base`.
fn quality_measurements(
    base: &str,
    product: &Product,
    open: Option<crate::feedback::OpenReports>,
) -> Value {
    let measurement = |metric: &str, value: Value| {
        json!({
            "@type": "dqv:QualityMeasurement",
            "dqv:isMeasurementOf": {"@id": format!("{base}/metrics/{metric}")},
            "dqv:value": value,
        })
    };
    let mut measurements = Vec::new();
    if let Some(quality) = &product.spec.quality {
        measurements.push(measurement("completeness", json!(quality.completeness)));
        measurements.push(measurement("validity", json!(quality.validity)));
        measurements.push(measurement(
            "freshness-seconds",
            json!(quality.freshness_seconds),
        ));
    }
    let open = open.unwrap_or_default();
    measurements.push(measurement("open-quality-reports", json!(open.count)));
    if open.count > 0 {
        measurements.push(measurement(
            "oldest-open-quality-report",
            json!({"@value": iso_datetime(open.oldest_unix_ms), "@type": "xsd:dateTime"}),
        ));
    }
    Value::Array(measurements)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_iso_8601_utc() {
        assert_eq!(iso_datetime(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_datetime(1_796_000_000_000), "2026-11-30T00:53:20Z");
        assert_eq!(iso_datetime(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn frequencies_and_licences_map_to_their_vocabularies() {
        assert_eq!(frequency("Monthly").unwrap(), format!("{FREQUENCY}MONTHLY"));
        assert_eq!(frequency("every full moon"), None);
        assert_eq!(licence("CC-BY-4.0"), "https://spdx.org/licenses/CC-BY-4.0");
        assert_eq!(licence("https://example.org/l"), "https://example.org/l");
    }
}
