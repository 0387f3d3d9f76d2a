"""Reading a monitored run back: ``lightwatch report``, ``lightwatch compare`` and ``lightwatch policies``.

- :mod:`~lightwatch.report.reader`: what a run left on disk (event files through TensorBoard's
  ``EventAccumulator``, ``alerts.jsonl``, ``data_profile.json``, checkpoint manifests, verified);
- :mod:`~lightwatch.report.summary`: the verdict, alerts by rule, worst layers, data findings and
  checkpoints as the JSON-safe object ``--json`` prints (schema: ``docs/report.md``);
- :mod:`~lightwatch.report.terminal` and :mod:`~lightwatch.report.html`: the terminal tables (``rich``
  when installed) and the self-contained HTML page (``matplotlib``, the ``report`` extra);
- :mod:`~lightwatch.report.compare`: what changed between two runs;
- :mod:`~lightwatch.report.policies`: the shipped Hydra policies, listed and resolved.

Example:
    >>> from lightwatch.report import SCHEMA_VERSION, summarize
    >>> from lightwatch.report.reader import RunLog
    >>> summarize(RunLog("run"))["verdict"]["status"], SCHEMA_VERSION
    ('healthy', 1)
"""
from lightwatch.report.compare import compare_runs
from lightwatch.report.reader import LogDirError, RunLog, find_runs, read_run
from lightwatch.report.summary import SCHEMA_VERSION, summarize

__all__ = ["SCHEMA_VERSION", "LogDirError", "RunLog", "compare_runs", "find_runs", "read_run", "summarize"]
