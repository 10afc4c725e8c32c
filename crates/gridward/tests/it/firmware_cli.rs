//! `gridward firmware keygen | sign | inspect`: the manufacturer's side of firmware updates, with
//! OpenSSL reading the keys and `gridward_core::firmware` checking what the CLI signed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use gridward_core::envelope::VerifyingKey;
use gridward_core::firmware::{decode_unverified, verify_manifest};

use crate::support::{gridward, gridward_ok, tool_ok};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// Runs `gridward firmware keygen --out DIR [--alg ALG]` and returns (private, public).
fn keygen(dir: &Path, alg: &str) -> (PathBuf, PathBuf) {
    let out = gridward_ok(&["firmware", "keygen", "--out", s(dir), "--alg", alg]);
    assert!(out.contains("key id:"), "{out}");
    (
        dir.join("manufacturer.key.pem"),
        dir.join("manufacturer.pub.pem"),
    )
}

/// A pseudo-random image of `len` bytes.
fn image(dir: &Path, len: usize) -> PathBuf {
    let mut x: u32 = 0x1234_5678;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect();
    let path = dir.join("fw.bin");
    fs::write(&path, bytes).expect("write image");
    path
}

/// Signs `img` with `key` (sequence 7, version 1.2.3) to IMAGE.manifest.
fn sign(key: &Path, img: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "firmware",
        "sign",
        "--key",
        s(key),
        "--image",
        s(img),
        "--vendor",
        "acme",
        "--class",
        "em-300",
        "--version",
        "1.2.3",
        "--sequence",
        "7",
    ];
    args.extend_from_slice(extra);
    gridward_ok(&args)
}

#[test]
fn keygen_sign_inspect_round_trip() {
    for alg in ["eddsa", "es256"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (key, public) = keygen(&tmp.path().join("keys"), alg);
        assert_eq!(mode(&key), 0o600, "{alg}");
        assert!(
            fs::read_to_string(&key)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        // OpenSSL reads both halves.
        tool_ok(
            "openssl",
            &["pkey", "-pubin", "-in", s(&public), "-noout"],
            tmp.path(),
        );
        tool_ok("openssl", &["pkey", "-in", s(&key), "-noout"], tmp.path());

        let img = image(tmp.path(), 40_000);
        let out = sign(
            &key,
            &img,
            &["--expires", "2099-01-01T00:00:00Z", "--rollback-from", "9"],
        );
        assert!(out.contains("signed manifest for acme/em-300 version 1.2.3 (sequence 7)"));
        let manifest = tmp.path().join("fw.bin.manifest");
        assert!(manifest.is_file(), "default output is IMAGE.manifest");

        // What the CLI wrote is what a meter verifies.
        let bytes = fs::read(&manifest).unwrap();
        let vk = VerifyingKey::from_spki_pem(&fs::read_to_string(&public).unwrap()).unwrap();
        let verified = verify_manifest(&bytes, &[vk]).expect("manifest verifies");
        let m = verified.manifest();
        assert_eq!(
            (
                m.vendor_id.as_str(),
                m.class_id.as_str(),
                m.version.as_str()
            ),
            ("acme", "em-300", "1.2.3")
        );
        assert_eq!((m.sequence, m.size, m.rollback_from), (7, 40_000, Some(9)));
        let digest = tool_ok("openssl", &["dgst", "-sha256", "-r", s(&img)], tmp.path());
        let digest = String::from_utf8_lossy(&digest.stdout);
        assert_eq!(
            hex::encode(m.digest),
            digest.split_whitespace().next().unwrap()
        );
        assert_eq!(
            m.expires_at.map(|t| t.unix_timestamp()),
            Some(4_070_908_800)
        );

        let out = gridward_ok(&[
            "firmware",
            "inspect",
            s(&manifest),
            "--manufacturer",
            s(&public),
            "--image",
            s(&img),
        ]);
        for want in [
            "vendor:        acme",
            "class:         em-300",
            "version:       1.2.3",
            "sequence:      7",
            "image size:    40000 bytes",
            "expires:       2099-01-01T00:00:00Z",
            "rollback from: sequence 9",
            "signature:     ok",
            "image:         ok",
        ] {
            assert!(out.contains(want), "{want:?} missing:\n{out}");
        }
        // Without keys or image: the fields, and a clear "not checked".
        let out = gridward_ok(&["firmware", "inspect", s(&manifest)]);
        assert!(out.contains("signature:     not checked"), "{out}");
        assert!(out.contains("image:         not checked"), "{out}");
    }
}

#[test]
fn inspect_refuses_a_tampered_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(&tmp.path().join("keys"), "eddsa");
    let img = image(tmp.path(), 5_000);
    sign(&key, &img, &[]);
    let manifest = tmp.path().join("fw.bin.manifest");
    let inspect = |img: &Path| {
        gridward(&[
            "firmware",
            "inspect",
            s(&manifest),
            "--manufacturer",
            s(&public),
            "--image",
            s(img),
        ])
    };

    // One byte changed, same size.
    let mut bytes = fs::read(&img).unwrap();
    bytes[2_500] ^= 0x01;
    let flipped = tmp.path().join("flipped.bin");
    fs::write(&flipped, &bytes).unwrap();
    let out = inspect(&flipped);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("REFUSED") && stderr(&out).contains("SHA-256"),
        "{}",
        stderr(&out)
    );

    // Truncated.
    let short = tmp.path().join("short.bin");
    fs::write(&short, &bytes[..4_999]).unwrap();
    let out = inspect(&short);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is 4999 bytes, the manifest says 5000"),
        "{}",
        stderr(&out)
    );

    // The genuine image still passes.
    assert!(inspect(&img).status.success());
}

