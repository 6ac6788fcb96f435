//! Task data: JSONL files of prompts and the answers they should get.
//!
//! One JSON object per line (blank lines are skipped):
//! - test rows `{"id": "...", "prompt": "...", "references": ["...", ...]}`;
//! - train rows `{"id": "...", "prompt": "...", "completion": "..."}` (one reference).
//!
//! `prompt` is the user message of a chat (sent through the model's chat template). `id` is
//! optional (default `line N`). Any other field is ignored.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The largest task file read, in bytes (a guard against reading a wrong, huge file whole).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// One example: a prompt and every answer that counts as right.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskExample {
    /// The row's `id`, or `line N` when it has none.
    pub id: String,
    /// The user message.
    pub prompt: String,
    /// The references (test rows), or the one completion (train rows); never empty.
    pub references: Vec<String>,
    /// The 1-based line of the file the row came from.
    pub line: usize,
}

/// A task file that cannot be used; every message names the file, and the line where there is one.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("{}: {bytes} bytes is over the limit of {MAX_FILE_BYTES} for a task file", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        bytes: u64,
    },
    /// A line is not valid UTF-8 or not a JSON object of the expected shape.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The file has no rows.
    #[error("{}: the file has no examples (one JSON object per line expected)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// The fields of a row that are read; others are ignored.
#[derive(Deserialize)]
struct Row {
    id: Option<serde_json::Value>,
    prompt: Option<String>,
    references: Option<Vec<String>>,
    completion: Option<String>,
}

/// Parse one non-blank line (1-based `line`) into an example. Errors are the message only.
fn parse_row(text: &str, line: usize) -> Result<TaskExample, String> {
    let row: Row = serde_json::from_str(text).map_err(|e| format!("not a JSON object of the task format: {e}"))?;
    let prompt = row.prompt.ok_or("the row has no \"prompt\"")?;
    let references = match (row.references, row.completion) {
        (Some(_), Some(_)) => return Err("the row has both \"references\" and \"completion\"; give one".into()),
        (Some(r), None) if r.is_empty() => return Err("\"references\" is empty".into()),
        (Some(r), None) => r,
        (None, Some(c)) => vec![c],
        (None, None) => return Err("the row has neither \"references\" nor \"completion\"".into()),
    };
    let id = match row.id {
        None | Some(serde_json::Value::Null) => format!("line {line}"),
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(other) => return Err(format!("\"id\" must be a string or a number, not {other}")),
    };
    Ok(TaskExample { id, prompt, references, line })
}

/// Parse the text of a task file; `path` only names it in errors.
///
/// Errors: [`DataError::Line`] for the first line that is not UTF-8 or not a row of the task
/// format (with the reason), [`DataError::Empty`] when no line holds a row.
pub fn parse_task(path: &Path, bytes: &[u8]) -> Result<Vec<TaskExample>, DataError> {
    let mut examples = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let bad = |message: String| DataError::Line { path: path.to_path_buf(), line, message };
        let text = std::str::from_utf8(raw).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        examples.push(parse_row(text, line).map_err(bad)?);
    }
    if examples.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    Ok(examples)
}

/// Read a task file ([`parse_task`]), refusing one over [`MAX_FILE_BYTES`] before reading it.
pub fn load_task(path: &Path) -> Result<Vec<TaskExample>, DataError> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let bytes = std::fs::metadata(path).map_err(io)?.len();
    if bytes > MAX_FILE_BYTES {
        return Err(DataError::TooLarge { path: path.to_path_buf(), bytes });
    }
    let text = std::fs::read(path).map_err(io)?;
    parse_task(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<TaskExample>, String> {
        parse_task(Path::new("t.jsonl"), text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn test_and_train_rows() {
        let rows = parse(concat!(
            "{\"id\": \"a\", \"prompt\": \"p1\", \"references\": [\"r1\", \"r2\"]}\n",
            "\n",
            "{\"prompt\": \"p2\", \"completion\": \"c\", \"extra\": 1}\n",
            "{\"id\": 7, \"prompt\": \"p3\", \"completion\": \"d\"}",
        ))
        .unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0], TaskExample { id: "a".into(), prompt: "p1".into(), references: vec!["r1".into(), "r2".into()], line: 1 });
        assert_eq!((rows[1].id.as_str(), rows[1].references.as_slice(), rows[1].line), ("line 3", &["c".to_string()][..], 3));
        assert_eq!(rows[2].id, "7");
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        let ok = "{\"prompt\": \"p\", \"completion\": \"c\"}\n";
        for (text, want) in [
            (format!("{ok}{{\"prompt\": \"p\"\n"), "t.jsonl:2: not a JSON object"),
            (format!("{ok}{ok}{{\"completion\": \"c\"}}"), "t.jsonl:3: the row has no \"prompt\""),
            (format!("{{\"prompt\": \"p\"}}\n{ok}"), "t.jsonl:1: the row has neither"),
            ("{\"prompt\": \"p\", \"references\": []}".into(), "t.jsonl:1: \"references\" is empty"),
            ("{\"prompt\": \"p\", \"references\": [\"a\"], \"completion\": \"c\"}".into(), "both"),
            ("{\"prompt\": \"p\", \"references\": [1]}".into(), "t.jsonl:1: not a JSON object"),
            ("{\"id\": [1], \"prompt\": \"p\", \"completion\": \"c\"}".into(), "\"id\" must be"),
            ("[1, 2]".into(), "t.jsonl:1:"),
            ("\n \n".into(), "t.jsonl: the file has no examples"),
            (String::new(), "the file has no examples"),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let err = parse_task(Path::new("t.jsonl"), b"{\"prompt\": \"\xff\"}").unwrap_err().to_string();
        assert!(err.starts_with("t.jsonl:1: not UTF-8"), "{err}");
    }

    #[test]
    fn shared_task_files_load() {
        let dir = crate::testdata::data_dir();
        for (file, rows, refs) in
            [("e2e_nlg/test.jsonl", 46, None), ("e2e_nlg/train.jsonl", 536, Some(1)), ("xsum/train.jsonl", 700, Some(1))]
        {
            let examples = load_task(&dir.join(file)).unwrap();
            assert_eq!(examples.len(), rows, "{file}");
            if let Some(n) = refs {
                assert!(examples.iter().all(|e| e.references.len() == n));
            }
            assert!(examples.iter().all(|e| !e.prompt.is_empty()));
        }
        let err = load_task(&dir.join("missing.jsonl")).unwrap_err().to_string();
        assert!(err.contains("missing.jsonl"), "{err}");
    }
}
