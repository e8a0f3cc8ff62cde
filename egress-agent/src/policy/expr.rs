//! The expression syntax of zero-trust gateway rules: parsing (with line/column errors) and printing.
//!
//! The syntax is the wirefilter dialect gateway egress rules are written in:
//!
//! ```text
//! net.dst.ip in {192.0.2.0/24 198.51.100.7} and net.dst.port in {443 8000..8100}
//! any(identity.groups[*].name in {"finance"}) and not(identity.email == "bob@example.com")
//! ```
//!
//! Parsing is a small lexer followed by a recursive-descent parser whose
//! recursion is bounded by a nesting limit, so untrusted input can neither
//! overflow the stack nor make it panic. Printing ([`Expr`]'s `Display`)
//! writes the same syntax back in a canonical form that parses to an equal
//! [`Expr`].

use std::fmt::{self, Write as _};

use super::{
    geo,
    model::{Atom, Continent, CountryCode, Expr, PortRange, Protocol},
    parse::Cidr,
};

/// Which of a policy's three expressions is being parsed; each may only use its own fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExprKind {
    /// `net.*`: addresses, port, protocol and destination geography.
    Traffic,
    /// `identity.*`: the user and their groups.
    Identity,
    /// `device_posture.*`: the posture checks the device passes.
    DevicePosture,
    /// every field (for round trips and tools)
    Any,
}

impl ExprKind {
    /// The name of the policy field holding this expression (`"expression"` for [`Self::Any`]).
    pub fn name(self) -> &'static str {
        match self {
            Self::Traffic => "traffic",
            Self::Identity => "identity",
            Self::DevicePosture => "device_posture",
            Self::Any => "expression",
        }
    }

    fn allows(self, field: Field) -> bool {
        self == Self::Any || self == field.kind()
    }
}

/// Why an expression was rejected, at the 1-based line and column (in
/// characters) where the offending token starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct ExprError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl ExprError {
    fn new(line: usize, column: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            column,
            message: message.into(),
        }
    }

    fn at(token: &Token<'_>, message: impl Into<String>) -> Self {
        Self::new(token.line, token.column, message)
    }
}

/// Bounds on untrusted input. A parameter rather than constants only so the
/// tests can reach the set limit, which [`LIMITS`]'s length bound makes
/// unreachable (a value and its separator take at least two bytes).
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Longest expression, in bytes.
    len: usize,
    /// Deepest nesting of parentheses, `not` and `any(...)`.
    depth: usize,
    /// Most values in one `{...}` set.
    set_values: usize,
}

const LIMITS: Limits = Limits {
    len: 65536,
    depth: 64,
    set_values: 65536,
};

/// Values longer than this are cut short when quoted in an error message.
const SHOWN_CHARS: usize = 64;

/// Parses one expression, accepting only the fields `kind` allows.
pub fn parse(text: &str, kind: ExprKind) -> Result<Expr, ExprError> {
    parse_with(text, kind, LIMITS)
}

fn parse_with(text: &str, kind: ExprKind, limits: Limits) -> Result<Expr, ExprError> {
    if text.len() > limits.len {
        return Err(ExprError::new(
            1,
            1,
            format!(
                "expression is {} bytes long, at most {} are allowed",
                text.len(),
                limits.len
            ),
        ));
    }
    let mut parser = Parser {
        tokens: Lexer::new(text).tokens()?,
        pos: 0,
        kind,
        depth: 0,
        limits,
    };
    if parser.peek().tok == Tok::End {
        return Err(ExprError::at(parser.peek(), "empty expression"));
    }
    let expr = parser.or()?;
    let rest = parser.peek();
    match rest.tok {
        Tok::End => Ok(expr),
        Tok::RParen => Err(ExprError::at(rest, "unmatched \")\"")),
        _ => Err(unexpected(
            rest,
            "\"and\", \"or\" or the end of the expression",
        )),
    }
}

// ---------------------------------------------------------------------------
// Fields

/// The fields an expression can compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    SrcIp,
    DstIp,
    DstPort,
    Protocol,
    Country,
    Continent,
    Email,
    Groups,
    Posture,
}

impl Field {
    const ALL: [Field; 9] = [
        Self::SrcIp,
        Self::DstIp,
        Self::DstPort,
        Self::Protocol,
        Self::Country,
        Self::Continent,
        Self::Email,
        Self::Groups,
        Self::Posture,
    ];

    /// The canonical spelling, the one the printer writes.
    fn name(self) -> &'static str {
        match self {
            Self::SrcIp => "net.src.ip",
            Self::DstIp => "net.dst.ip",
            Self::DstPort => "net.dst.port",
            Self::Protocol => "net.protocol",
            Self::Country => "net.dst.geo.country",
            Self::Continent => "net.dst.geo.continent",
            Self::Email => "identity.email",
            Self::Groups => "identity.groups[*].name",
            Self::Posture => "device_posture.checks.passed[*]",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        // `identity.groups.name[*]` is the older spelling, still accepted.
        if name == "identity.groups.name[*]" {
            return Some(Self::Groups);
        }
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    fn kind(self) -> ExprKind {
        match self {
            Self::SrcIp
            | Self::DstIp
            | Self::DstPort
            | Self::Protocol
            | Self::Country
            | Self::Continent => ExprKind::Traffic,
            Self::Email | Self::Groups => ExprKind::Identity,
            Self::Posture => ExprKind::DevicePosture,
        }
    }

    /// Array fields hold several values per flow and are compared through `any(...)`.
    fn is_array(self) -> bool {
        matches!(self, Self::Groups | Self::Posture)
    }

    fn of(atom: &Atom) -> Self {
        match atom {
            Atom::SrcIp(_) => Self::SrcIp,
            Atom::DstIp(_) => Self::DstIp,
            Atom::DstPort(_) => Self::DstPort,
            Atom::Protocol(_) => Self::Protocol,
            Atom::Country(_) => Self::Country,
            Atom::Continent(_) => Self::Continent,
            Atom::User(_) => Self::Email,
            Atom::Group(_) => Self::Groups,
            Atom::Posture(_) => Self::Posture,
        }
    }

    /// The atom the field's values are collected into.
    fn empty_atom(self) -> Atom {
        match self {
            Self::SrcIp => Atom::SrcIp(Vec::new()),
            Self::DstIp => Atom::DstIp(Vec::new()),
            Self::DstPort => Atom::DstPort(Vec::new()),
            Self::Protocol => Atom::Protocol(Vec::new()),
            Self::Country => Atom::Country(Vec::new()),
            Self::Continent => Atom::Continent(Vec::new()),
            Self::Email => Atom::User(Vec::new()),
            Self::Groups => Atom::Group(Vec::new()),
            Self::Posture => Atom::Posture(Vec::new()),
        }
    }

    /// What a value of this field looks like, for error messages
    /// (`expected a value for net.dst.port (a port like 443 ...)`).
    fn expects(self) -> &'static str {
        match self {
            Self::SrcIp | Self::DstIp => "an address or CIDR, unquoted, like 192.0.2.0/24",
            Self::DstPort => "a port like 443 or a range like 8000..8100",
            Self::Protocol => "a quoted protocol: \"tcp\", \"udp\", \"icmp\" or \"icmpv6\"",
            Self::Country => "a quoted ISO 3166-1 alpha-2 country code like \"PT\"",
            Self::Continent => "a quoted continent code like \"EU\"",
            Self::Email => "a quoted e-mail address",
            Self::Groups => "a quoted group name",
            Self::Posture => "a quoted posture check",
        }
    }

    /// `a value for <field> (<what it looks like>)`, for error messages.
    fn value_wanted(self) -> String {
        format!("a value for {} ({})", self.name(), self.expects())
    }

    /// The comparison operators the field takes, for error messages.
    fn operators(self) -> &'static str {
        match self {
            Self::DstPort => "\"==\", \"!=\", \"in\", \"<\", \"<=\", \">\" or \">=\"",
            f if f.is_array() => "\"==\" or \"in\"",
            _ => "\"==\", \"!=\" or \"in\"",
        }
    }
}

// ---------------------------------------------------------------------------
// Lexer

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    /// A bare run of [`is_word_char`] characters: a field name, a keyword
    /// (`and`, `in`, `any`, ...), a port or range, an address or CIDR. One
    /// token class for all of them keeps `2001:db8::/32` and
    /// `identity.groups[*].name` in one piece; the parser decides what a
    /// word means from where it stands.
    Word,
    /// A double-quoted string, with its escapes resolved.
    Str(String),
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    AndAnd,
    OrOr,
    Bang,
    /// After the last character; always the last token.
    End,
}

#[derive(Clone, Debug)]
struct Token<'a> {
    tok: Tok,
    /// The token as written (a string with its quotes).
    text: &'a str,
    line: usize,
    column: usize,
}

impl Token<'_> {
    fn is_word(&self, word: &str) -> bool {
        self.tok == Tok::Word && self.text == word
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-' | '[' | ']' | '*')
}

