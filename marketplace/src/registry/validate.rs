//! The rules a product spec must meet before it is stored: its words, its
//! tables and types, an output policy the sandbox can enforce, price plans
//! and quality figures. Every refusal names the field.

use crate::error::{MarketError, Result, check_text};
use crate::identity::validate_slug;
use crate::spec::{Column, PriceKind, PricePlan, ProductSpec, Sensitivity};

const KNOWN_TIERS: &[&str] = &["municipal", "edge", "partner"];
const KNOWN_TYPES: &[&str] = &[
    "boolean",
    "int32",
    "int64",
    "float64",
    "utf8",
    "date32",
    "timestamp",
];

fn valid_type(name: &str) -> bool {
    if KNOWN_TYPES.contains(&name) {
        return true;
    }
    // decimal(p,s) with 1 <= p <= 38 and 0 <= s <= p.
    name.strip_prefix("decimal(")
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|inner| inner.split_once(','))
        .and_then(|(p, s)| Some((p.trim().parse::<u32>().ok()?, s.trim().parse::<u32>().ok()?)))
        .is_some_and(|(p, s)| (1..=38).contains(&p) && s <= p)
}

/// The longest between two looks at a refresh folder: a week.
pub const MAX_REFRESH_MINUTES: i64 = 10_080;

/// The longest a superseded data version may stay readable: ten years.
pub const MAX_RETENTION_DAYS: i64 = 3650;

/// Checks a product spec; the error names the first bad field.
///
/// # Errors
/// `InvalidArgument` with the field path, e.g. `spec.tables[0].columns[2].type`.
pub fn validate_spec(spec: &ProductSpec) -> Result<()> {
    validate_description(spec)?;
    let columns = validate_tables(spec)?;
    validate_policy(spec, &columns)?;
    validate_price_plans(spec)?;
    validate_quality(spec)?;
    validate_against_withholding(spec)
}

/// The product's words and where it lives: title, description, licence,
/// update frequency, storage location, region, tier, keywords and the data
/// centers that host it.
fn validate_description(spec: &ProductSpec) -> Result<()> {
    check_text("spec.title", &spec.title, 200, true)?;
    check_text("spec.description", &spec.description, 10_000, true)?;
    check_text("spec.licence", &spec.licence, 200, true)?;
    check_text("spec.update_frequency", &spec.update_frequency, 50, true)?;
    check_text("spec.storage_location", &spec.storage_location, 1000, true)?;
    crate::quality::check_location(&spec.storage_location)?;
    check_text("spec.region", &spec.region, 100, true)?;
    if !(0..=MAX_REFRESH_MINUTES).contains(&spec.refresh_minutes) {
        return Err(MarketError::invalid(
            "spec.refresh_minutes",
            format!("0 (no refresh) to {MAX_REFRESH_MINUTES} minutes"),
        ));
    }
    if !(0..=MAX_RETENTION_DAYS).contains(&spec.version_retention_days) {
        return Err(MarketError::invalid(
            "spec.version_retention_days",
            format!("0 (keep until withdrawn) to {MAX_RETENTION_DAYS} days"),
        ));
    }
    if !KNOWN_TIERS.contains(&spec.tier.as_str()) {
        return Err(MarketError::invalid(
            "spec.tier",
            format!("{:?} is not one of {}", spec.tier, KNOWN_TIERS.join(", ")),
        ));
    }
    for (i, keyword) in spec.keywords.iter().enumerate() {
        check_text(&format!("spec.keywords[{i}]"), keyword, 50, true)?;
    }
    if spec.hosting_data_centers.is_empty() {
        return Err(MarketError::invalid(
            "spec.hosting_data_centers",
            "name at least one data center that holds the data",
        ));
    }
    for (i, dc) in spec.hosting_data_centers.iter().enumerate() {
        validate_slug(&format!("spec.hosting_data_centers[{i}]"), dc)?;
    }
    Ok(())
}

