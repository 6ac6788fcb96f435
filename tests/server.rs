//! `firstrt serve` as a client sees it, on 127.0.0.1 only: OpenAI's own Python client against
//! the server (answers equal to `firstrt run --chat`, streaming, concurrent requests with
//! different plans against the transformers fixture, a client leaving mid-stream), a bounded
//! load with memory back to idle, bad requests of every kind answered with their 4xx while the
//! server keeps serving, and a graceful SIGTERM.
//!
//! The Python client lives in a virtual environment that `scripts/setup-openai-client.sh`
//! makes (`scripts/test.sh` runs it); `$FIRSTRT_OPENAI_PYTHON` points at another one.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cases;
use firstrt::testdata::{TempDir, cache_dir, fixtures_dir, model_path};
use serde_json::{Value, json};

const MODEL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";

fn firstrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_firstrt"))
}

/// A `firstrt serve` child on a free port of 127.0.0.1, killed when dropped.
struct Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    addr: String,
    stderr: PathBuf,
    _dir: TempDir,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let dir = TempDir::new("serve");
        let stderr = dir.join("stderr.txt");
        let mut child = firstrt()
            .arg("serve")
            .arg("-m")
            .arg(model_path())
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting firstrt serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let Some(addr) = line.trim().strip_prefix("listening on http://").map(str::to_string) else {
            let _ = child.kill();
            panic!("firstrt serve did not start: {}", std::fs::read_to_string(&stderr).unwrap_or_default());
        };
        Server { child, addr, stderr, _dir: dir }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// One request; the status and the body.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        http(&self.addr, method, path, headers, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 exchange over a fresh connection (`Connection: close`): status and body.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connecting to the server");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A body the server refuses early may not be read: the write can fail once it has answered.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    // A server that refused a large body may reset the connection after answering.
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

/// The virtual environment's python with `openai` installed.
fn openai_python() -> PathBuf {
    let python = std::env::var_os("FIRSTRT_OPENAI_PYTHON").map_or_else(|| cache_dir().join("venv-openai/bin/python"), PathBuf::from);
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-openai-client.sh (scripts/test.sh does) to install OpenAI's Python client",
        python.display()
    );
    python
}

fn run_python(args: &[&str], server: &Server) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(openai_python()).arg(script).args(args).output().expect("running python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai_client.py {:?} failed:\n{}\nserver stderr:\n{}",
        args.first(),
        String::from_utf8_lossy(&out.stderr),
        server.stderr()
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("openai_client.py printed no JSON ({e}): {stdout}"))
}

