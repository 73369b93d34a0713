"""An approximate nearest-neighbour index over a finished store, for interactive top-k.

Scores are phi_j^T (F + lambda I)^{-1} phi_i summed over layers. With the Cholesky factor
L_l L_l^T = F_l + lambda_l I of each layer, the whitened rows w_i = L_l^{-1} phi_{i,l}
(concatenated over layers) have w_j^T w_i equal to that score, so a maximum-inner-product
search over w finds the highest-scoring train rows. The whitened rows (n, width) are reduced to
``dim`` columns with ``grass_kernels.sjlt`` (E<S w_j, S w_i> = w_j^T w_i) and searched with
FAISS; its candidates are then re-scored exactly from the store by the caller.

On disk the index is two files in the store directory: ``approx_index.faiss`` (FAISS's own
``write_index`` format) and ``approx_index.json``, a manifest with the store's identity (its
config, row count, curvature kind and damping, and a digest of its progress records, per-block
checksums and curvature arrays). An index whose manifest does not match the store it is opened
with is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

import torch
from tqdm.auto import tqdm

import grass_kernels

from .curvature import Preconditioner
from .layers import Layout
from .store import write_atomic

INDEX_FILE = "approx_index.faiss"
MANIFEST_FILE = "approx_index.json"
KINDS = ("auto", "flat", "ivf", "hnsw")
# kind="auto": exact inner-product search of the sketches (IndexFlatIP, n x dim fp32 in memory)
# up to this many rows, IVF above (an inner-product IVF proposes fewer true top rows per
# probed row than a flat scan: see bench/README.md).
FLAT_MAX_ROWS = 2_000_000
# IVF: rows of the k-means training sample per list (FAISS warns below 39), spread over the
# store in TRAIN_PIECES runs of consecutive rows.
TRAIN_ROWS_PER_LIST, TRAIN_PIECES = 40, 64
INSTALL_HINT = "pip install faiss-cpu  (or: pip install 'grass-kernels[index]')"
INDEX_VERSION = 1


def require_faiss():
    """The faiss module; ImportError naming the install command when it is missing."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(f"the approximate index needs FAISS, which is not installed: "
                          f"{INSTALL_HINT}") from err
    return faiss


def store_fingerprint(store, hessian: str) -> str:
    """A digest of what a store's rows and ``hessian`` curvature are: its manifest, every
    writer's progress record and per-block checksum table, and the metadata (with crc32) of the
    curvature's saved arrays (other arrays, saved later, leave it unchanged). Rewriting any row
    changes a block checksum, and gaining rows changes a progress record."""
    digest = hashlib.blake2b(digest_size=16)
    for folder in ("", "progress", "checksums", "arrays"):
        where = os.path.join(store.path, folder)
        names = (["manifest.json"] if folder == "" else
                 sorted(n for n in os.listdir(where) if folder != "arrays"
                        or (n.startswith(f"{hessian}.") and n.endswith(".json")))
                 if os.path.isdir(where) else [])
        for name in names:
            with open(os.path.join(where, name), "rb") as f:
                digest.update(f"{folder}/{name}:".encode())
                digest.update(f.read())
    return digest.hexdigest()


def identity(store, hessian: str, dampings: tuple[float, float]) -> dict:
    """What an index must match to be used with ``store`` under this curvature and damping."""
    return {
        "version": INDEX_VERSION,
        "config": store.config,
        "n_rows": store.n_rows,
        "layers": store.layout.sizes,
        "hessian": hessian,
        "damping": [float(d) for d in dampings],
        "store_fingerprint": store_fingerprint(store, hessian),
    }


def whitening_factors(precondition: Preconditioner) -> dict[str, torch.Tensor] | None:
    """name -> fp32 (k_l, k_l) lower Cholesky factor L_l of the damped curvature (None for
    hessian="identity"). fp32 suffices: the index only proposes candidates, which are then
    re-scored exactly."""
    if precondition.factors is None:
        return None
    return {name: factor.float() for name, factor in precondition.factors.items()}


def whiten(factors: Mapping[str, torch.Tensor] | None, layout: Layout,
           rows: torch.Tensor) -> torch.Tensor:
    """(m, width) fp32 rows -> (m, width) fp32 L_l^{-1} phi_l per layer (rows unchanged when
    ``factors`` is None), so that inner products of whitened rows are the scores."""
    if factors is None:
        return rows.float()
    out = torch.empty_like(rows, dtype=torch.float32)
    for name, columns in layout.items():
        factor = factors[name]
        block = rows[:, columns.cols].to(factor.device).T  # (k_l, m)
        solved = torch.linalg.solve_triangular(factor, block, upper=False)
        out[:, columns.cols] = solved.T.to(out.device, torch.float32)
    return out


