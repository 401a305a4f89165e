//! The `.fir` text format: [`print`] writes a graph's canonical text, [`parse`] reads it back.
//!
//! Print → parse → print is the identity. The printer numbers nodes `%0, %1, …` in node order (which is a
//! topological order); a hand-written file may use any unique numbers, each defined before its first use.
//! The printer writes a reference to a one-output node as `%N` and one to a node with several outputs (such
//! as `topk`) always with its output number, `%N#0`, `%N#1`.
//!
//! ```text
//! file    := 'graph' (IDENT | STRING) '{' stmt* '}'
//! stmt    := node | output
//! node    := VALUE [STRING] '=' ( ('input' | 'param') STRING ':' type
//!                               | OPNAME ['[' attr (',' attr)* ']'] '(' [ref (',' ref)*] ')' [':' types]
//!                               | 'fused' '(' [ref (',' ref)*] ')' [':' types] '{' stmt* '}' )
//! output  := 'output' STRING '=' ref
//! VALUE   := '%' INT              (a node's id)
//! ref     := '%' INT ['#' INT]    (output #k of that node; '#0' may be omitted)
//! types   := type | '(' type (',' type)* ')'
//! type    := DTYPE '[' [dim (',' dim)*] ']'           e.g. f32[B*T, 128], i64[]
//! attr    := IDENT '=' value
//! value   := '[' [value (',' value)*] ']' | STRING | 'true' | 'false' | FLOAT | 'nan' | 'inf' | '-inf' | dimexpr
//! comment := '//' to end of line (anywhere whitespace may be)
//! ```
//!
//! - `IDENT` is `[A-Za-z_][A-Za-z0-9_.]*`; `STRING` is double-quoted, on one line, with the escapes `\"`, `\\`,
//!   `\n`, `\t`, `\r` and `\u{HEX}` (the printer side is [`crate::op::quote`]).
//! - `dim` and `dimexpr` are [`crate::dim::parse_dim`] expressions (`B*T`, `T - 1`, `ceildiv(T, 256)`). A
//!   constant `dimexpr` is an [`AttrValue::Int`], any other an [`AttrValue::Dim`]; a lone identifier (`f32`) is
//!   a `Dim` holding one symbol, which is how dtype-valued attributes travel.
//! - A number with a `.` or an exponent (`1e-5`, `-2.5`, `3.0`) is an [`AttrValue::Float`], as are `nan`,
//!   `inf` and `-inf`.
//! - The `: types` annotation of a node is optional when parsing; when present it must equal the inferred
//!   output types. The printer always writes it, as a parenthesised tuple for nodes with several outputs.
//! - A `fused` node's body is a nested block after it, indented one level deeper, as MLIR prints regions: a
//!   graph of its own (inputs `arg0`, `arg1`, … and one output; its value numbers are its own). The form
//!   `fused[body="graph fused { ... }"](...)` of earlier files is read too; the printer writes the block.
//!
//! ```text
//!   %5 "layers.0.fused" = fused(%3, %4) : f32[B, 64] {
//!     %0 = input "arg0" : f32[B, 64]
//!     %1 = input "arg1" : f32[B, 64]
//!     %2 = mul(%0, %1) : f32[B, 64]
//!     %3 = silu(%2) : f32[B, 64]
//!     output "out" = %3
//!   }
//! ```
//!
//! ```text
//! graph mlp {
//!   %0 = input "x" : f32[B, 64]
//!   %1 = param "w1" : f32[64, 128]
//!   %2 = matmul(%0, %1) : f32[B, 128]
//!   %3 "blk.act" = silu(%2) : f32[B, 128]
//!   %4 = topk[k=2, axis=-1](%3) : (f32[B, 2], i64[B, 2])
//!   output "y" = %4#0
//! }
//! ```
//!
//! Every error is an [`IrError::Parse`] with a 1-based line and column (counted in characters). Errors from
//! building the graph (shape inference, duplicate input names) are reported at the offending node's statement.
//! The parser never panics: nesting is bounded ([`MAX_DEPTH`]), input-derived values are never unwrapped, and
//! the text handed to [`crate::dim::parse_dim`] is bounded so that parsing stays linear in the input. Dimension
//! arithmetic and type inference use unchecked integer arithmetic, which panics on overflow when overflow checks
//! are on (`f32[4611686018427387904 * 4]`); the parser catches such a panic and reports it as an error at the
//! dimension or node.

use crate::dim::{parse_dim, DimParseError};
use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::graph::{Graph, NodeId, Value};
use crate::op::{quote, AttrValue, Op};
use crate::types::TensorType;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The deepest nesting of attribute lists the parser accepts.
pub const MAX_DEPTH: usize = 64;

/// The longest excerpt of the input quoted in an error message, in characters.
const SNIPPET: usize = 40;

// ------------------------------------------------------------------------------------------------ printer

/// Writes the canonical text of a graph.
///
/// ```
/// use fulgur_ir::{text, DType, Dim, Graph};
/// let mut g = Graph::new("double");
/// let x = g.input("x", DType::F32, vec![Dim::sym("N")]).unwrap();
/// let y = g.add(x, x).unwrap();
/// g.add_output("y", y).unwrap();
/// let s = text::print(&g);
/// assert_eq!(
///     s,
///     "graph double {\n  %0 = input \"x\" : f32[N]\n  %1 = add(%0, %0) : f32[N]\n  output \"y\" = %1\n}\n"
/// );
/// assert_eq!(text::print(&text::parse(&s).unwrap()), s);
/// ```
pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    let name = if is_ident(&g.name) {
        g.name.clone()
    } else {
        quote(&g.name)
    };
    let _ = writeln!(s, "graph {name} {{");
    print_body(&mut s, g, "  ");
    s.push_str("}\n");
    s
}

