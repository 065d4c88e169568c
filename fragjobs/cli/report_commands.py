"""``fragjobs report``: list, show and compare report folders; the regression gate; HTML.

* ``report ls`` — every run under the reports folder;
* ``report show RUN`` — one run as a table (RUN: a run id, ``latest``, ``best`` or a folder);
* ``report --compare latest|best|RUN [--baseline RUN] --gate thresholds.yaml`` — write
  ``regression_diff.json`` into the run's folder; exit 0 (no regression), 1 (regression: which
  metrics, by how much, against which baseline) or 2 (invalid run or baseline, bad thresholds:
  nothing written);
* ``report html`` — ``index.html`` over every run, with trend plots.

None of these loads torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from fragjobs.cli.options import fail_cleanly

_REPORTS_OPTION = click.option(
    "--reports",
    "reports_dir",
    default=None,
    type=click.Path(),
    help="Reports folder [FRAGJOBS_DATA_DIR/reports].",
)


def _root(reports_dir: str | None) -> Path:
    """--reports of the subcommand, else of ``report`` itself, else the data dir's."""
    from fragjobs.reports.folders import default_reports_root

    context = click.get_current_context(silent=True)
    if reports_dir is None and context is not None and context.parent is not None:
        reports_dir = context.parent.params.get("reports_dir")
    return Path(reports_dir) if reports_dir else default_reports_root()


@click.group(invoke_without_command=True)
@click.option("--compare", "compare", default=None, help="The run to gate: latest, best or RUN.")
@click.option(
    "--baseline",
    default=None,
    help="Compare against this run [the newest earlier "
    "VALID run of the same base model and prompt].",
)
@click.option(
    "--gate",
    "gate_file",
    default=None,
    type=click.Path(),
    help="thresholds.yaml with a regression: section [FRAGJOBS_THRESHOLDS_PATH or "
    "the packaged one].",
)
@_REPORTS_OPTION
@click.pass_context
@fail_cleanly
def report(ctx, compare, baseline, gate_file, reports_dir):
    """Report folders of runs, and the regression gate (exit 0 / 1 regression / 2 invalid)."""
    if ctx.invoked_subcommand is not None:
        if compare or baseline or gate_file:
            raise click.UsageError("--compare/--baseline/--gate go without a subcommand")
        return
    if compare is None:
        if baseline or gate_file:
            raise click.UsageError("--baseline and --gate need --compare RUN")
        click.echo(ctx.get_help())
        return
    sys.exit(compare_runs(_root(reports_dir), compare, baseline, gate_file))


def compare_runs(root: Path, ref: str, baseline_ref: str | None, gate_file: str | None) -> int:
    """Gate run ``ref`` against its baseline; write its ``regression_diff.json``; exit status.

    Raises:
        FragjobsError: bad thresholds, a missing or malformed report, an INVALID run or
            baseline, one of another base model or prompt (nothing is written).
    """
    from fragjobs.errors import InvalidInputError
    from fragjobs.reports.folders import find_baseline, resolve_report
    from fragjobs.reports.html import render_run_page
    from fragjobs.reports.regression import evaluate_regression, exit_status, write_diff
    from fragjobs.validation.gate import load_thresholds

    thresholds = load_thresholds(Path(gate_file) if gate_file else None)
    current = resolve_report(root, ref)
    if baseline_ref is not None:
        baseline = resolve_report(root, baseline_ref)
    else:
        baseline, reason = find_baseline(current.path.parent, current)
        if baseline is None:
            raise InvalidInputError(f"no baseline for {current.run_id}: {reason}")
    document = evaluate_regression(
        current, baseline, thresholds, thresholds_source=gate_file or "default thresholds"
    )
    path = write_diff(current.path, document)
    render_run_page(current.path)
    for check in document["checks"]:
        if check["status"] != "PASS":
            click.echo(f"  {check['metric']:<20} {check['status']:<11} {check['reason']}")
    verdict = (
        "no regression"
        if document["passed"]
        else (f"REGRESSION in {', '.join(document['regressions'])}")
    )
    ran = sum(c["status"] != "UNAVAILABLE" for c in document["checks"])
    click.echo(
        f"{current.run_id} vs baseline {baseline.run_id}: {verdict} "
        f"({ran} check(s) ran, {len(document['not_run'])} could not run)"
    )
    click.echo(f"written {path.resolve()}")
    return exit_status(document)


@report.command("ls")
@_REPORTS_OPTION
@fail_cleanly
def report_ls(reports_dir):
    """List the runs, newest last: status, base model, gate, SSIM, speed-up, prompt."""
    from fragjobs.reports.folders import list_reports

    root = _root(reports_dir)
    reports = list_reports(root)
    if not reports:
        click.echo(f"no reports under {root}", err=True)
        return
    click.echo(
        f"{'run':<18} {'status':<8} {'model':<12} {'gate':<6} {'ssim':>7} {'speedup':>8}  prompt"
    )
    for r in reports:
        gate = {True: "pass", False: "FAIL", None: "-"}[r.gate_passed]
        click.echo(
            f"{r.run_id:<18} {r.status:<8} {str(r.model)[:12]:<12} {gate:<6} "
            f"{_fmt((r.summary.get('quality') or {}).get('ssim')):>7} "
            f"{_fmt(r.hypothesis('H4').get('values', {}).get('speedup')):>8}  {r.prompt!r}"
        )


