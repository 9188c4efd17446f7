"""``mmf_zoo``: list, download and verify the entries of the model and dataset zoo.

    mmf_zoo list [--kind models|datasets]
    mmf_zoo download KEY [--cache_dir DIR] [--data_dir DIR] [--offline]
    mmf_zoo verify KEY [--cache_dir DIR] [--data_dir DIR]

Thin layer over ``mmf_plugins.zoo`` (zoo_config, download). MMF has no such command (it downloads
only as a side effect of ``mmf_run``); keys and cache folders are MMF's. Errors end as one message on
stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from mmf_plugins.common.registry import RegistryError
from mmf_plugins.zoo.conversion import CheckpointError
from mmf_plugins.zoo.zoo_config import ZOO_KINDS, ZooError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmf_zoo", description="List, download and verify zoo entries (models, datasets).")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="table of zoo keys, whether cached, and what they are")
    ls.add_argument("--kind", choices=ZOO_KINDS, default=None)
    for name, text in (
        ("download", "fetch, verify and extract an entry into the cache"),
        ("verify", "re-hash the cached files of an entry against the zoo yaml"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("key", help="zoo key, e.g. vinvl.pretrained or vqa2 (models:/datasets: prefix if ambiguous)")
        cmd.add_argument("--kind", choices=ZOO_KINDS, default=None)
    for cmd in sub.choices.values():
        cmd.add_argument(
            "--cache_dir", default=None, help="MMF cache dir (default $MMF_CACHE_DIR or ~/.cache/torch/mmf)"
        )
        cmd.add_argument("--data_dir", default=None, help="data dir (default $MMF_DATA_DIR or <cache_dir>/data)")
    sub.choices["download"].add_argument(
        "--offline", action="store_true", default=None, help="no network: only verify files already put in place"
    )
    sub.choices["download"].add_argument("--no_progress", action="store_true")
    return p


def _data_dir(args):
    from pathlib import Path

    from mmf_plugins.zoo.download import resolve_data_dir

    if args.data_dir:
        return Path(args.data_dir).absolute()
    if args.cache_dir:
        return Path(args.cache_dir).absolute() / "data"
    return resolve_data_dir()


def _list(args) -> int:
    from mmf_plugins.zoo.download import is_built
    from mmf_plugins.zoo.zoo_config import list_entries

    data_dir = _data_dir(args)
    rows = [
        (e.key, e.kind[:-1], e.version, "yes" if is_built(e, data_dir) else "no", e.description)
        for e in list_entries(args.kind)
    ]
    header = ("key", "kind", "version", "cached", "description")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    print(fmt.format(*header))
    for row in rows:
        desc = row[4] if len(row[4]) <= 90 else row[4][:87] + "..."
        print(fmt.format(*row[:4], desc))
    print(f"\ncache: {data_dir}")
    return 0


def _download(args) -> int:
    from mmf_plugins.zoo.download import ensure_downloaded

    path = ensure_downloaded(
        args.key, data_dir=_data_dir(args), kind=args.kind, progress=not args.no_progress, offline=args.offline
    )
    print(path)
    return 0


def _verify(args) -> int:
    from mmf_plugins.zoo.download import verify_entry

    checks = verify_entry(args.key, data_dir=_data_dir(args), kind=args.kind)
    failed = 0
    for c in checks:
        print(f"{c.status:<16} {c.path}")
        if c.status == "mismatch":
            print(f"{'':<16} expected {c.expected}\n{'':<16} got      {c.got}")
        elif c.status == "unverified":
            print(f"{'':<16} sha256 {c.got} (no hashcode in the zoo yaml)")
        failed += c.status in ("mismatch", "missing")
    if failed:
        print(f"{failed} file(s) failed; run `mmf_zoo download {args.key}` to fetch them again", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    import mmf_plugins

    mmf_plugins.setup_imports()
    args = _parser().parse_args(argv)
    command = {"list": _list, "download": _download, "verify": _verify}[args.command]
    try:
        code = command(args)
    except (ZooError, CheckpointError, RegistryError) as e:
        sys.exit(f"mmf_zoo: error: {e}")
    if code:
        sys.exit(code)
    return 0


if __name__ == "__main__":
    main()