/// Tables and their columns: names, types and sensitivity. Returns every
/// column, for the policy's checks.
fn validate_tables(spec: &ProductSpec) -> Result<Vec<&Column>> {
    if spec.tables.is_empty() {
        return Err(MarketError::invalid(
            "spec.tables",
            "a product has at least one table",
        ));
    }
    let mut all_columns = Vec::new();
    for (t, table) in spec.tables.iter().enumerate() {
        let field = format!("spec.tables[{t}]");
        check_identifier(&format!("{field}.name"), &table.name)?;
        if spec.tables[..t]
            .iter()
            .any(|other| other.name == table.name)
        {
            return Err(MarketError::invalid(
                format!("{field}.name"),
                format!("table {:?} is listed twice", table.name),
            ));
        }
        if table.columns.is_empty() {
            return Err(MarketError::invalid(
                format!("{field}.columns"),
                "a table has at least one column",
            ));
        }
        for (c, column) in table.columns.iter().enumerate() {
            let field = format!("{field}.columns[{c}]");
            check_identifier(&format!("{field}.name"), &column.name)?;
            if table.columns[..c]
                .iter()
                .any(|other| other.name == column.name)
            {
                return Err(MarketError::invalid(
                    format!("{field}.name"),
                    format!("column {:?} is listed twice", column.name),
                ));
            }
            if !valid_type(&column.r#type) {
                return Err(MarketError::invalid(
                    format!("{field}.type"),
                    format!(
                        "{:?} is not one of {}, decimal(p,s)",
                        column.r#type,
                        KNOWN_TYPES.join(", ")
                    ),
                ));
            }
            if column.sensitivity() == Sensitivity::Unspecified {
                return Err(MarketError::invalid(
                    format!("{field}.sensitivity"),
                    "set public, internal, sensitive or blocked",
                ));
            }
            all_columns.push(column);
        }
    }
    Ok(all_columns)
}

