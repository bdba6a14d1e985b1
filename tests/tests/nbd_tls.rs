//! NBD over TLS (STARTTLS) with real clients: nbdinfo, nbdcopy, qemu-img and qemu-io with
//! x509 certificates; refusals of a certificate from another CA, an expired one and a plain
//! client; SIGHUP re-reading the certificates while a session stays up.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tests::pki::{client_dir, server_dir, Ca};
use tests::{ok, require, run, scratch, Daemon};

/// A server with certificates from `ca`, requiring client certificates from it too.
struct Setup {
    dir: PathBuf,
    ca: Ca,
    server: PathBuf,
    /// A client directory with a good certificate.
    good: PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = scratch(tag);
    let ca = Ca::new("blockd test CA");
    let server = server_dir(&dir.join("server"), &ca.server(), &ca);
    let good = client_dir(&dir.join("good"), &ca, &ca.client(false));
    Setup {
        dir,
        ca,
        server,
        good,
    }
}

fn tls_args(server: &Path, mode: &str) -> Vec<String> {
    let f = |n: &str| server.join(n).display().to_string();
    vec![
        "--tls-cert".into(),
        f("server-cert.pem"),
        "--tls-key".into(),
        f("server-key.pem"),
        "--tls-ca".into(),
        f("ca-cert.pem"),
        "--tls".into(),
        mode.into(),
    ]
}

fn start(s: &Setup, mode: &str, extra: &[&str]) -> Daemon {
    let mut args = tls_args(&s.server, mode);
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(&args)
}

fn nbds(d: &Daemon, volume: &str, certs: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/{volume}?tls-certificates={}",
        d.port,
        certs.display()
    )
}

/// qemu's arguments for an NBD image over TLS with the certificates in `certs`.
fn qemu_tls(d: &Daemon, volume: &str, certs: &Path) -> [String; 4] {
    [
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            certs.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,host=127.0.0.1,port={},export={volume},tls-creds=tls0",
            d.port
        ),
    ]
}

