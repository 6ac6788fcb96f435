//! A render's work budget: the cost of operators and filters that grows with their operands.
//!
//! minijinja's fuel counts instructions, and one instruction can do unbounded work: iterating
//! `[] * 10**9` (a lazily repeated empty sequence: no item, so no fuel spent, 10^9 steps),
//! `-1 in range(100000)` inside a loop, `s ~ s` doubling a string, comparing or printing a
//! value nested 100,000 lists deep (a stack overflow). Before compiling, `bound_operators`
//! rewrites the template so that this work goes through two functions of this module:
//!
//! - `a * b` becomes `__firstrt_mul(a, b)` (`bounded_mul`): a repeated string or sequence is
//!   built eagerly and costs its length; everything else is minijinja's own `*`.
//! - `a + b` becomes `__firstrt_add(a, b)` (`bounded_add`): two sequences are joined eagerly
//!   (minijinja's lazy join of joins makes each item cost one step per level); both operands
//!   are charged.
//! - the operands of `~`, comparisons (`==`, `<`, `in`, ...), the input of every filter,
//!   the items of list and map literals and the arguments of calls become
//!   `__firstrt_charge(x)` (`charge_value`): `x` unchanged, after charging its size.
//!
//! The size of a value is 1 plus its bytes (a string) or the sizes of its items (a sized list
//! or map, walked without recursion); the walk refuses a value nested deeper than
//! [`MAX_VALUE_DEPTH`]. Printing, the guarded filters of `model::chat` and Python methods charge
//! too. Over [`MAX_TEMPLATE_WORK`] in one render is
//! [`TokenizerError::TemplateLimit`](crate::model::tokenizer::TokenizerError::TemplateLimit).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use minijinja::machinery::ast::{self, BinOpKind, CallArg, Expr, Stmt};
use minijinja::machinery::{Span, WhitespaceConfig, parse};
use minijinja::value::{Object, Value, ValueKind};
use minijinja::{Environment, Error, Expression, State, context};

use super::{MAX_SEQUENCE_ITEMS, over_limit};

/// Units of work (bytes of strings, items of sequences and maps handled by operators, filters
/// and printing) one render may spend: about a second of the slowest kind of step, and far
/// above what a template spends on a conversation that fills a context window.
pub const MAX_TEMPLATE_WORK: u64 = 1 << 24;
/// Deepest nesting of lists and maps an operator, a filter or printing accepts (their
/// comparisons, formatting and serialisation recurse once per level).
pub const MAX_VALUE_DEPTH: usize = 256;

/// Name of the function `a * b` is rewritten to.
pub(super) const MUL_FUNCTION: &str = "__firstrt_mul";
/// Name of the function `a + b` is rewritten to.
pub(super) const ADD_FUNCTION: &str = "__firstrt_add";
/// Name of the function that charges an operand.
pub(super) const CHARGE_FUNCTION: &str = "__firstrt_charge";
/// Prefix of the names above, which a template may not use itself.
pub(super) const RESERVED_PREFIX: &str = "__firstrt";

/// Key of the render's [`WorkLeft`] among minijinja's per-render temporaries.
const WORK_TEMP: &str = "firstrt work left";

/// The work a render has left ([`MAX_TEMPLATE_WORK`] at its start).
#[derive(Debug)]
struct WorkLeft(AtomicU64);

impl Object for WorkLeft {}

/// Takes `units` off the render's budget. Errors: over [`MAX_TEMPLATE_WORK`].
pub(super) fn charge(state: &State, units: u64) -> Result<(), Error> {
    let left = state.get_or_set_temp_object(WORK_TEMP, || WorkLeft(AtomicU64::new(MAX_TEMPLATE_WORK)));
    let taken = left.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |rest| rest.checked_sub(units));
    taken.map(|_| ()).map_err(|_| over_limit("units of work (bytes and items handled by operators and filters)", MAX_TEMPLATE_WORK))
}

