"""The policy benchmark (bench/policy_overhead.py) runs end to end: a tiny workload, a few steps, one round."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _bench_module(name: str):
    """A script of bench/ imported as a module (bench/ is no package)."""
    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)


def test_policy_overhead_reports_every_variant_and_hook(tmp_path):
    policy_overhead = _bench_module("policy_overhead")
    out, table = tmp_path / "policy.json", tmp_path / "policy.md"
    policy_overhead.main(["--workloads", "tiny", "--intervals", "2", "--warmup", "2", "--measured", "2",
                          "--rounds", "1", "--no-warmup-round", "--no-memory", "--json", str(out),
                          "--markdown", str(table)])
    report = json.loads(out.read_text())

    # one variant per callback instantiate_monitors builds for monitor=default, whichever they are
    singles = ["default:" + name for name in policy_overhead.default_callback_names()]
    assert {"GradientStatsMonitor", "ActivationStatsMonitor", "DataQualityMonitor", "MetricMonitor"} <= {
        s.split(":")[1] for s in singles}
    expected = ["bare", "monitor=default", "monitor=strict", *singles, "lightning grad_norm"]
    if importlib.util.find_spec("wandb") is not None:
        expected.append("wandb.watch")
    assert report["variants"] == expected
    records = {r["variant"]: r for r in report["records"]}
    assert sorted(records) == sorted(expected)
    for record in records.values():
        assert record["workload"] == "tiny" and record["interval"] == 2 and record["rounds"] == 1
        assert record["bare_step_ms"] > 0 and record["fit_start_s"] > 0
        assert isinstance(record["ratio_median"], float)

    default = records["monitor=default"]
    assert default["sampled_steps_per_run"] == 1  # steps 2, 3: step 2 is sampled at interval 2
    assert {h["callback"] for h in default["hooks"]} >= {s.split(":")[1] for s in singles}
    for hook in default["hooks"]:
        assert set(hook) == {"callback", "hook", "unsampled_us", "sampled_ms"}
    hooks = {(h["callback"], h["hook"]) for h in default["hooks"]}
    assert ("DataQualityMonitor", "on_train_batch_start") in hooks
    assert ("ActivationStatsMonitor", "forward hooks") in hooks
    assert default["sampled_inside_ms"] > 0 and default["unsampled_inside_us"] > 0
    assert not records["lightning grad_norm"]["hooks"]  # nothing of lightwatch's runs there

    text = table.read_text()
    assert "| variant | ratio (median) | IQR |" in text and 'Per hook, monitor=default, tiny, interval 2"' in text


def test_step_positions_reports_each_position_and_the_sampled_step(capsys):
    step_positions = _bench_module("step_positions")
    results = step_positions.main(["--workload", "tiny", "--interval", "3", "--steps", "14", "--warmup", "2",
                                   "--pairs", "1"])
    out = capsys.readouterr().out
    assert len(results) == 1 and results[0]["bare_ms"] > 0
    assert all(key in results[0] for key in ("unsampled_extra_ms", "sampled_extra_ms"))
    rows = [line for line in out.splitlines() if line.startswith("pair 1 ")]
    assert len(rows) == 2 and all(" 0:" in r and " 1:" in r and " 2:" in r for r in rows)  # every position
    assert "x a bare step" in out


def test_memory_only_splits_the_peak_into_code_pages_and_the_rest(tmp_path):
    policy_overhead = _bench_module("policy_overhead")
    out, table = tmp_path / "memory.json", tmp_path / "memory.md"
    policy_overhead.main(["--workloads", "tiny", "--intervals", "2", "--memory-only", "--no-wandb",
                          "--variants", "monitor=default", "--json", str(out), "--markdown", str(table)])
    records = {r["variant"]: r for r in json.loads(out.read_text())["records"]}
    assert sorted(records) == ["bare", "monitor=default"]  # one fresh child process each
    bare, default = records["bare"], records["monitor=default"]
    assert bare["peak_extra_bytes"] == 0 and bare["code_pages_extra_bytes"] == 0
    assert bare["state_bytes"] > 0 and default["rss_peak_bytes"] > 0
    if default["rss_file_bytes"] is not None:  # Linux: RssFile of /proc/self/status
        assert isinstance(default["code_pages_extra_bytes"], int)
        # the kernels lightwatch runs map pages of torch's code that bare training does not touch
        assert default["code_pages_extra_bytes"] > 0
    text = table.read_text()
    assert "peak extra memory" in text and "| of which code pages (MB) |" in text and "| monitor=default |" in text
