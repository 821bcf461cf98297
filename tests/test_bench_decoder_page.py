"""tools/bench_prune_decoder.py regenerates its page's header and table; the hand-written
breakdown below them (measured with a profiler) must survive a regeneration."""
from __future__ import annotations

import bench_prune_decoder


def test_the_hand_written_notes_are_kept_and_the_generated_part_is_not(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# old title\n\n| old | table |\n\n" + bench_prune_decoder.NOTES + "\n\nmeasured: 30 % verify\n")
    assert bench_prune_decoder.kept_notes(page) == ["", bench_prune_decoder.NOTES, "", "measured: 30 % verify"]


def test_a_page_without_notes_or_no_page_keeps_nothing(tmp_path):
    page = tmp_path / "page.md"
    assert bench_prune_decoder.kept_notes(page) == []
    page.write_text("# title\n\n| table |\n")
    assert bench_prune_decoder.kept_notes(page) == []