struct Lexer<'a> {
    text: &'a str,
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
    /// Position of the next character.
    line: usize,
    column: usize,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            chars: text.char_indices().peekable(),
            line: 1,
            column: 1,
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.chars.peek().map(|&(_, c)| c)
    }

    /// Byte offset of the next character.
    fn offset(&mut self) -> usize {
        self.chars.peek().map_or(self.text.len(), |&(i, _)| i)
    }

    fn bump(&mut self) -> Option<char> {
        let (_, c) = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    fn tokens(mut self) -> Result<Vec<Token<'a>>, ExprError> {
        let mut tokens = Vec::new();
        loop {
            while self.peek().is_some_and(char::is_whitespace) {
                self.bump();
            }
            let (line, column, start) = (self.line, self.column, self.offset());
            let Some(c) = self.bump() else {
                tokens.push(Token {
                    tok: Tok::End,
                    text: "",
                    line,
                    column,
                });
                return Ok(tokens);
            };
            let tok = match c {
                c if is_word_char(c) => {
                    while self.peek().is_some_and(is_word_char) {
                        self.bump();
                    }
                    Tok::Word
                }
                '"' => Tok::Str(self.string(line, column)?),
                '(' => Tok::LParen,
                ')' => Tok::RParen,
                '{' => Tok::LBrace,
                '}' => Tok::RBrace,
                ',' => Tok::Comma,
                '=' if self.peek() == Some('=') => {
                    self.bump();
                    Tok::Eq
                }
                '=' => {
                    return Err(ExprError::new(
                        line,
                        column,
                        "unexpected \"=\" (compare with \"==\")",
                    ));
                }
                '!' if self.peek() == Some('=') => {
                    self.bump();
                    Tok::Ne
                }
                '!' => Tok::Bang,
                '<' | '>' => {
                    let or_equal = self.peek() == Some('=');
                    if or_equal {
                        self.bump();
                    }
                    match (c, or_equal) {
                        ('<', false) => Tok::Lt,
                        ('<', true) => Tok::Le,
                        (_, false) => Tok::Gt,
                        (_, true) => Tok::Ge,
                    }
                }
                '&' | '|' if self.peek() == Some(c) => {
                    self.bump();
                    if c == '&' { Tok::AndAnd } else { Tok::OrOr }
                }
                '&' => {
                    return Err(ExprError::new(
                        line,
                        column,
                        "unexpected \"&\" (use \"&&\" or \"and\")",
                    ));
                }
                '|' => {
                    return Err(ExprError::new(
                        line,
                        column,
                        "unexpected \"|\" (use \"||\" or \"or\")",
                    ));
                }
                // Debug formatting shows control and invisible characters escaped.
                c => {
                    return Err(ExprError::new(
                        line,
                        column,
                        format!("unexpected character {c:?}"),
                    ));
                }
            };
            let end = self.offset();
            tokens.push(Token {
                tok,
                text: &self.text[start..end],
                line,
                column,
            });
        }
    }

    /// The rest of a string whose opening quote (at `line`:`column`) was just read.
    fn string(&mut self, line: usize, column: usize) -> Result<String, ExprError> {
        // Strings stay on one line, so a missing closing quote is reported
        // at the string it belongs to rather than at the end of the input.
        let unterminated = || {
            ExprError::new(
                line,
                column,
                "unterminated string (no closing \" on this line)",
            )
        };
        let mut value = String::new();
        loop {
            let (at_line, at_column) = (self.line, self.column);
            match self.bump() {
                None | Some('\n' | '\r') => return Err(unterminated()),
                Some('"') => return Ok(value),
                Some('\\') => match self.bump() {
                    Some(c @ ('"' | '\\')) => value.push(c),
                    None | Some('\n' | '\r') => return Err(unterminated()),
                    Some(c) => {
                        return Err(ExprError::new(
                            at_line,
                            at_column,
                            format!(
                                r#"invalid escape "\{}" in string (only \" and \\ are allowed)"#,
                                c.escape_debug()
                            ),
                        ));
                    }
                },
                Some(c) if c.is_control() => {
                    return Err(ExprError::new(
                        at_line,
                        at_column,
                        format!("control character {c:?} in string"),
                    ));
                }
                Some(c) => value.push(c),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Parser
//
//   or         := and (("or" | "||") and)*
//   and        := unary (("and" | "&&") unary)*
//   unary      := ("not" | "!") unary | primary
//   primary    := "(" or ")" | "true" | "any" "(" comparison ")" | comparison
//   comparison := field ("==" | "!=") value | field "in" "{" value+ "}"
//               | "net.dst.port" ("<" | "<=" | ">" | ">=") port

/// A comparison operator, in either spelling (`==` or `eq`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    In,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn of(token: &Token<'_>) -> Option<Self> {
        Some(match (&token.tok, token.text) {
            (Tok::Eq, _) | (Tok::Word, "eq") => Self::Eq,
            (Tok::Ne, _) | (Tok::Word, "ne") => Self::Ne,
            (Tok::Word, "in") => Self::In,
            (Tok::Lt, _) | (Tok::Word, "lt") => Self::Lt,
            (Tok::Le, _) | (Tok::Word, "le") => Self::Le,
            (Tok::Gt, _) | (Tok::Word, "gt") => Self::Gt,
            (Tok::Ge, _) | (Tok::Word, "ge") => Self::Ge,
            _ => return None,
        })
    }
}

/// Words that are never field names.
const KEYWORDS: [&str; 12] = [
    "and", "or", "not", "in", "any", "true", "eq", "ne", "lt", "le", "gt", "ge",
];

struct Parser<'a> {
    /// Never empty: the last token is [`Tok::End`].
    tokens: Vec<Token<'a>>,
    pos: usize,
    kind: ExprKind,
    /// Nesting levels currently open; see [`Parser::enter`].
    depth: usize,
    limits: Limits,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> &Token<'a> {
        &self.tokens[self.pos]
    }

    /// The current token; moves on unless it is the end.
    fn advance(&mut self) -> Token<'a> {
        let token = self.tokens[self.pos].clone();
        if self.pos + 1 < self.tokens.len() {
            self.pos += 1;
        }
        token
    }

    /// Opens a nesting level at `token`, failing past the depth limit. This
    /// bounds the recursion (and so the stack) on hostile input.
    ///
    /// Levels are counted so that printing never nests deeper than the text
    /// parsed: `not(`, `(`, `any(` each open one, and so do the `not` a `!=`
    /// stands for and the `any(...)` a bare array comparison stands for,
    /// because the printer writes those out.
    fn enter(&mut self, token: &Token<'_>) -> Result<(), ExprError> {
        if self.depth >= self.limits.depth {
            return Err(ExprError::at(
                token,
                format!(
                    "expression nested more than {} levels deep",
                    self.limits.depth
                ),
            ));
        }
        self.depth += 1;
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Consumes the `)` matching `open`.
    fn close(&mut self, open: &Token<'_>) -> Result<(), ExprError> {
        if self.peek().tok == Tok::RParen {
            self.advance();
            return Ok(());
        }
        Err(unexpected(
            self.peek(),
            &format!("\")\" to close the \"(\" at {}:{}", open.line, open.column),
        ))
    }

    fn or(&mut self) -> Result<Expr, ExprError> {
        let mut items = vec![self.and()?];
        while self.peek().tok == Tok::OrOr || self.peek().is_word("or") {
            self.advance();
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.swap_remove(0)
        } else {
            Expr::Or(items)
        })
    }

    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut items = vec![self.unary()?];
        while self.peek().tok == Tok::AndAnd || self.peek().is_word("and") {
            self.advance();
            items.push(self.unary()?);
        }
        // Never empty: at least the first operand.
        Ok(Expr::all(items))
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        if self.peek().tok != Tok::Bang && !self.peek().is_word("not") {
            return self.primary();
        }
        let not = self.advance();
        self.enter(&not)?;
        // `not(...)` is one level, not two, because that is how the printer
        // writes every negation.
        let inner = if self.peek().tok == Tok::LParen {
            let open = self.advance();
            let inner = self.or()?;
            self.close(&open)?;
            inner
        } else {
            self.unary()?
        };
        self.leave();
        Ok(Expr::Not(Box::new(inner)))
    }

    fn primary(&mut self) -> Result<Expr, ExprError> {
        let token = self.peek();
        if token.tok == Tok::LParen {
            let open = self.advance();
            self.enter(&open)?;
            let inner = self.or()?;
            self.close(&open)?;
            self.leave();
            Ok(inner)
        } else if token.is_word("true") {
            // Only so that printed `Expr::True` parses back; not advertised.
            self.advance();
            Ok(Expr::True)
        } else if token.is_word("any") {
            self.any()
        } else {
            self.comparison(false)
        }
    }

    /// `any(<array field comparison>)`.
    fn any(&mut self) -> Result<Expr, ExprError> {
        let any = self.advance();
        self.enter(&any)?;
        if self.peek().tok != Tok::LParen {
            return Err(unexpected(self.peek(), "\"(\" after \"any\""));
        }
        self.advance();
        let expr = self.comparison(true)?;
        if self.peek().tok != Tok::RParen {
            return Err(unexpected(
                self.peek(),
                "\")\" after the comparison in any(...), which holds exactly one",
            ));
        }
        self.advance();
        self.leave();
        Ok(expr)
    }

    /// A field compared with values; `in_any` when inside `any(...)`.
    fn comparison(&mut self, in_any: bool) -> Result<Expr, ExprError> {
        let field_token = self.advance();
        let field = self.field(&field_token, in_any)?;
        if in_any && !field.is_array() {
            return Err(ExprError::at(
                &field_token,
                format!(
                    "any(...) only applies to the array fields {} and {}, not {}",
                    Field::Groups.name(),
                    Field::Posture.name(),
                    field.name()
                ),
            ));
        }
        // A bare array comparison means `any(...)`, and is printed so.
        let implied_any = field.is_array() && !in_any;
        if implied_any {
            self.enter(&field_token)?;
        }
        let op_token = self.peek().clone();
        let Some(op) = Op::of(&op_token) else {
            return Err(unexpected(
                &op_token,
                &format!("{} after {}", field.operators(), field_token.text),
            ));
        };
        self.advance();
        let expr = match op {
            Op::Eq => Expr::Atom(self.single(field, &op_token)?),
            Op::Ne if field.is_array() => {
                return Err(ExprError::at(
                    &op_token,
                    format!(
                        "{} is not supported on {name} (it would mean \"some value is not x\"); \
                         to exclude a value write not(any({name} == \"x\"))",
                        quoted(op_token.text),
                        name = field.name()
                    ),
                ));
            }
            Op::Ne => {
                // The printer writes this as `not(... in {...})`: one level.
                self.enter(&op_token)?;
                self.leave();
                Expr::Not(Box::new(Expr::Atom(self.single(field, &op_token)?)))
            }
            Op::In => Expr::Atom(self.set(field)?),
            Op::Lt | Op::Le | Op::Gt | Op::Ge if field != Field::DstPort => {
                return Err(ExprError::at(
                    &op_token,
                    format!(
                        "{} only applies to {}",
                        quoted(op_token.text),
                        Field::DstPort.name()
                    ),
                ));
            }
            Op::Lt | Op::Le | Op::Gt | Op::Ge => self.port_bound(op, &op_token)?,
        };
        if implied_any {
            self.leave();
        }
        Ok(expr)
    }

    /// Resolves the field named by `token` and checks the expression kind allows it.
    fn field(&self, token: &Token<'_>, in_any: bool) -> Result<Field, ExprError> {
        let looks_like_field = token.tok == Tok::Word
            && token
                .text
                .starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && !KEYWORDS.contains(&token.text);
        if !looks_like_field {
            let expected = if in_any {
                format!(
                    "an array field ({} or {})",
                    Field::Groups.name(),
                    Field::Posture.name()
                )
            } else {
                "a field name".to_owned()
            };
            return Err(unexpected(token, &expected));
        }
        let Some(field) = Field::from_name(token.text) else {
            return Err(ExprError::at(token, self.unknown_field(token.text)));
        };
        if !self.kind.allows(field) {
            return Err(ExprError::at(
                token,
                format!(
                    "{} belongs in the \"{}\" expression, not \"{}\"",
                    token.text,
                    field.kind().name(),
                    self.kind.name()
                ),
            ));
        }
        Ok(field)
    }

    fn unknown_field(&self, name: &str) -> String {
        let known: Vec<&str> = Field::ALL
            .into_iter()
            .filter(|&f| self.kind.allows(f))
            .map(Field::name)
            .collect();
        let suggestion = nearest(name, &known)
            .map(|s| format!(", did you mean \"{s}\"?"))
            .unwrap_or_default();
        let scope = match self.kind {
            ExprKind::Any => "known fields".to_owned(),
            kind => format!("{} fields", kind.name()),
        };
        format!(
            "unknown field {}{suggestion} ({scope}: {})",
            quoted(name),
            known.join(", ")
        )
    }

    /// The one value after `==` or `!=`, as an atom.
    fn single(&mut self, field: Field, op: &Token<'_>) -> Result<Atom, ExprError> {
        if self.peek().tok == Tok::LBrace {
            return Err(ExprError::at(
                self.peek(),
                format!(
                    "expected a value after {}, found \"{{\" (compare with a set using \"in\")",
                    quoted(op.text)
                ),
            ));
        }
        let mut atom = field.empty_atom();
        self.value(field, &mut atom)?;
        Ok(atom)
    }

    /// `{v1 v2 ...}` after `in`; commas between values are optional.
    fn set(&mut self, field: Field) -> Result<Atom, ExprError> {
        let open = self.peek().clone();
        if open.tok != Tok::LBrace {
            return Err(unexpected(&open, "\"{\" after \"in\""));
        }
        self.advance();
        let mut atom = field.empty_atom();
        let mut count = 0;
        loop {
            let token = self.peek();
            match token.tok {
                Tok::RBrace if count == 0 => {
                    return Err(ExprError::at(
                        &open,
                        format!("empty set for {}: list at least one value", field.name()),
                    ));
                }
                Tok::RBrace => {
                    self.advance();
                    return Ok(atom);
                }
                Tok::End => {
                    return Err(unexpected(
                        token,
                        &format!(
                            "a value or \"}}\" to close the \"{{\" at {}:{}",
                            open.line, open.column
                        ),
                    ));
                }
                _ if count == self.limits.set_values => {
                    return Err(ExprError::at(
                        token,
                        format!("set has more than {} values", self.limits.set_values),
                    ));
                }
                _ => {}
            }
            self.value(field, &mut atom)?;
            count += 1;
            if self.peek().tok == Tok::Comma {
                self.advance();
            }
        }
    }

    /// Reads one value of `field` and adds it to `atom` (made by `field.empty_atom()`).
    fn value(&mut self, field: Field, atom: &mut Atom) -> Result<(), ExprError> {
        let token = self.advance();
        let at = |message: String| ExprError::at(&token, message);
        match (atom, &token.tok) {
            (Atom::SrcIp(values) | Atom::DstIp(values), Tok::Word) => {
                values.push(short_word(&token, field)?.parse::<Cidr>().map_err(at)?.0);
            }
            (Atom::DstPort(values), Tok::Word) => {
                values.push(port_range(short_word(&token, field)?).map_err(at)?);
            }
            (Atom::Protocol(values), Tok::Str(s)) => values.push(protocol(s).map_err(at)?),
            (Atom::Country(values), Tok::Str(s)) => values.push(country(s).map_err(at)?),
            (Atom::Continent(values), Tok::Str(s)) => {
                values.push(Continent::from_code(s).ok_or_else(|| {
                    at(format!(
                        "unknown continent {}: expected one of {}",
                        quoted(s),
                        Continent::ALL.map(|c| format!("\"{c}\"")).join(", ")
                    ))
                })?)
            }
            // Users are compared in lower case (see `Atom::User`).
            (Atom::User(values), Tok::Str(s)) => values.push(s.to_lowercase()),
            (Atom::Group(values) | Atom::Posture(values), Tok::Str(s)) => values.push(s.clone()),
            _ => return Err(unexpected(&token, &field.value_wanted())),
        }
        Ok(())
    }

    /// `net.dst.port < 1024` and the like, as the range of ports they match.
    fn port_bound(&mut self, op: Op, op_token: &Token<'_>) -> Result<Expr, ExprError> {
        let token = self.advance();
        let is_number = token.tok == Tok::Word && token.text.bytes().all(|b| b.is_ascii_digit());
        if !is_number {
            return Err(unexpected(
                &token,
                &format!("a port number after {}", quoted(op_token.text)),
            ));
        }
        let bound = short_word(&token, Field::DstPort)?
            .parse::<PortRange>()
            .map_err(|e| ExprError::at(&token, e))?
            .first;
        let range = match op {
            Op::Lt => bound.checked_sub(1).map(|last| (0, last)),
            Op::Le => Some((0, bound)),
            Op::Gt => bound.checked_add(1).map(|first| (first, u16::MAX)),
            _ => Some((bound, u16::MAX)),
        };
        let Some((first, last)) = range else {
            return Err(ExprError::at(
                &token,
                format!(
                    "{} {} {bound} matches no port",
                    Field::DstPort.name(),
                    op_token.text
                ),
            ));
        };
        Ok(Expr::Atom(Atom::DstPort(vec![PortRange { first, last }])))
    }
}

