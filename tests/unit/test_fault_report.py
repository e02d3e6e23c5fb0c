"""The fault table of docs/guarantees.md is generated from the committed report, never copied
by hand, and `make fault-report` takes only a complete run whose checks all passed."""

from __future__ import annotations

import copy

import fault_report
import pytest

from gateway.devtools.localstack import LocalStack


def committed() -> dict:
    return fault_report.load(fault_report.COMMITTED)


def test_the_docs_table_is_what_the_committed_report_generates() -> None:
    doc = fault_report.DOC.read_text()
    assert fault_report.with_table(doc, committed()) == doc, (
        "docs/guarantees.md's fault table differs from docs/results/faults.json: "
        "run the fault suite, then `make fault-report`"
    )


def test_every_fault_of_the_committed_report_passed_its_checks() -> None:
    report = committed()
    assert report["faults"]
    assert fault_report.problems(report, None) == []
    for row in report["faults"]:
        assert row["lost"] == row["duplicates"] == row["unexpected"] == 0, row["fault"]
        assert row["unacked_outside"] == 0, row["fault"]
        assert row["recovery_s"] <= row["max_recovery_s"], row["fault"]
        if row["evidence"] == "redelivery":
            assert row["redelivered"] + row["absorbed"] > 0, row["fault"]
        if row["evidence"] == "retry":
            assert row["retried"] > 0, row["fault"]


def test_the_tool_reads_the_report_where_the_suite_writes_it() -> None:
    assert LocalStack.test().run_dir / "fault-report.json" == fault_report.LAST_RUN


def test_a_row_shows_the_figures_and_their_bounds() -> None:
    report = copy.deepcopy(committed())
    row = report["faults"][0]
    row.update(
        fault="kill -9 something",
        unacked_in_outage=25,
        sent_in_outage=100,
        max_unacked_share=0.6,
        recovery_s=3.26,
        max_recovery_s=30,
        evidence="redelivery",
        redelivered=41,
    )
    line = fault_report.table(report)[4]
    assert line.startswith("| kill -9 something |")
    assert "| **41** |" in line
    assert "| 25 of 100 (25%; ≤ 60%) |" in line
    assert line.endswith("| 3.3 (≤ 30) |")


def test_the_table_replaces_only_what_lies_between_the_markers() -> None:
    doc = f"intro\n{fault_report.START}\nold table\n{fault_report.END}\noutro\n"
    updated = fault_report.with_table(doc, committed())
    assert updated.startswith(f"intro\n{fault_report.START}\n")
    assert updated.endswith(f"\n{fault_report.END}\noutro\n")
    assert "old table" not in updated
    with pytest.raises(SystemExit):
        fault_report.with_table("no markers here\n", committed())


def test_a_failed_or_partial_run_is_not_taken() -> None:
    report = copy.deepcopy(committed())
    report["faults"][0]["ok"] = False
    failed = report["faults"][0]["fault"]
    assert fault_report.problems(report, committed()) == [f"{failed}: its checks failed"]
    partial = copy.deepcopy(committed())
    dropped = partial["faults"].pop()["fault"]
    assert [p.split(":")[0] for p in fault_report.problems(partial, committed())] == [dropped]
    assert fault_report.problems(partial, None) == []
