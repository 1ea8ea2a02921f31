//! The images `scripts/build-images.sh` writes (docs/install.md), run from
//! their own root file systems by runc, as a container runtime would: each
//! binary starts as the non-root user with the root file system read-only,
//! and an image holds only its binary, the libraries it links, CA
//! certificates and (marketplace, runner) the SQL guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, ensure};

const IMAGES: [&str; 4] = ["operator", "marketplace", "runner", "witness"];

/// The images that run queries, and so carry the SQL guest.
fn runs_queries(image: &str) -> bool {
    matches!(image, "marketplace" | "runner")
}

/// Where an image's files may be; anything else (a shell, a package
/// manager) is a finding.
const ALLOWED: [&str; 11] = [
    "etc/passwd",
    "etc/group",
    "etc/ssl/certs/ca-certificates.crt",
    "lib/x86_64-linux-gnu/",
    "lib64/",
    "usr/lib/x86_64-linux-gnu/",
    "usr/local/bin/",
    "usr/share/civicgrid/",
    "usr/share/doc/",
    "tmp",
    "var/lib/civicgrid",
];

fn env_path(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .with_context(|| format!("{name} is not set (scripts/test.sh sets it)"))
}

fn run(command: &mut Command) -> anyhow::Result<std::process::Output> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    Ok(output)
}

/// Builds the three images from the debug binaries the suite built.
fn build_images(out: &Path) -> anyhow::Result<PathBuf> {
    let operator = env_path("CIVICGRID_OPERATOR_BIN")?;
    let bin_dir = operator.parent().context("the operator binary's folder")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-images.sh");
    let built = run(Command::new("bash")
        .arg(&script)
        .args(["--profile", "debug", "--no-build", "--bin-dir"])
        .arg(bin_dir)
        .arg("--out")
        .arg(out))?;
    ensure!(
        built.status.success(),
        "build-images.sh failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    Ok(PathBuf::from(String::from_utf8(built.stdout)?.trim()))
}

/// An image unpacked into an OCI runtime bundle.
struct Bundle {
    dir: PathBuf,
    config: serde_json::Value,
}

fn unpack(layout: &Path, reference: &str, dir: &Path) -> anyhow::Result<Bundle> {
    let unpacked = run(Command::new(env_path("CIVICGRID_UMOCI")?)
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{reference}", layout.display()))
        .arg(dir))?;
    ensure!(
        unpacked.status.success(),
        "umoci unpack {reference}: {}",
        String::from_utf8_lossy(&unpacked.stderr)
    );
    let config = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    Ok(Bundle {
        dir: dir.to_owned(),
        config,
    })
}

/// Every file and folder under `root`, relative to it.
fn files_under(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let relative = path.strip_prefix(root)?.display().to_string();
            if entry.file_type()?.is_dir() {
                pending.push(path);
                found.push(format!("{relative}/"));
            } else {
                found.push(relative);
            }
        }
    }
    Ok(found)
}

/// The files and folders (but `/tmp`, which is sticky) that a group or
/// other users may write.
fn writable_by_others(root: &Path, files: &[String]) -> anyhow::Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut writable = Vec::new();
    for file in files {
        let metadata = std::fs::symlink_metadata(root.join(file.trim_end_matches('/')))?;
        if metadata.file_type().is_symlink() || file == "tmp/" {
            continue;
        }
        if metadata.permissions().mode() & 0o022 != 0 {
            writable.push(file.clone());
        }
    }
    Ok(writable)
}

static CONTAINERS: AtomicUsize = AtomicUsize::new(0);

/// Runs `args` in the bundle with runc: the image's user, its root file
/// system read-only, and (when `data_dir` is set) a writable tmpfs at
/// `/var/lib/civicgrid`, as the chart mounts an emptyDir there.
fn run_in(bundle: &Bundle, args: &[&str], data_dir: bool) -> anyhow::Result<std::process::Output> {
    let mut config = bundle.config.clone();
    config["process"]["args"] = serde_json::json!(args);
    config["process"]["terminal"] = serde_json::json!(false);
    config["root"]["readonly"] = serde_json::json!(true);
    if data_dir {
        config["mounts"]
            .as_array_mut()
            .context("the bundle's mounts")?
            .push(serde_json::json!({
                "destination": "/var/lib/civicgrid",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=0700", "uid=65532", "gid=65532"],
            }));
    }
    std::fs::write(bundle.dir.join("config.json"), serde_json::to_vec(&config)?)?;
    let id = format!(
        "civicgrid-test-{}-{}",
        std::process::id(),
        CONTAINERS.fetch_add(1, Ordering::Relaxed)
    );
    run(Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&bundle.dir)
        .arg(id))
}

