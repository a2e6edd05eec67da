"""report.md: the Stage-2 report (outputs/official.py's report.json) as Markdown tables."""

from __future__ import annotations

STAGE2_TITLES = {"global_tpe": "Global TPE", "consistency": "Consistency", "robustness": "Robustness"}


def _verdict(check: dict | None) -> str:
    if check is None:
        return "-"
    return "OK" if check["ok"] else f"short by {check['short_by']:.4f}"


def format_trial(t: dict, budget: dict) -> str:
    """Markdown tables of one retrained trial: Stage 2 against its targets, then per dataset."""
    reused = [r["dataset"] for r in t["datasets"] if r["reused"]]
    lines = [
        f"## Trial {t['trial']}",
        "",
        f"Retrained for {budget['epochs']} epochs (warm-up {budget['warmup']}) per dataset, evaluated on the "
        f"test split. Search value (validation Global TPE): {t['search_global_tpe']:.4f}."
        + (f" Reused from an earlier run ({t['state']}): {', '.join(reused)}." if reused else ""),
        "",
        "### Stage 2",
        "",
        "| metric | measured | target | result |",
        "|---|---|---|---|",
    ]
    for m, check in t["stage2"].items():
        lines.append(f"| {STAGE2_TITLES[m]} | {check['value']:.4f} | >= {check['target']:.2f} | {_verdict(check)} |")
    lines += [
        "",
        "### Per dataset",
        "",
        "| dataset | test accuracy | target | result | TPE | target | result | params | lambda |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in t["datasets"]:
        acc, tpe = r["accuracy_target"], r["tpe_target"]
        lines.append(
            f"| {r['dataset']} | {r['test_accuracy']:.4f} | {'>= %.2f' % acc['target'] if acc else '-'} | "
            f"{_verdict(acc)} | {r['local_tpe']:.4f} | {'>= %.2f' % tpe['target'] if tpe else '-'} | "
            f"{_verdict(tpe)} | {r['params']:,} | {r['lambda']:.4f} |"
        )
    lines += [
        "",
        "Parameters: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()),
        f"Seeds: train {t['seeds']['train']}, split {t['seeds']['split']}.",
        "",
    ]
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The whole report.md: where and how it was made, then one section per retrained trial."""
    sw = report["software"]
    head = [
        f"# Stage-2 report: {report['study']}",
        "",
        f"Created {report['created']} on {report['device']} ({report['device_name']}) in "
        f"{report['wall_seconds']:.0f} s. Python {sw['python']}, torch {sw['torch']}, optuna {sw['optuna']}. "
        f"Data source: {report['data']['source']}.",
        "",
    ]
    return "\n".join(head + [format_trial(t, report["budget"]) for t in report["trials"]])
