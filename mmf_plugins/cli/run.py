"""``mmf_run``: MMF's command line (``mmf_run config=... model=... datasets=... key=value ...``).

Thin: parse, build config, hand over to the trainer. ``--help`` lists the registered models,
datasets, metrics and processors. Errors of the user's making end as one clear line (exit 2).
"""

from __future__ import annotations

import argparse
import sys

HELP = """usage: mmf_run config=<yaml> model=<name> datasets=<name[,name]> [run_type=train_val] [key=value ...]

Options follow MMF's grammar: key=value pairs (or alternating 'key value'); any config key can be
overridden with its dotted path, e.g. training.max_updates=100 optimizer.params.lr=1e-4.
Merge order: configs/defaults.yaml < model defaults < dataset defaults < config= file < command line.
run_type: train | val | test | train_val | train_inference | train_val_test (substring semantics).
Environment: MMF_DATA_DIR, MMF_CACHE_DIR, MMF_SAVE_DIR, MMF_USER_DIR, MMF_LOG_DIR, MMF_REPORT_DIR.

example: mmf_run config=projects/soho/configs/vqa2/demo.yaml model=soho datasets=vqa2 run_type=train_val
"""


def _registered_help() -> str:
    from mmf_plugins import setup_imports
    from mmf_plugins.common.registry import registry

    setup_imports()
    lines = []
    for kind, title in (("model", "models"), ("builder", "datasets"), ("metric", "metrics"),
                        ("processor", "processors"), ("optimizer", "optimizers"), ("scheduler", "schedulers"),
                        ("extractor", "extractors"), ("converter", "converters")):
        lines.append(f"{title}: {', '.join(registry.names(kind)) or '(none)'}")
    return "\n".join(lines)


def run(opts: list[str] | None = None, predict: bool = False) -> dict:
    """Programmatic entry (MMF ``mmf_cli.run.run``)."""
    from mmf_plugins.common.config import ConfigError, build_config
    from mmf_plugins.common.registry import RegistryError
    from mmf_plugins.trainers.mmf_trainer import run_from_config
    from mmf_plugins.zoo.conversion import CheckpointError

    cli = opts is None
    if opts is None:
        parser = argparse.ArgumentParser(prog="mmf_predict" if predict else "mmf_run", add_help=False)
        parser.add_argument("-h", "--help", action="store_true")
        parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
        parser.add_argument("opts", nargs=argparse.REMAINDER)
        args = parser.parse_args()
        if args.help:
            print(HELP)
            print(_registered_help())
            sys.exit(0)
        opts = args.opts
    opts = list(opts)
    if predict:
        opts = [o for o in opts if not o.startswith("run_type=")] + ["run_type=test", "evaluation.predict=true"]
    try:
        config = build_config(opts)
        return run_from_config(config)
    except (ConfigError, RegistryError, CheckpointError, FileNotFoundError) as e:
        if not cli:
            raise
        print(f"mmf_run: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point (returns None so the results dict is not echoed by sys.exit)."""
    run()


if __name__ == "__main__":
    main()
