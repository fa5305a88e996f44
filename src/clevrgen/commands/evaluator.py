"""``clevrgen evaluator``: train the ResNet-18 judge, score a folder with it, export it."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from clevrgen.commands._options import ConfigOption, PrintConfigOption, SetOption

app = typer.Typer(help="The ResNet-18 judge that scores generated scenes: train, score, export.",
                  no_args_is_help=True)

EvaluatorOption = Annotated[
    Optional[Path],
    typer.Option("--evaluator", "-e", help="A course .pth (key 'model') or a clevrgen judge .safetensors; default: the shipped judge."),
]

TRAIN_EXAMPLES = """Examples:

  clevrgen evaluator train --data ../shared/iclevr --config configs/judge.toml --out runs/judge/judge.safetensors

  clevrgen evaluator train --data ../shared/iclevr --set judge.epochs=5 --set judge.device=cuda
"""


@app.command("train", epilog=TRAIN_EXAMPLES)
def train(
    ctx: typer.Context,
    config: ConfigOption = None,
    overrides: SetOption = None,
    print_config: PrintConfigOption = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the judge (.safetensors); config.toml and metrics.jsonl go beside it, so its folder must be new, empty or an earlier judge's.")] = Path("runs/judge/judge.safetensors"),
    data: Annotated[Optional[Path], typer.Option("--data", help="An i-CLEVR layout folder; default: config data.path.")] = None,
) -> None:
    """Train a judge on a dataset, holding out whole scenes (data.val_fraction); saves the best epoch."""
    from clevrgen.claims import claim_file, claim_folder
    from clevrgen.commands._options import resolve_config
    from clevrgen.errors import UsageError

    cfg = resolve_config(config, overrides, print_config)
    root = data or cfg.data.path
    if root is None:
        raise UsageError("no training data: pass --data DIR (an i-CLEVR layout folder) or set data.path")
    claim_file(out, "weights")
    claim_folder(out.parent, "judge")  # config.toml and metrics.jsonl go beside the judge

    from clevrgen.judge_training import run_judge_training

    args = sys.argv[1:]
    args = args[args.index("train") + 1:] if "train" in args else args
    history = run_judge_training(cfg, root, out, shlex.join([*ctx.command_path.split(), *args]))
    typer.echo(f"wrote {out} ({len(history)} epochs)")


SCORE_EXAMPLES = """Examples:

  clevrgen evaluator score ../shared/iclevr

  clevrgen evaluator score samples/ --evaluator checkpoint.pth --json
"""


@app.command("score", epilog=SCORE_EXAMPLES)
def score(
    root: Annotated[Path, typer.Argument(help="A folder in the i-CLEVR layout (train.json, objects.json, iclevr/).")],
    evaluator: EvaluatorOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    heldout: Annotated[bool, typer.Option("--heldout", help="Score only the scenes the judge held out in training (the split is read from its metadata).")] = False,
) -> None:
    """Score a folder's images against their labels: top-k (the course metric), exact set, worst classes."""
    from clevrgen.data.iclevr import load_iclevr, split_scenes
    from clevrgen.errors import UsageError
    from clevrgen.judge import judge_probs, load_judge, read_metadata, score_predictions
    from clevrgen.labels import asset_path
    from clevrgen.runtime import resolve_device

    judge = load_judge(evaluator, resolve_device("auto"))
    data = load_iclevr(root, progress=not as_json)
    if heldout:
        split = json.loads(read_metadata(evaluator or asset_path("judge.safetensors")).get("split", "null"))
        if not split:
            raise UsageError("--heldout needs a clevrgen judge whose metadata records its split; this one does not")
        data = split_scenes(data, split["val_fraction"], split["split_seed"])[1]
    result = score_predictions(judge_probs(judge, data.images), data.labels)
    if as_json:
        from clevrgen.output import strict_json

        typer.echo(strict_json(result))
        return
    from rich.console import Console

    from clevrgen.judge import score_table

    Console().print(score_table(result, title=f"{root} ({evaluator or 'shipped judge'})"))


EXPORT_EXAMPLES = """Examples:

  clevrgen evaluator export --out checkpoint.pth

  clevrgen evaluator export --out checkpoint.pth --evaluator runs/judge/judge.safetensors
"""


@app.command("export", epilog=EXPORT_EXAMPLES)
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the course-format .pth.")],
    evaluator: EvaluatorOption = None,
) -> None:
    """Write a judge in the course format: torch.save({"model": state_dict}), fp32."""
    from clevrgen.claims import claim_file
    from clevrgen.judge import export_course, load_judge

    claim_file(out, "course_judge")
    export_course(load_judge(evaluator), out)
    typer.echo(f"wrote {out}")
