//! Product data in a data center's own object store: a real S3-compatible
//! server (versitygw) per test, read by the sandbox through `object_store`.
//! What must hold, and who would break it:
//!
//! - a query reads the same rows, and burns the same fuel, from the store
//!   as from a disk: a runner's bill must not depend on where its data
//!   center keeps files;
//! - a provider names a folder, never a string prefix: `products/pop`
//!   does not reach `products/population`, and no location climbs above
//!   the runner's root;
//! - a run reads the objects it listed: an object replaced mid-run fails
//!   the read instead of mixing two versions of a table;
//! - the marketplace never reads product data: with its own copy gone, a
//!   product is measured at submission and queried by the runner alone,
//!   and the store's access log shows every read came in for that product;
//! - a schema that does not match the files is refused at submission by
//!   field, as it would be on a disk;
//! - a data center whose store is down answers UNAVAILABLE, and nothing is
//!   held or charged.

use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use civicgrid_runner::ProductStore;
use civicgrid_sandbox::object_store::path::Path as ObjectPath;
use civicgrid_sandbox::{
    DeclaredColumns, FUEL_PER_COMPUTE_UNIT, GuestRole, Job, Limits, ListError, LocalDirectory,
    ObjectTables, Outcome, TableStore, object_folder,
};
use civicgrid_tests::objectstore::ObjectStoreServer;
use civicgrid_tests::sandbox::{
    residents_aggregate_policy, sandbox_with, sql_guest, write_residents_in_groups,
};
use tokio::runtime::Handle;

const BUCKET: &str = "edge-1";

fn declared() -> std::collections::HashMap<String, Vec<String>> {
    [
        (
            "residents".to_owned(),
            [
                "district",
                "age_band",
                "household_size",
                "income",
                "person_id",
            ]
            .map(String::from)
            .to_vec(),
        ),
        (
            "districts".to_owned(),
            vec!["name".to_owned(), "area_km2".to_owned()],
        ),
    ]
    .into_iter()
    .collect()
}

/// Runs `sql` over `tables` in the sandbox, off the runtime's workers.
async fn run(tables: Arc<dyn TableStore>, sql: &str) -> anyhow::Result<Outcome> {
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || {
        let sandbox = sandbox_with(|_| {});
        let guest = sandbox.load(&sql_guest(), GuestRole::Sql)?;
        let tables: Arc<dyn TableStore> = Arc::new(DeclaredColumns::new(tables, declared()));
        sandbox
            .run_metered(
                &guest,
                Job {
                    sql: &sql,
                    tables,
                    policy: &residents_aggregate_policy(),
                    privacy_budget: 0.0,
                    as_of_unix_seconds: 1_796_000_000,
                },
                &Limits {
                    fuel: 2_000 * FUEL_PER_COMPUTE_UNIT,
                    wall_time: Duration::from_secs(60),
                    memory_bytes: 512 << 20,
                    ..Limits::default()
                },
            )
            .map_err(|failure| anyhow::anyhow!("{}", failure.error))
    })
    .await?
}