/// What `firstrt run --chat` answers (greedy), as the server must.
fn run_chat(question: &str, max_tokens: usize) -> Value {
    let out = firstrt()
        .arg("run")
        .arg("-m")
        .arg(model_path())
        .args(["--chat", "-p", question, "--temperature", "0", "--max-tokens", &max_tokens.to_string(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

/// The real `openai` client: the chat answer equals `firstrt run --chat`'s, whole and streamed;
/// four requests at once, two with different skip plans and long prompts (prefilled in chunks
/// of 64 tokens) and two under the full model (whose decode steps the scheduler batches), each
/// get the fixture's ids for their plan; a client that leaves mid-stream gives its GPU memory
/// back.
#[test]
fn openai_client_chat_stream_and_plans() {
    let question = "What is the capital of France? Answer in one sentence.";
    let expected = run_chat(question, 24);
    let finish = match expected["stop_reason"].as_str().unwrap() {
        "max_tokens" | "context_full" => "length",
        _ => "stop",
    };
    let plans: Vec<Value> = cases()
        .into_iter()
        .filter(|c| {
            !c.lora
                && ["long_story_skip_12_13_14", "chat_multiturn_skip_5_9_17_21_25", "short8_raw", "chat_user_only"]
                    .contains(&c.name.as_str())
        })
        .map(|c| json!({"name": c.name, "prompt_ids": c.prompt_ids, "skip_layers": c.skip_layers, "expected_ids": &c.greedy_ids[..12]}))
        .collect();
    assert_eq!(plans.len(), 4);
    // Prompts over 64 tokens (two of the four below) are prefilled in chunks.
    let server = Server::start(&["--max-concurrent", "4", "--prefill-chunk", "64"]);
    let dir = TempDir::new("serve-spec");
    let spec = json!({
        "url": server.url(),
        "model": MODEL_ID,
        "chat": {
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 24,
            "expected_text": expected["text"],
            "expected_prompt_tokens": expected["prompt_ids"].as_array().unwrap().len(),
            "expected_completion_tokens": expected["generated_ids"].as_array().unwrap().len(),
            "expected_finish": finish,
        },
        "plans": plans,
    });
    let path = dir.join("spec.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    let out = run_python(&["check", path.to_str().unwrap()], &server);
    assert_eq!(out["chat_text"], expected["text"]);
}

/// 200 requests, 32 at once, against room for 4 running and 8 waiting: each is answered with 200
/// or an explicit 429/503, none is lost or hangs, the server stays healthy, and its GPU bytes
/// and resident memory come back to their idle level.
#[test]
fn bounded_load_answers_every_request() {
    let server = Server::start(&["--max-concurrent", "4", "--queue", "8", "--ctx", "256"]);
    // The start-up notice says how long the first start takes on this adapter: serve prepares
    // more than a run does (prefills of 1 to 128 tokens).
    let ctx = firstrt::gpu::GpuContext::new(&Default::default()).unwrap();
    let wait = if ctx.is_cpu() { "up to two minutes on a CPU driver" } else { "a few seconds" };
    let notice = format!("preparing the kernels (the first time on this machine: {wait}");
    assert!(server.stderr().contains(&notice), "{}", server.stderr());
    let t0 = Instant::now();
    let out = run_python(&["load", &server.url(), MODEL_ID, "200", "32", "3"], &server);
    let statuses = out["statuses"].as_object().unwrap();
    let total: u64 = statuses.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 200, "{out}");
    assert!(t0.elapsed() < Duration::from_secs(600), "the load took {:?}", t0.elapsed());
}

/// Every kind of bad request gets its 4xx with an OpenAI-style error body naming the field, and
/// the server keeps serving; the API key is checked; a routed plan and an adapter chosen by
/// name work.
#[test]
fn bad_requests_get_4xx_and_the_server_keeps_serving() {
    let dir = TempDir::new("serve-bad");
    let routers = dir.join("routers.safetensors");
    let out = firstrt()
        .args(["routers", "init", "--r", "0", "--bias", "-3", "-m"])
        .arg(model_path())
        .arg("--out")
        .arg(&routers)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lora = fixtures_dir().join("lora");
    let server = Server::start(&[
        "--ctx",
        "128",
        "--api-key",
        "sekrit",
        "--routers",
        &format!("init={}", routers.display()),
        "--lora",
        &format!("fx={}", lora.display()),
    ]);
    let auth = [("Authorization", "Bearer sekrit")];
    let chat = |extra: Value| {
        let mut body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let send = |path: &str, body: &[u8], headers: &[(&str, &str)]| -> (u16, Value) {
        let (status, text) = server.request("POST", path, headers, body);
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: error body not JSON ({e}): {text:?}"));
        (status, v)
    };
    let long_prompt = "word ".repeat(200);
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        ("invalid JSON", b"{\"model\": ".to_vec(), 400, None),
        ("unknown model", chat(json!({"model": "gpt-4"})).to_string().into_bytes(), 404, None),
        ("max_tokens 0", chat(json!({"max_tokens": 0})).to_string().into_bytes(), 400, Some("max_tokens")),
        ("max_tokens over the context", chat(json!({"max_tokens": 1000})).to_string().into_bytes(), 400, Some("max_tokens")),
        (
            "prompt longer than the context",
            chat(json!({"messages": [{"role": "user", "content": long_prompt}]})).to_string().into_bytes(),
            400,
            Some("messages"),
        ),
        ("unknown routers", chat(json!({"first": {"routers": "nope"}})).to_string().into_bytes(), 400, Some("first.routers")),
        (
            "bad threshold",
            chat(json!({"first": {"routers": "init", "threshold": 7}})).to_string().into_bytes(),
            400,
            Some("first.threshold"),
        ),
        ("threshold without routers", chat(json!({"first": {"threshold": 0.5}})).to_string().into_bytes(), 400, Some("first.threshold")),
        ("skip past the model", chat(json!({"first": {"skip_layers": [30]}})).to_string().into_bytes(), 400, Some("first.skip_layers")),
        ("unknown adapter", chat(json!({"lora": {"name": "nope"}})).to_string().into_bytes(), 400, Some("lora.name")),
        ("temperature out of range", chat(json!({"temperature": -1})).to_string().into_bytes(), 400, Some("temperature")),
        ("n = 2", chat(json!({"n": 2})).to_string().into_bytes(), 400, Some("n")),
    ];
    for (what, body, status, param) in &cases {
        let (got, v) = send("/v1/chat/completions", body, &auth);
        assert_eq!(got, *status, "{what}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty() && !m.contains('\n')), "{what}: {v}");
        assert_eq!(v["error"]["param"].as_str(), *param, "{what}: {v}");
    }
    let (got, v) = send("/v1/completions", br#"{"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": [99999999]}"#, &auth);
    assert_eq!((got, v["error"]["param"].as_str()), (400, Some("prompt")), "{v}");
    assert_eq!(send("/v1/chat/completions", &chat(json!({})).to_string().into_bytes(), &[]).0, 401, "no key");
    assert_eq!(send("/v1/chat/completions", &chat(json!({})).to_string().into_bytes(), &[("Authorization", "Bearer nope")]).0, 401);
    assert_eq!(send("/v1/nothing", b"{}", &auth).0, 404);
    let big = vec![b' '; 5 << 20];
    assert_eq!(server.request("POST", "/v1/chat/completions", &auth, &big).0, 413);
    assert_eq!(server.request("GET", "/v1/chat/completions", &auth, b"").0, 405);
    // The scheme name is case-insensitive.
    assert_eq!(send("/v1/chat/completions", &chat(json!({})).to_string().into_bytes(), &[("Authorization", "bearer sekrit")]).0, 200);
    // /health needs no key; /v1/models does.
    assert_eq!(server.request("GET", "/health", &[], b"").0, 200);
    assert_eq!(server.request("GET", "/v1/models", &[], b"").0, 401);

    // Still serving: a routed plan capped at 3 skipped layers, and the adapter by name.
    let (status, v) =
        send("/v1/chat/completions", &chat(json!({"first": {"routers": "init", "max_skip": 3}})).to_string().into_bytes(), &auth);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["first"]["plan"], "routed", "{v}");
    assert_eq!(v["first"]["skipped_layers"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["first"]["router_probs"].as_array().unwrap().len(), 30, "{v}");
    let (status, v) = send("/v1/chat/completions", &chat(json!({"lora": {"name": "fx", "scale": 0.5}})).to_string().into_bytes(), &auth);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["lora"], json!({"name": "fx", "scale": 0.5}), "{v}");
    let (status, v) = send("/v1/completions", br#"{"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Once", "max_tokens": 2}"#, &auth);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
}

/// SIGTERM during a streamed answer: the answer still ends with `data: [DONE]`, the server
/// stops accepting, and the process exits 0.
#[test]
fn sigterm_finishes_running_requests_and_exits_0() {
    let mut server = Server::start(&[]);
    let addr = server.addr.clone();
    let body = json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "stream": true}).to_string();
    let reader = std::thread::spawn(move || http(&addr, "POST", "/v1/completions", &[], body.as_bytes()));
    // Wait until the sequence runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, h) = server.request("GET", "/health", &[], b"");
        if serde_json::from_str::<Value>(&h).unwrap()["running"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the streamed request never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) with a child's pid.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) }, 0);
    let (status, streamed) = reader.join().unwrap();
    assert_eq!(status, 200);
    assert!(streamed.contains("data: [DONE]"), "{streamed}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(code) = server.child.try_wait().unwrap() {
            break code;
        }
        assert!(Instant::now() < deadline, "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit {code:?}: {}", server.stderr());
    assert!(TcpStream::connect(&server.addr).is_err(), "still accepting after shutdown");
}

/// A stream still running when `--shutdown-timeout` runs out ends with an error event (not a
/// silent cut that looks complete), and the process exits 0.
#[test]
fn shutdown_timeout_cancels_with_an_error_event() {
    let mut server = Server::start(&["--shutdown-timeout", "0"]);
    let addr = server.addr.clone();
    let body = json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 400, "stream": true}).to_string();
    let reader = std::thread::spawn(move || http(&addr, "POST", "/v1/completions", &[], body.as_bytes()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while serde_json::from_str::<Value>(&server.request("GET", "/health", &[], b"").1).unwrap()["running"] != 1 {
        assert!(Instant::now() < deadline, "the streamed request never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) with a child's pid.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) }, 0);
    let (_, streamed) = reader.join().unwrap();
    assert!(streamed.contains("shut down before this answer was complete"), "{streamed}");
    assert!(!streamed.contains("[DONE]"), "{streamed}");
    let code = server.child.wait().unwrap();
    assert!(code.success(), "exit {code:?}: {}", server.stderr());
    assert!(server.stderr().contains("shutting down"), "{}", server.stderr());
}
