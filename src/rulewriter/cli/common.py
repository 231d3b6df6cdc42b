"""What the command groups share: the model options, statistics options, output and the help format.

Every command is built with :func:`add_command`, so each one has a one-line description, an example and
option help that shows the default.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Iterable

from ..errors import EditError, ModelError, RulewriterError, StatsError

DEFAULT_CACHE = Path(os.environ.get("RULEWRITER_CACHE", "~/.cache/rulewriter")).expanduser()
PRECISION_CHOICES = ["auto", "fp64", "fp32", "tf32x2", "tf32", "bf16"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Option help that ends with its default (when it has one), and descriptions and examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
            return text
        if isinstance(default, list) and not default:
            return text
        return f"{text} (default: %(default)s)"


def add_command(sub: argparse._SubParsersAction, name: str, summary: str, *, example: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand with a one-line ``summary`` (shown in ``rulewriter --help``), a description and an example.

    Example::

        p = add_command(sub, "models", "list the models rulewriter can load", example="rulewriter models --json")
    """
    text = summary[:1].upper() + summary[1:] + "." + (f"\n\n{description}" if description else "")
    return sub.add_parser(name, help=summary, description=text, epilog=f"example:\n  {example}",
                          formatter_class=HelpFormatter)


def add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: print ``what`` as one JSON document on stdout instead of text."""
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``rulewriter: error:`` line (exit status 2), like every other
    error, instead of the usage text followed by ``rulewriter CMD: error:``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"rulewriter: error: {message} (see `{self.prog} --help`)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights``, ``--device`` and ``--force``."""
    p.add_argument("--model", default="efficientnet-lite0", help="model name (see `rulewriter models`)")
    p.add_argument("--weights", default=None,
                   help="local weights file (safetensors or a torch state_dict), a torchvision weights name "
                        "(e.g. IMAGENET1K_V1), or none for random weights; default: the model's own weights "
                        "(see `rulewriter models`)")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available), cpu, cuda, cuda:1 (under torchrun: each rank's own GPU)")
    p.add_argument("--force", action="store_true",
                   help="use statistics or edits although their metadata says they were made for another model "
                        "or other weights")


#: ``--layer`` of the commands whose validated rewrite chooses among the model's candidate layers.
CHOSEN_LAYER_HELP = ("dotted layer name (default: a validated edit is written at the model's candidate layers "
                     "and kept at the one its validation prefers, e.g. efficientnet-lite0's blocks 15 and 11 "
                     "and head conv; otherwise the model's default layer)")


def add_edit_args(p: argparse.ArgumentParser, layer_help: str | None = None) -> None:
    """The layer, view and statistics options shared by ``stats``, ``edit``, ``heatmap`` and the studies."""
    p.add_argument("--layer", default=None,
                   help=layer_help or "dotted layer name (default: the model's default layer)")
    p.add_argument("--view", type=int, default=2, choices=[1, 2, 3, 4], help="memory view (thesis Fig. 2-3)")
    p.add_argument("--stats", default=None, help="precomputed statistics file (from `rulewriter stats --out`)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="how key products are formed; sums are float64 (auto: tf32x2 on CUDA, fp32 on CPU)")
    p.add_argument("--amp", default=None, choices=["bf16"], help="run the statistics forward pass under bf16 autocast")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes for the statistics pass (default: up to 8 on CUDA, 0 on CPU)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="statistics cache folder")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model(args: argparse.Namespace):
    """The classifier named by ``--model``/``--weights`` on ``--device``.

    The library's messages name its keyword (``weights=``); on the command line they name the option.
    """
    from ..models.registry import load_classifier

    try:
        return load_classifier(args.model, weights=args.weights, device=args.device)
    except ModelError as e:
        raise ModelError(option_words(str(e))) from None


def option_words(message: str) -> str:
    """A library message in the command line's words: ``weights='none'`` → ``--weights none`` and so on.

    Example:
        >>> option_words("pass weights=<file> or weights='none'")
        'pass --weights <file> or --weights none'
    """
    for lib, cli in (("weights='none'", "--weights none"), ("weights= was not given", "--weights was not given"),
                     ("weights=<", "--weights <"), ("weights=", "--weights ")):
        message = message.replace(lib, cli)
    return message


def resolve_layer(args: argparse.Namespace, clf) -> str:
    """``--layer``, or the model's default layer (said on stderr)."""
    if args.layer:
        return args.layer
    if not clf.default_layer:
        raise RulewriterError(f"model {clf.name!r} has no default layer; pass --layer (see `rulewriter layers`)")
    print(f"rulewriter: using default layer {clf.default_layer} for {clf.name}", file=sys.stderr)
    return clf.default_layer


def edit_layers(args: argparse.Namespace, clf, calibration) -> list[str]:
    """The layers a validated rewrite (``edit``, ``mitigate``'s images rewrite) writes its rule at:
    ``--layer``; else, where the edit is validated (exemplar views and calibration images, the automatic
    rank and context) and no ``--stats FILE`` (one layer's statistics) is given, the model's candidate
    layers, default first (:attr:`~rulewriter.models.registry.Classifier.candidate_layers`); else the
    default layer (said on stderr)."""
    if args.layer or getattr(args, "stats", None) or calibration is None or getattr(args, "views", 1) <= 0 \
            or getattr(args, "rank", None) is not None or getattr(args, "context", "auto") != "auto" \
            or len(clf.candidate_layers) < 2:
        return [resolve_layer(args, clf)]
    print(f"rulewriter: writing the rule at {', '.join(clf.candidate_layers)} and keeping the layer its "
          "validation prefers (--layer names one)", file=sys.stderr)
    return list(clf.candidate_layers)


def emit(obj: Any, as_json: bool, text: str) -> None:
    """Print ``obj`` as JSON with ``--json``, else the human-readable ``text``."""
    print(json.dumps(obj, indent=2) if as_json else text)


def load_stats(args: argparse.Namespace, clf, layer: str, data: str | None, samples: int | None):
    """The second moment for ``layer``: from ``--stats FILE`` (checked to match) or collected from ``data``."""
    from ..core.stats import SecondMoment

    if getattr(args, "stats", None):
        s = SecondMoment.load(args.stats)
        meta = s.meta
        if meta.get("layer") not in (None, layer) or str(meta.get("view", args.view)) != str(args.view):
            raise StatsError(f"{args.stats} holds statistics of {meta.get('layer')} view {meta.get('view')}")
        if not getattr(args, "force", False):
            s.check_model(clf, source=args.stats)
        return s
    return load_stats_at(args, clf, [layer], data, samples)[layer]


def load_stats_at(args: argparse.Namespace, clf, layers: list[str], data: str | None, samples: int | None) -> dict:
    """:func:`load_stats` at several layers (``--stats FILE`` holds one): collected from one pass over ``data``
    (:func:`rulewriter.core.stats.collect_second_moments`)."""
    from ..core.stats import collect_second_moments

    if getattr(args, "stats", None):
        return {layer: load_stats(args, clf, layer, data, samples) for layer in layers}
    got = collect_second_moments(  # commands without the precision options (inverse-edit) take the defaults
        clf, layers, data, view=args.view, samples=samples, batch_size=args.batch_size, device=args.device,
        precision=getattr(args, "precision", "auto"), amp=getattr(args, "amp", None),
        num_workers=getattr(args, "workers", None), shard=getattr(args, "shard", None),
        cache_dir=None if args.no_cache else args.cache_dir, progress=not args.quiet,
    )
    for s in got.values():
        say_cached(s)
    return got


def calibration_images(args: argparse.Namespace, why_not: str | None = None) -> tuple:
    """(statistics data, its samples, calibration images, a note for stderr) for a command that validates
    its edit under the locality budget (``edit``, ``mitigate``); the calibration images are None, with the
    reason in the note, where the edit falls back to the closed form.

    Calibration images come from ``--calibration-data``, else from the ``--stats-data`` folder, split so
    that no image is in both (:func:`rulewriter.core.generalise.calibration_split`). ``why_not``: a reason
    the command's own options rule validation out. Checked before any work.
    """
    from ..core.locality import MIN_CALIBRATION_IMAGES, calibration_split
    from ..models.data import list_images

    data, samples = args.stats_data, args.stats_samples
    stats_file = getattr(args, "stats", None)
    if why_not is None and args.calibration_data:
        cal = list_images(args.calibration_data)
        if not cal:
            raise RulewriterError(f"--calibration-data {args.calibration_data} holds no images")
        if data and not stats_file:
            overlap = {p.resolve() for p in cal} & {p.resolve() for p in list_images(data)}
            if overlap:
                raise RulewriterError(f"--calibration-data shares {len(overlap)} image(s) with --stats-data (e.g. "
                                      f"{sorted(overlap)[0]}); calibration images must not be statistics images")
        return data, samples, cal, None
    if why_not is None and data and not stats_file:
        stats_paths, cal = calibration_split(data, samples)
        if cal:
            return stats_paths, None, cal, (f"{len(cal)} of the --stats-data images are calibration images for "
                                            f"the locality budget, {len(stats_paths)} give the statistics")
        why_not = f"too few --stats-data images to set {MIN_CALIBRATION_IMAGES} aside for calibration images"
    elif why_not is None:
        why_not = "--stats FILE carries no images to calibrate on (add --calibration-data DIR)"
    return data, samples, None, f"the closed form, not validated: {why_not}"


def say_cached(stats) -> None:
    """Say on stderr that ``stats`` (collected with a cache folder) came from the cache, and from which file."""
    if getattr(stats, "source", None) is not None:  # so that a stale entry can be recognised and removed
        print(f"rulewriter: using cached statistics {stats.source} ({stats.count} samples; --no-cache to "
              "recollect)", file=sys.stderr)


def load_edit(args: argparse.Namespace, clf, path: str):
    """The rule edit in ``path``, checked to be made for ``clf``'s model and weights (unless ``--force``)."""
    from ..core.edit import Edit

    edit = Edit.load(path)
    if not getattr(args, "force", False):
        edit.check_model(clf, source=path)
    return edit


def check_finite_outputs(model, source: str, x) -> None:
    """Refuse (EditError) a model whose outputs on the batch ``x`` hold NaN or inf: an edit with finite but
    huge factors can leave the weights finite and still overflow the activations. ``source`` names it."""
    import torch

    with torch.no_grad():
        out = model(x)
    if not torch.isfinite(out).all():
        raise EditError(f"with {source} applied, the model's outputs are NaN or inf (its factors are too "
                        "large); the edit is refused")


def check_rule_args(args: argparse.Namespace) -> Path:
    """Validate the exemplar options shared by ``edit`` and ``inverse-edit`` before any work; returns --out."""
    n = len(args.original)
    if not n:
        raise RulewriterError("give at least one --original IMG with its --mask MASK")
    if len(args.mask) != n:
        raise RulewriterError(f"got {n} --original and {len(args.mask)} --mask; give one mask per original")
    if args.manipulated and len(args.manipulated) != n:
        raise RulewriterError(f"got {n} --original and {len(args.manipulated)} --manipulated; they pair up in order")
    if not args.manipulated and not args.texture:
        raise RulewriterError("give --manipulated images, or a --texture to paste into the masks")
    if not args.stats and not args.stats_data:
        raise RulewriterError("give --stats-data DIR (images to collect key statistics from) or --stats FILE")
    return Path(args.out)  # checked by check_args before the command ran


def add_exemplar_args(p: argparse.ArgumentParser) -> None:
    """The exemplar options of ``edit`` and ``inverse-edit``: originals, manipulated images or a texture, masks."""
    p.add_argument("--original", action="append", default=[], help="exemplar photo (repeat)")
    p.add_argument("--manipulated", action="append", default=[], help="the exemplar with the concept changed (repeat)")
    p.add_argument("--mask", action="append", default=[], help="mask PNG, white where the concept is (repeat)")
    p.add_argument("--texture", default=None,
                   help="instead of --manipulated: a texture (path or skimage:NAME) pasted into the masks")


# ------------------------------------------------------------------------------------------ checked before any work
#: Options whose value counts something: at least one (``None`` keeps the option's default meaning).
POSITIVE_OPTIONS = ("samples", "stats_samples", "batch_size", "topk", "max_negatives", "steps")
#: Options that may be zero but not negative (``--n-negatives 0``: the positive alone, as in the library).
NONNEGATIVE_OPTIONS = ("workers", "n_negatives", "rounds")
#: Options that name files a command reads; an output may be none of them.
INPUT_OPTIONS = ("stats", "weights", "edit", "after", "original", "manipulated", "mask", "texture", "images", "parts",
                 "concept_image", "concept_mask", "image", "compare", "calibration")


def check_args(args: argparse.Namespace) -> None:
    """Everything about the options that can be checked before a model is loaded: counts, the device and
    every output (see :func:`check_output`). ``rulewriter.cli.main`` calls it for every command."""
    for name in POSITIVE_OPTIONS:
        v = getattr(args, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise RulewriterError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    for name in NONNEGATIVE_OPTIONS:
        v = getattr(args, name, None)
        if isinstance(v, int) and v < 0:
            raise RulewriterError(f"--{name.replace('_', '-')} must be 0 or more, got {v}")
    if getattr(args, "device", None) not in (None, "auto"):
        check_device(args.device)
    inputs = list(input_files(args))
    folders = [Path(v) for v in (getattr(args, n, None) for n in INPUT_FOLDERS) if isinstance(v, str) and v]
    if getattr(args, "out_dir", None):
        check_output(args.out_dir, inputs + folders, folder=True, option="--out-dir")
    if getattr(args, "out", None):
        kind = getattr(args, "out_kind", "file")
        check_output(args.out, inputs + (folders if kind == "folder" else []), folder=kind == "folder",
                     sidecar=kind == "file+json", weights=model_weight_files(args))


#: Options that name image folders a command reads: a folder output may not be one of them or inside one
#: (its PNGs would be read as images, or refused as unlabelled, the next time).
INPUT_FOLDERS = ("data", "images", "stats_data", "negatives", "calibration", "accuracy_data")


def check_device(device: str) -> None:
    """A torch device string this machine has: ``cpu``, ``cuda``/``cuda:N`` only with that GPU, ``mps`` on Macs."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise RulewriterError(f"--device {device} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RulewriterError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RulewriterError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RulewriterError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise RulewriterError(f"--device {device}: rulewriter runs on cpu, cuda or mps")


def input_files(args: argparse.Namespace) -> Iterable[Path]:
    """The files named by the options in :data:`INPUT_OPTIONS` (``NAME=FILE`` forms give their file)."""
    for name in INPUT_OPTIONS:
        v = getattr(args, name, None)
        for item in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(item, str) and item and not item.startswith("skimage:"):
                yield Path(item.split("=", 1)[1] if name == "compare" and "=" in item else item)


def model_weight_files(args: argparse.Namespace | None = None) -> list[Path]:
    """Files that hold model weights here: ``--weights``, the model's own weights file, EfficientNet-Lite0's
    packaged file and the torch hub cache's checkpoints. No output may be one of them."""
    import torch

    from ..models.registry import weights_available

    found = []
    w = getattr(args, "weights", None)
    if isinstance(w, str) and w.lower() not in ("none", "random"):
        found.append(Path(w))
    for name in {"efficientnet-lite0", getattr(args, "model", None) or "efficientnet-lite0"}:
        try:
            path = weights_available(name)
        except (RulewriterError, ImportError, OSError):
            path = None
        if path:
            found.append(Path(path))
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if hub.is_dir():
        found.extend(p for p in hub.iterdir() if p.is_file())
    return found


WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".tar")


def check_output(path: str | os.PathLike[str], inputs: Iterable[Path] = (), *, folder: bool = False,
                 sidecar: bool = False, weights: Iterable[Path] = (), option: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written or must not be: returns it as a Path.

    A file output may not be a folder (or end in ``/``), its folder must exist and be writable, and it may
    not be (after resolving symlinks) one of the command's ``inputs``, one of the model ``weights`` files or
    an existing torch checkpoint. A folder output may not be a file, nor one of the ``inputs`` (files or
    folders) or inside one, and the nearest existing folder above it must be writable. With ``sidecar`` the ``.json`` written beside the file is checked too.

    Example::

        >>> check_output("C.safetensors", [Path("C.safetensors")])       # doctest: +SKIP
        RulewriterError: --out C.safetensors is also an input of this command; choose another file
    """
    text = os.fspath(path)
    out = Path(text).expanduser()
    if folder:
        if out.exists() and not out.is_dir():
            raise RulewriterError(f"{option} {text} exists and is not a folder")
        real = out.resolve()
        for p in inputs:
            q = p.expanduser().resolve()
            if q == real or q in real.parents:
                raise RulewriterError(f"{option} {text} is inside {p}, an input of this command; its files would "
                                      "mix with the inputs: choose another folder")
        top = out
        while not top.exists():
            top = top.parent
        if not top.is_dir():
            raise RulewriterError(f"{option} {text}: {top} is not a folder")
        probe_writable(top, option, text)
        return out
    if text.endswith(("/", os.sep)) or out.is_dir():
        raise RulewriterError(f"{option} {text} is a folder; give a file name (e.g. {out / 'out.safetensors'})")
    if not out.parent.is_dir():
        raise RulewriterError(f"{option} {text}: output folder {out.parent} does not exist")
    real = out.resolve()
    for p in inputs:
        if p.expanduser().resolve() == real:
            raise RulewriterError(f"{option} {text} is also an input of this command ({p}); choose another file")
    if any(p.expanduser().resolve() == real for p in weights) or (
            real.suffix.lower() in WEIGHT_SUFFIXES and real.is_file()):
        raise RulewriterError(f"{option} {text} is a model weights file; rulewriter never overwrites weights")
    if out.exists() and not os.access(out, os.W_OK):
        raise RulewriterError(f"{option} {text} is not writable")
    probe_writable(out.parent, option, text)
    if sidecar:
        check_output(out.with_name(out.name + ".json"), inputs, weights=weights, option="the description beside it,")
    return out


def probe_writable(folder: Path, option: str, text: str) -> None:
    """Create and remove a file in ``folder``: the only test that /proc, read-only mounts and ACLs all answer."""
    probe = folder / f".rulewriter-probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise RulewriterError(f"{option} {text}: cannot write in {folder} ({e.strerror})") from None
    os.close(fd)
    probe.unlink(missing_ok=True)
