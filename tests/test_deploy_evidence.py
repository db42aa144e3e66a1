"""A board's result files judged as evidence (edgedistill.deploy.evidence): the row is PASS only on an explicit
PASS from every check asked for; a missing, malformed or forged file is that board's FAIL, never an exception."""

from __future__ import annotations

import json

import pytest

from edgedistill.deploy.evidence import board_verdict, fleet_facts, read_results


def _write(tmp_path, **files):
    paths = []
    for name, text in files.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text if isinstance(text, str) else json.dumps(text))
        paths.append(path)
    return paths


def test_explicit_passes_from_every_check_pass():
    results = {"validate": {"status": "PASS"}, "bench": {"verdict": {"overall": "PASS"}}}
    assert board_verdict(results, [], ["validate", "bench"], {}) == ("PASS", "")


def test_a_missing_file_is_a_fail_that_says_how_the_check_ended():
    status, why = board_verdict({"bench": {"verdict": {"overall": "PASS"}}}, [], ["validate", "bench"], {"validate": 1})
    assert status == "FAIL" and "no validate.json" in why and "exited 1" in why
    status, why = board_verdict({"validate": {"status": "PASS"}}, [], ["validate", "bench"], {"bench": 0})
    assert status == "FAIL" and "no bench.json" in why and "wrote none" in why


@pytest.mark.parametrize(
    "text, said",
    [
        ("[1, 2]", "a JSON list, not an object"),
        ('{"status": "PASSED"}', "not one of FAIL, PASS"),
        ('{"status": NaN}', "NaN is not a number JSON allows"),
        ("{not json", "malformed"),
    ],
)
def test_a_malformed_file_is_named_and_fails_the_board(tmp_path, text, said):
    results, problems = read_results(_write(tmp_path, validate=text, bench={"verdict": {"overall": "PASS"}}))
    assert "validate" not in results and len(problems) == 1 and said in problems[0] and "validate.json" in problems[0]
    status, why = board_verdict(results, problems, ["validate", "bench"], {})
    assert status == "FAIL" and "validate.json from the board is malformed" in why


def test_figures_that_are_not_numbers_are_not_reported():
    facts = fleet_facts(
        {
            "bench": {
                "verdict": {"overall": "PASS"},
                "result": {"throughput_fps": "999", "latency_ms": {"p50": 2.0, "p99": True}, "memory": [1]},
            },
            "validate": {"status": "PASS", "top1": float("inf")},
        }
    )
    assert facts["fps"] is None and facts["fps_p50"] == 500.0 and facts["fps_p99"] is None
    assert facts["memory_mb"] is None and facts["device_top1"] is None


def test_a_result_file_too_big_to_be_one_is_refused_unread(tmp_path, monkeypatch):
    import edgedistill.deploy.evidence as evidence

    monkeypatch.setattr(evidence, "MAX_JSON_BYTES", 10)
    results, problems = read_results(_write(tmp_path, bench={"verdict": {"overall": "PASS"}}))
    assert not results and "not a result file" in problems[0]


def test_activating_a_release_names_the_running_services_that_keep_the_old_one(tmp_path):
    """deploy switched `current` but a running edgerun-* unit kept its staged release, and nothing said so."""
    import subprocess

    from edgedistill.deploy.board import Board
    from edgedistill.deploy.release import DeployOptions, Release

    release = Release(tmp_path / "b.edb", "line", "0123456789abcdef", "0" * 64, None, None)
    board = Board("board-a", release, DeployOptions(), tmp_path)
    asked = []

    def run(command, stdin=None, timeout=None, check=True):
        asked.append(command)
        return subprocess.CompletedProcess(command, 0, b"edgerun-line.service\nedgerun-cam2.service\n", b"")

    board.ssh.run = run
    board.note_services()
    assert board.row.facts["services"] == ["edgerun-line.service", "edgerun-cam2.service"]
    assert "systemctl restart edgerun-line.service edgerun-cam2.service" in board.row.reason
    assert "edgerun service install edgedistill/models/line/current/bundle.edb" in board.row.reason
    assert "systemctl list-units 'edgerun-*'" in asked[0]
    quiet = Board("board-b", release, DeployOptions(), tmp_path)
    quiet.ssh.run = lambda command, **kw: subprocess.CompletedProcess(command, 0, b"", b"")
    quiet.note_services()
    assert "services" not in quiet.row.facts and quiet.row.reason == ""
