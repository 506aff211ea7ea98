//! The benchmark's arithmetic: the median and spread of a series of rounds, and how figures
//! and verdicts are written in the report.

/// Median, min and max.
pub type Spread = (f64, f64, f64);

/// Median and spread of a series.
pub fn stats(v: &[f64]) -> Spread {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (mid, s[0], s[s.len() - 1])
}

/// [`stats`] of one figure of each round.
pub fn column<T>(rounds: &[T], figure: impl Fn(&T) -> f64) -> Spread {
    stats(&rounds.iter().map(figure).collect::<Vec<_>>())
}

/// The ratio `a / b` of two series measured in the same rounds, one after the other: each
/// round's own ratio, then their median and spread. A round that ran slow for both sides
/// (the 2 shared cores busy elsewhere) moves its ratio less than either figure.
pub fn ratio(a: &[f64], b: &[f64]) -> Spread {
    assert_eq!(
        a.len(),
        b.len(),
        "the two sides of a ratio have one figure per round"
    );
    stats(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>())
}

/// [`ratio`] of one figure of each round of two series.
pub fn ratio_of<T>(a: &[T], b: &[T], figure: impl Fn(&T) -> f64) -> Spread {
    let col = |v: &[T]| v.iter().map(&figure).collect::<Vec<_>>();
    ratio(&col(a), &col(b))
}

/// `items` with their indices, in turn `n`'s order (from 0): reversed every other turn, which
/// cancels what going first or last in a round does to a figure.
pub fn in_order<T, const N: usize>(items: [T; N], n: usize) -> impl Iterator<Item = (usize, T)> {
    let mut v: Vec<(usize, T)> = items.into_iter().enumerate().collect();
    if n % 2 == 1 {
        v.reverse();
    }
    v.into_iter()
}

/// A spread with no decimals: `median [min–max]`.
pub fn fmt((mid, lo, hi): Spread) -> String {
    format!("{mid:.0} [{lo:.0}–{hi:.0}]")
}

/// A spread with one decimal.
pub fn fmt1((mid, lo, hi): Spread) -> String {
    format!("{mid:.1} [{lo:.1}–{hi:.1}]")
}

/// A spread with two decimals.
pub fn fmt2((mid, lo, hi): Spread) -> String {
    format!("{mid:.2} [{lo:.2}–{hi:.2}]")
}

/// A target's verdict: met, or missed by `by`.
pub fn verdict(met: bool, by: String) -> String {
    if met {
        "met".to_string()
    } else {
        format!("missed by {by}")
    }
}

/// A ratio's miss, with a third decimal when two would round it to nothing (and said in
/// words when three would).
pub fn miss(x: f64) -> String {
    if x < 0.0005 {
        "less than 0.001".to_string()
    } else if x < 0.005 {
        format!("{x:.3}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_is_the_median_of_each_rounds_own() {
        // Round 2 ran slow for both sides: its ratio is as the others'.
        let ours = [100.0, 50.0, 110.0];
        let theirs = [100.0, 50.0, 100.0];
        assert_eq!(ratio(&ours, &theirs), (1.0, 1.0, 1.1));
        // One side's slow round is that round's ratio alone.
        let ours = [100.0, 50.0, 100.0];
        let theirs = [100.0, 100.0, 100.0];
        assert_eq!(ratio(&ours, &theirs), (1.0, 0.5, 1.0));
        assert_eq!(
            ratio_of(&[(1.0, 4.0)], &[(2.0, 2.0)], |x| x.1),
            (2.0, 2.0, 2.0)
        );
        let order = |n| in_order(['a', 'b', 'c'], n).collect::<Vec<_>>();
        assert_eq!(order(0), [(0, 'a'), (1, 'b'), (2, 'c')]);
        assert_eq!(order(1), [(2, 'c'), (1, 'b'), (0, 'a')]);
        assert_eq!(order(2), order(0));
    }

    #[test]
    fn a_miss_never_reads_as_nothing() {
        assert_eq!(miss(0.13), "0.13");
        assert_eq!(miss(0.004), "0.004");
        assert_eq!(miss(0.0004), "less than 0.001");
        assert_eq!(verdict(false, miss(0.0004)), "missed by less than 0.001");
    }
}