/// The statements of a graph, each line indented by `indent`; a `fused` node's body follows it as a nested
/// block, indented one level deeper.
fn print_body(s: &mut String, g: &Graph, indent: &str) {
    for (id, n) in g.nodes() {
        let _ = write!(s, "{indent}%{}", id.index());
        if let Some(name) = &n.name {
            let _ = write!(s, " {}", quote(name));
        }
        s.push_str(" = ");
        match &n.op {
            Op::Input { name, ty } => {
                let _ = write!(s, "input {} : {ty}", quote(name));
            }
            Op::Param { name, ty } => {
                let _ = write!(s, "param {} : {ty}", quote(name));
            }
            op => {
                s.push_str(op.name());
                let body = match op {
                    Op::Composite(crate::op::Composite::Fused { body }) => Some(body),
                    _ => None,
                };
                // a fused body is written as a block after the node, not as an attribute
                let attrs: Vec<(&str, AttrValue)> = if body.is_some() { Vec::new() } else { op.attrs() };
                if !attrs.is_empty() {
                    s.push('[');
                    for (i, (k, v)) in attrs.iter().enumerate() {
                        if i > 0 {
                            s.push_str(", ");
                        }
                        let _ = write!(s, "{k}={v}");
                    }
                    s.push(']');
                }
                s.push('(');
                for (i, v) in n.inputs.iter().enumerate() {
                    if i > 0 {
                        s.push_str(", ");
                    }
                    write_ref(s, g, *v);
                }
                s.push_str(") : ");
                if n.outputs.len() == 1 {
                    let _ = write!(s, "{}", n.outputs[0]);
                } else {
                    s.push('(');
                    for (i, t) in n.outputs.iter().enumerate() {
                        if i > 0 {
                            s.push_str(", ");
                        }
                        let _ = write!(s, "{t}");
                    }
                    s.push(')');
                }
                if let Some(body) = body {
                    s.push_str(" {\n");
                    print_body(s, body.graph(), &format!("{indent}  "));
                    s.push_str(indent);
                    s.push('}');
                }
            }
        }
        s.push('\n');
    }
    for (name, v) in g.outputs() {
        let _ = write!(s, "{indent}output {} = ", quote(name));
        write_ref(s, g, *v);
        s.push('\n');
    }
}

