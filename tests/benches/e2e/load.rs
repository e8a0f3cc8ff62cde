//! The load: iperf3 (UDP small packets at a fixed rate, TCP bulk) and
//! nginx answered by wrk over short connections (`Connection: close`), each
//! server in the internet namespace and each client in the client
//! namespace. Every process is stopped on drop.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use egress_tests::{netns::NetNs, tempdir::TempDir};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::policies::{HTTP_PORT, IPERF_PORT, SERVER};

/// A child process, SIGTERMed (then SIGKILLed) on drop.
pub struct Process {
    child: Child,
    what: String,
}

impl Process {
    fn spawn(mut cmd: Command, what: &str) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Self {
            child,
            what: what.to_owned(),
        })
    }

    /// Wait for a client to finish; its standard output, or an error with
    /// its standard error when it failed.
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{} did not finish within {timeout:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut out = String::new();
        let mut err = String::new();
        use std::io::Read as _;
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = self.child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!(
                "{} failed ({status}): {}{}",
                self.what,
                err.trim(),
                out.trim()
            );
        }
        Ok(out)
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait until something in `ns` listens on TCP `port`.
fn wait_listening(ns: &NetNs, port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = format!(":{port} ");
    loop {
        let out = ns.exec("ss", &["-Hltn"])?;
        if out.lines().any(|l| l.contains(&needle)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what} is not listening on port {port} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The iperf3 and nginx servers.
pub struct Servers {
    _iperf: Process,
    _nginx: Process,
    _dir: TempDir,
}

impl Servers {
    pub fn start(inet: &NetNs) -> anyhow::Result<Self> {
        let mut cmd = inet.command("iperf3");
        cmd.args([
            "-s",
            "-B",
            &SERVER.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
        ]);
        let iperf = Process::spawn(cmd, "iperf3 server")?;
        let dir = TempDir::new("nginx");
        let d = dir.path().display();
        // Short connections: the server closes after each answer.
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  keepalive_timeout 0;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             \x20 server {{\n    listen {SERVER}:{HTTP_PORT} backlog=4096;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
        );
        let conf_path = dir.write("nginx.conf", &conf);
        let mut cmd = inet.command("nginx");
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path);
        let nginx = Process::spawn(cmd, "nginx")?;
        wait_listening(inet, IPERF_PORT, "iperf3")?;
        wait_listening(inet, HTTP_PORT, "nginx")?;
        Ok(Self {
            _iperf: iperf,
            _nginx: nginx,
            _dir: dir,
        })
    }
}

/// One load run of `seconds`.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// iperf3 UDP, 64-byte payloads, `pps` datagrams per second (0: as fast
    /// as iperf3 sends).
    Udp { pps: u64 },
    /// iperf3 TCP, one stream, as fast as it goes.
    Tcp,
    /// wrk, `Connection: close`: one TCP connection per request.
    Connections,
}

impl Load {
    pub fn start(self, client: &NetNs, seconds: f64) -> anyhow::Result<Process> {
        let secs = seconds.ceil().max(1.0) as u64;
        match self {
            Load::Udp { pps } => {
                let mut cmd = client.command("iperf3");
                // iperf3 counts payload bits.
                let rate = if pps == 0 {
                    "0".to_owned()
                } else {
                    (pps * 64 * 8).to_string()
                };
                cmd.args([
                    "-c",
                    &SERVER.to_string(),
                    "-p",
                    &IPERF_PORT.to_string(),
                    "-u",
                    "-l",
                    "64",
                    "-b",
                    &rate,
                    "-t",
                    &secs.to_string(),
                ]);
                Process::spawn(cmd, "iperf3 UDP client")
            }
            Load::Tcp => {
                let mut cmd = client.command("iperf3");
                cmd.args([
                    "-c",
                    &SERVER.to_string(),
                    "-p",
                    &IPERF_PORT.to_string(),
                    "-t",
                    &secs.to_string(),
                ]);
                Process::spawn(cmd, "iperf3 TCP client")
            }
            Load::Connections => {
                let mut cmd = client.command("wrk");
                cmd.args([
                    "-t",
                    "1",
                    "-c",
                    "32",
                    "-d",
                    &format!("{secs}s"),
                    "-H",
                    "Connection: close",
                    &format!("http://{SERVER}:{HTTP_PORT}/"),
                ]);
                Process::spawn(cmd, "wrk")
            }
        }
    }
}
