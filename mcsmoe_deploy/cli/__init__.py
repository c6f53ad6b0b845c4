"""The `mcsmoe` command line: argument parsing only; every subcommand calls the public API.

compress: `mcsmoe compress`, `mcsmoe demo`; export: `mcsmoe export` / `mcsmoe-export`;
serve: `mcsmoe run`, `bench`, `compare`, `triton`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ParameterError, Terminated, UserError
from . import compress, export, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcsmoe",
        description="Merge, then compress sparse mixture-of-experts models (MC-SMoE, arXiv 2310.01334), export "
                    "them to ONNX and serve them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    compress.add_parsers(sub)
    export.add_parsers(sub)
    serve.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        return args.run(args)
    except ParameterError as exc:
        # the library names its own parameter; the user typed a flag (commands list theirs in parameter_flags)
        flag = getattr(args, "parameter_flags", {}).get(exc.parameter)
        print(f"mcsmoe: error: {exc.renamed(flag) if flag else exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"mcsmoe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mcsmoe: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("mcsmoe: terminated (SIGTERM)", file=sys.stderr)
        return 143


def main_export(argv: list[str] | None = None) -> int:
    """`mcsmoe-export ...`, the same as `mcsmoe export ...`."""
    return main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
