"""The bench result as a table for a terminal."""

from __future__ import annotations


def table(result: dict) -> str:
    """The plain-text report of measure()'s result."""
    c, p, cpu = result["config"], result["precision"], result["cpu"]
    m = c["model"]
    lines = [
        f"device {result['device']} ({cpu['name']}, {cpu['cores']} cores), torch {result['torch']}, "
        f"{result['threads']} threads",
        f"precision: {p['dtype']} ({p['reason']})",
    ]
    if {"train", "augment", "eval"} & set(c["sections"]):
        lines.append(
            f"model: stem {m['conv_stem']}, patch {m['patch_size']}, embed {m['embed_dim']}, depth "
            f"{m['depth']}; batch {c['batch_size']}, {c['warmup']} warm-up + {c['repeats']} x {c['steps']} "
            "steps, median of rounds"
        )
    lines += ["", f"{'figure':<46} {'value':>14}  {'precision':<9} note"]

    def row(name: str, value: str, precision: str = "", note: str = "") -> None:
        lines.append(f"{name:<46} {value:>14}  {precision:<9} {note}".rstrip())

    if "train" in result:
        _train_rows(result["train"], row)
    if "augment" in result:
        a = result["augment"]
        row("augment: batched on-device", f"{a['batched']['img_per_s']:.0f} img/s", "", f"batch {a['batch']}")
        if "speedup" in a:
            row("augment: per-image PIL", f"{a['pil']['img_per_s']:.0f} img/s")
            row("augment: speed-up", f"{a['speedup']:.1f}x", "", "target >= 10")
        else:
            row("augment: per-image PIL", "-", "", a["pil"])
    if "eval" in result:
        row("eval", f"{result['eval']['img_per_s']:.1f} img/s", result["eval"]["precision"])
    if "storage" in result:
        s = result["storage"]
        note = f"{s['procs']} processes x {s['ops_per_proc']} on {s['url']}"
        row("storage: ask+tell p50", f"{s['p50_ms']:.1f} ms", "", note)
        row("storage: ask+tell p95", f"{s['p95_ms']:.1f} ms", "", "target < 50 on local PostgreSQL, 8 processes")
    if "memory" in result:
        row(f"memory: peak ({result['memory']['kind']})", f"{result['memory']['mib']:.0f} MiB")
    if "search" in result:
        lines += ["", *_search_table(result["search"])]
    if "share" in result:
        lines += ["", *_share_table(result["share"])]
    if "procs" in result:
        lines += ["", *_procs_table(result["procs"])]
    if "ops" in result:
        lines += ["", *_ops_table(result["ops"])]
    if "round2" in result:
        lines += ["", *_round2_table(result["round2"])]
    return "\n".join(lines)


def _train_rows(t: dict, row) -> None:
    """The train section's rows: each variant's speed, and the ratios against their targets."""
    v = t["variants"]
    labels = {
        "real": "train: real step (TrainStep + BatchLoader)",
        "bare": "train: bare model step",
        "real_fp32": "train: real step at fp32",
        "real_bf16": "train: real step at bf16",
        "real_graphed": "train: real step as a CUDA graph",
        "research": "train: research-style pipeline (fp32)",
    }
    for name, fig in v.items():
        rel = v["bare"]["img_per_s"] / fig["img_per_s"]
        row(labels[name], f"{fig['img_per_s']:.1f} img/s", fig["precision"], f"{rel:.2f}x the bare step's time")
    row("train: real step cost over bare", f"{t['real_over_bare_cost']:.3f}x", "", "target <= 1.15")
    if "graphed_over_bare_cost" in t:
        row("train: graphed step cost over bare", f"{t['graphed_over_bare_cost']:.3f}x", "", "target <= 1.15")
        row("train: graphed over eager speed", f"{t['graphed_over_eager_speed']:.3f}x", "", "")
    row("train: CUDA graphs", t["graphs"], "", "")
    if "real_over_research_speed" in t:
        row(
            "train: real speed over research",
            f"{t['real_over_research_speed']:.3f}x",
            v["real"]["precision"],
            "target >= 1.25",
        )
    if "real_fp32_over_research_speed" in t:
        row(
            "train: real fp32 speed over research",
            f"{t['real_fp32_over_research_speed']:.3f}x",
            "float32",
            "same precision as the research",
        )
    if "research" in t:
        row("train: research-style pipeline", "-", "", t["research"])


