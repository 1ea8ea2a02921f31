//! The audit log's formats against the Go reference implementations:
//! checkpoints and cosignatures CivicGrid writes verify with
//! `golang.org/x/mod/sumdb/note` and `github.com/transparency-dev/formats`,
//! notes and cosignatures Go writes verify with ours (and are the same bytes:
//! Ed25519 signatures are deterministic), verifier keys are the same strings,
//! and every Merkle proof we compute verifies with
//! `github.com/transparency-dev/merkle`.
//!
//! `tlog-reference` (tools/tlog-reference, built from the Go module proxy by
//! `tools/tlog-reference/build.sh`) comes through `CIVICGRID_TLOG_REFERENCE`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use civicgrid_marketplace::audit::checkpoint::{Checkpoint, NoteError, NoteSigner, SigningKey};
use civicgrid_marketplace::audit::cosignature::CosignatureSigner;
use civicgrid_marketplace::audit::merkle::{
    Hash, consistency_proof_ranges, inclusion_proof_ranges, leaf_hash, root_of, verify_consistency,
    verify_inclusion,
};

const ORIGIN: &str = "audit.civicgrid.test";
const WITNESS: &str = "witness.civicgrid.test/w1";
const LOG_SEED: [u8; 32] = [7; 32];
const WITNESS_SEED: [u8; 32] = [3; 32];
const OTHER_WITNESS_SEED: [u8; 32] = [4; 32];
const TIME: u64 = 1_700_000_000;
const LEAVES: usize = 37;

fn reference() -> anyhow::Result<PathBuf> {
    std::env::var_os("CIVICGRID_TLOG_REFERENCE")
        .map(PathBuf::from)
        .context(
            "CIVICGRID_TLOG_REFERENCE is not set: run `bash tools/tlog-reference/build.sh` \
             (scripts/test.sh does)",
        )
}

/// What one run of `tlog-reference` printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn go(args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Run> {
    let binary = reference()?;
    let mut child = Command::new(&binary)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", binary.display()))?;
    // Written from another thread while this one reads the output: the
    // answers to a long input fill the stdout pipe before the input ends.
    let writer = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => {
            let input = input.to_vec();
            Some(std::thread::spawn(move || pipe.write_all(&input)))
        }
        _ => None,
    };
    let output = child.wait_with_output()?;
    if let Some(writer) = writer {
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the thread writing tlog-reference's stdin panicked"))??;
    }
    Ok(Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout)?,
        stderr: String::from_utf8(output.stderr)?,
    })
}

/// Runs `tlog-reference` and returns its output, which must be a success.
fn go_ok(args: &[&str]) -> anyhow::Result<String> {
    let run = go(args, None)?;
    ensure!(
        run.code == Some(0) && run.stderr.is_empty(),
        "tlog-reference {args:?} failed ({:?}): {}",
        run.code,
        run.stderr
    );
    Ok(run.stdout)
}

/// Runs `tlog-reference`, which must refuse (exit 1, nothing on stdout), and
/// returns its message.
fn go_refuses(args: &[&str]) -> anyhow::Result<String> {
    let run = go(args, None)?;
    ensure!(
        run.code == Some(1) && run.stdout.is_empty(),
        "tlog-reference {args:?} should have refused, but exited {:?} printing {:?}",
        run.code,
        run.stdout
    );
    Ok(run.stderr)
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn log_signer() -> NoteSigner {
    NoteSigner::new(ORIGIN, SigningKey::from_bytes(&LOG_SEED))
}

fn witness(seed: [u8; 32]) -> anyhow::Result<CosignatureSigner> {
    Ok(CosignatureSigner::new(
        WITNESS,
        SigningKey::from_bytes(&seed),
    )?)
}

fn leaves() -> Vec<Hash> {
    (0..LEAVES)
        .map(|i| leaf_hash(format!("civicgrid audit entry {i}").as_bytes()))
        .collect()
}

fn checkpoint() -> Checkpoint {
    Checkpoint {
        origin: ORIGIN.into(),
        size: LEAVES as u64,
        root: root_of(&leaves()),
    }
}

/// The key hash of a verifier key, `name+HASH+key`.
fn key_hash(vkey: &str) -> &str {
    vkey.split('+').nth(1).expect("a verifier key has a hash")
}

fn write(dir: &Path, name: &str, contents: &[u8]) -> anyhow::Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, contents)?;
    Ok(path.to_str().context("a UTF-8 temporary path")?.to_owned())
}

