"""A module of this repository as it was at another commit, for side-by-side benchmarks."""

from __future__ import annotations

import importlib.util
import os
import subprocess


def module_at(ref: str, path: str, name: str, directory: str):
    """The file ``path`` (relative to the repository root) of commit ``ref``, written into
    ``directory`` and imported as module ``name`` (a dotted name inside a package makes its
    relative imports resolve there)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shown = subprocess.run(["git", "-C", root, "show", f"{ref}:{path}"],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"the baseline needs a git checkout with commit {ref} (pass another "
                         f"with --old-ref): {shown.stderr.strip()}")
    copy = os.path.join(directory, os.path.basename(path))
    with open(copy, "w") as f:
        f.write(shown.stdout)
    spec = importlib.util.spec_from_file_location(name, copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