/// The residents in row groups of 300 rows, on disk and in the store under
/// `city/products/population`; and another product's file, with other
/// rows, under `city/products/population-archive`.
async fn stored_product(
    server: &ObjectStoreServer,
) -> anyhow::Result<(tempfile::TempDir, ObjectTables)> {
    let disk = tempfile::tempdir()?;
    write_residents_in_groups(disk.path(), 300)?;
    server
        .upload_folder(BUCKET, "city/products/population", disk.path())
        .await?;
    let archive = tempfile::tempdir()?;
    write_residents_in_groups(archive.path(), 100)?;
    std::fs::remove_file(archive.path().join("districts.parquet")).ok();
    server
        .upload_folder(BUCKET, "city/products/population-archive", archive.path())
        .await?;
    let folder = object_folder(&ObjectPath::from("city"), "products/population")?;
    let objects = ObjectTables::list(server.client(BUCKET)?, Handle::current(), &folder).await?;
    Ok((disk, objects))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_reads_the_same_rows_and_burns_the_same_fuel_from_a_store_as_from_a_disk()
-> anyhow::Result<()> {
    let server = ObjectStoreServer::start(&[BUCKET]).await?;
    let (disk, objects) = stored_product(&server).await?;
    let local = LocalDirectory::discover(disk.path()).map_err(anyhow::Error::msg)?;
    assert_eq!(objects.tables(), local.tables());
    assert_eq!(objects.tables(), ["districts", "residents"]);
    let (objects, local): (Arc<dyn TableStore>, Arc<dyn TableStore>) =
        (Arc::new(objects), Arc::new(local));
    assert_eq!(
        objects.schema("residents").map_err(anyhow::Error::msg)?,
        local.schema("residents").map_err(anyhow::Error::msg)?
    );
    let sql = "SELECT district, COUNT(*) AS people, SUM(income) AS income \
               FROM residents GROUP BY district ORDER BY district";
    let from_store = run(Arc::clone(&objects), sql).await?;
    let from_disk = run(Arc::clone(&local), sql).await?;
    assert_eq!(from_store.batches, from_disk.batches);
    assert!(
        from_store
            .batches
            .iter()
            .map(RecordBatch::num_rows)
            .sum::<usize>()
            >= 5,
        "{:?}",
        from_store.batches
    );
    assert_eq!(from_store.metering.fuel, from_disk.metering.fuel);
    assert_eq!(from_store.metering.rows_read, from_disk.metering.rows_read);
    assert_eq!(
        from_store.metering.bytes_read,
        from_disk.metering.bytes_read
    );

    // Shares split on the same rows: a property of the data, not the store.
    let (objects_store, local_store) = (Arc::clone(&objects), Arc::clone(&local));
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let small =
            |tables: &Arc<dyn TableStore>, part, parts| -> anyhow::Result<Vec<RecordBatch>> {
                tables
                    .scan_part("residents", &[4, 0], part, parts)
                    .map_err(anyhow::Error::msg)?
                    .collect::<Result<_, _>>()
                    .map_err(anyhow::Error::msg)
            };
        for part in 0..3 {
            assert_eq!(
                small(&objects_store, part, 3)?,
                small(&local_store, part, 3)?,
                "share {part}"
            );
        }
        Ok(())
    })
    .await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_location_names_a_folder_under_the_root_never_a_string_prefix() -> anyhow::Result<()> {
    let server = ObjectStoreServer::start(&[BUCKET]).await?;
    let (_disk, _objects) = stored_product(&server).await?;
    let root = ObjectPath::from("city");
    let client = server.client(BUCKET)?;
    // `products/pop` is no folder, though `products/population` starts so.
    let pop = object_folder(&root, "products/pop")?;
    match ObjectTables::list(Arc::clone(&client), Handle::current(), &pop).await {
        Err(ListError::Missing(folder)) => assert_eq!(folder, "city/products/pop"),
        other => panic!("products/pop: {other:?}"),
    }
    // The archive holds its own residents and no districts: a listing of
    // one folder never includes its sibling's files.
    let archive = object_folder(&root, "products/population-archive")?;
    let listed = ObjectTables::list(Arc::clone(&client), Handle::current(), &archive).await?;
    assert_eq!(listed.tables(), ["residents"]);
    // No location reaches above the root.
    for climb in ["../city/products/population", "/city/products/population"] {
        assert!(object_folder(&root, climb).is_err(), "{climb}");
    }
    // Through a runner's storage too, by the same rules.
    let products = ProductStore::s3_with(server.builder(), "s3://edge-1/city", Handle::current())?;
    assert!(products.check("../edge-2/products/population").is_err());
    let footers = Arc::default();
    let opened = products.tables("products/population", &footers).await?;
    assert_eq!(opened.tables(), ["districts", "residents"]);
    assert!(matches!(
        products.tables("products/pop", &footers).await,
        Err(civicgrid_runner::storage::StorageError::Location(_))
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reads_the_objects_it_listed_or_fails() -> anyhow::Result<()> {
    let server = ObjectStoreServer::start(&[BUCKET]).await?;
    let (_disk, objects) = stored_product(&server).await?;
    let objects: Arc<dyn TableStore> = Arc::new(objects);
    // The provider replaces the residents after the run listed them.
    let replacement = tempfile::tempdir()?;
    write_residents_in_groups(replacement.path(), 50)?;
    server
        .upload_folder(BUCKET, "city/products/population", replacement.path())
        .await?;
    let sql = "SELECT district, COUNT(*) AS people FROM residents GROUP BY district";
    let error = run(objects, sql).await.expect_err("the object changed");
    assert!(error.to_string().contains("residents.parquet"), "{error}");
    // The store refused the read of the replaced object by its entity tag,
    // and served no read of it after the replacement.
    let reads: Vec<String> = server
        .access_log()?
        .into_iter()
        .filter(|line| line.contains("s3_GetObject city/products/population/residents.parquet"))
        .collect();
    assert!(!reads.is_empty());
    assert!(
        reads
            .iter()
            .all(|line| line.contains(" 412 PreconditionFailed ")),
        "{reads:#?}"
    );
    Ok(())
}

/// The whole path over a data center's object store: the marketplace has
/// no copy of the product, a runner measures it at submission and answers
/// its queries, every read the store served was for that product, and a
/// store that goes down costs the consumer nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_marketplace_measures_and_queries_through_the_runner_alone() -> anyhow::Result<()> {
    use civicgrid_marketplace::proto::{
        self as api, queries_client::QueriesClient, registry_client::RegistryClient,
    };
    use civicgrid_marketplace::queries::{EngineConfig, QueryEngine};
    use civicgrid_tests::market::{Cast, Db, TestMarket, action, authed, publish, sample_spec};

    const CORE: &str = "municipal-core";
    let server = ObjectStoreServer::start(&[CORE]).await?;
    let market = TestMarket::start(Db::Sqlite).await?;
    let guest = civicgrid_tests::sandbox::guest_dir().join("civicgrid_sandbox_guest.wasm");
    let cache = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
    let engine =
        tokio::task::spawn_blocking(move || QueryEngine::open(EngineConfig::new(guest, cache)))
            .await??;
    market.market.attach_engine(engine)?;

    // The product's files go to the data center's store, under its own
    // folder and under a second product's; the marketplace keeps no copy.
    let local = market.market.data_dir().join("products/population");
    let spec = sample_spec();
    let expected = civicgrid_marketplace::quality::measure(&local, &spec.tables, 0)?;
    for folder in ["products/population", "products/census"] {
        server.upload_folder(CORE, folder, &local).await?;
    }
    std::fs::remove_dir_all(&local)?;
    let products =
        ProductStore::s3_with(server.builder(), &format!("s3://{CORE}"), Handle::current())?;
    let _routed = civicgrid_tests::runners::route_to(&market, CORE, products, 1).await?;
    let cast = Cast::create(&market).await?;

    // A spec that does not match the files is refused at submission, by
    // the runner's reading of them, naming the column.
    let mut registry = RegistryClient::new(market.channel.clone());
    let mut census = spec.clone();
    census.storage_location = "products/census".into();
    census.tables[0].columns[0].r#type = "int64".into();
    registry
        .create_product(authed(
            &cast.provider_admin,
            api::CreateProductRequest {
                id: "census".into(),
                spec: Some(census),
            },
        ))
        .await?;
    let refused = registry
        .submit_product(authed(&cast.provider_admin, action("census", "")))
        .await
        .expect_err("district is text, not int64");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("spec.tables[0].columns[0].type"),
        "{}",
        refused.message()
    );

    // Files the runner cannot read are refused naming the table, and
    // nothing of the store (its address, bucket or keys); a folder with no
    // files, naming the provider's location.
    let broken = tempfile::tempdir()?;
    std::fs::write(
        broken.path().join("residents.parquet"),
        b"not parquet at all",
    )?;
    server
        .upload_folder(CORE, "products/broken", broken.path())
        .await?;
    for (id, location, expected) in [
        (
            "broken",
            "products/broken",
            "cannot read table residents of product broken; the runner in its data center logged why",
        ),
        (
            "ghost",
            "products/ghost",
            "storage_location of product ghost: products/ghost: no such folder in the data center's store",
        ),
    ] {
        let mut unreadable = spec.clone();
        unreadable.storage_location = location.into();
        registry
            .create_product(authed(
                &cast.provider_admin,
                api::CreateProductRequest {
                    id: id.into(),
                    spec: Some(unreadable),
                },
            ))
            .await?;
        let refused = registry
            .submit_product(authed(&cast.provider_admin, action(id, "")))
            .await
            .expect_err("unreadable");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert_eq!(refused.message(), expected);
    }

    // The real product is measured by the runner, from the store, exactly
    // as the marketplace would have measured its own copy.
    let published = publish(&market, &cast, "population").await?;
    let quality = published
        .spec
        .and_then(|spec| spec.quality)
        .expect("measured quality");
    assert_eq!(quality.completeness, expected.completeness);
    assert_eq!(quality.validity, expected.validity);

    civicgrid_tests::market::approved_contract(&market, &cast, "population").await?;
    civicgrid_tests::market::deposit(&market, 10_000).await?;

    let ask = |key: &str| api::RunQueryRequest {
        product_id: "population".into(),
        sql: "SELECT district, COUNT(*) AS people FROM residents GROUP BY district".into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    let mut queries = QueriesClient::new(market.channel.clone());
    let mut stream = queries
        .run_query(authed(&cast.consumer_analyst, ask("k-store")))
        .await?
        .into_inner();
    let mut summary = None;
    while let Some(message) = stream.message().await? {
        if let Some(api::run_query_response::Message::Summary(s)) = message.message {
            summary = Some(s);
        }
    }
    let summary = summary.expect("a summary");
    assert_eq!(summary.state, "completed", "{summary:?}");
    assert_eq!(summary.data_center, CORE);
    assert!(summary.charge_minor > 0, "{summary:?}");

    // Every object the store served was a registered product's file,
    // read by the runner (uploads aside, nothing else asked).
    let reads: Vec<String> = server
        .access_log()?
        .into_iter()
        .filter(|line| line.contains(" s3_GetObject ") || line.contains(" s3_ListObjectsV2 "))
        .collect();
    assert!(
        reads
            .iter()
            .any(|line| line.contains(" s3_GetObject products/population/residents.parquet ")),
        "{reads:#?}"
    );
    let registered = ["population", "census", "broken", "ghost"];
    assert!(
        reads.iter().all(|line| registered.iter().any(|product| {
            line.contains(&format!("products/{product}/"))
                || line.contains(&format!("products%2F{product}%2F"))
        })),
        "{reads:#?}"
    );

    // The data center's store goes down: the query is refused as
    // unavailable, and nothing is held or charged for it.
    let mut server = server;
    server.stop();
    let status = queries
        .run_query(authed(&cast.consumer_analyst, ask("k-store-down")))
        .await
        .expect_err("the store is down");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        !status.message().contains("127.0.0.1"),
        "{}",
        status.message()
    );
    assert_eq!(
        civicgrid_tests::market::acme_balance(&market, &cast).await?,
        (10_000 - summary.charge_minor, 0),
        "only the answered query was charged, and nothing is held"
    );
    Ok(())
}

/// An upload through a runner whose data center keeps products in an
/// object store: the file is stored with a multipart upload under the
/// product's folder, the first version carries the folder's table over
/// (undeclared columns left out), and queries read the version from the
/// store. A new product with no folder at all gets one from its first upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_stored_in_the_data_centers_object_store() -> anyhow::Result<()> {
    use civicgrid_marketplace::proto::{self as api, registry_client::RegistryClient};
    use civicgrid_marketplace::queries::{EngineConfig, QueryEngine};
    use civicgrid_tests::market::{Cast, Db, SAMPLE_ROWS, TestMarket, action, authed, sample_spec};

    use super::data_versions::{entry_details, residents_csv, upload};
    use super::queries::{BY_DISTRICT, contract, deposit, query, run as run_query, total_people};

    const CORE: &str = "municipal-core";
    let server = ObjectStoreServer::start(&[CORE]).await?;
    let market = TestMarket::start(Db::Sqlite).await?;
    let guest = civicgrid_tests::sandbox::guest_dir().join("civicgrid_sandbox_guest.wasm");
    let cache = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
    let engine =
        tokio::task::spawn_blocking(move || QueryEngine::open(EngineConfig::new(guest, cache)))
            .await??;
    market.market.attach_engine(engine)?;
    let local = market.market.data_dir().join("products/population");
    server
        .upload_folder(CORE, "products/population", &local)
        .await?;
    std::fs::remove_dir_all(&local)?;
    let products =
        ProductStore::s3_with(server.builder(), &format!("s3://{CORE}"), Handle::current())?;
    let _routed = civicgrid_tests::runners::route_to(&market, CORE, products.clone(), 1).await?;
    let cast = Cast::create(&market).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 100_000).await?;

    let committed = upload(
        &market,
        &cast.provider_admin,
        true,
        &residents_csv("new-town", 700_000, 40),
    )
    .await?;
    let version = committed.version.expect("a version");
    assert_eq!(version.rows, i64::try_from(SAMPLE_ROWS)? + 40);
    let answer = run_query(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-s3")).await?;
    assert_eq!(
        total_people(&answer.batches)?,
        i64::try_from(SAMPLE_ROWS)? + 40
    );
    assert_eq!(
        entry_details(&answer.summary)["data_fingerprint"],
        version.fingerprint.as_str()
    );
    // Every file of the version is in the store, where the manifest says.
    let footers = Arc::default();
    let manifest = civicgrid_sandbox::manifest::Manifest {
        tables: version
            .tables
            .iter()
            .map(|t| civicgrid_sandbox::manifest::ManifestTable {
                name: t.name.clone(),
                files: t
                    .files
                    .iter()
                    .map(|f| civicgrid_sandbox::manifest::ManifestFile {
                        path: f.path.clone(),
                        sha256: f.sha256.clone(),
                        bytes: u64::try_from(f.bytes).unwrap_or_default(),
                        rows: u64::try_from(f.rows).unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect(),
    };
    let opened = products
        .version("products/population", &manifest, &footers)
        .await?;
    assert_eq!(opened.tables(), ["residents"]);
    assert_eq!(
        opened
            .schema("residents")
            .map_err(anyhow::Error::msg)?
            .fields()
            .len(),
        3,
        "household_size, undeclared, was left out"
    );

    // A new product with no folder in the store: its first upload makes it.
    let mut registry = RegistryClient::new(market.channel.clone());
    let mut transit = sample_spec();
    transit.storage_location = "products/transit".into();
    registry
        .create_product(authed(
            &cast.provider_admin,
            api::CreateProductRequest {
                id: "transit".into(),
                spec: Some(transit),
            },
        ))
        .await?;
    let early = registry
        .submit_product(authed(&cast.provider_admin, action("transit", "")))
        .await
        .expect_err("no data yet");
    assert_eq!(early.code(), tonic::Code::FailedPrecondition, "{early:?}");
    let file = residents_csv("harbour", 1, 30);
    let mut started = registry
        .begin_upload(authed(
            &cast.provider_admin,
            api::BeginUploadRequest {
                product_id: "transit".into(),
                table: "residents".into(),
                format: "csv".into(),
                append: false,
                for_revision: false,
                size_bytes: i64::try_from(file.len())?,
                sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&file)),
            },
        ))
        .await?
        .into_inner();
    started = registry
        .put_upload_chunk(authed(
            &cast.provider_admin,
            api::PutUploadChunkRequest {
                upload_id: started.id.clone(),
                offset: 0,
                sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&file)),
                data: file.clone(),
            },
        ))
        .await?
        .into_inner();
    let committed = registry
        .commit_upload(authed(
            &cast.provider_admin,
            api::GetUploadRequest {
                upload_id: started.id,
            },
        ))
        .await?
        .into_inner();
    assert_eq!(committed.version.expect("a version").rows, 30);
    // Its registration measures the version.
    let submitted = registry
        .submit_product(authed(&cast.provider_admin, action("transit", "")))
        .await?
        .into_inner();
    assert_eq!(submitted.data_version, 1);
    market.stop().await;
    Ok(())
}
