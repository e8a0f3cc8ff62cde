//! Normalising a policy's condition into classifier rules: a disjunction of
//! conjunctions with at most one predicate per dimension.
//!
//! Any condition that stays within one dimension (`not`, `or` and `and` over
//! destination prefixes, say) is compiled exactly by that dimension's table,
//! so it is kept whole as a leaf. Only an `or` that spans dimensions needs
//! separate rules, one per alternative; the number is bounded.

use std::collections::{BTreeMap, BTreeSet};

use super::model::{Atom, Dimension, Expr};

/// Most alternatives one policy may expand to.
pub const MAX_ALTERNATIVES: usize = 64;

/// One alternative: a predicate per constrained dimension, all ANDed. A
/// dimension without an entry accepts everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Conjunction {
    pub preds: BTreeMap<Dimension, Expr>,
}

impl Conjunction {
    pub fn pred(&self, dimension: Dimension) -> Option<&Expr> {
        self.preds.get(&dimension)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the condition expands to more than {MAX_ALTERNATIVES} alternatives (an `or` across different fields is multiplied out); simplify it or split the policy"
)]
pub struct TooManyAlternatives;

fn dimensions(expr: &Expr) -> BTreeSet<Dimension> {
    expr.atoms().into_iter().map(Atom::dimension).collect()
}

/// The value of an expression made only of `true`.
fn constant(expr: &Expr) -> bool {
    match expr {
        Expr::True | Expr::Atom(_) => true,
        Expr::Not(e) => !constant(e),
        Expr::And(es) => es.iter().all(constant),
        Expr::Or(es) => es.iter().any(constant),
    }
}

/// A conjunction of single-dimension leaves.
type Leaves = Vec<Expr>;

fn product(a: Vec<Leaves>, b: Vec<Leaves>) -> Result<Vec<Leaves>, TooManyAlternatives> {
    if a.len().saturating_mul(b.len()) > MAX_ALTERNATIVES {
        return Err(TooManyAlternatives);
    }
    Ok(a.iter()
        .flat_map(|x| {
            b.iter().map(move |y| {
                let mut c = x.clone();
                c.extend(y.iter().cloned());
                c
            })
        })
        .collect())
}

fn concat(mut a: Vec<Leaves>, b: Vec<Leaves>) -> Result<Vec<Leaves>, TooManyAlternatives> {
    a.extend(b);
    if a.len() > MAX_ALTERNATIVES {
        return Err(TooManyAlternatives);
    }
    Ok(a)
}

/// DNF of `expr` (negated when `negated`), as a list of leaf conjunctions.
/// An empty list never matches; a list holding an empty conjunction always does.
fn dnf(expr: &Expr, negated: bool) -> Result<Vec<Leaves>, TooManyAlternatives> {
    let dims = dimensions(expr);
    if dims.is_empty() {
        // Only constants: `true`, `not true` and combinations of them.
        return Ok(if constant(expr) != negated {
            vec![vec![]]
        } else {
            vec![]
        });
    }
    if dims.len() == 1 {
        return Ok(match (expr, negated) {
            (e, false) => vec![vec![e.clone()]],
            (Expr::Not(inner), true) => vec![vec![(**inner).clone()]],
            (e, true) => vec![vec![Expr::Not(Box::new(e.clone()))]],
        });
    }
    match (expr, negated) {
        (Expr::Not(inner), _) => dnf(inner, !negated),
        // And, or De Morgan's "not (a or b)": every child must hold.
        (Expr::And(children), false) | (Expr::Or(children), true) => {
            let mut acc = vec![vec![]];
            for child in children {
                acc = product(acc, dnf(child, negated)?)?;
            }
            Ok(acc)
        }
        // Or, or "not (a and b)": any child may hold.
        (Expr::Or(children), false) | (Expr::And(children), true) => {
            let mut acc = Vec::new();
            for child in children {
                acc = concat(acc, dnf(child, negated)?)?;
            }
            Ok(acc)
        }
        (Expr::True | Expr::Atom(_), _) => unreachable!("single-dimension expressions are leaves"),
    }
}

