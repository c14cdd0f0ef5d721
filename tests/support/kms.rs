//! AWS KMS for the system tests: moto's server on a loopback port, and a loopback TCP proxy in
//! front of it that can forward, refuse connections (an outage), or accept and never answer (a
//! hung KMS), and that records which KMS actions went through it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const REGION: &str = "us-east-1";

/// The YAML of the Immuta documentation's second shape: KMS key `key` in [`REGION`], reached at
/// `endpoint` with explicit credentials.
pub fn kms_yaml(key: &str, endpoint: &str, access_key: &str, secret: &str) -> String {
    format!(
        "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    keyId: {key}\n    region: {REGION}\n    \
         extraKmsConfig:\n      endpoint: {endpoint}\n      credentials:\n        accessKeyId: {access_key}\n        \
         secretAccessKey: {secret}\n"
    )
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A port for moto. The proxies and the clients take ephemeral ports, which Linux hands out from
/// 32768 up; moto's come from below that, each once per test process (tests run in threads of
/// one process, test binaries one after another), so no other test can take a port between the
/// check here and moto binding it.
fn moto_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 100) as u16 * 100;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 100;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// moto's server, stopped when dropped.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Starts moto; with `no_auth_actions`, IAM is enforced after that many requests.
    pub fn start(no_auth_actions: Option<u32>) -> Moto {
        let port = moto_port();
        let mut cmd = Command::new(repo().join(".venv/bin/moto_server"));
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some(n) = no_auth_actions {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        let child = cmd.spawn().expect("moto_server (make prereqs installs it in .venv)");
        let mut moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(120);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(moto.child.try_wait().unwrap().is_none(), "moto exited before it listened");
            assert!(Instant::now() < deadline, "moto did not start");
            thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs tests/kms/fixture.py against this moto and returns its output.
    pub fn fixture(&self, args: &[&str]) -> String {
        let out = Command::new(repo().join(".venv/bin/python"))
            .arg(repo().join("tests/kms/fixture.py"))
            .arg(self.endpoint())
            .args(args)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        assert!(out.status.success(), "fixture {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Mode {
    Forward = 0,
    /// Close every connection at once: KMS is unreachable.
    Refuse = 1,
    /// Accept and never answer: a hung KMS.
    Blackhole = 2,
    /// Answer every request with KMS's ThrottlingException.
    Throttle = 3,
    /// Answer every request with the InvalidSignatureException AWS sends, whose message quotes
    /// the canonical request, session token header included.
    BadSignature = 4,
}

/// A loopback TCP proxy in front of moto.
pub struct Proxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    actions: Arc<Mutex<Vec<String>>>,
    headers: Arc<Mutex<Vec<String>>>,
    /// Key ARNs and aliases that KMS treats as pending deletion (see [`Proxy::schedule_deletion`]).
    deleted: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            port,
            mode: Arc::new(AtomicU8::new(Mode::Forward as u8)),
            stop: Arc::new(AtomicBool::new(false)),
            actions: Arc::new(Mutex::new(Vec::new())),
            headers: Arc::new(Mutex::new(Vec::new())),
            deleted: Arc::new(Mutex::new(Vec::new())),
        };
        let (mode, stop, actions) = (proxy.mode.clone(), proxy.stop.clone(), proxy.actions.clone());
        let (headers, deleted) = (proxy.headers.clone(), proxy.deleted.clone());
        thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        match mode.load(Ordering::Relaxed) {
                            m if m == Mode::Refuse as u8 => drop(client),
                            m if m == Mode::Blackhole as u8 => held.push(client),
                            m if m == Mode::Throttle as u8 || m == Mode::BadSignature as u8 => {
                                thread::spawn(move || answer_with_error(client, m == Mode::Throttle as u8));
                            }
                            _ => {
                                let seen = Seen {
                                    actions: actions.clone(),
                                    headers: headers.clone(),
                                    deleted: deleted.clone(),
                                };
                                let mode = mode.clone();
                                thread::spawn(move || forward(client, upstream, mode, seen));
                            }
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
                if mode.load(Ordering::Relaxed) != Mode::Blackhole as u8 {
                    held.clear();
                }
            }
        });
        proxy
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    /// From now on, every request that names `names` (a key's ARN, its alias) is answered as KMS
    /// answers for a key scheduled for deletion (`KMSInvalidStateException`), as when a tenant
    /// deletes its own key; moto itself goes on using a key in that state. Requests are then
    /// forwarded whole, one at a time, to be read first.
    pub fn schedule_deletion(&self, names: &[&str]) {
        self.deleted.lock().unwrap().extend(names.iter().map(|n| n.to_string()));
    }

    /// The `X-Amz-Target` of every request forwarded so far (e.g. `TrentService.Decrypt`).
    pub fn actions(&self) -> Vec<String> {
        self.actions.lock().unwrap().clone()
    }

    /// The header names (lower case) of the requests forwarded so far, each once.
    pub fn header_names(&self) -> Vec<String> {
        self.headers.lock().unwrap().clone()
    }
}

