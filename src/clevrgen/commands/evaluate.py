"""``clevrgen evaluate``: generate a split's label sets and score them with the judge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clevrgen.commands._options import (
    CheckpointOption, SampleConfigOption, GuidanceOption, PrintConfigOption, SamplerOption, SeedOption, SetOption,
    StepsOption, load_model,
)

HELP = "Generate every label set of a split and score the images with the judge (top-k and exact-set accuracy)."
EXAMPLES = """Examples:

  clevrgen evaluate --split new_test

  clevrgen evaluate --split test --steps 25 --sampler dpm++ --guidance 2 --json

  clevrgen evaluate --split test --seeds 4 --seed 10000   # mean and spread over 4 passes

  clevrgen evaluate --split my_scenes.json --evaluator classifier_weight.pth --out eval/

  clevrgen evaluate --task edit --data ../shared/iclevr --seeds 4   # the editor on i-CLEVR's held-out pairs
"""


def evaluate(
    split: Annotated[Optional[str], typer.Option("--split", help="test, new_test, unseen_triples, four_objects, five_objects, or a JSON file of phrase lists. (default: evaluate.split)")] = None,
    checkpoint: CheckpointOption = None,
    evaluator: Annotated[Optional[Path], typer.Option("--evaluator", help="A course-format classifier .pth (key 'model') or a clevrgen judge. (default: the shipped judge)")] = None,
    steps: StepsOption = None,
    sampler: SamplerOption = None,
    guidance: GuidanceOption = None,
    seed: SeedOption = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, max=1000, help="Passes over the split, each with its own seeds: the "
                                       "accuracies are their mean, with the spread beside them. (default: 1)")] = 1,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the grid, images and results. (default: RUN/eval-<split>; ./eval-<split> for the shipped model)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")] = False,
    task: Annotated[str, typer.Option("--task", help="generate: draw a split's label sets; edit: add the next object to "
                                      "each held-out pair's source (an editor, the shipped one by default).")] = "generate",
    data: Annotated[Optional[Path], typer.Option("--data", help="--task edit: the i-CLEVR folder whose held-out scenes' "
                                                 "pairs are edited. (default: the editor's data.path)")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="--task edit: only the first N held-out pairs "
                                                 "(and N scenes built step by step).")] = None,
    iterative: Annotated[bool, typer.Option("--iterative/--no-iterative", help="--task edit: also build each held-out "
                                            "scene from its real first image, one edit per object.")] = True,
    beyond: Annotated[bool, typer.Option("--beyond", help="--task edit: also add a fourth and a fifth object to the "
                                         "held-out 3-object scenes (more than the real data holds: scored by the judge alone).")] = False,
    config: SampleConfigOption = None,
    overrides: SetOption = None,
    print_config: PrintConfigOption = False,
) -> None:
    from rich.console import Console
    from rich.table import Table

    from clevrgen.errors import UsageError
    from clevrgen.evaluation import score_split
    from clevrgen.labels import load_label_sets

    if task not in ("generate", "edit"):
        raise UsageError(f"--task {task!r}: choose generate or edit")
    if task == "edit":
        if split is not None:
            raise UsageError("--task edit scores the held-out pairs of --data: give no --split with it")
        return _evaluate_edits(checkpoint, data, limit, iterative, beyond, seeds, out, as_json, config, overrides,
                               print_config, steps=steps, sampler=sampler, guidance=guidance, seed=seed)
    if data is not None or limit is not None or beyond:
        raise UsageError("--data, --limit and --beyond go with --task edit")

    if split is not None:
        load_label_sets(split)  # a bad split or file fails before the model is loaded
    model = load_model(checkpoint, config, overrides, print_config,
                       steps=steps, sampler=sampler, guidance=guidance, seed=seed)
    split = split or model.config.evaluate.split
    evaluator = evaluator or model.config.evaluate.evaluator
    from clevrgen.artifact import is_shipped

    # A run keeps its evaluations; the shipped model's folder is part of the install: write here.
    out = out or (Path(".") if is_shipped(model.run_dir) else model.run_dir) / f"eval-{Path(split).stem}"
    from clevrgen.claims import claim_folder

    claim_folder(out, "evaluation")
    result = score_split(model, split, out, evaluator, progress=not as_json, seeds=seeds)
    if as_json:
        from clevrgen.output import strict_json

        typer.echo(strict_json({k: v for k, v in result.items() if k not in ("config", "per_class_recall")}))
        return
    passes = f", {seeds} seeds" if seeds > 1 else f", seed {result['seed']}"
    table = Table(title=f"{split}: {result['n_images']} images, {result['sampler']} {result['steps']} steps, "
                        f"guidance {result['guidance']}{passes}")
    for column in ("top-k accuracy", "exact-set accuracy", "seconds"):
        table.add_column(column, justify="right")

    def figure(key: str) -> str:
        return f"{result[key]:.4f}" + (f" ± {result[key + '_std']:.4f}" if seeds > 1 else "")

    table.add_row(figure("topk_accuracy"), figure("exact_accuracy"), f"{result['seconds']:.1f}")
    Console().print(table)
    typer.echo(f"wrote {out}/grid.png, {out}/iclevr/, {out}/results.json")


def _evaluate_edits(checkpoint, data, limit, iterative, beyond, seeds, out, as_json, config, overrides, print_config,
                    **options) -> None:
    from rich.console import Console
    from rich.table import Table

    from clevrgen.editing import evaluate_edit_task, resolve_editor
    from clevrgen.artifact import is_shipped
    from clevrgen.claims import claim_folder
    from clevrgen.output import strict_json

    loaded = load_model(resolve_editor(checkpoint), config, overrides, print_config, **options)
    out = out or (Path(".") if is_shipped(loaded.run_dir) else loaded.run_dir) / "eval-edit"
    claim_folder(out, "evaluation")
    result = evaluate_edit_task(loaded, data, out, seeds, limit, iterative, progress=not as_json, beyond=beyond)
    if as_json:
        typer.echo(strict_json({k: v for k, v in result.items() if k != "passes"}))
        return
    s = loaded.config.sample
    table = Table(title=f"edit: {result['pairs']} held-out pairs, {s.sampler} {s.steps} steps, guidance {s.guidance}, "
                        f"image guidance {s.image_guidance}, " + (f"{seeds} seeds" if seeds > 1 else f"seed {s.seed}"))
    for column in ("", "top-k", "exact-set", "F1", "source kept", "PSNR (dB)", "SSIM"):
        table.add_column(column, justify="right")
    real = result["real_pairs"]
    table.add_row("edits", *(f"{result[k]:.4f}" for k in ("topk_accuracy", "exact_accuracy", "f1", "source_kept")),
                  f"{result['psnr']:.1f}", f"{result['ssim']:.3f}")
    table.add_row("real next image", *(f"{real[k]:.4f}" for k in ("topk_accuracy", "exact_accuracy", "f1", "source_kept")),
                  f"{real['psnr']:.1f}", f"{real['ssim']:.3f}")
    Console().print(table)
    if result.get("iterative"):
        steps = ", ".join(f"{f:.3f}" for f in result["iterative"]["f1_by_step"])
        typer.echo(f"built step by step from {result['iterative']['scenes']} real first images: F1 by step {steps}")
    for name, figures in result.get("beyond", {}).items():
        if name != "scenes":
            typer.echo(f"a {name} object added to {result['beyond']['scenes']} real 3-object scenes: top-k "
                       f"{figures['topk_accuracy']:.3f}, exact-set {figures['exact_accuracy']:.3f}, F1 {figures['f1']:.3f}, "
                       f"source kept {figures['source_kept']:.3f}, PSNR {figures['psnr']:.1f} dB")
    typer.echo(f"wrote {out}/grid.png (source, edit, real next image), {out}/results.json")
