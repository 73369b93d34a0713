"""Attribute a Hugging Face language model from local files: build an index, query it.

    attr = grass.hf.build("model_dir", "train.jsonl", "index")      # the `grass build` command
    hits = grass.hf.query("index", texts=["a generated output"])     # the `grass query` command

``model_dir`` is a ``save_pretrained`` directory of a causal LM with its tokenizer beside it.
Documents are read from a jsonl, json (a list of objects), parquet or txt (one document per line)
file, or a ``datasets.save_to_disk`` folder, from the field ``text`` or from a prompt and a
completion field (only the completion's tokens count). Nothing is downloaded.

An index directory holds ``grass.json`` (how it was built: model directory, data path and the
SHA-256 of its bytes, fields, tokenisation, compressor, curvature) and ``store/``, the gradient
store with its curvature. A rerun of a build with the same settings resumes the store; a changed
data file or setting is refused, naming what differs. Queries read the training text of their hits
from the recorded data file and refuse it if its bytes changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from . import compressors, distributed
from .attributor import DEFAULT_DAMPING, Attributor
from .curvature import HESSIANS
from .store import write_atomic
from .tasks import CausalLM, PromptCompletion

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPRESSORS = {name.lower(): name for name in
               ("FactGraSS", "LoGra", "FactSJLT", "GraSS", "SJLT", "RandomMask", "Gaussian",
                "Identity")}
MANIFEST = "grass.json"
# Settings that may change between a build and its resumed rerun: they do not change the rows.
RERUN_FREE = ("batch_size",)


@dataclasses.dataclass
class BuildOptions:
    """How an index is built; every field is recorded in the index's grass.json."""

    text_field: str = "text"
    prompt_field: str | None = None
    completion_field: str | None = None
    max_length: int = 512
    truncate: bool = True
    dtype: str = "fp32"
    compressor: str = "factgrass"
    k: int = 4096
    layers: list[str] | None = None
    hessian: str = "efim"
    damping: float = DEFAULT_DAMPING
    store_dtype: str = "fp32"
    batch_size: int = 8
    seed: int = 0

    def check(self) -> None:
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ValueError("prompt_field and completion_field go together: give both or neither")
        for name, table in (("dtype", DTYPES), ("store_dtype", STORE_DTYPES),
                            ("compressor", COMPRESSORS)):
            if getattr(self, name) not in table:
                raise ValueError(f"{name} must be one of {sorted(table)}; got "
                                 f"{getattr(self, name)!r}")
        if self.hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {HESSIANS}; got {self.hessian!r}")
        for name in ("max_length", "k", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")

    def make_compressor(self) -> compressors.Compressor:
        cls = getattr(compressors, COMPRESSORS[self.compressor])
        return cls() if cls is compressors.Identity else cls(k=self.k)

    def loss_fn(self):
        return CausalLM() if self.prompt_field is None else PromptCompletion()


# -- files -------------------------------------------------------------------------------------
def fingerprint(path: str) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    for name in files:
        digest.update(os.path.relpath(name, path).encode() + b"\x00")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_documents(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a jsonl / json / parquet / txt file or a save_to_disk folder, in order."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"data {path!r} does not exist")
    if os.path.isdir(path):
        import datasets

        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise ValueError(f"data folder {path!r} is not a datasets.save_to_disk folder: {e}"
                             ) from None
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"data folder {path!r} holds splits {list(loaded)}: pass the folder "
                             "of one split")
        rows = loaded.to_list()
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            rows = [_json_line(line, path, i) for i, line in enumerate(f) if line.strip()]
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f"data {path!r} must hold a JSON list of objects")
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            rows = [{"text": line.rstrip("\n")} for line in f if line.strip()]
    else:
        raise ValueError(f"data {path!r} must be a .jsonl, .json, .parquet or .txt file or a "
                         "datasets.save_to_disk folder")
    if not rows:
        raise ValueError(f"data {path!r} holds no documents")
    return rows