/// The "expected ..., found ..." error at `token`.
fn unexpected(token: &Token<'_>, expected: &str) -> ExprError {
    let message = match &token.tok {
        Tok::End => format!("unexpected end of expression, expected {expected}"),
        Tok::Str(s) => format!("expected {expected}, found the string {}", quoted(s)),
        _ => format!("expected {expected}, found {}", quoted(token.text)),
    };
    ExprError::at(token, message)
}

/// `s` quoted and escaped for an error message, cut short if long.
fn quoted(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// The text of an address or port token, refusing one far too long to be
/// either, before `Cidr` or `PortRange` quotes it whole in an error.
fn short_word<'a>(token: &Token<'a>, field: Field) -> Result<&'a str, ExprError> {
    if token.text.len() > SHOWN_CHARS {
        return Err(unexpected(token, &field.value_wanted()));
    }
    Ok(token.text)
}

/// A port or range: `443`, `8000..8100` or `8000-8100`.
fn port_range(text: &str) -> Result<PortRange, String> {
    let Some((first, last)) = text.split_once("..") else {
        return text.parse();
    };
    let number = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !number(first) || !number(last) {
        return Err(format!(
            "invalid port range {text:?}: expected two port numbers (8000..8100)"
        ));
    }
    let (first, last) = (
        first.parse::<PortRange>()?.first,
        last.parse::<PortRange>()?.first,
    );
    if first > last {
        return Err(format!(
            "invalid port range {text:?}: {first} is after {last}"
        ));
    }
    Ok(PortRange { first, last })
}

