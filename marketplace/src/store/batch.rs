//! Writes gathered to go to the database together.
//!
//! On SQLite every statement is a round trip to the writer's thread, taken
//! while every other grouped work waits behind it; a settlement made ten of
//! them. A [`WriteBatch`] sends its statements to SQLite as one
//! multi-statement string (one trip), and to PostgreSQL one after the other,
//! as before. Only writes go in a batch: a read must run at once, and must
//! not depend on a write still waiting in one.

use sqlx::AnyConnection;

use super::Backend;
use crate::error::{MarketError, Result};

/// A value bound to a batched statement. The variants are the Rust types the
/// marketplace binds, so PostgreSQL sees the same parameter types as when
/// the statement runs alone.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    /// `TEXT`.
    Text(String),
    /// `TEXT` or `NULL`.
    OptionalText(Option<String>),
    /// `BIGINT`.
    Int(i64),
    /// `DOUBLE PRECISION` / `REAL`.
    Real(f64),
    /// `BYTEA` / `BLOB`.
    Blob(Vec<u8>),
}

impl From<&str> for Param {
    fn from(value: &str) -> Self {
        Self::Text(value.to_owned())
    }
}

impl From<String> for Param {
    fn from(value: String) -> Self {
        Self::Text(value)
    }
}

impl From<&String> for Param {
    fn from(value: &String) -> Self {
        Self::Text(value.clone())
    }
}

impl From<Option<&str>> for Param {
    fn from(value: Option<&str>) -> Self {
        Self::OptionalText(value.map(str::to_owned))
    }
}

impl From<i64> for Param {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

impl From<f64> for Param {
    fn from(value: f64) -> Self {
        Self::Real(value)
    }
}

impl From<Vec<u8>> for Param {
    fn from(value: Vec<u8>) -> Self {
        Self::Blob(value)
    }
}

/// One statement and its parameters, numbered `$1`… (or anonymous `?` on
/// SQLite) within the statement, as if it ran alone.
#[derive(Debug)]
struct Statement {
    sql: String,
    params: Vec<Param>,
}

/// Statements to run in order, in the caller's transaction.
#[derive(Debug, Default)]
pub struct WriteBatch {
    statements: Vec<Statement>,
    audit_appended: bool,
}

impl WriteBatch {
    /// An empty batch.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a statement, with parameters numbered from `$1` as if it ran
    /// alone.
    pub fn push(&mut self, sql: impl Into<String>, params: Vec<Param>) {
        self.statements.push(Statement {
            sql: sql.into(),
            params,
        });
    }

    /// How many statements wait in the batch.
    #[must_use]
    pub fn len(&self) -> usize {
        self.statements.len()
    }

    /// Whether nothing waits in the batch.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    /// Marks that the batch holds an audit append. An append reads the log's
    /// head and writes the next one; a second append into the same batch
    /// would read the head before the first's write and fork the log.
    ///
    /// # Errors
    /// `Corrupt` when the batch already holds an append (a bug).
    pub(crate) fn claim_audit_append(&mut self) -> Result<()> {
        if self.audit_appended {
            return Err(MarketError::Corrupt(
                "two audit appends in one write batch would read the same head".into(),
            ));
        }
        self.audit_appended = true;
        Ok(())
    }

