"""docs/performance.md and README.md's summary are what benchmarks/results/*.json render."""

from __future__ import annotations

import json
import shutil

from benchmarks import report


def test_the_committed_performance_page_is_current():
  stale = report.stale()
  assert not stale, f"{stale}: run python -m benchmarks.report --write"


def test_the_page_follows_the_json(tmp_path):
  results = tmp_path / "results"
  shutil.copytree(report.RESULTS, results, ignore=shutil.ignore_patterns("*.png"))
  data = json.loads((results / "workloads.json").read_text())
  data["workloads"]["cnn_digits"]["methods"]["tp_lookahead_nostab"]["time_ratio"] = 0.5
  (results / "workloads.json").write_text(json.dumps(data))
  text = report.page(results)
  assert "0.50× on the digits CNN (`tp_lookahead_nostab`" in text
  assert report.summary(results) in text
  assert report.stale(results) == [str(report.PAGE), str(report.README)]


def test_check_and_write(tmp_path, monkeypatch, capsys):
  page, readme = tmp_path / "performance.md", tmp_path / "README.md"
  readme.write_text(f"# T\n\n{report.SUMMARY_OPEN}\nold\n{report.SUMMARY_CLOSE}\n")
  monkeypatch.setattr(report, "PAGE", page)
  monkeypatch.setattr(report, "README", readme)
  monkeypatch.setattr(report.stale, "__defaults__", (report.RESULTS, page, readme))
  assert report.main(["--check"]) == 1
  assert report.main(["--write", str(page)]) == 0
  assert report.main(["--check"]) == 0
  assert "old" not in readme.read_text() and page.read_text() == report.page()
  capsys.readouterr()