#[test]
fn rust_signed_and_cosigned_checkpoints_verify_in_go() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let checkpoint = checkpoint();
    let note = log_signer().sign(&checkpoint);
    let cosigned = format!(
        "{note}{}",
        witness(WITNESS_SEED)?.cosign(&checkpoint.body(), TIME)
    );
    let log_key = log_signer().verifier().to_string();
    let witness_key = witness(WITNESS_SEED)?.verifier().to_string();
    let expected = format!("{ORIGIN} {LEAVES} {}\n", STANDARD.encode(checkpoint.root));

    let path = write(dir.path(), "cosigned", cosigned.as_bytes())?;
    let printed = go_ok(&[
        "verify-checkpoint",
        "-log-key",
        &log_key,
        "-note",
        &path,
        "-witness-key",
        &witness_key,
    ])?;
    assert_eq!(printed, expected);
    // The log's signature alone, on the note with and without the
    // cosignature.
    assert_eq!(
        go_ok(&["verify-checkpoint", "-log-key", &log_key, "-note", &path])?,
        expected
    );
    let path = write(dir.path(), "signed", note.as_bytes())?;
    assert_eq!(
        go_ok(&["verify-checkpoint", "-log-key", &log_key, "-note", &path])?,
        expected
    );
    Ok(())
}

#[test]
fn go_refuses_altered_notes_and_cosignatures_by_other_witnesses() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let checkpoint = checkpoint();
    let note = log_signer().sign(&checkpoint);
    let cosignature = witness(WITNESS_SEED)?.cosign(&checkpoint.body(), TIME);
    let log_key = log_signer().verifier().to_string();
    let witness_key = witness(WITNESS_SEED)?.verifier().to_string();
    let verify = |name: &str, note: &str| -> anyhow::Result<String> {
        let path = write(dir.path(), name, note.as_bytes())?;
        go_refuses(&[
            "verify-checkpoint",
            "-log-key",
            &log_key,
            "-note",
            &path,
            "-witness-key",
            &witness_key,
        ])
    };

    // One byte of the body changed (size 37 -> 38): the log's signature
    // fails, and Go says so before it looks at the cosignature.
    let altered = format!("{note}{cosignature}").replacen("\n37\n", "\n38\n", 1);
    assert_eq!(altered.len(), note.len() + cosignature.len());
    assert_eq!(
        verify("altered", &altered)?,
        format!(
            "tlog-reference verify-checkpoint: failed to verify signatures on checkpoint: \
             invalid signature for key {ORIGIN}+{}\n",
            key_hash(&log_key)
        )
    );

    // The log signs the altered body, the old cosignature is carried over:
    // the witness never saw this body.
    let resigned = log_signer().sign(&Checkpoint {
        size: 38,
        ..checkpoint.clone()
    });
    assert_eq!(
        verify("resigned", &format!("{resigned}{cosignature}"))?,
        format!(
            "tlog-reference verify-checkpoint: failed to verify signatures on checkpoint: \
             invalid signature for key {WITNESS}+{}\n",
            key_hash(&witness_key)
        )
    );

    // Cosigned by another key under the witness's name, or not cosigned:
    // not the witness that is required.
    let missing = format!(
        "tlog-reference verify-checkpoint: no verified cosignature by witness {WITNESS}+{}\n",
        key_hash(&witness_key)
    );
    let other = witness(OTHER_WITNESS_SEED)?.cosign(&checkpoint.body(), TIME);
    assert_eq!(verify("other", &format!("{note}{other}"))?, missing);
    assert_eq!(verify("uncosigned", &note)?, missing);

    // The log's key alone accepts what the other witness cosigned.
    let path = write(
        dir.path(),
        "other-only-log",
        format!("{note}{other}").as_bytes(),
    )?;
    assert_eq!(
        go_ok(&["verify-checkpoint", "-log-key", &log_key, "-note", &path])?,
        format!("{ORIGIN} {LEAVES} {}\n", STANDARD.encode(checkpoint.root))
    );
    Ok(())
}