fn protocol(name: &str) -> Result<Protocol, String> {
    Protocol::from_name(name).ok_or_else(|| {
        format!(
            "unknown protocol {}: expected \"tcp\", \"udp\", \"icmp\" or \"icmpv6\"",
            quoted(name)
        )
    })
}

fn country(code: &str) -> Result<CountryCode, String> {
    match geo::lookup(code) {
        Some((code, _, _)) => Ok(code),
        // The most common mistake: the United Kingdom's ISO code is GB.
        None if code.eq_ignore_ascii_case("UK") => Err(format!(
            "unknown country code {} (ISO 3166-1 alpha-2, e.g. \"GB\")",
            quoted(code)
        )),
        None => Err(format!(
            "unknown country code {}: not an ISO 3166-1 alpha-2 code",
            quoted(code)
        )),
    }
}

/// The candidate closest to `word` by edit distance, if close enough to be
/// a likely typo.
fn nearest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    // Long words are no typo of a field name; this also bounds the work.
    if word.len() > 2 * SHOWN_CHARS {
        return None;
    }
    candidates
        .iter()
        .map(|&c| (edit_distance(word, c), c))
        .filter(|&(d, _)| d <= 3)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

// ---------------------------------------------------------------------------
// Printer

/// Where an expression is printed, which decides whether it needs parentheses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// At the top or inside `not(...)`.
    Top,
    AndOperand,
    OrOperand,
}

/// Canonical text: `parse(&e.to_string(), ExprKind::Any)` gives back `e`
/// for every `e` the parser can produce. (Of the others, empty `And`/`Or`
/// print as `true`/`not(true)` and an atom with no values as `{}`, which
/// does not parse.)
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_expr(f, self, Place::Top)
    }
}

fn write_expr(f: &mut fmt::Formatter<'_>, expr: &Expr, place: Place) -> fmt::Result {
    match expr {
        Expr::True => f.write_str("true"),
        Expr::Atom(atom) => write_atom(f, atom),
        Expr::Not(inner) => {
            f.write_str("not(")?;
            write_expr(f, inner, Place::Top)?;
            f.write_str(")")
        }
        // And binds tighter than or, so it needs parentheses only inside
        // another and; those (and or-inside-or) are kept rather than
        // flattened so the printed text parses back to the same tree.
        Expr::And(items) => match items.as_slice() {
            [] => f.write_str("true"),
            [only] => write_expr(f, only, place),
            _ => write_chain(
                f,
                items,
                " and ",
                Place::AndOperand,
                place == Place::AndOperand,
            ),
        },
        Expr::Or(items) => match items.as_slice() {
            [] => f.write_str("not(true)"),
            [only] => write_expr(f, only, place),
            _ => write_chain(f, items, " or ", Place::OrOperand, place != Place::Top),
        },
    }
}

/// Two or more `items` joined by `op`, each printed as an `operand`.
fn write_chain(
    f: &mut fmt::Formatter<'_>,
    items: &[Expr],
    op: &str,
    operand: Place,
    parenthesize: bool,
) -> fmt::Result {
    if parenthesize {
        f.write_char('(')?;
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(op)?;
        }
        write_expr(f, item, operand)?;
    }
    if parenthesize {
        f.write_char(')')?;
    }
    Ok(())
}

fn write_atom(f: &mut fmt::Formatter<'_>, atom: &Atom) -> fmt::Result {
    let field = Field::of(atom);
    if field.is_array() {
        f.write_str("any(")?;
    }
    write!(f, "{} in {{", field.name())?;
    match atom {
        Atom::SrcIp(nets) | Atom::DstIp(nets) => write_values(f, nets, |f, net| {
            // A host prefix is written as the bare address it parses from.
            if net.prefix_len() == net.max_prefix_len() {
                write!(f, "{}", net.addr())
            } else {
                write!(f, "{net}")
            }
        }),
        Atom::DstPort(ranges) => write_values(f, ranges, |f, r| {
            if r.first == r.last {
                write!(f, "{}", r.first)
            } else {
                write!(f, "{}..{}", r.first, r.last)
            }
        }),
        Atom::Protocol(protocols) => write_values(f, protocols, |f, p| write!(f, "\"{p}\"")),
        Atom::Country(codes) => write_values(f, codes, |f, c| write!(f, "\"{c}\"")),
        Atom::Continent(continents) => write_values(f, continents, |f, c| write!(f, "\"{c}\"")),
        Atom::User(names) | Atom::Group(names) | Atom::Posture(names) => {
            write_values(f, names, |f, s| write_string(f, s))
        }
    }?;
    f.write_str("}")?;
    if field.is_array() {
        f.write_str(")")?;
    }
    Ok(())
}

fn write_values<T>(
    f: &mut fmt::Formatter<'_>,
    values: &[T],
    mut write_one: impl FnMut(&mut fmt::Formatter<'_>, &T) -> fmt::Result,
) -> fmt::Result {
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            f.write_char(' ')?;
        }
        write_one(f, value)?;
    }
    Ok(())
}

/// A string literal, escaped as the lexer reads it.
fn write_string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            f.write_char('\\')?;
        }
        f.write_char(c)?;
    }
    f.write_char('"')
}

#[cfg(test)]
mod tests {
    use ipnet::IpNet;
    use proptest::{collection::vec, prelude::*};

    use super::*;

    fn parsed(text: &str) -> Expr {
        parse(text, ExprKind::Any).unwrap_or_else(|e| panic!("{text:?} must parse: {e}"))
    }

