"""A trial's per-size table (PPL first, constant columns last) and its dashboard note."""

from __future__ import annotations

import math

import pytest

from archsearch.result import SizeRecord
from archsearch.scaling import fit_power_law
from archsearch.search.notes import note_flags, size_rows, trial_note


def records():
    return [SizeRecord(s, "tokens", s, 300, math.log(900 * s**-0.3), 0.02, 900 * s**-0.3, 0.1 + s / 1e5,
                       {"phase1": 50, "phase2": 60, "total": 110}, 1.0, "cpu", "fp32", [42],
                       {"phase1": 0.5, "phase2": 0.4}, metrics={"val_er": 0.7, "train_er": 0.8, "phase1_iterations": 6.0 + i})
            for i, s in enumerate((400, 800, 1600))]  # fmt: skip


def test_size_rows_lead_with_ppl_and_end_with_constant_columns():
    rows = size_rows(records())
    cols = list(rows[0])
    assert cols[:5] == ["size", "train_tokens", "val_ppl", "val_ppl_low", "val_ppl_high"]
    # units, counts, device, ...: the same on every row, so at the end (leading columns stay in front even when constant)
    constant = {"size_unit", "val_tokens", "device", "precision", "phase1_params", "phase2_params", "total_params",
                "phase1_seconds", "phase2_seconds", "seeds", "capped"}  # fmt: skip
    assert set(cols[-len(constant):]) == constant
    assert cols.index("val_er") < cols.index("phase1_iterations") < cols.index("device")
    assert rows[0]["val_ppl_low"] < rows[0]["val_ppl"] < rows[0]["val_ppl_high"]


def test_the_note_gives_alpha_and_ppl_at_target_with_intervals():
    recs = records()
    fit = fit_power_law([r.train_tokens for r in recs], [r.val_ppl for r in recs]).to_dict()
    note = trial_note(3, "baseline", "COMPLETE", {"num_layers": 2}, recs, fit, 1e7, "/artifacts/1/4/abc")
    assert note.startswith("## baseline\n")
    assert "**α = -0.3000** (95% interval [" in note
    assert "**PPL at 10,000,000 tokens = " in note
    assert "[![PPL vs training tokens](/artifacts/1/4/abc)](/artifacts/1/4/abc)" in note
    table = [line for line in note.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Tokens | Val PPL | PPL 95% |") and len(table) == 1 + 3
    assert table[1].startswith(f"| 400 | {recs[0].val_ppl:.1f} | [")


def test_a_flat_stored_record_reads_as_a_size_record():
    flat = {"size": 400, "size_unit": "tokens", "train_tokens": 400, "val_tokens": 300, "val_ppl": 50.0, "val_loss": 3.9,
            "val_acc": 0.2, "val_er": 0.7, "phase1_params": 5, "phase2_params": 6, "total_params": 11, "phase1_seconds": 0.5,
            "seconds": 1.0, "device": "cpu", "precision": "fp32", "seeds": [42], "cached": True}  # fmt: skip
    rec = SizeRecord.from_dict(flat)
    assert rec.params == {"phase1": 5, "phase2": 6, "total": 11} and rec.metrics["val_er"] == 0.7
    assert rec.phase_seconds == {"phase1": 0.5} and rec.cached and math.isnan(rec.val_loss_se)
    assert SizeRecord.from_dict(rec.to_dict()) == rec


def test_the_note_flags_capped_runs_an_alpha_interval_with_zero_and_infeasible():
    """Both sides of one note: the config heading, alpha and PPL at target with intervals, and the
    cap / interval / infeasibility flags the report gives, with the capped size marked in the table."""
    recs = records()
    recs[-1].capped = ["max_epochs"]
    recs[-1].retried = {"phase2.max_epochs": 20}
    fit = fit_power_law([r.train_tokens for r in recs], [r.val_ppl for r in recs]).to_dict()
    assert note_flags(recs, fit, None) == [
        "capped: 1,600 tokens: max_epochs. Its α and extrapolations rest on runs cut off while still improving",
        "trained again with raised caps: 1,600 tokens (phase2.max_epochs=20)",
    ]
    flags = note_flags(recs, dict(fit, alpha_low=-0.1, alpha_high=0.2), "admissible.max_ppl_ratio: 2.00x the best")
    assert flags[2] == "α interval [-0.1000, 0.2000] contains 0: these sizes do not show its PPL falling with data"
    assert flags[3] == "infeasible: admissible.max_ppl_ratio: 2.00x the best"
    note = trial_note(3, "baseline", "COMPLETE", {}, recs, fit, 1e7, None, None, flags)
    assert note.startswith("## baseline\n") and "**α = " in note and "**PPL at 10,000,000 tokens = " in note
    assert "- ⚠ capped: 1,600 tokens: max_epochs" in note and "- ⚠ infeasible: admissible" in note
    table = [line for line in note.splitlines() if line.startswith("| ")]
    assert table[0].endswith("| Capped |") and table[-1].endswith("| max_epochs |") and table[1].endswith("| - |")
    assert note.index("**Flags:**") < note.index("| Tokens |")
    assert note_flags(records(), fit, None) == []  # nothing to warn about: no flags section
    assert "Flags" not in trial_note(3, "baseline", "COMPLETE", {}, records(), fit, 1e7)


def test_the_notes_ppl_at_target_interval_is_the_trials_and_the_reports():
    """The note's PPL at the target carries the per-size standard errors, as the trial's fit
    (trial.fit_sizes) and the report's law do: on an exact power law the jackknife alone has
    no width, the measured errors give it one."""
    from archsearch.report.data import ConfigResult, SizeRow, law_of
    from archsearch.trial import fit_sizes

    recs = records()
    ex = fit_sizes(recs).extrapolate(1e7)
    assert ex.high / ex.low > 1.01
    note = trial_note(3, "baseline", "COMPLETE", {}, recs, fit_sizes(recs).to_dict(), 1e7)
    assert f"(95% interval [{ex.low:.4g}, {ex.high:.4g}])" in note
    law, _ = law_of(ConfigResult("b", {}, 50, [SizeRow(r.train_tokens, r.val_ppl, val_loss_se=r.val_loss_se) for r in recs]), 1e7)
    assert (law.ppl_target_low, law.ppl_target_high) == (pytest.approx(ex.low), pytest.approx(ex.high))
    # a rising law is flagged as the report flags it
    assert any("above 0" in f for f in note_flags(recs, {"alpha": 0.2, "alpha_low": 0.1, "alpha_high": 0.3}, None))
