"""The health reports' on-disk buffer: bounded, durable seq, torn tail, forgetting."""

from __future__ import annotations

import json
import os

from sgw.gateway.health.buffer import REPORTS_FILE, ReportBuffer


def _add(buf: ReportBuffer, n: int, pad: int = 0) -> list[int]:
    seqs = []
    for _ in range(n):
        seq = buf.take_seq()
        buf.append(seq, {"seq": seq, "pad": "x" * pad})
        seqs.append(seq)
    return seqs


def test_reports_survive_a_restart_in_order(tmp_path):
    buf = ReportBuffer(str(tmp_path))
    assert _add(buf, 5) == [0, 1, 2, 3, 4]
    again = ReportBuffer(str(tmp_path))
    assert again.seqs() == [0, 1, 2, 3, 4]
    assert [d["seq"] for d in again.pending(3)] == [0, 1, 2]


def test_seq_grows_across_restarts_even_when_everything_was_forgotten(tmp_path):
    buf = ReportBuffer(str(tmp_path))
    _add(buf, 3)
    assert buf.forget_through(2) == 3
    assert len(buf) == 0
    again = ReportBuffer(str(tmp_path))
    assert len(again) == 0
    assert again.take_seq() == 3


def test_seq_taken_but_never_written_is_not_reused(tmp_path):
    """A crash between taking a seq and appending its report leaves a gap, not a repeat."""
    buf = ReportBuffer(str(tmp_path))
    _add(buf, 2)
    assert buf.take_seq() == 2  # then the process dies
    assert ReportBuffer(str(tmp_path)).take_seq() == 3


def test_seq_follows_the_file_when_the_state_is_lost(tmp_path):
    buf = ReportBuffer(str(tmp_path))
    _add(buf, 4)
    os.unlink(buf.state_path)
    assert ReportBuffer(str(tmp_path)).take_seq() == 4


def test_a_torn_last_line_is_cut_off_and_appends_go_on(tmp_path):
    buf = ReportBuffer(str(tmp_path))
    _add(buf, 3)
    path = tmp_path / "health" / REPORTS_FILE
    with open(path, "ab") as f:
        f.write(b'{"seq": 3, "gatew')  # kill -9 in the middle of an append
    again = ReportBuffer(str(tmp_path))
    assert again.skipped == 1
    assert again.seqs() == [0, 1, 2]
    _add(again, 1)
    third = ReportBuffer(str(tmp_path))
    assert third.skipped == 0
    assert third.seqs() == [0, 1, 2, 3]
    lines = path.read_bytes().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [0, 1, 2, 3]


def test_oldest_dropped_past_the_count_cap_and_counted(tmp_path):
    buf = ReportBuffer(str(tmp_path), max_reports=20)
    _add(buf, 21)
    assert len(buf) <= 20
    assert buf.dropped == 21 - len(buf)
    assert buf.seqs() == list(range(buf.dropped, 21))
    again = ReportBuffer(str(tmp_path), max_reports=20)
    assert again.dropped == buf.dropped
    assert again.seqs() == buf.seqs()


def test_oldest_dropped_past_the_byte_cap(tmp_path):
    buf = ReportBuffer(str(tmp_path), max_bytes=10_000)
    _add(buf, 30, pad=1000)
    assert buf.nbytes <= 10_000
    assert buf.dropped > 0
    assert buf.seqs()[-1] == 29
    assert (tmp_path / "health" / REPORTS_FILE).stat().st_size == buf.nbytes


def test_forget_through_keeps_the_newer_reports(tmp_path):
    buf = ReportBuffer(str(tmp_path))
    _add(buf, 5)
    assert buf.forget_through(1) == 2
    assert buf.forget_through(1) == 0
    assert ReportBuffer(str(tmp_path)).seqs() == [2, 3, 4]


def test_reports_dropped_unsent_are_counted_durably(tmp_path):
    buf = ReportBuffer(str(tmp_path))
    _add(buf, 3)
    assert buf.drop_through(1) == 2
    again = ReportBuffer(str(tmp_path))
    assert again.dropped == 2 and again.seqs() == [2]
