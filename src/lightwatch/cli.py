"""The ``lightwatch`` command: read a run back, compare two runs, show the shipped policies.

::

    lightwatch report LOGDIR [--json] [--html OUT.html] [--fail-on SEVERITY]
    lightwatch compare RUN_A RUN_B [--json]
    lightwatch policies [show NAME [OVERRIDE ...]]

Exit codes: 0 fine; 1 ``report --fail-on`` found an alert at or above that severity; 2 a usage error,
an unreadable log directory or a missing optional dependency.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any, Optional, Sequence, TextIO

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_ALERTS, EXIT_USAGE = 0, 1, 2
_SEVERITIES = ("info", "warning", "error", "critical")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error returns instead of exiting the interpreter (``main`` is callable in-process)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightwatch`` (its ``--help`` is the command's reference).

    Example:
        >>> build_parser().parse_args(["report", "logs", "--fail-on", "warning"]).fail_on
        'warning'
    """
    parser = _Parser(prog="lightwatch", description="Read back runs monitored by lightwatch.")
    parser.add_argument("--version", action="store_true", help="print lightwatch's version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    rep = sub.add_parser("report", help="was the run healthy, and if not what went wrong, where and when")
    rep.add_argument("logdir", help="the run's log directory (e.g. lightning_logs/version_0), or a parent of several")
    rep.add_argument("--json", action="store_true", help="print the report as JSON (schema: docs/report.md)")
    rep.add_argument("--html", metavar="OUT.html", help="also write a self-contained HTML page with plots")
    rep.add_argument("--fail-on", choices=_SEVERITIES, default=None,
                     help="exit 1 when an alert at or above this severity exists (for CI gates)")
    rep.add_argument("--prefix", default="monitor", help="the monitors' tag prefix (default: monitor)")
    rep.add_argument("--no-verify", action="store_true", help="do not hash the checkpoints the manifest names")
    rep.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                     help="rich tables and colour: auto (on a terminal, when rich is installed), always, never")

    cmp = sub.add_parser("compare", help="what changed between two runs (B against A)")
    cmp.add_argument("run_a", help="the reference run's log directory")
    cmp.add_argument("run_b", help="the run to compare with it")
    cmp.add_argument("--json", action="store_true", help="print the comparison as JSON (schema: docs/report.md)")
    cmp.add_argument("--prefix", default="monitor")
    cmp.add_argument("--scale-factor", type=float, default=3.0,
                     help="list a layer whose median statistic changed by more than this factor (default 3)")
    cmp.add_argument("--color", choices=("auto", "always", "never"), default="auto")

    pol = sub.add_parser("policies", help="the shipped Hydra policies; `policies show NAME` resolves one")
    pol.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    pol.add_argument("name", nargs="?", help="policy (default, strict, ...) or component variant (grad_stats/full)")
    pol.add_argument("overrides", nargs="*", help="Hydra overrides of the policy, e.g. every_n_steps=5")
    pol.add_argument("--json", action="store_true")
    return parser


def _color(choice: str) -> Optional[bool]:
    return {"always": True, "never": False}.get(choice)


def _one_run(logdir: str, what: str) -> str:
    from lightwatch.report.reader import find_runs

    runs = find_runs(logdir)
    if len(runs) > 1:
        raise _UsageError(f"{what} {logdir} holds {len(runs)} runs ({', '.join(runs[:4])}"
                          f"{' ...' if len(runs) > 4 else ''}); pass one of them.")
    return runs[0]


