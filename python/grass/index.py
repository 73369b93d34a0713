"""An approximate nearest-neighbour index over a finished store, for interactive top-k.

Scores are phi_j^T (F + lambda I)^{-1} phi_i summed over layers. With the Cholesky factor
L_l L_l^T = F_l + lambda_l I of each layer, the whitened rows w_i = L_l^{-1} phi_{i,l}
(concatenated over layers) have w_j^T w_i equal to that score, so a maximum-inner-product
search over w finds the highest-scoring train rows. The whitened rows (n, width) are reduced to
``dim`` columns with ``grass_kernels.sjlt`` (E<S w_j, S w_i> = w_j^T w_i) and searched with
FAISS, whose candidates are then re-scored exactly: the query's preconditioned features
L^{-T} w_j against the candidate rows, read from the store in one gathered, checksummed read.

FAISS index kinds (all inner-product): "flat" scans the fp32 sketches; "sq8" scans them as
8-bit codes (a quarter of the bytes); "pq" scans 4-bit product-quantisation codes of 4 columns
each (FAISS's SIMD "fast scan", a thirty-second of the bytes), coarse enough that it proposes
more candidates; "ivf" probes ``nprobe`` of ``nlist`` k-means lists; "hnsw" walks a graph. Which
reaches what recall and speed on which features is measured in bench/README.md; "auto" takes
"flat" while the fp32 sketches are small enough to scan in a few milliseconds and "pq" above.

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
from .scoring import one_torch_thread
from .store import write_atomic

INDEX_FILE = "approx_index.faiss"
MANIFEST_FILE = "approx_index.json"
KINDS = ("auto", "flat", "sq8", "pq", "ivf", "hnsw")
DEFAULT_DIM = 1024
# kind="auto": "flat" while the fp32 sketches (n x dim x 4 bytes) are at most this many bytes
# (a scan of a few milliseconds), "pq" above.
FLAT_MAX_BYTES = 64 << 20
# "pq": each 4-bit code stands for this many sketch columns (dim must be a multiple of it).
PQ_COLUMNS_PER_CODE = 4
# Candidates proposed per wanted row by default: the 4-bit codes of "pq" rank more coarsely
# than the other kinds' scores, so it proposes more rows for the exact re-scoring.
DEFAULT_CANDIDATES = {"flat": 10, "sq8": 10, "pq": 30, "ivf": 10, "hnsw": 10}
# Training samples, read as TRAIN_PIECES runs of consecutive rows spread over the store:
# IVF's k-means takes TRAIN_ROWS_PER_LIST rows per list (FAISS warns below 39); "pq" and "sq8"
# take TRAIN_ROWS (PQ's 16 centroids per code need at least 39 x 16).
TRAIN_ROWS_PER_LIST, TRAIN_ROWS, TRAIN_PIECES = 40, 16384, 64
INSTALL_HINT = "pip install faiss-cpu  (or: pip install 'grass-kernels[index]')"
INDEX_VERSION = 2


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


def whiten(factors: Mapping[str, torch.Tensor] | None, layout: Layout,
           rows: torch.Tensor) -> torch.Tensor:
    """(m, width) rows -> (m, width) L_l^{-1} phi_l per layer, so that inner products of
    whitened rows are the scores: fp32 (fp64 when a factor is), or the rows unchanged as fp32
    when ``factors`` is None (hessian="identity")."""
    if factors is None:
        return rows.float()
    wide = any(f.dtype == torch.float64 for f in factors.values())
    return _solve_layers(factors, layout, rows, torch.float64 if wide else torch.float32,
                         transposed=False)


def unwhiten(factors: Mapping[str, torch.Tensor] | None, layout: Layout,
             white: torch.Tensor) -> torch.Tensor:
    """(m, width) whitened rows L_l^{-1} phi_l -> (m, width) fp32 preconditioned rows
    (F_l + lambda_l I)^{-1} phi_l = L_l^{-T} L_l^{-1} phi_l: one more triangular solve per
    layer where the preconditioner's own solve would take two."""
    if factors is None:
        return white.float()
    return _solve_layers(factors, layout, white, torch.float32, transposed=True)


