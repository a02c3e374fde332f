"""`loralag bench`: the LAMA knowledge benchmark (loralag.experiments.lama)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loralag.cli.app import console, user_errors
from loralag.cli.checks import _check_model, _check_ray
from loralag.cli.loading import _prepare_model, waiting
from loralag.cli.options import (
    INIT_HELP,
    MODEL_HELP,
    THREADS_HELP,
    Dtype,
    FcForm,
    Init,
    TaskContrast,
    TaskUnder,
    _ray_option,
)
from loralag.errors import LoralagError


@user_errors
def bench(
    size: str = typer.Option(
        "tiny",
        "--size",
        help="tiny (minutes, in the test suite), small (12 entities) or full "
        "(200 knowledge adapters, the README's run).",
    ),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help="Folder of LAMA T-REx relation files (default $LORALAG_LAMA_DATA, else ../shared/data/lama-trex).",
    ),
    out: Path = typer.Option(Path("results/lama"), "--out", help="Results folder (tables, plots, predictions)."),
    entities: Optional[int] = typer.Option(
        None,
        "--entities",
        min=2,
        help="Knowledge adapters (one per subject entity, one question per entity and family) instead of the "
        "size's (small 12, full 200); the size's other settings stay.",
    ),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=1,
        help="Processes training the knowledge adapters (default 1) and answering the questions (default: 2 when "
        "torch has 2+ threads and there are 8+ batches).",
    ),
    eval_dtype: Optional[Dtype] = typer.Option(
        None, "--eval-dtype", help="The model's dtype while answering (default: the size's; full: bfloat16)."
    ),
    fc_form: FcForm = typer.Option(
        FcForm.label,
        "--fc-form",
        help="Fact checking's answer: the bare label, as KILT's "
        "FEVER is scored (default), or 'recall': the object, then the verdict (harder for "
        "per-token routing).",
    ),
    fc_steps: Optional[int] = typer.Option(
        None,
        "--fc-steps",
        min=1,
        help="The fact-checking task adapter's training steps (default: twice the other task adapters', 160 at "
        "full size); another count trains into its own folder.",
    ),
    fc_all_under: bool = typer.Option(
        False,
        "--fc-all-under",
        help="Train fact checking on every bare training claim under its entity's knowledge adapter (default: "
        "the first 48 at full size; the rest only where the base model knows the fact, without an adapter); "
        "trains into its own folder.",
    ),
    fc_false: Optional[int] = typer.Option(
        None,
        "--fc-false",
        min=1,
        help="Wrong objects per fact-checking training fact, each a (true, false) claim pair (default 1); another "
        "count trains into its own folder.",
    ),
    fc_under_train: Optional[bool] = typer.Option(
        None,
        "--fc-under-train/--fc-capped",
        help="Fact checking trains on every claim about a task-training entity bare, under its knowledge adapter, "
        "and every other claim with its page in front, or on the capped pool that --fc-all-under widens (the "
        "default); trains into its own folder.",
    ),
    fc_train_a: Optional[bool] = typer.Option(
        None,
        "--fc-train-a/--fc-freeze-a",
        help="The fact-checking adapter trains A and B even where --task-freeze-a keeps the other task adapters' A, "
        "or follows --task-freeze-a (the default); trains into its own folder.",
    ),
    fc_a_within: Optional[int] = typer.Option(
        None,
        "--fc-a-within",
        min=0,
        help="The fact-checking adapter trains A within its init's top M directions (projected back after each "
        "step), even where --task-freeze-a keeps the others' A (default 0: off); trains into its own folder.",
    ),
    task_under: Optional[TaskUnder] = typer.Option(
        None,
        "--task-under",
        help="'lag': the slot-filling, QA and entity-linking adapters train under every training entity's "
        "knowledge adapter, routed per token by LAG as at test time; 'lag-bare': their pairs without a page in "
        "front only; 'lag-fact': slot filling's and QA's only (the full size's); 'none': without knowledge adapters "
        "(the smaller sizes'). The first three train the knowledge adapters of the training entities that lack one "
        "(cached beside fact checking's), and these task adapters into their own folder.",
    ),
    shared_init: bool = typer.Option(
        False,
        "--shared-init",
        help="Train every adapter from one LoRA init (loralag 0.1's way), to measure what distinct inits do.",
    ),
    know_init: Init = typer.Option(Init.contrast, "--know-init", help="The knowledge adapters' " + INIT_HELP),
    task_init: Init = typer.Option(Init.contrast, "--task-init", help="The task adapters' " + INIT_HELP),
    task_contrast: Optional[TaskContrast] = typer.Option(
        None,
        "--task-contrast",
        help="What the task adapters' contrast/salient init contrasts each family's inputs with: 'generic' text "
        "(the base model's own samples) or the 'families' (every task family's training pairs pooled: each "
        "adapter starts on what tells its family apart; the full size's with a contrast or salient task init); "
        "trains into its own folder.",
    ),
    task_freeze_a: Optional[bool] = typer.Option(
        None,
        "--task-freeze-a/--task-train-a",
        help="Train the task adapters' B alone, A kept at its init (LoRA-FA's way), so their arrows stay on what "
        "the init chose (the full size's), or A and B (the smaller sizes'); trains into its own folder.",
    ),
    know_qa: bool = typer.Option(
        False,
        "--know-qa",
        help="The knowledge adapters also learn each fact restated as a question and answer (README, LAMA).",
    ),
    task_seed: Optional[int] = typer.Option(
        None,
        "--task-seed",
        help="The task adapters' training seed (default: the run's seed, 0); another retrains only them, into "
        "their own folder, to measure how much their training moves the scores.",
    ),
    methods: Optional[str] = typer.Option(
        None,
        "--methods",
        help="Only these methods, comma-separated (default: all): base, oracle, arrow, lag, lag-prefix, spectral, "
        "arrow-mix, rag, prag, r-lag, p-lag, k-sweep.",
    ),
    ray: Optional[str] = _ray_option("Train the adapters and answer the questions (--workers shares)"),
):
    """The LAMA knowledge benchmark: every routing method against base model and Oracle, KILT metrics."""
    from loralag.experiments.lama.config import default_data_dir, size_config
    from loralag.experiments.lama.report import print_summary
    from loralag.experiments.lama.run import run_bench

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods is not None else None
    if chosen is not None and not chosen:
        raise LoralagError("--methods needs at least one method")
    size_config(size, methods=chosen)  # an unknown size or method fails here
    _check_ray(ray)
    data = data if data is not None else default_data_dir()
    if not data.is_dir():
        raise LoralagError(
            f"no LAMA data folder at {data} (give --data DIR or set LORALAG_LAMA_DATA; see the README's 'Test data')"
        )
    _check_model(model)
    with waiting(f"Loading torch and model '{model}' …") as status:
        _prepare_model(model, status)
    results = run_bench(
        size,
        data_dir=data,
        out_dir=out,
        model_spec=model,
        threads=threads,
        workers=workers,
        console=console,
        eval_dtype=eval_dtype.value if eval_dtype else None,
        fc_form=fc_form.value,
        fc_steps=fc_steps,
        fc_all_under=fc_all_under or None,
        fc_false=fc_false,
        fc_under_train=fc_under_train,
        fc_train_a=fc_train_a,
        fc_a_within=fc_a_within,
        task_under=task_under.value if task_under else None,
        shared_init=shared_init or None,
        know_init=know_init.value,
        task_init=task_init.value,
        task_contrast=task_contrast.value if task_contrast else None,
        know_qa=know_qa or None,
        task_freeze_a=task_freeze_a,
        task_seed=task_seed,
        n_entities=entities,
        methods=chosen,
        ray=ray,
    )
    print_summary(results, console)