/// The output policy against the declared columns: thresholds, limits,
/// differential privacy, the privacy unit, list, join and aggregate
/// columns, scalar functions and approved algorithms.
fn validate_policy(spec: &ProductSpec, all_columns: &[&Column]) -> Result<()> {
    let policy = spec
        .output_policy
        .as_ref()
        .ok_or_else(|| MarketError::invalid("spec.output_policy", "is required"))?;
    if policy.min_aggregation_count < 1 {
        return Err(MarketError::invalid(
            "spec.output_policy.min_aggregation_count",
            "must be at least 1",
        ));
    }
    if policy.max_list_rows < 0 || policy.max_result_bytes < 0 {
        return Err(MarketError::invalid(
            "spec.output_policy.max_list_rows",
            "must not be negative",
        ));
    }
    if !(policy.dp_epsilon_budget >= 0.0 && policy.dp_epsilon_budget.is_finite()) {
        return Err(MarketError::invalid(
            "spec.output_policy.dp_epsilon_budget",
            "must be a finite number ≥ 0",
        ));
    }
    let find_column = |name: &str| all_columns.iter().find(|column| column.name == name);
    if policy.dp_epsilon_budget > 0.0 {
        if !(policy.dp_epsilon_per_query > 0.0
            && policy.dp_epsilon_per_query <= policy.dp_epsilon_budget)
        {
            return Err(MarketError::invalid(
                "spec.output_policy.dp_epsilon_per_query",
                "with a privacy budget, each query spends more than 0 and at most the budget",
            ));
        }
        if policy.dp_max_rows_per_unit == 0 {
            return Err(MarketError::invalid(
                "spec.output_policy.dp_max_rows_per_unit",
                "with a privacy budget, at least 1 (rows one privacy unit may have)",
            ));
        }
        for (column, bounds) in &policy.dp_bounds {
            let field = format!("spec.output_policy.dp_bounds[{column:?}]");
            if find_column(column).is_none() {
                return Err(MarketError::invalid(field, format!("no column {column:?}")));
            }
            if !(bounds.lower.is_finite()
                && bounds.upper.is_finite()
                && bounds.lower <= bounds.upper)
            {
                return Err(MarketError::invalid(field, "finite, with lower <= upper"));
            }
        }
    }
    if !policy.privacy_unit_column.is_empty() && find_column(&policy.privacy_unit_column).is_none()
    {
        return Err(MarketError::invalid(
            "spec.output_policy.privacy_unit_column",
            format!("no column {:?}", policy.privacy_unit_column),
        ));
    }
    for (i, name) in policy.list_columns.iter().enumerate() {
        let field = format!("spec.output_policy.list_columns[{i}]");
        let column = find_column(name)
            .ok_or_else(|| MarketError::invalid(&field, format!("no column {name:?}")))?;
        if column.sensitivity() == Sensitivity::Blocked {
            return Err(MarketError::invalid(
                field,
                format!("column {name:?} is blocked and can never be listed"),
            ));
        }
    }
    for (i, name) in policy.join_columns.iter().enumerate() {
        let field = format!("spec.output_policy.join_columns[{i}]");
        if policy.dp_epsilon_budget > 0.0 {
            // A join can repeat a person's rows beyond what the noise hides.
            return Err(MarketError::invalid(
                field,
                "a product that adds noise allows no joins",
            ));
        }
        let column = find_column(name)
            .ok_or_else(|| MarketError::invalid(&field, format!("no column {name:?}")))?;
        if column.sensitivity() != Sensitivity::Public {
            return Err(MarketError::invalid(
                field,
                format!(
                    "column {name:?} is not public; only public columns may match rows in a join"
                ),
            ));
        }
    }
    for (name, declared) in &policy.column_functions {
        let field = format!("spec.output_policy.column_functions[{name:?}]");
        let column = find_column(name)
            .ok_or_else(|| MarketError::invalid(&field, format!("no column {name:?}")))?;
        if column.sensitivity() == Sensitivity::Blocked {
            return Err(MarketError::invalid(
                field,
                format!("column {name:?} is blocked and cannot be aggregated"),
            ));
        }
        for function in &declared.functions {
            if !civicgrid_sandbox::policy::DECLARABLE_AGGREGATES
                .contains(&function.to_ascii_lowercase().as_str())
            {
                return Err(MarketError::invalid(
                    field,
                    format!(
                        "{function:?} cannot be declared; declarable: {}",
                        civicgrid_sandbox::policy::DECLARABLE_AGGREGATES.join(", ")
                    ),
                ));
            }
        }
    }
    for (i, function) in policy.scalar_functions.iter().enumerate() {
        if function.is_empty()
            || !function
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(MarketError::invalid(
                format!("spec.output_policy.scalar_functions[{i}]"),
                "a function's name: letters, digits and _",
            ));
        }
    }
    for (i, hash) in policy.approved_algorithm_sha256.iter().enumerate() {
        if hash.len() != 64
            || !hash
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            return Err(MarketError::invalid(
                format!("spec.output_policy.approved_algorithm_sha256[{i}]"),
                "must be 64 lower-case hex digits",
            ));
        }
    }
    Ok(())
}

/// At least one price plan, each valid, no id twice.
fn validate_price_plans(spec: &ProductSpec) -> Result<()> {
    if spec.price_plans.is_empty() {
        return Err(MarketError::invalid(
            "spec.price_plans",
            "a product has at least one price plan",
        ));
    }
    for (i, plan) in spec.price_plans.iter().enumerate() {
        validate_plan(&format!("spec.price_plans[{i}]"), plan)?;
        if spec.price_plans[..i]
            .iter()
            .any(|other| other.id == plan.id)
        {
            return Err(MarketError::invalid(
                format!("spec.price_plans[{i}].id"),
                format!("plan {:?} is listed twice", plan.id),
            ));
        }
    }
    Ok(())
}

/// Declared quality figures, where given, within their ranges.
fn validate_quality(spec: &ProductSpec) -> Result<()> {
    for (field, quality) in [
        ("quality", &spec.quality),
        ("quality_minimums", &spec.quality_minimums),
    ] {
        let Some(quality) = quality else { continue };
        for (name, value) in [
            ("completeness", quality.completeness),
            ("validity", quality.validity),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(MarketError::invalid(
                    format!("spec.{field}.{name}"),
                    "must be between 0 and 1",
                ));
            }
        }
        if quality.freshness_seconds < 0 {
            return Err(MarketError::invalid(
                format!("spec.{field}.freshness_seconds"),
                "must not be negative",
            ));
        }
    }
    Ok(())
}

