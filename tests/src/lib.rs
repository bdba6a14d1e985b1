//! Harness for black-box tests: starts real `blockd` processes on loopback (each on its own
//! port and data directory), runs `volctl` and real NBD clients against them, and stops them
//! with SIGTERM (checking the exit status) when dropped.
//!
//! Client tools are required, not optional: a missing `qemu-img` fails the test with a hint,
//! because a test that silently skips cannot fail. `scripts/test` installs them.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod pki;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` first (scripts/test does)",
        path.display()
    );
    path
}

/// Panics with an install hint unless `tool` is on PATH.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{tool} is not installed; run scripts/test (it installs the Debian packages the tests need)");
}

/// A fresh scratch directory on the real disk under the target directory.
pub fn scratch(tag: &str) -> PathBuf {
    let dir = bin_dir().join("test-scratch").join(format!(
        "{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a command, returning its output; panics if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics with its output unless it succeeds; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Daemon {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub port: u16,
    /// The loopback address blockd's NBD listener is on.
    pub host: String,
    log: PathBuf,
}

/// How to start a daemon, beyond its arguments.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// Loopback address for the NBD listener (give each test server its own 127.0.0.x).
    pub host: &'a str,
    /// Shell commands run before blockd is exec'd in the same shell (`umask 000`,
    /// `ulimit -f N`, `trap '' XFSZ`), so blockd inherits what they set.
    pub shell: Option<&'a str>,
}

impl Default for Launch<'_> {
    fn default() -> Self {
        Launch {
            host: "127.0.0.1",
            shell: None,
        }
    }
}

impl Daemon {
    /// Starts blockd on a fresh data directory with extra arguments.
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_in(scratch("blockd"), args)
    }

    /// Starts blockd on `data_dir` (which may hold an earlier daemon's catalog).
    pub fn start_in(data_dir: PathBuf, args: &[&str]) -> Daemon {
        Self::launch(data_dir, Launch::default(), args)
    }

    /// Starts blockd on `data_dir` as `how` says.
    pub fn launch(data_dir: PathBuf, how: Launch<'_>, args: &[&str]) -> Daemon {
        let log = data_dir.with_extension("log");
        let child = Self::spawn(&data_dir, &log, how, args);
        let mut d = Daemon {
            child: Some(child),
            data_dir,
            port: 0,
            host: how.host.to_string(),
            log,
        };
        d.wait_ready();
        d
    }

    fn spawn(data_dir: &Path, log: &Path, how: Launch<'_>, args: &[&str]) -> Child {
        let logfile = std::fs::File::create(log).unwrap();
        let mut cmd = match how.shell {
            None => Command::new(bin("blockd")),
            Some(prefix) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("{prefix}; exec \"$0\" \"$@\""))
                    .arg(bin("blockd"));
                sh
            }
        };
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", &format!("{}:0", how.host), "--log", "info"])
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .expect("spawn blockd")
    }

    /// Starts blockd expecting it to fail; returns its exit status and log.
    pub fn start_failing(data_dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
        let log = data_dir.with_extension("fail.log");
        let mut child = Self::spawn(data_dir, &log, Launch::default(), args);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, std::fs::read_to_string(&log).unwrap_or_default());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "blockd did not exit; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("blockd exited at start-up ({status}):\n{}", self.log());
            }
            if self.data_dir.join("admin.sock").exists() {
                let out = run(self.volctl_cmd().args(["--json", "status"]));
                if out.status.success() {
                    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    let addr = status["nbd_tcp"][0].as_str().unwrap();
                    self.port = addr.rsplit(':').next().unwrap().parse().unwrap();
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "blockd not ready in 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}:{}/{volume}", self.host, self.port)
    }

    /// Kills blockd with SIGKILL (by its PID) as a crash would, waits for it, and returns
    /// its data directory, left as the crash left it.
    pub fn kill9(mut self) -> PathBuf {
        let mut child = self.child.take().expect("already stopped");
        let _ = Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status();
        let _ = child.wait();
        let dir = self.data_dir.clone();
        std::mem::forget(self);
        dir
    }

    /// The component file of the volume with catalog id `id` (`volumes/vol-<id>-<random>.data`).
    pub fn volume_file(&self, id: u64) -> PathBuf {
        volume_file(&self.data_dir, id)
    }

    pub fn unix_uri(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.data_dir.join("nbd.sock").display()
        )
    }

    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }

    pub fn volctl_cmd(&self) -> Command {
        let mut cmd = Command::new(bin("volctl"));
        cmd.arg("--socket").arg(self.socket());
        cmd
    }

    /// Runs volctl and returns its output.
    pub fn volctl(&self, args: &[&str]) -> Output {
        run(self.volctl_cmd().args(args))
    }

    /// Runs volctl, asserting success; returns stdout.
    pub fn volctl_ok(&self, args: &[&str]) -> String {
        ok(self.volctl_cmd().args(args))
    }

    pub fn create(&self, name: &str, size: &str) {
        self.volctl_ok(&["volume", "create", name, size]);
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics(&self) -> String {
        ok(Command::new("curl")
            .args(["-sf", "--unix-socket"])
            .arg(self.socket())
            .arg("http://blockd/metrics"))
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("blockd did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test already failed: report that, not a second panic from here.
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("blockd log ({}):\n{}", self.log.display(), self.log());
            }
            return;
        }
        if self.child.is_some() {
            let status = self.stop();
            if !std::thread::panicking() {
                assert!(
                    status.success(),
                    "blockd exited with {status} on SIGTERM:\n{}",
                    self.log()
                );
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// The component file of volume `id` in `data_dir` (names carry a random part; an older
/// blockd's `vol-<id>.data` is found too).
pub fn volume_file(data_dir: &Path, id: u64) -> PathBuf {
    let prefix = format!("vol-{id}-");
    let dir = data_dir.join("volumes");
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) || n == format!("vol-{id}.data"))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "volume {id}'s file in {}: {found:?}",
        dir.display()
    );
    found[0].clone()
}

/// `nbdsh` under Debian's python3 (the first `python3` on PATH may lack the nbd module).
pub fn nbdsh() -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut cmd = Command::new("/usr/bin/nbdsh");
    cmd.env("PATH", format!("/usr/bin:{path}"));
    cmd
}

/// The workspace root (for scripts under `tests/py`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs one of the Python checks under `tests/py` with Debian's python3 (where libnbd
/// imports), asserting it passes; returns its output.
pub fn python(script: &str, args: &[&str]) -> String {
    let py = "/usr/bin/python3";
    assert!(Path::new(py).exists(), "{py} missing; run scripts/test");
    let out = run(Command::new(py)
        .arg(workspace_root().join("tests/py").join(script))
        .args(args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}