#[test]
fn verifier_keys_are_the_strings_go_derives() -> anyhow::Result<()> {
    let seeds: [[u8; 32]; 4] = [
        [0; 32],
        LOG_SEED,
        [0xff; 32],
        std::array::from_fn(|i| (i * 37 + 11) as u8),
    ];
    for name in [ORIGIN, WITNESS, "civicgrid.example.city/audit"] {
        for seed in seeds {
            let key = SigningKey::from_bytes(&seed);
            let note_key = NoteSigner::new(name, key.clone()).verifier().to_string();
            let cosignature_key = CosignatureSigner::new(name, key)?.verifier().to_string();
            let seed = hex(&seed);
            let go_key =
                |kind: &str| go_ok(&["vkey", "-name", name, "-seed-hex", &seed, "-type", kind]);
            assert_eq!(go_key("1")?, format!("{note_key}\n"), "type 1, {name}");
            assert_eq!(
                go_key("4")?,
                format!("{cosignature_key}\n"),
                "type 4, {name}"
            );
        }
    }
    Ok(())
}

#[test]
fn go_signed_notes_and_cosignatures_verify_in_rust_and_are_the_same_bytes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let checkpoint = checkpoint();
    let go_note = go_ok(&[
        "sign",
        "-name",
        ORIGIN,
        "-seed-hex",
        &hex(&LOG_SEED),
        "-size",
        &LEAVES.to_string(),
        "-root",
        &STANDARD.encode(checkpoint.root),
    ])?;
    assert_eq!(go_note, log_signer().sign(&checkpoint));
    assert_eq!(
        log_signer().verifier().verify(&go_note, ORIGIN),
        Ok(checkpoint.clone())
    );

    let path = write(dir.path(), "go-note", go_note.as_bytes())?;
    let verifier = witness(WITNESS_SEED)?.verifier();
    for time in [0, TIME, 4_102_444_800, i64::MAX as u64] {
        let line = go_ok(&[
            "cosign",
            "-name",
            WITNESS,
            "-seed-hex",
            &hex(&WITNESS_SEED),
            "-note",
            &path,
            "-time",
            &time.to_string(),
        ])?;
        assert_eq!(
            line,
            witness(WITNESS_SEED)?.cosign(&checkpoint.body(), time),
            "time {time}"
        );
        let cosigned = format!("{go_note}{line}");
        assert_eq!(verifier.verify(&cosigned), Ok(time));
        assert_eq!(
            log_signer().verifier().verify(&cosigned, ORIGIN),
            Ok(checkpoint.clone())
        );
    }
    Ok(())
}

fn b64_all(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(|hash| STANDARD.encode(hash)).collect()
}

fn flip(mut hashes: Vec<Hash>, which: usize) -> Vec<Hash> {
    hashes[which][which % 32] ^= 0x01;
    hashes
}

