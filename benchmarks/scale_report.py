"""Group F's case and its section of RESULTS.md, read off its rows (``benchmarks/scale.py``
measures them): ``report.py`` calls ``summarize`` for the targets and ``report_lines`` for
the section. No TensorFlow here: ``python -m benchmarks.report`` rewrites RESULTS.md
without it.
"""

from __future__ import annotations

from benchmarks.common import cpu_flags, ratio

#: The variants' names and the report share it: batch 256 * ACCUMULATE in micro-batches.
ACCUMULATE = 4


def _ratio(a, b):
    return ratio(a, b) if a and b else None


def _by(group: dict, prefix: str, suffix: str):
    """The row of ``group`` whose name starts with ``prefix`` and ends with ``suffix``."""
    return next((r for name, r in group.items()
                 if name.startswith(prefix) and name.endswith(suffix)), None)


def summarize(group: dict, target) -> dict:
    """Group F's case, calling ``target(case, what, value, op, threshold)`` for each target."""
    case = {"cpu_avx512_bf16": "avx512_bf16" in cpu_flags()}
    fp32, bf16, hand, hand32, fp16 = (
        _by(group, "F/precision/", s) for s in ("/trainer-memory", "/trainer-memory-bf16",
                                                "/hand-memory-bf16", "/hand-memory",
                                                "/trainer-memory-fp16"))
    case["bf16_vs_fp32"] = _ratio(bf16, fp32)
    case["bf16_trainer_vs_hand"] = _ratio(bf16, hand)
    case["hand_bf16_vs_fp32"] = _ratio(hand, hand32)
    case["fp32_trainer_vs_hand"] = _ratio(fp32, hand32)
    case["fp16_vs_fp32"] = _ratio(fp16, fp32)
    target("F", "B mixed_bfloat16 / float32 (trainer, memory)", case["bf16_vs_fp32"], ">=", 1.4)
    target("F", "B mixed_bfloat16 trainer/hand (memory)", case["bf16_trainer_vs_hand"], ">=",
           0.95)
    memory, iterator, shards = (_by(group, "F/streaming/", s) for s in (
        "/trainer-memory", "/trainer-iterator", "/trainer-tfrecord"))
    case["tfrecord_vs_memory"] = _ratio(shards, memory)
    case["tfrecord_vs_iterator"] = _ratio(shards, iterator)
    case["iterator_vs_memory"] = _ratio(iterator, memory)
    target("F", "B TFRecord shards / memory (trainer)", case["tfrecord_vs_memory"], ">=", 0.9)
    target("F", "B TFRecord shards / tf.data iterator (trainer)", case["tfrecord_vs_iterator"],
           ">=", 0.9)
    plain = _by(group, "F/accumulation/B/", "/trainer-memory")
    accum = _by(group, f"F/accumulation/B-accum{ACCUMULATE}/", "/trainer-memory")
    case["accumulate_micro_vs_plain"] = _ratio(accum, plain)
    target("F", f"B accumulate_steps={ACCUMULATE}: micro-batches/s / plain steps/s",
           case["accumulate_micro_vs_plain"], ">=", 0.95)
    one, two = (_by(group, "F/mirrored/", s) for s in ("/trainer-memory-1device",
                                                       "/trainer-memory-mirrored2"))
    case["mirrored2_vs_one_device"] = _ratio(two, one)
    auto = {}
    labels = sorted({n.split("/")[2] for n in group if n.startswith("F/auto/")})
    for label in labels:
        rows = {k: group.get(f"F/auto/{label}/jit-{k}") for k in ("false", "true", "auto")}
        if not all(rows.values()):
            continue
        faster = "true" if rows["true"]["median"] > rows["false"]["median"] else "false"
        entry = {
            "steps_per_s": {k: r["median"] for k, r in rows.items()},
            "xla_vs_no_xla": _ratio(rows["true"], rows["false"]),
            "faster_fixed": faster,
            "auto_chose": "true" if rows["auto"]["xla"] else "false",
            "auto_vs_faster": _ratio(rows["auto"], rows[faster]),
            "calibration_ms_per_step": rows["auto"].get("calibration_ms_per_step"),
            "cpu_ms_per_step": {k: r.get("cpu_ms_per_step_median") for k, r in rows.items()},
        }
        auto[label] = entry
        target("F", f"jit_compile=auto / faster fixed ({label}; auto chose "
               f"{'XLA' if entry['auto_chose'] == 'true' else 'no XLA'})",
               entry["auto_vs_faster"], ">=", 0.95)
    case["auto"] = auto
    return case


