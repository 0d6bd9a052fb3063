"""The frontend conformance suite against our frontend (a sandbox guest
process on the sim platform), and against frontends broken on purpose
(tests/broken_peers): the suite must report exactly the broken case."""
import os

import pytest

from blkif.conformance import catalogue, report
from blkif.conformance.frontend.session import SandboxFrontends
from xenstore_fixtures import ROOT

BROKEN_PEERS = os.path.join(ROOT, "tests", "broken_peers")
CASES = catalogue.load("frontend")


@pytest.fixture(scope="module")
def ours():
    """{case id: Result} of the whole frontend suite against BlockDevice."""
    with SandboxFrontends() as session:
        results = report.run_cases(CASES, session)
    return {r.id: r for r in results}


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_our_frontend_passes(ours, case_id):
    assert ours[case_id].status == report.PASS, ours[case_id].observed


def test_every_frontend_group_has_cases():
    assert {c.group for c in CASES} == set(catalogue.GROUPS["frontend"])


# breakage (tests/broken_peers/sitecustomize.py) -> the case it must fail, and a
# case it must still pass
BREAKAGES = [
    ("any-operation", "fe-rsp-1", "fe-rsp-2"),
    ("flush-whatever-offered", "fe-xenbus-4", "fe-xenbus-1"),
    ("indirect-beyond-the-offer", "fe-xenbus-2", "fe-rsp-4"),
]


@pytest.mark.parametrize("broken,fails,passes", BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_the_suite_catches_a_broken_frontend(monkeypatch, broken, fails, passes):
    monkeypatch.setenv("PYTHONPATH", BROKEN_PEERS)
    monkeypatch.setenv("BLKIF_BROKEN", broken)
    cases = catalogue.select(CASES, [fails, passes])
    with SandboxFrontends() as session:
        results = {r.id: r for r in report.run_cases(cases, session)}
    assert results[fails].status == report.FAIL, results[fails]
    assert results[passes].status == report.PASS, results[passes]


def test_all_pairs_covers_every_pair_in_few_rows():
    from itertools import combinations, product

    from blkif.conformance.pairwise import all_pairs, pairs_of
    from blkif.conformance.frontend.xenbus import FACTORS, OFFERS

    for factors in (FACTORS, [[1, 2], [3, 4, 5]], [["a", "b"]] * 6):
        rows = all_pairs(factors)
        covered = set().union(*map(pairs_of, rows))
        for i, j in combinations(range(len(factors)), 2):
            assert {((i, a), (j, b)) for a, b in product(factors[i], factors[j])} <= covered
        assert all(len(r) == len(factors) and all(v in f for v, f in zip(r, factors))
                   for r in rows)
    assert len(OFFERS) == 25  # 5 x 5, the fewest rows that can meet every order with every indirect
    assert len(all_pairs([[1, 2], [3, 4, 5]])) == 6
