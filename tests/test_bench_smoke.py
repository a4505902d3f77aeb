"""The benchmark's code path, once, on a ~1M-parameter model with 2 ranks: it cannot silently rot.

No timing is asserted: only that every method ran, moved the right bytes and made it into the table.
"""

from __future__ import annotations

from bench.methods import METHODS
from bench.report import ratios_table, results_table, verdicts
from bench.run import run_size


def test_benchmark_runs_every_method_on_two_ranks(tmp_path):
    measured = run_size("1m", worlds=[2], reps=1, methods=list(METHODS), work=tmp_path)
    results = measured.results

    assert sorted(r.key for r in results) == sorted(METHODS)
    assert {r.key: r.check for r in results} == dict.fromkeys(METHODS, "ok")  # checksums agree, every byte written
    table = "\n".join(results_table(results))
    assert all(f"| {key} |" in table for key in METHODS)
    assert "-" not in ratios_table(results)[-1].split("|", 3)[3]  # every ratio has both of its methods
    assert [(g.size, g.world) for g in measured.groups] == [("1m", 2)]
    assert {v.target for v in verdicts(results)} >= {"load at most 1.25x torch's reader", "save at most 1.5x the own-file floor"}