/// Each image runs its binary under runc as uid 65532 with a read-only
/// root, holds nothing but what it needs, and the marketplace initialises
/// its database in the writable data folder and nowhere else.
#[test]
fn each_image_runs_its_binary_as_a_non_root_user_on_a_read_only_root() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    ensure!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(scratch.path())?) == 0,
        "runc runs the images as root here (scripts/test.sh runs as root in CI)"
    );
    let layout = build_images(&scratch.path().join("out"))?;
    // The same binaries give the same images, byte for byte: every time in
    // them is the commit's, and no history entry records when they were
    // built.
    let again = build_images(&scratch.path().join("again"))?;
    assert_eq!(
        std::fs::read(layout.join("index.json"))?,
        std::fs::read(again.join("index.json"))?,
        "two builds of the same binaries differ"
    );
    let version = env!("CARGO_PKG_VERSION");
    for image in IMAGES {
        let bundle = unpack(
            &layout,
            &format!("{image}-{version}"),
            &scratch.path().join(image),
        )?;
        let binary = format!("/usr/local/bin/civicgrid-{image}");
        let process = &bundle.config["process"];
        assert_eq!(process["user"]["uid"], 65532, "{image}: {process}");
        assert_eq!(process["user"]["gid"], 65532, "{image}: {process}");
        assert_eq!(process["args"], serde_json::json!([binary]), "{image}");
        assert_eq!(process["cwd"], "/var/lib/civicgrid", "{image}");

        let files = files_under(&bundle.dir.join("rootfs"))?;
        // A file is allowed when it is one of ALLOWED or inside one that is
        // a folder; a folder, when it leads to one.
        let strays: Vec<_> = files
            .iter()
            .filter(|file| {
                !ALLOWED.iter().any(|allowed| {
                    *file == allowed
                        || **file == format!("{allowed}/")
                        || (allowed.ends_with('/') && file.starts_with(allowed))
                        || (file.ends_with('/') && allowed.starts_with(file.as_str()))
                })
            })
            .collect();
        assert!(
            strays.is_empty(),
            "{image} holds more than it needs: {strays:?}"
        );
        let writable: Vec<_> = writable_by_others(&bundle.dir.join("rootfs"), &files)?;
        assert!(
            writable.is_empty(),
            "{image}: writable by group or others: {writable:?}"
        );
        for absent in ["bin/sh", "bin/bash", "usr/bin/apt", "usr/bin/dpkg"] {
            assert!(
                !files.iter().any(|file| file == absent),
                "{image}: {absent}"
            );
        }
        let guest = "usr/share/civicgrid/civicgrid_sandbox_guest.wasm".to_owned();
        assert_eq!(
            files.contains(&guest),
            runs_queries(image),
            "{image}: the SQL guest"
        );
        assert!(
            files.contains(&binary[1..].to_owned()),
            "{image}: {files:?}"
        );

        let version_line = run_in(&bundle, &[&binary, "--version"], false)?;
        assert!(version_line.status.success(), "{image}: {version_line:?}");
        assert_eq!(
            String::from_utf8(version_line.stdout)?,
            format!("civicgrid-{image} {version}\n")
        );
    }

    // The operator prints its CRDs from inside its image.
    let operator = unpack(
        &layout,
        &format!("operator-{version}"),
        &scratch.path().join("operator-crds"),
    )?;
    let crds = run_in(
        &operator,
        &["/usr/local/bin/civicgrid-operator", "crds"],
        false,
    )?;
    assert!(crds.status.success(), "{crds:?}");
    assert!(String::from_utf8(crds.stdout)?.contains("kind: CustomResourceDefinition"));

    // The marketplace initialises its SQLite database and signing key in
    // the data folder; on the read-only root it cannot, and says where.
    let marketplace = unpack(
        &layout,
        &format!("marketplace-{version}"),
        &scratch.path().join("marketplace-init"),
    )?;
    let binary = "/usr/local/bin/civicgrid-marketplace";
    let init = run_in(
        &marketplace,
        &[binary, "init", "--admin-name", "admin@city.example"],
        true,
    )?;
    assert!(init.status.success(), "{init:?}");
    let token = String::from_utf8(init.stdout)?;
    assert!(
        token.trim().len() >= 40 && !token.trim().contains(' '),
        "{token}"
    );
    let refused = run_in(
        &marketplace,
        &[
            binary,
            "init",
            "--admin-name",
            "a@b.example",
            "--data-dir",
            "/usr/local/data",
        ],
        true,
    )?;
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8(refused.stderr)?;
    assert!(
        stderr.contains("/usr/local/data") && stderr.contains("Read-only file system"),
        "{stderr}"
    );

    // The witness makes its key in the data folder and prints the
    // verifier key a log's operator is given.
    let witness = unpack(
        &layout,
        &format!("witness-{version}"),
        &scratch.path().join("witness-key"),
    )?;
    let key = run_in(
        &witness,
        &[
            "/usr/local/bin/civicgrid-witness",
            "key",
            "--name",
            "witness.regulator.example/civicgrid",
            "--key-file",
            "/var/lib/civicgrid/witness.key",
        ],
        true,
    )?;
    assert!(key.status.success(), "{key:?}");
    let printed = String::from_utf8(key.stdout)?;
    assert!(
        printed
            .trim()
            .parse::<civicgrid_marketplace::audit::cosignature::CosignatureVerifier>()
            .is_ok_and(|key| key.name() == "witness.regulator.example/civicgrid"),
        "{printed}"
    );
    Ok(())
}

