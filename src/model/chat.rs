//! Chat templates: Hugging Face-compatible Jinja rendering with minijinja.
//!
//! Mirrors what `transformers` sets up for `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks` on, the variables `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`, the function `raise_exception(msg)`, `strftime_now(fmt)`, Python-style
//! `tojson`, and Python string/dict/list methods (`.strip()`, `.startswith()`, `.items()`, …).
//!
//! A template comes from the model file, so rendering is bounded: [`TEMPLATE_FUEL`]
//! instructions, [`MAX_RENDERED_BYTES`] of output, sequences of at most [`MAX_SEQUENCE_ITEMS`]
//! items collected by a filter, format widths of at most [`MAX_FORMAT_WIDTH`], and
//! [`MAX_TEMPLATE_WORK`] units of work in operators, filters and printing, whose cost fuel does
//! not count (an instruction such as `x in seq` or iterating `[] * 10**9` can take any time:
//! see [`work`]), on values nested at most [`MAX_VALUE_DEPTH`] deep; going over one is
//! [`TokenizerError::TemplateLimit`].

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, context};
use serde::{Deserialize, Serialize};

use crate::model::tokenizer::TokenizerError;

pub mod work;

pub use work::{MAX_TEMPLATE_WORK, MAX_VALUE_DEPTH};

const TEMPLATE_NAME: &str = "chat";

/// Instructions one render may execute (minijinja's fuel). Real templates use a few dozen per
/// message; this bounds a runaway loop to a fraction of a second.
pub const TEMPLATE_FUEL: u64 = 1_000_000;
/// Largest rendered text, in bytes: far above any context window's worth of tokens.
pub const MAX_RENDERED_BYTES: usize = 8 << 20;
/// Largest sequence (items, or characters of a string) a filter may collect into memory.
pub const MAX_SEQUENCE_ITEMS: usize = 1 << 20;
/// Largest number in a format string (`format` filter, `str.format`), which sets a width.
pub const MAX_FORMAT_WIDTH: u64 = 100_000;

/// Built-in filters that collect their input (or pad it) in memory, guarded by
/// [`check_filter_args`] before the built-in runs under the name `"unchecked <name>"`, which
/// template syntax cannot reach.
macro_rules! add_guarded_filters {
    ($env:expr, $($name:literal => $filter:path),* $(,)?) => {$(
        $env.add_filter(concat!("unchecked ", $name), $filter);
        $env.add_filter($name, |state: &State, args: Rest<Value>| -> Result<Value, Error> {
            check_filter_args($name, &args)?;
            for arg in args.iter() {
                work::charge_value(state, arg)?;
            }
            state.apply_filter(concat!("unchecked ", $name), &args)
        });
    )*};
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may accept others, e.g. `tool`).
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl ChatMessage {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }

    /// A `system` message (instructions for the whole conversation).
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message (the model's earlier answer).
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish_non_exhaustive()
    }
}

/// Marks an error raised by the template itself through `raise_exception`.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

