"""Per-cell embeddings of a frozen segmentation network, cached on disk one file per image.

Two sources (``source`` in ``configs/classifier.yaml``):

* ``vit``: the ViT's last-block patch tokens after its final norm (what timm's ``forward_features`` returns),
  a ``(D, H/16, W/16)`` map, pooled over the nucleus: each token weighs by the number of the nucleus' pixels it
  covers. For CellVTA these are the ViT tokens inside the adapter (not the adapter's fused 1/16 map).
* ``decoder``: the last feature map of a decoder branch (the output of the block before its 1x1 classifier,
  ``(64, H, W)``; the type branch by default), averaged over the nucleus' pixels.

Both are one operation, :func:`pool_cells`: the mean over a nucleus' pixels of the feature map repeated to
full resolution. The features are read with forward hooks on the network's own modules, so any network the
bundle builds (CellVTA, CellViT, any backbone preset) works unchanged.

Cache file ``<name>.npz``: ``ids`` (N,) int32 instance ids, ``centroids`` (N, 2) float32 (x, y) pixels,
``embeddings`` (N, D) float32, ``head_probs`` (N, C) float32 (the network's own type branch: mean softmax over
the nucleus, background included), ``source`` and ``fingerprint`` (str), ``image`` (the source path) and
``image_digest`` (``scripts.data.datasets.image_digest`` of its pixels: a cached file is reused only for the same
pixels, and a cell classifier records which images it has seen by it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..data.datasets import image_digest, read_image, read_label
from ..files import atomic_path
from ..model.adapter import tokens_to_map
from ..nuclei.postprocess import hovernet_postprocess

SOURCES = ("vit", "decoder")

__all__ = ["SOURCES", "CellEmbeddings", "CellEmbedder", "FeatureSource", "pool_cells", "padded_instances",
           "model_fingerprint", "embed_files"]


def model_fingerprint(network: nn.Module) -> str:
    """SHA-256 (hex, first 16 characters) of the network's class name and every state-dict tensor."""
    digest = hashlib.sha256(type(network).__name__.encode())
    for name, value in network.state_dict().items():
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def pool_cells(features: torch.Tensor, inst_map: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean feature of each nucleus.

    Args:
        features: (D, h, w) map at ``1/s`` of the instance map's resolution (``s = H / h = W / w``, integer).
        inst_map: (H, W) integer instance ids, 0 background.
        ids: (N,) instance ids to pool, each present in ``inst_map``.

    Returns:
        (N, D) float32: ``sum_t n_t f_t / sum_t n_t`` where ``n_t`` counts the nucleus' pixels inside cell
        ``t`` of the feature grid (equal to the mean over the nucleus of the map repeated ``s`` times).
    """
    d, h, w = features.shape
    height, width = inst_map.shape
    if height % h or width % w or height // h != width // w:
        raise ValueError(f"feature map {h}x{w} is not an integer fraction of the instance map {height}x{width}")
    s = height // h
    lookup = torch.full((int(inst_map.max()) + 1,), -1, dtype=torch.long, device=inst_map.device)
    lookup[ids.long()] = torch.arange(ids.numel(), device=inst_map.device)
    rows = lookup[inst_map.long()]
    ys, xs = torch.nonzero(rows >= 0, as_tuple=True)
    cell = rows[ys, xs]
    code = cell * (h * w) + (ys // s) * w + xs // s
    pairs, counts = torch.unique(code, return_counts=True)
    flat = features.reshape(d, h * w).float()
    sums = torch.zeros(ids.numel(), d, dtype=torch.float32, device=features.device)
    sums.index_add_(0, (pairs // (h * w)).to(features.device),
                    flat[:, pairs % (h * w)].T * counts.to(features.device, torch.float32)[:, None])
    area = torch.zeros(ids.numel(), dtype=torch.float32, device=features.device)
    area.index_add_(0, (pairs // (h * w)).to(features.device), counts.to(features.device, torch.float32))
    if (area == 0).any():
        raise ValueError(f"instance ids {ids[(area == 0).cpu()].tolist()} are not in the instance map")
    return sums / area[:, None]


def padded_instances(inst_map: np.ndarray, features: torch.Tensor, scale: int) -> torch.Tensor:
    """The ``(H, W)`` instance map zero-padded at its bottom and right to the extent ``(h s, w s)`` of a
    ``(D, h, w)`` feature map at ``1/s`` of its resolution (the network ran on the image padded so), int64 on the
    CPU: what :func:`pool_cells` pools that map over."""
    height, width = inst_map.shape
    h, w = features.shape[-2] * scale, features.shape[-1] * scale
    if h < height or w < width:
        raise ValueError(f"a {features.shape[-2]}x{features.shape[-1]} feature map at 1/{scale} does not cover the "
                         f"{height}x{width} instance map")
    padded = np.zeros((h, w), np.int64)
    padded[:height, :width] = inst_map
    return torch.from_numpy(padded)


@dataclass
class CellEmbeddings:
    """The embeddings of one image's nuclei (see the module docstring for the arrays)."""

    ids: np.ndarray
    centroids: np.ndarray
    embeddings: np.ndarray
    head_probs: np.ndarray
    source: str
    fingerprint: str
    image: str = ""
    image_digest: str = ""

    def save(self, path: str | Path) -> Path:
        """Write the cache file atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, ids=self.ids, centroids=self.centroids, embeddings=self.embeddings,
                     head_probs=self.head_probs, source=np.str_(self.source),
                     fingerprint=np.str_(self.fingerprint), image=np.str_(self.image),
                     image_digest=np.str_(self.image_digest))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CellEmbeddings:
        """Read a cache file written by :meth:`save` (ValueError naming the file when it is not one)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: embedding file not found")
        keys = ("ids", "centroids", "embeddings", "head_probs", "source", "fingerprint", "image")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in keys if k not in z.files]
                if missing:
                    raise ValueError(f"{path}: not a cell embedding file (missing {missing})")
                a = {k: z[k] for k in keys}
                digest = str(z["image_digest"]) if "image_digest" in z.files else ""  # "": an older cache file
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: unreadable embedding file ({e})") from e
        return cls(a["ids"], a["centroids"], a["embeddings"], a["head_probs"], str(a["source"]),
                   str(a["fingerprint"]), str(a["image"]), digest)


