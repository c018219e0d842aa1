"""Checks that the federation Flower started is the one the run config describes.

``flwr run .`` on Flower's managed local SuperLink (Flower >= 1.41) takes the
number of simulated SuperNodes from ``--federation-config num-supernodes=N``
or from the federation's stored simulation config, never from the app's run
config, and defaults to 2 nodes. Flower's simulation engine gives each node
``num-partitions = N``, so a federation of another size than ``num-clients``
silently splits the data differently from what the run config asks for.
Flower cannot take the size from the run config, so the ServerApp checks it
and refuses with one line.

The same SuperLink installs the app's ``[project].dependencies`` into a fresh
environment under ``$FLWR_HOME/runtime-envs/`` for every run unless it was
started with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (or
``--disable-runtime-dependency-installation``); :func:`runtime_env_mismatch`
says so when a run finds itself in such an environment.

Both functions are pure: the caller decides whether to stop the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath

from flowerpress.config import Scalar

#: The directory (under ``FLWR_HOME``) where Flower creates per-run environments
#: (``flwr/supercore/superexec/dependency_installer.py``, ``_RUNTIME_ENV_DIR``).
FLOWER_RUNTIME_ENV_DIR = "runtime-envs"

#: The environment variable that keeps Flower's SuperLink from installing the
#: app's dependencies (``flwr/common/constant.py``).
DISABLE_INSTALL_ENV = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"


def federation_mismatch(found_nodes: int, config: Mapping[str, Scalar]) -> str | None:
    """One line naming the mismatch between the federation and the run config, or None.

    Parameters
    ----------
    found_nodes
        How many nodes the ServerApp's grid reports (``len(grid.get_node_ids())``)
        once it has waited for them.
    config
        The validated run config; ``num-clients`` is the federation size it asks for.

    Returns
    -------
    str | None
        ``None`` when the federation has exactly ``num-clients`` nodes, else a
        single line that names both numbers and how to start the right federation.
    """
    wanted = int(config["num-clients"])
    if found_nodes == wanted:
        return None
    fixes = [f"run `flwr run . --federation-config num-supernodes={wanted}` (simulation)",
             f"start {wanted} SuperNodes (deployment)"]
    if found_nodes > 0:
        fixes.append(f"set num-clients={found_nodes}")
    return (f"the federation has {found_nodes} nodes but the run config asks for "
            f"num-clients={wanted}: {', '.join(fixes[:-1])} or {fixes[-1]}")


def runtime_env_mismatch(environ: Mapping[str, str]) -> str | None:
    """One line if this process runs in a Flower per-run environment, else None.

    Flower activates such an environment by setting ``VIRTUAL_ENV`` to
    ``$FLWR_HOME/runtime-envs/<run>`` after ``uv sync`` installed the app's
    dependencies into it; flowerpress is meant to run in the environment it was
    installed in (the pinned CPU torch of ``constraints.txt``).

    Parameters
    ----------
    environ
        The process environment (``os.environ``).
    """
    venv = environ.get("VIRTUAL_ENV", "")
    if not venv or PurePath(venv).parent.name != FLOWER_RUNTIME_ENV_DIR:
        return None
    return (f"Flower installed this run's dependencies into a fresh environment ({venv}) "
            f"instead of using the installed one; stop the local SuperLink and start it "
            f"again with {DISABLE_INSTALL_ENV}=1")
