"""Ratios against the targets, the printed table and benchmarks/RESULTS.md, from the JSON.

``python -m benchmarks.report`` writes RESULTS.md again from results.json (the targets
read off the recorded rows), without measuring anything (nor importing TensorFlow).
"""

from __future__ import annotations

from benchmarks.common import ratio
from benchmarks.scale_report import report_lines
from benchmarks.scale_report import summarize as scale_summary


def _find(group: dict, workload: str, spe=None, kind=None, source=None, xla=None,
          defaults=True) -> list:
    out = []
    for name, r in group.items():
        if r.get("workload") != workload or (kind and r["kind"] != kind):
            continue
        if r.get("default") and not defaults:
            continue
        if spe is not None and r["steps_per_execution"] != spe:
            continue
        if source is not None and r.get("source") != source:
            continue
        if xla is not None and bool(r.get("xla")) != xla:
            continue
        out.append((name, r))
    return out


def _best(group, workload, **kw):
    found = _find(group, workload, **kw)
    return max(found, key=lambda nr: nr[1]["median"]) if found else (None, None)


KINDS = (("iterator", False), ("memory", False), ("memory", True))


def _kind(source, xla):
    return source + ("-xla" if xla else "")


def summarize(result: dict) -> tuple[dict, list]:
    """``(cases, targets)``: the ratios of each case, and each target with ``met``."""
    groups, cases, targets = result["groups"], {}, []

    def target(case, what, value, op, threshold):
        met = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        targets.append({"case": case, "target": what, "value": value, "op": op,
                        "threshold": threshold, "met": bool(met)})

    def vs_hand(case, group, workload, spe):
        ratios = {}
        for source, xla in KINDS:
            _, t = _best(group, workload, spe=spe, kind="trainer", source=source, xla=xla,
                         defaults=False)
            _, h = _best(group, workload, spe=spe, kind="hand", source=source, xla=xla)
            if t and h:
                ratios[_kind(source, xla)] = ratio(t, h)
                target(case, f"{workload} spe={spe} trainer/hand ({_kind(source, xla)})",
                       ratios[_kind(source, xla)], ">=", 0.97)
        return ratios

    a = groups.get("A")
    if a:
        case = {"per_spe": {}}
        fits, trainers = [], []
        for spe in (1, 32, 256):
            fit_name, fit = _best(a, "A", spe=spe, kind="fit")
            if not fit:
                continue
            fits.append((fit_name, fit))
            default = next((r for r in a.values() if r.get("default") and r["kind"] == "trainer"
                            and r["steps_per_execution"] == spe), None)
            entry = {"fit_best": fit_name, "fit_best_steps_per_s": fit["median"],
                     "trainer_vs_hand": vs_hand("A", a, "A", spe)}
            if default:
                entry["default_vs_fit"] = ratio(default, fit)
                target("A", f"A spe={spe} trainer default / model.fit (same spe)",
                       entry["default_vs_fit"], ">=", 1.1)
            case["per_spe"][spe] = entry
        trainers = _find(a, "A", kind="trainer")
        if fits and trainers:
            fit_name, fit = max(fits, key=lambda nr: nr[1]["median"])
            best_name, best = max(trainers, key=lambda nr: nr[1]["median"])
            case.update(fit_best=fit_name, trainer_best=best_name,
                        trainer_best_vs_fit_best=ratio(best, fit))
            target("A", "A trainer best / model.fit best", case["trainer_best_vs_fit_best"],
                   ">=", 5.0)
        cases["A"] = case
    b = groups.get("B")
    if b:
        peak = next((r for r in b.values() if r["kind"] == "peak"), None)
        case = {"trainer_vs_hand": vs_hand("B", b, "B", 32)}
        best_name, best = _best(b, "B", kind="trainer")
        _, hand = _best(b, "B", kind="hand")
        _, fit = _best(b, "B", kind="fit")
        if peak and best:
            flops = peak["gflops"]["median"] * 1e9
            case.update(peak_gflops=flops / 1e9, trainer_best=best_name,
                        trainer_share_of_peak=best["median"] * best["flops_per_step"] / flops,
                        hand_share_of_peak=hand["median"] * hand["flops_per_step"] / flops)
            target("B", "B trainer best share of matmul peak", case["trainer_share_of_peak"],
                   ">=", 0.9)
        if fit and best:
            case["trainer_best_vs_fit_best"] = ratio(best, fit)
        cases["B"] = case
    c = {}
    for group_name, base in (("A", "A"), ("B", "B")):
        group = groups.get(group_name)
        if not group:
            continue
        for suffix in ("+gp", "+gp/16"):
            w = base + suffix
            if not _find(group, w):
                continue
            entry = {"trainer_vs_hand": vs_hand("C", group, w, 32)}
            _, fit = _best(group, w, kind="fit")
            _, best = _best(group, w, kind="trainer")
            if fit and best:
                entry["trainer_best_vs_fit_best"] = ratio(best, fit)
            # The penalty's cost at the plain step's best setting (same source, same XLA).
            _, plain = _best(group, base, spe=32, kind="trainer")
            if plain:
                _, same = _best(group, w, spe=32, kind="trainer", source=plain["source"],
                                xla=bool(plain["xla"]))
                if same:
                    entry["step_time_vs_plain"] = ratio(plain, same)
                    if base == "B":
                        limit = 2.5 if suffix == "+gp" else 1.15
                        target("C", f"{w} step time / plain B step (trainer, best setting)",
                               entry["step_time_vs_plain"], "<=", limit)
            _, hplain = _best(group, base, spe=32, kind="hand", source="memory", xla=True)
            _, hsame = _best(group, w, spe=32, kind="hand", source="memory", xla=True)
            if hplain and hsame:
                entry["hand_step_time_vs_plain"] = ratio(hplain, hsame)
            c[w] = entry
    if c:
        cases["C"] = c
    d = groups.get("D")
    if d:
        none, tb, ck, health, progress = (d.get(f"D/trainer-default{s}") for s in (
            "", "+tensorboard", "+checkpoint", "+health", "+progress"))
        case = {"first_step": result.get("first_step", {})}
        # Also from each variant's best window: other processes only ever slow a window
        # down, so on a busy machine the best windows compare the undisturbed speeds.
        labels = {"tensorboard": "TensorBoard", "checkpoint": "checkpoints",
                  "health": "per-layer health", "progress": "progress line on a terminal",
                  "progress_spe1": "progress line on a terminal, one step per execution"}
        spe1, spe1_progress = d.get("D/trainer-spe1"), d.get("D/trainer-spe1+progress")
        for what, with_it, base, goal in (
                ("tensorboard", tb, none, 0.03), ("checkpoint", ck, none, 0.02),
                ("health", health, none, 0.05), ("progress", progress, none, 0.02),
                ("progress_spe1", spe1_progress, spe1, 0.03)):
            if base and with_it:
                case[f"{what}_cost"] = 1 - ratio(with_it, base)
                case[f"{what}_cost_best_windows"] = 1 - with_it["max"] / base["max"]
                label = labels[what]
                at = "" if what.endswith("spe1") else " at defaults"
                target("D", f"{label}{at}: cost", case[f"{what}_cost"], "<=", goal)
        comp, eager = d.get("D/trainer-spe32"), d.get("D/trainer-spe32-eager")
        if comp and eager:
            case["compiled_vs_eager"] = ratio(comp, eager)
        cases["D"] = case
    e = result.get("endurance")
    if e:
        case = {}
        for name, r in e["runs"].items():
            case[name] = {k: r[k] for k in ("steps", "rss_growth", "rss_mb_per_1000_steps",
                                            "late_rss_mb_per_1000_steps", "open_files_growth")}
            # Flat is the expectation; 5% leaves room for the allocator's caches settling.
            target("E", f"E {name}: RSS growth over {r['steps']:,} steps", r["rss_growth"],
                   "<=", 0.05)
            target("E", f"E {name}: open file handles growth", r["open_files_growth"], "<=", 0)
        cases["E"] = case
    f = groups.get("F")
    if f:
        cases["F"] = scale_summary(f, target)
    s = groups.get("S")
    if s:
        plain, sam = s.get("S/B/spe32/trainer-memory"), s.get("S/B+sam/spe32/trainer-memory")
        if plain and sam:
            # Two forward and backward passes per update: about twice the plain step.
            cases["S"] = {"sam_step_time_vs_plain": ratio(plain, sam)}
            target("S", "B step=sam step time / plain B step (trainer, memory)",
                   cases["S"]["sam_step_time_vs_plain"], "<=", 2.2)
    return cases, targets


