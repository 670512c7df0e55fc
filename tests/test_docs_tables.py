"""Every measured table in the docs is what benchmarks/render_docs.py writes from the committed JSON."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benchmarks" / "render_docs.py")
render_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_docs)


@pytest.mark.parametrize("page", render_docs.pages(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_tables_equal_what_the_script_renders_from_the_committed_results(page: Path):
    text = page.read_text()
    assert render_docs.render_page(text, render_docs.load_results()) == text, (
        f"{page.relative_to(ROOT)} differs from benchmarks/results/*.json: run benchmarks/render_docs.py")


def test_every_marked_table_has_a_body_and_the_results_are_used():
    results = render_docs.load_results()
    names = [m["name"] for page in render_docs.pages(ROOT) for m in render_docs.BLOCK.finditer(page.read_text())]
    assert names, "no generated tables found"
    assert len(names) == len(set(names)), "a table is shown twice"
    unused = set(results) - {name.partition(".")[0] for name in names}
    assert not unused, f"results files no page shows: {sorted(unused)}"


@pytest.mark.parametrize("page", render_docs.pages(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_table_with_measured_intervals_is_written_by_hand(page: Path):
    outside = render_docs.BLOCK.sub("", page.read_text())
    interval = re.compile(r"\[[-+−]?\d[\d.]*, [-+−]?\d[\d.]*\]")
    by_hand = [line for line in outside.splitlines() if line.startswith("|") and interval.search(line)]
    assert not by_hand, f"{page.relative_to(ROOT)}: measured rows outside a generated block: {by_hand[:3]}"


def test_the_dp_utility_table_renders_from_the_benchmark_schema():
    run = {"privacy": {"epsilon": 8.0}, "metrics": {"kid/members": {"value": 20.7, "ci": [14.1, 29.0]},
                                                   "accuracy/digit": {"value": 0.094, "ci": [0.061, 0.136]}}}
    rows = render_docs.dp_utility({"utility": {"dp-lora eps=8": run, "lora": {"privacy": None, "metrics": {}}}})
    assert rows[1] == ["dp-lora eps=8", "8.00", "20.7 [14.1, 29]", "–", "9.4 [6.1, 13.6] %", "–"]
    assert rows[2][:2] == ["lora", "none"]


def test_a_table_without_a_results_file_fails():
    page = "text\n<!-- table:no_such_benchmark.timing -->\n<!-- /table -->\n"
    with pytest.raises(render_docs.TableError, match="no benchmarks/results/no_such_benchmark.json"):
        render_docs.render_page(page, render_docs.load_results())


def test_a_table_its_results_file_does_not_have_fails():
    results = {"bench_x": {"meta": {"date": "2026-01-01", "commit": "abc", "hardware": "cpu"}, "tables": {}}}
    with pytest.raises(render_docs.TableError, match="no table 'missing'"):
        render_docs.render_page("<!-- table:bench_x.missing -->\n<!-- /table -->\n", results)


def test_a_results_file_without_meta_fails():
    results = {"bench_x": {"tables": {"t": {"columns": ["a"], "rows": [["1"]]}}}}
    with pytest.raises(render_docs.TableError, match="meta"):
        render_docs.render_page("<!-- table:bench_x.t -->\n<!-- /table -->\n", results)


def test_a_rendered_table_carries_its_stamp():
    results = {"bench_x": {"meta": {"date": "2026-01-01", "commit": "abc1234", "hardware": "a CPU, 2 cores"},
                           "tables": {"t": {"columns": ["a", "b"], "rows": [["1", "2"]]}}}}
    page = render_docs.render_page("<!-- table:bench_x.t -->\nstale\n<!-- /table -->\n", results)
    assert page == ("<!-- table:bench_x.t -->\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                    "*Measured 2026-01-01 at commit abc1234 on a CPU, 2 cores.*\n<!-- /table -->\n")


def test_the_dp_timing_table_renders_from_the_benchmark_schema():
    timing = {"batch_size": 16, "timed_steps": 30, "median_step_s": {"lora": 0.1, "dp-lora K=1 engine=lora": 0.12},
              "ratio_to_lora": {"lora": 1.0, "dp-lora K=1 engine=lora": 1.2}}
    rows = render_docs.dp_timing({"timing": {"demo adapter": timing}})
    assert rows == [["adapter", "lora", "dp-lora K=1 engine=lora"],
                    ["demo adapter, batch 16", "0.100 s", "0.120 s (1.20x)"]]