    /// Runs the statements in order on `connection`; returns the rows they
    /// changed, all together.
    ///
    /// # Errors
    /// `Corrupt` when a statement's parameters do not match its placeholders
    /// (a bug); database failures, after which the caller's transaction (or
    /// savepoint) must be rolled back: some statements may have run.
    #[tracing::instrument(name = "writes", skip_all, fields(statements = self.statements.len()))]
    pub async fn execute(self, connection: &mut AnyConnection) -> Result<u64> {
        if self.statements.is_empty() {
            return Ok(0);
        }
        match Backend::of(connection) {
            Backend::Sqlite => {
                let (sql, params) = sqlite_script(self.statements)?;
                Ok(bound(&sql, params)
                    .execute(&mut *connection)
                    .await?
                    .rows_affected())
            }
            Backend::Postgres => {
                for statement in &self.statements {
                    let (_, order) = anonymous(&statement.sql)?;
                    check_arity(statement, &order)?;
                }
                let mut changed = 0;
                for statement in self.statements {
                    changed += bound(&statement.sql, statement.params)
                        .execute(&mut *connection)
                        .await?
                        .rows_affected();
                }
                Ok(changed)
            }
        }
    }
}

fn bound(
    sql: &str,
    params: Vec<Param>,
) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments> {
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for param in params {
        query = match param {
            Param::Text(value) => query.bind(value),
            Param::OptionalText(value) => query.bind(value),
            Param::Int(value) => query.bind(value),
            Param::Real(value) => query.bind(value),
            Param::Blob(value) => query.bind(value),
        };
    }
    query
}

/// Joins the statements into one SQLite script. Every placeholder becomes an
/// anonymous `?`, and the parameters are laid out in the order the
/// placeholders appear (one repeated `$N` takes its value twice): sqlx binds
/// a script's anonymous parameters in order across its statements, while a
/// numbered one is found through SQLite's list of parameter names, a linear
/// search per parameter, which made binding a 500-row insert quadratic.
fn sqlite_script(statements: Vec<Statement>) -> Result<(String, Vec<Param>)> {
    let mut script = String::new();
    let mut params = Vec::new();
    for statement in statements {
        let (sql, order) = anonymous(&statement.sql)?;
        check_arity(&statement, &order)?;
        if !script.is_empty() {
            script.push_str(";\n");
        }
        script.push_str(&sql);
        params.extend(
            order
                .iter()
                .map(|number| statement.params[number - 1].clone()),
        );
    }
    Ok((script, params))
}

/// Refuses a statement whose parameters do not match its placeholders (a
/// bug), before any statement of the batch runs.
fn check_arity(statement: &Statement, order: &[usize]) -> Result<()> {
    let takes = order.iter().copied().max().unwrap_or(0);
    if takes != statement.params.len() {
        return Err(MarketError::Corrupt(format!(
            "a batched statement has {takes} placeholders and {} parameters: {}",
            statement.params.len(),
            statement.sql
        )));
    }
    Ok(())
}

/// `sql` with its `$N`, `?N` and `?` placeholders all written `?`, and the
/// parameter number (from 1) each of them took. Quoted literals and
/// identifiers are left alone. A statement mixing anonymous and numbered
/// placeholders is refused: SQLite numbers such a mix in a way nobody
/// writes on purpose.
fn anonymous(sql: &str) -> Result<(String, Vec<usize>)> {
    let mut out = String::with_capacity(sql.len());
    let mut order = Vec::new();
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    let (mut unnumbered, mut numbered) = (0_usize, false);
    while let Some(c) = chars.next() {
        if let Some(open) = quote {
            out.push(c);
            if c == open {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                out.push(c);
            }
            '$' | '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                let number = if digits.is_empty() {
                    if c == '$' {
                        return Err(MarketError::Corrupt(format!(
                            "a batched statement has a bare `$`: {sql}"
                        )));
                    }
                    unnumbered += 1;
                    unnumbered
                } else {
                    numbered = true;
                    match digits.parse::<usize>() {
                        Ok(number) if number > 0 => number,
                        _ => {
                            return Err(MarketError::Corrupt(format!(
                                "placeholder {c}{digits} in a batched statement: {sql}"
                            )));
                        }
                    }
                };
                out.push('?');
                order.push(number);
            }
            _ => out.push(c),
        }
    }
    if unnumbered > 0 && numbered {
        return Err(MarketError::Corrupt(format!(
            "a batched statement mixes `?` and numbered placeholders: {sql}"
        )));
    }
    Ok((out, order))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_becomes_anonymous_in_the_order_it_appears() {
        let (sql, order) = anonymous("UPDATE t SET a = $2 WHERE id = $1 AND b = $2").unwrap();
        assert_eq!(sql, "UPDATE t SET a = ? WHERE id = ? AND b = ?");
        assert_eq!(order, [2, 1, 2]);
        let (sql, order) = anonymous("INSERT INTO t VALUES (?,?),(?,?)").unwrap();
        assert_eq!(sql, "INSERT INTO t VALUES (?,?),(?,?)");
        assert_eq!(order, [1, 2, 3, 4]);
    }

    #[test]
    fn a_script_lays_out_each_statements_parameters_in_placeholder_order() {
        let mut batch = WriteBatch::new();
        batch.push(
            "UPDATE t SET a = $2 WHERE id = $1 AND b = $2",
            vec![Param::Int(1), Param::from("two")],
        );
        batch.push(
            "INSERT INTO u VALUES (?, ?)",
            vec![Param::Int(3), Param::Int(4)],
        );
        batch.push("DELETE FROM v", vec![]);
        let (script, params) = sqlite_script(batch.statements).unwrap();
        assert_eq!(
            script,
            "UPDATE t SET a = ? WHERE id = ? AND b = ?;\nINSERT INTO u VALUES (?, ?);\nDELETE FROM v"
        );
        assert_eq!(
            params,
            [
                Param::from("two"),
                Param::Int(1),
                Param::from("two"),
                Param::Int(3),
                Param::Int(4)
            ]
        );
    }

    #[test]
    fn quoted_text_keeps_its_dollars_and_question_marks() {
        let (sql, order) =
            anonymous("SELECT '$1 ?', \"a$2\" FROM t WHERE x = $1 AND y = 'it''s ?'").unwrap();
        assert_eq!(
            sql,
            "SELECT '$1 ?', \"a$2\" FROM t WHERE x = ? AND y = 'it''s ?'"
        );
        assert_eq!(order, [1]);
    }

    #[test]
    fn placeholders_nobody_means_are_refused() {
        for sql in [
            "SELECT ? + $1",
            "SELECT $0",
            "SELECT $ + 1",
            "SELECT $99999999999999999999999",
        ] {
            assert!(
                matches!(anonymous(sql), Err(MarketError::Corrupt(_))),
                "{sql} was accepted"
            );
        }
    }

    #[test]
    fn a_statement_with_the_wrong_number_of_parameters_is_refused_before_it_runs() {
        let mut batch = WriteBatch::new();
        batch.push("INSERT INTO t VALUES ($1, $2)", vec![Param::Int(1)]);
        let error = sqlite_script(batch.statements).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("2 placeholders and 1 parameters"),
            "{error}"
        );
    }

    #[test]
    fn a_second_audit_append_into_one_batch_is_refused() {
        let mut batch = WriteBatch::new();
        batch.claim_audit_append().unwrap();
        assert!(matches!(
            batch.claim_audit_append(),
            Err(MarketError::Corrupt(_))
        ));
    }
}