fn stderr_of(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "{cmd:?} was not refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn x509_with_nbdinfo_nbdcopy_qemu_img_and_qemu_io() {
    for tool in ["nbdinfo", "nbdcopy", "qemu-img", "qemu-io"] {
        require(tool);
    }
    let s = setup("tls-clients");
    let d = start(&s, "require", &["--volume", "disk0=64M"]);

    let info = ok(Command::new("nbdinfo").arg(nbds(&d, "disk0", &s.good)));
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains("export-size: 67108864"), "{info}");

    // nbdcopy in and out over TLS, every byte compared.
    let src = s.dir.join("src.img");
    let back = s.dir.join("back.img");
    ok(Command::new("sh")
        .arg("-c")
        .arg(format!("head -c 64M /dev/urandom > {}", src.display())));
    ok(Command::new("nbdcopy")
        .arg(&src)
        .arg(nbds(&d, "disk0", &s.good)));
    ok(Command::new("nbdcopy")
        .arg(nbds(&d, "disk0", &s.good))
        .arg(&back));
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "nbdcopy over TLS: the copy back differs"
    );

    // qemu-io writes a pattern, a second qemu-io reads it back; qemu-img sees the size.
    let qemu = qemu_tls(&d, "disk0", &s.good);
    ok(Command::new("qemu-io")
        .args(&qemu)
        .args(["-c", "write -P 0x5a 1M 2M", "-c", "flush"]));
    let out = ok(Command::new("qemu-io")
        .args(&qemu)
        .args(["-c", "read -P 0x5a 1M 2M"]));
    assert!(out.contains("read 2097152/2097152"), "{out}");
    // qemu-io fails on a mismatch: the bytes after the pattern are not the pattern.
    let out = run(Command::new("qemu-io")
        .args(&qemu)
        .args(["-c", "read -P 0x5a 3M 4k"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Pattern verification failed"), "{text}");
    let img = ok(Command::new("qemu-img").arg("info").args(&qemu));
    assert!(img.contains("virtual size: 64 MiB"), "{img}");
    assert!(d
        .metrics()
        .contains("blockd_nbd_tls_handshakes_total{result=\"ok\"}"));
}

#[test]
fn wrong_ca_expired_and_plain_clients_are_refused_and_the_server_keeps_serving() {
    require("nbdinfo");
    require("qemu-img");
    let s = setup("tls-refusals");
    let other = Ca::new("some other CA");
    let wrong = client_dir(&s.dir.join("wrong"), &s.ca, &other.client(false));
    let expired = client_dir(&s.dir.join("expired"), &s.ca, &s.ca.client(true));
    let d = start(&s, "require", &["--volume", "disk0=16M"]);

    let e = stderr_of(Command::new("nbdinfo").arg(nbds(&d, "disk0", &wrong)));
    assert!(e.contains("gnutls") || e.contains("TLS"), "{e}");
    let e = stderr_of(Command::new("nbdinfo").arg(nbds(&d, "disk0", &expired)));
    assert!(e.contains("gnutls") || e.contains("TLS"), "{e}");
    // A plain client: qemu prints the server's reason.
    let e = stderr_of(
        Command::new("qemu-img").args(["info", &format!("nbd://127.0.0.1:{}/disk0", d.port)]),
    );
    assert!(e.contains("requires TLS"), "{e}");
    let e = stderr_of(Command::new("nbdinfo").arg(d.uri("disk0")));
    assert!(!e.is_empty());
    // A client without a certificate at all.
    let anon = s.dir.join("anon");
    std::fs::create_dir_all(&anon).unwrap();
    std::fs::copy(s.good.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    stderr_of(Command::new("nbdinfo").arg(nbds(&d, "disk0", &anon)));

    let info = ok(Command::new("nbdinfo").arg(nbds(&d, "disk0", &s.good)));
    assert!(info.contains("with TLS"), "{info}");
    let metrics = d.metrics();
    assert!(
        metrics.contains("blockd_nbd_tls_handshakes_total{result=\"failed\"} 3"),
        "{metrics}"
    );
    let log = d.log();
    assert!(log.contains("TLS handshake failed"), "{log}");
}

#[test]
fn allow_serves_plain_and_tls_clients() {
    require("nbdinfo");
    let s = setup("tls-allow");
    let d = start(&s, "allow", &["--volume", "disk0=16M"]);
    let plain = ok(Command::new("nbdinfo").arg(d.uri("disk0")));
    assert!(plain.contains("without TLS"), "{plain}");
    let tls = ok(Command::new("nbdinfo").arg(nbds(&d, "disk0", &s.good)));
    assert!(tls.contains("with TLS"), "{tls}");
}

#[test]
fn sighup_reloads_certificates_without_dropping_sessions() {
    let s = setup("tls-reload");
    let d = start(&s, "require", &["--volume", "disk0=16M"]);
    let py = "/usr/bin/python3";
    let mut session = Command::new(py)
        .arg(tests::workspace_root().join("tests/py/tls_session.py"))
        .arg(d.uri("disk0").replacen("nbd://", "nbds://", 1))
        .arg(&s.good)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(session.stdout.take().unwrap()).lines();
    let first = lines
        .next()
        .map(|l| l.unwrap_or_default())
        .unwrap_or_default();
    assert_eq!(first, "ready", "session did not start");

    // New credentials from a new CA; SIGHUP makes new handshakes use them.
    let new_ca = Ca::new("blockd test CA, renewed");
    server_dir(&s.server, &new_ca.server(), &new_ca);
    let renewed = client_dir(&s.dir.join("renewed"), &new_ca, &new_ca.client(false));
    ok(Command::new("kill").args(["-HUP", &d.pid().to_string()]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !d.log().contains("TLS certificates reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload:\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    session.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let status = session.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(session.stderr.as_mut().unwrap(), &mut err).unwrap();
    let last = lines
        .next()
        .map(|l| l.unwrap_or_default())
        .unwrap_or_default();
    assert!(
        status.success() && last == "still served",
        "the session did not survive the reload: {err}"
    );
    // New connections now need the new CA.
    stderr_of(Command::new("nbdinfo").arg(nbds(&d, "disk0", &s.good)));
    let info = ok(Command::new("nbdinfo").arg(nbds(&d, "disk0", &renewed)));
    assert!(info.contains("with TLS"), "{info}");

    // A broken file on reload keeps the working certificates.
    std::fs::write(s.server.join("server-cert.pem"), "not a certificate").unwrap();
    ok(Command::new("kill").args(["-HUP", &d.pid().to_string()]));
    while !d.log().contains("TLS reload failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed reload:\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ok(Command::new("nbdinfo").arg(nbds(&d, "disk0", &renewed)));
}
