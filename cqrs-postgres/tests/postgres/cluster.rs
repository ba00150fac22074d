//! A PostgreSQL server of a test's own, for tests that crash it: a new cluster (`initdb`) in a
//! temporary directory, on a free port, started and stopped with `pg_ctl`. Never the shared
//! server at `DATABASE_URL`. The binaries come from `pg_config --bindir`; as root, they run as the
//! `postgres` user (PostgreSQL refuses to run as root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster; dropping it stops the server and removes its directory.
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    /// Creates and starts a cluster. `settings` are extra `name = value` lines of its
    /// configuration.
    pub fn start(settings: &[&str]) -> Self {
        let bin = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("pg_config (PostgreSQL's server binaries) must be installed for this test");
        assert!(bin.status.success(), "pg_config --bindir failed");
        let bin = PathBuf::from(String::from_utf8(bin.stdout).unwrap().trim());
        let root = Command::new("id").arg("-u").output().unwrap();
        let as_postgres = String::from_utf8_lossy(&root.stdout).trim() == "0";
        let dir = std::env::temp_dir().join(format!("cqrs-pg-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir(&dir).unwrap();
        if as_postgres {
            let chown = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(chown.success(), "chown of {} failed", dir.display());
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self {
            bin,
            dir,
            port,
            as_postgres,
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            cluster.dir.display()
        );
        for setting in settings {
            conf.push_str(setting);
            conf.push('\n');
        }
        std::fs::write(Path::new(&data).join("postgresql.auto.conf"), conf).unwrap();
        cluster.pg_ctl_start();
        cluster
    }

    /// The URL of database `postgres` on this server.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Kills the server without a shutdown checkpoint (`pg_ctl stop -m immediate`): what a crash
    /// leaves, recovered from the WAL on the next start.
    pub fn crash(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    /// Starts the server again (after [`Cluster::crash`]), waiting until it accepts connections.
    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    fn pg_ctl_start(&self) {
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log.display().to_string(),
                "-w",
                "start",
            ],
        );
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let status = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
        } else {
            Command::new(&path)
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
        }
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
        assert!(
            status.success(),
            "{program} {args:?} failed ({status}); see {}",
            self.dir.join("server.log").display()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .output()
        } else {
            Command::new(&path).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