/// What a product that withholds rows may not offer: a price by compute,
/// or functions that make a kept row as costly as a query likes.
fn validate_against_withholding(spec: &ProductSpec) -> Result<()> {
    // A query's compute grows with the rows its filter keeps, withheld ones
    // too: priced by compute, its bill would count them.
    if let Some(i) = spec
        .price_plans
        .iter()
        .position(|plan| plan.kind() == PriceKind::PerComputeUnit)
        && crate::policy::withholds_rows(spec)
    {
        return Err(MarketError::invalid(
            format!("spec.price_plans[{i}].kind"),
            "a product whose output policy withholds rows (a threshold, noise, a row limit on \
             list queries or blocked columns) cannot be priced by compute: a query's compute \
             grows with the rows it filters, withheld ones too, so its bill would count them; \
             price it per query, per released row or by subscription",
        ));
    }
    if let Some((i, function)) = spec.output_policy.as_ref().and_then(|policy| {
        policy
            .scalar_functions
            .iter()
            .enumerate()
            .find(|(_, f)| GROWING_FUNCTIONS.contains(&f.to_ascii_lowercase().as_str()))
    }) && crate::policy::withholds_rows(spec)
    {
        return Err(MarketError::invalid(
            format!("spec.output_policy.scalar_functions[{i}]"),
            format!(
                "{function} can return a string far longer than its arguments, so a query could \
                 make each row it keeps as costly as it likes, and its running time would count \
                 withheld rows; it cannot be declared on a product that withholds rows"
            ),
        ));
    }
    Ok(())
}

/// Scalar functions whose result can be far longer than their arguments.
const GROWING_FUNCTIONS: &[&str] = &[
    "lpad",
    "overlay",
    "regexp_replace",
    "repeat",
    "replace",
    "rpad",
    "translate",
];

fn check_identifier(field: &str, name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(MarketError::invalid(
            field,
            format!(
                "{name:?} must be 1 to 63 characters of a-z, 0-9 and '_', not starting with a digit"
            ),
        ))
    }
}

