"""
The report's statistics: how sure a difference between two models is, when both were
trained with several seeds and scored on the same test examples.

A result has two sources of noise. The test examples are one draw from the domain
(another draw would score every model a little differently), and each seed's training
run is one draw of data order, dropout and initialisation (another seed parts the runs).
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


def verdict(r):
    """'holds' when the interval lies above 0, 'does not hold' below it, else not resolved."""
    if r["lo"] > 0:
        return "holds"
    if r["hi"] < 0:
        return "does not hold"
    return f"not resolved (± {100 * r['half']:.1f} points)"


def seeds_needed(r, half_width, level=0.95):
    """Seeds at which the half-width would reach half_width, if each new seed adds the
    noise the seeds add now and the test set stays (inf: the test set alone is too noisy)."""
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)
    room = (half_width / z) ** 2 - r["se_examples"] ** 2
    return math.inf if room <= 0 else max(2, math.ceil(r["S"] * r["se_seeds"] ** 2 / room))


def t_quantile(p, df):
    """Student's t quantile, by bisection on its CDF (the normal one for df = inf)."""
    if math.isinf(df) or df > 1e4:
        return statistics.NormalDist().inv_cdf(p)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    def cdf(x):  # 0.5 + the density's integral from 0 to x, by the trapezoid rule
        y = np.exp(log_c - (df + 1) / 2 * np.log1p(np.linspace(0, x, 4001) ** 2 / df))
        return 0.5 + (y.sum() - (y[0] + y[-1]) / 2) * x / 4000
    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return lo
