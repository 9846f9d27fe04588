"""Helpers shared by tests/verifiers/test_*.py: a hand-made rollouts artifact for scoring through the real CLI.
Imported as ``from verifier_helpers import ...`` (pytest puts this directory on sys.path for the test files in it)."""


def write_rollouts(path, items) -> None:
    """A hand-made rollouts artifact: items = [(id, completion, reference)], one group each."""
    from tokalign import artifacts
    from tokalign.rows import dumps

    rows = [{
        "id": f"{rid}#0", "prompt_id": rid, "group_id": g, "sample_idx": 0,
        "prompt": dumps([{"role": "user", "content": f"question {rid}"}]), "prompt_text": f"question {rid}",
        "prompt_ids": [1, 2, 3], "reference": dumps(ref), "completion": text,
        "completion_ids": list(range(4 + g)), "sampler_logps": [-0.5] * (4 + g), "finish_reason": "stop",
        "max_new_tokens": 64,
    } for g, (rid, text, ref) in enumerate(items)]
    with artifacts.writing(path, "rollouts", artifacts.Provenance(config={"hand_made": True})) as w:
        w.write_rows(rows)