READING = """\
Reading F:

- bf16: the matmuls run about twice as fast in bfloat16 on this CPU (avx512_bf16), while
  Adam's float32 update of the 1.9M parameters, memory-bound and about a quarter of the
  float32 step, does not change; the hand-written loop gains what the trainer gains.
  float16 has no fast CPU kernels (and pays the loss scale's checks).
- TFRecord: reading, shuffling and parsing 256 records costs about 1.2 ms of CPU per batch
  (the in-memory arrays through tf.data: about 0.15 ms), taken from the two cores the
  step's matmuls use: the CPU column shows the difference per step.
- Accumulation: the micro-batches can outrun plain steps, because the optimizer's update
  runs once per 4 micro-batches.
- Mirrored: two replicas on two cores split each product in two and add an all-reduce of
  the gradients, where one device already used both cores.
- `jit_compile=auto` times executions inside one epoch (at most 100 steps, the epoch's
  full batches); per-epoch costs (the evaluation, the short last batch's separate call)
  are not in that measurement and weigh most on short epochs such as the digits' 23."""


def report_lines(result: dict) -> list:
    """The F section of RESULTS.md."""
    f = result["cases"].get("F")
    if not f:
        return []

    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    out = ["", "## F: scale", "",
           "B (MLP 784-1024-1024-10, batch 256, `steps_per_execution=32`, in memory, no XLA) "
           "unless said otherwise. Each subgroup (the prefix after `F/`) is timed round robin "
           "on its own with its own float32 baseline, in twice the windows of half the "
           "length (the same time, twice the back-to-back pairs); ratios are medians of the "
           "paired windows' ratios.", "",
           f"- Precision (this CPU {'has' if f['cpu_avx512_bf16'] else 'lacks'} avx512_bf16): "
           f"mixed_bfloat16 / float32 {fmt(f['bf16_vs_fp32'])} (the hand-written loop's: "
           f"{fmt(f['hand_bf16_vs_fp32'])}), trainer / hand-written loop "
           f"{fmt(f['bf16_trainer_vs_hand'])} in bf16, {fmt(f['fp32_trainer_vs_hand'])} in "
           f"float32; mixed_float16 / float32 {fmt(f['fp16_vs_fp32'])} (no float16 matmul "
           "kernels of use on CPU: no target)",
           f"- TFRecord shards (8 on local disk, shuffle buffer 10,000): / in memory (fused) "
           f"{fmt(f['tfrecord_vs_memory'])}, / the arrays through tf.data (iterator) "
           f"{fmt(f['tfrecord_vs_iterator'])}; iterator / in memory "
           f"{fmt(f['iterator_vs_memory'])}",
           f"- accumulate_steps={ACCUMULATE} at batch {256 * ACCUMULATE} (micro-batches of 256) "
           f"/ batch 256: {fmt(f['accumulate_micro_vs_plain'])} in micro-batches per second",
           f"- Mirrored over 2 logical CPUs / one device (in a child process): "
           f"{fmt(f['mirrored2_vs_one_device'])} (2 cores: no gain expected, no target)",
           "", READING,
           "", "`jit_compile=auto` (dense: the dense experiment's model and batch size on "
           "random data of the digits' size; B-bf16: B under mixed_bfloat16):", "",
           "| model | steps/s: false | true | auto | auto chose | faster fixed | auto / "
           "faster | true / false | CPU ms/step: false, true | calibration ms/step: "
           "XLA, no XLA |",
           "|---|---:|---:|---:|---|---|---:|---:|---|---|"]
    for label, e in f["auto"].items():
        s, cal = e["steps_per_s"], e.get("calibration_ms_per_step") or {}
        cpu = e.get("cpu_ms_per_step") or {}
        timing = f"{cal['xla']:.3f}, {cal['no_xla']:.3f}" if cal else "-"
        cpus = (f"{cpu['false']:.3f}, {cpu['true']:.3f}" if cpu.get("false") and cpu.get("true")
                else "-")
        out.append(f"| {label} | {s['false']:,.0f} | {s['true']:,.0f} | {s['auto']:,.0f} | "
                   f"{e['auto_chose']} | {e['faster_fixed']} | {fmt(e['auto_vs_faster'])} | "
                   f"{fmt(e['xla_vs_no_xla'])} | {cpus} | {timing} |")
    rows = result.get("groups", {}).get("F", {})
    if rows:
        out += ["", "Every F variant, with the process's CPU time per step (all threads; "
                "other processes stretch a window's wall time, hardly its CPU time):", "",
                "| variant | steps/s (median) | min | max | spread | CPU ms per step (median) |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            cpu = r.get("cpu_ms_per_step_median")
            unit = " (micro-batches)" if r.get("unit") == "micro-batches" else ""
            out.append(f"| {name}{unit} | {r['median']:,.1f} | {r['min']:,.1f} | "
                       f"{r['max']:,.1f} | {100 * r['spread']:.0f}% | "
                       f"{'-' if cpu is None else f'{cpu:.2f}'} |")
    return out
