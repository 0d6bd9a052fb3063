"""The backend conformance suite against ``blkif serve`` in the sandbox (sim
platform, every process real), and against backends broken on purpose
(tests/broken_peers): the suite must report exactly the broken case."""
import os

import pytest

from blkif.conformance import catalogue, report
from blkif.conformance.backend.session import SandboxBackends
from blkif.conformance.catalogue import INFO, MUST, SHOULD
from xenstore_fixtures import ROOT

BROKEN_PEERS = os.path.join(ROOT, "tests", "broken_peers")
CASES = catalogue.load("backend")


@pytest.fixture(scope="module")
def ours():
    """{case id: Result} of the whole backend suite against blkif serve."""
    with SandboxBackends() as session:
        results = report.run_cases(CASES, session)
    return {r.id: r for r in results}


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.level == MUST])
def test_our_backend_passes_must_case(ours, case_id):
    result = ours[case_id]
    assert result.status == report.PASS, result.observed


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.level != MUST])
def test_our_backend_should_and_info_cases_run(ours, case_id):
    assert ours[case_id].status == report.PASS, ours[case_id].observed


def test_the_catalogue_has_every_kind_of_case():
    levels = {c.level for c in CASES}
    assert levels == {MUST, SHOULD, INFO}
    assert {c.group for c in CASES} == set(catalogue.GROUPS["backend"])
    for c in CASES:
        assert c.clause and c.sends and c.expects and c.why, c.id


# breakage (tests/broken_peers/sitecustomize.py) -> the case it must fail, and a
# case of the same group it must still pass (the breakage is that narrow)
BREAKAGES = [
    ("no-error-node", "xenbus-5", "xenbus-1"),
    ("no-events", "ring-2", "ring-3"),
    ("too-many-sectors", "req-9", "req-1"),
]


@pytest.mark.parametrize("broken,fails,passes", BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_the_suite_catches_a_broken_backend(monkeypatch, broken, fails, passes):
    monkeypatch.setenv("PYTHONPATH", BROKEN_PEERS)
    monkeypatch.setenv("BLKIF_BROKEN", broken)
    cases = catalogue.select(CASES, [fails, passes])
    with SandboxBackends() as session:
        results = {r.id: r for r in report.run_cases(cases, session)}
    assert results[fails].status == report.FAIL, results[fails]
    assert results[passes].status == report.PASS, results[passes]
    assert report.exit_status(list(results.values())) == 1


def test_a_vbd_given_by_domid_and_vdev(tmp_path):
    """The suite against VBDs a toolstack made (here the sandbox's): it
    restarts the VBD before each case, so a case left Closing does not spoil
    the next; cases needing a VBD not given skip."""
    import json
    import subprocess
    import sys

    from blkif.sandbox import Sandbox
    with Sandbox(str(tmp_path)) as box:
        for vdev, mode in (("xvda", "w"), ("xvdb", "w"), ("xvdc", "r")):
            box.add_vbd(5, vdev, box.make_image(vdev + ".img", 4 << 20, None), mode)
        argv = [sys.executable, "-m", "blkif", "conformance", "backend", "--platform", "sim",
                "--xenstore", box.xenstore, "--sim-path", box.sim_path, "--domid", "5",
                "--vdev", "xvda", "--json", "--case", "xenbus-5", "--case", "xenbus-16",
                "--case", "req-21", "--case", "ring-5", "--case", "sec-2"]
        given = subprocess.run(argv + ["--other-vdev", "xvdb", "--readonly-vdev", "xvdc"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
        alone = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert given.returncode == 0, given.stdout + given.stderr
    statuses = {r["id"]: r["status"] for r in json.loads(given.stdout)["results"]}
    assert set(statuses.values()) == {"PASS"}, statuses
    assert "VBD xvda of domain 5" in json.loads(given.stdout)["target"]
    statuses = {r["id"]: r["status"] for r in json.loads(alone.stdout)["results"]}
    assert statuses["req-21"] == statuses["ring-5"] == "SKIP", statuses
    assert statuses["xenbus-16"] == "PASS"


def test_a_vbd_that_cannot_start_over_is_made_afresh(tmp_path):
    """A VBD an earlier case broke for good (here: its worker refused bad
    params and the service gave up on it) spoils no later case when the
    toolstack can remake it (``recreate``): the lab's VBDs on QEMU's qdisk."""
    from blkif import toolstack
    from blkif.conformance import catalogue
    from blkif.conformance.backend.session import TargetBackends
    from blkif.sandbox import Sandbox
    with Sandbox(str(tmp_path)) as box:
        image = box.make_image("xvda.img", 4 << 20, None)
        box.add_vbd(5, "xvda", image, "w")
        back = toolstack.backend_path(0, 5, toolstack.vdev_to_devid("xvda"))
        box.dom0.write(back + "/params", "vdi:/nowhere")  # the next worker refuses it
        box.dom0.write(back + "/state", "6")  # closed: the worker stops
        made = []

        def recreate(vdev):
            made.append(vdev)
            toolstack.destroy(box.dom0, 5, vdev)
            toolstack.create(box.dom0, 5, vdev, image, "w")

        cases = [c for c in catalogue.load("backend") if c.id == "xenbus-1"]
        with TargetBackends("sim", box.xenstore, 5, "xvda", sim_path=box.sim_path,
                            recreate=recreate) as session:
            session.timeout = 10
            (result,) = report.run_cases(cases, session)
    assert made == ["xvda"]
    assert result.status == report.PASS, result


def test_a_vbd_gone_is_made_afresh_and_fresh_runs_before_each_case(tmp_path):
    from blkif import toolstack
    from blkif.conformance import catalogue
    from blkif.conformance.backend.session import TargetBackends
    from blkif.sandbox import Sandbox
    with Sandbox(str(tmp_path)) as box:
        image = box.make_image("xvda.img", 4 << 20, None)
        box.add_vbd(5, "xvda", image, "w")
        toolstack.destroy(box.dom0, 5, "xvda")  # as QEMU removes a device it gave up on
        made, fresh = [], []

        def recreate(vdev):
            made.append(vdev)
            toolstack.create(box.dom0, 5, vdev, image, "w")

        cases = [c for c in catalogue.load("backend") if c.id in ("xenbus-1", "req-1")]
        with TargetBackends("sim", box.xenstore, 5, "xvda", sim_path=box.sim_path,
                            recreate=recreate, fresh=lambda: fresh.append(1)) as session:
            results = report.run_cases(cases, session)
    assert made == ["xvda"] and len(fresh) == 2
    assert [r.status for r in results] == [report.PASS, report.PASS], results