#[test]
fn every_merkle_proof_we_compute_verifies_in_go() -> anyhow::Result<()> {
    let leaves = leaves();
    let range_hash = |start: u64, end: u64| root_of(&leaves[start as usize..end as usize]);
    // (request, whether Go must accept it, what it is)
    let mut cases: Vec<(serde_json::Value, bool, String)> = Vec::new();
    for size in 1..=LEAVES as u64 {
        let root = range_hash(0, size);
        for index in 0..size {
            let leaf = leaves[index as usize];
            let path: Vec<Hash> = inclusion_proof_ranges(index, size)
                .into_iter()
                .map(|range| range_hash(range.start, range.end))
                .collect();
            assert_eq!(verify_inclusion(index, size, &leaf, &path, &root), Ok(()));
            let request = |path: &[Hash], leaf: &Hash| {
                serde_json::json!({"inclusion": {
                    "index": index, "size": size, "leaf_hash": STANDARD.encode(leaf),
                    "root": STANDARD.encode(root), "proof": b64_all(path),
                }})
            };
            cases.push((
                request(&path, &leaf),
                true,
                format!("inclusion {index} in {size}"),
            ));
            cases.push((
                request(&path, &leaves[(index as usize + 1) % LEAVES]),
                false,
                format!("inclusion {index} in {size}, another leaf"),
            ));
            if !path.is_empty() {
                let which = index as usize % path.len();
                cases.push((
                    request(&flip(path.clone(), which), &leaf),
                    false,
                    format!("inclusion {index} in {size}, hash {which} flipped"),
                ));
                cases.push((
                    request(&path[..path.len() - 1], &leaf),
                    false,
                    format!("inclusion {index} in {size}, last hash dropped"),
                ));
            }
        }
    }
    for new in 1..=LEAVES as u64 {
        let new_root = range_hash(0, new);
        for old in 0..=new {
            let old_root = range_hash(0, old);
            let path: Vec<Hash> = consistency_proof_ranges(old, new)
                .into_iter()
                .map(|range| range_hash(range.start, range.end))
                .collect();
            assert_eq!(
                verify_consistency(old, new, &path, &old_root, &new_root),
                Ok(())
            );
            let request = |path: &[Hash], old_root: &Hash| {
                serde_json::json!({"consistency": {
                    "old": old, "new": new, "old_root": STANDARD.encode(old_root),
                    "new_root": STANDARD.encode(new_root), "proof": b64_all(path),
                }})
            };
            cases.push((
                request(&path, &old_root),
                true,
                format!("consistency {old} to {new}"),
            ));
            if !path.is_empty() {
                let which = (old as usize) % path.len();
                cases.push((
                    request(&flip(path.clone(), which), &old_root),
                    false,
                    format!("consistency {old} to {new}, hash {which} flipped"),
                ));
                // A rewritten history: the old tree had another first leaf.
                let mut rewritten = leaves[..old as usize].to_vec();
                rewritten[0] = leaf_hash(b"rewritten");
                cases.push((
                    request(&path, &root_of(&rewritten)),
                    false,
                    format!("consistency {old} to {new}, rewritten old tree"),
                ));
            }
        }
    }
    let accepted = cases.iter().filter(|(_, ok, _)| *ok).count();
    assert_eq!(
        accepted,
        (1..=LEAVES).sum::<usize>() + (1..=LEAVES).map(|new| new + 1).sum::<usize>()
    );

    let mut input = Vec::new();
    for (request, _, _) in &cases {
        serde_json::to_writer(&mut input, request)?;
        input.push(b'\n');
    }
    let run = go(&["verify-proofs"], Some(&input))?;
    ensure!(run.code == Some(0), "verify-proofs failed: {}", run.stderr);
    let verdicts: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(verdicts.len(), cases.len());
    let wrong: Vec<String> = cases
        .iter()
        .zip(&verdicts)
        .filter(|((_, ok, _), verdict)| {
            let accepted = **verdict == "ok";
            accepted != *ok || (!accepted && !verdict.starts_with("fail\t"))
        })
        .map(|((_, ok, what), verdict)| format!("{what}: expected ok={ok}, Go said {verdict:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} disagreements:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    Ok(())
}

#[test]
fn single_proofs_verify_and_flipped_ones_are_refused_in_go() -> anyhow::Result<()> {
    let leaves = leaves();
    let (index, size, old) = (13u64, 37u64, 21u64);
    let range_hash = |start: u64, end: u64| root_of(&leaves[start as usize..end as usize]);
    let inclusion: Vec<Hash> = inclusion_proof_ranges(index, size)
        .into_iter()
        .map(|range| range_hash(range.start, range.end))
        .collect();
    let consistency: Vec<Hash> = consistency_proof_ranges(old, size)
        .into_iter()
        .map(|range| range_hash(range.start, range.end))
        .collect();
    let (index_s, size_s, old_s) = (index.to_string(), size.to_string(), old.to_string());
    let leaf = STANDARD.encode(leaves[index as usize]);
    let root = STANDARD.encode(range_hash(0, size));
    let old_root = STANDARD.encode(range_hash(0, old));
    let inclusion_args = |proof: &str| {
        [
            "verify-inclusion",
            "-index",
            &index_s,
            "-size",
            &size_s,
            "-leaf-hash",
            &leaf,
            "-root",
            &root,
            "-proof",
            proof,
        ]
        .map(str::to_owned)
    };
    let consistency_args = |proof: &str| {
        [
            "verify-consistency",
            "-old",
            &old_s,
            "-new",
            &size_s,
            "-old-root",
            &old_root,
            "-new-root",
            &root,
            "-proof",
            proof,
        ]
        .map(str::to_owned)
    };

    let proof = b64_all(&inclusion).join(",");
    assert_eq!(go_ok(&as_strs(&inclusion_args(&proof)))?, "ok\n");
    let flipped = b64_all(&flip(inclusion, 2)).join(",");
    assert!(
        go_refuses(&as_strs(&inclusion_args(&flipped)))?
            .starts_with("tlog-reference verify-inclusion: calculated root:")
    );

    let proof = b64_all(&consistency).join(",");
    assert_eq!(go_ok(&as_strs(&consistency_args(&proof)))?, "ok\n");
    let flipped = b64_all(&flip(consistency, 1)).join(",");
    assert!(
        go_refuses(&as_strs(&consistency_args(&flipped)))?
            .starts_with("tlog-reference verify-consistency: calculated root:")
    );
    Ok(())
}

#[test]
fn leaf_hashes_are_the_ones_go_computes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let samples: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0],
        b"civicgrid audit entry 0".to_vec(),
        "{\"product\":\"commerce\",\"consumer\":\"Zoë\"}"
            .as_bytes()
            .to_vec(),
        (0..4096u32).map(|i| (i * 31 % 251) as u8).collect(),
    ];
    for (i, data) in samples.iter().enumerate() {
        let path = write(dir.path(), &format!("leaf-{i}"), data)?;
        assert_eq!(
            go_ok(&["leaf-hash", "-data-file", &path])?,
            format!("{}\n", STANDARD.encode(leaf_hash(data))),
            "sample {i}"
        );
    }
    // RFC 6962's empty-leaf vector, SHA-256(0x00).
    assert_eq!(
        STANDARD.encode(leaf_hash(b"")),
        "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0="
    );
    Ok(())
}

