//! Uploads and data versions, on SQLite and PostgreSQL: a provider uploads
//! a table's rows in checksummed chunks, resumes after a cut, and commits
//! a new immutable version that queries read; a consumer pins a version and
//! gets the same answer after the data moved on; every query's audit entry
//! names the version and its fingerprint.
//!
//! Attackers: a rival provider or a consumer writing into a product that is
//! not theirs, or reading another provider's upload; a provider whose CSV
//! holds a value of the wrong type (refused, naming row and column, and the
//! product's data unchanged); someone with the store's keys swapping a
//! version's file (the query is refused, never answered from other data);
//! a consumer asking for a version that does not exist.

use civicgrid_marketplace::proto::{self, registry_client::RegistryClient};
use civicgrid_tests::market::{Db, TestMarket, authed};
use tonic::Code;

use super::queries::{BY_DISTRICT, contract, deposit, query, run, start_with, total_people};

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// `count` residents of `district`, person ids from `first`, as CSV.
pub(crate) fn residents_csv(district: &str, first: i64, count: i64) -> Vec<u8> {
    let mut csv = String::from("person_id,district,age_band\n");
    for id in first..first + count {
        csv.push_str(&format!("{id},{district},30-39\n"));
    }
    csv.into_bytes()
}

fn begin(product: &str, append: bool, file: &[u8]) -> proto::BeginUploadRequest {
    proto::BeginUploadRequest {
        product_id: product.into(),
        table: "residents".into(),
        format: "csv".into(),
        append,
        for_revision: false,
        size_bytes: i64::try_from(file.len()).unwrap(),
        sha256: sha256_hex(file),
    }
}

fn chunk(upload: &str, offset: usize, data: &[u8]) -> proto::PutUploadChunkRequest {
    proto::PutUploadChunkRequest {
        upload_id: upload.into(),
        offset: i64::try_from(offset).unwrap(),
        data: data.to_vec(),
        sha256: sha256_hex(data),
    }
}

/// Uploads `file` whole in one chunk to the sample product and commits it.
pub(crate) async fn upload(
    market: &TestMarket,
    token: &str,
    append: bool,
    file: &[u8],
) -> Result<proto::CommitUploadResponse, tonic::Status> {
    upload_to(market, token, "population", append, file).await
}

/// Uploads `file` whole in one chunk to `product` and commits it.
pub(crate) async fn upload_to(
    market: &TestMarket,
    token: &str,
    product: &str,
    append: bool,
    file: &[u8],
) -> Result<proto::CommitUploadResponse, tonic::Status> {
    upload_as(market, token, begin(product, append, file), file).await
}

/// Uploads `file` to the sample product for its revision waiting for
/// review, replacing the table's rows, and commits it.
async fn upload_for_revision(
    market: &TestMarket,
    token: &str,
    file: &[u8],
) -> Result<proto::CommitUploadResponse, tonic::Status> {
    let request = proto::BeginUploadRequest {
        for_revision: true,
        ..begin("population", false, file)
    };
    upload_as(market, token, request, file).await
}

/// Begins `request`, sends `file` whole in one chunk, and commits it.
async fn upload_as(
    market: &TestMarket,
    token: &str,
    request: proto::BeginUploadRequest,
    file: &[u8],
) -> Result<proto::CommitUploadResponse, tonic::Status> {
    let mut registry = RegistryClient::new(market.channel.clone());
    let started = registry
        .begin_upload(authed(token, request))
        .await?
        .into_inner();
    registry
        .put_upload_chunk(authed(token, chunk(&started.id, 0, file)))
        .await?;
    Ok(registry
        .commit_upload(authed(
            token,
            proto::GetUploadRequest {
                upload_id: started.id,
            },
        ))
        .await?
        .into_inner())
}

pub(crate) fn entry_details(summary: &proto::QuerySummary) -> serde_json::Value {
    let receipt = summary.receipt.as_ref().expect("a receipt");
    let entry: serde_json::Value = serde_json::from_slice(&receipt.entry).expect("JSON entry");
    entry["details"].clone()
}

