//! casbin's rules: the role permissions (`p`) and role bindings (`g`).

use sqlx::{AnyConnection, Row as _};

use crate::error::Result;

/// Adds a role's permission (`p`, role, object, action) unless present.
pub(crate) async fn add_policy(
    connection: &mut AnyConnection,
    role: &str,
    object: &str,
    action: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO casbin_rules (ptype, v0, v1, v2) VALUES ('p', $1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(role)
    .bind(object)
    .bind(action)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Every rule, as its type and its three values.
pub(crate) async fn all(connection: &mut AnyConnection) -> Result<Vec<(String, Vec<String>)>> {
    sqlx::query("SELECT ptype, v0, v1, v2 FROM casbin_rules")
        .fetch_all(&mut *connection)
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.try_get("ptype")?,
                vec![row.try_get("v0")?, row.try_get("v1")?, row.try_get("v2")?],
            ))
        })
        .collect()
}

/// Binds (or unbinds) `user` to `role` in `domain`; whether anything
/// changed.
pub(crate) async fn set_grouping(
    connection: &mut AnyConnection,
    user: &str,
    role: &str,
    domain: &str,
    bound: bool,
) -> Result<bool> {
    let changed = if bound {
        sqlx::query(
            "INSERT INTO casbin_rules (ptype, v0, v1, v2) VALUES ('g', $1, $2, $3) ON CONFLICT DO NOTHING",
        )
    } else {
        sqlx::query("DELETE FROM casbin_rules WHERE ptype = 'g' AND v0 = $1 AND v1 = $2 AND v2 = $3")
    }
    .bind(user)
    .bind(role)
    .bind(domain)
    .execute(&mut *connection)
    .await?
    .rows_affected();
    Ok(changed > 0)
}
