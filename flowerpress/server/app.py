"""flowerpress's ServerApp: a task, a strategy, codecs and DP settings, run on a Grid.

:func:`server_app` builds a Flower ``ServerApp``::

    app = server_app(MyTask(), strategy="fedavg", compression="q:8", rounds=20)

Keyword settings are run-config keys in Python form (``clients_per_round``
for ``clients-per-round``); the run config ``flwr run`` passes wins over
them, so every key stays settable with ``--run-config``. ``flwr run`` (and
``flowerpress simulate``) loads :data:`app`, which builds the task from the
run config; tests call :func:`serve` on an in-process grid.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from numpy.typing import NDArray

from flowerpress import protocol
from flowerpress.config import (
    DEFAULTS,
    SCHEMA,
    Config,
    ConfigError,
    Scalar,
    check_task_keys,
    parse_link,
    validate,
)
from flowerpress.server.checkpoint import (
    CHECKPOINT_NAME,
    RESULTS_NAME,
    RUN_FILES,
    Checkpoint,
    CheckpointError,
    Expected,
    LoopState,
    config_differences,
    existing_run,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from flowerpress.server.loop import (
    LoopSettings,
    ResumeError,
    RoundCallback,
    make_history,
    run_federation,
)
from flowerpress.server.phases import RunFailedError, user_call
from flowerpress.server.results import (
    build_results,
    failure_line,
    run_log,
    save_model_atomic,
    task_record,
    write_error_log,
    write_json_atomic,
    write_report,
)
from flowerpress.strategies.base import Strategy
from flowerpress.tasks.base import Evaluation, Task

if TYPE_CHECKING:
    from flowerpress.privacy.accounting import ServerPrivacy

log = logging.getLogger(__name__)

#: The file in out-dir that holds the traceback of a failed run.
ERROR_LOG = "error.log"


def evaluation_row(res: Evaluation) -> dict[str, float | None]:
    """An Evaluation as the round row's metric columns."""
    return {"accuracy": res.accuracy, "loss": res.loss,
            "f1_macro": res.metrics.get("f1_macro"),
            **{k: v for k, v in res.metrics.items() if k != "f1_macro"}}