impl ChatTemplate {
    /// Compiles `source`. Missing BOS/EOS strings render as empty strings. Errors:
    /// [`TokenizerError::TemplateSyntax`].
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        // `{{ value }}` of a repeated sequence: refused before formatting, also where the output
        // is captured (`set` blocks, macros) or discarded (outside the blocks of `extends`).
        env.set_formatter(|out, state, value| {
            check_filter_args("print", std::slice::from_ref(value))?;
            work::charge_value(state, value)?;
            minijinja::escape_formatter(out, state, value)
        });
        env.set_unknown_method_callback(|state, value, method, args| {
            for operand in std::iter::once(value).chain(args) {
                work::charge_value(state, operand)?;
            }
            match method {
                "format" => value.as_str().map_or(Ok(()), check_format_widths)?,
                "replace" => check_growth(Some(value), args)?,
                // `separator.join(items)`
                "join" => check_filter_args("join", &[args.first().cloned().unwrap_or_default(), value.clone()])?,
                _ => {}
            }
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        });
        add_guarded_filters!(env,
            "list" => minijinja::filters::list,
            "sort" => minijinja::filters::sort,
            "reverse" => minijinja::filters::reverse,
            "unique" => minijinja::filters::unique,
            "batch" => minijinja::filters::batch,
            "slice" => minijinja::filters::slice,
            "join" => minijinja::filters::join,
            "last" => minijinja::filters::last,
            "min" => minijinja::filters::min,
            "max" => minijinja::filters::max,
            "sum" => minijinja::filters::sum,
            "map" => minijinja::filters::map,
            "select" => minijinja::filters::select,
            "reject" => minijinja::filters::reject,
            "selectattr" => minijinja::filters::selectattr,
            "rejectattr" => minijinja::filters::rejectattr,
            "groupby" => minijinja::filters::groupby,
            "dictsort" => minijinja::filters::dictsort,
            "items" => minijinja::filters::items,
            "indent" => minijinja::filters::indent,
            "replace" => minijinja::filters::replace,
            "format" => minijinja::filters::format,
            "string" => minijinja::filters::string,
            "pprint" => minijinja::filters::pprint,
        );
        env.add_function(work::MUL_FUNCTION, work::bounded_mul);
        env.add_function(work::ADD_FUNCTION, work::bounded_add);
        env.add_function(work::CHARGE_FUNCTION, work::charge_function);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", python_tojson);
        // minijinja 2.24's code generator panics ("unreachable") on some statements its parser
        // accepts, such as a filter after `{% import ... as name %}`: that is a syntax error too.
        if source.contains(work::RESERVED_PREFIX) {
            return Err(TokenizerError::TemplateSyntax {
                message: format!("the name prefix `{}` is reserved by firstrt", work::RESERVED_PREFIX),
            });
        }
        let compiled = catch_quietly(|| {
            let source = rewrite_generation_tags(source);
            let bounded = work::bound_operators(&source)
                .ok_or_else(|| TokenizerError::TemplateSyntax { message: "the template's operators could not be bounded".into() })?;
            env.add_template_owned(TEMPLATE_NAME, bounded).map_err(|e| TokenizerError::TemplateSyntax { message: e.to_string() })
        });
        compiled.map_err(|_| TokenizerError::TemplateSyntax { message: "the template compiler failed on this template".into() })??;
        Ok(Self { env, bos_token: bos_token.unwrap_or_default().to_string(), eos_token: eos_token.unwrap_or_default().to_string() })
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends with the header of
    /// an assistant turn, ready for generation. Errors: [`TokenizerError::TemplateException`]
    /// (the template's `raise_exception`), [`TokenizerError::TemplateLimit`] (over a limit),
    /// [`TokenizerError::TemplateRender`].
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizerError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| TokenizerError::TemplateRender { message: e.to_string() })?;
        let mut output = LimitedOutput { text: Vec::new() };
        let context = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        // A write past the limit unwinds (see `LimitedOutput`); only that unwind is caught. The
        // render's state is dropped with it; the environment holds no lock during a render.
        let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| template.render_captured_to(context, &mut output)));
        match rendered {
            Ok(Ok(_)) => String::from_utf8(output.text).map_err(|e| TokenizerError::TemplateRender { message: e.to_string() }),
            Ok(Err(error)) => Err(render_error(error)),
            Err(payload) if payload.is::<OutputLimitReached>() => {
                Err(TokenizerError::TemplateLimit { what: "bytes of output", limit: MAX_RENDERED_BYTES as u64 })
            }
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }
}

thread_local! {
    /// Nesting depth of [`catch_quietly`] on this thread.
    static QUIET: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Panics of this thread that the hook of [`catch_quietly`] kept off stderr.
    static SILENCED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Run `f`, catching a panic, without the panic hook printing it: the template compiler's
/// panics on templates it cannot compile become [`TokenizerError::TemplateSyntax`] with nothing
/// on the user's stderr but firstrt's own one-line error. The first call installs, for the whole
/// process, a panic hook that logs a panic at debug level while this thread is inside
/// `catch_quietly` and hands every other panic to the hook it replaced (the default hook, or the
/// one its caller set before), so no other panic is hidden.
fn catch_quietly<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(|q| q.get()) > 0 {
                SILENCED.with(|n| n.set(n.get() + 1));
                log::debug!("caught in the template compiler: {info}");
            } else {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(q.get() + 1));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(q.get() - 1));
    result
}

/// Unwind payload of a write past [`MAX_RENDERED_BYTES`].
struct OutputLimitReached;

