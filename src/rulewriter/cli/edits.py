"""``rulewriter edits list|show|check DIR`` (the edit library on disk) and ``rulewriter export`` (edited weights)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import RulewriterError
from .common import add_command, add_json_arg, add_model_args, emit, load_model


def edit_files(target: str) -> list[Path]:
    """The edit files of a folder (``*.safetensors`` that are rulewriter edits), or one file; oldest first."""
    from ..core.edit import FORMAT
    from ..core.artefacts import read_safetensors

    root = Path(target).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise RulewriterError(f"no such folder or file: {root}")
    out = []
    for p in sorted(root.glob("*.safetensors")):
        try:
            _, header = read_safetensors(p, RulewriterError)
        except RulewriterError:
            continue  # not an edit (or unreadable): a library may hold other files
        if header.get("format") == FORMAT:
            out.append(p)
    return out


def summary(path: Path, edit) -> dict:
    """What an edit file holds: model, weights, layer(s), rank, its rules and when it was made."""
    meta = edit.meta
    parts = [meta] + [m for m in meta.get("composed", []) if isinstance(m, dict)]
    rules = [r for m in parts for r in (m.get("rules") or [])]
    return {
        "file": str(path),
        "model": ", ".join(sorted({str(m) for m, _ in edit.made_for()})) or None,
        "weights": ", ".join(sorted({str(w) for _, w in edit.made_for()})) or None,
        "layers": [{"layer": u.layer, "view": u.view, "rank": u.rank,
                    "rule_keys": 0 if u.keys is None else int(u.keys.shape[1])} for u in edit.updates],
        "rules": rules,
        "created": meta.get("created"),
        "after": meta.get("after", []),
        "fingerprint": edit.fingerprint(),
    }


def _rule_name(rule: dict) -> str:
    if not isinstance(rule, dict):
        return str(rule)
    if rule.get("name"):
        return str(rule["name"])
    src = ", ".join(rule.get("originals") or [])
    how = rule.get("texture") or rule.get("manipulated")
    how = ", ".join(how) if isinstance(how, list) else how
    return f"{src} ← {how}" if how else src or "?"


def load_library(target: str):
    from ..core.edit import Edit

    files = edit_files(target)
    if not files:
        raise RulewriterError(f"{target} holds no rulewriter edits (*.safetensors)")
    edits = [Edit.load(p) for p in files]
    # Oldest first: a sequential edit comes after the edits it was written on.
    order = sorted(range(len(files)), key=lambda i: (edits[i].meta.get("created") or "", str(files[i])))
    return [files[i] for i in order], [edits[i] for i in order]


def cmd_list(args) -> None:
    files, edits = load_library(args.dir)
    rows = [summary(p, e) for p, e in zip(files, edits)]
    lines = ["FILE\tMODEL\tWEIGHTS\tLAYER\tRANK\tRULES\tCREATED"]
    for r in rows:
        layer = ", ".join(f"{u['layer']} (view {u['view']})" for u in r["layers"])
        rank = "+".join(str(u["rank"]) for u in r["layers"])
        lines.append(f"{Path(r['file']).name}\t{r['model']}\t{r['weights']}\t{layer}\t{rank}\t{len(r['rules'])}\t"
                     f"{r['created']}")
    emit(rows, args.json, "\n".join(lines))


def cmd_show(args) -> None:
    from ..core.edit import Edit

    path = Path(args.file)
    edit = Edit.load(path)
    info = summary(path, edit)
    info["meta"] = edit.meta
    text = [f"{path}", f"  model     {info['model']}  weights {info['weights']}", f"  created   {info['created']}"]
    text += [f"  layer     {u['layer']} (view {u['view']}), rank {u['rank']}, {u['rule_keys']} rule keys kept"
             for u in info["layers"]]
    text += [f"  rule {i + 1}    {_rule_name(r)}" for i, r in enumerate(info["rules"])]
    if info["after"]:
        text.append(f"  written on {len(info['after'])} earlier edit(s): {', '.join(info['after'])}")
    emit(info, args.json, "\n".join(text))


def cmd_check(args) -> None:
    from ..core.sequential import missing_predecessors, rules_holding

    files, edits = load_library(args.dir)
    clf = load_model(args)
    for p, e in zip(files, edits):
        e.check_model(clf, str(p))
    rows = rules_holding(clf.model, edits)
    missing = missing_predecessors(edits)
    out, lines = [], ["FILE\tRULE\tRESTORED NOW\tWHEN WRITTEN\tHOLDS"]
    for p, e, rs in zip(files, edits, rows):
        names = [_rule_name(r) for r in summary(p, e)["rules"]]
        if not rs:
            lines.append(f"{p.name}\t-\t-\t-\tcannot tell (the edit kept no rule keys)")
        for r in rs:
            r = {"file": str(p), "name": names[r["rule"]] if r["rule"] < len(names) else None, **r}
            out.append(r)
            lines.append(f"{p.name}\t{r['name']}\t{r['restored']:.3f}\t{r['restored_when_written']:.3f}\t"
                         f"{'yes' if r['holds'] else 'NO'}")
    for i, fp in missing:
        lines.append(f"warning: {files[i].name} was written on edit {fp}, which is not in {args.dir}; "
                     "without it this edit is not the update that was solved")
    held = sum(r["holds"] for r in out)
    lines.append(f"{held} of {len(out)} rules hold with all {len(edits)} edits applied")
    emit({"rules": out, "missing_predecessors": [{"file": str(files[i]), "fingerprint": fp} for i, fp in missing]},
         args.json, "\n".join(lines))


def cmd_export(args) -> None:
    from ..core.edit import Edit
    from ..core.export import export_edited, same_file

    out = Path(args.out)
    inputs = [*args.edit] + ([args.weights] if args.weights and Path(args.weights).expanduser().exists() else [])
    for p in inputs:  # before any work: the user's files are never the destination
        for guarded in (p, str(p) + ".json"):
            if same_file(out, guarded):
                raise RulewriterError(f"--out {out} is an input ({guarded}); write the export to a new file")
    if not out.parent.exists():
        raise RulewriterError(f"output folder {out.parent} does not exist")
    if not args.edit:
        raise RulewriterError("give at least one --edit FILE to apply")
    edits = [Edit.load(p) for p in args.edit]
    clf = load_model(args)
    from ..models.registry import weights_available

    default = weights_available(clf.name) if not args.weights else None
    path = export_edited(clf, edits, out, inputs=inputs + ([default] if default else []), sources=args.edit)
    info = {"out": str(path), "model": clf.name, "base_weights": clf.weights_id, "edits": list(args.edit)}
    emit(info, args.json, f"wrote {path} ({clf.name} with {len(edits)} edit(s) applied; load it with --weights {path})")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``edits`` (list, show, check) and ``export``."""
    p = add_command(sub, "edits", "list, show and check a folder of edits",
                    description="An edit library is a folder of edit files. `list` shows what each holds (model, "
                                "weights hash, layer, rank, rules, when it was made), `show` one file in full, "
                                "`check` applies them all to the model and says whether each rule still maps its "
                                "key to its value (an edit made for another model or weights is refused).",
                    example="rulewriter edits list library/")
    actions = p.add_subparsers(dest="edits_command", required=True, metavar="ACTION", help="list, show or check")
    q = add_command(actions, "list", "one line per edit file of a folder",
                    example="rulewriter edits list library/")
    q.add_argument("dir", help="folder of edit files (or one file)")
    add_json_arg(q, "each edit's model, weights, layers, rules and creation time")
    q.set_defaults(func=cmd_list)
    q = add_command(actions, "show", "everything one edit file records",
                    example="rulewriter edits show library/gravel-wheel.safetensors")
    q.add_argument("file", help="an edit file")
    add_json_arg(q, "the edit's summary and its full description")
    q.set_defaults(func=cmd_show)
    q = add_command(actions, "check", "whether each rule of a library still holds with all its edits applied",
                    description="A rule holds when its key k* still closes at least half of the gap to its value "
                                "v* that it closed when it was written (ρ = 1 − ‖W k* − v*‖ / ‖W₀ k* − v*‖).",
                    example="rulewriter edits check library/ --model efficientnet-lite0")
    q.add_argument("dir", help="folder of edit files (or one file)")
    add_model_args(q)
    add_json_arg(q, "each rule's restored fraction now and when written")
    q.set_defaults(func=cmd_check)

    p = add_command(sub, "export", "write the model's weights with edits applied, for deployment",
                    description="A new full state dict (safetensors, written atomically) of --model with each "
                                "--edit applied; load it with `--weights FILE` or load_classifier(..., weights=FILE). "
                                "The weights file and the edits are only read; --out may not be one of them.",
                    example="rulewriter export --model efficientnet-lite0 --edit a.safetensors --edit b.safetensors "
                            "--out edited.safetensors")
    add_model_args(p)
    p.add_argument("--edit", action="append", default=[], help="an edit file to apply (repeat; summed in order)")
    p.add_argument("--out", required=True, help="the new weights file (.safetensors)")
    add_json_arg(p, "what was written")
    p.set_defaults(func=cmd_export)
