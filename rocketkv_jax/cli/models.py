"""`rocketkv models`: the named models --model accepts, and whether they are installed and
converted."""

from __future__ import annotations

import json

from .common import add_command


def add_parser(sub):
    m = add_command(
        sub, "models", help="list the named models (context, installed, cached)",
        description="List the named models --model accepts: context length, whether their "
        "wheels are installed, and whether they are already converted into the user cache "
        "($ROCKETKV_JAX_CACHE or ~/.cache/rocketkv_jax). A model that is not installed is "
        "listed with its pip line.",
    )
    m.add_argument("--json", action="store_true", help="one JSON object per model")
    m.set_defaults(func=cmd_models)
    return m


def cmd_models(args) -> int:
    from ..model_store import cache_root, list_models

    rows = list_models()
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return 0
    yes = {True: "yes", False: "no"}
    table = [("NAME", "CONTEXT", "INSTALLED", "CACHED", "MODEL")]
    table += [(str(r["name"]), str(r["context_length"]), yes[r["installed"]],
               yes[r["cached"]], str(r["description"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
              + "  " + row[4])
    print(f"\ncache: {cache_root()}")
    for r in rows:
        if not r["installed"]:
            print(f"install {r['name']}: {r['install']}")
    return 0
