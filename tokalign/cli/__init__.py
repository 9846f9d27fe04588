"""Typer CLI. Nothing here imports torch, transformers, datasets or vllm at module level."""
