"""The `loralag` command line: build and manage adapter libraries, train adapters, generate with LAG.

One module a concern: `app` (the Typer app, error handling), `options` (option enums and help texts), `checks`
(what fails before anything heavy loads), `loading` (spinners, model loading), and one module a command group:
`library`, `train`, `generate`, `serve`, `bench`, `evaluate`, `demo`; here they are registered, in the order
`loralag --help` lists them.

Heavy modules (torch, transformers, matplotlib) are imported inside the commands, so `--help`
stays quick. Errors a user can act on (LoralagError, and ValueError from router settings)
print one red line and exit with code 2. The command line may import every other package; none imports it.
"""

from __future__ import annotations

import os

# Torch's OpenMP threads spin while waiting; on a machine shared with other busy processes that made
# small ops 5-15x slower. Passive waiting costs a dedicated machine little. Only our own CLI process
# is changed (a library must not touch its host's environment), and only if the user has not chosen.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from loralag.cli import bench, demo, evaluate, generate, library, serve, train  # noqa: E402
from loralag.cli.app import EXIT_USER_ERROR, app, console, err_console, fail, user_errors  # noqa: E402
from loralag.cli.loading import load_model_waiting, waiting  # noqa: E402
from loralag.cli.options import router_names  # noqa: E402

__all__ = [
    "EXIT_USER_ERROR",
    "app",
    "console",
    "err_console",
    "fail",
    "load_model_waiting",
    "main",
    "router_names",
    "user_errors",
    "waiting",
]

app.command()(library.build)
app.command()(library.add)
app.command()(library.remove)
app.command()(library.compact)
app.command()(library.info)
app.command()(library.export)
app.command()(train.train)
app.command()(generate.generate)
app.command()(library.index)
app.command()(serve.serve)
app.command()(bench.bench)
app.command("eval")(evaluate.eval_command)
app.command("lm-eval", **evaluate.LM_EVAL_SETTINGS)(evaluate.lm_eval_command)
app.command()(demo.demo)


def main() -> None:  # pragma: no cover - python -m loralag.cli
    app()