def measured_groups(result: dict) -> list:
    """The groups a result holds (C is timed within A and B, D's time to first step is
    ``first_step``, E's results are ``endurance``)."""
    if "settings" in result and "groups" in result["settings"]:
        return list(result["settings"]["groups"])
    return sorted(set(result["groups"]) | ({"E"} if result.get("endurance") else set()))


def _runs(result: dict) -> list:
    """Each run that measured part of ``result``: its groups, machine, load, duration."""
    if result.get("runs"):
        return result["runs"]
    return [{"groups": measured_groups(result),
             **{k: result[k] for k in ("machine", "load_before", "load_after", "seconds",
                                       "settings")}}]


def merge(earlier: dict, later: dict) -> dict:
    """``later``'s groups added to ``earlier``'s results, replacing the groups it measured
    again (``python -m benchmarks.bench --groups F --merge``). ``runs`` lists each run
    whose results are kept: its groups, machine, load and duration."""
    measured = set(measured_groups(later))
    kept = []
    for run in _runs(earlier):
        groups = [g for g in run["groups"] if g not in measured]
        if groups:
            kept.append({**run, "groups": groups})
    merged = dict(later)
    merged["groups"] = {**{g: v for g, v in earlier["groups"].items() if g not in measured},
                        **later["groups"]}
    if "E" not in measured and earlier.get("endurance"):
        merged["endurance"] = earlier["endurance"]
    if "D" not in measured:
        merged["first_step"] = earlier.get("first_step", {})
    merged["runs"] = kept + _runs(later)
    return merged


