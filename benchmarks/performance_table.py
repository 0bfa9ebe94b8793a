"""Markdown tables (and the issue-10 targets, met or missed) from `benchmarks/run.py` results.

    python benchmarks/performance_table.py benchmarks/results/cpu_2cores.json > /tmp/tables.md

Peers (`<results>_peers.jsonl`, from `run.py --peers` or `peers.py run --out`) are read when
present beside the results file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SYSTEM_ORDER = ("aspirin", "water1", "water2", "water4", "water8")
PEER_SYSTEMS = {"aspirin:32": "aspirin", "water:1": "water1", "water:2": "water2",
                "water:4": "water4"}


def rows_of(results: dict, kind: str) -> list[dict]:
    return [r for r in results["rows"] if r["case"]["kind"] == kind and "error" not in r]


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def inference_table(results: dict) -> tuple[str, dict]:
    cells: dict = {}
    for r in rows_of(results, "inference"):
        c = r["case"]
        if "edge_chunk" in c or "allocator" in c:  # in the memory-allocator table
            continue
        key = (c["backbone"], c["dtype"], c["system"])
        cells.setdefault(key, {"atoms": r["atoms"]})[c["variant"]] = r
    lines = ["| backbone | dtype | system | atoms | bare | e2IP | ensemble x5 | eIP | "
             "e2IP / bare | ens / e2IP | peak MB (e2IP) | MB per atom |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = {}
    for key in sorted(cells, key=lambda k: (k[0], k[1], SYSTEM_ORDER.index(k[2]))):
        v = cells[key]
        ms = {name: v[name]["ms_per_atom"] if name in v else None
              for name in ("bare", "e2ip", "ensemble5", "eip")}
        head = ms["e2ip"] / ms["bare"] if ms["e2ip"] and ms["bare"] else None
        ens = ms["ensemble5"] / ms["e2ip"] if ms["ensemble5"] and ms["e2ip"] else None
        ratios[key] = {"head": head, "ensemble": ens, **ms}
        peak = v["e2ip"]["peak_delta_mb"] if "e2ip" in v and "peak_delta_mb" in v["e2ip"] else (
            v["e2ip"].get("peak_mb") if "e2ip" in v else None)
        ratios[key]["mb_per_atom"] = peak / v["atoms"] if peak else None
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {v['atoms']:,} | "
                     + " | ".join(fmt(ms[n]) for n in ("bare", "e2ip", "ensemble5", "eip"))
                     + f" | {fmt(head)} | {fmt(ens)} | {fmt(peak)} | "
                     f"{fmt(ratios[key]['mb_per_atom'])} |")
    return "\n".join(lines), ratios


def allocator_table(results: dict) -> tuple[str, dict]:
    """PaiNN + e2IP inference: the defaults (65,536-edge chunks, glibc malloc), 16,384-edge
    chunks, and tcmalloc preloaded; returns the table and the tcmalloc ms/atom per system."""
    rows: dict[str, dict] = {}
    for r in rows_of(results, "inference"):
        c = r["case"]
        if c["backbone"] == "painn" and c["dtype"] == "float32" and c["variant"] == "e2ip":
            how = ("chunk16k" if "edge_chunk" in c else
                   "tcmalloc" if c.get("allocator") == "tcmalloc" else "default")
            rows.setdefault(c["system"], {})[how] = r
    lines = ["| system | atoms | default ms/atom | 16,384-edge chunks | tcmalloc | "
             "peak MB default | peak MB 16,384 | peak MB tcmalloc |",
             "|---|---|---|---|---|---|---|---|"]
    for system in SYSTEM_ORDER:
        v = rows.get(system, {})
        if len(v) < 2:
            continue
        atoms = next(iter(v.values()))["atoms"]

        cells = [fmt(v[h].get(key)) if h in v else "–" for key in ("ms_per_atom", "peak_delta_mb")
                 for h in ("default", "chunk16k", "tcmalloc")]
        lines.append(f"| {system} | {atoms:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines), {k: v["tcmalloc"]["ms_per_atom"] for k, v in rows.items()
                              if "tcmalloc" in v}


def simple_table(rows: list[dict], columns: list[tuple[str, str]], case_keys: list[str]) -> str:
    lines = ["| " + " | ".join(case_keys + [c[1] for c in columns]) + " |",
             "|" + "---|" * (len(case_keys) + len(columns))]
    for r in rows:
        lines.append("| " + " | ".join(str(r["case"].get(k, "")) for k in case_keys) + " | "
                     + " | ".join(fmt(r.get(c[0])) for c in columns) + " |")
    return "\n".join(lines)


def _ratios(ours, ours_default, peer) -> str:
    """'ours / peer (ours with tcmalloc / peer)'."""
    if not ours or not peer:
        return "–"
    return fmt(ours / peer) + (f" ({fmt(ours_default / peer)})" if ours_default else "")


def peers_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    args = ap.parse_args()
    results = json.loads(args.results.read_text())
    meta = results["meta"]
    print(f"Machine: {meta['cpu']} ({meta['cores']} cores), device {meta['device']}, "
          f"{meta['threads']} torch threads, torch {meta['torch']}; command: "
          f"`{meta['command']}`\n")
    print("### Inference, ms per atom (energy + forces; + every covariance for the heads)\n")
    table, ratios = inference_table(results)
    print(table)
    print("\n### Memory allocation: PaiNN + e2IP with the defaults, with 16,384-edge chunks, and "
          "with tcmalloc preloaded (ms per atom; peak MB above the model and graph)\n")
    table, default_ms = allocator_table(results)
    print(table)
    print("\n### Head overhead and ensemble cost, timed in turn in one process (float32)\n")
    print(simple_table(rows_of(results, "ratios"),
                       [("atoms", "atoms"), ("bare_ms_per_atom", "bare ms/atom"),
                        ("e2ip_ms_per_atom", "e2IP ms/atom"),
                        ("ensemble5_ms_per_atom", "ensemble x5 ms/atom"),
                        ("head_ratio", "e2IP / bare"), ("ensemble_ratio", "ensemble / e2IP")],
                       ["backbone", "system"]))
    print("\n### Training step (e2IP, float32: forward, double backward, AdamW), graph "
          "building\n")
    print(simple_table(rows_of(results, "training"), [("atoms", "atoms"),
                                                      ("ms_per_atom", "ms per atom")],
                       ["backbone", "system"]))
    print()
    print(simple_table(rows_of(results, "graph_share"),
                       [("step_ms", "step ms"), ("neighbors_and_collate_ms", "neighbours + collate ms"),
                        ("collate_ms", "collate ms"),
                        ("share_built_in_loader", "share, built per step"),
                        ("share_precomputed", "share, precomputed")],
                       ["backbone", "system"]))
    print("\n### expm forward + backward (100,000 symmetric 3x3)\n")
    print(simple_table(rows_of(results, "expm"),
                       [("ours_fixed_ms", "ours, fixed squarings ms"),
                        ("ours_dynamic_ms", "ours, squarings from data ms"),
                        ("matrix_exp_ms", "torch.linalg.matrix_exp ms"),
                        ("speedup", "speed-up")], ["dtype"]))
    print("\n### Calculator (PaiNN + e2IP, skin 1 Å) vs a bare forward on a prebuilt graph\n")
    print(simple_table(rows_of(results, "calculator"),
                       [("atoms", "atoms"), ("bare_ms", "model(graph) ms"),
                        ("calculator_ms", "calculator ms"), ("ratio", "ratio")], ["system"]))
    print("\n### torch.compile\n")
    print(simple_table(rows_of(results, "compile_inference"),
                       [("atoms", "atoms"), ("eager_ms_per_atom", "eager ms/atom"),
                        ("compiled_ms_per_atom", "compiled ms/atom"), ("speedup", "speed-up"),
                        ("compile_seconds", "compile s")], ["backbone", "system"]))
    print()
    print(simple_table(rows_of(results, "compile_training"),
                       [("atoms", "atoms"), ("eager_ms", "eager step ms"),
                        ("compiled_ms", "compiled step ms"), ("speedup", "speed-up"),
                        ("compile_seconds", "compile s")], ["backbone", "system"]))
    peers = peers_rows(args.results.with_name(args.results.stem + "_peers.jsonl"))
    if peers:
        print("\n### Peers, ms per atom (energy + forces, float32)\n")
        print("Ours with the defaults (glibc malloc, like the peers), and in brackets with tcmalloc "
              "preloaded.\n")
        print("| system | atoms | e2ip PaiNN (bare) | e2ip PaiNN + e2IP | NequIP | MACE | "
              "ours / NequIP | ours / MACE |")
        print("|---|---|---|---|---|---|---|---|")
        for peer_system, system in PEER_SYSTEMS.items():
            by_code = {p["code"]: p for p in peers if p.get("structure") == peer_system
                       and "ms_per_atom" in p}
            ours = ratios.get(("painn", "float32", system), {})
            if not by_code or not ours:
                continue
            nequip = by_code.get("nequip", {}).get("ms_per_atom")
            mace = by_code.get("mace", {}).get("ms_per_atom")
            e2, e2_default = ours.get("e2ip"), default_ms.get(system)

            e2_cell = fmt(e2) + (f" ({fmt(e2_default)})" if e2_default else "")
            print(f"| {system} | {by_code[next(iter(by_code))].get('atoms')} | "
                  f"{fmt(ours.get('bare'))} | {e2_cell} | {fmt(nequip)} | {fmt(mace)} | "
                  f"{_ratios(e2, e2_default, nequip)} | {_ratios(e2, e2_default, mace)} |")


if __name__ == "__main__":
    main()
