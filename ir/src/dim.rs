//! Symbolic dimensions and shapes.
//!
//! A [`Dim`] is a polynomial with integer coefficients over named symbols (`B`, `T`, …) and opaque
//! ceiling-division atoms. It is kept in a normal form (sorted monomials, no zero coefficients), so two
//! expressions that are equal as polynomials compare equal: `B*T` and `T*B`, `(B*T*128)/128` and `B*T`.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// An indivisible factor of a monomial.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Atom {
    /// A named symbol bound at run time.
    Sym(String),
    /// `ceil(num / den)` where the division is not exact symbolically.
    CeilDiv(Box<Dim>, Box<Dim>),
}

/// A product of atoms with positive exponents, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Monomial(Vec<(Atom, u32)>);

impl Monomial {
    fn one() -> Self {
        Monomial(Vec::new())
    }
    fn degree(&self) -> u32 {
        self.0.iter().map(|(_, e)| *e).sum()
    }
    fn mul(&self, other: &Monomial) -> Monomial {
        let mut m: BTreeMap<Atom, u32> = self.0.iter().cloned().collect();
        for (a, e) in &other.0 {
            *m.entry(a.clone()).or_insert(0) += e;
        }
        Monomial(m.into_iter().collect())
    }
    /// `self / other` if every factor of `other` occurs in `self`.
    fn div(&self, other: &Monomial) -> Option<Monomial> {
        let mut m: BTreeMap<Atom, u32> = self.0.iter().cloned().collect();
        for (a, e) in &other.0 {
            let have = m.get_mut(a)?;
            if *have < *e {
                return None;
            }
            *have -= e;
            if *have == 0 {
                m.remove(a);
            }
        }
        Some(Monomial(m.into_iter().collect()))
    }
}

/// A symbolic dimension: a normalised polynomial over symbols.
///
/// ```
/// use fulgur_ir::Dim;
/// let b = Dim::sym("B");
/// let t = Dim::sym("T");
/// let bt = b.clone() * t.clone();
/// assert_eq!(bt, t.clone() * b.clone());
/// assert_eq!(bt.div_exact(&t), Some(b.clone()));
/// assert_eq!((bt.clone() * Dim::from(128)).div_exact(&Dim::from(128)), Some(bt.clone()));
/// assert_eq!(bt.to_string(), "B*T");
/// assert_eq!("T*B".parse::<Dim>().unwrap(), bt);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Dim {
    /// Sorted by monomial; coefficients never zero.
    terms: Vec<(Monomial, i64)>,
}