/// `%N` for the output of a one-output node, `%N#K` for output `K` of a node with several (`#0` included, so
/// the reader sees which output is meant).
fn write_ref(s: &mut String, g: &Graph, v: Value) {
    if g.node(v.node).outputs.len() == 1 && v.index == 0 {
        let _ = write!(s, "%{}", v.node.index());
    } else {
        let _ = write!(s, "%{}#{}", v.node.index(), v.index);
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_continue(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

/// Whether `s` is an `IDENT` (`[A-Za-z_][A-Za-z0-9_.]*`).
fn is_ident(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(is_ident_start) && cs.all(is_ident_continue)
}

fn fmt_types(ts: &[TensorType]) -> String {
    if ts.len() == 1 {
        ts[0].to_string()
    } else {
        format!("({})", ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "))
    }
}

/// At most [`SNIPPET`] characters of `s`, with `…` when cut.
fn snippet(s: &str) -> String {
    match s.char_indices().nth(SNIPPET) {
        Some((i, _)) => format!("{}…", s.get(..i).unwrap_or("")),
        None => s.to_string(),
    }
}

// ------------------------------------------------------------------------------------------------- parser

/// Parses a `.fir` text into a graph. See the [module documentation](self) for the grammar.
///
/// ```
/// use fulgur_ir::{text, IrError};
/// let err = text::parse("graph g {\n  %0 = input \"x\" : f32[B]\n  %1 = exp(%0 ; f32[B]\n}").unwrap_err();
/// assert_eq!(err, IrError::Parse {
///     line: 3,
///     col: 15,
///     message: "expected `)` after the inputs of `exp`, found `;`".into(),
/// });
/// ```
pub fn parse(src: &str) -> Result<Graph> {
    let mut p = Parser {
        src,
        pos: 0,
        ids: HashMap::new(),
        in_body: false,
    };
    p.file().map_err(|e| {
        let (line, col) = line_col(src, e.pos);
        IrError::Parse {
            line,
            col,
            message: e.message,
        }
    })
}

/// An error at a byte offset; turned into line:col once, at the end.
/// Parses an op with its attributes as the text format writes it (`reduce_sum[axes=[-1], keepdims=true]`),
/// without inputs. Used where ops travel as text (e.g. the optimizer's e-graph patterns).
pub fn parse_op(src: &str) -> std::result::Result<Op, String> {
    let mut p = Parser {
        src,
        pos: 0,
        ids: HashMap::new(),
        in_body: false,
    };
    p.skip_ws();
    let at = p.pos;
    let name = p.ident().ok_or_else(|| format!("expected an op name at offset {at}"))?;
    let attrs = p
        .attr_list(name)
        .map_err(|e| format!("at offset {}: {}", e.pos, e.message))?;
    p.skip_ws();
    if p.pos != src.len() {
        return Err(format!("unexpected `{}` after `{name}`", snippet(p.rest())));
    }
    Op::from_parts(name, &attrs)
}

struct PErr {
    pos: usize,
    message: String,
}

type PResult<T> = std::result::Result<T, PErr>;

/// 1-based line and column (in characters) of a byte offset.
fn line_col(src: &str, pos: usize) -> (usize, usize) {
    let mut p = pos.min(src.len());
    while p > 0 && !src.is_char_boundary(p) {
        p -= 1;
    }
    let before = src.get(..p).unwrap_or("");
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).unwrap_or("").chars().count() + 1;
    (line, col)
}

/// The text of a panic payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// [`parse_dim`], turning a panic inside dimension arithmetic (an `i64` overflow, with overflow checks on)
/// into an error instead of unwinding through the parser.
fn parse_dim_guarded(s: &str) -> std::result::Result<(crate::Dim, usize), DimParseError> {
    match catch_unwind(AssertUnwindSafe(|| parse_dim(s))) {
        Ok(r) => r,
        Err(p) => Err(DimParseError {
            offset: 0,
            message: format!(
                "dimension expression `{}` cannot be evaluated: {}",
                snippet(s.trim()),
                panic_message(p.as_ref())
            ),
        }),
    }
}

struct Parser<'a> {
    src: &'a str,
    /// Byte offset, always on a char boundary.
    pos: usize,
    /// Source value number → (node, byte offset of its definition, number of outputs).
    ids: HashMap<usize, (NodeId, usize, usize)>,
    /// Inside a `fused` body block.
    in_body: bool,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        self.src.get(self.pos..).unwrap_or("")
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self, c: char) {
        self.pos += c.len_utf8();
    }

    fn err<T>(&self, pos: usize, message: impl Into<String>) -> PResult<T> {
        Err(PErr {
            pos,
            message: message.into(),
        })
    }

    /// Skips whitespace and `//` comments.
    fn skip_ws(&mut self) {
        loop {
            let rest = self.rest();
            match rest.chars().next() {
                Some(c) if c.is_whitespace() => self.bump(c),
                Some('/') if rest.starts_with("//") => match rest.find('\n') {
                    Some(i) => self.pos += i + 1,
                    None => self.pos = self.src.len(),
                },
                _ => return,
            }
        }
    }

    /// Describes what stands at `pos`, for "found …" in messages.
    fn found_at(&self, pos: usize) -> String {
        let rest = self.src.get(pos..).unwrap_or("");
        let mut cs = rest.chars();
        let Some(c) = cs.next() else {
            return "end of input".to_string();
        };
        // the token's text: up to the first character after the first that fails `pred`
        let token = |pred: fn(char) -> bool| {
            let end = rest
                .char_indices()
                .skip(1)
                .find(|&(_, c)| !pred(c))
                .map_or(rest.len(), |(i, _)| i);
            format!("`{}`", snippet(rest.get(..end).unwrap_or("")))
        };
        let negative_number = c == '-' && cs.next().is_some_and(|d| d.is_ascii_digit());
        if is_ident_start(c) || c.is_ascii_digit() || negative_number {
            token(is_ident_continue)
        } else if c == '%' {
            token(|c| c.is_ascii_digit() || c == '#')
        } else if c == '"' {
            "a string".to_string()
        } else {
            format!("`{}`", c.escape_debug())
        }
    }

    fn found(&self) -> String {
        self.found_at(self.pos)
    }

    /// Skips whitespace, then consumes `c` if it comes next.
    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.bump(c);
            true
        } else {
            false
        }
    }

    /// Skips whitespace, then consumes `c` or fails with "expected `c` {context}, found …".
    fn expect(&mut self, c: char, context: &str) -> PResult<()> {
        if self.eat(c) {
            Ok(())
        } else {
            self.err(self.pos, format!("expected `{c}` {context}, found {}", self.found()))
        }
    }

    /// The identifier at the current position, not consumed.
    fn peek_ident(&self) -> Option<&'a str> {
        let rest = self.rest();
        if !rest.chars().next().is_some_and(is_ident_start) {
            return None;
        }
        let end = rest.find(|c: char| !is_ident_continue(c)).unwrap_or(rest.len());
        rest.get(..end)
    }

    /// Consumes the identifier at the current position.
    fn ident(&mut self) -> Option<&'a str> {
        let id = self.peek_ident()?;
        self.pos += id.len();
        Some(id)
    }

    /// An unsigned decimal at the current position (no whitespace skipped); `what` names it in errors.
    fn uint(&mut self, what: &str) -> PResult<usize> {
        let rest = self.rest();
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let digits = rest.get(..end).unwrap_or("");
        if digits.is_empty() {
            return self.err(self.pos, format!("expected {what}, found {}", self.found()));
        }
        match digits.parse::<usize>() {
            Ok(n) => {
                self.pos += end;
                Ok(n)
            }
            Err(_) => self.err(self.pos, format!("{what} `{}` is too large", snippet(digits))),
        }
    }

    /// A `STRING` at the current position (which holds `"`).
    fn string(&mut self) -> PResult<String> {
        let open = self.pos;
        if self.peek() != Some('"') {
            return self.err(self.pos, format!("expected a string, found {}", self.found()));
        }
        self.pos += 1;
        let mut out = String::new();
        loop {
            let rest = self.rest();
            let Some(i) = rest.find(['"', '\\', '\n']) else {
                return self.err(open, "unterminated string: no closing `\"`");
            };
            out.push_str(rest.get(..i).unwrap_or(""));
            let c = rest.get(i..).and_then(|r| r.chars().next()).unwrap_or('"');
            self.pos += i + 1;
            match c {
                '"' => return Ok(out),
                '\n' => return self.err(open, "unterminated string: no closing `\"` before the end of the line"),
                _ => {
                    let esc = self.pos - 1;
                    match self.peek() {
                        Some('"') => out.push('"'),
                        Some('\\') => out.push('\\'),
                        Some('n') => out.push('\n'),
                        Some('t') => out.push('\t'),
                        Some('r') => out.push('\r'),
                        Some('u') => {
                            self.pos += 1;
                            out.push(self.unicode_escape(esc)?);
                            continue;
                        }
                        Some(other) => {
                            return self.err(
                                esc,
                                format!(
                                    "unknown escape `\\{}` in a string (expected \\\" \\\\ \\n \\t \\r or \\u{{HEX}})",
                                    other.escape_debug()
                                ),
                            )
                        }
                        None => return self.err(open, "unterminated string: no closing `\"`"),
                    }
                    self.pos += 1;
                }
            }
        }
    }

    /// The `{HEX}` of a `\u{HEX}` escape (the `\u` at `esc` is consumed).
    fn unicode_escape(&mut self, esc: usize) -> PResult<char> {
        let bad = |p: &Self| {
            p.err(
                esc,
                "invalid escape: expected `\\u{HEX}` with 1 to 6 hex digits naming a character",
            )
        };
        if self.peek() != Some('{') {
            return bad(self);
        }
        self.pos += 1;
        let rest = self.rest();
        let end = rest.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(rest.len());
        let hex = rest.get(..end).unwrap_or("");
        if hex.is_empty() || hex.len() > 6 || !rest.get(end..).is_some_and(|r| r.starts_with('}')) {
            return bad(self);
        }
        let Some(c) = u32::from_str_radix(hex, 16).ok().and_then(char::from_u32) else {
            return bad(self);
        };
        self.pos += end + 1;
        Ok(c)
    }

    // -------------------------------------------------------------------------------------- statements

    fn file(&mut self) -> PResult<Graph> {
        self.skip_ws();
        if self.peek_ident() != Some("graph") {
            return self.err(
                self.pos,
                format!("expected `graph` at the start of the file, found {}", self.found()),
            );
        }
        self.pos += "graph".len();
        self.skip_ws();
        let name = if self.peek() == Some('"') {
            self.string()?
        } else if let Some(id) = self.ident() {
            id.to_string()
        } else {
            return self.err(
                self.pos,
                format!(
                    "expected the graph's name (an identifier or a string) after `graph`, found {}",
                    self.found()
                ),
            );
        };
        self.expect('{', "after the graph's name")?;
        let mut g = Graph::new(name);
        self.block(&mut g, "the graph")?;
        self.skip_ws();
        if self.pos < self.src.len() {
            return self.err(
                self.pos,
                format!("expected end of input after the graph's `}}`, found {}", self.found()),
            );
        }
        Ok(g)
    }

    /// Statements up to and including the closing `}` of `what` (the graph, or a `fused` body).
    fn block(&mut self, g: &mut Graph, what: &str) -> PResult<()> {
        loop {
            self.skip_ws();
            match self.peek() {
                Some('}') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some('%') => self.node(g)?,
                Some(_) if self.peek_ident() == Some("output") => self.output(g)?,
                None => {
                    return self.err(
                        self.pos,
                        format!("expected `}}` at the end of {what}, found end of input"),
                    )
                }
                Some(_) => {
                    return self.err(
                        self.pos,
                        format!(
                            "expected a node `%N = ...`, an `output` or `}}`, found {}",
                            self.found()
                        ),
                    )
                }
            }
        }
    }

    /// The body block of a `fused` node (its `{` next): a graph of its own, with its own value numbers.
    fn fused_block(&mut self) -> PResult<Op> {
        let open = self.pos;
        if self.in_body {
            // bodies do not nest (so neither does this recursion)
            return self.err(open, "a fused body cannot contain `fused`");
        }
        self.pos += 1; // `{`
        let outer = std::mem::take(&mut self.ids);
        self.in_body = true;
        let mut body = Graph::new("fused");
        let r = self.block(&mut body, "the body of `fused`");
        self.ids = outer;
        self.in_body = false;
        r?;
        let body = crate::composite::fused::FusedBody::from_graph(&body).map_err(|m| PErr {
            pos: open,
            message: format!("the body of `fused`: {m}"),
        })?;
        Ok(Op::Composite(crate::op::Composite::Fused { body }))
    }

    /// `%N` at the current position: the number.
    fn value_number(&mut self) -> PResult<usize> {
        if self.peek() != Some('%') {
            return self.err(self.pos, format!("expected a value `%N`, found {}", self.found()));
        }
        self.pos += 1;
        self.uint("a value number after `%`")
    }

    fn node(&mut self, g: &mut Graph) -> PResult<()> {
        let stmt = self.pos;
        let id = self.value_number()?;
        if let Some(&(_, first, _)) = self.ids.get(&id) {
            let (line, _) = line_col(self.src, first);
            return self.err(stmt, format!("value %{id} is already defined on line {line}"));
        }
        self.skip_ws();
        let name = if self.peek() == Some('"') {
            Some(self.string()?)
        } else {
            None
        };
        self.expect('=', &format!("after `%{id}`"))?;
        self.skip_ws();
        let op_pos = self.pos;
        let Some(op_name) = self.ident() else {
            return self.err(
                self.pos,
                format!("expected an op name after `=`, found {}", self.found()),
            );
        };
        let mut annotation = None;
        let (op, inputs) = if op_name == "input" || op_name == "param" {
            self.skip_ws();
            if self.peek() != Some('"') {
                return self.err(
                    self.pos,
                    format!(
                        "expected the name of the {op_name} (a string) after `{op_name}`, found {}",
                        self.found()
                    ),
                );
            }
            let iname = self.string()?;
            self.expect(':', &format!("before the type of {op_name} {}", quote(&iname)))?;
            let ty = self.ty()?;
            let op = if op_name == "input" {
                Op::Input { name: iname, ty }
            } else {
                Op::Param { name: iname, ty }
            };
            (op, Vec::new())
        } else {
            let attrs = self.attr_list(op_name)?;
            self.expect('(', &format!("before the inputs of `{op_name}`"))?;
            let mut inputs = Vec::new();
            if !self.eat(')') {
                loop {
                    inputs.push(self.reference()?);
                    if self.eat(',') {
                        continue;
                    }
                    if self.eat(')') {
                        break;
                    }
                    return self.err(
                        self.pos,
                        format!("expected `)` after the inputs of `{op_name}`, found {}", self.found()),
                    );
                }
            }
            // `fused` carries its body as a block after its type (the `body` attribute is read as well)
            let block_body = op_name == "fused" && !attrs.iter().any(|(k, _)| k == "body");
            if block_body {
                if let Some((k, _)) = attrs.first() {
                    return self.err(
                        op_pos,
                        format!("`fused` has no attribute `{k}`: its body is the block after its type"),
                    );
                }
            }
            let op = if block_body {
                None
            } else {
                Some(Op::from_parts(op_name, &attrs).map_err(|message| PErr { pos: op_pos, message })?)
            };
            if self.eat(':') {
                self.skip_ws();
                let at = self.pos;
                annotation = Some((at, self.types()?));
            }
            self.skip_ws();
            let op = match op {
                Some(op) => {
                    if op_name == "fused" && self.peek() == Some('{') {
                        return self.err(
                            self.pos,
                            "`fused` has its body either as a block or as the `body` attribute, not both",
                        );
                    }
                    op
                }
                None if self.peek() == Some('{') => self.fused_block()?,
                None => {
                    return self.err(
                        self.pos,
                        format!(
                            "expected `{{` and the body of `fused` after its inputs and type, found {}",
                            self.found()
                        ),
                    )
                }
            };
            (op, inputs)
        };
        let op_text = op.name();
        let added = catch_unwind(AssertUnwindSafe(|| g.add_node(op, &inputs, name)));
        let nid = match added {
            Ok(Ok(nid)) => nid,
            Ok(Err(IrError::Node { name, op, message, .. })) => {
                // Name the node by its number in the source, not its index in the graph.
                let e = IrError::Node { id, name, op, message };
                return self.err(stmt, e.to_string());
            }
            Ok(Err(e)) => return self.err(stmt, format!("node %{id} ({op_text}): {e}")),
            Err(p) => {
                return self.err(
                    stmt,
                    format!(
                        "node %{id} ({op_text}): its types cannot be inferred: {}",
                        panic_message(p.as_ref())
                    ),
                )
            }
        };
        if let Some((at, ann)) = annotation {
            let inferred = &g.node(nid).outputs;
            if &ann != inferred {
                return self.err(
                    at,
                    format!(
                        "type annotation {} differs from the inferred {}",
                        fmt_types(&ann),
                        fmt_types(inferred)
                    ),
                );
            }
        }
        let n_out = g.node(nid).outputs.len();
        self.ids.insert(id, (nid, stmt, n_out));
        Ok(())
    }

    /// An optional `[key=value, ...]` list after an op name.
    fn attr_list(&mut self, op_name: &str) -> PResult<Vec<(String, AttrValue)>> {
        let mut attrs: Vec<(String, AttrValue)> = Vec::new();
        if self.eat('[') {
            loop {
                self.skip_ws();
                let Some(key) = self.ident() else {
                    return self.err(
                        self.pos,
                        format!("expected an attribute name in `{op_name}[...]`, found {}", self.found()),
                    );
                };
                self.expect('=', &format!("after attribute `{key}`"))?;
                let v = self.value(0)?;
                attrs.push((key.to_string(), v));
                if self.eat(',') {
                    continue;
                }
                if self.eat(']') {
                    break;
                }
                return self.err(
                    self.pos,
                    format!(
                        "expected `,` or `]` after attribute `{key}` of `{op_name}`, found {}",
                        self.found()
                    ),
                );
            }
        }
        Ok(attrs)
    }

    fn output(&mut self, g: &mut Graph) -> PResult<()> {
        let stmt = self.pos;
        self.pos += "output".len();
        self.skip_ws();
        if self.peek() != Some('"') {
            return self.err(
                self.pos,
                format!(
                    "expected the output's name (a string) after `output`, found {}",
                    self.found()
                ),
            );
        }
        let name = self.string()?;
        self.expect('=', &format!("after `output {}`", quote(&name)))?;
        let v = self.reference()?;
        g.add_output(name, v).map_err(|e| PErr {
            pos: stmt,
            message: e.to_string(),
        })
    }

    /// `%N[#K]`, resolved to a value of the graph.
    fn reference(&mut self) -> PResult<Value> {
        self.skip_ws();
        let at = self.pos;
        let id = self.value_number()?;
        let k = if self.peek() == Some('#') {
            self.pos += 1;
            self.uint("an output number after `#`")?
        } else {
            0
        };
        let Some(&(nid, _, n)) = self.ids.get(&id) else {
            return self.err(at, format!("value %{id} is not defined (before this use)"));
        };
        match u32::try_from(k) {
            Ok(k32) if k < n => Ok(Value::new(nid, k32)),
            _ => self.err(at, format!("%{id}#{k} does not exist: %{id} has {n} output(s)")),
        }
    }

    // ----------------------------------------------------------------------------------------- types

    fn types(&mut self) -> PResult<Vec<TensorType>> {
        self.skip_ws();
        if self.eat('(') {
            let mut ts = Vec::new();
            loop {
                ts.push(self.ty()?);
                if self.eat(',') {
                    continue;
                }
                if self.eat(')') {
                    return Ok(ts);
                }
                return self.err(
                    self.pos,
                    format!("expected `,` or `)` in a tuple of types, found {}", self.found()),
                );
            }
        }
        Ok(vec![self.ty()?])
    }

    fn ty(&mut self) -> PResult<TensorType> {
        self.skip_ws();
        let at = self.pos;
        let Some(name) = self.ident() else {
            return self.err(
                self.pos,
                format!("expected a type such as `f32[B, 128]`, found {}", self.found()),
            );
        };
        let dtype = name.parse::<DType>().map_err(|m| PErr { pos: at, message: m })?;
        self.expect('[', &format!("after the dtype `{dtype}`"))?;
        let mut dims = Vec::new();
        if !self.eat(']') {
            loop {
                dims.push(self.dim()?);
                if self.eat(',') {
                    continue;
                }
                if self.eat(']') {
                    break;
                }
                return self.err(
                    self.pos,
                    format!(
                        "expected `,` or `]` after a dimension of a shape, found {}",
                        self.found()
                    ),
                );
            }
        }
        Ok(TensorType::new(dtype, dims))
    }

    /// The end of the dimension expression starting at `start`: at a top-level `,`, an unmatched `)`, a
    /// comment or the first character that cannot occur in one. Bounds what [`parse_dim`] sees, so it never
    /// reads into a comment and costs no more than the text it covers.
    fn dim_extent(&self, start: usize) -> usize {
        let b = self.src.as_bytes();
        let mut i = start;
        let mut depth = 0usize;
        while let Some(&c) = b.get(i) {
            match c {
                b'(' => depth += 1,
                b')' if depth == 0 => break,
                b')' => depth -= 1,
                b',' if depth == 0 => break,
                b'/' if b.get(i + 1) == Some(&b'/') => break,
                b',' | b'_' | b' ' | b'\t' | b'+' | b'-' | b'*' | b'/' => {}
                c if c.is_ascii_alphanumeric() => {}
                _ => break,
            }
            i += 1;
        }
        i
    }

    /// A dimension expression at the current position.
    fn dim(&mut self) -> PResult<crate::Dim> {
        self.skip_ws();
        let start = self.pos;
        let end = self.dim_extent(start);
        // `dim_extent` stops only before ASCII bytes or at the end, so `end` is a char boundary.
        let text = self.src.get(start..end).unwrap_or("");
        match parse_dim_guarded(text) {
            Ok((d, used)) => {
                self.pos = start + used.min(text.len());
                Ok(d)
            }
            Err(e) => {
                let at = start + e.offset.min(text.len());
                let message = if e.message.starts_with("expected") {
                    format!("{}, found {}", e.message, self.found_at(at))
                } else {
                    e.message
                };
                self.err(at, message)
            }
        }
    }

    // ------------------------------------------------------------------------------------ attributes

    fn value(&mut self, depth: usize) -> PResult<AttrValue> {
        self.skip_ws();
        let at = self.pos;
        if depth >= MAX_DEPTH {
            return self.err(at, format!("attribute value nested more than {MAX_DEPTH} levels deep"));
        }
        match self.peek() {
            None => return self.err(at, "expected an attribute value, found end of input"),
            Some('[') => {
                self.pos += 1;
                let mut items = Vec::new();
                if self.eat(']') {
                    return Ok(AttrValue::List(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    if self.eat(',') {
                        continue;
                    }
                    if self.eat(']') {
                        return Ok(AttrValue::List(items));
                    }
                    return self.err(
                        self.pos,
                        format!("expected `,` or `]` in a list, found {}", self.found()),
                    );
                }
            }
            Some('"') => return Ok(AttrValue::Str(self.string()?)),
            Some(_) => {}
        }
        if let Some(x) = self.float_literal() {
            return Ok(AttrValue::Float(x));
        }
        match self.peek_ident() {
            Some("true") => {
                self.pos += 4;
                return Ok(AttrValue::Bool(true));
            }
            Some("false") => {
                self.pos += 5;
                return Ok(AttrValue::Bool(false));
            }
            Some("nan") => {
                self.pos += 3;
                return Ok(AttrValue::Float(f64::NAN));
            }
            Some("inf") => {
                self.pos += 3;
                return Ok(AttrValue::Float(f64::INFINITY));
            }
            _ => {}
        }
        let rest = self.rest();
        if rest.starts_with("-inf")
            && !rest
                .get(4..)
                .and_then(|r| r.chars().next())
                .is_some_and(is_ident_continue)
        {
            self.pos += 4;
            return Ok(AttrValue::Float(f64::NEG_INFINITY));
        }
        if let Some(i) = self.plain_int()? {
            return Ok(AttrValue::Int(i));
        }
        let d = self.dim()?;
        Ok(match d.as_const() {
            Some(c) => AttrValue::Int(c),
            None => AttrValue::Dim(d),
        })
    }

    /// `-?\d+(\.\d*)?([eE][+-]?\d+)?` with a `.` or an exponent, consumed; `None` (nothing consumed) otherwise.
    fn float_literal(&mut self) -> Option<f64> {
        let b = self.rest().as_bytes();
        let mut i = usize::from(b.first() == Some(&b'-'));
        let digits = |i: &mut usize| {
            let s = *i;
            while b.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i > s
        };
        if !digits(&mut i) {
            return None;
        }
        let mut is_float = false;
        if b.get(i) == Some(&b'.') {
            i += 1;
            digits(&mut i);
            is_float = true;
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            let mut j = i + 1;
            if matches!(b.get(j), Some(b'+' | b'-')) {
                j += 1;
            }
            if digits(&mut j) {
                i = j;
                is_float = true;
            }
        }
        if !is_float {
            return None;
        }
        let x = self.rest().get(..i)?.parse::<f64>().ok()?;
        self.pos += i;
        Some(x)
    }

    /// A lone integer literal `-?\d+` (not the start of a larger dimension expression), consumed. Parsed
    /// directly so that `-9223372036854775808` (which [`parse_dim`] cannot negate) reads back.
    fn plain_int(&mut self) -> PResult<Option<i64>> {
        let rest = self.rest();
        let b = rest.as_bytes();
        let mut i = usize::from(b.first() == Some(&b'-'));
        let s = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == s {
            return Ok(None);
        }
        let mut j = i;
        while matches!(b.get(j), Some(b' ' | b'\t')) {
            j += 1;
        }
        let continues = b
            .get(i)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
            || matches!(b.get(j), Some(b'+' | b'-' | b'*' | b'('))
            || (b.get(j) == Some(&b'/') && b.get(j + 1) != Some(&b'/'));
        if continues {
            return Ok(None);
        }
        let text = rest.get(..i).unwrap_or("");
        match text.parse::<i64>() {
            Ok(v) => {
                self.pos += i;
                Ok(Some(v))
            }
            Err(_) => self.err(self.pos, format!("integer `{}` is too large", snippet(text))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::ConstData;
    use crate::Dim;

    const MLP: &str = "graph mlp {
  %0 = input \"x\" : f32[B, 64]
  %1 = param \"w1\" : f32[64, 128]
  %2 = matmul(%0, %1) : f32[B, 128]
  %3 \"blk.act\" = silu(%2) : f32[B, 128]
  %4 = topk[k=2, axis=-1](%3) : (f32[B, 2], i64[B, 2])
  output \"y\" = %4#0
}
";

    /// The error's `line:col: message` text.
    fn err(src: &str) -> String {
        match parse(src) {
            Ok(g) => panic!("parsed, expected an error:\n{}", print(&g)),
            Err(e @ IrError::Parse { .. }) => e.to_string(),
            Err(e) => panic!("not a parse error: {e:?}"),
        }
    }

    /// `src` with the given node lines between a header declaring x: f32[B, 64] and w: f32[64, 128] and `}`.
    fn mlp_with(body: &str) -> String {
        format!("graph g {{\n  %0 = input \"x\" : f32[B, 64]\n  %1 = param \"w\" : f32[64, 128]\n{body}}}\n")
    }

    #[test]
    fn example_round_trips() {
        let g = parse(MLP).unwrap();
        assert_eq!(print(&g), MLP);
        assert_eq!(g.node_count(), 5);
        assert_eq!(g.outputs().len(), 1);
        let (_, n3) = g.nodes().nth(3).unwrap();
        assert_eq!(n3.name.as_deref(), Some("blk.act"));
        assert_eq!(g.outputs()[0].1.index, 0);
    }

    #[test]
    fn builder_graph_prints_as_documented() {
        let mut g = Graph::new("mlp");
        let x = g.input("x", DType::F32, vec![Dim::sym("B"), Dim::from(64)]).unwrap();
        let w = g.param("w1", DType::F32, vec![Dim::from(64), Dim::from(128)]).unwrap();
        let h = g.matmul(x, w).unwrap();
        let a = g.named("blk.act", Op::Unary(crate::UnaryOp::Silu), &[h]).unwrap();
        let (v, _) = g.topk(a, 2, -1).unwrap();
        g.add_output("y", v).unwrap();
        assert_eq!(print(&g), MLP);
    }

    #[test]
    fn graph_names() {
        for name in ["a.b_c", "", "with space", "ünï", "9lives", "quote\"d"] {
            let g = Graph::new(name);
            let s = print(&g);
            assert_eq!(parse(&s).unwrap().name, name, "{s}");
            assert_eq!(print(&parse(&s).unwrap()), s);
        }
        assert_eq!(print(&Graph::new("a.b_c")), "graph a.b_c {\n}\n");
        assert_eq!(print(&Graph::new("with space")), "graph \"with space\" {\n}\n");
    }

    #[test]
    fn unknown_op() {
        let src = mlp_with("  %2 = matmal(%0, %1)\n");
        assert_eq!(err(&src), "4:8: unknown op `matmal`");
    }

    #[test]
    fn undefined_and_duplicate_values() {
        assert_eq!(
            err(&mlp_with("  %2 = matmul(%0, %9)\n")),
            "4:19: value %9 is not defined (before this use)"
        );
        // a use before the definition
        assert_eq!(
            err(&mlp_with("  %2 = exp(%3) : f32[B, 64]\n  %3 = exp(%0)\n")),
            "4:12: value %3 is not defined (before this use)"
        );
        assert_eq!(
            err(&mlp_with("  %1 = exp(%0)\n")),
            "4:3: value %1 is already defined on line 3"
        );
        assert_eq!(
            err(&mlp_with("  %2 = exp(%0#1)\n")),
            "4:12: %0#1 does not exist: %0 has 1 output(s)"
        );
        assert_eq!(
            err(&mlp_with("  output \"y\" = %7\n")),
            "4:16: value %7 is not defined (before this use)"
        );
    }

    #[test]
    fn bad_dtype() {
        assert_eq!(
            err("graph g {\n  %0 = input \"x\" : f33[B]\n}"),
            "2:20: unknown dtype `f33` (expected one of f32, bf16, f16, i32, i64, bool)"
        );
        assert_eq!(
            err(&mlp_with("  %2 = cast[dtype=f64](%0)\n")),
            "4:8: attribute `dtype` of `cast`: unknown dtype `f64` (expected one of f32, bf16, f16, i32, i64, bool)"
        );
    }

    #[test]
    fn missing_paren() {
        assert_eq!(
            err(&mlp_with("  %2 = matmul(%0, %1 : f32[B, 128]\n")),
            "4:22: expected `)` after the inputs of `matmul`, found `:`"
        );
        assert_eq!(
            err(&mlp_with("  %2 = matmul(%0, %1;\n")),
            "4:21: expected `)` after the inputs of `matmul`, found `;`"
        );
        assert_eq!(
            err(&mlp_with("  %2 = matmul\n")),
            "5:1: expected `(` before the inputs of `matmul`, found `}`"
        );
        assert_eq!(
            err("graph g {\n  %0 = input \"x\" : f32[B, (T + 1]\n}"),
            "2:33: expected `)` in dimension expression, found `]`"
        );
    }

    #[test]
    fn unterminated_string() {
        assert_eq!(
            err("graph g {\n  %0 = input \"x : f32[B]\n}"),
            "2:14: unterminated string: no closing `\"` before the end of the line"
        );
        assert_eq!(err("graph \"g"), "1:7: unterminated string: no closing `\"`");
        assert_eq!(
            err("graph g {\n  %0 = input \"a\\q\" : f32[B]\n}"),
            "2:16: unknown escape `\\q` in a string (expected \\\" \\\\ \\n \\t \\r or \\u{HEX})"
        );
        assert!(err("graph \"\\u{110000}\" {}").starts_with("1:8: invalid escape"));
        assert!(err("graph \"\\u{}\" {}").starts_with("1:8: invalid escape"));
    }

    #[test]
    fn annotation_mismatch() {
        assert_eq!(
            err(&mlp_with("  %2 = matmul(%0, %1) : f32[B, 64]\n")),
            "4:25: type annotation f32[B, 64] differs from the inferred f32[B, 128]"
        );
        assert_eq!(
            err(&mlp_with("  %2 = topk[k=2, axis=-1](%0) : f32[B, 2]\n")),
            "4:33: type annotation f32[B, 2] differs from the inferred (f32[B, 2], i64[B, 2])"
        );
        // omitted annotations are inferred; the printer adds them
        let g = parse(&mlp_with("  %2 = matmul(%0, %1)\n  output \"y\" = %2\n")).unwrap();
        assert!(print(&g).contains("%2 = matmul(%0, %1) : f32[B, 128]\n"));
    }

    #[test]
    fn shape_error_from_inference() {
        let e = err(&mlp_with("  %2 = matmul(%0, %0)\n"));
        assert!(
            e.starts_with("4:3: node %2 (matmul): `matmul` inner dimensions differ: f32[B, 64] x f32[B, 64]"),
            "{e}"
        );
        // named by the number in the source, with its name
        let e = err(&mlp_with("  %17 \"mm\" = matmul(%0, %0)\n"));
        assert!(e.starts_with("4:3: node %17 \"mm\" (matmul): "), "{e}");
        let e = err(&mlp_with("  %2 = add(%0, %1)\n"));
        assert!(
            e.starts_with("4:3: node %2 (add): shapes [B, 64] and [64, 128] do not broadcast"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_names() {
        assert_eq!(
            err(&mlp_with("  %2 = param \"x\" : f32[3]\n")),
            "4:3: node %2 (param): an input or parameter named `x` already exists"
        );
        assert_eq!(
            err(&mlp_with("  output \"y\" = %0\n  output \"y\" = %1\n")),
            "5:3: output `y` is declared twice"
        );
    }

    #[test]
    fn attribute_errors() {
        assert_eq!(
            err(&mlp_with("  %2 = softmax[axis=-1, bogus=1](%0)\n")),
            "4:8: `softmax` has no attribute `bogus`"
        );
        assert_eq!(
            err(&mlp_with("  %2 = softmax(%0)\n")),
            "4:8: `softmax` needs attribute `axis`"
        );
        assert_eq!(
            err(&mlp_with("  %2 = softmax[axis=-1 x](%0)\n")),
            "4:24: expected `,` or `]` after attribute `axis` of `softmax`, found `x`"
        );
        assert_eq!(
            err(&mlp_with("  %2 = softmax[axis=99999999999999999999](%0)\n")),
            "4:21: integer `99999999999999999999` is too large"
        );
        assert_eq!(
            err(&mlp_with("  %2 = softmax[axis=](%0)\n")),
            "4:21: expected a dimension (integer, symbol or parenthesised expression), found `]`"
        );
        let deep = format!("  %2 = softmax[axis={}1{}](%0)\n", "[".repeat(100), "]".repeat(100));
        assert_eq!(
            err(&mlp_with(&deep)),
            format!("4:{}: attribute value nested more than 64 levels deep", 21 + 64)
        );
    }

    #[test]
    fn structure_errors() {
        assert_eq!(
            err(""),
            "1:1: expected `graph` at the start of the file, found end of input"
        );
        assert_eq!(
            err("  grap g {}"),
            "1:3: expected `graph` at the start of the file, found `grap`"
        );
        assert_eq!(
            err("graph {}"),
            "1:7: expected the graph's name (an identifier or a string) after `graph`, found `{`"
        );
        assert_eq!(
            err("graph g {\n"),
            "2:1: expected `}` at the end of the graph, found end of input"
        );
        assert_eq!(
            err("graph g {} x"),
            "1:12: expected end of input after the graph's `}`, found `x`"
        );
        assert_eq!(
            err("graph g { foo }"),
            "1:11: expected a node `%N = ...`, an `output` or `}`, found `foo`"
        );
        assert_eq!(
            err("graph g { %x }"),
            "1:12: expected a value number after `%`, found `x`"
        );
        assert_eq!(
            err("graph g { %99999999999999999999999 = exp(%0) }"),
            "1:12: a value number after `%` `99999999999999999999999` is too large"
        );
        assert_eq!(
            err("graph g { %0 = ☃ }"),
            "1:16: expected an op name after `=`, found `☃`"
        );
        assert_eq!(
            err("graph g {\n\t%0 = input \"é\" : f32[B, é]\n}"),
            "2:26: expected a dimension (integer, symbol or parenthesised expression), found `é`"
        );
    }

    #[test]
    fn dimension_arithmetic_overflow_is_an_error() {
        // `Dim` arithmetic saturates; inference refuses a saturated dimension.
        let e = err("graph g {\n  %0 = input \"x\" : f32[4611686018427387904 * 4]\n}");
        assert!(e.starts_with("2:3: ") && e.contains("overflows"), "{e}");
        let e = err("graph g {\n  %0 = constant[dtype=f32, shape=[4294967296, 4294967296, 16], values=[]]()\n}");
        assert!(e.starts_with("2:3: node %0 (constant): "), "{e}");
    }

    #[test]
    fn comments_and_whitespace() {
        let src = "// leading comment\r\n\
                   graph\t\"mlp\"{// after brace\r\n\
                   \t%10=input \"x\":f32[ B ,64 ]// c\r\n\
                   %11 = param \"w1\" // between\n : f32[64,128]\n\
                   \u{a0}%20=matmul( %10 ,%11 )\u{3000}: f32[B,\t128]\n\
                   %3 \"blk.act\" = silu(%20) // no annotation\n\
                   %4 = topk[ k = 2 , // a comment inside attributes\n axis = - 1 ](%3) : ( f32[B,2] , i64[B,2] )\n\
                   output \"y\" = %4 // #0 omitted\n\
                   } // trailing\n\n";
        let g = parse(src).unwrap();
        assert_eq!(print(&g), MLP);
    }

    #[test]
    fn attribute_values() {
        let src = mlp_with(
            "  %2 = slice[axis=0, start=1, end=B - 1](%0)\n  %3 = full[value=2, dtype=bf16, shape=[ceildiv(T, 4), 2*B]]()\n  \
             %4 = rms_norm[eps=1e-5](%1, %5)\n",
        );
        // %5 undefined: an error at its use
        assert_eq!(err(&src), "6:31: value %5 is not defined (before this use)");
        let src = mlp_with(
            "  %2 = slice[axis=0, start=1, end=B - 1](%0)\n  %3 = full[value=2, dtype=bf16, shape=[ceildiv(T, 4), 2*B]]()\n  \
             %4 = param \"g\" : f32[64]\n  %5 = rms_norm[eps=1e-5](%0, %4)\n  output \"a\" = %2\n  output \"b\" = %3\n  output \"c\" = %5\n",
        );
        let g = parse(&src).unwrap();
        let text = print(&g);
        assert!(
            text.contains("%2 = slice[axis=0, start=1, end=B - 1](%0) : f32[B - 2, 64]\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "%3 = full[value=2.0, dtype=bf16, shape=[ceildiv(T, 4), 2*B]]() : bf16[ceildiv(T, 4), 2*B]\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("%5 = rms_norm[eps=1e-5](%0, %4) : f32[B, 64]\n"),
            "{text}"
        );
        assert_eq!(print(&parse(&text).unwrap()), text);
    }

    #[test]
    fn non_finite_and_extreme_floats_round_trip() {
        let vals = vec![
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e-300,
            -0.0,
            5e-324,
            f64::MAX,
            0.1,
            -2.5,
            1e16,
        ];
        let mut g = Graph::new("consts");
        let c = g
            .constant(DType::F32, vec![2, 5], ConstData::Float(vals.clone()))
            .unwrap();
        let f = g.full(f64::NEG_INFINITY, DType::F16, vec![Dim::sym("N")]).unwrap();
        let i = g
            .constant(DType::I64, vec![3], ConstData::Int(vec![i64::MIN, i64::MAX, -1]))
            .unwrap();
        let b = g
            .constant(DType::Bool, vec![2], ConstData::Bool(vec![true, false]))
            .unwrap();
        let e = g.constant(DType::F32, vec![0], ConstData::Float(vec![])).unwrap();
        for (k, v) in [c, f, i, b, e].into_iter().enumerate() {
            g.add_output(format!("o{k}"), v).unwrap();
        }
        let s = print(&g);
        assert!(
            s.contains("values=[nan, inf, -inf, 1e-300, -0.0, 5e-324, 1.7976931348623157e308, 0.1, -2.5, 1e16]"),
            "{s}"
        );
        assert!(
            s.contains("values=[-9223372036854775808, 9223372036854775807, -1]"),
            "{s}"
        );
        let g2 = parse(&s).unwrap();
        assert_eq!(print(&g2), s);
        let Op::Constant {
            data: ConstData::Float(back),
            ..
        } = &g2.node(g2.outputs()[0].1.node).op
        else {
            panic!("not a float constant")
        };
        assert!(back[0].is_nan());
        for (a, b) in vals.iter().zip(back).skip(1) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn odd_node_names_round_trip() {
        let mut g = Graph::new("names");
        let x = g.input("in \"x\"\n", DType::F32, vec![Dim::sym("B")]).unwrap();
        let mut last = x;
        for name in [
            "",
            "a\"b",
            "back\\slash",
            "tab\tnl\ncr\r",
            "ctl\u{1}\u{7f}",
            "ünïcødé ☃ 😀",
            "%1 = exp",
        ] {
            last = g.named(name, Op::Unary(crate::UnaryOp::Exp), &[last]).unwrap();
        }
        g.add_output("out \u{0} \\ \"", last).unwrap();
        let s = print(&g);
        let g2 = parse(&s).unwrap();
        assert_eq!(print(&g2), s);
        assert!(g == g2);
    }
}
