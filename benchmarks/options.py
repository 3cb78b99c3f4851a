"""The command line every benchmark shares: ``--quick``, ``--work``, ``--models``, ``--size``.

A benchmark script starts with::

    from options import bench_parser, pick_spec

    ap = bench_parser(__doc__)  # the shared options
    ap.add_argument("--cells", type=int)  # then its own
    a = ap.parse_args()
    spec = pick_spec(a, QUICK, FULL)  # --quick / --size choose the generated slide

``run.py`` passes the same options on to each benchmark it starts (:func:`forward`).

Scripts run as ``python benchmarks/NAME.py`` from any folder: Python puts the script's
folder first on ``sys.path``, so the scripts import each other as top-level modules
(``from options import …``, ``from common import …``) and ``wsiflow`` is the installed
package; nothing edits ``sys.path``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import SlideSpec

__all__ = ["DEFAULT_WORK", "MODEL_CHOICES", "add_common_args", "bench_parser", "forward", "pick_spec"]

DEFAULT_WORK = Path(tempfile.gettempdir()) / "wsiflow-bench"
MODEL_CHOICES = ("auto", "shipped", "standin")


def add_common_args(parser: argparse.ArgumentParser, *, work: Path = DEFAULT_WORK, size: bool = True) -> None:
    """``--quick``, ``--work`` (default ``work``), ``--models`` and, unless ``size`` is
    false, ``--size`` on ``parser``."""
    parser.add_argument("--quick", action="store_true", help="small inputs (run.py --quick)")
    parser.add_argument("--work", type=Path, default=work, help="folder for generated inputs")
    parser.add_argument(
        "--models",
        choices=MODEL_CHOICES,
        default="auto",
        help="shipped bundles (if present) or stand-ins with the same architectures",
    )
    if size:
        parser.add_argument("--size", default=None, help="override the slide size, WIDTHxHEIGHT (debugging)")


def bench_parser(doc: str | None, *, work: Path = DEFAULT_WORK, size: bool = True) -> argparse.ArgumentParser:
    """A parser described by the script's docstring (kept as written) with the shared options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, work=work, size=size)
    return parser


def forward(args: argparse.Namespace) -> list[str]:
    """The shared options of ``args`` as arguments for another benchmark script."""
    argv = ["--work", str(args.work), "--models", args.models]
    if args.quick:
        argv.append("--quick")
    if getattr(args, "size", None):
        argv += ["--size", args.size]
    return argv


def pick_spec(args: argparse.Namespace, quick: SlideSpec, full: SlideSpec) -> SlideSpec:
    """The slide for this run: quick or full, or ``--size`` (same seed and density)."""
    spec = quick if args.quick else full
    if args.size:
        w, _, h = args.size.lower().partition("x")
        spec = SlideSpec(int(w), int(h or w), spec.seed, spec.density, spec.mpp)
    return spec