    /// The error for `text` as displayed: `line:column: message`.
    fn error(text: &str, kind: ExprKind) -> String {
        match parse(text, kind) {
            Ok(e) => panic!("{text:?} must be rejected, parsed as {e:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn error_any(text: &str) -> String {
        error(text, ExprKind::Any)
    }

    fn atom(a: Atom) -> Expr {
        Expr::Atom(a)
    }

    fn not(e: Expr) -> Expr {
        Expr::Not(Box::new(e))
    }

    fn nets(texts: &[&str]) -> Vec<IpNet> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn ports(ranges: &[(u16, u16)]) -> Vec<PortRange> {
        ranges
            .iter()
            .map(|&(first, last)| PortRange { first, last })
            .collect()
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|s| s.to_string()).collect()
    }

    fn cc(code: &str) -> CountryCode {
        geo::lookup(code).unwrap().0
    }

    fn tcp() -> Expr {
        atom(Atom::Protocol(vec![Protocol::Tcp]))
    }

    fn udp() -> Expr {
        atom(Atom::Protocol(vec![Protocol::Udp]))
    }

    fn icmp() -> Expr {
        atom(Atom::Protocol(vec![Protocol::Icmp]))
    }

    // The four examples of the spec.

    #[test]
    fn expr_example_dst_ip_and_ports_exact() {
        assert_eq!(
            parse(
                "net.dst.ip in {192.0.2.0/24 198.51.100.7} and net.dst.port in {443 8443}",
                ExprKind::Traffic
            ),
            Ok(Expr::And(vec![
                atom(Atom::DstIp(nets(&["192.0.2.0/24", "198.51.100.7/32"]))),
                atom(Atom::DstPort(ports(&[(443, 443), (8443, 8443)]))),
            ]))
        );
    }

    #[test]
    fn expr_groups_old_spelling_same_as_any() {
        let expected = atom(Atom::Group(strings(&["finance"])));
        for text in [
            "any(identity.groups[*].name in {\"finance\"})",
            "identity.groups.name[*] in {\"finance\"}",
        ] {
            assert_eq!(
                parse(text, ExprKind::Identity),
                Ok(expected.clone()),
                "{text}"
            );
        }
    }

    #[test]
    fn expr_example_country_and_not_email_exact() {
        assert_eq!(
            parsed("net.dst.geo.country == \"PT\" and not(identity.email == \"bob@example.com\")"),
            Expr::And(vec![
                atom(Atom::Country(vec![cc("PT")])),
                not(atom(Atom::User(strings(&["bob@example.com"])))),
            ])
        );
    }

    #[test]
    fn expr_example_protocol_or_src_ip_exact() {
        assert_eq!(
            parse(
                "net.protocol == \"udp\" or net.src.ip in {10.1.0.0/16}",
                ExprKind::Traffic
            ),
            Ok(Expr::Or(vec![
                udp(),
                atom(Atom::SrcIp(nets(&["10.1.0.0/16"]))),
            ]))
        );
    }

    // Operators and precedence.

    #[test]
    fn expr_precedence_and_binds_tighter_than_or() {
        let text =
            "net.protocol == \"tcp\" or net.protocol == \"udp\" and net.protocol == \"icmp\"";
        assert_eq!(
            parsed(text),
            Expr::Or(vec![tcp(), Expr::And(vec![udp(), icmp()])])
        );
        let text =
            "net.protocol == \"tcp\" and net.protocol == \"udp\" or net.protocol == \"icmp\"";
        assert_eq!(
            parsed(text),
            Expr::Or(vec![Expr::And(vec![tcp(), udp()]), icmp()])
        );
    }

    #[test]
    fn expr_precedence_not_binds_tighter_than_and() {
        assert_eq!(
            parsed("not net.protocol == \"tcp\" and net.protocol == \"udp\""),
            Expr::And(vec![not(tcp()), udp()])
        );
        assert_eq!(
            parsed("not (net.protocol == \"tcp\") and net.protocol == \"udp\""),
            Expr::And(vec![not(tcp()), udp()])
        );
    }

    #[test]
    fn expr_parentheses_override_precedence() {
        assert_eq!(
            parsed(
                "(net.protocol == \"tcp\" or net.protocol == \"udp\") and net.protocol == \"icmp\""
            ),
            Expr::And(vec![Expr::Or(vec![tcp(), udp()]), icmp()])
        );
        assert_eq!(
            parsed("not(net.protocol == \"tcp\" or net.protocol == \"udp\")"),
            not(Expr::Or(vec![tcp(), udp()]))
        );
        assert_eq!(parsed("((net.protocol == \"tcp\"))"), tcp());
    }

    #[test]
    fn expr_chains_flatten_single_items_unwrapped() {
        let t = "net.protocol == \"tcp\"";
        let u = "net.protocol == \"udp\"";
        let i = "net.protocol == \"icmp\"";
        assert_eq!(
            parsed(&format!("{t} and {u} and {i}")),
            Expr::And(vec![tcp(), udp(), icmp()])
        );
        assert_eq!(
            parsed(&format!("{t} or {u} or {i}")),
            Expr::Or(vec![tcp(), udp(), icmp()])
        );
        assert_eq!(parsed(t), tcp(), "no single-element And/Or");
        // Explicit parentheses keep their grouping, so printing round-trips.
        assert_eq!(
            parsed(&format!("{t} or ({u} or {i})")),
            Expr::Or(vec![tcp(), Expr::Or(vec![udp(), icmp()])])
        );
    }

    #[test]
    fn expr_symbol_operators_same_as_words() {
        let t = "net.protocol == \"tcp\"";
        let u = "net.protocol == \"udp\"";
        let i = "net.protocol == \"icmp\"";
        assert_eq!(
            parsed(&format!("{t} && {u} || !{i}")),
            parsed(&format!("{t} and {u} or not {i}"))
        );
        assert_eq!(
            parsed(&format!("{t}&&{u}||!({i})")),
            Expr::Or(vec![Expr::And(vec![tcp(), udp()]), not(icmp())])
        );
    }

    #[test]
    fn expr_not_spellings_all_equal() {
        for text in [
            "not(net.protocol == \"tcp\")",
            "not net.protocol == \"tcp\"",
            "!net.protocol == \"tcp\"",
            "! (net.protocol == \"tcp\")",
            "net.protocol != \"tcp\"",
            "net.protocol ne \"tcp\"",
        ] {
            assert_eq!(parsed(text), not(tcp()), "{text}");
        }
        assert_eq!(parsed("not not net.protocol == \"tcp\""), not(not(tcp())));
        assert_eq!(parsed("!!net.protocol == \"tcp\""), not(not(tcp())));
    }

    // Every field with ==, != and in.

    #[test]
    fn expr_every_field_eq_ne_in_parse() {
        let cases: Vec<(&str, &str, &str, Atom, Atom)> = vec![
            (
                "net.src.ip",
                "10.0.0.0/8",
                "10.0.0.0/8, 2001:db8::/32",
                Atom::SrcIp(nets(&["10.0.0.0/8"])),
                Atom::SrcIp(nets(&["10.0.0.0/8", "2001:db8::/32"])),
            ),
            (
                "net.dst.ip",
                "198.51.100.7",
                "198.51.100.7 2001:db8::1",
                Atom::DstIp(nets(&["198.51.100.7/32"])),
                Atom::DstIp(nets(&["198.51.100.7/32", "2001:db8::1/128"])),
            ),
            (
                "net.dst.port",
                "443",
                "443 8000..8100 9000-9100",
                Atom::DstPort(ports(&[(443, 443)])),
                Atom::DstPort(ports(&[(443, 443), (8000, 8100), (9000, 9100)])),
            ),
            (
                "net.protocol",
                "\"TCP\"",
                "\"tcp\" \"Udp\" \"icmp\" \"ICMPv6\"",
                Atom::Protocol(vec![Protocol::Tcp]),
                Atom::Protocol(Protocol::ALL.to_vec()),
            ),
            (
                "net.dst.geo.country",
                "\"pt\"",
                "\"PT\" \"GB\"",
                Atom::Country(vec![cc("PT")]),
                Atom::Country(vec![cc("PT"), cc("GB")]),
            ),
            (
                "net.dst.geo.continent",
                "\"eu\"",
                "\"EU\" \"SA\"",
                Atom::Continent(vec![Continent::Eu]),
                Atom::Continent(vec![Continent::Eu, Continent::Sa]),
            ),
            (
                "identity.email",
                "\"Bob@Example.COM\"",
                "\"bob@example.com\" \"alice@example.com\"",
                Atom::User(strings(&["bob@example.com"])),
                Atom::User(strings(&["bob@example.com", "alice@example.com"])),
            ),
        ];
        for (field, one, many, single, set) in cases {
            assert_eq!(
                parsed(&format!("{field} == {one}")),
                atom(single.clone()),
                "{field} =="
            );
            assert_eq!(
                parsed(&format!("{field} eq {one}")),
                atom(single.clone()),
                "{field} eq"
            );
            assert_eq!(
                parsed(&format!("{field} != {one}")),
                not(atom(single)),
                "{field} !="
            );
            assert_eq!(
                parsed(&format!("{field} in {{{many}}}")),
                atom(set),
                "{field} in"
            );
        }
    }

    #[test]
    fn expr_groups_all_forms_same_as_any() {
        let one = atom(Atom::Group(strings(&["finance"])));
        for text in [
            "any(identity.groups[*].name == \"finance\")",
            "any(identity.groups.name[*] == \"finance\")",
            "identity.groups[*].name == \"finance\"",
            "identity.groups.name[*] eq \"finance\"",
            "identity.groups[*].name in {\"finance\"}",
        ] {
            assert_eq!(parsed(text), one, "{text}");
        }
        assert_eq!(
            parsed("any(identity.groups[*].name in {\"finance\" \"eng\"})"),
            atom(Atom::Group(strings(&["finance", "eng"])))
        );
        assert_eq!(
            parsed("not(any(identity.groups[*].name == \"finance\"))"),
            not(one)
        );
    }

    #[test]
    fn expr_posture_all_forms_same_as_any() {
        let expected = atom(Atom::Posture(strings(&["compliant", "disk-encrypted"])));
        for text in [
            "any(device_posture.checks.passed[*] in {\"compliant\" \"disk-encrypted\"})",
            "device_posture.checks.passed[*] in {\"compliant\", \"disk-encrypted\"}",
        ] {
            assert_eq!(
                parse(text, ExprKind::DevicePosture),
                Ok(expected.clone()),
                "{text}"
            );
        }
        assert_eq!(
            parse(
                "device_posture.checks.passed[*] == \"compliant\"",
                ExprKind::DevicePosture
            ),
            Ok(atom(Atom::Posture(strings(&["compliant"]))))
        );
    }

    #[test]
    fn expr_array_ne_rejected_suggests_not_any() {
        let expected = "1:29: \"!=\" is not supported on identity.groups[*].name (it would mean \
                        \"some value is not x\"); to exclude a value write \
                        not(any(identity.groups[*].name == \"x\"))";
        assert_eq!(error_any("any(identity.groups[*].name != \"x\")"), expected);
        assert_eq!(
            error_any("identity.groups[*].name != \"x\""),
            expected.replace("1:29", "1:25")
        );
        assert!(
            error_any("device_posture.checks.passed[*] ne \"x\"")
                .contains("not(any(device_posture.checks.passed[*] == \"x\"))")
        );
    }

    #[test]
    fn expr_any_around_non_array_rejected() {
        assert_eq!(
            error_any("any(net.dst.port == 443)"),
            "1:5: any(...) only applies to the array fields identity.groups[*].name and \
             device_posture.checks.passed[*], not net.dst.port"
        );
        assert_eq!(
            error_any("any(not identity.groups[*].name == \"a\")"),
            "1:5: expected an array field (identity.groups[*].name or \
             device_posture.checks.passed[*]), found \"not\""
        );
        assert_eq!(
            error_any("any((identity.groups[*].name == \"a\"))"),
            "1:5: expected an array field (identity.groups[*].name or \
             device_posture.checks.passed[*]), found \"(\""
        );
        assert_eq!(
            error_any("any(identity.groups[*].name == \"a\" or identity.groups[*].name == \"b\")"),
            "1:36: expected \")\" after the comparison in any(...), which holds exactly one, \
             found \"or\""
        );
        assert_eq!(
            error_any("any identity.groups[*].name == \"a\""),
            "1:5: expected \"(\" after \"any\", found \"identity.groups[*].name\""
        );
    }

    // Ports.

    #[test]
    fn expr_port_ordering_operators_make_ranges() {
        let port = |text: &str| parsed(&format!("net.dst.port {text}"));
        let range = |first, last| atom(Atom::DstPort(ports(&[(first, last)])));
        assert_eq!(port(">= 1024"), range(1024, 65535));
        assert_eq!(port("ge 1024"), range(1024, 65535));
        assert_eq!(port("> 1023"), range(1024, 65535));
        assert_eq!(port("gt 1023"), range(1024, 65535));
        assert_eq!(port("< 1024"), range(0, 1023));
        assert_eq!(port("lt 1024"), range(0, 1023));
        assert_eq!(port("<= 1023"), range(0, 1023));
        assert_eq!(port("le 1023"), range(0, 1023));
        assert_eq!(port(">= 0"), range(0, 65535));
        assert_eq!(port("<= 65535"), range(0, 65535));
        assert_eq!(port("== 8000..8100"), range(8000, 8100));
    }

    #[test]
    fn expr_port_ordering_empty_or_bad_rejected() {
        assert_eq!(
            error_any("net.dst.port > 65535"),
            "1:16: net.dst.port > 65535 matches no port"
        );
        assert_eq!(
            error_any("net.dst.port lt 0"),
            "1:17: net.dst.port lt 0 matches no port"
        );
        assert_eq!(
            error_any("net.dst.port >= 1000..2000"),
            "1:17: expected a port number after \">=\", found \"1000..2000\""
        );
        assert_eq!(
            error_any("net.dst.port < 70000"),
            "1:16: invalid port \"70000\": 70000 is outside 0-65535"
        );
        assert_eq!(
            error_any("net.dst.ip < 10.0.0.0"),
            "1:12: \"<\" only applies to net.dst.port"
        );
    }

    #[test]
    fn expr_port_errors_name_value() {
        assert_eq!(
            error_any("net.dst.port in {443 8100..8000}"),
            "1:22: invalid port range \"8100..8000\": 8100 is after 8000"
        );
        assert_eq!(
            error_any("net.dst.port in {8100-8000}"),
            "1:18: invalid port range \"8100-8000\": 8100 is after 8000"
        );
        assert_eq!(
            error_any("net.dst.port == 65536"),
            "1:17: invalid port \"65536\": 65536 is outside 0-65535"
        );
        assert_eq!(
            error_any("net.dst.port in {80..}"),
            "1:18: invalid port range \"80..\": expected two port numbers (8000..8100)"
        );
        assert_eq!(
            error_any("net.dst.port == \"443\""),
            "1:17: expected a value for net.dst.port (a port like 443 or a range like 8000..8100), \
             found the string \"443\""
        );
    }

    // Values of the wrong type or unknown values.

    #[test]
    fn expr_ip_errors_name_value() {
        assert_eq!(
            error_any("net.dst.ip == 10.1.2.3/8"),
            "1:15: invalid CIDR \"10.1.2.3/8\": host bits are set (the network is 10.0.0.0/8)"
        );
        assert_eq!(
            error_any("net.src.ip in {10.0.0.0/8 example.com}"),
            "1:27: invalid CIDR \"example.com\": \"example.com\" is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            error_any("net.dst.ip == \"10.0.0.0/8\""),
            "1:15: expected a value for net.dst.ip (an address or CIDR, unquoted, like \
             192.0.2.0/24), found the string \"10.0.0.0/8\""
        );
        let long = "1".repeat(100);
        assert_eq!(
            error_any(&format!("net.dst.ip == {long}")),
            format!(
                "1:15: expected a value for net.dst.ip (an address or CIDR, unquoted, like \
                 192.0.2.0/24), found \"{}\"...",
                &long[..64]
            )
        );
    }