@report.command("show")
@click.argument("run")
@_REPORTS_OPTION
@fail_cleanly
def report_show(run, reports_dir):
    """Show RUN (a run id, latest, best or a report folder) as a table."""
    from fragjobs.reports.folders import DIFF_FILE, HTML_FILE, resolve_report

    r = resolve_report(_root(reports_dir), run)
    s = r.summary
    click.echo(
        f"run      {r.run_id}  {r.status}" + (f"  ({'; '.join(r.problems)})" if r.problems else "")
    )
    click.echo(f"prompt   {r.prompt!r}")
    click.echo(f"model    {r.model}  {str(r.base_model_hash)[:16]}…  on {s.get('device')}")
    fragment = s.get("fragment") or {}
    click.echo(
        f"fragment {fragment.get('key')}  verified={fragment.get('verified')}  "
        f"stored at {fragment.get('stored_at')}"
    )
    gate = s.get("gate") or {}
    click.echo(
        f"gate     {'passed' if gate.get('passed') else 'FAILED'}"
        + (f"; could not run: {'; '.join(gate['not_run'])}" if gate.get("not_run") else "")
    )
    click.echo("")
    click.echo(f"{'':<3} {'hypothesis':<17} {'status':<11} {'values':<44} thresholds")
    for name, h in sorted((s.get("hypotheses") or {}).items()):
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in _key_values(name, h["values"]))
        limits = ", ".join(f"{k} {_fmt(v)}" for k, v in h["thresholds"].items())
        click.echo(f"{name:<3} {h['name']:<17} {h['status']:<11} {values:<44} {limits}")
        if h.get("reason"):
            click.echo(f"{'':<33}{h['reason']}")
    try:
        diff = json.loads((r.path / DIFF_FILE).read_text())
        against = (diff.get("baseline") or {}).get("run_id") or diff.get("baseline_reason")
        click.echo(f"\nregression: {diff.get('status')} ({against})")
    except (OSError, ValueError):
        click.echo(f"\nregression: {DIFF_FILE} missing")
    for note in s.get("notes") or []:
        click.echo(f"note: {note}")
    click.echo(f"open: {(r.path / HTML_FILE).resolve()}")


@report.command("html")
@_REPORTS_OPTION
@fail_cleanly
def report_html(reports_dir):
    """Write index.html over every run, with trend plots (speed-up, SSIM, break-even)."""
    from fragjobs.reports.html import write_index_page

    root = _root(reports_dir)
    if not root.is_dir():
        from fragjobs.errors import InvalidInputError

        raise InvalidInputError(f"no reports folder {root}")
    click.echo(f"written {write_index_page(root).resolve()}")


_KEY_VALUES = {
    "H1": ("ssim", "lpips", "clip_delta", "pruned_head_pct"),
    "H2": ("peak_reduction", "reduction", "peak_kind"),
    "H3": ("pass_rate", "n"),
    "H4": ("speedup", "latency_full_ms", "latency_fragment_ms"),
    "H5": ("break_even_variants", "overhead_s"),
}


def _key_values(name: str, values: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, values.get(k)) for k in _KEY_VALUES.get(name, ())]


def _fmt(value: Any) -> str:
    from fragjobs.reports.html import format_value

    return format_value(value)


def echo_run_summary(summary: dict[str, Any], folder: Path) -> None:
    """The end of a run as a person reads it: the gate (with the checks it could not run),
    H1–H5, the regression verdict, where the report and the fragment are."""
    from fragjobs.reports.folders import DIFF_FILE, HTML_FILE

    fragment = summary.get("fragment") or {}
    gate = summary.get("gate") or {}
    line = f"fragment {fragment.get('key')}: gate {'passed' if gate.get('passed') else 'FAILED'}"
    not_run = gate.get("not_run") or []
    click.echo(line + (f" (checks that could not run: {'; '.join(not_run)})" if not_run else ""))
    for name, h in sorted((summary.get("hypotheses") or {}).items()):
        reason = f" — {h['reason']}" if h.get("reason") else ""
        click.echo(f"  {name} {h['status']:<11} {h['name']}{reason}")
    if not fragment.get("used_for_generation", True):
        click.echo(f"  generated with the full model: {fragment.get('fallback_reason')}")
    for note in summary.get("notes") or []:
        click.echo(f"  note: {note}")
    try:
        diff = json.loads((folder / DIFF_FILE).read_text())
        against = (diff.get("baseline") or {}).get("run_id") or diff.get("baseline_reason")
        click.echo(f"regression check: {diff.get('status')} ({against})")
    except (OSError, ValueError):
        pass
    status = (summary.get("report") or {}).get("status", "?")
    click.echo(f"report ({status}): {folder.resolve()}")
    click.echo(f"open:   {(folder / HTML_FILE).resolve()}")
    if fragment.get("stored_at"):
        click.echo(f"fragment stored at: {fragment['stored_at']}")


def write_farm_report(client: Any, prompt: str, knobs: Any, result: Any, root: Path | None) -> Path:
    """Write the report folder of a finished farm job (``fragjobs run --farm``)."""
    from fragjobs.reports.builder import write_run_report
    from fragjobs.reports.farm_run import farm_run_data
    from fragjobs.reports.folders import default_reports_root
    from fragjobs.storage import open_store
    from fragjobs.validation.gate import load_thresholds

    thresholds_path = getattr(client.settings, "thresholds_path", None)
    thresholds = load_thresholds(thresholds_path)
    key = result.fragment_key or (result.lineage or {}).get("fragment_key")
    data = farm_run_data(
        client.catalog,
        open_store(client.settings.resolved_storage_url),
        prompt=prompt,
        fragment_key=key,
        job_ids=result.job_ids,
        fallback_reasons=result.fallback_reasons,
        errors=result.errors,
        knobs=knobs.to_json(),
        thresholds=thresholds,
    )
    return write_run_report(
        root or default_reports_root(client.settings),
        data,
        thresholds,
        thresholds_source=str(thresholds_path or "packaged thresholds.yaml"),
    )


COMMANDS = [report]

__all__ = ["COMMANDS", "echo_run_summary", "write_farm_report"]
