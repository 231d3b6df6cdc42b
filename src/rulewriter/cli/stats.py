"""``rulewriter stats`` and ``rulewriter merge-stats``: the second moment C of a layer's keys."""
from __future__ import annotations

import argparse

from ..errors import RulewriterError
from .common import add_command, add_edit_args, add_json_arg, add_model_args, emit, load_model, load_stats, resolve_layer


def cmd_stats(args) -> None:
    from ..core import distributed

    clf = load_model(args)  # --out was checked by check_args
    layer = resolve_layer(args, clf)
    s = load_stats(args, clf, layer, args.data, args.samples)
    info = {"layer": layer, "view": args.view, "key_dim": s.dim, "count": s.count, "precision": s.precision,
            "processes": distributed.world_size()}
    if not distributed.is_main():
        return  # every rank holds the same merged result; one writes and prints it
    if args.shard:
        info["shard"] = args.shard
    if args.out:
        meta = s.meta or {"model": clf.name, "weights": clf.weights_id, "layer": layer,
                                            "view": args.view, "key_dim": s.dim, "preprocess": clf.preprocess.describe()}
        s.save(args.out, {**meta, "data_path": str(args.data)})
        info["out"] = str(args.out)
    emit(info, args.json, " ".join(f"{k}={v}" for k, v in info.items()))


def cmd_merge_stats(args) -> None:
    from ..core.stats import merge_files

    s, meta = merge_files(args.parts)
    if meta.get("missing_shards") and not args.allow_missing:
        raise RulewriterError(f"shards {', '.join(meta['missing_shards'])} are missing from the parts; give every "
                              "shard, or --allow-missing to merge the ones there are")
    s.save(args.out, meta)
    info = {"out": args.out, "count": s.count, "parts": len(args.parts)}
    text = f"merged {len(args.parts)} files → {args.out}"
    if meta.get("missing_shards"):
        info["missing_shards"] = meta["missing_shards"]
        text += f" (missing shards: {', '.join(meta['missing_shards'])})"
    emit(info, args.json, text)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``stats``, ``merge-stats``."""
    p = add_command(sub, "stats", "collect the second moment of a layer's keys",
                    description="C = E[k kᵀ] over the layer's keys at every location of every image (summed in "
                                "float64), cached under --cache-dir and optionally saved with --out for `edit "
                                "--stats`. Under torchrun each rank reads its share of the images.",
                    example="rulewriter stats --data ~/imagenet/val --samples 5000 --out C.safetensors")
    add_model_args(p)
    add_edit_args(p)
    p.add_argument("--data", required=True, help="image folder")
    p.add_argument("--samples", type=int, default=None, help="number of images (default: all)")
    p.add_argument("--out", default=None, help="also save the statistics to this safetensors file")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only the I-th of N shards of the images (for machines without a shared process group; "
                        "add the parts with merge-stats)")
    add_json_arg(p, "the layer, key dimension and count")
    p.set_defaults(func=cmd_stats)
    p = add_command(sub, "merge-stats", "add up statistics files from several processes or machines",
                    description="Sums the statistics of `rulewriter stats --shard I/N` runs (same model, "
                                "layer and view) into one file and names any missing shard.",
                    example="rulewriter merge-stats --out C.safetensors part0.safetensors part1.safetensors")
    p.add_argument("--out", required=True, help="the merged statistics file (.safetensors)")
    p.add_argument("--allow-missing", action="store_true",
                   help="merge although some shards of --shard I/N runs are missing (they are named in the file)")
    add_json_arg(p, "the merged count and parts")
    p.add_argument("parts", nargs="+", help="statistics files from `rulewriter stats --shard I/N --out PART`")
    p.set_defaults(func=cmd_merge_stats)