def _json_line(line: str, path: str, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"data {path!r} line {number + 1} is not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"data {path!r} line {number + 1} is not a JSON object")
    return record


def _fields(options: BuildOptions) -> list[str]:
    if options.prompt_field is None:
        return [options.text_field]
    return [options.prompt_field, options.completion_field]


def document_texts(rows: Sequence[dict], options: BuildOptions, path: str) -> list[list[str]]:
    """Per document the strings of its fields (text, or prompt and completion)."""
    fields = _fields(options)
    out = []
    for i, row in enumerate(rows):
        values = [row.get(f) if isinstance(row, dict) else None for f in fields]
        for field, value in zip(fields, values):
            if not isinstance(value, str):
                have = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(
                    f"data {path!r} record {i} has no text field {field!r} (it has {have}); "
                    "name the field with --text-field, or --prompt-field and --completion-field")
        out.append(values)
    return out


def load_model(model_dir: str | os.PathLike, dtype: str = "fp32"):
    """(model in eval mode, tokenizer) from a local save_pretrained directory."""
    import transformers

    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"model {model_dir!r} is not a save_pretrained model directory "
                         "(no config.json)")
    if not any(os.path.isfile(os.path.join(model_dir, f))
               for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"model {model_dir!r} has no tokenizer (no tokenizer.json or "
                         "tokenizer_config.json): save it beside the model with "
                         "tokenizer.save_pretrained(DIR)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=DTYPES[dtype], local_files_only=True)
    return model.eval(), tokenizer


def tokenise(tokenizer, texts: list[list[str]], options: BuildOptions, *, progress=True):
    """A datasets.Dataset of input_ids (and completion_mask) per document, in order."""
    import datasets

    ids, completion = [], []
    for i, parts in enumerate(tqdm(texts, desc="tokenise", unit="doc", disable=not progress)):
        if len(parts) == 1:
            row = tokenizer(parts[0])["input_ids"]
            marks = None
        else:
            prompt = tokenizer(parts[0])["input_ids"]
            answer = tokenizer(parts[1], add_special_tokens=False)["input_ids"]
            row, marks = prompt + answer, [0] * len(prompt) + [1] * len(answer)
        if len(row) > options.max_length:
            if not options.truncate:
                raise ValueError(f"document {i} has {len(row)} tokens, more than max_length="
                                 f"{options.max_length}; raise it or allow truncation")
            row = row[:options.max_length]
            marks = None if marks is None else marks[:options.max_length]
        if not row:
            raise ValueError(f"document {i} has no tokens")
        ids.append(row)
        completion.append(marks)
    columns = {"input_ids": ids}
    if options.prompt_field is not None:
        columns["completion_mask"] = completion
    return datasets.Dataset.from_dict(columns)


def init_distributed() -> None:
    """Join the torchrun process group when launched with WORLD_SIZE > 1 (gloo on the CPU,
    nccl on GPUs); without torchrun nothing happens."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        distributed.init_torchrun()  # restart-safe under torchrun --max-restarts


# -- build -------------------------------------------------------------------------------------
def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _check_rerun(index: str, recorded: dict, wanted: dict) -> None:
    differ = sorted(k for k in recorded.keys() | wanted.keys()
                    if k not in RERUN_FREE and recorded.get(k) != wanted.get(k))
    if differ:
        details = "; ".join(f"{k}: index has {recorded.get(k)!r}, requested {wanted.get(k)!r}"
                            for k in differ)
        raise ValueError(f"the index {index!r} was built differently ({details}); use a new "
                         "--out or delete it")


def build(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
          progress: bool = True, **options) -> Attributor:
    """Build (or resume) the index ``out`` of the documents in ``data`` for the model in
    ``model_dir``; ``options`` are BuildOptions fields. Returns the Attributor over the index."""
    opts = BuildOptions(**options)
    opts.check()
    model_dir, data, out = (os.path.abspath(os.fspath(p)) for p in (model_dir, data, out))
    texts = document_texts(read_documents(data), opts, data)
    model, tokenizer = load_model(model_dir, opts.dtype)
    manifest = {"model": model_dir, "data": data, "data_sha256": fingerprint(data),
                "documents": len(texts), **dataclasses.asdict(opts)}
    path = os.path.join(out, MANIFEST)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            _check_rerun(out, json.load(f), manifest)
    elif os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"--out {out!r} exists, is not empty and is not a grass index")
    rows = tokenise(tokenizer, texts, opts, progress=progress)
    device = _device()
    attr = Attributor(model.to(device), opts.loss_fn(), opts.make_compressor(),
                      layers=opts.layers, hessian=opts.hessian, damping=opts.damping,
                      store=os.path.join(out, "store"), batch_size=opts.batch_size,
                      seed=opts.seed, device=device, store_dtype=STORE_DTYPES[opts.store_dtype],
                      progress=progress)
    if not os.path.exists(path) and (not distributed.active() or
                                     torch.distributed.get_rank() == 0):
        os.makedirs(out, exist_ok=True)
        write_atomic(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    attr.cache(rows)
    return attr


# -- query -------------------------------------------------------------------------------------
def open_index(index: str | os.PathLike, model_dir: str | None = None, *, progress=True):
    """(Attributor over the index, its BuildOptions, its manifest, its training documents).

    model_dir: the model to score with (default: the one recorded); a model that differs from the
    one the index was built with is refused, naming what differs.
    """
    index = os.fspath(index)
    path = os.path.join(index, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{index!r} is not a grass index (no {MANIFEST}): build it with "
                         "`grass build`")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    opts = BuildOptions(**{f.name: manifest[f.name] for f in dataclasses.fields(BuildOptions)})
    data = manifest["data"]
    if not os.path.exists(data) or fingerprint(data) != manifest["data_sha256"]:
        raise ValueError(f"the training data {data!r} of index {index!r} is missing or changed "
                         "since the build (its SHA-256 differs): hits could not be shown with "
                         "their text; restore the file or rebuild the index")
    model, tokenizer = load_model(model_dir or manifest["model"], opts.dtype)
    device = _device()
    attr = Attributor.load(os.path.join(index, "store"), model.to(device), opts.loss_fn(),
                           batch_size=opts.batch_size, device=device, progress=progress)
    documents = document_texts(read_documents(data), opts, data)
    return attr, opts, tokenizer, documents


def query(index: str | os.PathLike, *, texts: Sequence[str] | None = None,
          data: str | os.PathLike | None = None, top: int = 10, aggregate: str | None = None,
          unit_normalize: bool = False, model_dir: str | None = None,
          progress: bool = True) -> list[dict[str, Any]]:
    """The ``top`` most helpful training documents for each query, best first.

    texts: query strings (scored as whole documents); data: a query file read like the training
    data (same fields). aggregate="mean": one query, the mean gradient of all of them.
    unit_normalize: cosine scores (both sides divided by their preconditioned norms).
    Returns one dict per hit: query (query index, 0 when aggregated), rank (0 = best), train
    (train row), score, text (the training document).
    """
    if (texts is None) == (data is None):
        raise ValueError("give the queries as texts or as a data file, one of the two")
    if aggregate not in (None, "mean"):
        raise ValueError(f"aggregate must be None or 'mean'; got {aggregate!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top <= 0:
        raise ValueError(f"top must be a positive int; got {top!r}")
    attr, opts, tokenizer, documents = open_index(index, model_dir, progress=progress)
    if texts is not None:
        texts = list(texts)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError("texts must be non-empty strings")
        query_opts = dataclasses.replace(opts, prompt_field=None, completion_field=None)
        queries = [[t] for t in texts]
    else:
        data = os.fspath(data)
        query_opts, queries = opts, document_texts(read_documents(data), opts, data)
    if query_opts.prompt_field is None and opts.prompt_field is not None:
        attr.loss_fn = CausalLM()  # a bare text query: every token counts
    features = attr.features(tokenise(tokenizer, queries, query_opts, progress=False))
    if aggregate == "mean":
        features = dataclasses.replace(features, values=features.values.mean(0, keepdim=True))
    values, rows = attr.top_k(features, min(top, attr.store.n_rows), cosine=unit_normalize)
    return [{"query": q, "rank": r, "train": int(rows[q, r]), "score": float(values[q, r]),
             "text": "\n".join(documents[int(rows[q, r])])}
            for q in range(values.shape[0]) for r in range(values.shape[1])]


def format_hits(hits: Sequence[dict], width: int = 60) -> str:
    """A readable table of hits: query, rank, score, train row and a snippet of the text."""
    lines = [f"{'query':>5} {'rank':>4} {'score':>12} {'train':>7}  text"]
    for h in hits:
        snippet = " ".join(h["text"].split())
        snippet = snippet if len(snippet) <= width else snippet[:width - 3] + "..."
        lines.append(f"{h['query']:>5} {h['rank']:>4} {h['score']:>12.5g} {h['train']:>7}  "
                     f"{snippet}")
    return "\n".join(lines)
