"""All-pairs combinations: few rows in which every value of each factor
meets every value of every other factor at least once (a covering array of
strength 2), so a case can try "every offer combination" pair by pair.

Greedy and deterministic: each row starts from the first pair not yet
covered and takes, factor by factor, the value that covers the most pairs
still uncovered (the first such value on a tie).
"""
import itertools


def pairs_of(row):
    """Every ((factor, value), (factor, value)) pair a row covers."""
    return {((i, row[i]), (j, row[j])) for i, j in itertools.combinations(range(len(row)), 2)}


def all_pairs(factors):
    """Rows (tuples, a value per factor) covering every pair of values of
    ``factors`` (a list of value lists)."""
    uncovered = set()
    for i, j in itertools.combinations(range(len(factors)), 2):
        uncovered |= {((i, a), (j, b)) for a in factors[i] for b in factors[j]}
    rows = []
    while uncovered:
        (i, a), (j, b) = min(uncovered, key=lambda p: (p[0][0], p[1][0], factors[p[0][0]].index(
            p[0][1]), factors[p[1][0]].index(p[1][1])))
        row = {i: a, j: b}
        for k in range(len(factors)):
            if k not in row:
                row[k] = max(factors[k], key=lambda v: sum(
                    (((min(k, m), v if k < m else w), (max(k, m), w if k < m else v))
                     in uncovered) for m, w in row.items()))
        row = tuple(row[k] for k in range(len(factors)))
        rows.append(row)
        uncovered -= pairs_of(row)
    return rows