    #[test]
    fn expr_protocol_errors_name_value() {
        assert_eq!(
            error_any("net.protocol == \"sctp\""),
            "1:17: unknown protocol \"sctp\": expected \"tcp\", \"udp\", \"icmp\" or \"icmpv6\""
        );
        assert_eq!(
            error_any("net.protocol == 10.0.0.1"),
            "1:17: expected a value for net.protocol (a quoted protocol: \"tcp\", \"udp\", \
             \"icmp\" or \"icmpv6\"), found \"10.0.0.1\""
        );
        assert_eq!(
            error_any("net.protocol == tcp"),
            "1:17: expected a value for net.protocol (a quoted protocol: \"tcp\", \"udp\", \
             \"icmp\" or \"icmpv6\"), found \"tcp\""
        );
    }

    #[test]
    fn expr_country_unknown_rejected_uk_hints_gb() {
        assert_eq!(
            error_any("net.dst.geo.country == \"UK\""),
            "1:24: unknown country code \"UK\" (ISO 3166-1 alpha-2, e.g. \"GB\")"
        );
        assert_eq!(
            error_any("net.dst.geo.country in {\"PT\" \"ZZ\"}"),
            "1:30: unknown country code \"ZZ\": not an ISO 3166-1 alpha-2 code"
        );
        assert_eq!(
            error_any("net.dst.geo.country in {\"PRT\"}"),
            "1:25: unknown country code \"PRT\": not an ISO 3166-1 alpha-2 code"
        );
    }

    #[test]
    fn expr_continent_unknown_rejected() {
        assert_eq!(
            error_any("net.dst.geo.continent == \"EUR\""),
            "1:26: unknown continent \"EUR\": expected one of \"AF\", \"AN\", \"AS\", \"EU\", \
             \"NA\", \"OC\", \"SA\""
        );
        assert_eq!(
            error_any("net.dst.geo.continent == EU"),
            "1:26: expected a value for net.dst.geo.continent (a quoted continent code like \
             \"EU\"), found \"EU\""
        );
    }

    #[test]
    fn expr_string_fields_unquoted_rejected() {
        assert_eq!(
            error_any("identity.groups[*].name in {finance}"),
            "1:29: expected a value for identity.groups[*].name (a quoted group name), found \
             \"finance\""
        );
        assert_eq!(
            error_any("identity.email == bob"),
            "1:19: expected a value for identity.email (a quoted e-mail address), found \"bob\""
        );
    }

    // Kinds.

    #[test]
    fn expr_kind_traffic_rejects_other_fields_says_where() {
        assert_eq!(
            error("identity.email == \"bob@example.com\"", ExprKind::Traffic),
            "1:1: identity.email belongs in the \"identity\" expression, not \"traffic\""
        );
        assert_eq!(
            error(
                "net.dst.port == 443 and any(device_posture.checks.passed[*] == \"ok\")",
                ExprKind::Traffic
            ),
            "1:29: device_posture.checks.passed[*] belongs in the \"device_posture\" \
             expression, not \"traffic\""
        );
    }

    #[test]
    fn expr_kind_identity_rejects_other_fields_says_where() {
        assert_eq!(
            error("net.dst.port == 443", ExprKind::Identity),
            "1:1: net.dst.port belongs in the \"traffic\" expression, not \"identity\""
        );
        assert_eq!(
            error(
                "device_posture.checks.passed[*] == \"ok\"",
                ExprKind::Identity
            ),
            "1:1: device_posture.checks.passed[*] belongs in the \"device_posture\" \
             expression, not \"identity\""
        );
    }

    #[test]
    fn expr_kind_device_posture_rejects_other_fields_says_where() {
        assert_eq!(
            error(
                "identity.groups.name[*] == \"eng\"",
                ExprKind::DevicePosture
            ),
            "1:1: identity.groups.name[*] belongs in the \"identity\" expression, not \
             \"device_posture\""
        );
    }

    #[test]
    fn expr_kind_each_allows_own_fields_any_allows_all() {
        let traffic = "net.src.ip == 10.0.0.0/8 and net.dst.ip == 10.0.0.1 and net.dst.port == 1 \
                       and net.protocol == \"tcp\" and net.dst.geo.country == \"PT\" \
                       and net.dst.geo.continent == \"EU\"";
        let identity = "identity.email == \"a@b\" and identity.groups[*].name == \"g\"";
        let posture = "device_posture.checks.passed[*] == \"ok\"";
        assert!(parse(traffic, ExprKind::Traffic).is_ok());
        assert!(parse(identity, ExprKind::Identity).is_ok());
        assert!(parse(posture, ExprKind::DevicePosture).is_ok());
        assert!(
            parse(
                &format!("{traffic} and {identity} and {posture}"),
                ExprKind::Any
            )
            .is_ok()
        );
    }

    #[test]
    fn expr_kind_name_matches_policy_field() {
        assert_eq!(ExprKind::Traffic.name(), "traffic");
        assert_eq!(ExprKind::Identity.name(), "identity");
        assert_eq!(ExprKind::DevicePosture.name(), "device_posture");
        assert_eq!(ExprKind::Any.name(), "expression");
    }

    // Unknown fields.

    #[test]
    fn expr_unknown_field_suggests_nearest_lists_known() {
        assert_eq!(
            error("net.dst.prot == 443", ExprKind::Traffic),
            "1:1: unknown field \"net.dst.prot\", did you mean \"net.dst.port\"? (traffic fields: \
             net.src.ip, net.dst.ip, net.dst.port, net.protocol, net.dst.geo.country, \
             net.dst.geo.continent)"
        );
        assert_eq!(
            error("user == \"bob\"", ExprKind::Identity),
            "1:1: unknown field \"user\" (identity fields: identity.email, identity.groups[*].name)"
        );
        assert!(error_any("identity.emails == \"a\"").starts_with(
            "1:1: unknown field \"identity.emails\", did you mean \"identity.email\"? \
                 (known fields: net.src.ip,"
        ));
    }

