"""Ledger bookkeeping per edit as the history grows: 10 000 synthetic edits, a checkpoint every 100.

    python -m benchmarks.bench_checkpoints [--edits 10000] [--every 100] [--keep 3] [--window 1000]
                                           [--dir /dev/shm] [--label NAME]

No model: each edit is a hand-made factored delta of the built-in tiny model's shapes (d = 128,
D = 512, k = 146, rank 4) going through the store's real write path on a real SQLite ledger
(WAL, synchronous=full) and real safetensors files: record_request, mark_applying, mark_applied
(the delta file written and fsynced, then the row), checkpoint_due. Every `--every` changes of
W_m a checkpoint of the live W_m is taken (and, where the store can, the older ones pruned to
`--keep`). Per window of `--window` edits it reports the mean bookkeeping time per edit (those
four calls; wall clock and this process's CPU time, the steadier one on a shared machine), `checkpoint_due` alone, the checkpoints (write + prune) amortised per edit, and the
ledger's size on disk (after a WAL checkpoint) with the bytes of its checkpoint rows. Flat in N
is the goal: the same numbers at 1 000 and at 10 000 edits.

The store lives in `--dir` (default /dev/shm, a tmpfs): its fsyncs cost nothing there, so the
figures are the ledger's own work. On a disk each edit adds the same few fsyncs (the delta file,
its directory, three commits), whatever N; on a shared VM their latency varies 10x and would hide
the trend. `--dir .` measures on the disk.

`--label` names the results file (benchmarks/results/bench_checkpoints[-LABEL].json): the figures
of the code before issue 12 were measured by running this file in a checkout of that commit.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import write_result
from memoir import EditDelta, EditResult, MemoirConfig, MemoryState, ModelIdentity
from store import Store

D_MODEL, D_FFN, RANK = 128, 512, 4
TOP_K = round(4096 / 14336 * D_FFN)


def synthetic_state() -> MemoryState:
    gen = torch.Generator().manual_seed(0)
    config = MemoirConfig(layer=2, top_k=TOP_K)
    identity = ModelIdentity("synthetic", "llama", "model.layers.2.mlp.down_proj", D_MODEL, D_FFN, 4, 100)
    return MemoryState(config, identity, torch.randperm(D_FFN, generator=gen), torch.randn(D_FFN, generator=gen),
                       ["I am"], ["unrelated"], True, torch.zeros(D_MODEL, D_FFN))


def synthetic_result(edit_id: int, gen: torch.Generator) -> EditResult:
    mask = torch.randperm(D_FFN, generator=gen)[:TOP_K].sort().values
    delta = EditDelta.from_factors(mask, torch.randn(D_MODEL, RANK, generator=gen) * 1e-3,
                                   torch.randn(TOP_K, RANK, generator=gen))
    return EditResult(edit_id, "p", "t", delta, [2.0, 0.1], 2, 0.01, "unrelated", {"rel": 1.0, "loc": 1.0})


def ledger_bytes(store: Store, root: Path) -> tuple[int, int]:
    """(ledger file size after a WAL checkpoint, bytes of the checkpoint rows' member lists)."""
    store.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    members = store.db.execute_sql("SELECT COALESCE(SUM(LENGTH(members)), 0) FROM checkpoint").fetchone()[0]
    return (root / "ledger.db").stat().st_size, int(members)


def run(edits: int, every: int, keep: int, window: int, directory: str) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    prune = None
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        root = Path(tmp) / "store"
        store = Store.open(root)
        store.create_memory("bench", synthetic_state(), "synthetic", checkpoint_every=every)
        store.writer_lock("bench")
        prune = getattr(store, "prune_checkpoints", None)
        weight = torch.zeros(D_MODEL, D_FFN)
        windows, book, book_cpu, due, ckpt = [], [], [], [], []
        started = time.perf_counter()
        for n in range(1, edits + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            edit, _ = store.record_request("bench", f"r{n}", f"prompt {n}", f"target {n}", [f"rephrase {n}"],
                                           {"subject": f"s{n}"})
            store.mark_applying(edit)
            t1, c1 = time.perf_counter(), time.process_time()
            result = synthetic_result(edit.id, gen)  # the "training": not bookkeeping
            result.delta.apply_to(weight, 1.0)
            t2, c2 = time.perf_counter(), time.process_time()
            store.mark_applied(edit, result)
            t3 = time.perf_counter()
            is_due = store.checkpoint_due("bench")
            t4, c4 = time.perf_counter(), time.process_time()
            if is_due:
                store.checkpoint("bench", weight)
                if prune is not None:
                    prune("bench", keep)
            t5 = time.perf_counter()
            book.append((t1 - t0) + (t4 - t2))
            book_cpu.append((c1 - c0) + (c4 - c2))
            due.append(t4 - t3)
            ckpt.append(t5 - t4)
            if n % window == 0:
                size, members = ledger_bytes(store, root)
                windows.append({
                    "edits": n, "bookkeeping_ms_per_edit": 1e3 * statistics.mean(book),
                    "bookkeeping_ms_median": 1e3 * statistics.median(book),
                    "bookkeeping_cpu_ms_per_edit": 1e3 * statistics.mean(book_cpu),
                    "checkpoint_due_ms": 1e3 * statistics.mean(due),
                    "checkpoints_ms_per_edit": 1e3 * statistics.mean(ckpt),
                    "ledger_bytes": size, "ledger_bytes_per_edit": size / n, "checkpoint_member_bytes": members,
                    "checkpoint_rows": len(store.checkpoints("bench")),
                    "checkpoint_files": len(list((root / "tensors" / "bench" / "checkpoints").iterdir())),
                    "elapsed_s": time.perf_counter() - started})
                print(f"{n:>6} edits: bookkeeping {windows[-1]['bookkeeping_ms_per_edit']:.2f} ms/edit "
                      f"({windows[-1]['bookkeeping_cpu_ms_per_edit']:.2f} ms CPU) "
                      f"(checkpoint_due {windows[-1]['checkpoint_due_ms']:.3f} ms, checkpoints "
                      f"{windows[-1]['checkpoints_ms_per_edit']:.3f} ms/edit), ledger {size / 1e6:.2f} MB "
                      f"({size / n:.0f} B/edit, checkpoint rows {members / 1e6:.2f} MB), "
                      f"{windows[-1]['checkpoint_rows']} checkpoints", flush=True)
                book, book_cpu, due, ckpt = [], [], [], []
        store.close()
    return {"edits": edits, "checkpoint_every": every, "keep": keep if prune is not None else None, "dir": directory,
            "shapes": {"d": D_MODEL, "D": D_FFN, "k": TOP_K, "rank": RANK}, "windows": windows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    payload = run(args.edits, args.every, args.keep, args.window, args.dir)
    path = write_result("bench_checkpoints" + (f"-{args.label}" if args.label else ""), payload)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
