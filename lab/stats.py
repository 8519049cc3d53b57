"""
The report's statistics: how sure a difference between two models is, when both were
trained with several seeds and scored on the same test examples.

A result has two sources of noise. The test examples are one draw from the domain
(another draw would score every model a little differently), and each seed's training
run is one draw of data order, dropout and the probe, and of the initialisation where the
models start from random weights (the committed bases fix it): another seed parts the runs.
Every seed scores the *same* test examples, so the two do not simply add up per seed:

    T_s = tau + B + A_s      T = mean over seeds of T_s      Var(T) = Var(B) + Var(A) / S

T_s is the statistic on seed s (a paired difference in accuracy), B what the draw of test
examples adds to every seed alike, A_s what seed s adds on its own (its training run, and
which examples its models happen to get right). Var(A) is the spread of T_s over seeds.
Var(B) is the covariance of two seeds' T_s across bootstrap resamples of the examples:
what the example draw moves on every seed at once. (Resampling examples anew inside each
seed, or both factors blindly, would count the per-seed part twice or three times.) The
interval is T +- t * sqrt(Var(T)), with Satterthwaite's degrees of freedom for the seed
part's S - 1.
"""
import math
import statistics

import numpy as np


def paired_interval(a, b, groups=None, subset=None, n_boot=1000, level=0.95, seed=0):
    """The mean paired difference a - b and its interval.

    a, b: per-example scores, (S seeds, N examples), the same examples in the same order
    on every seed (1 = right, 0 = wrong; b = 0 gives an accuracy's own interval).
    groups: (N,) labels (subdomains): the statistic per seed is the macro average over
    groups of the mean difference, and examples are resampled within their group.
    subset: (S, N) bool: instead, the mean over the subset's examples, which may differ
    per seed (e.g. the examples where that seed's SFT student beat its teacher).
    -> dict(mean, lo, hi, half (the half-width), se, se_seeds and se_examples (the two
    parts of se: se**2 = se_seeds**2 + se_examples**2), df, per_seed, S).
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    S, N = d.shape
    g = np.zeros(N, dtype=int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    m = np.ones((S, N), dtype=bool) if subset is None else np.asarray(subset, dtype=bool)
    parts = [np.flatnonzero(g == k) for k in range(g.max() + 1)]

    def per_seed(counts):
        """counts: (B, N) how often each example is drawn -> (B, S) the statistic per seed."""
        num = [counts[:, p] @ (m[:, p] * d[:, p]).T for p in parts]  # (B, S) per group
        den = [counts[:, p] @ m[:, p].T.astype(float) for p in parts]
        with np.errstate(invalid="ignore", divide="ignore"):
            return sum(n / k for n, k in zip(num, den)) / len(parts) if subset is None else sum(num) / sum(den)

    rng = np.random.default_rng(seed)
    counts = np.empty((n_boot, N))
    for p in parts:  # resample examples within their group
        counts[:, p] = rng.multinomial(len(p), np.full(len(p), 1 / len(p)), size=n_boot)
    point, boot = per_seed(np.ones((1, N)))[0], per_seed(counts)
    ok = ~np.isnan(boot).any(1)
    cov = np.atleast_2d(np.cov(boot[ok].T)) if ok.sum() > 1 else np.zeros((S, S))
    if S > 1:
        v_seeds = np.var(point, ddof=1) / S
        v_examples = max(0.0, (cov.sum() - np.trace(cov)) / (S * (S - 1)))  # mean covariance of two seeds
        df = (S - 1) * ((v_seeds + v_examples) / v_seeds) ** 2 if v_seeds > 0 else math.inf
    else:  # one seed: the example draw is all that can be seen
        v_seeds, v_examples, df = 0.0, float(cov.sum()), math.inf
    se = math.sqrt(v_seeds + v_examples)
    half = t_quantile((1 + level) / 2, df) * se
    mean = float(np.mean(point))
    return dict(mean=mean, lo=mean - half, hi=mean + half, half=half, se=se, se_seeds=math.sqrt(v_seeds),
                se_examples=math.sqrt(v_examples), df=df, per_seed=point.tolist(), S=S)


def p_value(r):
    """Two-sided p-value of 'the difference is 0', from the same t as the interval."""
    if r["se"] == 0:
        return 0.0 if r["mean"] != 0 else 1.0
    return 2 * (1 - t_cdf(abs(r["mean"]) / r["se"], r["df"]))


def verdict(r, resolved=None, paper=None):
    """'holds' when the interval lies above 0, 'does not hold' below it, else inconclusive
    (never 'no effect': an interval across 0 does not show the difference is 0). resolved:
    a multiplicity-corrected decision (holm) that overrides the raw interval's. paper: the
    paper's effect (a fraction); a resolved interval that excludes it says so."""
    hit = (r["lo"] > 0 or r["hi"] < 0) if resolved is None else resolved
    if not hit:
        return f"inconclusive (± {100 * r['half']:.1f} points)"
    out = "holds" if r["mean"] > 0 else "does not hold"
    if paper is not None and not r["lo"] <= paper <= r["hi"]:
        out += f"; excludes the paper's {100 * paper:+.1f}"
    return out


def holm(p, level=0.95):
    """Holm's step-down correction over a family of claims with p-values p: [True where the
    claim is resolved]. Sorted by p-value, the j-th smallest (j = 0, 1, ...) is resolved while
    p <= alpha / (m - j); the first that fails stops the rest. It keeps the chance of any false
    call in the family at most alpha = 1 - level, whatever the claims' dependence."""
    alpha = 1 - level
    out = [False] * len(p)
    for j, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
        if p[i] > alpha / (len(p) - j):
            break
        out[i] = True
    return out


