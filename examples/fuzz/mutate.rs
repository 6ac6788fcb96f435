//! Mutations: what turns a seed into the next input.
//!
//! Binary edits for every format (bit flips, byte insert / delete / duplicate, 1/2/4/8-byte
//! little-endian fields overwritten with boundary values or nudged, splicing with another
//! input, truncation), structural edits for JSON (a value replaced by a huge or negative
//! number, a non-JSON number such as `NaN` or `1e999`, deep nesting, a wrong type, a long
//! string, a copy of another value; a key deleted or added) and fragment insertion for Jinja
//! (loops, huge ranges and repeats, recursive macros, filters with huge widths, ...).

use rand::Rng;
use rand::rngs::SmallRng;
use serde_json::Value;

use crate::targets::Format;

/// Largest input the mutator produces, in bytes (the seeds are a few KiB).
pub const MAX_INPUT: usize = 256 * 1024;

/// Boundary values for integer fields: 0, 1, -1, 2^31, 2^32-1, 2^63, 2^63-1, huge and small
/// sizes, block sizes.
const INTERESTING: [u64; 20] = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    32,
    255,
    256,
    u64::MAX,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    1 << 58,
    1 << 63,
    (1 << 63) - 1,
    0xFFFF_FFFE,
];

/// JSON fragments a value is replaced with.
const JSON_VALUES: [&str; 26] = [
    "0",
    "-1",
    "1",
    "2",
    "-0.0",
    "0.5",
    "4294967296",
    "1099511627776",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "1e308",
    "-1e308",
    "1e-320",
    "NaN",
    "Infinity",
    "1e999",
    "null",
    "true",
    "\"\"",
    "\"NaN\"",
    "\"<|im_start|>\"",
    "[]",
    "{}",
    "[null, 1, \"a\"]",
    "{\"a\": {\"b\": []}}",
];

/// Template fragments inserted into Jinja sources.
const JINJA_FRAGMENTS: [&str; 88] = [
    "{% for x in range(100000) %}",
    "{% for y in range(100000) %}{{ y }}{% endfor %}",
    "{% endfor %}",
    "{% for message in messages %}",
    "{% for m in messages * 1000000 %}",
    "{% if loop.last %}",
    "{% if ",
    " %}",
    "{% endif %}",
    "{% else %}",
    "{% elif true %}",
    "{{ ",
    " }}",
    "{%- ",
    " -%}",
    "{% set ns = namespace(a=0) %}",
    "{% set ns.a = ns.a + 1 %}",
    "{% set messages = messages[1:] %}",
    "{% set s = 'ab' * 50000000 %}",
    "{{ s ~ s ~ s }}",
    "{{ 'x' * 1000000000 }}",
    "{{ [1, 2] * 1000000000000 }}",
    "{{ ([1] * 1000000000000) | list }}",
    "{{ range(100000) | list | length }}",
    "{% macro m(a) %}{{ m(a) }}{% endmacro %}{{ m(1) }}",
    "{% macro n(a) %}{{ a }}{{ caller() }}{% endmacro %}{% call n(1) %}x{% endcall %}",
    "{% include 'chat' %}",
    "{% extends 'chat' %}",
    "{% import 'chat' as c %}",
    "{% filter upper %}",
    "{% endfilter %}",
    "{% raw %}",
    "{% endraw %}",
    "{% generation %}",
    "{% endgeneration %}",
    "{% break %}",
    "{% continue %}",
    "{% with a = 1 %}",
    "{% endwith %}",
    "{# comment #}",
    "messages[0]['content']",
    "message['role']",
    "loop.index",
    "bos_token",
    "eos_token",
    "add_generation_prompt",
    "raise_exception('stop')",
    "strftime_now('%Y-%m-%d %H:%M:%S %j %a %%')",
    " | tojson",
    " | tojson(indent=1000000000000)",
    " | indent(1000000000000)",
    " | center(1000000000000)",
    " | wordwrap(1)",
    " | truncate(1000000000000)",
    " | format(1)",
    "'%01000000000d' % 1",
    "'{:>1000000000}'.format(1)",
    " | join(', ')",
    " | replace('', 'xxxxxxxxxxxxxxxx')",
    " | batch(1000000000000)",
    " | slice(1000000000000)",
    " | sort | unique | reverse | list",
    " | dictsort",
    " | map('upper') | list",
    " | selectattr('role', 'equalto', 'user') | list",
    " | groupby('role')",
    " | string | length",
    ".strip().split(' ')",
    ".startswith('H')",
    ".items()",
    "9223372036854775807",
    "-9223372036854775808",
    "1e308",
    "((((((((((((((((((((((((((((((((((((((((1))))))))))))))))))))))))))))))))))))))))",
    // Work that one instruction does and fuel does not count (`model::chat::work`).
    "{{ [] * 1000000000 }}",
    "{% for e in [] * 1000000000 %}{% endfor %}",
    "{% set r = range(100000) %}",
    "{% if -1 in r %}{% endif %}",
    "{% set ns = namespace(a=[1], s='x', d={}) %}",
    "{% set ns.a = ns.a + ns.a %}",
    "{% set ns.s = ns.s ~ ns.s %}",
    "{% set ns.a = [ns.a] %}",
    "{% set ns.d = {'k': ns.d} %}",
    ".replace('', 'yyyyyyyy')",
    "('y' * 1000).join(range(100000))",
    " == ",
    " * ",
    " + ",
];

