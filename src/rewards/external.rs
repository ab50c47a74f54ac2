//! Rewards computed outside the process: a program (`type = "command"`)
//! or an HTTP server (`type = "http"`). A Python reward function is then a
//! ten-line script. Any failure (a non-number, the wrong count, a non-zero
//! exit, a timeout, a refused connection) is an error naming the scorer.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::{column_text, Completion, Reward};
use crate::{Error, Result};

/// One JSON object per completion: the row's other columns, then `prompt`
/// and `completion` (the texts the policy saw and wrote).
fn row_json(c: &Completion) -> Value {
    let mut obj = c.columns.cloned().unwrap_or_else(Map::new);
    obj.insert("prompt".into(), json!(c.prompt));
    obj.insert("completion".into(), json!(c.response));
    Value::Object(obj)
}

/// `type = "command"`: runs `program args...` once per batch, writes one
/// JSON line per completion on its stdin (see [`row_json`]) and reads one
/// number per line from its stdout, in order.
pub struct CommandReward {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

impl CommandReward {
    fn describe(&self) -> String {
        format!("command {:?}", self.argv.join(" "))
    }
}

impl Reward for CommandReward {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>> {
        let what = self.describe();
        let fail = |why: String| Error::Msg(format!("{what}: {why}"));
        let (program, args) = self
            .argv
            .split_first()
            .ok_or_else(|| fail("no program given".into()))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot start: {e}")))?;
        let input: String = batch.iter().map(|c| format!("{}\n", row_json(c))).collect();
        let mut stdin = child.stdin.take().expect("piped stdin");
        // Written and read on threads of their own, so a scorer that reads
        // and writes as it goes cannot block on a full pipe.
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let mut stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            stdout.read_to_string(&mut s).map(|_| s)
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| fail(e.to_string()))? {
                break status;
            }
            if started.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "no answer within timeout_s = {}",
                    self.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // A scorer may exit without reading its input: a broken pipe is its choice.
        let _ = writer.join();
        let out = reader
            .join()
            .map_err(|_| fail("reading its output failed".into()))?
            .map_err(|e| fail(format!("reading its output: {e}")))?;
        let err = err_reader.join().unwrap_or_default();
        if !status.success() {
            let tail: String = err.trim().lines().last().unwrap_or("").to_string();
            return Err(fail(format!("exited with {status}: {tail}")));
        }
        let scores = out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                l.trim()
                    .parse::<f32>()
                    .map_err(|_| fail(format!("output line {} is not a number: {:?}", i + 1, l)))
            })
            .collect::<Result<Vec<f32>>>()?;
        if scores.len() != batch.len() {
            return Err(fail(format!(
                "wrote {} numbers for {} completions",
                scores.len(),
                batch.len()
            )));
        }
        Ok(scores)
    }
}

/// `type = "http"`: POSTs to `url` the JSON OpenRLHF's remote reward model
/// sends, `{"query": [prompt + completion], "prompts": [prompt], "labels":
/// [label]}`, and reads `{"rewards": [...]}`. Labels come from the row's
/// `column` (default `label`; "" where a row has none).
pub struct HttpReward {
    pub url: String,
    pub label_column: String,
    pub timeout: Duration,
}

