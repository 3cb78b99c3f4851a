"""``wsiflow synth OUT.svs``: a generated bone-marrow aspirate smear with known truth."""

from __future__ import annotations

from pathlib import Path

import typer

from wsiflow.cli._app import app
from wsiflow.errors import ConfigError


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        if len(parts) == 1:
            w = h = int(parts[0])
        elif len(parts) == 2:
            w, h = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ConfigError("wsiflow synth", "--size", f"expected WIDTHxHEIGHT in px, got {text!r}") from None
    return w, h


def parse_fractions(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, val = item.partition("=")
        try:
            if not eq:
                raise ValueError
            out[key.strip()] = float(val)
        except ValueError:
            raise ConfigError(
                "wsiflow synth", "--dysplasia", f"expected lineage=fraction,…, got {item!r}"
            ) from None
    return out


@app.command()
def synth(
    out: Path = typer.Argument(
        ..., help="Output slide (.svs), written with OUT.truth.geojson and OUT.truth.json."
    ),
    size: str = typer.Option("12000x12000", "--size", help="WIDTHxHEIGHT in level-0 px."),
    mpp: float = typer.Option(0.25, "--mpp", help="µm per px of level 0."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed and options → same slide and truth."),
    dysplasia: str = typer.Option(
        "erythroid=0.15,granulocytic=0.05,megakaryocytic=0.30",
        "--dysplasia",
        help="Dysplastic fraction per lineage (dysplastic / (normal + dysplastic)).",
    ),
    blasts: float = typer.Option(0.07, "--blasts", help="Blasts as a fraction of all nucleated cells."),
    density: float = typer.Option(
        1600.0, "--density", help="Nucleated cells per mm² where the smear is full."
    ),
    quality: int = typer.Option(90, "--quality", help="JPEG quality of the tiles."),
) -> None:
    """Generate a Wright-Giemsa-like bone-marrow aspirate smear with the 8 MDS classes and its truth.

    Writes a pyramidal JPEG TIFF with an Aperio description (both OpenSlide and TiffSlide
    read its µm/px), OUT.truth.geojson (every cell's polygon and class, level-0 px; opens in
    QuPath) and OUT.truth.json (true counts, lineage fractions, blast %, parameters, seed).
    For a demo only: the cells are drawn, not real.
    """
    from wsiflow.synth import SynthParams, synthesize
    from wsiflow.synth.layout import DEFAULT_DYSPLASIA

    w, h = parse_size(size)
    frac = {**DEFAULT_DYSPLASIA, **parse_fractions(dysplasia)}
    params = SynthParams(
        width=w, height=h, mpp=mpp, seed=seed, dysplasia=frac, blasts=blasts, cells_per_mm2=density
    )
    params.validate()
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    res = synthesize(out, params, quality=quality)
    s = res.summary
    typer.echo(
        f"{res.slide}: {w}x{h} px at {mpp} µm/px, {s['nucleated']} nucleated cells, "
        f"{s['red_cells']} red cells, {res.seconds:.1f} s"
    )
    for lin, v in s["lineages"].items():
        f = v["fraction"]
        typer.echo(
            f"  {lin:15} dysplastic {v['dysplastic']}/{v['total']}"
            + (f" = {100 * f:.1f}%" if f is not None else "")
        )
    b = s["blasts"]
    typer.echo(
        f"  {'blasts':15} {b['count']}/{s['nucleated']}"
        + (f" = {100 * b['fraction']:.1f}%" if b["fraction"] is not None else "")
    )
    typer.echo(f"  truth: {res.truth_geojson} , {res.truth_json}")
