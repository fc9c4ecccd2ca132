"""`kepo models ...`: build tiny offline models and check that a model folder loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kepo.commands.common import output_console

app = typer.Typer(help="Build tiny Qwen3-VL models; check model folders.", no_args_is_help=True)

CorpusOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--corpus",
        help="Curated Parquet file(s) whose questions/options/rationales train the tokenizer "
        "(repeatable; default: a built-in medical word list).",
    ),
]


def _corpus(paths: list[Path] | None) -> list[str] | None:
    from kepo.tiny import corpus_from_parquet

    return corpus_from_parquet(paths) if paths else None


@app.command("build-tiny")
def build_tiny_cmd(
    preset: Annotated[
        str, typer.Option(help="student (hidden 128, 2 layers) or teacher (hidden 256, 4 layers).")
    ],
    out: Annotated[Path, typer.Option(help="Output folder (Hugging Face format).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    corpus: CorpusOption = None,
    tokenizer_from: Annotated[
        Path | None,
        typer.Option(
            help="Copy this folder's tokenizer instead of training one (give the teacher the student's)."
        ),
    ] = None,
) -> None:
    """Build one tiny Qwen3-VL model with a locally trained tokenizer and its processor."""
    from kepo.tiny import PRESETS, build_tiny

    console = Console(stderr=True)
    if preset not in PRESETS:
        console.print(f"[red]unknown preset {preset!r}; choose one of {', '.join(PRESETS)}[/red]")
        raise typer.Exit(2)
    try:
        path = build_tiny(
            out, preset, seed=seed, corpus_texts=_corpus(corpus), tokenizer_from=tokenizer_from
        )
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from err
    typer.echo(str(path))


@app.command("build-tiny-pair")
def build_tiny_pair_cmd(
    out: Annotated[Path, typer.Option(help="Folder that receives student/ and teacher/.")],
    seed: Annotated[int, typer.Option(help="Seed of the student (the teacher uses seed + 1).")] = 0,
    corpus: CorpusOption = None,
) -> None:
    """Build a tiny student and teacher that share one tokenizer."""
    from kepo.tiny import build_tiny_pair

    try:
        student, teacher = build_tiny_pair(out, seed=seed, corpus_texts=_corpus(corpus))
    except (FileNotFoundError, ValueError) as err:
        Console(stderr=True).print(f"[red]{err}[/red]")
        raise typer.Exit(1) from err
    typer.echo(str(student))
    typer.echo(str(teacher))


@app.command("check")
def check_cmd(
    path: Annotated[Path, typer.Argument(help="Model folder (student, teacher or reference).")],
    teacher: Annotated[
        Path | None, typer.Option(help="Also check that this teacher shares the vocabulary.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
) -> None:
    """Load a folder the way the pipeline does, prove its processor yields pixel values."""
    from kepo.models import assert_shared_vocabulary, load_policy, load_processor

    console = output_console(200)
    try:
        model, processor = load_policy(path, device=device)
        n_params = sum(p.numel() for p in model.parameters())
        console.print(
            f"{path}: {type(model).__name__}, {n_params:,} parameters, processor "
            f"{type(processor).__name__}, vocabulary {len(processor.tokenizer)}: OK"
        )
        if teacher is not None:
            assert_shared_vocabulary(processor, load_processor(teacher), teacher_name=str(teacher))
            console.print(f"{teacher}: shares the vocabulary: OK")
    except (FileNotFoundError, ValueError) as err:
        Console(stderr=True).print(f"[red]{err}[/red]")
        raise typer.Exit(1) from err