def seeds_needed(r, half_width, level=0.95, most=10_000):
    """Seeds at which the half-width would reach half_width, if each new seed adds the
    noise the seeds add now and the test set stays: the smallest S with
    t(S) * sqrt(S0 se_seeds^2 / S + se_examples^2) <= half_width, t with Satterthwaite's
    degrees of freedom as the interval has (inf: no number of seeds up to `most` does)."""
    v_seed, v_ex = r["S"] * r["se_seeds"] ** 2, r["se_examples"] ** 2  # one seed's variance; the examples' part
    if statistics.NormalDist().inv_cdf((1 + level) / 2) * math.sqrt(v_ex) >= half_width:
        return math.inf  # the test examples alone are too noisy: t >= z at any number of seeds
    for S in range(2, most + 1):
        v_s = v_seed / S
        df = (S - 1) * ((v_s + v_ex) / v_s) ** 2 if v_s > 0 else math.inf
        if t_quantile((1 + level) / 2, df) * math.sqrt(v_s + v_ex) <= half_width:
            return S
    return math.inf


def t_cdf(x, df):
    """Student's t CDF at x >= 0 (the normal one for df = inf)."""
    if math.isinf(df) or df > 1e4:
        return statistics.NormalDist().cdf(x)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    y = np.exp(log_c - (df + 1) / 2 * np.log1p(np.linspace(0, x, 4001) ** 2 / df))  # the density from 0 to x
    return 0.5 + (y.sum() - (y[0] + y[-1]) / 2) * x / 4000  # the trapezoid rule


def t_quantile(p, df):
    """Student's t quantile, by bisection on its CDF (the normal one for df = inf)."""
    if math.isinf(df) or df > 1e4:
        return statistics.NormalDist().inv_cdf(p)
    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return lo


def claims_from_report(path):
    """The claims table of a report (results.md) -> [(claim, result)], each result rebuilt
    from the printed figures: the two parts of the standard error, with Satterthwaite's degrees
    of freedom from them; the mean, from the range its printed value and the interval's printed
    ends (each rounded to 0.1 points) leave it (mean_range); the level and number of pairs of a
    row (c), which corrects for its pairs."""
    rows = []
    for line in open(path, encoding="utf-8"):
        if not line.startswith("| ("):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        pairs = pairs_of(cells[0])
        se_s, se_e = (float(x) / 100 for x in cells[5].split(" / "))
        lo, hi = (float(x) / 100 for x in cells[4].strip("[]").split(", "))
        S = len(cells[-1].split(", "))
        v_s, v_e = se_s ** 2, se_e ** 2
        df = (S - 1) * ((v_s + v_e) / v_s) ** 2 if v_s > 0 else math.inf
        se, level = math.sqrt(v_s + v_e), 1 - 0.05 / pairs
        half = t_quantile((1 + level) / 2, df) * se
        # the mean, printed to 0.05 points, and so is each end of the interval: the three agree on a range
        ranges = [(m - 5e-4, m + 5e-4) for m in (float(cells[3]) / 100, lo + half, hi - half)]
        a, b = max(r[0] for r in ranges), min(r[1] for r in ranges)
        a, b = (a, b) if a <= b else (ranges[0][0], ranges[0][1])  # the printed mean's own range, if they disagree
        rows.append((cells[0], dict(mean=(a + b) / 2, lo=lo, hi=hi, half=half, se=se, se_seeds=se_s, se_examples=se_e,
                                    df=df, S=S, pairs=pairs, mean_range=(a, b))))
    return rows


def pairs_of(claim):
    """The number of pairs a claim row corrects for ('... corrected for 24 pairs)'; else 1."""
    return int(claim.split("corrected for ")[1].split(" pairs")[0]) if "corrected for " in claim else 1


def claim_p_values(rows, primary):
    """The p-value of every claim row as a report prints it (a row (c) multiplied by its number
    of pairs, Bonferroni's correction, at most 1), and which secondary claims Holm's correction
    resolves within their family: the whole-domain claims (a) and (b) without the primary, and
    the subdomain and subset claims (c) and (d). -> (p-values, {row index: resolved})."""
    p = [min(1.0, p_value(r) * pairs_of(c)) for c, r in rows]
    resolved = {}
    for family in (("(a)", "(b)"), ("(c)", "(d)")):
        idx = [i for i, (c, _) in enumerate(rows) if c.startswith(family) and c != primary]
        resolved.update(zip(idx, holm([p[i] for i in idx])))
    return p, resolved


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Recompute a report's claims from its printed table: p-values, Holm's "
                                             "correction within each family of secondary claims, seeds needed (t)")
    ap.add_argument("report", help="a results.md written by reproduce.py")
    ap.add_argument("--primary", default="(b) SCD+AW > KD")
    args = ap.parse_args()
    rows = claims_from_report(args.report)
    p, resolved = claim_p_values(rows, args.primary)
    print(f"{'claim':45s} {'p':>7s}  {'interval':16s} verdict (secondary: Holm within (a)+(b) or (c)+(d))")
    for i, (c, r) in enumerate(rows):
        print(f"{c[:45]:45s} {p[i]:7.3f}  [{100 * (r['mean'] - r['half']):+.1f}, {100 * (r['mean'] + r['half']):+.1f}]"
              f"{'':3s} " + ("(primary: its own 95% interval) " + verdict(r) if c == args.primary else verdict(r, resolved[i])))
    r = dict(rows)[args.primary]
    print(f"primary {args.primary}: half-width {100 * r['half']:.1f} points; +-1.5 needs {seeds_needed(r, 0.015)} seeds "
          f"(Student's t, from se {100 * r['se_seeds']:.2f} seeds / {100 * r['se_examples']:.2f} examples)")