/// images/Dockerfile, for machines with a Docker engine, builds what the
/// script builds: the same user, entry points, data folder and SQL guest.
/// (No engine runs here, so this is as far as it is tested.)
#[test]
fn the_dockerfile_builds_what_the_script_builds() -> anyhow::Result<()> {
    let dockerfile = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/Dockerfile"),
    )?;
    let stages: Vec<&str> = dockerfile.split("\nFROM ").collect();
    let stage = |name: &str| {
        stages
            .iter()
            .find(|stage| {
                stage
                    .lines()
                    .next()
                    .is_some_and(|line| line.ends_with(&format!(" AS {name}")))
            })
            .copied()
            .with_context(|| format!("a stage {name}"))
    };
    let runtime = stage("runtime")?;
    assert!(
        runtime.starts_with("gcr.io/distroless/cc-debian12:nonroot "),
        "{runtime}"
    );
    for line in [
        "USER 65532:65532",
        "WORKDIR /var/lib/civicgrid",
        "ENV CIVICGRID_DATA_DIR=/var/lib/civicgrid",
    ] {
        assert!(runtime.contains(line), "runtime: {line}");
    }
    for image in IMAGES {
        let stage = stage(image)?;
        assert!(stage.starts_with("runtime AS"), "{image}: {stage}");
        assert!(
            stage.contains(&format!(
                "ENTRYPOINT [\"/usr/local/bin/civicgrid-{image}\"]"
            )),
            "{image}"
        );
        assert_eq!(
            stage.contains(
                "ENV CIVICGRID_SQL_GUEST=/usr/share/civicgrid/civicgrid_sandbox_guest.wasm"
            ),
            runs_queries(image),
            "{image}"
        );
    }
    let script = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-images.sh"),
    )?;
    for line in [
        "--config.user 65532:65532",
        "--config.workingdir /var/lib/civicgrid",
        "CIVICGRID_SQL_GUEST=/usr/share/civicgrid/civicgrid_sandbox_guest.wasm",
        "--config.entrypoint \"/usr/local/bin/civicgrid-$image\"",
    ] {
        assert!(script.contains(line), "build-images.sh: {line}");
    }
    Ok(())
}