/// The size of `value` (see the module's documentation), walked only up to `limit`: the result
/// is `limit + 1` when it is larger. Errors: nested deeper than [`MAX_VALUE_DEPTH`].
fn size_of(value: &Value, limit: u64) -> Result<u64, Error> {
    let mut total = 0u64;
    let mut stack = vec![(value.clone(), 0usize)];
    while let Some((value, depth)) = stack.pop() {
        if depth > MAX_VALUE_DEPTH {
            return Err(over_limit("levels of nesting in one value", MAX_VALUE_DEPTH as u64));
        }
        total = total.saturating_add(1);
        match value.kind() {
            ValueKind::String | ValueKind::Bytes => {
                total = total.saturating_add(value.as_str().map_or_else(|| value.as_bytes().map_or(0, <[u8]>::len), str::len) as u64);
            }
            // Only sized containers are walked: an unsized iterable may iterate once only.
            ValueKind::Seq | ValueKind::Map | ValueKind::Iterable if value.len().is_some() => {
                let is_map = value.kind() == ValueKind::Map;
                for item in value.try_iter()? {
                    if is_map {
                        stack.push((value.get_item(&item)?, depth + 1));
                    }
                    stack.push((item, depth + 1));
                    total = total.saturating_add(1);
                    if total > limit {
                        break;
                    }
                }
            }
            _ => {}
        }
        if total > limit {
            return Ok(limit + 1);
        }
    }
    Ok(total)
}

/// Charges the size of `value` to the render's budget.
pub(super) fn charge_value(state: &State, value: &Value) -> Result<(), Error> {
    charge(state, size_of(value, MAX_TEMPLATE_WORK)?)
}

/// `__firstrt_charge(value)`: `value`, after charging its size.
pub(super) fn charge_function(state: &State, value: Value) -> Result<Value, Error> {
    charge_value(state, &value)?;
    Ok(value)
}

/// An environment of its own for minijinja's operators, evaluated as expressions.
static OPERATORS: LazyLock<Environment<'static>> = LazyLock::new(Environment::new);
/// minijinja's own `a * b`, for what [`bounded_mul`] does not build itself.
static MINIJINJA_MUL: LazyLock<Option<Expression<'static, 'static>>> = LazyLock::new(|| OPERATORS.compile_expression("a * b").ok());
/// minijinja's own `a + b`, for what [`bounded_add`] does not build itself.
static MINIJINJA_ADD: LazyLock<Option<Expression<'static, 'static>>> = LazyLock::new(|| OPERATORS.compile_expression("a + b").ok());

fn minijinja_operator(operator: &LazyLock<Option<Expression<'static, 'static>>>, a: Value, b: Value) -> Result<Value, Error> {
    match &**operator {
        Some(expression) => expression.eval(context! { a, b }),
        None => Err(Error::new(minijinja::ErrorKind::InvalidOperation, "a built-in operator failed to compile")),
    }
}

fn minijinja_mul(a: Value, b: Value) -> Result<Value, Error> {
    minijinja_operator(&MINIJINJA_MUL, a, b)
}

/// A list, tuple or other sequence (minijinja repeats and joins these lazily).
fn is_sequence(value: &Value) -> bool {
    value.as_object().is_some() && matches!(value.kind(), ValueKind::Seq | ValueKind::Iterable)
}

/// `__firstrt_add(a, b)`, the rewritten `a + b`: both operands are charged; two sized sequences
/// are joined into a list of at most [`MAX_SEQUENCE_ITEMS`] items (minijinja joins lazily, and a join of joins `n` deep costs `n` steps
/// per item); everything else is minijinja's `+`, with its errors.
pub(super) fn bounded_add(state: &State, a: Value, b: Value) -> Result<Value, Error> {
    charge_value(state, &a)?;
    charge_value(state, &b)?;
    if is_sequence(&a)
        && is_sequence(&b)
        && let (Some(a_len), Some(b_len)) = (a.len(), b.len())
    {
        if a_len.saturating_add(b_len) > MAX_SEQUENCE_ITEMS {
            return Err(over_limit("items in one sequence", MAX_SEQUENCE_ITEMS as u64));
        }
        let joined: Vec<Value> = a.try_iter()?.chain(b.try_iter()?).collect();
        return Ok(Value::from(joined));
    }
    minijinja_operator(&MINIJINJA_ADD, a, b)
}