class ApproximateIndex:
    """A FAISS index of sketched whitened rows plus the manifest that ties it to a store.

    dim: the sketch width (the whitened rows' own width when it is not larger); seed, c: the
    sjlt map's seed and non-zeros per coordinate; manifest: ``identity(...)`` plus the options.
    """

    def __init__(self, faiss_index, manifest: dict):
        self.faiss_index = faiss_index
        self.manifest = manifest
        self._factors: tuple[Preconditioner, dict | None] | None = None  # whitening, cached

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    def embed(self, precondition: Preconditioner, features: torch.Tensor) -> torch.Tensor:
        """(m, width) features -> (m, dim) fp32 contiguous sketched whitened rows."""
        if self._factors is None or self._factors[0] is not precondition:
            self._factors = (precondition, whitening_factors(precondition))
        white = whiten(self._factors[1], precondition.layout, features.float())
        if self.manifest["sketched"]:
            white = grass_kernels.sjlt(white, self.dim, c=self.manifest["c"],
                                       seed=self.manifest["seed"])
        return white.contiguous()

    def search(self, query: torch.Tensor, candidates: int) -> torch.Tensor:
        """(m, dim) embedded queries -> (m, candidates) int64 row ids, -1 where FAISS found
        fewer (an IVF search whose probed lists hold fewer rows)."""
        _, ids = self.faiss_index.search(query.cpu().numpy(), candidates)
        return torch.from_numpy(ids).to(torch.int64)


