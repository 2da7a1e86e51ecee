"""What every command shares: user mistakes as one line and exit code 2, recipe files, run summaries,
exit codes. Command modules import from here, and main.py imports them all, so there is no import cycle."""
from __future__ import annotations

import sys
from functools import wraps

import click

from reinforge.formats.embeddings import EmbeddingError
from reinforge.formats.recipe import ConfigError
from reinforge.formats.sources import InputError
from reinforge.formats.subset import SubsetError
from reinforge.io.runs import NotARunError
from reinforge.runtime.runner import ConfigChangedError, InputsChangedError

# InputError covers every product's bad-input errors (splits, schedules, reshard, join, filters, plan);
# SubsetError: bad subset/counts files; EmbeddingError: unusable embedding files (retrieval)
USER_ERRORS = (ConfigError, ConfigChangedError, InputsChangedError, InputError, NotARunError, FileNotFoundError,
               SubsetError, EmbeddingError)

# exit codes of run-like commands and `status` (README "Exit codes")
EXIT_OK = 0  # every task done
EXIT_FAILED = 1  # some task failed (run: after finishing all the others)
EXIT_USAGE = 2  # bad recipe, argument or input, not a run directory, changed recipe/inputs refused
EXIT_INCOMPLETE = 3  # status: tasks pending or running, interrupted, from an older recipe, or inputs changed

runner_option = click.option(
    "--runner", type=click.Choice(["auto", "ray", "local"]), default=None,
    help="where tasks run: ray, local (no Ray: this process, or worker processes of this machine), auto = local "
         "for a job of one task "
         "[default: the recipe's resources.runner, auto]")

redo_changed_option = click.option(
    "--redo-changed-inputs", "redo_changed", is_flag=True,
    help="redo finished tasks whose input files changed since they ran (refused without it)")


def user_errors(fn):
    """Turn expected user mistakes into one line on stderr and exit code 2 (no traceback)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            message = str(exc)
            click.echo(message if message.startswith(("config error", "error")) else f"error: {message}", err=True)
            sys.exit(EXIT_USAGE)
    return wrapper


def bundled_config(name: str):
    """A recipe shipped inside the package (reinforge/configs, the repository's configs/), or None."""
    from importlib.resources import files
    resource = files("reinforge").joinpath("configs", name)
    return resource if resource.is_file() else None


def resolve_config(path: str) -> str:
    """`path` itself when it exists; else, for `NAME.yaml` or `configs/NAME.yaml`, the recipe the
    installed package ships, so the documented commands work from any directory."""
    from reinforge.io.storage import exists
    if "://" in path or exists(path):
        return path
    directory, _, name = path.replace("\\", "/").rpartition("/")
    bundled = bundled_config(name) if directory in ("", "configs", "./configs") else None
    return str(bundled) if bundled is not None else path


def load_yaml_file(path: str, overrides: tuple[str, ...] = ()) -> dict:
    """A YAML config file (any fsspec URL, or a bundled recipe name), safe-loaded, with dotted `--set`
    overrides applied."""
    from reinforge.formats.recipe import apply_override, parse_yaml
    from reinforge.io.storage import read_text
    try:
        raw = parse_yaml(read_text(resolve_config(path)))
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"error: config file {path} not found") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {path} must hold a YAML mapping")
    for dotted in overrides:
        apply_override(raw, dotted)
    return raw


def load_recipe_file(path: str, overrides: tuple[str, ...] = ()):
    from reinforge.products.registry import parse_recipe
    return parse_recipe(load_yaml_file(path, overrides))


def print_summary(summary) -> None:
    click.echo(f"output: {summary.output}")
    click.echo(f"tasks: {summary.tasks} ({summary.skipped} already done, {summary.done} run, "
               f"{len(summary.failed)} failed)")
    if summary.redone_changed:
        click.echo(f"redone because their inputs changed: {', '.join(summary.redone_changed[:10])}"
                   + (f" and {len(summary.redone_changed) - 10} more" if len(summary.redone_changed) > 10 else ""))
    where = " in finished tasks" if summary.failed else ""
    click.echo(f"samples written: {summary.samples}, skipped with errors{where}: {summary.errors}, "
               f"{summary.samples_per_second:.1f} samples/s")
    if summary.failed:  # a failed task writes nothing: its samples are neither written nor skipped
        click.echo(failed_samples_line(len(summary.failed), summary.failed_samples, summary.failed_errors))
    for failure in summary.failed:
        click.echo(f"FAILED {failure['task']}: {failure.get('reason', '?')}", err=True)


def failed_samples_line(tasks: int, samples: int, errors: int) -> str:
    return (f"failed tasks: {tasks}, nothing written for them: {samples} samples read before they failed "
            f"({errors} with errors); see failed/ and errors/ in the run directory")


def run_and_exit(recipe, address: str | None, force: bool, progress: bool, redo_changed: bool = False,
                 runner: str | None = None):
    """Run a recipe (on Ray, or in this process: runner.runs_in_process), print its summary, exit 1 if
    tasks failed (0 otherwise). `runner` overrides resources.runner."""
    from reinforge.runtime.runner import run_recipe
    if runner:
        recipe = recipe.model_copy(update={"resources": recipe.resources.model_copy(update={"runner": runner})})
    summary = run_recipe(recipe, address=address, force=force, progress=progress, redo_changed=redo_changed)
    print_summary(summary)
    sys.exit(EXIT_OK if summary.ok else EXIT_FAILED)