def _solve_layers(factors: Mapping[str, torch.Tensor], layout: Layout,
                  rows: torch.Tensor, dtype: torch.dtype, *, transposed: bool) -> torch.Tensor:
    """(m, width) -> (m, width) ``dtype`` on the CPU: each layer's columns solved against
    L_l (lower triangular) or, ``transposed``, against L_l^T, in the factor's dtype."""
    out = torch.empty(rows.shape, dtype=dtype)
    for name, columns in layout.items():
        factor = factors[name]
        block = rows[:, columns.cols].to(factor.device, factor.dtype).T  # (k_l, m)
        solved = torch.linalg.solve_triangular(factor.T if transposed else factor, block,
                                               upper=transposed)
        out[:, columns.cols] = solved.T.to("cpu", dtype)
    return out


class ApproximateIndex:
    """A FAISS index of sketched whitened rows plus the manifest that ties it to a store.

    manifest: ``identity(...)`` plus the options: dim (the sketch width, or the whitened rows'
    own width when it is not larger), sketched, c and seed (the sjlt map), kind, candidates
    (the default per wanted row), nlist, nprobe, hnsw_m.
    """

    def __init__(self, faiss_index, manifest: dict):
        self.faiss_index = faiss_index
        self.manifest = manifest

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    def sketch(self, white: torch.Tensor) -> torch.Tensor:
        """(m, width) whitened rows -> (m, dim) fp32 contiguous rows as FAISS indexes them."""
        if self.manifest["sketched"]:
            white = grass_kernels.sjlt(white.float(), self.dim, c=self.manifest["c"],
                                       seed=self.manifest["seed"])
        return white.float().contiguous()

    def embed(self, precondition: Preconditioner, features: torch.Tensor) -> torch.Tensor:
        """(m, width) features -> (m, dim) fp32 contiguous sketched whitened rows."""
        return self.sketch(whiten(precondition.factors, precondition.layout, features))

    def search(self, query: torch.Tensor, candidates: int) -> torch.Tensor:
        """(m, dim) embedded queries -> (m, candidates) int64 row ids, -1 where FAISS found
        fewer (an IVF search whose probed lists hold fewer rows)."""
        with one_torch_thread():
            _, ids = self.faiss_index.search(query.cpu().numpy(), candidates)
        return torch.from_numpy(ids).to(torch.int64)

    def top_k(self, store, precondition: Preconditioner, test: torch.Tensor, k: int,
              candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The best k of ``candidates * k`` rows proposed per test row (default: the index's
        own multiplier), scored exactly: test (m, width) -> (values, indices), each (m, k),
        as ``rescore`` returns them."""
        candidates = candidates or self.manifest["candidates"]
        with one_torch_thread():
            white = whiten(precondition.factors, precondition.layout, test)
            ids = self.search(self.sketch(white), min(candidates * k, store.n_rows))
            preconditioned = unwhiten(precondition.factors, precondition.layout, white)
            return rescore(store, preconditioned, ids, k)


def _check_options(dim, kind, c, seed, nlist, nprobe, hnsw_m, candidates):
    for name, value in (("dim", dim), ("c", c), ("hnsw_m", hnsw_m)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    for name, value in (("nlist", nlist), ("nprobe", nprobe), ("candidates", candidates)):
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


def choose_kind(kind: str, n_rows: int, dim: int) -> str:
    """The FAISS index kind that ``kind`` ("auto" or a named kind) means for n_rows x dim
    sketches; ValueError when "pq" cannot encode dim columns."""
    pq_fits = dim % PQ_COLUMNS_PER_CODE == 0
    if kind == "auto":
        return "flat" if n_rows * dim * 4 <= FLAT_MAX_BYTES else "pq" if pq_fits else "sq8"
    if kind == "pq" and not pq_fits:
        raise ValueError(f"kind='pq' needs a sketch width that is a multiple of "
                         f"{PQ_COLUMNS_PER_CODE}; got dim={dim}: pick another dim or kind")
    return kind


def _new_faiss_index(faiss, kind: str, dim: int, n_rows: int, nlist, hnsw_m: int):
    """An empty FAISS inner-product index of a named ``kind``, its nlist (IVF only, default
    about sqrt(n)) and how many rows its training takes (0: none)."""
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim), None, 0
    if kind == "sq8":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, ip), None, TRAIN_ROWS
    if kind == "pq":
        return faiss.IndexPQFastScan(dim, dim // PQ_COLUMNS_PER_CODE, 4, ip), None, TRAIN_ROWS
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dim, hnsw_m, ip), None, 0
    nlist = nlist or max(1, min(int(n_rows ** 0.5), n_rows // TRAIN_ROWS_PER_LIST))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, ip)
    return index, nlist, TRAIN_ROWS_PER_LIST * nlist


def _training_sample(store, wanted: int) -> torch.Tensor:
    """About ``wanted`` rows (fp32, (m, width)) read as TRAIN_PIECES runs spread evenly over
    the store: a training sample without a full pass."""
    if wanted >= store.n_rows:
        return store.read(0, store.n_rows)
    piece = -(-wanted // TRAIN_PIECES)
    starts = torch.linspace(0, store.n_rows - piece, min(TRAIN_PIECES, -(-wanted // piece)))
    return torch.cat([store.read(a, a + piece) for a in starts.long().tolist()])


def build(store, precondition: Preconditioner, ident: dict, *, dim: int = DEFAULT_DIM,
          kind: str = "auto", c: int = 1, seed: int = 0, nlist: int | None = None,
          nprobe: int | None = None, hnsw_m: int = 32, candidates: int | None = None,
          chunk_size: int = 4096, progress: bool = True) -> ApproximateIndex:
    """Build the index of all rows of the complete on-disk ``store`` and write it there.

    dim: sketch width (rows narrower than dim are indexed unsketched); kind: one of KINDS (see
    the module docstring; "ivf": nlist lists, default sqrt(n), nprobe searched per query,
    default nlist / 10; "hnsw": hnsw_m links per node); candidates: the default rows proposed
    per wanted row (None: DEFAULT_CANDIDATES of the kind); c, seed: the sjlt map; chunk_size:
    rows read at a time. ident: ``identity(store, ...)``, saved as the manifest.
    """
    faiss = require_faiss()
    _check_options(dim, kind, c, seed, nlist, nprobe, hnsw_m, candidates)
    sketched = store.width > dim
    dim = dim if sketched else store.width
    kind = choose_kind(kind, store.n_rows, dim)
    fidx, nlist, train_rows = _new_faiss_index(faiss, kind, dim, store.n_rows, nlist, hnsw_m)
    manifest = dict(ident, dim=dim, sketched=sketched, c=c, seed=seed, kind=kind,
                    candidates=candidates or DEFAULT_CANDIDATES[kind], nlist=nlist,
                    nprobe=None, hnsw_m=hnsw_m if kind == "hnsw" else None)
    index = ApproximateIndex(fidx, manifest)
    if train_rows:
        sample = index.embed(precondition, _training_sample(store, train_rows)).numpy()
        with one_torch_thread():
            fidx.train(sample)
    if kind == "ivf":
        manifest["nprobe"] = fidx.nprobe = nprobe or max(1, nlist // 10)
    chunks = range(0, store.n_rows, chunk_size)
    with tqdm(chunks, desc="grass index", unit="chunk", disable=not progress) as bar:
        for start in bar:
            embedded = index.embed(precondition,
                                   store.read(start, min(start + chunk_size, store.n_rows)))
            with one_torch_thread():
                fidx.add(embedded.numpy())
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


def rescore(store, preconditioned: torch.Tensor, ids: torch.Tensor,
            k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores of each test row against its own candidate rows, read from the store in
    one gathered read (``GradientStore.read_rows``).

    preconditioned: (m, width) fp32 test features through (F + lambda I)^{-1}; ids: (m, c)
    int64 candidate rows per test row, -1 for none. Returns (values, indices), each (m, k),
    best first; a test row with fewer than k candidates has -inf values and index -1 in its
    last places.
    """
    wanted = torch.unique(ids[ids >= 0])  # sorted
    rows = store.read_rows(wanted)  # (u, width) fp32
    scores = preconditioned.to(rows.device) @ rows.T  # (m, u)
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