def _search_table(s: dict) -> list[str]:
    wall, cpu, n = s["seconds"], s["cpu_seconds"], max(1, s["trials"])
    lines = [
        f"search: {s['trials']} trials of {s['study']} in {wall:.1f} s = {s['trials_per_minute']:.2f} trials/min "
        f"({s['precision']['dtype']}); not training steps: {100 * s['not_training']:.1f}% of the wall time, "
        f"{100 * s['not_training_cpu']:.1f}% of the CPU time (target < 10%)",
        f"  once per worker: imports {s['startup']['import_seconds']:.1f} s, storage open and attach "
        f"{s['startup']['open_and_attach_seconds']:.2f} s",
        f"  {'phase':<28} {'wall s':>8} {'share':>6} {'CPU s':>8} {'share':>6} {'CPU s/trial':>11}",
    ]
    for name, seconds in s["phases"].items():
        c = s["cpu_phases"].get(name, 0.0)
        lines.append(
            f"  {name:<28} {seconds:>8.2f} {100 * seconds / wall:>5.1f}% {c:>8.2f} {100 * c / cpu:>5.1f}% "
            f"{c / n:>11.3f}"
        )
    if "sampler" not in s["phases"]:
        lines.append("  (objective: the sampler's suggestions and the objective's own code)")
    calls = list(s["storage_calls"].items())[:5]
    if calls:
        lines.append(
            "  storage, largest (wall s / calls): "
            + ", ".join(f"{k} {v['seconds']:.2f} / {v['calls']}" for k, v in calls)
        )
    lines.append(
        f"  {'trial':>5} {'state':<9} {'wall s':>7} {'CPU s':>7} {'not training (CPU)':>19}  largest CPU phases"
    )
    for r in s["per_trial"]:
        top = sorted(r["cpu_phases"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(
            f"  {r['trial']:>5} {r['state']:<9} {r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} "
            f"{100 * r['not_training_cpu']:>18.1f}%  " + ", ".join(f"{k} {v:.2f}" for k, v in top)
        )
    return lines


def _share_table(s: dict) -> list[str]:
    lines = [
        f"share: {s['jobs']} unpruned {s['study']} trials per row on {s['cores']} cores ({s['precision']['dtype']}); "
        "on = hostshare, off = every process takes every core",
        f"  {'processes':>9} {'sharing':<8} {'trials/min':>10} {'vs 1 shared':>11} {'threads':>8} {'s/trial':>8} "
        f"{'trials/CPU-min':>14} {'load':>5}",
    ]
    for r in s["rows"]:
        lines.append(
            f"  {r['processes']:>9} {r['sharing']:<8} {r['jobs_per_minute']:>10.2f} {r['vs_one_shared']:>10.2f}x "
            f"{','.join(map(str, r['threads'])):>8} {r['job_seconds']:>8.1f} {r['jobs_per_cpu_minute']:>14.2f} "
            f"{r['load_average']:>5.1f}"
        )
    return lines


def _procs_table(s: dict) -> list[str]:
    lines = [
        f"procs: concurrent processes on one device; a job = 1 epoch of {s['images_per_job']} images at batch "
        f"{s['batch']} + 1 evaluation ({s['precision']['dtype']}); graphs: each training iteration replayed as one CUDA graph (--graphs auto)",
        f"  {'processes':>9} {'variant':<9} {'img/s':>9} {'jobs/hour':>10} {'s/job':>7}",
    ]
    for r in s["rows"]:
        lines.append(
            f"  {r['processes']:>9} {r['variant']:<9} {r['img_per_s']:>9.1f} {r['jobs_per_hour']:>10.0f} "
            f"{r['job_seconds']:>7.1f}"
        )
    return lines


def _ops_table(s: dict) -> list[str]:
    m = s["model"]

    def each(counts: list[int]) -> str:
        return "/".join(map(str, counts))

    changes = "; ".join(
        f"{name}: the research's CIFAR-10 recipe" + ("".join(f", {k} {v}" for k, v in fields.items()))
        for name, fields in s["recipe_changes"].items()
    )
    lines = [
        f"ops: aten ops dispatched per batch (a/b/c: {s['batches']} batches in a row, after {s['warmup']} uncounted); "
        f"batch {s['batch']} ({s['precision']}, eager); model: stem {m['conv_stem']}, patch {m['patch_size']}, "
        f"embed {m['embed_dim']}, depth {m['depth']}",
        f"  recipes: {changes}",
        f"  sync-prone: {', '.join(s['sync_prone_ops'])}; views launch no kernel",
        f"  {'recipe':<9} {'part':<8} {'ops':>15} {'views':>15} {'kernel ops':>15} {'sync-prone':>12} {'same ops':>8} "
        f"{'same shapes':>11} {'same args':>9}  sync-prone by op",
    ]
    for r in s["rows"]:
        by_op = ", ".join(f"{name} {each(counts)}" for name, counts in r["sync_prone_by_op"].items())
        lines.append(
            f"  {r['recipe']:<9} {r['part']:<8} {each(r['ops']):>15} {each(r['views']):>15} {each(r['kernel_ops']):>15} "
            f"{each(r['sync_prone']):>12} {'yes' if r['same_ops'] else 'no':>8} "
            f"{'yes' if r['same_shapes'] else 'no':>11} {'yes' if r['same_arguments'] else 'no':>9}  {by_op}".rstrip()
        )
    return lines


def _round2_table(s: dict) -> list[str]:
    m = s["model"]
    lines = [
        f"round2: one trial of {s['study']} at {s['scale']:g} x the real datasets' sizes (synthetic images); "
        f"one epoch per dataset timed, scaled by its stage's epochs; model: stem {m['conv_stem']}, "
        f"patch {m['patch_size']}, embed {m['embed_dim']}, depth {m['depth']}",
        f"  {'stage':>5} {'dataset':<15} {'train images':>12} {'batch':>5} {'epoch s':>8} {'img/s':>9} "
        f"{'epochs':>6} {'stage s':>8}  graphs",
    ]
    for r in s["rows"]:
        lines.append(
            f"  {r['stage']:>5} {r['dataset']:<15} {r['train_images']:>12,} {r['batch']:>5} {r['epoch_seconds']:>8.1f} "
            f"{r['img_per_s']:>9.0f} {r['epochs']:>6} {r['stage_seconds']:>8.1f}  {r['graphs']}"
        )
    hours = s["projected_search_seconds"] / 3600
    lines += [
        f"  a trial: Stage 1 {s['trial_stage1_seconds']:.0f} s, Stage 2 {s['trial_stage2_seconds']:.0f} s (if it passes)",
        f"  projected: {s['trials']} trials x (Stage 1 + {s['pass_rate']:.2f} x Stage 2) = "
        f"{s['projected_search_seconds']:,.0f} s ({hours:.2f} h), one trial at a time on this device",
    ]
    return lines
