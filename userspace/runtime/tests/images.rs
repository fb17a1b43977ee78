//! The image store against real archives: built here (OCI layout, docker save), by
//! scripts/build-image.sh, and converted by skopeo.

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use skiff_runtime::{ImageError, ImageStore};

fn base_layer() -> Vec<u8> {
    Layer::new()
        .dir("bin")
        .exec("bin/tool", "#!/bin/sh\necho tool\n")
        .dir("etc")
        .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
        .dir("a")
        .file("a/x", "x")
        .file("a/y", "y")
        .dir("b")
        .file("b/old", "old")
        .dir("b/sub")
        .file("b/sub/deep", "deep")
        .file("c", "c was a file")
        .symlink("etc/link", "/etc/passwd")
        .hardlink("bin/tool2", "bin/tool")
        .finish()
}

fn top_layer() -> Vec<u8> {
    Layer::new()
        .file("a/.wh.x", "")
        .dir("b")
        .file("b/.wh..wh..opq", "")
        .file("b/new", "new")
        .dir("c")
        .file("c/now-a-dir", "")
        .file("etc/passwd", "root:x:0:0::/root:/bin/sh\nuser:x:1:1::/:/bin/sh\n")
        .finish()
}

fn check_unpacked(root: &Path) {
    assert!(!root.join("a/x").exists(), "whiteout a/.wh.x removes a/x");
    assert_eq!(fs::read_to_string(root.join("a/y")).expect("a/y"), "y");
    assert!(!root.join("a/.wh.x").exists(), "whiteout files are not unpacked");
    assert_eq!(dir_entries(&root.join("b")), vec!["new"], "opaque b hides the lower layer's b/old and b/sub");
    assert!(root.join("c").is_dir(), "a directory replaces the lower layer's file c");
    assert!(root.join("c/now-a-dir").is_file());
    assert!(fs::read_to_string(root.join("etc/passwd")).expect("passwd").contains("user:x:1"));
    assert_eq!(fs::read_link(root.join("etc/link")).expect("link").to_str(), Some("/etc/passwd"));
    let t1 = fs::metadata(root.join("bin/tool")).expect("tool");
    let t2 = fs::metadata(root.join("bin/tool2")).expect("tool2");
    assert_eq!(t1.ino(), t2.ino(), "hard link kept");
    assert_eq!(t1.mode() & 0o777, 0o755, "mode kept");
}

fn assert_store_empty(store: &ImageStore) {
    assert!(store.list().expect("list").is_empty(), "no image recorded");
    assert!(dir_entries(&store.dir().join("blobs/sha256")).is_empty(), "no blob stored");
    assert!(dir_entries(&store.dir().join("rootfs")).is_empty(), "no rootfs stored");
    assert!(dir_entries(&store.dir().join("tmp")).is_empty(), "staging cleaned up");
}

#[test]
fn oci_archive_import_list_rootfs_config() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(tmp.path().join("store")).expect("open");
    let layers = vec![base_layer(), top_layer()];
    let archive = tmp.path().join("img.oci.tar");
    let built = write_oci(
        &archive,
        &Oci {
            name: Some("docker.io/skiff/test:1.0".into()),
            config: config_json(&["/bin/tool"], &["a", "b"], &["A=1", "PATH=/bin"], &layers),
            layers,
            gzip_layers: true,
            tamper_layer: false,
        },
    );
    let imported = store.import(&archive).expect("import");
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].manifest_digest, built.manifest_digest);
    assert_eq!(imported[0].references, vec!["docker.io/skiff/test:1.0"]);

    let list = store.list().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].references, vec!["docker.io/skiff/test:1.0"]);
    assert!(list[0].unpacked);
    // Kubernetes normalization: the short name resolves to the same image.
    assert_eq!(store.resolve_digest("skiff/test:1.0").expect("short name"), built.manifest_digest);
    assert_eq!(store.resolve_digest(&built.manifest_digest).expect("by digest"), built.manifest_digest);
    assert!(matches!(store.resolve_digest("skiff/test"), Err(ImageError::NotFound(_))), "no tag means :latest");

    let cfg = store.config("skiff/test:1.0").expect("config");
    assert_eq!(cfg.entrypoint, vec!["/bin/tool"]);
    assert_eq!(cfg.cmd, vec!["a", "b"]);
    assert_eq!(cfg.env, vec!["A=1", "PATH=/bin"]);
    assert_eq!(cfg.working_dir.as_deref(), Some("/srv"));
    assert_eq!(cfg.user.as_deref(), Some("0:0"));
    assert_eq!(cfg.exposed_ports, vec!["8080/tcp"]);

    let root = store.rootfs("skiff/test:1.0").expect("rootfs");
    check_unpacked(&root);

    // Importing again is idempotent; a store opened anew sees the same.
    store.import(&archive).expect("re-import");
    let again = ImageStore::open(store.dir()).expect("reopen");
    assert_eq!(again.list().expect("list").len(), 1);

    // A missing rootfs (removed by hand here) is unpacked again from the stored blobs.
    fs::remove_dir_all(&root).expect("rm rootfs");
    let root2 = store.rootfs("skiff/test:1.0").expect("re-unpack");
    check_unpacked(&root2);
}

