"""Loader for the shipped offline task files (used by the llmprune_* YAMLs beside this file).

lm-eval passes `custom_dataset` the task's metadata and dataset_kwargs as keyword arguments. A file
name in `data_files` is looked up in `tasks_dir` (set through TaskManager metadata by
llmprune.eval.zeroshot) or, by default, in this folder: lm-eval's own `dataset_path: json` would
resolve it against the working directory instead, which breaks once the package is installed.
"""
from __future__ import annotations

from pathlib import Path


def load_local(data_files: str, tasks_dir: str | None = None, **_meta):
    """Read one .jsonl (json builder) or .tsv (csv builder, tab-separated) file as a "test" split."""
    import csv

    import datasets

    path = Path(tasks_dir or Path(__file__).parent) / data_files
    if not path.is_file():
        raise FileNotFoundError(f"offline task file {path} is missing")
    if path.suffix == ".tsv":
        # QUOTE_NONE: RTE sentences contain bare double quotes that must stay part of the text.
        return datasets.load_dataset("csv", data_files={"test": str(path)}, sep="\t", quoting=csv.QUOTE_NONE)
    return datasets.load_dataset("json", data_files={"test": str(path)})