def serve(grid: Grid, config: Config, *, task: Task | None = None,
          strategy: Strategy | None = None, out_dir: Path | None = None,
          on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run the federation described by ``config`` on ``grid``; return results.json's content.

    Parameters
    ----------
    grid
        Flower's Grid (simulation engine, SuperLink, or an in-process test grid).
    config
        The validated run config (:func:`flowerpress.config.validate`).
    task
        The task; ``None`` builds the one the run config names.
    strategy
        A strategy object; ``None`` builds the run config's ``strategy`` spec.
    out_dir
        Where results.json, report.png, model.npz and checkpoint.npz go. With
        ``resume = true`` in ``config`` the run continues from the checkpoint
        there (or starts, if there is none); with ``overwrite = true`` another
        run's files there are removed first; with neither, an out-dir holding
        another run is refused.
    on_round
        Called with every finished round row.

    Raises
    ------
    flowerpress.config.ConfigError
        A task-only key (``lr``, ``batch-size``, ...) set to a non-default value
        that the task does not take (a task object takes none), before any round.
    RunFailedError
        The strategy raised or produced an unusable model, the user's code
        raised, or every reply of ``max-rejected-rounds`` rounds in a row was
        rejected for the same reason. Like any other error during
        the rounds, results.json (with ``summary.failed``, one line), the last
        good model.npz and ``error.log`` (the traceback) are written first.
    CheckpointError
        One line naming the file: ``resume`` and the checkpoint is damaged or
        does not fit this run (configuration, planned rounds, model, strategy,
        ledger or membership state); or neither ``resume`` nor ``overwrite``
        and ``out_dir`` holds another run (:func:`existing_run`). Nothing in
        ``out_dir`` is written before this is raised.

    The run's log lines (INFO and up, flowerpress's and Flower's) are copied
    to ``out_dir/server.log`` while it runs (:func:`~flowerpress.server.results.run_log`).
    """
    saved = claim_out_dir(config, out_dir)  # before anything in out_dir is touched
    if out_dir is not None:  # an error.log is always this run's
        (out_dir / ERROR_LOG).unlink(missing_ok=True)
    with run_log(out_dir, append=saved is not None):  # server.log: a resume adds to it
        return _serve(grid, config, saved, task=task, strategy=strategy, out_dir=out_dir,
                      on_round=on_round)


def _serve(grid: Grid, config: Config, saved: Checkpoint | None, *, task: Task | None,
           strategy: Strategy | None, out_dir: Path | None,
           on_round: RoundCallback | None) -> dict[str, Any]:
    """:func:`serve` once the out-dir is claimed (``saved``: the checkpoint to continue)."""
    from flowerpress.compression import parse as parse_codec
    from flowerpress.privacy import parse_dp
    from flowerpress.privacy.keys import Sampling
    from flowerpress.strategies import build_strategy
    from flowerpress.tasks.registry import build_task, task_name, task_spec

    if task is None:
        name = task_spec(config)
        task = build_task(name, config)
        taken = type(task).run_config_keys
    else:  # a task object never sees the run config
        name, taken = task_name(task), frozenset[str]()
    check_task_keys(config, taken, task=name)
    ran = task_record(task, name=name, taken=taken)
    initial = task.initial_weights()
    elements = sum(int(w.size) for w in initial)
    central = task.central_data()

    def evaluate_fn(weights: Sequence[NDArray[np.float32]]) -> Mapping[str, float | None]:
        # The user's task on the server: an exception is a bug, one line naming it.
        return evaluation_row(user_call(f"task {type(task).__name__}.evaluate",
                                        task.evaluate, list(weights), central))

    if strategy is None:
        strategy = build_strategy(str(config["strategy"]))
    dp = parse_dp(str(config["dp"]))
    max_eps = float(config["max-epsilon"])
    ledgers: list[ServerPrivacy] = []

    dp_sampling: Sampling = "fixed"
    if config["dp-sampling"] in ("poisson", "predictable"):
        dp_sampling = "poisson" if config["dp-sampling"] == "poisson" else "predictable"

    def make_ledger(population: int) -> ServerPrivacy:
        # The sampling rate is clients-per-round over the nodes actually there.
        # (dp_accounting and SciPy load here, with DP on: 2 CPU s per server process.)
        from flowerpress.privacy.accounting import ServerPrivacy

        assert dp is not None
        ledgers.append(ServerPrivacy(
            dp, num_clients=population,
            clients_per_round=min(int(config["clients-per-round"]), population),
            delta=float(config["dp-delta"]), max_epsilon=max_eps if max_eps > 0 else None,
            sampling=dp_sampling, weighted_sum=strategy.weighted_sum,
            min_replies=min(int(config["min-replies"]), population)))
        return ledgers[-1]

    if dp is not None and not strategy.weighted_sum:
        # The sum's noise does not protect a rule that reads single updates:
        # the ledger charges every released update on its own.
        log.warning("strategy %s is not a weighted sum of the updates: epsilon is "
                    "accounted per released update (no amplification)", config["strategy"])
    from flowerpress.server.secagg_round import secagg_privacy

    secagg_ledger = secagg_privacy(config, weighted_sum=strategy.weighted_sum,
                                   strategy=str(config["strategy"]), elements=elements,
                                   into=ledgers)
    download = parse_codec(str(config["download-compression"]))
    max_weight = float(config["max-client-weight"])
    # Bounds on what devices report as their compute, from the model and the run:
    # the task's own FLOP count for the largest plausible partition, the round timeout.
    compute = protocol.compute_bounds(
        initial, round_timeout=float(config["round-timeout"]), max_examples=max_weight,
        train_flops=user_call(f"task {type(task).__name__}.train_flops", task.train_flops,
                              max(1, int(max_weight))))
    settings = LoopSettings(
        rounds=int(config["rounds"]),
        clients_per_round=int(config["clients-per-round"]),
        round_timeout=float(config["round-timeout"]),
        min_replies=int(config["min-replies"]),
        seed=int(config["seed"]),
        node_wait_timeout=max(60.0, float(config["round-timeout"])),
        compression=str(config["compression"]),
        max_client_weight=float(config["max-client-weight"]),
        max_update_norm=float(config["max-update-norm"]),
        num_clients=int(config["num-clients"]),
        dp=dp is not None,
        max_missed_rounds=int(config["max-missed-rounds"]),
        max_rejected_rounds=int(config["max-rejected-rounds"]),
        secagg=str(config["secagg"]),
        download_history_bytes=int(float(config["download-history"]) * 1e6),
        download_full=str(config["download-full-compression"]),
        download_first=str(config["download-first-compression"]),
        link=parse_link(str(config["link"])),
        compression_warmup=int(config["compression-warmup"]),
        ef21_memory_bytes=int(float(config["ef21-memory"]) * 1e6),
        compute=compute,
        prune=str(config["prune"]),
    )
    privacy_factory = secagg_ledger or (None if dp is None else make_ledger)
    resume: LoopState | None = None
    if saved is not None:
        verify_checkpoint(saved, _expected(saved, config, initial, strategy, privacy_factory,
                                           ledgers, settings, download))
        resume = saved.state
        # Flower's logger: the line `flwr log` and `flwr run --stream` show.
        logging.getLogger("flwr").info("flowerpress: resuming from %s after round %s",
                                       saved.path, resume.server_round)
    elif out_dir is not None and config.get("overwrite"):
        for name in RUN_FILES:  # the other run is discarded, not mixed with this one
            (out_dir / name).unlink(missing_ok=True)
    start = evaluate_fn(initial) if central is not None else None
    if start is not None:
        log.info("initial accuracy %s on the central test set", start["accuracy"])
    rows_so_far: list[dict[str, Any]] = [] if resume is None else [dict(r) for r in resume.rows]
    last_good: list[list[NDArray[np.float32]]] = [
        list(initial) if resume is None else list(resume.weights)]
    resumed_at = [] if resume is None else [*resume.resumed_at, resume.server_round]
    # The membership's record of every node (results.json "nodes"), as of the last round.
    nodes: list[list[dict[str, Any]] | None] = [None]
    if resume is not None:
        nodes[0] = _node_report(resume.membership)

    def after_model(server_round: int, weights: list[NDArray[np.float32]]) -> None:
        del server_round
        last_good[-1] = weights
        if out_dir is not None:  # the last good model is always on disk
            save_model_atomic(out_dir / "model.npz", weights)

    def results(rows: Sequence[Mapping[str, Any]], stopped: str | None = None,
                failed: str | None = None) -> dict[str, Any]:
        return build_results(config, rows, model_elements=elements, initial=start,
                             privacy=ledgers[-1].privacy_block() if ledgers else None,
                             stopped=stopped, failed=failed, resumed_at=resumed_at, task=ran,
                             nodes=nodes[0])

    def after_state(state: LoopState) -> None:
        # The checkpoint first: it is what a resumed run reads; results.json
        # and model.npz are rebuilt from it.
        nodes[0] = _node_report(state.membership)
        if out_dir is not None:
            save_checkpoint(out_dir, state, config)

    def after_round(row: Mapping[str, Any]) -> None:
        rows_so_far.append(dict(row))
        _log_row(row)  # `flwr log`, `flwr run --stream` and server.log show it
        if out_dir is not None:  # keep results current, so a long run can be watched
            write_json_atomic(out_dir / "results.json", results(rows_so_far))
        if on_round is not None:
            on_round(row)

    try:
        final, rows, stopped = run_federation(
            grid, initial, strategy, settings, evaluate_fn=evaluate_fn if central is not None
            else None, privacy=privacy_factory, download=download,
            on_round=after_round, on_model=after_model, on_state=after_state, resume=resume)
    except ResumeError as exc:  # verify_checkpoint's probes should have caught it
        where = CHECKPOINT_NAME if out_dir is None else out_dir / CHECKPOINT_NAME
        raise CheckpointError(f"{where}: {exc}") from None
    except Exception as exc:  # RunFailedError (the user's code, ...) and anything unforeseen
        if out_dir is not None:
            line = str(exc) if isinstance(exc, RunFailedError) else failure_line(exc)
            write_error_log(out_dir / ERROR_LOG, exc)
            write_json_atomic(out_dir / "results.json", results(rows_so_far, failed=line))
            # The last good global model: the one the failed round started from.
            save_model_atomic(out_dir / "model.npz", last_good[-1])
        raise
    document = results(rows, stopped=stopped)
    if out_dir is not None:
        save_model_atomic(out_dir / "model.npz", final)
        write_json_atomic(out_dir / "results.json", document)
        write_report(out_dir / "report.png", document)
    return document


def _node_report(membership: Mapping[str, Any]) -> list[dict[str, Any]]:
    """results.json's ``nodes`` from a membership state (Membership.report's entries)."""
    from flowerpress.server.membership import Membership

    members = Membership(max_missed=0)
    members.load_state_dict(membership)
    return members.report()


def claim_out_dir(config: Config, out_dir: Path | None) -> Checkpoint | None:
    """The checkpoint to continue (``resume``), or None after checking a new run may start.

    A new run may start in an out-dir that holds no other run
    (:func:`~flowerpress.server.checkpoint.existing_run`), or in any with
    ``overwrite`` (:func:`serve` then removes the other run's files). With
    ``resume`` the checkpoint must be readable and intact and its run config
    the same except for the keys a resume may change; without a checkpoint a
    new run starts, unless a results.json with rounds is there.

    Raises
    ------
    CheckpointError
        One line naming the file or directory and what is wrong.
    ConfigError
        ``resume`` without ``out-dir``, or together with ``overwrite``.
    """
    resume, overwrite = bool(config.get("resume")), bool(config.get("overwrite"))
    if resume and overwrite:
        raise ConfigError("resume=true and overwrite=true exclude each other: continue the "
                          "run in out-dir, or discard it")
    if out_dir is None:
        if resume:
            raise ConfigError("resume=true is not allowed without out-dir (where the "
                              "checkpoint is)")
        return None
    if not resume:
        reason = None if overwrite else existing_run(out_dir)
        if reason is not None:
            raise CheckpointError(reason)
        return None
    saved = load_checkpoint(out_dir)
    if saved is None:
        if existing_run(out_dir) is not None:  # a results.json with rounds, no checkpoint
            raise CheckpointError(
                f"{out_dir / CHECKPOINT_NAME}: resume=true but there is no checkpoint, while "
                f"{RESULTS_NAME} holds another run's rounds (resuming would restart its "
                "privacy accounting): restore the checkpoint, discard the run with "
                "overwrite=true, or choose another out-dir")
        log.warning("resume: no checkpoint in %s; starting a new run", out_dir)
        return None
    differences = config_differences(saved.config, config, DEFAULTS)
    if differences:
        raise CheckpointError(f"{saved.path}: cannot resume: the run config differs from the "
                              f"checkpoint's in {'; '.join(differences)}")
    return saved


def _expected(saved: Checkpoint, config: Config, initial: Sequence[NDArray[np.float32]],
              strategy: Strategy, privacy: Callable[[int], Any] | None, ledgers: list[Any],
              settings: LoopSettings, download: Any) -> Expected:
    """What this run's components expect of ``saved``: probes that load into fresh copies."""
    def load_strategy(state: dict[str, Any]) -> None:
        # The loop loads it again when the rounds start (a load replaces the state).
        load = getattr(strategy, "load_state_dict", None)
        if callable(load):
            load(state)
        elif state:
            raise ValueError(f"strategy {type(strategy).__name__} has no load_state_dict")

    def load_privacy(population: int, state: Mapping[str, Any]) -> None:
        assert privacy is not None
        ledger = privacy(population)
        ledgers.remove(ledger)  # a probe: not this run's ledger
        ledger.load_state_dict(state)

    def load_download(state: Any) -> None:
        history = make_history(settings, download, initial)
        if history is not None:
            history.load_state_dict(state, saved.state.weights)

    return Expected(rounds=int(config["rounds"]), dp=privacy is not None, model=initial,
                    load_strategy=load_strategy,
                    load_privacy=None if privacy is None else load_privacy,
                    load_download=load_download)


def settings_config(settings: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """Python keyword settings (``clients_per_round``) as run-config keys."""
    out: dict[str, Scalar] = {}
    for name, value in settings.items():
        key = name.replace("_", "-")
        if key not in SCHEMA:
            raise TypeError(f"unknown setting {name!r}; known: "
                            f"{', '.join(k.replace('-', '_') for k in SCHEMA)}")
        out[key] = value
    return out


def server_app(task: Task | None = None, *, strategy: Strategy | str | None = None,
               **settings: Scalar) -> ServerApp:
    """A Flower ServerApp that runs flowerpress's round loop for ``task``.

    Parameters
    ----------
    task
        The task; ``None`` builds the run config's ``task`` (or bundled ``dataset``).
    strategy
        A :class:`~flowerpress.strategies.Strategy` object or a spec string
        (``"fedavg"``, ``"trimmed-mean:beta=0.2"``, ``"pkg.mod:Class"``).
    **settings
        Run-config keys in Python form: ``rounds=20``, ``clients_per_round=10``,
        ``compression="topk:0.01+q:8+ef+zstd"``, ``dp="distributed:clip=1,noise=1"``...
        The run config ``flwr run`` passes overrides them.

    Raises
    ------
    TypeError
        A setting that is not a run-config key.
    flowerpress.config.ConfigError
        A value the run config would refuse (checked here, at build time).
    """
    base = settings_config(settings)
    strategy_object = strategy if isinstance(strategy, Strategy) else None
    if isinstance(strategy, str):
        base["strategy"] = strategy
    elif strategy_object is not None:
        base["strategy"] = type(strategy_object).__name__
    validated = validate(base if strategy_object is None else
                         {k: v for k, v in base.items() if k != "strategy"})
    if task is not None:  # the run config never reaches a task object
        from flowerpress.tasks.registry import task_name

        check_task_keys(validated, (), task=task_name(task))
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Entry point for ``flwr run``: the run config comes from Flower."""
        values = {**base, **{k: v for k, v in context.run_config.items() if k in SCHEMA}}
        if strategy_object is not None:
            values.pop("strategy", None)
        try:  # plug-ins are imported here: a module that fails is the run's one line
            config = validate(values, strict=False)
        except ConfigError as exc:
            log.error("flowerpress: run failed: %s", failure_line(exc))
            raise
        from flowerpress.federation import runtime_env_mismatch

        warning = runtime_env_mismatch(os.environ)
        if warning:
            log.warning("%s", warning)
        if strategy_object is not None:
            config["strategy"] = type(strategy_object).__name__
        out_dir = Path(str(config["out-dir"])) if config["out-dir"] else None
        try:
            serve(grid, config, task=task, strategy=strategy_object, out_dir=out_dir)
        except Exception as exc:
            if out_dir is not None and not (out_dir / ERROR_LOG).exists():
                # Failed before the rounds (task, data, nodes, checkpoint): the
                # traceback always; a results.json only where none is, so another
                # run's results (or the one a bad checkpoint was to continue) stay.
                write_error_log(out_dir / ERROR_LOG, exc)
                if not (out_dir / RESULTS_NAME).exists() and not isinstance(
                        exc, CheckpointError):
                    write_json_atomic(out_dir / RESULTS_NAME, build_results(
                        config, [], model_elements=0, failed=failure_line(exc)))
            log.error("flowerpress: run failed: %s", failure_line(exc))
            raise

    return app


def _log_row(row: Mapping[str, Any]) -> None:
    # Flower's logger is the one `flwr run --stream` and `flwr log` show.
    acc = row["accuracy"]
    logging.getLogger("flwr").info(
        "round %s: accuracy %s, %s clients, %s rejected, upload %.3f MB, epsilon %s",
        row["round"], "-" if acc is None else f"{acc:.4f}", row["clients"], row["rejected"],
        row["upload_bytes"] / 1e6, row["epsilon"])


#: The app ``flwr run`` loads (``[tool.flwr.app.components]``).
app = server_app()