#[test]
fn docker_archive_import() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(tmp.path().join("store")).expect("open");
    let layers = vec![base_layer(), top_layer()];
    let archive = tmp.path().join("img.docker.tar");
    let config = config_json(&[], &["/bin/tool"], &[], &layers);
    write_docker(&archive, &["skiff/dock:2", "other"], &config, &layers);
    let imported = store.import(&archive).expect("import");
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].references, vec!["docker.io/skiff/dock:2", "docker.io/library/other:latest"]);
    assert!(store.contains("docker.io/library/other").expect("contains"));
    assert_eq!(store.config("skiff/dock:2").expect("config").cmd, vec!["/bin/tool"]);
    check_unpacked(&store.rootfs("other:latest").expect("rootfs"));
    // The config is stored under its own digest (the docker image ID).
    assert_eq!(store.list().expect("list")[0].config_digest, sha(&config));
}

#[test]
fn digest_mismatch_stores_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(tmp.path().join("store")).expect("open");
    let layers = vec![base_layer()];
    let archive = tmp.path().join("bad.oci.tar");
    write_oci(
        &archive,
        &Oci {
            name: Some("skiff/bad:1".into()),
            config: config_json(&["/bin/tool"], &[], &[], &layers),
            layers,
            gzip_layers: false,
            tamper_layer: true,
        },
    );
    let err = store.import(&archive).expect_err("tampered blob");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert_store_empty(&store);

    // A layer that matches its blob digest but not the config's diff_id.
    let layers = vec![base_layer()];
    let wrong = config_json(&[], &[], &[], &[top_layer()]);
    write_docker(&archive, &["skiff/bad:2"], &wrong, &layers);
    let err = store.import(&archive).expect_err("diff_id mismatch");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("diff_id"), "{err}");
    assert_store_empty(&store);
}

#[test]
fn path_traversal_is_rejected() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(tmp.path().join("store")).expect("open");
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).expect("outside");
    let archive = tmp.path().join("evil.tar");

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dot-dot entry", Layer::new().file("../../escaped", "x").finish()),
        ("dot-dot inside", Layer::new().dir("a").file("a/../../escaped", "x").finish()),
        (
            "absolute symlink then a file through it",
            Layer::new().symlink("esc", outside.to_str().expect("utf8")).file("esc/pwned", "x").finish(),
        ),
        (
            "relative symlink climbing out then a file through it",
            Layer::new().symlink("esc", "../../../../../../../../../../../../").file("esc/pwned", "x").finish(),
        ),
        ("hard link to a file outside", Layer::new().hardlink("h", "../../../../etc/passwd").finish()),
    ];
    for (what, layer) in cases {
        let layers = vec![layer];
        write_docker(&archive, &["skiff/evil:1"], &config_json(&[], &[], &[], &layers), &layers);
        let err = store.import(&archive).expect_err(what);
        assert!(matches!(err, ImageError::UnsafePath(_)), "{what}: {err}");
        assert_store_empty(&store);
        assert!(dir_entries(&outside).is_empty(), "{what}: nothing written outside");
        assert!(!tmp.path().join("escaped").exists() && !Path::new("/escaped").exists(), "{what}");
    }

    // The outer archive itself with a '..' entry.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_entry_type(tar::EntryType::Regular);
    h.as_old_mut().name[..12].copy_from_slice(b"../index.jso");
    h.set_cksum();
    b.append(&h, &b"x"[..]).expect("append");
    fs::write(&archive, b.into_inner().expect("tar")).expect("write");
    let err = store.import(&archive).expect_err("outer ..");
    assert!(matches!(err, ImageError::UnsafePath(_)), "{err}");
    assert_store_empty(&store);
}

