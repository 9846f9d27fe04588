"""`tokalign --help` and `tokalign train --help` must not import the heavy libraries."""

import subprocess
import sys

CHECK = """
import sys
from tokalign.cli.app import main
for argv in (["--help"], ["train", "--help"], ["prepare", "--help"], ["eval", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = [m for m in ("torch", "transformers", "datasets", "vllm") if m in sys.modules]
print("HEAVY=" + ",".join(heavy))
"""


def test_help_leaves_torch_unimported():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY="


def test_train_help_lists_algorithms_from_metadata():
    out = subprocess.run([sys.executable, "-m", "tokalign", "train", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("grpo", "dpo", "sft", "dr_grpo", "dapo"):
        assert name in out