/// The rendered text, up to [`MAX_RENDERED_BYTES`]. A write past the limit unwinds (without the
/// panic hook) instead of returning an error: printing a lazily repeated sequence
/// (`{{ [1] * 10**12 }}`) formats item after item inside one `Display` call, which skips the
/// writes after a failed one but keeps iterating.
struct LimitedOutput {
    text: Vec<u8>,
}

impl std::io::Write for LimitedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > MAX_RENDERED_BYTES {
            std::panic::resume_unwind(Box::new(OutputLimitReached));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Marks an error raised by one of the limits of this module and of [`work`].
#[derive(Debug)]
struct OverLimit {
    what: &'static str,
    limit: u64,
}

impl std::fmt::Display for OverLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "over the limit of {} {}", self.limit, self.what)
    }
}

impl std::error::Error for OverLimit {}

fn over_limit(what: &'static str, limit: u64) -> Error {
    let marker = OverLimit { what, limit };
    Error::new(ErrorKind::InvalidOperation, marker.to_string()).with_source(marker)
}

/// Refuses a sequence or string argument longer than [`MAX_SEQUENCE_ITEMS`] (a repeated
/// sequence claims its full length before any item exists), a batch size or slice count over
/// it, a width over
/// [`MAX_RENDERED_BYTES`] for `indent`, and wide fields in a `format` string.
fn check_filter_args(filter: &str, args: &[Value]) -> Result<(), Error> {
    // These keep a string a string: its length is already in memory.
    let string_ok = matches!(filter, "print" | "string" | "indent" | "format" | "join" | "reverse" | "last" | "replace");
    for arg in args {
        if arg.len().is_some_and(|n| n > MAX_SEQUENCE_ITEMS) && !(string_ok && arg.kind() == ValueKind::String) {
            return Err(over_limit("items in one sequence", MAX_SEQUENCE_ITEMS as u64));
        }
    }
    match filter {
        // Every line is padded: lines times the width.
        "indent" => {
            let newlines = |s: &str| s.bytes().filter(|&b| b == b'\n').count() as u64;
            let lines = args.first().map_or(0, |v| v.as_str().map_or_else(|| newlines(&v.to_string()), newlines)) + 1;
            match args.get(1).and_then(|w| w.as_i64()) {
                Some(width) if width.unsigned_abs().saturating_mul(lines) > MAX_RENDERED_BYTES as u64 => {
                    Err(over_limit("bytes of output", MAX_RENDERED_BYTES as u64))
                }
                _ => Ok(()),
            }
        }
        // The separator between every two items.
        "join" => {
            let items = args.first().and_then(Value::len).unwrap_or(0) as u64;
            let separator = args.get(1).map_or(0, text_len);
            if items.saturating_mul(separator) > MAX_RENDERED_BYTES as u64 {
                Err(over_limit("bytes of output", MAX_RENDERED_BYTES as u64))
            } else {
                Ok(())
            }
        }
        "format" => args.first().and_then(Value::as_str).map_or(Ok(()), check_format_widths),
        "replace" => check_growth(args.first(), &args[1.min(args.len())..]),
        // The size of a batch or the number of slices is allocated up front.
        "batch" | "slice" => match args.get(1).and_then(|n| n.as_i64()) {
            Some(n) if n.unsigned_abs() > MAX_SEQUENCE_ITEMS as u64 => Err(over_limit("items in one sequence", MAX_SEQUENCE_ITEMS as u64)),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Length in bytes of `value` as a string argument: a string's own, or what minijinja formats
/// another value to (a list passed as `replace`'s `new` is formatted as its `[...]` text).
fn text_len(value: &Value) -> u64 {
    value.as_str().map_or_else(|| value.to_string().len(), str::len) as u64
}

/// Refuses `text.replace(old, new)` (filter or method) whose result could pass
/// [`MAX_RENDERED_BYTES`]: every match of `old` (every character boundary when it is empty)
/// becomes `new`.
fn check_growth(text: Option<&Value>, old_new: &[Value]) -> Result<(), Error> {
    let len = |v: Option<&Value>| v.map_or(0, text_len);
    let (text_len, old_len, new_len) = (len(text), len(old_new.first()), len(old_new.get(1)));
    let matches = text_len.checked_div(old_len).unwrap_or(text_len + 1);
    if text_len.saturating_add(matches.saturating_mul(new_len)) > MAX_RENDERED_BYTES as u64 {
        Err(over_limit("bytes of output", MAX_RENDERED_BYTES as u64))
    } else {
        Ok(())
    }
}

/// Refuses a format string with a number over [`MAX_FORMAT_WIDTH`] (a field width or precision
/// that would pad to that many characters).
fn check_format_widths(format: &str) -> Result<(), Error> {
    let too_wide = format
        .split(|c: char| !c.is_ascii_digit())
        .any(|digits| !digits.is_empty() && !digits.parse::<u64>().is_ok_and(|n| n <= MAX_FORMAT_WIDTH));
    if too_wide { Err(over_limit("characters of format width", MAX_FORMAT_WIDTH)) } else { Ok(()) }
}

/// transformers' `{% generation %}...{% endgeneration %}` (its `AssistantTracker` extension,
/// which marks the assistant's spans for `return_assistant_tokens_mask`) renders its body
/// unchanged. minijinja has no such tag: each becomes `{% if true %}` / `{% endif %}` with the
/// same whitespace control (`-`, `+`), so the body renders as transformers renders it.
fn rewrite_generation_tags(source: &str) -> String {
    let markers: &[char] = &['-', '+'];
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        // "%}" after the "{%" ("{%}" is not a tag).
        let Some(len) = rest[start + 2..].find("%}") else { break };
        let end = start + 2 + len;
        let tag = &rest[start + 2..end];
        let inner = tag.trim_start_matches(markers).trim_end_matches(markers);
        let left = &tag[..tag.len() - tag.trim_start_matches(markers).len()];
        let right = &tag[tag.trim_end_matches(markers).len()..];
        out.push_str(&rest[..start]);
        match inner.trim() {
            "generation" => {
                let _ = write!(out, "{{%{left} if true {right}%}}");
            }
            "endgeneration" => {
                let _ = write!(out, "{{%{left} endif {right}%}}");
            }
            _ => out.push_str(&rest[start..end + 2]),
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

fn render_error(error: Error) -> TokenizerError {
    if error.kind() == ErrorKind::OutOfFuel {
        return TokenizerError::TemplateLimit { what: "instructions (minijinja fuel)", limit: TEMPLATE_FUEL };
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(current) = cause {
        if let Some(raised) = current.downcast_ref::<RaisedByTemplate>() {
            return TokenizerError::TemplateException { message: raised.0.clone() };
        }
        if let Some(limit) = current.downcast_ref::<OverLimit>() {
            return TokenizerError::TemplateLimit { what: limit.what, limit: limit.limit };
        }
        cause = current.source();
    }
    TokenizerError::TemplateRender { message: error.to_string() }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedByTemplate(message)))
}

/// `strftime_now(format)`: the current time (UTC) formatted like Python's `strftime`.
fn strftime_now(format: String) -> Result<String, Error> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("system clock before 1970: {e}")))?
        .as_secs() as i64;
    Ok(strftime_utc(&format, seconds))
}

const MONTH_NAMES: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const WEEKDAY_NAMES: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Formats a Unix time (UTC) with the common `strftime` directives; unknown directives are kept.
pub(crate) fn strftime_utc(format: &str, unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let second_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (second_of_day / 3600, second_of_day / 60 % 60, second_of_day % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTH_NAMES[(month - 1) as usize];
    let weekday_name = WEEKDAY_NAMES[weekday];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match directive {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:2}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{:02}", (hour + 11) % 12 + 1),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'j' => write!(out, "{day_of_year:03}"),
            'B' => write!(out, "{month_name}"),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'A' => write!(out, "{weekday_name}"),
            'a' => write!(out, "{}", &weekday_name[..3]),
            'u' => write!(out, "{}", weekday + 1),
            'w' => write!(out, "{}", (weekday + 1) % 7),
            'F' => write!(out, "{year}-{month:02}-{day:02}"),
            'T' => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Day count since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_index = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent,
/// sort_keys=False)`, i.e. Python's separators (`", "`, `": "`) and no HTML escaping.
fn python_tojson(state: &State, value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    work::charge_value(state, value)?;
    let indent: Option<usize> = kwargs.get("indent")?;
    if indent.is_some_and(|i| i > MAX_RENDERED_BYTES) {
        return Err(over_limit("bytes of output", MAX_RENDERED_BYTES as u64));
    }
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let options = JsonOptions { indent, ensure_ascii: ensure_ascii.unwrap_or(false), sort_keys: sort_keys.unwrap_or(false) };
    let mut out = String::new();
    write_json(&mut out, value, &options, 0)?;
    Ok(Value::from(out))
}

struct JsonOptions {
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn write_json(out: &mut String, value: &Value, options: &JsonOptions, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => match value.as_i64() {
            Some(int) if !value.to_string().contains(['.', 'e', 'E', 'n', 'N']) => {
                let _ = write!(out, "{int}");
            }
            _ => {
                let float = f64::try_from(value.clone())?;
                if float.is_nan() {
                    out.push_str("NaN");
                } else if float.is_infinite() {
                    out.push_str(if float > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&python_float_repr(float));
                }
            }
        },
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), options.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            check_filter_args("tojson", std::slice::from_ref(value))?;
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', &items, options, depth, |out, item, depth| write_json(out, item, options, depth))?;
        }
        ValueKind::Map => {
            check_filter_args("tojson", std::slice::from_ref(value))?;
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if options.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            write_container(out, '{', '}', &keys, options, depth, |out, key, depth| {
                let key_text = match key.as_str() {
                    Some(s) => s.to_string(),
                    None => key.to_string(),
                };
                write_json_string(out, &key_text, options.ensure_ascii);
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, options, depth)
            })?;
        }
        other => {
            return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson cannot serialise a value of kind {other}")));
        }
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    items: &[Value],
    options: &JsonOptions,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &Value, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (index, item) in items.iter().enumerate() {
        match options.indent {
            Some(indent) => {
                if index > 0 {
                    out.push(',');
                }
                out.push('\n');
                pad(out, indent, depth + 1)?;
            }
            None if index > 0 => out.push_str(", "),
            None => {}
        }
        write_item(out, item, depth + 1)?;
    }
    if let Some(indent) = options.indent {
        out.push('\n');
        pad(out, indent, depth)?;
    }
    out.push(close);
    Ok(())
}

/// `indent * depth` spaces, refused when the text would pass [`MAX_RENDERED_BYTES`].
fn pad(out: &mut String, indent: usize, depth: usize) -> Result<(), Error> {
    match indent.checked_mul(depth) {
        Some(n) if out.len() + n <= MAX_RENDERED_BYTES => {
            out.extend(std::iter::repeat_n(' ', n));
            Ok(())
        }
        _ => Err(over_limit("bytes of output", MAX_RENDERED_BYTES as u64)),
    }
}

fn write_json_string(out: &mut String, text: &str, ensure_ascii: bool) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, always with a `.0` or an exponent.
fn python_float_repr(value: f64) -> String {
    let abs = value.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Python: 1e+16, 1.5e-05
        let formatted = format!("{value:e}");
        let (mantissa, exponent) = formatted.split_once('e').unwrap_or((&formatted, "0"));
        let exponent: i32 = exponent.parse().unwrap_or(0);
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let text = format!("{value}");
    if text.contains('.') { text } else { format!("{text}.0") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        ChatTemplate::new(source, Some("<s>"), Some("</s>"))?.render(messages, true)
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let source = "{% for m in messages %}\n    {% if loop.first %}[first]{% endif %}\n{{ m.role }}|{% endfor %}";
        let text = render(source, &[ChatMessage::user("a"), ChatMessage::assistant("b")]).unwrap();
        assert_eq!(text, "[first]user|assistant|");
    }

    #[test]
    fn bos_eos_and_generation_prompt_variables() {
        let source =
            "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}>{% endif %}";
        let template = ChatTemplate::new(source, Some("<s>"), Some("</s>")).unwrap();
        let messages = [ChatMessage::user("hi")];
        assert_eq!(template.render(&messages, true).unwrap(), "<s>hi</s>>");
        assert_eq!(template.render(&messages, false).unwrap(), "<s>hi</s>");
    }

    #[test]
    fn python_string_methods_work() {
        let source = "{% for m in messages %}{{ m.content.strip() }}{% if m.content.startswith(' x') %}!{% endif %}{% endfor %}";
        assert_eq!(render(source, &[ChatMessage::user(" x y \n")]).unwrap(), "x y!");
    }

    #[test]
    fn raise_exception_becomes_a_typed_error() {
        let source = "{% if messages[0].role != 'system' %}{{ raise_exception('system message required') }}{% endif %}";
        match render(source, &[ChatMessage::user("hi")]) {
            Err(TokenizerError::TemplateException { message }) => {
                assert_eq!(message, "system message required")
            }
            other => panic!("expected TemplateException, got {other:?}"),
        }
    }

    /// minijinja 2.24's code generator panics on a filter after `{% import ... as name %}`; that
    /// is a syntax error, and the panic stays inside [`catch_quietly`].
    #[test]
    fn a_template_the_compiler_panics_on_is_a_syntax_error() {
        let silenced = SILENCED.with(|n| n.get());
        let result = ChatTemplate::new("{% import 'chat' as c | upper %}x", None, None);
        assert_eq!(SILENCED.with(|n| n.get()), silenced + 1, "the compiler's panic went to the default hook");
        match result {
            Err(TokenizerError::TemplateSyntax { message }) => assert!(message.contains("compiler failed"), "{message}"),
            Err(other) => panic!("expected the compiler's failure, got {other}"),
            Ok(_) => panic!("expected the compiler's failure, got a template"),
        }
        assert_eq!(QUIET.with(|q| q.get()), 0, "left the quiet section");
    }

    #[test]
    fn syntax_error_is_reported_at_compile_time() {
        let result = ChatTemplate::new("{% for m in messages %}", None, None);
        assert!(matches!(result, Err(TokenizerError::TemplateSyntax { .. })), "{result:?}");
    }

    #[test]
    fn generation_tags_render_their_body() {
        // issue 15: Hugging Face's marker of assistant spans made the model fail to load.
        let source = concat!(
            "{% for m in messages %}{{ m.role }}:",
            "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}",
            "{% else %}{{ m.content }}{% endif %};\n",
            "{%- generation -%}  [{{ m.role }}]  {%- endgeneration %}|",
            "{% endfor %}",
        );
        let messages = [ChatMessage::user("hi"), ChatMessage::assistant("hello")];
        assert_eq!(render(source, &messages).unwrap(), "user:hi;[user]|assistant:hello;[assistant]|");
        // Other tags and text that merely looks like one are kept.
        assert_eq!(
            rewrite_generation_tags("{% if x %}generation{% endif %}{%generation%}"),
            "{% if x %}generation{% endif %}{% if true %}"
        );
        assert_eq!(rewrite_generation_tags("a {% generation"), "a {% generation");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let source = "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}";
        let text = render(source, &[ChatMessage::user("<a> \"q\" é\n")]).unwrap();
        assert_eq!(
            text,
            "[{\"role\": \"user\", \"content\": \"<a> \\\"q\\\" é\\n\"}]|{\n  \"role\": \"user\",\n  \"content\": \"<a> \\\"q\\\" é\\n\"\n}"
        );
        let numbers = render("{{ [1, 2.5, 3.0, none, true] | tojson }}", &[]).unwrap();
        assert_eq!(numbers, "[1, 2.5, 3.0, null, true]");
    }

    #[test]
    fn common_template_idioms_work() {
        // Idioms from Llama 3 / Mistral style templates: namespace(), `is defined`, trim, slicing.
        let source = concat!(
            "{% set ns = namespace(system='') %}",
            "{% if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] | trim %}",
            "{% set messages = messages[1:] %}{% endif %}",
            "{% if tools is defined and tools %}TOOLS{% endif %}",
            "[{{ ns.system }}]{% for m in messages %}{{ m.role | upper }}:{{ m.content }};{% endfor %}",
        );
        let messages = [ChatMessage::system("  be brief \n"), ChatMessage::user("hi")];
        assert_eq!(render(source, &messages).unwrap(), "[be brief]USER:hi;");
    }

    #[test]
    fn runaway_templates_hit_a_limit() {
        let cases = [
            ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "instructions"),
            ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "units of work"),
            (
                "{% for i in range(100000) %}0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789{% endfor %}",
                "bytes of output",
            ),
            // Repetition is built eagerly, bounded and charged: `[1] * 10**12` never exists.
            ("{{ ([1] * 1000000000000) | list | length }}", "items in one sequence"),
            ("{{ ([1] * 1000000000000) | tojson }}", "items in one sequence"),
            ("{{ ([1] * 1000000000000) | string | length }}", "items in one sequence"),
            ("{{ [[1, 2] * 1000000] * 1000000 }}", "items in one sequence"),
            ("{{ messages | batch(1000000000000) | list }}", "items in one sequence"),
            ("{% extends 'chat' %}{{ [1, 2] * 1000000000000 }}", "items in one sequence"),
            ("{% set x %}{{ [1, 2] * 1000000000000 }}{% endset %}", "items in one sequence"),
            ("{{ 'ab' * 100000000 }}", "units of work"),
            ("{% set a = [1] * 1000000 %}{{ [a] * 1000 }}", "units of work"),
            // Under the work budget but over one allocation the fuzzer's cap allows (fuzz found).
            ("{{ ([1] * 14000000) | list }}", "items in one sequence"),
            ("{{ ([1] * 1000000) + ([2] * 100000) }}", "items in one sequence"),
            // One instruction, unbounded work: a scan, doubling by `~` or `+`, a filter's input.
            ("{% set r = range(100000) %}{% for i in range(100000) %}{% if -1 in r %}{% endif %}{% endfor %}", "units of work"),
            ("{% set r = range(100000) | list %}{% for i in range(100000) %}{% if r == r[1:] %}{% endif %}{% endfor %}", "units of work"),
            ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "units of work"),
            ("{% set ns = namespace(s=[1]) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "items in one sequence"),
            ("{% set r = range(100000) | list %}{% for i in range(100000) %}{{ r | length }}{% endfor %}", "units of work"),
            ("{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{% if s.startswith('y') %}{% endif %}{% endfor %}", "units of work"),
            // Values nested deeper than comparisons, printing and serialisation can recurse.
            (
                "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}",
                "levels of nesting",
            ),
            ("{% set ns = namespace(x={}) %}{% for i in range(1000) %}{% set ns.x = {'a': ns.x} %}{% endfor %}", "levels of nesting"),
            ("{{ messages | tojson(indent=1000000000000) }}", "bytes of output"),
            ("{{ 'x\ny' | indent(1000000000000) }}", "bytes of output"),
            ("{{ '%01000000000d' | format(1) }}", "format width"),
            ("{{ '{:>1000000000}'.format(1) }}", "format width"),
            // Results that outgrow their charged inputs.
            ("{{ ('x' * 1000000) | replace('x', 'y' * 1000000) }}", "bytes of output"),
            ("{{ ('x' * 1000000).replace('', 'y' * 100) }}", "bytes of output"),
            ("{{ ('x' * 1000000) | replace('x', ['y'] * 1000000) }}", "bytes of output"),
            ("{{ ('\n' * 1000000) | indent(1000) }}", "bytes of output"),
            ("{{ ([1] * 1000000) | join('y' * 1000) }}", "bytes of output"),
            ("{{ ('y' * 1000).join([1] * 1000000) }}", "bytes of output"),
        ];
        for (source, what) in cases {
            match render(source, &[ChatMessage::user("hi")]) {
                Err(TokenizerError::TemplateLimit { what: found, .. }) => assert!(found.contains(what), "{source}: {found}"),
                other => panic!("{source}: expected a TemplateLimit error, got {other:?}"),
            }
        }
        // Repeating an empty sequence is free and instant whatever the count (minijinja's lazy
        // repetition took 10^9 steps to iterate it); so is repeating zero times.
        assert_eq!(render("{{ [] * 1000000000 }}|{% for x in [] * 1000000000 %}{% endfor %}|{{ 0 * [1] }}", &[]).unwrap(), "[]||[]");
        // The guarded built-in filters still take their positional and keyword arguments.
        assert_eq!(render("{{ [3, 1, 2] | sort(reverse=true) | join(',') }}", &[]).unwrap(), "3,2,1");
        assert_eq!(render("{{ 'a\nb' | indent(2) }}|{{ '%03d' | format(7) }}", &[]).unwrap(), "a\n  b|007");
    }

    #[test]
    fn bounded_operators_keep_their_meaning() {
        let cases = [
            ("{{ 3 * 4 }}|{{ 2.5 * 2 }}|{{ (1 + 2) * (3) }}|{{ -2 * 3 * 2 }}|{{ 2 ** 3 * 2 }}", "12|5.0|9|-12|16"),
            ("{{ 'ab' * 3 }}|{{ 2 * 'x' }}|{{ [1, 2] * 2 }}|{{ 2 * ['a'] }}|{{ ([1] * 3)[1] }}", "ababab|xx|[1, 2, 1, 2]|[\"a\", \"a\"]|1"),
            ("{{ 'a' ~ 1 ~ 'b' }}|{{ [1] + [2] }}|{{ 'x' + 'y' }}|{{ 1 + 2 * 3 }}", "a1b|[1, 2]|xy|7"),
            ("{{ 1 < 2 < 3 }}|{{ 'a' in 'cat' }}|{{ 2 not in [1, 3] }}|{{ not 1 == 2 }}", "True|True|True|True"),
            ("{% set a, b = [1, 2] * 1 %}{{ a }}{{ b }}|{% for k, v in {'x': 3 * 2}.items() %}{{ k }}={{ v }}{% endfor %}", "12|x=6"),
            ("{{ messages[0].content | upper | replace('I', 'i' * 2) }}|{{ (1 if 2 * 1 == 2 else 0) * 5 }}", "Hii|5"),
            ("{{ [1, 2, 3] | map('string') | join('-' * 2) }}|{{ {'k': [1] * 2}['k'] | length }}", "1--2--3|2"),
            ("{% macro m(x, y=2 * 3) %}{{ x * y }}{% endmacro %}{{ m(2) }}|{{ m(y=1, x=4 * 1) }}", "12|4"),
        ];
        for (source, expected) in cases {
            assert_eq!(render(source, &[ChatMessage::user("hi")]).unwrap(), expected, "{source}");
        }
        // The same text as minijinja renders without the rewrite, undefined values included.
        let plain_sources = [
            "{{ x ~ 'a' }}|{{ (x or 'b') + 'c' }}|{% if x == none %}n{% endif %}|{{ x is undefined }}|{{ [x] | length }}",
            "{{ 1 + 2.5 }}|{{ 7 // 2 * 3 }}|{{ 2 * 3 ** 2 }}|{{ 'a' * 0 }}|{{ [1] * 0 }}|{{ (1, 2) + (3,) }}|{{ 1 ~ 2 == '12' }}",
            "{% for m in messages %}{{ loop.index0 * 2 + 1 }}{{ m.role[0] * 2 }}{% if m.role in ['user', 'system'] %}!{% endif %}{% endfor %}",
            "{% set a, b = (1 + 1, [2] * 2) %}{{ a }}{{ b }}{{ {'k': a * 3}.k }}{{ dict(x=b + [a]).x }}{{ (a if a > 1 else b) * 2 }}",
        ];
        let messages = [ChatMessage::system("s"), ChatMessage::user("hi"), ChatMessage::assistant("yo")];
        for source in plain_sources {
            let mut plain = Environment::new();
            plain.set_trim_blocks(true);
            plain.set_lstrip_blocks(true);
            plain.add_template("t", source).unwrap();
            let expected = plain.get_template("t").unwrap().render(context! { messages => &messages[..] }).unwrap();
            assert_eq!(render(source, &messages).unwrap(), expected, "{source}");
        }
        // The rewrite's functions cannot be replaced by the template.
        let reserved = ChatTemplate::new("{% macro __firstrt_mul(a, b) %}{% endmacro %}{{ [] * 2 }}", None, None);
        assert!(matches!(reserved, Err(TokenizerError::TemplateSyntax { .. })), "{reserved:?}");
        // A syntax error is still the compiler's, unchanged.
        let error = ChatTemplate::new("{{ 1 * }}", None, None).unwrap_err().to_string();
        assert!(error.contains("unexpected end of variable block") || error.contains("expected expression"), "{error}");
    }

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of the year.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime_utc("%d %B %Y, %A (%a %b) day %j %%", t), "29 February 2024, Thursday (Thu Feb) day 060 %");
        assert_eq!(strftime_utc("%Y-%m-%d", 0), "1970-01-01");
        let now = render("{{ strftime_now('%Y') }}", &[]).unwrap();
        assert!(now.parse::<i32>().is_ok_and(|year| year >= 2024), "{now}");
    }
}