/// Applies 1 to 4 mutations to `data`; `other` is another input of the same part, for splicing.
pub fn mutate(rng: &mut SmallRng, data: &mut Vec<u8>, format: Format, other: &[u8]) {
    for _ in 0..rng.random_range(1..=4) {
        match (format, rng.random_range(0..3)) {
            (Format::Json, 0) => json_step(rng, data, other),
            (Format::Jinja, 0 | 1) => jinja_step(rng, data),
            _ => binary_step(rng, data, other),
        }
    }
    data.truncate(MAX_INPUT);
}

fn pos(rng: &mut SmallRng, len: usize) -> usize {
    if len == 0 { 0 } else { rng.random_range(0..=len) }
}

/// A range `[start, end)` of at most `max` bytes inside `len` (empty when `len` is 0).
fn range(rng: &mut SmallRng, len: usize, max: usize) -> (usize, usize) {
    let start = pos(rng, len);
    let end = start + rng.random_range(0..=max.min(len - start));
    (start, end)
}

fn binary_step(rng: &mut SmallRng, data: &mut Vec<u8>, other: &[u8]) {
    let len = data.len();
    match rng.random_range(0..11) {
        0 if len > 0 => {
            let at = rng.random_range(0..len);
            data[at] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let at = rng.random_range(0..len);
            data[at] = rng.random();
        }
        2 => {
            let at = pos(rng, len);
            let n = rng.random_range(1..=8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            data.splice(at..at, bytes);
        }
        3 => {
            let (start, end) = range(rng, len, 16);
            data.drain(start..end);
        }
        4 => {
            let (start, end) = range(rng, len, 64);
            let chunk = data[start..end].to_vec();
            let at = pos(rng, len);
            data.splice(at..at, chunk);
        }
        5..=7 => {
            // Overwrite an aligned-or-not 1/2/4/8-byte field with a boundary value.
            let width = [1, 2, 4, 8][rng.random_range(0..4)];
            if len >= width {
                let at = rng.random_range(0..=len - width);
                let value = INTERESTING[rng.random_range(0..INTERESTING.len())];
                data[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
        }
        8 => {
            // Nudge a 4- or 8-byte little-endian field by a small amount.
            let width = if rng.random_bool(0.5) { 4 } else { 8 };
            if len >= width {
                let at = rng.random_range(0..=len - width);
                let mut field = [0u8; 8];
                field[..width].copy_from_slice(&data[at..at + width]);
                let delta = rng.random_range(1..=16u64);
                let value = if rng.random_bool(0.5) {
                    u64::from_le_bytes(field).wrapping_add(delta)
                } else {
                    u64::from_le_bytes(field).wrapping_sub(delta)
                };
                data[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
        }
        9 if !other.is_empty() => {
            // Splice: a prefix of this input and a suffix of the other.
            let cut = pos(rng, len);
            let from = rng.random_range(0..other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        _ => data.truncate(pos(rng, len)),
    }
}

fn json_step(rng: &mut SmallRng, data: &mut Vec<u8>, other: &[u8]) {
    let Ok(mut doc) = serde_json::from_slice::<Value>(data) else {
        return binary_step(rng, data, other);
    };
    let mut pointers = Vec::new();
    collect_pointers(&doc, String::new(), &mut pointers);
    let target = pointers[rng.random_range(0..pointers.len())].clone();
    let donor = pointers[rng.random_range(0..pointers.len())].clone();
    let donor_value = doc.pointer(&donor).cloned().unwrap_or(Value::Null);
    // Placeholder replaced textually after serialising, so that non-JSON numbers (NaN, 1e999)
    // and deep nesting reach the parser.
    const MARK: &str = "@@fuzz-mark@@";
    let mut fragment: Option<String> = None;
    let Some(slot) = doc.pointer_mut(&target) else { return };
    match rng.random_range(0..8) {
        0..=2 => fragment = Some(JSON_VALUES[rng.random_range(0..JSON_VALUES.len())].to_owned()),
        3 => {
            let depth = [64, 127, 128, 129, 1000][rng.random_range(0..5)];
            fragment = Some(format!("{}{}", "[".repeat(depth), "]".repeat(depth)));
        }
        4 => *slot = Value::String("A".repeat([256, 4096][rng.random_range(0..2)])),
        5 => *slot = donor_value,
        6 => match slot {
            Value::Object(map) if !map.is_empty() => {
                let key = map.keys().nth(rng.random_range(0..map.len())).cloned().unwrap_or_default();
                map.remove(&key);
            }
            Value::Array(items) if !items.is_empty() => {
                items.remove(rng.random_range(0..items.len()));
            }
            _ => *slot = Value::Null,
        },
        _ => match slot {
            Value::Object(map) => {
                const KEYS: [&str; 8] =
                    ["r", "num_hidden_layers", "chat_template", "model", "vocab", "added_tokens", "rope_scaling", "head_dim"];
                map.insert(KEYS[rng.random_range(0..KEYS.len())].to_owned(), donor_value);
            }
            Value::Array(items) => items.push(donor_value),
            _ => *slot = Value::Array(vec![donor_value]),
        },
    }
    if fragment.is_some() {
        *slot = Value::String(MARK.to_owned());
    }
    let Ok(text) = serde_json::to_string(&doc) else { return };
    *data = match fragment {
        Some(fragment) => text.replacen(&format!("\"{MARK}\""), &fragment, 1).into_bytes(),
        None => text.into_bytes(),
    };
}

/// JSON pointers of every value in `value` (at most 4096).
fn collect_pointers(value: &Value, at: String, out: &mut Vec<String>) {
    if out.len() >= 4096 {
        return;
    }
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                collect_pointers(child, format!("{at}/{}", key.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                collect_pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

fn jinja_step(rng: &mut SmallRng, data: &mut Vec<u8>) {
    let fragment = JINJA_FRAGMENTS[rng.random_range(0..JINJA_FRAGMENTS.len())].as_bytes();
    let len = data.len();
    if rng.random_bool(0.7) {
        let at = pos(rng, len);
        data.splice(at..at, fragment.iter().copied());
    } else {
        let (start, end) = range(rng, len, 32);
        data.splice(start..end, fragment.iter().copied());
    }
}