fn validate_plan(field: &str, plan: &PricePlan) -> Result<()> {
    validate_slug(&format!("{field}.id"), &plan.id)?;
    let kind = plan.kind();
    if kind == PriceKind::Unspecified {
        return Err(MarketError::invalid(
            format!("{field}.kind"),
            "set free, per_query, per_compute_unit, per_row_released or subscription",
        ));
    }
    if plan.unit_price_minor < 0 || plan.monthly_fee_minor < 0 || plan.included_units < 0 {
        return Err(MarketError::invalid(
            format!("{field}.unit_price_minor"),
            "prices and quotas must not be negative",
        ));
    }
    if kind != PriceKind::Free
        && (plan.currency.len() != 3 || !plan.currency.chars().all(|c| c.is_ascii_uppercase()))
    {
        return Err(MarketError::invalid(
            format!("{field}.currency"),
            "an ISO 4217 code such as EUR or CNY",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::sample_spec;

    #[test]
    fn a_complete_spec_is_valid() {
        validate_spec(&sample_spec()).unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        type Breaker = Box<dyn Fn(&mut ProductSpec)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("spec.title", Box::new(|s| s.title.clear())),
            ("spec.tier", Box::new(|s| s.tier = "orbital".into())),
            (
                "spec.output_policy.scalar_functions[1]",
                Box::new(|s| {
                    if let Some(policy) = s.output_policy.as_mut() {
                        policy.scalar_functions = vec!["upper".into(), "Repeat".into()];
                    }
                }),
            ),
            // Priced by compute under a threshold: the bill would count
            // the rows a query filtered, withheld ones too.
            (
                "spec.price_plans[0].kind",
                Box::new(|s| s.price_plans[0].kind = PriceKind::PerComputeUnit as i32),
            ),
            (
                "spec.storage_location",
                Box::new(|s| s.storage_location = "/srv/other-provider/population".into()),
            ),
            (
                "spec.storage_location",
                Box::new(|s| s.storage_location = "file:///srv/population".into()),
            ),
            (
                "spec.storage_location",
                Box::new(|s| s.storage_location = "products/../../etc".into()),
            ),
            (
                "spec.storage_location",
                Box::new(|s| s.storage_location = "./".into()),
            ),
            (
                "spec.hosting_data_centers",
                Box::new(|s| s.hosting_data_centers.clear()),
            ),
            ("spec.tables", Box::new(|s| s.tables.clear())),
            (
                "spec.tables[0].columns[1].type",
                Box::new(|s| s.tables[0].columns[1].r#type = "blob".into()),
            ),
            (
                "spec.tables[0].columns[0].sensitivity",
                Box::new(|s| s.tables[0].columns[0].sensitivity = 0),
            ),
            (
                "spec.tables[0].columns[1].name",
                Box::new(|s| s.tables[0].columns[1].name = "district".into()),
            ),
            (
                "spec.output_policy.min_aggregation_count",
                Box::new(|s| s.output_policy.as_mut().unwrap().min_aggregation_count = 0),
            ),
            (
                "spec.output_policy.list_columns[0]",
                Box::new(|s| {
                    s.output_policy.as_mut().unwrap().list_columns = vec!["person_id".into()]
                }),
            ),
            (
                "spec.output_policy.privacy_unit_column",
                Box::new(|s| {
                    s.output_policy.as_mut().unwrap().privacy_unit_column = "nobody".into()
                }),
            ),
            (
                "spec.output_policy.join_columns[0]",
                Box::new(|s| {
                    s.output_policy.as_mut().unwrap().join_columns = vec!["person_id".into()]
                }),
            ),
            (
                "spec.output_policy.join_columns[0]",
                Box::new(|s| {
                    let policy = s.output_policy.as_mut().unwrap();
                    policy.dp_epsilon_budget = 1.0;
                    policy.dp_epsilon_per_query = 0.5;
                    policy.dp_max_rows_per_unit = 1;
                    policy.join_columns = vec!["district".into()];
                }),
            ),
            (
                "spec.output_policy.column_functions[\"district\"]",
                Box::new(|s| {
                    s.output_policy.as_mut().unwrap().column_functions.insert(
                        "district".into(),
                        crate::spec::AggregateFunctions {
                            functions: vec!["string_agg".into()],
                        },
                    );
                }),
            ),
            (
                "spec.output_policy.approved_algorithm_sha256[0]",
                Box::new(|s| {
                    s.output_policy.as_mut().unwrap().approved_algorithm_sha256 = vec!["abc".into()]
                }),
            ),
            (
                "spec.price_plans[0].currency",
                Box::new(|s| s.price_plans[0].currency = "euro".into()),
            ),
            (
                "spec.price_plans[0].kind",
                Box::new(|s| s.price_plans[0].kind = 0),
            ),
            (
                "spec.output_policy.dp_epsilon_per_query",
                Box::new(|s| {
                    let policy = s.output_policy.as_mut().unwrap();
                    policy.dp_epsilon_budget = 1.0;
                    policy.dp_epsilon_per_query = 2.0;
                    policy.dp_max_rows_per_unit = 1;
                }),
            ),
            (
                "spec.output_policy.dp_max_rows_per_unit",
                Box::new(|s| {
                    let policy = s.output_policy.as_mut().unwrap();
                    policy.dp_epsilon_budget = 1.0;
                    policy.dp_epsilon_per_query = 0.1;
                }),
            ),
            (
                "spec.output_policy.dp_bounds[\"income\"]",
                Box::new(|s| {
                    let policy = s.output_policy.as_mut().unwrap();
                    policy.dp_epsilon_budget = 1.0;
                    policy.dp_epsilon_per_query = 0.1;
                    policy.dp_max_rows_per_unit = 1;
                    policy.dp_bounds.insert(
                        "income".into(),
                        crate::spec::DpBounds {
                            lower: 0.0,
                            upper: 1.0,
                        },
                    );
                }),
            ),
        ];
        for (field, break_it) in cases {
            let mut spec = sample_spec();
            break_it(&mut spec);
            match validate_spec(&spec) {
                Err(MarketError::InvalidArgument { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[test]
    fn decimal_types_are_checked() {
        assert!(valid_type("decimal(12,2)"));
        assert!(!valid_type("decimal(2,12)"));
        assert!(!valid_type("decimal(x)"));
    }
}
