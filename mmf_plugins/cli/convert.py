"""``mmf_convert``: turn an official checkpoint into a safetensors file of our key layout.

    mmf_convert --converter vinvl --input checkpoint-2000000/pytorch_model.bin --output vinvl.safetensors \
        [--report report.json] [--weights_file GLOB] [--option key=value ...]

Reads the checkpoint with ``load_weights_file`` (or hands the folder to a converter that declares
``accepts_directory``), runs the registered converter, writes safetensors atomically, prints the
conversion report and exits non-zero when keys mismatch (the weights are then not written). Thin layer
over ``mmf_plugins.zoo.loading``; MMF has no equivalent (it loads foreign checkpoints only at run time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from mmf_plugins.common.registry import RegistryError
from mmf_plugins.zoo.conversion import CheckpointError
from mmf_plugins.zoo.zoo_config import ZooError


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option needs key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value else ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmf_convert", description="Convert an official checkpoint to safetensors.")
    p.add_argument("--converter", required=True, help="registered converter name (soho, vinvl, vl_bert, ...)")
    p.add_argument("--input", required=True, help="official checkpoint file, or a folder holding it")
    p.add_argument("--output", required=True, help="output .safetensors file")
    p.add_argument("--report", default=None, help="also write the conversion report as JSON here")
    p.add_argument("--weights_file", default="", help="glob picking the weights inside --input when it is a folder")
    p.add_argument(
        "--option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="converter option (value parsed as YAML); repeatable",
    )
    return p


def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    import mmf_plugins
    from mmf_plugins.zoo.loading import convert_checkpoint, save_safetensors

    mmf_plugins.setup_imports()
    args = _parser().parse_args(argv)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        sys.exit(f"mmf_convert: error: --output must end with .safetensors, got {output}")
    try:
        state_dict, report = convert_checkpoint(args.converter, args.input, args.weights_file, **dict(args.option))
        print(report.summary())
        if args.report:
            _write_json(report.to_dict(), Path(args.report))
        if report.mismatched:
            sys.exit(f"mmf_convert: error: {len(report.mismatched)} mismatched key(s); {output} was not written")
        save_safetensors(
            state_dict,
            output,
            metadata={"format": "pt", "converter": args.converter, "source": Path(args.input).name},
        )
    except (ZooError, CheckpointError, RegistryError) as e:
        sys.exit(f"mmf_convert: error: {e}")
    print(f"wrote {len(state_dict)} tensors to {output}")
    return 0


if __name__ == "__main__":
    main()
