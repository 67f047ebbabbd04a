"""Fully connected CRF (pydensecrf2, module ``pydensecrf``) with the two parameter sets the EPS
pipeline refers to (EPS infer.py _crf_with_alpha, deeplab-pytorch libs/utils/crf.py DenseCRF):

* ``psa``: the PSA/EPS CAM refinement (``crf_inference`` of psa/EPS): Gaussian sxy 3 / compat 3,
  bilateral sxy 80 / srgb 13 / compat 10. The scores are [bg; cams] with bg = (1 - max_c cam)^alpha
  (see :func:`cam_crf`); not used for the published pseudo-masks (EPS README).
* ``deeplab``: the DeepLab-v2 post-processing (kazuto1011/deeplab-pytorch): ITER_MAX 10, POS_W 3,
  POS_XY_STD 1, BI_W 4, BI_XY_STD 67, BI_RGB_STD 3; used by EPS only for a paper comparison and by
  the segmentation stage (infer_seg.py).

:func:`dense_crf` is the one reusable entry point: uint8 RGB image + (K,H,W) scores -> (K,H,W)
probabilities (each pixel sums to 1).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

CRF_PRESETS: Dict[str, Dict[str, float]] = {
    # psa / EPS infer.py crf_inference (scale_factor 1); iterations are --crf_t (default 10).
    "psa": dict(n_iters=10, pos_w=3, pos_xy_std=3, bi_w=10, bi_xy_std=80, bi_rgb_std=13),
    # DeepLab-v2 CRF (deeplab-pytorch configs/voc12.yaml): 4 / 67 / 3 / 3 / 1, 10 iterations.
    "deeplab": dict(n_iters=10, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3),
}


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the dense CRF needs pydensecrf2 (pip install pydensecrf2==1.1; "
                          "module name 'pydensecrf')") from e
    return dcrf, unary_from_softmax


def dense_crf(image: np.ndarray, probs: np.ndarray, *, n_iters: int = 10, pos_w: float = 3,
              pos_xy_std: float = 1, bi_w: float = 4, bi_xy_std: float = 67, bi_rgb_std: float = 3,
              clip: float = 1e-5) -> np.ndarray:
    """Run a dense CRF and return the (K,H,W) float32 marginals.

    image: uint8 RGB (H,W,3). probs: (K,H,W) non-negative scores; the unary is -log(max(p, clip))
    (pydensecrf's unary_from_softmax; the scores need not sum to 1, as with psa's [bg; cams]).
    Defaults are the DeepLab parameters; ``**CRF_PRESETS['psa']`` gives the psa ones."""
    dcrf, unary_from_softmax = _densecrf()
    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf needs a uint8 RGB image (H,W,3), got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (K,H,W) with (H,W) = {image.shape[:2]}, got {probs.shape}")
    n_labels, h, w = probs.shape
    if n_labels < 1:
        raise ValueError("dense_crf needs at least one label")
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=clip)))
    crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    # pydensecrf keeps a pointer to the image: pass a contiguous copy that outlives inference.
    rgb = np.ascontiguousarray(image).copy()
    crf.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=rgb, compat=bi_w)
    q = crf.inference(int(n_iters))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def cam_crf(image: np.ndarray, cams: np.ndarray, alpha: float, n_iters: int = 10,
            preset: str = "psa", bg: Optional[np.ndarray] = None) -> np.ndarray:
    """psa/EPS CAM refinement: scores = [bg; cams] with bg = (1 - max_k cam_k)^alpha (or a given
    background map), then :func:`dense_crf` with the ``preset`` parameters.

    cams: (K,H,W) normalised CAMs of the present classes. Returns (K+1,H,W) probabilities,
    row 0 = background, row k+1 = cams[k]."""
    if preset not in CRF_PRESETS:
        raise ValueError(f"unknown CRF preset {preset!r}; choose one of {sorted(CRF_PRESETS)}")
    cams = np.asarray(cams, dtype=np.float32)
    if bg is None:
        # Published: bg_score = np.power(1 - np.max(cams, 0), alpha); an image with no class
        # gets a background of 1 everywhere.
        top = cams.max(axis=0) if cams.shape[0] else np.zeros(cams.shape[1:], np.float32)
        bg = np.power(1 - top, alpha)
    scores = np.concatenate([np.asarray(bg, np.float32)[None], cams], axis=0)
    params = dict(CRF_PRESETS[preset], n_iters=n_iters)
    return dense_crf(image, scores, **params)


def crf_mask(probs: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(K+1,H,W) CRF output with background first -> uint8 mask in 0..C (0 bg, k -> keys[k-1]+1)."""
    lut = np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)
    return lut[np.asarray(probs).argmax(axis=0)]