def _centroids(inst_map: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """(N, 2) float32 centre of mass (x, y) of each instance: the pooled pixel coordinates."""
    h, w = inst_map.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    coords = torch.stack([xx, yy]).to(inst_map.device)
    return pool_cells(coords, inst_map, ids).cpu().numpy().astype(np.float32)


class FeatureSource:
    """The embedding source's feature map of every forward of a network, read by a forward hook on its module.

    The one definition of the ``vit`` and ``decoder`` sources (module docstring): :class:`CellEmbedder`, tile
    and whole-slide inference all read their cells' features through it.

    Args:
        network: a bundle network (``CellVTA``/``CellViT``).
        source: ``vit`` or ``decoder``.
        branch: the decoder branch of the ``decoder`` source.

    Attributes:
        scale: the input's resolution over the map's, 16 (``vit``) or 1 (``decoder``).
    """

    def __init__(self, network: nn.Module, source: str = "vit", branch: str = "nuclei_type_map") -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown embedding source {source!r}; known: {list(SOURCES)}")
        if source == "vit":
            if not hasattr(network.encoder, "vit"):
                raise ValueError(f"the 'vit' embedding source needs a ViT encoder ({type(network.encoder).__name__} "
                                 "has none): use the 'decoder' source")
            self._vit = network.encoder.vit
            module = self._vit.blocks[-1]
        else:
            if branch not in network.decoder.branches:
                raise ValueError(f"unknown decoder branch {branch!r}; known: {list(network.decoder.branches)}")
            module = network.decoder.branches[branch].decoder0_header[-2]
        self.source = source
        self.scale = 16 if source == "vit" else 1
        self._captured: torch.Tensor | None = None
        self._hook: RemovableHandle | None = module.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._captured = output

    @torch.no_grad()
    def __call__(self, height: int, width: int) -> torch.Tensor:
        """``(B, D, height / scale, width / scale)`` float32: the source's map of the network's last forward on a
        ``(B, 3, height, width)`` input (``height``, ``width`` multiples of 16)."""
        if self._hook is None:
            raise RuntimeError("this feature source is closed: its forward hook was removed")
        if self._captured is None:
            raise RuntimeError("the network has not run since this feature source was made")
        if self.source == "vit":
            h, w = height // 16, width // 16
            return tokens_to_map(self._vit.norm(self._captured)[:, -h * w:], h, w).float()
        return self._captured.float()

    def close(self) -> None:
        """Remove the forward hook from the network (the network is left as it was built); idempotent."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured = None

    def __enter__(self) -> FeatureSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CellEmbedder:
    """Run a frozen network on an image and pool one embedding per nucleus.

    The embedder hooks one module of ``network``; :meth:`close` (or leaving a ``with`` block) removes the hook.

    Args:
        network: a bundle network (``CellVTA``/``CellViT``), with ``mean``/``std`` attributes (0-1 scale).
        source: ``vit`` or ``decoder`` (module docstring).
        device: where the network runs.
        branch: the decoder branch of the ``decoder`` source.
        magnification: of the images, for the post-processing of detected nuclei (40 or 20).
        type_head: also pool the network's own type probabilities (``head_probs``); False with the ``vit``
            source and given nuclei runs the encoder only (``head_probs`` is then ``(N, 0)``).
    """

    def __init__(self, network: nn.Module, source: str = "vit", device: torch.device | str = "cpu",
                 branch: str = "nuclei_type_map", magnification: int = 40, type_head: bool = True) -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.feature_source = FeatureSource(network, source, branch)
        self.source = source
        self.magnification = magnification
        self.type_head = type_head
        self.fingerprint = model_fingerprint(network)
        self._mean = torch.as_tensor(network.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self._std = torch.as_tensor(network.std, dtype=torch.float32).view(1, 3, 1, 1) * 255

    def close(self) -> None:
        """Remove the forward hook from the network (the network is left as it was built); idempotent."""
        self.feature_source.close()

    def __enter__(self) -> CellEmbedder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.inference_mode()
    def maps(self, image: np.ndarray, decoder: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``image`` (H, W, 3) uint8 -> the source's feature map ``(D, H'/s, W'/s)`` and the network's maps
        ``(1, C, H', W')``, for the image zero-padded at its bottom and right to ``H', W'`` multiples of 16.
        ``decoder=False`` (``vit`` source only) runs the encoder alone and returns no maps."""
        height, width = image.shape[:2]
        ph, pw = -height % 16, -width % 16
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        x = torch.nn.functional.pad((x - self._mean) / self._std, (0, pw, 0, ph)).to(self.device)
        if decoder or self.source != "vit":
            out = self.network(x)
        else:
            self.network.encoder(x)
            out = {}
        return self.features(height + ph, width + pw), out

    def features(self, height: int, width: int) -> torch.Tensor:
        """The source's feature map ``(D, h, w)`` of the network's last forward on a ``height x width`` input
        (another embedder hooked on the same network reads its own source from that one forward)."""
        return self.feature_source(height, width)[0]

    def __call__(self, image: np.ndarray, inst_map: np.ndarray | None = None, name: str = "") -> CellEmbeddings:
        """Embed the nuclei of ``inst_map`` (H, W) (ground truth), or, when None, those the network detects."""
        features, out = self.maps(image, decoder=inst_map is None or self.type_head)
        return self.pool(features, out, inst_map, name, image.shape[:2])

    def pool(self, features: torch.Tensor, out: dict[str, torch.Tensor], inst_map: np.ndarray | None, name: str,
             size: tuple[int, int]) -> CellEmbeddings:
        """Embeddings from the output of :meth:`maps` (or :meth:`features`) for an image of ``size`` (H, W)."""
        height, width = size
        if inst_map is None:
            nuclei = torch.softmax(out["nuclei_binary_map"].float()[0], dim=0)[1, :height, :width]
            inst_map, _ = hovernet_postprocess(nuclei.cpu().numpy(), out["hv_map"][0, :, :height, :width].float()
                                               .cpu().numpy(), None, self.magnification)
        if inst_map.shape != (height, width):
            raise ValueError(f"{name}: instance map {inst_map.shape} differs from the image {(height, width)}")
        inst = padded_instances(inst_map, features, self.feature_source.scale)
        ids = torch.unique(inst)
        ids = ids[ids > 0]
        emb = pool_cells(features, inst.to(features.device), ids.to(features.device))
        if "nuclei_type_map" in out:
            probs = torch.softmax(out["nuclei_type_map"].float()[0], dim=0)
            head = pool_cells(probs, inst.to(probs.device), ids.to(probs.device)).cpu().numpy()
        else:
            head = np.zeros((len(ids), 0), np.float32)
        return CellEmbeddings(ids.numpy().astype(np.int32), _centroids(inst, ids),
                              emb.cpu().numpy().astype(np.float32), head.astype(np.float32),
                              self.source, self.fingerprint, name)


def embed_files(embedder: CellEmbedder, items: Iterable[dict], out_dir: str | Path) -> tuple[list[Path], list[str]]:
    """Embed every item into ``<out_dir>/<name>.npz``, skipping files already cached for this model, source and
    image pixels (an image changed since, re-cropped or re-normalised under the same name, is embedded again).

    Args:
        items: dicts with ``image`` (path), ``name`` and optionally ``inst_map`` (a label npz of the dataset
            layout: its nuclei are embedded; without it the network's detected nuclei are).

    Returns:
        The cache files written or found, and one error message per item that failed (the others go on).
    """
    out_dir = Path(out_dir)
    paths, errors = [], []
    for item in items:
        path = out_dir / f"{item['name']}.npz"
        try:
            image = read_image(item["image"])
            digest = image_digest(image)
            if path.is_file():
                cached = CellEmbeddings.load(path)
                if (cached.fingerprint, cached.source, cached.image_digest) == (embedder.fingerprint,
                                                                                embedder.source, digest):
                    paths.append(path)
                    continue
            inst = read_label(item["inst_map"], "inst_map") if item.get("inst_map") else None
            cells = embedder(image, inst, str(item["image"]))
            paths.append(replace(cells, image_digest=digest).save(path))
        except (OSError, ValueError, KeyError) as e:
            errors.append(f"{item.get('image', item)}: {e}")
    return paths, errors