def _check_options(dim, kind, c, seed, nlist, nprobe, hnsw_m):
    for name, value in (("dim", dim), ("c", c), ("hnsw_m", hnsw_m)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    for name, value in (("nlist", nlist), ("nprobe", nprobe)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise ValueError(f"{name} must be a positive int or None; got {value!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    if dim % c:
        raise ValueError(f"dim={dim} must be a multiple of c={c} (sjlt spreads each coordinate "
                         "over c blocks of dim / c)")


def _new_faiss_index(faiss, kind: str, dim: int, n_rows: int, nlist, hnsw_m: int):
    """An empty FAISS inner-product index of ``kind``, and its chosen nlist (IVF only)."""
    if kind == "auto":
        kind = "flat" if n_rows <= FLAT_MAX_ROWS else "ivf"
    if kind == "flat":
        return faiss.IndexFlatIP(dim), kind, None
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT), kind, None
    # IVF: about sqrt(n) lists, with TRAIN_ROWS_PER_LIST training rows each.
    nlist = nlist or max(1, min(int(n_rows ** 0.5), n_rows // TRAIN_ROWS_PER_LIST))
    quantizer = faiss.IndexFlatIP(dim)
    return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT), kind, nlist


def _training_sample(store, nlist: int) -> torch.Tensor:
    """About TRAIN_ROWS_PER_LIST * nlist rows (fp32, (m, width)) read as TRAIN_PIECES runs
    spread evenly over the store: the k-means sample of an IVF index, without a full pass."""
    wanted = min(store.n_rows, TRAIN_ROWS_PER_LIST * nlist)
    piece = -(-wanted // TRAIN_PIECES)
    starts = torch.linspace(0, store.n_rows - piece, min(TRAIN_PIECES, -(-wanted // piece)))
    return torch.cat([store.read(a, a + piece) for a in starts.long().tolist()])


def build(store, precondition: Preconditioner, ident: dict, *, dim: int = 2048,
          kind: str = "auto", c: int = 1, seed: int = 0, nlist: int | None = None,
          nprobe: int | None = None, hnsw_m: int = 32, chunk_size: int = 4096,
          progress: bool = True) -> ApproximateIndex:
    """Build the index of all rows of the complete on-disk ``store`` and write it there.

    dim: sketch width (rows narrower than dim are indexed unsketched); kind: "flat" (exact
    inner-product search of the sketches), "ivf" (nlist inverted lists, default sqrt(n); nprobe
    searched per query, default nlist / 10), "hnsw" (a graph with hnsw_m links per node), or
    "auto" (flat up to FLAT_MAX_ROWS rows, else ivf); c, seed: the sjlt map; chunk_size: rows
    read at a time. ident: ``identity(store, ...)``, saved as the manifest.
    """
    faiss = require_faiss()
    _check_options(dim, kind, c, seed, nlist, nprobe, hnsw_m)
    sketched = store.width > dim
    dim = dim if sketched else store.width
    fidx, kind, nlist = _new_faiss_index(faiss, kind, dim, store.n_rows, nlist, hnsw_m)
    manifest = dict(ident, dim=dim, sketched=sketched, c=c, seed=seed, kind=kind,
                    nlist=nlist, nprobe=None, hnsw_m=hnsw_m if kind == "hnsw" else None)
    index = ApproximateIndex(fidx, manifest)
    chunks = range(0, store.n_rows, chunk_size)
    bar = tqdm(chunks, desc="grass index", unit="chunk", disable=not progress)
    if kind == "ivf":
        fidx.train(index.embed(precondition, _training_sample(store, nlist)).numpy())
        manifest["nprobe"] = fidx.nprobe = nprobe or max(1, nlist // 10)
    with bar:
        for start in bar:
            rows = store.read(start, min(start + chunk_size, store.n_rows))
            fidx.add(index.embed(precondition, rows).numpy())
    write_atomic(os.path.join(store.path, MANIFEST_FILE), b"")  # the manifest goes last
    faiss.write_index(fidx, os.path.join(store.path, INDEX_FILE))
    write_atomic(os.path.join(store.path, MANIFEST_FILE),
                 json.dumps(manifest, sort_keys=True).encode())
    return index


def exists(path: str | os.PathLike) -> bool:
    return os.path.exists(os.path.join(os.fspath(path), INDEX_FILE))


def load(path: str | os.PathLike, ident: dict) -> ApproximateIndex:
    """The index saved in the store directory ``path``, checked against ``ident`` (see
    ``identity``); ValueError naming what differs when the store or curvature changed since it
    was built, or when there is none."""
    path = os.fspath(path)
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not exists(path):
        raise ValueError(f"the store at {path} has no approximate index: build one with "
                         "attr.build_index()")
    raw = b""
    if os.path.exists(manifest_path):
        with open(manifest_path, "rb") as f:
            raw = f.read()
    if not raw:
        raise ValueError(f"the approximate index at {path} was not finished (no "
                         f"{MANIFEST_FILE}): rebuild it with attr.build_index()")
    manifest = json.loads(raw)
    differ = [key for key in ident if manifest.get(key) != _json(ident[key])]
    if differ:
        reasons = {
            "store_fingerprint": "the store's rows or curvature changed since it was built "
                                 "(its progress records, checksums or arrays differ)",
            "config": "it was built from a store of another model or configuration",
            "n_rows": f"it covers {manifest.get('n_rows')} rows, the store has "
                      f"{ident['n_rows']}",
            "hessian": f"it whitens with hessian={manifest.get('hessian')!r}, this Attributor "
                       f"scores with {ident['hessian']!r}",
            "damping": f"it whitens with (relative, absolute) damping {manifest.get('damping')}, "
                       f"this Attributor uses {ident['damping']}",
        }
        why = "; ".join(reasons.get(key, f"{key} differs") for key in differ)
        raise ValueError(f"the approximate index at {path} does not match this store: {why}. "
                         "Rebuild it with attr.build_index()")
    faiss = require_faiss()
    fidx = faiss.read_index(os.path.join(path, INDEX_FILE))
    if manifest["kind"] == "ivf":
        fidx.nprobe = manifest["nprobe"]
    return ApproximateIndex(fidx, manifest)


def _json(value):
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def rescore(store, precondition: Preconditioner, test: torch.Tensor, ids: torch.Tensor,
            k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores of each test row against its own candidate rows, read from the store.

    test: (m, width) fp32; ids: (m, c) int64 candidate rows per test row, -1 for none.
    Returns (values, indices), each (m, k), best first; a test row with fewer than k candidates
    has -inf values and index -1 in its last places.
    """
    wanted = torch.unique(ids[ids >= 0])  # sorted
    rows = read_rows(store, wanted)  # (u, width) fp32
    scores = precondition(test.float()) @ rows.T  # (m, u)
    # Column of each candidate in ``wanted``; a test row sees only its own candidates.
    position = torch.searchsorted(wanted, ids.clamp_min(0))
    member = torch.zeros(scores.shape, dtype=torch.int32)
    member.scatter_add_(1, position, (ids >= 0).to(torch.int32))  # -1 ids add nothing
    own = scores.masked_fill(member == 0, float("-inf"))
    top = own.topk(min(k, own.shape[1]), dim=1)
    values, indices = top.values, wanted[top.indices]
    indices = torch.where(values == float("-inf"), torch.full_like(indices, -1), indices)
    if values.shape[1] < k:  # fewer distinct candidates than k in the whole batch
        pad = k - values.shape[1]
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
        indices = torch.cat([indices, indices.new_full((indices.shape[0], pad), -1)], 1)
    return values, indices


def read_rows(store, wanted: torch.Tensor) -> torch.Tensor:
    """Rows ``wanted`` (sorted unique int64 (u,)) of ``store`` as (u, width) fp32, reading each
    run of consecutive rows once (and verifying only their checksum blocks)."""
    if wanted.numel() == 0:
        return torch.empty(0, store.width)
    ids = wanted.tolist()
    parts, first = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            parts.append(store.read(ids[first], ids[i - 1] + 1))
            first = i
    return torch.cat(parts)

