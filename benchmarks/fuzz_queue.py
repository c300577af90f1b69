"""Envelope-level fuzzing of a real worker at full size, recorded in RELIABILITY.md.

The same code as `tests/reliability/test_poison.py::test_fuzzed_queue_items_never_stop_the_worker`
(tests/reliability/poison.py), with more and bigger batches: hypothesis generates each batch of
queue items (random headers, properties, bodies, content types and encodings, non-JSON bytes,
invalid UTF-8, nesting up to 200 000 levels, items up to 1.5 MB), which is pushed raw onto the
memory's queue of one `memoir worker` (private redis-server, temporary store). After each batch:
every item ran or was parked in `memoir.<name>.dead`, the worker is alive and never logged an
unrecoverable error or a stop, and `memoir ledger verify` passes.

    python -m benchmarks.fuzz_queue                          # full size: 25 batches of 40 items
    python -m benchmarks.fuzz_queue --batches 3 --items 10   # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("MEMOIR_CACHE", str(REPO / ".cache" / "memoir"))

from hypothesis import HealthCheck, given, seed, settings, strategies as st  # noqa: E402
from reliability.poison import Stack, items, run_batch  # noqa: E402

from benchmarks.common import write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=25)
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fuzz-queue-") as root:
        stack = Stack(Path(root), checkpoint_every=5).start()
        started = time.monotonic()

        @settings(max_examples=args.batches, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(batch=st.lists(items(), min_size=args.items, max_size=args.items))
        def fuzz(batch: list[bytes]) -> None:
            result = run_batch(stack, batch)
            results.append(result.to_dict())
            print(f"[{time.strftime('%H:%M:%S')}] batch {len(results)}: {result.ran} ran, {result.parked} parked, "
                  f"{len(result.unaccounted)} unaccounted, worker alive {result.worker_alive}, verify "
                  f"{result.verify_ok}, {result.seconds} s", file=sys.stderr, flush=True)
            assert result.ok(), result.to_dict()

        try:
            seed(args.seed)(fuzz)()
            failure = None
        except AssertionError as exc:
            failure = str(exc)[:4000]
        finally:
            seconds = time.monotonic() - started
            reasons = Counter(e["reason"].split(":")[1].strip() if ":" in e["reason"] else e["reason"]
                              for e in stack.dead())
            stack.close()
    total = sum(r["items"] for r in results)
    summary = {
        "batches": len(results), "items": total, "ran": sum(r["ran"] for r in results),
        "parked": sum(r["parked"] for r in results),
        "unaccounted": sum(len(r["unaccounted"]) for r in results),
        "worker_deaths": sum(not r["worker_alive"] for r in results),
        "verify_failures": sum(not r["verify_ok"] for r in results),
        "failure": failure, "seconds": round(seconds, 1),
        "items_per_s": round(total / seconds, 2) if seconds else None,
        "parked_by_reason": dict(reasons.most_common(15)),
        "args": vars(args),
    }
    write_result("fuzz_queue", {"summary": summary, "batches": results})
    print({k: v for k, v in summary.items() if k != "parked_by_reason"})
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