#[test]
fn inspect_refuses_another_manufacturers_key_and_a_tampered_manifest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(&tmp.path().join("acme"), "eddsa");
    let (_, other) = keygen(&tmp.path().join("rogue"), "es256");
    let img = image(tmp.path(), 1_000);
    sign(&key, &img, &[]);
    let manifest = tmp.path().join("fw.bin.manifest");

    let out = gridward(&[
        "firmware",
        "inspect",
        s(&manifest),
        "--manufacturer",
        s(&other),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not signed by a trusted manufacturer key"),
        "{}",
        stderr(&out)
    );
    // Among several trusted keys, the right one is found.
    gridward_ok(&[
        "firmware",
        "inspect",
        s(&manifest),
        "--manufacturer",
        s(&other),
        "--manufacturer",
        s(&public),
    ]);

    // A changed byte in the signed manifest breaks the signature (or the encoding).
    let mut bytes = fs::read(&manifest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let bad = tmp.path().join("bad.manifest");
    fs::write(&bad, &bytes).unwrap();
    let out = gridward(&["firmware", "inspect", s(&bad), "--manufacturer", s(&public)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("signature does not verify"),
        "{}",
        stderr(&out)
    );

    // Not a manifest at all, and not a public key.
    let out = gridward(&["firmware", "inspect", s(&img)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not a firmware manifest"),
        "{}",
        stderr(&out)
    );
    let out = gridward(&[
        "firmware",
        "inspect",
        s(&manifest),
        "--manufacturer",
        s(&key),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a public key"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn keygen_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("keys");
    let (key, public) = keygen(&dir, "eddsa");
    let before = fs::read(&key).unwrap();
    let out = gridward(&["firmware", "keygen", "--out", s(&dir)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refusing to overwrite"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(&key).unwrap(), before, "the key is untouched");

    // Only the public key left: still refused, and no new private key appears.
    fs::remove_file(&key).unwrap();
    let out = gridward(&["firmware", "keygen", "--out", s(&dir)]);
    assert!(!out.status.success());
    assert!(!key.exists());
    assert!(public.exists());
}

#[test]
fn sign_refuses_bad_input() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(&tmp.path().join("keys"), "eddsa");
    let img = image(tmp.path(), 100);
    let base = |version: &str, extra: &[&str]| {
        let mut args = vec![
            "firmware",
            "sign",
            "--key",
            s(&key),
            "--image",
            s(&img),
            "--vendor",
            "acme",
            "--class",
            "em-300",
            "--version",
            version,
            "--sequence",
            "1",
        ];
        args.extend_from_slice(extra);
        gridward(&args)
    };
    let out = base("1.2", &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not X.Y.Z"), "{}", stderr(&out));
    let out = base("1.2.3", &["--expires", "2001-01-01T00:00:00Z"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in the past"), "{}", stderr(&out));
    let out = base("1.2.3", &["--expires", "tomorrow"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("RFC 3339"), "{}", stderr(&out));
    // The public key is not a signing key.
    let out = gridward(&[
        "firmware",
        "sign",
        "--key",
        s(&public),
        "--image",
        s(&img),
        "--vendor",
        "acme",
        "--class",
        "em-300",
        "--version",
        "1.2.3",
        "--sequence",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a manufacturer private key"),
        "{}",
        stderr(&out)
    );
    // An existing manifest is replaced only with --force.
    assert!(base("1.2.3", &[]).status.success());
    let out = base("1.2.3", &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert!(base("1.2.4", &["--force"]).status.success());
    let m = decode_unverified(&fs::read(tmp.path().join("fw.bin.manifest")).unwrap()).unwrap();
    assert_eq!(m.version, "1.2.4");
    // An empty image.
    let empty = tmp.path().join("empty.bin");
    fs::write(&empty, b"").unwrap();
    let out = gridward(&[
        "firmware",
        "sign",
        "--key",
        s(&key),
        "--image",
        s(&empty),
        "--vendor",
        "acme",
        "--class",
        "em-300",
        "--version",
        "1.2.3",
        "--sequence",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is empty"), "{}", stderr(&out));
}
