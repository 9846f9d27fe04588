"""Model resolution and loading (transformers). The bundled tiny model is only a default path:
no code path special-cases it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tokalign.errors import UserError

BUNDLED_MODEL = Path(__file__).parent / "assets" / "tiny-arith"
_DTYPES = ("float32", "bfloat16", "float16")


def resolve_model(name: str | None) -> tuple[str, Path | None]:
    """(name-or-path to load, local dir or None for a hub id). Validates a local path exists."""
    if not name:
        return str(BUNDLED_MODEL), BUNDLED_MODEL
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"Model directory '{p}' has no config.json; pass a transformers model dir, a tokalign checkpoint or a hub id.")
        return str(p), p
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"Model '{name}' does not exist (not a local directory, not a hub id).")
    return name, None  # hub id: transformers resolves it (errors clearly when offline)


def identity(name: str) -> dict[str, Any]:
    """What a manifest records about a model: path or id and a fingerprint of its files."""
    path, local = resolve_model(name)
    out: dict[str, Any] = {"name_or_path": path}
    if local is None:
        return out
    manifest = local / "manifest.json"
    if manifest.is_file():  # a tokalign checkpoint: its manifest already fingerprints the weights
        out["checkpoint_manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
        return out
    h = hashlib.sha256()
    for f in sorted(local.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.suffix in (".json", ".jinja", ".txt") or f.stat().st_size < (64 << 20):
                h.update(f.read_bytes())
    out["files_sha256"] = h.hexdigest()
    return out


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path, _ = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"Cannot load tokenizer '{name}': {str(e).splitlines()[0]}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def context_length(name: str) -> int | None:
    """The model's context in tokens (its config's ``max_position_embeddings``), or None where the config has none."""
    from transformers import AutoConfig

    path, _ = resolve_model(name)
    try:
        value = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def load_model(name: str, dtype: str = "float32", device: str | None = None, quantization_config=None):
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise UserError(f"Unknown dtype '{dtype}'. Choose one of {', '.join(_DTYPES)}.")
    path, _ = resolve_model(name)
    try:
        extra = {"quantization_config": quantization_config, "device_map": {"": device or default_device()}} if quantization_config else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **extra)
    except OSError as e:
        raise UserError(f"Cannot load model '{name}': {str(e).splitlines()[0]}") from e
    return model if quantization_config else model.to(device or default_device())


def empty_model(name: str, dtype: str = "float32"):
    """The model's architecture on the meta device: no weights read, no memory held (sharded loading fills it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path, _ = resolve_model(name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))


def default_device() -> str:
    import torch

    return os.environ.get("TOKALIGN_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