READING = """\
### Reading the results

- *trainer/hand* compares the trainer with the minimal hand-written loop of the same kind.
  That loop computes the update and the loss; the trainer's default step also computes, every
  step, a metric (MAE or accuracy), the example-weighted sums of its logs and the global step,
  and once per execution the global gradient norm. Under XLA this work fuses into the step;
  without XLA (the iterator and in-memory kinds) each extra op costs TensorFlow's executor
  time, a few percent of a step of the tiny A model, nothing measurable on B.
  `jit_compile=auto` picks XLA for long in-memory runs.
- *share of matmul peak* divides the step's matmul FLOPs by the rate of a 2048x2048 float32
  product. The step's products are smaller and Adam's update of 1.9M parameters is
  memory-bound, so neither the hand-written loop nor `model.fit` get near 90% on this machine.
- Other processes shared the machine (see the load above); the spread column shows how much
  the windows of a variant varied. Ratios within about 10% of a goal are within that noise."""


def _fmt(value, op=None):
    if value is None:
        return "-"
    if op == "pct":
        return f"{100 * value:+.1f}%"
    return f"{value:.2f}"


def table(result: dict) -> str:
    """Every variant: median steps/s, spread, and the targets, as plain text."""
    lines = [f"{'variant':<44} {'steps/s':>10} {'spread':>7}"] if result["groups"] else []
    for group in result["groups"].values():
        for name, r in group.items():
            extra = f"  ({r['gflops']['median']:.0f} GFLOP/s)" if "gflops" in r else ""
            lines.append(f"{name:<44} {r['median']:>10,.0f} {100 * r['spread']:>6.0f}%{extra}")
    for name, r in result.get("endurance", {}).get("runs", {}).items():
        lines.append(f"E/{name}: {r['steps']:,} steps, RSS {r['start']['rss_mb']:,.0f} -> "
                     f"{r['end']['rss_mb']:,.0f} MiB ({r['rss_mb_per_1000_steps']:+.1f} MiB per "
                     f"1,000 steps), open files {r['start']['open_files']} -> "
                     f"{r['end']['open_files']}")
    lines.append("")
    for t in result["targets"]:
        mark = "met" if t["met"] else "NOT MET"
        lines.append(f"{t['target']:<60} {_fmt(t['value']):>7} {t['op']} {t['threshold']:<5}"
                     f" {mark}")
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    """benchmarks/RESULTS.md: the machine, every measurement, and the targets."""
    m, s = result["machine"], result["settings"]
    out = [
        "# Benchmark results",
        "",
        "Produced by `python -m benchmarks.bench` (this file and `benchmarks/results.json` "
        "are rewritten by each full run; `--groups F --merge` replaces one group's).",
        "",
    ]
    runs = result.get("runs") or []
    if len(runs) > 1:
        for run in runs:
            rm, rs = run["machine"], run["settings"]
            groups = f"Group{'s' if len(run['groups']) > 1 else ''} {', '.join(run['groups'])}"
            out += [f"- {groups}: {rm['cpu']}, {rm['cores']} cores; "
                    f"{rm['platform']}; Python {rm['python']}, TensorFlow {rm['tensorflow']}, "
                    f"Keras {rm['keras']}; {rs['windows']} timed windows of about "
                    f"{rs['window_seconds']} s per variant; {run['seconds'] / 60:.1f} minutes",
                    f"  - Load before: `{run['load_before']}`",
                    f"  - Load after: `{run['load_after']}`"]
        out.append("- Round robin within each group after a warm-up epoch. Steps/s are medians "
                   "over the windows; the spread is (max - min) / median. Ratios are medians "
                   "of the ratios window by window (each pair ran back to back).")
    else:
        out += [
            f"- Machine: {m['cpu']}, {m['cores']} cores; {m['platform']}",
            f"- Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}",
            f"- Load before: `{result['load_before']}`",
            f"- Load after: `{result['load_after']}`",
            f"- {s['windows']} timed windows of about {s['window_seconds']} s per variant, "
            f"round robin within each group after a warm-up epoch; "
            f"{result['seconds'] / 60:.1f} minutes in all. Steps/s are medians over the "
            "windows; the spread is (max - min) / median. Ratios are medians of the ratios "
            "window by window (each pair ran back to back)."]
    out += [
        "",
        "## Targets",
        "",
        "| case | target | value | goal | met |",
        "|---|---|---:|---:|---|",
    ]
    for t in result["targets"]:
        out.append(f"| {t['case']} | {t['target']} | {_fmt(t['value'])} | {t['op']} "
                   f"{t['threshold']} | {'yes' if t['met'] else '**no**'} |")
    out += ["", READING]
    d = result["cases"].get("D", {})
    if d:
        out += ["", "## D: overheads", ""]
        for what, label in (("tensorboard", "TensorBoard"), ("checkpoint", "Checkpointing"),
                            ("health", "Per-layer health (callbacks.health)"),
                            ("progress", "The progress line on a terminal (callbacks.progress)"),
                            ("progress_spe1", "The progress line, steps_per_execution=1,")):
            if f"{what}_cost" in d:
                out.append(f"- {label} at defaults costs "
                           f"{100 * d[f'{what}_cost']:+.1f}% of the steps/s (paired windows), "
                           f"{100 * d[f'{what}_cost_best_windows']:+.1f}% (best windows); "
                           "negative values are noise")
        if "compiled_vs_eager" in d:
            out.append(f"- Compiled / eager (A model, steps_per_execution=32): "
                       f"{d['compiled_vs_eager']:.1f}x")
        for mode, times in d.get("first_step", {}).items():
            out.append(f"- Time to first step ({mode}, `+experiment=dense`): "
                       f"{times['total_s']:.2f} s (compose {times['compose_s']:.2f} s, build "
                       f"{times['build_s']:.2f} s, first execution incl. trace "
                       f"{times['first_execution_s']:.2f} s)")
    out += _endurance_report(result.get("endurance"))
    b = result["cases"].get("B", {})
    if "peak_gflops" in b:
        out += ["", f"Matmul peak (2048x2048 float32): {b['peak_gflops']:.0f} GFLOP/s; the "
                f"trainer's best B step reaches {100 * b['trainer_share_of_peak']:.0f}% of it, "
                f"the hand-written loop {100 * b['hand_share_of_peak']:.0f}%."]
    scale = bool(result["cases"].get("F"))
    if scale:
        out += report_lines(result)  # with a table of F's variants
    out += ["", "## Every variant" + (" (F's: in its section)" if scale else ""), "",
            "| variant | steps/s (median) | min | max | spread |", "|---|---:|---:|---:|---:|"]
    for group_name, group in result["groups"].items():
        if scale and group_name == "F":
            continue
        for name, r in group.items():
            unit = f" ({r['gflops']['median']:.0f} GFLOP/s)" if "gflops" in r else ""
            out.append(f"| {name}{unit} | {r['median']:,.0f} | {r['min']:,.0f} | "
                       f"{r['max']:,.0f} | {100 * r['spread']:.0f}% |")
    out.append("")
    return "\n".join(out)


