//! A fresh appliance for a bench: `lifeboat serve` on embedded defaults plus the bench's own
//! settings, on loopback ports it picks, with a local blob folder, stopped when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

pub struct Appliance {
    pub server: Child,
    /// The replication listener, `HOST:PORT`.
    pub addr: String,
    /// The appliance's certificate (PEM path), for the agent's `--ca`.
    pub cert: String,
    pub pass: PathBuf,
}

impl Appliance {
    /// Starts `bin serve` with its data under `dir` (blob store in `dir/blob`) and `extra` TOML
    /// appended to the config; returns it with its ready line.
    pub fn start(bin: &Path, dir: &Path, extra: &str) -> anyhow::Result<(Self, serde_json::Value)> {
        std::fs::create_dir_all(dir)?;
        let pass = dir.join("passphrase");
        std::fs::write(&pass, "bench-passphrase\n")?;
        let config = dir.join("lifeboat.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\n[listen]\nmanagement = \"127.0.0.1:0\"\nreplication = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\nnbd = \"127.0.0.1:0\"\n[security]\npassphrase_file = \"{}\"\n[blob]\nurl = \"file://{}\"\n{extra}",
                dir.join("data").display(),
                pass.display(),
                dir.join("blob").display()
            ),
        )?;
        let mut server = Command::new(bin)
            .args(["serve", "--json", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(server.stdout.take().context("stdout")?).read_line(&mut line)?;
        let parsed = (|| {
            let ready: serde_json::Value =
                serde_json::from_str(&line).with_context(|| format!("ready line {line:?}"))?;
            let field = |k: &str| ready[k].as_str().map(str::to_string).context("ready line field");
            let (addr, cert) = (field("replication")?, field("cert")?);
            anyhow::Ok((ready, addr, cert))
        })();
        match parsed {
            Ok((ready, addr, cert)) => Ok((
                Self {
                    server,
                    addr,
                    cert,
                    pass,
                },
                ready,
            )),
            Err(e) => {
                let _ = server.kill();
                let _ = server.wait();
                Err(e)
            }
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