impl Reward for HttpReward {
    fn score(&self, batch: &[Completion]) -> Result<Vec<f32>> {
        let fail = |why: String| Error::Msg(format!("POST {}: {why}", self.url));
        let body = json!({
            "query": batch.iter().map(|c| format!("{}{}", c.prompt, c.response)).collect::<Vec<_>>(),
            "prompts": batch.iter().map(|c| c.prompt).collect::<Vec<_>>(),
            "labels": batch
                .iter()
                .map(|c| column_text(c.columns, &self.label_column).unwrap_or_default())
                .collect::<Vec<_>>(),
        });
        let agent = ureq::AgentBuilder::new().timeout(self.timeout).build();
        let response = agent
            .post(&self.url)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .map_err(|e| fail(e.to_string()))?;
        let text = response
            .into_string()
            .map_err(|e| fail(format!("reading the answer: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| fail(format!("the answer is not JSON ({e}): {text:.200}")))?;
        let rewards = value
            .get("rewards")
            .and_then(Value::as_array)
            .ok_or_else(|| fail(format!("the answer has no `rewards` list: {text:.200}")))?;
        let scores = rewards
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| fail(format!("rewards[{i}] is not a number: {v}")))
            })
            .collect::<Result<Vec<f32>>>()?;
        if scores.len() != batch.len() {
            return Err(fail(format!(
                "answered {} rewards for {} completions",
                scores.len(),
                batch.len()
            )));
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::completion;
    use super::*;
    use std::net::TcpListener;

    fn sh(script: &str, timeout_s: f64) -> CommandReward {
        CommandReward {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_secs_f64(timeout_s),
        }
    }

    #[test]
    fn command_reads_json_lines_and_writes_numbers() {
        let row: Map<String, Value> = serde_json::from_str(r#"{"answer": "19"}"#).unwrap();
        let batch = [
            completion("19", &[], Some(&row)),
            completion("18", &[], Some(&row)),
        ];
        // 1 when the line carries the row's column and the completion 19.
        let script = r#"while IFS= read -r l; do case "$l" in *'"answer":"19"'*'"completion":"19"'*) echo 1;; *'"prompt":"p"'*) echo 0.25;; *) echo 9;; esac; done"#;
        assert_eq!(sh(script, 10.0).score(&batch).unwrap(), vec![1.0, 0.25]);
    }

    #[test]
    fn command_failures_name_the_scorer() {
        let batch = [completion("a", &[], None), completion("b", &[], None)];
        let cases = [
            (sh("cat > /dev/null; echo 1; echo x", 10.0), "not a number"),
            (sh("cat > /dev/null; echo 1", 10.0), "wrote 1 numbers for 2"),
            (sh("echo boom >&2; exit 3", 10.0), "boom"),
            (sh("sleep 5", 0.2), "timeout_s"),
        ];
        for (r, expect) in cases {
            let e = r.score(&batch).unwrap_err().to_string();
            assert!(e.contains("command \"sh -c") && e.contains(expect), "{e}");
        }
        let missing = CommandReward {
            argv: vec!["/no/such/scorer".into()],
            timeout: Duration::from_secs(1),
        };
        assert!(missing
            .score(&batch)
            .unwrap_err()
            .to_string()
            .contains("cannot start"));
    }

    /// A one-request HTTP server on 127.0.0.1 answering `answer`; returns
    /// its URL and a handle yielding the request body it received.
    fn serve_once(answer: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/get_reward", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let n = stream.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break text[end + 4..end + 4 + len].to_string();
                    }
                }
                if n == 0 {
                    break String::new();
                }
            };
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
            stream.write_all(reply.as_bytes()).unwrap();
            body
        });
        (url, handle)
    }

    #[test]
    fn http_sends_openrlhf_json_and_reads_rewards() {
        let row: Map<String, Value> = serde_json::from_str(r#"{"label": "19"}"#).unwrap();
        let batch = [
            completion("19", &[], Some(&row)),
            completion("x", &[], None),
        ];
        let (url, server) = serve_once(r#"{"rewards": [1.0, -0.5]}"#);
        let r = HttpReward {
            url,
            label_column: "label".into(),
            timeout: Duration::from_secs(10),
        };
        assert_eq!(r.score(&batch).unwrap(), vec![1.0, -0.5]);
        let sent: Value = serde_json::from_str(&server.join().unwrap()).unwrap();
        assert_eq!(
            sent,
            json!({"query": ["p19", "px"], "prompts": ["p", "p"], "labels": ["19", ""]})
        );
        // The wrong count, and a refused connection.
        let (url, server) = serve_once(r#"{"rewards": [1.0]}"#);
        let r = HttpReward { url, ..r };
        assert!(r
            .score(&batch)
            .unwrap_err()
            .to_string()
            .contains("answered 1 rewards for 2"));
        server.join().unwrap();
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", closed.local_addr().unwrap());
        drop(closed);
        let r = HttpReward {
            url: url.clone(),
            ..r
        };
        let e = r.score(&batch).unwrap_err().to_string();
        assert!(e.starts_with(&format!("POST {url}")), "{e}");
    }
}
