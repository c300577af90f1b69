"""Metric of the memoir_zsre_gen task (lm-evaluation-harness imports it through `!function`)."""


def process_generation(doc: dict, results: list[str]) -> dict[str, float]:
    """1 when the generated answer contains the edit's target (case-insensitive), else 0."""
    return {"contains": float(doc["answer"].lower() in results[0].lower())}