/// The alternatives of a condition, deduplicated, in a stable order.
pub fn normalize(expr: &Expr) -> Result<Vec<Conjunction>, TooManyAlternatives> {
    let mut out: Vec<Conjunction> = Vec::new();
    for leaves in dnf(expr, false)? {
        let mut grouped: BTreeMap<Dimension, Vec<Expr>> = BTreeMap::new();
        for leaf in leaves {
            if let Some(dim) = dimensions(&leaf).into_iter().next() {
                grouped.entry(dim).or_default().push(leaf);
            }
        }
        let conj = Conjunction {
            preds: grouped
                .into_iter()
                .map(|(dim, leaves)| (dim, Expr::all(leaves)))
                .collect(),
        };
        if !out.contains(&conj) {
            out.push(conj);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use ipnet::IpNet;

    use super::*;
    use crate::policy::model::Protocol;

    fn dst(net: &str) -> Expr {
        Expr::Atom(Atom::DstIp(vec![net.parse::<IpNet>().unwrap()]))
    }
    fn src(net: &str) -> Expr {
        Expr::Atom(Atom::SrcIp(vec![net.parse::<IpNet>().unwrap()]))
    }
    fn proto(p: Protocol) -> Expr {
        Expr::Atom(Atom::Protocol(vec![p]))
    }
    fn not(e: Expr) -> Expr {
        Expr::Not(Box::new(e))
    }

    #[test]
    fn dnf_single_dimension_or_and_not_stays_one_rule() {
        let e = Expr::Or(vec![dst("192.0.2.0/24"), not(dst("198.51.100.0/24"))]);
        let conjs = normalize(&e).unwrap();
        assert_eq!(conjs.len(), 1, "one dimension: one rule");
        assert_eq!(conjs[0].pred(Dimension::Dst), Some(&e));
    }

    #[test]
    fn dnf_or_across_dimensions_makes_one_rule_per_alternative() {
        let e = Expr::Or(vec![proto(Protocol::Udp), src("10.1.0.0/16")]);
        let conjs = normalize(&e).unwrap();
        assert_eq!(conjs.len(), 2);
        assert_eq!(conjs[0].pred(Dimension::L4), Some(&proto(Protocol::Udp)));
        assert_eq!(conjs[1].pred(Dimension::Src), Some(&src("10.1.0.0/16")));
    }

    #[test]
    fn dnf_not_of_and_across_dimensions_de_morgan() {
        let e = not(Expr::And(vec![dst("192.0.2.0/24"), proto(Protocol::Tcp)]));
        let conjs = normalize(&e).unwrap();
        assert_eq!(conjs.len(), 2, "not (a and b) = not a or not b");
        assert_eq!(
            conjs[0].pred(Dimension::Dst),
            Some(&not(dst("192.0.2.0/24")))
        );
        assert_eq!(
            conjs[1].pred(Dimension::L4),
            Some(&not(proto(Protocol::Tcp)))
        );
    }

    #[test]
    fn dnf_and_groups_same_dimension_leaves() {
        let e = Expr::And(vec![
            dst("192.0.2.0/24"),
            Expr::Or(vec![proto(Protocol::Udp), src("10.0.0.0/8")]),
            not(dst("192.0.2.128/25")),
        ]);
        let conjs = normalize(&e).unwrap();
        assert_eq!(conjs.len(), 2);
        assert_eq!(
            conjs[0].pred(Dimension::Dst),
            Some(&Expr::And(vec![
                dst("192.0.2.0/24"),
                not(dst("192.0.2.128/25"))
            ]))
        );
    }

    #[test]
    fn dnf_true_and_false() {
        assert_eq!(
            normalize(&Expr::True).unwrap(),
            vec![Conjunction::default()],
            "always"
        );
        assert!(normalize(&not(Expr::True)).unwrap().is_empty(), "never");
    }

    #[test]
    fn dnf_expansion_bounded() {
        // (a1 or b1) and (a2 or b2) ... seven times: 128 alternatives.
        let e = Expr::And(
            (0..7)
                .map(|i| Expr::Or(vec![dst(&format!("10.{i}.0.0/16")), proto(Protocol::Tcp)]))
                .collect(),
        );
        assert_eq!(normalize(&e), Err(TooManyAlternatives));
    }
}
