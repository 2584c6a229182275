"""Generate the synthetic dataset alone (``train.py`` does it on first use): ``python synthetic.py [--root DIR]``.

What it holds and why: ``loading/synthetic.py``.
"""

import time
from pathlib import Path

import typer

from loading.synthetic import ensure_synthetic
from plumbing.cli import reported_errors

app = typer.Typer(add_completion=False)


@app.command()
def synthetic(root: Path = Path("data/synthetic"), seed: int = 0) -> None:
    """Generate the synthetic dataset (once) and print where it is."""
    with reported_errors():
        start = time.perf_counter()
        ready = ensure_synthetic(root, seed)
    typer.echo(f"{ready} ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app()