    #[test]
    fn expr_non_field_where_field_expected_rejected() {
        assert_eq!(
            error_any("443 == net.dst.port"),
            "1:1: expected a field name, found \"443\""
        );
        assert_eq!(
            error_any("net.protocol == \"tcp\" and and"),
            "1:27: expected a field name, found \"and\""
        );
        assert_eq!(
            error_any("\"tcp\" == net.protocol"),
            "1:1: expected a field name, found the string \"tcp\""
        );
    }

    // Strings.

    #[test]
    fn expr_string_escapes_parse() {
        assert_eq!(
            parsed(r#"identity.groups[*].name in {"say \"hi\"" "back\\slash"}"#),
            atom(Atom::Group(strings(&["say \"hi\"", "back\\slash"])))
        );
    }

    #[test]
    fn expr_string_unterminated_error_at_opening_quote() {
        assert_eq!(
            error_any("identity.email == \"bob@example.com"),
            "1:19: unterminated string (no closing \" on this line)"
        );
        assert_eq!(
            error_any("identity.email == \"bob\nand net.dst.port == 1"),
            "1:19: unterminated string (no closing \" on this line)"
        );
        assert_eq!(
            error_any("identity.email == \"bob\r\nor net.dst.port == 1"),
            "1:19: unterminated string (no closing \" on this line)"
        );
        assert_eq!(
            error_any("identity.email == \"bob\\"),
            "1:19: unterminated string (no closing \" on this line)"
        );
    }

    #[test]
    fn expr_string_bad_escape_or_control_rejected() {
        assert_eq!(
            error_any(r#"identity.email == "a\nb""#),
            r#"1:21: invalid escape "\n" in string (only \" and \\ are allowed)"#
        );
        assert_eq!(
            error_any("identity.email == \"a\u{7}b\""),
            "1:21: control character '\\u{7}' in string"
        );
    }

    // Sets.

    #[test]
    fn expr_set_commas_optional_same_values() {
        let expected = atom(Atom::DstPort(ports(&[(80, 80), (443, 443), (8000, 8100)])));
        for text in [
            "net.dst.port in {80 443 8000..8100}",
            "net.dst.port in {80, 443, 8000..8100}",
            "net.dst.port in {80,443,8000..8100,}",
            "net.dst.port in{\n  80\n  443\n  8000-8100\n}",
        ] {
            assert_eq!(parsed(text), expected, "{text}");
        }
    }

    #[test]
    fn expr_set_empty_or_malformed_rejected() {
        assert_eq!(
            error_any("net.dst.port in {}"),
            "1:17: empty set for net.dst.port: list at least one value"
        );
        assert_eq!(
            error_any("net.dst.port in 443"),
            "1:17: expected \"{\" after \"in\", found \"443\""
        );
        assert_eq!(
            error_any("net.dst.port in {443 80"),
            "1:24: unexpected end of expression, expected a value or \"}\" to close the \"{\" at 1:17"
        );
        assert_eq!(
            error_any("net.dst.port in {, 443}"),
            "1:18: expected a value for net.dst.port (a port like 443 or a range like \
             8000..8100), found \",\""
        );
        assert_eq!(
            error_any("net.dst.port == {443}"),
            "1:17: expected a value after \"==\", found \"{\" (compare with a set using \"in\")"
        );
    }

    #[test]
    fn expr_set_over_limit_rejected() {
        let limits = Limits {
            set_values: 3,
            ..LIMITS
        };
        assert!(parse_with("net.dst.port in {1 2 3}", ExprKind::Any, limits).is_ok());
        assert_eq!(
            parse_with("net.dst.port in {1 2 3 4}", ExprKind::Any, limits)
                .unwrap_err()
                .to_string(),
            "1:24: set has more than 3 values"
        );
        // With the real limits the largest set the length limit admits parses.
        let many = vec!["1"; 32000].join(" ");
        let Ok(Expr::Atom(Atom::DstPort(values))) =
            parse(&format!("net.dst.port in {{{many}}}"), ExprKind::Any)
        else {
            panic!("a 32000-value set is within the limits");
        };
        assert_eq!(values.len(), 32000);
    }

    // Error positions and messages.

    #[test]
    fn expr_error_end_of_input_after_last_character() {
        assert_eq!(
            error_any("net.dst.port =="),
            "1:16: unexpected end of expression, expected a value for net.dst.port (a port like \
             443 or a range like 8000..8100)"
        );
        assert!(
            error_any("net.dst.ip ==  ")
                .starts_with("1:16: unexpected end of expression, expected a value")
        );
        assert_eq!(
            error_any("net.dst.port == 443 and"),
            "1:24: unexpected end of expression, expected a field name"
        );
        assert_eq!(
            error_any("net.dst.port"),
            "1:13: unexpected end of expression, expected \"==\", \"!=\", \"in\", \"<\", \"<=\", \
             \">\" or \">=\" after net.dst.port"
        );
        assert_eq!(
            error_any("(net.dst.port == 443"),
            "1:21: unexpected end of expression, expected \")\" to close the \"(\" at 1:1"
        );
    }

    #[test]
    fn expr_error_multiline_reports_line_and_column() {
        let text = "net.dst.port in {443 8443}\n  and net.dst.ip in {10.0.0.0/8 example}\nor true";
        assert_eq!(
            parse(text, ExprKind::Traffic),
            Err(ExprError {
                line: 2,
                column: 33,
                message: "invalid CIDR \"example\": \"example\" is not an IPv4 or IPv6 address"
                    .into()
            })
        );
        assert_eq!(
            error_any("net.dst.port == 443\r\nand\r\n"),
            "3:1: unexpected end of expression, expected a field name"
        );
    }

    #[test]
    fn expr_error_columns_count_characters_not_bytes() {
        assert_eq!(
            error_any("identity.email == \"josé\" and é"),
            "1:30: unexpected character 'é'"
        );
    }

    #[test]
    fn expr_error_operator_and_trailing_tokens() {
        assert_eq!(
            error_any("net.dst.ip 10.0.0.0/8"),
            "1:12: expected \"==\", \"!=\" or \"in\" after net.dst.ip, found \"10.0.0.0/8\""
        );
        assert_eq!(
            error_any("net.dst.port == 443 443"),
            "1:21: expected \"and\", \"or\" or the end of the expression, found \"443\""
        );
        assert_eq!(error_any("net.dst.port == 443)"), "1:20: unmatched \")\"");
        assert_eq!(
            error_any("net.dst.port = 443"),
            "1:14: unexpected \"=\" (compare with \"==\")"
        );
        assert_eq!(
            error_any("net.dst.port == 1 & net.dst.port == 2"),
            "1:19: unexpected \"&\" (use \"&&\" or \"and\")"
        );
        assert_eq!(
            error_any("net.dst.port == 1 | net.dst.port == 2"),
            "1:19: unexpected \"|\" (use \"||\" or \"or\")"
        );
        assert_eq!(
            error_any("net.dst.port == 1 # x"),
            "1:19: unexpected character '#'"
        );
    }

    // Limits.

    #[test]
    fn expr_input_empty_rejected() {
        assert_eq!(error_any(""), "1:1: empty expression");
        assert_eq!(error_any(" \n\t "), "2:3: empty expression");
    }

    #[test]
    fn expr_input_over_64k_rejected() {
        let padding = " ".repeat(65536 - "net.dst.port == 1".len());
        assert!(parse(&format!("net.dst.port == 1{padding}"), ExprKind::Any).is_ok());
        assert_eq!(
            error_any(&format!("net.dst.port == 1{padding} ")),
            "1:1: expression is 65537 bytes long, at most 65536 are allowed"
        );
    }

    #[test]
    fn expr_nesting_64_accepted_65_rejected() {
        let leaf = "net.dst.port == 1";
        let parens = |n: usize| format!("{}{leaf}{}", "(".repeat(n), ")".repeat(n));
        assert!(parse(&parens(64), ExprKind::Any).is_ok());
        assert_eq!(
            error_any(&parens(65)),
            "1:65: expression nested more than 64 levels deep"
        );
        let nots = |n: usize| format!("{}{leaf}", "not ".repeat(n));
        assert!(parse(&nots(64), ExprKind::Any).is_ok());
        assert_eq!(
            error_any(&nots(65)),
            "1:257: expression nested more than 64 levels deep"
        );
        let calls = |n: usize| format!("{}{leaf}{}", "not(".repeat(n), ")".repeat(n));
        assert!(
            parse(&calls(64), ExprKind::Any).is_ok(),
            "not( is one level"
        );
        assert!(parse(&calls(65), ExprKind::Any).is_err());
        // `!=` and a bare array field stand for not(...) and any(...), which
        // the printer writes out, so they count as a level too.
        let ne = format!("{}net.dst.port != 1{}", "(".repeat(64), ")".repeat(64));
        assert_eq!(
            error_any(&ne),
            "1:78: expression nested more than 64 levels deep"
        );
        let group = format!("{}identity.groups[*].name == \"a\"", "!".repeat(64));
        assert_eq!(
            error_any(&group),
            "1:65: expression nested more than 64 levels deep"
        );
        let any = format!("{}any(identity.groups[*].name == \"a\")", "!".repeat(63));
        let expr = parsed(&any);
        assert_eq!(
            parsed(&expr.to_string()),
            expr,
            "printing keeps within the depth limit"
        );
    }

    #[test]
    fn expr_deep_hostile_input_errors_without_overflow() {
        for opener in ["(", "!", "not ", "not(", "any("] {
            let text = opener.repeat(65536 / opener.len());
            let err = parse(&text, ExprKind::Any).unwrap_err();
            assert!(
                err.message.contains("nested more than 64 levels deep")
                    || err.message.starts_with("expected"),
                "{opener:?}: {err}"
            );
        }
    }

    #[test]
    fn expr_odd_input_errors_without_panic() {
        for text in [
            "\0",
            "\u{feff}net.dst.port == 1",
            "net.dst.port == 1 \u{202e}",
            "日本 == \"x\"",
            "identity.email == \"日本\u{1F600}\"",
            "\"",
            "\\",
            "{}",
            "()",
            "any()",
            "not",
            "!",
            "==",
            "net.dst.ip in {::/0 ::ffff:1.2.3.4 [::1]}",
            "net.dst.port in {-1 ..1 1-}",
            "net.dst.port > ",
            "net.dst.geo.country == \"\u{0130}\u{0130}\"",
        ] {
            let _ = parse(text, ExprKind::Any);
        }
    }

    // Printing.

    #[test]
    fn expr_print_parsed_exprs_canonical_text() {
        let cases = [
            (
                "net.dst.ip in {192.0.2.0/24 198.51.100.7/32} && net.dst.port in {443, 8000-8100}",
                "net.dst.ip in {192.0.2.0/24 198.51.100.7} and net.dst.port in {443 8000..8100}",
            ),
            (
                "identity.groups.name[*] == \"finance\"",
                "any(identity.groups[*].name in {\"finance\"})",
            ),
            (
                "device_posture.checks.passed[*] in {\"compliant\"}",
                "any(device_posture.checks.passed[*] in {\"compliant\"})",
            ),
            (
                "!net.protocol == \"TCP\" || net.dst.geo.country == \"pt\"",
                "not(net.protocol in {\"tcp\"}) or net.dst.geo.country in {\"PT\"}",
            ),
            (
                "(net.dst.geo.continent == \"eu\" or identity.email != \"Bob@X\") and true",
                "(net.dst.geo.continent in {\"EU\"} or not(identity.email in {\"bob@x\"})) and true",
            ),
            (
                "net.src.ip == ::1 and (net.src.ip == 10.0.0.0/8 and net.src.ip == ::/0)",
                "net.src.ip in {::1} and (net.src.ip in {10.0.0.0/8} and net.src.ip in {::/0})",
            ),
            (
                "not (net.dst.port == 1 or net.dst.port == 2) or (net.dst.port == 3 or net.dst.port == 4)",
                "not(net.dst.port in {1} or net.dst.port in {2}) or (net.dst.port in {3} or net.dst.port in {4})",
            ),
            (
                "identity.groups[*].name in {\"a \\\"b\\\" \\\\c\"}",
                "any(identity.groups[*].name in {\"a \\\"b\\\" \\\\c\"})",
            ),
        ];
        for (text, printed) in cases {
            let expr = parsed(text);
            assert_eq!(expr.to_string(), printed, "{text}");
            assert_eq!(parsed(printed), expr, "{printed} parses back");
        }
    }

    #[test]
    fn expr_print_degenerate_chains_keep_meaning() {
        assert_eq!(Expr::And(vec![]).to_string(), "true");
        assert_eq!(Expr::Or(vec![]).to_string(), "not(true)");
        assert_eq!(
            Expr::And(vec![
                Expr::Or(vec![tcp()]),
                Expr::And(vec![Expr::Or(vec![udp(), icmp()])])
            ])
            .to_string(),
            "net.protocol in {\"tcp\"} and (net.protocol in {\"udp\"} or net.protocol in {\"icmp\"})"
        );
    }

    #[test]
    fn expr_error_display_prefixes_line_column() {
        let err = ExprError {
            line: 2,
            column: 7,
            message: "boom".into(),
        };
        assert_eq!(err.to_string(), "2:7: boom");
    }

    // Property tests.

    fn any_net() -> impl Strategy<Value = IpNet> {
        prop::sample::select(vec![
            "10.0.0.0/8",
            "192.0.2.0/24",
            "198.51.100.7/32",
            "0.0.0.0/0",
            "2001:db8::/32",
            "::1/128",
            "::ffff:192.0.2.1/128",
        ])
        .prop_map(|s| s.parse().unwrap())
    }

    fn any_port_range() -> impl Strategy<Value = PortRange> {
        prop_oneof![
            any::<u16>().prop_map(|p| PortRange { first: p, last: p }),
            (any::<u16>(), any::<u16>()).prop_map(|(a, b)| PortRange {
                first: a.min(b),
                last: a.max(b),
            }),
        ]
    }

    fn any_string(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop::sample::select(pool).prop_map(str::to_owned)
    }

    fn any_atom() -> impl Strategy<Value = Atom> {
        const USERS: &[&str] = &[
            "bob@example.com",
            "alice@example.org",
            "josé@exemplo.pt",
            "q\"uote@x",
        ];
        const GROUPS: &[&str] = &[
            "finance",
            "eng ops",
            "say \"hi\"",
            "back\\slash",
            "ünïcode",
            "",
        ];
        const CHECKS: &[&str] = &["compliant", "disk-encrypted", "os:macos"];
        prop_oneof![
            vec(any_net(), 1..4).prop_map(Atom::SrcIp),
            vec(any_net(), 1..4).prop_map(Atom::DstIp),
            vec(any_port_range(), 1..4).prop_map(Atom::DstPort),
            vec(prop::sample::select(Protocol::ALL.to_vec()), 1..4).prop_map(Atom::Protocol),
            vec(
                prop::sample::select(vec!["PT", "GB", "US", "AQ", "XK"]).prop_map(cc),
                1..4
            )
            .prop_map(Atom::Country),
            vec(prop::sample::select(Continent::ALL.to_vec()), 1..4).prop_map(Atom::Continent),
            vec(any_string(USERS), 1..4).prop_map(Atom::User),
            vec(any_string(GROUPS), 1..4).prop_map(Atom::Group),
            vec(any_string(CHECKS), 1..4).prop_map(Atom::Posture),
        ]
    }

    /// Expressions of the shapes the parser produces: no empty or
    /// single-item chains, empty sets or upper-case users.
    fn any_expr() -> impl Strategy<Value = Expr> {
        let leaf = prop_oneof![1 => Just(Expr::True), 9 => any_atom().prop_map(Expr::Atom)];
        leaf.prop_recursive(5, 48, 4, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                vec(inner.clone(), 2..5).prop_map(Expr::And),
                vec(inner, 2..5).prop_map(Expr::Or),
            ]
        })
    }