/// `__firstrt_mul(a, b)`, the rewritten `a * b`. A string repeated `n` times costs its length
/// in bytes; a sequence of `len` items repeated `n` times is built eagerly (minijinja's is lazy:
/// `[] * 10**9` would cost nothing to make and 10^9 steps to iterate), at most
/// [`MAX_SEQUENCE_ITEMS`] items, and costs `len * n`.
/// Operands of other types, and counts that are not integers, go to minijinja's `*`, with its
/// errors.
pub(super) fn bounded_mul(state: &State, a: Value, b: Value) -> Result<Value, Error> {
    // The same order of cases as minijinja's `ops::mul`: a string on either side first.
    if let Some((text, count)) = a.as_str().map(|s| (s, &b)).or_else(|| b.as_str().map(|s| (s, &a))) {
        if let Some(count) = count.as_usize() {
            charge(state, (text.len() as u64).saturating_mul(count as u64))?;
        }
        return minijinja_mul(a, b);
    }
    let operands = if is_sequence(&a) {
        Some((&a, &b))
    } else if is_sequence(&b) {
        Some((&b, &a))
    } else {
        None
    };
    if let Some((sequence, count)) = operands
        && let (Some(count), Some(len)) = (count.as_usize(), sequence.len())
    {
        if len == 0 || count == 0 {
            return Ok(Value::from(Vec::<Value>::new()));
        }
        let items = len.saturating_mul(count);
        if items > MAX_SEQUENCE_ITEMS {
            return Err(over_limit("items in one sequence", MAX_SEQUENCE_ITEMS as u64));
        }
        charge(state, items as u64)?;
        let items: Vec<Value> = sequence.try_iter()?.collect();
        let mut repeated = Vec::with_capacity(items.len() * count);
        for _ in 0..count {
            repeated.extend(items.iter().cloned());
        }
        return Ok(Value::from(repeated));
    }
    minijinja_mul(a, b)
}

/// One change to the template's source: the bytes `start..end` become `text`.
struct Edit {
    start: usize,
    end: usize,
    text: &'static str,
}

/// Rewrites `source` as the module's documentation says. A source that does not parse is
/// returned unchanged, for the compiler to report its syntax error; `None` when the edits
/// overlap (a span minijinja's parser reports otherwise than this module expects).
pub(super) fn bound_operators(source: &str) -> Option<String> {
    let whitespace = WhitespaceConfig { keep_trailing_newline: false, lstrip_blocks: true, trim_blocks: true };
    let Ok(template) = parse(source, "chat", Default::default(), whitespace) else {
        return Some(source.to_string());
    };
    let mut rewrite = Rewrite { edits: Vec::new() };
    rewrite.stmt(&template);
    // Stable: edits at the same position keep the order of the walk (outer openings first,
    // inner closings first).
    rewrite.edits.sort_by_key(|edit| edit.start);
    let mut out = String::with_capacity(source.len() + rewrite.edits.len() * 20);
    let mut done = 0;
    for edit in &rewrite.edits {
        if edit.start < done || edit.end < edit.start {
            return None;
        }
        out.push_str(source.get(done..edit.start)?);
        out.push_str(edit.text);
        done = edit.end;
    }
    out.push_str(source.get(done..)?);
    Some(out)
}

fn span_of(expr: &Expr) -> Span {
    match expr {
        Expr::Var(e) => e.span(),
        Expr::Const(e) => e.span(),
        Expr::Slice(e) => e.span(),
        Expr::UnaryOp(e) => e.span(),
        Expr::BinOp(e) => e.span(),
        Expr::Compare(e) => e.span(),
        Expr::IfExpr(e) => e.span(),
        Expr::Filter(e) => e.span(),
        Expr::Test(e) => e.span(),
        Expr::GetAttr(e) => e.span(),
        Expr::GetItem(e) => e.span(),
        Expr::Call(e) => e.span(),
        Expr::List(e) => e.span(),
        Expr::Map(e) => e.span(),
    }
}