def _report(args: argparse.Namespace, out: TextIO) -> int:
    from lightwatch.report.reader import find_runs, read_run
    from lightwatch.report.summary import SCHEMA_VERSION, severity_rank, summarize
    from lightwatch.report.terminal import report_sections, write_sections

    if args.html:
        from lightwatch.report.html import require_matplotlib

        require_matplotlib()  # before reading anything: the missing extra is the first thing to say
    runs = [read_run(path, verify_hashes=not args.no_verify) for path in find_runs(args.logdir)]
    summaries = [summarize(run, args.prefix) for run in runs]
    worst = max((severity_rank(s["verdict"]["worst_severity"]) for s in summaries
                 if s["verdict"]["worst_severity"]), default=-1)
    failed = args.fail_on is not None and worst >= severity_rank(args.fail_on)
    statuses = [s["verdict"]["status"] for s in summaries]
    overall = "errors" if "errors" in statuses else "warnings" if "warnings" in statuses else "healthy"
    html_path = None
    if args.html:
        from lightwatch.report.html import render_html

        html_path = os.path.abspath(args.html)
        os.makedirs(os.path.dirname(html_path) or ".", exist_ok=True)
        with open(html_path, "w", encoding="utf-8") as fh:
            fh.write(render_html(list(zip(runs, summaries)), args.prefix, title=f"lightwatch report: {args.logdir}"))
    if args.json:
        json.dump({"schema_version": SCHEMA_VERSION, "kind": "report", "logdir": os.path.abspath(args.logdir),
                   "status": overall, "fail_on": args.fail_on, "failed": failed, "html": html_path,
                   "runs": summaries}, out, indent=2, allow_nan=False)
        out.write("\n")
    else:
        for summary in summaries:
            write_sections(report_sections(summary), out, _color(args.color))
        if html_path:
            out.write(f"HTML report: {html_path}\n")
        if args.fail_on is not None:
            out.write(f"--fail-on {args.fail_on}: {'FAILED' if failed else 'passed'}\n")
    return EXIT_ALERTS if failed else EXIT_OK


def _compare(args: argparse.Namespace, out: TextIO) -> int:
    from lightwatch.report.compare import compare_runs
    from lightwatch.report.reader import read_run
    from lightwatch.report.terminal import compare_sections, write_sections

    a = read_run(_one_run(args.run_a, "RUN_A"), verify_hashes=False)
    b = read_run(_one_run(args.run_b, "RUN_B"), verify_hashes=False)
    result = compare_runs(a, b, args.prefix, scale_factor=args.scale_factor)
    if args.json:
        json.dump(result, out, indent=2, allow_nan=False)
        out.write("\n")
    else:
        write_sections(compare_sections(result), out, _color(args.color))
    return EXIT_OK


def _policies(args: argparse.Namespace, out: TextIO) -> int:
    from lightwatch.report.policies import list_policies, show_policy

    if args.action == "show":
        if not args.name:
            raise _UsageError("lightwatch policies show: name a policy, e.g. `lightwatch policies show default`.")
        out.write(show_policy(args.name, args.overrides))
        return EXIT_OK
    listing = list_policies()
    if args.json:
        json.dump(listing, out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write("Policies (monitor=NAME; `lightwatch policies show NAME` prints one resolved):\n")
    width = max(len(p["name"]) for p in listing["policies"])
    for p in listing["policies"]:
        out.write(f"  {p['name'].ljust(width)}  {textwrap.shorten(p['description'], 100)}\n")
    out.write("\nComponent variants (monitor/COMPONENT=VARIANT):\n")
    for group, variants in listing["components"].items():
        for v in variants:
            out.write(f"  {(group + '/' + v['name']).ljust(22)}  {textwrap.shorten(v['description'], 90)}\n")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    """Run the ``lightwatch`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Example:
        >>> import io
        >>> buf = io.StringIO()
        >>> main(["policies"], out=buf), "strict" in buf.getvalue()
        (0, True)
    """
    from lightwatch.report.html import MissingExtra
    from lightwatch.report.policies import PolicyError
    from lightwatch.report.reader import LogDirError

    out = out or sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.version:
            from lightwatch._version import __version__

            out.write(f"lightwatch {__version__}\n")
            return EXIT_OK
        if args.command is None:
            parser.print_help(out)
            return EXIT_USAGE
        handler = {"report": _report, "compare": _compare, "policies": _policies}[args.command]
        return handler(args, out)
    except (_UsageError, LogDirError, PolicyError, MissingExtra) as err:
        sys.stderr.write(f"lightwatch: error: {err}\n")
        return EXIT_USAGE
    except BrokenPipeError:  # `lightwatch report ... | head`
        return EXIT_OK



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