/// A signature line under `name` whose signature is `blob`.
fn signature_line(name: &str, blob: &[u8]) -> String {
    format!("\u{2014} {name} {}\n", STANDARD.encode(blob))
}

/// The key ID of a verifier key, decoded.
fn key_id(vkey: &str) -> Vec<u8> {
    let hex = key_hash(vkey);
    (0..4)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("a hex key hash"))
        .collect()
}

/// Go's verdict (exit 0) on `note` requiring the log's and the witness's
/// signatures.
fn go_accepts(dir: &Path, name: &str, note: &str) -> anyhow::Result<Run> {
    let path = write(dir, name, note.as_bytes())?;
    go(
        &[
            "verify-checkpoint",
            "-log-key",
            &log_signer().verifier().to_string(),
            "-note",
            &path,
            "-witness-key",
            &witness(WITNESS_SEED)?.verifier().to_string(),
        ],
        None,
    )
}

#[test]
fn signature_lines_of_unknown_keys_and_the_note_grammar_agree_with_go() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let checkpoint = checkpoint();
    let cosigned = format!(
        "{}{}",
        log_signer().sign(&checkpoint),
        witness(WITNESS_SEED)?.cosign(&checkpoint.body(), TIME)
    );
    let log = log_signer().verifier();
    let witness_key = witness(WITNESS_SEED)?.verifier();

    // A well-formed signature by a key neither side knows is ignored.
    let foreign = format!(
        "{cosigned}{}",
        signature_line("witness.example.org/w9", &[0x42; 68])
    );
    assert_eq!(log.verify(&foreign, ORIGIN), Ok(checkpoint.clone()));
    assert_eq!(witness_key.verify(&foreign), Ok(TIME));
    let run = go_accepts(dir.path(), "foreign", &foreign)?;
    assert_eq!((run.code, run.stderr.as_str()), (Some(0), ""));

    // Outside the signed-note grammar: no final newline, a carriage return.
    let malformed = "tlog-reference verify-checkpoint: failed to verify signatures on checkpoint: \
                     malformed note\n";
    for (name, note) in [
        ("unterminated", cosigned.trim_end_matches('\n').to_owned()),
        (
            "carriage-return",
            format!("{}\r\n", cosigned.trim_end_matches('\n')),
        ),
    ] {
        assert!(
            matches!(log.verify(&note, ORIGIN), Err(NoteError::Malformed(_))),
            "{name}"
        );
        let run = go_accepts(dir.path(), name, &note)?;
        assert_eq!(
            (run.code, run.stderr.as_str()),
            (Some(1), malformed),
            "{name}"
        );
    }
    Ok(())
}