    /// Operands random expressions are built from: comparisons, most of
    /// them valid, and stray tokens.
    const OPERANDS: &[&str] = &[
        "net.dst.port == 443",
        "net.dst.port != 8000..8100",
        "net.dst.port >= 1024",
        "net.src.ip in {10.0.0.0/8 ::1}",
        "net.dst.ip ne 192.0.2.7",
        "net.protocol in {\"tcp\", \"UDP\"}",
        "net.dst.geo.country == \"pt\"",
        "net.dst.geo.continent != \"EU\"",
        "identity.email == \"Bob@X\"",
        "identity.groups.name[*] in {\"a\\\"b\"}",
        "any(identity.groups[*].name == \"g\")",
        "device_posture.checks.passed[*] in {\"ok\"}",
        "true",
        "any(",
        "net.dst.port",
        "in {",
        "}",
        ",",
        "443",
        "\"",
        "é",
        "\u{0}",
    ];
    /// What comes before an operand.
    const PREFIXES: &[&str] = &["", "", "", "not ", "!", "(", "not(", "\n"];
    /// What joins two operands.
    const JOINS: &[&str] = &[" and ", " or ", " && ", "||", ") and ", ") or ", " "];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn expr_round_trip_random_exprs_equal(expr in any_expr()) {
            let text = expr.to_string();
            let back = parse(&text, ExprKind::Any);
            prop_assert_eq!(back, Ok(expr), "printed as {}", text);
        }

        #[test]
        fn expr_random_text_parses_or_errors_and_round_trips(
            parts in vec(
                (
                    prop::sample::select(JOINS),
                    prop::sample::select(PREFIXES),
                    prop::sample::select(OPERANDS),
                ),
                1..8,
            ),
        ) {
            let mut text = String::new();
            for (i, &(join, prefix, operand)) in parts.iter().enumerate() {
                if i > 0 {
                    text.push_str(join);
                }
                text.push_str(prefix);
                text.push_str(operand);
            }
            // Close what is open, so that most texts are well-formed.
            let open = text.matches('(').count().saturating_sub(text.matches(')').count());
            text.push_str(&")".repeat(open));
            if let Ok(expr) = parse(&text, ExprKind::Any) {
                let printed = expr.to_string();
                prop_assert_eq!(
                    parse(&printed, ExprKind::Any),
                    Ok(expr),
                    "{:?} printed as {}",
                    text,
                    printed
                );
            }
        }

        #[test]
        fn expr_arbitrary_text_never_panics(text in "\\PC{0,64}|[ -~\n\t]{0,64}") {
            let _ = parse(&text, ExprKind::Any);
        }
    }
}
