"""`kepo curate`: OmniMedVQA or the bundled MiniMedVQA into validated train/test/rejects Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table as RichTable

from kepo.commands.common import output_console
from kepo.config import BundledDatasetConfig, ConfigError, CurationConfig, load_config
from kepo.curate import (
    BUNDLED_OUT_DIR,
    BUNDLED_TEST_PER_MODALITY,
    BUNDLED_TRAIN_SIZE,
    REJECT_REASONS,
    CurationError,
    CurationResult,
    curate_bundled,
    curate_omnimedvqa,
)

app = typer.Typer(
    help="Curate a dataset into train/test/rejects Parquet + manifest.json (see kepo/curate.py).",
    no_args_is_help=True,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="Run config YAML whose `data:` section gives the defaults."),
]
SplitSeedOpt = Annotated[int | None, typer.Option(help="Seed of the per-modality 80/20 split.")]
FractionOpt = Annotated[
    float | None, typer.Option(help="Fraction of each modality's images in train.")
]
ModalityOpt = Annotated[str | None, typer.Option(help="Modality of the training sample.")]
SampleSeedOpt = Annotated[int | None, typer.Option(help="Seed of the train/test samples.")]
EmbedOpt = Annotated[
    bool | None,
    typer.Option(
        "--embed-images/--no-embed-images", help="Store resized PNG bytes in the Parquet."
    ),
]
EmbedSizeOpt = Annotated[int | None, typer.Option(help="Side of embedded images in pixels.")]
WorkersOpt = Annotated[int | None, typer.Option(help="Threads that hash and decode images.")]


def _config(config: Path | None, **overrides: Any) -> CurationConfig:
    base = load_config(config).data if config else CurationConfig()
    data = base.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    return CurationConfig.model_validate(data)


def print_result(result: CurationResult, console: Console) -> None:
    """Per-modality and per-reason tables, then the totals and paths."""
    table = RichTable(title="Curation per modality")
    cols = (
        "read",
        "accepted",
        "rejected",
        "train_part",
        "test_part",
        "train_sample",
        "test_sample",
    )
    table.add_column("modality", no_wrap=True, min_width=10)
    headers = (
        "read",
        "acc.",
        "rej.",
        "train\npart",
        "test\npart",
        "train\nsample",
        "test\nsample",
        "real\nimages",
    )
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for modality, counts in result.per_modality.items():
        table.add_row(modality, *(str(counts.get(c, "")) for c in (*cols, "real_images")))
    table.add_row(
        "[bold]total[/bold]",
        *(f"[bold]{v}[/bold]" for v in (result.read, result.accepted, result.rejected)),
        *("" for _ in range(5)),
    )
    console.print(table)
    if result.per_reason:
        reasons = RichTable(title="Rejects per reason")
        reasons.add_column("reason")
        reasons.add_column("records", justify="right")
        reasons.add_column("meaning")
        for reason, n in result.per_reason.items():
            reasons.add_row(reason, str(n), REJECT_REASONS.get(reason, ""))
        console.print(reasons)
    for key, s in result.shortfalls.items():
        console.print(
            f"[yellow]{key}: {s['available']} available < {s['requested']} requested; took all[/yellow]"
        )
    status = "ok" if result.read == result.accepted + result.rejected else "MISMATCH"
    console.print(
        f"read {result.read} = accepted {result.accepted} + rejected {result.rejected} ({status}); "
        f"{result.seconds:.1f} s"
    )
    console.print(
        f"wrote {result.train_path}, {result.test_path}, {result.rejects_path}, {result.manifest_path}"
    )


def _run(fn: Any, *args: Any) -> None:
    console = output_console(200)
    try:
        result = fn(*args, progress=True)
    except (CurationError, ConfigError, FileExistsError) as err:
        Console(stderr=True).print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    print_result(result, console)


@app.command("omnimedvqa")
def omnimedvqa(
    root: Annotated[
        Path, typer.Option(help="OmniMedVQA folder holding QA_information/ and Images/.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("data/omnimedvqa"),
    config: ConfigOpt = None,
    split_seed: SplitSeedOpt = None,
    train_fraction: FractionOpt = None,
    train_modality: ModalityOpt = None,
    train_size: Annotated[int | None, typer.Option(help="Training items (paper: 600).")] = None,
    test_per_modality: Annotated[
        int | None, typer.Option(help="Test items per modality (paper: 300).")
    ] = None,
    sample_seed: SampleSeedOpt = None,
    embed_images: EmbedOpt = None,
    embed_size: EmbedSizeOpt = None,
    image_workers: WorkersOpt = None,
) -> None:
    """Curate the OmniMedVQA open-access release with the paper's protocol (seeded 80/20 split per
    modality, 600 MRI training items, 300 test items per modality)."""
    try:
        cfg = _config(
            config,
            source="omnimedvqa",
            root=root,
            out_dir=out,
            split_seed=split_seed,
            train_fraction=train_fraction,
            train_modality=train_modality,
            train_size=train_size,
            test_per_modality=test_per_modality,
            sample_seed=sample_seed,
            embed_images=embed_images,
            embed_size=embed_size,
            image_workers=image_workers,
        )
    except Exception as err:  # pydantic / config errors: one message, no traceback
        Console(stderr=True).print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    _run(curate_omnimedvqa, root, out, cfg)


@app.command("bundled")
def bundled(
    out: Annotated[
        Path, typer.Option(help="Output folder (the built source goes to OUT/source).")
    ] = BUNDLED_OUT_DIR,
    config: ConfigOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the dataset build.")] = None,
    synthetic_per_modality: Annotated[
        int | None, typer.Option(help="Synthetic images per modality (default 240).")
    ] = None,
    questions_per_image: Annotated[
        int | None, typer.Option(help="Questions per synthetic image (default 2).")
    ] = None,
    real_variants_per_image: Annotated[
        int | None, typer.Option(help="Variants per real image (default 6).")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Image side in pixels (default 96).")
    ] = None,
    real: Annotated[
        bool | None, typer.Option("--real/--no-real", help="Include the wheel-shipped real images.")
    ] = None,
    split_seed: SplitSeedOpt = None,
    train_fraction: FractionOpt = None,
    train_modality: ModalityOpt = None,
    train_size: Annotated[
        int | None, typer.Option(help=f"Training items (default {BUNDLED_TRAIN_SIZE}).")
    ] = None,
    test_per_modality: Annotated[
        int | None,
        typer.Option(help=f"Test items per modality (default {BUNDLED_TEST_PER_MODALITY})."),
    ] = None,
    sample_seed: SampleSeedOpt = None,
    embed_images: EmbedOpt = None,
    embed_size: EmbedSizeOpt = None,
) -> None:
    """Build MiniMedVQA (real wheel-shipped + synthetic images, OmniMedVQA layout) and curate it
    through the same code path as OmniMedVQA. Defaults: 300 MRI training items, 60 test items per
    modality (without --config)."""
    try:
        if config is None:
            train_size = BUNDLED_TRAIN_SIZE if train_size is None else train_size
            test_per_modality = (
                BUNDLED_TEST_PER_MODALITY if test_per_modality is None else test_per_modality
            )
        cfg = _config(
            config,
            source="bundled",
            out_dir=out,
            split_seed=split_seed,
            train_fraction=train_fraction,
            train_modality=train_modality,
            train_size=train_size,
            test_per_modality=test_per_modality,
            sample_seed=sample_seed,
            embed_images=embed_images,
            embed_size=embed_size,
        )
        knobs = {
            "seed": seed,
            "synthetic_per_modality": synthetic_per_modality,
            "questions_per_image": questions_per_image,
            "real_variants_per_image": real_variants_per_image,
            "image_size": image_size,
            "include_real": real,
        }
        cfg.bundled = BundledDatasetConfig.model_validate(
            cfg.bundled.model_dump() | {k: v for k, v in knobs.items() if v is not None}
        )
    except Exception as err:  # pydantic / config errors: one message, no traceback
        Console(stderr=True).print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    _run(curate_bundled, out, cfg)
