//! CivicGrid's integration and end-to-end tests live in `tests/integration/`
//! (one test binary); this library holds what they share, above all the
//! multi-cluster Kubernetes harness in [`controlplane`].

pub mod controlplane;
pub mod kubelet;
pub mod market;
pub mod objectstore;
pub mod operator;
pub mod pool;
pub mod runners;
pub mod sandbox;
pub mod tpch;

/// Declares each scenario `async fn name(db: Db) -> anyhow::Result<()>` (in
/// the calling module) as two tests: `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! on_both_databases {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario($crate::market::Db::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario($crate::market::Db::Postgres).await
                }
            )*
        }
    };
}
