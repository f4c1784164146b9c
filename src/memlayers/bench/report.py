"""Readable tables of ``memlayers bench`` results (markdown, as pasted into RESULTS.md)."""

from __future__ import annotations

from memlayers.bench.timing import format_table


def _bag(r: dict) -> str:
    rows = [
        {"impl": name, "fwd ms": r[f"{name}_fwd_ms"], "fwd+bwd ms": r[f"{name}_fwd_bwd_ms"], "fwd+bwd / fwd": r[f"{name}_ratio"]}
        for name in ("torch", "ours")
    ]
    shape = r["shape"]
    head = (f"(a) embedding bag, {shape['n_rows']:,} x {shape['dim']} {shape['dtype']}, "
            f"{shape['bags']:,} bags of {shape['bag_size']} (backend {r['backend']})")
    tail = (f"ours fwd+bwd / fwd = {r['ours_ratio']:.2f} (target <= {r['target_ratio']:.0f}: "
            f"{'met' if r['meets_target'] else 'missed'}); fwd+bwd {r['speedup_fwd_bwd_vs_torch']:.1f}x faster than torch; "
            f"with every touched row's gradient written out: {r['ours_fwd_bwd_rows_written_ms']:.0f} ms")
    return "\n".join([head, "", format_table(rows, list(rows[0])), "", tail])


def _step(r: dict) -> str:
    shape = r["shape"]
    rows = [
        {"value optimizer": name, f"{shape['small_keys']}^2 ms": o["small_ms"], f"{shape['large_keys']}^2 ms": o["large_ms"],
         "ratio (quartiles)": f"{o['ratio']:.3g} ({o['ratio_quartiles'][0]:.3g}-{o['ratio_quartiles'][1]:.3g})",
         "values-only ratio": o["values_ratio"],
         "rows touched": f"{o['touched_rows_small']:,} / {o['touched_rows_large']:,}",
         "values-only us/row": f"{1e3 * o['values_small_ms'] / o['touched_rows_small']:.2f} / "
                               f"{1e3 * o['values_large_ms'] / o['touched_rows_large']:.2f}",
         "large vs adamw": o.get("large_speedup_vs_adamw", float("nan"))}
        for name, o in r["optimizers"].items()
    ]
    head = (f"(b) memory layer training step, dim {shape['dim']}, {shape['tokens']} tokens, "
            f"{shape['heads']} heads x knn {shape['knn']} (target ratio <= {r['target_ratio']})")
    return "\n".join([head, "", format_table(rows, list(rows[0]))])


def _memory(r: dict) -> str:
    shape = r["shape"]
    rows = [
        {"case": c["name"], "bytes / value param": c["bytes_per_param"], "table bytes": c["table_bytes_per_param"],
         "target": c["target"] if c["target"] is not None else "-", "met": {None: "-", True: "yes", False: "no"}[c["meets_target"]]}
        for c in r["cases"]
    ]
    head = (f"(c) peak memory while training a {shape['n_rows']:,} x {shape['dim']} table, "
            f"{shape['bags']:,} bags of {shape['bag_size']} per step "
            f"({r['cases'][0]['rows_touched_per_step']:.0%} of rows touched per step)")
    return "\n".join([head, "", format_table(rows, list(rows[0]))])


def _bandwidth(r: dict) -> str:
    if "skipped" in r:
        return f"(d) bandwidth: skipped ({r['skipped']})"
    rows = [
        {"kernel": k, "ms": r[f"{k}_ms"], "GB/s": r[f"{k}_gb_s"], "of copy bandwidth": r[f"{k}_fraction_of_copy"]}
        for k in r["kernels"]
    ]
    head = f"(d) bandwidth, copy {r['copy_bandwidth_gb_s']:.0f} GB/s (target >= {r['target_fraction']:.0%})"
    return "\n".join([head, "", format_table(rows, list(rows[0]))])


def _search(r: dict) -> str:
    shape = r["shape"]
    rows = [
        {"slots": f"{c['n_keys']}^2", "fast backend": c["fast_backend"],
         "select fwd ms (ref / fast)": f"{c['reference_select_fwd_ms']:.1f} / {c['fast_select_fwd_ms']:.1f}",
         "select fwd+bwd ms": f"{c['reference_select_fwd_bwd_ms']:.1f} / {c['fast_select_fwd_bwd_ms']:.1f}",
         "search fwd+bwd ms": f"{c['reference_search_fwd_bwd_ms']:.1f} / {c['fast_search_fwd_bwd_ms']:.1f}",
         "speedup select / search": f"{c['select_fwd_bwd_speedup']:.2f}x / {c['search_fwd_bwd_speedup']:.2f}x"}
        for c in r["cases"]
    ]
    head = (f"(e) product-key search, {shape['tokens']:,} tokens, dim {shape['dim']}, {shape['heads']} heads x "
            f"knn {shape['knn']}, k_dim {shape['k_dim']}: the torch reference against the fast backend")
    return "\n".join([head, "", format_table(rows, list(rows[0]))])


def _lm(r: dict) -> str:
    rows = [
        {"setting": s["name"], "kind": kind, "run": k["run"], "FLOPs vs dense": k["flops_vs_dense"],
         "tokens/s": f"{k['tokens_per_s']:,.0f}", "vs dense (quartiles)": f"{k['vs_dense']:.3g} ({k['vs_dense_quartiles'][0]:.3g}-{k['vs_dense_quartiles'][1]:.3g})",
         "target": f">= {r['targets'][kind]}" if kind in r["targets"] else "-",
         "met": {None: "-", True: "yes", False: "no"}[k["meets_target"]]}
        for s in r["settings"] for kind, k in s["kinds"].items()
    ]
    head = "(f) LM training step (forward, backward, clipping, update), tokens/s against the dense LM at equal FLOPs"
    return "\n".join([head, "", format_table(rows, list(rows[0]))])


def _inference(r: dict) -> str:
    rows = [
        {"variant": v["variant"], "checkpoint MiB": v["checkpoint_bytes"] / 2**20, "load s": v["load_s"],
         "first token ms": 1e3 * v["ttft_s"], "decode tokens/s": f"{v['decode_tokens_per_s']:,.0f}",
         "vs dense": v["decode_vs_dense"], "resident MiB (loaded / after)":
             f"{v['rss_loaded'] / 2**20:,.0f} / {v['rss_after'] / 2**20:,.0f}"}
        for v in r["variants"]
    ]
    shape = r["shape"]
    head = (f"(g) generation on the CPU ({shape['threads']} thread), prompt {shape['prompt_tokens']} + "
            f"{shape['new_tokens']} new tokens, memory at {r['flops_vs_dense']:.2f}x dense FLOPs "
            f"(target: decode >= {r['target']}x dense: {'met' if r['meets_target'] else 'missed'})")
    return "\n".join([head, "", format_table(rows, list(rows[0]))])


def render(results: dict) -> str:
    """All benchmark sections of ``results`` as markdown."""
    env = results["environment"]
    parts = [f"memlayers bench, {env['date']}, {env['device']}, torch {env['torch']}" + (" (quick shapes)" if results["quick"] else "")]
    for key, fn in (("bag", _bag), ("step", _step), ("memory", _memory), ("bandwidth", _bandwidth),
                    ("search", _search), ("lm", _lm), ("inference", _inference)):
        if key in results:
            parts.append(fn(results[key]))
    return "\n\n".join(parts)
