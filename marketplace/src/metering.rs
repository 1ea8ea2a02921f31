//! What a query's cost may tell its consumer.
//!
//! Fuel is deterministic, and a query's fuel grows with the rows that pass
//! its filter. Shown or billed, it counts rows the output policy withholds:
//! the cost of `SELECT COUNT(*) … WHERE` a slice too small to release grows
//! with each person in it, and a consumer who binary-searches its compute
//! budget learns the same from which runs finish. Noise on the figures does
//! not help, because the consumer chooses how much each matching row costs
//! (a computed column that is expensive per row can make one row double the
//! cost).
//!
//! So on a product whose policy withholds rows
//! ([`OutputPolicy::withholds_rows`]) a query's compute is *withheld*: its
//! price may not depend on it (the registry refuses compute-priced plans
//! there), the consumer sees no fuel, compute units, time or bytes, and
//! cannot choose its budget. What is left is whether a run finishes within
//! the server's budget; the fuel, time and memory a run may use are drawn at
//! random below it, so a run made to end near a limit finishes by chance
//! rather than by one row more or less. Elsewhere (nothing withheld)
//! metering is exact.

use std::time::Duration;

use civicgrid_sandbox::policy::OutputPolicy;
use rand::Rng;

use crate::spec::ProductSpec;

/// The mean, in powers of two, of how far below the budget a withheld run's
/// limits are drawn: `budget · 2^-E` with `E ~ Exponential(mean 1/4)`. Nine
/// runs in ten finish if the budget is 1.5 times what they need; a run one
/// part in a thousand dearer than another is 0.6% more likely to run out.
pub const LIMIT_SCALE_BITS: f64 = 0.25;

/// Draws of `E` beyond this are drawn again: a run may always use at least a
/// sixteenth of the budget.
const LIMIT_CUT_OFF_BITS: f64 = 4.0;

/// How a query's compute is metered for its consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metering {
    /// Fuel, time, bytes and compute units as used, billed by compute if
    /// the plan says so, within a budget the consumer may choose.
    Exact,
    /// None of it shown or billed; the server's budget, limits drawn at
    /// random below it.
    Withheld,
}

impl Metering {
    /// Withheld where the policy withholds rows, exact elsewhere.
    #[must_use]
    pub fn for_policy(policy: &OutputPolicy) -> Self {
        if policy.withholds_rows() {
            Self::Withheld
        } else {
            Self::Exact
        }
    }

    /// Withheld where the product withholds rows under any contract, or
    /// this contract's policy does: a contract for approved algorithms only
    /// has a policy with neither a threshold nor a row limit, yet the
    /// algorithm reads the rows the threshold protects.
    #[must_use]
    pub fn for_product(spec: &ProductSpec, policy: &OutputPolicy) -> Self {
        if crate::policy::withholds_rows(spec) {
            Self::Withheld
        } else {
            Self::for_policy(policy)
        }
    }

    /// The name stored with a query and shown in its summary.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Withheld => "withheld",
        }
    }

    /// The fuel a run may burn: the budget when exact, else `budget · 2^-E`.
    pub fn fuel_limit(self, budget_fuel: u64, rng: &mut impl Rng) -> u64 {
        match self {
            Self::Exact => budget_fuel,
            // Exact below 2^53 fuel (9 billion compute units).
            Self::Withheld => ((budget_fuel as f64) * below_budget(rng)).max(1.0) as u64,
        }
    }

    /// The linear memory a run may grow to, drawn like its fuel (a run near
    /// the limit is one whose kept rows fill it), never below `floor`, what
    /// the guest starts with.
    pub fn memory_limit(self, budget_bytes: u64, floor: u64, rng: &mut impl Rng) -> u64 {
        match self {
            Self::Exact => budget_bytes,
            Self::Withheld => (((budget_bytes as f64) * below_budget(rng)) as u64)
                .max(floor)
                .min(budget_bytes),
        }
    }

    /// The wall time a run may take, drawn like its fuel: a run near its
    /// deadline is one that burns fuel.
    pub fn wall_time_limit(self, budget: Duration, rng: &mut impl Rng) -> Duration {
        match self {
            Self::Exact => budget,
            Self::Withheld => budget.mul_f64(below_budget(rng)),
        }
    }
}