/// What the proxy records of the requests it forwards.
#[derive(Clone)]
struct Seen {
    actions: Arc<Mutex<Vec<String>>>,
    headers: Arc<Mutex<Vec<String>>>,
    deleted: Arc<Mutex<Vec<String>>>,
}

/// The length of the first whole HTTP request in `pending` (headers and `Content-Length` bytes
/// of body), if it is all there.
fn whole_request(pending: &[u8]) -> Option<usize> {
    let end = pending.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let headers = String::from_utf8_lossy(&pending[..end]);
    let length = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>())
        })
        .map_or(0, |v| v.expect("a Content-Length"));
    (pending.len() >= end + length).then_some(end + length)
}

/// KMS's answer to a request that names a key pending deletion.
fn pending_deletion_response(key: &str) -> String {
    let body = format!(r#"{{"__type":"KMSInvalidStateException","message":"{key} is pending deletion."}}"#);
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads one request and answers it as KMS does when it throttles, or when the signature does
/// not match (quoting the canonical request, as AWS does).
fn answer_with_error(mut client: TcpStream, throttle: bool) {
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16384];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let body = if throttle {
        r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.to_owned()
    } else {
        let request = String::from_utf8_lossy(&seen);
        let token = request
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("x-amz-security-token:"))
            .map(|l| l["x-amz-security-token:".len()..].trim().to_owned())
            .unwrap_or_default();
        format!(
            r#"{{"__type":"InvalidSignatureException","message":"The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.\n\nThe Canonical String for this request should have been\n'POST\n/\n\nhost:kms\nx-amz-security-token:{token}\n'"}}"#
        )
    };
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(response.as_bytes());
}

fn forward(client: TcpStream, upstream: u16, mode: Arc<AtomicU8>, seen: Seen) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
    // `record`: the client's side, whose requests are recorded (and, once keys are deleted,
    // read whole and answered here when they name one: `reply` is the client).
    let pump = |mut from: TcpStream, mut to: TcpStream, record: bool, mode: Arc<AtomicU8>, seen: Seen| {
        from.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut reply = if record { Some(from.try_clone().unwrap()) } else { None };
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            if mode.load(Ordering::Relaxed) != Mode::Forward as u8 {
                break;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if record {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        for line in text.lines() {
                            let lower = line.to_ascii_lowercase();
                            if lower.starts_with("x-amz-target:") {
                                seen.actions
                                    .lock()
                                    .unwrap()
                                    .push(line["x-amz-target:".len()..].trim().to_owned());
                            }
                            let header = lower.split_once(':').filter(|(n, _)| {
                                !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                            });
                            if let Some((name, _)) = header {
                                let mut headers = seen.headers.lock().unwrap();
                                if !headers.iter().any(|h| h == name) {
                                    headers.push(name.to_owned());
                                }
                            }
                        }
                    }
                    let deleted = seen.deleted.lock().unwrap().clone();
                    if deleted.is_empty() || reply.is_none() {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        continue;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    let mut failed = false;
                    while let Some(len) = whole_request(&pending) {
                        let request: Vec<u8> = pending.drain(..len).collect();
                        let text = String::from_utf8_lossy(&request);
                        let written = match deleted.iter().find(|k| text.contains(k.as_str())) {
                            Some(key) => reply
                                .as_mut()
                                .expect("the client's side")
                                .write_all(pending_deletion_response(key).as_bytes()),
                            None => to.write_all(&request),
                        };
                        failed |= written.is_err();
                    }
                    if failed {
                        break;
                    }
                }
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    };
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (m2, seen2) = (mode.clone(), seen.clone());
    let up = thread::spawn(move || pump(c2, s2, true, m2, seen2));
    pump(server, client, false, mode, seen);
    let _ = up.join();
}
