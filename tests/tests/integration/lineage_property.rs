//! The threshold as a property: for random aggregate queries from a grammar
//! of constructs the analysis rule allows (joins on join columns, subqueries
//! that drop the unit, constants named like the unit, filters, HAVING,
//! ORDER BY … LIMIT), every group the sandbox releases covers at least k
//! distinct *real* privacy units, counted natively on the raw data with the
//! real `person_id`; and where nothing above the aggregation drops groups,
//! every group that does cover k units is released (the threshold is not
//! met by withholding everything).

use std::collections::BTreeMap;

use civicgrid_sandbox::policy::OutputPolicy;
use civicgrid_tests::sandbox::run_native;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::red_team::{policy, run, shared_residents};

const K: i64 = 10;

/// One generated query, in the parts the native check reuses.
#[derive(Debug)]
struct Case {
    /// The FROM clause the consumer writes.
    from: &'static str,
    /// The same rows with the real unit, for the native count.
    native_from: &'static str,
    dims: Vec<&'static str>,
    filter: Option<&'static str>,
    aggregates: Vec<&'static str>,
    having: Option<&'static str>,
    limit: Option<u32>,
}

impl Case {
    fn generate(rng: &mut StdRng) -> Self {
        let joined = "residents r join districts d on r.district = d.name";
        let (from, native_from, joins) = *[
            ("residents r", "residents r", false),
            (joined, joined, true),
            (
                "(select district, age_band, household_size, income from residents) r",
                "residents r",
                false,
            ),
            (
                "(select district, age_band, household_size, income, 1 as person_id from residents) r",
                "residents r",
                false,
            ),
            (
                "(select district, age_band, household_size, income from residents) r \
                 join districts d on r.district = d.name",
                joined,
                true,
            ),
        ]
        .choose(rng)
        .expect("bases");
        let mut dim_pool = vec!["r.district", "r.age_band", "r.household_size"];
        let mut filter_pool = vec![
            "r.district = 'Harbour'",
            "r.household_size = 2",
            "r.age_band <> '65+'",
            "r.district in ('Harbour', 'North')",
            "r.household_size between 2 and 3",
            "lower(r.district) like 'h%'",
        ];
        if joins {
            dim_pool.push("d.area_km2");
            filter_pool.push("d.area_km2 >= 16");
        }
        let dim_count = rng.gen_range(0..=2);
        let dims: Vec<&str> = dim_pool.choose_multiple(rng, dim_count).copied().collect();
        let filter = rng
            .gen_bool(0.6)
            .then(|| *filter_pool.choose(rng).expect("filters"));
        let aggregate_count = rng.gen_range(1..=3);
        let aggregates: Vec<&str> = [
            "count(*)",
            "sum(r.income)",
            "avg(r.income)",
            "count(distinct r.age_band)",
            "sum(r.income * 2 + 1)",
        ]
        .choose_multiple(rng, aggregate_count)
        .copied()
        .collect();
        let having = rng.gen_bool(0.25).then(|| {
            *["count(*) > 1", "sum(r.income) > 0"]
                .choose(rng)
                .expect("having")
        });
        let limit = (!dims.is_empty() && rng.gen_bool(0.2)).then(|| rng.gen_range(1..4));
        Self {
            from,
            native_from,
            dims,
            filter,
            aggregates,
            having,
            limit,
        }
    }

    fn sql(&self) -> String {
        let select: Vec<&str> = self.dims.iter().chain(&self.aggregates).copied().collect();
        let mut sql = format!("select {} from {}", select.join(", "), self.from);
        if let Some(filter) = self.filter {
            sql.push_str(&format!(" where {filter}"));
        }
        if !self.dims.is_empty() {
            sql.push_str(&format!(" group by {}", self.dims.join(", ")));
        }
        if let Some(having) = self.having {
            sql.push_str(&format!(" having {having}"));
        }
        if let Some(limit) = self.limit {
            sql.push_str(&format!(" order by 1 limit {limit}"));
        }
        sql
    }

    /// Distinct real units per group, over the same rows.
    fn native_units(&self) -> String {
        let dims = self.dims.join(", ");
        let mut sql = format!(
            "select {}count(distinct r.person_id) as units from {}",
            if dims.is_empty() {
                String::new()
            } else {
                format!("{dims}, ")
            },
            self.native_from
        );
        if let Some(filter) = self.filter {
            sql.push_str(&format!(" where {filter}"));
        }
        if !dims.is_empty() {
            sql.push_str(&format!(" group by {dims}"));
        }
        sql
    }
}

/// Each row's first `width` values, as text.
fn keys(batches: &[RecordBatch], width: usize) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            rows.push(
                (0..width)
                    .map(|c| array_value_to_string(batch.column(c), row).expect("value"))
                    .collect(),
            );
        }
    }
    rows
}

#[test]
fn every_released_group_covers_k_real_units() {
    let mut rng = StdRng::seed_from_u64(0x005e_ed41);
    let policy = policy();
    let tables = shared_residents();
    let (mut released_groups, mut cases_withholding) = (0, 0);
    for _ in 0..48 {
        let case = Case::generate(&mut rng);
        let sql = case.sql();
        let outcome = run(&sql, &policy)
            .unwrap_or_else(|e| panic!("the rule refused an allowed query {sql}: {e}"));
        let native = run_native(
            tables.clone(),
            &case.native_units(),
            &OutputPolicy::owner(),
            1,
        )
        .unwrap_or_else(|e| panic!("{}: {e:?}", case.native_units()));
        let width = case.dims.len();
        let units: BTreeMap<Vec<String>, i64> = keys(&native, width)
            .into_iter()
            .zip(native.iter().flat_map(|b| {
                let column = b.column(width);
                (0..b.num_rows())
                    .map(|row| {
                        array_value_to_string(column, row)
                            .expect("units")
                            .parse::<i64>()
                            .expect("a count")
                    })
                    .collect::<Vec<_>>()
            }))
            .collect();
        let released = keys(&outcome.batches, width);
        for group in &released {
            let real = units.get(group).copied().unwrap_or(0);
            assert!(
                real >= K,
                "{sql}: released group {group:?} covers {real} real units"
            );
        }
        released_groups += released.len();
        let over_k: Vec<&Vec<String>> = units
            .iter()
            .filter(|(_, n)| **n >= K)
            .map(|(g, _)| g)
            .collect();
        if over_k.len() < units.len() {
            cases_withholding += 1;
        }
        if case.having.is_none() && case.limit.is_none() {
            let mut released_sorted = released.clone();
            released_sorted.sort();
            let expected: Vec<Vec<String>> = over_k.into_iter().cloned().collect();
            assert_eq!(
                released_sorted, expected,
                "{sql}: every group of k real units, and only those"
            );
        }
    }
    // The property is not vacuous: groups were released, and some cases had
    // groups to withhold.
    assert!(released_groups >= 48, "{released_groups} groups released");
    assert!(
        cases_withholding >= 5,
        "{cases_withholding} cases withheld a group"
    );
}