/// `2^-E`, `E ~ Exponential(mean LIMIT_SCALE_BITS)` drawn again beyond
/// [`LIMIT_CUT_OFF_BITS`] (so no limit sits exactly at the cut-off).
fn below_budget(rng: &mut impl Rng) -> f64 {
    loop {
        // `1 - u` is in (0, 1]: never the logarithm of zero.
        let u: f64 = rng.r#gen();
        let bits = -(1.0 - u).ln() * LIMIT_SCALE_BITS;
        if bits <= LIMIT_CUT_OFF_BITS {
            return 2f64.powf(-bits);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const BUDGET_FUEL: u64 = 20_000 * civicgrid_sandbox::FUEL_PER_COMPUTE_UNIT;

    /// An algorithm-only contract on a product with a threshold gets a
    /// policy with no threshold and no row limit: still withheld.
    #[test]
    fn a_product_that_withholds_rows_is_withheld_under_every_contract() {
        let threshold = ProductSpec {
            output_policy: Some(crate::spec::OutputPolicy {
                min_aggregation_count: 10,
                privacy_unit_column: "person_id".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let open = ProductSpec {
            output_policy: Some(crate::spec::OutputPolicy {
                min_aggregation_count: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let algorithms_only = OutputPolicy::default();
        assert!(!algorithms_only.withholds_rows());
        assert_eq!(
            Metering::for_product(&threshold, &algorithms_only),
            Metering::Withheld
        );
        assert_eq!(
            Metering::for_product(&open, &algorithms_only),
            Metering::Exact
        );
    }

    #[test]
    fn exact_limits_are_the_budget() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(
            Metering::Exact.fuel_limit(BUDGET_FUEL, &mut rng),
            BUDGET_FUEL
        );
        assert_eq!(
            Metering::Exact.memory_limit(1 << 31, 1 << 20, &mut rng),
            1 << 31
        );
        assert_eq!(
            Metering::Exact.wall_time_limit(Duration::from_secs(60), &mut rng),
            Duration::from_secs(60)
        );
    }

    /// The share of runs that may use at least `f` of the budget follows
    /// `1 - f^(1 / (b ln 2))`, so the chance of finishing changes smoothly
    /// with a run's cost: no cost is a threshold between always and never
    /// (below the budget itself).
    #[test]
    fn withheld_limits_fall_anywhere_below_the_budget_and_never_below_a_sixteenth() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let limits: Vec<u64> = (0..20_000)
            .map(|_| Metering::Withheld.fuel_limit(BUDGET_FUEL, &mut rng))
            .collect();
        assert!(
            limits
                .iter()
                .all(|&l| (BUDGET_FUEL / 16..=BUDGET_FUEL).contains(&l))
        );
        let share_at_least = |fraction: f64| {
            let bar = (BUDGET_FUEL as f64 * fraction) as u64;
            limits.iter().filter(|&&l| l >= bar).count() as f64 / limits.len() as f64
        };
        for fraction in [0.5_f64, 2.0 / 3.0, 0.9, 0.99] {
            let expected = 1.0 - fraction.powf(1.0 / (LIMIT_SCALE_BITS * std::f64::consts::LN_2));
            let measured = share_at_least(fraction);
            assert!(
                (measured - expected).abs() < 0.015,
                "limit ≥ {fraction} of the budget: {measured} of runs, expected {expected}"
            );
        }
        // Two costs 1% apart near the budget finish at different, but close,
        // rates: neither always nor never.
        let (near, nearer) = (share_at_least(0.97), share_at_least(0.98));
        assert!(
            near > nearer && nearer > 0.05 && near - nearer < 0.08,
            "{near} {nearer}"
        );
        let deadlines: Vec<Duration> = (0..1_000)
            .map(|_| Metering::Withheld.wall_time_limit(Duration::from_secs(60), &mut rng))
            .collect();
        assert!(
            deadlines
                .iter()
                .all(|d| (Duration::from_millis(3_750)..=Duration::from_secs(60)).contains(d))
        );
        assert!(deadlines.iter().any(|d| *d < Duration::from_secs(45)));
        let memory: Vec<u64> = (0..1_000)
            .map(|_| Metering::Withheld.memory_limit(1 << 31, 1 << 30, &mut rng))
            .collect();
        assert!(memory.iter().all(|m| ((1 << 30)..=(1 << 31)).contains(m)));
        assert!(memory.contains(&(1 << 30)), "the floor holds");
        assert!(memory.iter().any(|&m| m > (1 << 30) && m < (1 << 31)));
        assert!(deadlines.iter().any(|d| *d > Duration::from_secs(59)));
    }
}