async fn uploads_make_versions_that_queries_read_and_pin(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start_with(db, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 100_000).await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    let before = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-0")).await?;
    let people_before = total_people(&before.batches)?;
    assert_eq!(entry_details(&before.summary)["data_version"], 0);

    // An append, cut off after its first chunk and resumed.
    let day = residents_csv("new-town", 100_000, 40);
    let started = registry
        .begin_upload(authed(
            &cast.provider_admin,
            begin("population", true, &day),
        ))
        .await?
        .into_inner();
    assert_eq!(started.state, "receiving");
    let half = day.len() / 2;
    registry
        .put_upload_chunk(authed(
            &cast.provider_admin,
            chunk(&started.id, 0, &day[..half]),
        ))
        .await?;
    // Nothing of it is visible while it is incomplete.
    let product = registry
        .get_product(authed(
            &cast.consumer_analyst,
            proto::GetProductRequest {
                product_id: "population".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(product.data_version, 0);
    let early = registry
        .commit_upload(authed(
            &cast.provider_admin,
            proto::GetUploadRequest {
                upload_id: started.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition);
    assert!(
        early
            .message()
            .contains(&format!("resume from offset {half}")),
        "{early:?}"
    );
    // The client lost track: it asks where the upload stands, and a chunk
    // sent from elsewhere is refused naming the offset to resume from.
    let stands = registry
        .get_upload(authed(
            &cast.provider_admin,
            proto::GetUploadRequest {
                upload_id: started.id.clone(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(stands.received_bytes, i64::try_from(half)?);
    let wrong = registry
        .put_upload_chunk(authed(
            &cast.provider_admin,
            chunk(&started.id, 0, &day[..half]),
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition);
    assert!(
        wrong
            .message()
            .contains(&format!("resume from offset {half}")),
        "{wrong:?}"
    );
    // A chunk damaged on the way is refused by its hash.
    let mut damaged = chunk(&started.id, half, &day[half..]);
    damaged.data[0] ^= 1;
    let refused = registry
        .put_upload_chunk(authed(&cast.provider_admin, damaged))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("sha256"), "{refused:?}");
    registry
        .put_upload_chunk(authed(
            &cast.provider_admin,
            chunk(&started.id, half, &day[half..]),
        ))
        .await?;
    let committed = registry
        .commit_upload(authed(
            &cast.provider_admin,
            proto::GetUploadRequest {
                upload_id: started.id.clone(),
            },
        ))
        .await?
        .into_inner();
    let first = committed.version.clone().expect("a version");
    assert_eq!(first.version, 1);
    assert_eq!(committed.upload.as_ref().unwrap().state, "ingested");
    // The folder's table was carried into the first version, then the
    // day's rows appended in a file of their own.
    let files: Vec<_> = first.tables.iter().flat_map(|t| t.files.clone()).collect();
    assert_eq!(files.len(), 2, "{first:?}");
    assert_eq!(
        first.rows,
        i64::try_from(civicgrid_tests::market::SAMPLE_ROWS)? + 40
    );
    // Committing again answers with the same version.
    let again = registry
        .commit_upload(authed(
            &cast.provider_admin,
            proto::GetUploadRequest {
                upload_id: started.id.clone(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(again.version.unwrap().fingerprint, first.fingerprint);

    let after = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-1")).await?;
    assert_eq!(total_people(&after.batches)?, people_before + 40);
    let details = entry_details(&after.summary);
    assert_eq!(details["data_version"], 1);
    assert_eq!(details["data_fingerprint"], first.fingerprint.as_str());

    // A replacement makes version 2; version 1 stays readable, pinned.
    let replaced = upload(
        &market,
        &cast.provider_admin,
        false,
        &residents_csv("old-town", 1, 25),
    )
    .await?;
    let second = replaced.version.expect("a version");
    assert_eq!((second.version, second.rows), (2, 25));
    let newest = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-2")).await?;
    assert_eq!(total_people(&newest.batches)?, 25);
    let mut pinned = query(BY_DISTRICT, "k-3");
    pinned.data_version = 1;
    let pinned = run(&market, &cast.consumer_analyst, pinned).await?;
    assert_eq!(total_people(&pinned.batches)?, people_before + 40);
    assert_eq!(
        entry_details(&pinned.summary)["data_fingerprint"],
        first.fingerprint.as_str()
    );
    let mut missing = query(BY_DISTRICT, "k-4");
    missing.data_version = 3;
    let missing = run(&market, &cast.consumer_analyst, missing)
        .await
        .err()
        .expect("refused");
    assert_eq!(missing.code(), Code::NotFound);

    // The consumer sees the versions, not their files; the provider both.
    let listed = registry
        .list_data_versions(authed(
            &cast.consumer_analyst,
            proto::ListDataVersionsRequest {
                product_id: "population".into(),
            },
        ))
        .await?
        .into_inner()
        .versions;
    assert_eq!(
        listed.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert!(listed.iter().all(|v| v.tables.is_empty()));
    let listed = registry
        .list_data_versions(authed(
            &cast.provider_admin,
            proto::ListDataVersionsRequest {
                product_id: "population".into(),
            },
        ))
        .await?
        .into_inner()
        .versions;
    assert!(listed.iter().all(|v| !v.tables.is_empty()));

    // A value of the wrong type: refused naming row and column, nothing
    // published.
    let bad = b"person_id,district,age_band\n7,harbour,20-29\nseven,harbour,20-29\n".to_vec();
    let refused = upload(&market, &cast.provider_admin, true, &bad)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("row 2 (line 3), column person_id: \"seven\" is not an int64"),
        "{refused:?}"
    );
    let product = registry
        .get_product(authed(
            &cast.provider_admin,
            proto::GetProductRequest {
                product_id: "population".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(product.data_version, 2);

    // One endless line would take its length in a runner's memory.
    let mut endless = b"person_id,district,age_band\n7,".to_vec();
    endless.extend(std::iter::repeat_n(b'x', (1 << 20) + 10));
    endless.extend_from_slice(b",20-29\n");
    let refused = upload(&market, &cast.provider_admin, true, &endless)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("a line of the CSV is 1048595 bytes long"),
        "{refused:?}"
    );

    // Strangers: another provider and a consumer cannot write into the
    // product, nor see the provider's upload.
    for token in [&cast.rival_provider_admin, &cast.consumer_admin] {
        let status = registry
            .begin_upload(authed(token, begin("population", true, &day)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = registry
            .get_upload(authed(
                token,
                proto::GetUploadRequest {
                    upload_id: started.id.clone(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    // Only a declared table, and a well-formed hash.
    let mut undeclared = begin("population", true, &day);
    undeclared.table = "salaries".into();
    let status = registry
        .begin_upload(authed(&cast.provider_admin, undeclared))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("table"), "{status:?}");

    // A version's file swapped behind the marketplace's back is never read:
    // a valid file of the same length, with every resident moved to another
    // age band, would otherwise answer under the version's fingerprint.
    let file = &second.tables[0].files[0];
    let path = market.data_dir.join("products/population").join(&file.path);
    let scratch = tempfile::tempdir()?;
    let forged_csv = scratch.path().join("forged.csv");
    std::fs::write(
        &forged_csv,
        String::from_utf8(residents_csv("old-town", 1, 25))?.replace("30-39", "40-49"),
    )?;
    let forged = scratch.path().join("forged.parquet");
    let table = civicgrid_sandbox::quality::DeclaredTable {
        name: "residents".into(),
        columns: vec![
            ("district".into(), "utf8".into()),
            ("age_band".into(), "utf8".into()),
            ("person_id".into(), "int64".into()),
        ],
    };
    let made = civicgrid_sandbox::ingest::canonical_parquet(
        &forged_csv,
        civicgrid_sandbox::ingest::Format::Csv,
        &table,
        &forged,
    )?;
    assert_eq!(
        made.bytes,
        u64::try_from(file.bytes)?,
        "a forgery of the same length"
    );
    assert_ne!(made.sha256, file.sha256);
    // Read once, so that a hash the runner remembered would be the one to
    // fool.
    run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-warm"),
    )
    .await?;
    let original = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;
    std::fs::copy(&forged, &path)?;
    let by_band = "SELECT age_band, COUNT(*) AS people FROM residents GROUP BY age_band";
    match run(&market, &cast.consumer_analyst, query(by_band, "k-5")).await {
        Ok(answer) => {
            assert!(
                answer.batches.iter().all(|b| b.num_rows() == 0),
                "rows from a swapped file"
            );
            assert_eq!(answer.summary.state, "failed", "{:?}", answer.summary);
        }
        Err(status) => assert_ne!(status.code(), Code::Ok),
    }
    // The version's own file back, the version answers again.
    std::fs::remove_file(&path)?;
    std::fs::write(&path, &original)?;
    let restored = run(&market, &cast.consumer_analyst, query(by_band, "k-6")).await?;
    assert_eq!(total_people(&restored.batches)?, 25);

    // Two versions that differ in the rows of fewer people than the policy's
    // minimum (10) would single those people out: a consumer queries both
    // and subtracts. Appending 3 people, or dropping 1, is refused; a change
    // of none, or of at least 10, is not.
    let few = upload(
        &market,
        &cast.provider_admin,
        true,
        &residents_csv("old-town", 900, 3),
    )
    .await
    .unwrap_err();
    assert_eq!(few.code(), Code::FailedPrecondition);
    assert!(
        few.message()
            .contains("changes the rows of 3 of the table's person_id values")
            && few.message().contains("at least 10"),
        "{few:?}"
    );
    let mut nine_and_nobody = residents_csv("old-town", 950, 9);
    nine_and_nobody.extend_from_slice(b",old-town,30-39\n");
    let nobody = upload(&market, &cast.provider_admin, true, &nine_and_nobody)
        .await
        .unwrap_err();
    assert!(
        nobody
            .message()
            .contains("changes the rows of 9 of the table's person_id values and rows with none"),
        "a row with no unit is no one in a distinct count: {nobody:?}"
    );
    let one_less = upload(
        &market,
        &cast.provider_admin,
        false,
        &residents_csv("old-town", 1, 24),
    )
    .await
    .unwrap_err();
    assert!(
        one_less.message().contains("changes the rows of 1 of"),
        "{one_less:?}"
    );
    let mut moved = String::from_utf8(residents_csv("old-town", 1, 25))?;
    moved = moved.replacen("1,old-town,30-39", "1,harbour,30-39", 1);
    let one_moved = upload(&market, &cast.provider_admin, false, moved.as_bytes())
        .await
        .unwrap_err();
    assert!(
        one_moved.message().contains("changes the rows of 1 of"),
        "{one_moved:?}"
    );
    let same = upload(
        &market,
        &cast.provider_admin,
        false,
        &residents_csv("old-town", 1, 25),
    )
    .await?;
    let third = same.version.expect("an unchanged version is allowed");
    assert_eq!(third.version, 3);
    assert_eq!(
        third.tables, second.tables,
        "the same content, the same file"
    );

    // An operator who edits a version's row in the database (its files and
    // fingerprint made another version's) is caught against the audit log:
    // the version is never read.
    let pool = market.raw_pool().await?;
    let (manifest, fingerprint): (String, String) = {
        use sqlx::Row as _;
        let row = sqlx::query(
            "SELECT manifest, fingerprint FROM product_data_versions \
             WHERE product_id = 'population' AND version = 1",
        )
        .fetch_one(&pool)
        .await?;
        (row.try_get("manifest")?, row.try_get("fingerprint")?)
    };
    let fourth = upload(
        &market,
        &cast.provider_admin,
        true,
        &residents_csv("riverside", 800, 12),
    )
    .await?;
    let fourth = fourth.version.expect("a version");
    sqlx::query(
        "UPDATE product_data_versions SET manifest = $1, fingerprint = $2 \
         WHERE product_id = 'population' AND version = $3",
    )
    .bind(&manifest)
    .bind(&fingerprint)
    .bind(fourth.version)
    .execute(&pool)
    .await?;
    let tampered = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-7"))
        .await
        .err()
        .expect("a tampered version is not read");
    assert_eq!(tampered.code(), Code::Internal, "{tampered:?}");
    assert!(!tampered.message().contains(&fingerprint), "{tampered:?}");
    let blocked = upload(
        &market,
        &cast.provider_admin,
        true,
        &residents_csv("riverside", 850, 12),
    )
    .await
    .unwrap_err();
    assert_eq!(blocked.code(), Code::Internal, "{blocked:?}");
    pool.close().await;
    market.stop().await;
    Ok(())
}

/// Two providers' engineers commit appends at once on a product with no
/// version yet: both land, one after the other, and neither undoes the
/// other (the second does not lay the folder's rows over the first's
/// version again).
async fn concurrent_first_appends_both_land(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start_with(db, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    let mut started = Vec::new();
    for (district, first) in [("north-gate", 200_000), ("south-gate", 300_000)] {
        let file = residents_csv(district, first, 15);
        let upload = registry
            .begin_upload(authed(
                &cast.provider_admin,
                begin("population", true, &file),
            ))
            .await?
            .into_inner();
        registry
            .put_upload_chunk(authed(&cast.provider_admin, chunk(&upload.id, 0, &file)))
            .await?;
        started.push(upload.id);
    }
    let commits = started.iter().map(|id| {
        let mut registry = registry.clone();
        let request = authed(
            &cast.provider_admin,
            proto::GetUploadRequest {
                upload_id: id.clone(),
            },
        );
        async move { registry.commit_upload(request).await }
    });
    let outcomes = futures::future::join_all(commits).await;
    let mut versions: Vec<i64> = outcomes
        .into_iter()
        .map(|outcome| Ok(outcome?.into_inner().version.expect("a version").version))
        .collect::<Result<_, tonic::Status>>()?;
    versions.sort_unstable();
    assert_eq!(versions, vec![1, 2]);
    let newest = registry
        .list_data_versions(authed(
            &cast.provider_admin,
            proto::ListDataVersionsRequest {
                product_id: "population".into(),
            },
        ))
        .await?
        .into_inner()
        .versions
        .remove(0);
    assert_eq!(
        newest.rows,
        i64::try_from(civicgrid_tests::market::SAMPLE_ROWS)? + 30,
        "the folder's rows once, and both appends: {newest:?}"
    );
    market.stop().await;
    Ok(())
}

/// The provider revises the sample product to `spec` (a change that takes
/// effect at once: no review).
async fn revise(
    registry: &mut RegistryClient<tonic::transport::Channel>,
    token: &str,
    spec: proto::ProductSpec,
    reason: &str,
) -> anyhow::Result<()> {
    registry
        .revise_product(authed(
            token,
            proto::ReviseProductRequest {
                product_id: "population".into(),
                spec: Some(spec),
                reason: reason.into(),
            },
        ))
        .await?;
    Ok(())
}

/// The audit log's entries of `kind`, as a platform admin reads them.
async fn audit_entries(market: &TestMarket, kind: &str) -> anyhow::Result<Vec<proto::AuditEntry>> {
    Ok(
        civicgrid_marketplace::proto::audit_client::AuditClient::new(market.channel.clone())
            .get_entries(authed(
                &market.admin_token,
                proto::GetEntriesRequest {
                    start: 0,
                    end: 1_000_000,
                    kind_prefix: kind.into(),
                    tenant: String::new(),
                },
            ))
            .await?
            .into_inner()
            .entries,
    )
}

fn withdraw(product: &str, version: i64, reason: &str) -> proto::WithdrawDataVersionRequest {
    proto::WithdrawDataVersionRequest {
        product_id: product.into(),
        version,
        reason: reason.into(),
    }
}

async fn versions_of(market: &TestMarket, token: &str) -> anyhow::Result<Vec<proto::DataVersion>> {
    Ok(RegistryClient::new(market.channel.clone())
        .list_data_versions(authed(
            token,
            proto::ListDataVersionsRequest {
                product_id: "population".into(),
            },
        ))
        .await?
        .into_inner()
        .versions)
}

/// A provider withdraws an older version (rows published by mistake, or
/// that must be erased): it can no longer be pinned, and its files that no
/// readable version lists are deleted, with an audit entry saying who and
/// why. Versions superseded longer ago than the product's retention are
/// withdrawn by the sweep the same way.
async fn withdrawn_and_expired_versions_are_gone(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start_with(db, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 100_000).await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    let first = upload(
        &market,
        &cast.provider_admin,
        true,
        &residents_csv("north-gate", 200_000, 15),
    )
    .await?
    .version
    .expect("v1");
    let second = upload(
        &market,
        &cast.provider_admin,
        false,
        &residents_csv("old-town", 1, 25),
    )
    .await?
    .version
    .expect("v2");
    let mut pinned = query(BY_DISTRICT, "k-pin-1");
    pinned.data_version = 1;
    run(&market, &cast.consumer_analyst, pinned).await?;

    // Only the provider, only an older version, only with a reason.
    for token in [&cast.rival_provider_admin, &cast.consumer_admin] {
        let status = registry
            .withdraw_data_version(authed(token, withdraw("population", 1, "mine now")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let newest = registry
        .withdraw_data_version(authed(
            &cast.provider_admin,
            withdraw("population", 2, "oops"),
        ))
        .await
        .unwrap_err();
    assert_eq!(newest.code(), Code::FailedPrecondition, "{newest:?}");
    let unexplained = registry
        .withdraw_data_version(authed(&cast.provider_admin, withdraw("population", 1, "")))
        .await
        .unwrap_err();
    assert_eq!(unexplained.code(), Code::InvalidArgument, "{unexplained:?}");

    // Another of the provider's products reads the same folder, and its
    // first version shares the folder's carried-over file with v1.
    registry
        .create_product(authed(
            &cast.provider_admin,
            proto::CreateProductRequest {
                id: "population-copy".into(),
                spec: Some(civicgrid_tests::market::sample_spec()),
            },
        ))
        .await?;
    let copy = upload_to(
        &market,
        &cast.provider_admin,
        "population-copy",
        true,
        &residents_csv("south-gate", 300_000, 15),
    )
    .await?
    .version
    .expect("the copy's v1");
    let shared: Vec<&str> = first
        .tables
        .iter()
        .flat_map(|t| &t.files)
        .filter(|f| {
            copy.tables
                .iter()
                .flat_map(|t| &t.files)
                .any(|c| c.path == f.path)
        })
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(shared.len(), 1, "the folder's carried-over file");

    let withdrawn = registry
        .withdraw_data_version(authed(
            &cast.provider_admin,
            withdraw("population", 1, "north-gate rows published before consent"),
        ))
        .await?
        .into_inner();
    assert!(withdrawn.withdrawn_at_unix_ms > 0);
    let mut pinned = query(BY_DISTRICT, "k-pin-2");
    pinned.data_version = 1;
    let gone = run(&market, &cast.consumer_analyst, pinned)
        .await
        .err()
        .expect("withdrawn");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    // Its files go after the grace an upload of the same content may need,
    // except those another readable version lists.
    let folder = market.data_dir.join("products/population");
    let now = civicgrid_marketplace::store::now_ms();
    assert_eq!(market.market.sweep_data_retention(now).await?, 0);
    for file in first.tables.iter().flat_map(|t| &t.files) {
        assert!(
            folder.join(&file.path).exists(),
            "{} waits for the grace",
            file.path
        );
    }
    market
        .market
        .sweep_data_retention(now + 2 * 3_600_000)
        .await?;
    for file in first.tables.iter().flat_map(|t| &t.files) {
        assert_eq!(
            folder.join(&file.path).exists(),
            shared.contains(&file.path.as_str()),
            "{}: deleted unless the copy reads it",
            file.path
        );
    }
    for file in second.tables.iter().flat_map(|t| &t.files) {
        assert!(
            folder.join(&file.path).exists(),
            "{} is still read",
            file.path
        );
    }
    let newest = run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-newest"),
    )
    .await?;
    assert_eq!(total_people(&newest.batches)?, 25);
    let entries = audit_entries(&market, "product.data_version_withdrawn").await?;
    assert_eq!(entries.len(), 1);
    assert!(
        String::from_utf8_lossy(&entries[0].body).contains("before consent"),
        "{entries:?}"
    );
    let deletions = audit_entries(&market, "product.data_files_deleted").await?;
    assert_eq!(deletions.len(), 1, "the deletion is audited");

    // Retention: a version superseded more than 30 days ago goes in the
    // sweep; the newest stays whatever its age.
    let mut spec = civicgrid_tests::market::sample_spec();
    spec.version_retention_days = 30;
    revise(
        &mut registry,
        &cast.provider_admin,
        spec,
        "keep versions 30 days",
    )
    .await?;
    let third = upload(
        &market,
        &cast.provider_admin,
        true,
        &residents_csv("riverside", 400_000, 12),
    )
    .await?
    .version
    .expect("v3");
    let now = civicgrid_marketplace::store::now_ms();
    assert_eq!(
        market
            .market
            .sweep_data_retention(now + 29 * 86_400_000)
            .await?,
        0
    );
    assert_eq!(
        market
            .market
            .sweep_data_retention(now + 31 * 86_400_000)
            .await?,
        1
    );
    let listed = versions_of(&market, &cast.provider_admin).await?;
    let state: Vec<(i64, bool)> = listed
        .iter()
        .map(|v| (v.version, v.withdrawn_at_unix_ms > 0))
        .collect();
    assert_eq!(state, vec![(3, false), (2, true), (1, true)]);
    assert!(
        listed[1].withdrawn_reason.starts_with("retention"),
        "{listed:?}"
    );
    // v2's file is v3's too (an append keeps it): still there.
    for file in third.tables.iter().flat_map(|t| &t.files) {
        assert!(
            folder.join(&file.path).exists(),
            "{} is still read",
            file.path
        );
    }
    let newest = run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-after-sweep"),
    )
    .await?;
    assert_eq!(total_people(&newest.batches)?, 37);

    // The provider's bar: a version whose measured completeness falls below
    // it is not published, and the upload says which figure fell short.
    let mut spec = civicgrid_tests::market::sample_spec();
    spec.version_retention_days = 30;
    spec.quality_minimums = Some(proto::QualityMetrics {
        completeness: 0.95,
        validity: 0.0,
        freshness_seconds: 0,
    });
    revise(&mut registry, &cast.provider_admin, spec, "no more gaps").await?;
    let gappy = String::from_utf8(residents_csv("west-end", 600_000, 40))?.replace(",30-39", ",");
    let refused = upload(&market, &cast.provider_admin, true, gappy.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("quality is below the product's minimums: completeness"),
        "{refused:?}"
    );
    assert_eq!(
        versions_of(&market, &cast.provider_admin).await?[0].version,
        3
    );
    // Nothing of the refused upload stays in the store.
    let listed: std::collections::HashSet<String> = versions_of(&market, &cast.provider_admin)
        .await?
        .iter()
        .chain(std::iter::once(&copy))
        .flat_map(|v| {
            v.tables
                .iter()
                .flat_map(|t| t.files.iter().map(|f| f.path.clone()))
        })
        .collect();
    for entry in std::fs::read_dir(folder.join("data/residents"))? {
        let path = format!("data/residents/{}", entry?.file_name().to_string_lossy());
        assert!(listed.contains(&path), "{path} is no version's file");
    }
    upload(
        &market,
        &cast.provider_admin,
        true,
        &residents_csv("west-end", 600_000, 40),
    )
    .await?;
    market.stop().await;
    Ok(())
}

/// A revision that changes a table's columns, on a product that has data
/// versions: the provider uploads data typed by the revision, which no
/// query reads while the revision waits; approved, that data is published
/// with it; rejected, it is dropped. Without it, the revision cannot be
/// approved (the data lacks the new column).
async fn revisions_carry_their_own_data(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start_with(db, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 100_000).await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    upload(
        &market,
        &cast.provider_admin,
        true,
        &residents_csv("north-gate", 200_000, 15),
    )
    .await?;
    let mut spec = civicgrid_tests::market::sample_spec();
    spec.tables[0].columns.push(proto::Column {
        name: "household_size".into(),
        r#type: "int32".into(),
        sensitivity: proto::Sensitivity::Public as i32,
        description: String::new(),
    });
    revise(
        &mut registry,
        &cast.provider_admin,
        spec.clone(),
        "household sizes",
    )
    .await?;
    let approve = |registry: &mut RegistryClient<tonic::transport::Channel>| {
        let mut registry = registry.clone();
        let token = market.admin_token.clone();
        async move {
            registry
                .approve_revision(authed(
                    &token,
                    civicgrid_tests::market::action("population", ""),
                ))
                .await
        }
    };
    let lacking = approve(&mut registry).await.unwrap_err();
    assert_eq!(lacking.code(), Code::InvalidArgument, "{lacking:?}");

    // Data typed by the revision: a candidate, read by nobody yet.
    let mut csv = String::from("person_id,district,age_band,household_size\n");
    for id in 0..30 {
        csv.push_str(&format!("{},harbour,30-39,{}\n", 5_000 + id, 1 + id % 2));
    }
    let candidate = upload_for_revision(&market, &cast.provider_admin, csv.as_bytes())
        .await?
        .version
        .expect("a candidate");
    assert!(candidate.candidate);
    assert_eq!((candidate.version, candidate.rows), (2, 30));
    assert!(
        versions_of(&market, &cast.consumer_analyst)
            .await?
            .iter()
            .all(|v| !v.candidate),
        "consumers do not see a candidate"
    );
    let newest = run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-before"),
    )
    .await?;
    assert_eq!(
        total_people(&newest.batches)?,
        i64::try_from(civicgrid_tests::market::SAMPLE_ROWS)? + 15
    );
    let mut pinned = query(BY_DISTRICT, "k-candidate");
    pinned.data_version = 2;
    let hidden = run(&market, &cast.consumer_analyst, pinned)
        .await
        .err()
        .expect("unread");
    assert_eq!(hidden.code(), Code::NotFound);
    let blocked = upload(
        &market,
        &cast.provider_admin,
        true,
        &residents_csv("harbour", 9_000, 12),
    )
    .await
    .unwrap_err();
    assert!(
        blocked.message().contains("waits for its review"),
        "{blocked:?}"
    );

    // Approved, the revision serves the data uploaded for it.
    let approved = approve(&mut registry).await?.into_inner();
    assert_eq!(approved.data_version, 2);
    let by_size =
        "SELECT household_size, COUNT(*) AS people FROM residents GROUP BY household_size";
    let after = run(&market, &cast.consumer_analyst, query(by_size, "k-after")).await?;
    assert_eq!(total_people(&after.batches)?, 30);

    // Rejected, a revision's data goes with it.
    spec.tables[0].columns.pop();
    revise(
        &mut registry,
        &cast.provider_admin,
        spec.clone(),
        "sizes were a mistake",
    )
    .await?;
    let dropped = upload_for_revision(
        &market,
        &cast.provider_admin,
        &residents_csv("harbour", 7_000, 20),
    )
    .await?
    .version
    .expect("a candidate");
    registry
        .reject_revision(authed(
            &market.admin_token,
            civicgrid_tests::market::action("population", "keep the sizes"),
        ))
        .await?;
    let listed = versions_of(&market, &cast.provider_admin).await?;
    assert_eq!(listed[0].version, 2, "the candidate is gone: {listed:?}");
    let folder = market.data_dir.join("products/population");
    for file in dropped.tables.iter().flat_map(|t| &t.files) {
        assert!(
            !folder.join(&file.path).exists(),
            "{} was deleted",
            file.path
        );
    }

    // A revision that leaves the table's columns as they are is no way
    // around the change rule: its data is compared with what consumers
    // read now, and one person dropped is refused.
    let mut policy_only = spec.clone();
    policy_only.tables[0].columns.push(proto::Column {
        name: "household_size".into(),
        r#type: "int32".into(),
        sensitivity: proto::Sensitivity::Public as i32,
        description: String::new(),
    });
    if let Some(policy) = policy_only.output_policy.as_mut() {
        policy.max_list_rows = 500;
    }
    revise(
        &mut registry,
        &cast.provider_admin,
        policy_only,
        "fewer list rows",
    )
    .await?;
    let mut one_less = String::from("person_id,district,age_band,household_size\n");
    for id in 1..30 {
        one_less.push_str(&format!("{},harbour,30-39,{}\n", 5_000 + id, 1 + id % 2));
    }
    let refused = upload_for_revision(&market, &cast.provider_admin, one_less.as_bytes())
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("changes the rows of 1 of"),
        "{refused:?}"
    );
    market.stop().await;
    Ok(())
}

/// Refresh on a schedule: files dropped in the product's refresh folder
/// become versions at its cadence, with every check an upload gets; a
/// refused file goes, and its upload says why.
async fn refresh_folders_become_versions(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start_with(db, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 100_000).await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    let mut spec = civicgrid_tests::market::sample_spec();
    spec.refresh_minutes = 15;
    revise(&mut registry, &cast.provider_admin, spec, "daily files").await?;
    let incoming = market
        .data_dir
        .join("products/population/incoming/population/residents");
    // A provider who can write its folder links the refresh folder to files
    // that are not its own: nothing there is taken.
    let elsewhere = market
        .data_dir
        .join("products/another-providers/data/residents");
    std::fs::create_dir_all(&elsewhere)?;
    std::fs::write(
        elsewhere.join("theirs.csv"),
        residents_csv("docklands", 900_000, 12),
    )?;
    std::fs::create_dir_all(incoming.parent().expect("a parent"))?;
    std::os::unix::fs::symlink(&elsewhere, &incoming)?;
    let now = civicgrid_marketplace::store::now_ms();
    assert_eq!(market.market.sweep_refresh(now - 3_600_000).await?, 0);
    assert!(
        elsewhere.join("theirs.csv").exists(),
        "not taken through the link"
    );
    std::fs::remove_file(&incoming)?;
    std::fs::create_dir_all(&incoming)?;
    std::fs::write(
        incoming.join("2026-12-07.csv"),
        residents_csv("docklands", 800_000, 12),
    )?;
    std::fs::write(
        incoming.join("2026-12-08.csv"),
        b"person_id,district,age_band\n1,x,seven,extra\n",
    )?;
    std::fs::write(incoming.join("notes.txt"), b"not data")?;
    assert_eq!(market.market.sweep_refresh(now).await?, 1);
    // Taken, both; the note is not a refresh file.
    assert!(!incoming.join("2026-12-07.csv").exists());
    assert!(!incoming.join("2026-12-08.csv").exists());
    assert!(incoming.join("notes.txt").exists());
    let listed = versions_of(&market, &cast.provider_admin).await?;
    assert_eq!(
        (listed[0].version, listed[0].rows),
        (1, i64::try_from(civicgrid_tests::market::SAMPLE_ROWS)? + 12)
    );
    let answer = run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-refreshed"),
    )
    .await?;
    assert_eq!(entry_details(&answer.summary)["data_version"], 1);
    let uploads = registry
        .list_uploads(authed(
            &cast.provider_admin,
            proto::ListUploadsRequest {
                product_id: "population".into(),
            },
        ))
        .await?
        .into_inner()
        .uploads;
    let refused = uploads
        .iter()
        .find(|u| u.state == "refused")
        .expect("the bad file's upload");
    assert!(refused.message.contains("line 2"), "{refused:?}");
    // Not due again until its cadence has passed; then the next file.
    std::fs::write(
        incoming.join("2026-12-09.csv"),
        residents_csv("docklands", 810_000, 12),
    )?;
    assert_eq!(market.market.sweep_refresh(now + 60_000).await?, 0);
    assert_eq!(market.market.sweep_refresh(now + 15 * 60_000).await?, 1);
    // Strangers see no uploads.
    let status = registry
        .list_uploads(authed(
            &cast.rival_provider_admin,
            proto::ListUploadsRequest {
                product_id: "population".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    market.stop().await;
    Ok(())
}

#[tokio::test]
async fn refresh_folders_become_versions_on_sqlite() -> anyhow::Result<()> {
    refresh_folders_become_versions(Db::Sqlite).await
}

#[tokio::test]
async fn refresh_folders_become_versions_on_postgres() -> anyhow::Result<()> {
    refresh_folders_become_versions(Db::Postgres).await
}

#[tokio::test]
async fn revisions_carry_their_own_data_on_sqlite() -> anyhow::Result<()> {
    revisions_carry_their_own_data(Db::Sqlite).await
}

#[tokio::test]
async fn revisions_carry_their_own_data_on_postgres() -> anyhow::Result<()> {
    revisions_carry_their_own_data(Db::Postgres).await
}

#[tokio::test]
async fn withdrawn_and_expired_versions_are_gone_on_sqlite() -> anyhow::Result<()> {
    withdrawn_and_expired_versions_are_gone(Db::Sqlite).await
}

#[tokio::test]
async fn withdrawn_and_expired_versions_are_gone_on_postgres() -> anyhow::Result<()> {
    withdrawn_and_expired_versions_are_gone(Db::Postgres).await
}

#[tokio::test]
async fn concurrent_first_appends_both_land_on_sqlite() -> anyhow::Result<()> {
    concurrent_first_appends_both_land(Db::Sqlite).await
}

#[tokio::test]
async fn concurrent_first_appends_both_land_on_postgres() -> anyhow::Result<()> {
    concurrent_first_appends_both_land(Db::Postgres).await
}

#[tokio::test]
async fn uploads_make_versions_that_queries_read_and_pin_on_sqlite() -> anyhow::Result<()> {
    uploads_make_versions_that_queries_read_and_pin(Db::Sqlite).await
}

#[tokio::test]
async fn uploads_make_versions_that_queries_read_and_pin_on_postgres() -> anyhow::Result<()> {
    uploads_make_versions_that_queries_read_and_pin(Db::Postgres).await
}