fn call_args<'e, 'a>(args: &'e [CallArg<'a>]) -> impl Iterator<Item = &'e Expr<'a>> {
    args.iter().map(|arg| match arg {
        CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) | CallArg::KwargSplat(e) => e,
    })
}

/// The direct subexpressions of `expr`, in source order.
fn children<'e, 'a>(expr: &'e Expr<'a>) -> Vec<&'e Expr<'a>> {
    match expr {
        Expr::Var(_) | Expr::Const(_) => Vec::new(),
        Expr::Slice(e) => [Some(&e.expr), e.start.as_ref(), e.stop.as_ref(), e.step.as_ref()].into_iter().flatten().collect(),
        Expr::UnaryOp(e) => vec![&e.expr],
        Expr::BinOp(e) => vec![&e.left, &e.right],
        Expr::Compare(e) => std::iter::once(&e.expr).chain(e.ops.iter().map(|op| &op.expr)).collect(),
        Expr::IfExpr(e) => [Some(&e.true_expr), Some(&e.test_expr), e.false_expr.as_ref()].into_iter().flatten().collect(),
        Expr::Filter(e) => e.expr.iter().chain(call_args(&e.args)).collect(),
        Expr::Test(e) => std::iter::once(&e.expr).chain(call_args(&e.args)).collect(),
        Expr::GetAttr(e) => vec![&e.expr],
        Expr::GetItem(e) => vec![&e.expr, &e.subscript_expr],
        Expr::Call(e) => std::iter::once(&e.expr).chain(call_args(&e.args)).collect(),
        Expr::List(e) => e.items.iter().collect(),
        Expr::Map(e) => e.keys.iter().zip(&e.values).flat_map(|(k, v)| [k, v]).collect(),
    }
}

/// The bytes of `expr` in the source: its span joined with its subexpressions'. The parser
/// starts a filter's or test's span at its name (after the filtered value) and a comparison's
/// or `if` expression's at the token before it; the subexpressions' spans are right.
fn range_of(expr: &Expr) -> (usize, usize) {
    let span = span_of(expr);
    let own_start_is_right = !matches!(expr, Expr::Compare(_) | Expr::IfExpr(_));
    let mut start = if own_start_is_right { span.start_offset as usize } else { usize::MAX };
    let mut end = span.end_offset as usize;
    for child in children(expr) {
        let (child_start, child_end) = range_of(child);
        start = start.min(child_start);
        end = end.max(child_end);
    }
    if start == usize::MAX { (span.start_offset as usize, end) } else { (start, end) }
}

struct Rewrite {
    edits: Vec<Edit>,
}

impl Rewrite {
    fn edit(&mut self, start: usize, end: usize, text: &'static str) {
        self.edits.push(Edit { start, end, text });
    }

    fn stmts(&mut self, stmts: &[Stmt]) {
        for stmt in stmts {
            self.stmt(stmt);
        }
    }

