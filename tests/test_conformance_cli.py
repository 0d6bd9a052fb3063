"""``blkif conformance`` as a command: the catalogue doc, filters, JSON,
JUnit XML, exit statuses, one-line errors."""
import json
import os
import subprocess
import sys
from xml.etree import ElementTree

import pytest

from blkif.conformance import catalogue, markdown
from xenstore_fixtures import ROOT

BROKEN_PEERS = os.path.join(ROOT, "tests", "broken_peers")


def blkif(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "blkif", "conformance", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def test_docs_conformance_md_is_the_catalogue():
    """The committed doc is the catalogue plus the lab's committed results."""
    lab = os.path.join(ROOT, "docs", "conformance-lab.json")
    results = None
    if os.path.exists(lab):
        with open(lab) as f:
            results = json.load(f)
    with open(os.path.join(ROOT, "docs", "conformance.md")) as f:
        committed = f.read()
    assert committed == markdown.catalogue_markdown(catalogue.load(), results), (
        "docs/conformance.md is stale: run `blkif conformance list --markdown [--results "
        "docs/conformance-lab.json] > docs/conformance.md`")


def test_markdown_compares_implementations(tmp_path):
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"A": {"req-1": "PASS"}, "B": {"req-1": "FAIL"}}))
    out = blkif("list", "--markdown", "--results", str(results))
    assert out.returncode == 0, out.stderr
    row = [line for line in out.stdout.splitlines() if line.startswith("| req-1 ")]
    assert row and row[0].endswith("| MUST | PASS | FAIL |"), row


def test_list_names_every_case_once():
    out = blkif("list", "--json")
    assert out.returncode == 0, out.stderr
    ids = [c["id"] for c in json.loads(out.stdout)]
    assert len(ids) == len(set(ids)) == len(catalogue.load())


@pytest.mark.parametrize("argv,text", [
    (["backend", "--case", "nope"], "no case 'nope'"),
    (["backend", "--platform", "xen"], "needs a target"),
    (["backend", "--domid", "3"], "--domid N and --vdev VDEV together"),
    (["backend", "--domid", "3", "--vdev", "xvda"], "needs --sim-path"),
    (["backend", "--level", "MAY"], "invalid choice"),
])
def test_usage_errors_are_one_line(argv, text):
    out = blkif(*argv)
    assert out.returncode == 2
    assert text in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_json_and_junit_of_a_passing_run(tmp_path):
    junit = tmp_path / "junit.xml"
    out = blkif("backend", "--case", "xenbus-1", "--case", "req-12", "--json",
                "--junit-xml", str(junit))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [r["id"] for r in doc["results"]] == ["xenbus-1", "req-12"]
    assert all(r["status"] == "PASS" for r in doc["results"])
    assert "PASS  xenbus-1" in out.stderr  # progress goes to stderr with --json
    suites = ElementTree.parse(junit).getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == ["backend.xenbus", "backend.requests"]
    assert all(s.get("failures") == "0" for s in suites)


def test_exit_status_is_1_only_for_a_failed_must_case(tmp_path):
    env = {"PYTHONPATH": BROKEN_PEERS, "BLKIF_BROKEN": "no-error-node"}
    should = blkif("backend", "--case", "ring-6", env=env)  # a SHOULD case fails: still 0
    assert should.returncode == 0, should.stdout + should.stderr
    assert "FAIL  ring-6" in should.stdout
    junit = tmp_path / "junit.xml"
    must = blkif("backend", "--case", "xenbus-13", "--junit-xml", str(junit), env=env)
    assert must.returncode == 1, must.stdout + must.stderr
    assert "MUST cases failed: xenbus-13" in must.stdout
    failure = ElementTree.parse(junit).getroot().find("testsuite/testcase/failure")
    assert "without an error node" in failure.get("message")


@pytest.mark.skipif(os.path.exists("/dev/xen/gntdev"), reason="this machine runs on Xen")
def test_frontend_on_xen_off_xen_is_one_line():
    out = blkif("frontend", "--platform", "xen")
    assert out.returncode == 1
    assert "/dev/xen" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_agent_prints_the_script_a_guest_runs():
    from blkif.conformance.frontend.console_agent import AGENT
    out = blkif("agent")
    assert out.returncode == 0 and out.stdout == AGENT


@pytest.mark.parametrize("argv, error", [
    (["--guest", "5"], "--guest needs --platform xen"),
    (["--console", "/dev/pts/3"], "--console goes with --guest"),
    (["--timeout", "60"], "--timeout goes with --guest"),
    (["--platform", "xen", "--guest", "5", "--timeout", "0"], "--timeout must be positive"),
])
def test_frontend_guest_options_are_checked(argv, error):
    out = blkif("frontend", *argv)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["blkif: error: " + error], out.stderr


@pytest.mark.skipif(os.path.exists("/dev/xen/xenbus"), reason="this machine runs on Xen")
def test_frontend_guest_off_xen_is_one_line():
    out = blkif("frontend", "--platform", "xen", "--guest", "5")
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