impl From<Dim> for String {
    fn from(d: Dim) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for Dim {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<i64> for Dim {
    fn from(c: i64) -> Dim {
        Dim::constant(c)
    }
}

impl From<usize> for Dim {
    fn from(c: usize) -> Dim {
        Dim::constant(c as i64)
    }
}

impl From<i32> for Dim {
    fn from(c: i32) -> Dim {
        Dim::constant(c as i64)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Dim {
        Dim::sym(s)
    }
}

impl Dim {
    fn from_map(m: BTreeMap<Monomial, i64>) -> Dim {
        Dim {
            terms: m.into_iter().filter(|(_, c)| *c != 0).collect(),
        }
    }

    pub fn constant(c: i64) -> Dim {
        let mut m = BTreeMap::new();
        m.insert(Monomial::one(), c);
        Dim::from_map(m)
    }

    pub fn sym(name: &str) -> Dim {
        Dim::atom(Atom::Sym(name.to_string()))
    }

    fn atom(a: Atom) -> Dim {
        Dim {
            terms: vec![(Monomial(vec![(a, 1)]), 1)],
        }
    }

    /// The value if the dimension is a constant.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.as_slice() {
            [] => Some(0),
            [(m, c)] if m.0.is_empty() => Some(*c),
            _ => None,
        }
    }

    pub fn is_const(&self) -> bool {
        self.as_const().is_some()
    }

    /// Whether arithmetic saturated somewhere in the expression (a coefficient at `i64::MAX` or `i64::MIN`).
    pub fn overflowed(&self) -> bool {
        self.terms.iter().any(|(_, c)| *c == i64::MAX || *c == i64::MIN)
    }

    pub fn is_one(&self) -> bool {
        self.as_const() == Some(1)
    }

    /// The greatest common divisor of the coefficients, positive (0 for the dimension 0): the largest
    /// integer that divides the polynomial as written (`2048` for `2048*T`, `2` for `2*B*T + 4`).
    pub fn content(&self) -> i64 {
        fn gcd(a: i64, b: i64) -> i64 {
            if b == 0 {
                a
            } else {
                gcd(b, a % b)
            }
        }
        self.terms.iter().fold(0i64, |g, (_, c)| gcd(g, c.saturating_abs()))
    }

    /// The names of all symbols occurring in the expression.
    pub fn symbols(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_symbols(&mut out);
        out.sort();
        out.dedup();
        out
    }

    fn collect_symbols(&self, out: &mut Vec<String>) {
        for (m, _) in &self.terms {
            for (a, _) in &m.0 {
                match a {
                    Atom::Sym(s) => out.push(s.clone()),
                    Atom::CeilDiv(n, d) => {
                        n.collect_symbols(out);
                        d.collect_symbols(out);
                    }
                }
            }
        }
    }

    /// Exact division: `Some(q)` when `self == q * other` for a polynomial `q`.
    pub fn div_exact(&self, other: &Dim) -> Option<Dim> {
        if other.terms.is_empty() {
            return None;
        }
        if self.terms.is_empty() {
            return Some(Dim::constant(0));
        }
        if self == other {
            return Some(Dim::constant(1));
        }
        if let [(dm, dc)] = other.terms.as_slice() {
            let mut out = BTreeMap::new();
            for (m, c) in &self.terms {
                if c.checked_rem(*dc) != Some(0) {
                    return None;
                }
                out.insert(m.div(dm)?, c / dc);
            }
            return Some(Dim::from_map(out));
        }
        // Try a monomial quotient from the leading terms, then verify.
        let (lm, lc) = self.terms.last()?;
        let (om, oc) = other.terms.last()?;
        if lc.checked_rem(*oc) != Some(0) {
            return None;
        }
        let q = Dim {
            terms: vec![(lm.div(om)?, lc / oc)],
        };
        if &(q.clone() * other.clone()) == self {
            Some(q)
        } else {
            None
        }
    }

    /// `ceil(self / other)`: exact when possible, folded for constants, an opaque atom otherwise.
    pub fn ceil_div(&self, other: &Dim) -> Dim {
        if let Some(q) = self.div_exact(other) {
            return q;
        }
        if let (Some(a), Some(b)) = (self.as_const(), other.as_const()) {
            if b != 0 {
                if let (Some(q), Some(r)) = (a.checked_div_euclid(b), a.checked_rem_euclid(b)) {
                    return Dim::constant(q.saturating_add(i64::from(r != 0)));
                }
            }
        }
        Dim::atom(Atom::CeilDiv(Box::new(self.clone()), Box::new(other.clone())))
    }

    /// Evaluates the expression with the given symbol values.
    pub fn eval(&self, env: &HashMap<String, i64>) -> Result<i64, String> {
        self.eval_with(&|s: &str| env.get(s).copied())
    }

    /// Evaluates the expression with the given symbol values, an unbound symbol counting `default`.
    ///
    /// ```
    /// use fulgur_ir::Dim;
    /// let d = Dim::sym("B") * Dim::sym("T") + Dim::from(1);
    /// let env = [("B".to_string(), 2)].into();
    /// assert_eq!(d.eval_or(&env, 10), Ok(21));
    /// ```
    pub fn eval_or(&self, env: &HashMap<String, i64>, default: i64) -> Result<i64, String> {
        self.eval_with(&|s: &str| Some(env.get(s).copied().unwrap_or(default)))
    }

    fn eval_with(&self, lookup: &dyn Fn(&str) -> Option<i64>) -> Result<i64, String> {
        let mut total: i64 = 0;
        for (m, c) in &self.terms {
            let mut v = *c;
            for (a, e) in &m.0 {
                let x = match a {
                    Atom::Sym(s) => lookup(s).ok_or_else(|| format!("symbol `{s}` is not bound"))?,
                    Atom::CeilDiv(n, d) => {
                        let n = n.eval_with(lookup)?;
                        let d = d.eval_with(lookup)?;
                        if d == 0 {
                            return Err(format!("division by zero in `{self}`"));
                        }
                        let (q, r) = n
                            .checked_div_euclid(d)
                            .zip(n.checked_rem_euclid(d))
                            .ok_or_else(|| format!("overflow evaluating `{self}`"))?;
                        q + i64::from(r != 0)
                    }
                };
                for _ in 0..*e {
                    v = v
                        .checked_mul(x)
                        .ok_or_else(|| format!("overflow evaluating `{self}`"))?;
                }
            }
            total = total
                .checked_add(v)
                .ok_or_else(|| format!("overflow evaluating `{self}`"))?;
        }
        Ok(total)
    }

    /// Replaces symbols by expressions.
    pub fn substitute(&self, env: &HashMap<String, Dim>) -> Dim {
        let mut total = Dim::constant(0);
        for (m, c) in &self.terms {
            let mut v = Dim::constant(*c);
            for (a, e) in &m.0 {
                let x = match a {
                    Atom::Sym(s) => env.get(s).cloned().unwrap_or_else(|| Dim::sym(s)),
                    Atom::CeilDiv(n, d) => n.substitute(env).ceil_div(&d.substitute(env)),
                };
                for _ in 0..*e {
                    v = v * x.clone();
                }
            }
            total = total + v;
        }
        total
    }
}

impl std::ops::Add for Dim {
    type Output = Dim;
    fn add(self, rhs: Dim) -> Dim {
        let mut m: BTreeMap<Monomial, i64> = self.terms.into_iter().collect();
        for (k, c) in rhs.terms {
            let e = m.entry(k).or_insert(0);
            *e = e.saturating_add(c);
        }
        Dim::from_map(m)
    }
}

impl std::ops::Neg for Dim {
    type Output = Dim;
    fn neg(self) -> Dim {
        Dim {
            terms: self.terms.into_iter().map(|(m, c)| (m, c.saturating_neg())).collect(),
        }
    }
}

impl std::ops::Sub for Dim {
    type Output = Dim;
    fn sub(self, rhs: Dim) -> Dim {
        self + (-rhs)
    }
}

impl std::ops::Mul for Dim {
    type Output = Dim;
    fn mul(self, rhs: Dim) -> Dim {
        let mut m: BTreeMap<Monomial, i64> = BTreeMap::new();
        for (a, ca) in &self.terms {
            for (b, cb) in &rhs.terms {
                let e = m.entry(a.mul(b)).or_insert(0);
                *e = e.saturating_add(ca.saturating_mul(*cb));
            }
        }
        Dim::from_map(m)
    }
}

fn fmt_atom(a: &Atom, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match a {
        Atom::Sym(s) => f.write_str(s),
        Atom::CeilDiv(n, d) => write!(f, "ceildiv({n}, {d})"),
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        // Highest degree first, constant last; stable and canonical.
        let mut terms: Vec<&(Monomial, i64)> = self.terms.iter().collect();
        terms.sort_by(|a, b| b.0.degree().cmp(&a.0.degree()).then_with(|| a.0.cmp(&b.0)));
        for (i, (m, c)) in terms.iter().enumerate() {
            let c = *c;
            let mag = c.unsigned_abs();
            if i == 0 {
                if c < 0 {
                    f.write_str("-")?;
                }
            } else if c < 0 {
                f.write_str(" - ")?;
            } else {
                f.write_str(" + ")?;
            }
            let mut first = true;
            if mag != 1 || m.0.is_empty() {
                write!(f, "{mag}")?;
                first = false;
            }
            for (a, e) in &m.0 {
                for _ in 0..*e {
                    if !first {
                        f.write_str("*")?;
                    }
                    fmt_atom(a, f)?;
                    first = false;
                }
            }
        }
        Ok(())
    }
}

/// Error from [`parse_dim`]: byte offset and message.
#[derive(Debug, Clone, PartialEq)]
pub struct DimParseError {
    pub offset: usize,
    pub message: String,
}

impl std::str::FromStr for Dim {
    type Err = String;
    fn from_str(s: &str) -> Result<Dim, String> {
        let (d, used) = parse_dim(s).map_err(|e| format!("at offset {}: {}", e.offset, e.message))?;
        if s[used..].trim().is_empty() {
            Ok(d)
        } else {
            Err(format!("at offset {used}: unexpected `{}`", s[used..].trim()))
        }
    }
}

/// Parses a dimension expression at the start of `s`; returns it and the number of bytes used.
///
/// Grammar: `expr := term (('+'|'-') term)*`, `term := factor (('*'|'/') factor)*` (`/` is exact division),
/// `factor := INT | IDENT | '(' expr ')' | '-' factor | 'ceildiv' '(' expr ',' expr ')'`.
pub fn parse_dim(s: &str) -> Result<(Dim, usize), DimParseError> {
    let mut p = DimParser {
        s: s.as_bytes(),
        pos: 0,
        depth: 0,
    };
    let d = p.expr()?;
    Ok((d, p.pos))
}

struct DimParser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

impl DimParser<'_> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, DimParseError> {
        Err(DimParseError {
            offset: self.pos,
            message: msg.into(),
        })
    }
    fn ws(&mut self) {
        while self.pos < self.s.len() && (self.s[self.pos] == b' ' || self.s[self.pos] == b'\t') {
            self.pos += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.pos).copied()
    }
    fn expr(&mut self) -> Result<Dim, DimParseError> {
        self.depth += 1;
        if self.depth > 64 {
            return self.err("dimension expression nested too deeply");
        }
        let mut acc = self.term()?;
        loop {
            match self.peek() {
                Some(b'+') => {
                    self.pos += 1;
                    acc = acc + self.term()?;
                }
                Some(b'-') => {
                    self.pos += 1;
                    acc = acc - self.term()?;
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(acc)
    }
    fn term(&mut self) -> Result<Dim, DimParseError> {
        let mut acc = self.factor()?;
        loop {
            match self.peek() {
                Some(b'*') => {
                    self.pos += 1;
                    acc = acc * self.factor()?;
                }
                Some(b'/') => {
                    self.pos += 1;
                    let at = self.pos;
                    let d = self.factor()?;
                    match acc.div_exact(&d) {
                        Some(q) => acc = q,
                        None => {
                            return Err(DimParseError {
                                offset: at,
                                message: format!("`{acc}` is not exactly divisible by `{d}`"),
                            })
                        }
                    }
                }
                _ => break,
            }
        }
        Ok(acc)
    }
    fn factor(&mut self) -> Result<Dim, DimParseError> {
        match self.peek() {
            Some(b'(') => {
                self.pos += 1;
                let d = self.expr()?;
                if self.peek() != Some(b')') {
                    return self.err("expected `)` in dimension expression");
                }
                self.pos += 1;
                Ok(d)
            }
            Some(b'-') => {
                self.pos += 1;
                self.depth += 1;
                if self.depth > 64 {
                    return self.err("dimension expression nested too deeply");
                }
                let f = self.factor()?;
                self.depth -= 1;
                Ok(-f)
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                match text.parse::<i64>() {
                    Ok(v) => Ok(Dim::constant(v)),
                    Err(_) => Err(DimParseError {
                        offset: start,
                        message: format!("integer `{text}` is too large"),
                    }),
                }
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.pos;
                while self.pos < self.s.len() && (self.s[self.pos].is_ascii_alphanumeric() || self.s[self.pos] == b'_')
                {
                    self.pos += 1;
                }
                let name = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                if name == "ceildiv" && self.peek() == Some(b'(') {
                    self.pos += 1;
                    let a = self.expr()?;
                    if self.peek() != Some(b',') {
                        return self.err("expected `,` in ceildiv(a, b)");
                    }
                    self.pos += 1;
                    let b = self.expr()?;
                    if self.peek() != Some(b')') {
                        return self.err("expected `)` after ceildiv(a, b)");
                    }
                    self.pos += 1;
                    if b.as_const() == Some(0) {
                        return self.err("ceildiv by zero");
                    }
                    return Ok(a.ceil_div(&b));
                }
                Ok(Dim::sym(name))
            }
            _ => self.err("expected a dimension (integer, symbol or parenthesised expression)"),
        }
    }
}

/// A shape: one [`Dim`] per axis.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn new(dims: Vec<Dim>) -> Shape {
        Shape(dims)
    }
    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }
    pub fn from_consts(dims: &[usize]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::from(d)).collect())
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn dims(&self) -> &[Dim] {
        &self.0
    }
    /// Product of all dims.
    pub fn numel(&self) -> Dim {
        self.0.iter().cloned().fold(Dim::constant(1), |a, b| a * b)
    }
    /// Concrete sizes, if every dim is constant.
    pub fn as_consts(&self) -> Option<Vec<usize>> {
        self.0
            .iter()
            .map(|d| d.as_const().and_then(|c| usize::try_from(c).ok()))
            .collect()
    }
    /// Concrete sizes under symbol bindings.
    pub fn eval(&self, env: &HashMap<String, i64>) -> Result<Vec<usize>, String> {
        self.0
            .iter()
            .map(|d| {
                let v = d.eval(env)?;
                usize::try_from(v).map_err(|_| format!("dimension `{d}` evaluates to negative {v}"))
            })
            .collect()
    }
    pub fn symbols(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.iter().flat_map(|d| d.symbols()).collect();
        v.sort();
        v.dedup();
        v
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl From<Vec<Dim>> for Shape {
    fn from(v: Vec<Dim>) -> Shape {
        Shape(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Dim {
        s.parse().unwrap()
    }

    #[test]
    fn normal_form() {
        assert_eq!(d("B*T"), d("T*B"));
        assert_eq!(d("B*T + B"), d("B*(T+1)"));
        assert_eq!(d("(B*T*128)/128"), d("B*T"));
        assert_eq!(d("(B*T+B)/(T+1)"), d("B"));
        assert_eq!(d("T - T"), Dim::constant(0));
        assert_eq!(d("2*3").as_const(), Some(6));
        assert_eq!(d("T*T").to_string(), "T*T");
        assert_eq!(d("1 + 2*T - B*T").to_string(), "-B*T + 2*T + 1");
    }

    #[test]
    fn display_parse_round_trip() {
        for s in [
            "B*T",
            "-B*T + 2*T + 1",
            "ceildiv(T, 256)",
            "0",
            "-3",
            "128*B",
            "ceildiv(T + 1, 2)*B",
        ] {
            let x = d(s);
            assert_eq!(d(&x.to_string()), x, "{s}");
        }
    }

    #[test]
    fn exact_division_refused() {
        assert!("T/2".parse::<Dim>().is_err());
        assert!(d("B*T").div_exact(&d("C")).is_none());
        assert_eq!(d("T").ceil_div(&d("256")).to_string(), "ceildiv(T, 256)");
        assert_eq!(d("40").ceil_div(&d("16")), d("3"));
    }

    #[test]
    fn eval() {
        let env: HashMap<String, i64> = [("B".to_string(), 2), ("T".to_string(), 40)].into();
        assert_eq!(d("B*T + 1").eval(&env), Ok(81));
        assert_eq!(d("ceildiv(T, 16)").eval(&env), Ok(3));
        assert!(d("C").eval(&env).is_err());
    }

    #[test]
    fn parse_errors() {
        assert!("".parse::<Dim>().is_err());
        assert!("B*".parse::<Dim>().is_err());
        assert!("(B".parse::<Dim>().is_err());
        assert!("99999999999999999999".parse::<Dim>().is_err());
        let deep = "(".repeat(10000);
        assert!(deep.parse::<Dim>().is_err());
    }
}