#[test]
fn malformed_archives_are_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(tmp.path().join("store")).expect("open");
    let p = tmp.path().join("x.tar");
    fs::write(&p, b"this is not a tar archive at all, not even close........").expect("write");
    let err = store.import(&p).expect_err("garbage");
    assert!(matches!(err, ImageError::Malformed(_)), "{err}");
    fs::write(&p, [0u8; 1024]).expect("write");
    let err = store.import(&p).expect_err("empty tar");
    assert!(err.to_string().contains("neither an OCI image layout"), "{err}");
    let err = store.import(&tmp.path().join("missing.tar")).expect_err("missing");
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
    let err = store.rootfs("Bad//Ref").expect_err("bad ref");
    assert!(matches!(err, ImageError::InvalidReference(_)), "{err}");
    assert_store_empty(&store);
}

#[test]
fn remove_and_gc() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(tmp.path().join("store")).expect("open");
    let shared = base_layer();
    let one = vec![shared.clone()];
    let two = vec![shared.clone(), top_layer()];
    let a1 = tmp.path().join("one.tar");
    let a2 = tmp.path().join("two.tar");
    write_docker(&a1, &["skiff/one:1"], &config_json(&["/bin/tool"], &[], &[], &one), &one);
    write_docker(&a2, &["skiff/two:1", "skiff/two:alias"], &config_json(&["/bin/tool", "2"], &[], &[], &two), &two);
    let m1 = store.import(&a1).expect("one")[0].manifest_digest.clone();
    let m2 = store.import(&a2).expect("two")[0].manifest_digest.clone();
    // one: manifest, config, shared layer; two: manifest, config, (shared), top.
    assert_eq!(dir_entries(&store.dir().join("blobs/sha256")).len(), 6);

    // Nothing unreferenced yet.
    assert_eq!(store.gc(&HashSet::new()).expect("gc").blobs_removed, 0);

    // Removing one of two tags keeps the image.
    assert!(store.remove("skiff/two:alias").expect("rm alias").is_empty());
    assert!(store.contains("skiff/two:1").expect("contains"));
    assert!(matches!(store.remove("skiff/two:alias"), Err(ImageError::NotFound(_))));

    // Removing the last tag removes the image; gc then frees its own blobs, not the shared one.
    let root2 = store.rootfs("skiff/two:1").expect("rootfs two");
    assert_eq!(store.remove("docker.io/skiff/two:1").expect("rm"), vec![m2.clone()]);
    let report = store.gc(&HashSet::from([m2.clone()])).expect("gc keeping two's rootfs (in use)");
    assert_eq!(report.blobs_removed, 3, "two's manifest, config and top layer");
    assert_eq!(report.rootfs_removed, 0, "in use");
    assert!(root2.is_dir());
    let report = store.gc(&HashSet::new()).expect("gc");
    assert_eq!(report.rootfs_removed, 1);
    assert!(!root2.exists());
    assert_eq!(dir_entries(&store.dir().join("blobs/sha256")).len(), 3);
    assert!(store.rootfs("skiff/one:1").expect("one still runs").join("bin/tool").is_file());

    // By digest.
    assert_eq!(store.remove(&m1).expect("rm by digest"), vec![m1]);
    store.gc(&HashSet::new()).expect("gc");
    assert_store_empty(&store);
}

#[test]
fn skiff_echo_image_from_build_script() {
    if !require("busybox-static (/bin/busybox)", Path::new("/bin/busybox").exists()) {
        return;
    }
    let archive = echo_image();
    let tmp = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(tmp.path().join("store")).expect("open");
    let imported = store.import(&archive).expect("import echo");
    assert_eq!(imported[0].references, vec!["docker.io/skiff/echo:1.0"]);
    let cfg = store.config("skiff/echo:1.0").expect("config");
    assert_eq!(cfg.entrypoint, vec!["/usr/local/bin/skiff-echo"]);
    assert_eq!(cfg.exposed_ports, vec!["8080/tcp", "9000/tcp", "9001/udp"]);
    let root = store.rootfs("skiff/echo:1.0").expect("rootfs");
    assert!(root.join("usr/local/bin/skiff-echo").is_file());
    assert_eq!(fs::read_link(root.join("bin/sh")).expect("sh").to_str(), Some("busybox"));
    assert!(root.join("etc/passwd").is_file() && root.join("etc/hostname").is_file());

    // A real docker archive, written by skopeo from the OCI one.
    if !require("skopeo", have("skopeo")) {
        return;
    }
    let docker = tmp.path().join("echo.docker.tar");
    let out = std::process::Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker-archive:{}:skiff/echo-docker:1.0", docker.display()))
        .output()
        .expect("skopeo");
    assert!(out.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
    let imported = store.import(&docker).expect("import docker archive");
    assert_eq!(imported[0].references, vec!["docker.io/skiff/echo-docker:1.0"]);
    let root = store.rootfs("skiff/echo-docker:1.0").expect("rootfs");
    assert!(root.join("usr/local/bin/skiff-echo").is_file());
}
