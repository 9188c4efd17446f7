"""``mmf_predict``: a test run that writes prediction files in each dataset's submission format
(MMF ``mmf_predict`` = ``run(predict=True)``: ``run_type=test`` + ``evaluation.predict=true``)."""

from __future__ import annotations

from mmf_plugins.cli.run import run


def predict(opts: list[str] | None = None) -> dict:
    return run(opts, predict=True)


def main() -> None:
    predict()


if __name__ == "__main__":
    main()