def _endurance_report(e) -> list:
    """The E section of RESULTS.md: each run's memory and file handles, start to end."""
    if not e:
        return []
    st = e["settings"]
    out = ["", "## E: endurance", "",
           f"{st['steps']:,} steps per run, steps_per_execution={st['steps_per_execution']}, "
           f"epochs of {st['epoch_steps']} steps; TensorBoard scalars every execution, "
           f"histograms and a checkpoint (max_to_keep=3) every {st['checkpoint_every']} "
           "steps, evaluation every epoch; in a child process of its own. Start: the end of "
           "the first epoch (everything traced and run once); samples after a garbage "
           "collection.",
           "",
           "| run | steps/s | RSS after 1st execution | RSS start | RSS end | growth | "
           "per 1,000 steps | second half, per 1,000 steps | open files (1st, start, end) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in e["runs"].items():
        first, start, end = r["first_execution"], r["start"], r["end"]
        out.append(f"| {name} | {r['steps_per_second']:,.0f} | {first['rss_mb']:,.0f} MiB | "
                   f"{start['rss_mb']:,.0f} MiB | {end['rss_mb']:,.0f} MiB | "
                   f"{100 * r['rss_growth']:+.1f}% | {r['rss_mb_per_1000_steps']:+.1f} MiB | "
                   f"{r['late_rss_mb_per_1000_steps']:+.1f} MiB | "
                   f"{first['open_files']}, {start['open_files']}, {end['open_files']} |")
    out += ["", "RSS (MiB) at each epoch end, by step:", ""]
    for name, r in e["runs"].items():
        out.append(f"- {name}: " + ", ".join(f"{s}: {m:,.0f}" for s, m, _ in r["samples"]))
    return out


def main(argv=None) -> None:
    import argparse
    import json
    from pathlib import Path

    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=here / "results.json")
    parser.add_argument("--markdown", type=Path, default=here / "RESULTS.md")
    args = parser.parse_args(argv)
    result = json.loads(args.json.read_text())
    result["cases"], result["targets"] = summarize(result)
    args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    args.markdown.write_text(markdown_report(result))
    print(f"wrote {args.markdown} (and the targets in {args.json})")


if __name__ == "__main__":
    main()