    fn stmt(&mut self, stmt: &Stmt) {
        match stmt {
            Stmt::Template(s) => self.stmts(&s.children),
            Stmt::EmitExpr(s) => self.expr(&s.expr),
            Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) => {}
            // Assignment targets (`for a, b in`, `set a, b =`, `with`, import names) are left as
            // they are: a call is not a target.
            Stmt::ForLoop(s) => {
                self.expr(&s.iter);
                if let Some(filter) = &s.filter_expr {
                    self.expr(filter);
                }
                self.stmts(&s.body);
                self.stmts(&s.else_body);
            }
            Stmt::IfCond(s) => {
                self.expr(&s.expr);
                self.stmts(&s.true_body);
                self.stmts(&s.false_body);
            }
            Stmt::WithBlock(s) => {
                for (_, value) in &s.assignments {
                    self.expr(value);
                }
                self.stmts(&s.body);
            }
            Stmt::Set(s) => self.expr(&s.expr),
            Stmt::SetBlock(s) => {
                if let Some(filter) = &s.filter {
                    self.expr(filter);
                }
                self.stmts(&s.body);
            }
            Stmt::AutoEscape(s) => {
                self.expr(&s.enabled);
                self.stmts(&s.body);
            }
            Stmt::FilterBlock(s) => {
                self.expr(&s.filter);
                self.stmts(&s.body);
            }
            Stmt::Block(s) => self.stmts(&s.body),
            Stmt::Import(s) => self.expr(&s.expr),
            Stmt::FromImport(s) => self.expr(&s.expr),
            Stmt::Extends(s) => self.expr(&s.name),
            Stmt::Include(s) => self.expr(&s.name),
            Stmt::Macro(s) => self.macro_decl(s),
            Stmt::CallBlock(s) => {
                self.call(&s.call);
                self.macro_decl(&s.macro_decl);
            }
            Stmt::Do(s) => self.call(&s.call),
        }
    }

    fn macro_decl(&mut self, decl: &ast::Macro) {
        for default in &decl.defaults {
            self.expr(default);
        }
        self.stmts(&decl.body);
    }

    fn call(&mut self, call: &ast::Call) {
        self.expr(&call.expr);
        for arg in call_args(&call.args) {
            self.charged(arg);
        }
    }

    /// `expr` as an operand whose size is charged (a constant's is bounded by the source).
    fn charged(&mut self, expr: &Expr) {
        if matches!(expr, Expr::Const(_)) {
            return;
        }
        let (start, end) = range_of(expr);
        self.edit(start, start, "__firstrt_charge(");
        self.expr(expr);
        self.edit(end, end, ")");
    }

    fn expr(&mut self, expr: &Expr) {
        match expr {
            Expr::BinOp(e) if matches!(e.op, BinOpKind::Mul | BinOpKind::Add) => {
                let (start, end) = range_of(expr);
                let (left_start, left_end) = range_of(&e.left);
                let (right_start, right_end) = range_of(&e.right);
                let function = if matches!(e.op, BinOpKind::Mul) { "__firstrt_mul(" } else { "__firstrt_add(" };
                // Parentheses around an operand are dropped with the operator.
                self.edit(start, left_start, function);
                self.expr(&e.left);
                self.edit(left_end, right_start, ", ");
                self.expr(&e.right);
                self.edit(right_end, end, ")");
            }
            // `==`, `<`, `in`, ... are binary operators; a chain (`a < b < c`) is a `Compare`.
            Expr::BinOp(e)
                if matches!(
                    e.op,
                    BinOpKind::Concat
                        | BinOpKind::Eq
                        | BinOpKind::Ne
                        | BinOpKind::Lt
                        | BinOpKind::Lte
                        | BinOpKind::Gt
                        | BinOpKind::Gte
                        | BinOpKind::In
                ) =>
            {
                self.charged(&e.left);
                self.charged(&e.right);
            }
            Expr::Compare(e) => {
                self.charged(&e.expr);
                for op in &e.ops {
                    self.charged(&op.expr);
                }
            }
            Expr::Filter(e) => {
                if let Some(input) = &e.expr {
                    self.charged(input);
                }
                for arg in call_args(&e.args) {
                    self.charged(arg);
                }
            }
            Expr::Call(e) => {
                self.expr(&e.expr);
                for arg in call_args(&e.args) {
                    self.charged(arg);
                }
            }
            Expr::List(e) => {
                for item in &e.items {
                    self.charged(item);
                }
            }
            Expr::Map(e) => {
                for (key, value) in e.keys.iter().zip(&e.values) {
                    self.charged(key);
                    self.charged(value);
                }
            }
            _ => {
                for child in children(expr) {
                    self.expr(child);
                }
            }
        }
    }
}