/// Notes Go's x/mod `note.Open` refuses as a whole: signature
/// lines that are malformed (a blob under 5 bytes, an empty blob, a key name
/// with '+') and a line under a known key's name and ID whose signature has
/// the wrong length, placed before that key's valid line (C2SP signed-note:
/// "If the key name and ID match a known key, verifiers MUST verify the
/// signature. If a signature from a known key fails to verify, clients
/// SHOULD reject the whole note"). Both sides refuse each.
#[test]
fn malformed_signature_lines_get_the_verdict_go_gives() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let checkpoint = checkpoint();
    let note = log_signer().sign(&checkpoint);
    let cosignature = witness(WITNESS_SEED)?.cosign(&checkpoint.body(), TIME);
    let body = checkpoint.body();
    let log_line = &note[body.len() + 1..];
    let log_key = log_signer().verifier().to_string();
    let witness_key = witness(WITNESS_SEED)?.verifier().to_string();
    let short_log = signature_line(ORIGIN, &[key_id(&log_key), vec![0; 10]].concat());
    let short_witness = signature_line(WITNESS, &[key_id(&witness_key), vec![0; 16]].concat());
    let cases = [
        (
            "foreign-short",
            format!("{note}{cosignature}\u{2014} other.example AAAA\n"),
        ),
        (
            "foreign-empty",
            format!("{note}{cosignature}\u{2014} other.example \n"),
        ),
        (
            "foreign-plus",
            format!("{note}{cosignature}{}", signature_line("a+b", &[0x42; 68])),
        ),
        (
            "log-short-first",
            format!("{body}\n{short_log}{log_line}{cosignature}"),
        ),
        (
            "witness-short-first",
            format!("{note}{short_witness}{cosignature}"),
        ),
    ];
    let mut disagreements = Vec::new();
    for (name, note) in &cases {
        let ours = log_signer().verifier().verify(note, ORIGIN).is_ok()
            && witness(WITNESS_SEED)?.verifier().verify(note).is_ok();
        let run = go_accepts(dir.path(), name, note)?;
        let go = run.code == Some(0);
        if ours != go {
            disagreements.push(format!(
                "{name}: ours accepts={ours}, Go accepts={go} ({}) for\n{note}",
                run.stderr.trim_end()
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    Ok(())
}
